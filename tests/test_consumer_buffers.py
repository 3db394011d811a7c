"""Disk buffers on every consuming endpoint besides the sender (tests/test_disk_buffer.py):
a ``link``, a ``recorder``, a ``bridge`` and a publishing ``nats`` endpoint whose far end is
away take what their producer sends onto the disk without holding the stream back (the
producer's sends complete, no stream is held), keep it across a restart of the daemon, and
deliver all of it, in order and once, when the far end is back.

Each uses a real daemon and real loopback sockets; the NATS test a real nats-server behind a
proxy that cuts the link (tests/nats_helpers.py).
"""

from __future__ import annotations

import errno
import logging
import threading
from pathlib import Path
from typing import Any

import pytest
import trio

from framewire import Frame, FrameKind
from framewire.config import parse_config
from framewire.daemon import Daemon
from framewire.daemon.endpoints import recorder as recorder_module
from framewire.protocols.native import NativeDecoder

from .helpers import connect, endpoint_port, running_daemon, wait_until
from .nats_helpers import (
    PATIENCE,
    NatsServer,
    StallingProxy,
    count,
    nats_endpoint,
    producer,
    publisher_toml,
    read,
    subscriber_toml,
    wait_state,
)


def meta(type_: str, body: bytes) -> Frame:
    return Frame(FrameKind.METADATA, type_, body)


