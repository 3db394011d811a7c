"""The status port: the status websocket (a JSON snapshot on connect, then one per
interval), and plain HTTP on the same listener: ``GET /`` the dashboard page, ``/metrics``
Prometheus metrics, ``/status.json`` one snapshot, 404 for anything else (see docs/status.md).

The schema is documented, with its version, in docs/status.md. One task builds and encodes
each snapshot once; every client handler sends the newest one it has not sent yet, so a slow
client skips snapshots instead of queueing them, and a client that does not take a snapshot
within ``send_timeout`` is closed. Nothing a status client does can stall the daemon.

Nothing a status client sends can take the daemon down either. :class:`StatusServer` runs its
own accept loop (as hypercorn's trio worker does) rather than trio-websocket's
``serve_websocket``: every accepted connection is served by :meth:`StatusServer._serve_connection`
in a task of its own with a nursery of its own, which also hosts trio-websocket's reader
task for that connection. Whatever that connection's bytes make go wrong (a malformed
handshake that wsproto chokes on, a request our own code cannot parse) ends there, with one
log line naming the peer and the reason, and the connection closed. Only a broken listener
makes :meth:`StatusServer.run` fail; the daemon restarts it (see ``service.py``).

Each connection's request head is read and parsed (with h11) first; a websocket upgrade is
handed on to trio-websocket with those bytes replayed, any other request is answered here in
one response and closed.

This module does not know the daemon: :func:`build_snapshot` reads anything shaped like
:class:`DaemonView`, and the metrics come from a callable (``service.py`` passes
:meth:`framewire.daemon.metrics.DaemonMetrics.exposition`).
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Final, Protocol, TypeAlias
from urllib.parse import parse_qs

import h11
import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    wrap_server_stream,
)

from .._version import __version__
from .dashboard import DASHBOARD
from .history import HistoryWriter
from .lograte import RateLimitedWarning
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import MetricsView
from .nats import EmbeddedNatsServer
from .rates import RateMeter
from .stream import Stream
from .transport import ACCEPT_RETRY_ERRNOS, peer_name

__all__ = [
    "SCHEMA",
    "DaemonView",
    "ListenerFactory",
    "StatusServer",
    "build_snapshot",
    "pid_namespace",
]

log = logging.getLogger("framewire.status")

SCHEMA: Final = "framewire.status/1"
#: Close codes (RFC 6455): going away, policy violation.
_GOING_AWAY, _POLICY = 1001, 1008
#: Seconds a client has, from its connection, to finish the opening handshake.
HANDSHAKE_TIMEOUT: Final = 5.0
#: Connections still in their handshake, beyond the connected clients, that the server keeps
#: open at once; further ones are closed at once (a client that opens many connections and
#: sends nothing must not use up the daemon's file descriptors).
HANDSHAKE_SLOTS: Final = 32
#: Seconds to wait before accepting again after EMFILE, ENFILE, ENOMEM or ENOBUFS.
ACCEPT_RETRY_DELAY: Final = 0.1
#: Largest message a status client may send; any message closes it anyway.
_MAX_CLIENT_MESSAGE: Final = 4096
#: Largest request head (request line and headers) a status client may send (HTTP 431).
MAX_REQUEST_HEAD: Final = 16 * 1024

#: Opens the status server's listeners. Raises OSError when it cannot.
ListenerFactory: TypeAlias = Callable[[], Awaitable[Sequence[trio.abc.Listener[trio.abc.Stream]]]]


class DaemonView(MetricsView, Protocol):
    """What :func:`build_snapshot` reads from the daemon: what /metrics reads, and more."""

    @property
    def source(self) -> str: ...
    @property
    def status_server(self) -> StatusServer | None: ...
    @property
    def nats_server(self) -> EmbeddedNatsServer | None: ...


@functools.cache
def pid_namespace() -> str | None:
    """Which machine boot and PID namespace this process's pid belongs to (Linux:
    ``BOOT_ID/pid:[INODE]``), so that ``framewire reload`` can tell whether the pid in a status
    snapshot is one it may signal; None where the system does not say."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def build_snapshot(daemon: DaemonView, rates: RateMeter | None = None) -> dict[str, Any]:
    """The status document for ``daemon``, with the rates ``rates`` last measured (zeros
    without it): see docs/status.md."""
    now = time.time()
    rates = rates or RateMeter()
    endpoints: dict[str, Any] = {}
    for name, endpoint in daemon.endpoints.items():
        status = endpoint.status
        clients = []
        for client in list(status.clients.values()):
            entry: dict[str, Any] = {
                "peer": client.peer,
                "connected_since": round(client.connected_since, 3),
                "rates": rates.client(client),
            }
            subscription = client.subscription
            if subscription is not None:
                entry.update(
                    queue_frames=subscription.queued_frames,
                    queue_bytes=subscription.queued_bytes,
                    queue_max_frames=subscription.bounds.max_frames,
                    queue_max_bytes=subscription.bounds.max_bytes,
                    frames_sent=client.frames_sent,
                    bytes_sent=client.bytes_sent,
                    frames_dropped=subscription.frames_dropped,
                    frames_decimated=subscription.frames_decimated,
                    frames_unencodable=client.frames_unencodable,
                    frames_in_flight=subscription.frames_out
                    - client.frames_sent
                    - client.frames_unencodable,
                )
            else:
                entry.update(frames_received=client.frames_in, bytes_received=client.bytes_in)
            clients.append(entry)
        endpoints[name] = {
            "kind": status.kind,
            "state": status.state,
            "address": list(status.address),
            "frames_in": status.frames_in,
            "bytes_in": status.bytes_in,
            "frames_out": status.frames_out,
            "bytes_out": status.bytes_out,
            "rates": rates.endpoint(name),
            "frames_dropped": status.dropped_total,
            "frames_decimated": status.decimated_total,
            "restarts": status.restarts,
            "last_error": status.last_error,
            "last_error_at": status.last_error_at,
            "detail": status.current_detail(),
            "clients": clients,
        }
    streams = {
        stream.name: {
            "frames_in": stream.frames_in,
            "bytes_in": stream.bytes_in,
            "subscribers": len(stream.subscriptions),
            "metadata_cached": len(stream.metadata),
            "metadata_bytes": stream.metadata.nbytes,
            "metadata_refused": stream.metadata_refused,
            "metadata_types": list(dict.fromkeys(frame.type for frame in stream.metadata)),
            "history": stream.history.detail()
            if isinstance(stream.history, HistoryWriter)
            else None,
            **_held(stream),
        }
        for stream in daemon.streams
    }
    return {
        "schema": SCHEMA,
        "time": round(now, 3),
        "rate_interval": None if rates.interval is None else round(rates.interval, 3),
        "daemon": {
            "version": __version__,
            "pid": os.getpid(),
            "pid_namespace": pid_namespace(),
            "state": daemon.state,
            "started_at": round(daemon.started_at, 3),
            "uptime": round(now - daemon.started_at, 3),
            "config": daemon.source,
            "last_reload": daemon.last_reload,
            "status_server": _server_health(daemon.status_server),
            "nats_server": None if daemon.nats_server is None else daemon.nats_server.snapshot(),
        },
        "endpoints": endpoints,
        "streams": streams,
    }


