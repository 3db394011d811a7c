"""``kind = "sender"``: deliver a stream to a remote reader, losslessly, reconnecting.

The sender subscribes once, with a lossless queue bounded in frames and bytes: when the
queue is full the stream's publishers wait, so memory never grows with a slow or absent
reader (G3NetworkSender's connect mode buffers without bound instead). It connects to
``connect`` and keeps reconnecting with backoff and jitter. On every new connection it first
sends the metadata that was current for the next frame to deliver (the latest frame of each
metadata type it has delivered, or that the stream had when it subscribed), then the batch a
broken connection interrupted, then the queue. Delivery is at least once for that
interrupted batch: a reader that got part of it gets it again.

With ``close_on_end`` the connection is closed at a frame boundary when the stream's
producer ends its stream (a G3Reader then ends its pipeline cleanly); the sender then starts
afresh with the next frames.

``[buffer]``: with ``type = "memory"`` (the default) the queue above is the buffer
(``when_full = "drop_oldest"`` makes it lossy: the oldest DATA frames go, metadata never).
With ``type = "disk"`` the subscription is only a small hand-over: an intake task appends
each batch it yields to a :class:`~framewire.daemon.buffer.DiskBuffer` (one thread hop per
batch), so the stream's producers are never held back while the disk has room; the
connection side reads the oldest frames from the disk, writes them and commits them only
after the write (at least once for the batch in flight only). Frames in the buffer outlive
the daemon (SIGKILL included) and are delivered afterwards, in order; the metadata delivered
last is kept beside them and replayed first on every connection, as with a memory buffer.
When the disk buffer is full, ``block`` stops taking from the stream (which is then held)
and ``drop_oldest`` has the buffer drop its oldest data.
"""

from __future__ import annotations

import random
from pathlib import Path

import trio

from ... import protocols
from ...config import SenderConfig
from ...frame import Buffer, Frame
from ..backoff import Backoff
from ..buffer import DiskBuffer
from ..flow import (
    BATCH_BYTES,
    BATCH_FRAMES,
    UnencodableFrames,
    close_when_peer_leaves,
    encode_frames,
    first_error,
    send_frames,
)
from ..reconnect import Ended, keep_connected
from ..statedir import default_buffer_dir
from ..stream import MetadataCache, Policy, QueueBounds, Subscription, SubscriptionClosed
from ..transport import Connection, Connector
from ._base import Endpoint, EndpointContext

__all__ = ["SenderEndpoint"]


