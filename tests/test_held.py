"""Held streams: a publish waiting for room in a lossless queue holds its stream, and that is
visible (held_by, held_seconds, one WARNING and one INFO); sources that were held resume at
their rate. Time is trio's MockClock throughout."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import pytest
import trio
import trio.testing

from framewire import Frame, FrameKind
from framewire.config import FileConfig, GeneratorConfig
from framewire.daemon.endpoints import EndpointContext
from framewire.daemon.endpoints.file import FileEndpoint
from framewire.daemon.endpoints.generator import GeneratorEndpoint
from framewire.daemon.stream import (
    HELD_WARNING_AFTER,
    HELD_WARNING_INTERVAL,
    Policy,
    QueueBounds,
    Stream,
    StreamRegistry,
)

from .helpers import encode, wait_until

DATA = FrameKind.DATA


def data(i: int, size: int = 10) -> Frame:
    return Frame(DATA, "d", bytes(size), timestamp=i)


def held_since(stream: Stream) -> float | None:
    """``stream.held_since`` (read through a call: mypy would narrow the property)."""
    return stream.held_since


def held_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "framewire.stream"]


async def test_a_waiting_publish_holds_the_stream_until_there_is_room(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "framewire.stream")
    stream = Stream("camera")
    lossless = stream.subscribe(
        bounds=QueueBounds(max_frames=2, max_bytes=1000),
        policy=Policy.LOSSLESS,
        label="disk -> /data/x.g3",
        owner="disk",
    )
    stream.subscribe(label="monitor", owner="monitor")  # lossy: never holds
    assert stream.held_by == []
    assert stream.held_seconds == 0.0
    assert held_since(stream) is None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.publish, [data(i) for i in range(3)])
        await trio.testing.wait_all_tasks_blocked()
        assert stream.held_by == ["disk"]
        (hold,) = stream.holding()
        assert hold.subscription is lossless
        assert hold.waiters == 1
        assert held_since(stream) is not None
        await trio.sleep(0.5)
        assert held_lines(caplog) == []  # not yet held long enough to be logged
        await trio.sleep(4.5)
        assert stream.held_seconds == pytest.approx(5.0)
        (warning,) = held_lines(caplog)
        assert warning.levelno == logging.WARNING
        text = warning.getMessage()
        assert "'camera' is held" in text
        assert "disk (disk -> /data/x.g3): 2/2 frames, 20B/1000B" in text
        assert len(await lossless.receive_batch()) == 2
    assert stream.held_by == []
    assert stream.held_since is None
    assert stream.held_seconds == pytest.approx(5.0)
    warning, info = held_lines(caplog)
    assert info.levelno == logging.INFO
    assert info.getMessage() == "stream 'camera' flows again after 5.0 s held by disk"
    await trio.sleep(10)
    assert stream.held_seconds == pytest.approx(5.0)  # counts only while held
    assert stream.holds == 1


async def test_holds_shorter_than_the_threshold_are_counted_not_logged(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A consumer that is merely slow makes the stream wait batch by batch: thousands of
    short holds, each counted in held_seconds, none logged."""
    caplog.set_level(logging.DEBUG, "framewire.stream")
    stream = Stream("s")
    subscription = stream.subscribe(
        bounds=QueueBounds(max_frames=4), policy=Policy.LOSSLESS, owner="slow"
    )

    async def consume() -> None:
        while True:
            await subscription.receive_batch(max_frames=1)
            await trio.sleep(0.001)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        for i in range(3000):
            await stream.publish([data(i)])
        nursery.cancel_scope.cancel()
    assert stream.holds > 1000
    assert 2.0 < stream.held_seconds < 3.1
    assert held_lines(caplog) == []


async def test_a_stream_held_again_and_again_warns_once_per_interval(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "framewire.stream")
    stream = Stream("s")
    subscription = stream.subscribe(
        bounds=QueueBounds(max_frames=1), policy=Policy.LOSSLESS, owner="sticky"
    )
    await stream.publish([data(0)])

    async def hold_for(seconds: float) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.publish, [data(1)])
            await trio.sleep(seconds)
            await subscription.receive_batch()
        await subscription.receive_batch()
        await stream.publish([data(0)])

    for _ in range(5):  # five holds of 2 s within 30 s: one WARNING and its INFO
        await hold_for(2 * HELD_WARNING_AFTER)
    lines = held_lines(caplog)
    assert [r.levelno for r in lines] == [logging.WARNING, logging.INFO]
    await trio.sleep(HELD_WARNING_INTERVAL)
    await hold_for(2 * HELD_WARNING_AFTER)
    lines = held_lines(caplog)[2:]
    assert [r.levelno for r in lines] == [logging.WARNING, logging.INFO]
    assert "4 more times since the last such line" in lines[0].getMessage()
    assert stream.holds == 6
    assert stream.held_seconds == pytest.approx(6 * 2 * HELD_WARNING_AFTER)


