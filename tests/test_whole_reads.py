"""Whole reads: a large frame (or a raw chunk) read straight into a new bytes object.

With ``whole_reads`` on, a decoder asks, right after a large frame, for a read of that
frame's size (:meth:`FrameDecoder.whole_read_size`); a frame that arrives whole in it keeps
the read's bytes object as its wire bytes (no buffer of its own to zero-fill, no copy).
Anything else such a read brings is taken as an ordinary read would be. The decoder tests
feed bytes by hand; the Connection tests use real socket pairs, where the path matters.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tracemalloc
from collections.abc import Callable, Iterator, Sequence

import pytest
import trio
import trio.testing

from framewire import Frame, FrameKind
from framewire.daemon import transport
from framewire.daemon.flow import receive_frames
from framewire.daemon.transport import RECEIVE_YIELD_READS, WHOLE_READ_HEAD, Connection
from framewire.protocols import FrameTooLarge, ProtocolError, TruncatedFrame, WholeReadDecoder
from framewire.protocols._framing import LARGE_FRAME, RECEIVE_BUFFER_SIZE
from framewire.protocols.g3 import G3Decoder
from framewire.protocols.native import HEADER, MAGIC, VERSION, NativeDecoder
from framewire.protocols.raw import RawDecoder

from .g3frames import g3_frame
from .helpers import encode

#: A large frame's payload: above LARGE_FRAME, so it gets a buffer (or a read) of its own,
#: and larger than the first receive buffer, so that even the first frame does.
SIZE = RECEIVE_BUFFER_SIZE + LARGE_FRAME // 2


def frames_of(size: int, count: int, first: int = 0) -> list[Frame]:
    return [
        Frame(FrameKind.DATA, "sample", bytes([i % 251]) * size, i)
        for i in range(first, first + count)
    ]


def whole_decoder(max_frame_size: int = 1 << 24) -> NativeDecoder:
    decoder = NativeDecoder(max_frame_size=max_frame_size)
    decoder.whole_reads = True
    return decoder


def read_into(decoder: NativeDecoder, wire: memoryview) -> tuple[int, list[Frame]]:
    """One ordinary read of as much of ``wire`` as the decoder offers room for."""
    target = decoder.get_buffer()
    n = min(len(target), len(wire))
    target[:n] = wire[:n]
    del target
    return n, decoder.buffer_updated(n)


def read_like_a_socket(decoder: NativeDecoder, wire: bytes) -> tuple[list[Frame], list[str]]:
    """Read all of ``wire`` the way Connection.frame_reader does when the socket holds it
    all; return the frames and, per read, "whole" or "into"."""
    frames: list[Frame] = []
    reads: list[str] = []
    source = memoryview(wire)
    while source:
        size = decoder.whole_read_size()
        if size:
            data = bytes(source[:size])
            n = len(data)
            frames += decoder.bytes_received(data)
            reads.append("whole")
        else:
            n, got = read_into(decoder, source)
            frames += got
            reads.append("into")
        source = source[n:]
    decoder.end_of_input()
    return frames, reads


# -- the decoder ------------------------------------------------------------------------------


def test_equal_large_frames_after_the_first_arrive_whole_in_their_reads() -> None:
    frames = frames_of(SIZE, 5)
    decoder = whole_decoder()
    got, reads = read_like_a_socket(decoder, encode(frames))
    assert got == frames
    # The first frame is read as before (its header arrives in the receive buffer); its
    # own buffer ends its last read exactly, so every later frame is one whole read ...
    whole = len(reads) - reads.index("whole")
    assert reads[-whole:] == ["whole"] * whole
    assert whole == len(frames) - 1
    # ... whose bytes object is the frame's wire, exactly the frame's bytes.
    for frame in got[-whole:]:
        assert type(frame.wire) is bytes
        assert frame.size == len(frame.wire) == 28 + len("sample") + SIZE


def test_a_whole_read_keeps_the_very_bytes_object_it_was_given() -> None:
    first, second = encode(frames_of(SIZE, 1)), encode(frames_of(SIZE, 1, first=1))
    decoder = whole_decoder()
    read_like_a_socket(decoder, first)
    assert decoder.whole_read_size() == len(second)
    (frame,) = decoder.bytes_received(second)
    assert frame.wire is second
    assert bytes(frame.payload) == bytes([1]) * SIZE


def test_with_whole_reads_a_large_frame_is_never_read_past_its_end() -> None:
    wire = encode(frames_of(SIZE, 2))
    frame_size = len(wire) // 2
    decoder = whole_decoder()
    offered = []
    source = memoryview(wire)[:frame_size]
    while source:
        target = decoder.get_buffer()
        offered.append(len(target))
        n = min(len(target), len(source))
        target[:n] = source[:n]
        del target
        decoder.buffer_updated(n)
        source = source[n:]
    assert decoder.buffered == 0
    assert decoder.whole_read_size() == frame_size
    # The read that completed the frame was offered exactly the frame's rest.
    assert offered[-1] == frame_size - sum(offered[:-1])


def test_whole_reads_are_off_unless_asked_for() -> None:
    wire = encode(frames_of(SIZE, 3))
    plain = NativeDecoder(max_frame_size=1 << 24)
    got, reads = read_like_a_socket(plain, wire)
    assert len(got) == 3
    assert set(reads) == {"into"}


@pytest.mark.parametrize("cut", [1, 27, 28, 40, LARGE_FRAME, SIZE])
def test_a_whole_read_that_brings_only_part_of_the_frame(cut: int) -> None:
    """The socket held less than a frame: what arrived is kept, the rest read as usual."""
    first, rest = encode(frames_of(SIZE, 1)), encode(frames_of(SIZE, 2, first=1))
    decoder = whole_decoder()
    read_like_a_socket(decoder, first)
    assert decoder.whole_read_size() == len(first)
    assert decoder.bytes_received(rest[:cut]) == []
    assert decoder.buffered == cut
    assert decoder.whole_read_size() == 0
    got, _ = read_like_a_socket(decoder, rest[cut:])
    assert got == frames_of(SIZE, 2, first=1)


@pytest.mark.parametrize(
    "sizes",
    [
        [SIZE, SIZE - 1000, SIZE - 1000],  # a smaller frame, then the start of the next
        [SIZE, SIZE + 1000, SIZE],  # a larger frame: the read brings only its start
        [SIZE, 100, 5, SIZE, 70_000, SIZE],  # small frames between large ones
    ],
)
def test_frames_of_other_sizes_after_a_large_frame(sizes: list[int]) -> None:
    frames = [Frame(FrameKind.DATA, "t", bytes([i]) * size, i) for i, size in enumerate(sizes)]
    decoder = whole_decoder()
    got, _ = read_like_a_socket(decoder, encode(frames))
    assert got == frames
    for frame in got:
        assert frame.size == len(frame.wire or b"")


def test_a_whole_read_over_max_frame_size_fails_and_poisons_the_decoder() -> None:
    decoder = whole_decoder(max_frame_size=SIZE + 100)
    read_like_a_socket(decoder, encode(frames_of(SIZE, 1)))
    too_large = encode(frames_of(SIZE + 200, 1))
    with pytest.raises(FrameTooLarge):
        decoder.bytes_received(too_large[: decoder.whole_read_size()])
    assert decoder.failed
    assert decoder.whole_read_size() == 0
    with pytest.raises(FrameTooLarge):
        decoder.bytes_received(b"FW")


def test_bad_bytes_in_a_whole_read_fail_like_any_read() -> None:
    decoder = whole_decoder()
    read_like_a_socket(decoder, encode(frames_of(SIZE, 1)))
    with pytest.raises(ProtocolError, match="bad magic"):
        decoder.bytes_received(b"XX" + bytes(decoder.whole_read_size() - 2))
    assert decoder.failed


def test_a_header_announcing_far_more_than_arrives_holds_only_what_arrived() -> None:
    """Memory follows the bytes that arrived, never the length a header announces, in a
    whole read as in any other."""
    decoder = whole_decoder(max_frame_size=1 << 31)
    read_like_a_socket(decoder, encode(frames_of(SIZE, 1)))
    liar = HEADER.pack(MAGIC, VERSION, 0, 1, 0, 0, 0, 1 << 30, 0) + b"t" + bytes(10)
    tracemalloc.start()
    try:
        assert decoder.bytes_received(liar) == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert decoder.buffered == len(liar)
    # At most the size of the last large frame (the first guess for the next one's buffer).
    assert peak < 2 * SIZE
    with pytest.raises(TruncatedFrame):
        decoder.end_of_input()


def test_raw_whole_reads_keep_each_reads_bytes_as_the_payload() -> None:
    decoder = RawDecoder(max_frame_size=1 << 20, buffer_size=1000)
    decoder.whole_reads = True
    assert isinstance(decoder, WholeReadDecoder)
    sizes = []
    for length in (1000, 2000, 3999, 10):
        size = decoder.whole_read_size()
        sizes.append(size)
        data = bytes([length % 256]) * min(length, size)
        (frame,) = decoder.bytes_received(data)
        assert frame.payload is data
        assert frame.size == len(data)
    # Each read that filled its size doubled it; the short ones did not.
    assert sizes == [1000, 2000, 4000, 4000]
    assert decoder._view is None  # no reused buffer was ever made


def test_raw_whole_reads_grow_only_up_to_max_frame_size() -> None:
    decoder = RawDecoder(max_frame_size=3000, buffer_size=1000)
    for _ in range(5):
        decoder.bytes_received(bytes(decoder.whole_read_size()))
    assert decoder.whole_read_size() == 3000


# -- over real sockets --------------------------------------------------------------------------


@pytest.fixture
def socket_pair() -> Iterator[tuple[Connection, socket.socket]]:
    """A connection over one end of a UNIX socket pair with room for a few MiB in flight,
    and the other end (blocking, with a timeout)."""
    with open_socket_pair() as pair:
        yield pair


@contextlib.contextmanager
def open_socket_pair() -> Iterator[tuple[Connection, socket.socket]]:
    """What :func:`socket_pair` gives, made when called."""
    ours, theirs = socket.socketpair()
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    theirs.settimeout(10)
    connection = Connection(trio.SocketStream(trio.socket.from_stdlib_socket(ours)), "peer")
    try:
        yield connection, theirs
    finally:
        ours.close()
        theirs.close()


async def collect(
    connection: Connection, decoder: NativeDecoder | RawDecoder | G3Decoder
) -> list[Frame]:
    """Every frame until the peer closes, through flow.receive_frames."""
    got: list[Frame] = []

    async def publish(frames: Sequence[Frame]) -> None:
        got.extend(frames)
        await trio.lowlevel.checkpoint()

    with trio.fail_after(10):
        await receive_frames(connection, decoder, publish)
    return got


async def test_large_frames_the_socket_holds_whole_are_read_one_read_each(
    socket_pair: tuple[Connection, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    connection, theirs = socket_pair
    frames = frames_of(SIZE, 6)
    theirs.sendall(encode(frames))
    theirs.shutdown(socket.SHUT_WR)
    decoder = NativeDecoder(max_frame_size=1 << 24)
    read = connection.frame_reader(decoder)
    assert decoder.whole_reads
    whole_reads: list[int] = []
    real_read = os.read

    def counting_read(fd: int, size: int) -> bytes:
        data = real_read(fd, size)
        whole_reads.append(len(data))
        return data

    monkeypatch.setattr(os, "read", counting_read)
    got: list[Frame] = []
    calls = []
    with trio.fail_after(10):
        while True:
            n, done = await read()
            if not n:
                break
            calls.append(len(done))
            got += done
    decoder.end_of_input()
    assert got == frames
    # The frames after the first are one read(2) each, exactly the frame, and come
    # together: the socket held them all, so one call took them (within the read credit).
    frame_size = len(encode(frames[:1]))
    assert whole_reads[-6:-1] == [frame_size] * 5
    assert calls[-1] == 5
    assert all(type(frame.wire) is bytes for frame in got[1:])
    assert connection.bytes_received == len(encode(frames))


async def test_frames_read_together_stop_where_the_read_credit_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whole frames the socket holds are taken in one call only while the read credit
    lasts, so a flooding peer still lets the scheduler run between calls."""
    monkeypatch.setattr(transport, "RECEIVE_YIELD_BYTES", 3 * SIZE)
    with open_socket_pair() as (connection, theirs):
        await read_credit_batches(connection, theirs)


