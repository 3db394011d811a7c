"""``kind = "pubsub"``: ZeroMQ publish/subscribe as xdas speaks it.

Messages are opaque: a packet (for xdas, a whole NetCDF4/HDF5 file) is one single-part
ZeroMQ message, carried whole as one frame's payload and never parsed.

``role = "publisher"``
    An XPUB socket bound to ``address`` sends the payload of every frame of ``stream`` as
    one message to every subscriber, as xdas's ``ZMQPublisher`` does. Each subscriber that
    connects is first sent the ``welcome`` message (``"xdas"`` by default: an xdas
    ``ZMQSubscriber.wait_until_subscribed()`` waits for it; ``welcome = ""`` sends none).
    Subscriptions are read as they come (``XPUB_VERBOSER``, so each subscribe and each
    unsubscribe or disconnect is seen) and counted in ``detail.subscribers``: the number of
    subscriptions, which is the number of subscribers when each subscribes once, as xdas's
    do. A subscriber that joins late receives from the next message on. The endpoint's queue
    (``max_queue_frames``/``max_queue_bytes``) is lossy: publishing never waits, the oldest
    data frames go first. ZeroMQ's high-water mark (``SNDHWM``) per subscriber is
    ``max_queue_frames`` messages; past it, ZeroMQ drops messages for that subscriber
    silently (PUB semantics), which no counter here can see.
``role = "subscriber"``
    A SUB socket connected to ``address``, subscribed to ``topic`` (a prefix; ``""`` is
    everything), publishes every message as a DATA frame of type ``type`` (timestamp 0) into
    ``stream``. A message equal to ``welcome`` is the publisher's greeting, not data: it is
    counted in ``detail.welcomes`` and dropped. Multipart messages are not packets: they are
    dropped, counted in ``detail.messages_dropped`` and logged at most once per 10 seconds.
    ``RCVHWM`` is ``max_queue_frames``; a message over ``max_frame_size`` makes ZeroMQ drop
    the connection (and reconnect). Publishing waits for room in lossless subscribers of
    ``stream``; meanwhile ZeroMQ's queue fills and the remote publisher drops, as PUB does.

ZeroMQ connects and reconnects by itself in the background (every 100 ms or so), so a
subscriber may start before its publisher. pyzmq is needed (``pip install
'framewire[zmq]'``): without it the endpoint fails at start, saying so.
"""

from __future__ import annotations

from typing import Any

import trio

from ...config import BufferConfig, PubSubConfig
from ...frame import Frame, FrameKind
from ..lograte import INTERVAL, RateLimitedWarning
from ..outbox import Outbox, OutboxCutOff
from ..stream import Policy, QueueBounds, Subscription
from ..zeromq import AsyncSocket, open_context, require_zmq
from ._base import Endpoint, EndpointContext, QueueClosed

__all__ = ["PubSubEndpoint"]

_SUBSCRIBE, _UNSUBSCRIBE = 1, 0


