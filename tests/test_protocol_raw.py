"""The raw codec (framewire/protocols/raw.py) and the protocol registry (_registry.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from framewire import protocols
from framewire.frame import Buffer, Frame, FrameKind
from framewire.protocols import ProtocolSpec, UnknownProtocol
from framewire.protocols.native import END_OF_STREAM, KEEPALIVE, NativeDecoder, NativeEncoder
from framewire.protocols.raw import RawDecoder, RawEncoder

FAST = settings(max_examples=60, deadline=None, database=None)


def check_raw(frame: Frame, payload: bytes) -> None:
    assert frame.kind is FrameKind.DATA
    assert frame.type == "raw"
    assert frame.timestamp == 0
    assert dict(frame.headers) == {}
    assert bytes(frame.payload) == payload
    assert frame.size == len(payload)


# -- decoder ---------------------------------------------------------------------------------


def test_each_chunk_becomes_one_data_frame() -> None:
    dec = RawDecoder(max_frame_size=1 << 20)
    [frame] = dec.feed(b"hello")
    check_raw(frame, b"hello")
    [frame] = dec.feed(memoryview(b"\x00\xff world"))
    check_raw(frame, b"\x00\xff world")
    [frame] = dec.feed(bytearray(b"x"))
    check_raw(frame, b"x")
    assert dec.feed(b"") == []
    assert dec.buffered == 0
    assert not dec.ended
    dec.end_of_input()  # raw input may end anywhere
    assert dec.protocol == "raw"


@pytest.mark.parametrize(
    ("size", "max_frame_size", "expected"),
    [
        (10, 4, [4, 4, 2]),
        (8, 4, [4, 4]),
        (3, 4, [3]),
        (4, 4, [4]),
        (5, 1, [1, 1, 1, 1, 1]),
        (0, 4, []),
    ],
)
def test_feed_splits_at_max_frame_size(size: int, max_frame_size: int, expected: list[int]) -> None:
    data = bytes(range(size))
    frames = RawDecoder(max_frame_size=max_frame_size).feed(data)
    assert [len(bytes(f.payload)) for f in frames] == expected
    assert b"".join(bytes(f.payload) for f in frames) == data
    for frame in frames:
        check_raw(frame, bytes(frame.payload))


@FAST
@given(
    chunks=st.lists(st.binary(max_size=300), max_size=10),
    max_frame_size=st.integers(1, 200),
)
def test_feed_keeps_every_byte_in_order(chunks: list[bytes], max_frame_size: int) -> None:
    dec = RawDecoder(max_frame_size=max_frame_size)
    frames: list[Frame] = []
    for chunk in chunks:
        new = dec.feed(chunk)
        assert all(0 < len(bytes(f.payload)) <= max_frame_size for f in new)
        assert len(new) == -(-len(chunk) // max_frame_size)
        frames += new
    assert b"".join(bytes(f.payload) for f in frames) == b"".join(chunks)
    dec.end_of_input()


def test_get_buffer_is_capped_by_max_frame_size() -> None:
    assert len(RawDecoder(max_frame_size=100).get_buffer()) == 100
    assert len(RawDecoder(max_frame_size=1 << 30).get_buffer()) == 256 * 1024
    assert len(RawDecoder(max_frame_size=1 << 30, buffer_size=4096).get_buffer()) == 4096


def test_buffer_updated_makes_one_frame_of_the_bytes_written() -> None:
    dec = RawDecoder(max_frame_size=16)
    target = dec.get_buffer()
    target[:5] = b"abcde"  # fewer bytes than offered
    [first] = dec.buffer_updated(5)
    check_raw(first, b"abcde")
    target = dec.get_buffer()
    target[:16] = b"0123456789ABCDEF"
    [second] = dec.buffer_updated(16)
    check_raw(second, b"0123456789ABCDEF")
    # Frames own their bytes: reusing the receive buffer does not change them.
    check_raw(first, b"abcde")
    assert dec.buffer_updated(0) == []


@FAST
@given(writes=st.lists(st.binary(max_size=64), max_size=10))
def test_buffer_protocol_round_trip(writes: list[bytes]) -> None:
    dec = RawDecoder(max_frame_size=32)
    frames: list[Frame] = []
    expected = bytearray()
    for data in writes:
        target = dec.get_buffer()
        n = min(len(target), len(data))
        target[:n] = data[:n]
        expected += data[:n]
        frames += dec.buffer_updated(n)
    payloads = [bytes(f.payload) for f in frames]
    assert b"".join(payloads) == expected
    assert all(payloads)  # no empty frames


def test_decoder_rejects_a_non_positive_max_frame_size() -> None:
    with pytest.raises(ValueError, match="max_frame_size"):
        RawDecoder(max_frame_size=0)
    with pytest.raises(ValueError, match="max_frame_size"):
        RawDecoder(max_frame_size=-1)


# -- encoder ---------------------------------------------------------------------------------


def test_encoder_writes_payloads_only() -> None:
    encoder = RawEncoder()
    payload = b"payload"
    for frame in [
        Frame(FrameKind.DATA, "raw", payload),
        Frame(FrameKind.METADATA, "Calibration", payload, 123, {"k": "v"}),
        Frame(FrameKind.DATA, "native", payload, 1, {}, b"FW-native-wire", "native"),
    ]:
        out = encoder.encode(frame)
        assert out == [payload]
        assert out[0] is payload  # no copy
    assert encoder.encode(Frame(FrameKind.DATA, "t")) == [b""]
    assert encoder.keepalive() == b""
    assert encoder.end_of_stream() == b""
    assert encoder.protocol == "raw"


def test_encode_batch_and_encode_into() -> None:
    frames = [Frame(FrameKind.DATA, "a", b"1"), Frame(FrameKind.METADATA, "b", memoryview(b"22"))]
    encoder = RawEncoder()
    assert b"".join(encoder.encode_batch(frames)) == b"122"
    out: list[Buffer] = [b"0"]
    for frame in frames:
        encoder.encode_into(frame, out)
    assert b"".join(out) == b"0122"


@FAST
@given(chunks=st.lists(st.binary(max_size=100), max_size=8))
def test_raw_round_trip_reproduces_the_stream(chunks: list[bytes]) -> None:
    frames: list[Frame] = []
    dec = RawDecoder(max_frame_size=50)
    for chunk in chunks:
        frames += dec.feed(chunk)
    assert b"".join(RawEncoder().encode_batch(frames)) == b"".join(chunks)


def test_native_frames_relayed_as_raw_and_back() -> None:
    # A frame decoded from the native wire is written as its payload by the raw encoder, and a
    # raw frame is framed by the native encoder.
    original = Frame(FrameKind.DATA, "Scan", b"samples", 7, {"a": "b"})
    wire = b"".join(NativeEncoder().encode(original))
    [native] = NativeDecoder(max_frame_size=1 << 20).feed(wire)
    assert b"".join(RawEncoder().encode(native)) == b"samples"
    [raw] = RawDecoder(max_frame_size=1 << 20).feed(b"samples")
    stream = b"".join(NativeEncoder().encode(raw)) + KEEPALIVE + END_OF_STREAM
    native_decoder = NativeDecoder(max_frame_size=1 << 20)
    assert native_decoder.feed(stream) == [Frame(FrameKind.DATA, "raw", b"samples")]


# -- registry --------------------------------------------------------------------------------


def test_registry_native() -> None:
    spec = protocols.get("native")
    assert spec.name == "native"
    assert spec.has_keepalive
    assert spec.data_types is None  # the kind is carried per frame
    dec = spec.make_decoder(1234)
    assert isinstance(dec, NativeDecoder)
    assert dec.max_frame_size == 1234
    assert dec.protocol == "native"
    encoder = spec.make_encoder()
    assert isinstance(encoder, NativeEncoder)
    assert encoder.protocol == "native"
    assert spec.make_decoder(10) is not dec  # a fresh decoder each time


def test_registry_raw() -> None:
    spec = protocols.get("raw")
    assert spec.name == "raw"
    assert not spec.has_keepalive
    assert spec.data_types is None  # every raw frame is DATA
    dec = spec.make_decoder(99)
    assert isinstance(dec, RawDecoder)
    assert dec.max_frame_size == 99
    assert isinstance(spec.make_encoder(), RawEncoder)


def test_registry_names() -> None:
    names = protocols.names()
    assert {"native", "raw"} <= set(names)
    assert names == sorted(names)
    for name in names:
        assert protocols.get(name).name == name


@pytest.mark.parametrize("name", ["zmq", "", "Native", "NATIVE", " native", "G3"])
def test_unknown_protocol_names_the_known_ones(name: str) -> None:
    with pytest.raises(UnknownProtocol) as excinfo:
        protocols.get(name)
    message = str(excinfo.value)
    assert repr(name) in message
    assert f"known: {', '.join(protocols.names())}" in message
    assert "native" in message
    assert "raw" in message
    assert isinstance(excinfo.value, LookupError)
    assert not isinstance(excinfo.value, ValueError)


def test_registering_a_taken_name_is_refused() -> None:
    before = protocols.get("native")
    impostor = ProtocolSpec(
        name="native",
        summary="impostor",
        make_decoder=lambda max_frame_size: RawDecoder(max_frame_size=max_frame_size),
        make_encoder=RawEncoder,
    )
    with pytest.raises(ValueError, match="'native' is already registered"):
        protocols.register(impostor)
    assert protocols.get("native") is before
