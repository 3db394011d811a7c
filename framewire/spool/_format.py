"""The spool's bytes, sans-IO: records, segment headers, position slots, and the decoder
that cuts a segment's bytes (in any chunking) into records, corrupt regions and a torn tail.

No file access here; :mod:`framewire.spool._queue` does the I/O. The layout is documented
byte by byte in the package docstring (:mod:`framewire.spool`) and in docs/spool.md.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from typing import Final, NamedTuple, TypeAlias

import attrs

from ..frame import Buffer, Frame, FrameKind
from ..protocols.native import NativeEncoder, decode_frame

try:
    from google_crc32c import extend as _crc32c_extend
except ImportError as exc:  # pragma: no cover - a core dependency
    raise ImportError(
        "framewire.spool needs the google-crc32c package (a dependency of framewire): "
        "pip install google-crc32c"
    ) from exc

__all__ = [
    "DEFAULT_MAX_RECORD_SIZE",
    "POSITION_FILE_SIZE",
    "POSITION_SLOT_OFFSETS",
    "RECORD_HEADER_SIZE",
    "SEGMENT_APPENDED",
    "SEGMENT_CARRIED",
    "SEGMENT_HEADER_SIZE",
    "Corrupt",
    "Event",
    "Record",
    "RecordHeader",
    "SegmentDecoder",
    "SegmentHeader",
    "Torn",
    "crc32c",
    "decode_position",
    "encode_position",
    "encode_record",
    "frame_of",
    "parse_record_header",
    "parse_segment_name",
    "segment_name",
]

#: ``0x89 'F' 'W' 'R'``: the start of every record (the high first byte keeps text out).
RECORD_MAGIC: Final = b"\x89FWR"
#: ``0x89 'F' 'W' 'S'``: the start of every segment file.
SEGMENT_MAGIC: Final = b"\x89FWS"
#: ``0x89 'F' 'W' 'P'``: the start of each slot of the position file.
POSITION_MAGIC: Final = b"\x89FWP"
VERSION: Final = 1

#: magic, version, flags, reserved, sequence number, payload length, payload CRC-32C; then
#: the header's own CRC-32C over those 24 bytes.
_RECORD_HEAD: Final = struct.Struct("<4sBBHQII")
#: The same with the header's CRC after it: the whole header in one unpack.
_RECORD_HEAD_AND_CRC: Final = struct.Struct("<4sBBHQIII")
_CRC: Final = struct.Struct("<I")
RECORD_HEADER_SIZE: Final = _RECORD_HEAD.size + 4  # 28
#: Record flags: bit 0 is set for a METADATA frame; bit 1 (a stream history's only, never a
#: queue's) for a BLOCK: DATA frames of one type back to back, without headers, each one
#: sequence number (see :mod:`._history`). Every other bit must be 0, and not both.
FLAG_METADATA: Final = 0x01
FLAG_BLOCK: Final = 0x02
#: The flags a record may have: none, METADATA or BLOCK (never both).
_RECORD_FLAGS: Final = frozenset({0, FLAG_METADATA, FLAG_BLOCK})

#: magic, version, kind, reserved, first sequence number, end sequence number, record count;
#: then a CRC-32C over those 28 bytes.
_SEGMENT_HEAD: Final = struct.Struct("<4sBBHQQI")
SEGMENT_HEADER_SIZE: Final = _SEGMENT_HEAD.size + 4  # 32
#: A segment that records are appended to.
SEGMENT_APPENDED: Final = 0
#: A segment written whole by ``when_full = "drop_oldest"``: the metadata (and frames in
#: flight) kept from the segments it replaces.
SEGMENT_CARRIED: Final = 1

#: magic, version, generation, next sequence number to deliver; then a CRC-32C.
_POSITION: Final = struct.Struct("<4sB3xQQ")
POSITION_SLOT_SIZE: Final = _POSITION.size + 4  # 28
#: The two slots of the position file, each in a 4 KiB block of its own, so that a torn
#: write of one can never damage the other.
POSITION_SLOT_OFFSETS: Final = (0, 4096)
POSITION_FILE_SIZE: Final = 4096 + POSITION_SLOT_SIZE

#: The largest record payload (one frame's native encoding) accepted by default.
DEFAULT_MAX_RECORD_SIZE: Final = 256 * 1024 * 1024
#: The most a record's length field can say.
_LENGTH_LIMIT: Final = 0xFFFF_FFFF
_U64: Final = 0xFFFF_FFFF_FFFF_FFFF
#: How many bytes a decoder that is looking for the next record asks for at a time.
SCAN_CHUNK: Final = 1024 * 1024

_SEGMENT_NAME: Final = re.compile(r"^(\d{20})\.seg$")


def crc32c(data: Buffer, crc: int = 0) -> int:
    """The CRC-32C (Castagnoli) of ``data``, continued from ``crc``.

    google-crc32c takes only ``bytes``: any other buffer is copied first.
    """
    return int(_crc32c_extend(crc, data if type(data) is bytes else bytes(data)))


# -- records --------------------------------------------------------------------------------


class RecordHeader(NamedTuple):
    """A record's header, checked (its CRC matched and its fields are in range). A tuple:
    one is made per record read, and a tuple is the cheapest thing to make."""

    seq: int
    flags: int
    length: int
    payload_crc: int

    @property
    def metadata(self) -> bool:
        return bool(self.flags & FLAG_METADATA)

    @property
    def block(self) -> bool:
        return bool(self.flags & FLAG_BLOCK)

    @property
    def size(self) -> int:
        """The whole record's size: header and payload."""
        return RECORD_HEADER_SIZE + self.length


