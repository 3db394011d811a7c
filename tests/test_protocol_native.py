"""The native codec (framewire/protocols/native.py on top of _framing.py), sans-IO.

Round trips under arbitrary chunking (``feed`` and ``get_buffer``/``buffer_updated``), the
large-frame path, control frames, forwarding of original wire bytes, and every kind of bad
input: the decoder must raise :class:`ProtocolError` (and nothing else), raise
:class:`FrameTooLarge` before a payload arrives, and stay poisoned after an error.
"""

from __future__ import annotations

import itertools
import tracemalloc
from collections.abc import Mapping, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from framewire.frame import EMPTY_HEADERS, Buffer, Frame, FrameKind
from framewire.protocols import FrameTooLarge, ProtocolError, TruncatedFrame
from framewire.protocols._framing import (
    FIRST_LARGE_BUFFER,
    LARGE_FRAME,
    RECEIVE_BUFFER_SIZE,
)
from framewire.protocols.native import (
    END_OF_STREAM,
    HEADER,
    KEEPALIVE,
    KIND_END_OF_STREAM,
    KIND_KEEPALIVE,
    MAGIC,
    VERSION,
    NativeDecoder,
    NativeEncoder,
)

MAX_FRAME = 1 << 20
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
HEADER_SIZE = 28

# Moderate example counts keep the file at a few seconds; no example database on disk.
FAST = settings(max_examples=60, deadline=None, database=None)
SLOW = settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- helpers ---------------------------------------------------------------------------------


def encode(frames: Sequence[Frame]) -> bytes:
    return b"".join(NativeEncoder().encode_batch(frames))


def wire_of(frame: Frame) -> bytes:
    return b"".join(NativeEncoder().encode(frame))


def header(
    *,
    magic: bytes = MAGIC,
    version: int = VERSION,
    kind: int = 0,
    type_len: int = 0,
    flags: int = 0,
    count: int = 0,
    headers_len: int = 0,
    payload_len: int = 0,
    timestamp: int = 0,
) -> bytes:
    """A raw 28-byte native header with any field values, valid or not."""
    return HEADER.pack(
        magic, version, kind, type_len, flags, count, headers_len, payload_len, timestamp
    )


def entry(key: bytes, value: bytes) -> bytes:
    """One raw headers-block entry: u8 key length, u16 value length, key, value."""
    return len(key).to_bytes(1, "little") + len(value).to_bytes(2, "little") + key + value


