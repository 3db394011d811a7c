"""``kind = "file"``: publish a recorded file into a stream.

The file holds frames in ``protocol`` (a ``.g3`` file is ``protocol = "g3"``; a file written
by ``framewire recv --output`` or a recorder is in that recorder's protocol). A name ending in
``.gz`` is decompressed on the fly. Frames are published at ``rate`` frames per second, or as
fast as the stream takes them with ``rate = 0`` (lossless subscribers set the pace). With a
rate, a file whose stream was held (see ``stream.py``) resumes at that rate from when it was
let go, not in a burst of the frames it would have published meanwhile; the frames keep
the timestamps they were recorded with. At the end of the file the stream's producer ends
(servers with ``close_on_end`` close their clients), unless ``loop`` starts the file again.
A corrupt or truncated file is a crash: it is logged with the position and the endpoint is
restarted with backoff.
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path
from typing import Final

import trio

from ...config import FileConfig
from ..flow import make_decoder
from ._base import Endpoint

__all__ = ["FileEndpoint"]

#: Bytes read from the file at a time.
READ_SIZE = 1 << 20
#: Seconds a file with a ``rate`` may fall behind its schedule and still catch up; further
#: behind (its stream was held), it resumes at the rate from when it was let go.
CATCH_UP: Final = 0.05


def _open(path: Path) -> io.BufferedIOBase:
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    return open(path, "rb")


class FileEndpoint(Endpoint[FileConfig]):
    kind = "file"
    starts_last = True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        path = Path(self.config.path)
        # Fail at start, with the path, rather than at the first read.
        handle = await trio.to_thread.run_sync(_open, path)
        self.status.address = [str(path)]
        self._next_at = trio.current_time()  # when the next frame is due (with a rate)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._until_stop_requested, nursery.cancel_scope)
            task_status.started()
            while True:
                try:
                    await self._publish_file(handle)
                finally:
                    with trio.CancelScope(shield=True):
                        await trio.to_thread.run_sync(handle.close)
                if not self.config.loop:
                    break
                handle = await trio.to_thread.run_sync(_open, path)
            self.status.state = "finished"
            self.context.streams.get(self.config.stream).end_of_stream(f"file {path} ended")
            self.log.info("published %d frames from %s; finished", self.status.frames_out, path)
            nursery.cancel_scope.cancel()

    async def _publish_file(self, handle: io.BufferedIOBase) -> None:
        config = self.config
        stream = self.context.streams.get(config.stream)
        decoder = make_decoder(config.protocol, config.max_frame_size, config.verify_crc)
        status = self.status
        status.state = "running"
        interval = 1 / config.rate if config.rate > 0 else 0.0
        while True:
            chunk = await trio.to_thread.run_sync(handle.read, READ_SIZE)
            if not chunk:
                decoder.end_of_input()
                return
            status.bytes_in += len(chunk)
            frames = decoder.feed(chunk)
            if not interval:
                await stream.publish(frames)
                status.frames_out += len(frames)
                status.bytes_out += sum(frame.size for frame in frames)
                continue
            for frame in frames:
                await trio.sleep_until(self._next_at)
                await stream.publish([frame])
                status.frames_out += 1
                status.bytes_out += frame.size
                now = trio.current_time()
                if now - self._next_at > max(interval, CATCH_UP):
                    # This frame went out late (the stream was held, or the machine busy):
                    # resume at the rate from now, never in a burst of the frames missed.
                    self._next_at = now + interval
                else:
                    self._next_at += interval