def pack_record_header(
    seq: int, metadata: bool, length: int, payload_crc: int, *, block: bool = False
) -> bytes:
    flags = (FLAG_METADATA if metadata else 0) | (FLAG_BLOCK if block else 0)
    head = _RECORD_HEAD.pack(RECORD_MAGIC, VERSION, flags, 0, seq, length, payload_crc)
    return head + _CRC.pack(crc32c(head))


def parse_record_header(
    data: Buffer, offset: int = 0, *, max_record_size: int = DEFAULT_MAX_RECORD_SIZE
) -> RecordHeader | None:
    """The record header at ``data[offset:offset + 28]``, or None if those bytes are not a
    valid one: wrong magic, version or flags, a CRC mismatch, or a length over
    ``max_record_size`` (the CRC is checked first, so a valid header's length is what was
    written). ``data`` must hold the 28 bytes."""
    magic, version, flags, reserved, seq, length, payload_crc, check = (
        _RECORD_HEAD_AND_CRC.unpack_from(data, offset)
    )
    if (
        magic != RECORD_MAGIC
        or version != VERSION
        or flags not in _RECORD_FLAGS
        or reserved
        or check != crc32c(bytes(data[offset : offset + _RECORD_HEAD.size]))
    ):
        return None
    if length > max_record_size:
        return None
    return RecordHeader(seq, flags, length, payload_crc)


def encode_record(seq: int, frame: Frame, encoder: NativeEncoder, out: list[Buffer]) -> int:
    """Append the buffers of ``frame``'s record (sequence number ``seq``) to ``out``: its
    header, then its native encoding (``frame.wire`` itself when the frame came off a native
    wire). Returns the record's size. Raises ValueError for a frame the native format cannot
    hold (a type tag over 255 bytes, headers too long); nothing is appended then.

    A :class:`~framewire.frame.FrameBlock` must be split into its frames first.
    """
    parts: list[Buffer] = []
    encoder.encode_into(frame, parts)
    crc = 0
    length = 0
    for part in parts:
        crc = crc32c(part, crc)
        length += part.nbytes if isinstance(part, memoryview) else len(part)
    if length > _LENGTH_LIMIT:
        raise ValueError(f"a record holds at most {_LENGTH_LIMIT} bytes, this one {length}")
    out.append(pack_record_header(seq, frame.kind is FrameKind.METADATA, length, crc))
    out += parts
    return RECORD_HEADER_SIZE + length


@attrs.frozen
class Record:
    """A record whose checksums matched: ``payload`` is one frame's native encoding."""

    seq: int
    metadata: bool
    payload: bytes
    #: Where the record starts in its segment.
    offset: int
    #: A BLOCK record (a history's; its payload is several DATA frames).
    block: bool = False

    @property
    def size(self) -> int:
        return RECORD_HEADER_SIZE + len(self.payload)


@attrs.frozen
class Corrupt:
    """Bytes that hold no valid record, followed by a valid one: skipped, never delivered.
    (A bad segment header is reported as ``Corrupt(0, 32)``.)"""

    offset: int
    size: int


@attrs.frozen
class Torn:
    """Bytes at the end of the input after the last valid record: a record cut short by a
    crash (or damage at the very end, which cannot be told apart from one)."""

    offset: int
    size: int


Event: TypeAlias = Record | Corrupt | Torn


def frame_of(record: Record) -> Frame:
    """The frame a record holds. Raises :class:`~framewire.protocols.ProtocolError` if its
    payload (checksums matched, so it is what was written) is not one native frame, or if
    its kind does not match the record's flags."""
    frame = decode_frame(record.payload)
    if frame.is_metadata != record.metadata:
        from ..protocols import ProtocolError

        raise ProtocolError(f"record {record.seq}: frame kind does not match the record's flags")
    return frame