def pattern(size: int, seed: int = 0) -> bytes:
    """``size`` bytes that are not all the same, so misplaced offsets show."""
    block = bytes((seed + i) % 251 for i in range(251))
    return (block * (size // 251 + 1))[:size]


def decoder(max_frame_size: int = MAX_FRAME) -> NativeDecoder:
    return NativeDecoder(max_frame_size=max_frame_size)


def chunks_at(data: bytes, cuts: Sequence[int]) -> list[memoryview]:
    """``data`` cut at the given positions (duplicates and out-of-order cuts are fine)."""
    view = memoryview(data)
    points = sorted({0, len(data), *(c for c in cuts if 0 <= c <= len(data))})
    return [view[a:b] for a, b in itertools.pairwise(points)]


def feed_chunks(dec: NativeDecoder, chunks: Sequence[Buffer]) -> list[Frame]:
    frames: list[Frame] = []
    for chunk in chunks:
        frames += dec.feed(chunk)
    return frames


def feed_via_buffer(dec: NativeDecoder, chunks: Sequence[memoryview]) -> list[Frame]:
    """Drive the decoder like the I/O layer does: write at most each chunk into the buffer it
    offers, often fewer bytes than offered, sometimes a chunk over several buffers."""
    frames: list[Frame] = []
    for chunk in chunks:
        rest = chunk
        while rest:
            target = dec.get_buffer()
            assert len(target) > 0
            n = min(len(target), len(rest))
            target[:n] = rest[:n]
            rest = rest[n:]
            frames += dec.buffer_updated(n)
    return frames


def check_decoded(decoded: Sequence[Frame], originals: Sequence[Frame]) -> None:
    """Decoded frames equal the originals, carry their exact wire bytes, and re-encode as
    those very bytes objects (forwarded untouched)."""
    assert list(decoded) == list(originals)
    encoder = NativeEncoder()
    for frame, original in zip(decoded, originals, strict=True):
        assert frame.kind is original.kind
        assert frame.wire_protocol == "native"
        assert frame.wire is not None
        assert bytes(frame.wire) == wire_of(original)
        assert frame.size == len(frame.wire)
        out = encoder.encode(frame)
        assert len(out) == 1
        assert out[0] is frame.wire


# -- strategies ------------------------------------------------------------------------------

NON_ASCII_TAGS = ["Scan", "", "\u00e9v\u00e9nement", "\u65e5\u672c\u8a9e", "\U0001f4e1x", "a" * 255]

type_tags = st.one_of(st.sampled_from(NON_ASCII_TAGS), st.text(max_size=12))
header_maps: st.SearchStrategy[Mapping[str, str]] = st.one_of(
    st.just(EMPTY_HEADERS),
    st.dictionaries(st.text(max_size=8), st.text(max_size=16), max_size=4),
)
timestamps = st.one_of(
    st.sampled_from([INT64_MIN, -1, 0, 1, INT64_MAX]), st.integers(INT64_MIN, INT64_MAX)
)
# Sizes around every threshold: 512 (copy vs view), the large-frame size, the receive buffer.
INTERESTING_SIZES = [
    0,
    1,
    512,
    513,
    LARGE_FRAME - HEADER_SIZE,
    LARGE_FRAME - HEADER_SIZE + 1,
    LARGE_FRAME + 1,
    RECEIVE_BUFFER_SIZE + 1000,
]
small_payloads = st.binary(max_size=600)
payloads = st.one_of(
    small_payloads,
    st.builds(pattern, st.sampled_from(INTERESTING_SIZES), st.integers(0, 250)),
)


def frames_with(payload: st.SearchStrategy[bytes]) -> st.SearchStrategy[Frame]:
    return st.builds(
        Frame,
        kind=st.sampled_from(FrameKind),
        type=type_tags,
        payload=payload,
        timestamp=timestamps,
        headers=header_maps,
    )


any_frames = frames_with(payloads)
small_frames = frames_with(small_payloads)


# -- round trips -----------------------------------------------------------------------------

EXAMPLE_FRAMES = [
    Frame(FrameKind.DATA, "Scan", b"hello"),
    Frame(FrameKind.METADATA, "Calibration", b"{}", 17),
    Frame(FrameKind.DATA, "", b""),
    Frame(FrameKind.DATA, "\u00e9v\u00e9nement-\u65e5\u672c\u8a9e-\U0001f4e1", b"x"),
    Frame(FrameKind.DATA, "t", b"p", INT64_MIN),
    Frame(FrameKind.DATA, "t", b"p", -1),
    Frame(FrameKind.DATA, "t", b"p", 0),
    Frame(FrameKind.METADATA, "t", b"p", INT64_MAX),
    Frame(FrameKind.DATA, "h", b"body", 5, {"a": "1", "\u00e9": "\u65e5\u672c", "": ""}),
    Frame(FrameKind.METADATA, "h", b"", 0, {"k" * 255: "v" * 0xFFFF}),
    Frame(FrameKind.DATA, "a" * 255, pattern(513)),
    Frame(FrameKind.DATA, "big", pattern(LARGE_FRAME + 1)),
    Frame(FrameKind.METADATA, "bigger", pattern(RECEIVE_BUFFER_SIZE + 1), 9, {"x": "y"}),
    Frame(FrameKind.DATA, "view", memoryview(pattern(2000))[10:1500]),
    Frame(FrameKind.DATA, "bytearray", bytearray(b"abc")),
]


@pytest.mark.parametrize("frame", EXAMPLE_FRAMES, ids=repr)
def test_round_trip_single_frame(frame: Frame) -> None:
    dec = decoder()
    check_decoded(dec.feed(wire_of(frame)), [frame])
    assert dec.buffered == 0
    dec.end_of_input()


def test_round_trip_all_examples_in_one_chunk_and_byte_by_byte() -> None:
    small = [f for f in EXAMPLE_FRAMES if len(wire_of(f)) < 2000]
    stream = encode(small)
    check_decoded(decoder().feed(stream), small)
    dec = decoder()
    check_decoded(feed_chunks(dec, [stream[i : i + 1] for i in range(len(stream))]), small)
    dec.end_of_input()


def test_type_tags_sharing_prefixes_and_many_distinct_tags() -> None:
    # Type tags are cached by the decoder: prefixes and lookalikes must not be confused, and
    # more distinct tags than the cache holds still decode correctly.
    tags = ["abc", "a", "ab", "abc", "a", "b\u00e9", "b", "\u00e9", "", "a"]
    tags += [f"type-{i}" for i in range(1500)] + ["type-1", "type-1499", "abc"]
    frames = [Frame(FrameKind(i % 2), tag, b"p", i) for i, tag in enumerate(tags)]
    dec = decoder()
    check_decoded(dec.feed(encode(frames)), frames)
    check_decoded(dec.feed(encode(frames)), frames)  # again, with a warm cache
    # The same through the general path (frames with headers).
    with_headers = [
        Frame(FrameKind.DATA, tag, b"p", 0, {"h": tag}) for tag in ["abc", "a", "ab", "a"]
    ]
    check_decoded(decoder().feed(encode(with_headers)), with_headers)


def test_encoder_output_layout() -> None:
    payload = b"payload"
    out = NativeEncoder().encode(Frame(FrameKind.METADATA, "T\u00e9", payload, -5, {"k": "v"}))
    assert len(out) == 2
    assert out[1] is payload  # the payload is not copied
    type_bytes = "T\u00e9".encode()
    block = entry(b"k", b"v")
    expected_header = header(
        kind=1,
        type_len=len(type_bytes),
        count=1,
        headers_len=len(block),
        payload_len=len(payload),
        timestamp=-5,
    )
    assert out[0] == expected_header + type_bytes + block
    # No payload: a single buffer.
    assert NativeEncoder().encode(Frame(FrameKind.DATA, "e")) == [header(type_len=1) + b"e"]


def test_encode_batch_and_encode_into_agree_with_encode() -> None:
    frames = EXAMPLE_FRAMES[:6]
    encoder = NativeEncoder()
    one_by_one = b"".join(b"".join(encoder.encode(f)) for f in frames)
    assert b"".join(encoder.encode_batch(frames)) == one_by_one
    out: list[Buffer] = [b"prefix"]
    for frame in frames:
        encoder.encode_into(frame, out)
    assert b"".join(out) == b"prefix" + one_by_one


@FAST
@given(frame=any_frames)
def test_round_trip_any_frame(frame: Frame) -> None:
    check_decoded(decoder().feed(wire_of(frame)), [frame])


@SLOW
@given(frames=st.lists(any_frames, max_size=5), data=st.data())
def test_round_trip_arbitrary_chunks_feed(frames: list[Frame], data: st.DataObject) -> None:
    stream = encode(frames)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=40), label="cuts")
    dec = decoder()
    check_decoded(feed_chunks(dec, chunks_at(stream, cuts)), frames)
    assert dec.buffered == 0
    dec.end_of_input()


