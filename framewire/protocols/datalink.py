"""Datalink's wire format (``protocol = "datalink"``), so a Datalink program can be a peer.

Datalink (github.com/out0/datalink, since commit ec8dfd0) frames every message as a 26-byte
header, the payload and a 5-byte footer::

    offset  size  field
    0       5     start marker: 5 x 0x20 (b"     ")
    5       8     payload size N: a C ``long``, signed, native byte order
    13      8     timestamp: a C ``double``, native byte order
    21      5     header end marker: 5 x 0x21 (b"!!!!!")
    26      N     payload
    26+N    5     footer: 5 x 0x22 (the character '"' five times)

A message of size 0 is a **keepalive** (Datalink writes timestamp 1.0): 31 bytes in all. There
is no type field, no metadata and no end-of-stream.

Byte order: Datalink writes its ``long`` and ``double`` in the host's order with the host's
``long`` size. This codec reads and writes them as little-endian 64-bit values, which is what
Datalink produces on 64-bit little-endian Linux (x86-64, arm64); a 32-bit or big-endian
Datalink host is not interoperable (nor, for the same reason, with another Datalink host).

Mapping to frames:

* Every message with a payload becomes a DATA frame of type :data:`TYPE` (``"datalink"``),
  no headers, its payload a view of the message's bytes (kept as ``Frame.wire``, so a
  datalink-to-datalink relay forwards messages untouched).
* Timestamps: Datalink leaves the double's unit to the application; framewire reads it as
  **seconds since the Unix epoch** (what ``time.time()`` gives) and stores nanoseconds
  (:func:`seconds_to_ns`: whole seconds and fraction apart, so no precision is lost). A NaN,
  infinite or out-of-range value (beyond about 292 years from 1970) becomes 0, "unknown".
  A **negative** value is Datalink's "no timestamp" (its error value is -1, and its Python
  ``write(bytes)`` writes -1.0 by default; a real Datalink drops every message below 0): it
  becomes 0 as well, and the message's kept ``wire`` bytes carry 0.0 in its place, so a
  datalink-to-datalink relay never forwards a negative timestamp.
  Writing, nanoseconds become seconds (:func:`ns_to_seconds`); a double holds a present-day
  epoch time to about 0.24 us, so nanoseconds below that are lost. A frame without a
  timestamp (0) or from before 1970 (negative) is written with 0.0, which a real Datalink
  accepts and framewire reads back as "no timestamp"; a negative double is never written.
* Sending a framewire frame over datalink keeps only its payload and timestamp: its kind
  (METADATA arrives as DATA), type tag and headers are lost. A frame with an empty payload
  cannot be sent at all (it would be a keepalive): :meth:`DatalinkEncoder.encode_into`
  raises ValueError for it, and endpoints drop and count such frames.

Errors (each a :class:`ProtocolError`; the connection must be closed): a broken start,
header-end or footer marker (checked as soon as the bytes arrive: Datalink itself skips 26
bytes and hopes), a negative size, and, as :class:`FrameTooLarge`, a size over
``max_frame_size`` (checked on the header, before any allocation).
"""

from __future__ import annotations

import math
import struct
from typing import Final

from ..frame import EMPTY_HEADERS, Buffer, Frame, FrameKind
from ._encoder import FrameEncoder
from ._errors import ProtocolError
from ._framing import LARGE_FRAME, FrameDecoder

__all__ = [
    "FOOTER",
    "HEADER",
    "KEEPALIVE",
    "TYPE",
    "DatalinkDecoder",
    "DatalinkEncoder",
]

PROTOCOL: Final = "datalink"
#: The type tag of every frame decoded from datalink.
TYPE: Final = "datalink"
START: Final = b"\x20" * 5
HEADER_END: Final = b"\x21" * 5
FOOTER: Final = b"\x22" * 5
HEADER: Final = struct.Struct("<5sqd5s")
#: Header plus footer: the bytes a message has on top of its payload.
OVERHEAD: Final = HEADER.size + len(FOOTER)
#: Datalink's keepalive: size 0, timestamp 1.0.
KEEPALIVE: Final = HEADER.pack(START, 0, 1.0, HEADER_END) + FOOTER
_DATA: Final = FrameKind.DATA
#: Seconds beyond which nanoseconds no longer fit a signed 64-bit integer.
_MAX_SECONDS: Final = 9.2e9
#: The timestamp field: where it is in a message, and the value written for "no timestamp".
_TIMESTAMP: Final = struct.Struct("<d")
_TIMESTAMP_AT: Final = 13
_NO_TIMESTAMP: Final = _TIMESTAMP.pack(0.0)


def seconds_to_ns(seconds: float) -> int:
    """Datalink's timestamp (seconds) as nanoseconds; 0 ("no timestamp") for a negative
    value (Datalink's error value), NaN, infinities and overflow.

    Whole seconds and the fraction are converted apart, so no precision is lost to the
    product (``1700000000.25`` gives exactly ``1700000000250000000``).
    """
    if 0.0 <= seconds < _MAX_SECONDS:  # False for NaN
        whole = math.floor(seconds)
        return whole * 1_000_000_000 + round((seconds - whole) * 1e9)
    return 0