class SenderEndpoint(Endpoint[SenderConfig]):
    kind = "sender"

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
        # Metadata as of the next frame to deliver, and the batch a failure interrupted.
        self._delivered = MetadataCache()
        self._pending: list[Frame] = []
        self._pending_frames = 0  # how many frames _pending stands for (a block counts its)
        self._subscription: Subscription | None = None
        self._unencodable = UnencodableFrames(self.log, config.protocol, self.status.detail)
        #: Frames dropped by subscriptions replaced since (a memory buffer's drops).
        self._dropped_before = 0
        #: The disk buffer, and the batch the intake took from the stream and has not yet
        #: put into it (kept across a crash restart).
        self._buffer: DiskBuffer | None = None
        self._intake: list[Frame] = []
        self._metadata_loaded = False
        buffer = config.buffer
        if buffer.is_disk:
            directory = Path(buffer.path) if buffer.path is not None else default_buffer_dir(name)
            self._buffer = DiskBuffer(directory, buffer, status=self.status, log=self.log)
        else:
            self.status.refresh = self._report_memory_buffer
            self._report_memory_buffer()

    def _subscribe(self) -> Subscription:
        config = self.config
        disk = self._buffer is not None
        drop = not disk and config.buffer.when_full == "drop_oldest"
        if self._subscription is not None:
            self._dropped_before += self._subscription.frames_dropped
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
        if not disk:  # the subscription replays the stream's metadata itself
            self._delivered.clear()
        self.status.clients.clear()
        return subscription

    def _report_memory_buffer(self) -> None:
        """``detail.buffer_*`` of a memory buffer: the subscription's queue."""
        subscription = self._subscription
        detail = self.status.detail
        detail["buffer_type"] = "memory"
        detail["buffer_max_bytes"] = self.config.queue_bytes
        detail["buffer_corrupt_records"] = 0
        if subscription is None:
            detail.update(buffer_frames=0, buffer_bytes=0, buffer_state="ok")
            detail["buffer_dropped_frames"] = self._dropped_before
            return
        full = subscription.queued_frames >= self.config.max_queue_frames or (
            subscription.queued_bytes >= self.config.queue_bytes
        )
        detail["buffer_frames"] = subscription.queued_frames + self._pending_frames
        detail["buffer_bytes"] = subscription.queued_bytes
        detail["buffer_dropped_frames"] = self._dropped_before + subscription.frames_dropped
        detail["buffer_state"] = "full" if full else "ok"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        connector = self.context.transports.dial(config.connect, tls=config.tls)
        self.status.address = [str(config.connect)]
        self._subscription = self._subscribe()
        try:
            async with trio.open_nursery() as nursery:
                if self._buffer is None:
                    nursery.start_soon(self._until_stop_requested, nursery.cancel_scope)
                    task_status.started()
                    await self._keep_connected(connector)
                else:
                    await self._run_buffered(self._buffer, connector, nursery, task_status)
        finally:
            self._subscription.close("the sender stopped")

    async def _keep_connected(self, connector: Connector) -> None:
        config = self.config
        await keep_connected(
            connector,
            config.connect,
            self._deliver,
            backoff=self.backoff,
            connect_timeout=config.connect_timeout,
            status=self.status,
            log=self.log,
        )

    async def _run_buffered(
        self,
        buffer: DiskBuffer,
        connector: Connector,
        nursery: trio.Nursery,
        task_status: trio.TaskStatus[None],
    ) -> None:
        """Run with a disk buffer: its upkeep, the intake and the delivery. A stop request
        ends the delivery at once and lets the intake put what the subscription holds into
        the buffer first (within the grace period)."""
        nursery.start_soon(buffer.keep_open)
        intake_done = trio.Event()
        nursery.start_soon(self._take_in, buffer, intake_done)
        delivery = trio.CancelScope()

        async def stop_when_requested() -> None:
            await self._stop_requested.wait()
            delivery.cancel()
            if self._subscription is not None:
                self._subscription.end("the sender stopped")

        nursery.start_soon(stop_when_requested)
        task_status.started()
        with delivery:
            await self._keep_connected(connector)
        await intake_done.wait()
        nursery.cancel_scope.cancel()

    async def _take_in(self, buffer: DiskBuffer, done: trio.Event) -> None:
        """Put every batch the subscription yields into the disk buffer, in order."""
        try:
            while True:
                if not self._intake:
                    subscription = self._subscription
                    assert subscription is not None
                    try:
                        self._intake = await subscription.receive_batch(BATCH_FRAMES, BATCH_BYTES)
                    except SubscriptionClosed as closed:
                        if self.stop_requested:
                            return
                        if closed.graceful:
                            self.log.info("subscribing again: %s", closed.reason)
                        else:  # cut off (its metadata passed the hard cap): not in a loop
                            self.log.warning("subscribing again in 1s: %s", closed.reason)
                            await trio.sleep(1.0)
                        self._subscription = self._subscribe()
                        continue
                await buffer.put(self._intake)
                self._intake = []
        finally:
            done.set()

    async def _deliver(self, connection: Connection) -> str:
        """Send until the connection fails or the stream ends; return why, for the log."""
        outcome = "the reader closed the connection"
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(close_when_peer_leaves, connection, nursery.cancel_scope)
                if self._buffer is not None:
                    outcome = await self._send_buffered(self._buffer, connection)
                else:
                    outcome = await self._send_all(connection)
                nursery.cancel_scope.cancel()
        except* trio.TooSlowError:
            outcome = f"a write stalled for more than {self.config.send_timeout:g}s"
        except* (trio.BrokenResourceError, trio.ClosedResourceError) as group:
            outcome = f"connection lost ({first_error(group)})"
        return outcome

    async def _send_all(self, connection: Connection) -> str:
        subscription = self._subscription
        assert subscription is not None
        # The connection's own deadline bounds each write's wait for the reader (no cancel
        # scope per batch); the loop waits on the subscription between writes, which yields,
        # so a write the kernel takes at once need not.
        connection.send_timeout = self.config.send_timeout
        connection.yield_on_send = False
        replay = list(self._delivered)
        if replay:
            await connection.send(self._encode(replay))
        while True:
            if not self._pending:
                try:
                    self._pending = await subscription.receive_batch()
                except SubscriptionClosed as closed:
                    self._subscription = self._subscribe()
                    return Ended(f"the stream ended ({closed.reason})")
                self._pending_frames = subscription.last_batch_frames
            batch = self._pending
            frames, nbytes = await send_frames(
                connection,
                self._encoder,
                batch,
                self._unencodable,
                nframes=self._pending_frames,
            )
            for frame in batch:
                if frame.is_metadata:  # never a block: blocks hold only DATA frames
                    self._delivered.update(frame)
            self._pending = []
            self.status.frames_out += frames
            self.status.bytes_out += nbytes

    async def _send_buffered(self, buffer: DiskBuffer, connection: Connection) -> str:
        """Deliver from the disk buffer: the metadata current for its oldest frame, then its
        frames, each batch committed once written."""
        connection.send_timeout = self.config.send_timeout
        connection.yield_on_send = False
        await buffer.wait_open()
        if not self._metadata_loaded:  # what a previous run of the daemon delivered
            for frame in buffer.saved_metadata:
                self._delivered.update(frame)
            self._metadata_loaded = True
        replay = list(self._delivered)
        if replay:
            await connection.send(self._encode(replay))
        while True:
            batch = await buffer.read(BATCH_FRAMES, BATCH_BYTES)
            frames, nbytes = await send_frames(
                connection, self._encoder, batch, self._unencodable, nframes=len(batch)
            )
            changed = False
            for frame in batch:
                if frame.is_metadata:
                    self._delivered.update(frame)
                    changed = True
            self.status.frames_out += frames
            self.status.bytes_out += nbytes
            await buffer.commit(len(batch), list(self._delivered) if changed else None)

    def _encode(self, frames: list[Frame]) -> list[Buffer]:
        return encode_frames(self._encoder, frames, self._unencodable)
