"""``kind = "receiver"``: take frames from producers and publish them into a stream.

Listen mode holds up to ``max_clients`` connections at once. A connection is *proven* once it
has delivered a valid frame. When every slot is taken, a newcomer takes the slot of the
oldest connection that has not proven itself (a port probe, a scanner, a silent or confused
client), which is closed with one log line; only when every connection is proven is the
newcomer refused. A protocol that takes one producer at a time (aedat4) admits the first
connection to prove itself; one that proves itself while another is producing is refused,
so a silent or invalid connection never holds the stream against a real producer. Nothing
is closed for being slow to start: a producer may connect and send its first frame minutes
later, as a connect-mode G3NetworkSender does; but a frame that is not complete within
``frame_timeout`` of its first bytes closes its connection (see
:mod:`~framewire.daemon.frametimeout`), so a producer trickling inside a frame frees its
slot. Connect mode keeps one
connection to an upstream, reconnecting with exponential backoff and jitter whenever it is
refused, times out, closes, breaks or sends bad bytes; the backoff starts over after a
connection that stayed up for ``reconnect.stable_after``. Logs one line per change of state,
not one per failed attempt.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence

import trio

from ... import protocols
from ...config import ReceiverConfig
from ...frame import Frame, frame_count
from ..backoff import Backoff
from ..flow import describe_loss, make_decoder, receive_frames
from ..frametimeout import FrameClock, FrameWatch, describe_expiry
from ..lograte import RateLimitedWarning
from ..reconnect import Ended, keep_connected
from ..stream import MetadataLimitExceeded
from ..transport import Connection, bound_addresses
from ._base import ClientInfo, Endpoint, EndpointContext

__all__ = ["ReceiverEndpoint"]


class _Refused(Exception):
    """A connection that proved itself may not produce (another producer has the stream)."""


class _Slot:
    """One connection of a listening receiver, proven or not."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.proven = False
        self.scope = trio.CancelScope()
        #: Set when the slot was taken from it: the newcomer's name.
        self.evicted_by: str | None = None
        #: Whether the connection ended in a way worth a warning (bad bytes, refused).
        self.failed = False


class _Idle:
    """One connection's idle timer: when it last read, the scope to cancel, and how to
    ask how many bytes wait unread in its socket (and how many did when last asked)."""

    __slots__ = ("last", "scope", "seen", "waiting")

    def __init__(self, scope: trio.CancelScope, waiting: Callable[[], int] | None) -> None:
        self.scope = scope
        self.last = trio.current_time()
        self.waiting = waiting
        self.seen = 0

    def active(self) -> None:
        self.last = trio.current_time()
        self.seen = 0

    def receiving(self) -> bool:
        """Whether bytes arrived that the connection has not read yet (a whole read waits
        for the rest of a large frame) beyond those seen when last asked."""
        if self.waiting is None:
            return False
        held = self.waiting()
        if held > self.seen:
            self.seen = held
            return True
        return False


class _IdleWatch:
    """Cancels the scope of each connection that received nothing for ``idle`` seconds.

    A read only stamps the time (:meth:`_Idle.active`); this one task wakes when the
    earliest connection would time out, and either cancels it or sleeps again until the
    new earliest time. Moving a cancel scope's deadline on every read instead cost each
    read several microseconds. A connection whose socket holds more unread bytes than when
    last asked (its reader waits until a large frame is whole: see
    :meth:`~framewire.daemon.transport.Connection.receive_bytes`) is still receiving and
    gets another ``idle`` seconds; a peer that stops sending, even mid-frame, is cancelled
    within twice ``idle`` of its last bytes.
    """

    def __init__(self, idle: float) -> None:
        self.idle = idle
        self._timers: dict[int, _Idle] = {}
        self._added = trio.Event()

    def add(self, scope: trio.CancelScope, waiting: Callable[[], int] | None = None) -> _Idle:
        timer = self._timers[id(scope)] = _Idle(scope, waiting)
        if len(self._timers) == 1:
            self._added.set()  # the watch may be waiting with nothing to time
        return timer

    def remove(self, timer: _Idle) -> None:
        self._timers.pop(id(timer.scope), None)

    async def run(self) -> None:
        """Time the connections; runs until cancelled."""
        while True:
            now = trio.current_time()
            due = math.inf
            for key, timer in list(self._timers.items()):
                expires = timer.last + self.idle
                if expires <= now and timer.receiving():
                    timer.last = now
                    expires = now + self.idle
                if expires <= now:
                    del self._timers[key]
                    timer.scope.cancel()
                else:
                    due = min(due, expires)
            # A connection added later expires after every one timed here.
            with trio.move_on_at(due):
                await self._added.wait()
            self._added = trio.Event()


