"""A stream's history in operation, through a real daemon: a history that cannot keep up
(dropped from the history, never held back from the live stream), a failing disk, status
and metrics, SIGHUP reloads of its settings, and the pace of ``--rate original``."""

from __future__ import annotations

import errno
import logging
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio
import trio.testing

from framewire import Frame, FrameKind
from framewire.client import RewindRefused, open_client
from framewire.daemon import Daemon
from framewire.daemon.endpoints._rewind import RewindRequest, replay_history
from framewire.daemon.history import ArrivalClock, HistoryWriter
from framewire.daemon.status import build_snapshot
from framewire.daemon.stream import Stream
from framewire.daemon.transport import Connection
from framewire.spool import SpoolError, StreamHistory
from framewire.spool import _history as spool_history

from .helpers import endpoint_port, running_daemon, wait_until

MIB = 1 << 20

CONFIG = """
[streams.s.history]
max_bytes = "{max_bytes}"
path = "{path}"
max_queue_bytes = "{queue}"
{age}

[endpoints.out]
kind = "server"
listen = "tcp://127.0.0.1:0"
protocol = "native"
stream = "s"
max_queue_frames = 100000
"""


def config(
    directory: Path, *, max_bytes: str = "16MiB", queue: str = "64MiB", age: str = ""
) -> str:
    return CONFIG.format(max_bytes=max_bytes, path=directory / "history", queue=queue, age=age)


def data(i: int, size: int = 32) -> Frame:
    return Frame(FrameKind.DATA, "d", b"x" * size, i, {"seq": str(i)})


def seqs(frames: Sequence[Frame]) -> list[int]:
    return [int(frame.headers["seq"]) for frame in frames if not frame.is_metadata]


async def written(writer: HistoryWriter) -> None:
    with trio.fail_after(10):
        await writer.wait_written(writer.assigned)


def lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def address(daemon: Daemon) -> str:
    return f"tcp://127.0.0.1:{endpoint_port(daemon, 'out')}"


class Later:
    """An arrival clock ``offset_ns`` ahead of another."""

    def __init__(self, clock: ArrivalClock, offset_ns: int) -> None:
        self.clock = clock
        self.offset_ns = offset_ns

    def __call__(self) -> int:
        return self.clock() + self.offset_ns


class StalledDisk:
    """Makes a history's appends wait (in its thread) until released: a disk that cannot
    keep up."""

    def __init__(self, history: StreamHistory, monkeypatch: pytest.MonkeyPatch) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        append = history.append_batches

        def stalled(
            batches: Sequence[tuple[Sequence[Frame], int, int]],
        ) -> tuple[int, int, SpoolError | None]:
            self.entered.set()
            self.release.wait(30)
            return append(batches)

        monkeypatch.setattr(history, "append_batches", stalled)


async def test_a_history_that_cannot_keep_up_drops_and_never_holds_the_live_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "framewire.history")
    async with running_daemon(config(tmp_path, queue="2KiB")) as daemon:
        writer = daemon.histories["s"]
        disk = StalledDisk(writer.history, monkeypatch)
        stream = daemon.streams.get("s")
        async with open_client(address(daemon)) as client:
            try:
                with trio.fail_after(10):
                    await wait_until(lambda: bool(stream.subscriptions))
                    await stream.publish([data(0)])
                    await trio.to_thread.run_sync(disk.entered.wait, 10)
                    # The writer is stuck in the disk: 200 frames of 60-odd bytes go past a
                    # 2 KiB queue, and every publish returns at once.
                    for i in range(1, 201):
                        await stream.publish([data(i)])
                    assert writer.state == "behind"
                    assert writer.frames_dropped > 100
                    status = build_snapshot(daemon)["streams"]["s"]["history"]
                    assert status["state"] == "behind"
                    assert status["frames_dropped"] == writer.frames_dropped
                    # The live client gets every frame all the same.
                    got: list[Frame] = []
                    while len(got) < 201:
                        got.append(await client.receive())
                    assert seqs(got) == list(range(201))
            finally:
                disk.release.set()
            await written(writer)
            await stream.publish([data(201)])
            await written(writer)
        assert writer.state == "ok"
        assert writer.frames_written + writer.frames_dropped == 202
        assert len(lines(caplog, "the history is behind")) == 1
        assert lines(caplog, "the history has caught up") == [
            f"stream 's': the history has caught up ({writer.frames_dropped} frames were "
            "left out of it since the last such line)"
        ]