def data(i: int, size: int = 4096) -> Frame:
    return Frame(FrameKind.DATA, "d", i.to_bytes(8, "big") * (size // 8), timestamp=i)


def detail(daemon: Daemon, name: str) -> dict[str, int]:
    """The endpoint's counters in ``detail`` (the integers only)."""
    figures = daemon.endpoints[name].status.current_detail()
    return {key: value for key, value in figures.items() if isinstance(value, int)}


async def not_held(daemon: Daemon, stream: str, frames: int) -> None:
    """The stream took all ``frames`` its producer sent (receiver ``in``) and flows: nothing
    holds its producers back (a disk buffer's intake may hold it for the moment a batch takes
    to reach the disk)."""
    await wait_until(lambda: daemon.endpoints["in"].status.frames_in == frames)
    await wait_until(lambda: not any(s.held_by for s in daemon.streams if s.name == stream))


# -- link -------------------------------------------------------------------------------------


def link_site(directory: Path) -> str:
    """A site daemon: producers -> stream s -> a listening link with a disk buffer."""
    return f"""
[daemon]
grace_period = "2s"

[endpoints.in]
kind = "receiver"
listen = "tcp://127.0.0.1:0"
stream = "s"

[endpoints.uplink]
kind = "link"
listen = "tcp://127.0.0.1:0"
subscribe = "s"
max_queue_frames = 16
max_queue_bytes = "256KiB"

[endpoints.uplink.buffer]
type = "disk"
path = "{directory}"
"""


def link_hub(port: int) -> str:
    """A hub daemon: a link to the site -> stream t -> a lossless server."""
    return f"""
[endpoints.downlink]
kind = "link"
connect = "tcp://127.0.0.1:{port}"
publish = "t"
reconnect = {{ initial = "50ms", maximum = "200ms" }}

[endpoints.out]
kind = "server"
listen = "tcp://127.0.0.1:0"
stream = "t"
policy = "lossless"
max_queue_frames = 100000
max_queue_bytes = "1GiB"
"""


async def test_a_link_with_no_peer_takes_everything_and_delivers_it_after_a_restart(
    tmp_path: Path,
) -> None:
    sent = [meta("config", b"v1")] + [data(i) for i in range(1000)]
    sent += [meta("config", b"v2")] + [data(i) for i in range(1000, 1500)]
    directory = tmp_path / "uplink"
    async with running_daemon(link_site(directory)) as site:
        source = await connect(endpoint_port(site, "in"))
        with trio.fail_after(PATIENCE):
            await source.send(sent)  # 1,501 frames past a 16-frame queue: the disk takes them
        await wait_until(lambda: detail(site, "uplink")["buffer_frames"] == len(sent))
        await not_held(site, "s", len(sent))
        assert site.endpoints["uplink"].status.detail["buffer_type"] == "disk"
        await source.stream.aclose()
    # The daemon stopped with everything on disk; a new one delivers it all, metadata first.
    async with running_daemon(link_site(directory)) as site:
        await wait_until(lambda: detail(site, "uplink")["buffer_frames"] == len(sent))
        async with running_daemon(link_hub(endpoint_port(site, "uplink"))) as hub:
            client = await connect(endpoint_port(hub, "out"))
            got = await read(client, len(sent))
            assert got == sent
            await wait_until(lambda: detail(site, "uplink")["buffer_frames"] == 0)
            assert site.endpoints["uplink"].status.frames_out == len(sent)
            await client.stream.aclose()


# -- recorder ---------------------------------------------------------------------------------


def recorder_config(files: Path, directory: Path) -> str:
    return f"""
[endpoints.in]
kind = "receiver"
listen = "tcp://127.0.0.1:0"
stream = "s"

[endpoints.rec]
kind = "recorder"
path = "{files / "run.fw"}"
stream = "s"
max_queue_frames = 16
max_queue_bytes = "256KiB"

[endpoints.rec.buffer]
type = "disk"
path = "{directory}"
"""


def recorded(files: Path) -> list[Frame]:
    frames: list[Frame] = []
    for path in sorted(files.glob("run-*.fw")):
        decoder = NativeDecoder(max_frame_size=1 << 20)
        frames += decoder.feed(path.read_bytes())
        decoder.end_of_input()
    return frames


async def test_a_recorder_on_a_stalled_disk_holds_nothing_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recording disk stalls (every write waits); the producer goes on, the disk buffer
    holds the frames; when the disk is back every frame is in the file, in order."""
    stalled = threading.Event()
    disk_back = threading.Event()
    write = recorder_module._write

    def stalling_write(handle: Any, buffers: Any) -> None:
        stalled.set()
        if not disk_back.wait(60):
            raise OSError("the test's disk never came back")
        write(handle, buffers)

    monkeypatch.setattr(recorder_module, "_write", stalling_write)
    sent = [meta("config", b"v1")] + [data(i) for i in range(1000)]
    files = tmp_path / "files"
    async with running_daemon(recorder_config(files, tmp_path / "buffer")) as daemon:
        source = await connect(endpoint_port(daemon, "in"))
        try:
            with trio.fail_after(PATIENCE):
                await source.send(sent)
            await wait_until(stalled.is_set)
            await wait_until(lambda: detail(daemon, "rec")["buffer_frames"] == len(sent))
            await not_held(daemon, "s", len(sent))
        finally:
            disk_back.set()
        await wait_until(lambda: detail(daemon, "rec")["buffer_frames"] == 0)
        await source.stream.aclose()
    assert recorded(files) == sent


async def test_a_recorder_whose_disk_fails_keeps_everything_for_the_next_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The recording disk fails after the first write: one ERROR line, state
    ``writing_failed``, the stream is not held and the frames wait in the disk buffer. The
    daemon is stopped; the next one writes them into a new file that starts with the
    metadata current for them. Nothing is lost; only a batch in flight may come twice."""
    caplog.set_level(logging.INFO, logger="framewire")
    write = recorder_module._write
    writes = [0]

    def write_once_then_fail(handle: Any, buffers: Any) -> None:
        writes[0] += 1
        if writes[0] > 1:
            raise OSError(errno.EIO, "Input/output error", "the test's disk")
        write(handle, buffers)

    first = [meta("config", b"v1"), data(0)]
    later = [data(i) for i in range(1, 500)]
    files = tmp_path / "files"
    buffer = tmp_path / "buffer"
    monkeypatch.setattr(recorder_module, "_write", write_once_then_fail)
    async with running_daemon(recorder_config(files, buffer)) as daemon:
        rec = daemon.endpoints["rec"]
        source = await connect(endpoint_port(daemon, "in"))
        await source.send(first)
        await wait_until(lambda: rec.status.frames_in == len(first))
        with trio.fail_after(PATIENCE):
            await source.send(later)
        await wait_until(lambda: rec.status.state == "writing_failed")
        await wait_until(lambda: detail(daemon, "rec")["buffer_frames"] == len(later))
        await not_held(daemon, "s", len(first) + len(later))
        assert rec.status.restarts == 0
        await source.stream.aclose()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert "Input/output error" in errors[0]
    monkeypatch.setattr(recorder_module, "_write", write)
    async with running_daemon(recorder_config(files, buffer)) as daemon:
        rec = daemon.endpoints["rec"]
        await wait_until(lambda: rec.status.frames_in >= len(later))
        await wait_until(lambda: detail(daemon, "rec")["buffer_frames"] == 0)
    paths = sorted(files.glob("run-*.fw"))
    assert len(paths) >= 2
    last = NativeDecoder(max_frame_size=1 << 20).feed(paths[-1].read_bytes())
    assert last[0] == first[0]  # the file stands alone: the run's metadata first
    got = recorded(files)
    data_seen = [frame.timestamp for frame in got if frame.kind is FrameKind.DATA]
    assert sorted(set(data_seen)) == list(range(500))


# -- bridge -----------------------------------------------------------------------------------


async def test_a_bridge_with_no_rogue_peer_keeps_the_frames_for_it(tmp_path: Path) -> None:
    pytest.importorskip("zmq")
    from .rogue_peer import PATIENCE as ROGUE_PATIENCE
    from .rogue_peer import consecutive_free_ports, rogue_peer

    port = consecutive_free_ports()
    config = f"""
[endpoints.in]
kind = "receiver"
listen = "tcp://127.0.0.1:0"
stream = "to-rogue"

[endpoints.rogue]
kind = "bridge"
role = "server"
address = "tcp://127.0.0.1:{port}"
subscribe = "to-rogue"
max_queue_frames = 16
max_queue_bytes = "256KiB"

[endpoints.rogue.buffer]
type = "disk"
path = "{tmp_path / "bridge"}"
"""
    sent = [
        Frame(
            FrameKind.DATA,
            "ch1",
            i.to_bytes(4, "big") * 256,
            headers={"flags": str(i % 65536), "channel": "1", "error": "0"},
        )
        for i in range(600)
    ]
    async with running_daemon(config) as daemon:
        source = await connect(endpoint_port(daemon, "in"))
        with trio.fail_after(PATIENCE):
            await source.send(sent)  # no peer: ZeroMQ takes nothing; the disk does
        await wait_until(lambda: detail(daemon, "rogue")["buffer_frames"] >= len(sent) - 16)
        await not_held(daemon, "to-rogue", len(sent))
        async with rogue_peer("client", port) as peer:
            got = []
            with trio.fail_after(ROGUE_PATIENCE):
                for _ in sent:
                    got.append(await peer.receive())
        assert got == [(i % 65536, 1, 0, i.to_bytes(4, "big") * 256) for i in range(600)]
        await wait_until(lambda: detail(daemon, "rogue")["buffer_frames"] == 0)
        await source.stream.aclose()


# -- nats ---------------------------------------------------------------------------------


async def test_a_jetstream_publisher_rides_out_a_cut_link_and_a_restart_on_disk(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """The link to NATS is cut; the producer goes on (its stream is not held), the frames
    wait on disk, through a restart of the daemon; once the link is back every frame is
    stored once, in order, and a durable reader gets them all."""
    pytest.importorskip("nats")
    sent = [meta("config", b"v1")] + [data(i, 2048) for i in range(3000)]
    buffer = f"""
max_queue_frames = 16
max_queue_bytes = "256KiB"
max_inflight_bytes = "256KiB"
ack_timeout = "1s"

[endpoints.to-nats.buffer]
type = "disk"
path = "{tmp_path / "to-nats"}"
"""
    async with trio.open_nursery() as nursery:
        proxy = StallingProxy(nats_server.port)
        await nursery.start(proxy.run)
        url = f"nats://127.0.0.1:{proxy.port}"
        toml = publisher_toml(url, mode="jetstream", extra=buffer)
        async with running_daemon(toml) as a:
            writer = nats_endpoint(a, "to-nats")
            await wait_state(writer, "publishing")
            async with producer(a) as source:
                await source.send(sent[:500])
                await wait_until(lambda: writer.status.frames_out >= 100)
                proxy.cut()
                with trio.fail_after(PATIENCE):
                    await source.send(sent[500:])
                await wait_until(lambda: detail(a, "to-nats")["buffer_frames"] > 2000)
                await not_held(a, "camera", len(sent))
        proxy.resume()
        async with running_daemon(toml) as a:
            writer = nats_endpoint(a, "to-nats")
            await wait_until(lambda: writer.status.detail["buffer_state"] == "ok")
            await wait_until(lambda: detail(a, "to-nats")["buffer_frames"] == 0, patience=60)
        nursery.cancel_scope.cancel()
    durable = 'durable = "archive"\nstart = "all"'
    reader_toml = subscriber_toml(nats_server.url, mode="jetstream", extra=durable)
    async with running_daemon(reader_toml) as b:
        reader = nats_endpoint(b, "from-nats")
        client = await connect(endpoint_port(b, "out"))
        # Until the last frame: windows in flight when the link was cut may have been
        # stored without their acks coming back; the restarted daemon publishes them again
        # under its own producer name, so the stream may hold those (and only those) twice.
        with trio.fail_after(4 * PATIENCE):
            while not client.frames or client.frames[-1] != sent[-1]:
                await client.read(len(client.frames) + 1)
        got = client.frames
        await wait_until(lambda: count(reader, "consumer_pending") == 0)
        await client.stream.aclose()
    data_got = [f.timestamp for f in got if f.kind is FrameKind.DATA]
    assert sorted(set(data_got)) == list(range(3000))  # nothing lost
    # In order, but for one step back: the frames in flight at the cut, published again
    # (at most max_inflight_bytes of them: 256 KiB of 2 KiB frames).
    steps_back = [i for i in range(1, len(data_got)) if data_got[i] <= data_got[i - 1]]
    assert len(steps_back) <= 1, steps_back
    assert len(data_got) - 3000 <= 128
    assert got[0] == sent[0]  # the metadata first
    assert count(reader, "frames_lost_upstream") == 0


def test_a_disk_buffer_refuses_a_lossy_policy_and_a_subscribing_nats_endpoint() -> None:
    from framewire.config import ConfigError

    lossy = """
[endpoints.rec]
kind = "recorder"
path = "/tmp/x.fw"
stream = "s"
policy = "lossy"
buffer = { type = "disk" }
"""
    with pytest.raises(ConfigError, match=r"endpoints\.rec\.policy.*drop_oldest"):
        parse_config(lossy)
    subscribing = """
[endpoints.n]
kind = "nats"
direction = "subscribe"
servers = ["nats://127.0.0.1:4222"]
stream = "s"
buffer = { type = "disk" }
"""
    with pytest.raises(ConfigError, match=r"endpoints\.n\.buffer.*publish"):
        parse_config(subscribing)
