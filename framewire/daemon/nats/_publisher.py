"""Publishing a framewire stream to NATS: :class:`NatsPublisher` (core and JetStream) and
:class:`JetStreamPublisher`, the acknowledged, pipelined JetStream path.

The endpoint (:class:`~framewire.daemon.endpoints.nats.NatsEndpoint`) owns the connection,
the state and the :class:`~framewire.daemon.outbox.Outbox` (in memory or on disk); a
publisher takes batches from it, lays them out as messages
(:class:`~framewire.protocols.nats.FramePacker`) and publishes them on the endpoint's
:class:`~._thread.NatsThread`. Frames are done (a disk buffer consumes them) when published
(core) or stored (JetStream: the acks of every message of their unit came back), in order.
"""

from __future__ import annotations

import functools
import re
import secrets
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from ...config import NatsConfig
from ...frame import FrameKind
from ...protocols.nats import (
    HEADER_EXPECTED_LAST_MSG_ID,
    HEADER_EXPECTED_LAST_SEQUENCE,
    HEADER_FLOW,
    HEADER_MSG_ID,
    FrameLayout,
    FramePacker,
    NatsMessage,
    PublishUnit,
)
from ..backoff import Backoff
from ..flow import BATCH_BYTES, BATCH_FRAMES
from ..outbox import Outbox, OutboxCutOff
from ..stream import MetadataCache
from ._jetstream import AckOutcome, AckTracker, refusal_kind
from ._thread import NatsThread, PendingCall

if TYPE_CHECKING:
    from ..endpoints.nats import NatsEndpoint

__all__ = ["JetStreamPublisher", "NatsPublisher"]

#: JetStream publishes awaiting their acks at most (besides ``max_inflight_bytes``).
MAX_INFLIGHT_MESSAGES: Final = 8192
#: A JetStream publish window holds at most ``max_inflight_bytes`` over this (or one
#: message), so that several are in flight and acks come back while later ones go out.
WINDOWS_IN_FLIGHT: Final = 4


#: ``flow_control``: bytes a publisher may be ahead of its slowest live reader.
FLOW_WINDOW: Final = 16 << 20
#: Seconds after its last word that a reader is no longer waited for.
FLOW_LIVE: Final = 2.0
#: Readers remembered at most (the least recently heard of goes first).
FLOW_READERS: Final = 1024
#: The subject prefix where readers say how far they have read a publisher
#: (``_FW.flow.PRODUCER``), outside every stream's subjects.
FLOW_SUBJECT: Final = "_FW.flow"
_FLOW_REPLY: Final = re.compile(rb"([0-9a-f]{1,32}) ([0-9]{1,20})")


class ReaderCredit:
    """Core ``flow_control``: how far each reader has read this publisher, from what the
    readers say (:data:`FLOW_SUBJECT`), and a wait for room (trio side).

    The publisher marks the last message of each batch with ``Fw-Flow: PRODUCER:BYTES``
    (the bytes it has published so far); a reader that gets a marked message says
    ``READER BYTES`` on ``_FW.flow.PRODUCER``. :meth:`room` waits while the publisher is
    more than :data:`FLOW_WINDOW` ahead of its slowest reader heard of in the last
    :data:`FLOW_LIVE` seconds (a reader gone silent is not waited for: it is cut off by the
    server, as without flow control).
    """

    def __init__(self) -> None:
        self.sent = 0
        self._readers: dict[str, tuple[int, float]] = {}
        self._changed = trio.Event()

    def heard(self, reply: bytes) -> None:
        """A reader's word (trio side). Garbage is ignored."""
        match = _FLOW_REPLY.fullmatch(reply)
        if match is None:
            return
        reader = match[1].decode()
        read = min(int(match[2]), self.sent)
        readers = self._readers
        before = readers.pop(reader, (0, 0.0))[0]
        readers[reader] = (max(before, read), trio.current_time())
        while len(readers) > FLOW_READERS:
            del readers[next(iter(readers))]
        self._changed.set()

    @property
    def readers(self) -> int:
        """Readers heard of in the last :data:`FLOW_LIVE` seconds."""
        now = trio.current_time()
        return sum(1 for _, heard in self._readers.values() if now - heard <= FLOW_LIVE)

    async def room(self, nbytes: int) -> bool:
        """Wait until ``nbytes`` more keep the publisher within the window of every live
        reader; whether it had to wait."""
        waited = False
        while True:
            now = trio.current_time()
            live = [read for read, heard in self._readers.values() if now - heard <= FLOW_LIVE]
            # (A batch bigger than the window goes once every reader has read all before.)
            if not live or self.sent - min(live) <= max(0, FLOW_WINDOW - nbytes):
                if not waited:
                    await trio.lowlevel.checkpoint()
                return waited
            waited = True
            with trio.move_on_after(FLOW_LIVE):
                await self._changed.wait()
            self._changed = trio.Event()


