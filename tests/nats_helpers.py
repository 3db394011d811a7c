"""Helpers of the NATS tests: a real nats-server process, the two daemons' configurations,
and a TCP proxy that can stop forwarding (a blackholed link)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from framewire import Frame, FrameKind
from framewire.daemon import Daemon
from framewire.daemon.endpoints.nats import NatsEndpoint

from .helpers import NativePeer, connect, endpoint_port

SERVER_BINARY = Path(sys.executable).parent / "nats-server"
#: A last guard on each wait, not a measure of speed: every wait ends on its event, and a
#: machine whose CPUs are busy with other work can take many seconds over what is instant
#: alone (starting a process, a reconnect, a store's catch-up).
PATIENCE = 60.0


class NatsServer:
    """A nats-server process with JetStream in ``store``; restartable on the same port."""

    def __init__(self, directory: Path, *extra: str) -> None:
        self.directory = directory
        self.extra = extra
        self.port = -1
        self.process: subprocess.Popen[bytes] | None = None
        self.log = directory / "nats-server.log"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        """The program and its arguments (the ports file goes into ``ports_dir``)."""
        return [
            str(SERVER_BINARY),
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            "--ports_file_dir",
            str(self.ports_dir),
            "-js",
            "-sd",
            str(self.directory / "store"),
            "-l",
            str(self.log),
            *self.extra,
        ]

    @property
    def ports_dir(self) -> Path:
        return self.directory / "ports"

    def start(self) -> None:
        self.ports_dir.mkdir(exist_ok=True)
        process = self.process = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        ports_file = self.ports_dir / f"nats-server_{process.pid}.ports"
        deadline = time.monotonic() + PATIENCE
        while True:
            if ports_file.exists():
                try:
                    urls = json.loads(ports_file.read_text())["nats"]
                    break
                except (ValueError, KeyError):
                    pass  # written but not complete yet
            if process.poll() is not None:
                log = self.log.read_text()[-2000:] if self.log.exists() else ""
                raise RuntimeError(f"nats-server exited: {log}")
            if time.monotonic() > deadline:
                raise TimeoutError("nats-server wrote no ports file")
            time.sleep(0.01)
        self.port = int(urls[0].rsplit(":", 1)[1])

    def stop(self, sig: int = signal.SIGTERM) -> None:
        process = self.process
        if process is None:
            return
        self.process = None
        if process.poll() is None:
            os.kill(process.pid, sig)
            try:
                process.wait(PATIENCE)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(PATIENCE)
        if process.stderr is not None:
            process.stderr.close()


class ConfiguredNatsServer(NatsServer):
    """A nats-server process run on a configuration file (``body`` plus its listen address,
    ports file and name): a hub or a site's leaf node."""

    def __init__(self, directory: Path, name: str, body: str) -> None:
        super().__init__(directory / name)
        self.directory.mkdir(parents=True)
        self.config = self.directory / "nats-server.conf"
        self.config.write_text(
            f'server_name: "{name}"\nlisten: "127.0.0.1:-1"\n'
            f'ports_file_dir: "{self.ports_dir}"\n{body}\n'
        )

    def command(self) -> list[str]:
        return [str(SERVER_BINARY), "-c", str(self.config), "-l", str(self.log)]


def frames_of(count: int, *, start: int = 0, size: int = 100) -> list[Frame]:
    return [
        Frame(
            FrameKind.DATA,
            "sample",
            bytes([i % 251]) * size,
            timestamp=1_700_000_000_000_000_000 + i,
            headers={"seq": str(i)},
        )
        for i in range(start, start + count)
    ]


METADATA = [
    Frame(FrameKind.METADATA, "observation", b"obs-1", timestamp=5, headers={"who": "a b%"}),
    Frame(FrameKind.METADATA, "calibration.v2", b"\x00cal\xff", timestamp=6),
]