# -- segments -------------------------------------------------------------------------------


@attrs.frozen
class SegmentHeader:
    """A segment file's first 32 bytes.

    ``first_seq`` is the sequence number in its name. An appended segment has ``end_seq``
    and ``records`` 0 (its records run on to the next segment's first sequence number); a
    carried segment stands for every sequence number in ``[first_seq, end_seq)`` and holds
    ``records`` records of them.
    """

    kind: int
    first_seq: int
    end_seq: int = 0
    records: int = 0

    def pack(self) -> bytes:
        head = _SEGMENT_HEAD.pack(
            SEGMENT_MAGIC, VERSION, self.kind, 0, self.first_seq, self.end_seq, self.records
        )
        return head + _CRC.pack(crc32c(head))

    @classmethod
    def parse(cls, data: Buffer) -> SegmentHeader | None:
        """The header ``data`` starts with, or None if it is not a valid one."""
        if len(data) < SEGMENT_HEADER_SIZE:
            return None
        magic, version, kind, reserved, first, end, records = _SEGMENT_HEAD.unpack_from(data)
        (check,) = _CRC.unpack_from(data, _SEGMENT_HEAD.size)
        if (
            magic != SEGMENT_MAGIC
            or version != VERSION
            or kind not in (SEGMENT_APPENDED, SEGMENT_CARRIED)
            or reserved
            or check != crc32c(bytes(data[: _SEGMENT_HEAD.size]))
        ):
            return None
        return cls(kind, first, end, records)


def segment_name(first_seq: int) -> str:
    """``00000000000000000042.seg``: 20 digits, so names sort as their numbers do."""
    return f"{first_seq:020d}.seg"


def parse_segment_name(name: str) -> int | None:
    """The first sequence number a segment file's name carries, or None if it is not one."""
    match = _SEGMENT_NAME.match(name)
    if match is None:
        return None
    value = int(match.group(1))
    return value if value <= _U64 else None


# -- the position file ----------------------------------------------------------------------


def encode_position(generation: int, next_seq: int) -> bytes:
    """One slot of the position file: the next sequence number to deliver."""
    body = _POSITION.pack(POSITION_MAGIC, VERSION, generation, next_seq)
    return body + _CRC.pack(crc32c(body))


def decode_position(slots: Sequence[Buffer]) -> tuple[int, int] | None:
    """``(generation, next_seq)`` of the newest valid slot, or None if no slot is valid."""
    best: tuple[int, int] | None = None
    for slot in slots:
        if len(slot) < POSITION_SLOT_SIZE:
            continue
        magic, version, generation, next_seq = _POSITION.unpack_from(slot)
        (check,) = _CRC.unpack_from(slot, _POSITION.size)
        if magic != POSITION_MAGIC or version != VERSION:
            continue
        if check != crc32c(bytes(slot[: _POSITION.size])):
            continue
        if best is None or generation > best[0]:
            best = (generation, next_seq)
    return best


# -- the decoder ----------------------------------------------------------------------------


