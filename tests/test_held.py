"""Held streams: a publish waiting for room in a lossless queue holds its stream, and that is
visible (held_by, held_seconds, one WARNING and one INFO); sources that were held resume at
their rate. Time is trio's MockClock throughout."""

from __future__ import annotations

import itertools
import json
import logging
import re
from pathlib import Path

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from framewire import Frame, FrameKind
from framewire.cli import render_status
from framewire.config import FileConfig, GeneratorConfig, format_size
from framewire.daemon import Daemon
from framewire.daemon.endpoints import EndpointContext
from framewire.daemon.endpoints.file import FileEndpoint
from framewire.daemon.endpoints.generator import GeneratorEndpoint
from framewire.daemon.status import build_snapshot
from framewire.daemon.stream import (
    HELD_WARNING_AFTER,
    HELD_WARNING_INTERVAL,
    Policy,
    QueueBounds,
    Stream,
    StreamRegistry,
    watch_holds,
)
from framewire.protocols.native import NativeDecoder

from .helpers import connect, encode, endpoint_port, running_daemon, wait_until
from .test_systemd import free_port

DATA = FrameKind.DATA


def data(i: int, size: int = 10) -> Frame:
    return Frame(DATA, "d", bytes(size), timestamp=i)


def held_since(stream: Stream) -> float | None:
    """``stream.held_since`` (read through a call: mypy would narrow the property)."""
    return stream.held_since


def held_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "framewire.stream"]


async def test_a_waiting_publish_holds_the_stream_until_there_is_room(
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    nursery: trio.Nursery,
) -> None:
    caplog.set_level(logging.INFO, "framewire.stream")
    stream = Stream("camera")
    nursery.start_soon(watch_holds, [stream])  # as the daemon does
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
        await trio.sleep(HELD_WARNING_AFTER - 0.01)
        assert held_lines(caplog) == []  # not yet held long enough to be logged
        await trio.sleep(5 - HELD_WARNING_AFTER + 0.01)
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
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    nursery: trio.Nursery,
) -> None:
    """A consumer that is merely slow makes the stream wait batch by batch: thousands of
    short holds, each counted in held_seconds, none logged."""
    caplog.set_level(logging.DEBUG, "framewire.stream")
    stream = Stream("s")
    nursery.start_soon(watch_holds, [stream])  # as the daemon does
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
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    nursery: trio.Nursery,
) -> None:
    caplog.set_level(logging.INFO, "framewire.stream")
    stream = Stream("s")
    nursery.start_soon(watch_holds, [stream])  # as the daemon does
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
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    nursery: trio.Nursery,
) -> None:
    """Two producers wait on one full queue, a third producer's publish on another: the
    stream is held by both holders until the last wait ends; a cancelled publish lets go."""
    caplog.set_level(logging.INFO, "framewire.stream")
    stream = Stream("s")
    nursery.start_soon(watch_holds, [stream])  # as the daemon does
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


# -- through a real daemon and real sockets --------------------------------------------------


def held_metric(daemon: Daemon, stream: str) -> float:
    """``framewire_stream_held_seconds_total{stream}`` as /metrics shows it."""
    text = daemon.metrics.exposition().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "framewire_stream_held_seconds_total" and sample.labels == {
                "stream": stream
            }:
                return float(sample.value)
    raise AssertionError(f"no framewire_stream_held_seconds_total for {stream!r}:\n{text}")


def stream_lines(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in held_lines(caplog) if r.levelno == level]


class Reader:
    """A native reader on 127.0.0.1: accepts one connection and records each frame with the
    time (trio's clock) it arrived."""

    def __init__(self) -> None:
        self.frames: list[tuple[float, Frame]] = []

    async def serve(self, listener: trio.SocketListener) -> None:
        async with await listener.accept() as connection:
            decoder = NativeDecoder(max_frame_size=1 << 20)
            while data := await connection.receive_some(1 << 16):
                now = trio.current_time()
                self.frames += [(now, frame) for frame in decoder.feed(data)]


