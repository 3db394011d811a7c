"""``kind = "nats"``: a framewire stream to NATS, or NATS into a framewire stream.

One endpoint per direction (``direction = "publish"`` or ``"subscribe"``), in one of two
modes. Frames travel one per NATS message, laid out as :mod:`framewire.protocols.nats` says
(subjects ``SUBJECT.data.TYPE`` / ``SUBJECT.meta.TYPE``, ``Fw-*`` headers, chunks above the
chunk limit), so any NATS client can read them. With ``pack_frames`` (opt-in) a publisher
packs consecutive DATA frames of one type from one batch into one message (``Fw-Pack``), which a
subscriber takes apart; metadata always goes alone.

``mode = "core"`` (live, lossy)
    Publishing takes frames from a subscription to ``stream`` (lossy by default: the oldest
    data frames go when NATS cannot keep up, never metadata) and publishes them without acks.
    While the connection is down, nats-py buffers up to its pending size and data beyond that
    is dropped (counted in ``frames_dropped``); a metadata frame waits for the connection
    instead, and after every reconnect the metadata sent so far is published again. If the
    server has JetStream, a last-value stream ``FW_x_META`` keeps the latest metadata of each
    type for late joiners (made when ``create = true``).
    Subscribing drains nats-py at once into the endpoint's own queue (``max_queue_frames`` /
    ``max_queue_bytes``, dropping the oldest data, never metadata), so neither nats-py nor the
    server ever cuts the subscriber off for being slow. Before the first live frame, and again
    after every reconnect, it publishes the latest metadata of each type from ``FW_x_META`` (in
    the publisher's first-seen order, ``Fw-Rank``); live frames that arrive meanwhile wait.
``mode = "jetstream"`` (durable)
    Publishing takes frames from a lossless subscription (the stream's publishers wait when
    NATS cannot keep up) and publishes them to the JetStream stream ``FW_x`` with acks, in
    windows that go out back to back while a backlog lasts (:class:`_AckedPublisher`), at most
    ``max_inflight_bytes`` unacknowledged. A message that is refused (429, 503 no leader or no
    stream, a full stream with ``discard = "new"``, a timeout) is published again, after a
    backoff, with the same ``Nats-Msg-Id``, so the server stores it once; nothing is dropped.
    Each refusal is one log line and a ``detail.state``. Order is kept: each message in
    flight names its predecessor (``Nats-Expected-Last-Msg-Id``), so the server refuses the
    messages after a refused one instead of storing them ahead of it, and after a refusal
    the retries go one message at a time until one is stored.
    Subscribing reads ``FW_x`` through a pull consumer (``durable`` names it so it resumes
    where it stopped; unnamed, it starts anew each time): it fetches a batch, publishes it into
    ``stream``, then, once every lossless subscriber of ``stream`` has handled it (taken it
    and come back for more: a recorder has written it), acknowledges it (after a full batch,
    while the next one is fetched), so a crash of this daemon loses nothing acknowledged.
    Delivery from JetStream
    is at least once; redeliveries (sequence not above the last one published) are dropped, so
    the stream sees each frame once while the endpoint runs. Messages the consumer skips
    (sent before, to an earlier run or a fetch given up on, and never acknowledged) are read
    from the stream directly, in order, before the ones after them (:meth:`_fill_gap`).
    On every start it first publishes the latest metadata of each type
    from ``FW_x_META`` that precedes where the consumer resumes (``Fw-Rank`` order).

Messages that are not framewire frames (missing headers, bad chunk numbers, over
``max_frame_size``) are counted in ``detail.messages_rejected`` and dropped, with a log line
at most every 10 seconds. Connection problems (unreachable server, refused credentials) are
one log line each time the reason changes, ``status.state`` ``connecting`` or
``reconnecting`` and ``detail.state`` saying why; the endpoint keeps trying, with the
``reconnect`` backoff, forever.

nats-py runs on a thread of its own with its own asyncio loop (:mod:`..natsio`); trio and that
loop cross once per batch. nats-py is needed (``pip install 'framewire[nats]'``): without it
the endpoint fails at start, saying so.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import ssl
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any, Final

import attrs
import trio

from ...config import NatsConfig
from ...frame import Frame, FrameKind
from ...protocols.nats import (
    HEADER_EXPECTED_LAST_MSG_ID,
    HEADER_KIND,
    HEADER_MSG_ID,
    HEADER_RANK,
    FrameAssembler,
    FrameLayout,
    FramePacker,
    NatsMessage,
    NotAFrame,
    PublishUnit,
)
from ..backoff import Backoff
from ..flow import BATCH_BYTES, BATCH_FRAMES, UnencodableFrames
from ..lograte import INTERVAL, RateLimitedWarning
from ..natsio import (
    AckOutcome,
    AckTracker,
    Inbox,
    MissingStream,
    NatsThread,
    PendingCall,
    StreamLayout,
    describe_nats_error,
    ensure_streams,
    read_last_metadata,
    read_stream_range,
    refusal_kind,
    require_nats,
)
from ..stream import (
    MetadataCache,
    MetadataLimitExceeded,
    Policy,
    QueueBounds,
    Subscription,
    SubscriptionClosed,
)
from ..transport import client_tls_context
from ._base import Endpoint, EndpointContext, OutgoingQueue

__all__ = ["NatsEndpoint"]

#: Seconds one pull (fetch) waits for messages before asking again.
FETCH_WAIT: Final = 1.0
#: Seconds the client may take to drain its subscriptions when the endpoint stops.
DRAIN_TIMEOUT: Final = 2.0
#: Seconds allowed beyond DRAIN_TIMEOUT for nats-py to flush and close its connection: a
#: client that is not closed leaves its asyncio transport open when the loop stops.
CLOSE_TIMEOUT: Final = 2.0
#: Bytes kept free of the server's max_payload for headers beyond the layout's own.
PAYLOAD_MARGIN: Final = 1024
#: Messages one pull asks for at most.
MAX_FETCH: Final = 1024
#: JetStream publishes awaiting their acks at most (besides ``max_inflight_bytes``).
MAX_INFLIGHT_MESSAGES: Final = 8192
#: A JetStream publish window holds at most ``max_inflight_bytes`` over this (or one
#: message), so that several are in flight and acks come back while later ones go out.
WINDOWS_IN_FLIGHT: Final = 4

_Message = tuple[str, "dict[str, str] | None", bytes]


class NatsEndpoint(Endpoint[NatsConfig]):
    kind = "nats"

    def __init__(
        self,
        name: str,
        config: NatsConfig,
        context: EndpointContext,
        *,
        log_interval: float = INTERVAL,
    ) -> None:
        super().__init__(name, config, context)
        self._rejected = RateLimitedWarning(
            self.log,
            "dropped NATS messages that are not framewire frames",
            detail=self.status.detail,
            key="messages_rejected",
            interval=log_interval,
        )
        self._unencodable = UnencodableFrames(self.log, "one NATS message", self.status.detail)
        self._outgoing = OutgoingQueue(self.status)
        self._backoff = Backoff(config.reconnect)
        self._connected = trio.Event()
        self._reconnected = trio.Event()
        self._state_changed = trio.Event()
        self._logged_problem: str | None = None
        self._client: Any = None
        #: nats-py's first connect (which retries an unreachable server for ever).
        self._connecting: Future[None] | None = None
        self._closing = False
        #: Core publish: bytes published since the last flush (a PING/PONG round trip).
        self._unflushed = [0]
        self._connect_failure: str | None = None
        #: Data frames nats-py could not take (core, while disconnected), dropped.
        self._unsent = 0
        #: The JetStream reader holds a batch it has not yet published and acknowledged: a
        #: stop request lets it finish (it then returns) instead of cancelling it.
        self._batch_in_hand = False
        self._ever_connected = False
        self._lost_reason: str | None = None
        self._thread: NatsThread | None = None
        self._max_payload = 1 << 20
        self._assembler = FrameAssembler(config.max_frame_size)
        self._sent_metadata = MetadataCache()
        self._layout = StreamLayout(
            subject=config.subject_prefix,
            stream=config.stream_name,
            meta_stream=config.meta_stream_name,
            mode=config.mode,
            create=config.create,
            replicas=config.replicas,
            storage=config.storage,
            max_bytes=config.max_bytes,
            max_age=config.max_age,
            discard=config.discard,
            duplicate_window=config.duplicate_window,
        )
        self.status.address = list(config.servers)
        self.status.detail.update(
            server=None,
            state="connecting",
            reconnects=0,
            slow_consumer_events=0,
            inflight_bytes=0,
            acks_pending=0,
            consumer_pending=0,
            chunks_reassembled=0,
            packs_published=0,
            packs_unpacked=0,
            frames_incomplete=0,
            messages_rejected=0,
            redeliveries_dropped=0,
            gap_messages_read=0,
            order_retries=0,
            connect_errors=0,
            publishes_refused=0,
            last_error=None,
        )

    # -- state -----------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_for_state(self, *states: str) -> None:
        """Wait until ``detail.state`` is one of ``states`` (at once if it is already)."""
        while self.status.detail["state"] not in states:
            await self._state_changed.wait()

    def _set_state(self, state: str, problem: str | None = None) -> None:
        """Record the NATS state; log a problem once per change of reason."""
        status = self.status
        detail = status.detail
        detail["state"] = state
        if problem is not None:
            detail["last_error"] = problem
            status.record_error(problem)
            if problem != self._logged_problem:
                self._logged_problem = problem
                self.log.warning("%s", problem)
        elif state in ("connected", "publishing", "subscribed"):
            if self._logged_problem is not None:
                self.log.info("NATS %s again", state)
            self._logged_problem = None
        self._state_changed.set()
        self._state_changed = trio.Event()

    def _count(self, key: str, increment: int = 1) -> None:
        detail = self.status.detail
        value = detail.get(key, 0)
        detail[key] = (value if isinstance(value, int) else 0) + increment

    def _on_connected(self, url: str, max_payload: int) -> None:
        self._max_payload = max_payload
        self.status.detail["server"] = url
        self.status.state = "connected"
        self._connected.set()
        if not self._ever_connected:
            self._ever_connected = True
            self.log.info("connected to NATS at %s (max_payload %d)", url, max_payload)
            self._set_state("connected")
        else:
            self._count("reconnects")
            self.log.info("reconnected to NATS at %s", url)
            self._set_state("connected")
            self._reconnected.set()
            self._reconnected = trio.Event()

    def _on_disconnected(self) -> None:
        if self._connected.is_set() and not self._closing:
            self._connected = trio.Event()
            self.status.state = "reconnecting"
            reason = f": {self._lost_reason}" if self._lost_reason else ""
            problem = f"disconnected from NATS at {self.status.detail['server']}{reason}"
            self._lost_reason = None
            self._set_state("disconnected", problem)

    def _on_error(self, text: str, slow_consumer: bool, refused: bool) -> None:
        detail = self.status.detail
        if slow_consumer:
            self._count("slow_consumer_events")
            self._set_state(str(detail["state"]), f"NATS: slow consumer ({text})")
            return
        self._count("connect_errors")
        if self.connected and not refused:
            # The connection is going: the disconnect's one line gives the reason.
            self._lost_reason = text
            return
        if not refused and detail["state"] == "unauthorized" and _is_connection_loss(text):
            # A server that refused the credentials then drops the connection: that is not
            # news, and the refusal stays the reason.
            return
        state = "unauthorized" if refused else "unreachable"
        where = ", ".join(self.config.servers)
        self._set_state(state, f"NATS at {where}: {text}")

    # -- running ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        require_nats()
        options = self._connect_options()
        thread = self._thread = NatsThread(self.name)
        thread.start()
        try:
            self.status.state = "connecting"
            self._set_state("connecting")
            await self._start_client(thread, options)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._stop_when_requested, nursery.cancel_scope)
                if self.config.direction == "publish":
                    self._subscribe_outgoing()
                    task_status.started()
                    await self._publish_loop(thread)
                else:
                    task_status.started()
                    if self.config.mode == "core":
                        await self._core_subscribe_loop(thread)
                    else:
                        await self._jetstream_subscribe_loop(thread)
                nursery.cancel_scope.cancel()
        finally:
            if self._outgoing.current is not None:
                self._report_queue()
                self._outgoing.current.close("the NATS endpoint stopped")
            with trio.CancelScope(shield=True):
                await self._close_client(thread)
                await thread.stop()
            self._connected = trio.Event()
            self.status.detail["state"] = "closed"

    async def _stop_when_requested(self, cancel_scope: trio.CancelScope) -> None:
        """A stop request ends the outgoing queue (publish: drain it, then return), lets a
        JetStream reader finish the batch in hand (published and acknowledged; the fetch asked
        for meanwhile is given up, and what it was sent is read again on the next start, see
        :meth:`_fill_gap`), or stops the endpoint at once (never connected; core subscribe; a
        reader waiting for a fetch, the connection or a backoff)."""
        await self._stop_requested.wait()
        if self._outgoing.current is not None and self._ever_connected:
            # What is queued goes out while the grace period lasts.
            self._outgoing.current.end("the NATS endpoint is stopping")
        elif self._batch_in_hand:
            # The batch in hand is published and acknowledged; no new one is waited for.
            pass
        else:
            cancel_scope.cancel()

    def _connect_options(self) -> dict[str, Any]:
        """nats-py's connect options. Raises ValueError/OSError for TLS or credential files
        that cannot be used (a start failure)."""
        config = self.config
        options: dict[str, Any] = {
            "servers": list(config.servers),
            "name": f"framewire {self.name}",
            "connect_timeout": config.connect_timeout,
            "reconnect_time_wait": config.reconnect.initial,
            "max_reconnect_attempts": -1,
            "allow_reconnect": True,
            "drain_timeout": DRAIN_TIMEOUT,
            "pending_size": max(2 << 20, config.chunk_size + (1 << 20)),
        }
        if config.tls is not None:
            context: ssl.SSLContext = client_tls_context(config.tls)
            options["tls"] = context
            if config.tls.server_name is not None:
                options["tls_hostname"] = config.tls.server_name
        if config.user is not None:
            options["user"] = config.user
            options["password"] = config.password or ""
        if config.token is not None:
            options["token"] = config.token
        for path in (config.nkey_seed, config.creds):
            if path is not None and not os.access(path, os.R_OK):
                raise OSError(f"cannot read {path}")
        if config.nkey_seed is not None:
            options["nkeys_seed"] = config.nkey_seed
        if config.creds is not None:
            options["user_credentials"] = config.creds
        return options

    async def _start_client(self, thread: NatsThread, options: dict[str, Any]) -> None:
        """Make the client and start connecting in the background (forever, with backoff);
        the callbacks report to trio."""
        nats = require_nats()
        errors = nats.errors
        client = self._client = nats.aio.client.Client()
        backoff = Backoff(self.config.reconnect)
        to_trio = thread.to_trio

        async def error_cb(error: Exception) -> None:
            slow = isinstance(error, errors.SlowConsumerError)
            refused = (
                isinstance(error, errors.AuthorizationError) or "authoriz" in str(error).lower()
            )
            to_trio(self._on_error, describe_nats_error(error), slow, refused)

        async def disconnected_cb() -> None:
            to_trio(self._on_disconnected)

        async def reconnected_cb() -> None:
            backoff.reset()
            to_trio(self._on_connected, _url(client), client.max_payload)

        def next_server(servers: list[Any], info: dict[str, Any]) -> tuple[Any, float]:
            # Given None, nats-py takes the first server of its pool every time: with a
            # cluster whose first seed is down the client never tried the others. The
            # server tried least often goes next, so every one gets its turn.
            return min(servers, key=lambda server: server.reconnects), backoff.next_delay()

        async def connect() -> None:
            await client.connect(
                error_cb=error_cb,
                disconnected_cb=disconnected_cb,
                reconnected_cb=reconnected_cb,
                reconnect_to_server_handler=next_server,
                **options,
            )
            to_trio(self._on_connected, _url(client), client.max_payload)

        def connect_ended(future: Any) -> None:
            if not future.cancelled() and future.exception() is not None:
                to_trio(self._on_connect_failed, describe_nats_error(future.exception()))

        self._connecting = thread.submit(connect())
        self._connecting.add_done_callback(connect_ended)
        await trio.lowlevel.checkpoint()

    async def _close_client(self, thread: NatsThread) -> None:
        """Drain and close the client: nats-py gives up draining after :data:`DRAIN_TIMEOUT`
        and then closes; if that does not finish, it is closed outright (shielded by the
        caller, so this takes at most DRAIN_TIMEOUT + 2 * CLOSE_TIMEOUT seconds)."""
        client = self._client
        if client is None:
            return
        self._closing = True

        if self._connecting is not None:
            self._connecting.cancel()  # still trying to connect: stop trying

        async def close() -> None:
            try:
                if client.is_connected:
                    try:
                        await client.drain()
                    except Exception:
                        await client.close()
                elif not client.is_closed:
                    await client.close()
            finally:
                _close_socket(client)

        try:
            await thread.call(close, within=DRAIN_TIMEOUT + CLOSE_TIMEOUT)
        except Exception as exc:
            self.log.debug("draining the NATS client: %s", exc)
            if not client.is_closed:
                try:
                    await thread.call(client.close, within=CLOSE_TIMEOUT)
                except Exception as again:
                    self.log.debug("closing the NATS client: %s", again)
            thread.call_soon(_close_socket, client)

    def _on_connect_failed(self, text: str) -> None:
        self._connect_failure = text
        self._set_state("error", f"cannot connect to NATS: {text}")
        self._connected.set()  # wakes the waiters, who raise

    async def _wait_connected(self) -> None:
        """Wait for the connection. Raises ConnectionError when nats-py gave up connecting
        (not for an unreachable server: it tries again forever), so the supervisor restarts
        the endpoint."""
        await self._connected.wait()
        if self._connect_failure is not None:
            raise ConnectionError(f"cannot connect to NATS: {self._connect_failure}")

    async def _ensure_streams(self, thread: NatsThread, *, required: bool) -> bool:
        """Create or check the JetStream streams, retrying with backoff while it fails when
        ``required``; without it (core mode) a failure is logged and False returned."""
        backoff = Backoff(self.config.reconnect)
        while True:
            await self._wait_connected()
            try:
                done = await thread.call(
                    functools.partial(ensure_streams, self._client.jetstream(), self._layout),
                    within=self.config.connect_timeout,
                )
            except MissingStream as exc:
                problem = str(exc)
                state = "stream_missing"
            except Exception as exc:
                problem = f"JetStream streams {self._layout.stream}: {describe_nats_error(exc)}"
                state = "jetstream_unavailable"
            else:
                for line in done:
                    self.log.info("%s", line)
                return True
            if not required:
                self.log.info(
                    "%s: late joiners on other machines get metadata only as it is published",
                    problem,
                )
                return False
            self._set_state(state, problem)
            await trio.sleep(backoff.next_delay())

    # -- publishing ------------------------------------------------------------------------

    def _subscribe_outgoing(self) -> Subscription:
        config = self.config
        subscription = self.context.streams.get(config.stream).subscribe(
            bounds=QueueBounds(config.max_queue_frames, config.max_queue_bytes),
            policy=Policy(config.queue_policy),
            label=f"nats {self.name} -> {config.subject_prefix}",
        )
        return self._outgoing.use(subscription)

    def _report_queue(self) -> None:
        """Queue figures in status; ``frames_dropped`` adds what nats-py could not take."""
        self._outgoing.report()
        self.status.frames_dropped += self._unsent

    def _message_limit(self) -> int:
        """The largest message (headers and payload) to publish: a frame whose payload is at
        most ``chunk_size`` goes whole (its headers ride in the margin), as the docs say."""
        limit = min(self._max_payload - PAYLOAD_MARGIN, self.config.chunk_size + PAYLOAD_MARGIN)
        return max(limit, 4096)

    async def _publish_loop(self, thread: NatsThread) -> None:
        config = self.config
        jetstream = config.mode == "jetstream"
        await self._wait_connected()
        acked: _AckedPublisher | None = None
        if jetstream:
            await self._ensure_streams(thread, required=True)
            client = self._client
            tracker = await thread.call(
                lambda: AckTracker.open(client), within=config.connect_timeout
            )
            acked = _AckedPublisher(self, thread, tracker)
        elif config.create:
            await self._ensure_streams(thread, required=False)
        self._set_state("publishing")
        layout = FrameLayout(config.subject_prefix, secrets.token_hex(6), msg_ids=jetstream)
        packer = FramePacker(layout, max_frames=config.pack_frames, max_bytes=config.pack_bytes)
        status = self.status
        reconnected = self._reconnected
        while True:
            subscription = self._outgoing.current
            assert subscription is not None
            self._report_queue()
            if acked is not None and acked.windows and not _backlog(subscription, config):
                # Less than a batch queued: collect the acks of the oldest window first (and
                # let the queue gather a batch meanwhile) rather than publish a small window
                # now; windows go out back to back only while a backlog lasts.
                await acked.settle_oldest()
                continue
            try:
                batch = await subscription.receive_batch(BATCH_FRAMES, BATCH_BYTES)
            except SubscriptionClosed as closed:
                if closed.graceful:
                    if acked is not None:
                        await acked.settle_all()
                    return
                self.log.warning("the outgoing queue was closed: %s", closed.reason)
                self._subscribe_outgoing()
                continue
            if not jetstream and reconnected.is_set():
                # Core NATS keeps nothing: after a reconnect, say the metadata again first.
                reconnected = self._reconnected
                batch = [*self._sent_metadata, *batch]
            units = packer.units(batch, self._message_limit(), self._unencodable)
            if acked is not None:
                await acked.submit(units)
            else:
                await self._publish_core(thread, units)
            status.detail["packs_published"] = packer.packs
            for unit in units:
                if unit.kind is not FrameKind.DATA:
                    self._sent_metadata.update(unit.frames[0])
            status.detail["queue_frames"] = subscription.queued_frames

    async def _publish_core(self, thread: NatsThread, frames: list[PublishUnit]) -> None:
        """Publish without acks, paced by a flush (a round trip to the server) every
        ``max_inflight_bytes``. Data that nats-py cannot take (disconnected, its buffer full)
        is dropped and counted; metadata waits for the connection and is tried again."""
        status = self.status
        client = self._client
        unflushed = self._unflushed  # touched on the asyncio thread only
        pace = self.config.max_inflight_bytes
        flush_timeout = self.config.ack_timeout
        start = 0
        while start < len(frames):
            todo = frames[start:]

            async def publish(
                todo: list[PublishUnit] = todo,
            ) -> list[bool]:
                """Publish; return whether each unit went, stopping before a metadata
                frame that could not go."""
                went = []
                for unit in todo:
                    try:
                        for message in unit.messages:
                            await client.publish(
                                message.subject,
                                message.payload,
                                headers=message.headers,
                            )
                            unflushed[0] += message.size
                        if unflushed[0] >= pace and client.is_connected:
                            # Paced: at most max_inflight_bytes ahead of the server, so a
                            # fast publisher does not get subscribers cut off as slow.
                            unflushed[0] = 0
                            await client.flush(timeout=flush_timeout)
                    except Exception:
                        if unit.kind is not FrameKind.DATA:
                            break
                        went.append(False)
                        continue
                    went.append(True)
                return went

            try:
                went = await thread.call(publish, within=self.config.ack_timeout)
            except TimeoutError as exc:
                # nats-py could not take the batch in time (its buffer full, the server
                # gone): the data is lost as for a lossy queue, metadata is said again.
                self._set_state("error", f"NATS publish: {exc}")
                self._unsent += sum(len(u.frames) for u in todo if u.kind is FrameKind.DATA)
                frames = [unit for unit in todo if unit.kind is not FrameKind.DATA]
                start = 0
                await self._wait_connected()
                continue
            for unit, sent in zip(todo, went, strict=False):
                if sent:
                    status.frames_out += len(unit.frames)
                    status.bytes_out += unit.nbytes
                else:
                    self._unsent += len(unit.frames)
            start += len(went)
            if start < len(frames):
                # A metadata frame could not go: wait for the connection, then go on.
                await self._wait_connected()
                await trio.sleep(0.01)

    def _refused(self, failed: AckOutcome, message: NatsMessage) -> bool:
        """Record a refused JetStream publish; whether to back off before trying again (an
        ``out_of_order`` refusal is retried at once: its predecessor was stored, yet is not
        the stream's last message, because another publisher's message came between)."""
        if refusal_kind(failed) == "out_of_order":
            self._count("order_retries")
            return False
        self._count("publishes_refused")
        state, problem = _describe_refusal(failed, self.config, message)
        self._set_state(state, problem)
        return True

    # -- subscribing -----------------------------------------------------------------------

    def _decode(self, messages: Sequence[_Message]) -> list[Frame]:
        """Frames from messages (chunks reassembled); bad messages counted and dropped."""
        frames = []
        assembler = self._assembler
        for subject, headers, payload in messages:
            try:
                frames += assembler.feed_all(subject, headers, payload)
            except NotAFrame as exc:
                self._rejected(str(exc))
        detail = self.status.detail
        detail["packs_unpacked"] = assembler.packs_unpacked
        detail["chunks_reassembled"] = assembler.chunks_reassembled
        detail["frames_incomplete"] = assembler.frames_incomplete
        return frames

    def _stream_lossless_marks(self) -> list[tuple[Subscription, int]]:
        """The stream's lossless subscriptions, each with how many frames it has been given
        (see :meth:`Subscription.wait_handled`)."""
        stream = self.context.streams.get(self.config.stream)
        return [(subscription, subscription.handled_mark()) for subscription in stream.lossless]

    async def _publish_frames(self, frames: list[Frame]) -> None:
        if not frames:
            return
        status = self.status
        status.frames_in += len(frames)
        status.bytes_in += sum(frame.size for frame in frames)
        try:
            await self.context.streams.get(self.config.stream).publish(frames)
        except MetadataLimitExceeded as exc:
            self._rejected(exc.reason)

    async def _last_metadata(self, thread: NatsThread, before: int | None = None) -> list[_Message]:
        """The latest metadata of each type from the last-value stream, in first-seen order
        (``Fw-Rank``); with ``before``, only what was stored before that stream sequence.
        Empty (after a log line) when it cannot be read."""
        client = self._client
        try:
            raw = await thread.call(
                lambda: read_last_metadata(client.jetstream(), self._layout),
                within=self.config.connect_timeout,
            )
        except Exception as exc:
            self.log.info(
                "no metadata from %s: %s", self._layout.meta_stream, describe_nats_error(exc)
            )
            return []
        entries = []
        for origin, message in raw:
            headers: dict[str, str] | None = message.headers
            if before is not None and origin is not None and origin >= before:
                continue
            rank_text = (headers or {}).get(HEADER_RANK, "")
            rank = int(rank_text) if rank_text.isdigit() else 1 << 30
            entries.append((rank, origin or 0, (message.subject, headers, message.data or b"")))
        entries.sort(key=lambda entry: (entry[0], entry[1]))
        return [message for _, _, message in entries]

    async def _core_subscribe_loop(self, thread: NatsThread) -> None:
        config = self.config
        inbox: Inbox[_Message] = Inbox(
            thread, max_items=config.max_queue_frames, max_bytes=config.max_queue_bytes
        )
        await self._wait_connected()
        client = self._client

        async def on_message(msg: Any) -> None:
            headers = msg.headers
            metadata = bool(headers) and headers.get(HEADER_KIND) == "metadata"
            inbox.put((msg.subject, headers, msg.data), len(msg.data), droppable=not metadata)

        async def subscribe() -> None:
            inbox.hold()
            await client.subscribe(
                f"{config.subject_prefix}.>",
                cb=on_message,
                pending_msgs_limit=1 << 20,
                pending_bytes_limit=max(256 << 20, 4 * config.max_queue_bytes),
            )

        await thread.call(subscribe, within=config.connect_timeout)
        async with trio.open_nursery() as nursery:
            await nursery.start(self._bootstrap_core, thread, inbox)
            self._set_state("subscribed")
            while True:
                messages = await inbox.take()
                self.status.frames_dropped = inbox.dropped
                await self._publish_frames(self._decode(messages))

    async def _bootstrap_core(
        self,
        thread: NatsThread,
        inbox: Inbox[_Message],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Put the latest metadata before the live messages, now (started once done) and
        after every reconnect. A stored message the same as one that arrived live meanwhile
        is left out: it would only repeat it."""
        while True:
            reconnected = self._reconnected
            inbox.hold()
            metadata = await self._last_metadata(thread)
            inbox.release(((message, len(message[2])) for message in metadata), same=_same_frame)
            task_status.started()
            task_status = trio.TASK_STATUS_IGNORED
            await reconnected.wait()

    async def _jetstream_subscribe_loop(self, thread: NatsThread) -> None:
        config = self.config
        nats = require_nats()
        api = nats.js.api
        await self._ensure_streams(thread, required=True)
        client = self._client
        consumer = api.ConsumerConfig(
            ack_policy=api.AckPolicy.ALL,
            deliver_policy=api.DeliverPolicy.NEW
            if config.start == "new"
            else api.DeliverPolicy.ALL,
            max_ack_pending=self._max_ack_pending(),
            ack_wait=max(30.0, 3 * config.ack_timeout),
        )
        if not config.durable:
            consumer.inactive_threshold = 60.0

        async def open_consumer() -> tuple[Any, int]:
            js = client.jetstream()
            subscription = await js.pull_subscribe(
                f"{config.subject_prefix}.>",
                durable=config.durable or None,
                stream=self._layout.stream,
                config=consumer,
                pending_bytes_limit=max(256 << 20, 4 * config.chunk_size),
            )
            info = await subscription.consumer_info()
            stream_info = await js.stream_info(self._layout.stream)
            start = max(info.ack_floor.stream_seq + 1, stream_info.state.first_seq)
            return subscription, start

        backoff = Backoff(config.reconnect)
        while True:
            try:
                pull, start = await thread.call(open_consumer, within=config.connect_timeout)
                break
            except Exception as exc:
                self._set_state(
                    "consumer_unavailable",
                    f"JetStream consumer on {self._layout.stream}: {describe_nats_error(exc)}",
                )
                await trio.sleep(backoff.next_delay())
                await self._wait_connected()
        self._set_state("subscribed")
        self.log.info(
            "reading JetStream stream %s from sequence %d%s",
            self._layout.stream,
            start,
            f" (durable consumer {config.durable})" if config.durable else "",
        )
        await self._publish_frames(self._decode(await self._last_metadata(thread, start)))
        last_sequence = start - 1
        # Messages asked for per fetch: half of max_queue_bytes over the largest message of
        # the last fetch (at first, the largest a message can be), at most half of
        # max_queue_frames: two batches are held at once, the one being published and the
        # next one, fetched meanwhile.
        largest = self._message_limit()
        detail = self.status.detail

        asked = 0

        def fetch() -> PendingCall[list[Any]]:
            nonlocal asked
            want = asked = max(
                1,
                min(
                    MAX_FETCH,
                    config.max_queue_frames // 2,
                    config.max_queue_bytes // 2 // largest,
                ),
            )
            return thread.begin(
                functools.partial(pull.fetch, want, timeout=FETCH_WAIT),
                within=FETCH_WAIT + config.ack_timeout,
            )

        ahead: PendingCall[list[Any]] | None = None
        try:
            while True:
                if self.stop_requested:
                    return
                if ahead is None:
                    ahead = fetch()
                try:
                    batch = await ahead.result()
                except Exception as exc:
                    if not isinstance(exc, TimeoutError) and not _is_fetch_timeout(exc):
                        self._set_state("error", f"JetStream fetch: {describe_nats_error(exc)}")
                        await trio.sleep(backoff.next_delay())
                        await self._wait_connected()
                    continue
                finally:
                    ahead = None
                self._batch_in_hand = True
                if detail["state"] != "subscribed":
                    self._set_state("subscribed")
                backoff.reset()
                # The batch's messages in runs, each after the gap before it (if any).
                runs: list[tuple[tuple[int, int] | None, list[_Message]]] = [(None, [])]
                largest = 1024
                redelivered = 0
                for msg in batch:
                    sequence = msg.metadata.sequence.stream
                    largest = max(largest, len(msg.data))
                    if sequence <= last_sequence:
                        redelivered += 1
                        continue
                    if sequence > last_sequence + 1:
                        runs.append(((last_sequence + 1, sequence - 1), []))
                    last_sequence = sequence
                    runs[-1][1].append((msg.subject, msg.headers, msg.data))
                if len(batch) >= asked:
                    # A full batch: a backlog. The next one comes while this one is
                    # published and acknowledged. (Otherwise it is asked for after that,
                    # when more has gathered: small batches cost more per frame.)
                    ahead = fetch()
                self._count("redeliveries_dropped", redelivered)
                for gap, messages in runs:
                    if gap is not None:
                        first, last = gap
                        # The consumer cannot have more than max_ack_pending messages sent
                        # and not acknowledged: anything before those left the stream.
                        await self._fill_gap(
                            thread, max(first, last - self._max_ack_pending() + 1), last
                        )
                    await self._publish_frames(self._decode(messages))
                # Acknowledged means kept: wait until every lossless subscriber (a recorder,
                # a sender to the pipeline) has handled what it was given, so that a crash
                # of this daemon loses nothing JetStream no longer holds for it. (The next
                # batch is being fetched meanwhile.)
                for subscription, mark in self._stream_lossless_marks():
                    await subscription.wait_handled(mark)
                if not self._assembler.assembling:
                    ack_upto = batch[-1] if batch else None
                else:
                    # Acknowledge up to the message before the frame still being assembled.
                    ack_upto = _before_partial(batch)
                detail["consumer_pending"] = batch[-1].metadata.num_pending if batch else 0
                if ack_upto is not None:
                    with trio.CancelScope(shield=True):
                        try:
                            await thread.call(ack_upto.ack, within=config.ack_timeout)
                        except Exception as exc:
                            self.log.debug("ack failed (it will be redelivered): %s", exc)
                self._batch_in_hand = False
        finally:
            self._batch_in_hand = False
            if ahead is not None:
                ahead.cancel()

    def _max_ack_pending(self) -> int:
        """The consumer's max_ack_pending: what it may have sent and not had acknowledged."""
        return max(4 * self.config.max_queue_frames, 4 * MAX_FETCH)

    async def _fill_gap(self, thread: NatsThread, first: int, last: int) -> None:
        """Publish the stream's messages ``first`` to ``last`` (read from the stream directly),
        which the consumer skipped: it sent them before (to an earlier run of this endpoint
        that stopped or died before acknowledging them, or to a fetch given up on) and would
        only send them again after ``ack_wait``, after later ones, whose acknowledgement
        would cover them. Messages the stream no longer holds (its limits) are passed over,
        and so are messages on subjects the consumer does not read (a stream made elsewhere,
        ``create = false``, that captures more than ``SUBJECT.>``: each costs a read).

        Raises what reading the stream raises (the fetch loop is left; the supervisor starts
        the endpoint again, which resumes from the acknowledged floor).
        """
        config = self.config
        client = self._client
        found = 0
        sequence = first
        while sequence <= last:
            count = min(last - sequence + 1, MAX_FETCH)
            messages = await thread.call(
                functools.partial(
                    read_stream_range,
                    client.jetstream(),
                    self._layout.stream,
                    config.subject_prefix,
                    sequence,
                    count,
                ),
                within=config.ack_timeout + count * 0.01,
            )
            found += len(messages)
            self._count("gap_messages_read", len(messages))
            await self._publish_frames(self._decode(messages))
            sequence += count
        if found:
            self.log.info(
                "read %d messages of %s (sequences %d to %d) from the stream: the consumer had "
                "sent them before and they were never acknowledged",
                found,
                self._layout.stream,
                first,
                last,
            )


