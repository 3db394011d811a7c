"""``kind = "sender"``: deliver a stream to a remote reader, losslessly, reconnecting.

The sender subscribes once, with a lossless queue bounded in frames and bytes: when the
queue is full the stream's publishers wait, so memory never grows with a slow or absent
reader (G3NetworkSender's connect mode buffers without bound instead). It connects to
``connect`` and keeps reconnecting with backoff and jitter. On every new connection it first
sends the metadata that was current for the next frame to deliver (the latest frame of each
metadata type it has delivered, or that the stream had when it subscribed), then the batch a
broken connection interrupted, then the queue. Delivery is at least once for that
interrupted batch: a reader that got part of it gets it again. Over TLS 1.3 nothing is
written until the reader's server has not refused our certificate (see
:meth:`~framewire.daemon.transport.Connection.hear_tls_verdict`): a refusal is a failed
connect, logged once with its reason, and no frame is written into a refused connection.

With ``close_on_end`` the connection is closed at a frame boundary when the stream's
producer ends its stream (a G3Reader then ends its pipeline cleanly); the sender then starts
afresh with the next frames.

``[buffer]``: the sender takes its frames from an :class:`~framewire.daemon.outbox.Outbox`.
With ``type = "memory"`` (the default) that is the queue above (``when_full =
"drop_oldest"`` makes it lossy: the oldest DATA frames go, metadata never). With ``type =
"disk"`` the subscription is only a small hand-over that the outbox's intake appends to a
:class:`~framewire.daemon.buffer.DiskBuffer`, so the stream's producers are never held back
while the disk has room; the connection side reads the oldest frames from the disk, writes
them and marks them done only after the write (at least once for the batch in flight only).
Frames in the buffer outlive the daemon (SIGKILL included) and are delivered afterwards, in
order; the metadata delivered last is kept beside them and replayed first on every
connection, as with a memory buffer. When the disk buffer is full, ``block`` stops taking
from the stream (which is then held) and ``drop_oldest`` has the buffer drop its oldest data.
"""

from __future__ import annotations

import random

import trio

from ... import protocols
from ...config import SenderConfig
from ...frame import Buffer, Frame
from ..backoff import Backoff
from ..flow import (
    UnencodableFrames,
    close_when_peer_leaves,
    encode_frames,
    first_error,
    send_frames,
)
from ..outbox import Outbox, OutboxCutOff
from ..reconnect import Ended, keep_connected
from ..stream import Policy, QueueBounds, Subscription
from ..transport import Connection
from ._base import Endpoint, EndpointContext

__all__ = ["SenderEndpoint"]


