"""The spool's sans-IO format: records, segment headers, position slots, the decoder."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from framewire.frame import Frame, FrameKind
from framewire.protocols.native import NativeEncoder
from framewire.spool._format import (
    POSITION_SLOT_OFFSETS,
    POSITION_SLOT_SIZE,
    RECORD_HEADER_SIZE,
    SEGMENT_APPENDED,
    SEGMENT_HEADER_SIZE,
    Corrupt,
    Event,
    Record,
    SegmentDecoder,
    SegmentHeader,
    Torn,
    crc32c,
    decode_position,
    encode_position,
    encode_record,
    frame_of,
    parse_record_header,
    parse_segment_name,
    segment_name,
)

ENCODER = NativeEncoder()


def frame(i: int, size: int = 40, metadata: bool = False) -> Frame:
    kind = FrameKind.METADATA if metadata else FrameKind.DATA
    headers = {"n": str(i)} if metadata else {}
    return Frame(kind, f"t{i % 3}", bytes([i % 251]) * size, i, headers)


def segment(frames: list[Frame], first_seq: int = 0) -> tuple[bytes, list[int]]:
    """A segment's bytes and where each record starts."""
    out: list[bytes] = [SegmentHeader(SEGMENT_APPENDED, first_seq).pack()]
    offsets = []
    position = SEGMENT_HEADER_SIZE
    for index, f in enumerate(frames):
        parts: list[bytes | bytearray | memoryview] = []
        size = encode_record(first_seq + index, f, ENCODER, parts)
        offsets.append(position)
        position += size
        out += [bytes(p) for p in parts]
    return b"".join(out), offsets


def decode(data: bytes, cuts: list[int], *, max_record_size: int = 1 << 20) -> list[Event]:
    decoder = SegmentDecoder(max_record_size=max_record_size)
    events: list[Event] = []
    last = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        events += decoder.feed(data[last:cut])
        last = cut
    return events + decoder.end_of_input()


def records(events: list[Event]) -> list[Record]:
    return [e for e in events if isinstance(e, Record)]


def test_a_record_round_trips_its_frame() -> None:
    original = Frame(FrameKind.METADATA, "Calibration", b"x" * 1000, -5, {"a": "b", "c": ""})
    data, _ = segment([original], first_seq=7)
    [record] = records(decode(data, []))
    assert (record.seq, record.metadata, record.offset) == (7, True, SEGMENT_HEADER_SIZE)
    assert frame_of(record) == original
    assert frame_of(record).wire == record.payload


def test_names_sort_as_sequence_numbers() -> None:
    names = [segment_name(n) for n in (10, 9, 2**64 - 1, 0)]
    assert sorted(names) == [segment_name(n) for n in (0, 9, 10, 2**64 - 1)]
    assert parse_segment_name(segment_name(123)) == 123
    assert parse_segment_name("123.seg") is None
    assert parse_segment_name("00000000000000000001.seg.tmp") is None


@settings(max_examples=200)
@given(
    sizes=st.lists(st.integers(0, 3000), min_size=0, max_size=12),
    cuts=st.lists(st.integers(0, 40_000), max_size=20),
)
def test_any_chunking_gives_the_same_records(sizes: list[int], cuts: list[int]) -> None:
    frames = [frame(i, size, metadata=i % 4 == 1) for i, size in enumerate(sizes)]
    data, _ = segment(frames)
    events = decode(data, [c for c in cuts if c < len(data)])
    assert [frame_of(r) for r in records(events)] == frames
    assert [r.seq for r in records(events)] == list(range(len(frames)))
    assert not [e for e in events if not isinstance(e, Record)]


@settings(max_examples=300)
@given(data=st.data())
def test_a_torn_tail_is_reported_and_nothing_after_the_last_whole_record(
    data: st.DataObject,
) -> None:
    frames = [frame(i, data.draw(st.integers(0, 500))) for i in range(5)]
    whole, offsets = segment(frames)
    cut = data.draw(st.integers(0, len(whole) - 1))
    events = decode(whole[:cut], data.draw(st.lists(st.integers(0, cut), max_size=5)))
    got = records(events)
    complete = sum(1 for o, f in zip(offsets, frames, strict=True) if o + record_size(f) <= cut)
    assert [frame_of(r) for r in got] == frames[:complete]
    good_end = SEGMENT_HEADER_SIZE if cut >= SEGMENT_HEADER_SIZE else 0
    if complete:
        good_end = offsets[complete - 1] + record_size(frames[complete - 1])
    tail = [e for e in events if not isinstance(e, Record)]
    assert tail == ([Torn(good_end, cut - good_end)] if cut > good_end else [])


