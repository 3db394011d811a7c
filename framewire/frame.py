"""The unit that moves through framewire: :class:`Frame`.

A frame is what a codec cuts out of a byte stream and what an endpoint hands to a stream.
Frames are immutable once made and are shared, not copied, between every subscriber of a
stream, so memory is paid once per frame however many clients receive it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import Final, TypeAlias

_type_of = type  # `type` is shadowed by the parameter of that name below

__all__ = ["EMPTY_HEADERS", "Buffer", "Frame", "FrameBlock", "FrameKind", "frame_count"]

#: Anything a frame's bytes may live in. ``memoryview`` slices of a larger buffer are fine.
Buffer: TypeAlias = bytes | bytearray | memoryview

#: Shared empty headers map, so frames without headers do not each allocate one.
EMPTY_HEADERS: Final[Mapping[str, str]] = {}


class FrameKind(enum.IntEnum):
    """Whether a frame is ordinary data or metadata a late joiner needs first.

    DATA frames may be dropped by a lossy subscription under pressure; METADATA frames are
    never dropped, and the latest one of each type is replayed to every new subscriber.
    """

    DATA = 0
    METADATA = 1


class Frame:
    """One frame: kind, protocol type tag, timestamp, headers and payload.

    Attributes:
        kind: :attr:`FrameKind.DATA` or :attr:`FrameKind.METADATA`.
        type: the protocol's type tag, e.g. ``"Scan"`` for G3 or any short string for the
            native protocol. Decimation and the metadata cache are keyed by it.
        timestamp: nanoseconds since the Unix epoch, or 0 when the source gave none.
        headers: a small map of string keys to string values.
        payload: the frame's body (a memoryview must be 1-D bytes). Codecs may make it a
            memoryview slice of :attr:`wire`, so no copy is made.
        wire: the frame exactly as it came off a wire, or ``None`` for frames made in the
            daemon. A server speaking :attr:`wire_protocol` forwards these bytes untouched.
        wire_protocol: the name of the protocol :attr:`wire` is encoded in.

    Frames are compared by value (kind, type, timestamp, headers, payload bytes); ``wire`` is
    not part of equality, so a frame re-encoded in another protocol compares equal.
    """

    __slots__ = (
        "headers",
        "kind",
        "payload",
        "size",
        "timestamp",
        "type",
        "wire",
        "wire_protocol",
    )

    kind: FrameKind
    type: str
    timestamp: int
    headers: Mapping[str, str]
    payload: Buffer
    wire: Buffer | None
    wire_protocol: str | None
    #: Bytes this frame holds in memory: its wire size when it has one, else its payload size.
    #: Queue byte bounds are counted in this unit.
    size: int
    #: How many frames this object stands for: 1, or more for a :class:`FrameBlock`. (A class
    #: attribute, so that ordinary frames pay nothing for it.)
    nframes: int = 1

    def __init__(
        self,
        kind: FrameKind,
        type: str,
        payload: Buffer = b"",
        timestamp: int = 0,
        headers: Mapping[str, str] = EMPTY_HEADERS,
        wire: Buffer | None = None,
        wire_protocol: str | None = None,
    ) -> None:
        # Positional construction is the codecs' hot path: keep this body minimal.
        self.kind = kind
        self.type = type
        self.payload = payload
        self.timestamp = timestamp
        self.headers = headers
        self.wire = wire
        self.wire_protocol = wire_protocol
        held = payload if wire is None else wire
        self.size = held.nbytes if _type_of(held) is memoryview else len(held)

    @property
    def is_metadata(self) -> bool:
        return self.kind is FrameKind.METADATA

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Frame):
            return NotImplemented
        return (
            self.kind == other.kind
            and self.type == other.type
            and self.timestamp == other.timestamp
            and dict(self.headers) == dict(other.headers)
            and bytes(self.payload) == bytes(other.payload)
        )

    __hash__ = None  # type: ignore[assignment]  # mutable-looking, compared by value

    def __repr__(self) -> str:
        headers = f", headers={dict(self.headers)!r}" if self.headers else ""
        return (
            f"Frame({self.kind.name}, {self.type!r}, {_nbytes(self.payload)} bytes, "
            f"timestamp={self.timestamp}{headers})"
        )


class FrameBlock(Frame):
    """Consecutive DATA frames of one type, held as their wire bytes, moving as one object.

    A decoder cuts a block when it is asked to (``FrameDecoder.blocks``) and frames arrive
    back to back: the block's :attr:`wire` is the frames' bytes exactly as received (one copy
    out of the receive buffer, never a view on it), :attr:`nframes` how many frames they
    are, :attr:`type` their common type tag, :attr:`timestamp` the first one's. Its
    :attr:`payload` is empty: a block has no payload of its own.

    A block is never METADATA (metadata travels as single frames, so it reaches the metadata
    cache and is never dropped). Streams hand blocks only to subscribers that write
    :attr:`wire_protocol` as it is and take them whole; every other subscriber gets the frames
    of :meth:`frames`. Counters count :attr:`nframes` frames for a block.
    """

    __slots__ = ("nframes",)

    def __init__(
        self, type: str, wire: bytes, nframes: int, protocol: str, timestamp: int = 0
    ) -> None:
        super().__init__(FrameKind.DATA, type, b"", timestamp, EMPTY_HEADERS, wire, protocol)
        self.nframes = nframes

    def frames(self) -> list[Frame]:
        """The block's frames, each with its own copy of its bytes (so a frame kept in a
        queue holds only itself, not the block). Each protocol that cuts blocks implements
        it in its own subclass (:class:`framewire.protocols.native.NativeBlock`): only that
        protocol knows where its frames' boundaries are."""
        raise NotImplementedError(f"{type(self).__name__} does not say how to split itself")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FrameBlock):
            return NotImplemented
        return (
            self.type == other.type
            and self.nframes == other.nframes
            and self.wire_protocol == other.wire_protocol
            and memoryview(self.wire or b"") == memoryview(other.wire or b"")
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.nframes} {self.type!r} frames, {self.size} bytes "
            f"of {self.wire_protocol})"
        )


def frame_count(frames: Iterable[Frame]) -> int:
    """How many frames ``frames`` stand for (a :class:`FrameBlock` counts its frames)."""
    return sum(frame.nframes for frame in frames)


def _nbytes(buffer: Buffer) -> int:
    return buffer.nbytes if isinstance(buffer, memoryview) else len(buffer)
