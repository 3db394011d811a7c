"""The status websocket: a JSON snapshot on connect, then one per interval.

The schema is documented, with its version, in docs/status.md. One task builds and encodes
each snapshot once; every client handler sends the newest one it has not sent yet, so a slow
client skips snapshots instead of queueing them, and a client that does not take a snapshot
within ``send_timeout`` is closed. Nothing a status client does can stall the daemon.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qs, urlsplit

import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

from .._version import __version__

if TYPE_CHECKING:
    from .service import Daemon

__all__ = ["SCHEMA", "StatusServer", "build_snapshot"]

log = logging.getLogger("framewire.status")

SCHEMA: Final = "framewire.status/1"
#: Close codes (RFC 6455): going away, policy violation.
_GOING_AWAY, _POLICY = 1001, 1008


def build_snapshot(daemon: Daemon) -> dict[str, Any]:
    """The status document for ``daemon``: see docs/status.md."""
    now = time.time()
    endpoints: dict[str, Any] = {}
    for name, endpoint in daemon.endpoints.items():
        status = endpoint.status
        clients = []
        dropped = status.frames_dropped
        decimated = status.frames_decimated
        for client in list(status.clients.values()):
            entry: dict[str, Any] = {
                "peer": client.peer,
                "connected_since": round(client.connected_since, 3),
            }
            subscription = client.subscription
            if subscription is not None:
                dropped += subscription.frames_dropped
                decimated += subscription.frames_decimated
                entry.update(
                    queue_frames=subscription.queued_frames,
                    queue_bytes=subscription.queued_bytes,
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
            "frames_dropped": dropped,
            "frames_decimated": decimated,
            "restarts": status.restarts,
            "last_error": status.last_error,
            "last_error_at": status.last_error_at,
            "detail": dict(status.detail),
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
        }
        for stream in daemon.streams
    }
    return {
        "schema": SCHEMA,
        "time": round(now, 3),
        "daemon": {
            "version": __version__,
            "pid": os.getpid(),
            "state": daemon.state,
            "started_at": round(daemon.started_at, 3),
            "uptime": round(now - daemon.started_at, 3),
            "config": daemon.source,
            "last_reload": daemon.last_reload,
        },
        "endpoints": endpoints,
        "streams": streams,
    }


class StatusServer:
    """Serves snapshots from ``snapshot()`` every ``interval`` seconds to websocket clients.

    With ``token`` set, a client must send ``Authorization: Bearer <token>`` or put
    ``?token=<token>`` in the URL; others are refused with HTTP 401. A client that sends any
    message, or does not take a snapshot within ``send_timeout``, is closed.
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
    ) -> None:
        self._snapshot = snapshot
        self.host, self.port = host, port
        self.interval = interval
        self.token = token
        self.max_clients = max_clients
        self.send_timeout = send_timeout
        self.clients = 0
        self._latest = b""
        self._generation = 0
        self._changed = trio.Event()

    def _encode(self) -> bytes:
        return json.dumps(self._snapshot(), separators=(",", ":")).encode()

    def refresh(self) -> None:
        """Build a new snapshot now and wake every client."""
        self._latest = self._encode()
        self._generation += 1
        self._changed.set()
        self._changed = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``task_status.started`` gets the bound port."""
        self.refresh()
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                lambda task_status: serve_websocket(
                    self._handle,
                    self.host,
                    self.port,
                    None,
                    handler_nursery=nursery,
                    connect_timeout=5,
                    disconnect_timeout=2,
                    receive_buffer_size=None,
                    task_status=task_status,
                )
            )
            self.port = server.port
            log.info("status websocket on ws://%s:%d/", self.host, self.port)
            task_status.started(self.port)
            while True:
                await trio.sleep(self.interval)
                self.refresh()

    def _authorised(self, request: WebSocketRequest) -> bool:
        if self.token is None:
            return True
        expected = self.token.encode()
        for name, value in request.headers:
            if (
                name.lower() == b"authorization"
                and value.startswith(b"Bearer ")
                and hmac.compare_digest(value[7:].strip(), expected)
            ):
                return True
        offered = parse_qs(urlsplit(request.path).query).get("token", [""])[0]
        return hmac.compare_digest(offered.encode(), expected)

    async def _handle(self, request: WebSocketRequest) -> None:
        peer = str(request.remote)
        try:
            if not self._authorised(request):
                log.warning("status client %s refused: bad or missing token", peer)
                await request.reject(401, body=b"a valid token is required\n")
                return
            if self.clients >= self.max_clients:
                log.warning("status client %s refused: too many status clients", peer)
                await request.reject(503, body=b"too many status clients\n")
                return
            connection = await request.accept()
        except (ConnectionClosed, trio.BrokenResourceError, OSError):
            return
        self.clients += 1
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._refuse_input, connection, nursery.cancel_scope)
                sent = self._generation
                with trio.fail_after(self.send_timeout):
                    await connection.send_message(self._encode())  # a fresh one on connect
                while True:
                    if sent == self._generation:
                        await self._changed.wait()
                    sent = self._generation
                    with trio.fail_after(self.send_timeout):
                        await connection.send_message(self._latest)
        except* trio.TooSlowError:
            log.info("status client %s closed: not reading", peer)
        except* (ConnectionClosed, trio.BrokenResourceError, OSError):
            pass
        finally:
            self.clients -= 1
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await connection.aclose(_GOING_AWAY)

    async def _refuse_input(self, connection: Any, cancel_scope: trio.CancelScope) -> None:
        """Status is push-only: any message from the client closes it."""
        try:
            await connection.get_message()
        except ConnectionClosed:
            cancel_scope.cancel()
            return
        log.info("status client %s closed: sent a message", connection.remote)
        with trio.move_on_after(1):
            await connection.aclose(_POLICY, "status is read-only")
        cancel_scope.cancel()
