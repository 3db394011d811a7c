"""How framewire frames are laid out as NATS messages: subjects, headers, chunks.

Pure code: no trio, no asyncio, no nats-py. The NATS endpoint
(:mod:`framewire.daemon.endpoints.nats`) maps frames to :class:`NatsMessage` with
:class:`FrameLayout` and back with :class:`FrameAssembler`. The layout is documented for
other NATS clients in ``docs/protocol.md`` ("framewire over NATS"); in
short:

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
    publishes add ``Nats-Msg-Id`` (``PRODUCER-N``: the publisher's run and the message's
    number in it, the same on every retry) and ``Fw-Seq`` (the number, in that run, of the
    frame the message carries, or of a pack's first frame), from which a reader drops
    retries the server stored twice and counts frames the stream lost
    (:class:`ProducerSequences`); and ``Nats-Expected-Last-Sequence`` (the stream sequence
    the message must follow), so the server refuses a message whose predecessor was
    refused: the stream keeps the publisher's order.
Chunks
    A frame whose payload is over the chunk limit goes as consecutive messages on the same
    subject, each with every header above plus ``Fw-Chunk: I/N`` (1-based) and ``Fw-Size``
    (the whole payload's length). Only DATA frames are chunked: a metadata frame lives in a
    last-value store that keeps one message per subject, so it must fit one message.

Packs (opt-in, ``pack_frames``)
    Consecutive DATA frames of one type may go as one message on that type's subject, with
    ``Fw-Kind``, ``Fw-Type``, ``Fw-Ts`` (the first frame's) and ``Fw-Pack: N`` (2 or more
    frames); the payload is the N frames in framewire's native wire format
    (``docs/protocol.md``), back to back, each with its own type, timestamp, headers and
    payload. A pack is never chunked and never holds metadata.

Decoding refuses (:class:`NotAFrame`) a message that lacks ``Fw-Kind``/``Fw-Type``/``Fw-Ts``,
has values out of range, or chunks that are out of order; the assembler then drops only the
frame the bad chunk belonged to.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Final
from urllib.parse import quote, unquote

import attrs

from ..frame import EMPTY_HEADERS, Buffer, Frame, FrameKind
from ._errors import ProtocolError
from .native import NativeDecoder, NativeEncoder

__all__ = [
    "HEADER_CHUNK",
    "HEADER_EXPECTED_LAST_MSG_ID",
    "HEADER_EXPECTED_LAST_SEQUENCE",
    "HEADER_FLOW",
    "HEADER_KIND",
    "HEADER_MSG_ID",
    "HEADER_PACK",
    "HEADER_RANK",
    "HEADER_SEQ",
    "HEADER_SIZE",
    "HEADER_TS",
    "HEADER_TYPE",
    "MAX_PACK_FRAMES",
    "FrameAssembler",
    "FrameLayout",
    "FramePacker",
    "NatsMessage",
    "NotAFrame",
    "ProducerSequences",
    "PublishUnit",
    "SequenceCheck",
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
HEADER_EXPECTED_LAST_SEQUENCE: Final = "Nats-Expected-Last-Sequence"
HEADER_PACK: Final = "Fw-Pack"
HEADER_SEQ: Final = "Fw-Seq"
HEADER_FLOW: Final = "Fw-Flow"
#: The most frames one pack may hold.
MAX_PACK_FRAMES: Final = 65536
_PACK_COUNT: Final = re.compile(r"[1-9][0-9]{0,5}")

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
#: A timestamp: signed, as framewire's (and the native format's) are.
_TIMESTAMP: Final = re.compile(r"-?[0-9]{1,20}")
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
        self._next_frame = 0
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
            return [NatsMessage(subject, self._with_id(headers, self._take_frames(1)), payload)]
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
        number = self._take_frames(1)
        messages = []
        for index in range(count):
            chunk_headers = {
                **headers,
                HEADER_CHUNK: f"{index + 1}/{count}",
                HEADER_SIZE: str(size),
            }
            piece = view[index * room : (index + 1) * room]
            messages.append(NatsMessage(subject, self._with_id(chunk_headers, number), piece))
        return messages

    def pack(self, frames: Sequence[Frame], payload: Buffer) -> NatsMessage:
        """One message carrying ``frames`` (two or more consecutive DATA frames of one type),
        whose native encodings back to back are ``payload`` (see :class:`FramePacker`)."""
        first = frames[0]
        subject, fixed = self._of_type(first)
        headers = {**fixed, HEADER_TS: str(first.timestamp), HEADER_PACK: str(len(frames))}
        return NatsMessage(subject, self._with_id(headers, self._take_frames(len(frames))), payload)

    def pack_room(self, frame: Frame, limit: int) -> int:
        """Payload bytes a pack of ``frame``'s type may hold in a message of ``limit`` bytes."""
        fixed = self._of_type(frame)[1]
        widest = {**fixed, HEADER_TS: "-" * 20, HEADER_PACK: str(MAX_PACK_FRAMES)}
        return limit - header_bytes(widest) - self._id_bytes()

    def _id_bytes(self) -> int:
        # Nats-Msg-Id: PRODUCER-N, Nats-Expected-Last-Sequence: S and Fw-Seq: F, each number
        # up to 20 digits.
        if not self.msg_ids:
            return 0
        return (
            len(HEADER_MSG_ID)
            + len(HEADER_EXPECTED_LAST_SEQUENCE)
            + len(HEADER_SEQ)
            + len(self.producer)
            + 80
        )

    def _take_frames(self, count: int) -> int:
        """The number of the first of ``count`` frames about to be laid out."""
        number = self._next_frame
        if self.msg_ids:
            self._next_frame += count
        return number

    def _with_id(self, headers: dict[str, str], frame_number: int) -> dict[str, str]:
        if self.msg_ids:
            headers[HEADER_MSG_ID] = f"{self.producer}-{self._next_id}"
            headers[HEADER_SEQ] = str(frame_number)
            self._next_id += 1
        return headers


