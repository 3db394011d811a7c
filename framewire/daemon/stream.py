"""Streams and subscriptions: publish/subscribe inside the daemon.

A :class:`Stream` is a named channel. Endpoints publish frames into it and subscribe to it.
It keeps the latest METADATA frame of each type (its :class:`MetadataCache`) and replays those
frames, in the order their types were first seen, to every new subscriber before live frames.

Each :class:`Subscription` is one subscriber's bounded queue plus its policy:

``lossy``
    Publishing never waits. When the queue is at its bound (frames or bytes), the *oldest*
    queued DATA frames are dropped to make room for the new one: a monitor wants the present,
    not a backlog. METADATA frames are never dropped; if queued metadata alone passes the
    subscription's hard cap the subscription is closed, with a reason, instead.
``lossless``
    The publisher waits until the queue has room (back-pressure). Nothing is dropped.
    While a publish waits for room in a lossless queue, the whole stream is *held* by that
    subscription's :attr:`~Subscription.owner` (its endpoint): :attr:`Stream.held_by` names
    the holders, :attr:`Stream.held_seconds` adds up the time held, and a hold that lasts
    longer than :data:`HELD_WARNING_AFTER` is logged by :func:`watch_holds` (one WARNING
    naming the stream, its holders and their queues' fill; one INFO when it flows again).
    Only a publish that has to wait does anything for this (two dict operations and a look
    at the clocks): a publish that finds room costs nothing more.

Per-type decimation keeps every Nth DATA frame of a type (the Nth, 2Nth, ...) and drops the
type entirely for N = 0. Metadata is never decimated.

A publisher may publish :class:`~framewire.frame.FrameBlock` objects: DATA frames of one type
that arrived back to back, held as their wire bytes. A subscription takes a block whole only
if it writes the block's protocol as it is (``blocks_of``), does not decimate the block's
type, and the block is at most an eighth of its bounds; every other subscriber gets the
block's frames, split once per publish and shared. A queue is bounded in frames (a block
counts its frames) and bytes; a lossy queue drops a whole block when it drops one (every
frame in it counted as dropped). Blocks are never metadata.

Memory is bounded by the sum of the subscriptions' bounds: frames are shared between
subscribers, never copied, and nothing here grows with how slow a consumer is. An idle
subscription is small (slots; no deque while nothing is queued, no dicts while it decimates
nothing and has taken no session header: about 0.3 KiB): every client of a server has one.

A subscription may have a *direct writer* (:attr:`Subscription.direct`, set by its
consumer): when frames are offered to a lossy subscription whose queue is empty and whose
consumer waits in :meth:`Subscription.receive_batch`, and which neither decimates nor would
split a block or judge a session header, the frames are handed to the direct writer instead
of being queued, and the consumer is not woken (waking 10,000 parked writers one by one was
most of what one frame reaching 10,000 clients cost). The writer answers with a
:class:`DirectWrite`: refused (the frames are queued as usual), written whole, or started
(the consumer is woken with an empty batch and finishes the write before anything else).
This module knows nothing of how it writes; the server endpoint's writer is in
``endpoints/server.py``.

Many such subscriptions written the same way may share a :class:`DirectGroup`: while one is
idle (its consumer parked, nothing queued) the stream does not offer it a publish on its own
but offers the publish once to the group, which writes it to all its idle members in one
loop; the members' counters are settled lazily and exact whenever read (see there).
"""

from __future__ import annotations

import enum
import logging
import math
import time
import types
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Final, Generic, NoReturn, Protocol, TypeVar

import attrs
import outcome
import trio

from ..config import StreamConfig, format_size
from ..frame import Frame, FrameBlock, FrameKind

__all__ = [
    "HELD_WARNING_AFTER",
    "HELD_WARNING_INTERVAL",
    "HOLD_CHECK_INTERVAL",
    "DirectGroup",
    "DirectWrite",
    "Hold",
    "MetadataCache",
    "MetadataLimitExceeded",
    "Policy",
    "QueueBounds",
    "Stream",
    "StreamRegistry",
    "Subscription",
    "SubscriptionClosed",
    "split_blocks",
    "watch_holds",
]

log = logging.getLogger("framewire.stream")

_DATA = FrameKind.DATA
#: Seconds (trio's clock) a stream must stay held before it is logged: one WARNING then, and
#: one INFO when it flows again. Shorter holds (a consumer that is merely the slowest, so the
#: stream waits for it batch by batch) are counted in :attr:`Stream.held_seconds` only.
HELD_WARNING_AFTER: Final = 1.0
#: Seconds between two looks of :func:`watch_holds` for holds to log: a hold is logged
#: between :data:`HELD_WARNING_AFTER` and this much later.
HOLD_CHECK_INTERVAL: Final = 0.25
#: Least seconds between two such WARNINGs of one stream: a stream held again and again for
#: a little longer than :data:`HELD_WARNING_AFTER` is counted, not logged each time.
HELD_WARNING_INTERVAL: Final = 30.0
#: A stream's metadata cache bounds unless configured (``[streams.NAME]``).
_DEFAULT_STREAM: Final = StreamConfig()
DEFAULT_METADATA_TYPES: Final = _DEFAULT_STREAM.max_metadata_types
DEFAULT_METADATA_BYTES: Final = _DEFAULT_STREAM.max_metadata_bytes


#: What a direct group writes to for each member (a server's: the client's socket).
T = TypeVar("T")

#: A default for dict.pop that no value is.
_MISSING: Final = object()

#: The decimation of a subscription that decimates nothing (see Subscription.decimate).
_NO_DECIMATION: Final[Mapping[str, int]] = types.MappingProxyType({})

#: A subscription's queue while nothing is queued: no deque at all (an empty deque still holds
#: a block of 64 slots, about 600 bytes, and every idle client of a server had one).
_EMPTY: Final[tuple[()]] = ()


class DirectWrite(enum.Enum):
    """What a subscription's direct writer did with the frames it was offered."""

    #: Nothing was written and nothing taken: the frames are queued as usual (the consumer's
    #: connection was busy or full, the frames were too large or cannot be shared, or the
    #: writer closed the subscription because the connection broke).
    REFUSED = "refused"
    #: Every byte was written; the frames count as delivered and the consumer stays parked.
    WRITTEN = "written"
    #: Part was written and the writer holds the rest: the frames count as delivered and the
    #: consumer is woken with an empty batch so that it finishes that write first.
    STARTED = "started"


#: The answers as module constants: looking a member up on an enum class costs ~50 ns, and a
#: publish to 10,000 idle clients looks up a few per client.
_REFUSED: Final = DirectWrite.REFUSED
_STARTED: Final = DirectWrite.STARTED


class Policy(enum.Enum):
    """What a full subscription does: drop old data (``lossy``) or make the publisher wait."""

    LOSSY = "lossy"
    LOSSLESS = "lossless"


@attrs.frozen
class QueueBounds:
    """Bounds of one subscription's queue.

    ``max_frames``/``max_bytes`` bound the whole queue; a lossy queue drops data to stay
    inside them. A single frame larger than ``max_bytes`` is still admitted into an otherwise
    empty queue, so no frame is undeliverable. ``max_metadata_frames``/``max_metadata_bytes``
    are the hard cap on queued metadata, which is never dropped: past it the subscription is
    closed.
    """

    max_frames: int = 1024
    max_bytes: int = 64 * 1024 * 1024
    max_metadata_frames: int = 1024
    max_metadata_bytes: int = 64 * 1024 * 1024

    def __attrs_post_init__(self) -> None:
        for field in attrs.fields(QueueBounds):
            if getattr(self, field.name) <= 0:
                raise ValueError(f"{field.name} must be positive")


