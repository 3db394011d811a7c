"""``kind = "server"``: listen, and fan one stream out to every client.

Each client gets its own :class:`Subscription` (bounded in frames and bytes, lossy by default),
preloaded with the stream's metadata cache, and its own writer task that drains the queue in
batches. A slow client only ever fills its own queue.

For protocols with session metadata (aedat4's IOHeader) a client gets exactly one header: an
identical header from a reconnected upstream is not repeated, and a different one ends the
client's connection once its queue is drained (new clients get the new header). For
protocols whose clients only listen (aedat4), a client that sends a byte is disconnected.
TLS handshakes run in each client's own task, within the configured timeout; a failed one
is one log line.

Direct writes: a lossy server without decimation gives each plain-socket client's
subscription a direct writer (:attr:`Subscription.direct`, the client's :class:`_ClientFeed`).
A publish that finds the client idle (its queue empty, its writer parked, nothing of an
earlier write pending) is encoded once for all clients of the endpoint (every encoder is
stateless, so the bytes can be shared) and written to the client's socket at once, without
waking its task: that wake-up per client was most of what one frame reaching 10,000 clients
cost. What the kernel does not take stays with the connection and the client's writer is
woken to write it before anything else; a socket that takes nothing, or a busy client,
gets the frames queued as before. A broken connection closes that client only (the usual
one log line when it leaves); it never raises into the publisher.

The idle clients are served as one group (:class:`_DirectClients`, a
:class:`~framewire.daemon.stream.DirectGroup`): the stream offers a publish once to the
endpoint, which writes it to every idle client in one tight loop (the descriptor looked up
from each client's socket for each write, never kept) and adds the endpoint's counters once
for all; each client's own counters are settled when it stops being idle and are exact
whenever read. A client stops being idle whenever its writer is woken (frames queued for
it, a write to finish, its connection closed) and is idle again when its writer waits with
nothing left. That loop costs about 0.2 µs of Python per client above the ``os.write``
itself (benchmarks/fanout_publish.py), against about 1.2 µs when each client was offered
the publish on its own (which clients outside the group still are: a client whose direct
writer was replaced, or one whose writer is busy).

Fairness: the writes happen inside the publisher's call, one non-blocking send per idle
client, so a publish to 10,000 clients holds the trio loop for about as long as 10,000
sends take (~90 ms on the benchmark VM). Waking 10,000 writer tasks held it for longer
(~200 ms: trio runs the whole batch of woken tasks before it looks at I/O again), so this is
no worse for other tasks. Only publishes whose encoding is at most
:data:`DIRECT_MAX_BYTES` (128 KiB: a 64 KiB frame still saves its one client a wake-up) go
direct; a larger one, whose copy into each socket costs more than a wake-up, goes through
each client's task and its batching, as before. No bound on the number of direct writes per
publish: leaving the rest of the clients to their tasks would only add their wake-ups to
the same stall (and to the time until the last client has the frame).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from functools import partial
from typing import ClassVar, Final, TypeAlias

import trio

from ... import protocols
from ...config import ServerConfig
from ...frame import Buffer, Frame, frame_count
from ...protocols import ProtocolError
from ...spool import SpoolError
from ..flow import (
    UnencodableFrames,
    close_when_peer_leaves,
    describe_loss,
    first_error,
    send_frames,
    send_subscription,
)
from ..history import HistoryWriter
from ..lograte import RateLimitedWarning
from ..stream import (
    DirectGroup,
    DirectWrite,
    Policy,
    QueueBounds,
    Stream,
    Subscription,
    SubscriptionClosed,
)
from ..transport import Connection, HangupWatch, bound_addresses, nbytes_of, set_send_buffer
from ._base import ClientInfo, Endpoint, EndpointContext
from ._rewind import (
    GapReporter,
    RewindRefused,
    RewindRequest,
    parse_rewind,
    read_request,
    refuse,
    replay_history,
)

__all__ = ["DIRECT_MAX_BYTES", "ServerEndpoint"]

#: The largest encoded publish written straight to idle clients (see the module docstring).
DIRECT_MAX_BYTES: Final = 128 * 1024

#: A client's socket as the group of idle clients writes to it (see
#: :meth:`Connection.idle_plain_socket`).
_Socket: TypeAlias = trio.socket.SocketType

#: A direct writer's answers as module constants (an enum member looked up on its class
#: costs ~50 ns; the writer answers once per idle client per publish).
_REFUSED: Final = DirectWrite.REFUSED
_WRITTEN: Final = DirectWrite.WRITTEN
_STARTED: Final = DirectWrite.STARTED


class ServerEndpoint(Endpoint[ServerConfig]):
    kind = "server"
    #: What a reload changes for the connected clients too (see :meth:`reconfigure`).
    live_fields = frozenset(
        {
            "max_clients",
            "max_queue_frames",
            "max_queue_bytes",
            "max_metadata_frames",
            "max_metadata_bytes",
            "decimate",
            "send_timeout",
            "close_on_end",
        }
    )

    def __init__(self, name: str, config: ServerConfig, context: EndpointContext) -> None:
        super().__init__(name, config, context)
        spec = self._spec = protocols.get(config.protocol)
        canonical = spec.canonical_type or (lambda type_tag: type_tag)
        #: Decimation keyed by the type tags frames carry (config may use codes).
        self._decimate = {canonical(key): every for key, every in config.decimate.items()}
        self._unencodable = UnencodableFrames(self.log, config.protocol, self.status.detail)
        self._full = RateLimitedWarning(
            self.log,
            f"refused clients: max_clients ({config.max_clients}) reached",
            detail=self.status.detail,
            key="clients_refused",
        )
        #: Each client's queue bounds: one object shared by every client (it is frozen).
        self._bounds = QueueBounds(
            config.max_queue_frames,
            config.max_queue_bytes,
            config.max_metadata_frames,
            config.max_metadata_bytes,
        )
        #: Notices clients hanging up; a new one each time :meth:`run` starts.
        self._hangups: HangupWatch
        #: Direct writes: whether clients get them, and the shared encoding of the publish
        #: they are writing (keyed by the stream's publish count and the frames' identity,
        #: which stays theirs while the publish lasts).
        self._direct = config.policy == Policy.LOSSY.value and not self._decimate
        self._direct_encoder = spec.make_encoder()
        self._feed_type = _ClientFeed.of(self)
        #: The stream served, set when the first client comes (direct writes key the shared
        #: encoding by its publish count).
        self._stream: Stream
        self._direct_publish = -1
        self._direct_id = 0
        self._direct_data: Buffer | None = None
        self._direct_size = 0
        self._direct_frames = 0
        #: The idle direct-written clients, served together (made with the first client).
        self._group: _DirectClients | None = None
        #: Each client's connection while it is fed, by ``id`` of its ClientInfo (a reload
        #: gives them a new send_timeout).
        self._connections: dict[int, Connection] = {}
        #: Frames rewinds lacked because the history had not kept them.
        self._rewind_missed = 0
        self._warned_replay = False

    def reconfigure(self, config: ServerConfig) -> None:
        """Apply a reload's live changes (:attr:`live_fields`) to the running server and
        every connected client, which stays connected: each client's queue takes the new
        bounds (a lossy queue over a lowered bound drops its oldest data at once, see
        :meth:`Subscription.reconfigure`), decimation (counts go on) and ``close_on_end``;
        each connection the new ``send_timeout`` (a write waiting now too, counted from
        when it began to wait); ``max_clients`` judges the next connection. Clients leave
        the direct writes while they decimate; ones that were direct-written take them up
        again when decimation ends (clients that connected while it was on keep their
        queue). Never raises: the new values passed the same checks as at start."""
        super().reconfigure(config)
        canonical = self._spec.canonical_type or (lambda type_tag: type_tag)
        decimate = {canonical(key): every for key, every in config.decimate.items()}
        bounds = QueueBounds(
            config.max_queue_frames,
            config.max_queue_bytes,
            config.max_metadata_frames,
            config.max_metadata_bytes,
        )
        direct = config.policy == Policy.LOSSY.value and not decimate
        self._full.what = f"refused clients: max_clients ({config.max_clients}) reached"
        clients = [c.subscription for c in self.status.clients.values() if c.subscription]
        group = self._group
        if group is not None and not direct:
            for subscription in clients:
                subscription.group = None
            self._stream.remove_group(group)
            group = self._group = None
        self._bounds, self._decimate, self._direct = bounds, decimate, direct
        if group is not None:
            group.rebound(bounds)
        for subscription in clients:
            subscription.reconfigure(
                bounds=bounds, decimate=decimate, follows_end=config.close_on_end
            )
        if direct:
            self._direct_again(clients)
        for connection in self._connections.values():
            connection.change_send_timeout(config.send_timeout)

    def _direct_again(self, subscriptions: list[Subscription]) -> None:
        """Join the clients whose writer can write directly (they were direct-written
        before decimation began) to the endpoint's direct group, made if need be."""
        writable = [
            subscription
            for subscription in subscriptions
            if isinstance(subscription.direct, _ClientFeed)
            and subscription.direct.connection is not None
            and subscription.group is None
            and not subscription.closed
        ]
        if not writable:
            return
        if self._group is None:
            self._group = _DirectClients(self, self._stream)
        self._stream.add_group(self._group)
        for subscription in writable:
            subscription.group = self._group

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        listeners = await self.context.transports.bind(
            config.listen, tls=config.tls, socket_mode=config.socket_mode
        )
        self.status.address = bound_addresses(listeners)
        self.log.info(
            "serving stream %r as %s on %s",
            config.stream,
            config.protocol,
            ", ".join(self.status.address),
        )
        self._hangups = HangupWatch()
        try:
            async with trio.open_nursery() as watching:
                watching.start_soon(self._hangups.run)
                async with trio.open_nursery() as clients:
                    async with trio.open_nursery() as accepting:
                        for listener in listeners:
                            accepting.start_soon(self._accept_clients, listener, clients)
                        accepting.start_soon(self._until_stop_requested, accepting.cancel_scope)
                        task_status.started()
                    # Stop requested: no more clients; let the connected ones drain and close.
                    for listener in listeners:
                        await trio.aclose_forcefully(listener)
                    for client in self.status.clients.values():
                        if client.subscription is not None:
                            client.subscription.end("the server endpoint is stopping")
                watching.cancel_scope.cancel()
        finally:
            if self._group is not None:
                self._stream.remove_group(self._group)
            self._hangups.close()
            for listener in listeners:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(listener)

    async def _accept_clients(
        self, listener: trio.abc.Listener[trio.abc.Stream], clients: trio.Nursery
    ) -> None:
        while True:
            clients.start_soon(self._serve_one, self._serve, await self._accept(listener))

    async def _serve(self, stream: trio.abc.Stream) -> None:
        config = self.config
        status = self.status
        try:
            connection = await self._establish(stream)
            if connection is None:
                return
            config = self.config  # a reload may have changed it during the handshake
            if len(status.clients) >= config.max_clients:
                self._full(f"the last {connection.peer}")
                return
            if config.send_buffer is not None:
                self._size_send_buffer(connection, config.send_buffer)
            # The endpoint's one stream (a registry never replaces a stream it made).
            served = self._stream = self.context.streams.get(config.stream)
            asked = await self._client_request(connection, served)
            if asked is None:
                return
            rewind, gaps = asked
            if rewind is None and config.replay is not None:
                # Every client that asked for nothing gets the last ``replay`` seconds first.
                rewind = self._replay_request(served)
            if self._direct:
                if self._group is None:
                    self._group = _DirectClients(self, served)
                served.add_group(self._group)

            def subscribe(replay: bool = True) -> Subscription:
                return served.subscribe(
                    bounds=self._bounds,
                    policy=Policy(config.policy),
                    decimate=self._decimate,
                    label=f"{self.name} {connection.peer}",
                    owner=self.name,
                    follows_end=config.close_on_end,
                    replay=replay,
                    session_types=self._spec.session_metadata_types,
                    blocks_of=config.protocol,
                )

            client = ClientInfo(connection.peer)
            if rewind is None:
                client.subscription = subscribe()
            key = id(client)
            status.clients[key] = client
            self.log.info("client %s connected (%d now)", connection.peer, len(status.clients))
            try:
                reason = None
                if rewind is not None:
                    reason = await self._rewind(connection, client, served, rewind, subscribe)
                if reason is None:
                    reason = await self._feed_client(connection, client, gaps=gaps)
            finally:
                subscription = client.subscription
                if subscription is not None:
                    subscription.close("client gone")
                    status.frames_dropped += subscription.frames_dropped
                    status.frames_decimated += subscription.frames_decimated
                del status.clients[key]
            dropped = subscription.frames_dropped if subscription is not None else 0
            decimated = subscription.frames_decimated if subscription is not None else 0
            left_out = [
                f"{count} {what}"
                for count, what in (
                    (decimated, "decimated"),
                    (client.frames_unencodable, f"not {config.protocol}"),
                )
                if count
            ]
            self.log.info(
                "client %s disconnected: %s (sent %d frames, %d bytes; dropped %d%s)",
                connection.peer,
                reason,
                client.frames_sent,
                client.bytes_sent,
                dropped,
                "".join(f"; {text}" for text in left_out),
            )
        finally:
            await trio.aclose_forcefully(stream)

    async def _client_request(
        self, connection: Connection, served: Stream
    ) -> tuple[RewindRequest | None, bool] | None:
        """What a native client asks for (see :mod:`._rewind`): the rewind (None: none)
        and whether it gets GAP notices. Only a native server whose stream keeps a history
        or that has ``gap_frames`` reads (and waits for) a request; others ask nothing.
        None when the client was refused or sent a bad request (one log line; the caller
        closes the connection)."""
        config = self.config
        writer = served.history
        if config.protocol != "native" or not (
            config.gap_frames or isinstance(writer, HistoryWriter)
        ):
            return None, False
        try:
            headers = await read_request(connection)
            if headers is None:
                return None, False
            gaps = config.gap_frames and headers.get("gaps") == "1"
            if not isinstance(writer, HistoryWriter):
                if "since_ns" in headers or "ago_ns" in headers:
                    raise RewindRefused(f"stream {config.stream!r} keeps no history")
                return None, gaps
            return parse_rewind(headers, writer.clock()), gaps
        except RewindRefused as refusal:
            self._count_rewind("rewinds_refused")
            self.log.info("client %s: rewind refused: %s", connection.peer, refusal)
            await refuse(connection, str(refusal))
        except (ProtocolError, trio.TooSlowError) as exc:
            why = "no whole request in time" if isinstance(exc, trio.TooSlowError) else exc
            self.log.info("client %s: bad request, disconnected: %s", connection.peer, why)
        except trio.BrokenResourceError as exc:
            self.log.info("client %s: connection lost (%s)", connection.peer, describe_loss(exc))
        return None

    def _count_rewind(self, key: str) -> None:
        """One more rewind begun (``rewinds``) or refused (``rewinds_refused``) in status."""
        detail = self.status.detail
        count = detail.get(key, 0)
        detail[key] = (count if isinstance(count, int) else 0) + 1

    def _replay_request(self, served: Stream) -> RewindRequest | None:
        """The rewind ``replay`` gives a client: the last ``replay`` seconds of the stream's
        history at full speed, without a NOTICE (the client did not ask). None (and one
        warning per endpoint start) when the stream keeps no history."""
        writer = served.history
        replay = self.config.replay
        assert replay is not None
        if not isinstance(writer, HistoryWriter):
            if not self._warned_replay:
                self._warned_replay = True
                self.log.warning(
                    "replay = %gs needs a history of stream %r ([streams.%s.history]): "
                    "clients get the live stream only",
                    replay,
                    self.config.stream,
                    self.config.stream,
                )
            return None
        return RewindRequest(writer.clock() - int(replay * 1e9), 0.0, answer=False)

    async def _rewind(
        self,
        connection: Connection,
        client: ClientInfo,
        served: Stream,
        request: RewindRequest,
        subscribe: Callable[[bool], Subscription],
    ) -> str | None:
        """Replay the history to ``client`` from the time asked for, up to the seam with the
        live stream; set the client's live subscription. Returns why the client is done if
        the replay ended it, else None (then feed it live)."""
        writer = served.history
        assert isinstance(writer, HistoryWriter)
        self._count_rewind("rewinds")
        config = self.config
        status = self.status
        encoder = self._spec.make_encoder()
        session_types = self._spec.session_metadata_types
        #: Session headers (aedat4's IOHeader) the replay gave: the live subscription must
        #: not give the client another.
        sessions: dict[str, Frame] = {}

        def unencodable(frame: Frame, error: ValueError) -> None:
            client.frames_unencodable += 1
            self._unencodable(frame, error)

        async def send(frames: list[Frame]) -> None:
            if session_types:
                frames = [f for f in frames if _first_session(sessions, session_types, f)]
            count, nbytes = await send_frames(
                connection, encoder, frames, unencodable, send_timeout=config.send_timeout
            )
            status.frames_out += count
            status.bytes_out += nbytes
            client.count_sent(count, nbytes)

        def live() -> Subscription:
            subscription = subscribe(False)
            for frame in sessions.values():
                subscription.given_session(frame)
            return subscription

        try:
            subscription, missed = await replay_history(connection, writer, request, live, send)
        except _SessionChanged as changed:
            return f"the history holds a new {changed.type} (a new session) after the start"
        except SpoolError as exc:
            return f"the rewind failed: {exc}"
        except trio.TooSlowError:
            return f"send stalled for more than {config.send_timeout:g}s"
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            return f"connection lost ({describe_loss(exc)})"
        client.subscription = subscription
        if missed:
            self._rewind_missed += missed
            status.detail["rewind_frames_missed"] = self._rewind_missed
            self.log.info(
                "client %s: the rewind lacked %d frames the history did not keep",
                connection.peer,
                missed,
            )
        return None

    async def _feed_client(
        self, connection: Connection, client: ClientInfo, *, gaps: bool = False
    ) -> str:
        subscription = client.subscription
        assert subscription is not None
        feed = self._feed_type(client)
        # Clients of a one-way protocol (aedat4) may not write: the first byte disconnects
        # them, as dv's NetworkWriter does. Others may, and what they send is discarded.
        on_input = feed.refuse_input if self._spec.listen_only_clients else None
        # The writer waits on the subscription between writes, so its writes need not
        # yield; a write that cannot finish at once may wait send_timeout for the client.
        connection.yield_on_send = False
        connection.send_timeout = self.config.send_timeout
        # A client told of its gaps is written by its own task only, which sees each loss.
        encoder = GapReporter(subscription) if gaps else self._spec.make_encoder()
        # Plain sockets are watched by the endpoint's one hang-up watch, which closes the
        # client's subscription when it leaves (its writer then returns); others get a
        # reading task of their own.
        watched = self._hangups.add(connection, feed.peer_left, on_input)
        if watched is not None and self._group is not None and not gaps:
            feed.connection = connection
            subscription.direct = feed
            subscription.group = self._group
        feed_client = partial(
            send_subscription,
            connection,
            subscription,
            encoder,
            unencodable=feed.unencodable,
            on_sent=feed.sent,
        )
        self._connections[id(client)] = connection
        try:
            if watched is not None:
                feed.closed(await feed_client())
            else:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(
                        partial(
                            close_when_peer_leaves,
                            connection,
                            nursery.cancel_scope,
                            on_input=on_input,
                        )
                    )
                    feed.closed(await feed_client())
                    nursery.cancel_scope.cancel()
        except* trio.TooSlowError:
            feed.reason = f"send stalled for more than {self.config.send_timeout:g}s"
        except* (trio.BrokenResourceError, trio.ClosedResourceError) as group:
            if not feed.left:  # else its hang-up broke the write: that is the reason
                feed.reason = f"connection lost ({first_error(group)})"
        finally:
            subscription.group = None  # settles what the group owes it
            subscription.direct = None
            feed.connection = None
            del self._connections[id(client)]
            if watched is not None:
                self._hangups.remove(watched)
        return feed.reason

    def _size_send_buffer(self, connection: Connection, size: int) -> None:
        """Give the client's socket the configured ``send_buffer``. What the kernel gave is
        ``detail.send_buffer`` (as it reports it: Linux doubles the size asked); a kernel
        that gives less than asked (``net.core.wmem_max`` caps it), or a socket that takes no
        size at all, is one warning line, repeated only when what the kernel gives changes.
        Never raises: the client is served with the buffer it has."""
        given = set_send_buffer(connection.stream, size)
        detail = self.status.detail
        doubled = sys.platform.startswith("linux")
        if given is not None and given >= (2 * size if doubled else size):
            detail["send_buffer"] = given
            return
        if detail.get("send_buffer") != given:
            detail["send_buffer"] = given
            if given is None:
                self.log.warning(
                    "send_buffer %d bytes: %s's socket takes no size; it keeps its own",
                    size,
                    connection.peer,
                )
            else:
                self.log.warning(
                    "send_buffer %d bytes is more than the kernel allows "
                    "(net.core.wmem_max): clients get %d",
                    size,
                    given // 2 if doubled else given,
                )

    def _encode_shared(self, frames: Sequence[Frame]) -> None:
        """Encode the publish ``frames`` once for every direct-written client: the bytes in
        :attr:`_direct_data`, or None when they may not go direct (a frame this protocol
        cannot carry, which each client's writer then reports, or more than
        :data:`DIRECT_MAX_BYTES`)."""
        self._direct_publish = self._stream.publishes
        self._direct_id = id(frames)
        self._direct_data = None
        try:
            buffers = self._direct_encoder.encode_batch(frames)
        except ValueError:
            return
        size = sum(map(nbytes_of, buffers))
        if 0 < size <= DIRECT_MAX_BYTES:
            # One buffer (a frame's or a block's wire bytes) is shared as it is; several
            # are joined once, not gathered once per client.
            self._direct_data = buffers[0] if len(buffers) == 1 else b"".join(buffers)
            self._direct_size = size
            self._direct_frames = frame_count(frames)


