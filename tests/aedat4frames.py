"""Hand-built dv network stream bytes, laid out as dv-processing 2.0.4 writes them (see
shared/notes/aedat4.md, section 1): no dv-processing needed."""

from __future__ import annotations

import struct
from collections.abc import Sequence

LZ4_MAGIC = b"\x04\x22\x4d\x18"


def xml(streams: Sequence[tuple[int, str]], compression: str = "NONE") -> bytes:
    nodes = "".join(
        f'<node name="{sid}" path="/outInfo/{sid}/">'
        f'<attr key="compression" type="string">{compression}</attr>'
        f'<attr key="originalOutputName" type="string">out{sid}</attr>'
        f'<attr key="typeIdentifier" type="string">{type_id}</attr>'
        f'<node name="info" path="/outInfo/{sid}/info/">'
        '<attr key="source" type="string">DVXplorer_test</attr></node></node>'
        for sid, type_id in streams
    )
    return f'<dv version="2.0"><node name="outInfo" path="/outInfo/">{nodes}</node></dv>'.encode()


def ioheader(streams: Sequence[tuple[int, str]] = ((0, "EVTS"),), compression: int = 0) -> bytes:
    """``u32 N`` + an N-byte IOHeader flatbuffer, in the real writer's layout."""
    names = ["NONE", "LZ4", "LZ4_HIGH", "ZSTD", "ZSTD_HIGH"]
    info = xml(streams, names[compression] if compression < len(names) else "?")
    buffer = bytearray()
    buffer += struct.pack("<I", 24) + b"IOHE" + bytes(6)  # root offset, file id, padding
    buffer += struct.pack("<HHHHH", 10, 20, 4, 12, 8)  # vtable at 14
    # table at 24: vtable back-offset, compression, infoNode offset (-> 44), dataTablePosition
    buffer += struct.pack("<iiIq", 10, compression, 12, -1)
    buffer += struct.pack("<I", len(info)) + info + b"\0"
    buffer += bytes(-len(buffer) % 4)
    return struct.pack("<I", len(buffer)) + bytes(buffer)


def body(type_id: str = "EVTS", payload: bytes = b"\x10\x27" + bytes(14)) -> bytes:
    """An uncompressed packet body: a size-prefixed flatbuffer with ``type_id``."""
    inner = struct.pack("<I", 16) + type_id.encode() + payload
    return struct.pack("<I", len(inner)) + inner


def packet(stream_id: int = 0, data: bytes | None = None) -> bytes:
    data = body() if data is None else data
    return struct.pack("<iI", stream_id, len(data)) + data


#: A capture of dv-processing 2.0.4: NetworkWriter with EventStream(0, "events",
#: "DVXplorer_test", (100, 100)), then writeEvents with 1, 2 and 3 events (944 bytes).
REAL_CAPTURE = bytes.fromhex(
    "d402000018000000494f48450000000000000a00140004000c0008000a000000000000000c000000ffffffff"
    "ffffffffa10200003c64762076657273696f6e3d22322e30223e0a202020203c6e6f6465206e616d653d226f"
    "7574496e666f2220706174683d222f6f7574496e666f2f223e0a20202020202020203c6e6f6465206e616d65"
    "3d22302220706174683d222f6f7574496e666f2f302f223e0a2020202020202020202020203c61747472206b"
    "65793d22636f6d7072657373696f6e2220747970653d22737472696e67223e4e4f4e453c2f617474723e0a20"
    "20202020202020202020203c61747472206b65793d226f726967696e616c4d6f64756c654e616d6522207479"
    "70653d22737472696e67223e64762d70726f63657373696e673c2f617474723e0a2020202020202020202020"
    "203c61747472206b65793d226f726967696e616c4f75747075744e616d652220747970653d22737472696e67"
    "223e6576656e74733c2f617474723e0a2020202020202020202020203c61747472206b65793d227479706549"
    "64656e7469666965722220747970653d22737472696e67223e455654533c2f617474723e0a20202020202020"
    "20202020203c6e6f6465206e616d653d22696e666f2220706174683d222f6f7574496e666f2f302f696e666f"
    "2f223e0a202020202020202020202020202020203c61747472206b65793d2273697a65582220747970653d22"
    "696e74223e3130303c2f617474723e0a202020202020202020202020202020203c61747472206b65793d2273"
    "697a65592220747970653d22696e74223e3130303c2f617474723e0a20202020202020202020202020202020"
    "3c61747472206b65793d22736f757263652220747970653d22737472696e67223e445658706c6f7265725f74"
    "6573743c2f617474723e0a2020202020202020202020203c2f6e6f64653e0a20202020202020203c2f6e6f64"
    "653e0a202020203c2f6e6f64653e0a3c2f64763e0a00000000000000300000002c0000001000000045565453"
    "0000060008000400060000000400000001000000102700000000000001000200000000000000000040000000"
    "3c00000010000000455654530000060008000400060000000400000002000000102700000000000001000200"
    "000000001127000000000000010002000000000000000000500000004c000000100000004556545300000600"
    "0800040006000000040000000300000010270000000000000100020000000000112700000000000001000200"
    "0000000012270000000000000100020000000000"
)
