"""dv-processing's network stream (``protocol = "aedat4"``), as NetworkWriter and NetworkReader
speak it over TCP, TLS and UNIX sockets.

One connection carries, little-endian::

    u32 N, then N bytes      the IOHeader: a flatbuffer (file id "IOHE") with the fields
                             compression:int32, dataTablePosition:int64, infoNode:string (XML)
    i32 streamId, u32 size, then size bytes        one packet, repeated until the end

A packet body is a size-prefixed flatbuffer whose 4-character file id (``EVTS``, ``FRME``,
``IMUS``, ``TRIG``...) sits at ``body[8:12]``, or, when the IOHeader declares compression, one
self-contained LZ4 or Zstandard frame. The XML names each stream as ``/outInfo/<streamId>/``
with its ``typeIdentifier``.

Frames:

* the IOHeader is a METADATA frame of type :data:`HEADER_TYPE` (``"IOHeader"``), so a stream
  keeps exactly one (the latest) and replays it first to every new subscriber;
* each packet is a DATA frame whose type is the packet's stream's ``typeIdentifier`` from the
  header (``"EVTS"``; decimation is configured by it) and whose headers are
  ``{"stream_id": "<id>"}``.

Both carry their exact bytes as ``payload`` and ``wire``: a packet is forwarded whole and
untouched (stream id, type id, compression bytes as they came) or dropped whole. The decoder
never decompresses anything.

A dv reader aborts its whole process on a packet that disagrees with the header it was given,
so the decoder checks every packet before it becomes a frame: a stream id the header does not
declare, an uncompressed body whose file id is not the stream's ``typeIdentifier``, or a
compressed body without the declared format's magic number raises :class:`ProtocolError`;
a packet size over ``max_frame_size`` raises :class:`FrameTooLarge` before anything is
allocated for it. The connection must then be closed: nothing of the bad packet is passed on.

There is no keepalive and no end-of-stream marker: a stream ends when the connection closes at
a packet boundary.
"""

from __future__ import annotations

import struct
import xml.etree.ElementTree as ElementTree
from collections.abc import Mapping
from typing import Final

import attrs

from ..frame import EMPTY_HEADERS, Buffer, Frame, FrameKind
from ._encoder import FrameEncoder
from ._errors import ProtocolError
from ._framing import FrameDecoder

__all__ = [
    "COMPRESSION_NAMES",
    "HEADER_TYPE",
    "Aedat4Decoder",
    "Aedat4Encoder",
    "IOHeader",
    "StreamInfo",
    "canonical_type",
    "parse_ioheader",
]

PROTOCOL: Final = "aedat4"
#: The type tag of the IOHeader metadata frame.
HEADER_TYPE: Final = "IOHeader"
#: The IOHeader flatbuffer's file identifier.
HEADER_FILE_ID: Final = b"IOHE"
#: IOHeader compression codes, as the flatbuffer stores them.
COMPRESSION_NAMES: Final = {0: "NONE", 1: "LZ4", 2: "LZ4_HIGH", 3: "ZSTD", 4: "ZSTD_HIGH"}
#: The first bytes of a packet body in each compression (LZ4 frame, Zstandard frame).
_MAGIC: Final = {1: b"\x04\x22\x4d\x18", 2: b"\x04\x22\x4d\x18", 3: b"\x28\xb5\x2f\xfd"}
_MAGIC[4] = _MAGIC[3]
#: An uncompressed body: u32 size prefix, u32 root offset, 4-byte file id, at least.
_MIN_PLAIN_BODY: Final = 12
#: The smallest IOHeader flatbuffer: root offset, file id and a table's vtable offset.
_MIN_HEADER: Final = 12
_PACKET_HEADER = struct.Struct("<iI")
_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_U16 = struct.Struct("<H")
_I64 = struct.Struct("<q")


@attrs.frozen
class StreamInfo:
    """One stream an IOHeader declares: ``/outInfo/<id>/`` in its XML."""

    id: int
    type_identifier: str
    name: str = ""


@attrs.frozen
class IOHeader:
    """What the decoder needs from an IOHeader: the compression and the declared streams."""

    compression: int
    streams: Mapping[int, StreamInfo]

    @property
    def compression_name(self) -> str:
        return COMPRESSION_NAMES[self.compression]


def canonical_type(text: str) -> str:
    """A type as written in config: any packet type id; ``IOHeader`` is metadata.

    Raises ValueError for ``IOHeader``, which is never decimated.
    """
    if text == HEADER_TYPE:
        raise ValueError(
            f"{HEADER_TYPE!r} is the aedat4 stream header: metadata is never decimated"
        )
    return text