def _first_session(sessions: dict[str, Frame], session_types: frozenset[str], frame: Frame) -> bool:
    """Whether a replay sends ``frame``: not a session header the client already has (the
    same bytes again); raises :class:`_SessionChanged` for a different one."""
    if not frame.is_metadata or frame.type not in session_types:
        return True
    given = sessions.setdefault(frame.type, frame)
    if given is frame:
        return True
    if memoryview(given.payload) == memoryview(frame.payload):
        return False
    raise _SessionChanged(frame.type)


class _SessionChanged(Exception):
    """A replay met a second, different session header: the client cannot take it."""

    def __init__(self, type_tag: str) -> None:
        super().__init__(type_tag)
        self.type = type_tag


class _ClientFeed:
    """What one client's writer reports to: counters, and why the client left.

    Bound methods rather than closures: a client that waits for frames holds less memory
    (10,000 idle clients are a target).
    """

    __slots__ = ("client", "connection", "left", "reason")

    #: The endpoint: a class attribute of the subclass :meth:`of` makes for each endpoint,
    #: so that a client's feed holds one reference less (and the direct writer's
    #: connection costs no memory per client).
    endpoint: ClassVar[ServerEndpoint]

    @classmethod
    def of(cls, endpoint: ServerEndpoint) -> type[_ClientFeed]:
        """The class of ``endpoint``'s feeds."""
        return type(cls.__name__, (cls,), {"__slots__": (), "endpoint": endpoint})

    def __init__(self, client: ClientInfo) -> None:
        self.client = client
        self.reason = "the client closed the connection"
        #: Whether the hang-up watch saw the client leave (or refused its input), or a
        #: direct write found the connection broken.
        self.left = False
        #: The client's connection while this feed is its subscription's direct writer.
        self.connection: Connection | None = None

    def __call__(self, frames: Sequence[Frame]) -> DirectWrite:
        """The client's direct writer (:attr:`Subscription.direct`): write the shared
        encoding of ``frames`` to the idle client's socket now.

        Refuses (the frames are queued for the writer task) when they cannot go direct or
        the socket takes nothing. A broken connection closes the subscription, with the
        reason the client's one disconnect line gives, and refuses; nothing is raised.
        (Called once per idle client per publish: kept lean.)
        """
        connection = self.connection
        if connection is None:
            return _REFUSED
        endpoint = self.endpoint
        if id(frames) != endpoint._direct_id or endpoint._direct_publish != (
            endpoint._stream.publishes
        ):
            endpoint._encode_shared(frames)
        data = endpoint._direct_data
        if data is None:
            return _REFUSED
        size = endpoint._direct_size
        try:
            written = connection.write_nowait(data, size)
        except trio.BrokenResourceError as exc:
            self.left = True
            self.reason = f"connection lost ({describe_loss(exc)})"
            subscription = self.client.subscription
            if subscription is not None:
                subscription.close(self.reason)
            return _REFUSED
        if not written:
            return _REFUSED
        # Counted whole, the rest too: the connection writes it before anything else.
        status = endpoint.status
        frames_sent = endpoint._direct_frames
        status.frames_out += frames_sent
        status.bytes_out += size
        self.client.count_sent(frames_sent, size)
        return _WRITTEN if written == size else _STARTED

    def peer_left(self) -> None:
        """The client hung up (or sent what it may not): end its writer."""
        self.left = True
        subscription = self.client.subscription
        if subscription is not None:
            subscription.close(self.reason)

    def sent(self, frames: int, nbytes: int) -> None:
        status = self.endpoint.status
        status.frames_out += frames
        status.bytes_out += nbytes
        self.client.count_sent(frames, nbytes)

    def unencodable(self, frame: Frame, error: ValueError) -> None:
        self.client.frames_unencodable += 1
        self.endpoint._unencodable(frame, error)

    def refuse_input(self, nbytes: int) -> None:
        self.reason = (
            f"the client sent {nbytes} bytes; {self.endpoint.config.protocol} clients only "
            "listen, so it was disconnected"
        )

    def closed(self, closed: SubscriptionClosed) -> None:
        if self.left:
            return  # peer_left closed the subscription; self.reason says why
        self.reason = closed.reason if closed.graceful else f"closed by the daemon: {closed.reason}"