async def test_status_and_metrics_show_the_history_and_the_rewinds(tmp_path: Path) -> None:
    async with running_daemon(config(tmp_path, age='max_age = "1h"')) as daemon:
        writer = daemon.histories["s"]
        stream = daemon.streams.get("s")
        for i in range(20):
            await stream.publish([data(i)])
        await written(writer)
        history = build_snapshot(daemon)["streams"]["s"]["history"]
        assert history["state"] == "ok"
        assert history["last_error"] is None
        assert history["frames"] == 20
        assert history["frames_written"] == 20
        assert history["segments"] == 1
        assert history["max_bytes"] == 16 * MIB
        assert history["max_age"] == 3600
        assert history["bytes"] == sum(
            p.stat().st_size for p in (tmp_path / "history").iterdir() if p.name != "lock"
        )
        async with open_client(address(daemon), since=3600) as client:
            with trio.fail_after(10):
                assert seqs([await client.receive() for _ in range(20)]) == list(range(20))
        async with open_client(address(daemon), since=1, rate=1e9) as refused:
            with trio.fail_after(10), pytest.raises(RewindRefused):
                await refused.receive()
        text = daemon.metrics.exposition().decode()
        for line in (
            f'framewire_history_bytes{{stream="s"}} {float(history["bytes"])}',
            'framewire_history_frames{stream="s"} 20.0',
            'framewire_history_segments{stream="s"} 1.0',
            'framewire_history_frames_written_total{stream="s"} 20.0',
            'framewire_history_frames_dropped_total{stream="s"} 0.0',
            'framewire_history_frames_failed_total{stream="s"} 0.0',
            'framewire_history_state{state="ok",stream="s"} 1.0',
            'framewire_history_state{state="failing",stream="s"} 0.0',
            'framewire_rewinds_total{endpoint="out",outcome="served"} 1.0',
            'framewire_rewinds_total{endpoint="out",outcome="refused"} 1.0',
        ):
            assert line in text.splitlines(), line
        assert 'framewire_history_oldest_age_seconds{stream="s"}' in text


async def test_a_full_disk_is_one_log_line_and_a_state_and_it_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "framewire.history")
    async with running_daemon(config(tmp_path)) as daemon:
        writer = daemon.histories["s"]
        stream = daemon.streams.get("s")
        await stream.publish([data(0)])
        await written(writer)

        def full(fd: int, buffers: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        with monkeypatch.context() as patch:
            patch.setattr(spool_history, "_writev_all", full)
            for i in range(1, 11):  # ten rounds, each failing
                await stream.publish([data(i)])
                await written(writer)
            status = build_snapshot(daemon)["streams"]["s"]["history"]
            assert status["state"] == "failing"
            assert "the disk is full" in status["last_error"]
            assert status["frames_failed"] == 10
            text = daemon.metrics.exposition().decode()
            assert 'framewire_history_state{state="failing",stream="s"} 1.0' in text
            assert 'framewire_history_frames_failed_total{stream="s"} 10.0' in text
        await stream.publish([data(11)])
        await written(writer)
        assert writer.state == "ok"
        assert len(lines(caplog, "the history cannot write")) == 1
        assert lines(caplog, "the history writes again") == [
            "stream 's': the history writes again (10 frames were lost meanwhile)"
        ]
        # What the history kept: the frames before and after the failure, nothing torn.
        async with open_client(address(daemon), since=3600) as client:
            with trio.fail_after(10):
                assert seqs([await client.receive() for _ in range(2)]) == [0, 11]


async def test_a_removed_directory_is_one_log_line_and_made_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "framewire.history")
    async with running_daemon(config(tmp_path)) as daemon:
        writer = daemon.histories["s"]
        stream = daemon.streams.get("s")
        for i in range(5):
            await stream.publish([data(i)])
        await written(writer)
        shutil.rmtree(tmp_path / "history")
        for i in range(5, 10):
            await stream.publish([data(i)])
            await written(writer)
        assert writer.state == "ok"
        assert len(lines(caplog, "was gone; made again")) == 1
        assert (tmp_path / "history").is_dir()
        history = build_snapshot(daemon)["streams"]["s"]["history"]
        assert history["frames"] == 5
        assert history["segments"] == 1
        async with open_client(address(daemon), since=3600) as client:
            with trio.fail_after(10):
                assert seqs([await client.receive() for _ in range(5)]) == list(range(5, 10))