async def test_a_sender_whose_reader_is_down_holds_its_stream_and_says_so(
    mock_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A generator feeds a sender to a closed port: the stream is held by the sender, in the
    snapshot, the metric, `framewire status` and one WARNING; when the reader appears, one
    INFO, nothing holds the stream, and the generator goes on at its rate, no burst."""
    # Jump the clock only when nothing has happened for 5 ms of real time: not while bytes
    # are in flight on loopback.
    mock_clock.autojump_threshold = 0.005
    caplog.set_level(logging.INFO)
    port = free_port()
    config = f"""
[endpoints.source]
kind = "generator"
stream = "camera"
rate = 100.0
size = "1KiB"

[endpoints.to-reader]
kind = "sender"
connect = "tcp://127.0.0.1:{port}"
stream = "camera"
max_queue_frames = 16
reconnect = {{ initial = "500ms", maximum = "1s" }}
"""
    async with running_daemon(config) as daemon:
        stream = daemon.streams.get("camera")
        generator = daemon.endpoints["source"].status
        await trio.sleep(30)
        snapshot = json.loads(json.dumps(build_snapshot(daemon)))
        shown = snapshot["streams"]["camera"]
        assert shown["held_by"] == ["to-reader"]
        assert 29 < shown["held_seconds"] <= 30
        assert shown["held_since"] is not None
        (holder,) = shown["holders"]
        assert holder["endpoint"] == "to-reader"
        assert holder["subscription"] == f"to-reader -> tcp://127.0.0.1:{port}"
        assert holder["queue_frames"] == holder["queue_max_frames"] == 16
        assert generator.frames_out == 16  # the metadata and 15 frames fill the queue
        status = render_status(snapshot).splitlines()
        assert status[1].startswith("HELD: stream 'camera' for 29s by to-reader:")
        size = format_size(holder["queue_bytes"])
        assert status[2] == (
            f"  to-reader -> tcp://127.0.0.1:{port}: queue 16/16 frames, {size}/64MiB"
        )
        before = held_metric(daemon, "camera")
        await trio.sleep(10)
        assert held_metric(daemon, "camera") == pytest.approx(before + 10, abs=0.01)
        (warning,) = stream_lines(caplog, logging.WARNING)
        assert warning.startswith("stream 'camera' is held:")
        assert f"to-reader (to-reader -> tcp://127.0.0.1:{port}): 16/16 frames" in warning
        assert stream_lines(caplog, logging.INFO) == []

        reader = Reader()
        (listener,) = await trio.open_tcp_listeners(port, host="127.0.0.1")
        async with listener, trio.open_nursery() as nursery:
            nursery.start_soon(reader.serve, listener)
            await wait_until(lambda: not stream.held_by, patience=30)
            released, published = trio.current_time(), generator.frames_out
            await trio.sleep(1)
            assert 98 <= generator.frames_out - published <= 102  # 100 frames/s, no burst
            nursery.cancel_scope.cancel()
    assert build_snapshot(daemon)["streams"]["camera"]["held_by"] == []
    (info,) = stream_lines(caplog, logging.INFO)
    found = re.fullmatch(r"stream 'camera' flows again after ([\d.]+) s held by to-reader", info)
    assert found is not None
    assert 39 < float(found.group(1)) < 42  # 40 s, and the sender's next attempt
    assert len(stream_lines(caplog, logging.WARNING)) == 1
    data = [(at, frame) for at, frame in reader.frames if frame.kind is DATA]
    seqs = [int(frame.headers["seq"]) for _, frame in data]
    assert seqs == list(range(len(seqs)))  # every frame, in order, none skipped
    late = [at for at, _ in data if at > released + 0.05]
    assert all(b - a > 0.005 for a, b in itertools.pairwise(late))


async def test_a_lossless_client_that_stops_reading_holds_the_stream(
    mock_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    mock_clock.autojump_threshold = 0.005
    caplog.set_level(logging.INFO)
    config = """
[endpoints.source]
kind = "generator"
stream = "s"
rate = 200.0
size = "64KiB"

[endpoints.out]
kind = "server"
listen = "tcp://127.0.0.1:0"
stream = "s"
policy = "lossless"
max_queue_frames = 8
"""
    async with running_daemon(config) as daemon:
        stream = daemon.streams.get("s")
        client = await connect(endpoint_port(daemon, "out"))
        (peer,) = [c.peer for c in daemon.endpoints["out"].status.clients.values()]
        # The socket's buffers fill, then its queue.
        await wait_until(lambda: bool(stream.held_by), patience=60)
        await trio.sleep(5)
        shown = build_snapshot(daemon)["streams"]["s"]
        assert shown["held_by"] == ["out"]
        (holder,) = shown["holders"]
        assert holder["subscription"] == f"out {peer}"
        assert holder["queue_frames"] == 8
        (warning,) = stream_lines(caplog, logging.WARNING)
        assert f"out (out {peer}): 8/8 frames, 512KiB/64MiB" in warning
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.read, 10**9)
            await wait_until(lambda: not stream.held_by, patience=30)
            nursery.cancel_scope.cancel()
        (info,) = stream_lines(caplog, logging.INFO)
        assert info.startswith("stream 's' flows again after")
        assert info.endswith("held by out")
        await client.stream.aclose()