async def test_frames_read_together_before_bad_bytes_still_come_out(
    socket_pair: tuple[Connection, socket.socket],
) -> None:
    """A bad frame among the whole frames one call reads: the good ones before it are
    returned as one call at a time would have; the next call raises the error."""
    connection, theirs = socket_pair
    frames = frames_of(SIZE, 4)
    wire = bytearray(encode(frames))
    frame_size = len(wire) // 4
    wire[3 * frame_size : 3 * frame_size + 2] = b"XX"  # the fourth frame's magic
    theirs.sendall(wire)
    decoder = NativeDecoder(max_frame_size=1 << 24)
    read = connection.frame_reader(decoder)
    got: list[Frame] = []
    with trio.fail_after(10):
        while len(got) < 3:
            n, done = await read()
            assert n
            got += done
        with pytest.raises(ProtocolError, match="bad magic"):
            await read()
    assert got == frames[:3]


async def read_credit_batches(connection: Connection, theirs: socket.socket) -> None:
    frames = frames_of(SIZE, 9)
    theirs.sendall(encode(frames))
    theirs.shutdown(socket.SHUT_WR)
    decoder = NativeDecoder(max_frame_size=1 << 24)
    read = connection.frame_reader(decoder)
    calls = []
    got: list[Frame] = []
    with trio.fail_after(10):
        while True:
            n, done = await read()
            if not n:
                break
            calls.append(len(done))
            got += done
    assert got == frames
    assert max(calls) <= 3
    assert sum(calls) == 9


