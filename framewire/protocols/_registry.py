"""The registry of wire formats by name."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol, runtime_checkable

import attrs

from ..frame import Buffer, Frame
from ._errors import UnknownProtocol
from .aedat4 import HEADER_TYPE as AEDAT4_HEADER_TYPE
from .aedat4 import Aedat4Decoder, Aedat4Encoder
from .aedat4 import canonical_type as aedat4_canonical_type
from .datalink import DatalinkDecoder, DatalinkEncoder
from .g3 import DATA_TYPES as G3_DATA_TYPES
from .g3 import G3Decoder, G3Encoder
from .g3 import canonical_type as g3_canonical_type
from .native import NativeDecoder, NativeEncoder
from .raw import RawDecoder, RawEncoder

__all__ = ["Decoder", "Encoder", "ProtocolSpec", "WholeReadDecoder", "get", "names", "register"]


class Decoder(Protocol):
    """A sans-IO decoder: bytes in, frames out. See :class:`FrameDecoder` for the methods.

    ``get_buffer``/``buffer_updated`` are the fast path (read straight into the decoder's
    buffer); ``feed`` takes any bytes. All raise :class:`ProtocolError` on invalid input.
    """

    protocol: str
    max_frame_size: int
    ended: bool

    def get_buffer(self) -> memoryview: ...
    def buffer_updated(self, nbytes: int, /) -> list[Frame]: ...
    def feed(self, data: Buffer, /) -> list[Frame]: ...
    def end_of_input(self) -> None: ...
    @property
    def buffered(self) -> int: ...
    #: What the frame in progress needs as far as its bytes tell (0: none in progress).
    @property
    def pending_frame_size(self) -> int: ...


@runtime_checkable
class WholeReadDecoder(Decoder, Protocol):
    """A decoder that can also take reads made into new bytes objects (``recv(n)``), so a
    frame's bytes need no buffer of their own and no copy: the I/O side sets
    ``whole_reads``, reads ``whole_read_size()`` bytes when that is not 0 and passes them to
    ``bytes_received`` (else it reads into ``get_buffer()`` as usual). See
    :class:`FrameDecoder` and :class:`~framewire.protocols.raw.RawDecoder`."""

    whole_reads: bool
    #: Whether such a read is worth making only whole (a frame): when the input holds less
    #: than ``whole_read_size()`` so far, the I/O side should read just its start and let
    #: the rest come through ``get_buffer()``. False: take whatever is there (raw).
    wants_whole: bool

    def whole_read_size(self) -> int: ...
    #: From the first bytes the input holds, the size of the frame they start (0: unknown):
    #: what the I/O side may wait for before reading it whole.
    def whole_frame_size(self, head: bytes, /) -> int: ...
    def bytes_received(self, data: bytes, /) -> list[Frame]: ...


class Encoder(Protocol):
    """A sans-IO encoder: frames in, buffers out (header and payload kept apart, no copy).

    Frames whose ``wire_protocol`` is this protocol are written as their original bytes.
    ``keepalive()``/``end_of_stream()`` return the control bytes, or ``b""`` if the protocol
    has none. Raises ValueError for a frame the format cannot carry.
    """

    protocol: str

    def encode(self, frame: Frame, /) -> list[Buffer]: ...
    def encode_batch(self, frames: Iterable[Frame], /) -> list[Buffer]: ...
    def encode_into(self, frame: Frame, out: list[Buffer], /) -> None: ...
    def keepalive(self) -> bytes: ...
    def end_of_stream(self) -> bytes: ...


@attrs.frozen
class ProtocolSpec:
    """What framewire knows about one wire format."""

    name: str
    summary: str
    #: ``make_decoder(max_frame_size)``; protocols with a CRC also take ``verify_crc=True``.
    make_decoder: Callable[..., Decoder]
    make_encoder: Callable[[], Encoder]
    #: When set, the only types that are DATA (droppable, decimatable); every other type is
    #: metadata. None when the kind travels with each frame (as in the native protocol).
    data_types: frozenset[str] | None = None
    #: Maps a type as written in config (a name or a code) to the type tag frames carry;
    #: raises ValueError for an unknown type. None: any string is a type.
    canonical_type: Callable[[str], str] | None = None
    has_keepalive: bool = False
    has_crc: bool = False
    #: Metadata types that open a session: a reader takes exactly one, first (the aedat4
    #: IOHeader). A subscriber that has one gets no identical repeat, and is ended when a
    #: different one replaces it (see :class:`framewire.daemon.stream.Subscription`).
    session_metadata_types: frozenset[str] = frozenset()
    #: Clients of a server only ever listen: a byte from one is a protocol violation and
    #: disconnects it (dv's NetworkWriter does the same).
    listen_only_clients: bool = False


_REGISTRY: dict[str, ProtocolSpec] = {}


def register(spec: ProtocolSpec) -> None:
    """Add a protocol. Raises ValueError if the name is taken."""
    if spec.name in _REGISTRY:
        raise ValueError(f"protocol {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec


def get(name: str) -> ProtocolSpec:
    """The protocol called ``name``. Raises :class:`UnknownProtocol` naming the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise UnknownProtocol(f"unknown protocol {name!r} (known: {known})") from None


def names() -> list[str]:
    return sorted(_REGISTRY)


register(
    ProtocolSpec(
        name="native",
        summary="framewire's own framing: kind, type, timestamp, headers, payload",
        make_decoder=lambda max_frame_size: NativeDecoder(max_frame_size=max_frame_size),
        make_encoder=NativeEncoder,
        has_keepalive=True,
    )
)
register(
    ProtocolSpec(
        name="datalink",
        summary="Datalink's framing: markers, size, timestamp, payload, footer; size 0 keepalive",
        make_decoder=lambda max_frame_size: DatalinkDecoder(max_frame_size=max_frame_size),
        make_encoder=DatalinkEncoder,
        has_keepalive=True,
    )
)
register(
    ProtocolSpec(
        name="raw",
        summary="payload bytes as they come, no framing (netcat-style)",
        make_decoder=lambda max_frame_size: RawDecoder(max_frame_size=max_frame_size),
        make_encoder=RawEncoder,
    )
)
register(
    ProtocolSpec(
        name="g3",
        summary="spt3g G3 frames, as G3NetworkSender and G3Reader speak them",
        make_decoder=lambda max_frame_size, verify_crc=False: G3Decoder(
            max_frame_size=max_frame_size, verify_crc=verify_crc
        ),
        make_encoder=G3Encoder,
        data_types=G3_DATA_TYPES,
        canonical_type=g3_canonical_type,
        has_crc=True,
    )
)
register(
    ProtocolSpec(
        name="aedat4",
        summary="dv-processing's network stream: an IOHeader, then streamId/size/body packets",
        make_decoder=lambda max_frame_size: Aedat4Decoder(max_frame_size=max_frame_size),
        make_encoder=Aedat4Encoder,
        canonical_type=aedat4_canonical_type,
        session_metadata_types=frozenset({AEDAT4_HEADER_TYPE}),
        listen_only_clients=True,
    )
)
