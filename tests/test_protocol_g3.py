"""The G3 codec, on hand-built frames: no spt3g needed."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from framewire import Frame, FrameKind
from framewire.protocols import FrameTooLarge, ProtocolError, TruncatedFrame
from framewire.protocols._framing import FIRST_LARGE_BUFFER, LARGE_FRAME
from framewire.protocols.g3 import G3Decoder, G3Encoder, canonical_type, spt3g_crc
from framewire.protocols.native import NativeDecoder, NativeEncoder

from .g3frames import g3_frame, reference_crc

# The 72-byte Housekeeping frame with a = G3Int(1) that spt3g 1.0.2 wrote (notes, section 2).
REAL_HOUSEKEEPING = bytes.fromhex(
    "01010000000100000048000000010000000000000061260000000000000001010000800500000000000000"
    "4733496e740100008001000000010000000100000000000000365650f7"
)

STREAM = [
    g3_frame("Observation", {b"source": b"RCW38"}),
    g3_frame("Calibration", {b"gain": b"\x01" * 100, b"offset": b"\x02" * 7}),
    g3_frame("Scan", {b"tod": bytes(range(256)) * 400}),  # > 64 KiB: the large-frame path
    g3_frame("Timepoint"),
    g3_frame("ABCD", {b"x": b"y"}),  # an ad-hoc type
    g3_frame("Wiring", {b"w": b"z" * 10}, little_endian=False),
    g3_frame("Scan", {b"tod": b"\x03" * 1000}),
]
TYPES = ["Observation", "Calibration", "Scan", "Timepoint", "ABCD", "Wiring", "Scan"]


def decoder(**options: bool) -> G3Decoder:
    return G3Decoder(max_frame_size=1 << 20, **options)


def test_crc_matches_spt3g_and_the_reference() -> None:
    assert spt3g_crc([b"123456789"]) == reference_crc(b"123456789") == 0x58E3FA20
    assert spt3g_crc([b"a"]) == 0x93AD1061
    assert spt3g_crc([]) == 0
    assert spt3g_crc([b"1234", b"56789"]) == 0x58E3FA20  # chained over the pieces


def test_a_real_frame_decodes_with_its_crc_checked() -> None:
    (frame,) = decoder(verify_crc=True).feed(REAL_HOUSEKEEPING)
    assert frame.type == "Housekeeping"
    assert frame.kind is FrameKind.METADATA
    assert frame.wire == REAL_HOUSEKEEPING
    assert bytes(frame.payload) == REAL_HOUSEKEEPING
    assert frame.wire_protocol == "g3"


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=70_000), max_size=40))
def test_any_chunking_gives_the_same_frames(cuts: list[int]) -> None:
    data = b"".join(STREAM)
    points = sorted({c % len(data) for c in cuts} | {0, len(data)})
    dec = decoder(verify_crc=True)
    frames: list[Frame] = []
    for start, end in itertools.pairwise(points):
        frames += dec.feed(data[start:end])
    dec.end_of_input()
    assert [f.type for f in frames] == TYPES
    assert [bytes(f.wire or b"") for f in frames] == STREAM
    kinds = [f.kind for f in frames]
    assert kinds == [
        FrameKind.METADATA,
        FrameKind.METADATA,
        FrameKind.DATA,
        FrameKind.DATA,
        FrameKind.METADATA,
        FrameKind.METADATA,
        FrameKind.DATA,
    ]


def test_one_byte_at_a_time() -> None:
    data = b"".join(STREAM[:2] + STREAM[3:])
    dec = decoder()
    frames = [f for i in range(len(data)) for f in dec.feed(data[i : i + 1])]
    assert [bytes(f.wire or b"") for f in frames] == STREAM[:2] + STREAM[3:]


def test_end_processing_is_swallowed() -> None:
    dec = decoder()
    frames = dec.feed(g3_frame("Timepoint") + g3_frame("EndProcessing") + g3_frame("Scan"))
    assert [f.type for f in frames] == ["Timepoint", "Scan"]
    assert dec.end_processing == 1
    assert (
        G3Encoder().encode(Frame(FrameKind.METADATA, "EndProcessing", g3_frame("EndProcessing")))
        == []
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x02", "endian flag"),
        (b"GET / HTTP/1.1\r\n", "endian flag"),
        (b"\x01" + struct.pack("<IiI", 2, 0, 0x53) + bytes(4), "version 2"),
        (b"\x01" + struct.pack("<IiI", 1, -1, 0x53), "key count"),
        (b"\x01" + struct.pack("<IiI", 1, 1 << 30, 0x53), "key count"),
    ],
)
def test_garbage_is_a_protocol_error(data: bytes, message: str) -> None:
    dec = decoder()
    with pytest.raises(ProtocolError, match=message):
        dec.feed(data)
    with pytest.raises(ProtocolError, match=message):
        dec.feed(b"")  # the decoder stays failed


def test_an_absurd_length_is_refused_before_allocating() -> None:
    header = b"\x01" + struct.pack("<IiI", 1, 1, 0x53) + struct.pack("<Q", 1) + b"x"
    with pytest.raises(FrameTooLarge):
        decoder().feed(header + struct.pack("<Q", 2**63))
    with pytest.raises(FrameTooLarge):
        G3Decoder(max_frame_size=1000).feed(header + struct.pack("<Q", 2000))


def test_crc_mismatch_is_an_error_only_when_checked() -> None:
    bad = g3_frame("Calibration", {b"gain": b"1"}, crc=0xDEADBEEF)
    assert [f.type for f in decoder().feed(bad)] == ["Calibration"]
    with pytest.raises(ProtocolError, match="CRC mismatch"):
        decoder(verify_crc=True).feed(bad)


def test_truncated_stream() -> None:
    dec = decoder()
    dec.feed(STREAM[0][:-1])
    with pytest.raises(TruncatedFrame):
        dec.end_of_input()
    clean = decoder()
    clean.feed(STREAM[0])
    clean.end_of_input()


def test_type_names_and_codes() -> None:
    assert canonical_type("T") == "Timepoint"
    assert canonical_type("Scan") == "Scan"
    with pytest.raises(ValueError, match="not a G3 frame type"):
        canonical_type("Timepiont")


def test_g3_through_native_and_back_is_byte_identical() -> None:
    frames = decoder().feed(b"".join(STREAM))
    native = b"".join(bytes(b) for b in NativeEncoder().encode_batch(frames))
    relayed = NativeDecoder(max_frame_size=1 << 20).feed(native)
    assert [f.type for f in relayed] == TYPES
    again = b"".join(bytes(b) for b in G3Encoder().encode_batch(relayed))
    assert again == b"".join(STREAM)


def test_encoder_forwards_wire_and_refuses_non_g3() -> None:
    frames = decoder().feed(STREAM[0])
    assert G3Encoder().encode(frames[0])[0] is frames[0].wire
    with pytest.raises(ValueError, match="does not carry a G3 frame"):
        G3Encoder().encode(Frame(FrameKind.DATA, "Scan", b"just some bytes"))


@pytest.mark.parametrize("step", [1, 7, 100, 4096, 70_001, 1 << 20])
def test_crc_is_checked_as_bytes_arrive_in_any_chunking(step: int) -> None:
    """The CRC is summed as bytes arrive (no long pass at the end of a big frame), and a
    frame's CRC is the same whatever the chunking; a flipped byte is caught."""
    entries = {b"a": b"", b"bb": bytes(range(256)) * 300, b"": b"x", b"ccc": b"y" * 70_000}
    frames = [g3_frame("Scan", entries), g3_frame("Wiring", {b"k": b"v"}), g3_frame("Scan")]
    stream = b"".join(frames)
    dec = decoder(verify_crc=True)
    decoded = []
    for i in range(0, len(stream), step):
        decoded += dec.feed(stream[i : i + step])
    assert [bytes(f.wire or b"") for f in decoded] == frames
    corrupt = bytearray(frames[0])
    corrupt[len(corrupt) // 2] ^= 0x01  # inside the big blob
    dec = decoder(verify_crc=True)

    def feed_all() -> None:
        for i in range(0, len(corrupt), step):
            dec.feed(bytes(corrupt[i : i + step]))

    with pytest.raises(ProtocolError, match="CRC mismatch"):
        feed_all()


def test_crc_work_per_read_is_bounded_by_the_bytes_read() -> None:
    """One 16 MiB-class frame of many keys took 2 s in one go when it completed: now each
    read sums only what it brought."""
    nkeys = 20_000
    frame = g3_frame("Scan", {i.to_bytes(4, "big"): b"" for i in range(nkeys)})
    dec = decoder(verify_crc=True)
    summed: list[int] = []
    real = dec._extend

    def counting(crc: int, chunk: bytes) -> int:
        summed[-1] += len(chunk)
        return int(real(crc, chunk))

    dec._extend = counting
    step = 4096
    decoded = []
    for i in range(0, len(frame), step):
        summed.append(0)
        decoded += dec.feed(frame[i : i + step])
    assert len(decoded) == 1
    assert max(summed) <= step
    assert sum(summed) == 4 * nkeys  # every name, once


def test_a_frame_of_many_keys_takes_few_reads_and_its_buffer_doubles() -> None:
    """G3 measures a frame key by key. Its own buffer used to grow one key at a time and
    each read stopped at the next key: a 2 MiB frame of 256 keys took 38 reads (an 8 MB
    Scan of 100 keys, 100 reads and 2.6 ms of decoding). Now the buffer doubles, never
    beyond twice what has arrived; reads go on past the next key, as far as the receive
    buffer could take back; and the next frame starts with a buffer the size of the last."""
    nkeys = 256
    frame = g3_frame("Scan", {i.to_bytes(4, "big"): bytes([i]) * 8192 for i in range(nkeys)})
    stream = frame * 2
    dec = G3Decoder(max_frame_size=4 << 20)
    decoded: list[Frame] = []
    reads: list[int] = [0]
    growths: list[int] = [0]
    position = 0
    while position < len(stream):
        before = len(decoded)
        size = len(dec._large) if dec._large is not None else None
        target = dec.get_buffer()
        large = dec._large
        if large is not None:
            filled = dec.buffered
            # The next frame starts at the last one's size plus its read-ahead (1/16 at most).
            assert len(large) <= max(
                2 * filled, filled + LARGE_FRAME, FIRST_LARGE_BUFFER, len(frame) * 17 // 16
            )
            if size is not None and len(large) != size:
                growths[-1] += 1
        n = min(len(target), len(stream) - position)
        target[:n] = stream[position : position + n]
        del target
        position += n
        reads[-1] += 1
        decoded += dec.buffer_updated(n)
        if len(decoded) > before:
            reads.append(0)
            growths.append(0)
    assert [bytes(f.wire or b"") for f in decoded] == [frame, frame]
    assert reads[0] <= len(frame) // (128 * 1024)
    assert growths[0] <= 5  # 128 KiB, doubling to 2 MiB
    assert growths[1] == 0  # the second frame starts at the first one's size
