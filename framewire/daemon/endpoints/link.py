"""``kind = "link"``: a bidirectional link that keeps itself up (Datalink's promise).

One side listens, the other connects; frames flow both ways over one connection. The link
publishes what the peer sends into the stream ``publish`` and sends the peer what the stream
``subscribe`` carries. Two links joined through two streams make Datalink's Databridge.

Liveness
    Each side sends a keepalive when it has sent nothing for ``keepalive`` seconds (and one
    as soon as it connects, so the peer hears it at once). When the peer sends keepalives too
    (``config.expects_peer_keepalives``: native links, and datalink links with
    ``peer_keepalives = true``) it is dead when *nothing*, data or keepalive, arrives for
    ``timeout`` seconds while the link is waiting to read; time spent waiting for room in a
    lossless ``publish`` stream does not count (the peer is not silent then, we are not
    listening). Sending never resets the timer: Datalink's flaw, where a side that only
    sends drops a healthy link every timeout, cannot happen. A Datalink peer sends a
    keepalive only when its application asks, so by default a datalink link has no
    dead-peer timeout: it never hangs up on a silent peer (a Datalink server reads the
    hang-up as "no data" and may never accept again), and TCP finds a dead one: failed
    writes, ``send_timeout``, and TCP keepalive with TCP_USER_TIMEOUT set to
    ``dead_host_timeout`` on every link socket (:func:`enable_tcp_keepalive`). A peer that
    keeps sending a byte now and then inside one frame is never silent: ``frame_timeout``
    drops it once a frame is not complete that long after its first bytes
    (:mod:`~framewire.daemon.frametimeout`).
Up and down
    A connection counts as *up* once the peer has said something valid (a frame or a
    keepalive), or, without the peer's keepalives, as soon as it is connected. Connect mode
    retries with exponential backoff and jitter, capped at ``reconnect.maximum``, starting
    over after a connection that stayed up for ``reconnect.stable_after``; every connection
    is closed cleanly before the delay, so attempts never pile up in a peer's backlog. A
    refused or silent connection, bad markers or an absurd size all end the connection and
    retry the same way. Log lines are written per change of state (up, down, a new reason
    for being down), never per attempt (a datalink connection that keeps failing before the
    peer says anything valid is logged once).
Listen mode
    One peer at a time. With no peer connected, a new connection takes the link at once.
    While a peer is connected, a newcomer must first prove it is a peer: it **replaces** the
    current one once it has sent a valid frame or keepalive (or, for a large first frame,
    :data:`PROVEN_AFTER` bytes the decoder accepts) within ``timeout``, so a peer that
    restarted does not wait out its own dead connection, while a port probe, a scanner or a
    client sending garbage is closed with one log line (naming the peer that keeps the link,
    and why) and takes nothing from the link. If the peer's connection ends while newcomers
    are vetted, the newest takes over at once, silent or not (a Datalink client that
    reconnected speaks only when its application writes). At most :data:`MAX_CHALLENGERS`
    newcomers are vetted at once (the oldest gives way). Listen mode does not back off:
    pacing retries is the connecting side's job.
The outgoing queue
    The link subscribes to ``subscribe`` once, when it starts, so the queue outlives
    connections: while the link is down frames wait there, bounded by ``max_queue_frames``
    and ``max_queue_bytes``. ``lossless``: the stream's publishers wait for room. ``lossy``:
    the oldest DATA frames are dropped, never metadata. A batch a broken connection
    interrupted is sent again on the next one (at least once), after the metadata that was
    current for it (native protocol only: datalink cannot tell metadata from data). Frames
    are not acknowledged: what the kernel had accepted when a connection broke may be lost.
Stopping
    When the endpoint stops while up, it sends what is queued, then the protocol's
    end-of-stream (native), then closes; while down, queued frames are discarded.

The link's state is in ``status.state``: ``listening`` (listen mode, no peer), ``connecting``
(connect mode, an attempt or an unproven connection), ``up``, ``reconnecting`` (waiting for
the next attempt; ``detail.next_attempt_in`` / ``next_attempt_at``). ``detail.link`` is
``"up"`` or ``"down"``.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Final

import attrs
import trio

from ... import protocols
from ...config import LinkConfig
from ...frame import Buffer, Frame, FrameKind
from ...protocols import Decoder
from ..backoff import Backoff
from ..flow import (
    UnencodableFrames,
    encode_frames,
    first_error,
    receive_frames,
    send_frames,
)
from ..frametimeout import FrameWatch, describe_expiry
from ..keepalive import KeepaliveConnection, send_keepalives
from ..outbox import Outbox, OutboxCutOff
from ..reconnect import describe_connect_error
from ..stream import MetadataLimitExceeded, Policy, QueueBounds, Subscription
from ..transport import Connection, bound_addresses, enable_tcp_keepalive, peer_name
from ._base import ClientInfo, Endpoint, EndpointContext, QueueClosed, stream_label

#: Bytes a newcomer may send, all accepted by the decoder, before it counts as a peer even
#: without a complete frame (its first frame is large).
PROVEN_AFTER: Final = 64 * 1024
#: Newcomers vetted at once while a peer is connected; a further one ends the oldest.
MAX_CHALLENGERS: Final = 8

__all__ = ["LinkEndpoint"]

#: Seconds between refreshes of the queue figures in status.
STATUS_REFRESH = 1.0
_DATA = FrameKind.DATA


@attrs.define
class _Outcome:
    """How one connection went."""

    peer: str
    heard: bool = False
    reason: str | None = None
    stopping: bool = False
    #: The peer ended its stream cleanly: a normal end, logged at INFO.
    ended: bool = False
    #: Listen mode: the newcomer that took the link over.
    replaced_by: str | None = None
    #: The peer sent a valid frame or keepalive on this connection.
    proven: bool = False


@attrs.define(eq=False)
class _Challenger:
    """A newcomer being vetted while a peer has the link."""

    peer: str
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    #: Set when the peer's connection ends while this one is vetted: it takes over.
    promoted: trio.Event = attrs.field(factory=trio.Event)


@attrs.frozen
class _Newcomer:
    """A connection given the link, with the bytes already read from it while vetting it."""

    stream: trio.abc.Stream
    already_read: bytes


class _WatchedDecoder:
    """A decoder that calls ``heard()`` once, on the first valid frame or keepalive."""

    def __init__(self, inner: Decoder, heard: Callable[[], None]) -> None:
        self.inner = inner
        self.protocol = inner.protocol
        self.max_frame_size = inner.max_frame_size
        self._heard: Callable[[], None] | None = heard

    @property
    def ended(self) -> bool:
        return self.inner.ended

    @ended.setter
    def ended(self, value: bool) -> None:
        self.inner.ended = value

    @property
    def keepalives(self) -> int:
        count: int = getattr(self.inner, "keepalives", 0)
        return count

    def get_buffer(self) -> memoryview:
        return self.inner.get_buffer()

    def buffer_updated(self, nbytes: int, /) -> list[Frame]:
        frames = self.inner.buffer_updated(nbytes)
        if self._heard is not None and (frames or self.keepalives):
            heard, self._heard = self._heard, None
            heard()
        return frames

    def feed(self, data: Buffer, /) -> list[Frame]:
        return self.inner.feed(data)

    def end_of_input(self) -> None:
        self.inner.end_of_input()

    @property
    def buffered(self) -> int:
        return self.inner.buffered

    @property
    def pending_frame_size(self) -> int:
        return self.inner.pending_frame_size


class LinkEndpoint(Endpoint[LinkConfig]):
    kind = "link"
    #: What a reload changes on the running endpoint, its connection kept (see
    #: :meth:`reconfigure`).
    live_fields = frozenset(
        {
            "max_queue_frames",
            "max_queue_bytes",
            "max_metadata_frames",
            "max_metadata_bytes",
            "connect_timeout",
            "reconnect",
        }
    )

    @staticmethod
    def _bounds(config: LinkConfig) -> QueueBounds:
        """The outgoing queue's bounds, metadata caps included."""
        return QueueBounds(
            config.max_queue_frames,
            config.queue_bytes,
            config.max_metadata_frames,
            config.max_metadata_bytes,
        )

    def reconfigure(self, config: LinkConfig) -> None:
        """Apply a reload's live changes: the queue's new bounds, at once (see
        :meth:`Outbox.rebound`; a link without ``subscribe`` has no queue), ``reconnect``
        to the next delay and ``connect_timeout`` to the next attempt (connect mode)."""
        super().reconfigure(config)
        self.backoff.config = config.reconnect
        if self.outbox is not None:
            self.outbox.rebound_to(config, self._bounds(config))

    def __init__(
        self,
        name: str,
        config: LinkConfig,
        context: EndpointContext,
        *,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(name, config, context)
        self.backoff = Backoff(config.reconnect, rng)
        self._spec = protocols.get(config.protocol)
        self._encoder = self._spec.make_encoder()
        self._unencodable = UnencodableFrames(self.log, config.protocol, self.status.detail)
        # Datalink cannot tell metadata from data: replaying metadata would duplicate data.
        self._replay_metadata = config.protocol != "datalink"
        #: What waits for the peer (the frames of ``subscribe``), in memory or on disk.
        self.outbox: Outbox | None = None
        if config.subscribe is not None:
            self.outbox = Outbox.of(name, config, self._subscribe, status=self.status, log=self.log)
        self._session_scope: trio.CancelScope | None = None
        self._session_done: trio.Event | None = None
        self._replaced_by: str | None = None
        # Listen mode: whether a connection has the link (or was just given it), and the
        # cancel scopes of the newcomers being vetted, oldest first.
        self._serving = False
        self._handing_over = 0
        self._challengers: list[_Challenger] = []
        #: The peer of the current session (listen mode: the one newcomers are vetted against).
        self._peer: str | None = None
        self._decoder: _WatchedDecoder | None = None
        self._state_changed = trio.Event()
        #: Whether the next connection to come up is logged (not while one keeps failing).
        self._announce_up = True
        self.keepalives_sent = 0
        self.keepalives_received = 0
        self._frame_watch = FrameWatch(config.frame_timeout_seconds)
        #: Connections closed because a frame did not arrive whole within frame_timeout.
        self.frames_timed_out = 0
        #: Connections that came up (the peer said something valid).
        self.connections = 0

    # -- state -------------------------------------------------------------------------

    def _set_state(self, state: str, **detail: object) -> None:
        status = self.status
        status.state = state
        status.detail["link"] = "up" if state == "up" else "down"
        if state != "reconnecting":
            status.detail.pop("next_attempt_in", None)
            status.detail.pop("next_attempt_at", None)
        if state != "up":
            status.detail.pop("connected_since", None)
            status.detail.pop("peer", None)
        status.detail.update(detail)
        self._refresh_figures()
        self._state_changed.set()
        self._state_changed = trio.Event()

    async def wait_for_state(self, *states: str) -> None:
        """Wait until ``status.state`` is one of ``states`` (at once if it is already)."""
        while self.status.state not in states:
            await self._state_changed.wait()

    def _refresh_figures(self) -> None:
        status = self.status
        if self.outbox is not None:
            self.outbox.report()
        decoder = self._decoder
        received = self.keepalives_received + (decoder.keepalives if decoder is not None else 0)
        status.detail["keepalives_received"] = received
        status.detail["keepalives_sent"] = self.keepalives_sent
        status.detail["connections"] = self.connections

    async def _refresh_status(self) -> None:
        while True:
            self._refresh_figures()
            await trio.sleep(STATUS_REFRESH)

    def _subscribe(self) -> Subscription:
        config = self.config
        assert config.subscribe is not None
        return self.context.streams.get(config.subscribe).subscribe(
            bounds=self._bounds(config),
            policy=Policy(config.queue_policy),
            label=f"link {self.name}",
            owner=self.name,
        )

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        outbox = self.outbox
        if outbox is not None:
            outbox.start()
        try:
            async with trio.open_nursery() as nursery:
                if outbox is not None:
                    nursery.start_soon(outbox.run)
                nursery.start_soon(self._stop_when_requested, nursery.cancel_scope)
                nursery.start_soon(self._refresh_status)
                if self._frame_watch.timeout != math.inf:
                    nursery.start_soon(self._frame_watch.run)
                if config.listen is not None:
                    await nursery.start(self._listen)
                else:
                    await nursery.start(self._connect_forever, nursery.cancel_scope)
                task_status.started()
        finally:
            if outbox is not None:
                outbox.close("the link stopped")
            self._refresh_figures()

    async def _stop_when_requested(self, cancel_scope: trio.CancelScope) -> None:
        """On a stop request: with a memory buffer, if up, send what is queued and end the
        stream; a disk buffer keeps what waits (its intake puts the rest in first). Then
        stop."""
        await self._stop_requested.wait()
        outbox = self.outbox
        if outbox is not None:
            done = self._session_done
            outbox.stop("the link endpoint is stopping")
            if not outbox.is_disk and self.status.state == "up" and done is not None:
                await done.wait()
            await outbox.finished.wait()
        cancel_scope.cancel()

    # -- connect mode ------------------------------------------------------------------

    async def _connect_forever(
        self,
        endpoint_scope: trio.CancelScope,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        config = self.config
        assert config.connect is not None
        connector = self.context.transports.dial(config.connect, tls=config.tls)
        peer = str(config.connect)
        self.status.address = [peer]
        self.log.info(
            "link to %s (%s; publish %s, subscribe %s)",
            peer,
            config.protocol,
            stream_label(config.publish),
            stream_label(config.subscribe),
        )
        task_status.started()
        last_problem: str | None = None
        # Why the last connection ended if it came up on connecting (datalink) and failed
        # before the peer said anything valid: a series of those is logged once.
        flapping: str | None = None
        while True:
            self._set_state("connecting")
            problem: str | None
            timeout = self.config.connect_timeout  # a reload may change it
            try:
                with trio.fail_after(timeout):
                    stream = await connector()
                # Over TLS 1.3, nothing goes into a connection whose server refused us.
                verdict = Connection(stream, peer)
                try:
                    await verdict.hear_tls_verdict()
                except BaseException:  # refused, or cancelled: the stream is ours to close
                    await trio.aclose_forcefully(stream)
                    raise
            except (OSError, trio.TooSlowError) as exc:
                problem = "cannot connect: " + describe_connect_error(exc, timeout)
            else:
                connected_at = trio.current_time()
                self._announce_up = flapping is None
                try:
                    outcome = await self._session(stream, peer, verdict.take_back())
                finally:
                    # A clean close (FIN), then the backoff delay below: attempts never pile
                    # up in a peer's listen backlog.
                    await trio.aclose_forcefully(stream)
                if outcome.stopping or self.stop_requested:
                    return
                problem = None if outcome.heard else outcome.reason
                if outcome.heard:
                    last_problem = None
                    stable_after = self.backoff.config.stable_after
                    stable = trio.current_time() - connected_at >= stable_after
                    if stable:
                        self.backoff.reset()
                    if stable or outcome.reason != flapping:
                        self.log.log(
                            logging.INFO if outcome.ended else logging.WARNING,
                            "link down: %s: %s; reconnecting",
                            peer,
                            outcome.reason,
                        )
                    # Up on connecting, then dropped before the peer said anything valid.
                    unproven_failure = not (stable or outcome.ended or outcome.proven)
                    flapping = outcome.reason if unproven_failure else None
                    if flapping is not None:
                        self.status.record_error(flapping)
            if problem is not None:
                self.status.record_error(problem)
                if problem != last_problem:
                    self.log.warning("link to %s is down: %s; retrying with backoff", peer, problem)
                    last_problem = problem
            delay = self.backoff.next_delay()
            self._set_state(
                "reconnecting",
                next_attempt_in=round(delay, 3),
                next_attempt_at=round(time.time() + delay, 3),
            )
            await trio.sleep(delay)

    # -- listen mode -------------------------------------------------------------------

    async def _listen(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        config = self.config
        assert config.listen is not None
        listeners = await self.context.transports.bind(
            config.listen, tls=config.tls, socket_mode=config.socket_mode
        )
        self.status.address = bound_addresses(listeners)
        self._set_state("listening")
        self.log.info(
            "link listening on %s (%s; publish %s, subscribe %s)",
            ", ".join(self.status.address),
            config.protocol,
            stream_label(config.publish),
            stream_label(config.subscribe),
        )
        send_channel, receive_channel = trio.open_memory_channel[_Newcomer](0)
        async with trio.open_nursery() as nursery:
            with send_channel:
                for listener in listeners:
                    nursery.start_soon(self._accept_peers, listener, send_channel.clone(), nursery)
            nursery.start_soon(self._serve_peers, receive_channel)
            task_status.started()

    async def _accept_peers(
        self,
        listener: trio.abc.Listener[trio.abc.Stream],
        incoming: trio.MemorySendChannel[_Newcomer],
        nursery: trio.Nursery,
    ) -> None:
        async with listener:
            with incoming:
                while True:
                    stream = await self._accept(listener)
                    if not (self._serving or self._handing_over):
                        await self._hand_over(_Newcomer(stream, b""), incoming)
                    else:
                        nursery.start_soon(self._vet, stream, incoming.clone())

    async def _hand_over(
        self, newcomer: _Newcomer, incoming: trio.MemorySendChannel[_Newcomer]
    ) -> None:
        """Give ``newcomer`` the link: end the current session, if any, and queue it."""
        if self._session_scope is not None:
            self._replaced_by = peer_name(newcomer.stream)
            self._session_scope.cancel()
        handed = False
        self._handing_over += 1
        try:
            await incoming.send(newcomer)
            handed = True
        finally:
            self._handing_over -= 1
            if not handed:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(newcomer.stream)

    async def _vet(
        self, stream: trio.abc.Stream, incoming: trio.MemorySendChannel[_Newcomer]
    ) -> None:
        """A newcomer while the link is taken: hand it the link once it has shown it is a
        peer, or once the current peer's connection ends, within ``timeout`` (see the module
        docstring); otherwise close it with one log line saying which peer kept the link."""
        peer = peer_name(stream)
        timeout = self.config.timeout
        challenger = _Challenger(peer)
        self._challengers.append(challenger)
        if len(self._challengers) > MAX_CHALLENGERS:
            self._challengers.pop(0).scope.cancel()
        incumbent = self._peer or "the previous peer"
        verdict: str | None = None
        proof: str | None = None
        received = bytearray()
        handed = False
        try:
            with incoming, challenger.scope:
                connection = await self._establish(stream)
                if connection is None:  # a failed TLS handshake, already logged
                    return
                with trio.move_on_after(timeout):
                    async with trio.open_nursery() as race:

                        async def listen_to_it() -> None:
                            nonlocal proof, verdict
                            try:
                                proof = await self._hears_a_peer(connection, received)
                            except protocols.ProtocolError as exc:
                                verdict = f"it sent bad bytes ({exc})"
                            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                                verdict = f"its connection broke ({exc})"
                            else:
                                if proof is None:
                                    verdict = "it closed without sending a valid frame or keepalive"
                            race.cancel_scope.cancel()

                        async def outlive_the_peer() -> None:
                            nonlocal proof
                            await challenger.promoted.wait()
                            proof = f"the connection of {incumbent} ended"
                            race.cancel_scope.cancel()

                        race.start_soon(listen_to_it)
                        race.start_soon(outlive_the_peer)
                if proof is not None:
                    self.log.info(
                        "new connection from %s takes over the link from %s: %s",
                        peer,
                        incumbent,
                        proof,
                    )
                    handed = True
                    await self._hand_over(_Newcomer(stream, bytes(received)), incoming)
                    return
                verdict = verdict or f"it sent nothing valid within {timeout:g}s"
            if challenger.scope.cancelled_caught:
                verdict = "more new connections arrived than are vetted at once"
        finally:
            if challenger in self._challengers:
                self._challengers.remove(challenger)
            if not handed:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(stream)
        if verdict is not None:
            self.log.warning(
                "new connection from %s closed; the link stays with its peer %s: %s",
                peer,
                self._peer or incumbent,
                verdict,
            )

    async def _hears_a_peer(self, connection: Connection, received: bytearray) -> str | None:
        """Read ``connection`` into ``received`` until it has sent a valid frame or
        keepalive (or :data:`PROVEN_AFTER` valid bytes); return what it sent, as a reason to
        give it the link. None if it closed first. Raises ProtocolError for bytes that are
        not this link's protocol."""
        decoder = self._spec.make_decoder(self.config.max_frame_size)
        buffer = memoryview(bytearray(16 * 1024))
        while True:
            nbytes = await connection.receive_into(buffer)
            if not nbytes:
                return None
            received += buffer[:nbytes]
            frames = decoder.feed(buffer[:nbytes])
            keepalives: int = getattr(decoder, "keepalives", 0)
            if frames:
                return "it sent a valid frame"
            if keepalives:
                return "it sent a valid keepalive"
            if len(received) >= PROVEN_AFTER:
                return f"it sent {len(received)} bytes of a valid frame"

    def _promote_a_challenger(self) -> None:
        """The peer's connection ended: the newest newcomer being vetted takes over."""
        if self._challengers:
            self._challengers.pop().promoted.set()

    async def _serve_peers(self, incoming: trio.MemoryReceiveChannel[_Newcomer]) -> None:
        last_problem: str | None = None
        with incoming:
            async for newcomer in incoming:
                self._serving = True
                stream = newcomer.stream
                peer = peer_name(stream)
                try:
                    if await self._establish(stream) is None:  # a failed TLS handshake
                        self._serving = False
                        continue
                    outcome = await self._session(stream, peer, newcomer.already_read)
                finally:
                    await trio.aclose_forcefully(stream)
                self._serving = False
                if outcome.stopping or self.stop_requested:
                    return
                if outcome.replaced_by is None:
                    self._promote_a_challenger()
                if outcome.heard:
                    last_problem = None
                    self.log.log(
                        logging.INFO if outcome.ended else logging.WARNING,
                        "link down: %s: %s; listening",
                        peer,
                        outcome.reason,
                    )
                elif outcome.reason is not None:
                    self.status.record_error(f"{peer}: {outcome.reason}")
                    if outcome.reason != last_problem:
                        self.log.warning("peer %s dropped: %s", peer, outcome.reason)
                        last_problem = outcome.reason
                self._set_state("listening")

    # -- one connection ----------------------------------------------------------------

    async def _session(
        self, stream: trio.abc.Stream, peer: str, already_read: bytes = b""
    ) -> _Outcome:
        """Run one connection until it fails, the peer goes quiet or ends, or we stop.

        Returns how it ended. Raises :class:`QueueClosed` if the outgoing subscription was
        cut off; every connection-level failure is an outcome, not an exception.
        """
        config = self.config
        status = self.status
        enable_tcp_keepalive(stream, config.dead_host_timeout)
        connection = KeepaliveConnection(stream, peer)
        connection.give_back(already_read)
        outcome = _Outcome(peer)
        client = ClientInfo(peer, connected_since=time.time())
        key = id(client)
        status.clients[key] = client
        self._peer = peer

        announced = False

        def came_up() -> None:
            nonlocal announced
            if outcome.heard:
                return
            outcome.heard = True
            self.connections += 1
            self._set_state("up", connected_since=round(time.time(), 3), peer=peer)
            if self._announce_up:
                self.log.info("link up: %s", peer)
                announced = True

        def heard() -> None:
            nonlocal announced
            outcome.proven = True
            came_up()
            if not announced:  # after a series of failures logged once: this one works
                self.log.info("link up: %s", peer)
                announced = True

        decoder = _WatchedDecoder(self._spec.make_decoder(config.max_frame_size), heard)
        self._decoder = decoder
        self._replaced_by = None
        if not config.expects_peer_keepalives:
            came_up()  # a silent peer is a healthy one: up means connected
        self._session_done = done = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                self._session_scope = nursery.cancel_scope
                nursery.start_soon(self._receive_side, connection, decoder, client, outcome)
                nursery.start_soon(self._keepalive_side, connection)
                if self.outbox is not None:
                    nursery.start_soon(self._send_side, connection, self.outbox, outcome)
        except* protocols.ProtocolError as group:
            outcome.reason = f"bad bytes from the peer: {first_error(group)}"
        except* MetadataLimitExceeded as group:
            outcome.reason = f"refused: {first_error(group)}"
        except* trio.TooSlowError:
            outcome.reason = f"a write stalled for more than {config.send_timeout:g}s"
        except* (trio.BrokenResourceError, trio.ClosedResourceError) as group:
            outcome.reason = f"connection lost ({first_error(group)})"
        finally:
            self._session_scope = None
            self._peer = None
            del status.clients[key]
            self.keepalives_received += decoder.keepalives
            self._decoder = None
            done.set()
        outcome.replaced_by = self._replaced_by
        if outcome.reason is None:
            outcome.reason = (
                f"replaced by a new connection from {self._replaced_by}"
                if self._replaced_by is not None
                else "the connection ended"
            )
        if outcome.heard:
            self._set_state("down" if config.listen is None else "listening")
        self._refresh_figures()
        return outcome

    async def _receive_side(
        self,
        connection: Connection,
        decoder: _WatchedDecoder,
        client: ClientInfo,
        outcome: _Outcome,
    ) -> None:
        """Publish what the peer sends; end the session when it closes or falls silent."""
        config = self.config
        status = self.status
        # Without the peer's keepalives silence proves nothing: TCP finds a dead peer.
        timeout = config.timeout if config.expects_peer_keepalives else math.inf
        stream = self.context.streams.get(config.publish) if config.publish is not None else None
        watch = self._frame_watch
        clock = None
        with trio.CancelScope(deadline=trio.current_time() + timeout) as alive:
            if watch.timeout != math.inf:
                clock = watch.add(alive)

            def activity() -> None:
                alive.deadline = trio.current_time() + timeout

            async def publish(frames: Sequence[Frame]) -> None:
                nbytes = sum(frame.size for frame in frames)
                client.frames_in += len(frames)
                client.bytes_in += nbytes
                status.frames_in += len(frames)
                status.bytes_in += nbytes
                if stream is None:
                    return
                # Waiting for room in a lossless stream is not the peer's silence.
                alive.deadline = math.inf
                try:
                    await stream.publish(frames)
                finally:
                    alive.deadline = trio.current_time() + timeout

            try:
                await receive_frames(
                    connection, decoder, publish, on_activity=activity, frame_clock=clock
                )
            finally:
                if clock is not None:
                    watch.remove(clock)
            if decoder.ended:
                outcome.reason = "the peer ended its stream"
                outcome.ended = True
                if stream is not None:
                    stream.end_of_stream(f"the link peer {connection.peer} ended its stream")
            else:
                outcome.reason = "the peer closed the connection"
        if clock is not None and clock.expired:
            outcome.reason = describe_expiry(clock, decoder, connection, watch.timeout)
            self.frames_timed_out += 1
            status.detail["frames_timed_out"] = self.frames_timed_out
        elif alive.cancelled_caught:
            outcome.reason = f"heard nothing from the peer for {timeout:g}s"
        self._end_session()

    async def _keepalive_side(self, connection: KeepaliveConnection) -> None:
        """Send a keepalive whenever nothing was sent for ``keepalive`` seconds."""

        def sent() -> None:
            self.keepalives_sent += 1

        config = self.config
        await send_keepalives(
            connection,
            self._encoder.keepalive(),
            config.keepalive,
            send_timeout=config.send_timeout,
            on_sent=sent,
        )

    async def _send_side(self, connection: Connection, outbox: Outbox, outcome: _Outcome) -> None:
        """Send the metadata replay, the frames a broken connection interrupted, then the
        outbox, until stopped."""
        config = self.config
        status = self.status
        send_timeout = config.send_timeout
        outbox.rewind()
        replay = await outbox.metadata()
        if replay and self._replay_metadata:
            with trio.fail_after(send_timeout):
                await connection.send(self._encode(replay))
        while True:
            try:
                batch = await outbox.take()
            except OutboxCutOff as cut:
                raise QueueClosed(f"the outgoing queue was closed: {cut}") from None
            if batch is None:
                if self.stop_requested:
                    marker = self._encoder.end_of_stream()
                    if marker:
                        with trio.fail_after(send_timeout):
                            await connection.send([marker])
                    outcome.reason = "the link is stopping"
                    outcome.stopping = True
                    self._end_session()
                    return
                continue
            frames, nbytes = await send_frames(
                connection, self._encoder, batch, self._unencodable, send_timeout=send_timeout
            )
            status.frames_out += frames
            status.bytes_out += nbytes
            await outbox.done(len(batch))

    def _encode(self, frames: list[Frame]) -> list[Buffer]:
        return encode_frames(self._encoder, frames, self._unencodable)

    def _end_session(self) -> None:
        if self._session_scope is not None:
            self._session_scope.cancel()