@SLOW
@given(frames=st.lists(any_frames, max_size=5), data=st.data())
def test_round_trip_arbitrary_chunks_buffered(frames: list[Frame], data: st.DataObject) -> None:
    stream = encode(frames)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=40), label="cuts")
    dec = decoder()
    check_decoded(feed_via_buffer(dec, chunks_at(stream, cuts)), frames)
    assert dec.buffered == 0
    dec.end_of_input()


LARGE_STREAM_FRAMES = [
    Frame(FrameKind.DATA, "a", b"1", 1),
    Frame(FrameKind.DATA, "big", pattern(LARGE_FRAME + 1, 1), 2, {"k": "v"}),
    Frame(FrameKind.METADATA, "\u65e5\u672c", pattern(RECEIVE_BUFFER_SIZE + 1000, 2), -3),
    Frame(FrameKind.DATA, "b", pattern(600, 3), 4, {"x": "\u00e9"}),
    Frame(FrameKind.DATA, "huge", pattern(300 * 1024, 4), INT64_MAX),
    Frame(FrameKind.DATA, "", b"", INT64_MIN),
]
LARGE_STREAM = encode(LARGE_STREAM_FRAMES)


@SLOW
@given(
    cuts=st.lists(st.integers(0, len(LARGE_STREAM)), max_size=60),
    via_buffer=st.booleans(),
)
def test_round_trip_frames_over_64k_and_256k_arbitrary_chunks(
    cuts: list[int], via_buffer: bool
) -> None:
    dec = decoder()
    chunks = chunks_at(LARGE_STREAM, cuts)
    frames = feed_via_buffer(dec, chunks) if via_buffer else feed_chunks(dec, chunks)
    check_decoded(frames, LARGE_STREAM_FRAMES)
    assert dec.buffered == 0
    dec.end_of_input()


@FAST
@given(frames=st.lists(small_frames, min_size=1, max_size=4))
def test_round_trip_one_byte_at_a_time(frames: list[Frame]) -> None:
    stream = encode(frames)
    one_byte = [memoryview(stream)[i : i + 1] for i in range(len(stream))]
    check_decoded(feed_chunks(decoder(), one_byte), frames)
    check_decoded(feed_via_buffer(decoder(), one_byte), frames)


@settings(SLOW, max_examples=10)
@given(frames=st.lists(small_frames, min_size=1, max_size=30), data=st.data())
def test_round_trip_many_small_frames_through_one_buffer(
    frames: list[Frame], data: st.DataObject
) -> None:
    # Repeat the stream so the reused receive buffer fills up (several times over) and the
    # partial frame at its end is moved to the front; write random amounts, at most as offered.
    one = encode(frames)
    repeat = 2 * RECEIVE_BUFFER_SIZE // len(one) + 1
    stream = one * repeat
    sizes = data.draw(st.lists(st.integers(100, 70_000), min_size=1, max_size=10), label="sizes")
    dec = decoder()
    decoded: list[Frame] = []
    position, i = 0, 0
    while position < len(stream):
        target = dec.get_buffer()
        n = min(len(target), sizes[i % len(sizes)], len(stream) - position)
        i += 1
        target[:n] = stream[position : position + n]
        position += n
        decoded += dec.buffer_updated(n)
    # Checked in bulk: there are many thousands of frames.
    assert decoded == frames * repeat
    assert b"".join(f.wire for f in decoded if f.wire is not None) == stream


@pytest.mark.parametrize("step", [7, 999, 1000, 1001, 4095, LARGE_FRAME - 1])
def test_partial_frame_at_the_end_of_the_receive_buffer_is_kept(step: int) -> None:
    frames = [Frame(FrameKind.DATA, "f", pattern(1000 - HEADER_SIZE - 1, i)) for i in range(700)]
    stream = encode(frames)
    assert len(stream) > 2 * RECEIVE_BUFFER_SIZE
    decoded: list[Frame] = []
    dec = decoder()
    position = 0
    while position < len(stream):
        target = dec.get_buffer()
        assert len(target) > 0  # a partial frame at the end never leaves the decoder stuck
        n = min(len(target), step, len(stream) - position)
        target[:n] = stream[position : position + n]
        position += n
        decoded += dec.buffer_updated(n)
    check_decoded(decoded, frames)


