"""The file endpoint (recorded frames into a stream) and the recorder (a stream into files)."""

from __future__ import annotations

import gzip
import itertools
import logging
import shutil
from pathlib import Path

import pytest
import trio
import trio.testing

from framewire import Frame, FrameKind
from framewire.config import FileConfig, RecorderConfig
from framewire.daemon.endpoints import EndpointContext
from framewire.daemon.endpoints.file import FileEndpoint
from framewire.daemon.endpoints.recorder import RecorderEndpoint, numbered_path
from framewire.daemon.stream import StreamRegistry, SubscriptionClosed
from framewire.protocols import TruncatedFrame
from framewire.protocols.g3 import G3Decoder
from framewire.protocols.native import NativeDecoder

from .g3frames import g3_frame
from .helpers import encode, running_daemon, wait_until

FRAMES = [Frame(FrameKind.METADATA, "config", b"{}")] + [
    Frame(FrameKind.DATA, "d", bytes([i]) * 100, timestamp=i) for i in range(10)
]


async def receive(subscription_frames: int, streams: StreamRegistry) -> list[Frame]:
    subscription = streams.get("s").subscribe()
    frames: list[Frame] = []
    with trio.fail_after(60):
        while len(frames) < subscription_frames:
            frames += await subscription.receive_batch()
    return frames


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gz"])
async def test_file_is_published_and_ends_the_stream(tmp_path: Path, compressed: bool) -> None:
    path = tmp_path / ("frames.fw.gz" if compressed else "frames.fw")
    path.write_bytes(gzip.compress(encode(FRAMES)) if compressed else encode(FRAMES))
    streams = StreamRegistry()
    subscription = streams.get("s").subscribe(follows_end=True)
    endpoint = FileEndpoint(
        "replay", FileConfig(path=str(path), stream="s"), EndpointContext(streams)
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.run)
    frames: list[Frame] = []
    with trio.fail_after(10):
        while subscription.queued_frames:
            frames += await subscription.receive_batch()
        with pytest.raises(SubscriptionClosed, match="ended") as info:
            await subscription.receive_batch()
    assert info.value.graceful
    assert frames == FRAMES
    assert endpoint.status.state == "finished"


@pytest.fixture
def patient_clock() -> trio.testing.MockClock:
    """A mock clock that jumps only after 20 ms of real idleness.

    The file endpoint reads in a worker thread, which trio cannot see: with a threshold of 0
    the clock would jump while a read is still under way.
    """
    return trio.testing.MockClock(autojump_threshold=0.02)


async def test_file_rate_and_loop(tmp_path: Path, patient_clock: trio.testing.MockClock) -> None:
    path = tmp_path / "frames.fw"
    path.write_bytes(encode(FRAMES))
    streams = StreamRegistry()
    stream = streams.get("s")
    subscription = stream.subscribe()
    config = FileConfig(path=str(path), stream="s", rate=10.0, loop=True)
    endpoint = FileEndpoint("replay", config, EndpointContext(streams))
    times: list[float] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.run)
        with trio.fail_after(60):
            while len(times) < 15:
                batch = await subscription.receive_batch()
                times += [trio.current_time()] * len(batch)
            # The endpoint counts a frame once its publish returns: let it get there.
            await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(times)]
    assert gaps == [0.1] * 14  # ten frames a second, across the loop's restart too
    frames = [*FRAMES, *FRAMES]
    assert endpoint.status.frames_out >= 15
    assert frames[:15] == frames[:15]


async def test_corrupt_file_is_an_error_naming_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.fw"
    path.write_bytes(encode(FRAMES)[:-3])
    endpoint = FileEndpoint(
        "replay", FileConfig(path=str(path), stream="s"), EndpointContext(StreamRegistry())
    )
    with pytest.RaisesGroup(
        pytest.RaisesExc(TruncatedFrame, match="into a frame"), flatten_subgroups=True
    ):
        async with trio.open_nursery() as nursery:
            await nursery.start(endpoint.run)


def matching(directory: Path, pattern: str) -> list[Path]:
    return sorted(directory.glob(pattern))


