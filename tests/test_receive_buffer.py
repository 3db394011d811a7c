"""The receive buffer grows with a bulk stream of frames it holds, and only then."""

from __future__ import annotations

import pytest

from framewire import Frame, FrameKind
from framewire.protocols import ProtocolError
from framewire.protocols._framing import (
    LARGE_FRAME,
    MAX_RECEIVE_BUFFER,
    RECEIVE_BUFFER_SIZE,
)
from framewire.protocols.native import NativeDecoder
from framewire.protocols.raw import RawDecoder

from .helpers import encode


def frames_of(size: int, count: int) -> list[Frame]:
    return [Frame(FrameKind.DATA, "sample", bytes([i % 251]) * size, i) for i in range(count)]


def read_all(decoder: NativeDecoder, wire: bytes, *, most: int | None = None) -> list[Frame]:
    """Read ``wire`` as a socket would: each read fills the room offered (or ``most``)."""
    out: list[Frame] = []
    position = 0
    while position < len(wire):
        target = decoder.get_buffer()
        n = min(len(target), len(wire) - position, most or len(target))
        target[:n] = wire[position : position + n]
        del target
        position += n
        out += decoder.buffer_updated(n)
    decoder.end_of_input()
    return out


def receive_buffer_size(decoder: NativeDecoder) -> int:
    return len(decoder._buffer)


@pytest.mark.parametrize("size", [64, 5_000, 65_536, LARGE_FRAME - 40])
def test_a_bulk_stream_of_small_frames_grows_the_buffer_up_to_its_bound(size: int) -> None:
    frames = frames_of(size, 8 * MAX_RECEIVE_BUFFER // size)
    decoder = NativeDecoder(max_frame_size=1 << 24)
    sizes = set()
    got: list[Frame] = []
    wire = encode(frames)
    position = 0
    while position < len(wire):
        target = decoder.get_buffer()
        sizes.add(receive_buffer_size(decoder))
        n = min(len(target), len(wire) - position)
        target[:n] = wire[position : position + n]
        del target
        position += n
        got += decoder.buffer_updated(n)
    assert got == frames  # the partial frame at each growth was carried over
    assert sizes == {RECEIVE_BUFFER_SIZE, 2 * RECEIVE_BUFFER_SIZE, MAX_RECEIVE_BUFFER}
    # Every frame holds its own bytes, never a view on the buffer it was cut from.
    assert all(type(frame.wire) is bytes for frame in got)


def test_reads_that_do_not_fill_the_buffer_never_grow_it() -> None:
    frames = frames_of(1000, 4000)
    decoder = NativeDecoder(max_frame_size=1 << 24)
    assert read_all(decoder, encode(frames), most=64 * 1024) == frames
    assert receive_buffer_size(decoder) == RECEIVE_BUFFER_SIZE


def test_large_frames_never_grow_the_receive_buffer() -> None:
    frames = frames_of(3 * LARGE_FRAME, 40) + frames_of(1 << 20, 4)
    decoder = NativeDecoder(max_frame_size=1 << 24)
    assert read_all(decoder, encode(frames)) == frames
    assert receive_buffer_size(decoder) == RECEIVE_BUFFER_SIZE


def test_bad_bytes_in_a_full_read_grow_nothing_and_release_the_buffer() -> None:
    decoder = NativeDecoder(max_frame_size=1 << 24)
    target = decoder.get_buffer()
    target[:] = b"\xff" * len(target)
    n = len(target)
    del target
    with pytest.raises(ProtocolError):
        decoder.buffer_updated(n)
    assert receive_buffer_size(decoder) == 0
    with pytest.raises(ProtocolError):
        decoder.get_buffer()


@pytest.mark.parametrize(
    ("max_frame_size", "largest"),
    [(1 << 24, MAX_RECEIVE_BUFFER), (300_000, 300_000), (100_000, 100_000)],
)
def test_raw_reads_grow_while_they_fill_the_buffer(max_frame_size: int, largest: int) -> None:
    decoder = RawDecoder(max_frame_size=max_frame_size)
    data = bytes(range(256)) * (8 * MAX_RECEIVE_BUFFER // 256)
    sizes = []
    got = bytearray()
    position = 0
    while position < len(data):
        target = decoder.get_buffer()
        sizes.append(len(target))
        n = min(len(target), len(data) - position)
        target[:n] = data[position : position + n]
        del target
        position += n
        (frame,) = decoder.buffer_updated(n)
        assert type(frame.payload) is bytes
        assert frame.size == n <= max_frame_size
        got += frame.payload
    assert got == data
    assert max(sizes) == largest
    assert sizes == sorted(sizes)  # it only ever grows, and only by whole reads


def test_raw_reads_that_do_not_fill_the_buffer_never_grow_it() -> None:
    decoder = RawDecoder(max_frame_size=1 << 24)
    for _ in range(10):
        target = decoder.get_buffer()
        assert len(target) == RECEIVE_BUFFER_SIZE
        target[:100] = b"x" * 100
        del target
        assert decoder.buffer_updated(100)[0].payload == b"x" * 100


def test_equal_large_frames_take_one_read_each_with_the_next_ones_start() -> None:
    """After the first, each large frame's buffer has room for its read-ahead: one read
    completes a frame and brings the start of the next (at most 1/16 of the frame more)."""
    frames = frames_of(1 << 20, 6)
    wire = encode(frames)
    frame_size = len(wire) // len(frames)
    decoder = NativeDecoder(max_frame_size=1 << 24)
    reads_per_frame: list[int] = []
    reads = 0
    got: list[Frame] = []
    position = 0
    while position < len(wire):
        target = decoder.get_buffer()
        assert len(target) <= frame_size + frame_size // 16
        n = min(len(target), len(wire) - position)
        target[:n] = wire[position : position + n]
        del target
        position += n
        reads += 1
        done = decoder.buffer_updated(n)
        if done:
            reads_per_frame.append(reads)
            reads = 0
        got += done
    assert got == frames
    assert reads_per_frame[2:] == [1] * (len(frames) - 2)
    for frame in got[1:]:
        held = frame.wire
        assert isinstance(held, bytearray)  # the buffer it was read into: no copy
        # The read-ahead was its slack: at most a sixteenth of it, so queues count it fairly.
        assert held.__alloc__() <= frame.size * 17 // 16 + 64