# -- reload ---------------------------------------------------------------------------------


async def test_reload_applies_max_bytes_and_max_age_in_place(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "framewire")
    path = tmp_path / "fw.toml"
    path.write_text(config(tmp_path))
    async with running_daemon(path.read_text(), config_path=path) as daemon:
        writer = daemon.histories["s"]
        stream = daemon.streams.get("s")
        for i in range(120):  # 120 frames of 64 KiB: 7.5 MiB in 1 MiB segments
            await stream.publish([data(i, 64 << 10)])
        await written(writer)
        assert writer.history.stats().bytes > 7 * MIB
        path.write_text(config(tmp_path, max_bytes="4MiB", age='max_age = "1h"'))
        with trio.fail_after(20):
            assert await daemon.reload_from_file()  # as SIGHUP does
        assert daemon.histories["s"] is writer  # the same history, not reopened
        assert daemon.last_reload is not None
        assert (
            "history of stream s changed in place (max_bytes 16MiB -> 4MiB, max_age none -> 3600s)"
        ) in daemon.last_reload["changes"]
        history = build_snapshot(daemon)["streams"]["s"]["history"]
        assert history["max_bytes"] == 4 * MIB
        assert history["max_age"] == 3600
        assert history["bytes"] <= 4 * MIB
        kept = sum(p.stat().st_size for p in (tmp_path / "history").iterdir())
        assert kept <= 4 * MIB + 64
        # max_age in place: a minute later, with max_age = "1s", the frames so far go.
        path.write_text(config(tmp_path, max_bytes="4MiB", age='max_age = "1s"'))
        writer.clock = Later(writer.clock, 60 * 10**9)  # type: ignore[assignment]
        with trio.fail_after(20):
            assert await daemon.reload_from_file()
        await stream.publish([data(999)])
        await written(writer)
        assert writer.history.stats().frames == 1


async def test_reload_removes_and_adds_a_history(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "framewire")
    path = tmp_path / "fw.toml"
    path.write_text(config(tmp_path))
    without = config(tmp_path).split("[endpoints.out]")[1]
    async with running_daemon(path.read_text(), config_path=path) as daemon:
        stream = daemon.streams.get("s")
        for i in range(5):
            await stream.publish([data(i)])
        await written(daemon.histories["s"])

        path.write_text("[endpoints.out]" + without)
        with trio.fail_after(20):
            assert await daemon.reload_from_file()
        assert daemon.last_reload is not None
        assert (
            f"history of stream s removed (its files stay in {tmp_path / 'history'})"
            in daemon.last_reload["changes"]
        )
        assert "s" not in daemon.histories
        assert stream.history is None
        assert build_snapshot(daemon)["streams"]["s"]["history"] is None
        await stream.publish([data(5)])  # not kept: no history

        path.write_text(config(tmp_path))
        with trio.fail_after(20):
            assert await daemon.reload_from_file()
        assert "history of stream s added" in daemon.last_reload["changes"]
        writer = daemon.histories["s"]
        for i in range(6, 8):
            await stream.publish([data(i)])
        await written(writer)
        async with open_client(address(daemon), since=3600) as client:
            with trio.fail_after(10):
                assert seqs([await client.receive() for _ in range(7)]) == [0, 1, 2, 3, 4, 6, 7]


# -- pacing ---------------------------------------------------------------------------------