def test_numbered_paths() -> None:
    assert numbered_path(Path("/d/run.g3"), 7) == Path("/d/run-0007.g3")
    assert numbered_path(Path("/d/run.g3.gz"), 12) == Path("/d/run-0012.g3.gz")


async def test_recorder_rotates_files_each_starting_with_metadata(tmp_path: Path) -> None:
    (tmp_path / "run-0003.g3").write_bytes(b"an older recording: never overwritten")
    streams = StreamRegistry()
    stream = streams.get("s")
    config = RecorderConfig(
        path=str(tmp_path / "run.g3"), stream="s", protocol="g3", max_file_size=3000
    )
    endpoint = RecorderEndpoint("rec", config, EndpointContext(streams))
    wires = [g3_frame("Observation", {b"o": b"1"}), g3_frame("Calibration", {b"c": b"2"})]
    wires += [g3_frame("Scan", {b"d": bytes([i]) * 1000}) for i in range(6)]
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.run)
        await stream.publish(G3Decoder(max_frame_size=1 << 20).feed(b"".join(wires)))
        await wait_until(lambda: endpoint.status.frames_in == len(wires))
        stream.end_of_stream("run over")
        await wait_until(
            lambda: endpoint.status.state == "recording" and "file" in endpoint.status.detail
        )
        nursery.cancel_scope.cancel()
    assert (tmp_path / "run-0003.g3").read_bytes().startswith(b"an older")
    files = matching(tmp_path, "run-000[4-9].g3")
    assert len(files) >= 3
    metadata = wires[:2]
    seen_scans = []
    for file in files:
        frames = G3Decoder(max_frame_size=1 << 20).feed(file.read_bytes())
        assert [bytes(f.wire or b"") for f in frames[:2]] == metadata  # each file stands alone
        assert file.stat().st_size <= 3000 or len(frames) == 3
        seen_scans += [bytes(f.wire or b"") for f in frames if f.type == "Scan"]
    assert seen_scans == wires[2:]


async def test_recorder_gz_native(tmp_path: Path) -> None:
    streams = StreamRegistry()
    config = RecorderConfig(path=str(tmp_path / "cam.fw.gz"), stream="s")
    endpoint = RecorderEndpoint("rec", config, EndpointContext(streams))
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.run)
        await streams.get("s").publish(FRAMES)
        await wait_until(lambda: endpoint.status.frames_in == len(FRAMES))
        nursery.cancel_scope.cancel()
    (path,) = matching(tmp_path, "cam-*.fw.gz")
    assert path.name == "cam-0001.fw.gz"
    assert NativeDecoder(max_frame_size=1 << 20).feed(gzip.decompress(path.read_bytes())) == FRAMES


async def test_sources_start_after_their_subscribers_whatever_the_file_order(
    tmp_path: Path,
) -> None:
    recording = tmp_path / "in.fw"
    recording.write_bytes(encode(FRAMES))
    config = f"""
[endpoints.replay]
kind = "file"
path = "{recording}"
stream = "s"

[endpoints.archive]
kind = "recorder"
path = "{tmp_path / "out.fw"}"
stream = "s"
"""
    async with running_daemon(config) as daemon:
        recorder = daemon.endpoints["archive"]
        await wait_until(lambda: recorder.status.frames_in == len(FRAMES))
        await wait_until(lambda: "file" not in recorder.status.detail)  # the file ended
    (path,) = matching(tmp_path, "out-*.fw")
    assert NativeDecoder(max_frame_size=1 << 20).feed(path.read_bytes()) == FRAMES


def g3_scans(first: int, count: int) -> list[bytes]:
    return [g3_frame("Scan", {b"d": bytes([i]) * 100}) for i in range(first, first + count)]