def test_large_frame_is_read_into_a_buffer_of_its_own() -> None:
    frame = Frame(FrameKind.DATA, "big", pattern(300 * 1024), 1, {"h": "v"})
    wire = wire_of(frame)
    dec = decoder()
    assert dec.feed(wire[:100]) == []
    # A buffer of its own, sized by what has arrived (not by the 300 KiB announced).
    target = dec.get_buffer()
    assert len(target) == FIRST_LARGE_BUFFER - 100
    assert dec.buffered == 100
    assert dec.buffer_updated(0) == []
    target[:1000] = wire[100:1100]
    assert dec.buffer_updated(1000) == []
    assert dec.buffered == 1100
    position = 1100
    sizes = []
    while position < len(wire):
        target = dec.get_buffer()
        sizes.append(position + len(target))
        n = min(len(target), len(wire) - position)
        target[:n] = wire[position : position + n]
        position += n
        decoded = dec.buffer_updated(n)
    # The buffer doubled as it filled; the last read may go a sixteenth past the frame's end.
    assert sizes == [FIRST_LARGE_BUFFER, 2 * FIRST_LARGE_BUFFER, len(wire) + len(wire) // 16]
    check_decoded(decoded, [frame])
    # The decoder carries on with ordinary frames afterwards.
    assert dec.buffered == 0
    check_decoded(dec.feed(wire_of(EXAMPLE_FRAMES[0])), [EXAMPLE_FRAMES[0]])


def test_announced_length_commits_no_memory() -> None:
    """A header announcing a huge frame gets a buffer sized by the bytes that arrived."""
    dec = decoder(max_frame_size=1 << 40)
    wire = wire_of(Frame(FrameKind.DATA, "big", pattern(LARGE_FRAME * 4)))
    header = bytearray(wire[: HEADER_SIZE + 3])
    header[20:28] = (1 << 39).to_bytes(8, "little")  # payload_len: 512 GiB announced
    assert dec.feed(bytes(header)) == []
    assert len(dec.get_buffer()) < FIRST_LARGE_BUFFER


def test_finished_large_frame_holds_no_more_than_a_sixteenth_extra() -> None:
    """Queues count ``frame.size``: what a decoded frame's wire holds must be close to it."""
    for size in (LARGE_FRAME + 1, 65_569 - HEADER_SIZE, 100_000, 129_000, 300_000, 1_000_000):
        frame = Frame(FrameKind.DATA, "big", pattern(size))
        wire = wire_of(frame) + wire_of(EXAMPLE_FRAMES[0])
        for step in (len(wire), 4096, 65_536, 70_001):
            dec = decoder()
            chunks = [memoryview(wire)[i : i + step] for i in range(0, len(wire), step)]
            decoded = feed_via_buffer(dec, chunks)
            held = decoded[0].wire
            assert held is not None
            allocated = held.__alloc__() if isinstance(held, bytearray) else len(held)
            assert decoded[0].size == size + HEADER_SIZE + 3
            assert allocated <= decoded[0].size * 17 // 16 + 64, (size, step)


def test_frames_at_and_around_the_large_frame_threshold() -> None:
    frames = [
        Frame(FrameKind.DATA, "", pattern(LARGE_FRAME - HEADER_SIZE + d, d)) for d in (-1, 0, 1)
    ]
    assert [len(wire_of(f)) for f in frames] == [LARGE_FRAME - 1, LARGE_FRAME, LARGE_FRAME + 1]
    stream = encode(frames)
    for step in (1000, 4096, LARGE_FRAME - 1, LARGE_FRAME + 7):
        chunks = [memoryview(stream)[i : i + step] for i in range(0, len(stream), step)]
        check_decoded(feed_chunks(decoder(), chunks), frames)
        check_decoded(feed_via_buffer(decoder(), chunks), frames)


def test_frame_exactly_max_frame_size_is_accepted() -> None:
    frame = Frame(FrameKind.DATA, "t", pattern(100 - HEADER_SIZE - 1))
    wire = wire_of(frame)
    assert len(wire) == 100
    check_decoded(decoder(max_frame_size=100).feed(wire), [frame])
    with pytest.raises(FrameTooLarge):
        decoder(max_frame_size=99).feed(wire)


def test_re_encoding_forwards_original_wire_bytes_untouched() -> None:
    frame = Frame(FrameKind.DATA, "t", b"payload", 3, {"a": "b"})
    [decoded] = decoder().feed(wire_of(frame))
    assert decoded.wire is not None
    assert NativeEncoder().encode(decoded)[0] is decoded.wire
    out: list[Buffer] = []
    NativeEncoder().encode_into(decoded, out)
    assert out == [decoded.wire]
    assert out[0] is decoded.wire
    # Even a frame whose fields no longer match its wire is forwarded as its wire bytes.
    forwarded = Frame(FrameKind.METADATA, "other", b"", 0, EMPTY_HEADERS, b"WIRE", "native")
    assert NativeEncoder().encode(forwarded) == [b"WIRE"]


def test_frames_from_another_protocol_are_re_encoded() -> None:
    frame = Frame(FrameKind.DATA, "raw", b"abc", 0, EMPTY_HEADERS, b"abc", "raw")
    [decoded] = decoder().feed(wire_of(frame))
    assert decoded == frame
    assert decoded.wire is not None
    assert bytes(decoded.wire) == header(type_len=3, payload_len=3) + b"rawabc"


# -- control frames --------------------------------------------------------------------------


def test_keepalives_are_counted_and_not_returned() -> None:
    encoder = NativeEncoder()
    assert encoder.keepalive() == KEEPALIVE == header(kind=KIND_KEEPALIVE)
    frames = [Frame(FrameKind.DATA, "a", b"1"), Frame(FrameKind.METADATA, "b", b"2")]
    stream = KEEPALIVE + wire_of(frames[0]) + KEEPALIVE * 3 + wire_of(frames[1]) + KEEPALIVE
    dec = decoder()
    assert dec.keepalives == 0
    check_decoded(dec.feed(stream), frames)
    assert dec.keepalives == 5
    assert not dec.ended
    dec.end_of_input()


@FAST
@given(
    items=st.lists(st.one_of(small_frames, st.none()), max_size=8),
    end=st.booleans(),
    data=st.data(),
)
def test_keepalives_and_end_of_stream_under_chunking(
    items: list[Frame | None], end: bool, data: st.DataObject
) -> None:
    stream = b"".join(KEEPALIVE if item is None else wire_of(item) for item in items)
    if end:
        stream += END_OF_STREAM
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20), label="cuts")
    dec = decoder()
    frames = [item for item in items if item is not None]
    check_decoded(feed_via_buffer(dec, chunks_at(stream, cuts)), frames)
    assert dec.keepalives == items.count(None)
    assert dec.ended is end
    dec.end_of_input()


