"""``kind = "recorder"``: write a stream to files.

Frames are written in ``protocol`` (``g3`` files open with spt3g's G3Reader; ``native`` files
replay with ``framewire send`` or a ``file`` endpoint). ``path = "/data/run.g3"`` writes
``/data/run-0001.g3``, ``/data/run-0002.g3``, …: numbering starts after the highest file
already there, so nothing is ever overwritten. A new file starts when the current one would
pass ``max_file_size`` (0: no limit) and when the stream's producer ends its stream. Every
file begins with the latest frame of each metadata type, so each one stands alone. A path
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
                while True:
                    await self._record_until_end(pattern)
        finally:
            with trio.CancelScope(shield=True):
                await self._close_file()

    async def _record_until_end(self, pattern: Path) -> None:
        config = self.config
        subscription = self.context.streams.get(config.stream).subscribe(
            bounds=QueueBounds(config.max_queue_frames, config.max_queue_bytes),
            policy=Policy(config.policy),
            label=f"{self.name} -> {pattern}",
            follows_end=True,
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
        config = self.config
        buffers = encode_frames(self._encoder, frames, self._unencodable)
        size = sum(b.nbytes if isinstance(b, memoryview) else len(b) for b in buffers)
        too_big = config.max_file_size and self._file_bytes + size > config.max_file_size
        if self._handle is None or (too_big and self._file_bytes):
            await self._close_file()
            path = numbered_path(pattern, self._index)
            self._index += 1
            self._handle = await trio.to_thread.run_sync(_create, path)
            self._file_bytes = 0
            self.status.detail["file"] = str(path)
            self.log.info("recording into %s", path)
            # Each file stands alone: it starts with the metadata current at this point.
            in_batch = {id(frame) for frame in frames}
            replay = [frame for frame in self._written if id(frame) not in in_batch]
            buffers = encode_frames(self._encoder, replay, self._unencodable) + buffers
            size = sum(b.nbytes if isinstance(b, memoryview) else len(b) for b in buffers)
        handle = self._handle
        await trio.to_thread.run_sync(_write, handle, buffers)
        self._file_bytes += size
        for frame in frames:
            if frame.is_metadata:
                self._written.update(frame)
        self.status.frames_in += len(frames)
        self.status.bytes_out += size

    async def _close_file(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            await trio.to_thread.run_sync(handle.close)
