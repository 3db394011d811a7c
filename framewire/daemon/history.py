"""A stream's history in the daemon: the writer that appends every publish to disk, and
the arrival clock its index runs on.

Each stream with ``[streams.NAME.history]`` has one :class:`HistoryWriter`. The stream hands
it every publish (:meth:`HistoryWriter.offer`, synchronous, from inside the publish: a deque
append and a few counters, so the live path does not wait for the disk). The writer's task
takes what has queued and has it appended, one round at a time, by the history's own
thread (:class:`DiskThread`), which runs at a lower CPU priority than the rest of the
daemon (niceness :data:`WRITER_NICENESS` above it): when the machine's CPUs are all busy,
the live relay gets them first and the history falls behind. The queue is bounded in bytes
(``max_queue_bytes``): when the history is behind (its disk, or its share of the CPU,
cannot keep up), DATA frames are dropped *from the history* and counted
(:attr:`frames_dropped`; status says ``state = "behind"``, one log line when it starts and
one when it has caught up); the live stream is never held. METADATA frames are always
queued, so a replay never lacks the metadata it should start with.

A write that fails (the disk full, an I/O error) loses its frames from the history
(:attr:`frames_failed`); the writer goes on with the next round. Status says ``state =
"failing"`` with the error, the log says so once, and once again when writes succeed
again. A directory removed under the history is made again at the next write (its lost
segments are forgotten, and logged).

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

import contextlib
import logging
import math
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Final, TypeVar

import outcome
import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..frame import Frame
from ..spool import SpoolClosed, SpoolError, StreamHistory
from ..spool._history import HistoryReader

if TYPE_CHECKING:
    from .stream import Stream

__all__ = [
    "BEHIND_LOG_INTERVAL",
    "HISTORY_STATES",
    "TRIM_INTERVAL",
    "WRITER_NICENESS",
    "ArrivalClock",
    "DiskThread",
    "HistoryWriter",
    "history_metrics",
]

log = logging.getLogger("framewire.history")

#: How often a quiet history is trimmed by ``max_age`` (seconds).
TRIM_INTERVAL = 1.0
#: How much lower the CPU priority of a history's thread is than the daemon's (Linux
#: niceness; 0 where a thread's own priority cannot be set). Mild on purpose: the thread
#: holds Python's GIL for its records' bookkeeping, and one that the kernel sets aside while
#: it holds the GIL stalls the relay's thread until it runs again. At +10 on a busy machine
#: that stalled the relay for up to hundreds of milliseconds (benchmarks/README.md, the
#: latency section); at +3 the relay still gets about twice its share of a CPU.
WRITER_NICENESS: Final = 3

#: A history that falls behind again and again says so at most once this often (seconds),
#: and that it has caught up (with the frames left out since the last such line) after
#: each time it said so.
BEHIND_LOG_INTERVAL: Final = 60.0
#: Every state a history's writer can be in (``streams.NAME.history.state`` in status).
HISTORY_STATES: Final = ("ok", "behind", "failing", "closed")

_T = TypeVar("_T")


class DiskThread:
    """One OS thread of its own for a history's disk work, at a lower CPU priority
    (:data:`WRITER_NICENESS`), running one call at a time in the order given.

    Trio's worker threads are shared and cached, so their priority is not ours to lower;
    this one lives from :meth:`start` until :meth:`stop`. A call cannot be cancelled once
    handed over (as ``trio.to_thread.run_sync`` by default): it finishes, then the caller
    sees the cancellation at its next checkpoint.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._calls: queue.SimpleQueue[
            tuple[Callable[[], object], Callable[[outcome.Outcome[object]], None]] | None
        ] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        #: The niceness the thread runs at above the daemon's (0 if it could not be set).
        self.niceness = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            tid = threading.get_native_id()
            base = os.getpriority(os.PRIO_PROCESS, tid)
            os.setpriority(os.PRIO_PROCESS, tid, min(19, base + WRITER_NICENESS))
            self.niceness = os.getpriority(os.PRIO_PROCESS, tid) - base
        while (call := self._calls.get()) is not None:
            function, deliver = call
            deliver(outcome.capture(function))

    async def run_sync(self, function: Callable[[], _T]) -> _T:
        """Run ``function`` in the thread and return what it returns (or raise what it
        raises)."""
        if self._thread is None:
            raise RuntimeError(f"{self.name} is not started")
        task = trio.lowlevel.current_task()
        token = trio.lowlevel.current_trio_token()

        def deliver(result: outcome.Outcome[object]) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)

        self._calls.put((function, deliver))
        result: _T = await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        return result

    def stop(self) -> None:
        """Let the thread end once the calls handed over are done."""
        self._calls.put(None)


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
        #: Frames appended to the history by this writer.
        self.frames_written = 0
        #: ``ok``; ``behind`` while frames are dropped because the queue is full; ``failing``
        #: while writes fail (:attr:`last_error` says why); ``closed``.
        self.state = "ok"
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self._thread = DiskThread(f"framewire-history-{stream}")
        self._wakeup = trio.Event()
        self._progress = trio.Event()
        self._stopping = False
        self._dropped_at_start = 0  # frames_dropped at the last "caught up" line
        self._behind_logged = False
        self._next_behind_line = -math.inf
        self._failed_at_start = 0  # frames_failed when the state became "failing"
        self._directory_lost = history.directory_lost
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
            if self.state == "ok":
                self.state = "behind"
                now = trio.current_time()
                if now >= self._next_behind_line:
                    self._next_behind_line = now + BEHIND_LOG_INTERVAL
                    self._behind_logged = True
                    log.warning(
                        "stream %r: the history is behind (its disk or its share of the CPU "
                        "cannot keep up): frames are left out of the history, the live "
                        "stream is not held; see streams.%s.history in status",
                        self.stream,
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
        self._thread.start()
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
                        await self._thread.run_sync(partial(self._trim, now))
                    continue
                batches = list(self._queue)
                self._queue.clear()
                self._queued_bytes = 0
                end, written, failed, error = await self._thread.run_sync(
                    partial(self._append_all, batches)
                )
                self.frames_written += written
                if failed and self.state != "failing":
                    self._failed_at_start = self.frames_failed
                self.frames_failed += failed
                self.written = max(self.written, end)
                self._after_round(error)
                self._progress.set()
                self._progress = trio.Event()
        finally:
            with trio.CancelScope(shield=True):
                await self._thread.run_sync(self.history.close)
            self._thread.stop()
            self._stopping = True
            self.state = "closed"
            self._progress.set()
            self.finished.set()

    def _after_round(self, error: str | None) -> None:
        """Say (once) what changed with the round just written: a failure, a recovery, the
        end of dropping, a directory made again."""
        lost = self.history.directory_lost
        if lost != self._directory_lost:
            self._directory_lost = lost
            log.error(
                "stream %r: the history's directory %s was gone; made again, the history "
                "starts anew there (what it held is lost)",
                self.stream,
                self.history.path,
            )
        if error is not None:
            self.last_error, self.last_error_at = error, time.time()
            if self.state != "failing":
                self.state = "failing"
                log.error(
                    "stream %r: the history cannot write (frames are left out of it until "
                    "it can, the live stream is not held): %s",
                    self.stream,
                    error,
                )
            return
        if self.state == "failing":
            log.warning(
                "stream %r: the history writes again (%d frames were lost meanwhile)",
                self.stream,
                self.frames_failed - self._failed_at_start,
            )
            self.state = "ok"
        elif self.state == "behind" and not self._queue:
            if self._behind_logged:
                self._behind_logged = False
                log.warning(
                    "stream %r: the history has caught up (%d frames were left out of it "
                    "since the last such line)",
                    self.stream,
                    self.frames_dropped - self._dropped_at_start,
                )
                self._dropped_at_start = self.frames_dropped
            self.state = "ok"

    def _append_all(
        self, batches: list[tuple[Sequence[Frame], int, int]]
    ) -> tuple[int, int, int, str | None]:
        """In the history's thread: append the round's batches (as few writes as the
        segments allow). Returns the sequence number after the last batch, the frames
        written, the frames of failed batches, and the last error (None: none)."""
        last_frames, _, last_first = batches[-1]
        end = last_first + sum(frame.nframes for frame in last_frames)
        try:
            written, failed, error = self.history.append_batches(batches)
        except SpoolError as exc:  # closed under the writer: only while stopping
            count = end - batches[0][2]
            return end, 0, count, str(exc)
        return end, written, failed, None if error is None else str(error)

    def _trim(self, now: int) -> None:
        try:
            self.history.trim(now)
        except SpoolError as exc:  # pragma: no cover - deleting files seldom fails
            log.warning("stream %r: cannot trim the history: %s", self.stream, exc)

    def stop(self) -> None:
        """Take no more frames; :meth:`run` writes what is queued, closes and returns."""
        self._stopping = True
        self._wakeup.set()

    async def set_bounds(
        self,
        *,
        max_bytes: int,
        max_age: float | None,
        max_queue_bytes: int,
        run_starts: frozenset[str],
    ) -> int:
        """Bound the history anew and set the metadata types that start a run (a reload),
        in its thread between two rounds: what the new bounds do not allow goes at once.
        Returns how many segments went. Raises :class:`~framewire.spool.SpoolClosed` if the
        history is closed."""
        if self.history_closed:
            raise SpoolClosed(f"history {self.history.path} is closed")
        self.max_queue_bytes = max_queue_bytes
        history = self.history

        now = self.clock()

        def apply() -> int:
            history.run_starts = run_starts
            return history.set_bounds(max_bytes=max_bytes, max_age=max_age, now_ns=now)

        return await self._thread.run_sync(apply)

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

    def detail(self) -> dict[str, int | float | str | None]:
        """The figures status shows under ``streams.NAME.history``."""
        stats = self.history.stats()
        return {
            "state": self.state,
            "last_error": self.last_error,
            "last_error_at": None if self.last_error_at is None else round(self.last_error_at, 3),
            "path": str(self.history.path),
            "max_bytes": self.history.max_bytes,
            "max_age": None if self.history.max_age_ns is None else self.history.max_age_ns / 1e9,
            "bytes": stats.bytes,
            "segments": stats.segments,
            "frames": stats.frames,
            "oldest_ns": stats.oldest_ns,
            "newest_ns": stats.newest_ns,
            "frames_written": self.frames_written,
            "frames_dropped": self.frames_dropped,
            "frames_failed": self.frames_failed,
            "segments_dropped": stats.segments_dropped,
            "queued_frames": self.assigned - self.written,
            "span_seconds": (stats.newest_ns - stats.oldest_ns) / 1e9 if stats.oldest_ns else 0.0,
        }


def history_metrics(streams: Iterable[Stream]) -> Iterable[Metric]:
    """The Prometheus metrics of every stream's history (``framewire_history_*``, labelled
    by stream; streams without a history have no series). A history's counters start at
    zero when the daemon opens it (at start, or a reload that adds it)."""
    labels = ["stream"]
    gauges = {
        key: GaugeMetricFamily(name, text, labels=labels)
        for key, name, text in (
            ("bytes", "framewire_history_bytes", "Bytes of a stream's history on disk"),
            (
                "frames",
                "framewire_history_frames",
                "Frames a stream's history keeps (numbered from its oldest segment on)",
            ),
            ("segments", "framewire_history_segments", "Segment files of a stream's history"),
            (
                "queued_frames",
                "framewire_history_queued_frames",
                "Frames handed to a stream's history, not yet on disk",
            ),
            ("max_bytes", "framewire_history_max_bytes", "The bound of a stream's history"),
        )
    }
    counters = {
        key: CounterMetricFamily(name, text, labels=labels)
        for key, name, text in (
            (
                "frames_written",
                "framewire_history_frames_written",
                "Frames written to a stream's history",
            ),
            (
                "frames_dropped",
                "framewire_history_frames_dropped",
                "Frames left out of a stream's history because it was behind (never held "
                "back from the live stream)",
            ),
            (
                "frames_failed",
                "framewire_history_frames_failed",
                "Frames lost from a stream's history because a write failed",
            ),
        )
    }
    oldest = GaugeMetricFamily(
        "framewire_history_oldest_age_seconds",
        "Age of the oldest frame a stream's history keeps: how far back a rewind can go "
        "(no series while it is empty)",
        labels=labels,
    )
    state = GaugeMetricFamily(
        "framewire_history_state",
        "1 for the state a stream's history is in (ok, behind, failing, closed), else 0",
        labels=["stream", "state"],
    )
    for stream in list(streams):
        writer = stream.history
        if not isinstance(writer, HistoryWriter):
            continue
        detail = writer.detail()
        for key, gauge in gauges.items():
            gauge.add_metric([stream.name], _number(detail[key]))
        for key, counter in counters.items():
            counter.add_metric([stream.name], _number(detail[key]))
        oldest_ns = detail["oldest_ns"]
        if isinstance(oldest_ns, int) and oldest_ns:
            oldest.add_metric([stream.name], max(0.0, (writer.clock() - oldest_ns) / 1e9))
        for each in HISTORY_STATES:
            state.add_metric([stream.name, each], 1 if writer.state == each else 0)
    yield from (*gauges.values(), *counters.values(), oldest, state)


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0
