"""Reading NATS into a framewire stream: :class:`NatsSubscriber`, core (live, lossy) and
JetStream (durable, through a pull consumer).

The endpoint (:class:`~framewire.daemon.endpoints.nats.NatsEndpoint`) owns the connection and
the state; the subscriber turns messages into frames (:class:`~framewire.protocols.nats.
FrameAssembler`) and publishes them into the endpoint's stream.
"""

from __future__ import annotations

import contextlib
import functools
import re
import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import trio

from ...frame import Frame
from ...protocols.nats import (
    HEADER_FLOW,
    HEADER_KIND,
    HEADER_RANK,
    FrameAssembler,
    NotAFrame,
)
from ..backoff import Backoff
from ..stream import MetadataLimitExceeded, Subscription
from ._jetstream import ReaderMarks, read_last_metadata, read_stream_range
from ._publisher import FLOW_SUBJECT
from ._thread import Inbox, NatsThread, PendingCall, describe_nats_error, require_nats

if TYPE_CHECKING:
    from ..endpoints.nats import NatsEndpoint

__all__ = ["NatsSubscriber"]

#: Seconds one pull (fetch) waits for messages before asking again.
FETCH_WAIT: Final = 1.0
#: Seconds between two tries to open the readers' bucket after one failed.
MARKS_RETRY: Final = 30.0
#: Messages one pull asks for at most.
MAX_FETCH: Final = 1024

_Message = tuple[str, "dict[str, str] | None", bytes]
#: ``Fw-Flow: PRODUCER:BYTES``, as a publisher with ``flow_control`` marks its batches.
_FLOW_MARK: Final = re.compile(r"([0-9a-f]{1,32}):([0-9]{1,20})")