async def test_a_frame_that_arrives_in_pieces_is_put_together(
    socket_pair: tuple[Connection, socket.socket],
) -> None:
    connection, theirs = socket_pair
    frames = frames_of(SIZE, 4)
    wire = encode(frames)
    frame_size = len(wire) // 4
    decoder = NativeDecoder(max_frame_size=1 << 24)
    got: list[Frame] = []

    async def publish(batch: Sequence[Frame]) -> None:
        got.extend(batch)
        await trio.lowlevel.checkpoint()

    async def write_in_pieces() -> None:
        # Two frames at once; then the third in three pieces, each once the reader waits
        # for more; then the fourth, and the end.
        theirs.sendall(wire[: 2 * frame_size])
        for start, stop in ((0, 40), (40, 5000), (5000, frame_size)):
            await trio.testing.wait_all_tasks_blocked()
            theirs.sendall(wire[2 * frame_size + start : 2 * frame_size + stop])
        await trio.testing.wait_all_tasks_blocked()
        theirs.sendall(wire[3 * frame_size :])
        theirs.shutdown(socket.SHUT_WR)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_in_pieces)
            await receive_frames(connection, decoder, publish)
    assert got == frames


async def test_a_frame_the_socket_holds_only_part_of_is_read_from_its_start(
    socket_pair: tuple[Connection, socket.socket],
) -> None:
    """A whole read that finds only part of the frame takes its start, not all that is
    there: the rest goes straight into the frame's own buffer, nothing is copied twice."""
    connection, theirs = socket_pair
    frames = frames_of(SIZE, 2)
    wire = encode(frames)
    frame_size = len(wire) // 2
    arrived = frame_size + 4 * WHOLE_READ_HEAD  # all of the first, most of the second
    theirs.sendall(wire[:arrived])
    decoder = NativeDecoder(max_frame_size=1 << 24)
    read = connection.frame_reader(decoder)
    got: list[Frame] = []
    with trio.fail_after(10):
        while not got:
            got += (await read())[1]
        assert decoder.whole_read_size() == frame_size
        n, done = await read()
        assert done == []
        assert n == WHOLE_READ_HEAD == decoder.buffered
        n, done = await read()  # the rest of what arrived: into the frame's buffer
        assert n == arrived - frame_size - WHOLE_READ_HEAD
        theirs.sendall(wire[arrived:])
        while len(got) < 2:
            got += (await read())[1]
    assert got == frames
    assert type(got[1].wire) is bytearray


