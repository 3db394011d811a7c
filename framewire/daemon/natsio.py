"""nats-py driven from trio: one client on its own thread and asyncio loop, crossed in batches.

nats-py is asyncio-only and optional (``pip install 'framewire[nats]'``): it is imported only
when a NATS endpoint starts, through :func:`require_nats`, which raises
:class:`NatsUnavailable` naming the extra when it is missing.

How the two loops meet (see ``docs/configuration.md`` and the notes in ``shared/notes/nats.md``
for the measurements behind it): each endpoint owns one :class:`NatsThread`, a thread running
its own asyncio event loop. trio hands work over a whole batch at a time with
:meth:`NatsThread.call` (a coroutine run on the loop; trio waits without blocking, and is woken
by ``TrioToken.run_sync_soon`` when it is done), and messages received by nats-py are put in an
:class:`Inbox` that wakes trio once per batch, not once per message. Crossing once per frame
costs 25-30 times more.

Every wait on NATS has a timeout: :meth:`NatsThread.call` takes one and cancels the coroutine
on the loop when it passes (raising :class:`TimeoutError` in trio), and a trio cancellation
cancels it too. :meth:`NatsThread.stop` stops the loop and joins the thread in a worker thread,
so trio never blocks on it.

JetStream publish acks are tracked here (:class:`AckTracker`) rather than with nats-py's
``publish_async``: nats-py 2.16 never resolves a ``publish_async`` future whose ack carries an
error (a 429, for instance), so ``publish_async_completed()`` can hang forever. Each message is
published with its own reply subject under one inbox subscription; the acks are parsed here,
and every wait for them has ``ack_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import json
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from concurrent.futures import Future
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar, cast

import attrs
import trio

from ..protocols.nats import NatsMessage

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.aio.msg import Msg

__all__ = [
    "AckOutcome",
    "AckTracker",
    "Inbox",
    "MissingStream",
    "NatsThread",
    "NatsUnavailable",
    "PendingCall",
    "StreamLayout",
    "describe_nats_error",
    "ensure_streams",
    "parse_ack",
    "read_last_metadata",
    "read_stream_range",
    "refusal_kind",
    "require_nats",
    "source_sequence",
]

T = TypeVar("T")
ItemT = TypeVar("ItemT")

#: Seconds :meth:`NatsThread.stop` waits for the thread to end after its loop was told to stop.
JOIN_TIMEOUT: Final = 5.0
#: The oldest nats-py release with the API used here.
MINIMUM_VERSION: Final = (2, 16)
#: Bytes nats-py reads from its socket at a time, and the limit of its asyncio StreamReader
#: (which pauses the socket past twice that), instead of nats-py's 32 KiB (see
#: :func:`raise_read_size`).
READ_SIZE: Final = 1 << 20

_nats: ModuleType | None = None


class NatsUnavailable(ImportError):
    """nats-py is not installed, or is too old. The message says how to install it."""


def require_nats() -> ModuleType:
    """The ``nats`` package (with ``nats.js`` loaded). Raises :class:`NatsUnavailable`
    naming the extra to install."""
    global _nats
    if _nats is None:
        try:
            module = importlib.import_module("nats")
            importlib.import_module("nats.js")
            importlib.import_module("nats.js.api")
            importlib.import_module("nats.errors")
            version = importlib.import_module("importlib.metadata").version("nats-py")
        except ImportError:
            raise NatsUnavailable(
                "the NATS endpoint needs nats-py: pip install 'framewire[nats]'"
            ) from None
        parts = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
        if parts < MINIMUM_VERSION:
            raise NatsUnavailable(
                f"the NATS endpoint needs nats-py 2.16 or newer (found {version}): "
                "pip install -U 'framewire[nats]'"
            )
        raise_read_size(importlib.import_module("nats.aio.client"))
        _nats = module
    return _nats


def raise_read_size(client_module: ModuleType) -> None:
    """Make nats-py read :data:`READ_SIZE` bytes at a time (it keeps no option for it: its
    ``DEFAULT_BUFFER_SIZE``, which it reads on every connect and every read, is set; never
    lowered).

    With nats-py's 32 KiB, a 64 KiB message took two reads, two calls of its parser and a
    pause and a resume of the socket in asyncio (two epoll syscalls), each a crossing of
    the GIL with the daemon's trio thread, and an 8 MiB one 256 of each. Measured with
    benchmarks/nats_throughput.py (a busy machine, medians of 3): core NATS, 8 MiB frames,
    2.9 CPU seconds per GB on the whole path against 4.9 with 32 KiB reads; 64 KiB frames
    through JetStream about the same either way. What it costs: asyncio buffers up to 2 MiB
    per connection before it stops reading.
    """
    current = getattr(client_module, "DEFAULT_BUFFER_SIZE", None)
    if isinstance(current, int) and current < READ_SIZE:
        setattr(client_module, "DEFAULT_BUFFER_SIZE", READ_SIZE)  # noqa: B010 - not in its stubs


def describe_nats_error(error: BaseException) -> str:
    """One line for an error from nats-py or the server, without the class name when the
    message already says what happened."""
    text = str(error).strip()
    if text.startswith("nats: "):
        text = text[len("nats: ") :]
    name = type(error).__name__
    if isinstance(error, (asyncio.TimeoutError, TimeoutError)):
        return text or "no answer in time"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused (no NATS server listens there)"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower()
    if not text:
        return name
    lowered = text.lower()
    if "authorization violation" in lowered or "authentication" in lowered:
        return f"authorization violation: the server refused the credentials ({text})"
    return text


class NatsThread:
    """A thread running an asyncio loop, for one nats-py client. Start it with :meth:`start`
    (from trio), stop it with :meth:`stop`.

    Raises RuntimeError from :meth:`call` once stopped.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("the NATS thread is not running")
        return self._loop

    @property
    def token(self) -> trio.lowlevel.TrioToken:
        if self._token is None:
            raise RuntimeError("the NATS thread is not running")
        return self._token

    def start(self) -> None:
        """Start the thread and its loop (call from trio; returns once the loop runs)."""
        self._token = trio.lowlevel.current_trio_token()
        loop = asyncio.new_event_loop()
        running = threading.Event()

        def main() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(running.set)
            try:
                loop.run_forever()
            finally:
                with contextlib.suppress(Exception):
                    _cancel_all(loop)
                loop.close()

        self._thread = threading.Thread(target=main, name=f"nats {self.name}", daemon=True)
        self._thread.start()
        running.wait(JOIN_TIMEOUT)
        self._loop = loop

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> Future[T]:
        """Run ``coroutine`` on the loop; its concurrent future."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def call_soon(self, function: Callable[..., object], *args: object) -> None:
        """Run ``function(*args)`` on the loop soon (from any thread)."""
        self.loop.call_soon_threadsafe(function, *args)

    def to_trio(self, function: Callable[..., object], *args: object) -> None:
        """Run ``function(*args)`` in trio soon; nothing happens if trio has finished.

        For the asyncio side: never blocks, never raises.
        """
        with contextlib.suppress(trio.RunFinishedError):
            self.token.run_sync_soon(function, *args)

    async def call(self, make: Callable[[], Awaitable[T]], *, within: float) -> T:
        """Run ``make()`` on the loop and return its result; wait in trio without blocking.

        Raises what the coroutine raised; TimeoutError (after cancelling it) when it takes
        longer than ``within`` seconds. A trio cancellation cancels the coroutine too.
        """
        return await self.begin(make, within=within).result()

    def begin(self, make: Callable[[], Awaitable[T]], *, within: float) -> PendingCall[T]:
        """Start ``make()`` on the loop now and return at once; trio collects the result
        later with :meth:`PendingCall.result` (so the loop works while trio does something
        else: a window of publishes awaiting its acks, the next fetch). ``within`` bounds it
        as for :meth:`call`, counted from now."""

        async def bounded() -> T:
            task = asyncio.ensure_future(make())
            # Cancelled, a nats-py coroutine may end with an error of its own instead (a
            # fetch: "connection closed"), which nobody would retrieve.
            task.add_done_callback(_retrieve)
            return await asyncio.wait_for(task, within)

        return PendingCall(self, self.submit(bounded()), within)

    async def stop(self) -> None:
        """Stop the loop (its tasks are cancelled) and join the thread, in a worker thread so
        trio is not blocked; gives up waiting after :data:`JOIN_TIMEOUT` seconds (the thread is
        a daemon thread: it cannot keep the process alive)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._loop = None
        with contextlib.suppress(RuntimeError):  # already closed
            loop.call_soon_threadsafe(loop.stop)
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(
                functools.partial(thread.join, JOIN_TIMEOUT), abandon_on_cancel=True
            )