def _nbytes(buffer: Buffer) -> int:
    return buffer.nbytes if isinstance(buffer, memoryview) else len(buffer)


@attrs.define(slots=True)
class PublishUnit:
    """Frames and the messages that carry them: one frame in one message or in chunks, or
    a pack of frames in one message. Counted as stored or sent once all its messages are."""

    frames: list[Frame]
    messages: list[NatsMessage]

    @property
    def kind(self) -> FrameKind:
        return self.frames[0].kind

    @property
    def nbytes(self) -> int:
        return sum(frame.size for frame in self.frames)


class FramePacker:
    """Batches of frames to :class:`PublishUnit` objects for one publisher's ``layout``.

    With ``max_frames`` under 2 every frame goes alone (:meth:`FrameLayout.messages`). Else
    runs of consecutive DATA frames of one type in a batch go as packs of at most
    ``max_frames`` frames and ``max_bytes`` bytes of native encoding (and what one message
    can hold); a run of one frame, a frame bigger than a pack may be, metadata, and a frame
    the native format cannot carry go alone. A pack holds what the batch it is given holds:
    it never waits for more frames.
    """

    def __init__(self, layout: FrameLayout, *, max_frames: int, max_bytes: int) -> None:
        self.layout = layout
        self.max_frames = min(max_frames, MAX_PACK_FRAMES)
        self.max_bytes = max_bytes
        self._encoder = NativeEncoder()
        #: Packs made.
        self.packs = 0

    def units(
        self,
        batch: Iterable[Frame],
        limit: int,
        unencodable: Callable[[Frame, NotAFrame], None],
    ) -> list[PublishUnit]:
        """The units for ``batch``, in order, each message at most ``limit`` bytes; a frame
        that fits no message is given to ``unencodable`` and left out."""
        layout = self.layout
        units: list[PublishUnit] = []
        run: list[Frame] = []
        parts: list[Buffer] = []
        run_bytes = 0
        room = 0

        def alone(frame: Frame) -> None:
            try:
                units.append(PublishUnit([frame], layout.messages(frame, limit)))
            except NotAFrame as exc:
                unencodable(frame, exc)

        def close_run() -> None:
            nonlocal run, parts, run_bytes
            if len(run) == 1:
                alone(run[0])
            elif run:
                units.append(PublishUnit(run, [layout.pack(run, b"".join(parts))]))
                self.packs += 1
            run, parts, run_bytes = [], [], 0

        packing = self.max_frames >= 2
        encode_into = self._encoder.encode_into
        for frame in batch:
            if packing and frame.kind is FrameKind.DATA:
                if run and (frame.type != run[0].type or len(run) >= self.max_frames):
                    close_run()
                if not run:
                    room = min(self.max_bytes, layout.pack_room(frame, limit))
                encoded: list[Buffer] = []
                try:
                    encode_into(frame, encoded)
                except ValueError:
                    encoded = []  # not in the native format: it goes alone
                size = sum(_nbytes(part) for part in encoded)
                if encoded and size <= room:
                    if run_bytes + size > room:
                        close_run()
                    run.append(frame)
                    parts += encoded
                    run_bytes += size
                    continue
            close_run()
            alone(frame)
        close_run()
        return units