class NatsSubscriber:
    """Reads the endpoint's subjects and publishes the frames into its stream: in core mode
    from a plain subscription drained at once into a bounded :class:`~._thread.Inbox`, in
    JetStream mode from a pull consumer, acknowledging what the stream's lossless
    subscribers have handled."""

    def __init__(self, endpoint: NatsEndpoint, thread: NatsThread) -> None:
        self.endpoint = endpoint
        self.thread = thread
        self.config = endpoint.config
        self.assembler = FrameAssembler(endpoint.config.max_frame_size)
        #: What each publisher's messages and frames were, to drop what the server stored
        #: twice and count what it lost (JetStream). The endpoint's, so it outlives a
        #: restart of the endpoint: what it handled before a crash is known even when the
        #: crash came before it could be kept in the readers' bucket.
        self.sequences = endpoint.reader_sequences
        self._marks: ReaderMarks | None = None
        #: When to try opening the bucket again, after a failure (None: no need).
        self._marks_retry_at: float | None = None
        self._lost = _UpstreamLoss(endpoint)

    async def run(self) -> None:
        """Read until cancelled (or, in JetStream mode, until a stop request is honoured)."""
        if self.config.mode == "core":
            await self._core(self.thread)
        else:
            await self._jetstream(self.thread)

    def _decode(self, messages: Sequence[_Message]) -> list[Frame]:
        """Frames from messages (chunks reassembled); bad messages counted and dropped."""
        frames = []
        assembler = self.assembler
        for subject, headers, payload in messages:
            try:
                frames += assembler.feed_all(subject, headers, payload)
            except NotAFrame as exc:
                self.endpoint.rejected(str(exc))
        detail = self.endpoint.status.detail
        detail["packs_unpacked"] = assembler.packs_unpacked
        detail["chunks_reassembled"] = assembler.chunks_reassembled
        detail["frames_incomplete"] = assembler.frames_incomplete
        return frames

    def _not_in_stream(self, metadata: list[Frame]) -> list[Frame]:
        """Of the metadata current where reading starts, what the stream does not already
        hold as its latest of that type. After a restart of this endpoint (a crash, a
        reload) the stream has it from the run before, and its live subscribers must not
        be given it a second time."""
        stream = self.endpoint.context.streams.get(self.config.stream)
        return [frame for frame in metadata if stream.metadata.get(frame.type) != frame]

    def _stream_lossless_marks(self) -> list[tuple[Subscription, int]]:
        """The stream's lossless subscriptions, each with how many frames it has been given
        (see :meth:`Subscription.wait_handled`)."""
        stream = self.endpoint.context.streams.get(self.config.stream)
        return [(subscription, subscription.handled_mark()) for subscription in stream.lossless]

    async def _publish_frames(self, frames: list[Frame]) -> None:
        if not frames:
            return
        status = self.endpoint.status
        status.frames_in += len(frames)
        status.bytes_in += sum(frame.size for frame in frames)
        stream = self.endpoint.context.streams.get(self.config.stream)
        while frames:
            try:
                await stream.publish(frames)
            except MetadataLimitExceeded as exc:
                # Only the refused frame is dropped: the rest of the batch goes on (a NATS
                # publisher cannot be refused as a producer on a socket can).
                self.endpoint.metadata_refused(exc.reason)
                frames = frames[exc.index + 1 :]
            else:
                return

    async def _last_metadata(self, thread: NatsThread, before: int | None = None) -> list[_Message]:
        """The latest metadata of each type from the last-value stream, in first-seen order
        (``Fw-Rank``); with ``before``, only what was stored before that stream sequence.
        Empty (after a log line) when it cannot be read."""
        try:
            raw = await thread.call(
                lambda: read_last_metadata(self.endpoint.jetstream(), self.endpoint.layout),
                within=self.config.connect_timeout,
            )
        except Exception as exc:
            self.endpoint.log.info(
                "no metadata from %s: %s",
                self.endpoint.layout.meta_stream,
                describe_nats_error(exc),
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

    async def _core(self, thread: NatsThread) -> None:
        config = self.config
        inbox: Inbox[_Message] = Inbox(
            thread, max_items=config.max_queue_frames, max_bytes=config.max_queue_bytes
        )
        await self.endpoint.wait_connected()
        client = self.endpoint.client

        reader = secrets.token_hex(6).encode()

        async def on_message(msg: Any) -> None:
            headers = msg.headers
            metadata = bool(headers) and headers.get(HEADER_KIND) == "metadata"
            inbox.put((msg.subject, headers, msg.data), len(msg.data), droppable=not metadata)

        async def say_read(marks: dict[str, bytes]) -> None:
            for producer, read in marks.items():
                with contextlib.suppress(Exception):
                    await client.publish(f"{FLOW_SUBJECT}.{producer}", reader + b" " + read)

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
            self.endpoint.set_state("subscribed")
            while True:
                messages = await inbox.take()
                self.endpoint.status.frames_dropped = inbox.dropped
                await self._publish_frames(self._decode(messages))
                marks = _flow_marks(messages)
                if marks:
                    # Publishers with flow_control: what they sent up to these marks is in
                    # the stream now (its lossless subscribers have it queued).
                    thread.submit(say_read(marks)).add_done_callback(_retrieve)

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
            reconnected = self.endpoint.reconnected
            inbox.hold()
            metadata = await self._last_metadata(thread)
            inbox.release(((message, len(message[2])) for message in metadata), same=_same_frame)
            task_status.started()
            task_status = trio.TASK_STATUS_IGNORED
            await reconnected.wait()

    async def _jetstream(self, thread: NatsThread) -> None:
        config = self.config
        nats = require_nats()
        api = nats.js.api
        await self.endpoint.ensure_streams(thread, required=True)
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

        async def open_consumer() -> tuple[Any, int, int]:
            js = self.endpoint.jetstream()
            subscription = await js.pull_subscribe(
                f"{config.subject_prefix}.>",
                durable=config.durable or None,
                stream=self.endpoint.layout.stream,
                config=consumer,
                pending_bytes_limit=max(256 << 20, 4 * config.chunk_size),
            )
            info = await subscription.consumer_info()
            stream_info = await js.stream_info(self.endpoint.layout.stream)
            return subscription, info.ack_floor.stream_seq, stream_info.state.first_seq

        backoff = Backoff(config.reconnect)
        while True:
            try:
                pull, floor, first = await thread.call(open_consumer, within=config.connect_timeout)
                break
            except Exception as exc:
                self.endpoint.set_state(
                    "consumer_unavailable",
                    f"JetStream consumer on {self.endpoint.layout.stream}: "
                    f"{describe_nats_error(exc)}",
                )
                await trio.sleep(backoff.next_delay())
                await self.endpoint.wait_connected()
        start = max(floor + 1, first)
        await self._open_marks(thread, floor)
        self.endpoint.set_state("subscribed")
        self.endpoint.log.info(
            "reading JetStream stream %s from sequence %d%s",
            self.endpoint.layout.stream,
            start,
            f" (durable consumer {config.durable})" if config.durable else "",
        )
        if floor and first > floor + 1:
            # Read up to ``floor`` before; the stream discarded what came next meanwhile
            # (logged with the frames this costs, once the first batch shows them).
            self._lost.messages(floor + 1, first - 1)
        await self._publish_frames(
            self._not_in_stream(self._decode(await self._last_metadata(thread, start)))
        )
        last_sequence = start - 1
        # Messages asked for per fetch: half of max_queue_bytes over the largest message of
        # the last fetch (at first, the largest a message can be), at most half of
        # max_queue_frames: two batches are held at once, the one being published and the
        # next one, fetched meanwhile.
        largest = self.endpoint.message_limit()
        detail = self.endpoint.status.detail

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
                if self.endpoint.stop_requested:
                    return
                if ahead is None:
                    ahead = fetch()
                try:
                    batch = await ahead.result()
                except Exception as exc:
                    if not isinstance(exc, TimeoutError) and not _is_fetch_timeout(exc):
                        self.endpoint.set_state(
                            "error", f"JetStream fetch: {describe_nats_error(exc)}"
                        )
                        await trio.sleep(backoff.next_delay())
                        await self.endpoint.wait_connected()
                    continue
                finally:
                    ahead = None
                self.endpoint.batch_in_hand = True
                if detail["state"] != "subscribed":
                    self.endpoint.set_state("subscribed")
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
                self.endpoint.count("redeliveries_dropped", redelivered)
                for gap, messages in runs:
                    if gap is not None:
                        first, last = gap
                        # The consumer cannot have more than max_ack_pending messages sent
                        # and not acknowledged: anything before those left the stream.
                        read_from = max(first, last - self._max_ack_pending() + 1)
                        if read_from > first and self.endpoint.layout.create:
                            # Never read (the stream made here holds only these subjects).
                            self._lost.messages(first, read_from - 1)
                        await self._fill_gap(thread, read_from, last)
                    # In stream order, after the gap's messages: what the server stored twice
                    # is dropped here, and frames missing before are counted lost.
                    kept = [message for message in messages if self._is_new(message[1])]
                    await self._publish_frames(self._decode(kept))
                self._lost.report()
                # Acknowledged means kept: wait until every lossless subscriber (a recorder,
                # a sender to the pipeline) has handled what it was given, so that a crash
                # of this daemon loses nothing JetStream no longer holds for it. (The next
                # batch is being fetched meanwhile.)
                for subscription, mark in self._stream_lossless_marks():
                    await subscription.wait_handled(mark)
                if not self.assembler.assembling:
                    ack_upto = batch[-1] if batch else None
                else:
                    # Acknowledge up to the message before the frame still being assembled.
                    ack_upto = _before_partial(batch)
                detail["consumer_pending"] = batch[-1].metadata.num_pending if batch else 0
                if ack_upto is not None and not await self._save_marks(thread, ack_upto):
                    ack_upto = None  # the next acknowledgement covers this batch too
                if ack_upto is not None:
                    with trio.CancelScope(shield=True):
                        try:
                            await thread.call(ack_upto.ack, within=config.ack_timeout)
                        except Exception as exc:
                            self.endpoint.log.debug("ack failed (it will be redelivered): %s", exc)
                self.endpoint.batch_in_hand = False
        finally:
            self.endpoint.batch_in_hand = False
            if ahead is not None:
                ahead.cancel()

    def _is_new(self, headers: dict[str, str] | None) -> bool:
        """Whether a message from the stream is new: not a retry of a publish the server
        stored before (dropped, counted in ``duplicates_dropped``). Frames of its publisher
        that never came before it are counted lost."""
        check = self.sequences.check(headers)
        if check.duplicate:
            self.endpoint.count("duplicates_dropped")
            return False
        if check.lost:
            self._lost.frames(check.producer, check.first_lost, check.lost)
        return True

    async def _open_marks(self, thread: NatsThread, floor: int) -> None:
        """A durable reader: open where it keeps what it handled, and take that back (unless
        it is behind the acknowledged ``floor``: then every publisher starts afresh, nothing
        counted lost for it)."""
        config = self.config
        if not config.durable:
            return
        endpoint = self.endpoint
        layout = endpoint.layout
        try:
            marks = await thread.call(
                lambda: ReaderMarks.open(self.endpoint.jetstream(), layout, config.durable),
                within=config.connect_timeout,
            )
            record = await thread.call(marks.load, within=config.connect_timeout)
        except Exception as exc:
            endpoint.log.warning(
                "cannot keep what this reader handled in JetStream (bucket %s: %s; tried "
                "again every %g s): meanwhile, after a restart of this endpoint, a publish the "
                "server stored twice (retried after its duplicate_window) may be delivered "
                "twice",
                layout.readers_bucket,
                describe_nats_error(exc),
                MARKS_RETRY,
            )
            self._marks_retry_at = trio.current_time() + MARKS_RETRY
            return
        self._marks = marks
        if record is None:
            return
        if len(self.sequences):
            # This daemon ran the endpoint before (it restarted): what it knows is at least
            # as new as what it kept in the bucket.
            return
        sequence = record.get("stream_sequence")
        if not isinstance(sequence, int) or sequence < floor:
            endpoint.log.info(
                "what this reader handled (bucket %s) is older than its consumer's position "
                "(%d): every publisher starts afresh",
                layout.readers_bucket,
                floor,
            )
        elif not self.sequences.restore(record.get("producers")):
            endpoint.log.warning(
                "ignored what bucket %s says this reader handled: it is not what framewire "
                "writes there",
                layout.readers_bucket,
            )

    async def _save_marks(self, thread: NatsThread, upto: Any) -> bool:
        """Keep what was handled up to the message ``upto``, before it is acknowledged;
        whether that worked (if not, the acknowledgement waits for the next batch's)."""
        marks = self._marks
        if marks is None:
            marks = await self._reopen_marks(thread)
            if marks is None:
                return True
        save = functools.partial(
            marks.save, upto.metadata.sequence.stream, self.sequences.snapshot()
        )
        try:
            await thread.call(save, within=self.config.ack_timeout)
        except Exception as exc:
            self.endpoint.log.debug("keeping what was handled failed: %s", exc)
            return False
        return True

    async def _reopen_marks(self, thread: NatsThread) -> ReaderMarks | None:
        """After :meth:`_open_marks` failed: try again, at most every :data:`MARKS_RETRY`
        seconds (a server that was busy electing a leader answers later)."""
        if self._marks_retry_at is None or trio.current_time() < self._marks_retry_at:
            return None
        endpoint = self.endpoint
        layout = endpoint.layout
        durable = self.config.durable
        try:
            marks = await thread.call(
                lambda: ReaderMarks.open(endpoint.jetstream(), layout, durable),
                within=self.config.connect_timeout,
            )
        except Exception as exc:
            endpoint.log.debug("bucket %s still cannot be opened: %s", layout.readers_bucket, exc)
            self._marks_retry_at = trio.current_time() + MARKS_RETRY
            return None
        self._marks = marks
        self._marks_retry_at = None
        endpoint.log.info(
            "keeping what this reader handled in bucket %s now", layout.readers_bucket
        )
        return marks

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

        A read that fails (a stream electing a leader does not answer) sets the state
        ``error`` with the reason and is tried again after a backoff, from where it stopped;
        the batch in hand waits meanwhile. Raises what reading raises only when the endpoint
        is asked to stop (nothing is acknowledged: a later start reads it again).
        """
        config = self.config
        endpoint = self.endpoint
        found = 0
        sequence = first
        backoff = Backoff(config.reconnect)
        while sequence <= last:
            count = min(last - sequence + 1, MAX_FETCH)
            try:
                messages, missing = await thread.call(
                    functools.partial(
                        read_stream_range,
                        endpoint.jetstream(),
                        endpoint.layout.stream,
                        config.subject_prefix,
                        sequence,
                        count,
                    ),
                    within=config.ack_timeout + count * 0.01,
                )
            except Exception as exc:
                if endpoint.stop_requested:
                    raise
                endpoint.set_state(
                    "error",
                    f"reading {endpoint.layout.stream} (sequences {sequence} to "
                    f"{sequence + count - 1}, skipped by the consumer): "
                    f"{describe_nats_error(exc)}",
                )
                await trio.sleep(backoff.next_delay())
                await endpoint.wait_connected()
                continue
            if endpoint.status.detail["state"] != "subscribed":
                endpoint.set_state("subscribed")
            found += len(messages)
            endpoint.count("gap_messages_read", len(messages))
            if missing:
                self._lost.messages(sequence, sequence + count - 1, missing)
            kept = [message for message in messages if self._is_new(message[1])]
            await self._publish_frames(self._decode(kept))
            sequence += count
        if found:
            endpoint.log.info(
                "read %d messages of %s (sequences %d to %d) from the stream: the consumer had "
                "sent them before and they were never acknowledged",
                found,
                endpoint.layout.stream,
                first,
                last,
            )


class _UpstreamLoss:
    """Frames and messages lost upstream (discarded by the stream before they were read),
    counted at once and logged as one WARNING per batch (:meth:`report`)."""

    #: Gaps named in one log line; the rest are summed.
    MAX_NAMED: Final = 4

    def __init__(self, endpoint: NatsEndpoint) -> None:
        self.endpoint = endpoint
        self._frames: list[tuple[str, int, int]] = []
        self._messages: list[tuple[int, int, int]] = []

    def frames(self, producer: str, first: int, count: int) -> None:
        self.endpoint.count("frames_lost_upstream", count)
        self._frames.append((producer, first, count))

    def messages(self, first: int, last: int, count: int | None = None) -> None:
        """``count`` (default: all) messages between stream sequences ``first`` and ``last``
        were discarded before they were read."""
        count = last - first + 1 if count is None else count
        self.endpoint.count("messages_lost_upstream", count)
        self._messages.append((first, last, count))

    def report(self) -> None:
        if not self._frames and not self._messages:
            return
        stream = self.endpoint.layout.stream
        parts = [
            f"stream {stream} discarded {count} message{'s' if count > 1 else ''} "
            f"(sequences {first} to {last}) before they were read"
            for first, last, count in self._messages
        ]
        parts += [
            f"frames {first} to {first + count - 1} of publisher {producer} never came"
            for producer, first, count in self._frames
        ]
        named = "; ".join(parts[: self.MAX_NAMED])
        if len(parts) > self.MAX_NAMED:
            named += f"; {len(parts) - self.MAX_NAMED} more gaps"
        frames = sum(count for _, _, count in self._frames)
        # Frames are known only for publishers this reader had heard from before the gap.
        counted = f"{frames} frames; " if frames else ""
        self.endpoint.log.warning(
            "lost upstream: %s (%sthe stream's max_bytes, max_age or max_msgs discarded "
            "them while this reader was away or behind)",
            named,
            counted,
        )
        self._frames.clear()
        self._messages.clear()


def _flow_marks(messages: Sequence[_Message]) -> dict[str, bytes]:
    """The last ``Fw-Flow`` mark of each publisher in ``messages``: producer, bytes."""
    marks: dict[str, bytes] = {}
    for _, headers, _ in messages:
        mark = headers.get(HEADER_FLOW) if headers else None
        if mark is not None:
            match = _FLOW_MARK.fullmatch(mark)
            if match is not None:
                marks[match[1]] = match[2].encode()
    return marks


def _retrieve(future: Any) -> None:
    """Mark a finished call's outcome as seen (nothing to do with it)."""
    if not future.cancelled():
        future.exception()


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


def _is_fetch_timeout(error: BaseException) -> bool:
    return "timeout" in type(error).__name__.lower()