@attrs.define
class _Window:
    """Messages published together whose acks are awaited together."""

    messages: list[NatsMessage]
    nbytes: int
    acks: PendingCall[list[AckOutcome]]


@attrs.define
class _Unconfirmed:
    """A unit some of whose messages are not known to be stored yet."""

    unit: PublishUnit
    messages_left: int


class _AckedPublisher:
    """JetStream publishing with acks, pipelined: windows of messages (each at most a
    :data:`WINDOWS_IN_FLIGHT` th of ``max_inflight_bytes``, or one message) are published one
    after another without waiting for the acks of those before, as long as the windows
    awaiting acks hold at most ``max_inflight_bytes`` (and :data:`MAX_INFLIGHT_MESSAGES`
    messages); the acks are collected in order, oldest window first.

    Order and exactly-once storage hold as without pipelining: every message names the one
    published before it in ``Nats-Expected-Last-Msg-Id`` (the first after a moment with
    nothing awaiting acks names none), so when one is refused the server refuses every one
    after it, in its window and in the windows after it, instead of storing them ahead of
    it. On a refusal (or a missing ack) every window still awaiting acks is collected, and
    the messages from the first one not stored onwards are published again with the same
    ``Nats-Msg-Id`` (a message that was stored after all is answered "duplicate"), one at a
    time after a backoff until one is stored, then in windows again, before anything new.

    Frames count as sent (``frames_out``) when the last message of their unit is stored.
    Messages awaiting acks are the frames' own payloads: ``detail.inflight_bytes`` is the
    bytes they hold.
    """

    def __init__(self, endpoint: NatsEndpoint, thread: NatsThread, tracker: AckTracker) -> None:
        self.endpoint = endpoint
        self.thread = thread
        self.tracker = tracker
        self.config = endpoint.config
        self.windows: deque[_Window] = deque()
        self.inflight_bytes = 0
        self.inflight_messages = 0
        self._unconfirmed: deque[_Unconfirmed] = deque()
        self._last_id: str | None = None
        self._backoff = Backoff(self.config.reconnect)

    async def submit(self, units: Sequence[PublishUnit]) -> None:
        """Publish the messages of ``units`` after those submitted before, waiting for acks
        of earlier windows as far as the bounds need (retrying refused messages there)."""
        for unit in units:
            self._unconfirmed.append(_Unconfirmed(unit, len(unit.messages)))
        pending = deque(message for unit in units for message in unit.messages)
        limit = self.config.max_inflight_bytes
        window_limit = limit // WINDOWS_IN_FLIGHT
        while pending:
            window: list[NatsMessage] = []
            nbytes = 0
            while pending:
                size = pending[0].size
                if window and nbytes + size > window_limit:
                    break
                if (window or self.windows) and (
                    self.inflight_bytes + nbytes + size > limit
                    or self.inflight_messages + len(window) >= MAX_INFLIGHT_MESSAGES
                ):
                    break
                window.append(pending.popleft())
                nbytes += size
            if window:
                self._start(window, nbytes)
            else:
                await self.settle_oldest()

    def _start(self, messages: list[NatsMessage], nbytes: int) -> None:
        """Publish a window now (chained to what awaits acks); its acks are collected later."""
        previous = self._last_id if self.windows else None
        for message in messages:
            headers = message.headers
            if previous is None:
                headers.pop(HEADER_EXPECTED_LAST_MSG_ID, None)
            else:
                headers[HEADER_EXPECTED_LAST_MSG_ID] = previous
            previous = headers.get(HEADER_MSG_ID)
        self._last_id = previous
        config = self.config
        acks = self.thread.begin(
            functools.partial(self.tracker.publish, messages, config.ack_timeout),
            within=config.ack_timeout + len(messages) * 0.01 + 1,
        )
        self.windows.append(_Window(messages, nbytes, acks))
        self.inflight_bytes += nbytes
        self.inflight_messages += len(messages)
        self._report()

    async def _outcomes(self, window: _Window) -> list[AckOutcome]:
        try:
            return await window.acks.result()
        except TimeoutError:
            return [AckOutcome(False, description="no ack in time")]
        finally:
            self.windows.popleft()
            self.inflight_bytes -= window.nbytes
            self.inflight_messages -= len(window.messages)
            self._report()

    async def settle_all(self) -> None:
        """Collect every window's acks (retrying what was not stored)."""
        while self.windows:
            await self.settle_oldest()

    async def settle_oldest(self) -> None:
        """Wait for the acks of the oldest window; if one of its messages was not stored,
        collect the later windows too and publish again, in order, everything from that
        message on, until all of it is stored."""
        window = self.windows[0]
        outcomes = await self._outcomes(window)
        good = _stored_prefix(outcomes)
        self._confirm(good)
        if good == len(window.messages):
            endpoint = self.endpoint
            if endpoint.status.detail["state"] != "publishing":
                endpoint._set_state("publishing")
            self._backoff.reset()
            return
        failed = outcomes[good] if good < len(outcomes) else AckOutcome(False)
        retry = window.messages[good:]
        while self.windows:
            # Refused after the failed one (their predecessor was not stored), or stored
            # after all: published again either way, the second time answered "duplicate".
            later = self.windows[0]
            await self._outcomes(later)
            retry += later.messages
        await self._retry(retry, failed)

    async def _retry(self, messages: list[NatsMessage], failed: AckOutcome) -> None:
        """Publish ``messages`` (the first of which got ``failed``) until all are stored,
        in order: after a refusal one at a time, with a backoff, until one is stored."""
        endpoint = self.endpoint
        config = self.config
        detail = endpoint.status.detail
        stored = 0
        one_at_a_time = False
        refusal: AckOutcome | None = failed
        while stored < len(messages):
            if refusal is not None and endpoint._refused(refusal, messages[stored]):
                one_at_a_time = True
                await trio.sleep(self._backoff.next_delay())
                await endpoint._wait_connected()
            refusal = None
            window: list[NatsMessage] = []
            nbytes = 0
            for message in messages[stored:]:
                if window and (one_at_a_time or nbytes + message.size > config.max_inflight_bytes):
                    break
                window.append(message)
                nbytes += message.size
            self._start(window, nbytes)
            outcomes = await self._outcomes(self.windows[0])
            good = _stored_prefix(outcomes)
            stored += good
            self._confirm(good)
            if good == len(window):
                one_at_a_time = False
            else:
                refusal = outcomes[good] if good < len(outcomes) else AckOutcome(False)
        if detail["state"] != "publishing":
            endpoint._set_state("publishing")
        self._backoff.reset()

    def _confirm(self, count: int) -> None:
        """``count`` more messages are stored, in order: count the units they complete."""
        status = self.endpoint.status
        unconfirmed = self._unconfirmed
        while count:
            first = unconfirmed[0]
            taken = min(count, first.messages_left)
            first.messages_left -= taken
            count -= taken
            if not first.messages_left:
                unconfirmed.popleft()
                status.frames_out += len(first.unit.frames)
                status.bytes_out += first.unit.nbytes

    def _report(self) -> None:
        detail = self.endpoint.status.detail
        detail["inflight_bytes"] = self.inflight_bytes
        detail["acks_pending"] = self.inflight_messages