class SubscriptionClosed(Exception):
    """The subscription is over.

    ``graceful`` is True when the stream ended it after every queued frame was delivered
    (shutdown, end of stream); False when it was cut off (hard cap passed, unsubscribed).
    """

    def __init__(self, reason: str, *, graceful: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.graceful = graceful


class Subscription:
    """One subscriber's bounded queue. Made by :meth:`Stream.subscribe`.

    The consumer calls :meth:`receive_batch` in a loop until it raises
    :class:`SubscriptionClosed`, and calls :meth:`close` (or leaves the ``with`` block) when
    it stops for its own reasons.
    """

    # Slots: every client of a server holds one (10,000 idle clients are a target).
    __slots__ = (
        "_block_bytes",
        "_block_frames",
        "_bytes_out",
        "_closed",
        "_consumer",
        "_direct",
        "_ending",
        "_frames_out",
        "_group",
        "_handled",
        "_idle_in",
        "_mark_bytes",
        "_mark_frames",
        "_mark_written",
        "_queue",
        "_queued_frames",
        "_seen",
        "_sessions",
        "_wake_handled",
        "_wake_publisher",
        "blocks_of",
        "bounds",
        "bytes_dropped",
        "decimate",
        "follows_end",
        "frames_decimated",
        "frames_dropped",
        "label",
        "last_batch_bytes",
        "last_batch_frames",
        "owner",
        "policy",
        "queued_bytes",
        "queued_metadata",
        "queued_metadata_bytes",
        "session_types",
        "stream",
    )

    def __init__(
        self,
        stream: Stream,
        *,
        bounds: QueueBounds,
        policy: Policy,
        decimate: Mapping[str, int],
        label: str,
        owner: str = "",
        follows_end: bool = False,
        session_types: frozenset[str] = frozenset(),
        blocks_of: str | None = None,
    ) -> None:
        for type_tag, every in decimate.items():
            if every < 0:
                raise ValueError(f"decimate.{type_tag} must be 0 or more")
        self.stream = stream
        self.bounds = bounds
        self.policy = policy
        #: Every Nth DATA frame kept, by type. Shared and empty for a subscription that
        #: decimates nothing (most do not): an idle one holds no dict of its own, and a
        #: publish reads one shared object, not one per subscriber.
        self.decimate: Mapping[str, int] = dict(decimate) if decimate else _NO_DECIMATION
        self.label = label
        #: The name of the endpoint that consumes this subscription (what
        #: :attr:`Stream.held_by` says when it holds the stream); its label without one.
        self.owner = owner or label
        #: Whether :meth:`Stream.end_of_stream` ends this subscription.
        self.follows_end = follows_end
        #: Metadata types that open a session (``ProtocolSpec.session_metadata_types``): the
        #: subscriber takes one of each, once. An identical repeat is not queued; a different
        #: one ends the subscription (the consumer drains what it has, then is closed).
        self.session_types = session_types
        #: The session header given, by type; made with the first (most take none).
        self._sessions: dict[str, Frame] | None = None
        #: DATA frames seen of each decimated type; None while nothing is decimated.
        self._seen: dict[str, int] | None = dict.fromkeys(decimate, 0) if decimate else None
        #: The protocol whose :class:`FrameBlock` objects this subscriber writes as they are
        #: (its encoder forwards their wire bytes), or None: blocks are split for it.
        self.blocks_of = blocks_of
        self._block_frames = bounds.max_frames // 8
        self._block_bytes = bounds.max_bytes // 8
        #: The queue: a deque while it holds frames, else :data:`_EMPTY` (see there).
        self._queue: deque[Frame] | tuple[()] = _EMPTY
        #: Frames queued (a block counts its frames; ``len(self._queue)`` counts entries).
        self._queued_frames = 0
        self.queued_bytes = 0
        self.queued_metadata = 0
        self.queued_metadata_bytes = 0
        #: Frames and bytes handed out, but for what a direct group still owes (see
        #: :attr:`frames_out`).
        self._frames_out = 0
        self._bytes_out = 0
        self.frames_dropped = 0
        self.bytes_dropped = 0
        self.frames_decimated = 0
        #: Frames and bytes in the batch :meth:`receive_batch` returned last.
        self.last_batch_frames = 0
        self.last_batch_bytes = 0
        #: The consumer's task while it waits in :meth:`receive_batch` (woken directly: a
        #: trio.Event per wait cost each of 10,000 idle clients about 1 KiB and each
        #: fanned-out frame an allocation per client).
        self._consumer: trio.lowlevel.Task | None = None
        self._wake_publisher: trio.Event | None = None
        #: Frames its consumer has taken and come back from (see :meth:`wait_handled`), and
        #: the event of whoever waits for that to grow.
        self._handled = 0
        self._wake_handled: trio.Event | None = None
        self._closed: SubscriptionClosed | None = None
        self._ending: str | None = None
        #: The consumer's direct writer, or None (see the module docstring): called with
        #: the frames of one publish while the queue is empty and the consumer parked; it
        #: must not raise, and must close the subscription itself if its connection broke.
        self._direct: Callable[[Sequence[Frame]], DirectWrite] | None = None
        #: The consumer's direct group (see :attr:`group`), and the group this subscription
        #: is an idle member of right now (else None), with the group's totals when it
        #: joined (what it is owed is the difference).
        self._group: DirectGroup[Any] | None = None
        self._idle_in: DirectGroup[Any] | None = None
        self._mark_frames = 0
        self._mark_bytes = 0
        self._mark_written = 0

    # -- state -------------------------------------------------------------------------

    @property
    def queued_frames(self) -> int:
        return self._queued_frames

    @property
    def queued_data_frames(self) -> int:
        """The DATA frames among :attr:`queued_frames` (counted each time: for a close)."""
        return sum(frame.nframes for frame in self._queue if not frame.is_metadata)

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def handled_mark(self) -> int:
        """How many frames this subscription has been given so far (taken by its consumer or
        queued; a block counts its frames): a mark for :meth:`wait_handled`. Meant for
        lossless subscriptions, which drop nothing."""
        return self._frames_out + self._queued_frames

    async def wait_handled(self, mark: int) -> None:
        """Wait until the consumer has handled the first ``mark`` frames it was given: it
        took them and came back to :meth:`receive_batch` for more (so a recorder has written
        them, a server's writer has handed them to the kernel), or the subscription closed
        (what it had not handled then is gone with it). Returns at once if that is so
        already; otherwise a checkpoint. Raises only trio.Cancelled."""
        while self._closed is None and self._handled < mark:
            event = self._wake_handled
            if event is None:
                event = self._wake_handled = trio.Event()
            await event.wait()

    def _came_back(self) -> None:
        """The consumer asks for more: what it took before is handled."""
        self._handled = self._frames_out
        event = self._wake_handled
        if event is not None:
            self._wake_handled = None
            event.set()

    @property
    def close_reason(self) -> str | None:
        return None if self._closed is None else self._closed.reason

    @property
    def frames_out(self) -> int:
        """Frames handed out: taken in batches by the consumer or written directly (a block
        counts its frames). Exact whenever read, also while a direct group owes part of it."""
        group = self._idle_in
        if group is None:
            return self._frames_out
        return self._frames_out + group.frames_total - self._mark_frames

    @property
    def bytes_out(self) -> int:
        """Bytes of the frames in :attr:`frames_out` (their sizes), exact whenever read."""
        group = self._idle_in
        if group is None:
            return self._bytes_out
        return self._bytes_out + group.bytes_total - self._mark_bytes

    @property
    def direct_owed(self) -> tuple[int, int]:
        """Frames and bytes *as written* (the writer's bytes, e.g. encoded) that this
        subscription's direct group wrote for it and has not yet settled (see
        :class:`DirectGroup`); (0, 0) while it is no idle member."""
        group = self._idle_in
        if group is None:
            return (0, 0)
        return (group.frames_total - self._mark_frames, group.written_total - self._mark_written)

    @property
    def direct(self) -> Callable[[Sequence[Frame]], DirectWrite] | None:
        """The consumer's direct writer, or None (see the module docstring): called with
        the frames of one publish while the queue is empty and the consumer parked; it must
        not raise, and must close the subscription itself if its connection broke.

        Setting it takes the subscription out of its direct group's idle members (owed
        counts are settled first); it joins again only while its writer is the one the
        group knows for it (:meth:`DirectGroup.target`)."""
        return self._direct

    @direct.setter
    def direct(self, writer: Callable[[Sequence[Frame]], DirectWrite] | None) -> None:
        self._leave_idle()
        self._direct = writer

    @property
    def group(self) -> DirectGroup[Any] | None:
        """The :class:`DirectGroup` that serves this subscription while it is idle, or None.

        Raises ValueError when set to a group of another stream, or for a subscription the
        group may not serve as one (lossless, decimating, or with other block limits,
        block protocol or session types than the group's). Setting it (None too) settles
        and ends an idle membership first."""
        return self._group

    @group.setter
    def group(self, group: DirectGroup[Any] | None) -> None:
        if group is not None:
            why = group.refuses(self)
            if why is not None:
                raise ValueError(f"{self.label}: cannot join the direct group: {why}")
        self._leave_idle()
        self._group = group

    def _join_idle(self) -> None:
        """Become an idle member of :attr:`group`, if it has a target for this subscription
        now (its consumer is about to park with nothing queued)."""
        group = self._group
        if group is None or self._idle_in is not None:
            return
        target = group.target(self)
        if target is None:
            return
        stream = self.stream
        if self not in stream._solo:
            return  # forgotten by its stream: nothing more is published to it
        del stream._solo[self]
        self._idle_in = group
        self._mark_frames = group.frames_total
        self._mark_bytes = group.bytes_total
        self._mark_written = group.written_total
        group.members[self] = target

    def _leave_idle(self) -> None:
        """Stop being an idle member of a direct group (if one): settle what the group
        wrote for it since it joined, and be offered publishes one by one again."""
        group = self._idle_in
        if group is None:
            return
        self._idle_in = None
        del group.members[self]
        frames = group.frames_total - self._mark_frames
        if frames:
            self._frames_out += frames
            self._bytes_out += group.bytes_total - self._mark_bytes
            group.settle(self, frames, group.written_total - self._mark_written)
        stream = self.stream
        if self in stream._lossy:
            stream._solo[self] = None

    def reconfigure(
        self,
        *,
        bounds: QueueBounds | None = None,
        decimate: Mapping[str, int] | None = None,
        follows_end: bool | None = None,
    ) -> None:
        """Apply new settings to this live subscription (a reload that changed them in
        place); what is not given stays. Its consumer and what it has queued stay too.

        New ``bounds`` are the stream's effective bounds for them (see
        :meth:`Stream.effective_bounds`). A lossy queue above a lowered bound drops its
        oldest DATA frames at once, counted in :attr:`frames_dropped`, as it would have to
        queue one more; a lossless one drops nothing: its publishers wait until the consumer
        has taken it below the new bound (a raised bound wakes them at once). New
        ``decimate`` keeps each type's count of frames seen, so "every Nth" goes on where it
        was. A lowered hard cap on metadata is judged at the next metadata frame queued.
        Raises ValueError for a negative decimation (nothing is changed then), or when
        the subscription's :attr:`group` could not take it (detach it first).
        """
        if decimate is not None:
            for type_tag, every in decimate.items():
                if every < 0:
                    raise ValueError(f"decimate.{type_tag} must be 0 or more")
            if decimate and self._group is not None:
                raise ValueError(f"{self.label}: a member of a direct group cannot decimate")
        if bounds is not None:
            bounds = self.stream.effective_bounds(bounds)
            blocks = (bounds.max_frames // 8, bounds.max_bytes // 8)
            group = self._group
            if group is not None and blocks != (group._block_frames, group._block_bytes):
                raise ValueError(f"{self.label}: its direct group has other block limits")
        if follows_end is not None:
            self.follows_end = follows_end
        if decimate is not None:
            seen = self._seen or {}
            self.decimate = dict(decimate) if decimate else _NO_DECIMATION
            self._seen = {key: seen.get(key, 0) for key in decimate} if decimate else None
        if bounds is None or self._closed is not None:
            return
        self.bounds = bounds
        self._block_frames, self._block_bytes = bounds.max_frames // 8, bounds.max_bytes // 8
        if self.policy is Policy.LOSSY:
            if self._queued_frames > bounds.max_frames or self.queued_bytes > bounds.max_bytes:
                self._make_room(0, 0)
                if not self._queue:
                    self._queue = _EMPTY
        elif self._wake_publisher is not None:
            # A publisher waiting for room judges the new bounds (it waits on if lowered).
            self._wake_publisher.set()
            self._wake_publisher = None

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close("unsubscribed", graceful=True)

    # -- the publisher side ------------------------------------------------------------

    def offer(self, frames: Sequence[Frame]) -> None:
        """Queue ``frames`` without waiting (lossy policy). Drops data to stay in bounds.

        When the queue is empty, the consumer parked and the subscription has a
        :attr:`direct` writer, the frames go to the writer first (see the module docstring).
        """
        count = size = 0
        metadata = blocks = False
        for frame in frames:
            if frame.nframes != 1:
                blocks = True
            elif frame.kind is not _DATA:
                metadata = True
            count += frame.nframes
            size += frame.size
        self._offer(frames, count, size, metadata, blocks)

    def _offer(
        self, frames: Sequence[Frame], count: int, size: int, metadata: bool, blocks: bool
    ) -> None:
        """:meth:`offer` of ``frames`` whose facts the caller knows (the stream works them out
        once per publish, not once per subscriber): ``count`` frames (a block counts its
        frames) of ``size`` bytes, whether any is metadata, whether any is a block.

        The direct writer is asked only if this subscription may skip its queue for them: it
        decimates nothing, has no session header to judge among them, and takes each block
        whole. What it takes counts as delivered; what it refuses is queued, unless it
        closed the subscription (its connection broke).
        """
        if self._closed is not None or self._ending is not None:
            return
        direct = self._direct
        if (
            direct is not None
            and self._consumer is not None
            and not self._queued_frames
            and not self.decimate
            and not (metadata and self.session_types)
            and not (blocks and not self._takes_all_whole(frames))
        ):
            if not count:
                return
            done = direct(frames)
            if done is not _REFUSED:
                self._frames_out += count
                self._bytes_out += size
                if done is _STARTED:
                    self._finish_direct_write()
                return
            if self.closed:  # the writer closed it: its connection broke
                return
        self._enqueue(frames)

    def _takes_all_whole(self, frames: Sequence[Frame]) -> bool:
        """Whether this subscription takes every block among ``frames`` whole."""
        return all(frame.nframes == 1 or self.takes_whole(frame) for frame in frames)

    def _deque(self) -> deque[Frame]:
        """The queue as a deque to add to (made if nothing is queued). Never keep it across
        a wait: the consumer lets go of it once it has taken every frame."""
        queue = self._queue
        if isinstance(queue, deque):
            return queue
        made: deque[Frame] = deque()
        self._queue = made
        return made

    def _enqueue(self, frames: Iterable[Frame]) -> None:
        """Queue ``frames``, dropping data to stay in bounds (see :meth:`offer`)."""
        queue = self._deque()
        append = queue.append
        bounds = self.bounds
        max_frames, max_bytes = bounds.max_frames, bounds.max_bytes
        decimate = self.decimate
        added = False
        for frame in frames:
            size = frame.size
            if frame.kind is _DATA:
                count = frame.nframes
                if count != 1 and not self.takes_whole(frame):
                    assert isinstance(frame, FrameBlock)
                    self._enqueue(frame.frames())
                    continue
                if decimate and not self._keep(frame):
                    continue
                if self._queued_frames + count > max_frames or self.queued_bytes + size > max_bytes:
                    self._make_room(count, size)
                    if queue and (
                        self._queued_frames + count > max_frames
                        or self.queued_bytes + size > max_bytes
                    ):
                        # Only metadata is queued and it fills the bounds: drop the newcomer.
                        self.frames_dropped += count
                        self.bytes_dropped += size
                        continue
                append(frame)
                self._queued_frames += count
                self.queued_bytes += size
            else:
                if self.session_types:
                    admit = self._admit_session(frame)
                    if admit is None:
                        break
                    if not admit:
                        continue
                append(frame)
                self._queued_frames += 1
                self.queued_bytes += size
                self.queued_metadata += 1
                self.queued_metadata_bytes += size
                if not self._within_metadata_cap():
                    return
                if self._queued_frames > max_frames or self.queued_bytes > max_bytes:
                    self._make_room(0, 0)
            added = True
        if added and self._consumer is not None:
            self._wake_consumer()

    async def put(self, frames: Sequence[Frame]) -> None:
        """Queue ``frames`` in order, waiting for room as needed (lossless policy).

        Frames still unqueued when the subscription closes or ends are discarded. Always a
        checkpoint; waits only while the queue is full.
        """
        bounds = self.bounds
        decimate = self.decimate
        if (
            not decimate
            and not self.session_types
            and self._closed is None
            and self._ending is None
        ):
            # Fast path: the whole batch fits (blocks and all); queue it with one wake-up.
            total = count = 0
            takes_whole = True
            for frame in frames:
                total += frame.size
                if frame.nframes != 1:
                    count += frame.nframes
                    takes_whole = takes_whole and self.takes_whole(frame)
                else:
                    count += 1
            if (
                takes_whole
                and self._queued_frames + count <= bounds.max_frames
                and self.queued_bytes + total <= bounds.max_bytes
            ):
                self._deque().extend(frames)
                self._queued_frames += count
                self.queued_bytes += total
                for frame in frames:
                    if frame.kind is not _DATA:
                        self.queued_metadata += 1
                        self.queued_metadata_bytes += frame.size
                if self._consumer is not None:
                    self._wake_consumer()
                await trio.lowlevel.checkpoint()
                return
        for frame in self._split_blocks(frames):
            if frame.kind is _DATA:
                if decimate and not self._keep(frame):
                    continue
            elif self.session_types:
                admit = self._admit_session(frame)
                if admit is None:
                    break
                if not admit:
                    continue
            size = frame.size
            count = frame.nframes
            if self._queue and (
                self._queued_frames + count > bounds.max_frames
                or self.queued_bytes + size > bounds.max_bytes
            ):
                await self._wait_for_room(count, size)
            if self._closed is not None or self._ending is not None:
                break
            self._deque().append(frame)
            self._queued_frames += count
            self.queued_bytes += size
            if frame.kind is not _DATA:
                self.queued_metadata += 1
                self.queued_metadata_bytes += size
            if self._consumer is not None:
                self._wake_consumer()
        await trio.lowlevel.checkpoint()

    def _lacks_room(self, count: int, size: int) -> bool:
        """Whether a publisher must wait before it queues ``count`` frames of ``size``
        bytes: the queue is open, holds something, and they would pass a bound."""
        bounds = self.bounds
        return (
            self._closed is None
            and self._ending is None
            and bool(self._queue)
            and (
                self._queued_frames + count > bounds.max_frames
                or self.queued_bytes + size > bounds.max_bytes
            )
        )

    async def _wait_for_room(self, count: int, size: int) -> None:
        """Wait until ``count`` frames of ``size`` bytes fit, or the subscription closes or
        ends. Meanwhile this subscription holds its stream (see :meth:`Stream.holding`).
        No timer here (a deadline per wait cost a relay of small frames several per cent):
        :func:`watch_holds` logs a hold that lasts."""
        stream = self.stream
        stream._hold(self)
        gave_up = True
        try:
            while self._lacks_room(count, size):
                if self._wake_publisher is None:
                    self._wake_publisher = trio.Event()
                await self._wake_publisher.wait()
            gave_up = False
        finally:
            stream._release(self, gave_up=gave_up)

    def takes_whole(self, block: Frame) -> bool:
        """Whether this subscription queues the :class:`FrameBlock` ``block`` as it is
        (else it queues the block's frames): it writes the block's protocol as it is, does
        not decimate its type, and the block is at most an eighth of its bounds."""
        return (
            block.wire_protocol == self.blocks_of
            and block.nframes <= self._block_frames
            and block.size <= self._block_bytes
            and block.type not in self.decimate
        )

    def _split_blocks(self, frames: Sequence[Frame]) -> Iterator[Frame]:
        """``frames``, with each block this subscription does not take whole split."""
        for frame in frames:
            if frame.nframes != 1 and not self.takes_whole(frame):
                assert isinstance(frame, FrameBlock)
                yield from frame.frames()
            else:
                yield frame

    def given_session(self, frame: Frame) -> None:
        """The consumer was given the session header ``frame`` another way (a replay from
        the stream's history): an identical one is not queued again, a different one ends
        the subscription, as if it had been queued here."""
        if frame.type in self.session_types:
            if self._sessions is None:
                self._sessions = {}
            self._sessions[frame.type] = frame

    def _admit_session(self, frame: Frame) -> bool | None:
        """Whether to queue the metadata ``frame``, given :attr:`session_types`.

        True: queue it (not a session type, or the first of its type). False: skip it (the
        same bytes as the one already given). None: it differs from the one already given,
        so the subscription has been ended gracefully and nothing more may be queued; a
        reader of such a protocol cannot take a second session header.
        """
        if frame.type not in self.session_types:
            return True
        sessions = self._sessions
        if sessions is None:
            sessions = self._sessions = {}
        current = sessions.get(frame.type)
        if current is None:
            sessions[frame.type] = frame
            return True
        if current is frame or memoryview(current.payload) == memoryview(frame.payload):
            return False
        self.end(f"the upstream's {frame.type} changed (a new session began)")
        return None

    def _keep(self, frame: Frame) -> bool:
        every = self.decimate.get(frame.type)
        if every is None:
            return True
        if every == 0:
            self.frames_decimated += 1
            return False
        counts = self._seen
        assert counts is not None  # made with every decimated type
        seen = counts[frame.type] = counts[frame.type] + 1
        if seen % every:
            self.frames_decimated += 1
            return False
        return True

    def _make_room(self, frames: int, nbytes: int) -> None:
        """Drop the oldest DATA frames until ``frames`` more frames of ``nbytes`` fit."""
        bounds = self.bounds
        limit_frames = bounds.max_frames - frames
        while self._queued_frames > limit_frames or self.queued_bytes + nbytes > bounds.max_bytes:
            victim = self._remove_oldest_data()
            if victim is None:
                return
            self.frames_dropped += victim.nframes
            self.bytes_dropped += victim.size

    def _remove_oldest_data(self) -> Frame | None:
        queue = self._queue
        if not isinstance(queue, deque):
            return None  # nothing queued
        if queue and queue[0].kind is _DATA:
            victim = queue.popleft()
        else:
            index = next((i for i, frame in enumerate(queue) if frame.kind is _DATA), None)
            if index is None:
                return None
            victim = queue[index]
            del queue[index]
        self._queued_frames -= victim.nframes
        self.queued_bytes -= victim.size
        return victim

    def _within_metadata_cap(self) -> bool:
        bounds = self.bounds
        if (
            self.queued_metadata > bounds.max_metadata_frames
            or self.queued_metadata_bytes > bounds.max_metadata_bytes
        ):
            self.close(
                f"queued metadata ({self.queued_metadata} frames, "
                f"{self.queued_metadata_bytes} bytes) passed the hard cap "
                f"({bounds.max_metadata_frames} frames, {bounds.max_metadata_bytes} bytes): "
                "the client is not keeping up with metadata",
                graceful=False,
            )
            return False
        return True

    # -- the consumer side -------------------------------------------------------------

    async def receive_batch(self, max_frames: int = 1024, max_bytes: int = 4 << 20) -> list[Frame]:
        """Wait for frames; return up to ``max_frames`` of them, oldest first.

        At least one frame is returned, except to a consumer with a :attr:`direct` writer
        whose write is unfinished (:attr:`DirectWrite.STARTED`): it gets an empty batch, and
        finishes that write before it asks again. A batch stops early once it holds
        ``max_bytes``. A
        :class:`FrameBlock` counts as its frames (a block that would pass ``max_frames`` waits
        for the next batch, unless it is the batch's first); :attr:`last_batch_frames` and
        :attr:`last_batch_bytes` say how many frames and bytes the batch holds.

        Raises:
            SubscriptionClosed: the subscription was closed, or ended and fully drained.
        """
        self._came_back()
        queue = self._queue
        waited = False
        while not queue:
            if self._closed is not None:
                raise self._closed_error()
            if self._ending is not None:
                self._closed = SubscriptionClosed(self._ending, graceful=True)
                raise self._closed_error()
            if self._consumer is not None:
                raise trio.BusyResourceError("another task is receiving from this subscription")
            self._consumer = trio.lowlevel.current_task()
            if self._group is not None:
                self._join_idle()
            # Woken with True: a direct write to finish (see _offer). No local for
            # it: each parked consumer's frame would hold one more slot.
            if (
                await trio.lowlevel.wait_task_rescheduled(self._abort_wait) is True
                and not self._queue
                and self._closed is None
            ):
                self.last_batch_frames = self.last_batch_bytes = 0
                return []
            waited = True  # that was a checkpoint: no second trip through the scheduler
            queue = self._queue  # a publisher may have made it
        if self._closed is not None:
            raise self._closed_error()
        assert isinstance(queue, deque)  # it holds frames
        batch: list[Frame] = []
        append, popleft = batch.append, queue.popleft
        taken_frames = 0
        taken_bytes = 0
        metadata = 0
        metadata_bytes = 0
        while queue and taken_frames < max_frames and taken_bytes < max_bytes:
            count = queue[0].nframes
            if count != 1 and taken_frames and taken_frames + count > max_frames:
                break
            frame = popleft()
            append(frame)
            taken_frames += count
            taken_bytes += frame.size
            if frame.kind is not _DATA:
                metadata += 1
                metadata_bytes += frame.size
        if not queue:
            self._queue = _EMPTY  # an idle subscription holds no deque
        self.last_batch_frames = taken_frames
        self.last_batch_bytes = taken_bytes
        self._queued_frames -= taken_frames
        self.queued_bytes -= taken_bytes
        self.queued_metadata -= metadata
        self.queued_metadata_bytes -= metadata_bytes
        self._frames_out += taken_frames
        self._bytes_out += taken_bytes
        if self._wake_publisher is not None:
            self._wake_publisher.set()
            self._wake_publisher = None
        if not waited:
            await trio.lowlevel.checkpoint()
        return batch

    def _closed_error(self) -> SubscriptionClosed:
        """A new :class:`SubscriptionClosed` saying why the subscription closed, to raise.

        The one kept in ``_closed`` is never raised itself: raising it would give it a
        traceback whose frames hold this subscription (and through its consumer's frames
        the client's connection and socket), a reference cycle that only the garbage
        collector frees, and the daemon runs that collector rarely
        (:func:`~framewire.daemon.service.tune_garbage_collector`). Every client that left
        kept a few KiB that way until then.
        """
        closed = self._closed
        assert closed is not None
        return SubscriptionClosed(closed.reason, graceful=closed.graceful)

    def end(self, reason: str) -> None:
        """End gracefully: the consumer gets what is queued, then :class:`SubscriptionClosed`."""
        if self._closed is None and self._ending is None:
            self._ending = reason
            self._wake_all()
        self.stream._forget(self)

    def close(self, reason: str, *, graceful: bool = False) -> None:
        """Close now: queued frames are discarded. Idempotent."""
        if self._closed is None:
            self._closed = SubscriptionClosed(reason, graceful=graceful)
            self._queue = _EMPTY
            self._queued_frames = 0
            self.queued_bytes = self.queued_metadata = self.queued_metadata_bytes = 0
            self._wake_all()
        self.stream._forget(self)

    def _wake_consumer(self) -> None:
        task = self._consumer
        if task is not None:
            self._consumer = None
            if self._idle_in is not None:
                self._leave_idle()
            trio.lowlevel.reschedule(task)

    def _finish_direct_write(self) -> None:
        """Wake the parked consumer to finish a direct write it was left (see
        :attr:`DirectWrite.STARTED`)."""
        task = self._consumer
        if task is not None:
            self._consumer = None
            if self._idle_in is not None:
                self._leave_idle()
            # Woken with True: "finish the write" (an outcome is used once).
            trio.lowlevel.reschedule(task, outcome.Value(True))

    def _abort_wait(self, raise_cancel: object) -> trio.lowlevel.Abort:
        self._consumer = None  # the waiting consumer was cancelled
        if self._idle_in is not None:
            self._leave_idle()
        return trio.lowlevel.Abort.SUCCEEDED

    def _wake_all(self) -> None:
        self._wake_consumer()
        if self._wake_publisher is not None:
            self._wake_publisher.set()
        self._wake_publisher = None
        if self._wake_handled is not None:
            self._wake_handled.set()
            self._wake_handled = None


class DirectGroup(Generic[T]):
    """Idle subscriptions of one stream that a single writer serves together.

    A consumer that writes many subscriptions' frames the same way (a server endpoint's
    clients, each a socket) makes one group and sets each subscription's :attr:`~Subscription.
    group`. While a member's consumer waits in :meth:`Subscription.receive_batch` with nothing
    queued and :meth:`target` names something to write to, it is an *idle member*: the
    stream no longer offers it each publish one by one but offers the publish once to the
    group (:meth:`offer`), which writes it to every idle member in one tight loop. A member
    stops being idle whenever its consumer is woken (frames queued for it, a write to finish,
    its subscription closed or ended, its consumer cancelled) and joins again when the
    consumer waits with nothing left. So a publish never overtakes a queued frame.

    Counters: a publish written whole to every idle member is counted once, in
    :attr:`frames_total`, :attr:`bytes_total` (the frames' sizes) and :attr:`written_total`
    (the bytes as written: the writer's encoding); each member is owed the difference from
    the totals when it joined. :attr:`Subscription.frames_out` and ``bytes_out`` include what
    is owed whenever read (and :attr:`Subscription.direct_owed` says what it is), and when a
    member leaves, what it is owed is added to its own counters and reported to
    :meth:`settle`.

    Subclasses give :meth:`target`, :meth:`offer` and :meth:`settle`; :meth:`offer` uses
    :meth:`refused`, :meth:`started`, :meth:`written` and :meth:`refuse_all` to report.
    Members share the group's block limits, block protocol and session types and neither
    decimate nor wait (lossless); see :meth:`refuses`.
    """

    def __init__(
        self,
        stream: Stream,
        *,
        bounds: QueueBounds,
        blocks_of: str | None,
        session_types: frozenset[str] = frozenset(),
    ) -> None:
        self.stream = stream
        self.blocks_of = blocks_of
        self.session_types = session_types
        self._block_frames = bounds.max_frames // 8
        self._block_bytes = bounds.max_bytes // 8
        #: The idle members, each with what its writer writes to (see :meth:`target`).
        self.members: dict[Subscription, T] = {}
        #: Frames (a block counts its frames), their bytes and the bytes as written of the
        #: publishes written whole to every idle member, since the group was made.
        self.frames_total = 0
        self.bytes_total = 0
        self.written_total = 0

    def rebound(self, bounds: QueueBounds) -> None:
        """Take the block limits of its members' new ``bounds`` (a reload changed them in
        place): reconfigure every member right after, before anything is published."""
        self._block_frames = bounds.max_frames // 8
        self._block_bytes = bounds.max_bytes // 8

    def refuses(self, subscription: Subscription) -> str | None:
        """Why ``subscription`` may not be a member (None: it may)."""
        if subscription.stream is not self.stream:
            return "it is of another stream"
        if subscription.policy is not Policy.LOSSY:
            return "it is lossless"
        if subscription.decimate:
            return "it decimates"
        if (
            subscription.blocks_of != self.blocks_of
            or subscription._block_frames != self._block_frames
            or subscription._block_bytes != self._block_bytes
            or subscription.session_types != self.session_types
        ):
            return "its blocks or session types differ from the group's"
        return None

    def target(self, subscription: Subscription) -> T | None:
        """What the group writes to for ``subscription``, whose consumer is about to wait
        with nothing queued; None: it may not be an idle member now (it is then offered
        publishes one by one). Must not raise."""
        raise NotImplementedError

    def settle(self, subscription: Subscription, frames: int, written: int) -> None:
        """``subscription`` leaves the idle members, owed ``frames`` and ``written`` bytes
        (as written) for the publishes written to it whole since it joined (its own counters
        already have them): add them to the writer's counters. Must not raise."""

    def offer(
        self, frames: Sequence[Frame], count: int, size: int, metadata: bool, blocks: bool
    ) -> None:
        """Write the publish ``frames`` (``count`` frames of ``size`` bytes, metadata among
        them or not, blocks among them or not) to every idle member, then call
        :meth:`written`. A member the write does not reach whole is reported, in the loop:
        :meth:`refused` (queue the frames instead), :meth:`started` (the rest is its
        writer's), or its subscription closed (its connection broke). When the publish
        cannot go direct at all, :meth:`refuse_all`. Must not raise."""
        raise NotImplementedError

    def may_write(self, frames: Sequence[Frame], metadata: bool, blocks: bool) -> bool:
        """Whether a publish of ``frames`` may be written to the idle members directly: no
        session header to judge among them, and every block taken whole."""
        if metadata and self.session_types:
            return False
        if blocks:
            for frame in frames:
                if frame.nframes != 1 and not (
                    frame.wire_protocol == self.blocks_of
                    and frame.nframes <= self._block_frames
                    and frame.size <= self._block_bytes
                ):
                    return False
        return True

    def refused(self, subscription: Subscription, frames: Sequence[Frame]) -> None:
        """Nothing of ``frames`` was written to the member ``subscription``: it leaves the
        idle members and ``frames`` are queued for it (its consumer is woken)."""
        subscription._leave_idle()
        if subscription._closed is None and subscription._ending is None:
            subscription._enqueue(frames)

    def started(self, subscription: Subscription, count: int, size: int) -> None:
        """Part of the publish (``count`` frames of ``size`` bytes) was written to the
        member ``subscription`` and its writer holds the rest: it leaves the idle members,
        the publish counts as handed out, and its consumer is woken to finish the write.
        The caller counts it in the writer's own counters."""
        subscription._leave_idle()
        subscription._frames_out += count
        subscription._bytes_out += size
        subscription._finish_direct_write()

    def written(self, count: int, size: int, written: int) -> None:
        """The publish, ``count`` frames of ``size`` bytes, ``written`` bytes as written, was
        written whole to every member still idle: owe it to each."""
        self.frames_total += count
        self.bytes_total += size
        self.written_total += written

    def refuse_all(self, frames: Sequence[Frame]) -> None:
        """The publish cannot go direct: every idle member leaves and gets ``frames`` queued.
        One that queued none of them (a repeated session header it skips) stays parked, so
        it is an idle member again at once."""
        for subscription in list(self.members):
            self.refused(subscription, frames)
            if subscription._consumer is not None and not subscription._queue:
                subscription._join_idle()


class MetadataLimitExceeded(Exception):
    """A producer's metadata frame would pass its stream's metadata cache bound.

    Raised by :meth:`Stream.publish` after the frames before it were published; the frame
    and those after it were not. The publisher should refuse that producer (close its
    connection) with :attr:`reason` in one log line; the stream keeps serving. A publisher
    that cannot refuse its producer (frames from NATS) publishes the frames after
    :attr:`index` (the refused frame's place in what it published) again.
    """

    def __init__(self, reason: str, index: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.index = index


class MetadataCache:
    """The latest METADATA frame of each type, iterated in first-seen order of the types.

    Bounded in types and bytes (None: unbounded, for caches that only ever hold frames a
    bounded stream already took). :meth:`update` refuses a frame that would pass a bound.
    """

    def __init__(self, *, max_types: int | None = None, max_bytes: int | None = None) -> None:
        self.max_types = max_types
        self.max_bytes = max_bytes
        self._frames: dict[str, Frame] = {}
        #: Bytes of the frames held.
        self.nbytes = 0

    def update(self, frame: Frame) -> str | None:
        """Keep ``frame`` as the latest of its type; or, if that would pass a bound, keep the
        cache as it is and return why (None when it was kept)."""
        frames = self._frames
        old = frames.get(frame.type)
        if old is None and self.max_types is not None and len(frames) >= self.max_types:
            return (
                f"a new metadata type {frame.type!r} would pass the bound of "
                f"{self.max_types} metadata types"
            )
        nbytes = self.nbytes + frame.size - (0 if old is None else old.size)
        if self.max_bytes is not None and nbytes > self.max_bytes:
            return (
                f"metadata frame {frame.type!r} of {frame.size} bytes would pass the bound of "
                f"{self.max_bytes} bytes of metadata"
            )
        # Assigning to an existing key keeps its position: first-seen order.
        frames[frame.type] = frame
        self.nbytes = nbytes
        return None

    def get(self, type_: str) -> Frame | None:
        """The latest METADATA frame of type ``type_`` (None when there is none)."""
        return self._frames.get(type_)

    def clear(self) -> None:
        self._frames.clear()
        self.nbytes = 0

    def __iter__(self) -> Iterator[Frame]:
        return iter(list(self._frames.values()))

    def __len__(self) -> int:
        return len(self._frames)


@attrs.define(eq=False)
class Hold:
    """One lossless subscription that holds its stream: publishers wait for room in its
    queue. See :meth:`Stream.holding`."""

    subscription: Subscription
    #: When it began to hold the stream: trio's clock, and Unix time.
    since: float
    since_unix: float
    #: Publishes waiting for room in its queue now.
    waiters: int = 0

    @property
    def held_for(self) -> float:
        """Seconds (trio's clock) it has held the stream so far."""
        return _since(self.since)


class HistorySink(Protocol):
    """What a stream hands each publish to when it keeps a history."""

    def offer(self, frames: Sequence[Frame], count: int, size: int) -> None: ...


class Stream:
    """A named channel with a metadata cache. See the module docstring."""

    def __init__(
        self,
        name: str,
        *,
        max_metadata_types: int = DEFAULT_METADATA_TYPES,
        max_metadata_bytes: int = DEFAULT_METADATA_BYTES,
    ) -> None:
        self.name = name
        self.metadata = MetadataCache(max_types=max_metadata_types, max_bytes=max_metadata_bytes)
        #: Metadata types that start a run: one arriving retires the cached metadata first.
        self.run_starts: frozenset[str] = frozenset()
        #: Metadata frames refused because they would pass the cache's bounds.
        self.metadata_refused = 0
        #: Lossy subscriptions in the order they came (a dict: a client leaving is O(1)).
        self._lossy: dict[Subscription, None] = {}
        #: Those of them offered each publish one by one: all but the idle members of a
        #: direct group, which its group takes each publish for all at once.
        self._solo: dict[Subscription, None] = {}
        self._groups: list[DirectGroup[Any]] = []
        self._lossless: list[Subscription] = []
        self.frames_in = 0
        self.bytes_in = 0
        #: Where every publish is also offered, synchronously, when the stream keeps a
        #: history (:class:`~framewire.daemon.history.HistoryWriter`); its ``offer`` never
        #: waits or raises.
        self.history: HistorySink | None = None
        #: Publishes so far. A direct writer keys the encoding it shares among its clients
        #: by it and the identity of the frames it is offered (alive while the publish is).
        self.publishes = 0
        # Holds (see :meth:`holding`); touched only when a publish has to wait for room.
        #: The subscriptions that hold the stream now, in the order they began to.
        self._holds: dict[Subscription, Hold] = {}
        #: When the stream began to be held, on trio's clock and as Unix time (None: flowing).
        self._held_at: float | None = None
        self._held_since_unix: float | None = None
        #: Seconds held in the holds that are over.
        self._held_before = 0.0
        #: Holds so far (each a span of time during which some publish waited).
        self.holds = 0
        #: Whether the present hold has lasted :data:`HELD_WARNING_AFTER`, whether it was
        #: logged (a WARNING; an INFO follows when it ends), and the endpoints that have held
        #: the stream during it.
        self._hold_long = False
        self._hold_logged = False
        self._hold_owners: dict[str, None] = {}
        #: When the last WARNING of a hold was logged, and the long holds since not logged.
        self._last_hold_warning = -math.inf
        self._hold_warnings_skipped = 0

    @property
    def subscriptions(self) -> list[Subscription]:
        return [*self._lossy, *self._lossless]

    @property
    def lossless(self) -> list[Subscription]:
        """The lossless subscriptions (a copy)."""
        return list(self._lossless)

    # -- holds ---------------------------------------------------------------------------

    def holding(self) -> list[Hold]:
        """The lossless subscriptions holding the stream now (publishes wait for room in
        their queues), in the order they began to; empty while the stream flows."""
        return list(self._holds.values())

    @property
    def held_by(self) -> list[str]:
        """The endpoints (:attr:`Subscription.owner`) holding the stream now, each once."""
        return list(dict.fromkeys(hold.subscription.owner for hold in self._holds.values()))

    @property
    def held_since(self) -> float | None:
        """When the stream began to be held (Unix time), or None while it flows."""
        return self._held_since_unix

    @property
    def held_for(self) -> float:
        """Seconds (trio's clock) the present hold has lasted; 0 while the stream flows."""
        return 0.0 if self._held_at is None else _since(self._held_at)

    @property
    def held_seconds(self) -> float:
        """Seconds (trio's clock) the stream has been held so far, the present hold
        included (read from inside trio for that; outside it, the holds that are over)."""
        return self._held_before + self.held_for

    def _hold(self, subscription: Subscription) -> None:
        """A publish waits for room in ``subscription``'s queue."""
        hold = self._holds.get(subscription)
        if hold is None:
            now = trio.current_time()
            hold = self._holds[subscription] = Hold(subscription, now, time.time())
            if self._held_at is None:
                self._held_at = now
                self._held_since_unix = hold.since_unix
                self.holds += 1
            self._hold_owners[subscription.owner] = None
        hold.waiters += 1

    def _release(self, subscription: Subscription, *, gave_up: bool = False) -> None:
        """A publish that waited for room in ``subscription``'s queue goes on (or, with
        ``gave_up``, stopped waiting: its publisher was cancelled). The hold is over once
        no publish waits."""
        hold = self._holds.get(subscription)
        if hold is None:
            return
        hold.waiters -= 1
        if hold.waiters > 0:
            return
        del self._holds[subscription]
        if self._holds or self._held_at is None:
            return
        held = trio.current_time() - self._held_at
        self._held_before += held
        self._held_at = self._held_since_unix = None
        owners = ", ".join(self._hold_owners)
        self._hold_owners = {}
        self._hold_long = False
        if self._hold_logged:
            self._hold_logged = False
            if gave_up:
                log.info(
                    "stream %r is no longer held: its publisher stopped waiting after %.1f s "
                    "held by %s",
                    self.name,
                    held,
                    owners,
                )
            else:
                log.info("stream %r flows again after %.1f s held by %s", self.name, held, owners)

    def check_hold(self) -> None:
        """Log the present hold if it has lasted :data:`HELD_WARNING_AFTER` (once per hold;
        at most once per :data:`HELD_WARNING_INTERVAL` per stream, the others counted in the
        next line); nothing otherwise. Called by :func:`watch_holds`; cheap when the stream
        flows."""
        if self._held_at is None or self._hold_long:
            return
        now = trio.current_time()
        if now - self._held_at < HELD_WARNING_AFTER:
            return
        held = now - self._held_at
        self._hold_long = True
        if now - self._last_hold_warning < HELD_WARNING_INTERVAL:
            # Flapping: held again soon after the last warning. Counted, and said when a
            # hold is logged next; no INFO for this one either.
            self._hold_warnings_skipped += 1
            return
        self._hold_logged = True
        self._last_hold_warning = now
        holders = "; ".join(_describe_hold(hold) for hold in self._holds.values())
        skipped = self._hold_warnings_skipped
        self._hold_warnings_skipped = 0
        again = (
            f" (held over {HELD_WARNING_AFTER:g} s {skipped} more times since the last such line)"
            if skipped
            else ""
        )
        log.warning(
            "stream %r is held: its publishers have waited %.1f s for room in the lossless "
            "queue of %s; no subscriber of the stream gets anything new until it takes "
            "frames%s",
            self.name,
            held,
            holders,
            again,
        )

    # -- subscribers -------------------------------------------------------------------

    def subscribe(
        self,
        *,
        bounds: QueueBounds | None = None,
        policy: Policy = Policy.LOSSY,
        decimate: Mapping[str, int] | None = None,
        label: str = "",
        owner: str = "",
        follows_end: bool = False,
        replay: bool = True,
        session_types: frozenset[str] = frozenset(),
        blocks_of: str | None = None,
    ) -> Subscription:
        """A new subscription, preloaded with the metadata cache (first-seen order).

        With ``replay=False`` it starts with the next frame published instead.
        ``session_types``: see :attr:`Subscription.session_types`; ``blocks_of``: see
        :attr:`Subscription.blocks_of` (a subscriber whose encoder forwards the wire bytes of
        that protocol's frames may take that protocol's blocks whole). ``owner`` is the
        name of the endpoint that consumes it (see :attr:`held_by`); ``label`` names it in
        log lines.

        If the cached metadata alone passes the hard cap the subscription comes back already
        closed, with the reason, so the caller can log it and disconnect the client.
        """
        bounds = self.effective_bounds(bounds or QueueBounds())
        subscription = Subscription(
            self,
            bounds=bounds,
            policy=policy,
            decimate=decimate or {},
            label=label,
            owner=owner,
            follows_end=follows_end,
            session_types=session_types,
            blocks_of=blocks_of,
        )
        cached = list(self.metadata) if replay else []
        if cached:
            # Replay bypasses the ordinary bounds (it is all metadata) but not the hard cap.
            subscription.offer(cached)
        if not subscription.closed:
            if policy is Policy.LOSSY:
                self._lossy[subscription] = None
                self._solo[subscription] = None
            else:
                self._lossless.append(subscription)
        return subscription

    def effective_bounds(self, bounds: QueueBounds) -> QueueBounds:
        """``bounds`` as a subscriber of this stream gets them: the hard cap on metadata
        raised to the metadata cache's own bounds, so that the cache's replay never cuts a
        new subscriber off."""
        cache = self.metadata
        if (cache.max_types or 0) > bounds.max_metadata_frames or (
            cache.max_bytes or 0
        ) > bounds.max_metadata_bytes:
            return attrs.evolve(
                bounds,
                max_metadata_frames=max(bounds.max_metadata_frames, cache.max_types or 0),
                max_metadata_bytes=max(bounds.max_metadata_bytes, cache.max_bytes or 0),
            )
        return bounds

    def _forget(self, subscription: Subscription) -> None:
        subscription._leave_idle()
        if self._lossy.pop(subscription, _MISSING) is _MISSING and subscription in self._lossless:
            self._lossless.remove(subscription)
        self._solo.pop(subscription, None)

    def add_group(self, group: DirectGroup[Any]) -> None:
        """Offer each publish to ``group``'s idle members through ``group`` (idempotent)."""
        if group.stream is not self:
            raise ValueError(f"a direct group of stream {group.stream.name!r}")
        if group not in self._groups:
            self._groups.append(group)

    def remove_group(self, group: DirectGroup[Any]) -> None:
        """Stop offering publishes to ``group``; its idle members (if any) are offered
        publishes one by one again, their owed counts settled. Idempotent."""
        for subscription in list(group.members):
            subscription._leave_idle()
        if group in self._groups:
            self._groups.remove(group)

    async def publish(self, frames: Sequence[Frame]) -> None:
        """Publish ``frames`` in order to every subscriber.

        Lossy subscribers get them at once; the call then waits, frame by frame, for room in
        each lossless subscriber's queue. Always a checkpoint.

        Raises :class:`MetadataLimitExceeded` when a metadata frame would pass the metadata
        cache's bounds: the frames before it are published, it and the rest are not.
        """
        frames, split, refused = self._publish_to_lossy(frames)
        if not self._lossless:
            await trio.lowlevel.checkpoint()
        else:
            for subscription in list(self._lossless):
                await subscription.put(frames if subscription.blocks_of is not None else split)
        if refused is not None:
            raise refused

    def publish_nowait(self, frames: Sequence[Frame]) -> None:
        """Publish without waiting. Raises :class:`trio.WouldBlock` if a lossless subscriber
        exists (use :meth:`publish` then), and :class:`MetadataLimitExceeded` as
        :meth:`publish` does."""
        if self._lossless:
            raise trio.WouldBlock
        _, _, refused = self._publish_to_lossy(frames)
        if refused is not None:
            raise refused

    def _publish_to_lossy(
        self, frames: Sequence[Frame]
    ) -> tuple[Sequence[Frame], Sequence[Frame], MetadataLimitExceeded | None]:
        """Cache metadata and offer ``frames`` to the lossy subscribers; return the frames
        published (all of them, unless a metadata frame was refused), the same with every
        block split (for subscribers that take no blocks), and the refusal."""
        cache = self.metadata
        refused: MetadataLimitExceeded | None = None
        size = count = 0
        metadata = False
        for index, frame in enumerate(frames):
            if frame.kind is not _DATA:
                if frame.type in self.run_starts:
                    cache.clear()  # a new run: the previous run's metadata is retired
                reason = cache.update(frame)
                if reason is not None:
                    self.metadata_refused += 1
                    refused = MetadataLimitExceeded(f"stream {self.name!r}: {reason}", index)
                    frames = frames[:index]
                    break
                metadata = True
            size += frame.size
            count += frame.nframes
        self.frames_in += count
        self.bytes_in += size
        self.publishes += 1
        if self.history is not None and count:
            self.history.offer(frames, count, size)
        blocks = count != len(frames)
        split: Sequence[Frame] | None = None if blocks else frames
        # A snapshot, taken before the groups run: offering may end or close a subscription,
        # which removes it, and a group's member that leaves it is offered this publish by
        # its group. The publish's facts are worked out once above, not once per subscriber.
        solo = tuple(self._solo)
        if count:
            for group in self._groups:
                if group.members:
                    group.offer(frames, count, size, metadata, blocks)
        for subscription in solo:
            if subscription.blocks_of is not None:
                subscription._offer(frames, count, size, metadata, blocks)
            else:
                if split is None:
                    split = split_blocks(frames)
                subscription._offer(split, count, size, metadata, False)
        if split is None and any(sub.blocks_of is None for sub in self._lossless):
            split = split_blocks(frames)
        return frames, frames if split is None else split, refused

    def end_of_stream(self, reason: str) -> None:
        """A producer ended its stream cleanly: end the subscriptions that follow the end.

        Those consumers get what is queued for them, then are closed; other subscriptions
        carry on (a new producer may continue the stream).
        """
        for subscription in self.subscriptions:
            if subscription.follows_end:
                subscription.end(reason)

    def end_subscriptions(self, reason: str) -> None:
        """End every subscription gracefully (each consumer drains what it has queued)."""
        for subscription in self.subscriptions:
            subscription.end(reason)


def _since(then: float) -> float:
    """Seconds on trio's clock since ``then``; 0 outside trio (no clock to read)."""
    try:
        return trio.current_time() - then
    except RuntimeError:
        return 0.0


def _describe_hold(hold: Hold) -> str:
    """``g3-out (g3-out -> tcp://…): 1024/1024 frames, 1.5MiB/64MiB``: who holds a stream
    and how full its queue is against its bounds."""
    subscription = hold.subscription
    bounds = subscription.bounds
    label = subscription.label
    who = (
        subscription.owner
        if label in ("", subscription.owner)
        else f"{subscription.owner} ({label})"
    )
    return (
        f"{who}: {subscription.queued_frames}/{bounds.max_frames} frames, "
        f"{format_size(subscription.queued_bytes)}/{format_size(bounds.max_bytes)}"
    )


def split_blocks(frames: Sequence[Frame]) -> list[Frame]:
    """``frames`` with every :class:`FrameBlock` replaced by its frames."""
    out: list[Frame] = []
    for frame in frames:
        if isinstance(frame, FrameBlock):
            out += frame.frames()
        else:
            out.append(frame)
    return out


async def watch_holds(
    streams: Iterable[Stream], *, interval: float = HOLD_CHECK_INTERVAL
) -> NoReturn:
    """Every ``interval`` seconds (trio's clock), have each of ``streams`` (iterated afresh
    each time: a :class:`StreamRegistry` will do) log a hold that has lasted
    :data:`HELD_WARNING_AFTER` (:meth:`Stream.check_hold`). The daemon runs one; a stream
    nobody watches is held as visibly in its figures, but says nothing in the log."""
    while True:
        await trio.sleep(interval)
        for stream in streams:
            stream.check_hold()


class StreamRegistry:
    """The daemon's streams by name, created on first use with their configured bounds."""

    def __init__(self) -> None:
        self._streams: dict[str, Stream] = {}
        self._configs: Mapping[str, StreamConfig] = {}

    def configure(self, configs: Mapping[str, StreamConfig]) -> None:
        """Each stream's settings (``[streams.NAME]``); streams not named get the defaults.
        Applies to existing streams too: a metadata cache already past a lowered bound keeps
        what it holds and refuses what would add to it."""
        self._configs = dict(configs)
        for stream in self._streams.values():
            config = self._config_of(stream.name)
            stream.metadata.max_types = config.max_metadata_types
            stream.metadata.max_bytes = config.max_metadata_bytes
            stream.run_starts = frozenset(config.run_starts)

    def _config_of(self, name: str) -> StreamConfig:
        return self._configs.get(name) or _DEFAULT_STREAM

    def get(self, name: str) -> Stream:
        stream = self._streams.get(name)
        if stream is None:
            config = self._config_of(name)
            stream = self._streams[name] = Stream(
                name,
                max_metadata_types=config.max_metadata_types,
                max_metadata_bytes=config.max_metadata_bytes,
            )
            stream.run_starts = frozenset(config.run_starts)
        return stream

    def __iter__(self) -> Iterator[Stream]:
        return iter(list(self._streams.values()))

    def end_all(self, reason: str) -> None:
        for stream in self:
            stream.end_subscriptions(reason)