def test_end_of_stream_sets_ended() -> None:
    encoder = NativeEncoder()
    assert encoder.end_of_stream() == END_OF_STREAM == header(kind=KIND_END_OF_STREAM)
    frame = Frame(FrameKind.DATA, "a", b"1")
    dec = decoder()
    check_decoded(dec.feed(wire_of(frame) + END_OF_STREAM), [frame])
    assert dec.ended
    dec.end_of_input()  # ended at a frame boundary: fine


@pytest.mark.parametrize(
    "after",
    [b"\x00", b"FW", KEEPALIVE, END_OF_STREAM, wire_of(Frame(FrameKind.DATA, "a", b"1"))],
)
def test_bytes_after_end_of_stream_are_an_error(after: bytes) -> None:
    dec = decoder()
    dec.feed(END_OF_STREAM)
    with pytest.raises(ProtocolError, match="after end-of-stream"):
        dec.feed(after)
    # Also in the same chunk as the end-of-stream marker.
    with pytest.raises(ProtocolError, match="after end-of-stream"):
        decoder().feed(END_OF_STREAM + after)


def test_large_frame_after_end_of_stream_is_an_error() -> None:
    dec = decoder()
    dec.feed(END_OF_STREAM)
    with pytest.raises(ProtocolError, match="after end-of-stream"):
        dec.feed(wire_of(Frame(FrameKind.DATA, "a", pattern(LARGE_FRAME * 2)))[:50])


# -- bad input -------------------------------------------------------------------------------


def assert_poisoned(dec: NativeDecoder, error: ProtocolError) -> None:
    """Every later call raises the same error, even with valid input: a new exception of the
    same class and message (the decoder keeps no exception, so no traceback cycle), and the
    decoder has let go of its buffers."""
    valid = wire_of(Frame(FrameKind.DATA, "ok", b"ok"))
    calls = [
        lambda: dec.feed(valid),
        dec.get_buffer,
        lambda: dec.buffer_updated(0),
        dec.end_of_input,
    ]
    for call in calls:
        with pytest.raises(ProtocolError) as excinfo:
            call()
        assert type(excinfo.value) is type(error)
        assert str(excinfo.value) == str(error)
        assert excinfo.value is not error
    assert dec.failed
    assert dec.buffered == 0


