"""Hand-built G3 frames for tests that must not need spt3g (layout from docs and the notes)."""

from __future__ import annotations

import struct

_TABLE: list[int] = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _TABLE.append(_c)


def reference_crc(data: bytes, crc: int = 0) -> int:
    """spt3g's CRC-32C variant, bit by bit from its definition: a slow reference."""
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc


CODES = {
    "Timepoint": b"T",
    "Scan": b"S",
    "Calibration": b"C",
    "Observation": b"O",
    "Wiring": b"W",
    "Housekeeping": b"H",
    "PipelineInfo": b"P",
    "EndProcessing": b"Z",
    "GcpSlow": b"G",
    "None": b"N",
}


def g3_frame(
    type_: str,
    entries: dict[bytes, bytes] | None = None,
    *,
    little_endian: bool = True,
    crc: int | None = None,
) -> bytes:
    """A G3 frame: header, name/blob pairs, CRC. ``type_`` is a G3 name or an ad-hoc type."""
    order = "<" if little_endian else ">"
    items = list((entries or {}).items())
    code = (
        int.from_bytes(CODES[type_], "little")
        if type_ in CODES
        else int.from_bytes(type_.encode().rjust(4, b"\0"), "big")
    )
    out = bytes([1 if little_endian else 0]) + struct.pack(order + "IiI", 1, len(items), code)
    checked = b""
    for name, blob in items:
        out += (
            struct.pack(order + "Q", len(name)) + name + struct.pack(order + "Q", len(blob)) + blob
        )
        checked += name + blob
    value = reference_crc(checked) if crc is None else crc
    return out + struct.pack(order + "I", value)