class PubSubEndpoint(Endpoint[PubSubConfig]):
    kind = "pubsub"
    #: What a reload changes on the running endpoint, its connections kept: its queue's
    #: bounds, when it has a queue (see :meth:`reconfigure`).
    live_fields = frozenset({"max_queue_frames", "max_queue_bytes"})

    def takes_live_changes(self) -> bool:
        return self.outbox is not None

    def reconfigure(self, config: PubSubConfig) -> None:
        """Apply a reload's live changes: the queue's new bounds, at once (see
        :meth:`Outbox.rebound`)."""
        super().reconfigure(config)
        if self.outbox is not None:
            self.outbox.rebound(
                QueueBounds(config.max_queue_frames, config.max_queue_bytes),
                queue_frames=config.max_queue_frames,
                queue_bytes=config.max_queue_bytes,
            )

    def __init__(
        self,
        name: str,
        config: PubSubConfig,
        context: EndpointContext,
        *,
        log_interval: float = INTERVAL,
    ) -> None:
        super().__init__(name, config, context)
        self._bad_messages = RateLimitedWarning(
            self.log,
            "dropped messages that are not single-part packets",
            detail=self.status.detail,
            key="messages_dropped",
            interval=log_interval,
        )
        #: The publisher's lossy queue (always in memory: XPUB never waits).
        self.outbox: Outbox | None = None
        if config.role == "publisher":
            self.outbox = Outbox(
                BufferConfig(),
                self._subscribe,
                status=self.status,
                log=self.log,
                queue_bytes=config.max_queue_bytes,
                queue_frames=config.max_queue_frames,
            )
        self._subscribers_changed = trio.Event()
        if config.role == "publisher":
            self.status.detail["subscribers"] = 0
        else:
            self.status.detail.update(welcomes=0, messages_dropped=0)

    @property
    def subscribers(self) -> int:
        """Subscriptions the publisher's socket holds now (publisher role)."""
        count = self.status.detail.get("subscribers", 0)
        assert isinstance(count, int)
        return count

    async def wait_for_subscribers(self, count: int) -> None:
        """Wait until the publisher holds at least ``count`` subscriptions."""
        while self.subscribers < count:
            await self._subscribers_changed.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        zmq: Any = require_zmq()
        config = self.config
        publisher = config.role == "publisher"
        async with open_context() as context:
            if publisher:
                socket = AsyncSocket.make(context, zmq.XPUB, sndhwm=config.max_queue_frames)
            else:
                socket = AsyncSocket.make(context, zmq.SUB, rcvhwm=config.max_queue_frames)
            with socket:
                if publisher:
                    socket.socket.setsockopt(zmq.XPUB_VERBOSER, 1)
                    if config.welcome:
                        socket.socket.setsockopt(zmq.XPUB_WELCOME_MSG, config.welcome.encode())
                else:
                    socket.socket.setsockopt(zmq.MAXMSGSIZE, config.max_frame_size)
                    socket.socket.setsockopt(zmq.SUBSCRIBE, config.topic.encode())
                self.status.address = [socket.bind_or_connect(config.address, bind=publisher)]
                self.log.info(
                    "%s on %s, stream %r",
                    "publishing" if publisher else "subscribed",
                    self.status.address[0],
                    config.stream,
                )
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._until_stop_requested, nursery.cancel_scope)
                        if self.outbox is not None:
                            self.outbox.start()
                            nursery.start_soon(self._count_subscribers, socket)
                            nursery.start_soon(self._publish, socket, self.outbox)
                        else:
                            nursery.start_soon(self._receive, socket)
                        task_status.started()
                finally:
                    if self.outbox is not None:
                        self.outbox.close("the publisher stopped")

    # -- publisher ---------------------------------------------------------------------

    def _subscribe(self) -> Subscription:
        config = self.config
        return self.context.streams.get(config.stream).subscribe(
            bounds=QueueBounds(config.max_queue_frames, config.max_queue_bytes),
            policy=Policy.LOSSY,
            label=f"pubsub {self.name} -> {config.address}",
            owner=self.name,
        )

    async def _count_subscribers(self, socket: AsyncSocket) -> None:
        """Read the XPUB's subscription messages; keep ``detail.subscribers`` current."""
        detail = self.status.detail
        while True:
            count = self.subscribers
            for parts in await socket.receive_batch():
                message = parts[0]
                if message[:1] == bytes((_SUBSCRIBE,)):
                    count += 1
                elif message[:1] == bytes((_UNSUBSCRIBE,)):
                    count = max(0, count - 1)
            if count != detail["subscribers"]:
                self.log.info("%d subscriber(s)", count)
            detail["subscribers"] = count
            self._subscribers_changed.set()
            self._subscribers_changed = trio.Event()

    async def _publish(self, socket: AsyncSocket, outbox: Outbox) -> None:
        """Send every frame's payload as one message; XPUB never waits for subscribers."""
        status = self.status
        outbox.rewind()  # what a crash interrupted goes first
        while True:
            try:
                batch = await outbox.take()
            except OutboxCutOff as cut:
                raise QueueClosed(f"the outgoing queue was closed: {cut}") from None
            if batch is None:
                continue
            sent = sent_bytes = 0
            try:
                for frame in batch:
                    parts = [frame.payload]
                    if not socket.send_multipart_nowait(parts, copy=False):
                        await socket.send_multipart(parts, copy=False)
                    sent += 1
                    sent_bytes += frame.size
            finally:
                status.frames_out += sent
                status.bytes_out += sent_bytes
            await outbox.done(len(batch))

    # -- subscriber --------------------------------------------------------------------

    async def _receive(self, socket: AsyncSocket) -> None:
        """Publish every single-part message except the publisher's welcome."""
        config = self.config
        status = self.status
        detail = status.detail
        stream = self.context.streams.get(config.stream)
        welcome = config.welcome.encode()
        type_tag = config.type
        data = FrameKind.DATA
        while True:
            frames: list[Frame] = []
            for parts in await socket.receive_batch():
                if len(parts) != 1:
                    self._bad_messages(f"a message of {len(parts)} parts")
                    continue
                message = parts[0]
                if welcome and message == welcome:
                    welcomes = detail["welcomes"]
                    assert isinstance(welcomes, int)
                    detail["welcomes"] = welcomes + 1
                    continue
                frames.append(Frame(data, type_tag, message))
            if frames:
                status.frames_in += len(frames)
                status.bytes_in += sum(frame.size for frame in frames)
                await stream.publish(frames)