async def test_a_raw_read_takes_all_the_socket_holds(
    socket_pair: tuple[Connection, socket.socket],
) -> None:
    connection, theirs = socket_pair
    theirs.sendall(bytes(3 * WHOLE_READ_HEAD))
    decoder = RawDecoder(max_frame_size=1 << 20)
    read = connection.frame_reader(decoder)
    with trio.fail_after(10):
        n, (frame,) = await read()
    assert n == frame.size == 3 * WHOLE_READ_HEAD


async def test_a_peer_that_closes_inside_a_frame_read_whole_is_a_truncated_frame(
    socket_pair: tuple[Connection, socket.socket],
) -> None:
    connection, theirs = socket_pair
    wire = encode(frames_of(SIZE, 3))
    theirs.sendall(wire[: len(wire) - 1000])
    theirs.shutdown(socket.SHUT_WR)
    decoder = NativeDecoder(max_frame_size=1 << 24)
    got: list[Frame] = []

    async def publish(batch: Sequence[Frame]) -> None:
        got.extend(batch)
        await trio.lowlevel.checkpoint()

    with pytest.raises(TruncatedFrame), trio.fail_after(10):
        await receive_frames(connection, decoder, publish)
    assert got == frames_of(SIZE, 2)


async def test_a_peer_announcing_more_than_it_sends_then_leaving(
    socket_pair: tuple[Connection, socket.socket],
) -> None:
    connection, theirs = socket_pair
    liar = HEADER.pack(MAGIC, VERSION, 0, 1, 0, 0, 0, 1 << 30, 0) + b"t" + bytes(10)
    theirs.sendall(encode(frames_of(SIZE, 2)) + liar)
    theirs.shutdown(socket.SHUT_WR)
    decoder = NativeDecoder(max_frame_size=1 << 31)
    with pytest.raises(TruncatedFrame, match=f"{len(liar)} bytes into a frame"):
        await collect(connection, decoder)