class _DirectClients(DirectGroup[_Socket]):
    """An endpoint's idle direct-written clients (see :class:`DirectGroup`): a publish is
    encoded once and written to each idle client's socket in one tight loop, the counters
    added once for all.

    A member's target is its connection's socket (:meth:`Connection.idle_plain_socket`); its
    descriptor is looked up from that socket for each write (``fileno()``, -1 once closed,
    which the write refuses), never kept: a closed client's number may be another's next.
    The loop touches nothing else of a client; one the write does not reach whole is seen
    to after the loop.
    """

    def __init__(self, endpoint: ServerEndpoint, stream: Stream) -> None:
        super().__init__(
            stream,
            bounds=endpoint._bounds,
            blocks_of=endpoint.config.protocol,
            session_types=endpoint._spec.session_metadata_types,
        )
        self.endpoint = endpoint
        #: Publishes refused whole (too large, unencodable, or to be judged by the queue),
        #: and members that left one: refused (socket full or closed), started (part
        #: written), broken. For tests and benchmarks.
        self.publishes_refused = 0
        self.members_refused = 0
        self.members_started = 0
        self.members_broken = 0

    def target(self, subscription: Subscription) -> _Socket | None:
        feed = subscription.direct
        if not isinstance(feed, _ClientFeed) or feed.endpoint is not self.endpoint:
            return None  # another writer (a test's recorder): it is offered one by one
        connection = feed.connection
        return None if connection is None else connection.idle_plain_socket()

    def settle(self, subscription: Subscription, frames: int, written: int) -> None:
        feed = subscription.direct
        assert isinstance(feed, _ClientFeed)  # members' writers are this endpoint's feeds
        feed.client.count_sent(frames, written)
        connection = feed.connection
        if connection is not None:
            connection.bytes_sent += written

    def offer(
        self, frames: Sequence[Frame], count: int, size: int, metadata: bool, blocks: bool
    ) -> None:
        """Write the publish to every idle client (see :meth:`DirectGroup.offer`).

        One ``os.write`` per client, the descriptor looked up from its socket each time. A
        full socket (nothing taken) or a closed one refuses: the frames are queued. Part
        taken: the connection keeps the rest and the client's writer is woken to finish it.
        A broken connection closes that client's subscription with the reason its one
        disconnect line gives; nothing is raised into the publisher.
        """
        endpoint = self.endpoint
        if not self.may_write(frames, metadata, blocks):
            self.publishes_refused += 1
            self.refuse_all(frames)
            return
        if id(frames) != endpoint._direct_id or endpoint._direct_publish != (
            endpoint._stream.publishes
        ):
            endpoint._encode_shared(frames)
        data = endpoint._direct_data
        if data is None:
            self.publishes_refused += 1
            self.refuse_all(frames)
            return
        nbytes = endpoint._direct_size
        members = self.members
        reached = len(members)
        write = os.write
        missed: list[tuple[_Socket, int | OSError]] | None = None
        # The loop every idle client costs: its socket's descriptor, one write; nothing else
        # of the client is touched (a client the write does not reach whole is seen to
        # after the loop, which must not change the members while it runs).
        for sock in members.values():
            try:
                written = write(sock.fileno(), data)
            except OSError as exc:
                if missed is None:
                    missed = []
                # Kept without its traceback, whose frame (this one) holds ``missed``: a
                # reference cycle, with the publish's frames and the sockets, that only the
                # garbage collector would free.
                missed.append((sock, exc.with_traceback(None)))
                continue
            if written != nbytes:
                if missed is None:
                    missed = []
                missed.append((sock, written))
        if missed is not None:
            reached -= self._missed(missed, frames, data, nbytes, count, size)
        self.written(count, size, nbytes)
        status = endpoint.status
        status.frames_out += reached * count
        status.bytes_out += reached * nbytes

    def _missed(
        self,
        missed: list[tuple[_Socket, int | OSError]],
        frames: Sequence[Frame],
        data: Buffer,
        nbytes: int,
        count: int,
        size: int,
    ) -> int:
        """See to the members a publish's write did not reach whole: ``missed`` holds each
        one's socket and what its write returned (bytes written, fewer than ``nbytes``) or
        raised. Return how many got none of it."""
        owners = {id(sock): subscription for subscription, sock in self.members.items()}
        none = 0
        for sock, outcome in missed:
            subscription = owners[id(sock)]
            if isinstance(outcome, int):
                self._started(subscription, data, outcome, nbytes, count, size)
            elif isinstance(outcome, BlockingIOError):
                none += 1
                self._refused(subscription, frames)
            else:
                none += 1
                self._broken(subscription, sock, frames, outcome)
        return none

    def _started(
        self,
        subscription: Subscription,
        data: Buffer,
        written: int,
        nbytes: int,
        count: int,
        size: int,
    ) -> None:
        """Part of the publish's ``nbytes`` went out: the connection keeps the rest, counted
        whole (as :meth:`_ClientFeed.__call__` counts it), and the writer finishes it."""
        self.members_started += 1
        feed = subscription.direct
        assert isinstance(feed, _ClientFeed)
        assert feed.connection is not None
        feed.connection.wrote_directly(data, written, nbytes)
        feed.client.count_sent(count, nbytes)
        self.started(subscription, count, size)

    def _refused(self, subscription: Subscription, frames: Sequence[Frame]) -> None:
        self.members_refused += 1
        self.refused(subscription, frames)

    def _broken(
        self,
        subscription: Subscription,
        sock: _Socket,
        frames: Sequence[Frame],
        exc: OSError,
    ) -> None:
        if sock.fileno() < 0:
            self._refused(subscription, frames)  # closed: queued, as write_nowait refuses
            return
        self.members_broken += 1
        feed = subscription.direct
        assert isinstance(feed, _ClientFeed)
        feed.left = True
        feed.reason = f"connection lost (send failed: {describe_loss(exc)})"
        subscription.close(feed.reason)
