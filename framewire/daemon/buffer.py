"""An endpoint's disk buffer: a :class:`~framewire.spool.DiskQueue` driven from trio.

The queue is synchronous and not thread-safe; :class:`DiskBuffer` makes every call (a whole
batch at a time) in one ``trio.to_thread`` hop, one hop at a time (a
``CapacityLimiter(1)``), and never cancels a hop halfway: a cancelled caller waits for its
hop to finish. Two tasks use it: an intake that :meth:`~DiskBuffer.put` s what the
endpoint's stream subscription yields, and a delivery that :meth:`~DiskBuffer.read` s the
oldest frames, writes them to the far end and then :meth:`~DiskBuffer.commit` s them (so
only the batch in flight can be delivered twice).

Faults never escape: a buffer that cannot be opened (its directory cannot be created or
written, another queue holds it: ``locked``), a full disk (``disk_full``) or a directory
deleted under it (``unwritable``) is one log line (and one more when it is well again),
``detail.buffer_state`` and ``last_error`` in the endpoint's status; the queue is opened
again after a backoff delay, and :meth:`~DiskBuffer.put` and :meth:`~DiskBuffer.read` wait
meanwhile, so the stream is held (nothing is lost that the buffer had not yet taken).
Records skipped as corrupt are counted (``detail.buffer_corrupt_records``) and logged, and
never delivered.

Beside the queue, the directory holds ``delivered-metadata``: the metadata current for the
next frame to deliver (its CRC-32 and the frames in the native format), written with a
rename whenever a committed batch changed it, so a restarted daemon replays the right
metadata to its reader first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final, TypeVar, TypeVarTuple

import trio

from ..config import BackoffConfig, BufferConfig
from ..frame import Frame
from ..protocols import ProtocolError
from ..protocols.native import NativeDecoder, NativeEncoder
from ..spool import (
    DiskQueue,
    RecordTooLarge,
    SpoolDiskFull,
    SpoolError,
    SpoolLocked,
    SpoolStats,
)
from .backoff import Backoff
from .endpoints._base import EndpointStatus
from .stream import split_blocks

__all__ = ["METADATA_FILE", "DiskBuffer"]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

#: The delivered metadata's file in a buffer directory (and its temporary name).
METADATA_FILE: Final = "delivered-metadata"
_METADATA_TMP: Final = METADATA_FILE + ".tmp"
#: The largest delivered-metadata file read back (the stream's cache is bounded anyway).
_METADATA_LIMIT: Final = 256 << 20
_CRC: Final = struct.Struct("<I")
#: Delays between attempts to open (again) a buffer that failed.
REOPEN_BACKOFF: Final = BackoffConfig(initial=0.5, maximum=30.0, factor=2.0, stable_after=60.0)
#: Delay before a write refused for a full disk is tried again.
DISK_FULL_RETRY: Final = 1.0


class DiskBuffer:
    """One endpoint's disk buffer in ``directory``. Create it once per endpoint (its totals
    outlive the endpoint's restarts); run :meth:`keep_open` in the endpoint's nursery."""

    def __init__(
        self,
        directory: Path,
        config: BufferConfig,
        *,
        status: EndpointStatus,
        log: logging.Logger,
    ) -> None:
        self.directory = directory
        self.config = config
        self.status = status
        self.log = log
        self._queue: DiskQueue | None = None
        self._limiter = trio.CapacityLimiter(1)
        self._backoff = Backoff(REOPEN_BACKOFF)
        #: Bumped (with their events set) when frames were added, and when room was freed;
        #: a reopen bumps both.
        self._data_version = 0
        self._room_version = 0
        self._data_event = trio.Event()
        self._room_event = trio.Event()
        self._broken_event = trio.Event()
        #: The queue the last read came from (a commit must go to the same one).
        self._read_from: DiskQueue | None = None
        self._opened = trio.Event()
        #: The metadata a previous run delivered last (loaded at the first open).
        self.saved_metadata: list[Frame] = []
        self._stats: SpoolStats | None = None
        #: Totals of queues opened before the current one (each counts from its open).
        self._dropped_before = 0
        self._corrupt_before = 0
        self._corrupt_seen = 0
        self._regions_seen = 0
        self._unsynced = False
        self.state = "opening"
        self.status.detail["buffer_error"] = None
        self._report()

    # -- status ---------------------------------------------------------------------------

    @property
    def stats(self) -> SpoolStats | None:
        """The queue's figures as of its last operation (None: not open)."""
        return self._stats

    @property
    def dropped_frames(self) -> int:
        stats = self._stats
        return self._dropped_before + (stats.dropped_frames if stats else 0)

    @property
    def corrupt_records(self) -> int:
        stats = self._stats
        return self._corrupt_before + (stats.corrupt_records if stats else 0)

    def _report(self) -> None:
        stats = self._stats
        detail = self.status.detail
        detail["buffer_type"] = "disk"
        detail["buffer_path"] = str(self.directory)
        detail["buffer_state"] = self.state
        detail["buffer_frames"] = stats.frames if stats else 0
        detail["buffer_bytes"] = stats.bytes if stats else 0
        detail["buffer_max_bytes"] = self.config.disk_max_size
        detail["buffer_dropped_frames"] = self.dropped_frames
        detail["buffer_corrupt_records"] = self.corrupt_records

    def _set_state(self, state: str, problem: str | None = None) -> None:
        """Enter ``state``; a fault is logged once (when the state changes), recovery once."""
        before = self.state
        self.status.detail["buffer_error"] = problem
        if problem is not None:
            self.status.record_error(problem)
            if state != before:
                self.log.error("%s", problem)
        elif state == "ok" and before not in ("ok", "full", "opening"):
            self.log.info("disk buffer %s works again (was %s)", self.directory, before)
        self.state = state
        self._report()

    def _update(self, stats: SpoolStats) -> None:
        self._stats = stats
        corrupt = stats.corrupt_records + self._corrupt_before
        regions = stats.corrupt_regions
        if corrupt > self._corrupt_seen or regions > self._regions_seen:
            lost = corrupt - self._corrupt_seen
            self._corrupt_seen = corrupt
            self._regions_seen = regions
            text = (
                f"disk buffer {self.directory}: skipped corrupt bytes ({stats.corrupt_bytes} "
                f"bytes in {regions} region(s) since it was opened); {lost} more record(s) "
                "lost, never delivered"
            )
            self.status.record_error(text)
            self.log.warning("%s", text)
        self._report()

    # -- the thread hop ---------------------------------------------------------------------

    async def _hop(self, call: Callable[[*Ts], T], *args: *Ts) -> T:
        """Run ``call(*args)`` in a worker thread, alone; a cancelled caller waits for it."""
        return await trio.to_thread.run_sync(call, *args, limiter=self._limiter)

    def _bump_data(self) -> None:
        self._data_version += 1
        self._data_event.set()
        self._data_event = trio.Event()

    def _bump_room(self) -> None:
        self._room_version += 1
        self._room_event.set()
        self._room_event = trio.Event()

    async def _wait_data(self, seen: int) -> None:
        while self._data_version == seen:
            await self._data_event.wait()

    async def _wait_room(self, seen: int) -> None:
        while self._room_version == seen:
            await self._room_event.wait()

    # -- opening and faults -----------------------------------------------------------------

    async def keep_open(self) -> None:
        """Open the queue, and open it again whenever it broke, until cancelled; then close
        it (the frames handed out and not committed are delivered again next time)."""
        try:
            while True:
                if self._queue is None:
                    if not await self._open():
                        await trio.sleep(self._backoff.next_delay())
                        continue
                    self._backoff.reset()
                with trio.move_on_after(self.config.sync_seconds):
                    await self._broken_event.wait()
                if self._broken_event.is_set():
                    self._broken_event = trio.Event()
                elif (
                    self._unsynced
                    and self._queue is not None
                    and self.config.sync_policy == "interval"
                ):
                    await self._sync()  # appends just before a quiet spell reach the disk too
        finally:
            with trio.CancelScope(shield=True):
                await self._close()

    async def _open(self) -> bool:
        config = self.config
        directory = self.directory

        def open_queue() -> tuple[DiskQueue, SpoolStats, list[Frame], str | None]:
            queue = DiskQueue.open(
                directory,
                max_size=config.disk_max_size,
                when_full=config.when_full,
                sync=config.sync_policy,
                sync_interval=config.sync_seconds,
            )
            try:
                return queue, queue.stats(), _load_metadata(directory), None
            except (OSError, ValueError) as exc:
                return queue, queue.stats(), [], f"{_text(exc)}; its metadata is not replayed"

        try:
            queue, stats, metadata, warning = await self._hop(open_queue)
        except SpoolLocked as exc:
            self._set_state("locked", f"cannot open the disk buffer: {exc}; retrying")
            return False
        except (SpoolError, OSError, ValueError) as exc:
            self._set_state("unwritable", f"cannot open the disk buffer: {_text(exc)}; retrying")
            return False
        if warning is not None:
            self.log.warning("disk buffer %s: %s", directory, warning)
        if not self._opened.is_set():
            self.saved_metadata = metadata
        self._queue = queue
        self._corrupt_seen = self._corrupt_before
        self._regions_seen = 0
        self._set_state("ok")
        self._update(stats)
        if stats.torn_bytes:
            self.log.info(
                "disk buffer %s: cut off %d bytes of a record a crash left unfinished",
                directory,
                stats.torn_bytes,
            )
        if stats.position_lost:
            self.log.warning(
                "disk buffer %s: its read position was lost; delivering again from the oldest "
                "frame it holds",
                directory,
            )
        self.log.info(
            "disk buffer %s: %d frames, %d of %d bytes",
            directory,
            stats.frames,
            stats.bytes,
            config.disk_max_size,
        )
        self._opened.set()
        self._bump_data()
        self._bump_room()
        return True

    async def _broken(self, exc: BaseException) -> None:
        """The queue failed: close it, say so, and have :meth:`keep_open` open it again."""
        queue, self._queue = self._queue, None
        self._read_from = None
        if queue is not None:
            self._retire_counts()
            await self._hop(_close_quietly, queue)
        self._set_state(
            "unwritable", f"disk buffer failed: {_text(exc)}; opening it again (retrying)"
        )
        self._broken_event.set()

    def _retire_counts(self) -> None:
        if self._stats is not None:
            self._dropped_before += self._stats.dropped_frames
            self._corrupt_before += self._stats.corrupt_records
            self._stats = None

    async def _close(self) -> None:
        queue, self._queue = self._queue, None
        self._read_from = None
        if queue is not None:

            def close() -> SpoolStats:
                stats = queue.stats()
                queue.close()
                return stats

            try:
                self._stats = await self._hop(close)
            except SpoolError as exc:
                self.log.warning("disk buffer %s: closing it failed: %s", self.directory, exc)
            self._report()  # what it holds as it closes
            self._retire_counts()
        self.state = "closed"
        self.status.detail["buffer_state"] = "closed"

    async def _sync(self) -> None:
        queue = self._queue
        assert queue is not None
        self._unsynced = False
        try:
            await self._hop(queue.sync)
        except SpoolError as exc:
            await self._broken(exc)

    async def wait_open(self) -> None:
        """Wait until the queue has been opened once (:attr:`saved_metadata` is loaded)."""
        await self._opened.wait()

    # -- the intake side --------------------------------------------------------------------

    async def put(self, frames: Sequence[Frame]) -> None:
        """Append ``frames`` in order; return once the buffer holds them all.

        Waits while the buffer is full (``block``; ``drop_oldest`` only when nothing more
        can be dropped), broken, or the disk is full. A frame too large for the buffer is
        left out, counted and logged (``detail.buffer_refused_frames``).
        """
        pending = split_blocks(frames)
        while pending:
            room_seen = self._room_version
            queue = self._queue
            if queue is None:
                await self._wait_room(room_seen)
                continue
            try:
                taken, refused, stats = await self._hop(_append, queue, pending)
            except SpoolDiskFull as exc:
                self._set_state("disk_full", f"{exc}; holding the stream, retrying")
                with trio.move_on_after(DISK_FULL_RETRY):
                    await self._wait_room(room_seen)
                continue
            except SpoolError as exc:
                if queue is self._queue:
                    await self._broken(exc)
                continue
            for frame in refused:
                self._refused(frame)
            self._update(stats)
            if taken:
                del pending[:taken]
                self._unsynced = True
                self._bump_data()
            if pending:
                if self.state != "full":
                    self._set_state("full")
                await self._wait_room(room_seen)
            elif self.state in ("disk_full", "full"):
                self._set_state("ok")

    def _refused(self, frame: Frame) -> None:
        count = self.status.detail.get("buffer_refused_frames", 0)
        self.status.detail["buffer_refused_frames"] = (count if isinstance(count, int) else 0) + 1
        self.log.warning(
            "disk buffer %s: a %r frame of %d bytes is too large for it (max_size %d); left out",
            self.directory,
            frame.type,
            frame.size,
            self.config.disk_max_size,
        )

    # -- the delivery side ------------------------------------------------------------------

    async def read(self, max_frames: int, max_bytes: int, *, skip: int = 0) -> list[Frame] | None:
        """The oldest frames after the first ``skip`` (at least one; waits for them), not
        consumed: the same come again until :meth:`commit`. Corrupt records are skipped and
        counted. ``max_frames`` and ``max_bytes`` count the skipped frames too.

        Returns None when ``skip`` frames were read from a queue that has since broken and
        been opened again (they come again from the oldest: read again with ``skip=0``).
        """
        while True:
            data_seen = self._data_version
            queue = self._queue
            if skip and queue is not self._read_from:
                return None
            if queue is not None:
                try:
                    batch, stats = await self._hop(_read, queue, max_frames, max_bytes, skip)
                except SpoolError as exc:
                    if queue is self._queue:
                        await self._broken(exc)
                    continue
                if queue is self._queue:
                    self._update(stats)
                    if batch:
                        self._read_from = queue
                        return batch
            await self._wait_data(data_seen)

    async def commit(self, count: int, metadata: Sequence[Frame] | None = None) -> bool:
        """Consume the first ``count`` frames :meth:`read` returned; with ``metadata``, save
        it as the metadata delivered so far. False if the buffer broke since (the frames are
        then read again)."""
        queue = self._queue
        if queue is None or queue is not self._read_from:
            return False
        directory = self.directory
        saved = list(metadata) if metadata is not None else None

        def commit() -> SpoolStats:
            queue.commit(count)
            if saved is not None:
                _save_metadata(directory, saved, fsync=self.config.sync_policy != "none")
            return queue.stats()

        try:
            stats = await self._hop(commit)
        except (SpoolError, OSError) as exc:
            if queue is self._queue:
                await self._broken(exc)
            return False
        self._update(stats)
        self._unsynced = True
        if self.state == "full":
            self._set_state("ok")
        self._bump_room()
        return True