def ns_to_seconds(ns: int) -> float:
    """Nanoseconds as Datalink's seconds (a double: about 0.24 us resolution today); 0.0
    for a time before 1970, so a negative timestamp, which a real Datalink drops with its
    message, is never written."""
    if ns <= 0:
        return 0.0
    whole, fraction = divmod(ns, 1_000_000_000)
    return whole + fraction / 1e9


def _without_timestamp(wire: bytes) -> bytes:
    """A copy of ``wire`` (one whole message) with 0.0 in its timestamp field."""
    return wire[:_TIMESTAMP_AT] + _NO_TIMESTAMP + wire[_TIMESTAMP_AT + _TIMESTAMP.size :]


class DatalinkDecoder(FrameDecoder):
    """Decodes Datalink messages. See :class:`FrameDecoder` for the calling convention.

    Keepalives (size 0) are consumed and counted in :attr:`keepalives`. Raises
    :class:`ProtocolError` for a broken marker or a negative size, and
    :class:`FrameTooLarge` when a header announces more than ``max_frame_size`` bytes (the
    whole message, header and footer included).
    """

    protocol = PROTOCOL

    def __init__(self, *, max_frame_size: int, buffer_size: int | None = None) -> None:
        if buffer_size is None:
            super().__init__(max_frame_size=max_frame_size)
        else:
            super().__init__(max_frame_size=max_frame_size, buffer_size=buffer_size)
        #: Keepalive messages seen (they are consumed, not returned).
        self.keepalives = 0

    def _cut(self, frames: list[Frame]) -> None:
        # The hot loop: complete small messages are cut inline; keepalives, large messages,
        # partial ones and errors go through the general path.
        buffer, view = self._buffer, self._view
        start, end = self._start, self._end
        unpack, append = HEADER.unpack_from, frames.append
        limit = min(self.max_frame_size, LARGE_FRAME)
        while end - start >= OVERHEAD:
            marker, size, seconds, header_end = unpack(buffer, start)
            total = OVERHEAD + size
            if (
                size <= 0
                or total > limit
                or total > end - start
                or marker != START
                or header_end != HEADER_END
            ):
                break
            wire = view[start : start + total].tobytes()
            if wire[-5:] != FOOTER:
                break  # the general path reports it
            if seconds < 0.0:
                wire = _without_timestamp(wire)
            timestamp = seconds_to_ns(seconds)
            payload = wire[26:-5] if size <= 512 else memoryview(wire)[26:-5]
            append(Frame(_DATA, TYPE, payload, timestamp, EMPTY_HEADERS, wire, PROTOCOL))
            start += total
        self._start = start
        super()._cut(frames)

    def _measure(self, view: memoryview, start: int, end: int) -> int:
        available = end - start
        if available < HEADER.size:
            prefix = min(available, len(START))
            if view[start : start + prefix] != START[:prefix]:
                raise ProtocolError(
                    f"bad start marker {bytes(view[start : start + prefix])!r}, expected {START!r}"
                )
            if available > 21:
                header_end = bytes(view[start + 21 : end])
                if header_end != HEADER_END[: len(header_end)]:
                    raise ProtocolError(
                        f"bad header end marker {header_end!r}, expected {HEADER_END!r}"
                    )
            return HEADER.size
        marker, size, _, header_end = HEADER.unpack_from(view, start)
        if marker != START:
            raise ProtocolError(f"bad start marker {marker!r}, expected {START!r}")
        if header_end != HEADER_END:
            raise ProtocolError(f"bad header end marker {header_end!r}, expected {HEADER_END!r}")
        if size < 0:
            raise ProtocolError(f"negative message size {size}")
        total: int = OVERHEAD + size
        return total

    def _make_frame(self, wire: bytes | bytearray) -> Frame | None:
        footer = bytes(wire[-5:])
        if footer != FOOTER:
            raise ProtocolError(f"bad footer {footer!r}, expected {FOOTER!r}")
        _, size, seconds, _ = HEADER.unpack_from(wire)
        if size == 0:
            self.keepalives += 1
            return None
        if seconds < 0.0:
            if isinstance(wire, bytearray):  # a large message in its own buffer: in place
                _TIMESTAMP.pack_into(wire, _TIMESTAMP_AT, 0.0)
            else:
                wire = _without_timestamp(wire)
        return Frame(
            _DATA,
            TYPE,
            memoryview(wire)[HEADER.size : -len(FOOTER)],
            seconds_to_ns(seconds),
            EMPTY_HEADERS,
            wire,
            PROTOCOL,
        )


class DatalinkEncoder(FrameEncoder):
    """Encodes frames as Datalink messages: payload and timestamp only (see the module).

    Frames that came off a datalink wire are forwarded as their original bytes. Raises
    ValueError for a frame with an empty payload (Datalink would read it as a keepalive).
    """

    protocol = PROTOCOL

    def encode_into(self, frame: Frame, out: list[Buffer]) -> None:
        wire = frame.wire
        if wire is not None and frame.wire_protocol == PROTOCOL:
            out.append(wire)
            return
        payload = frame.payload
        size = payload.nbytes if isinstance(payload, memoryview) else len(payload)
        if not size:
            raise ValueError("datalink cannot carry an empty payload (it means keepalive)")
        header = HEADER.pack(START, size, ns_to_seconds(frame.timestamp), HEADER_END)
        if size <= 512:
            out.append(header + bytes(payload) + FOOTER)
        else:
            out += (header, payload, FOOTER)

    def keepalive(self) -> bytes:
        return KEEPALIVE