class SegmentDecoder:
    """Cuts a segment's bytes, fed in any chunking, into :class:`Record` s, :class:`Corrupt`
    regions and, at the end, a :class:`Torn` tail.

    ``offset`` is where the first byte fed lies in the segment: 0 (the default) expects the
    segment header first (see :attr:`header`); any other value must be a record boundary.

    A record is delivered only if its header's CRC and its payload's CRC both match, its
    length is within ``max_record_size`` and its sequence number is above the last one
    delivered. Anything else starts a bad region: the decoder looks for the next record
    magic from the byte after the bad record's start (or, when the bad record's header was
    valid and only its payload failed, from the end of that record, whose length is then
    known to be what was written), and reports the region as :class:`Corrupt` when a valid
    record follows it, or as :class:`Torn` when the input ends first.

    Memory: it holds at most one record (``max_record_size`` plus its header) and a scan
    chunk; a length field is trusted only once the header's CRC has matched, and never
    above ``max_record_size``.

    Fast path: :meth:`wanted` says how many bytes the next read should bring. When a
    payload of ``n`` bytes is due and nothing is buffered, ``wanted()`` is ``n``, and a
    ``bytes`` object of exactly ``n`` bytes fed then becomes the record's payload uncopied.
    """

    def __init__(
        self,
        *,
        max_record_size: int = DEFAULT_MAX_RECORD_SIZE,
        offset: int = 0,
        last_seq: int = -1,
    ) -> None:
        if max_record_size <= 0:
            raise ValueError("max_record_size must be positive")
        self.max_record_size = max_record_size
        #: The segment header, once read (None before, or if it was not valid).
        self.header: SegmentHeader | None = None
        self._need_segment_header = offset == 0
        self._buffer = bytearray()
        self._pos = 0  # the next unparsed byte in _buffer
        self._base = offset  # the segment offset of _buffer[0]
        self._pending: RecordHeader | None = None  # a checked header whose payload is due
        self._pending_offset = 0
        self._bad_start: int | None = None
        self._good_end = offset
        self._last_seq = last_seq
        self._ended = False

    @property
    def offset(self) -> int:
        """The segment offset just past the bytes fed so far."""
        return self._base + len(self._buffer)

    @property
    def last_seq(self) -> int:
        """The sequence number of the last record delivered (or the one given, or -1)."""
        return self._last_seq

    @property
    def good_end(self) -> int:
        """The segment offset just past the last valid record (or the segment header, or the
        starting offset): where a torn tail starts."""
        return self._good_end

    def wanted(self) -> int:
        """How many bytes the next read should bring (a hint; any amount may be fed)."""
        buffered = len(self._buffer) - self._pos
        if self._need_segment_header:
            return max(1, SEGMENT_HEADER_SIZE - buffered)
        if self._pending is not None:
            return max(1, self._pending.length - buffered)
        if self._bad_start is not None:
            return SCAN_CHUNK
        return max(1, RECORD_HEADER_SIZE - buffered)

    def feed(self, data: Buffer) -> list[Event]:
        """Decode ``data``, the next bytes of the segment; return what they completed."""
        if self._ended:
            raise RuntimeError("feed() after end_of_input()")
        events: list[Event] = []
        pending = self._pending
        if (
            pending is not None
            and type(data) is bytes
            and len(data) == pending.length
            and self._pos == len(self._buffer)
        ):
            # The fast path: exactly the payload that is due, read into its own object.
            self._base += len(self._buffer) + len(data)
            self._buffer.clear()
            self._pos = 0
            self._pending = None
            self._finish(pending, data, events)
            return events
        self._buffer += data
        self._run(events)
        self._compact()
        return events

    def end_of_input(self) -> list[Event]:
        """The input ended: report what is left after the last valid record as
        :class:`Torn` (nothing if the input ended on a record boundary)."""
        self._ended = True
        end = self.offset
        start = self.good_end
        if self._need_segment_header:
            start = self._base
        self._buffer.clear()
        self._pos = 0
        self._pending = None
        return [Torn(start, end - start)] if end > start else []

    # -- internals --------------------------------------------------------------------------

    def _run(self, events: list[Event]) -> None:
        buffer = self._buffer
        while True:
            available = len(buffer) - self._pos
            if self._need_segment_header:
                if available < SEGMENT_HEADER_SIZE:
                    return
                self.header = SegmentHeader.parse(buffer[self._pos : self._pos + 32])
                self._need_segment_header = False
                if self.header is None:
                    # The records may still be good: look for them after the header.
                    self._bad_start = self._base + self._pos
                self._pos += SEGMENT_HEADER_SIZE
                if self.header is not None:
                    self._good_end = self._base + self._pos
                continue
            pending = self._pending
            if pending is not None:
                if available < pending.length:
                    return
                payload = bytes(buffer[self._pos : self._pos + pending.length])
                self._pos += pending.length
                self._pending = None
                self._finish(pending, payload, events)
                continue
            if available < RECORD_HEADER_SIZE:
                return
            header = parse_record_header(buffer, self._pos, max_record_size=self.max_record_size)
            if header is None or header.seq <= self._last_seq:
                if self._bad_start is None:
                    self._bad_start = self._base + self._pos
                found = buffer.find(RECORD_MAGIC, self._pos + 1)
                if found < 0:
                    # Keep the last 3 bytes: they may be the start of a magic.
                    self._pos = max(self._pos + 1, len(buffer) - (len(RECORD_MAGIC) - 1))
                    return
                self._pos = found
                continue
            self._pending = header
            self._pending_offset = self._base + self._pos
            self._pos += RECORD_HEADER_SIZE

    def _finish(self, header: RecordHeader, payload: bytes, events: list[Event]) -> None:
        start = self._pending_offset
        if crc32c(payload) != header.payload_crc:
            # The header was valid, so the record ends where it says: go on from there.
            if self._bad_start is None:
                self._bad_start = start
            return
        if self._bad_start is not None:
            events.append(Corrupt(self._bad_start, start - self._bad_start))
            self._bad_start = None
        events.append(Record(header.seq, header.metadata, payload, start, header.block))
        self._last_seq = header.seq
        self._good_end = start + header.size

    def _compact(self) -> None:
        if self._pos and (self._pos == len(self._buffer) or self._pos > 1 << 20):
            del self._buffer[: self._pos]
            self._base += self._pos
            self._pos = 0