class SenderEndpoint(Endpoint[SenderConfig]):
    kind = "sender"
    #: What a reload changes on the running sender, its connection kept (see
    #: :meth:`reconfigure`).
    live_fields = frozenset(
        {"max_queue_frames", "max_queue_bytes", "send_timeout", "connect_timeout", "reconnect"}
    )

    def __init__(
        self,
        name: str,
        config: SenderConfig,
        context: EndpointContext,
        *,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(name, config, context)
        self.backoff = Backoff(config.reconnect, rng)
        self._encoder = protocols.get(config.protocol).make_encoder()
        self._unencodable = UnencodableFrames(self.log, config.protocol, self.status.detail)
        self.outbox = Outbox.of(name, config, self._subscribe, status=self.status, log=self.log)
        #: The connection to the reader while frames are sent on it.
        self._connection: Connection | None = None

    def reconfigure(self, config: SenderConfig) -> None:
        """Apply a reload's live changes: the queue's bounds at once (see
        :meth:`Outbox.rebound`), ``send_timeout`` to the connection's writes (one waiting
        now too), ``reconnect`` to the next delay and ``connect_timeout`` to the next
        attempt. The connection to the reader stays."""
        super().reconfigure(config)
        self.outbox.rebound_to(config)
        self.backoff.config = config.reconnect
        if self._connection is not None:
            self._connection.change_send_timeout(config.send_timeout)

    def _subscribe(self) -> Subscription:
        config = self.config
        disk = self.outbox.is_disk
        drop = not disk and config.buffer.when_full == "drop_oldest"
        subscription = self.context.streams.get(config.stream).subscribe(
            bounds=QueueBounds(config.max_queue_frames, config.queue_bytes),
            policy=Policy.LOSSY if drop else Policy.LOSSLESS,
            label=f"{self.name} -> {config.connect}",
            owner=self.name,
            follows_end=config.close_on_end,
            # A new session header (aedat4) ends the subscription, so the connection: the
            # reader takes one header per connection; the next connection gets the new one.
            # (A disk buffer refuses such protocols: see check_disk_buffer.)
            session_types=protocols.get(config.protocol).session_metadata_types,
            # Blocks of frames received in this protocol are written as they came, whole
            # (a disk buffer stores frames one by one).
            blocks_of=None if disk else config.protocol,
        )
        self.status.clients.clear()
        return subscription

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        outbox = self.outbox
        connector = self.context.transports.dial(config.connect, tls=config.tls)
        self.status.address = [str(config.connect)]
        outbox.start()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(outbox.run)
                delivery = trio.CancelScope()
                nursery.start_soon(self._stop_when_requested, delivery)
                task_status.started()
                with delivery:
                    await keep_connected(
                        connector,
                        config.connect,
                        self._deliver,
                        backoff=self.backoff,
                        connect_timeout=lambda: self.config.connect_timeout,
                        status=self.status,
                        log=self.log,
                        hear_verdict=True,
                    )
                # Stopping: a disk buffer's intake first puts what the subscription holds
                # into it (within the grace period).
                await outbox.finished.wait()
                nursery.cancel_scope.cancel()
        finally:
            outbox.close("the sender stopped")

    async def _stop_when_requested(self, delivery: trio.CancelScope) -> None:
        await self._stop_requested.wait()
        delivery.cancel()
        self.outbox.stop("the sender stopped")

    async def _deliver(self, connection: Connection) -> str:
        """Send until the connection fails or the stream ends; return why, for the log."""
        outcome = "the reader closed the connection"
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(close_when_peer_leaves, connection, nursery.cancel_scope)
                outcome = await self._send_all(connection)
                nursery.cancel_scope.cancel()
        except* trio.TooSlowError:
            outcome = f"a write stalled for more than {self.config.send_timeout:g}s"
        except* (trio.BrokenResourceError, trio.ClosedResourceError) as group:
            outcome = f"connection lost ({first_error(group)})"
        finally:
            self._connection = None
        return outcome

    async def _send_all(self, connection: Connection) -> str:
        """The metadata current for the next frame to deliver, the frames a broken
        connection interrupted, then the outbox, each batch done once written."""
        outbox = self.outbox
        # The connection's own deadline bounds each write's wait for the reader (no cancel
        # scope per batch); the loop waits on the outbox between writes, which yields, so a
        # write the kernel takes at once need not.
        connection.send_timeout = self.config.send_timeout
        self._connection = connection
        connection.yield_on_send = False
        outbox.rewind()
        replay = await outbox.metadata()
        if replay:
            await connection.send(self._encode(replay))
        while True:
            try:
                batch = await outbox.take()
            except OutboxCutOff as cut:  # its metadata passed the hard cap
                outbox.resubscribe()
                return Ended(f"the stream ended ({cut})")
            if batch is None:
                return Ended(f"the stream ended ({outbox.end_reason})")
            frames, nbytes = await send_frames(
                connection,
                self._encoder,
                batch,
                self._unencodable,
                nframes=outbox.last_batch_frames,
            )
            self.status.frames_out += frames
            self.status.bytes_out += nbytes
            await outbox.done(len(batch))

    def _encode(self, frames: list[Frame]) -> list[Buffer]:
        return encode_frames(self._encoder, frames, self._unencodable)
