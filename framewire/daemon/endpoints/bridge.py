"""``kind = "bridge"``: SLAC Rogue's two-port stream bridge (``protocol = "rogue"``).

Rogue's ``TcpServer`` and ``TcpClient`` talk over ZeroMQ on two consecutive ports, one per
direction, with PUSH/PULL sockets (not PAIR):

=========  ===============================  ===============================
role       inbound (PULL, peer -> us)        outbound (PUSH, us -> peer)
=========  ===============================  ===============================
server     binds ``tcp://addr:P``           binds ``tcp://addr:P+1``
client     connects ``tcp://addr:P+1``      connects ``tcp://addr:P``
=========  ===============================  ===============================

Every frame is one 4-part message (flags, channel, error, payload; see
:mod:`framewire.protocols.rogue`, which does all the bytes handling). Frames from the peer
are published into ``publish`` (or counted and discarded without it); frames of
``subscribe`` are sent to the peer. Both sockets always exist, so a peer's connection is
complete whichever directions are used.

Sending is lossless, as in Rogue
    The bridge subscribes to ``subscribe`` once, with a queue bounded by
    ``max_queue_frames`` and ``max_queue_bytes``. The PUSH socket has ``IMMEDIATE`` set, as
    Rogue's has: with no peer connected nothing can be sent, the send waits (Rogue's
    ``acceptFrame()`` blocks likewise), the queue fills, and then the stream's publishers
    wait (``policy = "lossless"``, the default). With ``policy = "lossy"`` the queue drops
    its oldest DATA frames instead (never metadata), like a Rogue ``Fifo`` put in front of
    the bridge; publishers then never wait. ``detail.send_blocked`` is true while a send
    waits for the peer. What ZeroMQ had already queued for a peer that goes away (up to
    ``max_queue_frames`` messages, its high-water mark) is lost with that peer, as in Rogue.
Bad messages
    A message with the wrong number of parts or wrong part sizes is dropped, counted in
    ``detail.messages_dropped`` and logged at most once per 10 seconds. A frame Rogue
    cannot carry (an empty payload, headers out of range) is dropped, counted in
    ``detail.frames_unencodable`` and logged once per type.
Stopping
    On a stop request the bridge sends what is queued (while the daemon's grace period
    lasts), then closes, leaving ZeroMQ up to a second to hand the last messages over.

ZeroMQ reconnects by itself (a client whose server is away retries every 100 ms or so), so
the bridge has no backoff of its own. pyzmq is needed (``pip install 'framewire[zmq]'``):
without it the endpoint fails at start, saying so.
"""

from __future__ import annotations

from typing import Any, Final

import trio

from ...config import BridgeConfig, ZmqAddress
from ...frame import Frame
from ...protocols import ProtocolError
from ...protocols.rogue import RogueCodec
from ..flow import UnencodableFrames
from ..lograte import INTERVAL, RateLimitedWarning
from ..outbox import Outbox, OutboxCutOff
from ..stream import MetadataLimitExceeded, Policy, QueueBounds, Subscription
from ..zeromq import AsyncSocket, open_context, require_zmq
from ._base import Endpoint, EndpointContext, QueueClosed, stream_label

__all__ = ["BridgeEndpoint"]

#: LINGER (ms) of the outbound socket when the bridge stops after sending what was queued.
STOP_LINGER_MS: Final = 1000