class NatsPublisher:
    """Takes batches from the endpoint's outgoing queue and publishes them: without acks in
    core mode (paced by flushes; data nats-py cannot take is dropped and counted, metadata
    waits and is said again after every reconnect), through a :class:`JetStreamPublisher`
    in JetStream mode (nothing dropped; the queue back-pressures the stream)."""

    def __init__(self, endpoint: NatsEndpoint, thread: NatsThread) -> None:
        self.endpoint = endpoint
        self.thread = thread
        self.config = endpoint.config
        #: Data frames nats-py could not take (core, while disconnected), dropped.
        self.unsent = 0
        #: Core publish: bytes published since the last flush (a PING/PONG round trip).
        self._unflushed = [0]
        #: Core publish with ``flow_control``: how far the readers have read.
        self.credit: ReaderCredit | None = None
        self._sent_metadata = MetadataCache()
        outbox = endpoint.outbox
        assert outbox is not None, "a publishing endpoint has an outbox"
        self.outbox: Outbox = outbox
        self._stopping = False
        self._taking = trio.CancelScope()

    async def _listen_to_readers(self, producer: str) -> None:
        """Core ``flow_control``: hear the readers on ``_FW.flow.PRODUCER``."""
        credit = self.credit = ReaderCredit()
        client = self.endpoint.client
        to_trio = self.thread.to_trio

        async def on_reply(msg: Any) -> None:
            to_trio(credit.heard, bytes(msg.data[:64]))

        async def listen() -> None:
            await client.subscribe(f"{FLOW_SUBJECT}.{producer}", cb=on_reply)

        await self.thread.call(listen, within=self.config.connect_timeout)

    def report_queue(self) -> None:
        """Queue figures in status (``frames_dropped`` counts what nats-py could not take)."""
        self.outbox.report()

    def _unsent(self, frames: int) -> None:
        """``frames`` DATA frames nats-py could not take were dropped."""
        self.unsent += frames
        self.outbox.dropped_after_taking += frames

    def stop_taking(self) -> None:
        """Take nothing more from the outbox: collect the acks of what is in flight, then
        return (a disk buffer keeps the rest for the next start)."""
        self._stopping = True
        self._taking.cancel()

    async def run(self) -> None:
        """Publish the outbox until it ends gracefully, or :meth:`stop_taking`."""
        endpoint = self.endpoint
        thread = self.thread
        config = self.config
        jetstream = config.mode == "jetstream"
        await endpoint.wait_connected()
        acked: JetStreamPublisher | None = None
        if jetstream:
            await endpoint.ensure_streams(thread, required=True)
            client = endpoint.client
            tracker = await thread.call(
                lambda: AckTracker.open(client), within=config.connect_timeout
            )
            acked = JetStreamPublisher(endpoint, thread, tracker)
            acked.on_stored = self.outbox.done
            await acked.refresh_tail()
        elif config.create:
            await endpoint.ensure_streams(thread, required=False)
        producer = secrets.token_hex(6)
        if not jetstream and config.flow_control:
            await self._listen_to_readers(producer)
        endpoint.set_state("publishing")
        layout = FrameLayout(config.subject_prefix, producer, msg_ids=jetstream)
        self._producer = producer
        packer = FramePacker(layout, max_frames=config.pack_frames, max_bytes=config.pack_bytes)
        status = endpoint.status
        reconnected = endpoint.reconnected
        outbox = self.outbox
        while True:
            self.report_queue()
            if acked is not None:
                await self._done(acked)
                if acked.windows and (self._stopping or not _backlog(outbox, config)):
                    # Less than a batch waiting: collect the acks of the oldest window first
                    # (and let the outbox gather a batch meanwhile) rather than publish a
                    # small window now; windows go out back to back only while a backlog
                    # lasts.
                    await acked.settle_oldest()
                    continue
            if self._stopping:
                return
            batch = None
            with trio.CancelScope() as self._taking:  # stop_taking() cancels it
                try:
                    batch = await outbox.take(BATCH_FRAMES, BATCH_BYTES)
                except OutboxCutOff as cut:
                    endpoint.log.warning("the outgoing queue was closed: %s", cut)
                    outbox.resubscribe()
                    continue
            if batch is None:
                if self._stopping or endpoint.stop_requested:
                    if acked is not None:
                        await acked.settle_all()
                        await self._done(acked)
                    return
                continue
            taken = len(batch)
            if not jetstream and reconnected.is_set():
                # Core NATS keeps nothing: after a reconnect, say the metadata again first.
                reconnected = endpoint.reconnected
                batch = [*self._sent_metadata, *batch]
            units = packer.units(batch, endpoint.message_limit(), endpoint.unencodable)
            if acked is not None:
                left_out = len(batch) - sum(len(unit.frames) for unit in units)
                await acked.submit(units, left_out=left_out)
            else:
                await self._publish_core(units)
                await outbox.done(taken)
            status.detail["packs_published"] = packer.packs
            for unit in units:
                if unit.kind is not FrameKind.DATA:
                    self._sent_metadata.update(unit.frames[0])

    async def _done(self, acked: JetStreamPublisher) -> None:
        """The frames stored since the last call are done, in order."""
        await acked.report_stored()

    async def _publish_core(self, frames: list[PublishUnit]) -> None:
        """Publish without acks, paced by a flush (a round trip to the server) every
        ``max_inflight_bytes``. Data that nats-py cannot take (disconnected, its buffer full)
        is dropped and counted; metadata waits for the connection and is tried again."""
        endpoint = self.endpoint
        thread = self.thread
        status = endpoint.status
        client = endpoint.client
        unflushed = self._unflushed  # touched on the asyncio thread only
        pace = self.config.max_inflight_bytes
        flush_timeout = self.config.ack_timeout
        start = 0
        credit = self.credit
        while start < len(frames):
            todo = frames[start:]
            if credit is not None and todo:
                nbytes = sum(message.size for unit in todo for message in unit.messages)
                if await credit.room(nbytes):
                    endpoint.count("flow_waits")
                endpoint.status.detail["flow_readers"] = credit.readers
                credit.sent += nbytes
                last = todo[-1].messages[-1]
                last.headers[HEADER_FLOW] = f"{self._producer}:{credit.sent}"

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
                endpoint.set_state("error", f"NATS publish: {exc}")
                self._unsent(sum(len(u.frames) for u in todo if u.kind is FrameKind.DATA))
                frames = [unit for unit in todo if unit.kind is not FrameKind.DATA]
                start = 0
                await endpoint.wait_connected()
                continue
            for unit, sent in zip(todo, went, strict=False):
                if sent:
                    status.frames_out += len(unit.frames)
                    status.bytes_out += unit.nbytes
                else:
                    self._unsent(len(unit.frames))
            start += len(went)
            if start < len(frames):
                # A metadata frame could not go: wait for the connection, then go on.
                await endpoint.wait_connected()
                await trio.sleep(0.01)