# -- the IOHeader flatbuffer -----------------------------------------------------------------


def _field(buffer: memoryview, table: int, index: int) -> int | None:
    """Absolute offset of field ``index`` of the table at ``table``, or None when absent.

    Raises ProtocolError (via IndexError/struct.error at the caller) for offsets outside
    ``buffer``.
    """
    (vtable_back,) = _I32.unpack_from(buffer, table)
    vtable = table - vtable_back
    if not 0 <= vtable <= len(buffer) - 4:
        raise ProtocolError(f"IOHeader vtable offset {vtable} is outside the header")
    (vtable_size,) = _U16.unpack_from(buffer, vtable)
    entry = 4 + 2 * index
    if entry + 2 > vtable_size:
        return None
    (offset,) = _U16.unpack_from(buffer, vtable + entry)
    return table + offset if offset else None


def parse_ioheader(flatbuffer: Buffer) -> IOHeader:
    """Read the compression and the streams out of an IOHeader flatbuffer (without its u32
    size prefix).

    Raises:
        ProtocolError: not an IOHeader (wrong file id, offsets outside the buffer), an unknown
            compression code, XML that does not parse, or no stream with an integer id and a
            ``typeIdentifier`` under ``/outInfo/``.
    """
    buffer = memoryview(flatbuffer).cast("B")
    if len(buffer) < _MIN_HEADER:
        raise ProtocolError(f"IOHeader of {len(buffer)} bytes is too short")
    if bytes(buffer[4:8]) != HEADER_FILE_ID:
        raise ProtocolError(
            f"stream does not start with an IOHeader (file id {bytes(buffer[4:8])!r}, "
            f"expected {HEADER_FILE_ID!r}); is the peer a dv-processing NetworkWriter?"
        )
    try:
        (table,) = _U32.unpack_from(buffer, 0)
        if table > len(buffer) - 4:
            raise ProtocolError(f"IOHeader root offset {table} is outside the header")
        compression = 0
        position = _field(buffer, table, 0)
        if position is not None:
            (compression,) = _I32.unpack_from(buffer, position)
        position = _field(buffer, table, 1)
        if position is not None:
            _I64.unpack_from(buffer, position)  # dataTablePosition: only checked to be there
        position = _field(buffer, table, 2)
        if position is None:
            raise ProtocolError("IOHeader has no infoNode (the XML describing its streams)")
        (relative,) = _U32.unpack_from(buffer, position)
        start = position + relative
        (length,) = _U32.unpack_from(buffer, start)
        if start + 4 + length > len(buffer):
            raise ProtocolError("IOHeader infoNode runs past the end of the header")
        xml = bytes(buffer[start + 4 : start + 4 + length])
    except struct.error as exc:
        raise ProtocolError(f"IOHeader flatbuffer is malformed: {exc}") from None
    if compression not in COMPRESSION_NAMES:
        raise ProtocolError(f"IOHeader declares unknown compression {compression}")
    return IOHeader(compression, _streams_of(xml))


def _streams_of(xml: bytes) -> dict[int, StreamInfo]:
    """The streams under ``/outInfo/`` of the IOHeader's XML. Raises ProtocolError."""
    try:
        root = ElementTree.fromstring(xml.rstrip(b"\0 \t\r\n"))
    except ElementTree.ParseError as exc:
        raise ProtocolError(f"IOHeader XML does not parse: {exc}") from None
    streams: dict[int, StreamInfo] = {}
    for out_info in root.iterfind("node[@name='outInfo']"):
        for node in out_info.iterfind("node"):
            name = node.get("name", "")
            try:
                stream_id = int(name)
            except ValueError:
                raise ProtocolError(f"IOHeader stream id {name!r} is not an integer") from None
            attributes = {attr.get("key"): (attr.text or "") for attr in node.iterfind("attr")}
            type_identifier = attributes.get("typeIdentifier", "")
            if not type_identifier:
                raise ProtocolError(f"IOHeader stream {stream_id} has no typeIdentifier")
            streams[stream_id] = StreamInfo(
                stream_id, type_identifier, attributes.get("originalOutputName", "")
            )
    if not streams:
        raise ProtocolError("IOHeader declares no streams (no node under /outInfo/)")
    return streams


# -- the codec -------------------------------------------------------------------------------


