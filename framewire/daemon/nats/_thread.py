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

JetStream's side (acks, the streams, reading them back) is in :mod:`._jetstream`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import logging
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from concurrent.futures import Future
from types import ModuleType
from typing import Any, Final, Generic, TypeVar

import attrs
import trio

__all__ = [
    "Inbox",
    "NatsThread",
    "NatsUnavailable",
    "PendingCall",
    "describe_nats_error",
    "guard_late_pongs",
    "pings_outstanding",
    "raise_read_size",
    "require_nats",
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
        client_module = importlib.import_module("nats.aio.client")
        raise_read_size(client_module)
        guard_late_pongs(client_module)
        _quiet_tls_eof()
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


def guard_late_pongs(client_module: ModuleType) -> None:
    """Make nats-py 2.16 take a PONG whose waiter has given up without dying.

    nats-py answers each PONG by resolving the oldest PING's future. A ``flush()`` that timed
    out leaves its future cancelled in that list; when the PONG comes after all (a link that
    stalled, then came back), setting its result raises ``InvalidStateError`` inside the
    read loop, which ends it: the client then says it is connected and reads nothing until
    its pings find the connection stale (minutes with nats-py's defaults). The guarded
    version skips futures already done. Installed once, on nats-py's Client class.
    """
    client = getattr(client_module, "Client", None)
    original = getattr(client, "_process_pong", None)
    if client is None or original is None or getattr(original, "_framewire_guarded", False):
        return

    async def process_pong(self: Any) -> None:
        pongs = self._pongs
        if pongs and pongs[0].done():
            # The PONG of a PING whose waiter gave up: it still says the link is alive.
            pongs.pop(0)
            self._pongs_received += 1
            self._pings_outstanding = 0
            return
        await original(self)

    process_pong._framewire_guarded = True  # type: ignore[attr-defined]
    setattr(client, "_process_pong", process_pong)  # noqa: B010 - a private method


class _TlsEofNoise(logging.Filter):
    """Drops asyncio's "returning true from eof_received() has no effect when using ssl".

    nats-py upgrades its connection to TLS with a stream protocol made for the plain one, so
    at every disconnection over TLS asyncio logs this warning, which says nothing about the
    connection (it closes either way)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "eof_received() has no effect when using ssl" not in record.getMessage()


def _quiet_tls_eof() -> None:
    log = logging.getLogger("asyncio")
    if not any(isinstance(each, _TlsEofNoise) for each in log.filters):
        log.addFilter(_TlsEofNoise())


def pings_outstanding(client: Any) -> int:
    """PINGs nats-py has sent that no PONG has answered yet (0 when it cannot tell: nats-py
    keeps the count privately)."""
    value = getattr(client, "_pings_outstanding", 0)
    return value if isinstance(value, int) else 0


def describe_nats_error(error: BaseException) -> str:
    """One line for an error from nats-py or the server, without the class name when the
    message already says what happened."""
    api = _api_error_text(error)
    if api is not None:
        return api
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


#: What a JetStream API error without a description means, by its status code.
_API_STATUS: Final = {
    400: "the request was refused as malformed",
    404: "not found",
    408: "the request timed out on the server",
    429: "too many requests",
    500: "the server failed",
    503: "JetStream did not answer (no responders: JetStream is off, or the stream has no leader)",
}


#: The status code nats-py's JetStream error classes stand for.
_API_CLASS_STATUS: Final = {
    "BadRequestError": 400,
    "NotFoundError": 404,
    "ServerError": 500,
    "ServiceUnavailableError": 503,
}


def _api_error_text(error: BaseException) -> str | None:
    """One line for nats-py's JetStream ``APIError`` family (``code``, ``err_code``,
    ``description``), whose own text shows ``description='None'`` when the server gave
    none; None for other errors."""
    if not hasattr(error, "err_code") or not hasattr(error, "description"):
        return None
    code = getattr(error, "code", None)
    if not isinstance(code, int):
        # nats-py makes some without one (a ServiceUnavailableError when JetStream gave no
        # answer): the class says which.
        code = _API_CLASS_STATUS.get(type(error).__name__, 0)
    description = getattr(error, "description", None)
    if not isinstance(description, str) or not description or description == "None":
        description = _API_STATUS.get(code, "refused")
    err_code = getattr(error, "err_code", None)
    if not code:
        return description
    codes = f"{code}/{err_code}" if isinstance(err_code, int) and err_code else str(code)
    return f"{description} ({codes})"


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
