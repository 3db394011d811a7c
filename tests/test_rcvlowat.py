"""Whole reads on TCP wait for the whole frame (SO_RCVLOWAT), and idle timeouts still fire.

A whole read that finds only part of a large frame in a TCP socket peeks at its header, sets
the socket's low-water mark to the frame's size (at most RCVLOWAT_MAX) and waits once, so
the kernel wakes the reader when the frame is whole and it is read with one read(2). The
mark is reset to 1 before any wait for a frame of unknown size, a frame beyond the cap still
arrives, and a producer that stops mid-frame is still dropped by the receiver's idle timeout
while one still sending its frame is not.
"""

from __future__ import annotations

import contextlib
import random
import socket
from collections.abc import AsyncIterator, Sequence

import pytest
import trio
import trio.testing

from framewire import Frame, FrameKind
from framewire.config import Address, BackoffConfig, ReceiverConfig
from framewire.daemon import transport
from framewire.daemon.endpoints import EndpointContext, Transports
from framewire.daemon.endpoints.receiver import ReceiverEndpoint
from framewire.daemon.stream import StreamRegistry
from framewire.daemon.transport import RCVLOWAT_MAX, Connection, Connector
from framewire.protocols._framing import LARGE_FRAME
from framewire.protocols.g3 import G3Decoder
from framewire.protocols.native import NativeDecoder
from framewire.protocols.raw import RawDecoder

from .helpers import encode

#: A large frame's payload (read whole, with a low-water mark of about this much).
SIZE = 3 * LARGE_FRAME
UPSTREAM = Address("tcp", "192.0.2.1", 4536)  # never dialled: the connector is injected


def frames_of(size: int, count: int) -> list[Frame]:
    return [Frame(FrameKind.DATA, "sample", bytes([i % 251]) * size, i) for i in range(count)]


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """Two ends of a loopback TCP connection (numeric address: no lookups)."""
    listener = trio.socket.socket()
    with listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        theirs = trio.socket.socket()
        await theirs.connect(listener.getsockname())
        ours, _ = await listener.accept()
    return trio.SocketStream(ours), trio.SocketStream(theirs)


@contextlib.asynccontextmanager
async def tcp_connection() -> AsyncIterator[tuple[Connection, trio.SocketStream]]:
    ours, theirs = await tcp_pair()
    async with ours, theirs:
        yield Connection(ours, "peer"), theirs


def lowat_of(connection: Connection) -> int:
    stream = connection.stream
    assert isinstance(stream, trio.SocketStream)
    return stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)


async def read_until(
    read: transport.FrameReader, count: int, got: list[Frame], calls: list[int]
) -> None:
    while len(got) < count:
        n, done = await read()
        assert n, "the peer closed early"
        calls.append(len(done))
        got += done


