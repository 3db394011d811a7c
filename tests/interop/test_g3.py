"""framewire between real spt3g peers (spt3g from PyPI; every peer in its own process)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio

from framewire.daemon import Daemon
from framewire.protocols.g3 import G3Decoder

from ..helpers import port_of, running_daemon, wait_until
from .peers import describe, g3_peer

pytestmark = pytest.mark.interop
pytest.importorskip("spt3g")

RELAY = """
[daemon]
grace_period = "5s"

[endpoints.g3-in]
kind = "receiver"
listen = "tcp://127.0.0.1:0"
protocol = "g3"
stream = "camera"
verify_crc = true

[endpoints.g3-out]
kind = "server"
listen = "tcp://127.0.0.1:0"
protocol = "g3"
stream = "camera"
close_on_end = true
max_queue_frames = {queue}
"""

METADATA = set("OCWHPGN")


def port(daemon: Daemon, name: str) -> int:
    return port_of(daemon.endpoints[name].status.address[0])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        number: int = s.getsockname()[1]
        return number


def recordings(directory: Path) -> list[str]:
    return sorted(str(path) for path in directory.glob("run-*.g3"))


def latest_metadata(lines: list[str]) -> list[str]:
    """What the metadata cache holds after ``lines``: latest per type, first-seen order."""
    cache: dict[str, str] = {}
    for line in lines:
        if line[0] in METADATA:
            cache[line[0]] = line
    return list(cache.values())


async def test_sender_to_two_readers_the_late_one_gets_metadata_first() -> None:
    async with running_daemon(RELAY.format(queue=1024)) as daemon:
        out = f"tcp://127.0.0.1:{port(daemon, 'g3-out')}"
        clients = daemon.endpoints["g3-out"].status.clients
        async with g3_peer("read", out) as early:
            await early.expect("connected")
            await wait_until(lambda: len(clients) == 1)
            script = "O,W,C:100,S:5000,T,C:200,S:5000,T,H:10,WAIT,S:5000,T,C:300,S:7000,T"
            async with g3_peer("send", "127.0.0.1", str(port(daemon, "g3-in")), script) as sender:
                first = await sender.frames_until("waiting")
                stream = daemon.streams.get("camera")
                await wait_until(lambda: stream.frames_in == len(first))
                async with g3_peer("read", out) as late:
                    await late.expect("connected")
                    await wait_until(lambda: len(clients) == 2)
                    await sender.tell("go")
                    second = [await sender.line() for _ in range(5)]
                    assert await sender.wait() == 0
                    # The upstream ended: both readers get everything queued, then a clean EOF.
                    early_frames = await early.frames_until("end")
                    late_frames = await late.frames_until("end")
    assert early_frames == first + second
    assert late_frames == latest_metadata(first) + second
    assert [line[0] for line in latest_metadata(first)] == ["O", "W", "C", "H"]


async def test_a_stalled_reader_loses_only_scans_and_timepoints() -> None:
    # The reader reads nothing until the sender is done, however long that takes on a busy
    # machine; so that it is not dropped as too slow meanwhile, send_timeout is far off.
    relay = RELAY.format(queue=5) + 'send_timeout = "1h"\n'
    async with running_daemon(relay) as daemon:
        out = f"tcp://127.0.0.1:{port(daemon, 'g3-out')}"
        clients = daemon.endpoints["g3-out"].status.clients
        async with g3_peer("read", out, "--stalled") as stalled:
            await stalled.expect("connected")
            await wait_until(lambda: len(clients) == 1)
            items = ["O", "W"]
            for i in range(40):
                items += ["S:1000000", "T"] + (["C:100"] if i % 10 == 9 else [])
            async with g3_peer(
                "send", "127.0.0.1", str(port(daemon, "g3-in")), ",".join(items)
            ) as sender:
                sent = await sender.rest()
                assert await sender.wait() == 0
                await stalled.tell("read")
                got = await stalled.frames_until("end")
    kept_data = [line for line in got if line[0] in "ST"]
    assert [line for line in got if line[0] not in "ST"] == [
        line for line in sent if line[0] not in "ST"
    ]
    assert len(kept_data) < len([line for line in sent if line[0] in "ST"])
    # What arrived arrived whole and in order: a subsequence of what was sent.
    position = 0
    for line in got:
        position = sent.index(line, position) + 1


async def test_file_to_sender_to_a_listening_reader_byte_identical(tmp_path: Path) -> None:
    recording = tmp_path / "run.g3"
    script = "O,W,C:100," + ",".join(["S:300000", "T"] * 10) + ",C:50,S:10,T"
    async with g3_peer("write", str(recording), script) as writer:
        written = await writer.rest()
        assert await writer.wait() == 0
    reader_port = free_port()
    config = f"""
