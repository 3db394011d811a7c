"""The datalink codec (framewire/protocols/datalink.py), sans-IO, against hand-built bytes.

The bytes are built here from the layout in the notes (shared/notes/rogue-datalink-zmq.md,
"Wire format"), not with the codec's own structs: 5 x 0x20, a 64-bit little-endian size, a
little-endian double timestamp, 5 x 0x21, the payload, 5 x 0x22. Size 0 is a keepalive
(timestamp 1.0, 31 bytes).
"""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from framewire import protocols
from framewire.frame import Frame, FrameKind
from framewire.protocols import FrameTooLarge, ProtocolError, TruncatedFrame
from framewire.protocols._framing import LARGE_FRAME
from framewire.protocols.datalink import (
    KEEPALIVE,
    DatalinkDecoder,
    DatalinkEncoder,
    seconds_to_ns,
)

MAX_FRAME = 1 << 20
FAST = settings(max_examples=60, deadline=None, database=None)


def message(payload: bytes, timestamp: float = 1.0, size: int | None = None) -> bytes:
    """A Datalink message built by hand from the notes."""
    n = len(payload) if size is None else size
    return (
        b"\x20\x20\x20\x20\x20"
        + n.to_bytes(8, "little", signed=True)
        + struct.pack("<d", timestamp)
        + b"\x21\x21\x21\x21\x21"
        + payload
        + b"\x22\x22\x22\x22\x22"
    )


def decoder(max_frame_size: int = MAX_FRAME) -> DatalinkDecoder:
    return DatalinkDecoder(max_frame_size=max_frame_size)


def encoded(frame: Frame) -> bytes:
    return b"".join(bytes(b) for b in DatalinkEncoder().encode(frame))


def data(payload: bytes, ns: int = 0) -> Frame:
    return Frame(FrameKind.DATA, "datalink", payload, ns)


# -- the layout -------------------------------------------------------------------------


def test_hand_built_message_decodes() -> None:
    wire = message(b"hello", 1.5)
    assert len(wire) == 26 + 5 + 5
    (frame,) = decoder().feed(wire)
    assert frame == data(b"hello", 1_500_000_000)
    assert frame.kind is FrameKind.DATA
    assert frame.type == "datalink"
    assert not frame.headers
    assert bytes(frame.wire or b"") == wire
    assert frame.wire_protocol == "datalink"


def test_keepalive_is_31_bytes_consumed_and_counted() -> None:
    assert message(b"", 1.0) == KEEPALIVE
    assert len(KEEPALIVE) == 31
    assert DatalinkEncoder().keepalive() == KEEPALIVE
    d = decoder()
    assert d.feed(KEEPALIVE + message(b"x") + KEEPALIVE) == [data(b"x", 1_000_000_000)]
    assert d.keepalives == 2


def test_encoder_writes_the_hand_built_bytes() -> None:
    frame = Frame(FrameKind.DATA, "anything", b"world", 2_250_000_000)
    assert encoded(frame) == message(b"world", 2.25)
    big = Frame(FrameKind.DATA, "x", bytes(range(256)) * 100, 3_000_000_000)
    assert encoded(big) == message(bytes(range(256)) * 100, 3.0)


def test_round_trip_through_the_encoder() -> None:
    frames = [data(b"a" * n, n * 1_000_000) for n in (1, 100, 513, LARGE_FRAME, 300_000)]
    wire = b"".join(encoded(f) for f in frames)
    assert decoder().feed(wire) == frames


def test_what_a_native_frame_loses_over_datalink() -> None:
    frame = Frame(FrameKind.METADATA, "calibration", b"gain=2", 7_000_000_000, {"unit": "K"})
    (back,) = decoder().feed(encoded(frame))
    # Kind, type and headers are gone; payload and timestamp survive.
    assert back == Frame(FrameKind.DATA, "datalink", b"gain=2", 7_000_000_000)


def test_empty_payload_cannot_be_sent() -> None:
    with pytest.raises(ValueError, match="empty payload"):
        DatalinkEncoder().encode(Frame(FrameKind.DATA, "x", b""))


def test_datalink_frames_are_forwarded_untouched() -> None:
    wire = message(b"exact", 1.0000000001)
    (frame,) = decoder().feed(wire)
    assert encoded(frame) == wire
    # A frame re-encoded from another protocol is built afresh.
    other = Frame(FrameKind.DATA, "x", b"exact", 5, wire=b"whatever", wire_protocol="native")
    assert encoded(other) == message(b"exact", 5e-9)


def test_no_end_of_stream_and_registered() -> None:
    assert DatalinkEncoder().end_of_stream() == b""
    spec = protocols.get("datalink")
    assert spec.has_keepalive
    assert isinstance(spec.make_decoder(MAX_FRAME), DatalinkDecoder)


# -- timestamps -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "ns"),
    [
        (0.0, 0),
        (1.0, 1_000_000_000),
        (-2.5, 0),  # below 0: Datalink's "no timestamp"
        (-1.0, 0),  # what Datalink's Python write(bytes) writes by default
        (-0.0, 0),
        (1_700_000_000.25, 1_700_000_000_250_000_000),
        (math.nan, 0),
        (math.inf, 0),
        (-math.inf, 0),
        (1e300, 0),
    ],
)
def test_timestamp_seconds_become_nanoseconds(seconds: float, ns: int) -> None:
    (frame,) = decoder().feed(message(b"t", seconds))
    assert frame.timestamp == ns
    (frame,) = decoder().feed(message(b"t" * 1000, seconds))  # the general path too
    assert frame.timestamp == ns


