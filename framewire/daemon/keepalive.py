"""Keepalives: a connection two tasks may write to, and the task that keeps it talking.

A link (and the trio client) writes frames from one task and keepalives from another. A
trio stream allows one writer at a time, so :class:`KeepaliveConnection` serialises writes
and remembers when the last one finished; :func:`send_keepalives` sends the protocol's
keepalive whenever nothing was written for an interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import trio

from ..frame import Buffer
from .transport import Connection

__all__ = ["KeepaliveConnection", "send_keepalives"]


class KeepaliveConnection(Connection):
    """A :class:`Connection` whose writes are serialised and timed.

    :attr:`last_sent` is the trio time the last write finished (``-inf`` before any). Like
    :meth:`Connection.send`, a cancelled :meth:`send` leaves the connection unusable.
    """

    def __init__(self, stream: trio.abc.Stream, peer: str | None = None) -> None:
        super().__init__(stream, peer)
        self._lock = trio.Lock()
        self.last_sent = -math.inf

    async def send(self, buffers: Sequence[Buffer], nbytes: int | None = None) -> None:
        """Write every buffer, after any write already in progress. Raises as
        :meth:`Connection.send` does."""
        lock = self._lock
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            await super().send(buffers, nbytes)
        finally:
            lock.release()
        self.last_sent = trio.current_time()


async def send_keepalives(
    connection: KeepaliveConnection,
    marker: bytes,
    interval: float,
    *,
    send_timeout: float = math.inf,
    on_sent: Callable[[], None] | None = None,
) -> None:
    """Send ``marker`` whenever nothing was written for ``interval`` seconds; never returns.

    The first one goes out at once if nothing was written yet. Raises
    trio.BrokenResourceError when the peer is gone and trio.TooSlowError when one keepalive
    (including the wait for a write in progress) takes longer than ``send_timeout``.
    """
    while True:
        due = connection.last_sent + interval
        if trio.current_time() >= due:
            with trio.fail_after(send_timeout):
                await connection.send([marker])
            if on_sent is not None:
                on_sent()
        else:
            await trio.sleep_until(due)
