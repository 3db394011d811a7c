"""ZeroMQ sockets driven from trio, without a thread per socket.

pyzmq is an optional dependency (``pip install 'framewire[zmq]'``): it is imported only when
a ZeroMQ endpoint starts, through :func:`require_zmq`, which raises :class:`ZmqUnavailable`
naming the extra when it is missing. The rest of the daemon never imports it.

How waiting works. Every ZeroMQ socket has a file descriptor (``ZMQ_FD``) that becomes
readable when the socket's events (``ZMQ_EVENTS``: can receive, can send) *may* have changed.
It is edge-triggered, and any operation on the socket (a send, a receive, reading
``ZMQ_EVENTS``) may consume the edge. So :class:`AsyncSocket` never waits on the descriptor
without first reading ``ZMQ_EVENTS``; it tries every operation with ``NOBLOCK`` and waits
only on ``zmq.Again``. Only one trio task may wait on a descriptor at a time: the first task
that needs to wait does so with ``trio.lowlevel.wait_readable``; any other task (a sender and
a receiver on one XPUB socket) waits for it to report a change. After each successful
operation, a waiting task is woken to re-read the events, since the operation may have
consumed the edge it was waiting for.

ZeroMQ's own I/O thread (one per context) does the network work; sends and receives here
only move messages between the application and ZeroMQ's queues, bounded by the high-water
marks (``SNDHWM``/``RCVHWM``, counted in messages).

Closing: :meth:`AsyncSocket.close` tells trio the descriptor is closing (a waiting task gets
``trio.ClosedResourceError``), then closes the socket with the given ``LINGER``; a context is
terminated by :func:`open_context` on the way out, in a worker thread, so a socket closed
with a positive linger can hand over what it still holds without stalling trio.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import AsyncIterator, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final, cast

import trio

from ..config import ZmqAddress
from ..frame import Buffer

if TYPE_CHECKING:
    import zmq

__all__ = ["AsyncSocket", "ZmqUnavailable", "open_context", "require_zmq"]

#: Default LINGER (milliseconds) of sockets made here: how long unsent messages may hold up
#: closing.
LINGER_MS: Final = 0
#: Seconds terminating a context may take at most (lingering sockets flushing).
TERM_TIMEOUT: Final = 5.0
#: Received parts this large are not copied out of ZeroMQ's buffers (pyzmq's own threshold).
ZERO_COPY_SIZE: Final = 65536
#: Messages one receive batch takes at most before handing them on.
BATCH_MESSAGES: Final = 1024

_zmq: ModuleType | None = None


class ZmqUnavailable(RuntimeError):
    """pyzmq is not installed, or is too old. The message says how to install it."""


def require_zmq() -> ModuleType:
    """The ``zmq`` module. Raises :class:`ZmqUnavailable` naming the extra to install."""
    global _zmq
    if _zmq is None:
        try:
            module = importlib.import_module("zmq")
        except ImportError:
            raise ZmqUnavailable(
                "ZeroMQ endpoints (bridge, pubsub) need pyzmq: pip install 'framewire[zmq]'"
            ) from None
        if int(module.pyzmq_version_info()[0]) < 25:
            raise ZmqUnavailable(
                f"ZeroMQ endpoints need pyzmq 25 or newer (found {module.__version__}): "
                "pip install -U 'framewire[zmq]'"
            )
        _zmq = module
    return _zmq


@contextlib.asynccontextmanager
async def open_context() -> AsyncIterator[zmq.Context[zmq.Socket[bytes]]]:
    """A ZeroMQ context (one I/O thread of ZeroMQ's own), terminated on the way out.

    Close every socket made from it (:meth:`AsyncSocket.close`) before leaving the block;
    any still open are closed with linger 0. Terminating waits, in a worker thread and for
    at most :data:`TERM_TIMEOUT` seconds (even when cancelled), for sockets closed with a
    positive ``LINGER`` to hand over what they still hold. Raises :class:`ZmqUnavailable`
    without pyzmq.
    """
    zmq_module = require_zmq()
    context: zmq.Context[zmq.Socket[bytes]] = zmq_module.Context()
    try:
        yield context
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(TERM_TIMEOUT):
            await trio.to_thread.run_sync(
                functools.partial(context.destroy, linger=0), abandon_on_cancel=True
            )


class AsyncSocket:
    """A pyzmq socket with trio-friendly sends and receives. See the module docstring.

    The ``*_nowait`` methods never wait: they return ``False``/``None`` when the socket
    cannot take or give a message now. The async ones wait, and are cancellable: a
    cancelled send has sent nothing, a cancelled receive has taken nothing. Several tasks
    may use one socket (e.g. one sends while another receives) but not the same direction
    at once. Errors from ZeroMQ (``zmq.ZMQError``) propagate; :meth:`close` makes every
    waiting task fail with ``trio.ClosedResourceError``.
    """

    def __init__(self, socket: zmq.Socket[bytes]) -> None:
        self._zmq = require_zmq()
        self.socket = socket
        self._fd = int(socket.getsockopt(self._zmq.FD))
        self._events_option: int = self._zmq.EVENTS
        self._again: type[Exception] = self._zmq.Again
        self._noblock: int = self._zmq.NOBLOCK
        self._sndmore: int = self._zmq.SNDMORE
        self._pollin: int = self._zmq.POLLIN
        self._pollout: int = self._zmq.POLLOUT
        self._watcher: trio.CancelScope | None = None
        self._changed = trio.Event()
        self._waiters = 0
        self._closed = False
        self._zero_copy = False

    def bind_or_connect(self, address: ZmqAddress, *, bind: bool) -> str:
        """Bind or connect to ``address``; return the address as status shows it.

        Raises OSError naming the address when ZeroMQ refuses (address in use, no such
        interface, a host name it cannot resolve when binding).
        """
        zmq: Any = self._zmq
        if address.host is None or address.is_ipv6:
            self.socket.setsockopt(zmq.IPV6, 1)
        endpoint = str(address)
        try:
            if bind:
                self.socket.bind(endpoint)
                bound: str = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
                return bound
            self.socket.connect(endpoint)
        except zmq.ZMQError as exc:
            verb = "bind" if bind else "connect to"
            raise OSError(exc.errno, f"cannot {verb} {endpoint}: {exc.strerror}") from None
        return endpoint

    @classmethod
    def make(
        cls,
        context: zmq.Context[zmq.Socket[bytes]],
        socket_type: int,
        *,
        linger_ms: int = LINGER_MS,
        sndhwm: int | None = None,
        rcvhwm: int | None = None,
    ) -> AsyncSocket:
        """A new socket of ``socket_type`` with ``LINGER`` and, if given, high-water marks."""
        zmq_module = require_zmq()
        socket = context.socket(socket_type)
        socket.setsockopt(zmq_module.LINGER, linger_ms)
        if sndhwm is not None:
            socket.setsockopt(zmq_module.SNDHWM, sndhwm)
        if rcvhwm is not None:
            socket.setsockopt(zmq_module.RCVHWM, rcvhwm)
        return cls(socket)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, linger_ms: int | None = None) -> None:
        """Close the socket (idempotent). Tasks waiting on it get ClosedResourceError.

        ``linger_ms`` overrides the socket's ``LINGER``: how long ZeroMQ keeps trying to
        deliver what is still queued for sending (0: discard it).
        """
        if self._closed:
            return
        self._closed = True
        trio.lowlevel.notify_closing(self._fd)
        self._notify()
        if linger_ms is None:
            self.socket.close()
        else:
            self.socket.close(linger=linger_ms)

    def __enter__(self) -> AsyncSocket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- sending ---------------------------------------------------------------------------

    def send_multipart_nowait(self, parts: Sequence[Buffer], *, copy: bool = True) -> bool:
        """Queue one message of ``parts`` if the socket takes it now; False if it would block.

        ``copy=False`` hands large parts to ZeroMQ without copying (pyzmq copies parts below
        its copy threshold anyway); the buffers must then stay unchanged.

        Raises:
            trio.ClosedResourceError: the socket was closed.
            trio.BrokenResourceError: ZeroMQ refused a part after taking the first (a
                multipart message is otherwise all-or-nothing); the socket should be
                rebuilt.
        """
        if self._closed:
            raise trio.ClosedResourceError("the ZeroMQ socket is closed")
        socket = self.socket
        last = len(parts) - 1
        try:
            socket.send(parts[0], self._noblock | (self._sndmore if last else 0), copy=copy)
        except self._again:
            return False
        try:
            for index in range(1, last + 1):
                flags = self._noblock | (self._sndmore if index < last else 0)
                socket.send(parts[index], flags, copy=copy)
        except self._again:
            raise trio.BrokenResourceError(
                f"ZeroMQ took part 1 of a {last + 1}-part message but not part {index + 1}"
            ) from None
        if self._waiters:
            self._notify()
        return True

    async def send_multipart(self, parts: Sequence[Buffer], *, copy: bool = True) -> None:
        """Send one message, waiting while the socket cannot take it (peer absent, or its
        queue at the high-water mark). Raises as :meth:`send_multipart_nowait`."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self.send_multipart_nowait(parts, copy=copy):
            await self.wait_writable()
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def wait_writable(self) -> None:
        """Wait until the socket can take a message. Raises ClosedResourceError if closed."""
        await self._wait(self._pollout)

    # -- receiving -------------------------------------------------------------------------

    def receive_multipart_nowait(self) -> list[Buffer] | None:
        """The next message's parts, or None if none is queued. Raises ClosedResourceError.

        Parts are ``bytes``, except that parts of :data:`ZERO_COPY_SIZE` or more are
        memoryviews of ZeroMQ's own message buffer (no copy), once the socket has seen one
        such part: the socket switches between the two modes by the size of the last part.
        """
        if self._closed:
            raise trio.ClosedResourceError("the ZeroMQ socket is closed")
        try:
            if not self._zero_copy:
                parts = cast("list[Buffer]", self.socket.recv_multipart(self._noblock))
                self._zero_copy = len(parts[-1]) >= ZERO_COPY_SIZE
            else:
                frames = self.socket.recv_multipart(self._noblock, copy=False)
                parts = [
                    frame.buffer if len(frame) >= ZERO_COPY_SIZE else frame.bytes
                    for frame in frames
                ]
                self._zero_copy = len(frames[-1]) >= ZERO_COPY_SIZE
        except self._again:
            return None
        if self._waiters:
            self._notify()
        return parts

    async def receive_multipart(self) -> list[Buffer]:
        """Wait for the next message; return its parts. Raises ClosedResourceError."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while (parts := self.receive_multipart_nowait()) is None:
            await self.wait_readable()
        await trio.lowlevel.cancel_shielded_checkpoint()
        return parts

    async def receive_batch(self, max_messages: int = BATCH_MESSAGES) -> list[list[Buffer]]:
        """Wait for at least one message; return it and whatever else is queued, up to
        ``max_messages``, oldest first. Raises ClosedResourceError."""
        batch = [await self.receive_multipart()]
        receive = self.receive_multipart_nowait
        while len(batch) < max_messages and (parts := receive()) is not None:
            batch.append(parts)
        return batch

    async def wait_readable(self) -> None:
        """Wait until a message can be received. Raises ClosedResourceError if closed."""
        await self._wait(self._pollin)

    # -- waiting ---------------------------------------------------------------------------

    def _notify(self) -> None:
        """Events may have changed: make every waiting task read them again."""
        self._changed.set()
        self._changed = trio.Event()
        if self._watcher is not None:
            self._watcher.cancel()

    async def _wait(self, flag: int) -> None:
        self._waiters += 1
        try:
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("the ZeroMQ socket is closed")
                # Reading EVENTS re-arms the edge-triggered descriptor: only after it shows
                # nothing is it safe to wait for the descriptor.
                if int(self.socket.getsockopt(self._events_option)) & flag:
                    return
                if self._watcher is None:
                    with trio.CancelScope() as watcher:
                        self._watcher = watcher
                        try:
                            await trio.lowlevel.wait_readable(self._fd)
                        finally:
                            self._watcher = None
                    if not self._closed:
                        self._notify()
                else:
                    await self._changed.wait()
        finally:
            self._waiters -= 1