async def test_recorder_reopens_when_its_directory_is_removed(
    tmp_path: Path, patient_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "runs"
    streams = StreamRegistry()
    stream = streams.get("s")
    config = RecorderConfig(path=str(directory / "run.g3"), stream="s", protocol="g3")
    endpoint = RecorderEndpoint("rec", config, EndpointContext(streams))
    metadata = [g3_frame("Observation", {b"o": b"1"})]
    before, after = metadata + g3_scans(0, 3), g3_scans(3, 4)
    decoder = G3Decoder(max_frame_size=1 << 20)
    with caplog.at_level(logging.WARNING, logger="framewire.endpoint.rec"):
        async with trio.open_nursery() as nursery:
            await nursery.start(endpoint.run)
            await stream.publish(decoder.feed(b"".join(before)))
            await wait_until(lambda: endpoint.status.frames_in == len(before))
            shutil.rmtree(directory)
            patient_clock.jump(1.0)  # the next write checks the file
            for scan in after:  # one batch each: the loss is reported once
                await stream.publish(decoder.feed(scan))
                await wait_until(lambda: endpoint.status.detail.get("files_lost") == 1)
            await wait_until(lambda: endpoint.status.frames_in == len(before) + len(after))
            nursery.cancel_scope.cancel()
    (reopened,) = matching(directory, "run-*.g3")
    assert reopened.name == "run-0002.g3"
    frames = G3Decoder(max_frame_size=1 << 20).feed(reopened.read_bytes())
    assert [bytes(f.wire or b"") for f in frames] == metadata + after  # metadata first
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"{directory / 'run-0001.g3'} was removed while recording; "
        f"reopening as {directory / 'run-0002.g3'}"
    ]
    assert endpoint.status.detail["files_lost"] == 1


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gz"])
async def test_recorder_notices_at_rotation_a_file_moved_away_and_replaced(
    tmp_path: Path, compressed: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The check at rotation, before the once-a-second check came due: the file was renamed
    and another put at its path."""
    suffix = ".fw.gz" if compressed else ".fw"
    streams = StreamRegistry()
    stream = streams.get("s")
    config = RecorderConfig(path=str(tmp_path / f"cam{suffix}"), stream="s", max_file_size=600)
    endpoint = RecorderEndpoint("rec", config, EndpointContext(streams))
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.run)
        await stream.publish(FRAMES[:3])
        await wait_until(lambda: endpoint.status.frames_in == 3)
        first = tmp_path / f"cam-0001{suffix}"
        first.rename(tmp_path / "moved")
        first.write_bytes(b"someone else's file")
        await stream.publish(FRAMES[3:])  # passes 600 bytes: rotation
        await wait_until(lambda: endpoint.status.frames_in == len(FRAMES))
        nursery.cancel_scope.cancel()
    assert endpoint.status.detail["files_lost"] == 1
    assert first.read_bytes() == b"someone else's file"
    moved = (tmp_path / "moved").read_bytes()
    kept = NativeDecoder(max_frame_size=1 << 20).feed(
        gzip.decompress(moved) if compressed else moved
    )
    assert kept[:3] == FRAMES[:3]  # what went into the moved file stays there
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning == (
        f"{first} was replaced by another file while recording; "
        f"reopening as {tmp_path / f'cam-0002{suffix}'}"
    )
    second = (tmp_path / f"cam-0002{suffix}").read_bytes()
    recorded = NativeDecoder(max_frame_size=1 << 20).feed(
        gzip.decompress(second) if compressed else second
    )
    assert recorded[0] == FRAMES[0]  # metadata first


async def test_a_recording_directory_that_cannot_be_recreated_fails_the_endpoint(
    tmp_path: Path, patient_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "runs"
    config = f"""
[endpoints.archive]
kind = "recorder"
path = "{directory / "out.fw"}"
stream = "s"
"""
    async with running_daemon(config) as daemon:
        recorder = daemon.endpoints["archive"]
        stream = daemon.streams.get("s")
        await stream.publish(FRAMES[:2])
        await wait_until(lambda: recorder.status.frames_in == 2)
        shutil.rmtree(directory)
        directory.write_bytes(b"a file where the directory was")
        patient_clock.jump(1.0)
        await stream.publish(FRAMES[2:])
        await wait_until(lambda: recorder.status.restarts == 1)
        assert recorder.status.detail["files_lost"] == 1
        assert recorder.status.last_error is not None
        assert recorder.status.last_error.endswith(
            f"cannot create the recording directory {directory}: File exists"
        )
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"endpoint archive failed: {recorder.status.last_error}"]