async def test_a_frame_over_max_frame_size_after_whole_reads(
    socket_pair: tuple[Connection, socket.socket],
) -> None:
    connection, theirs = socket_pair
    theirs.sendall(encode(frames_of(SIZE, 2) + frames_of(SIZE + 500, 1)))
    theirs.shutdown(socket.SHUT_WR)
    decoder = NativeDecoder(max_frame_size=SIZE + 100)
    with pytest.raises(FrameTooLarge):
        await collect(connection, decoder)
    assert decoder.failed


async def test_raw_over_a_socket_keeps_each_reads_bytes(
    socket_pair: tuple[Connection, socket.socket],
) -> None:
    connection, theirs = socket_pair
    data = bytes(range(256)) * 4096  # 1 MiB
    theirs.sendall(data)
    theirs.shutdown(socket.SHUT_WR)
    decoder = RawDecoder(max_frame_size=1 << 20)
    got = await collect(connection, decoder)
    assert b"".join(bytes(frame.payload) for frame in got) == data
    assert all(type(frame.payload) is bytes and frame.size <= 1 << 20 for frame in got)
    assert decoder._view is None


async def test_memory_streams_keep_the_ordinary_reads() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    frames = frames_of(SIZE, 3)
    await theirs.send_all(encode(frames))
    await theirs.aclose()
    decoder = NativeDecoder(max_frame_size=1 << 24)
    got = await collect(Connection(ours, "memory"), decoder)
    assert got == frames
    assert not decoder.whole_reads


async def test_receive_bytes_returns_given_back_bytes_first_then_the_end(
    socket_pair: tuple[Connection, socket.socket],
) -> None:
    connection, theirs = socket_pair
    connection.give_back(b"vetted")
    theirs.sendall(b"more")
    theirs.shutdown(socket.SHUT_WR)
    with trio.fail_after(10):
        assert await connection.receive_bytes(4) == b"vett"
        assert await connection.receive_bytes(100) == b"ed"
        assert await connection.receive_bytes(100) == b"more"
        assert await connection.receive_bytes(100) == b""
    assert connection.bytes_received == 10


async def test_receive_bytes_on_a_closed_connection_is_a_broken_resource(
    socket_pair: tuple[Connection, socket.socket],
) -> None:
    connection, _ = socket_pair
    await connection.stream.aclose()
    with pytest.raises(trio.BrokenResourceError):
        await connection.receive_bytes(10)