def _held(stream: Stream) -> dict[str, Any]:
    """Whether and by whom ``stream`` is held (see docs/status.md, ``streams.NAME``)."""
    since = stream.held_since
    return {
        "held_by": stream.held_by,
        "held_since": None if since is None else round(since, 3),
        "held_for": round(stream.held_for, 3),
        "held_seconds": round(stream.held_seconds, 3),
        "holds": stream.holds,
        "holders": [
            {
                "endpoint": hold.subscription.owner,
                "subscription": hold.subscription.label,
                "since": round(hold.since_unix, 3),
                "held_for": round(hold.held_for, 3),
                "queue_frames": hold.subscription.queued_frames,
                "queue_bytes": hold.subscription.queued_bytes,
                "queue_max_frames": hold.subscription.bounds.max_frames,
                "queue_max_bytes": hold.subscription.bounds.max_bytes,
            }
            for hold in stream.holding()
        ],
    }


def _server_health(server: StatusServer | None) -> dict[str, Any] | None:
    if server is None:
        return None
    return {"state": server.state, "restarts": server.restarts, "last_error": server.last_error}


class StatusServer:
    """Serves snapshots from ``snapshot()`` every ``interval`` seconds to websocket clients.

    With ``token`` set, a client must send ``Authorization: Bearer <token>`` or put
    ``?token=<token>`` in the URL; others are refused with HTTP 401 (a body that says
    both ways). Beyond ``max_clients``
    clients are refused with HTTP 503. A client that does not finish its handshake within
    ``handshake_timeout``, sends any message, or does not take a snapshot within
    ``send_timeout`` is closed.

    ``listen`` opens the listeners (by default TCP on ``host``:``port``); tests pass their
    own. ``history``, when given, is what a client that asks with ``?history=1`` (on the
    websocket, its first snapshot; on /status.json) gets as the snapshot's ``history``
    field: the recent rates a dashboard draws at once. :attr:`state` becomes "running"
    once :meth:`run` listens; whoever restarts the
    server (the daemon) keeps :attr:`restarts`, :attr:`last_error` and the other states.
    The snapshot shows all three. Refusals and dropped connections are logged at most once
    per 10 s each, with counts.
    """

    def __init__(
        self,
        snapshot: Callable[[], dict[str, Any]],
        *,
        host: str,
        port: int,
        interval: float,
        token: str | None = None,
        max_clients: int = 32,
        send_timeout: float = 10.0,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        listen: ListenerFactory | None = None,
        tick: Callable[[], None] | None = None,
        metrics: Callable[[], bytes] | None = None,
        history: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self._snapshot = snapshot
        self._history = history
        self._tick = tick
        self._metrics = metrics
        self.host, self.port = host, port
        self.interval = interval
        self.token = token
        self.max_clients = max_clients
        self.send_timeout = send_timeout
        self.handshake_timeout = handshake_timeout
        self._listen = listen or self._open_tcp_listeners
        #: Connected clients (handshake accepted, or being accepted).
        self.clients = 0
        #: Open connections: clients plus connections still in their handshake.
        self.connections = 0
        self.state = "starting"
        self.restarts = 0
        self.last_error: str | None = None
        self._latest = b""
        self._generation = 0
        self._changed = trio.Event()
        self._dropped = RateLimitedWarning(log, "status connection dropped")
        self._refused = RateLimitedWarning(log, "status client refused")
        self._accept_failed = RateLimitedWarning(log, "status websocket cannot accept")

    def _encode(self, *, history: bool = False) -> bytes:
        """A snapshot, encoded; with ``history`` (and a source of it), its ``history`` too."""
        snapshot = self._snapshot()
        if history and self._history is not None:
            snapshot["history"] = self._history()
        return json.dumps(snapshot, separators=(",", ":")).encode()

    def refresh(self) -> None:
        """Take the interval's readings (``tick``), build a new snapshot now and wake every
        client."""
        if self._tick is not None:
            self._tick()
        self._latest = self._encode()
        self._generation += 1
        self._changed.set()
        self._changed = trio.Event()

    async def _open_tcp_listeners(self) -> Sequence[trio.abc.Listener[trio.abc.Stream]]:
        # backlog=None: trio asks for the largest backlog; the kernel caps it at somaxconn.
        return await trio.open_tcp_listeners(self.port, host=self.host or None, backlog=None)

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``task_status.started`` gets the bound port.

        Raises OSError if it cannot listen, or if the dashboard page's files cannot be read
        (a broken installation). The page is read here, once: a package upgraded under a
        running daemon (``pip install -U``) changes nothing it serves. After it started, it
        raises only if a listener fails (an accept error other than running out of
        descriptors or memory, which are waited out); every connection's own failures stay
        inside that connection.
        """
        _ = DASHBOARD.page  # read now, not at the first request
        listeners = await self._listen()
        try:
            self.refresh()
            async with trio.open_nursery() as connections, trio.open_nursery() as server:
                for listener in listeners:
                    server.start_soon(self._accept_loop, listener, connections)
                if listeners and isinstance(listeners[0], trio.SocketListener):
                    self.port = listeners[0].socket.getsockname()[1]
                log.info(
                    "status websocket on ws://%s:%d/ (and http://%s:%d/: page, /metrics, "
                    "/status.json)",
                    self.host,
                    self.port,
                    self.host,
                    self.port,
                )
                self.state = "running"
                task_status.started(self.port)
                while True:
                    await trio.sleep(self.interval)
                    self.refresh()
        finally:
            for listener in listeners:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(listener)

    async def _accept_loop(
        self, listener: trio.abc.Listener[trio.abc.Stream], connections: trio.Nursery
    ) -> None:
        """Accept connections and serve each in its own task in ``connections``.

        EMFILE, ENFILE, ENOMEM and ENOBUFS are waited out (one rate-limited log line);
        any other accept error propagates and ends :meth:`run`.
        """
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in ACCEPT_RETRY_ERRNOS:
                    raise
                self._accept_failed(f"{exc}; retrying every {ACCEPT_RETRY_DELAY * 1000:.0f} ms")
                await trio.sleep(ACCEPT_RETRY_DELAY)
                continue
            if self.connections >= self.max_clients + HANDSHAKE_SLOTS:
                self._dropped(f"{peer_name(stream)}: too many connections in their handshake")
                await trio.aclose_forcefully(stream)
                continue
            self.connections += 1  # here, not in the task, so a burst cannot overshoot
            connections.start_soon(self._serve_connection, stream)

    async def _serve_connection(self, stream: trio.abc.Stream) -> None:
        """Serve one accepted connection (counted in :attr:`connections` by the accept
        loop); never raises an Exception.

        This is the boundary for everything the peer's bytes can cause: any Exception from
        the handshake, wsproto or our own code (from this task or from trio-websocket's
        reader task, which runs in this connection's nursery) is logged as one line naming
        the peer and the reason (with a traceback at DEBUG), and the connection is closed.
        Cancellation passes through.
        """
        peer = peer_name(stream)
        try:
            with trio.move_on_after(self.handshake_timeout) as reading:
                head = await _read_request_head(stream)
            if reading.cancelled_caught:
                log.info(
                    "status client %s closed: no request within %gs", peer, self.handshake_timeout
                )
                return
            if head is None:
                log.debug("status client %s hung up before its request", peer)
                return
            request = _check_request_head(head)
            if isinstance(request, tuple):
                status, reason = request
                self._dropped(f"{peer}: {reason} (answered with HTTP {status})")
                await _answer(stream, status, reason)
                return
            if not _is_upgrade(request):
                await self._serve_http(stream, request, peer)
                return
            async with trio.open_nursery() as nursery:
                await self._serve_websocket(_Replayed(stream, head), peer, nursery)
                nursery.cancel_scope.cancel()  # trio-websocket's reader task
        except* Exception as group:
            self._dropped(f"{peer}: {_reason(group)}")
            log.debug("status connection %s failed", peer, exc_info=group)
        finally:
            self.connections -= 1
            await trio.aclose_forcefully(stream)

    async def _serve_websocket(
        self, stream: trio.abc.Stream, peer: str, nursery: trio.Nursery
    ) -> None:
        """The websocket handshake on ``stream``, then snapshots until the client goes away."""
        connection: WebSocketConnection | None = None
        with trio.move_on_after(self.handshake_timeout) as handshake:
            # trio-websocket waits for a request even after its reader task has given up on
            # the connection; the watch ends that wait at once.
            watched = _HandshakeWatch(stream, handshake.cancel)
            connection = await self._handshake(watched, peer, nursery)
        if connection is None:
            if watched.ended == "closed":
                self._dropped(f"{peer}: not a websocket handshake (answered with HTTP 400)")
            elif watched.ended:
                log.debug("status client %s %s before its handshake", peer, watched.ended)
            elif handshake.cancelled_caught:
                log.info(
                    "status client %s closed: no handshake within %gs", peer, self.handshake_timeout
                )
            return
        try:
            await self._push(connection, peer)
        finally:
            self.clients -= 1
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await connection.aclose(_GOING_AWAY)

    async def _handshake(
        self, stream: trio.abc.Stream, peer: str, nursery: trio.Nursery
    ) -> WebSocketConnection | None:
        """Read the opening handshake and accept it, counting one more client; or refuse it
        (HTTP 401 without the token, 503 when full) and return None.

        trio-websocket's reader task for ``stream`` starts in ``nursery``; what it raises
        (wsproto on a malformed request) arrives through that nursery.
        """
        request = await wrap_server_stream(
            nursery, stream, max_message_size=_MAX_CLIENT_MESSAGE, receive_buffer_size=None
        )
        if not self._authorised(request):
            self._refused(f"{peer}: bad or missing token (HTTP 401)")
            await request.reject(401, body=_UNAUTHORISED)
            return None
        if request.path.partition("?")[0].partition("#")[0] != "/":
            # The websocket is at / only: any other path is not found, as for plain HTTP.
            await request.reject(404, body=_NOT_FOUND)
            return None
        if self.clients >= self.max_clients:
            self._refused(f"{peer}: too many status clients (HTTP 503)")
            await request.reject(503, body=b"too many status clients\n")
            return None
        self.clients += 1  # counted before accept() awaits, so max_clients holds
        try:
            return await request.accept()
        except BaseException:
            self.clients -= 1
            raise

    async def _push(self, connection: WebSocketConnection, peer: str) -> None:
        """A fresh snapshot, then the newest one whenever there is one, until the client
        goes away, sends something, or does not take a snapshot within ``send_timeout``."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._refuse_input, connection, peer, nursery.cancel_scope)
                sent = self._generation
                history = _query_flag(connection.path or "", "history")
                with trio.fail_after(self.send_timeout):
                    # A fresh one on connect, with the rate history if asked for.
                    await connection.send_message(self._encode(history=history))
                while True:
                    if sent == self._generation:
                        await self._changed.wait()
                    sent = self._generation
                    with trio.fail_after(self.send_timeout):
                        await connection.send_message(self._latest)
        except* trio.TooSlowError:
            log.info("status client %s closed: not reading", peer)
        except* (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away: nothing to report

    async def _refuse_input(
        self, connection: WebSocketConnection, peer: str, cancel_scope: trio.CancelScope
    ) -> None:
        """Status is push-only: any message from the client closes it."""
        try:
            await connection.get_message()
        except ConnectionClosed:
            cancel_scope.cancel()
            return
        log.info("status client %s closed: sent a message", peer)
        with trio.move_on_after(1):
            await connection.aclose(_POLICY, "status is read-only")
        cancel_scope.cancel()

    def _authorised(self, request: WebSocketRequest) -> bool:
        """Whether ``request`` carries the token (always, with no token set). Never raises:
        a request that cannot be understood is not authorised."""
        return self._has_token(request.headers, request.path)

    def _has_token(self, headers: Iterable[tuple[bytes, bytes]], target: str) -> bool:
        """Whether ``headers`` (``Authorization: Bearer``) or the request target ``target``
        (``?token=``) carry the token (always, with no token set). Never raises."""
        if self.token is None:
            return True
        expected = self.token.encode()
        try:
            for name, value in headers:
                if (
                    name.lower() == b"authorization"
                    and value.startswith(b"Bearer ")
                    and hmac.compare_digest(value[7:].strip(), expected)
                ):
                    return True
            return hmac.compare_digest(_query_token(target).encode(), expected)
        except Exception as exc:
            log.debug("status request not understood, so not authorised: %r", exc)
            return False

    async def _serve_http(self, stream: trio.abc.Stream, request: h11.Request, peer: str) -> None:
        """Answer one plain HTTP request, then close: ``GET /`` (the dashboard page),
        ``/metrics`` (Prometheus), ``/status.json`` (one snapshot); 401 without the token
        (before anything else), then 405 for other methods, 404 for any other path. A
        response the client does not take within ``send_timeout`` is abandoned (one log
        line)."""
        target = request.target.decode("ascii", "replace")
        path = target.partition("?")[0].partition("#")[0]
        head_only = request.method == b"HEAD"
        response: tuple[int, bytes, str, Sequence[tuple[str, str]]]
        if not self._has_token(request.headers, target):
            # First: a caller without the token learns nothing, not even which methods work.
            self._refused(f"{peer}: bad or missing token (HTTP 401)")
            response = 401, _UNAUTHORISED, _TEXT, []
        elif request.method not in (b"GET", b"HEAD"):
            response = 405, b"only GET and HEAD are served here\n", _TEXT, [("allow", "GET, HEAD")]
        elif path == "/":
            response = 200, DASHBOARD.page, "text/html; charset=utf-8", DASHBOARD.headers
        elif path == "/metrics" and self._metrics is not None:
            response = 200, self._metrics(), METRICS_CONTENT_TYPE, []
        elif path == "/status.json":
            body = self._encode(history=_query_flag(target, "history"))
            response = 200, body, "application/json", []
        else:
            response = 404, _NOT_FOUND, _TEXT, []
        status, body, content_type, headers = response
        with trio.move_on_after(self.send_timeout) as sending:
            await _respond(stream, status, body, content_type, headers, head_only=head_only)
        if sending.cancelled_caught:
            log.info("status client %s closed: not reading its response", peer)


class _HandshakeWatch(trio.abc.Stream):
    """A connection's stream as trio-websocket sees it, which calls ``on_end`` when the
    connection ends: the peer hangs up (``ended`` is "hung up"), the stream breaks
    ("broke"), or trio-websocket closes it, as it does after answering a bad request with
    HTTP 400 ("closed"). Everything else passes straight through."""

    def __init__(self, stream: trio.abc.Stream, on_end: Callable[[], None]) -> None:
        self._stream = stream
        self._on_end = on_end
        self.ended: str | None = None

    def _end(self, how: str) -> None:
        if self.ended is None:
            self.ended = how
            self._on_end()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self._stream.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._end("broke")
            raise
        if not data:
            self._end("hung up")
        return data

    async def aclose(self) -> None:
        self._end("closed")
        await self._stream.aclose()


class _Replayed(trio.abc.Stream):
    """``stream`` with bytes already read from it put back in front."""

    def __init__(self, stream: trio.abc.Stream, already_read: bytes) -> None:
        self._stream = stream
        self._pending = already_read

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._pending:
            size = len(self._pending) if max_bytes is None else max_bytes
            data, self._pending = self._pending[:size], self._pending[size:]
            await trio.lowlevel.checkpoint()
            return data
        return await self._stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self._stream.aclose()


async def _read_request_head(stream: trio.abc.Stream) -> bytes | None:
    """Every byte up to the end of the request head (``\r\n\r\n``), and any that came
    with it; at most a little over :data:`MAX_REQUEST_HEAD` (the check refuses more). None
    if the peer hung up first."""
    received = b""
    while b"\r\n\r\n" not in received and len(received) <= MAX_REQUEST_HEAD:
        try:
            data = await stream.receive_some(MAX_REQUEST_HEAD)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return None
        if not data:
            return None
        received += data
    return received


def _check_request_head(head: bytes) -> h11.Request | tuple[int, str]:
    """The request in ``head``, or why it cannot be served, as (HTTP status, reason).

    It is parsed with h11 here, before trio-websocket (whose wsproto parses it with h11 again,
    then sure to succeed). h11 raises its parse errors from a method of the exception itself,
    which leaves each in a reference cycle through its traceback that holds the whole
    connection until the garbage collector runs; here the cycle is broken at once.
    """
    end = head.find(b"\r\n\r\n")
    if end < 0 or end + 4 > MAX_REQUEST_HEAD:
        return 431, f"request head over {MAX_REQUEST_HEAD} bytes"
    parser = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
    parser.receive_data(head[: end + 4])
    try:
        event = parser.next_event()
    except h11.RemoteProtocolError as exc:
        reason = f"bad HTTP request: {exc}"
        exc.__traceback__ = None  # the cycle h11 made: exception -> traceback -> itself
        exc.__context__ = exc.__cause__ = None
        return 400, reason
    if not isinstance(event, h11.Request):
        return 400, "bad HTTP request"
    return event


def _is_upgrade(request: h11.Request) -> bool:
    """Whether ``request`` asks for a websocket (the rest is plain HTTP)."""
    return request.method == b"GET" and any(
        name == b"upgrade" and b"websocket" in value.lower() for name, value in request.headers
    )


_TEXT: Final = "text/plain; charset=utf-8"
#: The answer to a request without the token: how to give it.
_UNAUTHORISED: Final = (
    b"a valid token is required: this status port has a token ([status] token or token_file "
    b"in the daemon's configuration).\n"
    b"In a browser, add it to the address: http://HOST:PORT/?token=YOUR_TOKEN\n"
    b"Other clients may send the header instead: Authorization: Bearer YOUR_TOKEN\n"
    b"(framewire status --token-file PATH, or $FRAMEWIRE_STATUS_TOKEN)\n"
)
_NOT_FOUND: Final = b"not found: this port serves /, /metrics, /status.json and the websocket\n"
_PHRASES: Final = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
}


async def _respond(
    stream: trio.abc.Stream,
    status: int,
    body: bytes,
    content_type: str,
    headers: Iterable[tuple[str, str]] = (),
    *,
    head_only: bool = False,
) -> None:
    """One HTTP/1.1 response with ``connection: close`` (the caller closes the stream). A
    peer that went away is not an error."""
    lines = [
        f"HTTP/1.1 {status} {_PHRASES[status]}",
        f"content-type: {content_type}",
        f"content-length: {len(body)}",
        "cache-control: no-store",
        "x-content-type-options: nosniff",
        "connection: close",
        *(f"{name}: {value}" for name, value in headers),
    ]
    response = ("\r\n".join(lines) + "\r\n\r\n").encode()
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_all(response if head_only else response + body)


async def _answer(stream: trio.abc.Stream, status: int, reason: str) -> None:
    """A minimal HTTP error response (within 1 s), then the connection closes."""
    with trio.move_on_after(1):
        await _respond(stream, status, f"{reason}\n".encode("ascii", "replace"), "text/plain")


def _query_token(target: str) -> str:
    """The ``token`` query parameter of a request target such as ``/?token=x``, or "".

    The target is split by hand, not with ``urlsplit``, which rejects targets whose
    authority looks malformed (``//[x/``) and says nothing about their query.
    """
    query = target.partition("?")[2].partition("#")[0]
    return parse_qs(query).get("token", [""])[0]


def _query_flag(target: str, name: str) -> bool:
    """Whether the query of request target ``target`` sets ``name`` to 1 (``?history=1``).
    Never raises."""
    try:
        return parse_qs(target.partition("?")[2].partition("#")[0]).get(name, [""])[0] == "1"
    except ValueError:
        return False


def _reason(error: BaseException) -> str:
    """One line for a connection's failure: the exceptions inside nested groups, by type."""
    if isinstance(error, BaseExceptionGroup):
        return "; ".join(_reason(inner) for inner in error.exceptions)
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