async def send_and_read(
    theirs: trio.SocketStream,
    data: bytes,
    read: transport.FrameReader,
    count: int,
    got: list[Frame],
    calls: list[int],
) -> None:
    """Send ``data`` while reading until ``count`` frames are in (a large write does not
    fit the socket buffers of a fresh connection: someone must read)."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_until, read, count, got, calls)
        await theirs.send_all(data)


# -- the decoder -----------------------------------------------------------------------------


def test_whole_frame_size_reads_the_size_from_the_header_at_a_frame_boundary() -> None:
    first, second = (encode([frame]) for frame in frames_of(SIZE, 2))
    decoder = NativeDecoder(max_frame_size=1 << 24)
    decoder.whole_reads = True
    # Not at a boundary after a large frame yet: nothing to say.
    assert decoder.whole_frame_size(first[:64]) == 0
    assert decoder.feed(first) == frames_of(SIZE, 1)
    assert decoder.whole_read_size() == len(first)
    assert decoder.whole_frame_size(second[:64]) == len(second)
    # Too little to tell, a small frame, bad bytes, a frame over the limit: 0.
    assert decoder.whole_frame_size(second[:20]) == 0
    assert decoder.whole_frame_size(encode(frames_of(100, 1))[:64]) == 0
    assert decoder.whole_frame_size(b"XX" + second[2:64]) == 0
    small_limit = NativeDecoder(max_frame_size=len(first))
    small_limit.whole_reads = True
    small_limit.feed(first)
    assert small_limit.whole_frame_size(encode(frames_of(SIZE + 1, 1))[:64]) == 0
    # Looking never consumes: the frame still decodes, and whole.
    assert decoder.bytes_received(second) == frames_of(SIZE, 2)[1:]


def test_decoders_that_cannot_tell_a_frames_size_say_0() -> None:
    raw = RawDecoder(max_frame_size=1 << 20)
    assert raw.whole_frame_size(bytes(64)) == 0
    g3 = G3Decoder(max_frame_size=1 << 24)
    g3.whole_reads = True
    assert g3.whole_frame_size(bytes(64)) == 0


# -- a connection over TCP -------------------------------------------------------------------


async def test_a_large_frame_arriving_in_pieces_is_read_whole_with_one_read() -> None:
    frames = frames_of(SIZE, 3)
    wires = [encode([frame]) for frame in frames]
    async with tcp_connection() as (connection, theirs):
        decoder = NativeDecoder(max_frame_size=1 << 24)
        read = connection.frame_reader(decoder)
        got: list[Frame] = []
        calls: list[int] = []
        with trio.fail_after(10):
            await send_and_read(theirs, wires[0], read, 1, got, calls)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_until, read, 2, got, calls)
                # The second frame in three pieces: the reader sleeps until it is whole.
                await theirs.send_all(wires[1][:1000])
                await trio.testing.wait_all_tasks_blocked()
                assert lowat_of(connection) == len(wires[1])
                await theirs.send_all(wires[1][1000 : len(wires[1]) // 2])
                await trio.testing.wait_all_tasks_blocked()
                assert len(got) == 1
                await theirs.send_all(wires[1][len(wires[1]) // 2 :])
            await send_and_read(theirs, wires[2], read, 3, got, calls)
    assert got == frames
    # One call, one frame, as the bytes object it was read into: no buffer of its own.
    assert calls[-2:] == [1, 1]
    assert all(type(frame.wire) is bytes for frame in got[1:])
    assert connection.bytes_received == sum(map(len, wires))


async def test_the_mark_is_reset_before_waiting_for_a_frame_of_unknown_size() -> None:
    """After a wait for a large frame, a small frame that follows it is not held back."""
    large = frames_of(SIZE, 2)
    small = Frame(FrameKind.METADATA, "config", b"{}", 7)
    async with tcp_connection() as (connection, theirs):
        decoder = NativeDecoder(max_frame_size=1 << 24)
        read = connection.frame_reader(decoder)
        got: list[Frame] = []
        calls: list[int] = []
        with trio.fail_after(10):
            await send_and_read(theirs, encode(large[:1]), read, 1, got, calls)
            second = encode(large[1:])
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_until, read, 2, got, calls)
                await theirs.send_all(second[:500])
                await trio.testing.wait_all_tasks_blocked()
                assert lowat_of(connection) == len(second)
                await theirs.send_all(second[500:])
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_until, read, 3, got, calls)
                await trio.testing.wait_all_tasks_blocked()
                assert lowat_of(connection) == 1  # waiting with nothing to go by
                await theirs.send_all(encode([small]))
    assert got == [*large, small]


async def test_the_mark_never_exceeds_the_cap_and_a_larger_frame_still_arrives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cap = 2 * LARGE_FRAME
    monkeypatch.setattr(transport, "RCVLOWAT_MAX", cap)
    frames = frames_of(4 * LARGE_FRAME, 2)
    wires = [encode([frame]) for frame in frames]
    async with tcp_connection() as (connection, theirs):
        decoder = NativeDecoder(max_frame_size=1 << 24)
        read = connection.frame_reader(decoder)
        got: list[Frame] = []
        with trio.fail_after(10):
            await send_and_read(theirs, wires[0], read, 1, got, [])
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_until, read, 2, got, [])
                await theirs.send_all(wires[1][:100])
                await trio.testing.wait_all_tasks_blocked()
                assert lowat_of(connection) == cap
                await theirs.send_all(wires[1][100:])
    assert got == frames
    assert RCVLOWAT_MAX >= 1 << 20  # the real cap still lets a 1 MiB frame come whole


async def test_frames_larger_than_a_small_fixed_receive_buffer_still_arrive() -> None:
    """The kernel caps the mark at what a fixed SO_RCVBUF can hold: the reader wakes."""
    frames = frames_of(8 * LARGE_FRAME, 4)
    ours, theirs = await tcp_pair()
    ours.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    async with ours, theirs:
        connection = Connection(ours, "peer")
        decoder = NativeDecoder(max_frame_size=1 << 24)
        read = connection.frame_reader(decoder)
        got: list[Frame] = []
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_until, read, 4, got, [])
                await theirs.send_all(encode(frames))
    assert got == frames


async def test_a_peer_that_closes_mid_frame_wakes_the_reader() -> None:
    frames = frames_of(SIZE, 2)
    wire = encode(frames)
    async with tcp_connection() as (connection, theirs):
        decoder = NativeDecoder(max_frame_size=1 << 24)
        read = connection.frame_reader(decoder)
        got: list[Frame] = []
        with trio.fail_after(10):
            await send_and_read(theirs, wire[: len(wire) // 2 + 1000], read, 1, got, [])
            await theirs.send_eof()
            while True:
                n, done = await read()
                got += done
                if not n:
                    break
    assert got == frames[:1]
    assert decoder.buffered > 0  # receive_frames then reports a truncated frame


# -- the receiver's idle timeout -------------------------------------------------------------


class TCPUpstream(Transports):
    """A connector whose every connection is a real loopback TCP connection; the test
    gets the other end of each."""

    def __init__(self) -> None:
        super().__init__()
        self.attempts: list[float] = []
        self.accepted: trio.MemorySendChannel[trio.SocketStream]
        self.accepted, self.connections = trio.open_memory_channel[trio.SocketStream](10)

    async def listen(self, address: Address) -> Sequence[trio.abc.Listener[trio.abc.Stream]]:
        raise AssertionError("connect mode never listens")

    def connector(self, address: Address) -> Connector:
        async def connect() -> trio.abc.Stream:
            self.attempts.append(trio.current_time())
            ours, theirs = await tcp_pair()
            self.accepted.send_nowait(theirs)
            return ours

        return connect


BACKOFF = BackoffConfig(initial=0.5, maximum=16.0, factor=2.0, stable_after=10.0)


def upstream_receiver(upstream: TCPUpstream) -> tuple[ReceiverEndpoint, StreamRegistry]:
    config = ReceiverConfig(stream="s", connect=UPSTREAM, reconnect=BACKOFF, idle_timeout=30.0)
    streams = StreamRegistry()
    endpoint = ReceiverEndpoint(
        "upstream", config, EndpointContext(streams, upstream), rng=random.Random(3)
    )
    return endpoint, streams


async def test_a_producer_that_stops_mid_frame_is_still_timed_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    upstream = TCPUpstream()
    endpoint, _ = upstream_receiver(upstream)
    frames = frames_of(SIZE, 2)
    wire = encode(frames)
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.run)
        with trio.fail_after(600):
            producer = await upstream.connections.receive()
            await producer.send_all(wire[: len(wire) // 2 + 1000])  # then nothing
            stopped = trio.current_time()
            again = await upstream.connections.receive()  # dropped, then reconnected
        # Within twice the idle timeout of its last bytes (see _IdleWatch).
        assert 30 <= upstream.attempts[1] - stopped <= 60 + BACKOFF.initial
        assert endpoint.status.frames_in == 1
        nursery.cancel_scope.cancel()
    await producer.aclose()
    await again.aclose()


async def test_a_producer_still_sending_a_large_frame_is_not_timed_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Its reader sleeps until the frame is whole (no reads, no activity), but the bytes
    arriving in its socket keep the connection alive."""
    upstream = TCPUpstream()
    endpoint, streams = upstream_receiver(upstream)
    published = streams.get("s").subscribe()
    frames = frames_of(SIZE, 2)
    first, second = (encode([frame]) for frame in frames)
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.run)
        with trio.fail_after(600):
            producer = await upstream.connections.receive()
            await producer.send_all(first)
            step = len(second) // 8
            for start in range(0, len(second), step):  # 8 pieces 20 s apart: 140 s
                await producer.send_all(second[start : start + step])
                await trio.sleep(20)
            got: list[Frame] = []
            while len(got) < 2:
                got += await published.receive_batch()
        assert got == frames
        assert len(upstream.attempts) == 1
        nursery.cancel_scope.cancel()
    await producer.aclose()
