"""The Rogue bridge message codec: parts in, frames out, and back."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from framewire import Frame, FrameKind
from framewire.protocols import ProtocolError
from framewire.protocols.rogue import RogueCodec


def parts(flags: int, channel: int, error: int, payload: bytes) -> list[bytes]:
    return [struct.pack("<H", flags), bytes([channel]), bytes([error]), payload]


def test_flags_go_on_the_wire_little_endian_as_rogue_writes_them_on_x86() -> None:
    frame = Frame(FrameKind.DATA, "x", b"p", headers={"flags": str(0x1234)})
    assert RogueCodec().encode(frame)[0] == b"4\x12"


def test_a_message_becomes_a_frame_with_the_three_fields_as_headers() -> None:
    frame = RogueCodec(metadata_channels=[9]).decode(parts(0xBEEF, 9, 3, b"payload"))
    assert frame == Frame(
        FrameKind.METADATA,
        "ch9",
        b"payload",
        0,
        {"flags": str(0xBEEF), "channel": "9", "error": "3"},
    )
    data = RogueCodec(metadata_channels=[9]).decode(parts(0, 8, 0, b""))
    assert data.kind is FrameKind.DATA
    assert data.type == "ch8"
    assert data.payload == b""


@given(
    flags=st.integers(0, 0xFFFF),
    channel=st.integers(0, 0xFF),
    error=st.integers(0, 0xFF),
    payload=st.binary(min_size=1, max_size=64),
)
def test_round_trip(flags: int, channel: int, error: int, payload: bytes) -> None:
    codec = RogueCodec(metadata_channels=range(0, 256, 2))
    message = parts(flags, channel, error, payload)
    frame = codec.decode(message)
    assert frame.is_metadata == (channel % 2 == 0)
    assert [bytes(part) for part in codec.encode(frame)] == message


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ([b"\x00\x00", b"\x01", b"\x02"], "got 3"),
        ([], "got 0"),
        ([b"\x00\x00", b"\x01", b"\x02", b"p", b"q"], "got 5"),
        ([b"\x00", b"\x01", b"\x02", b"p"], "got 1, 1 and 1"),
        ([b"\x00\x00\x00", b"\x01", b"\x02", b"p"], "got 3, 1 and 1"),
        ([b"\x00\x00", b"", b"\x02", b"p"], "got 2, 0 and 1"),
        ([b"\x00\x00", b"\x01", b"\x02\x03", b"p"], "got 2, 1 and 2"),
    ],
)
def test_wrong_part_count_or_sizes_raise_protocol_error(message: list[bytes], error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        RogueCodec().decode(message)


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        ({"flags": "65536"}, "flags='65536'"),
        ({"channel": "256"}, "channel='256'"),
        ({"error": "-1"}, "error='-1'"),
        ({"error": "0x1"}, "error='0x1'"),
        ({"channel": ""}, "channel=''"),
    ],
)
def test_headers_out_of_range_cannot_be_encoded(headers: dict[str, str], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        RogueCodec().encode(Frame(FrameKind.DATA, "x", b"p", headers=headers))


def test_an_empty_payload_cannot_be_sent_rogue_would_lose_it_and_the_next() -> None:
    with pytest.raises(ValueError, match="empty payload"):
        RogueCodec().encode(Frame(FrameKind.DATA, "x", b""))


def test_frames_from_other_protocols_default_to_zero_fields_and_keep_their_payload() -> None:
    payload = memoryview(b"abcdef")[1:4]
    out = RogueCodec().encode(Frame(FrameKind.DATA, "Scan", payload))
    assert out[:3] == [b"\x00\x00", b"\x00", b"\x00"]
    assert out[3] is payload  # not copied


def test_metadata_channels_must_be_uint8() -> None:
    with pytest.raises(ValueError, match="256"):
        RogueCodec(metadata_channels=[256])