BAD_FRAMES: dict[str, tuple[bytes, str]] = {
    "bad magic": (header(magic=b"WF") + b"x" * 8, "bad magic"),
    "bad magic zeros": (bytes(HEADER_SIZE), "bad magic"),
    "version 0": (header(version=0), "version 0"),
    "version 2": (header(version=2), "version 2"),
    "version 255": (header(version=255), "version 255"),
    "flags 0x01": (header(flags=1), "flags 0x01"),
    "flags 0x80": (header(flags=0x80, kind=KIND_KEEPALIVE), "flags 0x80"),
    "kind 2": (header(kind=2), "kind 0x02"),
    "kind 0x7f": (header(kind=0x7F), "kind 0x7f"),
    "kind 0x82": (header(kind=0x82), "kind 0x82"),
    "kind 0xff": (header(kind=0xFF, payload_len=1) + b"x", "kind 0xff"),
    "keepalive with payload": (header(kind=KIND_KEEPALIVE, payload_len=2) + b"xx", "control"),
    "end with payload": (header(kind=KIND_END_OF_STREAM, payload_len=1) + b"x", "control"),
    "keepalive with type": (header(kind=KIND_KEEPALIVE, type_len=1) + b"t", "control"),
    "keepalive with count": (header(kind=KIND_KEEPALIVE, count=1), "control"),
    "end with headers": (
        header(kind=KIND_END_OF_STREAM, count=1, headers_len=5) + entry(b"k", b"v"),
        "control",
    ),
    "count but no block": (header(count=1), "shorter than its header count"),
    "count too high": (
        header(count=2, headers_len=5) + entry(b"k", b"v"),
        "shorter than its header count",
    ),
    "entry past block": (
        header(count=1, headers_len=5) + entry(b"k", b"vvv"),
        "runs past the headers block",
    ),
    "block longer than entries": (
        header(count=1, headers_len=7, payload_len=1) + entry(b"k", b"v") + b"zz" + b"p",
        "longer than its entries",
    ),
    "duplicate header key": (
        header(count=2, headers_len=10) + entry(b"k", b"v") + entry(b"k", b"w"),
        "duplicate",
    ),
    "type not utf-8": (header(type_len=2, payload_len=1) + b"\xc3\x28" + b"p", "type"),
    "type truncated utf-8": (header(type_len=1) + b"\xe6", "type"),
    "header key not utf-8": (
        header(type_len=1, count=1, headers_len=5) + b"t" + entry(b"\xff", b"v"),
        "UTF-8",
    ),
    "header value not utf-8": (
        header(count=1, headers_len=6) + entry(b"k", b"\xed\xa0"),
        "UTF-8",
    ),
}


@pytest.mark.parametrize("name", list(BAD_FRAMES))
def test_bad_frame_raises_and_poisons(name: str) -> None:
    bad, message = BAD_FRAMES[name]
    good = wire_of(Frame(FrameKind.DATA, "g", b"good"))
    for stream in (bad, good + bad):  # alone, and after a good frame in the same chunk
        dec = decoder()
        with pytest.raises(ProtocolError, match=message) as excinfo:
            dec.feed(stream)
        assert not isinstance(excinfo.value, FrameTooLarge | TruncatedFrame)
        assert_poisoned(dec, excinfo.value)
    # Byte by byte, the error comes at the latest on the last byte.
    dec = decoder()
    with pytest.raises(ProtocolError, match=message):
        feed_chunks(dec, [bad[i : i + 1] for i in range(len(bad))])


@pytest.mark.parametrize(
    "start", [b"X", b"\x00", b"FX", b"fw", b"WF\x01\x00", b"GW" + bytes(20), b"F\x00" + bytes(25)]
)
def test_bad_magic_is_detected_before_a_whole_header_arrives(start: bytes) -> None:
    assert len(start) < HEADER_SIZE
    dec = decoder()
    with pytest.raises(ProtocolError, match="bad magic") as excinfo:
        dec.feed(start)
    assert_poisoned(dec, excinfo.value)


def test_bad_magic_second_byte_in_a_later_chunk() -> None:
    dec = decoder()
    assert dec.feed(b"F") == []
    with pytest.raises(ProtocolError, match="bad magic"):
        dec.feed(b"X")


def test_bad_magic_via_get_buffer() -> None:
    dec = decoder()
    dec.get_buffer()[:1] = b"?"
    with pytest.raises(ProtocolError, match="bad magic"):
        dec.buffer_updated(1)


def test_garbage_after_a_good_frame_in_a_later_chunk() -> None:
    frame = Frame(FrameKind.DATA, "g", b"good")
    dec = decoder()
    check_decoded(dec.feed(wire_of(frame)), [frame])
    with pytest.raises(ProtocolError, match="bad magic"):
        dec.feed(b"GARBAGE")


def test_headers_block_without_header_count_is_an_error() -> None:
    bad = header(type_len=1, headers_len=5, payload_len=2) + b"t" + entry(b"k", b"v") + b"pp"
    with pytest.raises(ProtocolError, match="headers block"):
        decoder().feed(bad)


def test_headers_block_without_header_count_is_an_error_for_large_frames() -> None:
    # Through the general path (a frame over LARGE_FRAME) the same bytes are rejected.
    payload = pattern(LARGE_FRAME)
    bad = header(type_len=1, headers_len=5, payload_len=len(payload)) + b"t"
    bad += entry(b"k", b"v") + payload
    with pytest.raises(ProtocolError, match="headers block longer than its entries"):
        decoder().feed(bad)


LARGE_BAD_FRAMES: dict[str, tuple[bytes, str]] = {
    "type not utf-8": (
        header(type_len=1, payload_len=LARGE_FRAME) + b"\xff" + pattern(LARGE_FRAME),
        "type",
    ),
    "keepalive with payload": (
        header(kind=KIND_KEEPALIVE, payload_len=LARGE_FRAME) + pattern(LARGE_FRAME),
        "control",
    ),
    "bad headers": (
        header(count=2, headers_len=5, payload_len=LARGE_FRAME)
        + entry(b"k", b"v")
        + pattern(LARGE_FRAME),
        "shorter than its header count",
    ),
}