class Aedat4Decoder(FrameDecoder):
    """Cuts a dv network stream into the IOHeader frame and packet frames.

    See the module docstring for the frames and :class:`FrameDecoder` for the calling
    convention. Raises :class:`ProtocolError` for a stream that does not start with a valid
    IOHeader, for a packet that disagrees with the header (unknown stream id, wrong type id,
    wrong compression) and :class:`FrameTooLarge` for a header or packet announcing more
    than ``max_frame_size`` bytes, before allocating anything for it.
    """

    protocol = PROTOCOL

    def __init__(self, *, max_frame_size: int) -> None:
        super().__init__(max_frame_size=max_frame_size)
        #: The connection's IOHeader, once it has arrived.
        self.header: IOHeader | None = None
        self._types: dict[int, str] = {}
        self._headers: dict[int, Mapping[str, str]] = {}
        self._magic: bytes | None = None

    def _measure(self, view: memoryview, start: int, end: int) -> int:
        available = end - start
        if self.header is None:
            if available < 12:
                return 12
            if bytes(view[start + 8 : start + 12]) != HEADER_FILE_ID:
                raise ProtocolError(
                    "stream does not start with an IOHeader (no 'IOHE' file id); is the peer "
                    "a dv-processing NetworkWriter (2019 or newer)?"
                )
            (size,) = _U32.unpack_from(view, start)
            if size < _MIN_HEADER:
                raise ProtocolError(f"IOHeader size {size} is too small to be an IOHeader")
            return 4 + int(size)
        if available < 8:
            return 8
        stream_id, size = _PACKET_HEADER.unpack_from(view, start)
        if stream_id not in self._types:
            declared = ", ".join(map(str, sorted(self._types)))
            raise ProtocolError(
                f"packet for stream id {stream_id}, which the IOHeader does not declare "
                f"(declared: {declared}); a dv reader would abort on it"
            )
        return 8 + int(size)

    def _make_frame(self, wire: bytes | bytearray) -> Frame | None:
        header = self.header
        if header is None:
            header = self.header = parse_ioheader(memoryview(wire)[4:])
            self._types = {sid: info.type_identifier for sid, info in header.streams.items()}
            self._headers = {sid: {"stream_id": str(sid)} for sid in header.streams}
            self._magic = _MAGIC.get(header.compression)
            return Frame(FrameKind.METADATA, HEADER_TYPE, wire, 0, EMPTY_HEADERS, wire, PROTOCOL)
        (stream_id,) = _I32.unpack_from(wire, 0)
        type_identifier = self._types[stream_id]
        magic = self._magic
        if magic is None:
            if len(wire) < 8 + _MIN_PLAIN_BODY:
                raise ProtocolError(
                    f"uncompressed packet of {len(wire) - 8} bytes for stream {stream_id} is "
                    "too short to hold a flatbuffer"
                )
            found = bytes(wire[16:20])
            if found != type_identifier.encode("ascii", "replace"):
                raise ProtocolError(
                    f"packet for stream {stream_id} has type id {found!r}, but the IOHeader "
                    f"declares {type_identifier!r} (uncompressed); a dv reader would abort on it"
                )
        elif bytes(wire[8:12]) != magic:
            raise ProtocolError(
                f"packet for stream {stream_id} does not start with the "
                f"{header.compression_name} magic number the IOHeader declares"
            )
        return Frame(
            FrameKind.DATA,
            type_identifier,
            wire,
            0,
            self._headers[stream_id],
            wire,
            PROTOCOL,
        )


class Aedat4Encoder(FrameEncoder):
    """Writes frames as a dv network stream: each frame's exact bytes.

    A frame that came off an aedat4 wire is written as its original bytes. Any other frame
    (relayed through another protocol, e.g. native) must carry a complete IOHeader (type
    ``IOHeader``: ``u32 N`` and N bytes) or packet (``streamId``, ``size`` and ``size``
    bytes) as its payload; its lengths are checked and it is written as is. Raises
    ValueError for a payload that is neither. It keeps no state: making sure a client gets
    one IOHeader, first, is the stream's job (``session_metadata_types``).
    """

    protocol = PROTOCOL

    def encode_into(self, frame: Frame, out: list[Buffer]) -> None:
        wire = frame.wire
        if wire is not None and frame.wire_protocol == PROTOCOL:
            out.append(wire)
            return
        payload = memoryview(frame.payload).cast("B")
        if len(payload) < 8:
            raise ValueError(f"frame of type {frame.type!r} does not carry an aedat4 frame")
        if frame.type == HEADER_TYPE:
            (size,) = _U32.unpack_from(payload, 0)
            if 4 + size != len(payload) or bytes(payload[8:12]) != HEADER_FILE_ID:
                raise ValueError("IOHeader frame does not carry an aedat4 IOHeader")
        else:
            _, size = _PACKET_HEADER.unpack_from(payload, 0)
            if 8 + size != len(payload):
                raise ValueError(f"frame of type {frame.type!r} does not carry an aedat4 packet")
        out.append(frame.payload)
