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
from ..reconnect import Ended, keep_connected
from ..stream import MetadataCache, Policy, QueueBounds, Subscription, SubscriptionClosed
from ..transport import Connection
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

    def _subscribe(self) -> Subscription:
        config = self.config
        subscription = self.context.streams.get(config.stream).subscribe(
            bounds=QueueBounds(config.max_queue_frames, config.max_queue_bytes),
            policy=Policy.LOSSLESS,
            label=f"{self.name} -> {config.connect}",
            owner=self.name,
            follows_end=config.close_on_end,
            # A new session header (aedat4) ends the subscription, so the connection: the
            # reader takes one header per connection; the next connection gets the new one.
            session_types=protocols.get(config.protocol).session_metadata_types,
            # Blocks of frames received in this protocol are written as they came, whole.
            blocks_of=config.protocol,
        )
        self._delivered.clear()
        self.status.clients.clear()
        return subscription

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        connector = self.context.transports.dial(config.connect, tls=config.tls)
        self.status.address = [str(config.connect)]
        self._subscription = self._subscribe()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._until_stop_requested, nursery.cancel_scope)
                task_status.started()
                await keep_connected(
                    connector,
                    config.connect,
                    self._deliver,
                    backoff=self.backoff,
                    connect_timeout=config.connect_timeout,
                    status=self.status,
                    log=self.log,
                )
        finally:
            self._subscription.close("the sender stopped")

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

    def _encode(self, frames: list[Frame]) -> list[Buffer]:
        return encode_frames(self._encoder, frames, self._unencodable)
