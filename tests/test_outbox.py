"""The :class:`~framewire.daemon.outbox.Outbox` alone, against a real stream: for any
interleaving of publishes, takes, dones, rewinds and (disk) restarts, what is done comes out
in publish order, nothing is lost, and a frame comes twice only when it was taken and not
done before a rewind or a restart (the batch in flight)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from framewire import Frame, FrameKind
from framewire.config import BufferConfig
from framewire.daemon.endpoints._base import EndpointStatus
from framewire.daemon.outbox import Outbox
from framewire.daemon.stream import Policy, QueueBounds, Stream, Subscription

LOG = logging.getLogger("test.outbox")

#: One step: ("publish", n) frames, ("take", max) frames, ("done", k) of those taken,
#: ("rewind", 0), ("restart", 0) (disk: a new outbox on the same directory).
Step = tuple[str, int]

steps = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), st.integers(1, 40)),
        st.tuples(st.just("take"), st.integers(1, 30)),
        st.tuples(st.just("done"), st.integers(1, 30)),
        st.tuples(st.just("rewind"), st.just(0)),
        st.tuples(st.just("restart"), st.just(0)),
    ),
    max_size=40,
)


def frame(i: int) -> Frame:
    if i % 17 == 0:
        return Frame(FrameKind.METADATA, f"m{i % 3}", i.to_bytes(4, "big"), timestamp=i)
    return Frame(FrameKind.DATA, "d", i.to_bytes(4, "big") * 8, timestamp=i)


def run_steps(plan: list[Step], directory: Path | None) -> None:
    config = BufferConfig(type="disk", path=str(directory)) if directory else BufferConfig()

    async def main() -> None:
        stream = Stream("s")
        published = 0
        delivered: list[int] = []
        redelivered_ok: set[int] = set()

        def subscribe() -> Subscription:
            return stream.subscribe(
                bounds=QueueBounds(100_000, 1 << 30), policy=Policy.LOSSLESS, owner="o"
            )

        def make() -> Outbox:
            return Outbox(
                config,
                subscribe,
                status=EndpointStatus("test"),
                log=LOG,
                directory=directory,
                queue_bytes=1 << 30,
                queue_frames=100_000,
            )

        async with trio.open_nursery() as nursery:

            async def start(outbox: Outbox) -> trio.CancelScope:
                outbox.start()
                scope = trio.CancelScope()

                async def upkeep() -> None:
                    with scope:
                        await outbox.run()

                nursery.start_soon(upkeep)
                return scope

            outbox = make()
            upkeep = await start(outbox)
            taken: list[Frame] = []  # taken and not done, oldest first
            for action, n in plan:
                if action == "publish":
                    await stream.publish([frame(published + i) for i in range(n)])
                    published += n
                elif action == "take":
                    # Wait only if something is there to take.
                    expected = published - len(set(delivered)) - len(taken)
                    if outbox.is_disk:
                        await trio.testing.wait_all_tasks_blocked()
                    if expected > 0 or (outbox.taken_frames > len(taken)):
                        with trio.fail_after(10):
                            batch = await outbox.take(n, 1 << 30)
                        assert batch is not None
                        assert 0 < len(batch) <= n
                        taken += batch
                elif action == "done":
                    k = min(n, len(taken))
                    if k:
                        await outbox.done(k)
                        for f in taken[:k]:
                            delivered.append(f.timestamp)
                        del taken[:k]
                elif action == "rewind":
                    outbox.rewind()
                    redelivered_ok.update(f.timestamp for f in taken)
                    taken = []
                elif action == "restart" and outbox.is_disk:
                    outbox.stop("restart")
                    with trio.fail_after(10):
                        await outbox.finished.wait()
                    upkeep.cancel()
                    await trio.testing.wait_all_tasks_blocked()
                    outbox.close("restart")
                    redelivered_ok.update(f.timestamp for f in taken)
                    # The new subscription replays the stream's metadata into the buffer.
                    redelivered_ok.update(f.timestamp for f in stream.metadata)
                    taken = []
                    outbox = make()
                    upkeep = await start(outbox)
            # Drain: everything published comes out, in order.
            outbox.rewind()
            redelivered_ok.update(f.timestamp for f in taken)
            while True:
                data_left = published - len(set(delivered))
                if data_left <= 0:
                    break
                with trio.fail_after(10):
                    batch = await outbox.take(1000, 1 << 30)
                assert batch is not None
                await outbox.done(len(batch))
                delivered += [f.timestamp for f in batch]
            upkeep.cancel()
            outbox.close("end")
            nursery.cancel_scope.cancel()
        # In order, nothing lost; repeats only of frames that were in flight.
        firsts: list[int] = []
        seen: set[int] = set()
        for ts in delivered:
            if ts in seen:
                assert ts in redelivered_ok, f"frame {ts} delivered twice, never in flight"
            else:
                seen.add(ts)
                firsts.append(ts)
        assert firsts == list(range(published))

    trio.run(main)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps)
def test_a_memory_outbox_delivers_everything_in_order(plan: list[Step]) -> None:
    run_steps(plan, None)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(steps)
def test_a_disk_outbox_delivers_everything_in_order_across_restarts(plan: list[Step]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        run_steps(plan, Path(directory) / "buf")


def test_frames_taken_before_a_disk_buffer_reopened_are_never_consumed_for_others(
    tmp_path: Path,
) -> None:
    """Two batches in flight (a publisher's windows), then the disk buffer breaks and is
    opened again: the next take starts again from the oldest frame. The dones of the two
    old batches must consume nothing (their frames were taken again), or frames never
    taken would be consumed: lost."""
    from framewire.spool import SpoolError

    async def main() -> None:
        stream = Stream("s")
        outbox = Outbox(
            BufferConfig(type="disk", path=str(tmp_path / "buf")),
            lambda: stream.subscribe(bounds=QueueBounds(1000, 1 << 30), policy=Policy.LOSSLESS),
            status=EndpointStatus("test"),
            log=LOG,
            directory=tmp_path / "buf",
        )
        outbox.start()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outbox.run)
            await stream.publish([frame(i) for i in range(1, 41)])
            with trio.fail_after(10):
                first = await outbox.take(10, 1 << 30)
                second = await outbox.take(10, 1 << 30)
            assert first is not None
            assert second is not None
            assert [f.timestamp for f in first + second] == list(range(1, 21))
            disk = outbox.disk
            assert disk is not None
            await disk._broken(SpoolError("the test breaks it"))  # reopened with backoff
            with trio.fail_after(10):
                again = await outbox.take(20, 1 << 30)
            assert again is not None
            assert again[0].timestamp == 1  # from the oldest again
            await outbox.done(10)  # the first window's acks: stale
            await outbox.done(10)  # the second's: stale
            await outbox.done(len(again))
            with trio.fail_after(10):
                rest = await outbox.take(1000, 1 << 30)
            assert rest is not None
            assert rest[0].timestamp == len(again) + 1  # nothing skipped
            nursery.cancel_scope.cancel()
        outbox.close("end")

    trio.run(main)


def test_frames_dropped_after_taking_stay_counted_whenever_status_is_read() -> None:
    """A consumer that drops frames it took (a core NATS publisher nats-py could not take
    them from) counts them in the outbox: status, refreshed on every read, keeps them."""
    stream = Stream("s")
    status = EndpointStatus("test")
    outbox = Outbox(
        BufferConfig(),
        lambda: stream.subscribe(bounds=QueueBounds(1000, 1 << 30), policy=Policy.LOSSY),
        status=status,
        log=LOG,
    )
    outbox.start()
    outbox.dropped_after_taking += 5
    status.current_detail()
    assert status.frames_dropped == 5
    outbox.resubscribe()
    status.current_detail()
    assert status.frames_dropped == 5
