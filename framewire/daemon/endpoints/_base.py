"""What every endpoint shares: its context, its status record and its stop request."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import ClassVar, Final, Generic, TypeVar

import attrs
import trio

from ...config import Address, EndpointConfig, TLSConfig, format_duration, format_size
from ..lograte import RateLimitedWarning
from ..stream import StreamRegistry, Subscription
from ..transport import (
    ACCEPT_RETRY_ERRNOS,
    DEFAULT_SOCKET_MODE,
    Connection,
    Connector,
    HandshakeFailed,
    TLSListener,
    client_tls_context,
    connector_for,
    open_listeners,
    peer_name,
    server_tls_context,
    tls_connector,
)

__all__ = [
    "ClientInfo",
    "Endpoint",
    "EndpointContext",
    "EndpointStatus",
    "QueueClosed",
    "Transports",
    "stream_label",
]

ConfigT = TypeVar("ConfigT", bound=EndpointConfig)

#: Seconds between two tries of an accept() that failed for lack of descriptors or memory.
ACCEPT_RETRY_DELAY: Final = 0.1


def _listening_key(address: Address) -> tuple[str, str | None, int]:
    """What a listening socket is bound to: a TLS and a plain address on one port share it."""
    if address.is_unix:
        return ("unix", address.path, 0)
    return ("tcp", address.host, address.port)


class _HandedOver(trio.abc.Listener[trio.abc.Stream]):
    """A plain listener that :class:`Transports` may keep open when its endpoint closes it,
    for the endpoint's successor (a reload), instead of closing it."""

    def __init__(
        self,
        transports: Transports,
        key: tuple[str, str | None, int],
        listener: trio.abc.Listener[trio.abc.Stream],
    ) -> None:
        self.transports = transports
        self.key = key
        self.listener = listener
        self._closed = False
        self._accepting: set[trio.CancelScope] = set()

    async def accept(self) -> trio.abc.Stream:
        """The next connection. Raises trio.ClosedResourceError once this listener is
        closed, also in a task waiting here when it is: a parked socket is not closed, so
        its waiting acceptors are cancelled instead and no connection goes to the old
        endpoint."""
        if self._closed:
            raise trio.ClosedResourceError("the listener was closed")
        with trio.CancelScope() as scope:
            self._accepting.add(scope)
            try:
                return await self.listener.accept()
            finally:
                self._accepting.discard(scope)
        raise trio.ClosedResourceError("the listener was closed")

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        for scope in self._accepting:
            scope.cancel()
        if self.key in self.transports._holding:
            self.transports._parked.setdefault(self.key, []).append(self.listener)
            await trio.lowlevel.checkpoint()
        else:
            await self.listener.aclose()


class Transports:
    """Makes listeners and connectors from addresses. Tests substitute memory transports.

    Subclasses override :meth:`listen` and :meth:`connector` (the plain byte transport);
    endpoints call :meth:`bind` and :meth:`dial`, which add TLS on top of those, so TLS can
    be tested over memory streams too.

    Listening sockets can be handed from an endpoint to its successor: while an address is
    held (:meth:`hold`), an endpoint closing its listener on it leaves the socket open and
    parked, and the next :meth:`bind` of that address takes it. Connections arriving in
    between wait in the socket's backlog instead of being refused. :meth:`release` closes
    whatever no successor took.
    """

    def __init__(self) -> None:
        self._holding: set[tuple[str, str | None, int]] = set()
        self._parked: dict[tuple[str, str | None, int], list[trio.abc.Listener[trio.abc.Stream]]]
        self._parked = {}

    def hold(self, address: Address) -> None:
        """Keep listeners on ``address`` open when their endpoint closes them, for the next
        :meth:`bind` of it (port 0 is never held: a successor gets a new port anyway)."""
        if address.is_unix or address.port:
            self._holding.add(_listening_key(address))

    def holds(self, address: Address) -> bool:
        """Whether ``address`` is held (a :meth:`bind` of it will take the parked sockets)."""
        return _listening_key(address) in self._holding

    async def release(self) -> None:
        """Stop holding; close the parked listeners nobody took."""
        self._holding.clear()
        parked, self._parked = self._parked, {}
        for listeners in parked.values():
            for listener in listeners:
                await trio.aclose_forcefully(listener)

    async def listen(self, address: Address) -> Sequence[trio.abc.Listener[trio.abc.Stream]]:
        return await open_listeners(address)

    def connector(self, address: Address) -> Connector:
        return connector_for(address)

    async def bind(
        self,
        address: Address,
        *,
        tls: TLSConfig | None = None,
        socket_mode: int = DEFAULT_SOCKET_MODE,
    ) -> Sequence[trio.abc.Listener[trio.abc.Stream]]:
        """Listen on ``address``: a UNIX socket file gets ``socket_mode``; with ``tls`` every
        accepted stream is a TLS server stream (finish it with ``Connection.establish``). A
        listener parked for ``address`` (see :meth:`hold`) is taken instead of binding anew.

        Raises OSError when it cannot listen, ValueError when a TLS file cannot be used.
        """
        context = server_tls_context(tls) if tls is not None else None
        key = _listening_key(address)
        plain: Sequence[trio.abc.Listener[trio.abc.Stream]] | None = self._parked.pop(key, None)
        if plain is None:
            if address.is_unix:
                plain = await open_listeners(address, socket_mode=socket_mode)
            else:
                plain = await self.listen(address)
        listeners: list[trio.abc.Listener[trio.abc.Stream]] = [
            _HandedOver(self, key, listener) for listener in plain
        ]
        if tls is None or context is None:
            return listeners
        return [
            TLSListener(listener, context, handshake_timeout=tls.handshake_timeout)
            for listener in listeners
        ]

    def dial(self, address: Address, *, tls: TLSConfig | None = None) -> Connector:
        """A connector for ``address``; with ``tls`` it returns streams whose TLS handshake
        is done (a failed one raises ConnectionError). Raises ValueError when a TLS file
        cannot be used."""
        connector = self.connector(address)
        if tls is None:
            return connector
        return tls_connector(
            connector,
            client_tls_context(tls),
            address=address,
            server_name=tls.server_name,
            handshake_timeout=tls.handshake_timeout,
        )