def publisher_toml(url: str, *, mode: str = "core", extra: str = "") -> str:
    return f"""
[endpoints.in]
kind = "receiver"
listen = "tcp://127.0.0.1:0"
stream = "camera"

[endpoints.to-nats]
kind = "nats"
direction = "publish"
servers = ["{url}"]
stream = "camera"
mode = "{mode}"
reconnect = {{ initial = "0.05s", maximum = "0.5s" }}
{extra}
"""


def subscriber_toml(url: str, *, mode: str = "core", extra: str = "") -> str:
    return f"""
[endpoints.from-nats]
kind = "nats"
direction = "subscribe"
servers = ["{url}"]
stream = "camera"
mode = "{mode}"
reconnect = {{ initial = "0.05s", maximum = "0.5s" }}
{extra}

[endpoints.out]
kind = "server"
listen = "tcp://127.0.0.1:0"
stream = "camera"
policy = "lossless"
max_queue_frames = 100000
max_queue_bytes = "1GiB"
"""


def nats_endpoint(daemon: Daemon, name: str) -> NatsEndpoint:
    endpoint = daemon.endpoints[name]
    assert isinstance(endpoint, NatsEndpoint)
    return endpoint


def count(endpoint: NatsEndpoint, key: str) -> int:
    value = endpoint.status.detail[key]
    assert isinstance(value, int)
    return value


async def wait_state(endpoint: NatsEndpoint, *states: str) -> None:
    with trio.fail_after(PATIENCE):
        await endpoint.wait_for_state(*states)


@asynccontextmanager
async def producer(daemon: Daemon) -> AsyncIterator[NativePeer]:
    peer = await connect(endpoint_port(daemon, "in"))
    try:
        yield peer
    finally:
        await peer.stream.aclose()


async def read(peer: NativePeer, count: int) -> list[Frame]:
    with trio.fail_after(PATIENCE):
        return await peer.read(count)


class StallingProxy:
    """A TCP proxy from a port on 127.0.0.1 (ephemeral unless given) to ``target_port``, for
    links that stall: :meth:`hold` stops forwarding in one or both directions (the
    connections stay open, new ones are accepted and held too; bytes wait in the proxy and
    the kernel, as on a blackholed link whose TCP has not given up), :meth:`cut` closes every
    connection and closes new ones at once (a link that is down), :meth:`resume` forwards
    again. Run it with ``nursery.start(proxy.run)``. benchmarks/nats_faults.py uses it too.
    """

    def __init__(self, target_port: int, port: int = 0) -> None:
        self.target_port = target_port
        self.port = port
        self._up = trio.Event()
        self._down = trio.Event()
        self._up.set()
        self._down.set()
        self._cut = False
        self._connections: set[trio.CancelScope] = set()

    def hold(self, *, upstream: bool = True, downstream: bool = True) -> None:
        """Stop forwarding client->server (``upstream``) and/or server->client bytes."""
        if upstream:
            self._up = trio.Event()
        if downstream:
            self._down = trio.Event()

    def cut(self) -> None:
        """Close every connection, and every new one at once, until :meth:`resume`."""
        self._cut = True
        for scope in list(self._connections):
            scope.cancel()

    def resume(self) -> None:
        self._cut = False
        self._up.set()
        self._down.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started()
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    async def _handle(self, client: trio.SocketStream) -> None:
        if self._cut:
            await client.aclose()
            return
        try:
            server = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        except OSError:
            await client.aclose()
            return
        async with client, server, trio.open_nursery() as nursery:
            self._connections.add(nursery.cancel_scope)

            async def pump(source: trio.SocketStream, sink: trio.SocketStream, up: bool) -> None:
                try:
                    while True:
                        await (self._up if up else self._down).wait()
                        data = await source.receive_some(1 << 16)
                        if not data:
                            break
                        await (self._up if up else self._down).wait()
                        await sink.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(pump, client, server, True)
            nursery.start_soon(pump, server, client, False)
        self._connections.discard(nursery.cancel_scope)
