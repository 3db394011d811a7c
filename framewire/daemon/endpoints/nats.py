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
    windows that go out back to back while a backlog lasts (``JetStreamPublisher``), at most
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
    from the stream directly, in order, before the ones after them (``NatsSubscriber._fill_gap``).
    On every start it first publishes the latest metadata of each type
    from ``FW_x_META`` that precedes where the consumer resumes (``Fw-Rank`` order).

Messages that are not framewire frames (missing headers, bad chunk numbers, over
``max_frame_size``) are counted in ``detail.messages_rejected`` and dropped, with a log line
at most every 10 seconds. Connection problems (unreachable server, refused credentials) are
one log line each time the reason changes, ``status.state`` ``connecting`` or
``reconnecting`` and ``detail.state`` saying why; the endpoint keeps trying, with the
``reconnect`` backoff, forever.

The code lives in the package :mod:`framewire.daemon.nats`: the publisher, the subscriber,
nats-py's thread and the embedded nats-server. nats-py runs on a thread of its own with its
own asyncio loop; trio and that
loop cross once per batch. nats-py is needed (``pip install 'framewire[nats]'``): without it
the endpoint fails at start, saying so.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import ssl
from concurrent.futures import Future
from typing import Any, Final

import trio

from ...config import NatsConfig
from ...protocols.nats import ProducerSequences
from ..backoff import Backoff
from ..credentials import NKEYS_MISSING, nkeys_installed
from ..flow import UnencodableFrames
from ..lograte import INTERVAL, RateLimitedWarning
from ..nats import (
    MissingStream,
    NatsPublisher,
    NatsSubscriber,
    NatsThread,
    StreamLayout,
    StreamWatch,
    describe_nats_error,
    ensure_streams,
    pings_outstanding,
    require_nats,
)
from ..outbox import Outbox
from ..stream import Policy, QueueBounds, Subscription
from ..transport import client_tls_context
from ._base import Endpoint, EndpointContext

__all__ = ["NatsEndpoint"]

#: Seconds the client may take to drain its subscriptions when the endpoint stops.
DRAIN_TIMEOUT: Final = 2.0
#: Seconds allowed beyond DRAIN_TIMEOUT for nats-py to flush and close its connection: a
#: client that is not closed leaves its asyncio transport open when the loop stops.
CLOSE_TIMEOUT: Final = 2.0
#: Seconds between two looks at whether the server answers this connection's PINGs.
LINK_CHECK: Final = 1.0
#: Seconds a PING may go unanswered before the link is said to be stale (at least; half of
#: ``ping_interval`` when that is longer).
STALE_AFTER: Final = 2.0
#: Seconds during which a problem that comes back is not logged again.
REPEAT_QUIET: Final = 60.0
#: Bytes kept free of the server's max_payload for headers beyond the layout's own.
PAYLOAD_MARGIN: Final = 1024


