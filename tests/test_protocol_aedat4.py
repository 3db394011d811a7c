"""The aedat4 codec: dv-processing's network stream, from hand-built and captured bytes."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from framewire import protocols
from framewire.config import ConfigError, parse_config
from framewire.frame import Frame, FrameKind
from framewire.protocols import FrameTooLarge, ProtocolError, TruncatedFrame
from framewire.protocols.aedat4 import Aedat4Decoder, Aedat4Encoder, parse_ioheader

from .aedat4frames import LZ4_MAGIC, REAL_CAPTURE, body, ioheader, packet

LIMIT = 1 << 20


def decode(data: bytes, limit: int = LIMIT) -> list[Frame]:
    return Aedat4Decoder(max_frame_size=limit).feed(data)


def test_real_capture_is_one_header_and_three_event_packets() -> None:
    decoder = Aedat4Decoder(max_frame_size=LIMIT)
    frames = decoder.feed(REAL_CAPTURE)
    decoder.end_of_input()
    assert [(f.kind, f.type) for f in frames] == [(FrameKind.METADATA, "IOHeader")] + [
        (FrameKind.DATA, "EVTS")
    ] * 3
    assert [f.size for f in frames] == [728, 56, 72, 88]
    assert b"".join(bytes(f.wire or b"") for f in frames) == REAL_CAPTURE
    assert all(f.headers == {"stream_id": "0"} for f in frames[1:])
    assert all(f.wire_protocol == "aedat4" for f in frames)
    header = decoder.header
    assert header is not None
    assert header.compression_name == "NONE"
    assert header.streams[0].type_identifier == "EVTS"
    assert header.streams[0].name == "events"


def test_encoder_forwards_the_wire_bytes_untouched() -> None:
    frames = decode(REAL_CAPTURE)
    encoded = Aedat4Encoder().encode_batch(frames)
    assert b"".join(bytes(b) for b in encoded) == REAL_CAPTURE
    # A frame relayed through another protocol keeps its payload: written as it is.
    relayed = [Frame(f.kind, f.type, bytes(f.payload), 0, f.headers) for f in frames]
    assert b"".join(bytes(b) for b in Aedat4Encoder().encode_batch(relayed)) == REAL_CAPTURE


@pytest.mark.parametrize(
    "frame",
    [
        Frame(FrameKind.DATA, "EVTS", b"abc"),
        Frame(FrameKind.DATA, "EVTS", packet()[:-1]),
        Frame(FrameKind.METADATA, "IOHeader", ioheader()[:-4]),
        Frame(FrameKind.METADATA, "IOHeader", packet()),
    ],
)
def test_encoder_refuses_payloads_that_are_not_aedat4(frame: Frame) -> None:
    with pytest.raises(ValueError, match="does not carry"):
        Aedat4Encoder().encode(frame)


def test_streams_with_several_ids_keep_their_types() -> None:
    header = ioheader([(0, "EVTS"), (7, "FRME"), (2, "IMUS")])
    data = header + packet(7, body("FRME")) + packet(0) + packet(2, body("IMUS"))
    frames = decode(data)
    assert [(f.type, f.headers.get("stream_id")) for f in frames[1:]] == [
        ("FRME", "7"),
        ("EVTS", "0"),
        ("IMUS", "2"),
    ]


@given(st.lists(st.integers(min_value=1, max_value=200), max_size=60))
def test_any_chunking_gives_the_same_frames(cuts: list[int]) -> None:
    data = ioheader([(0, "EVTS"), (3, "TRIG")]) + b"".join(
        packet(0, body(payload=bytes([i]) * (i * 37 % 300))) if i % 3 else packet(3, body("TRIG"))
        for i in range(20)
    )
    expected = decode(data)
    decoder = Aedat4Decoder(max_frame_size=LIMIT)
    frames: list[Frame] = []
    position = 0
    for cut in cuts:
        frames += decoder.feed(data[position : position + cut])
        position += cut
    frames += decoder.feed(data[position:])
    decoder.end_of_input()
    assert frames == expected
    assert [bytes(f.wire or b"") for f in frames] == [bytes(f.wire or b"") for f in expected]


def test_large_packets_arrive_whole() -> None:
    big = body(payload=bytes(range(256)) * 2000)
    data = ioheader() + packet(0, big) + packet(0)
    frames = decode(data)
    assert [f.size for f in frames[1:]] == [8 + len(big), len(packet())]
    assert bytes(frames[1].payload) == packet(0, big)


def test_unknown_stream_id_fails_before_the_body_arrives() -> None:
    decoder = Aedat4Decoder(max_frame_size=LIMIT)
    decoder.feed(ioheader([(0, "EVTS")]))
    with pytest.raises(ProtocolError, match="stream id 5, which the IOHeader does not declare"):
        decoder.feed(struct.pack("<iI", 5, 100))
    with pytest.raises(ProtocolError):  # poisoned
        decoder.feed(packet())


def test_size_over_the_limit_fails_before_allocation() -> None:
    decoder = Aedat4Decoder(max_frame_size=4096)
    decoder.feed(ioheader())
    with pytest.raises(FrameTooLarge, match="exceeds the maximum frame size of 4096"):
        decoder.feed(struct.pack("<iI", 0, 0x7FFFFFFF))
    # Nothing was allocated for the frame, and the failed decoder let go of its buffers.
    assert decoder.failed
    assert decoder.buffered == 0


def test_header_over_the_limit_is_too_large() -> None:
    with pytest.raises(FrameTooLarge):
        decode(struct.pack("<I", 1 << 30) + b"\x18\0\0\0IOHE", limit=4096)


def test_wrong_type_id_is_refused() -> None:
    with pytest.raises(ProtocolError, match=r"type id b'FRME'.*declares 'EVTS'"):
        decode(ioheader() + packet(0, body("FRME")))


def test_compressed_packets_must_carry_the_declared_format() -> None:
    lz4 = LZ4_MAGIC + b"compressed bytes"
    assert [f.type for f in decode(ioheader(compression=1) + packet(0, lz4))] == [
        "IOHeader",
        "EVTS",
    ]
    with pytest.raises(ProtocolError, match="LZ4 magic number"):
        decode(ioheader(compression=1) + packet(0, body()))
    with pytest.raises(ProtocolError, match="type id"):  # LZ4 under a NONE header
        decode(ioheader(compression=0) + packet(0, lz4))
    with pytest.raises(ProtocolError, match="ZSTD magic number"):
        decode(ioheader(compression=3) + packet(0, lz4))


def test_short_uncompressed_packet_is_refused() -> None:
    with pytest.raises(ProtocolError, match="too short"):
        decode(ioheader() + packet(0, b"EVTS"))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"#!AER-DAT4.0\r\n" + bytes(100), "too small|does not start with an IOHeader"),
        (struct.pack("<I", 16) + struct.pack("<I", 8) + b"XXXX" + bytes(8), "IOHE"),
        (ioheader(compression=9), "unknown compression 9"),
        (ioheader([]), "declares no streams"),
        (struct.pack("<I", 4) + b"\0\0\0\0IOHE", "too small"),
    ],
)
def test_bad_headers_are_protocol_errors(data: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode(data)


def test_header_stream_needs_a_type_identifier() -> None:
    header = ioheader().replace(b'key="typeIdentifier"', b'key="typeIdentifieX"')
    with pytest.raises(ProtocolError, match="has no typeIdentifier"):
        decode(header)


def test_truncated_packet_at_end_of_input() -> None:
    decoder = Aedat4Decoder(max_frame_size=LIMIT)
    decoder.feed(ioheader() + packet()[:-3])
    with pytest.raises(TruncatedFrame):
        decoder.end_of_input()


@given(st.binary(min_size=12, max_size=600))
def test_garbage_headers_fail_only_with_protocol_errors(garbage: bytes) -> None:
    flatbuffer = garbage[:4] + b"IOHE" + garbage[4:]
    # Anything but a ProtocolError (an IndexError, a struct.error) fails the test.
    with contextlib.suppress(ProtocolError):
        parse_ioheader(flatbuffer)


def test_registered_with_session_and_listen_only_flags() -> None:
    spec = protocols.get("aedat4")
    assert spec.session_metadata_types == frozenset({"IOHeader"})
    assert spec.listen_only_clients
    assert spec.canonical_type is not None
    assert spec.canonical_type("EVTS") == "EVTS"
    with pytest.raises(ValueError, match="metadata is never decimated"):
        spec.canonical_type("IOHeader")
    assert not protocols.get("native").session_metadata_types


def test_config_decimates_packet_types_not_the_header() -> None:
    base = (
        '[endpoints.out]\nkind = "server"\nlisten = "tcp://127.0.0.1:0"\n'
        'protocol = "aedat4"\nstream = "cam"\n'
    )
    assert parse_config(base + "decimate = { IMUS = 10 }").endpoints["out"]
    with pytest.raises(ConfigError, match=r"decimate\.IOHeader"):
        parse_config(base + "decimate = { IOHeader = 2 }")
