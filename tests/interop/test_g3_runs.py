"""Run-scoped metadata with real spt3g frames: ``run_starts = ["Observation"]`` retires the
previous run's metadata when an Observation frame arrives, so a late G3Reader gets the
current run's metadata only."""

from __future__ import annotations

import pytest

from ..helpers import running_daemon, wait_until
from .peers import g3_peer
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
