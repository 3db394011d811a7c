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
"""

from __future__ import annotations

import gzip
import io
import re
from pathlib import Path

import trio

from ... import protocols
from ...config import RecorderConfig
from ...frame import Buffer, Frame
from ..flow import UnencodableFrames, encode_frames
from ..stream import MetadataCache, Policy, QueueBounds, SubscriptionClosed
from ._base import Endpoint

__all__ = ["RecorderEndpoint", "numbered_path"]


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


def _create(path: Path) -> io.BufferedIOBase:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        return gzip.open(path, "xb")
    return open(path, "xb")


def _nbytes(buffer: Buffer) -> int:
    return buffer.nbytes if isinstance(buffer, memoryview) else len(buffer)


def _write(handle: io.BufferedIOBase, buffers: list[Buffer]) -> None:
    handle.writelines(buffers)
    handle.flush()


class RecorderEndpoint(Endpoint[RecorderConfig]):
    kind = "recorder"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        pattern = Path(config.path)
        self._index = await trio.to_thread.run_sync(next_index, pattern)
        self._encoder = protocols.get(config.protocol).make_encoder()
        self._unencodable = UnencodableFrames(self.log, config.protocol, self.status.detail)
        self._written = MetadataCache()
        self._handle: io.BufferedIOBase | None = None
        self._file_bytes = 0
        self.status.address = [str(pattern)]
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._until_stop_requested, nursery.cancel_scope)
                task_status.started()
                replay = True
                while True:
                    await self._record_until_end(pattern, replay=replay)
                    # The ended run's metadata belongs to the files already written.
                    replay = False
        finally:
            await self._close_file()

    async def _record_until_end(self, pattern: Path, *, replay: bool) -> None:
        config = self.config
        subscription = self.context.streams.get(config.stream).subscribe(
            bounds=QueueBounds(config.max_queue_frames, config.max_queue_bytes),
            policy=Policy(config.policy),
            label=f"{self.name} -> {pattern}",
            follows_end=True,
            replay=replay,
        )
        self.status.state = "recording"
        with subscription:
            while True:
                try:
                    batch = await subscription.receive_batch()
                except SubscriptionClosed as closed:
                    self.log.info("stream %r ended (%s)", config.stream, closed.reason)
                    await self._close_file()
                    self._written.clear()
                    return
                await self._write(pattern, batch)
                self.status.frames_dropped = subscription.frames_dropped

    async def _write(self, pattern: Path, frames: list[Frame]) -> None:
        """Write ``frames``, starting a new file wherever the current one would get too big."""
        limit = self.config.max_file_size
        pending: list[Buffer] = []
        pending_size = 0
        for frame in frames:
            encoded = encode_frames(self._encoder, [frame], self._unencodable)
            size = sum(_nbytes(buffer) for buffer in encoded)
            full = limit and self._file_bytes + pending_size + size > limit
            if self._handle is None or (full and self._file_bytes + pending_size):
                await self._flush(pending, pending_size)
                pending, pending_size = [], 0
                await self._start_file(pattern)
                replay = encode_frames(self._encoder, list(self._written), self._unencodable)
                pending += replay
                pending_size += sum(_nbytes(buffer) for buffer in replay)
            pending += encoded
            pending_size += size
            if frame.is_metadata:
                self._written.update(frame)
        await self._flush(pending, pending_size)
        self.status.frames_in += len(frames)

    async def _flush(self, buffers: list[Buffer], size: int) -> None:
        if buffers and self._handle is not None:
            await trio.to_thread.run_sync(_write, self._handle, buffers)
            self._file_bytes += size
            self.status.bytes_out += size

    async def _start_file(self, pattern: Path) -> None:
        await self._close_file()
        path = numbered_path(pattern, self._index)
        self._index += 1
        self._handle = await trio.to_thread.run_sync(_create, path)
        self._file_bytes = 0
        self.status.detail["file"] = str(path)
        self.log.info("recording into %s", path)

    async def _close_file(self) -> None:
        handle, self._handle = self._handle, None
        self.status.detail.pop("file", None)
        if handle is not None:
            # A file must be closed (and flushed) even when the recorder is being cancelled.
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(handle.close)