async def test_receive_bytes_yields_to_other_tasks_like_receive_into(
    socket_pair: tuple[Connection, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    connection, theirs = socket_pair
    theirs.sendall(bytes(64 * 1024))
    turns = 0

    async def other_task() -> None:
        nonlocal turns
        while True:
            await trio.lowlevel.checkpoint()
            turns += 1

    reads = 20 * RECEIVE_YIELD_READS
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(other_task)
            await trio.lowlevel.checkpoint()
            turns = 0
            for _ in range(reads):
                assert len(await connection.receive_bytes(16)) == 16
            nursery.cancel_scope.cancel()
    assert reads // (2 * RECEIVE_YIELD_READS) <= turns <= reads // 2
    # ... and its byte budget counts too.
    monkeypatch.setattr(transport, "RECEIVE_YIELD_BYTES", 4096)
    connection._read_credit_bytes = 4096
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(other_task)
            await trio.lowlevel.checkpoint()
            turns = 0
            for _ in range(48):
                assert len(await connection.receive_bytes(1024)) == 1024
            nursery.cancel_scope.cancel()
    assert turns >= 48 // 8


async def test_when_memory_for_a_whole_read_cannot_be_had_it_reads_into_the_buffer(
    socket_pair: tuple[Connection, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    connection, theirs = socket_pair
    frames = frames_of(SIZE, 3)
    theirs.sendall(encode(frames))
    theirs.shutdown(socket.SHUT_WR)

    async def no_memory(
        self: Connection,
        max_bytes: int,
        *,
        whole: bool = False,
        frame_size: Callable[[bytes], int] | None = None,
    ) -> bytes:
        raise MemoryError

    monkeypatch.setattr(Connection, "receive_bytes", no_memory)
    decoder = NativeDecoder(max_frame_size=1 << 24)
    got = await collect(connection, decoder)
    assert got == frames
    # Each whole read asked for failed before reading anything; its frame came as before.
    assert all(type(frame.wire) is bytearray for frame in got)


# -- stepwise protocols (G3) -------------------------------------------------------------------


def g3_scans(sizes: Sequence[int]) -> list[bytes]:
    return [
        g3_frame("Scan", {b"index": bytes([i]) * 8, b"samples": bytes([i % 251]) * size})
        for i, size in enumerate(sizes)
    ]


@pytest.mark.parametrize("verify_crc", [False, True])
@pytest.mark.parametrize(
    "sizes",
    [[SIZE] * 6, [SIZE, SIZE, SIZE - 5000, SIZE - 5000, SIZE + 7000, SIZE], [SIZE, 100, SIZE]],
)
async def test_g3_frames_over_a_socket_with_whole_reads(
    socket_pair: tuple[Connection, socket.socket], verify_crc: bool, sizes: list[int]
) -> None:
    """G3's decoder measures a frame step by step (and sums its CRC as bytes arrive): whole
    reads, and the reads that bring only part of a frame or more than one, keep both right."""
    connection, theirs = socket_pair
    wires = g3_scans(sizes)
    theirs.sendall(b"".join(wires))
    theirs.shutdown(socket.SHUT_WR)
    decoder = G3Decoder(max_frame_size=1 << 24, verify_crc=verify_crc)
    got = await collect(connection, decoder)
    assert [bytes(frame.wire or b"") for frame in got] == wires
    if sizes == [SIZE] * 6:
        # Once a frame's own buffer (sized by the frame before it) ended a read, the equal
        # frames after it came whole, each read straight into its wire bytes.
        assert [type(frame.wire) for frame in got[2:]] == [bytearray, bytes, bytes, bytes]


async def test_g3_frames_arriving_in_pieces_over_a_socket(
    socket_pair: tuple[Connection, socket.socket],
) -> None:
    connection, theirs = socket_pair
    wires = g3_scans([SIZE] * 4)
    wire = b"".join(wires)
    decoder = G3Decoder(max_frame_size=1 << 24, verify_crc=True)
    got: list[Frame] = []

    async def publish(batch: Sequence[Frame]) -> None:
        got.extend(batch)
        await trio.lowlevel.checkpoint()

    async def write_in_pieces() -> None:
        step = len(wires[0]) // 5 + 3
        for start in range(0, len(wire), step):
            await trio.testing.wait_all_tasks_blocked()
            theirs.sendall(wire[start : start + step])
        theirs.shutdown(socket.SHUT_WR)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_in_pieces)
            await receive_frames(connection, decoder, publish)
    assert [bytes(frame.wire or b"") for frame in got] == wires


async def test_a_g3_crc_mismatch_in_a_whole_read_is_refused(
    socket_pair: tuple[Connection, socket.socket],
) -> None:
    connection, theirs = socket_pair
    good = g3_scans([SIZE] * 3)
    bad = bytearray(good[2])
    bad[len(bad) // 2] ^= 0xFF
    theirs.sendall(good[0] + good[1] + bytes(bad))
    theirs.shutdown(socket.SHUT_WR)
    decoder = G3Decoder(max_frame_size=1 << 24, verify_crc=True)
    with pytest.raises(ProtocolError, match="CRC mismatch"):
        await collect(connection, decoder)
