"""Run-scoped metadata with real spt3g frames: ``run_starts = ["Observation"]`` retires the
previous run's metadata when an Observation frame arrives, so a late G3Reader gets the
current run's metadata only."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from framewire import Frame

from ..helpers import running_daemon, wait_until
from .peers import describe, g3_peer
from .test_g3 import RELAY, port

pytestmark = pytest.mark.interop
pytest.importorskip("spt3g")


@pytest.mark.parametrize("runs", [True, False])
async def test_a_late_reader_gets_the_current_runs_metadata(runs: bool) -> None:
    config = RELAY.format(queue=1024)
    if runs:
        config += '\n[streams.camera]\nrun_starts = ["Observation"]\n'
    async with running_daemon(config) as daemon:
        out = f"tcp://127.0.0.1:{port(daemon, 'g3-out')}"
        clients = daemon.endpoints["g3-out"].status.clients
        stream = daemon.streams.get("camera")
        # Run 1: Observation, Wiring, Calibration, data; run 2: Observation, Calibration, data.
        script = "O:1,W,C:100,S:500,T,O:2,C:200,S:500,T,WAIT,S:600"
        async with g3_peer("send", "127.0.0.1", str(port(daemon, "g3-in")), script) as sender:
            first = await sender.frames_until("waiting")
            await wait_until(lambda: stream.frames_in == len(first))
            async with g3_peer("read", out) as late:
                await late.expect("connected")
                await wait_until(lambda: len(clients) == 1)
                await sender.tell("go")
                second = [await sender.line()]
                assert await sender.wait() == 0
                late_frames = await late.frames_until("end")
    if runs:
        # The second Observation and its Calibration; run 1's Wiring is retired.
        assert late_frames == [first[5], first[6], *second]
    else:
        assert late_frames == [first[5], first[1], first[6], *second]


REPLAY = """
[daemon]
grace_period = "5s"

[streams.camera.history]
max_bytes = "16MiB"
path = "{path}"

[endpoints.g3-out]
kind = "server"
listen = "tcp://127.0.0.1:0"
protocol = "g3"
stream = "camera"
close_on_end = true
max_queue_frames = 4096
replay = "2s"
"""


def g3_frames(codes: str) -> list[tuple[str, Frame]]:
    """Real spt3g frames (one key each), as the lines a G3Reader prints and as frames."""
    from spt3g import core

    from framewire.protocols.g3 import G3Decoder

    types = {"O": core.G3FrameType.Observation, "C": core.G3FrameType.Calibration}
    out = []
    for index, code in enumerate(codes):
        frame = core.G3Frame(types.get(code, core.G3FrameType.Scan))
        frame["data"] = core.G3String(f"{index}:" + "x" * 100)
        wire = frame.__getstate__()[1]
        (decoded,) = G3Decoder(max_frame_size=1 << 20).feed(wire)
        out.append((describe(code, wire), decoded))
    return out


async def test_replay_gives_a_real_g3reader_the_last_seconds_then_live(tmp_path: Path) -> None:
    from ..test_rewind import STEP, FakeArrival

    frames = g3_frames("OC" + "S" * 100 + "S" * 10)
    async with running_daemon(REPLAY.format(path=tmp_path / "h")) as daemon:
        clock = FakeArrival()
        daemon.histories["camera"].clock = clock  # type: ignore[assignment]
        stream = daemon.streams.get("camera")
        for _, frame in frames[:102]:  # metadata, then 100 Scans at 20 a second: 5 s
            await stream.publish([frame])
            clock.now += STEP
        writer = daemon.histories["camera"]
        with trio.fail_after(10):
            await writer.wait_written(writer.assigned)
        out = f"tcp://127.0.0.1:{port(daemon, 'g3-out')}"
        clients = daemon.endpoints["g3-out"].status.clients
        async with g3_peer("read", out) as reader:
            await reader.expect("connected")
            await wait_until(lambda: len(clients) == 1)
            for _, frame in frames[102:]:  # live
                await stream.publish([frame])
            stream.end_of_stream("done")
            got = await reader.frames_until("end")
    lines = [line for line, _ in frames]
    # The metadata, the Scans of the last 2 s (40 of them: 62 .. 101), then the live ones.
    assert got == lines[:2] + lines[62:102] + lines[102:]
