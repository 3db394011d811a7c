"""What a consuming endpoint holds for its far end: its :class:`Outbox`.

Every endpoint that delivers a stream somewhere that can be away or slow (a ``sender``, a
``link``, a ``recorder``, a ``bridge``, a publishing ``nats`` endpoint) takes its frames from
an outbox, configured by its ``[buffer]`` table:

``type = "memory"`` (the default)
    The outbox is the endpoint's stream subscription, bounded in frames and bytes. With
    ``when_full = "block"`` a full queue holds the stream back (lossless); with
    ``"drop_oldest"`` (or a lossy ``policy``) the oldest DATA frames go, metadata never.
``type = "disk"``
    The subscription is only a small hand-over: :meth:`Outbox.run` takes in each batch it
    yields and appends it to a :class:`~framewire.daemon.buffer.DiskBuffer`, so the stream
    is never held back while the disk has room; frames outlive the daemon (SIGKILL
    included) and are delivered afterwards, in order.

The delivery side is the same for both, and speaks in frames taken and delivered::

    outbox.rewind()                 # a new connection: what was taken comes again
    replay = outbox.metadata()      # the metadata current for the next frame to deliver
    while True:
        batch = await outbox.take()  # the next frames after those taken (None: the
        ...                          #   subscription ended; it has subscribed again)
        await outbox.done(len(batch))  # delivered: a disk buffer consumes them

Several batches may be taken before the first is done (a publisher with windows in flight);
:meth:`Outbox.done` always means the oldest ones. Delivery is at least once for what was
taken and not done: after :meth:`Outbox.rewind` (or a disk buffer that broke and was opened
again) it is taken again.

On a stop request the endpoint calls :meth:`Outbox.stop`: a memory outbox's subscription
ends, so :meth:`take` gives what is queued and then None (the endpoint may send it within the
grace period); a disk outbox stops delivering at once and its intake puts what the
subscription still holds into the buffer first (:meth:`Outbox.run` returns when it has).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import trio

from ..config import BufferConfig, format_size
from ..frame import Frame, frame_count
from .buffer import DiskBuffer
from .endpoints._base import EndpointStatus
from .flow import BATCH_BYTES, BATCH_FRAMES
from .statedir import buffer_directory
from .stream import MetadataCache, QueueBounds, Subscription, SubscriptionClosed

__all__ = ["Outbox", "OutboxCutOff", "QueuedConfig"]


class QueuedConfig(Protocol):
    """The configuration of an endpoint with a queue for its far end and a ``[buffer]``."""

    @property
    def buffer(self) -> BufferConfig: ...
    @property
    def max_queue_frames(self) -> int: ...
    @property
    def queue_bytes(self) -> int: ...


class OutboxCutOff(Exception):
    """A memory outbox's subscription was cut off (its metadata passed the hard cap). The
    endpoint decides: :meth:`Outbox.resubscribe`, or fail (and be restarted)."""


class Outbox:
    """One consuming endpoint's frames for its far end, in memory or on disk.

    ``subscribe`` makes the endpoint's subscription (its bounds, policy, label and owner);
    the outbox calls it at the start and whenever the subscription ended. ``directory`` is
    the disk buffer's (required for ``type = "disk"``). Create one per endpoint: its
    totals and its disk buffer outlive the endpoint's restarts.
    """

    def __init__(
        self,
        config: BufferConfig,
        subscribe: Callable[[], Subscription],
        *,
        status: EndpointStatus,
        log: logging.Logger,
        directory: Path | None = None,
        queue_bytes: int | None = None,
        queue_frames: int | None = None,
    ) -> None:
        self.config = config
        self._subscribe_fn = subscribe
        self.status = status
        self.log = log
        #: The memory queue's bounds, for status (``buffer_max_bytes`` and "full").
        self._queue_bytes = queue_bytes
        self._queue_frames = queue_frames
        self.disk: DiskBuffer | None = None
        if config.is_disk:
            assert directory is not None, "a disk outbox needs its directory"
            self.disk = DiskBuffer(directory, config, status=status, log=log)
        self.subscription: Subscription | None = None
        #: Metadata as of the next frame to deliver.
        self.delivered = MetadataCache()
        #: Frames taken and not yet done, oldest first (memory: the frames themselves).
        self._taken: list[Frame] = []
        #: How many of :attr:`_taken` have been handed out since the last rewind.
        self._handed = 0
        #: Frames taken from a disk buffer before it was opened again, not yet done.
        self._stale = 0
        #: DATA frames the endpoint dropped after taking them (a core NATS publisher that
        #: could not hand them to nats-py), counted in :attr:`frames_dropped`.
        self.dropped_after_taking = 0
        #: Frames each taken batch stands for (a block of frames counts its frames).
        self.last_batch_frames = 0
        self._dropped_before = 0
        self._stopping = False
        self._metadata_loaded = False
        #: The intake's batch not yet in the disk buffer (kept across a restart).
        self._intake: list[Frame] = []
        self.finished = trio.Event()
        #: Why the last subscription ended (when :meth:`take` returned None).
        self.end_reason = ""
        status.refresh = self.report

    @classmethod
    def of(
        cls,
        endpoint: str,
        config: QueuedConfig,
        subscribe: Callable[[], Subscription],
        *,
        status: EndpointStatus,
        log: logging.Logger,
    ) -> Outbox:
        """The outbox of endpoint ``endpoint``, as its ``[buffer]`` table and queue bounds
        say (a disk buffer in its ``path``, else under the state directory)."""
        return cls(
            config.buffer,
            subscribe,
            status=status,
            log=log,
            directory=buffer_directory(endpoint, config.buffer),
            queue_bytes=config.queue_bytes,
            queue_frames=config.max_queue_frames,
        )

    def rebound_to(self, config: QueuedConfig, bounds: QueueBounds | None = None) -> None:
        """:meth:`rebound` to the queue bounds of ``config`` (``bounds``: the subscription's,
        when they say more than frames and bytes)."""
        bounds = bounds or QueueBounds(config.max_queue_frames, config.queue_bytes)
        self.rebound(bounds, queue_frames=config.max_queue_frames, queue_bytes=config.queue_bytes)

    @property
    def is_disk(self) -> bool:
        return self.disk is not None

    # -- subscription -----------------------------------------------------------------------

    def start(self) -> Subscription:
        """Subscribe (again): called when the endpoint starts. Returns the subscription."""
        self._stopping = False
        self.finished = trio.Event()
        return self._resubscribe()

    def resubscribe(self) -> Subscription:
        """Replace the subscription (after it was cut off: see :class:`OutboxCutOff`)."""
        return self._resubscribe()

    def _resubscribe(self) -> Subscription:
        old = self.subscription
        if old is not None:
            self._dropped_before += old.frames_dropped
            old.close("replaced by a new subscription")
        self.subscription = self._subscribe_fn()
        if self.disk is None:
            # The new subscription replays the stream's metadata itself; what was taken from
            # the old one is still delivered first.
            self.delivered.clear()
        self.report()
        return self.subscription

    def rebound(self, bounds: QueueBounds, *, queue_frames: int, queue_bytes: int) -> None:
        """A reload changed the endpoint's queue bounds in place: the live subscription takes
        ``bounds`` now (a lossy one drops its oldest data above a lowered bound; a lossless
        one drops nothing: see :meth:`Subscription.reconfigure`), status reports
        ``queue_frames`` and ``queue_bytes`` as the memory queue's bounds. The endpoint's
        ``subscribe`` makes the next subscription with them too. A disk buffer's own bounds
        are its ``[buffer]`` table's, never changed here."""
        self._queue_frames, self._queue_bytes = queue_frames, queue_bytes
        subscription = self.subscription
        if subscription is not None and not subscription.closed:
            subscription.reconfigure(bounds=bounds)
        self.report()

    def stop(self, reason: str) -> None:
        """The endpoint is stopping: end the subscription gracefully (see the module doc)."""
        self._stopping = True
        if self.subscription is not None:
            self.subscription.end(reason)
        if self.disk is None:
            self.finished.set()

    def close(self, reason: str) -> None:
        """The endpoint stopped: close the subscription (the stream forgets it). What a
        memory buffer still held (queued, or taken and not done) is lost: one WARNING says
        how much, and its DATA frames count in ``frames_dropped``. (A disk buffer keeps its
        frames for the next start.)"""
        subscription = self.subscription
        if subscription is not None and self.disk is None:
            frames = subscription.queued_frames + frame_count(self._taken)
            nbytes = subscription.queued_bytes + sum(frame.size for frame in self._taken)
            if frames:
                taken = [frame for frame in self._taken if not frame.is_metadata]
                data = frame_count(taken) + subscription.queued_data_frames
                self.dropped_after_taking += data
                self.log.warning(
                    "%d frames (%s) it still held are lost: %s "
                    '(a [buffer] of type = "disk" keeps them for the next start)',
                    frames,
                    format_size(nbytes),
                    reason,
                )
            self._taken = []
            self._handed = 0
        if subscription is not None:
            subscription.close(reason)
        self.report()

    # -- the disk buffer's own work --------------------------------------------------------

    async def run(self) -> None:
        """A disk outbox's upkeep and intake, until :meth:`stop` and the intake put what the
        subscription held into the buffer (then the buffer is closed); returns at once for a
        memory outbox. Run it in the endpoint's nursery after :meth:`start`."""
        disk = self.disk
        if disk is None:
            return
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(disk.keep_open)
                await self._take_in(disk)
                nursery.cancel_scope.cancel()
        finally:
            self.finished.set()

    async def _take_in(self, disk: DiskBuffer) -> None:
        """Put every batch the subscription yields into the disk buffer, in order."""
        while True:
            if not self._intake:
                subscription = self.subscription
                assert subscription is not None, "run() before start()"
                try:
                    self._intake = await subscription.receive_batch(BATCH_FRAMES, BATCH_BYTES)
                except SubscriptionClosed as closed:
                    if self._stopping:
                        return
                    if closed.graceful:
                        self.log.info("subscribing again: %s", closed.reason)
                    else:  # cut off (its metadata passed the hard cap): not in a loop
                        self.log.warning("subscribing again in 1s: %s", closed.reason)
                        await trio.sleep(1.0)
                    self._resubscribe()
                    continue
            await disk.put(self._intake)
            self._intake = []

    # -- the delivery side ------------------------------------------------------------------

    def rewind(self) -> None:
        """A new connection: frames taken and not done are taken again first."""
        self._handed = 0

    async def metadata(self) -> list[Frame]:
        """The metadata current for the next frame to deliver (to replay on a new
        connection). A disk outbox waits for its buffer's first opening (what a previous run
        of the daemon delivered is kept beside the frames)."""
        if self.disk is not None and not self._metadata_loaded:
            await self.disk.wait_open()
            if not self._metadata_loaded:
                for frame in self.disk.saved_metadata:
                    self.delivered.update(frame)
                self._metadata_loaded = True
        return list(self.delivered)

    async def take(
        self, max_frames: int = BATCH_FRAMES, max_bytes: int = BATCH_BYTES
    ) -> list[Frame] | None:
        """The next frames after those handed out since the last :meth:`rewind`, at least
        one (waits for them).

        A memory outbox returns None when its subscription ended gracefully (the stream
        ended, or :meth:`stop`): it has subscribed again unless stopping. Raises
        :class:`OutboxCutOff` when the subscription was cut off.
        A disk outbox never returns None.
        """
        if self._handed < len(self._taken):
            batch = self._taken[self._handed : self._handed + max_frames]
            self._handed += len(batch)
            self.last_batch_frames = frame_count(batch)
            return batch
        if self.disk is not None:
            skip = len(self._taken)
            held = sum(frame.size for frame in self._taken)
            while True:
                frames = await self.disk.read(skip + max_frames, held + max_bytes, skip=skip)
                if frames is not None:
                    break
                # The buffer was opened again: what was taken comes again from its start.
                self._forget_taken()
                skip = held = 0
        else:
            subscription = self.subscription
            assert subscription is not None, "take() before start()"
            self.report()
            try:
                frames = await subscription.receive_batch(max_frames, max_bytes)
            except SubscriptionClosed as closed:
                self.end_reason = closed.reason
                if not closed.graceful:
                    raise OutboxCutOff(closed.reason) from None
                if not self._stopping:
                    self._resubscribe()
                else:
                    # An ended subscription answers at once: a caller that takes again
                    # while stopping must still reach a checkpoint (and its cancellation).
                    await trio.lowlevel.checkpoint()
                return None
            self.last_batch_frames = subscription.last_batch_frames
            if self._taken:
                self._taken += frames
            else:
                self._taken = list(frames)
            self._handed = len(self._taken)
            return frames
        self._taken += frames
        self._handed = len(self._taken)
        self.last_batch_frames = len(frames)  # a disk buffer holds frames one by one
        return frames

    async def done(self, count: int) -> None:
        """The oldest ``count`` frames taken were delivered: forget them (a disk buffer
        consumes them, and saves the metadata delivered so far if they changed it).

        Frames taken before a disk buffer broke and was opened again are not consumed
        when they are done: they were taken again from the reopened buffer, and are
        consumed when those are done (delivered twice, never lost)."""
        if self._stale:
            absorbed = min(count, self._stale)
            self._stale -= absorbed
            count -= absorbed
            if not count:
                return
        taken = self._taken
        if count >= len(taken):
            delivered, self._taken = taken, []
        else:
            delivered, self._taken = taken[:count], taken[count:]
        self._handed = max(0, self._handed - count)
        changed = False
        for frame in delivered:
            if frame.is_metadata:
                self.delivered.update(frame)
                changed = True
        if self.disk is not None:
            saved = list(self.delivered) if changed else None
            if not await self.disk.commit(count, saved):
                # The buffer broke and was opened again: everything comes again.
                self._forget_taken()

    def _forget_taken(self) -> None:
        """The disk buffer was opened again: what was taken comes again from its oldest
        frame; frames of the old reading still to be done are stale (see :meth:`done`)."""
        self._stale += len(self._taken)
        self._taken = []
        self._handed = 0

    @property
    def taken_frames(self) -> int:
        """Frames taken and not yet done (memory: held outside the subscription's queue)."""
        return frame_count(self._taken)

    def waiting(self) -> tuple[int, int]:
        """Frames and bytes waiting beyond those taken, so that :meth:`take` returns at once
        when the frames are not 0 (a disk buffer: as of its last operation; its bytes are
        those of its files, record headers included)."""
        if self.disk is not None:
            stats = self.disk.stats
            frames = stats.frames - len(self._taken) if stats is not None else 0
            if frames <= 0 or stats is None:
                return 0, 0
            return frames, max(0, stats.bytes - sum(frame.size for frame in self._taken))
        subscription = self.subscription
        if subscription is None:
            return 0, 0
        return subscription.queued_frames, subscription.queued_bytes

    # -- status ---------------------------------------------------------------------------

    @property
    def frames_dropped(self) -> int:
        """DATA frames the buffer dropped (a full ``drop_oldest`` buffer, a lossy queue)."""
        current = self.subscription.frames_dropped if self.subscription is not None else 0
        dropped = self._dropped_before + current + self.dropped_after_taking
        if self.disk is not None:
            dropped += self.disk.dropped_frames
        return dropped

    def report(self) -> None:
        """Bring the endpoint's status up to date: ``frames_dropped``,
        ``detail.queue_frames`` and ``detail.queue_bytes`` (what waits in memory: the
        subscription's queue and the frames taken and not yet done) with the queue's bounds
        ``detail.queue_max_frames`` and ``detail.queue_max_bytes`` (once subscribed), and a
        memory buffer's ``detail.buffer_*`` (a disk buffer reports its own)."""
        status = self.status
        detail = status.detail
        subscription = self.subscription
        taken = frame_count(self._taken)
        taken_bytes = sum(frame.size for frame in self._taken)
        queued_frames = subscription.queued_frames if subscription is not None else 0
        queued_bytes = subscription.queued_bytes if subscription is not None else 0
        status.frames_dropped = self.frames_dropped
        detail["queue_frames"] = queued_frames + taken
        detail["queue_bytes"] = queued_bytes + taken_bytes
        if subscription is not None:
            detail["queue_max_frames"] = subscription.bounds.max_frames
            detail["queue_max_bytes"] = subscription.bounds.max_bytes
        if self.disk is not None:
            return
        full = subscription is not None and (
            (self._queue_frames is not None and queued_frames >= self._queue_frames)
            or (self._queue_bytes is not None and queued_bytes >= self._queue_bytes)
        )
        detail["buffer_type"] = "memory"
        detail["buffer_max_bytes"] = self._queue_bytes
        detail["buffer_corrupt_records"] = 0
        detail["buffer_frames"] = queued_frames + taken
        detail["buffer_bytes"] = queued_bytes + taken_bytes
        detail["buffer_dropped_frames"] = self.frames_dropped
        detail["buffer_state"] = "full" if full else "ok"