async def test_every_waiting_publisher_and_holder_counts(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Two producers wait on one full queue, a third producer's publish on another: the
    stream is held by both holders until the last wait ends; a cancelled publish lets go."""
    caplog.set_level(logging.INFO, "framewire.stream")
    stream = Stream("s")
    first = stream.subscribe(bounds=QueueBounds(max_frames=1), policy=Policy.LOSSLESS, owner="a")
    second = stream.subscribe(bounds=QueueBounds(max_frames=1), policy=Policy.LOSSLESS, owner="b")
    await stream.publish([data(0)])  # both full now
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.publish, [data(1)])
        nursery.start_soon(stream.publish, [data(2)])
        await trio.testing.wait_all_tasks_blocked()
        assert stream.held_by == ["a"]
        assert stream.holding()[0].waiters == 2
        await first.receive_batch()  # room for one: one producer goes on to b, one waits
        await trio.testing.wait_all_tasks_blocked()
        assert stream.held_by == ["a", "b"]
        await trio.sleep(3)
        nursery.cancel_scope.cancel()
    assert stream.held_by == []
    assert stream.holding() == []
    assert stream.holds == 1
    warning, info = held_lines(caplog)
    assert "a: 1/1 frames" in warning.getMessage()
    assert "b: 1/1 frames" in warning.getMessage()
    assert info.getMessage().endswith("held by a, b")
    assert second.queued_frames == 1


async def test_a_closed_holder_lets_the_stream_flow(autojump_clock: trio.testing.MockClock) -> None:
    stream = Stream("s")
    subscription = stream.subscribe(
        bounds=QueueBounds(max_frames=1), policy=Policy.LOSSLESS, label="x"
    )
    await stream.publish([data(0)])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.publish, [data(1)])
        await trio.testing.wait_all_tasks_blocked()
        assert stream.held_by == ["x"]  # no owner given: the label
        subscription.close("gone")
    assert stream.held_by == []


def generator(streams: StreamRegistry, rate: float) -> GeneratorEndpoint:
    config = GeneratorConfig(stream="s", rate=rate, size=16)
    return GeneratorEndpoint("gen", config, EndpointContext(streams))


async def test_a_generator_that_was_held_resumes_at_its_rate_with_real_timestamps(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Held for 20 s at 100 frames/s, the generator owes 2000 frames by its old schedule: it
    skips them (a synthetic source has no backlog) and goes on at 100 frames/s from the
    moment it was let go, each frame stamped when it was made."""
    streams = StreamRegistry()
    stream = streams.get("s")
    subscription = stream.subscribe(
        bounds=QueueBounds(max_frames=50), policy=Policy.LOSSLESS, owner="reader"
    )
    endpoint = generator(streams, rate=100.0)
    received: list[tuple[float, Frame]] = []

    async def consume() -> None:
        while True:
            for frame in await subscription.receive_batch():
                received.append((trio.current_time(), frame))

    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.run)
        await trio.sleep(20)  # nobody reads: held after 50 frames
        assert stream.held_by == ["reader"]
        assert endpoint.status.frames_out == 50
        released = trio.current_time()
        nursery.start_soon(consume)
        await trio.sleep(2)
        nursery.cancel_scope.cancel()
    after = [(at, frame) for at, frame in received if frame.kind is DATA]
    late = [(at, frame) for at, frame in after if at > released + 0.001]
    # The backlog is not made up: two seconds after the release, about 200 more frames.
    assert 195 <= len(late) <= 205
    # Never a burst: once the queued frames were taken, one frame every 10 ms.
    times = [at for at, _ in late]
    assert times[0] == pytest.approx(released + 0.01)
    assert all(b - a == pytest.approx(0.01) for a, b in itertools.pairwise(times))
    # Each frame has its own timestamp, in order, about 10 ms apart.
    stamps = [frame.timestamp for _, frame in late]
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert all(gap > 0 for gap in gaps)
    seqs = [int(frame.headers["seq"]) for _, frame in after]
    assert seqs == list(range(len(seqs)))  # numbered on, none skipped


async def test_a_generator_keeps_its_rate_when_nothing_holds_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    streams = StreamRegistry()
    stream = streams.get("s")
    subscription = stream.subscribe(bounds=QueueBounds(max_frames=10_000), owner="monitor")
    endpoint = generator(streams, rate=1000.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.run)
        await trio.sleep(5)
        nursery.cancel_scope.cancel()
    assert 4990 <= endpoint.status.frames_out - 1 <= 5001
    assert subscription.frames_dropped == 0
    assert stream.held_seconds == 0.0


async def test_a_file_that_was_held_resumes_at_its_rate(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    path = tmp_path / "frames.fw"
    path.write_bytes(encode([data(i) for i in range(300)]))
    streams = StreamRegistry()
    stream = streams.get("s")
    subscription = stream.subscribe(
        bounds=QueueBounds(max_frames=5), policy=Policy.LOSSLESS, owner="reader"
    )
    config = FileConfig(path=str(path), stream="s", rate=100.0)
    endpoint = FileEndpoint("replay", config, EndpointContext(streams))
    received: list[tuple[float, Frame]] = []

    async def consume() -> None:
        while True:
            for frame in await subscription.receive_batch():
                received.append((trio.current_time(), frame))

    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.run)
        # The file is read in a thread (the clock may jump meanwhile): wait for the hold.
        await wait_until(lambda: stream.held_by == ["reader"], patience=600)
        await trio.sleep(20)
        assert endpoint.status.frames_out == 5
        released = trio.current_time()
        nursery.start_soon(consume)
        await wait_until(lambda: len(received) >= 100, patience=600)
        nursery.cancel_scope.cancel()
    late = [at for at, _ in received if at > released + 0.001]
    assert late[0] == pytest.approx(released + 0.01)
    assert all(b - a == pytest.approx(0.01) for a, b in itertools.pairwise(late))
    assert [frame.timestamp for _, frame in received] == list(range(len(received)))
