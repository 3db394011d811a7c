"""``kind = "recorder"``: write a stream to files.

Frames are written in ``protocol`` (``g3`` files open with spt3g's G3Reader; ``native`` files
replay with ``framewire send`` or a ``file`` endpoint). ``path = "/data/run.g3"`` writes
``/data/run-0001.g3``, ``/data/run-0002.g3``, …: numbering starts after the highest file
already there, so nothing is ever overwritten. A new file starts when the current one would
pass ``max_file_size`` (0: no limit) and with the first frame after the stream's producer
ended its stream. Every file begins with the latest frame of each metadata type of its run,
so each one stands alone. A path
ending in ``.gz`` is compressed. Writing happens in a worker thread; with the default
``policy = "lossless"`` a slow disk holds the stream back instead of losing frames.

At most once a second (by trio's clock), and whenever a file is closed, the recorder checks
that the file it writes is still the one at its path. One that was removed (alone or with its
directory), moved away or replaced is logged as a warning, counted in ``detail.files_lost``
and followed by the next numbered file, its directory recreated and the run's metadata first;
frames written into a removed file since the last check are lost with it. If the directory cannot
be (re)created the endpoint fails with an OSError naming it, and the supervisor restarts it.

With a disk buffer (``[buffer] type = "disk"``: an :class:`~framewire.daemon.outbox.Outbox`)
the stream goes to the buffer first, so a slow recording disk never holds it back; a batch is
done (removed from the buffer) once written. A file that cannot be written then does not stop
the recorder: one ERROR line, state ``writing_failed``, and after a backoff delay the batch is
written again into the next numbered file while the buffer takes in the stream. The buffer
does not keep where the producer ended its stream: files then split at ``max_file_size`` only.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import re
from pathlib import Path
from typing import Final

import trio

from ... import protocols
from ...config import BackoffConfig, RecorderConfig
from ...frame import Buffer, Frame
from ..backoff import Backoff
from ..flow import UnencodableFrames, encode_frames
from ..outbox import Outbox, OutboxCutOff
from ..stream import MetadataCache, Policy, QueueBounds, Subscription
from ..transport import nbytes_of
from ._base import Endpoint, EndpointContext

__all__ = ["RecorderEndpoint", "numbered_path"]

#: Seconds between two checks that the file being written is still at its path.
FILE_CHECK_INTERVAL: Final = 1.0
#: Delays between attempts to write again after a failed write (disk buffer only).
WRITE_RETRY: Final = BackoffConfig(initial=1.0, maximum=30.0, factor=2.0, stable_after=60.0)


def _reason(exc: OSError) -> str:
    text = exc.strerror or str(exc)
    return f"{exc.filename}: {text}" if exc.filename else text


def numbered_path(pattern: Path, index: int) -> Path:
    """``run.g3`` (or ``run.g3.gz``) and 7 → ``run-0007.g3`` (``run-0007.g3.gz``)."""
    name = pattern.name
    stem, dot, suffixes = name.partition(".")
    return pattern.with_name(f"{stem}-{index:04d}{dot}{suffixes}")


def next_index(pattern: Path) -> int:
    """One past the highest number already used for ``pattern`` in its directory."""
    stem, dot, suffixes = pattern.name.partition(".")
    taken = re.compile(rf"{re.escape(stem)}-(\d+){re.escape(dot + suffixes)}\Z")
    highest = 0
    if pattern.parent.is_dir():
        for entry in pattern.parent.iterdir():
            match = taken.match(entry.name)
            if match:
                highest = max(highest, int(match.group(1)))
    return highest + 1


def _make_directory(directory: Path) -> None:
    """Create ``directory`` (and its parents) unless it exists. Raises OSError naming it."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(
            exc.errno, f"cannot create the recording directory {directory}: {exc.strerror or exc}"
        ) from exc


def _create(path: Path) -> io.BufferedIOBase:
    """A new file at ``path``, its directory created if need be. Raises OSError naming it."""
    _make_directory(path.parent)
    try:
        if path.name.endswith(".gz"):
            return gzip.open(path, "xb")
        return open(path, "xb")
    except OSError as exc:
        raise OSError(exc.errno, f"cannot create {path}: {exc.strerror or exc}") from exc


