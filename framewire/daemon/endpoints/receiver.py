"""``kind = "receiver"``: take frames from producers and publish them into a stream.

Listen mode accepts up to ``max_clients`` producers at once. Connect mode keeps one
connection to an upstream, reconnecting with exponential backoff and jitter whenever it is
refused, times out, closes, breaks or sends bad bytes; the backoff starts over after a
connection that stayed up for ``reconnect.stable_after``. Logs one line per change of state,
not one per failed attempt.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence

import trio

from ... import protocols
from ...config import ReceiverConfig
from ...frame import Frame
from ..backoff import Backoff
from ..flow import make_decoder, receive_frames
from ..reconnect import keep_connected
from ..transport import Connection, bound_addresses
from ._base import ClientInfo, Endpoint, EndpointContext

__all__ = ["ReceiverEndpoint"]


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

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._until_stop_requested, nursery.cancel_scope)
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
                producers.start_soon(self._serve_producer, await self._accept(listener))

    async def _serve_producer(self, stream: trio.abc.Stream) -> None:
        try:
            connection = await self._establish(stream)
            if connection is None:
                return
            if len(self.status.clients) >= self.config.max_clients:
                self.log.warning(
                    "refused producer %s: max_clients (%d) reached",
                    connection.peer,
                    self.config.max_clients,
                )
                return
            if self.status.clients and protocols.get(self.config.protocol).session_metadata_types:
                # Packets of two connections under one session header would break readers.
                self.log.warning(
                    "refused producer %s: a %s stream takes one producer at a time",
                    connection.peer,
                    self.config.protocol,
                )
                return
            self.log.info("producer %s connected", connection.peer)
            outcome = await self._receive(connection)
            self.log.info("producer %s: %s", connection.peer, outcome)
        finally:
            await trio.aclose_forcefully(stream)

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

    async def _receive(self, connection: Connection) -> str:
        """Publish everything ``connection`` carries; return how it ended, for the log."""
        config = self.config
        stream = self.context.streams.get(config.stream)
        decoder = make_decoder(config.protocol, config.max_frame_size, config.verify_crc)
        status = self.status
        client = ClientInfo(connection.peer, connected_since=time.time())
        status.clients[id(client)] = client
        idle = config.idle_timeout or math.inf

        async def publish(frames: Sequence[Frame]) -> None:
            nbytes = sum(frame.size for frame in frames)
            client.frames_in += len(frames)
            client.bytes_in += nbytes
            status.frames_in += len(frames)
            status.bytes_in += nbytes
            await stream.publish(frames)

        try:
            with trio.CancelScope(deadline=trio.current_time() + idle) as idle_scope:

                def active() -> None:
                    idle_scope.deadline = trio.current_time() + idle

                await receive_frames(connection, decoder, publish, on_activity=active)
                outcome = (
                    "ended its stream"
                    if decoder.ended
                    else f"closed the connection (after {client.frames_in} frames)"
                )
                # The stream ends with its last producer, and only if that one sent something:
                # a port probe or a health check must not end every reader's run.
                if client.frames_in and len(status.clients) == 1:
                    stream.end_of_stream(f"the producer {connection.peer} {outcome}")
                return outcome
            return f"sent nothing for {idle:g}s; dropped the connection"
        except protocols.ProtocolError as exc:
            status.last_error = f"{connection.peer}: {exc}"
            return f"closed: {exc}"
        except trio.BrokenResourceError as exc:
            return f"connection lost ({exc})"
        finally:
            del status.clients[id(client)]
