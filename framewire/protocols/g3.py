"""spt3g's G3 frame stream (``protocol = "g3"``), as G3NetworkSender and G3Reader speak it.

A stream is G3 frames back to back, with no stream header, length field or keepalive. Each
frame (spt3g's ``G3Frame::saves``, a cereal portable-binary archive) is::

    offset size field
    0      1    endian flag: 1 little-endian, 0 big-endian (applies to every integer)
    1      4    G3Frame class version: 1
    5      4    nkeys (signed)
    9      4    frame type: an ASCII code in a u32 ('S' = 0x53 is Scan)
    13     ...  nkeys x (u64 name length, name, u64 blob length, blob)
    end-4  4    CRC: spt3g's CRC-32C variant (register starts at 0, no final XOR) over
                name0, blob0, name1, blob1, ... (the length prefixes excluded)

The decoder finds frame boundaries and the type without decoding any object and without
spt3g; each frame's bytes are kept as ``wire`` and forwarded untouched. A frame's payload is
the whole serialised frame, so a G3 frame relayed through another protocol (native) can be
written out as G3 again. Metadata is every type except Timepoint and Scan. EndProcessing
frames are never passed on: G3NetworkSender does not send them either; a stream ends by
closing the connection at a frame boundary.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Iterable
from typing import Final

from ..frame import EMPTY_HEADERS, Buffer, Frame, FrameKind
from ._encoder import FrameEncoder
from ._errors import ProtocolError
from ._framing import FrameDecoder

__all__ = [
    "DATA_TYPES",
    "TYPE_CODES",
    "G3Decoder",
    "G3Encoder",
    "canonical_type",
    "spt3g_crc",
]

PROTOCOL: Final = "g3"
HEADER_SIZE: Final = 13
#: G3 frame types by name (spt3g's G3Frame::FrameType), with their one-letter codes.
TYPE_CODES: Final = {
    "Timepoint": "T",
    "Housekeeping": "H",
    "Observation": "O",
    "Scan": "S",
    "Map": "M",
    "InstrumentStatus": "I",
    "Wiring": "W",
    "Calibration": "C",
    "GcpSlow": "G",
    "PipelineInfo": "P",
    "Ephemeris": "E",
    "LightCurve": "L",
    "Statistics": "R",
    "EndProcessing": "Z",
    "None": "N",
}
_NAMES_BY_CODE: Final = {ord(code): name for name, code in TYPE_CODES.items()}
_CODES_BY_NAME: Final = {name: ord(code) for name, code in TYPE_CODES.items()}
#: The types a lossy queue may drop and decimation may thin: everything else is metadata.
DATA_TYPES: Final = frozenset({"Timepoint", "Scan"})
END_PROCESSING: Final = "EndProcessing"
_HEADER = {1: struct.Struct("<BIiI"), 0: struct.Struct(">BIiI")}
_LENGTH = {1: struct.Struct("<Q"), 0: struct.Struct(">Q")}
#: More keys than this in one frame is taken as garbage, not data.
MAX_KEYS: Final = 1 << 20


def canonical_type(text: str) -> str:
    """The G3 type name for a name (``"Scan"``) or a one-letter code (``"S"``).

    Raises ValueError naming the known types for anything else.
    """
    if text in TYPE_CODES:
        return text
    if len(text) == 1 and ord(text) in _NAMES_BY_CODE:
        return _NAMES_BY_CODE[ord(text)]
    known = ", ".join(f"{name} ({code})" for name, code in TYPE_CODES.items())
    raise ValueError(f"{text!r} is not a G3 frame type; known: {known}")


def _type_name(code: int) -> str:
    name = _NAMES_BY_CODE.get(code)
    if name is not None:
        return name
    # An ad-hoc type: G3Frame("ABCD") stores up to four characters right-justified.
    text = code.to_bytes(4, "big").lstrip(b"\0")
    if text and all(32 < byte < 127 for byte in text):
        return text.decode("ascii")
    return f"0x{code:08x}"


def _type_code(name: str) -> int:
    code = _CODES_BY_NAME.get(name)
    if code is not None:
        return code
    if name.startswith("0x"):
        return int(name, 16)
    return int.from_bytes(name.encode("ascii").rjust(4, b"\0"), "big")


def spt3g_crc(pieces: Iterable[Buffer]) -> int:
    """spt3g's CRC of the concatenated ``pieces``: CRC-32C, register starting at 0, no final XOR.

    Needs the google-crc32c package (``pip install 'framewire[crc]'``); raises ImportError
    without it.
    """
    import google_crc32c

    # google_crc32c.extend(c, d) is the standard CRC-32C continued from c, so starting from
    # 0xFFFFFFFF and inverting at the end gives the variant with no inversions.
    crc = 0xFFFFFFFF
    for piece in pieces:
        crc = google_crc32c.extend(crc, bytes(piece))
    return crc ^ 0xFFFFFFFF


class G3Decoder(FrameDecoder):
    """Cuts a G3 stream into frames. See :class:`FrameDecoder` for the calling convention.

    Raises :class:`ProtocolError` on a bad endian flag, a class version other than 1, a
    negative or absurd key count, a CRC mismatch (with ``verify_crc``), and
    :class:`FrameTooLarge` as soon as the lengths read so far add up to more than
    ``max_frame_size``, before anything is allocated for the frame.
    """

    protocol = PROTOCOL
    stepwise = True  # _measure walks the length fields: it knows a frame's size only at its end

    def __init__(self, *, max_frame_size: int, verify_crc: bool = False) -> None:
        super().__init__(max_frame_size=max_frame_size)
        self.verify_crc = verify_crc
        if verify_crc:
            spt3g_crc([])  # fail now, not at the first frame, if the CRC package is missing
        #: EndProcessing frames seen and swallowed.
        self.end_processing = 0
        # How far the lengths of the frame being received have been walked: the offset of the
        # next length field and the lengths read. Measuring resumes there, so a frame of many
        # keys arriving in many reads is walked once, not once per read.
        self._walked = HEADER_SIZE
        self._lengths_read = 0
        # With verify_crc the CRC is computed as the bytes arrive (so no frame costs one long
        # pass when it completes): the names and blobs walked whose bytes are not all summed
        # yet, as (start, end) offsets, and the register so far.
        self._unsummed: deque[tuple[int, int]] = deque()
        self._crc = 0xFFFFFFFF
        if verify_crc:
            import google_crc32c

            self._extend = google_crc32c.extend

    def _measure(self, view: memoryview, start: int, end: int) -> int:
        available = end - start
        if available < HEADER_SIZE:
            if available and view[start] > 1:
                raise ProtocolError(f"bad G3 endian flag {view[start]} (expected 0 or 1)")
            return HEADER_SIZE
        flag = view[start]
        if flag > 1:
            raise ProtocolError(f"bad G3 endian flag {flag} (expected 0 or 1)")
        _, version, nkeys, _ = _HEADER[flag].unpack_from(view, start)
        if version != 1:
            raise ProtocolError(f"unsupported G3Frame version {version} (expected 1)")
        if not 0 <= nkeys <= MAX_KEYS:
            raise ProtocolError(f"implausible G3 key count {nkeys}")
        unpack = _LENGTH[flag].unpack_from
        limit = self.max_frame_size
        position, read = self._walked, self._lengths_read
        lengths = 2 * nkeys
        unsummed = self._unsummed if self.verify_crc else None
        try:
            while read < lengths:
                if position + 8 > available:
                    return position + 8
                (size,) = unpack(view, start + position)
                if unsummed is not None and size:
                    unsummed.append((position + 8, position + 8 + size))
                position += 8 + size
                read += 1
                if position > limit:
                    return self._check_size(position)
        finally:
            self._walked, self._lengths_read = position, read
            if unsummed:
                self._sum(view, start, available)
        return position + 4

    def _sum(self, view: memoryview, start: int, available: int) -> None:
        """Extend the CRC over the walked names and blobs, as far as their bytes arrived."""
        unsummed, extend, crc = self._unsummed, self._extend, self._crc
        while unsummed:
            first, end = unsummed[0]
            if first >= available:
                break
            if end > available:
                crc = extend(crc, bytes(view[start + first : start + available]))
                unsummed[0] = (available, end)
                break
            crc = extend(crc, bytes(view[start + first : start + end]))
            unsummed.popleft()
        self._crc = crc

    def _make_frame(self, wire: bytes | bytearray) -> Frame | None:
        self._walked, self._lengths_read = HEADER_SIZE, 0  # the next frame is walked afresh
        flag = wire[0]
        code = _HEADER[flag].unpack_from(wire)[3]
        type_name = _type_name(code)
        if self.verify_crc:
            self._sum(memoryview(wire), 0, len(wire))
            calculated, self._crc = self._crc ^ 0xFFFFFFFF, 0xFFFFFFFF
            recorded = int.from_bytes(wire[-4:], "little" if flag else "big")
            if recorded != calculated:
                raise ProtocolError(
                    f"G3 frame CRC mismatch: recorded 0x{recorded:08x}, "
                    f"calculated 0x{calculated:08x}"
                )
        if type_name == END_PROCESSING:
            self.end_processing += 1
            return None
        kind = FrameKind.DATA if type_name in DATA_TYPES else FrameKind.METADATA
        return Frame(kind, type_name, wire, 0, EMPTY_HEADERS, wire, PROTOCOL)


class G3Encoder(FrameEncoder):
    """Writes frames as a G3 stream.

    A frame that came off a G3 wire is written as its original bytes. Any other frame must
    carry a complete serialised G3 frame as its payload (as G3 frames relayed through the
    native protocol do); it is checked for a valid header and written as is. EndProcessing
    frames are never written. Raises ValueError for a frame that is not G3.
    """

    protocol = PROTOCOL

    def encode_into(self, frame: Frame, out: list[Buffer]) -> None:
        if frame.type == END_PROCESSING:
            return
        wire = frame.wire
        if wire is not None and frame.wire_protocol == PROTOCOL:
            out.append(wire)
            return
        payload = frame.payload
        header = bytes(memoryview(payload)[:HEADER_SIZE])
        if len(header) < HEADER_SIZE or header[0] > 1:
            raise ValueError(f"frame of type {frame.type!r} does not carry a G3 frame")
        _, version, nkeys, _ = _HEADER[header[0]].unpack(header)
        if version != 1 or nkeys < 0:
            raise ValueError(f"frame of type {frame.type!r} does not carry a G3 frame")
        out.append(payload)


def frame_type_code(name: str) -> int:
    """The u32 type code for a G3 type name or ad-hoc type (for building frames in tests)."""
    return _type_code(name)
