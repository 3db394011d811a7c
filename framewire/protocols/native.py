"""framewire's native wire format (``protocol = "native"``), specified in docs/protocol.md.

Every frame is a 28-byte little-endian header, the type tag, the headers block and the
payload::

    offset size field
    0      2    magic b"FW"
    2      1    version (1)
    3      1    kind: 0 DATA, 1 METADATA, 0x80 KEEPALIVE, 0x81 END_OF_STREAM
    4      1    type length T (bytes of UTF-8)
    5      1    flags (0 in version 1)
    6      2    header count N
    8      4    headers block length H
    12     8    payload length P
    20     8    timestamp, signed nanoseconds since the Unix epoch
    28     T    type, UTF-8
    28+T   H    N x (u8 key length, u16 value length, key UTF-8, value UTF-8)
    28+T+H P    payload

Control frames (KEEPALIVE, END_OF_STREAM) carry no type, headers or payload.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Final

from ..frame import EMPTY_HEADERS, Buffer, Frame, FrameBlock, FrameKind
from ._encoder import FrameEncoder
from ._errors import ProtocolError
from ._framing import LARGE_FRAME, MAX_RECEIVE_BUFFER, FrameDecoder

__all__ = [
    "HEADER",
    "KIND_END_OF_STREAM",
    "KIND_KEEPALIVE",
    "KIND_NOTICE",
    "KIND_REQUEST",
    "MAGIC",
    "MAX_BLOCK_BYTES",
    "MAX_BLOCK_FRAMES",
    "VERSION",
    "NativeBlock",
    "NativeDecoder",
    "NativeEncoder",
    "Notice",
    "decode_frame",
    "encode_control",
    "parse_control",
]

PROTOCOL: Final = "native"
MAGIC: Final = b"FW"
VERSION: Final = 1
HEADER: Final = struct.Struct("<2sBBBBHIQq")
KIND_KEEPALIVE: Final = 0x80
KIND_END_OF_STREAM: Final = 0x81
#: A client's request to a server (rewind, gap frames): the first frame a client sends.
KIND_REQUEST: Final = 0x82
#: A server's notice to a client that asked for one (rewind's answer, a gap).
KIND_NOTICE: Final = 0x83
#: The largest request or notice accepted (they carry a few short headers).
MAX_CONTROL_SIZE: Final = 4096
_HEADER_ENTRY: Final = struct.Struct("<BH")
_MAX_KEY: Final = 0xFF
_MAX_VALUE: Final = 0xFFFF
_MAX_HEADERS: Final = 0xFFFF
_FRAME_KINDS: Final = (FrameKind.DATA, FrameKind.METADATA)
_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
#: A header read for block cutting: magic + version + kind, type length, flags + header
#: count + headers length (all zero in a block), payload length.
_BLOCK_HEAD: Final = struct.Struct("<4sB7sQ")
_DATA_PREFIX: Final = MAGIC + bytes((VERSION, 0))
_NO_EXTRAS: Final = bytes(7)
#: Header bytes that must be equal in every frame of a uniform run (all but the timestamp).
_FIXED_HEADER: Final = 20
#: The most frames and bytes one :class:`NativeBlock` holds, so that a lossy queue drops at
#: most this much at once and a block is small beside any queue that takes it whole.
MAX_BLOCK_FRAMES: Final = 128
MAX_BLOCK_BYTES: Final = MAX_RECEIVE_BUFFER
#: The fewest frames worth a block (a shorter run is decoded frame by frame).
_FEWEST_BLOCK_FRAMES: Final = 4
#: The most frames decoded one by one between two tries to cut a block.
_MOST_BLOCK_BACKOFF: Final = 63
#: Frames alike (but for their timestamps) checked one by one before the rest of their run
#: is checked column by column.
_FIRST_RUN: Final = 8


def _control(kind: int) -> bytes:
    return HEADER.pack(MAGIC, VERSION, kind, 0, 0, 0, 0, 0, 0)


KEEPALIVE: Final = _control(KIND_KEEPALIVE)
END_OF_STREAM: Final = _control(KIND_END_OF_STREAM)


class NativeDecoder(FrameDecoder):
    """Decodes the native format. See :class:`FrameDecoder` for the calling convention.

    Raises :class:`ProtocolError` on a bad magic, an unknown version, kind or flag, an
    inconsistent headers block, non-UTF-8 text, or bytes after END_OF_STREAM;
    :class:`FrameTooLarge` when a header announces more than ``max_frame_size`` bytes in all.
    """

    protocol = PROTOCOL

    def __init__(self, *, max_frame_size: int, buffer_size: int | None = None) -> None:
        if buffer_size is None:
            super().__init__(max_frame_size=max_frame_size)
        else:
            super().__init__(max_frame_size=max_frame_size, buffer_size=buffer_size)
        #: Keepalive frames seen (they are consumed, not returned).
        self.keepalives = 0
        #: Whether NOTICE frames are accepted: each is returned in its place among the
        #: frames, as a :class:`Notice`. False by default (a peer that did not ask for
        #: notices sends none): a NOTICE is then an unknown kind.
        self.accept_notices = False
        self._types: dict[bytes, str] = {}
        # Block cutting: frames to decode one by one before the next try, and the current
        # step between tries (it doubles while tries fail).
        self._block_wait = 0
        self._block_backoff = 0

    def _cut(self, frames: list[Frame]) -> None:
        # The hot loop: ordinary DATA/METADATA frames without headers that fit the receive
        # buffer are cut inline (DATA frames back to back as blocks, when asked for); anything
        # else goes through the general path.
        buffer, view = self._buffer, self._view
        start, end = self._start, self._end
        unpack, append, types = HEADER.unpack_from, frames.append, self._types
        limit = min(self.max_frame_size, LARGE_FRAME)
        kinds = _FRAME_KINDS
        blocks, wait, backoff = self.blocks, self._block_wait, self._block_backoff
        while end - start >= 28 and not self.ended:
            magic, version, kind, type_len, flags, count, headers_len, payload_len, timestamp = (
                unpack(buffer, start)
            )
            total = 28 + type_len + headers_len + payload_len
            if (
                magic != MAGIC
                or version != VERSION
                or flags
                or kind > 1
                or count
                or headers_len
                or total > limit
            ):
                break  # headers, control frames, large frames and errors: the general path
            if total > end - start:
                break
            body = 28 + type_len
            if blocks and not kind and end - start - total >= 28:
                if wait:
                    wait -= 1
                else:
                    type_raw = view[start + 28 : start + body].tobytes()
                    type_tag = types.get(type_raw)
                    if type_tag is None:
                        type_tag = self._type_tag(type_raw)
                    stop, count = self._block_end(start, end, total, type_raw, limit)
                    if count >= _FEWEST_BLOCK_FRAMES:
                        wire_block = view[start:stop].tobytes()
                        append(NativeBlock(type_tag, wire_block, count, timestamp))
                        start = stop
                        backoff = 0
                        continue
                    # No block here (or too short a one to pay for itself): try again after
                    # 1, 3, 7, ... frames, so a stream whose frames seldom come in runs pays
                    # almost nothing for trying.
                    wait = backoff = min(2 * backoff + 1, _MOST_BLOCK_BACKOFF)
            wire = view[start : start + total].tobytes()
            type_tag = types.get(wire[28:body])
            if type_tag is None:
                type_tag = self._type_tag(wire[28:body])
            # A tiny payload is cheaper to copy than to view; larger ones are viewed.
            payload = wire[body:] if payload_len <= 512 else memoryview(wire)[body:]
            append(Frame(kinds[kind], type_tag, payload, timestamp, EMPTY_HEADERS, wire, PROTOCOL))
            start += total
        self._start = start
        self._block_wait, self._block_backoff = wait, backoff
        super()._cut(frames)

    def _block_end(
        self, start: int, end: int, first: int, type_raw: bytes, limit: int
    ) -> tuple[int, int]:
        """Where a block that starts with the complete ``first``-byte DATA frame at ``start``
        ends, and how many frames it holds: the frames after it that are complete, DATA, of
        the same type, without headers or flags, within ``limit`` bytes each and within
        :data:`MAX_BLOCK_FRAMES` / :data:`MAX_BLOCK_BYTES` in all.

        Frames are checked one by one; once :data:`_FIRST_RUN` frames in a row are alike but
        for their timestamps, the rest of that run is checked a header byte at a time across
        all of it (one strided slice per byte, no Python step per frame). A frame that fails
        a check ends the block; the ordinary path then decodes it (and refuses it if bad).
        """
        buffer = self._buffer
        stop = min(end, start + MAX_BLOCK_BYTES)
        type_len = len(type_raw)
        unpack = _BLOCK_HEAD.unpack_from
        position = start + first
        count = 1
        alike = True  # every frame so far is ``first`` bytes long (and so alike)
        while count < MAX_BLOCK_FRAMES and stop - position >= 28:
            if alike and count == _FIRST_RUN:
                most = min((stop - start) // first, MAX_BLOCK_FRAMES)
                count = _uniform_run(buffer, start, first, most, 28 + type_len)
                position = start + count * first
                alike = False
                continue
            prefix, length, extras, payload_len = unpack(buffer, position)
            if (
                prefix != _DATA_PREFIX
                or length != type_len
                or extras != _NO_EXTRAS
                or not buffer.startswith(type_raw, position + 28)
            ):
                break
            total = 28 + type_len + payload_len
            if total > limit or total > stop - position:
                break
            alike = alike and total == first
            position += total
            count += 1
        return position, count

    def _type_tag(self, raw: bytes) -> str:
        try:
            tag = raw.decode()
        except UnicodeDecodeError:
            raise ProtocolError("frame type is not valid UTF-8") from None
        if len(self._types) < 1024:
            self._types[raw] = tag
        return tag

    def _measure(self, view: memoryview, start: int, end: int) -> int:
        if end - start < 28:
            if view[start : min(end, start + 2)] != MAGIC[: min(end - start, 2)]:
                raise ProtocolError(f"bad magic {bytes(view[start : start + 2])!r}, expected b'FW'")
            return 28
        magic, version, kind, type_len, flags, _, headers_len, payload_len, _ = HEADER.unpack_from(
            view, start
        )
        if magic != MAGIC:
            raise ProtocolError(f"bad magic {magic!r}, expected b'FW'")
        if version != VERSION:
            raise ProtocolError(f"unsupported native protocol version {version} (speaks 1)")
        if flags:
            raise ProtocolError(f"unknown flags 0x{flags:02x}")
        if (
            kind > 1
            and kind not in (KIND_KEEPALIVE, KIND_END_OF_STREAM)
            and (kind != KIND_NOTICE or not self.accept_notices)
        ):
            raise ProtocolError(f"unknown frame kind 0x{kind:02x}")
        total: int = 28 + type_len + headers_len + payload_len
        if kind == KIND_NOTICE and total > MAX_CONTROL_SIZE:
            raise ProtocolError(f"a notice of {total} bytes (at most {MAX_CONTROL_SIZE})")
        return total

    def _make_frame(self, wire: bytes | bytearray) -> Frame | None:
        _, _, kind, type_len, _, count, headers_len, _, timestamp = HEADER.unpack_from(wire)
        if kind == KIND_NOTICE and self.accept_notices:
            return Notice(parse_control(wire, KIND_NOTICE))
        if kind > 1:
            if len(wire) != 28 or count:
                raise ProtocolError("a control frame must have no type, headers or payload")
            if kind == KIND_KEEPALIVE:
                self.keepalives += 1
            else:
                self.ended = True
            return None
        view = memoryview(wire)
        body = 28 + type_len
        type_tag = self._type_tag(bytes(view[28:body]))
        headers = (
            _decode_headers(view, body, body + headers_len, count)
            if headers_len or count
            else EMPTY_HEADERS
        )
        return Frame(
            _FRAME_KINDS[kind],
            type_tag,
            view[body + headers_len :],
            timestamp,
            headers,
            wire,
            PROTOCOL,
        )


def _uniform_run(buffer: bytearray, start: int, stride: int, most: int, header_end: int) -> int:
    """How many of the ``most`` slots of ``stride`` bytes from ``start`` hold frames whose
    header (but for the timestamp) and type bytes equal the first frame's, counted from the
    first: each such frame is ``stride`` bytes long, so the next one starts where its slot
    does. Every slot must lie within ``buffer``."""
    span = start + most * stride
    run = most
    for offset in (*range(_FIXED_HEADER), *range(28, header_end)):
        column = buffer[start + offset : span : stride]
        if column.count(column[0]) != most:
            run = min(run, most - len(column.lstrip(column[:1])))
            if run == 1:
                break
    return run


class NativeBlock(FrameBlock):
    """Native DATA frames of one type, back to back, without headers (see
    :class:`FrameBlock`). Cut only by :class:`NativeDecoder`, which has checked every frame."""

    __slots__ = ()

    def __init__(self, type: str, wire: bytes, nframes: int, timestamp: int = 0) -> None:
        super().__init__(type, wire, nframes, PROTOCOL, timestamp)

    def frames(self) -> list[Frame]:
        wire = self.wire
        assert isinstance(wire, bytes)
        frames: list[Frame] = []
        append = frames.append
        unpack = HEADER.unpack_from
        type_tag = self.type
        position, end = 0, len(wire)
        while position < end:
            _, _, _, type_len, _, _, _, payload_len, timestamp = unpack(wire, position)
            body = 28 + type_len
            total = body + payload_len
            one = wire[position : position + total]
            payload = one[body:] if payload_len <= 512 else memoryview(one)[body:]
            append(
                Frame(FrameKind.DATA, type_tag, payload, timestamp, EMPTY_HEADERS, one, PROTOCOL)
            )
            position += total
        return frames


def decode_frame(wire: bytes | bytearray) -> Frame:
    """The DATA or METADATA frame whose complete encoding is exactly ``wire``.

    For containers that hold one frame per record (the disk spool): ``wire`` becomes the
    frame's :attr:`~Frame.wire` and its payload a view of it (a copy when it is small), as
    :class:`NativeDecoder` makes them. Raises :class:`ProtocolError` for anything that is not
    exactly one valid DATA or METADATA frame (control frames included).
    """
    if len(wire) < 28:
        raise ProtocolError(f"{len(wire)} bytes cannot hold a frame (its header is 28)")
    magic, version, kind, type_len, flags, count, headers_len, payload_len, timestamp = (
        HEADER.unpack_from(wire)
    )
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}, expected b'FW'")
    if version != VERSION:
        raise ProtocolError(f"unsupported native protocol version {version} (speaks 1)")
    if flags:
        raise ProtocolError(f"unknown flags 0x{flags:02x}")
    if kind > 1:
        raise ProtocolError(f"frame kind 0x{kind:02x} is not DATA or METADATA")
    body = 28 + type_len
    if body + headers_len + payload_len != len(wire):
        raise ProtocolError(
            f"frame header announces {body + headers_len + payload_len} bytes, have {len(wire)}"
        )
    try:
        type_tag = bytes(wire[28:body]).decode()
    except UnicodeDecodeError:
        raise ProtocolError("frame type is not valid UTF-8") from None
    view = memoryview(wire)
    headers = (
        _decode_headers(view, body, body + headers_len, count)
        if headers_len or count
        else EMPTY_HEADERS
    )
    start = body + headers_len
    payload: Buffer = bytes(view[start:]) if payload_len <= 512 else view[start:]
    return Frame(_FRAME_KINDS[kind], type_tag, payload, timestamp, headers, wire, PROTOCOL)


class Notice(Frame):
    """A NOTICE frame a server sent, in its place among the frames (only from a decoder
    with :attr:`NativeDecoder.accept_notices`): ``what`` (its ``notice`` header:
    ``rewind``, ``refused``, ``gap``) and all its :attr:`headers`. Never published into a
    stream: it is for the client that asked."""

    __slots__ = ("what",)

    def __init__(self, headers: Mapping[str, str]) -> None:
        super().__init__(FrameKind.DATA, "", b"", 0, dict(headers))
        self.what = self.headers.get("notice", "")

    def __repr__(self) -> str:
        return f"Notice({dict(self.headers)!r})"


def encode_control(kind: int, headers: Mapping[str, str]) -> bytes:
    """A REQUEST or NOTICE frame: no type or payload, ``headers`` only. Raises ValueError
    for another kind or headers over :data:`MAX_CONTROL_SIZE` in all."""
    if kind not in (KIND_REQUEST, KIND_NOTICE):
        raise ValueError(f"kind 0x{kind:02x} is not REQUEST or NOTICE")
    block = encode_headers(headers)
    if 28 + len(block) > MAX_CONTROL_SIZE:
        raise ValueError(f"a control frame of {28 + len(block)} bytes (at most {MAX_CONTROL_SIZE})")
    return HEADER.pack(MAGIC, VERSION, kind, 0, 0, len(headers), len(block), 0, 0) + block


def control_size(head: Buffer) -> int | None:
    """From the first 28 bytes a peer sent: the size of the REQUEST (or NOTICE) frame they
    start, or None if they start something else (an old client's bytes, a data frame).
    Raises :class:`ProtocolError` for a control frame over :data:`MAX_CONTROL_SIZE`."""
    magic, version, kind, type_len, flags, _, headers_len, payload_len, _ = HEADER.unpack_from(head)
    if magic != MAGIC or version != VERSION or kind not in (KIND_REQUEST, KIND_NOTICE):
        return None
    total: int = 28 + type_len + headers_len + payload_len
    if flags or total > MAX_CONTROL_SIZE:
        raise ProtocolError(f"a control frame of {total} bytes (at most {MAX_CONTROL_SIZE})")
    return total


def parse_control(wire: Buffer, kind: int) -> dict[str, str]:
    """The headers of the complete REQUEST or NOTICE frame ``wire`` (of ``kind``). Raises
    :class:`ProtocolError` for anything else: another kind, a type or payload, bad headers."""
    view = memoryview(wire)
    if len(view) < 28:
        raise ProtocolError("a control frame is at least 28 bytes")
    magic, version, got, type_len, flags, count, headers_len, payload_len, _ = HEADER.unpack_from(
        view
    )
    if magic != MAGIC or version != VERSION or flags or got != kind:
        raise ProtocolError(f"expected a control frame of kind 0x{kind:02x}")
    if type_len or payload_len or 28 + headers_len != len(view):
        raise ProtocolError("a control frame carries headers only")
    return _decode_headers(view, 28, 28 + headers_len, count)


def _decode_headers(view: memoryview, start: int, end: int, count: int) -> dict[str, str]:
    headers: dict[str, str] = {}
    position = start
    try:
        for _ in range(count):
            if position + 3 > end:
                raise ProtocolError("headers block shorter than its header count says")
            key_len, value_len = _HEADER_ENTRY.unpack_from(view, position)
            position += 3
            if position + key_len + value_len > end:
                raise ProtocolError("header entry runs past the headers block")
            key = view[position : position + key_len].tobytes().decode()
            position += key_len
            headers[key] = view[position : position + value_len].tobytes().decode()
            position += value_len
    except UnicodeDecodeError:
        raise ProtocolError("header key or value is not valid UTF-8") from None
    if position != end:
        raise ProtocolError("headers block longer than its entries")
    if len(headers) != count:
        raise ProtocolError("duplicate header key")
    return headers


def encode_headers(headers: Mapping[str, str]) -> bytes:
    """The headers block for ``headers``. Raises ValueError for keys or values too long."""
    if len(headers) > _MAX_HEADERS:
        raise ValueError(f"too many headers ({len(headers)}, at most {_MAX_HEADERS})")
    parts: list[bytes] = []
    for key, value in headers.items():
        k, v = key.encode(), value.encode()
        if len(k) > _MAX_KEY or len(v) > _MAX_VALUE:
            raise ValueError(f"header {key!r} too long (key <= 255, value <= 65535 bytes)")
        parts += (_HEADER_ENTRY.pack(len(k), len(v)), k, v)
    return b"".join(parts)


class NativeEncoder(FrameEncoder):
    """Encodes frames in the native format.

    Frames that came off a native wire are forwarded as their original bytes. Raises
    ValueError for a type tag over 255 bytes or headers that do not fit the format.
    """

    protocol = PROTOCOL

    def encode_into(self, frame: Frame, out: list[Buffer]) -> None:
        wire = frame.wire
        if wire is not None and frame.wire_protocol == PROTOCOL:
            out.append(wire)
            return
        type_tag = frame.type.encode()
        if len(type_tag) > 255:
            raise ValueError(f"frame type {frame.type[:40]!r}... is over 255 bytes")
        headers = frame.headers
        block = encode_headers(headers) if headers else b""
        payload = frame.payload
        payload_len = payload.nbytes if isinstance(payload, memoryview) else len(payload)
        if not _INT64_MIN <= frame.timestamp <= _INT64_MAX:
            raise ValueError(f"timestamp {frame.timestamp} does not fit a signed 64-bit integer")
        out.append(
            HEADER.pack(
                MAGIC,
                VERSION,
                int(frame.kind),
                len(type_tag),
                0,
                len(headers),
                len(block),
                payload_len,
                frame.timestamp,
            )
            + type_tag
            + block
        )
        if payload_len:
            out.append(payload)

    def keepalive(self) -> bytes:
        return KEEPALIVE

    def end_of_stream(self) -> bytes:
        return END_OF_STREAM
