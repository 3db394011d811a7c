"""A server's ``replay`` to a real dv-processing NetworkReader: it joins after the writer
wrote, gets one IOHeader, the history's packets, then the live ones, and decodes every
event once, in order (a second header would abort it)."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import pytest
import trio

from ..helpers import running_daemon
from .peers import dv_peer
from .test_aedat4 import (
    BATCHES,
    EVENTS,
    ROUND_A,
    ROUND_B,
    Setup,
    connected,
    header_cached,
    wait_until_patient,
)

pytestmark = pytest.mark.interop
pytest.importorskip("dv_processing")


def digest_of(*rounds: int) -> str:
    from .dv_peer import events, rows

    digest = hashlib.sha256()
    for t0 in rounds:
        for index in range(BATCHES):
            digest.update(rows(events(t0 + index * EVENTS, EVENTS)).tobytes())
    return digest.hexdigest()


async def test_replay_gives_a_late_network_reader_the_history_then_live() -> None:
    with tempfile.TemporaryDirectory(prefix="fw-dv-") as tmp:
        setup = Setup("tcp", Path(tmp))
        config = (
            setup.config()
            + 'replay = "1h"\n'
            + f'\n[streams.camera.history]\nmax_bytes = "16MiB"\npath = "{tmp}/history"\n'
        )
        async with dv_peer("write", setup.writer_address, *setup.writer_args) as writer:
            assert await writer.line() == "ready"
            async with running_daemon(config) as daemon:
                await header_cached(daemon)
                await writer.tell(f"write {BATCHES} {ROUND_A} {EVENTS}")
                assert (await writer.line()).startswith("wrote ")
                history = daemon.histories["camera"]
                stream = daemon.streams.get("camera")
                await wait_until_patient(lambda: stream.frames_in >= 1 + BATCHES)
                with trio.fail_after(10):
                    await history.wait_written(history.assigned)
                address = setup.reader_address(daemon)
                count = 2 * BATCHES * EVENTS
                async with dv_peer("read", address, str(ROUND_A), str(count)) as late:
                    await connected(late, "CompressionType.NONE")
                    server = daemon.endpoints["dv-out"]
                    await wait_until_patient(lambda: len(server.status.clients) == 1)
                    await writer.tell(f"write {BATCHES} {ROUND_B} {EVENTS}")
                    assert (await writer.line()).startswith("wrote ")
                    result = (await late.line()).split()
                await writer.tell("exit")
    assert result == ["done", str(count), digest_of(ROUND_A, ROUND_B)]