class ReceiverEndpoint(Endpoint[ReceiverConfig]):
    kind = "receiver"

    def __init__(
        self,
        name: str,
        config: ReceiverConfig,
        context: EndpointContext,
        *,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(name, config, context)
        self.backoff = Backoff(config.reconnect, rng)
        # Listen mode: connections in the order they came (oldest first), and how many of
        # them have proven themselves.
        self._slots: dict[int, _Slot] = {}
        self._proven = 0
        self._one_producer = bool(protocols.get(config.protocol).session_metadata_types)
        self._idle = _IdleWatch(config.idle_timeout or math.inf)
        self._frame_watch = FrameWatch(config.frame_timeout_seconds)
        #: Connections closed because a frame did not arrive whole within frame_timeout.
        self.frames_timed_out = 0
        self._full = RateLimitedWarning(
            self.log,
            f"refused producers: max_clients ({config.max_clients}) reached and every "
            "connection has delivered frames",
            detail=self.status.detail,
            key="clients_refused",
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._until_stop_requested, nursery.cancel_scope)
            if self._idle.idle != math.inf:
                nursery.start_soon(self._idle.run)
            if self._frame_watch.timeout != math.inf:
                nursery.start_soon(self._frame_watch.run)
            if self.config.listen is not None:
                await nursery.start(self._listen)
            else:
                await nursery.start(self._connect_forever)
            task_status.started()

    # -- listen mode ---------------------------------------------------------------------

    async def _listen(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        assert self.config.listen is not None
        listeners = await self.context.transports.bind(
            self.config.listen, tls=self.config.tls, socket_mode=self.config.socket_mode
        )
        self.status.address = bound_addresses(listeners)
        self.status.state = "listening"
        self.log.info(
            "receiving %s into stream %r on %s",
            self.config.protocol,
            self.config.stream,
            ", ".join(self.status.address),
        )
        async with trio.open_nursery() as producers:
            for listener in listeners:
                producers.start_soon(self._accept_producers, listener, producers)
            task_status.started()

    async def _accept_producers(
        self, listener: trio.abc.Listener[trio.abc.Stream], producers: trio.Nursery
    ) -> None:
        async with listener:
            while True:
                producers.start_soon(
                    self._serve_one, self._serve_producer, await self._accept(listener)
                )

    async def _serve_producer(self, stream: trio.abc.Stream) -> None:
        slot: _Slot | None = None
        try:
            connection = await self._establish(stream)
            if connection is None:
                return
            slot = self._take_slot(connection.peer)
            if slot is None:
                self._full(f"the last {connection.peer}")
                return
            self.log.info("producer %s connected", connection.peer)
            outcome = "closed"
            with slot.scope:
                outcome = await self._receive(connection, slot)
            if slot.evicted_by is not None:
                slot.failed = True
                outcome = (
                    f"closed to make room for {slot.evicted_by}: it had not sent a valid "
                    f"frame and all {self.config.max_clients} slots were taken"
                )
            level = logging.WARNING if slot.failed else logging.INFO
            self.log.log(level, "producer %s: %s", connection.peer, outcome)
        finally:
            if slot is not None:
                self._release_slot(slot)
            await trio.aclose_forcefully(stream)

    def _take_slot(self, peer: str) -> _Slot | None:
        """A slot for a new connection from ``peer``, taken from the oldest unproven
        connection if all are in use; None if every connection is proven."""
        if len(self._slots) >= self.config.max_clients:
            victim = next((slot for slot in self._slots.values() if not slot.proven), None)
            if victim is None:
                return None
            self._release_slot(victim)
            victim.evicted_by = peer
            victim.scope.cancel()
        slot = _Slot(peer)
        self._slots[id(slot)] = slot
        return slot

    def _release_slot(self, slot: _Slot) -> None:
        if self._slots.pop(id(slot), None) is not None and slot.proven:
            self._proven -= 1

    # -- connect mode --------------------------------------------------------------------

    async def _connect_forever(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        config = self.config
        assert config.connect is not None
        connector = self.context.transports.dial(config.connect, tls=config.tls)
        self.status.address = [str(config.connect)]
        task_status.started()
        await keep_connected(
            connector,
            config.connect,
            self._receive,
            backoff=self.backoff,
            connect_timeout=config.connect_timeout,
            status=self.status,
            log=self.log,
        )

    # -- both ----------------------------------------------------------------------------

    async def _receive(self, connection: Connection, slot: _Slot | None = None) -> str:
        """Publish everything ``connection`` carries; return how it ended, for the log.

        ``slot`` is the connection's slot in listen mode: it is marked proven with the first
        valid frame (and, for a one-producer protocol, refused if another producer has the
        stream).
        """
        config = self.config
        stream = self.context.streams.get(config.stream)
        # Blocks: frames that arrive back to back move through the stream as one object.
        decoder = make_decoder(
            config.protocol, config.max_frame_size, config.verify_crc, blocks=True
        )
        status = self.status
        client = ClientInfo(connection.peer, connected_since=time.time())
        status.clients[id(client)] = client
        idle = self._idle.idle
        timer: _Idle | None = None
        clock: FrameClock | None = None

        async def publish(frames: Sequence[Frame]) -> None:
            if slot is not None and not slot.proven:
                if self._one_producer and self._proven:
                    raise _Refused(
                        f"a {config.protocol} stream takes one producer at a time, and "
                        "another is producing"
                    )
                slot.proven = True
                self._proven += 1
            nbytes = sum(frame.size for frame in frames)
            count = frame_count(frames)
            client.frames_in += count
            client.bytes_in += nbytes
            status.frames_in += count
            status.bytes_in += nbytes
            await stream.publish(frames)

        try:
            with trio.CancelScope() as watched:
                timer = (
                    self._idle.add(watched, connection.bytes_waiting) if idle != math.inf else None
                )
                if self._frame_watch.timeout != math.inf:
                    clock = self._frame_watch.add(watched)
                await receive_frames(
                    connection,
                    decoder,
                    publish,
                    on_activity=None if timer is None else timer.active,
                    frame_clock=clock,
                )
                ended = Ended(
                    "ended its stream"
                    if decoder.ended
                    else f"closed the connection (after {client.frames_in} frames)"
                )
                # The stream ends with its last producer, and only if that one sent something:
                # a port probe or a health check must not end every reader's run.
                if client.frames_in and len(status.clients) == 1:
                    stream.end_of_stream(f"the producer {connection.peer} {ended}")
                return ended
            if clock is not None and clock.expired:
                reason = describe_expiry(clock, decoder, connection, self._frame_watch.timeout)
                self.frames_timed_out += 1
                status.detail["frames_timed_out"] = self.frames_timed_out
                status.record_error(f"{connection.peer}: {reason}")
                outcome = f"closed: {reason}"
            else:
                return f"sent nothing for {idle:g}s; dropped the connection"
        except protocols.ProtocolError as exc:
            status.record_error(f"{connection.peer}: {exc}")
            outcome = f"closed: {exc}"
        except MetadataLimitExceeded as exc:
            status.record_error(f"{connection.peer}: {exc.reason}")
            outcome = f"refused: {exc.reason}"
        except _Refused as exc:
            outcome = f"refused: {exc}"
        except trio.BrokenResourceError as exc:
            return f"connection lost ({describe_loss(exc)})"
        finally:
            if timer is not None:
                self._idle.remove(timer)
            if clock is not None:
                self._frame_watch.remove(clock)
            del status.clients[id(client)]
        if slot is not None:
            slot.failed = True
        return outcome