@attrs.define
class _Window:
    """Messages published together whose acks are awaited together."""

    messages: list[NatsMessage]
    nbytes: int
    acks: PendingCall[list[AckOutcome]]


@attrs.define
class _Unconfirmed:
    """A unit some of whose messages are not known to be stored yet, or (``unit`` None)
    frames that were never published (unencodable) and are done with what went before."""

    unit: PublishUnit | None
    messages_left: int
    frames: int


class JetStreamPublisher:
    """JetStream publishing with acks, pipelined: windows of messages (each at most a
    :data:`WINDOWS_IN_FLIGHT` th of ``max_inflight_bytes``, or one message) are published one
    after another without waiting for the acks of those before, as long as the windows
    awaiting acks hold at most ``max_inflight_bytes`` (and :data:`MAX_INFLIGHT_MESSAGES`
    messages); the acks are collected in order, oldest window first.

    Order and exactly-once storage hold as without pipelining. The windows reach the server
    in order, each whole (one writer: :class:`~._jetstream.AckTracker`), and every message
    names what it must follow, so when one is refused the server refuses every one after it,
    in its window and in the windows after it, instead of storing them ahead of it. In a
    replicated stream, that is the stream sequence (``Nats-Expected-Last-Sequence``: the
    stream's last sequence when the publisher started or last retried, plus one for each
    message published since that was not a duplicate), which the stream's leader checks
    before anything is proposed to the replicas. (``Nats-Expected-Last-Msg-Id`` is checked
    by nats-server 2.14 and later only when each replica applies the message, and a mismatch
    there stops the stream on every replica for good: never used on a replicated stream.)
    On one server it is the id of the message before (``Nats-Expected-Last-Msg-Id``, the
    first after a moment with nothing awaiting acks names none), which also keeps each
    publisher's order when several write to one stream; a replicated stream keeps it for
    one publisher only. On a refusal (or a missing ack)
    every window still awaiting acks is collected, the stream's last sequence is asked
    again, and the messages from the first one not stored onwards are published again with
    the same ``Nats-Msg-Id`` (a message that was stored after all is answered "duplicate"),
    one at a time after a backoff until one is stored, then in windows again, before
    anything new. Another publisher writing to the same stream makes a message's expected
    sequence wrong: it is tried again at once (``detail.order_retries``).

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
        #: Frames whose units are stored, not yet reported done (:meth:`report_stored`).
        self.stored_frames = 0
        #: Told how many more frames are stored, in order (the outbox's ``done``), each time
        #: acks were collected: what was stored before a stop is never published again.
        self.on_stored: Callable[[int], Awaitable[None]] | None = None
        #: The stream sequence the last message published is to get (None: not known, so
        #: messages name none until it is asked again).
        self._tail: int | None = None
        #: Whether the stream is replicated: messages then name the sequence they follow
        #: (checked before anything is stored); on one server, the id of the message before
        #: them (which keeps each publisher's order when several write to the stream).
        self._replicated = self.config.replicas > 1
        #: The id of the last message published (one server).
        self._last_id: str | None = None
        self._backoff = Backoff(self.config.reconnect)

    async def refresh_tail(self) -> bool:
        """Ask the stream for its last sequence (nothing of ours may be in flight); whether
        it answered (if not, messages name no sequence until it does)."""
        endpoint = self.endpoint
        stream = endpoint.layout.stream
        try:
            info = await self.thread.call(
                lambda: endpoint.jetstream().stream_info(stream),
                within=self.config.connect_timeout,
            )
        except Exception as exc:
            endpoint.log.debug("asking %s for its last sequence: %s", stream, exc)
            self._tail = None
            return False
        self._tail = int(info.state.last_seq)
        self._replicated = int(info.config.num_replicas or 1) > 1
        return True

    def _settled(self, outcomes: Sequence[AckOutcome]) -> None:
        """A stored message answered "duplicate" took no new sequence: the ones published
        after it are to get one less."""
        if self._tail is not None:
            self._tail -= sum(1 for outcome in outcomes if outcome.ok and outcome.duplicate)

    async def submit(self, units: Sequence[PublishUnit], *, left_out: int = 0) -> None:
        """Publish the messages of ``units`` after those submitted before, waiting for acks
        of earlier windows as far as the bounds need (retrying refused messages there).
        ``left_out``: frames of the batch no unit carries (unencodable), done in their turn.
        """
        for unit in units:
            self._unconfirmed.append(_Unconfirmed(unit, len(unit.messages), len(unit.frames)))
        if left_out:
            if self._unconfirmed:
                self._unconfirmed.append(_Unconfirmed(None, 0, left_out))
            else:
                self.stored_frames += left_out
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
        """Publish a window now (behind what awaits acks); its acks are collected later."""
        tail = self._tail if self._replicated else None
        previous = self._last_id if self.windows and not self._replicated else None
        for message in messages:
            headers = message.headers
            headers.pop(HEADER_EXPECTED_LAST_SEQUENCE, None)
            headers.pop(HEADER_EXPECTED_LAST_MSG_ID, None)
            if tail is not None:
                headers[HEADER_EXPECTED_LAST_SEQUENCE] = str(tail)
                tail += 1
            elif previous is not None:
                headers[HEADER_EXPECTED_LAST_MSG_ID] = previous
            if not self._replicated:
                previous = headers.get(HEADER_MSG_ID)
        if self._replicated:
            self._tail = tail
        else:
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

    async def report_stored(self) -> None:
        """Tell :attr:`on_stored` the frames stored since the last call."""
        count, self.stored_frames = self.stored_frames, 0
        if count and self.on_stored is not None:
            await self.on_stored(count)

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
        self._settled(outcomes)
        good = _stored_prefix(outcomes)
        self._confirm(good)
        await self.report_stored()
        if good == len(window.messages):
            endpoint = self.endpoint
            if endpoint.status.detail["state"] != "publishing":
                endpoint.set_state("publishing")
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
            if refusal is not None and self._refused(refusal, messages[stored]):
                one_at_a_time = True
                await trio.sleep(self._backoff.next_delay())
                await endpoint.wait_connected()
            refusal = None
            if not await self.refresh_tail():
                # The stream does not answer (no leader yet): wait, as for a refusal.
                one_at_a_time = True
                await trio.sleep(self._backoff.next_delay())
                await endpoint.wait_connected()
                continue
            window: list[NatsMessage] = []
            nbytes = 0
            for message in messages[stored:]:
                if window and (one_at_a_time or nbytes + message.size > config.max_inflight_bytes):
                    break
                window.append(message)
                nbytes += message.size
            self._start(window, nbytes)
            outcomes = await self._outcomes(self.windows[0])
            self._settled(outcomes)
            good = _stored_prefix(outcomes)
            stored += good
            self._confirm(good)
            await self.report_stored()
            if good == len(window):
                one_at_a_time = False
            else:
                refusal = outcomes[good] if good < len(outcomes) else AckOutcome(False)
        if detail["state"] != "publishing":
            endpoint.set_state("publishing")
        self._backoff.reset()

    def _refused(self, failed: AckOutcome, message: NatsMessage) -> bool:
        """Record a refused JetStream publish; whether to back off before trying again (an
        ``out_of_order`` refusal is retried at once: its predecessor was stored, yet the
        stream's last sequence is not the one it named, because another publisher's message
        came between)."""
        if refusal_kind(failed) == "out_of_order":
            self.endpoint.count("order_retries")
            return False
        self.endpoint.count("publishes_refused")
        state, problem = _describe_refusal(failed, self.config, message)
        self.endpoint.set_state(state, problem)
        return True

    def _confirm(self, count: int) -> None:
        """``count`` more messages are stored, in order: count the units they complete."""
        status = self.endpoint.status
        unconfirmed = self._unconfirmed
        while count:
            first = unconfirmed[0]
            taken = min(count, first.messages_left)
            first.messages_left -= taken
            count -= taken
            while unconfirmed and not unconfirmed[0].messages_left:
                done = unconfirmed.popleft()
                self.stored_frames += done.frames
                if done.unit is not None:
                    status.frames_out += done.frames
                    status.bytes_out += done.unit.nbytes

    def _report(self) -> None:
        detail = self.endpoint.status.detail
        detail["inflight_bytes"] = self.inflight_bytes
        detail["acks_pending"] = self.inflight_messages


def _backlog(outbox: Outbox, config: NatsConfig) -> bool:
    """Whether ``outbox`` holds a full batch (as much as one take takes), or half of what
    its bounds let it hold, beyond what was taken."""
    frames, nbytes = outbox.waiting()
    return frames >= min(BATCH_FRAMES, config.max_queue_frames // 2) or nbytes >= min(
        BATCH_BYTES, config.queue_bytes // 2
    )


def _stored_prefix(outcomes: Sequence[AckOutcome]) -> int:
    """How many outcomes, from the first, say stored."""
    good = 0
    for outcome in outcomes:
        if not outcome.ok:
            break
        good += 1
    return good


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