def _frame_of(subject: str, headers: Mapping[str, str] | None, payload: Buffer) -> Frame:
    if not headers:
        raise NotAFrame(f"a message on {subject!r} without framewire headers")
    kind = _KINDS.get(headers.get(HEADER_KIND, ""))
    if kind is None:
        raise NotAFrame(f"a message on {subject!r} without a valid {HEADER_KIND} header")
    type_text = headers.get(HEADER_TYPE)
    timestamp = headers.get(HEADER_TS, "")
    if type_text is None or not _TIMESTAMP.fullmatch(timestamp):
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
        #: Packs taken apart.
        self.packs_unpacked = 0
        self._pack_decoder: NativeDecoder | None = None

    @property
    def assembling(self) -> bool:
        """Whether a chunked frame is partly received."""
        return self._partial is not None

    def reset(self) -> None:
        """Forget a partly received frame (counted as incomplete)."""
        if self._partial is not None:
            self.frames_incomplete += 1
            self._partial = None

    def feed_all(
        self, subject: str, headers: Mapping[str, str] | None, payload: Buffer
    ) -> list[Frame]:
        """The frames ``payload`` completes: a pack's frames, one frame, or none (a chunk of a
        frame still incomplete).

        Raises NotAFrame as :meth:`feed` does, and for a pack (``Fw-Pack``) that is not
        exactly its count of DATA frames of its ``Fw-Type`` in the native format, each within
        ``max_frame_size``: the whole pack is dropped. A pack interrupts a chunked frame.
        """
        if not headers or HEADER_PACK not in headers:
            frame = self.feed(subject, headers, payload)
            return [] if frame is None else [frame]
        self.reset()
        count_text = headers[HEADER_PACK]
        if not _PACK_COUNT.fullmatch(count_text) or not 2 <= int(count_text) <= MAX_PACK_FRAMES:
            raise NotAFrame(f"a pack on {subject!r} with a bad {HEADER_PACK}: {count_text[:20]!r}")
        if HEADER_CHUNK in headers:
            raise NotAFrame(f"a pack on {subject!r} with {HEADER_CHUNK} (packs are never chunked)")
        first = _frame_of(subject, headers, b"")
        if first.kind is not FrameKind.DATA:
            raise NotAFrame(f"a pack on {subject!r} that says it holds metadata")
        decoder = self._pack_decoder
        if decoder is None:
            decoder = self._pack_decoder = NativeDecoder(max_frame_size=self.max_frame_size)
        try:
            frames = decoder.feed(payload)
        except ProtocolError as exc:
            self._pack_decoder = None  # it failed: a new one for the next pack
            raise NotAFrame(f"a pack on {subject!r} that is not native frames: {exc}") from None
        if decoder.buffered:
            self._pack_decoder = None
            raise NotAFrame(f"a pack on {subject!r} that ends inside a frame")
        count = int(count_text)
        if len(frames) != count:
            raise NotAFrame(f"a pack on {subject!r} of {len(frames)} frames says {count}")
        for frame in frames:
            if frame.kind is not FrameKind.DATA or frame.type != first.type:
                raise NotAFrame(
                    f"a pack on {subject!r} holds a frame that is not DATA of type {first.type!r}"
                )
        self.packs_unpacked += 1
        return frames

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


#: Producers whose sequences a :class:`ProducerSequences` remembers, by default.
MAX_PRODUCERS: Final = 64


@attrs.frozen
class SequenceCheck:
    """What :meth:`ProducerSequences.check` found about one message.

    ``duplicate``: the message was seen before (a retry the server stored again): drop it.
    ``lost``: frames of its producer that never came before it (``first_lost`` is the first
    one's number); the stream discarded them, or they were never stored.
    """

    producer: str = ""
    duplicate: bool = False
    lost: int = 0
    first_lost: int = 0


_ACCEPTED: Final = SequenceCheck()


@attrs.define
class _Mark:
    #: The number (``Nats-Msg-Id``) of the next message expected.
    next_message: int
    #: The number (``Fw-Seq``) of the next frame expected; while a chunked frame is coming,
    #: that frame's.
    next_frame: int
    #: While a chunked frame is coming: the number of its first chunk's message (-1 when
    #: that chunk was never seen).
    frame_start: int = -1
    chunking: bool = False
    #: The chunked frame still coming was already counted lost (a chunk after its first
    #: came after a gap).
    counted: bool = False


