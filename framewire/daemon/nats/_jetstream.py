"""JetStream from the asyncio thread: acknowledged publishes (:class:`AckTracker`), the
streams a framewire stream lives in (:class:`StreamLayout`, :func:`ensure_streams`) and
reading them back (:func:`read_last_metadata`, :func:`read_stream_range`).

Everything here runs on a :class:`~._thread.NatsThread`'s loop, called from trio with
:meth:`~._thread.NatsThread.call`.

JetStream publish acks are tracked here (:class:`AckTracker`) rather than with nats-py's
``publish_async``: nats-py 2.16 never resolves a ``publish_async`` future whose ack carries an
error (a 429, for instance), so ``publish_async_completed()`` can hang forever. Each message is
published with its own reply subject under one inbox subscription; the acks are parsed here,
and every wait for them has ``ack_timeout``.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final, cast

import attrs

from ...config import format_duration, format_size
from ...protocols.nats import NatsMessage
from ._thread import describe_nats_error

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.aio.msg import Msg

__all__ = [
    "AckOutcome",
    "AckTracker",
    "MissingStream",
    "ReaderMarks",
    "StreamLayout",
    "StreamsEnsured",
    "ensure_streams",
    "parse_ack",
    "read_last_metadata",
    "read_stream_range",
    "refusal_kind",
    "source_sequence",
]


@attrs.frozen
class AckOutcome:
    """What became of one JetStream publish.

    ``ok``: stored (``duplicate``: it had been stored before, by an earlier try with the same
    ``Nats-Msg-Id``). Otherwise ``code`` is the server's (429 too many requests, 503 no
    responders, no stream leader or message too large, ...) or 0 for a timeout or a client
    error, ``err_code`` JetStream's own code (10077: message too large) and ``description``
    one line.
    """

    ok: bool
    sequence: int = 0
    duplicate: bool = False
    code: int = 0
    err_code: int = 0
    description: str = ""


#: JetStream's error code for a message over its size limit.
ERR_STORE_FAILED: Final = 10077
#: JetStream's error code for a message whose ``Nats-Expected-Last-Msg-Id`` is not the id of
#: the stream's last message: the message before it in its window was not stored (or another
#: publisher's message came between them).
ERR_WRONG_LAST_MSG_ID: Final = 10070
#: JetStream's error code for a message whose ``Nats-Expected-Last-Sequence`` is not the
#: stream's last sequence: a message before it was not stored (or another publisher's came
#: between them). A replicated stream's leader checks it before it stores anything.
ERR_WRONG_LAST_SEQUENCE: Final = 10071


def refusal_kind(outcome: AckOutcome) -> str:
    """What a refused publish means: ``too_large``, ``stream_full``, ``throttled`` (429),
    ``unavailable`` (503: no stream, no leader), ``out_of_order`` (the message before it was
    not the stream's last: see :data:`ERR_WRONG_LAST_SEQUENCE`), ``no_ack`` or ``refused``.

    JetStream reports a full stream (``discard = "new"``: "maximum bytes/messages exceeded")
    and a message over a limit ("message too large", "message size exceeds maximum allowed")
    under one error code, 10077 (store failed), so the description decides.
    """
    text = outcome.description.lower()
    if outcome.err_code in (ERR_WRONG_LAST_SEQUENCE, ERR_WRONG_LAST_MSG_ID):
        return "out_of_order"
    if "too large" in text or "size exceeds" in text:
        return "too_large"
    if "exceeded" in text or "insufficient resources" in text or "storage" in text:
        return "stream_full"
    if outcome.code == 429:
        return "throttled"
    if outcome.code == 503:
        return "unavailable"
    return "refused" if outcome.code or outcome.err_code else "no_ack"


def parse_ack(msg: Msg) -> AckOutcome:
    """The outcome a JetStream ack message (or a no-responders status) reports."""
    headers = msg.headers or {}
    status = headers.get("Status")
    if status and not msg.data:
        code = int(status) if status.isdigit() else 0
        # nats-py 2.16 reads a status line without a description into the Description
        # header with the next header line after it ("\nNats-Subject: ..."): only a first
        # line with text is a description.
        given = str(headers.get("Description") or "")
        description = given.split("\n", 1)[0].strip() or (
            "no responders: no JetStream stream captures this subject" if code == 503 else ""
        )
        return AckOutcome(False, code=code, description=description or f"status {status}")
    try:
        reply = json.loads(msg.data)
    except ValueError:
        return AckOutcome(False, description="an ack that is not JSON")
    if not isinstance(reply, dict):
        return AckOutcome(False, description="an ack that is not a JSON object")
    error = reply.get("error")
    if isinstance(error, dict):
        return AckOutcome(
            False,
            code=int(error.get("code") or 0),
            err_code=int(error.get("err_code") or 0),
            description=str(error.get("description") or "refused"),
        )
    sequence = reply.get("seq")
    if not isinstance(sequence, int):
        return AckOutcome(False, description="an ack without a stream sequence")
    return AckOutcome(True, sequence=sequence, duplicate=bool(reply.get("duplicate")))


class AckTracker:
    """JetStream publishes with their own acks, on the asyncio loop (see the module docstring).

    Make it with :meth:`open` (on the loop, once connected); :meth:`publish` publishes a
    window of messages in order and waits (at most ``ack_timeout``) for every ack.
    """

    def __init__(self, client: NatsClient) -> None:
        self._client = client
        self._prefix = ""
        self._futures: dict[str, asyncio.Future[AckOutcome]] = {}
        self._next = 0
        #: Windows are published one after another, each whole: nats-py's publish() may
        #: pause (to flush), and a later window's task must not send meanwhile, or its
        #: messages would reach the server ahead of the earlier window's.
        self._writer = asyncio.Lock()

    @classmethod
    async def open(cls, client: NatsClient) -> AckTracker:
        tracker = cls(client)
        tracker._prefix = client.new_inbox()
        await client.subscribe(f"{tracker._prefix}.*", cb=tracker._on_ack)
        return tracker

    @property
    def pending(self) -> int:
        """Acks awaited now."""
        return len(self._futures)

    async def _on_ack(self, msg: Msg) -> None:
        future = self._futures.pop(msg.subject, None)
        if future is not None and not future.done():
            future.set_result(parse_ack(msg))

    async def publish(
        self, messages: Sequence[NatsMessage], ack_timeout: float
    ) -> list[AckOutcome]:
        """Publish ``messages`` in order; return each one's outcome (a timeout is one)."""
        loop = asyncio.get_running_loop()
        client = self._client
        waiting: list[tuple[str, asyncio.Future[AckOutcome]]] = []
        async with self._writer:
            for message in messages:
                reply = f"{self._prefix}.{self._next}"
                self._next += 1
                future: asyncio.Future[AckOutcome] = loop.create_future()
                self._futures[reply] = future
                waiting.append((reply, future))
                try:
                    # A memoryview works: nats-py concatenates the payload to the command.
                    payload = cast("bytes", message.payload)
                    await client.publish(
                        message.subject, payload, reply=reply, headers=message.headers
                    )
                except Exception as exc:
                    self._futures.pop(reply, None)
                    future.set_result(AckOutcome(False, description=describe_nats_error(exc)))
        futures = [future for _, future in waiting if not future.done()]
        try:
            if futures:
                await asyncio.wait(futures, timeout=ack_timeout)
        except BaseException:
            for reply, _ in waiting:
                self._futures.pop(reply, None)
            raise
        outcomes = []
        for reply, future in waiting:
            if future.done():
                outcomes.append(future.result())
            else:
                self._futures.pop(reply, None)
                future.cancel()
                outcomes.append(AckOutcome(False, description=f"no ack within {ack_timeout:g}s"))
        return outcomes


class MissingStream(LookupError):
    """A JetStream stream the configuration requires (``create = false``) does not exist."""


@attrs.frozen
class StreamLayout:
    """Where a framewire stream lives in JetStream (see ``docs/protocol.md``).

    ``mode = "jetstream"``: ``stream`` captures ``SUBJECT.>`` (data and metadata, one order)
    and ``meta_stream`` sources ``SUBJECT.meta.>`` from it, keeping one message per subject:
    the latest metadata of each type, which outlives ``stream``'s limits. ``mode = "core"``:
    only ``meta_stream``, capturing ``SUBJECT.meta.>`` itself (core publishes land in it).
    """

    subject: str
    stream: str
    meta_stream: str
    mode: str
    create: bool
    replicas: int = 1
    storage: str = "file"
    max_bytes: int = 0
    max_age: float = 0.0
    discard: str = "old"
    duplicate_window: float = 120.0
    retention: str = "limits"
    #: The JetStream domain whose same-named streams these source (a hub reading a site),
    #: or None: the frames' stream captures the subjects itself.
    source_domain: str | None = None
    #: Whether this endpoint owns the streams' settings (the publisher): it creates and
    #: updates them. A reader only creates what is missing and compares the rest.
    owner: bool = True
    #: The settings this endpoint's configuration gives (not left at their defaults): a
    #: reader says when the stream's differ.
    explicit: frozenset[str] = frozenset()

    @property
    def readers_bucket(self) -> str:
        """The key-value bucket where durable readers keep what they handled."""
        return re.sub(r"[^A-Za-z0-9_-]", "_", f"{self.stream}_READERS")

    def configs(self) -> list[Any]:
        """The nats-py StreamConfig of each stream, the frames' stream first."""
        api = importlib.import_module("nats.js.api")
        common: dict[str, Any] = {
            "storage": api.StorageType(self.storage),
            "num_replicas": self.replicas,
        }
        meta_subjects = f"{self.subject}.meta.>"
        if self.mode == "core":
            return [
                api.StreamConfig(
                    name=self.meta_stream,
                    subjects=[meta_subjects],
                    max_msgs_per_subject=1,
                    **common,
                )
            ]
        bounds: dict[str, Any] = {
            "max_bytes": self.max_bytes or -1,
            "max_age": self.max_age or None,
            "discard": api.DiscardPolicy(self.discard),
            "duplicate_window": self.duplicate_window,
            "retention": api.RetentionPolicy(self.retention),
        }
        if self.source_domain is not None:
            # A hub's copies of a site's streams, across the leaf node link: no subjects of
            # their own (they would store every message twice, live and sourced).
            external = api.ExternalStream(api=f"$JS.{self.source_domain}.API")
            frames = api.StreamConfig(
                name=self.stream,
                sources=[api.StreamSource(name=self.stream, external=external)],
                **bounds,
                **common,
            )
            meta = api.StreamConfig(
                name=self.meta_stream,
                sources=[api.StreamSource(name=self.meta_stream, external=external)],
                max_msgs_per_subject=1,
                **common,
            )
            return [frames, meta]
        frames = api.StreamConfig(
            name=self.stream,
            subjects=[f"{self.subject}.>"],
            **bounds,
            **common,
        )
        meta = api.StreamConfig(
            name=self.meta_stream,
            sources=[api.StreamSource(name=self.stream, filter_subject=meta_subjects)],
            max_msgs_per_subject=1,
            **common,
        )
        return [frames, meta]


@attrs.frozen
class StreamsEnsured:
    """What :func:`ensure_streams` did (``done``, one line each) and how the frames' stream
    differs from a reader's configuration (``differences``: ``key: stream's, configured``)."""

    done: list[str]
    differences: list[str]


#: The stream settings a reader compares: its configuration key and nats-py's name.
_COMPARED: Final = (
    ("max_bytes", "max_bytes"),
    ("max_age", "max_age"),
    ("discard", "discard"),
    ("duplicate_window", "duplicate_window"),
    ("replicas", "num_replicas"),
    ("storage", "storage"),
    ("retention", "retention"),
)


async def ensure_streams(js: Any, layout: StreamLayout) -> StreamsEnsured:
    """Create the layout's streams when missing (``create = true``), or with ``create =
    false`` check that they exist. An existing stream is updated to the configuration only
    by its owner (the publisher); a reader never changes it, and the frames' stream's
    settings that differ from the reader's configuration are returned.

    Raises MissingStream, and nats-py's errors (an APIError says what the server refused).
    """
    errors = importlib.import_module("nats.js.errors")
    done = []
    differences: list[str] = []
    for index, config in enumerate(layout.configs()):
        try:
            info = await js.stream_info(config.name)
        except errors.NotFoundError:
            if not layout.create:
                raise MissingStream(
                    f"JetStream stream {config.name} does not exist (create = false: make it, "
                    "or set create = true)"
                ) from None
            await js.add_stream(config)
            done.append(f"created JetStream stream {config.name}")
            continue
        if layout.create and layout.owner:
            await js.update_stream(config)
        elif index == 0 and layout.mode == "jetstream":
            differences = _differences(info.config, config, layout.explicit)
    return StreamsEnsured(done, differences)


def _differences(existing: Any, wanted: Any, keys: frozenset[str]) -> list[str]:
    found = []
    for key, attribute in _COMPARED:
        if key not in keys:
            continue
        have, want = getattr(existing, attribute, None), getattr(wanted, attribute, None)
        if key == "max_bytes":
            have, want = (have if have and have > 0 else 0), (want if want and want > 0 else 0)
        elif key == "max_age":
            have, want = have or 0.0, want or 0.0
        if have != want:
            show = [_shown(key, value) for value in (have, want)]
            found.append(f"{key} {show[0]} (configured here: {show[1]})")
    return found


def _shown(key: str, value: Any) -> str:
    """A stream setting as a configuration writes it."""
    if key == "max_bytes":
        return format_size(value) if value else "none"
    if key in ("max_age", "duplicate_window"):
        return format_duration(float(value)) if value else "none"
    return str(getattr(value, "value", value))


async def read_last_metadata(js: Any, layout: StreamLayout) -> list[tuple[int | None, Any]]:
    """The latest metadata message of each type (nats-py RawStreamMsg objects, in no
    particular order), each with the sequence it has in the frames' stream (None when that is
    not known: core mode). Empty when neither stream exists.

    JetStream mode reads the frames' stream first (exact, and not subject to the last-value
    stream's copying lag), then the last-value stream for the types the frames' stream no
    longer holds (its limits dropped them).
    """
    errors = importlib.import_module("nats.js.errors")
    found: dict[str, tuple[int | None, Any]] = {}
    meta_subjects = f"{layout.subject}.meta.>"
    sources = [layout.meta_stream] if layout.mode == "core" else [layout.stream, layout.meta_stream]
    for name in sources:
        try:
            info = await js.stream_info(name, subjects_filter=meta_subjects)
        except errors.NotFoundError:
            continue
        for subject in info.state.subjects or {}:
            if subject in found:
                continue
            try:
                message = await js.get_last_msg(name, subject)
            except errors.NotFoundError:
                continue
            if name == layout.stream:
                origin = message.seq
            elif layout.source_domain is None:
                origin = source_sequence(message.headers)
            else:
                origin = None  # a sequence of the other domain's stream: not comparable
            found[subject] = (origin, message)
    return list(found.values())


async def read_stream_range(
    js: Any, stream: str, subject: str, first: int, count: int
) -> tuple[list[tuple[str, dict[str, str] | None, bytes]], int]:
    """Messages ``first`` to ``first + count - 1`` of ``stream`` on ``SUBJECT.>`` (subject,
    headers, payload), in order, read one by one, and how many of them the stream no longer
    holds (its limits discarded them); messages on other subjects are left out.

    Raises nats-py's errors but NotFoundError."""
    errors = importlib.import_module("nats.js.errors")
    prefix = f"{subject}."
    found = []
    missing = 0
    for sequence in range(first, first + count):
        try:
            message = await js.get_msg(stream, sequence)
        except errors.NotFoundError:
            missing += 1
            continue
        if message.subject.startswith(prefix):
            found.append((message.subject, message.headers, message.data or b""))
    return found, missing


class ReaderMarks:
    """Where a durable reader keeps what it has handled of each publisher (a
    :meth:`~framewire.protocols.nats.ProducerSequences.snapshot`), beside its consumer's
    position: key ``DURABLE`` of the key-value bucket ``STREAM_READERS`` (made with the
    stream's replicas and storage when missing). Written before each acknowledgement, so
    after a restart it is never behind the acknowledged floor.
    """

    def __init__(self, kv: Any, key: str) -> None:
        self._kv = kv
        self.key = re.sub(r"[^-/_=.A-Za-z0-9]", "_", key)

    @classmethod
    async def open(cls, js: Any, layout: StreamLayout, key: str) -> ReaderMarks:
        """Open (or make) the bucket. Raises nats-py's errors (no JetStream, no permission)."""
        errors = importlib.import_module("nats.js.errors")
        api = importlib.import_module("nats.js.api")
        bucket = layout.readers_bucket
        try:
            kv = await js.key_value(bucket)
        except errors.BucketNotFoundError:
            kv = await js.create_key_value(
                api.KeyValueConfig(
                    bucket=bucket,
                    history=1,
                    replicas=layout.replicas,
                    storage=api.StorageType(layout.storage),
                    description=f"framewire readers of {layout.stream}: what each has handled",
                )
            )
        return cls(kv, key)

    async def load(self) -> dict[str, Any] | None:
        """The record kept (None when there is none, or it is not JSON)."""
        errors = importlib.import_module("nats.js.errors")
        try:
            entry = await self._kv.get(self.key)
        except errors.KeyNotFoundError:
            return None
        try:
            record = json.loads(entry.value or b"")
        except ValueError:
            return None
        return record if isinstance(record, dict) else None

    async def save(self, stream_sequence: int, producers: dict[str, list[int]]) -> None:
        """Keep what was handled up to ``stream_sequence``. Raises nats-py's errors."""
        record = {"stream_sequence": stream_sequence, "producers": producers}
        await self._kv.put(self.key, json.dumps(record, separators=(",", ":")).encode())


def source_sequence(headers: dict[str, str] | None) -> int | None:
    """The origin stream sequence a sourced message carries (``Nats-Stream-Source``), or
    None for a message stored directly."""
    source = (headers or {}).get("Nats-Stream-Source")
    if not source:
        return None
    parts = source.split()
    if len(parts) < 2 or not parts[1].isdigit():
        return None
    return int(parts[1])