@pytest.fixture
def paced_clock() -> trio.testing.MockClock:
    """Virtual time that jumps once every task has waited 20 ms of real time: the history's
    threads (which trio cannot see) get that long before the clock moves on without them."""
    return trio.testing.MockClock(autojump_threshold=0.02)


async def test_original_rate_paces_what_arrives_during_the_replay_too(
    tmp_path: Path, paced_clock: trio.testing.MockClock
) -> None:
    """20 frames 50 ms apart are in the history when the rewind starts; 20 more arrive,
    50 ms apart, while it runs. At the original rate each frame goes out no sooner than its
    arrival's distance from the first. (A thread slower than 20 ms lets the clock jump, but
    only to the next deadline, and a ticker keeps one within 1 s: frames can only go out
    later, never sooner, and the guards stay far away.)"""
    stream = Stream("s")
    history = StreamHistory.open(tmp_path / "h", max_bytes=16 * MIB)
    writer = HistoryWriter("s", history, max_queue_bytes=64 * MIB, clock=ArrivalClock())
    stream.history = writer
    arrivals: dict[int, int] = {}
    sent: list[tuple[float, int]] = []

    async def produce(first: int, count: int) -> None:
        for i in range(first, first + count):
            await stream.publish([data(i)])
            arrivals[i] = writer.clock()
            await trio.sleep(0.05)

    async def send(frames: list[Frame]) -> None:
        now = trio.current_time()
        sent.extend((now, seq) for seq in seqs(frames))

    async def tick() -> None:
        for _ in range(3600):  # a deadline always within 1 s (see the docstring)
            await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        nursery.start_soon(tick)
        await produce(0, 20)
        await written(writer)
        left, _right = trio.testing.memory_stream_pair()
        connection = Connection(left, "test")
        asked_at = trio.current_time()
        request = RewindRequest(arrivals[0], 1.0, answer=False)
        nursery.start_soon(produce, 20, 20)
        with trio.fail_after(60):
            subscription, missed = await replay_history(
                connection, writer, request, lambda: stream.subscribe(replay=False), send
            )
        subscription.close("done")
        writer.stop()
        await writer.finished.wait()
        nursery.cancel_scope.cancel()
    assert missed == 0
    replayed = [seq for _, seq in sent]
    assert replayed == list(range(len(replayed)))
    late = [seq for seq in replayed if seq >= 20]
    assert len(late) >= 10  # frames that reached the history while the replay ran
    for at, seq in sent:
        due = asked_at + (arrivals[seq] - arrivals[0]) / 1e9
        assert at >= due - 1e-6, (seq, at - asked_at, due - asked_at)


# -- several batches in one write ------------------------------------------------------------


def test_append_batches_keeps_each_batch_and_its_time(tmp_path: Path) -> None:
    """Batches appended together: one index entry (arrival time) each, across segment
    rolls; a frame over the record limit fails its own batch only; numbers skipped for
    it are missed frames to a reader."""
    history = StreamHistory.open(tmp_path / "h", max_bytes=1 * MIB, segment_size=4096)
    batches: list[tuple[Sequence[Frame], int, int]] = []
    for i in range(40):  # 40 batches of 3 frames of ~100 bytes: rolls every ~12 batches
        batches.append(([data(3 * i + k, 64) for k in range(3)], 1_000 + i, 3 * i))
    batches.insert(20, ([data(999, 600 << 10)], 1_019, 60))  # over the limit (512 KiB)
    batches[21:] = [(frames, arrival, seq + 1) for frames, arrival, seq in batches[21:]]
    written, failed, error = history.append_batches(batches)
    assert (written, failed) == (120, 1)
    assert error is not None
    assert "over the record limit" in str(error)
    assert history.stats().segments > 2
    with history.reader(0) as reader:
        got: list[tuple[int, Frame]] = []
        while more := reader.read():
            got += more
    assert [int(frame.headers["seq"]) for _, frame in got] == list(range(120))
    assert [arrival for arrival, _ in got] == [1_000 + i // 3 for i in range(120)]
    assert reader.frames_missed == 1