@attrs.define
class EndpointContext:
    """What the daemon hands every endpoint."""

    streams: StreamRegistry
    transports: Transports = attrs.field(factory=Transports)


@attrs.define(eq=False)
class ClientInfo:
    """One connected peer of an endpoint, as shown in status."""

    peer: str
    connected_since: float = attrs.field(factory=time.time)
    subscription: Subscription | None = None
    frames_in: int = 0
    bytes_in: int = 0
    #: Frames and bytes written to the peer's socket (clients a server feeds), but for
    #: what a direct group still owes: read :attr:`frames_sent` and :attr:`bytes_sent`.
    _frames_sent: int = 0
    _bytes_sent: int = 0
    #: Frames left out because the peer's protocol cannot carry them.
    frames_unencodable: int = 0

    def _owed(self) -> tuple[int, int]:
        subscription = self.subscription
        if isinstance(subscription, Subscription):
            return subscription.direct_owed
        return (0, 0)

    @property
    def frames_sent(self) -> int:
        """Frames written to the peer's socket (clients a server feeds), exact whenever read:
        with what its subscription's direct group wrote and has not yet settled."""
        return self._frames_sent + self._owed()[0]

    @frames_sent.setter
    def frames_sent(self, frames: int) -> None:
        self._frames_sent = frames - self._owed()[0]

    @property
    def bytes_sent(self) -> int:
        """Bytes written to the peer's socket, as written (see :attr:`frames_sent`)."""
        return self._bytes_sent + self._owed()[1]

    @bytes_sent.setter
    def bytes_sent(self, nbytes: int) -> None:
        self._bytes_sent = nbytes - self._owed()[1]

    def count_sent(self, frames: int, nbytes: int) -> None:
        """Add ``frames`` frames and ``nbytes`` bytes written to the peer's socket."""
        self._frames_sent += frames
        self._bytes_sent += nbytes


