"""SLAC Rogue's stream bridge message (``protocol = "rogue"`` on a ``bridge`` endpoint).

Rogue's ``TcpServer``/``TcpClient`` send each frame as one ZeroMQ message of four parts::

    part  size  content
    0     2     flags, uint16, little-endian (Rogue writes host order; x86 and arm64 are LE)
    1     1     channel, uint8
    2     1     error, uint8
    3     N     payload

This module turns such a message into a :class:`Frame` and back. It is pure bytes handling:
no sockets, no trio, no ZeroMQ (the caller hands it the parts of a message it received and
sends the parts it returns). A frame carries the three fields as the headers ``flags``,
``channel`` and ``error`` (decimal strings), so they survive a trip through a stream, the
native protocol or a recorder. Its type tag is ``ch<channel>`` (``"ch0"``..``"ch255"``), so
the latest metadata frame of each channel is what a stream keeps for late joiners; its kind
is METADATA when the channel is one of the configured metadata channels, DATA otherwise.
Rogue frames carry no timestamp: frames decoded here have timestamp 0.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Final

from ..frame import Buffer, Frame, FrameKind
from ._errors import ProtocolError

__all__ = ["HEADER_KEYS", "PARTS", "RogueCodec", "channel_type"]

#: The headers a Rogue frame's fields travel in.
HEADER_KEYS: Final = ("flags", "channel", "error")
#: Parts in one Rogue message, and the sizes of the three fixed ones.
PARTS: Final = 4
_FIELD_SIZES: Final = (2, 1, 1)
_FLAGS: Final = struct.Struct("<H")
_LIMITS: Final = {"flags": 0xFFFF, "channel": 0xFF, "error": 0xFF}
#: Distinct (flags, channel, error) combinations whose headers are cached.
_CACHE_SIZE: Final = 4096


def channel_type(channel: int) -> str:
    """The type tag of frames on Rogue ``channel``."""
    return f"ch{channel}"


def _nbytes(buffer: Buffer) -> int:
    return buffer.nbytes if isinstance(buffer, memoryview) else len(buffer)


class RogueCodec:
    """Decodes Rogue bridge messages into frames and encodes frames into messages.

    ``metadata_channels`` are the channels whose frames are METADATA (never dropped, replayed
    to late joiners). Headers maps and header parts are cached per distinct
    (flags, channel, error), so a steady stream allocates only its payloads.
    """

    def __init__(self, metadata_channels: Iterable[int] = ()) -> None:
        channels = frozenset(metadata_channels)
        for channel in channels:
            if not 0 <= channel <= 0xFF:
                raise ValueError(f"metadata channel {channel} is not a uint8 (0-255)")
        self.metadata_channels = channels
        self._decoded: dict[bytes, tuple[FrameKind, str, Mapping[str, str]]] = {}
        self._encoded: dict[tuple[str | None, str | None, str | None], tuple[bytes, ...]] = {}

    def decode(self, parts: Sequence[Buffer]) -> Frame:
        """The frame in one received message.

        The payload part is used as it is (no copy). An empty payload is a valid frame.

        Raises:
            ProtocolError: not exactly four parts, or the first three not 2, 1 and 1 bytes
                long. Rogue's own receiver drops such messages too; nothing else about a
                message can be wrong.
        """
        if len(parts) != PARTS:
            raise ProtocolError(
                f"a Rogue message has {PARTS} parts (flags, channel, error, payload), "
                f"got {len(parts)}"
            )
        sizes = (_nbytes(parts[0]), _nbytes(parts[1]), _nbytes(parts[2]))
        if sizes != _FIELD_SIZES:
            raise ProtocolError(
                f"Rogue message parts 0-2 must be 2, 1 and 1 bytes long, got "
                f"{sizes[0]}, {sizes[1]} and {sizes[2]}"
            )
        key = bytes(parts[0]) + bytes(parts[1]) + bytes(parts[2])
        known = self._decoded.get(key)
        if known is None:
            (flags,) = _FLAGS.unpack_from(key)
            channel, error = key[2], key[3]
            kind = FrameKind.METADATA if channel in self.metadata_channels else FrameKind.DATA
            headers: Mapping[str, str] = MappingProxyType(
                {"flags": str(flags), "channel": str(channel), "error": str(error)}
            )
            known = (kind, channel_type(channel), headers)
            if len(self._decoded) < _CACHE_SIZE:
                self._decoded[key] = known
        kind, type_tag, headers = known
        return Frame(kind, type_tag, parts[3], 0, headers)

    def encode(self, frame: Frame) -> list[Buffer]:
        """The four parts of the message for ``frame`` (the payload is not copied).

        ``flags``, ``channel`` and ``error`` come from the frame's headers (decimal integers;
        a missing one is 0), so frames from other protocols can be bridged too.

        Raises:
            ValueError: a header that is not a decimal integer in its field's range, or an
                empty payload. Rogue's receiver counts a message part only if it has bytes,
                so an empty payload would make it drop this frame and the one after it.
        """
        if not _nbytes(frame.payload):
            raise ValueError(
                "a frame with an empty payload cannot cross a Rogue bridge "
                "(Rogue's receiver would drop it and the frame after it)"
            )
        headers = frame.headers
        key = (headers.get("flags"), headers.get("channel"), headers.get("error"))
        fields = self._encoded.get(key)
        if fields is None:
            flags, channel, error = (
                _field(name, text) for name, text in zip(HEADER_KEYS, key, strict=True)
            )
            fields = (_FLAGS.pack(flags), bytes((channel,)), bytes((error,)))
            if len(self._encoded) < _CACHE_SIZE:
                self._encoded[key] = fields
        return [fields[0], fields[1], fields[2], frame.payload]


def _field(name: str, text: str | None) -> int:
    if text is None:
        return 0
    limit = _LIMITS[name]
    if not (text.isascii() and text.isdigit()) or int(text) > limit:
        raise ValueError(f"header {name}={text[:20]!r} is not an integer from 0 to {limit}")
    return int(text)