class BridgeEndpoint(Endpoint[BridgeConfig]):
    kind = "bridge"
    #: What a reload changes on the running endpoint, its connections kept: its queue's
    #: bounds, when it has a queue (see :meth:`reconfigure`).
    live_fields = frozenset({"max_queue_frames", "max_queue_bytes"})

    def takes_live_changes(self) -> bool:
        return self.outbox is not None

    def reconfigure(self, config: BridgeConfig) -> None:
        """Apply a reload's live changes: the queue's new bounds, at once (see
        :meth:`Outbox.rebound`)."""
        super().reconfigure(config)
        if self.outbox is not None:
            self.outbox.rebound_to(config)

    def __init__(
        self,
        name: str,
        config: BridgeConfig,
        context: EndpointContext,
        *,
        log_interval: float = INTERVAL,
    ) -> None:
        super().__init__(name, config, context)
        self._codec = RogueCodec(config.metadata_channels)
        self._bad_messages = RateLimitedWarning(
            self.log,
            "dropped bad Rogue messages",
            detail=self.status.detail,
            key="messages_dropped",
            interval=log_interval,
        )
        self._unencodable = UnencodableFrames(self.log, "rogue", self.status.detail)
        #: What waits for the peer (the frames of ``subscribe``), in memory or on disk.
        self.outbox: Outbox | None = None
        if config.subscribe is not None:
            self.outbox = Outbox.of(name, config, self._subscribe, status=self.status, log=self.log)
        self.status.detail.update(send_blocked=False, messages_dropped=0)

    @property
    def inbound(self) -> ZmqAddress:
        """Where frames from the peer come in: P (server) or P+1 (client)."""
        address = self.config.address
        return address if self.config.role == "server" else address.with_port(address.port + 1)

    @property
    def outbound(self) -> ZmqAddress:
        """Where frames to the peer go out: P+1 (server) or P (client)."""
        address = self.config.address
        return address.with_port(address.port + 1) if self.config.role == "server" else address

    def _subscribe(self) -> Subscription:
        config = self.config
        assert config.subscribe is not None
        return self.context.streams.get(config.subscribe).subscribe(
            bounds=QueueBounds(config.max_queue_frames, config.queue_bytes),
            policy=Policy(config.queue_policy),
            label=f"bridge {self.name} -> {self.outbound}",
            owner=self.name,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        zmq: Any = require_zmq()
        config = self.config
        bind = config.role == "server"
        async with open_context() as context:
            pull = AsyncSocket.make(context, zmq.PULL, rcvhwm=config.max_queue_frames)
            push = AsyncSocket.make(context, zmq.PUSH, sndhwm=config.max_queue_frames)
            linger = 0
            try:
                # A message part over max_frame_size drops the peer's connection.
                pull.socket.setsockopt(zmq.MAXMSGSIZE, config.max_frame_size)
                # As Rogue: queue nothing for a peer that is not there; the send waits.
                push.socket.setsockopt(zmq.IMMEDIATE, 1)
                self.status.address = [
                    pull.bind_or_connect(self.inbound, bind=bind),
                    push.bind_or_connect(self.outbound, bind=bind),
                ]
                self.log.info(
                    "Rogue bridge (%s) in %s, out %s (publish %s, subscribe %s)",
                    config.role,
                    self.status.address[0],
                    self.status.address[1],
                    stream_label(config.publish),
                    stream_label(config.subscribe),
                )
                outbox = self.outbox
                sent_all = trio.Event()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._stop_when_requested, nursery.cancel_scope, sent_all)
                    nursery.start_soon(self._receive, pull)
                    if outbox is not None:
                        outbox.start()
                        nursery.start_soon(outbox.run)
                        nursery.start_soon(self._send, push, outbox, sent_all)
                    task_status.started()
                linger = STOP_LINGER_MS if sent_all.is_set() else 0
            finally:
                if self.outbox is not None:
                    self.outbox.close("the bridge stopped")
                pull.close()
                push.close(linger)

    async def _stop_when_requested(
        self, cancel_scope: trio.CancelScope, sent_all: trio.Event
    ) -> None:
        """On a stop request: send what is queued in memory (while the grace period lasts),
        or let a disk buffer's intake put the rest into it; then stop."""
        await self._stop_requested.wait()
        outbox = self.outbox
        if outbox is not None:
            outbox.stop("the bridge is stopping")
            if not outbox.is_disk:
                await sent_all.wait()
            await outbox.finished.wait()
        cancel_scope.cancel()

    async def _receive(self, pull: AsyncSocket) -> None:
        """Decode what the peer sends and publish it; drop and count bad messages."""
        config = self.config
        status = self.status
        stream = self.context.streams.get(config.publish) if config.publish is not None else None
        decode = self._codec.decode
        while True:
            batch = await pull.receive_batch()
            frames: list[Frame] = []
            for parts in batch:
                try:
                    frames.append(decode(parts))
                except ProtocolError as exc:
                    self._bad_messages(str(exc))
            if not frames:
                continue
            status.frames_in += len(frames)
            status.bytes_in += sum(frame.size for frame in frames)
            if stream is not None:
                try:
                    await stream.publish(frames)
                except MetadataLimitExceeded as exc:
                    # A ZeroMQ peer cannot be refused alone: drop what passes the bound.
                    self._bad_messages(exc.reason)
            else:
                discarded = status.detail.get("frames_discarded", 0)
                assert isinstance(discarded, int)
                status.detail["frames_discarded"] = discarded + len(frames)

    async def _send(self, push: AsyncSocket, outbox: Outbox, sent_all: trio.Event) -> None:
        """Send the outbox's frames, waiting while the peer is absent or slow. What ZeroMQ
        took counts as delivered (a disk buffer consumes it)."""
        status = self.status
        detail = status.detail
        encode = self._codec.encode
        unencodable = self._unencodable
        while True:
            try:
                batch = await outbox.take()
            except OutboxCutOff as cut:
                raise QueueClosed(f"the outgoing queue was closed: {cut}") from None
            if batch is None:
                if self.stop_requested:
                    sent_all.set()
                    return
                continue
            sent = sent_bytes = handed = 0
            try:
                for frame in batch:
                    try:
                        parts = encode(frame)
                    except ValueError as exc:
                        unencodable(frame, exc)
                        handed += 1
                        continue
                    if not push.send_multipart_nowait(parts, copy=False):
                        detail["send_blocked"] = True
                        try:
                            await push.send_multipart(parts, copy=False)
                        finally:
                            detail["send_blocked"] = False
                    sent += 1
                    handed += 1
                    sent_bytes += frame.size
            finally:
                status.frames_out += sent
                status.bytes_out += sent_bytes
            await outbox.done(handed)