def _append(queue: DiskQueue, frames: list[Frame]) -> tuple[int, list[Frame], SpoolStats]:
    """Append ``frames``: how many of them were dealt with (taken, or refused as too large),
    the refused ones, and the queue's stats. Runs in the worker thread."""
    try:
        return queue.append(frames), [], queue.stats()
    except RecordTooLarge:
        pass
    refused: list[Frame] = []
    done = 0
    for frame in frames:
        try:
            if queue.append([frame]) == 0:
                break
        except RecordTooLarge:
            refused.append(frame)
        done += 1
    return done, refused, queue.stats()


def _read(
    queue: DiskQueue, max_frames: int, max_bytes: int, skip: int
) -> tuple[list[Frame], SpoolStats]:
    return queue.read_batch(max_frames, max_bytes)[skip:], queue.stats()


def _close_quietly(queue: DiskQueue) -> None:
    with contextlib.suppress(SpoolError):
        queue.close()


def _text(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename or ''}: {exc.strerror}".lstrip(": ")
    return str(exc) or type(exc).__name__


def _save_metadata(directory: Path, frames: list[Frame], *, fsync: bool) -> None:
    """Write the delivered metadata: a temporary file renamed over the old one."""
    body = b"".join(bytes(part) for part in NativeEncoder().encode_batch(frames))
    temporary = directory / _METADATA_TMP
    with open(temporary, "wb") as file:
        file.write(_CRC.pack(zlib.crc32(body)) + body)
        if fsync:
            file.flush()
            os.fdatasync(file.fileno())
    os.replace(temporary, directory / METADATA_FILE)


def _load_metadata(directory: Path) -> list[Frame]:
    """The delivered metadata saved in ``directory``: [] if there is none. Raises
    ValueError for a file that is damaged."""
    try:
        with open(directory / METADATA_FILE, "rb") as file:
            data = file.read(_METADATA_LIMIT + 1)
    except FileNotFoundError:
        return []
    if len(data) < _CRC.size or len(data) > _METADATA_LIMIT:
        raise ValueError(f"{directory / METADATA_FILE}: damaged (its size is {len(data)})")
    (crc,) = _CRC.unpack_from(data)
    body = data[_CRC.size :]
    if zlib.crc32(body) != crc:
        raise ValueError(f"{directory / METADATA_FILE}: damaged (checksum mismatch)")
    decoder = NativeDecoder(max_frame_size=_METADATA_LIMIT)
    try:
        frames = list(decoder.feed(body))
        decoder.end_of_input()
    except ProtocolError as exc:
        raise ValueError(f"{directory / METADATA_FILE}: damaged ({exc})") from None
    return [frame for frame in frames if frame.is_metadata]