@attrs.define
class EndpointStatus:
    """Live figures of one endpoint. Counters only grow; restarts survive restarts.

    Raising :attr:`frames_in` or :attr:`frames_out` (endpoints add a whole batch at once)
    also stamps when a frame last went that way, on :attr:`clock`: see
    :meth:`last_frame_at`.
    """

    kind: str
    state: str = "starting"
    address: list[str] = attrs.field(factory=list)
    _frames_in: int = 0
    bytes_in: int = 0
    _frames_out: int = 0
    bytes_out: int = 0
    frames_dropped: int = 0
    #: Frames decimation left out for clients that have gone (live clients' are added in
    #: status).
    frames_decimated: int = 0
    restarts: int = 0
    #: The last problem (a crash, a failed connect, a peer's bad bytes) and when it happened
    #: (Unix time). Set them with :meth:`record_error`; ``state`` tells whether the endpoint
    #: is healthy again.
    last_error: str | None = None
    last_error_at: float | None = None
    clients: dict[int, ClientInfo] = attrs.field(factory=dict)
    detail: dict[str, object] = attrs.field(factory=dict)
    #: Called before :attr:`detail` is read (:meth:`current_detail`), to bring figures that
    #: change without the endpoint running (a memory buffer's fill) up to date.
    refresh: Callable[[], None] | None = attrs.field(default=None, repr=False, eq=False)
    #: The clock of the last-frame stamps (seconds; only differences mean anything).
    clock: Callable[[], float] = attrs.field(default=time.monotonic, repr=False, eq=False)
    #: When :attr:`frames_in` and :attr:`frames_out` last grew, on :attr:`clock`.
    _frame_in_at: float | None = attrs.field(default=None, init=False, repr=False, eq=False)
    _frame_out_at: float | None = attrs.field(default=None, init=False, repr=False, eq=False)

    @property
    def frames_in(self) -> int:
        """Frames the endpoint received (from peers, or read from its source)."""
        return self._frames_in

    @frames_in.setter
    def frames_in(self, frames: int) -> None:
        if frames > self._frames_in:
            self._frame_in_at = self.clock()
        self._frames_in = frames

    @property
    def frames_out(self) -> int:
        """Frames the endpoint wrote to peers or published into a stream."""
        return self._frames_out

    @frames_out.setter
    def frames_out(self, frames: int) -> None:
        if frames > self._frames_out:
            self._frame_out_at = self.clock()
        self._frames_out = frames

    def last_frame_at(self, direction: str) -> float | None:
        """When :attr:`frames_in` (``direction`` "in") or :attr:`frames_out` ("out") last
        grew, on :attr:`clock`; None if it never has. Raises ValueError for another
        ``direction``."""
        if direction == "in":
            return self._frame_in_at
        if direction == "out":
            return self._frame_out_at
        raise ValueError(f"no direction {direction!r}: 'in' or 'out'")

    def current_detail(self) -> dict[str, object]:
        """A copy of :attr:`detail`, up to date (see :attr:`refresh`)."""
        if self.refresh is not None:
            self.refresh()
        return dict(self.detail)

    @property
    def dropped_total(self) -> int:
        """Data frames dropped: by clients already gone, and by the live clients' queues."""
        return self.frames_dropped + sum(
            client.subscription.frames_dropped
            for client in list(self.clients.values())
            if client.subscription is not None
        )

    @property
    def decimated_total(self) -> int:
        """Frames decimation left out: for clients already gone, and for the live ones."""
        return self.frames_decimated + sum(
            client.subscription.frames_decimated
            for client in list(self.clients.values())
            if client.subscription is not None
        )

    def record_error(self, text: str) -> None:
        """Remember ``text`` as the last problem, stamped with the time."""
        self.last_error = text
        self.last_error_at = time.time()