[endpoints.deliver]
kind = "sender"
connect = "tcp://127.0.0.1:{reader_port}"
protocol = "g3"
stream = "replay"
close_on_end = true
reconnect = {{ initial = "100ms", maximum = "1s" }}

[endpoints.replay]
kind = "file"
path = "{recording}"
protocol = "g3"
stream = "replay"
"""
    async with g3_peer("read", f"tcp://*:{reader_port}") as reader:
        await reader.expect("listening")
        async with running_daemon(config):
            got = await reader.frames_until("end")
    assert got == written


async def test_relay_reconnects_when_the_upstream_server_restarts() -> None:
    upstream = free_port()
    config = f"""
[endpoints.g3-in]
kind = "receiver"
connect = "tcp://127.0.0.1:{upstream}"
protocol = "g3"
stream = "camera"
reconnect = {{ initial = "100ms", maximum = "500ms" }}

[endpoints.g3-out]
kind = "server"
listen = "tcp://127.0.0.1:0"
protocol = "g3"
stream = "camera"
"""
    frames: list[str] = []
    async with running_daemon(config) as daemon:
        client = await trio.open_tcp_stream("127.0.0.1", port(daemon, "g3-out"))
        decoder = G3Decoder(max_frame_size=1 << 24)

        async def read(count: int) -> None:
            with trio.fail_after(60):
                while len(frames) < count:
                    for frame in decoder.feed(await client.receive_some(65536)):
                        frames.append(describe(frame.type[0], bytes(frame.wire or b"")))

        # A listen-mode sender accepts only while it processes frames: keep them coming.
        run = ",".join(["O"] + ["S:100,SLEEP:0.05"] * 60)
        async with g3_peer("serve", str(upstream), run) as first:
            await first.expect("listening")
            await read(10)
            first.process.kill()
        async with g3_peer("serve", str(upstream), run.replace("O", "W", 1)) as second:
            await second.expect("listening")
            before = len(frames)
            await read(before + 10)
        await client.aclose()
    assert any(line.startswith("W") for line in frames)
    assert frames[0].startswith("O")


async def test_recorder_writes_files_a_real_g3reader_opens(tmp_path: Path) -> None:
    config = f"""
[endpoints.g3-in]
kind = "receiver"
listen = "tcp://127.0.0.1:0"
protocol = "g3"
stream = "camera"

[endpoints.archive]
kind = "recorder"
path = "{tmp_path / "run.g3"}"
protocol = "g3"
stream = "camera"
max_file_size = "1MB"
"""
    script = "O,W,C:100," + ",".join(["S:300000", "T"] * 6)
    async with running_daemon(config) as daemon:
        recorder = daemon.endpoints["archive"]
        async with g3_peer("send", "127.0.0.1", str(port(daemon, "g3-in")), script) as sender:
            sent = await sender.rest()
            assert await sender.wait() == 0
        # The upstream ended: the recorder closes its file; wait until it has.
        await wait_until(lambda: recorder.status.frames_in == len(sent))
        await wait_until(lambda: "file" not in recorder.status.detail)
    files = recordings(tmp_path)
    assert len(files) >= 2  # rotated at 1 MB
    frames: list[str] = []
    for file in files:
        async with g3_peer("read", file) as reader:
            lines = await reader.frames_until("end")
        # Every file starts with the metadata of its run, so each one stands alone.
        assert [line[0] for line in lines[:3]] == ["O", "W", "C"]
        frames += [line for line in lines if line[0] in "ST"]
    assert frames == [line for line in sent if line[0] in "ST"]
