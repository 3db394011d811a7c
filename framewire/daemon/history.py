"""A stream's history in the daemon: the writer that appends every publish to disk, and
the arrival clock its index runs on.

Each stream with ``[streams.NAME.history]`` has one :class:`HistoryWriter`. The stream hands
it every publish (:meth:`HistoryWriter.offer`, synchronous, from inside the publish: a deque
append and a few counters, so the live path does not wait for the disk). The writer's task
takes what has queued and appends it with one ``trio.to_thread`` hop per round, as the disk
buffers do. The queue is bounded in bytes (``max_queue_bytes``): when the disk cannot keep
up, DATA frames are dropped *from the history* and counted (:attr:`frames_dropped`, the
status and the log say so); the live stream is never held. METADATA frames are always
queued, so a replay never lacks the metadata it should start with.

Sequence numbers: every frame queued gets the history's next sequence number at once,
while the publish runs. So a server that subscribes a client to the live stream and reads
:attr:`HistoryWriter.assigned` in the same step (no checkpoint between) knows exactly where
the history ends and the live queue begins: the seam of a rewind has no gap and no
duplicate (:func:`framewire.daemon.endpoints.server`).

Arrival clock: the index is by the time the stream published the frames, in nanoseconds
since the Unix epoch, as :class:`ArrivalClock` tells it: the wall clock when the writer
started, plus trio's clock since then. So arrival times never go back (a wall clock step
moves nothing) and follow a test's MockClock; they drift from the wall clock as trio's
monotonic clock does (seconds a month at worst), and each daemon start anchors them again.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence

import trio

from ..frame import Frame
from ..spool import SpoolError, StreamHistory
from ..spool._history import HistoryReader

__all__ = ["TRIM_INTERVAL", "ArrivalClock", "HistoryWriter"]

log = logging.getLogger("framewire.history")

#: How often a quiet history is trimmed by ``max_age`` (seconds).
TRIM_INTERVAL = 1.0


class ArrivalClock:
    """Nanoseconds since the Unix epoch: the wall clock at construction plus trio's clock
    since (see the module docstring). Construct it inside trio."""

    def __init__(self) -> None:
        self._wall = time.time_ns()
        self._trio = trio.current_time()

    def __call__(self) -> int:
        return self._wall + int((trio.current_time() - self._trio) * 1e9)


class HistoryWriter:
    """Appends a stream's publishes to its :class:`StreamHistory` (see the module
    docstring). ``offer`` is called by the stream; :meth:`run` is the writer's task."""

    def __init__(
        self, stream: str, history: StreamHistory, *, max_queue_bytes: int, clock: ArrivalClock
    ) -> None:
        self.stream = stream
        self.history = history
        self.max_queue_bytes = max_queue_bytes
        self.clock = clock
        self._queue: deque[tuple[Sequence[Frame], int, int]] = deque()
        self._queued_bytes = 0
        #: The sequence number the next frame offered gets.
        self.assigned = history.next_seq
        #: Every frame numbered below this is on disk (or was lost trying).
        self.written = history.next_seq
        #: DATA frames not kept because the queue was full, and frames a failed write lost.
        self.frames_dropped = 0
        self.frames_failed = 0
        self._wakeup = trio.Event()
        self._progress = trio.Event()
        self._stopping = False
        self._warned_drop = False
        #: Set when :meth:`run` has returned (the history closed).
        self.finished = trio.Event()

    # -- the stream's side ------------------------------------------------------------------

    def offer(self, frames: Sequence[Frame], count: int, size: int) -> None:
        """Queue a publish (``count`` frames, blocks counted by their frames, ``size``
        bytes) for the disk. Never waits, never raises; DATA is dropped (and counted) when
        the queue is full."""
        if self._stopping:
            return
        if self._queue and self._queued_bytes + size > self.max_queue_bytes:
            kept = [frame for frame in frames if frame.is_metadata]
            self.frames_dropped += count - len(kept)
            if not self._warned_drop:
                self._warned_drop = True
                log.warning(
                    "stream %r: the history's disk is behind: frames are left out of the "
                    "history (the live stream is not held); see detail.history",
                    self.stream,
                )
            if not kept:
                return
            frames, count, size = kept, len(kept), sum(frame.size for frame in kept)
        self._queue.append((frames, self.clock(), self.assigned))
        self._queued_bytes += size
        self.assigned += count
        self._wakeup.set()

    # -- the writer task --------------------------------------------------------------------

    async def run(self) -> None:
        """Append what is queued, round after round; trim by age when quiet. Returns after
        :meth:`stop` once everything queued is written, closing the history."""
        try:
            while True:
                if not self._queue:
                    if self._stopping:
                        return
                    with trio.move_on_after(TRIM_INTERVAL):
                        await self._wakeup.wait()
                    self._wakeup = trio.Event()
                if not self._queue:
                    if self.history.max_age_ns is not None:
                        now = self.clock()
                        await trio.to_thread.run_sync(self._trim, now)
                    continue
                batches = list(self._queue)
                self._queue.clear()
                self._queued_bytes = 0
                self._warned_drop = False
                end = await trio.to_thread.run_sync(self._append_all, batches)
                self.written = max(self.written, end)
                self._progress.set()
                self._progress = trio.Event()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.history.close)
            self._stopping = True
            self._progress.set()
            self.finished.set()

    def _append_all(self, batches: list[tuple[Sequence[Frame], int, int]]) -> int:
        """In the worker thread: append each batch; a failed one is counted and logged.
        Returns the sequence number after the last batch."""
        history = self.history
        end = self.written
        for frames, arrival, first in batches:
            try:
                history.append(frames, arrival, seq=first)
            except SpoolError as exc:
                lost = sum(frame.nframes for frame in frames)
                self.frames_failed += lost
                log.warning(
                    "stream %r: %d frames left out of the history: %s", self.stream, lost, exc
                )
            end = first + sum(frame.nframes for frame in frames)
        return end

    def _trim(self, now: int) -> None:
        try:
            self.history.trim(now)
        except SpoolError as exc:  # pragma: no cover - deleting files seldom fails
            log.warning("stream %r: cannot trim the history: %s", self.stream, exc)

    def stop(self) -> None:
        """Take no more frames; :meth:`run` writes what is queued, closes and returns."""
        self._stopping = True
        self._wakeup.set()

    # -- readers ----------------------------------------------------------------------------

    async def wait_written(self, seq: int) -> None:
        """Wait until every frame numbered below ``seq`` is on disk (or lost trying)."""
        while self.written < seq and not self.history_closed:
            await self._progress.wait()

    @property
    def history_closed(self) -> bool:
        return self.finished.is_set()

    async def reader(self, since_ns: int, end_seq: int) -> HistoryReader:
        """A reader from ``since_ns`` up to ``end_seq`` (in a worker thread: it reads the
        index). Raises :class:`~framewire.spool.SpoolError` if the history is closed."""
        return await trio.to_thread.run_sync(self.history.reader, since_ns, end_seq)

    def detail(self) -> dict[str, int | float]:
        """The figures status shows under ``detail.history``."""
        stats = self.history.stats()
        return {
            "bytes": stats.bytes,
            "segments": stats.segments,
            "oldest_ns": stats.oldest_ns,
            "newest_ns": stats.newest_ns,
            "frames_dropped": self.frames_dropped,
            "frames_failed": self.frames_failed,
            "queued_frames": self.assigned - self.written,
            "span_seconds": (stats.newest_ns - stats.oldest_ns) / 1e9 if stats.oldest_ns else 0.0,
        }