class PendingCall(Generic[T]):
    """A coroutine running on a :class:`NatsThread`'s loop, started by
    :meth:`NatsThread.begin`, whose result trio has not collected yet.

    :meth:`result` waits for it (at most its ``within`` plus :data:`JOIN_TIMEOUT`, counted
    from its start: the loop enforces ``within``, this is a backstop should the loop stall)
    and raises what it raised, TimeoutError when it took too long; a trio cancellation of
    that wait cancels the coroutine. :meth:`cancel` cancels it without waiting.
    """

    def __init__(self, nats_thread: NatsThread, future: Future[T], within: float) -> None:
        self._future = future
        self._within = within
        self._deadline = trio.current_time() + within + JOIN_TIMEOUT
        self._done = trio.Event()
        future.add_done_callback(lambda _: nats_thread.to_trio(self._done.set))

    @property
    def done(self) -> bool:
        """Whether the coroutine has finished (and trio has heard of it)."""
        return self._done.is_set()

    def cancel(self) -> None:
        self._future.cancel()

    async def result(self) -> T:
        try:
            with trio.fail_at(self._deadline):
                await self._done.wait()
        except trio.TooSlowError:
            self._future.cancel()
            raise TimeoutError(f"the NATS thread did not answer within {self._within:g}s") from None
        except BaseException:
            self._future.cancel()
            raise
        try:
            return self._future.result()
        except TimeoutError:
            raise TimeoutError(f"no answer from NATS within {self._within:g}s") from None


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark the outcome of ``task`` as seen (asyncio logs exceptions nobody retrieved)."""
    if not task.cancelled():
        task.exception()


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


@attrs.define
class _Slot(Generic[ItemT]):
    item: ItemT
    nbytes: int
    droppable: bool


class Inbox(Generic[ItemT]):
    """Messages handed from the asyncio loop to trio, bounded, waking trio once per batch.

    :meth:`put` (asyncio side) never waits: past ``max_items`` or ``max_bytes`` the oldest
    droppable item (a DATA message) goes, counted in :attr:`dropped`; items that are not
    droppable (metadata) are never dropped, so the bound can be passed by them alone.
    :meth:`take` (trio side) waits for items and takes all of them at once.

    :meth:`hold` keeps trio from taking anything (items still queue, within the bounds) until
    :meth:`release`, which can put items in front of what queued meanwhile (a metadata
    bootstrap goes before the live messages that arrived while it was read).
    """

    def __init__(self, nats_thread: NatsThread, *, max_items: int, max_bytes: int) -> None:
        self._thread = nats_thread
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._slots: deque[_Slot[ItemT]] = deque()
        self._bytes = 0
        self._held = False
        self._wake_scheduled = False
        self._ready = trio.Event()
        #: Items dropped to stay within the bounds.
        self.dropped = 0
        self.dropped_bytes = 0

    @property
    def queued(self) -> int:
        return len(self._slots)

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    # -- asyncio side ----------------------------------------------------------------------

    def put(self, item: ItemT, nbytes: int, *, droppable: bool) -> None:
        with self._lock:
            slots = self._slots
            slots.append(_Slot(item, nbytes, droppable))
            self._bytes += nbytes
            while len(slots) > self.max_items or self._bytes > self.max_bytes:
                if not self._drop_oldest():
                    break
            wake = not self._held and not self._wake_scheduled
            if wake:
                self._wake_scheduled = True
        if wake:
            self._thread.to_trio(self._wake)

    def _drop_oldest(self) -> bool:
        slots = self._slots
        for index, slot in enumerate(slots):
            if slot.droppable and index < len(slots) - 1:
                del slots[index]
                self._bytes -= slot.nbytes
                self.dropped += 1
                self.dropped_bytes += slot.nbytes
                return True
        return False

    def hold(self) -> None:
        with self._lock:
            self._held = True

    def release(
        self,
        front: Iterable[tuple[ItemT, int]] = (),
        *,
        same: Callable[[ItemT, ItemT], bool] | None = None,
    ) -> None:
        """Stop holding; put ``front`` (items and their sizes, never dropped) first, leaving
        out those ``same`` finds already queued."""
        front = list(front)
        with self._lock:
            if same is not None:
                queued = [slot.item for slot in self._slots]
                front = [
                    (item, nbytes)
                    for item, nbytes in front
                    if not any(same(item, other) for other in queued)
                ]
            self._slots.extendleft(reversed([_Slot(item, nbytes, False) for item, nbytes in front]))
            self._bytes = sum(slot.nbytes for slot in self._slots)
            self._held = False
            wake = bool(self._slots) and not self._wake_scheduled
            if wake:
                self._wake_scheduled = True
        if wake:
            self._thread.to_trio(self._wake)

    # -- trio side -------------------------------------------------------------------------

    def _wake(self) -> None:
        self._ready.set()

    async def take(self) -> list[ItemT]:
        """Wait until items are queued (and not held); return all of them, oldest first."""
        while True:
            with self._lock:
                self._wake_scheduled = False
                if self._slots and not self._held:
                    slots, self._slots = self._slots, deque()
                    self._bytes = 0
                    break
            await self._ready.wait()
            self._ready = trio.Event()
        await trio.lowlevel.checkpoint()
        return [slot.item for slot in slots]


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


def refusal_kind(outcome: AckOutcome) -> str:
    """What a refused publish means: ``too_large``, ``stream_full``, ``throttled`` (429),
    ``unavailable`` (503: no stream, no leader), ``out_of_order`` (the message before it was
    not the stream's last: see :data:`ERR_WRONG_LAST_MSG_ID`), ``no_ack`` or ``refused``.

    JetStream reports a full stream (``discard = "new"``: "maximum bytes/messages exceeded")
    and a message over a limit ("message too large", "message size exceeds maximum allowed")
    under one error code, 10077 (store failed), so the description decides.
    """
    text = outcome.description.lower()
    if outcome.err_code == ERR_WRONG_LAST_MSG_ID:
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
        description = headers.get("Description") or (
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
        for message in messages:
            reply = f"{self._prefix}.{self._next}"
            self._next += 1
            future: asyncio.Future[AckOutcome] = loop.create_future()
            self._futures[reply] = future
            waiting.append((reply, future))
            try:
                # A memoryview works: nats-py concatenates the payload to the command.
                payload = cast("bytes", message.payload)
                await client.publish(message.subject, payload, reply=reply, headers=message.headers)
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
        frames = api.StreamConfig(
            name=self.stream,
            subjects=[f"{self.subject}.>"],
            max_bytes=self.max_bytes or -1,
            max_age=self.max_age or None,
            discard=api.DiscardPolicy(self.discard),
            duplicate_window=self.duplicate_window,
            **common,
        )
        meta = api.StreamConfig(
            name=self.meta_stream,
            sources=[api.StreamSource(name=self.stream, filter_subject=meta_subjects)],
            max_msgs_per_subject=1,
            **common,
        )
        return [frames, meta]


async def ensure_streams(js: Any, layout: StreamLayout) -> list[str]:
    """Create the layout's streams (or update them to the configuration), or with
    ``create = false`` check that they exist. Returns what was done, one line each.

    Raises MissingStream, and nats-py's errors (an APIError says what the server refused).
    """
    errors = importlib.import_module("nats.js.errors")
    done = []
    for config in layout.configs():
        try:
            await js.stream_info(config.name)
        except errors.NotFoundError:
            if not layout.create:
                raise MissingStream(
                    f"JetStream stream {config.name} does not exist (create = false: make it, "
                    "or set create = true)"
                ) from None
            await js.add_stream(config)
            done.append(f"created JetStream stream {config.name}")
            continue
        if layout.create:
            await js.update_stream(config)
    return done


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
            origin = message.seq if name == layout.stream else source_sequence(message.headers)
            found[subject] = (origin, message)
    return list(found.values())


async def read_stream_range(
    js: Any, stream: str, subject: str, first: int, count: int
) -> list[tuple[str, dict[str, str] | None, bytes]]:
    """Messages ``first`` to ``first + count - 1`` of ``stream`` on ``SUBJECT.>`` (subject,
    headers, payload), in order, read one by one; those the stream no longer holds, and those
    on other subjects, are left out.

    Raises nats-py's errors but NotFoundError."""
    errors = importlib.import_module("nats.js.errors")
    prefix = f"{subject}."
    found = []
    for sequence in range(first, first + count):
        try:
            message = await js.get_msg(stream, sequence)
        except errors.NotFoundError:
            continue
        if message.subject.startswith(prefix):
            found.append((message.subject, message.headers, message.data or b""))
    return found


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
