"""Where bytes flow: listeners, connectors and the :class:`Connection` endpoints talk through.

Endpoints never open sockets themselves: they are given a listener (``trio.abc.Listener``)
or a :data:`Connector` (an async callable returning a stream), so tests can hand them memory
streams instead. This module makes the real ones from config addresses.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, TypeAlias

import trio

from ..config import Address
from ..frame import Buffer

__all__ = [
    "ACCEPT_RETRY_ERRNOS",
    "Connection",
    "Connector",
    "open_listeners",
    "peer_name",
    "tcp_connector",
]

#: Makes one outgoing connection. Raises OSError (or trio errors) when it cannot.
Connector: TypeAlias = Callable[[], Awaitable[trio.abc.Stream]]

#: Writes at most this big are joined into one buffer; bigger ones go out as a gather write.
JOIN_LIMIT: Final = 256 * 1024
#: accept() errors that mean "out of resources for now": wait a little and accept again.
ACCEPT_RETRY_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: TCP_NOTSENT_LOWAT for relay connections.
NOTSENT_LOWAT: Final = 4 << 20
#: Buffers per sendmsg() call (Linux's IOV_MAX is 1024).
_IOV_MAX: Final = 1024


def _nbytes(buffer: Buffer) -> int:
    return buffer.nbytes if isinstance(buffer, memoryview) else len(buffer)


def peer_name(stream: trio.abc.Stream) -> str:
    """``host:port`` of the remote end, or a description for non-socket streams."""
    if isinstance(stream, trio.SocketStream):
        try:
            peer = stream.socket.getpeername()
        except OSError:
            return "disconnected peer"
        if isinstance(peer, tuple):
            host, port = peer[0], peer[1]
            return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return str(peer) or "unix peer"
    return type(stream).__name__


class Connection:
    """A byte stream with the fast paths the endpoints need.

    * :meth:`receive_into` reads straight into a caller's buffer (``recv_into`` on sockets).
    * :meth:`send` writes a list of buffers as one write: small ones joined, large ones as a
      gather write, never one system call per frame.

    It wraps any ``trio.abc.Stream``; sockets get the zero-copy paths, other streams (memory
    streams in tests, TLS) the generic ones. Like ``send_all``, a cancelled :meth:`send`
    leaves the connection unusable: close it.
    """

    def __init__(self, stream: trio.abc.Stream, peer: str | None = None) -> None:
        self.stream = stream
        self.peer = peer if peer is not None else peer_name(stream)
        self._socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        if self._socket is not None and self._socket.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError, AttributeError):
                # trio wakes a writer when less than 16 KiB is unsent, which suits chatty
                # traffic; a relay writes in bulk, and fewer, larger writes cost ~8% less CPU
                # per relayed 1 MiB frame (benchmarks/relay.py). The kernel's send buffer
                # still bounds what is queued there.
                self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)
        self.bytes_received = 0
        self.bytes_sent = 0

    async def receive_into(self, buffer: memoryview) -> int:
        """Read up to ``len(buffer)`` bytes into ``buffer``; 0 means the peer closed.

        Raises trio.BrokenResourceError when the connection broke.
        """
        sock = self._socket
        if sock is not None:
            try:
                n = await sock.recv_into(buffer)
            except OSError as exc:
                raise trio.BrokenResourceError(f"receive failed: {exc}") from exc
        else:
            data = await self.stream.receive_some(len(buffer))
            n = len(data)
            buffer[:n] = data
        self.bytes_received += n
        return n

    async def send(self, buffers: Sequence[Buffer], nbytes: int | None = None) -> None:
        """Write every buffer, in order. ``nbytes`` is their total, when the caller knows it.

        Raises trio.BrokenResourceError if the peer is gone.
        """
        if not buffers:
            return
        total = nbytes if nbytes is not None else sum(map(_nbytes, buffers))
        if len(buffers) == 1:
            await self.stream.send_all(buffers[0])
        elif total <= JOIN_LIMIT:
            await self.stream.send_all(b"".join(buffers))
        elif self._socket is not None:
            await self._gather(buffers)
        else:
            for buffer in buffers:
                await self.stream.send_all(buffer)
        self.bytes_sent += total

    async def _gather(self, buffers: Sequence[Buffer]) -> None:
        """sendmsg() in slices of at most IOV_MAX buffers, resuming after partial sends."""
        sock = self._socket
        assert sock is not None
        pending: list[Buffer] = list(buffers)
        index = 0
        while index < len(pending):
            try:
                sent = await sock.sendmsg(pending[index : index + _IOV_MAX])
            except OSError as exc:
                raise trio.BrokenResourceError(f"send failed: {exc}") from exc
            while sent:
                size = _nbytes(pending[index])
                if sent >= size:
                    sent -= size
                    index += 1
                else:
                    pending[index] = memoryview(pending[index]).cast("B")[sent:]
                    sent = 0

    async def aclose(self) -> None:
        await self.stream.aclose()


def tcp_connector(address: Address) -> Connector:
    """A connector for ``tcp://host:port``."""
    if address.host is None:
        raise ValueError(f"cannot connect to {address}: no host")
    host: str = address.host

    async def connect() -> trio.abc.Stream:
        return await trio.open_tcp_stream(host, address.port)

    return connect


async def open_listeners(address: Address, *, backlog: int = 128) -> list[trio.SocketListener]:
    """Bind and listen on ``address`` (``tcp://*:port``: every interface, IPv4 and IPv6).

    Raises OSError (e.g. address in use) with the address in the message.
    """
    try:
        return await trio.open_tcp_listeners(address.port, host=address.host, backlog=backlog)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise OSError(exc.errno, f"cannot listen on {address}: address already in use") from exc
        raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror or exc}") from exc


def bound_addresses(listeners: Sequence[trio.abc.Listener[trio.abc.Stream]]) -> list[str]:
    """``host:port`` of each listening socket, for logs and status."""
    out = []
    for listener in listeners:
        if isinstance(listener, trio.SocketListener):
            name = listener.socket.getsockname()
            if listener.socket.family == socket.AF_INET6:
                out.append(f"[{name[0]}]:{name[1]}")
            else:
                out.append(f"{name[0]}:{name[1]}")
        else:
            out.append(type(listener).__name__)
    return out