def _backlog(subscription: Subscription, config: NatsConfig) -> bool:
    """Whether ``subscription`` holds a full batch (as much as one receive takes), or half
    of what its bounds let it hold."""
    return subscription.queued_frames >= min(
        BATCH_FRAMES, config.max_queue_frames // 2
    ) or subscription.queued_bytes >= min(BATCH_BYTES, config.max_queue_bytes // 2)


def _stored_prefix(outcomes: Sequence[AckOutcome]) -> int:
    """How many outcomes, from the first, say stored."""
    good = 0
    for outcome in outcomes:
        if not outcome.ok:
            break
        good += 1
    return good


def _close_socket(client: Any) -> None:
    """Close nats-py's socket if it is still open: a client whose connect was cancelled
    half-way, or whose close did not finish, would otherwise leave an asyncio transport open
    when its loop stops (a ResourceWarning when it is collected). Runs on the client's loop.
    """
    transport = getattr(client, "_transport", None)  # nats-py keeps no public handle on it
    if transport is not None:
        with contextlib.suppress(Exception):
            transport.close()


def _same_frame(a: _Message, b: _Message) -> bool:
    """Whether two messages carry the same frame (their ``Fw-*`` headers and payload)."""
    if a[0] != b[0] or bytes(a[2]) != bytes(b[2]):
        return False
    return _fw_headers(a[1]) == _fw_headers(b[1])


def _fw_headers(headers: dict[str, str] | None) -> dict[str, str]:
    return {key: value for key, value in (headers or {}).items() if key.startswith("Fw-")}


def _before_partial(batch: Sequence[Any]) -> Any:
    """The last message of ``batch`` before the first chunk of the frame still being
    assembled (None if that chunk is the batch's first)."""
    for index in range(len(batch) - 1, -1, -1):
        chunk = (batch[index].headers or {}).get("Fw-Chunk", "")
        if chunk.startswith("1/"):
            return batch[index - 1] if index > 0 else None
    return None


def _is_connection_loss(text: str) -> bool:
    lowered = text.lower()
    return "reset" in lowered or "eof" in lowered or "broken pipe" in lowered


def _is_fetch_timeout(error: BaseException) -> bool:
    return "timeout" in type(error).__name__.lower()


def _url(client: Any) -> str:
    url = client.connected_url
    if url is None:
        return "?"
    return f"{url.scheme}://{url.hostname}:{url.port}"


def _describe_refusal(
    outcome: AckOutcome, config: NatsConfig, message: NatsMessage
) -> tuple[str, str]:
    """The state and the log line for a refused JetStream publish."""
    kind = refusal_kind(outcome)
    what = f"JetStream publish to {message.subject}"
    code = f" ({outcome.code}" + (f"/{outcome.err_code}" if outcome.err_code else "") + ")"
    if not outcome.code:
        code = ""
    retry = "; retrying with the same message id"
    if kind == "too_large":
        return "refused", (
            f"{what} refused: {outcome.description}{code} for a message of {message.size} "
            f"bytes; lower chunk_size (now {config.chunk_size}) or raise the stream's "
            f"max_msg_size{retry}"
        )
    if kind == "stream_full":
        return "stream_full", (
            f"{what} refused, the stream is full: {outcome.description}{code} (discard = "
            f'"{config.discard}"; make room or raise max_bytes){retry}'
        )
    if kind == "throttled":
        return "throttled", f"{what} refused: too many requests{code}{retry}"
    if kind == "no_ack":
        return "no_ack", f"{what}: {outcome.description}{retry}"
    return "refused", f"{what} refused: {outcome.description}{code}{retry}"