@pytest.mark.parametrize("size", [5, 1000, 3 * LARGE_FRAME])  # inline, general, large paths
def test_a_negative_timestamp_is_neither_forwarded_nor_kept_on_the_wire(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    (frame,) = decoder().feed(message(payload, -1.0))
    assert frame == data(payload, 0)
    # A datalink-to-datalink relay forwards the message with 0.0 in place of -1.0: a real
    # Datalink drops every message below 0.
    assert encoded(frame) == message(payload, 0.0)


@pytest.mark.parametrize("ns", [0, -1, -2_500_000_000, -(2**62)])
def test_no_negative_timestamp_is_ever_written(ns: int) -> None:
    """A frame without a timestamp, or from before 1970, goes out as 0.0, which a real
    Datalink accepts and framewire reads back as "no timestamp"."""
    wire = encoded(data(b"old", ns))
    assert wire == message(b"old", 0.0)
    assert struct.unpack_from("<d", wire, 13)[0] >= 0.0
    assert decoder().feed(wire) == [data(b"old", 0)]


def test_present_day_timestamps_survive_within_a_microsecond() -> None:
    ns = 1_763_700_000_123_456_789
    (back,) = decoder().feed(encoded(data(b"t", ns)))
    assert abs(back.timestamp - ns) < 1000


# -- chunking ---------------------------------------------------------------------------


payloads = st.one_of(
    st.binary(min_size=1, max_size=600),
    st.integers(min_value=LARGE_FRAME - 40, max_value=LARGE_FRAME + 40).map(lambda n: b"z" * n),
)
timestamps = st.floats(min_value=-1e9, max_value=4e9, allow_nan=False)  # negatives read as 0


@FAST
@given(
    items=st.lists(st.one_of(st.none(), st.tuples(payloads, timestamps)), max_size=6),
    data_=st.data(),
)
def test_arbitrary_chunking(items: list[tuple[bytes, float] | None], data_: st.DataObject) -> None:
    wire = b"".join(KEEPALIVE if item is None else message(*item) for item in items)
    expected = [data(payload, seconds_to_ns(seconds)) for payload, seconds in filter(None, items)]
    cuts = sorted(data_.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    d = decoder()
    frames: list[Frame] = []
    previous = 0
    for cut in [*cuts, len(wire)]:
        frames += d.feed(wire[previous:cut])
        previous = cut
    d.end_of_input()
    assert frames == expected
    assert d.keepalives == items.count(None)


@FAST
@given(payload=st.binary(min_size=1, max_size=300), step=st.integers(1, 40))
def test_buffered_protocol_reads(payload: bytes, step: int) -> None:
    wire = message(payload, 2.0) * 3
    d = decoder()
    frames: list[Frame] = []
    position = 0
    while position < len(wire):
        target = d.get_buffer()
        n = min(step, len(target), len(wire) - position)
        target[:n] = wire[position : position + n]
        position += n
        frames += d.buffer_updated(n)
    assert frames == [data(payload, 2_000_000_000)] * 3


# -- bad input --------------------------------------------------------------------------


BAD = {
    "start marker": b"\x20\x20\x20\x20X" + message(b"x")[5:],
    "header end marker": message(b"x")[:21] + b"!!!!?" + message(b"x")[26:],
    "footer": message(b"abc")[:-5] + b'""""!',
    "negative size": message(b"", size=-1),
    "large footer": message(b"q" * (LARGE_FRAME + 10))[:-1] + b"!",
    "native bytes": b"FW\x01\x00" + bytes(40),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_messages_raise_and_poison(name: str) -> None:
    d = decoder()
    with pytest.raises(ProtocolError):
        d.feed(message(b"ok") + BAD[name])
    with pytest.raises(ProtocolError):
        d.feed(message(b"ok"))


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_messages_raise_byte_by_byte(name: str) -> None:
    d = decoder()
    chunks = [bytes([byte]) for byte in BAD[name]]
    for chunk in chunks[:-1]:
        try:
            d.feed(chunk)
        except ProtocolError:
            return  # caught early, as it should be when the broken byte is not the last
    with pytest.raises(ProtocolError):
        d.feed(chunks[-1])


def test_a_broken_start_marker_is_seen_from_the_first_byte() -> None:
    with pytest.raises(ProtocolError, match="bad start marker"):
        decoder().feed(b"X")
    with pytest.raises(ProtocolError, match="bad start marker"):
        decoder().feed(b"   \x00")


def test_a_broken_header_end_is_seen_before_the_whole_header() -> None:
    with pytest.raises(ProtocolError, match="bad header end marker"):
        decoder().feed(message(b"x")[:21] + b"?")


@pytest.mark.parametrize("size", [MAX_FRAME, 1 << 40, 2**63 - 1])
def test_absurd_sizes_are_refused_before_allocation(size: int) -> None:
    d = decoder()
    with pytest.raises(FrameTooLarge):
        d.feed(message(b"", size=size)[:26])
    assert d.buffered == 0 or d.buffered <= 26


def test_largest_allowed_message() -> None:
    payload = b"m" * (MAX_FRAME - 31)
    assert decoder().feed(message(payload)) == [data(payload, 1_000_000_000)]


def test_truncated_message_at_end_of_input() -> None:
    d = decoder()
    d.feed(message(b"hello")[:-2])
    with pytest.raises(TruncatedFrame):
        d.end_of_input()