class NatsEndpoint(Endpoint[NatsConfig]):
    kind = "nats"
    #: What a reload changes on the running endpoint, its connections kept: its queue's
    #: bounds, when it has a queue (see :meth:`reconfigure`).
    live_fields = frozenset({"max_queue_frames", "max_queue_bytes"})

    def takes_live_changes(self) -> bool:
        return self.outbox is not None

    def reconfigure(self, config: NatsConfig) -> None:
        """Apply a reload's live changes: the queue's new bounds, at once (see
        :meth:`Outbox.rebound`)."""
        super().reconfigure(config)
        if self.outbox is not None:
            self.outbox.rebound_to(config)

    def __init__(
        self,
        name: str,
        config: NatsConfig,
        context: EndpointContext,
        *,
        log_interval: float = INTERVAL,
    ) -> None:
        super().__init__(name, config, context)
        self.rejected = RateLimitedWarning(
            self.log,
            "dropped NATS messages that are not framewire frames",
            detail=self.status.detail,
            key="messages_rejected",
            interval=log_interval,
        )
        self.metadata_refused = RateLimitedWarning(
            self.log,
            "dropped metadata frames from NATS that the stream refused",
            detail=self.status.detail,
            key="metadata_refused",
            interval=log_interval,
        )
        self.unencodable = UnencodableFrames(self.log, "one NATS message", self.status.detail)
        #: What waits for NATS (publish), in memory or on disk.
        self.outbox: Outbox | None = None
        if config.direction == "publish":
            self.outbox = Outbox.of(name, config, self._subscribe, status=self.status, log=self.log)
        self._publisher: NatsPublisher | None = None
        #: A reader's knowledge of each publisher's numbers (see NatsSubscriber.sequences).
        self.reader_sequences = ProducerSequences()
        self._connected = trio.Event()
        self._reconnected = trio.Event()
        self._state_changed = trio.Event()
        self._logged_problem: str | None = None
        #: When each problem logged may be logged again.
        self._quiet_until: dict[str, float] = {}
        self.client: Any = None
        #: nats-py's first connect (which retries an unreachable server for ever).
        self._connecting: Future[None] | None = None
        self._closing = False
        self._connect_failure: str | None = None
        #: The JetStream reader holds a batch it has not yet published and acknowledged: a
        #: stop request lets it finish (it then returns) instead of cancelling it.
        self.batch_in_hand = False
        self._ever_connected = False
        self._lost_reason: str | None = None
        self._thread: NatsThread | None = None
        self._nursery: trio.Nursery | None = None
        self._watch: StreamWatch | None = None
        self._max_payload = 1 << 20
        self.layout = StreamLayout(
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
            retention=config.retention,
            source_domain=config.source_domain,
            owner=config.direction == "publish" or config.source_domain is not None,
            explicit=config.explicit_stream_settings,
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
            metadata_refused=0,
            redeliveries_dropped=0,
            duplicates_dropped=0,
            frames_lost_upstream=0,
            messages_lost_upstream=0,
            gap_messages_read=0,
            order_retries=0,
            connect_errors=0,
            publishes_refused=0,
            closed_by_server=0,
            last_error=None,
        )

    # -- state -----------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def jetstream(self) -> Any:
        """nats-py's JetStream context for the configured ``domain``."""
        return self.client.jetstream(domain=self.config.domain)

    @property
    def reconnected(self) -> trio.Event:
        """Set at the next reconnect (then replaced by a new event)."""
        return self._reconnected

    async def wait_for_state(self, *states: str) -> None:
        """Wait until ``detail.state`` is one of ``states`` (at once if it is already)."""
        while self.status.detail["state"] not in states:
            await self._state_changed.wait()

    def set_state(self, state: str, problem: str | None = None) -> None:
        """Record the NATS state; log a problem once per change of reason. A problem that
        comes back within :data:`REPEAT_QUIET` seconds of its last line (a stream that
        fills again while its reader drains it) is not logged again, nor is its end."""
        status = self.status
        detail = status.detail
        detail["state"] = state
        now = trio.current_time()
        if problem is not None:
            detail["last_error"] = problem
            status.record_error(problem)
            if problem != self._logged_problem:
                quiet = self._quiet_until.get(problem, -math.inf) > now
                self._logged_problem = problem
                if not quiet:
                    self.log.warning("%s", problem)
                self._quiet_until[problem] = now + REPEAT_QUIET
                if len(self._quiet_until) > 64:
                    self._quiet_until = {problem: now + REPEAT_QUIET}
        elif state in ("connected", "publishing", "subscribed"):
            if self._logged_problem is not None and (
                self._quiet_until.get(self._logged_problem, -math.inf) <= now
                or state == "connected"
            ):
                self.log.info("NATS %s again", state)
            self._logged_problem = None
        self._state_changed.set()
        self._state_changed = trio.Event()

    def count(self, key: str, increment: int = 1) -> None:
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
            self.set_state("connected")
        else:
            self.count("reconnects")
            self.log.info("reconnected to NATS at %s", url)
            self.set_state("connected")
            self._reconnected.set()
            self._reconnected = trio.Event()

    async def _watch_link(self) -> None:
        """Say when the server stops answering: a PING unanswered for :data:`STALE_AFTER`
        seconds (or half of ``ping_interval``) makes the state ``stale`` (one WARNING) until
        a PONG comes (one INFO) or nats-py, after ``max_outstanding_pings``, drops the
        connection (then it is ``reconnecting``, as for any loss)."""
        config = self.config
        after = max(STALE_AFTER, config.ping_interval / 2)
        unanswered_since: float | None = None
        stale_from: str | None = None  # the state the link was in before it went stale
        while True:
            await trio.sleep(LINK_CHECK)
            client = self.client
            if client is None or not self.connected:
                unanswered_since = None
                stale_from = None
                continue
            if pings_outstanding(client) == 0:
                unanswered_since = None
                if stale_from is not None:
                    self.status.state = "connected"
                    self.set_state(stale_from)  # logs that it is so again
                    stale_from = None
                continue
            now = trio.current_time()
            if unanswered_since is None:
                unanswered_since = now
            elif stale_from is None and now - unanswered_since >= after:
                stale_from = str(self.status.detail["state"])
                self.status.state = "stale"
                self.set_state(
                    "stale",
                    f"NATS at {self.status.detail['server']} has not answered for "
                    f"{now - unanswered_since + LINK_CHECK:.0f} s: the link may be down (the "
                    f"connection is made again after {config.max_outstanding_pings} unanswered "
                    f"pings, one every {config.ping_interval:g} s)",
                )

    def _on_disconnected(self) -> None:
        if self._connected.is_set() and not self._closing:
            if self.status.detail["state"] == "stale":
                self._lost_reason = self._lost_reason or "it stopped answering (stale link)"
            self._connected = trio.Event()
            self.status.state = "reconnecting"
            if self._lost_reason is not None and "unexpected eof" in self._lost_reason.lower():
                # The server closed the connection without a word: it does so to a client
                # more than its max_pending (64 MiB by default) behind (a slow consumer),
                # and when it stops.
                self.count("closed_by_server")
                self._lost_reason = (
                    "the server closed the connection (as it does when it stops, or to a "
                    "core subscriber more than its max_pending, 64 MiB by default, behind: "
                    "what was queued for it is lost; see flow_control)"
                )
            reason = f": {self._lost_reason}" if self._lost_reason else ""
            problem = f"disconnected from NATS at {self.status.detail['server']}{reason}"
            self._lost_reason = None
            self.set_state("disconnected", problem)

    def _on_error(self, text: str, slow_consumer: bool, refused: bool) -> None:
        detail = self.status.detail
        if slow_consumer:
            self.count("slow_consumer_events")
            self.set_state(str(detail["state"]), f"NATS: slow consumer ({text})")
            return
        self.count("connect_errors")
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
        self.set_state(state, f"NATS at {where}: {text}")

    # -- running ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        require_nats()
        options = self._connect_options()
        thread = self._thread = NatsThread(self.name)
        thread.start()
        publisher: NatsPublisher | None = None
        self._watch = None
        try:
            self.status.state = "connecting"
            self.set_state("connecting")
            await self._start_client(thread, options)
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._stop_when_requested, nursery.cancel_scope)
                nursery.start_soon(self._watch_link)
                if self.outbox is not None:
                    self.outbox.start()
                    nursery.start_soon(self.outbox.run)
                    publisher = self._publisher = NatsPublisher(self, thread)
                    task_status.started()
                    await publisher.run()
                    # Stopping: a disk buffer's intake first puts what the subscription
                    # holds into it (within the grace period).
                    await self.outbox.finished.wait()
                else:
                    task_status.started()
                    await NatsSubscriber(self, thread).run()
                nursery.cancel_scope.cancel()
        finally:
            self._publisher = None
            if self.outbox is not None:
                self.outbox.close("the NATS endpoint stopped")
            with trio.CancelScope(shield=True):
                await self._close_client(thread)
                await thread.stop()
            self._connected = trio.Event()
            self.status.detail["state"] = "closed"

    async def _stop_when_requested(self, cancel_scope: trio.CancelScope) -> None:
        """A stop request ends the outgoing queue (publish: drain it, then return), lets a
        JetStream reader finish the batch in hand (published and acknowledged; the fetch asked
        for meanwhile is given up, and what it was sent is read again on the next start, see
        ``NatsSubscriber._fill_gap``), or stops the endpoint at once (never connected; core
        subscribe; a reader waiting for a fetch, the connection or a backoff)."""
        await self._stop_requested.wait()
        outbox = self.outbox
        if outbox is not None and outbox.is_disk:
            # The disk buffer keeps what waits; what is in flight is acknowledged first.
            outbox.stop("the NATS endpoint is stopping")
            if self._publisher is not None and self._ever_connected:
                self._publisher.stop_taking()
            else:
                await outbox.finished.wait()
                cancel_scope.cancel()
        elif outbox is not None and self._ever_connected:
            # What is queued goes out while the grace period lasts.
            outbox.stop("the NATS endpoint is stopping")
        elif self.batch_in_hand:
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
            "ping_interval": config.ping_interval,
            "max_outstanding_pings": config.max_outstanding_pings,
            "pending_size": max(2 << 20, config.chunk_size + (1 << 20)),
        }
        if config.tls is not None:
            context: ssl.SSLContext = client_tls_context(config.tls)
            options["tls"] = context
            if config.tls.server_name is not None:
                options["tls_hostname"] = config.tls.server_name
        for key in ("password_file", "token_file"):
            if getattr(config, key) is not None:  # the daemon reads them: with_secrets
                raise ValueError(f"{key} was not read (framewire.daemon.credentials)")
        if config.user is not None:
            options["user"] = config.user
            options["password"] = config.password or ""
        if config.token is not None:
            options["token"] = config.token
        for path in (config.nkey_seed, config.creds):
            if path is not None and not os.access(path, os.R_OK):
                raise OSError(f"cannot read {path}")
        if (config.nkey_seed or config.creds) and not nkeys_installed():
            raise ValueError(NKEYS_MISSING)
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
        client = self.client = nats.aio.client.Client()
        backoff = Backoff(self.config.reconnect)
        to_trio = thread.to_trio

        async def error_cb(error: Exception) -> None:
            if client.is_reconnecting or client.is_connecting:
                # A connection attempt that failed: nats-py goes on to the next without
                # closing its socket (left to the garbage collector, which warns).
                _close_socket(client)
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
        client = self.client
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
        self.set_state("error", f"cannot connect to NATS: {text}")
        self._connected.set()  # wakes the waiters, who raise

    async def wait_connected(self) -> None:
        """Wait for the connection. Raises ConnectionError when nats-py gave up connecting
        (not for an unreachable server: it tries again forever), so the supervisor restarts
        the endpoint."""
        await self._connected.wait()
        if self._connect_failure is not None:
            raise ConnectionError(f"cannot connect to NATS: {self._connect_failure}")

    async def ensure_streams(self, thread: NatsThread, *, required: bool) -> bool:
        """Create or check the JetStream streams, retrying with backoff while it fails when
        ``required``; without it (core mode) a failure is logged and False returned."""
        backoff = Backoff(self.config.reconnect)
        while True:
            await self.wait_connected()
            try:
                done = await thread.call(
                    functools.partial(ensure_streams, self.jetstream(), self.layout),
                    within=self.config.connect_timeout,
                )
            except MissingStream as exc:
                problem = str(exc)
                state = "stream_missing"
            except Exception as exc:
                problem = f"JetStream streams {self.layout.stream}: {describe_nats_error(exc)}"
                state = "jetstream_unavailable"
            else:
                for line in done.done:
                    self.log.info("%s", line)
                if self._watch is None and self.config.mode == "jetstream":
                    assert self._nursery is not None
                    self._watch = StreamWatch(self, thread)
                    self._nursery.start_soon(self._watch.run)
                if done.differences:
                    self.log.warning(
                        "JetStream stream %s is kept as its publisher made it: %s; a reader "
                        "never changes a stream's settings",
                        self.layout.stream,
                        "; ".join(done.differences),
                    )
                return True
            if not required:
                self.log.info(
                    "%s: late joiners on other machines get metadata only as it is published",
                    problem,
                )
                return False
            self.set_state(state, problem)
            await trio.sleep(backoff.next_delay())

    # -- for the publisher and subscriber --------------------------------------------------

    def _subscribe(self) -> Subscription:
        config = self.config
        return self.context.streams.get(config.stream).subscribe(
            bounds=QueueBounds(config.max_queue_frames, config.queue_bytes),
            policy=Policy(config.queue_policy),
            label=f"nats {self.name} -> {config.subject_prefix}",
            owner=self.name,
        )

    def message_limit(self) -> int:
        """The largest message (headers and payload) to publish: a frame whose payload is at
        most ``chunk_size`` goes whole (its headers ride in the margin), as the docs say."""
        limit = min(self._max_payload - PAYLOAD_MARGIN, self.config.chunk_size + PAYLOAD_MARGIN)
        return max(limit, 4096)


def _close_socket(client: Any) -> None:
    """Close nats-py's socket if it is still open: a client whose connect was cancelled
    half-way, or whose close did not finish, would otherwise leave an asyncio transport open
    when its loop stops (a ResourceWarning when it is collected). Runs on the client's loop.
    """
    transport = getattr(client, "_transport", None)  # nats-py keeps no public handle on it
    if transport is not None:
        with contextlib.suppress(Exception):
            transport.close()


def _is_connection_loss(text: str) -> bool:
    lowered = text.lower()
    return "reset" in lowered or "eof" in lowered or "broken pipe" in lowered


def _url(client: Any) -> str:
    url = client.connected_url
    if url is None:
        return "?"
    return f"{url.scheme}://{url.hostname}:{url.port}"