def _vanished(handle: io.BufferedIOBase, path: Path) -> str | None:
    """None if the file open in ``handle`` is still the one at ``path``; else what became of
    it ("was removed", ...). A gzip file is checked through the file under it."""
    opened = os.fstat(handle.fileno())
    if opened.st_nlink == 0:
        return "was removed"
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return "was moved away"
    except OSError as exc:
        return f"can no longer be reached ({exc.strerror or exc})"
    if (found.st_dev, found.st_ino) != (opened.st_dev, opened.st_ino):
        return "was replaced by another file"
    return None


def _write(handle: io.BufferedIOBase, buffers: list[Buffer]) -> None:
    handle.writelines(buffers)
    handle.flush()


class RecorderEndpoint(Endpoint[RecorderConfig]):
    kind = "recorder"
    #: What a reload changes on the running recorder, its file kept open.
    live_fields = frozenset({"max_queue_frames", "max_queue_bytes", "max_file_size"})

    def __init__(self, name: str, config: RecorderConfig, context: EndpointContext) -> None:
        super().__init__(name, config, context)
        self._backoff = Backoff(WRITE_RETRY)
        #: Whether the next subscription replays the stream's metadata: only the first (an
        #: ended run's metadata belongs to the files already written).
        self._replay = True
        self.outbox = Outbox.of(name, config, self._subscribe, status=self.status, log=self.log)

    def reconfigure(self, config: RecorderConfig) -> None:
        """Apply a reload's live changes: the queue's bounds at once (see
        :meth:`Outbox.rebound`); ``max_file_size`` from the next frame written. The file
        being written stays open."""
        super().reconfigure(config)
        self.outbox.rebound_to(config)

    def _subscribe(self) -> Subscription:
        config = self.config
        replay, self._replay = self._replay, False
        return self.context.streams.get(config.stream).subscribe(
            bounds=QueueBounds(config.max_queue_frames, config.queue_bytes),
            policy=Policy(config.queue_policy),
            label=f"{self.name} -> {config.path}",
            owner=self.name,
            follows_end=True,
            replay=replay,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        pattern = Path(config.path)
        self._index = await trio.to_thread.run_sync(next_index, pattern)
        self._encoder = protocols.get(config.protocol).make_encoder()
        self._unencodable = UnencodableFrames(self.log, config.protocol, self.status.detail)
        self._written = MetadataCache()
        self._handle: io.BufferedIOBase | None = None
        self._path = pattern
        self._file_bytes = 0
        self._next_check = 0.0
        self.status.address = [str(pattern)]
        if not config.buffer.is_disk:
            # Fail now, not at the first frame, if the files cannot be made there (with a
            # disk buffer the recorder waits for its directory instead: _write_or_wait).
            await trio.to_thread.run_sync(_make_directory, pattern.parent)
        outbox = self.outbox
        outbox.start()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(outbox.run)
                recording = trio.CancelScope()
                nursery.start_soon(self._stop_when_requested, recording)
                task_status.started()
                with recording:
                    await self._record(pattern, outbox)
                # Stopping: a disk buffer's intake first puts what the subscription holds
                # into it (within the grace period).
                await outbox.finished.wait()
                nursery.cancel_scope.cancel()
        finally:
            outbox.close("the recorder stopped")
            await self._close_file()

    async def _stop_when_requested(self, recording: trio.CancelScope) -> None:
        await self._stop_requested.wait()
        recording.cancel()
        self.outbox.stop("the recorder stopped")

    async def _record(self, pattern: Path, outbox: Outbox) -> None:
        """Write what the outbox holds; close the file when the stream ends (a memory
        buffer only: a disk buffer does not keep the ends of the stream)."""
        config = self.config
        self.status.state = "recording"
        if outbox.is_disk:
            # The metadata the files had when the daemon stopped: each file stands alone.
            for frame in await outbox.metadata():
                self._written.update(frame)
        while True:
            try:
                batch = await outbox.take()
            except OutboxCutOff as cut:  # its metadata passed the hard cap
                self.log.warning("subscribing again: %s", cut)
                outbox.resubscribe()
                continue
            if batch is None:
                self.log.info("stream %r ended (%s)", config.stream, outbox.end_reason)
                if await self._still_in_place(pattern, then="the stream has ended"):
                    await self._close_file()
                self._written.clear()
                # A checkpoint: stopping just as the stream ended, take() answers None at
                # once, again and again, and only a checkpoint lets the stop's cancel land.
                await trio.lowlevel.checkpoint()
                continue
            if not outbox.is_disk:
                await self._write(pattern, batch)
            elif not await self._write_or_wait(pattern, batch):
                outbox.rewind()  # the batch is written again, into a new file
                continue
            await outbox.done(len(batch))

    async def _write_or_wait(self, pattern: Path, batch: list[Frame]) -> bool:
        """With a disk buffer, a file that cannot be written (its disk full or gone, its
        directory unmakeable) does not stop the recorder: one ERROR line, state
        ``writing_failed``, the file closed, and after a backoff delay the batch is written
        again into the next file, while the buffer takes in the stream. Whether it worked."""
        try:
            await self._write(pattern, batch)
        except OSError as exc:
            problem = f"cannot write {self._path}: {_reason(exc)}; the disk buffer holds the stream"
            self.status.record_error(problem)
            if self.status.state != "writing_failed":
                self.log.error("%s (retrying with backoff)", problem)
            self.status.state = "writing_failed"
            await self._forget_file()
            await trio.sleep(self._backoff.next_delay())
            return False
        if self.status.state == "writing_failed":
            self.log.info("writing %s again", self._path)
            self.status.state = "recording"
        self._backoff.reset()
        return True

    async def _forget_file(self) -> None:
        """Forget a file that failed (closing it may fail too: the frames are written again
        into the next one, its metadata first)."""
        handle, self._handle = self._handle, None
        self.status.detail.pop("file", None)
        if handle is not None:

            def close() -> None:
                with contextlib.suppress(OSError):
                    handle.close()

            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(close)

    async def _write(self, pattern: Path, frames: list[Frame]) -> None:
        """Write ``frames``, starting a new file wherever the current one would get too big."""
        limit = self.config.max_file_size
        if self._handle is not None and trio.current_time() >= self._next_check:
            await self._still_in_place(pattern)
        pending: list[Buffer] = []
        pending_size = 0
        for frame in frames:
            encoded = encode_frames(self._encoder, [frame], self._unencodable)
            size = sum(nbytes_of(buffer) for buffer in encoded)
            full = limit and self._file_bytes + pending_size + size > limit
            if self._handle is None or (full and self._file_bytes + pending_size):
                await self._flush(pending, pending_size)
                pending, pending_size = [], 0
                if self._handle is not None:
                    await self._still_in_place(pattern)
                await self._start_file(pattern)
                replay = encode_frames(self._encoder, list(self._written), self._unencodable)
                pending += replay
                pending_size += sum(nbytes_of(buffer) for buffer in replay)
            pending += encoded
            pending_size += size
            if frame.is_metadata:
                self._written.update(frame)
        await self._flush(pending, pending_size)
        # What it took from the stream (bytes_out counts what it wrote: encoded, replays too).
        self.status.frames_in += len(frames)
        self.status.bytes_in += sum(frame.size for frame in frames)

    async def _flush(self, buffers: list[Buffer], size: int) -> None:
        if buffers and self._handle is not None:
            await trio.to_thread.run_sync(_write, self._handle, buffers)
            self._file_bytes += size
            self.status.bytes_out += size

    async def _still_in_place(self, pattern: Path, *, then: str = "") -> bool:
        """Whether the current file (if any) is still the one at its path.

        If it is not: one warning line naming it and what happened, ``detail.files_lost``
        counts it, the file is closed (the next frame starts a new one) and the result is
        False. ``then`` says what happens next in the warning (default: the next file's name).
        """
        handle = self._handle
        if handle is None:
            return True
        self._next_check = trio.current_time() + FILE_CHECK_INTERVAL
        what = await trio.to_thread.run_sync(_vanished, handle, self._path)
        if what is None:
            return True
        lost = self.status.detail.get("files_lost", 0)
        self.status.detail["files_lost"] = (lost if isinstance(lost, int) else 0) + 1
        then = then or f"reopening as {numbered_path(pattern, self._index)}"
        self.log.warning("%s %s while recording; %s", self._path, what, then)
        await self._close_file()
        return False

    async def _start_file(self, pattern: Path) -> None:
        """Close the current file and create the next numbered one.

        Raises OSError (naming the file or directory) if it cannot be created.
        """
        await self._close_file()
        path = numbered_path(pattern, self._index)
        self._index += 1
        self._handle = await trio.to_thread.run_sync(_create, path)
        self._path = path
        self._file_bytes = 0
        self._next_check = trio.current_time() + FILE_CHECK_INTERVAL
        self.status.detail["file"] = str(path)
        self.log.info("recording into %s", path)

    async def _close_file(self) -> None:
        handle, self._handle = self._handle, None
        self.status.detail.pop("file", None)
        if handle is not None:
            # A file must be closed (and flushed) even when the recorder is being cancelled.
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(handle.close)
