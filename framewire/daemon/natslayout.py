"""How framewire frames are laid out as NATS messages: subjects, headers, chunks.

Pure code: no trio, no asyncio, no nats-py. The NATS endpoint (:mod:`.endpoints.nats`) maps
frames to :class:`NatsMessage` with :class:`FrameLayout` and back with :class:`FrameAssembler`.
The layout is documented for other NATS clients in ``docs/protocol.md`` ("framewire over
NATS"); in short:

Subjects
    ``SUBJECT.data.TYPE`` for DATA frames and ``SUBJECT.meta.TYPE`` for METADATA frames,
    where ``SUBJECT`` is the configured prefix (``fw.STREAM`` by default) and ``TYPE`` the
    frame's type as one subject token: every character outside ``[A-Za-z0-9_-]`` is
    percent-encoded as UTF-8 (``%2E`` for a dot); an empty type is the token ``%``.
Headers
    ``Fw-Kind`` (``data`` or ``metadata``), ``Fw-Type`` (the type), ``Fw-Ts`` (timestamp,
    integer nanoseconds), ``Fw-Rank`` (metadata only: the first-seen index of its type at the
    publisher, so a late joiner can replay metadata in framewire's order) and ``Fw-H-KEY`` for
    each frame header. Header values (and ``Fw-Type``) are percent-encoded where they hold
    ``%``, spaces, control or non-ASCII characters, so NATS's trimming of header values cannot
    change them; header keys are percent-encoded outside ``[A-Za-z0-9_.-]``. JetStream
    publishes add ``Nats-Msg-Id`` (``PRODUCER-N``, the same on every retry) and, on every
    message but the first of an in-flight window, ``Nats-Expected-Last-Msg-Id`` (the id of
    the message before it), so the server refuses a message whose predecessor was refused:
    the stream keeps the publisher's order.
Chunks
    A frame whose payload is over the chunk limit goes as consecutive messages on the same
    subject, each with every header above plus ``Fw-Chunk: I/N`` (1-based) and ``Fw-Size``
    (the whole payload's length). Only DATA frames are chunked: a metadata frame lives in a
    last-value store that keeps one message per subject, so it must fit one message.

Decoding refuses (:class:`NotAFrame`) a message that lacks ``Fw-Kind``/``Fw-Type``/``Fw-Ts``,
has values out of range, or chunks that are out of order; the assembler then drops only the
frame the bad chunk belonged to.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final
from urllib.parse import quote, unquote

import attrs

from ..frame import EMPTY_HEADERS, Buffer, Frame, FrameKind

__all__ = [
    "HEADER_CHUNK",
    "HEADER_EXPECTED_LAST_MSG_ID",
    "HEADER_KIND",
    "HEADER_MSG_ID",
    "HEADER_RANK",
    "HEADER_SIZE",
    "HEADER_TS",
    "HEADER_TYPE",
    "FrameAssembler",
    "FrameLayout",
    "NatsMessage",
    "NotAFrame",
    "escape_token",
    "header_bytes",
    "unescape_token",
]

HEADER_KIND: Final = "Fw-Kind"
HEADER_TYPE: Final = "Fw-Type"
HEADER_TS: Final = "Fw-Ts"
HEADER_RANK: Final = "Fw-Rank"
HEADER_CHUNK: Final = "Fw-Chunk"
HEADER_SIZE: Final = "Fw-Size"
HEADER_PREFIX: Final = "Fw-H-"
HEADER_MSG_ID: Final = "Nats-Msg-Id"
HEADER_EXPECTED_LAST_MSG_ID: Final = "Nats-Expected-Last-Msg-Id"

_KINDS: Final = {"data": FrameKind.DATA, "metadata": FrameKind.METADATA}
_KIND_NAMES: Final = {FrameKind.DATA: "data", FrameKind.METADATA: "metadata"}
_TOKEN: Final = re.compile(r"[A-Za-z0-9_-]+")
_TOKEN_CHARACTERS: Final = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
)
# quote() never escapes letters, digits and "_.-~"; "~" is a valid header key character too.
_KEY_SAFE: Final = ""
# Printable ASCII except space and '%': kept as is in header values.
_VALUE_SAFE: Final = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "%")
_CHUNK: Final = re.compile(r"([1-9][0-9]{0,8})/([1-9][0-9]{0,8})")
_DIGITS: Final = re.compile(r"[0-9]{1,20}")
#: Kinds and types whose subject and fixed headers a layout remembers.
_TYPE_CACHE: Final = 1024
#: Bytes a message's header block takes besides its lines (``NATS/1.0\r\n`` ... ``\r\n``).
_HEADER_FRAMING: Final = 12


def escape_token(type_tag: str) -> str:
    """``type_tag`` as one NATS subject token (see the module docstring)."""
    if not type_tag:
        return "%"
    if _TOKEN.fullmatch(type_tag):
        return type_tag
    return "".join(
        chr(byte) if chr(byte) in _TOKEN_CHARACTERS else f"%{byte:02X}"
        for byte in type_tag.encode()
    )


def unescape_token(token: str) -> str:
    """The inverse of :func:`escape_token`."""
    return "" if token == "%" else unquote(token, errors="strict")


def _value(text: str) -> str:
    return quote(text, safe=_VALUE_SAFE)


def header_bytes(headers: Mapping[str, str]) -> int:
    """Bytes the header block of a message with ``headers`` takes on the wire."""
    return _HEADER_FRAMING + sum(len(k) + len(v.encode()) + 4 for k, v in headers.items())


@attrs.define(slots=True)
class NatsMessage:
    """One message to publish: subject, headers, payload."""

    subject: str
    headers: dict[str, str]
    payload: Buffer

    @property
    def size(self) -> int:
        """Bytes on the wire that count against ``max_payload``: headers and payload."""
        payload = self.payload
        nbytes = payload.nbytes if isinstance(payload, memoryview) else len(payload)
        return nbytes + header_bytes(self.headers)


class NotAFrame(ValueError):
    """A NATS message that is not (part of) a framewire frame; the message says why."""


class FrameLayout:
    """Frames to messages for one publisher.

    ``subject`` is the prefix; ``producer`` names this publisher in ``Nats-Msg-Id`` (make it
    unique per publisher run, so ids never collide within the server's duplicate window);
    with ``msg_ids=False`` no ids are added (core NATS has no deduplication).
    """

    def __init__(self, subject: str, producer: str, *, msg_ids: bool) -> None:
        self.subject = subject
        self.producer = producer
        self.msg_ids = msg_ids
        self._next_id = 0
        self._ranks: dict[str, int] = {}
        self._types: dict[tuple[FrameKind, str], tuple[str, dict[str, str]]] = {}

    def subject_of(self, frame: Frame) -> str:
        return self._of_type(frame)[0]

    def _of_type(self, frame: Frame) -> tuple[str, dict[str, str]]:
        """The subject and the headers every frame of this kind and type has (cached)."""
        key = (frame.kind, frame.type)
        known = self._types.get(key)
        if known is None:
            if len(self._types) >= _TYPE_CACHE:
                self._types.clear()
            part = "data" if frame.kind is FrameKind.DATA else "meta"
            headers = {HEADER_KIND: _KIND_NAMES[frame.kind], HEADER_TYPE: _value(frame.type)}
            if frame.kind is not FrameKind.DATA:
                rank = self._ranks.setdefault(frame.type, len(self._ranks))
                headers[HEADER_RANK] = str(rank)
            known = self._types[key] = (
                f"{self.subject}.{part}.{escape_token(frame.type)}",
                headers,
            )
        return known

    def headers_of(self, frame: Frame) -> dict[str, str]:
        headers = {**self._of_type(frame)[1], HEADER_TS: str(frame.timestamp)}
        for key, value in frame.headers.items():
            headers[HEADER_PREFIX + quote(key, safe=_KEY_SAFE)] = _value(value)
        return headers

    def messages(self, frame: Frame, limit: int) -> list[NatsMessage]:
        """The message(s) for ``frame``: one if it fits ``limit`` bytes (headers included),
        else consecutive chunks of a DATA frame.

        Raises NotAFrame for a METADATA frame that does not fit (it cannot be chunked), or a
        limit too small for the headers.
        """
        subject = self.subject_of(frame)
        headers = self.headers_of(frame)
        payload = frame.payload
        size = payload.nbytes if isinstance(payload, memoryview) else len(payload)
        if size + header_bytes(headers) + self._id_bytes() <= limit:
            return [NatsMessage(subject, self._with_id(headers), payload)]
        if frame.kind is not FrameKind.DATA:
            raise NotAFrame(
                f"metadata frame {frame.type!r} of {size} bytes is over the {limit}-byte limit "
                "of one NATS message, and metadata is never chunked"
            )
        # Room for the chunk headers at their longest.
        overhead = (
            header_bytes({**headers, HEADER_CHUNK: f"{size}/{size}", HEADER_SIZE: str(size)})
            + self._id_bytes()
        )
        room = limit - overhead
        if room < 1:
            raise NotAFrame(f"a message limit of {limit} bytes leaves no room for a payload")
        count = -(-size // room)
        view = memoryview(payload).cast("B")
        messages = []
        for index in range(count):
            chunk_headers = {
                **headers,
                HEADER_CHUNK: f"{index + 1}/{count}",
                HEADER_SIZE: str(size),
            }
            piece = view[index * room : (index + 1) * room]
            messages.append(NatsMessage(subject, self._with_id(chunk_headers), piece))
        return messages

    def _id_bytes(self) -> int:
        # Nats-Msg-Id: PRODUCER-N and Nats-Expected-Last-Msg-Id: PRODUCER-N, N up to 20 digits.
        if not self.msg_ids:
            return 0
        return len(HEADER_MSG_ID) + len(HEADER_EXPECTED_LAST_MSG_ID) + 2 * len(self.producer) + 50

    def _with_id(self, headers: dict[str, str]) -> dict[str, str]:
        if self.msg_ids:
            headers[HEADER_MSG_ID] = f"{self.producer}-{self._next_id}"
            self._next_id += 1
        return headers


def _frame_of(subject: str, headers: Mapping[str, str] | None, payload: Buffer) -> Frame:
    if not headers:
        raise NotAFrame(f"a message on {subject!r} without framewire headers")
    kind = _KINDS.get(headers.get(HEADER_KIND, ""))
    if kind is None:
        raise NotAFrame(f"a message on {subject!r} without a valid {HEADER_KIND} header")
    type_text = headers.get(HEADER_TYPE)
    timestamp = headers.get(HEADER_TS, "")
    if type_text is None or not _DIGITS.fullmatch(timestamp):
        raise NotAFrame(f"a message on {subject!r} without valid {HEADER_TYPE}/{HEADER_TS}")
    try:
        type_tag = unquote(type_text, errors="strict")
        frame_headers = {
            unquote(key[len(HEADER_PREFIX) :], errors="strict"): unquote(value, errors="strict")
            for key, value in headers.items()
            if key.startswith(HEADER_PREFIX)
        }
    except UnicodeDecodeError:
        raise NotAFrame(f"a message on {subject!r} with badly encoded headers") from None
    return Frame(kind, type_tag, payload, int(timestamp), frame_headers or EMPTY_HEADERS)


@attrs.define
class _Partial:
    subject: str
    count: int
    next_index: int
    size: int
    buffer: bytearray
    headers: Mapping[str, str]


class FrameAssembler:
    """Messages to frames, reassembling chunks; bounded by ``max_frame_size``.

    Feed every message of one subscription in order to :meth:`feed`. A frame's chunks must
    come consecutively (one publisher keeps them so); a chunk that does not continue the frame
    being assembled makes that frame incomplete: it is dropped and counted in
    :attr:`frames_incomplete`, and the chunk starts a new frame if it is a first chunk.
    """

    def __init__(self, max_frame_size: int) -> None:
        self.max_frame_size = max_frame_size
        self._partial: _Partial | None = None
        #: Frames rebuilt from more than one message.
        self.chunks_reassembled = 0
        #: Frames dropped because a chunk was missing or out of order.
        self.frames_incomplete = 0

    @property
    def assembling(self) -> bool:
        """Whether a chunked frame is partly received."""
        return self._partial is not None

    def reset(self) -> None:
        """Forget a partly received frame (counted as incomplete)."""
        if self._partial is not None:
            self.frames_incomplete += 1
            self._partial = None

    def feed(
        self, subject: str, headers: Mapping[str, str] | None, payload: Buffer
    ) -> Frame | None:
        """The frame ``payload`` completes, None while a chunked frame is still incomplete.

        Raises NotAFrame for a message that is not framewire's (missing or bad headers, chunk
        numbers out of range, a frame over ``max_frame_size``); a partial frame it interrupts
        is dropped.
        """
        chunk = headers.get(HEADER_CHUNK) if headers else None
        if chunk is None:
            self.reset()
            frame = _frame_of(subject, headers, payload)
            if frame.size > self.max_frame_size:
                raise NotAFrame(
                    f"a frame of {frame.size} bytes on {subject!r} is over max_frame_size "
                    f"({self.max_frame_size})"
                )
            return frame
        assert headers is not None
        match = _CHUNK.fullmatch(chunk)
        size_text = headers.get(HEADER_SIZE, "")
        if match is None or not _DIGITS.fullmatch(size_text):
            self.reset()
            raise NotAFrame(f"a chunk on {subject!r} with bad {HEADER_CHUNK}/{HEADER_SIZE}")
        index, count, size = int(match[1]), int(match[2]), int(size_text)
        if index > count or count < 2:
            self.reset()
            raise NotAFrame(f"a chunk on {subject!r} numbered {chunk}")
        nbytes = payload.nbytes if isinstance(payload, memoryview) else len(payload)
        partial = self._partial
        if index == 1:
            self.reset()
            if size > self.max_frame_size:
                raise NotAFrame(
                    f"a chunked frame of {size} bytes on {subject!r} is over max_frame_size "
                    f"({self.max_frame_size})"
                )
            # Checked before the buffer is made, so a bad peer cannot make us allocate.
            _frame_of(subject, headers, b"")
            partial = self._partial = _Partial(subject, count, 1, size, bytearray(), headers)
        elif (
            partial is None
            or partial.subject != subject
            or partial.count != count
            or partial.next_index != index
            or partial.size != size
        ):
            self.reset()
            raise NotAFrame(f"chunk {chunk} on {subject!r} does not continue a frame")
        if len(partial.buffer) + nbytes > partial.size:
            self.reset()
            raise NotAFrame(f"chunks on {subject!r} hold more than their {HEADER_SIZE}")
        partial.buffer += payload
        partial.next_index += 1
        if index < count:
            return None
        self._partial = None
        if len(partial.buffer) != partial.size:
            self.frames_incomplete += 1
            raise NotAFrame(f"chunks on {subject!r} hold less than their {HEADER_SIZE}")
        self.chunks_reassembled += 1
        # The buffer is handed over, never written again: no copy.
        return _frame_of(subject, partial.headers, partial.buffer)