class Endpoint(Generic[ConfigT]):
    """Base class. Subclasses implement :meth:`run` and set :attr:`kind`.

    ``run`` is started with ``nursery.start``: it calls ``task_status.started()`` once it is
    bound (listening, or ready to connect) and then runs until it is cancelled, until
    :meth:`request_stop` is honoured, or until its work is done. An exception escaping ``run``
    is a crash; the supervisor logs it and restarts the endpoint.
    """

    kind: ClassVar[str]
    #: Pure sources that publish as soon as they start (a file, a generator) start after
    #: every other endpoint, so that the subscribers of their stream exist before the first
    #: frame is published.
    starts_last: ClassVar[bool] = False

    #: The configuration fields a reload may change on the running endpoint, keeping its
    #: connections (see :meth:`live_changes` and :meth:`reconfigure`); a change to any other
    #: field restarts it.
    live_fields: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, name: str, config: ConfigT, context: EndpointContext) -> None:
        self.name = name
        self.config = config
        self.context = context
        self.log = logging.getLogger(f"framewire.endpoint.{name}")
        self.status = EndpointStatus(kind=self.kind)
        self._stop_requested = trio.Event()
        self._accept_failures = RateLimitedWarning(
            self.log,
            f"accept failed; retrying every {ACCEPT_RETRY_DELAY * 1000:.0f} ms",
            detail=self.status.detail,
            key="accept_failures",
        )

    def live_changes(self, config: EndpointConfig) -> list[str] | None:
        """What a reload to ``config`` changes, one ``field old -> new`` each (nested tables
        field by field: ``reconnect.initial 0.5 -> 1``), when every change is to one of
        :attr:`live_fields` and :meth:`reconfigure` can apply it; None when the endpoint must
        be restarted for it (another kind, or any other field changed). Never raises."""
        current = self.config
        if type(config) is not type(current) or not self.takes_live_changes():
            return None
        changes: list[str] = []
        for field in attrs.fields(type(config)):
            old, new = getattr(current, field.name), getattr(config, field.name)
            if old == new:
                continue
            if field.name not in self.live_fields:
                return None
            changes += _describe_change(field.name, old, new, _type_name(type(config), field.name))
        return changes

    def takes_live_changes(self) -> bool:
        """Whether :attr:`live_fields` apply to this endpoint as configured (a link without
        ``subscribe`` has no queue to change, say); else every change restarts it."""
        return True

    def reconfigure(self, config: ConfigT) -> None:
        """Apply ``config``, whose changes :meth:`live_changes` accepted, to the running
        endpoint and its connections (a reload). Subclasses that declare
        :attr:`live_fields` push the new values into what exists; this base swaps
        :attr:`config`, which is read wherever a value is used anew. Must not raise."""
        self.config = config

    def request_stop(self) -> None:
        """Ask the endpoint to finish gracefully: stop accepting, let clients drain, return."""
        self._stop_requested.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested.is_set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        raise NotImplementedError

    async def _establish(self, stream: trio.abc.Stream) -> Connection | None:
        """A :class:`Connection` for an accepted ``stream``, its TLS handshake (if any)
        done within the configured timeout; None, after one log line, if the handshake
        failed (the caller closes ``stream``)."""
        tls: TLSConfig | None = getattr(self.config, "tls", None)
        timeout = tls.handshake_timeout if tls is not None else 10.0
        connection = Connection(stream, handshake_timeout=timeout)
        try:
            await connection.establish()
        except HandshakeFailed as exc:
            self.log.warning("%s", str(exc))  # a string: a kept record must not pin the stream
            return None
        return connection

    async def _serve_one(
        self, serve: Callable[[trio.abc.Stream], Awaitable[None]], stream: trio.abc.Stream
    ) -> None:
        """Run ``serve(stream)`` for one peer as the boundary of that peer's task.

        Handlers turn everything a peer can cause into an outcome; an exception that still
        escapes is a bug, and it must cost only that peer: it is logged with its traceback,
        the connection is closed, and the endpoint's other peers carry on.
        """
        try:
            await serve(stream)
        except Exception:
            self.log.exception(
                "connection from %s failed unexpectedly and was closed; others carry on",
                peer_name(stream),
            )
            await trio.aclose_forcefully(stream)

    async def _accept(self, listener: trio.abc.Listener[trio.abc.Stream]) -> trio.abc.Stream:
        """The next connection on ``listener``.

        When the process is out of descriptors or memory (EMFILE, ENFILE, ENOMEM, ENOBUFS)
        it waits 100 ms and tries again rather than failing the endpoint, for as long as that
        lasts; each failure is counted in ``detail.accept_failures`` and logged at most once
        per 10 seconds (with counts). Other errors propagate.
        """
        while True:
            try:
                return await listener.accept()
            except OSError as exc:
                if exc.errno not in ACCEPT_RETRY_ERRNOS:
                    raise
                self._accept_failures(str(exc))
                await trio.sleep(ACCEPT_RETRY_DELAY)

    async def _until_stop_requested(self, cancel_scope: trio.CancelScope) -> None:
        """Cancel ``cancel_scope`` once a stop is requested (run it in the scope's nursery)."""
        await self._stop_requested.wait()
        cancel_scope.cancel()


def _describe_change(name: str, old: object, new: object, kind: str) -> list[str]:
    """``name old -> new`` for a reload's log line, values as a file would write them (of
    the field type ``kind``: sizes and durations with their units); a nested table field by
    field."""
    cls = type(old)
    if attrs.has(cls) and type(new) is cls:
        lines: list[str] = []
        for field in attrs.fields(cls):
            before, after = getattr(old, field.name), getattr(new, field.name)
            if before != after:
                kind = _type_name(cls, field.name)
                lines += _describe_change(f"{name}.{field.name}", before, after, kind)
        return lines
    return [f"{name} {_show(old, kind)} -> {_show(new, kind)}"]


def _type_name(cls: type, name: str) -> str:
    """The annotation of field ``name`` of the config class ``cls`` as written
    (``PositiveDuration``); the field's own type is resolved (an Annotated type)."""
    return str(getattr(cls, "__annotations__", {}).get(name, ""))


def _show(value: object, kind: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and kind.endswith("Size"):
        return format_size(value)
    if isinstance(value, int | float) and kind.endswith("Duration"):
        return format_duration(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key} = {item}" for key, item in value.items()) + "}"
    return str(value)


class QueueClosed(RuntimeError):
    """An endpoint's outgoing subscription was cut off (its metadata passed the hard cap).

    Raised out of an endpoint's run so the supervisor restarts it with a fresh subscription.
    """


def stream_label(name: str | None) -> str:
    """A configured stream name for a log line: quoted, or ``nothing`` when not configured."""
    return "nothing" if name is None else repr(name)