@pytest.mark.parametrize("name", list(LARGE_BAD_FRAMES))
def test_bad_large_frame_raises(name: str) -> None:
    bad, message = LARGE_BAD_FRAMES[name]
    dec = decoder()
    # Whole frame in one chunk, and header first (so it is assembled in a buffer of its own).
    with pytest.raises(ProtocolError, match=message):
        dec.feed(bad)
    dec = decoder()
    assert dec.feed(bad[:HEADER_SIZE]) == []
    with pytest.raises(ProtocolError, match=message):
        dec.feed(bad[HEADER_SIZE:])


@pytest.mark.parametrize("name", list(LARGE_BAD_FRAMES))
def test_bad_large_frame_poisons_the_decoder(name: str) -> None:
    bad, message = LARGE_BAD_FRAMES[name]
    dec = decoder()
    assert dec.feed(bad[:HEADER_SIZE]) == []
    with pytest.raises(ProtocolError, match=message) as excinfo:
        dec.feed(bad[HEADER_SIZE:])
    assert_poisoned(dec, excinfo.value)


# -- size limit ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("announce", "max_frame_size"),
    [
        (header(payload_len=2**60), MAX_FRAME),
        (header(payload_len=2**64 - 1), MAX_FRAME),
        (header(payload_len=MAX_FRAME - HEADER_SIZE + 1), MAX_FRAME),
        (header(payload_len=100), 100),
        (header(type_len=200, headers_len=100), 300),
        (header(headers_len=2**32 - 1), MAX_FRAME),
        (header(kind=KIND_KEEPALIVE, payload_len=2**40), MAX_FRAME),
        (header(kind=1, payload_len=LARGE_FRAME), LARGE_FRAME),
    ],
)
def test_frame_too_large_is_raised_on_the_header_alone(
    announce: bytes, max_frame_size: int
) -> None:
    dec = decoder(max_frame_size)
    with pytest.raises(FrameTooLarge, match=f"maximum frame size of {max_frame_size}") as excinfo:
        dec.feed(announce)
    assert isinstance(excinfo.value, ProtocolError)
    assert_poisoned(dec, excinfo.value)


def test_frame_too_large_via_get_buffer_in_small_pieces() -> None:
    announce = header(payload_len=2**60)
    dec = decoder()
    for i in range(HEADER_SIZE - 1):
        dec.get_buffer()[:1] = announce[i : i + 1]
        assert dec.buffer_updated(1) == []
    dec.get_buffer()[:1] = announce[-1:]
    with pytest.raises(FrameTooLarge):
        dec.buffer_updated(1)


def test_frame_too_large_allocates_nothing() -> None:
    max_frame_size = 64 << 20
    dec = decoder(max_frame_size)
    announce = header(payload_len=max_frame_size)  # 28 bytes over the limit
    tracemalloc.start()
    try:
        with pytest.raises(FrameTooLarge):
            dec.feed(announce)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_large_frame_under_the_limit_is_accepted_on_its_header() -> None:
    dec = decoder(4 << 20)
    assert dec.feed(header(payload_len=(4 << 20) - HEADER_SIZE)) == []
    assert dec.buffered == HEADER_SIZE


def test_decoder_rejects_a_non_positive_max_frame_size() -> None:
    with pytest.raises(ValueError, match="max_frame_size"):
        NativeDecoder(max_frame_size=0)


# -- truncation ------------------------------------------------------------------------------

TRUNCATION_FRAMES = [
    Frame(FrameKind.DATA, "t", b"payload", 1, {"k": "v"}),
    Frame(FrameKind.DATA, "big", pattern(LARGE_FRAME + 100)),
]