class ProducerSequences:
    """A reader's memory of each publisher's messages and frames, from the ``Nats-Msg-Id``
    (``PRODUCER-N``) and ``Fw-Seq`` headers every JetStream publish carries.

    Feed every message of a stream in the order it is stored to :meth:`check`: a message
    whose number its producer already passed is a duplicate (a publish retried after the
    server forgot its id: the ``duplicate_window`` passed); a jump in a producer's frame
    numbers is frames lost upstream (the stream discarded them under its limits before they
    were read). Messages without both headers (core publishes, other programs) are
    accepted and not counted.

    :meth:`snapshot` gives the state as of whole frames (a chunked frame still coming is left
    out, so the chunks are expected again), for a reader to keep beside its acknowledged
    position and give back to :meth:`restore` after a restart. A producer seen first after
    a restore starts from its first message: nothing is counted lost for it. At most
    ``max_producers`` producers are remembered, the least recently seen forgotten first
    (each publisher run is a producer: a retry of a forgotten one is not recognised).
    """

    def __init__(self, max_producers: int = MAX_PRODUCERS) -> None:
        self.max_producers = max_producers
        self._marks: dict[str, _Mark] = {}

    def __len__(self) -> int:
        return len(self._marks)

    def check(self, headers: Mapping[str, str] | None) -> SequenceCheck:
        """Record the message with ``headers``; what it is (see :class:`SequenceCheck`)."""
        if not headers:
            return _ACCEPTED
        msg_id = headers.get(HEADER_MSG_ID)
        frame_text = headers.get(HEADER_SEQ)
        if msg_id is None or frame_text is None or not _DIGITS.fullmatch(frame_text):
            return _ACCEPTED
        producer, _, message_text = msg_id.rpartition("-")
        if not producer or not _DIGITS.fullmatch(message_text):
            return _ACCEPTED
        message = int(message_text)
        frame = int(frame_text)
        index, count = 1, 1
        chunk = headers.get(HEADER_CHUNK)
        if chunk is not None:
            match = _CHUNK.fullmatch(chunk)
            if match is not None:
                index, count = int(match[1]), int(match[2])
        pack = headers.get(HEADER_PACK)
        frames = int(pack) if pack is not None and _PACK_COUNT.fullmatch(pack) else 1
        marks = self._marks
        mark = marks.get(producer)
        lost = 0
        first_lost = 0
        counted = False  # this message's frame is counted lost (now or before)
        if mark is None:
            if len(marks) >= self.max_producers:
                del marks[next(iter(marks))]
            mark = marks[producer] = _Mark(message, frame)
        else:
            if next(reversed(marks)) != producer:
                marks[producer] = marks.pop(producer)
            if message < mark.next_message:
                return SequenceCheck(producer, duplicate=True)
            # A chunked frame still coming, already counted lost: it is not counted again.
            already = mark.chunking and mark.counted
            counted = already and frame == mark.next_frame
            if message > mark.next_message:
                # Messages are missing: the frames before this one that never completed, and
                # this frame too when this is a chunk after its first.
                first_lost = mark.next_frame + (1 if already else 0)
                lost = max(0, frame - first_lost)
                if index > 1 and not counted:
                    lost += 1
                    counted = True
        mark.next_message = message + 1
        if index < count:
            if index == 1:
                mark.frame_start = message
            elif lost or not mark.chunking:
                mark.frame_start = -1
            mark.counted = counted
            mark.chunking = True
            mark.next_frame = frame
        else:
            mark.counted = False
            mark.chunking = False
            mark.frame_start = -1
            mark.next_frame = frame + frames
        if lost:
            return SequenceCheck(producer, lost=lost, first_lost=first_lost)
        return _ACCEPTED

    def snapshot(self) -> dict[str, list[int]]:
        """Each producer's ``[next message, next frame]`` as of its last whole frame."""
        state = {}
        for producer, mark in self._marks.items():
            if mark.chunking and mark.frame_start >= 0:
                state[producer] = [mark.frame_start, mark.next_frame]
            else:
                state[producer] = [mark.next_message, mark.next_frame]
        return state

    def restore(self, state: object) -> bool:
        """Take a :meth:`snapshot` back (from JSON); False (and nothing changed) when it is
        not one."""
        if not isinstance(state, dict):
            return False
        marks: dict[str, _Mark] = {}
        for producer, value in state.items():
            if (
                not isinstance(producer, str)
                or not isinstance(value, list)
                or len(value) != 2
                or not all(type(number) is int and number >= 0 for number in value)
            ):
                return False
            marks[producer] = _Mark(value[0], value[1])
        while len(marks) > self.max_producers:
            del marks[next(iter(marks))]
        self._marks = marks
        return True
