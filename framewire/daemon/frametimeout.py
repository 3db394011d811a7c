"""``frame_timeout``: a deadline for each frame in progress on a connection.

A peer that starts a frame and then trickles its bytes (one a second into a 4 MiB frame) is
never idle, so idle and dead-peer timeouts never drop it, and it holds its slot for as long
as it likes. A frame is *in progress* from the read that brought its first bytes (the
decoder holds bytes that are not a whole frame: :attr:`~framewire.protocols.Decoder.buffered`)
or, for a large frame that the reader waits for whole in the kernel's socket buffer
(SO_RCVLOWAT), from when that wait began (:attr:`Connection.frame_waiting`), until the read
that completes it. A connection whose frame is still in progress ``timeout`` seconds after
it began is cancelled. Time between frames never counts (an idle producer is governed by
``idle_timeout``), and neither does time spent publishing the frames a read completed (a
held lossless stream is not the peer's fault): the next frame's clock starts when reading
resumes.

One :class:`FrameWatch` task per endpoint times all of its connections, as the receiver's
idle watch does: a read only stamps a time on the connection's :class:`FrameClock`; the
watch wakes when the earliest frame would expire (or after ``timeout`` when none is in
progress, since a frame that starts later expires later still), so nothing moves a cancel
scope's deadline per read.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from ..protocols import Decoder
    from .transport import Connection

__all__ = ["FrameClock", "FrameWatch", "describe_expiry"]


class FrameClock:
    """One connection's frame deadline: when its frame in progress began (``inf``: none)."""

    __slots__ = ("expired", "scope", "started", "waiting_for")

    def __init__(self, scope: trio.CancelScope) -> None:
        #: The scope the watch cancels when the frame in progress outlives the timeout.
        self.scope = scope
        #: trio time the frame in progress began; ``inf`` between frames.
        self.started = math.inf
        #: The size a whole read waits for in the socket (0: none): the frame's announced
        #: size, for the log line, when the decoder has not seen its header yet.
        self.waiting_for = 0
        #: Set by the watch when it cancelled :attr:`scope` for this clock.
        self.expired = False

    def frames_done(self) -> None:
        """A read completed frames: no frame is in progress while they are published."""
        self.started = math.inf
        self.waiting_for = 0

    def reading(self, buffered: int) -> None:
        """After a read (and the publishing of the frames it completed): ``buffered`` bytes
        of a frame in progress are held by the decoder. The frame's clock starts now if it
        has not started yet; with nothing buffered, no frame is in progress."""
        if buffered:
            if self.started == math.inf:
                self.started = trio.current_time()
        elif self.started != math.inf:
            self.started = math.inf
            self.waiting_for = 0

    def frame_waiting(self, size: int) -> None:
        """The reader waits for a frame of ``size`` bytes whose start already arrived in the
        socket (no read returns until it is whole): the frame is in progress."""
        if self.started == math.inf:
            self.started = trio.current_time()
        self.waiting_for = size


class FrameWatch:
    """Cancels the scope of each connection whose frame in progress is older than
    ``timeout`` seconds (``inf``: never; then :meth:`run` need not run)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._clocks: dict[int, FrameClock] = {}

    def add(self, scope: trio.CancelScope) -> FrameClock:
        """Time the connection whose reads run in ``scope``; :meth:`remove` it when done."""
        clock = FrameClock(scope)
        self._clocks[id(clock)] = clock
        return clock

    def remove(self, clock: FrameClock) -> None:
        self._clocks.pop(id(clock), None)

    async def run(self) -> None:
        """Time the connections; runs until cancelled."""
        timeout = self.timeout
        while True:
            now = trio.current_time()
            # A frame that starts after this moment expires after now + timeout.
            due = now + timeout
            for key, clock in list(self._clocks.items()):
                expires = clock.started + timeout
                if expires <= now:
                    del self._clocks[key]
                    clock.expired = True
                    clock.scope.cancel()
                elif expires < due:
                    due = expires
            await trio.sleep_until(due)


def describe_expiry(
    clock: FrameClock, decoder: Decoder, connection: Connection, timeout: float
) -> str:
    """Why a connection whose :class:`FrameClock` expired is closed, for its one log line:
    the frame's announced size (as far as its bytes tell), the bytes of it received (those
    the decoder holds and those still in the socket) and the timeout. Call it before the
    connection is closed."""
    size = decoder.pending_frame_size or clock.waiting_for
    received = decoder.buffered + connection.bytes_waiting()
    frame = f"its frame of {size} bytes" if size else "its frame (of a size not known yet)"
    return (
        f"{frame} was not complete within frame_timeout ({timeout:g}s): "
        f"{received} bytes of it received"
    )
