"""``kind = "generator"``: synthetic frames for demos, tests and benchmarks.

It publishes one METADATA frame first (type ``metadata_type``; a JSON description of the
generator), then DATA frames of ``size`` bytes at ``rate`` per second (0: as fast as the
stream takes them), each with a ``seq`` header counting from 0. With ``count`` it stops after
that many DATA frames.
"""

from __future__ import annotations

import itertools
import json
import time

import trio

from ...config import GeneratorConfig
from ...frame import Frame, FrameKind
from ._base import Endpoint

__all__ = ["GeneratorEndpoint"]

#: The most frames published in one call when catching up or running flat out.
MAX_BATCH = 256


class GeneratorEndpoint(Endpoint[GeneratorConfig]):
    kind = "generator"
    starts_last = True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._until_stop_requested, nursery.cancel_scope)
            task_status.started()
            await self._generate()
            nursery.cancel_scope.cancel()

    async def _generate(self) -> None:
        config = self.config
        stream = self.context.streams.get(config.stream)
        status = self.status
        status.state = "running"
        description = {
            "generator": self.name,
            "type": config.type,
            "size": config.size,
            "rate": config.rate,
        }
        metadata = Frame(
            FrameKind.METADATA,
            config.metadata_type,
            json.dumps(description).encode(),
            time.time_ns(),
        )
        await stream.publish([metadata])
        status.frames_out += 1
        status.bytes_out += metadata.size
        payload = bytes(itertools.islice(itertools.cycle(range(256)), config.size))
        total = config.count or None
        sent = 0
        started = trio.current_time()
        while total is None or sent < total:
            if config.rate > 0:
                due = int((trio.current_time() - started) * config.rate) + 1 - sent
                if due <= 0:
                    await trio.sleep_until(started + sent / config.rate)
                    continue
            else:
                due = MAX_BATCH
            n = min(due, MAX_BATCH) if total is None else min(due, MAX_BATCH, total - sent)
            now = time.time_ns()
            batch = [
                Frame(FrameKind.DATA, config.type, payload, now, {"seq": str(seq)})
                for seq in range(sent, sent + n)
            ]
            await stream.publish(batch)
            sent += n
            status.frames_out += n
            status.bytes_out += n * config.size
        status.state = "finished"
        self.log.info("generated %d frames; finished", sent)
