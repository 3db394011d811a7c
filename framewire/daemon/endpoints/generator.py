"""``kind = "generator"``: synthetic frames for demos, tests and benchmarks.

It publishes one METADATA frame first (type ``metadata_type``; a JSON description of the
generator), then DATA frames of ``size`` bytes at ``rate`` per second (0: as fast as the
stream takes them), each with a ``seq`` header counting from 0. With ``count`` it stops after
that many DATA frames.

Frame k is due at start + k / rate (trio's clock), and is stamped with the Unix time at which
it was due. When the generator falls behind that schedule by more than :data:`CATCH_UP`
seconds (its stream was held by a lossless consumer, or the machine was busy), it does not
make up the frames it missed: a synthetic source has no backlog to deliver, and a burst of
back-logged frames is what a consumer that just came back needs least. It starts its
schedule again from that moment (the next frame one interval later), so it resumes at
``rate``; ``seq`` still counts on without a gap.
"""

from __future__ import annotations

import itertools
import json
import time
from typing import Final

import trio

from ...config import GeneratorConfig
from ...frame import Frame, FrameKind
from ._base import Endpoint

__all__ = ["GeneratorEndpoint"]

#: The most frames published in one call when catching up or running flat out.
MAX_BATCH = 256
#: Seconds the generator may fall behind its schedule and still catch up (frames due within
#: them go out together); further behind, it starts its schedule again from now.
CATCH_UP: Final = 0.05


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
        rate = config.rate
        # Frame number ``sent`` is due at ``started + (sent - base) / rate``.
        started = trio.current_time()
        base = 0
        while total is None or sent < total:
            now = trio.current_time()
            if rate > 0:
                next_at = started + (sent - base) / rate
                if now - next_at > CATCH_UP:
                    # Held (or starved) for longer than a catch-up: skip the frames missed
                    # and go on at the rate: the next frame one interval after now.
                    started, base = now + 1 / rate, sent
                    next_at = started
                if now < next_at:
                    await trio.sleep_until(next_at)
                    continue
                # The frames due by now (at least the one due, whatever float rounding says).
                due = max(1, int((now - started) * rate) + 1 - (sent - base))
            else:
                due = MAX_BATCH
            n = min(due, MAX_BATCH) if total is None else min(due, MAX_BATCH, total - sent)
            wall = time.time_ns()
            batch = [
                Frame(
                    FrameKind.DATA,
                    config.type,
                    payload,
                    # When the frame was due, on the wall clock (one stamp per batch at rate 0).
                    wall - _ns(now - started - (seq - base) / rate) if rate > 0 else wall,
                    {"seq": str(seq)},
                )
                for seq in range(sent, sent + n)
            ]
            await stream.publish(batch)
            sent += n
            status.frames_out += n
            status.bytes_out += n * config.size
        status.state = "finished"
        self.log.info("generated %d frames; finished", sent)


def _ns(seconds: float) -> int:
    """``seconds`` (not below 0) in nanoseconds."""
    return max(0, int(seconds * 1e9))