def record_size(f: Frame) -> int:
    parts: list[bytes | bytearray | memoryview] = []
    return encode_record(0, f, ENCODER, parts)


@settings(max_examples=500)
@given(data=st.data())
def test_a_flipped_byte_loses_only_its_record_and_is_counted(data: st.DataObject) -> None:
    frames = [frame(i, data.draw(st.integers(0, 300))) for i in range(6)]
    whole, offsets = segment(frames)
    position = data.draw(st.integers(0, len(whole) - 1))
    flip = data.draw(st.integers(1, 255))
    damaged = bytearray(whole)
    damaged[position] ^= flip
    events = decode(bytes(damaged), data.draw(st.lists(st.integers(0, len(whole)), max_size=4)))
    got = records(events)
    hit = [i for i, o in enumerate(offsets) if o <= position < o + record_size(frames[i])]
    expected = [f for i, f in enumerate(frames) if i not in hit]
    # Never a damaged frame; every other frame delivered, in order.
    assert [frame_of(r) for r in got] == expected
    bad = [e for e in events if not isinstance(e, Record)]
    assert bad, "the damage must be reported"
    if hit == [len(frames) - 1]:
        assert isinstance(bad[-1], Torn)  # damage in the last record reads as a torn tail
    elif hit:
        start = offsets[hit[0]]
        assert Corrupt(start, record_size(frames[hit[0]])) in bad
    else:
        assert bad == [Corrupt(0, SEGMENT_HEADER_SIZE)]


def test_an_absurd_length_is_never_allocated() -> None:
    header = struct.pack("<4sBBHQII", b"\x89FWR", 1, 0, 0, 0, 2**31, 0)
    header += struct.pack("<I", crc32c(header))
    decoder = SegmentDecoder(max_record_size=1 << 20, offset=SEGMENT_HEADER_SIZE)
    assert parse_record_header(header, max_record_size=1 << 20) is None
    good, _ = segment([frame(0)])
    events = decoder.feed(header + b"\0" * 100 + good[SEGMENT_HEADER_SIZE:])
    assert decoder.wanted() < 1 << 21
    assert [type(e) for e in events] == [Corrupt, Record]


def test_an_exact_payload_read_is_kept_uncopied() -> None:
    data, _ = segment([frame(0, 5000)])
    decoder = SegmentDecoder(max_record_size=1 << 20)
    assert decoder.feed(data[:SEGMENT_HEADER_SIZE]) == []
    assert decoder.wanted() == RECORD_HEADER_SIZE
    assert decoder.feed(data[SEGMENT_HEADER_SIZE : SEGMENT_HEADER_SIZE + 28]) == []
    payload = data[SEGMENT_HEADER_SIZE + 28 :]
    assert decoder.wanted() == len(payload)
    [record] = decoder.feed(payload)
    assert isinstance(record, Record)
    assert record.payload is payload


def test_records_out_of_order_are_refused() -> None:
    first, _ = segment([frame(0)], first_seq=5)
    again, _ = segment([frame(1)], first_seq=5)  # the same sequence number again
    events = decode(first + again[SEGMENT_HEADER_SIZE:], [])
    assert len(records(events)) == 1
    assert isinstance(events[-1], Torn)


def test_the_newest_valid_position_slot_wins() -> None:
    a, b = encode_position(4, 100), encode_position(5, 120)
    assert decode_position([a, b]) == (5, 120)
    torn = b[:10] + bytes(POSITION_SLOT_SIZE - 10)
    assert decode_position([a, torn]) == (4, 100)
    assert decode_position([b"", b""]) is None
    assert POSITION_SLOT_OFFSETS[1] - POSITION_SLOT_OFFSETS[0] >= 4096


def test_a_frame_whose_kind_disagrees_with_its_record_is_refused() -> None:
    data, _ = segment([frame(0)])
    [record] = records(decode(data, []))
    liar = Record(record.seq, True, record.payload, record.offset)
    with pytest.raises(ValueError, match="kind"):
        frame_of(liar)


def test_decode_frame_takes_exactly_one_data_or_metadata_frame() -> None:
    from framewire.protocols import ProtocolError
    from framewire.protocols.native import KEEPALIVE, decode_frame

    wire = b"".join(bytes(b) for b in ENCODER.encode(frame(3, 600, metadata=True)))
    assert decode_frame(wire) == frame(3, 600, metadata=True)
    for bad in (KEEPALIVE, wire[:-1], wire + b"x", b"FW"):
        with pytest.raises(ProtocolError):
            decode_frame(bad)