@pytest.mark.parametrize("frame", TRUNCATION_FRAMES, ids=repr)
def test_end_of_input_inside_a_frame_is_truncation(frame: Frame) -> None:
    wire = wire_of(frame)
    for cut in sorted({1, 2, 27, 28, 29, len(wire) // 2, len(wire) - 1}):
        dec = decoder()
        assert dec.feed(wire[:cut]) == []
        assert dec.buffered == cut
        with pytest.raises(TruncatedFrame, match=f"{cut} bytes into a frame") as excinfo:
            dec.end_of_input()
        assert isinstance(excinfo.value, ProtocolError)
        assert_poisoned(dec, excinfo.value)


def test_end_of_input_at_a_boundary_is_fine() -> None:
    decoder().end_of_input()  # nothing at all
    frames = [Frame(FrameKind.DATA, "a", b"1"), Frame(FrameKind.DATA, "big", pattern(80_000))]
    dec = decoder()
    check_decoded(dec.feed(encode(frames) + KEEPALIVE), frames)
    dec.end_of_input()
    dec.end_of_input()  # and again
    # Truncated after complete frames: the complete ones came out, then the error.
    dec = decoder()
    check_decoded(dec.feed(encode(frames) + KEEPALIVE[:5]), frames)
    with pytest.raises(TruncatedFrame):
        dec.end_of_input()


@FAST
@given(frames=st.lists(small_frames, min_size=1, max_size=4), data=st.data())
def test_truncation_is_reported_exactly_inside_frames(
    frames: list[Frame], data: st.DataObject
) -> None:
    wires = [wire_of(f) for f in frames]
    stream = b"".join(wires)
    boundaries = {0}
    for wire in wires:
        boundaries.add(max(boundaries) + len(wire))
    cut = data.draw(st.integers(0, len(stream)), label="cut")
    dec = decoder()
    decoded = dec.feed(stream[:cut])
    assert decoded == frames[: sum(1 for b in boundaries if 0 < b <= cut)]
    if cut in boundaries:
        dec.end_of_input()
    else:
        with pytest.raises(TruncatedFrame):
            dec.end_of_input()


# -- fuzzing ---------------------------------------------------------------------------------


def feed_expecting_only_protocol_errors(dec: NativeDecoder, chunks: Sequence[Buffer]) -> None:
    try:
        for chunk in chunks:
            dec.feed(chunk)
        dec.end_of_input()
    except ProtocolError:
        with pytest.raises(ProtocolError):
            dec.end_of_input()


@FAST
@given(data=st.binary(max_size=300), prefix=st.sampled_from([b"", b"F", b"FW", b"FW\x01"]))
def test_random_bytes_raise_only_protocol_errors(data: bytes, prefix: bytes) -> None:
    feed_expecting_only_protocol_errors(decoder(4096), [prefix + data])


@FAST
@given(
    data=st.binary(min_size=1, max_size=200),
    kind=st.sampled_from([0, 1, KIND_KEEPALIVE, KIND_END_OF_STREAM, 2]),
    count=st.integers(0, 4),
    lengths=st.tuples(st.integers(0, 40), st.integers(0, 60), st.integers(0, 200)),
    step=st.integers(1, 50),
)
def test_random_bodies_behind_plausible_headers_raise_only_protocol_errors(
    data: bytes, kind: int, count: int, lengths: tuple[int, int, int], step: int
) -> None:
    type_len, headers_len, payload_len = lengths
    stream = header(
        kind=kind,
        type_len=type_len,
        count=count,
        headers_len=headers_len,
        payload_len=payload_len,
    )
    stream += data
    chunks = [stream[i : i + step] for i in range(0, len(stream), step)]
    feed_expecting_only_protocol_errors(decoder(4096), chunks)


@SLOW
@given(
    frames=st.lists(frames_with(st.binary(max_size=100)), min_size=1, max_size=4),
    data=st.data(),
)
def test_mutated_streams_raise_only_protocol_errors(
    frames: list[Frame], data: st.DataObject
) -> None:
    stream = bytearray(encode(frames) + KEEPALIVE)
    mutations = data.draw(
        st.lists(st.tuples(st.integers(0, len(stream) - 1), st.integers(0, 255)), max_size=4),
        label="mutations",
    )
    for position, value in mutations:
        stream[position] = value
    cut = data.draw(st.integers(0, len(stream)), label="cut")
    cuts = data.draw(st.lists(st.integers(0, cut), max_size=10), label="cuts")
    feed_expecting_only_protocol_errors(decoder(4096), chunks_at(bytes(stream[:cut]), cuts))


# -- encoder limits --------------------------------------------------------------------------


def test_encoder_limits_on_type_and_headers() -> None:
    encoder = NativeEncoder()
    encoder.encode(Frame(FrameKind.DATA, "\u00e9" * 127 + "a"))  # 255 bytes of UTF-8
    with pytest.raises(ValueError, match="over 255 bytes"):
        encoder.encode(Frame(FrameKind.DATA, "\u00e9" * 128))  # 128 characters, 256 bytes
    with pytest.raises(ValueError, match="too long"):
        encoder.encode(Frame(FrameKind.DATA, "t", headers={"k" * 256: ""}))
    with pytest.raises(ValueError, match="too long"):
        encoder.encode(Frame(FrameKind.DATA, "t", headers={"k": "\u00e9" * 0x8000}))
    with pytest.raises(ValueError, match="too many headers"):
        encoder.encode(Frame(FrameKind.DATA, "t", headers={str(i): "" for i in range(0x10000)}))


@pytest.mark.parametrize("timestamp", [INT64_MAX + 1, INT64_MIN - 1])
def test_encoder_rejects_out_of_range_timestamp_with_value_error(timestamp: int) -> None:
    with pytest.raises(ValueError, match="timestamp"):
        NativeEncoder().encode(Frame(FrameKind.DATA, "t", b"", timestamp))


def test_a_stream_of_large_frames_starts_each_buffer_at_the_last_frames_size() -> None:
    """A connection that delivered a large frame whole may start the next one at that size
    (no regrowing, so no copies); a fresh one starts small whatever it announces."""
    frame = Frame(FrameKind.DATA, "big", pattern(300 * 1024))
    wire = wire_of(frame)
    dec = decoder()
    check_decoded(dec.feed(wire), [frame])
    assert dec.feed(wire[:100]) == []
    assert 100 + len(dec.get_buffer()) >= len(wire)
    fresh = decoder()
    assert fresh.feed(wire[:100]) == []
    assert 100 + len(fresh.get_buffer()) == FIRST_LARGE_BUFFER
