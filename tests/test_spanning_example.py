"""The site-to-datacentre example pair (config/site-instrument.toml, config/nats-site.conf,
config/datacentre.toml) relays a stream durably, as docs/spanning-machines.md says: the files
as shipped, with only addresses, certificate paths and directories pointed at this test's
own (TLS with a trustme CA, the users and passwords of nats-site.conf).

Faults on the way: a restart of the data centre's daemon (its durable consumer resumes where
it stopped), a SIGKILL of the site's embedded nats-server (framewire restarts it; publishing
retries), and a restart of the whole site daemon (JetStream's files stay). A client of the
data centre's pipeline gets the frames byte-identical; across the faults, the data centre's
stream must get the latest metadata first, then every frame once.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from framewire import Frame, FrameKind
from framewire.config import parse_config
from framewire.daemon import Daemon
from framewire.daemon.stream import Policy, QueueBounds, Subscription

from .helpers import NativePeer, connect, endpoint_port, wait_until
from .test_systemd import free_port

pytest.importorskip("nats")
trustme = pytest.importorskip("trustme")

CONFIG = Path(__file__).parent.parent / "config"
PATIENCE = 30.0
METADATA = Frame(FrameKind.METADATA, "observation", b"obs-1", timestamp=1, headers={"run": "7"})


def frames(start: int, stop: int) -> list[Frame]:
    return [
        Frame(
            FrameKind.DATA,
            "sample",
            i.to_bytes(4, "big") * 64,
            timestamp=1_700_000_000_000_000_000 + i,
            headers={"seq": str(i)},
        )
        for i in range(start, stop)
    ]


def localised(name: str, root: Path, nats_port: int) -> str:
    """An example file with its machine-specific parts pointed into ``root``."""
    text = (CONFIG / name).read_text()
    for old, new in (
        ("/etc/framewire/", f"{root}/etc/"),
        ("/var/lib/framewire/", f"{root}/archive/"),
        ('listen = "*:4222"', f'listen = "127.0.0.1:{nats_port}"'),
        ("tls://127.0.0.1:4222", f"tls://127.0.0.1:{nats_port}"),
        ("tls://site-a.example.org:4222", f"tls://127.0.0.1:{nats_port}"),
        ("127.0.0.1:8765", "127.0.0.1:0"),
    ):
        text = text.replace(old, new)
    for port in (4536, 4537, 4538):
        text = text.replace(f"tcp://127.0.0.1:{port}", "tcp://127.0.0.1:0")
        text = text.replace(f"tcp://*:{port}", "tcp://127.0.0.1:0")
    return text


@asynccontextmanager
async def daemon_of(text: str, tap: list[Subscription] | None = None) -> AsyncIterator[Daemon]:
    """A daemon running ``text``; with ``tap``, a lossless subscription to its stream
    "camera", made before anything starts, is appended to it."""
    daemon = Daemon(parse_config(text))
    if tap is not None:
        tap.append(
            daemon.streams.get("camera").subscribe(
                bounds=QueueBounds(100_000, 1 << 30), policy=Policy.LOSSLESS, label="test tap"
            )
        )
    async with trio.open_nursery() as nursery:
        with trio.fail_after(PATIENCE):
            await nursery.start(daemon.run)
        try:
            yield daemon
        finally:
            daemon.request_shutdown()


async def read(peer: NativePeer, count: int) -> list[Frame]:
    with trio.fail_after(PATIENCE):
        return await peer.read(count)


async def take(subscription: Subscription, count: int) -> list[Frame]:
    """The next ``count`` frames of ``subscription``."""
    got: list[Frame] = []
    with trio.fail_after(PATIENCE):
        while len(got) < count:
            got += await subscription.receive_batch(count - len(got))
    return got


async def test_the_example_pair_relays_durably_across_restarts_and_a_killed_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (tmp_path / "archive").mkdir()
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(etc / "site-ca.pem"))
    certificate = ca.issue_cert("site-a.example.org", "127.0.0.1")
    certificate.private_key_pem.write_to_path(str(etc / "site-nats.key"))
    certificate.cert_chain_pems[0].write_to_path(str(etc / "site-nats.crt"))
    nats_port = free_port()
    (etc / "nats-site.conf").write_text(localised("nats-site.conf", tmp_path, nats_port))
    site = localised("site-instrument.toml", tmp_path, nats_port)
    datacentre = localised("datacentre.toml", tmp_path, nats_port)
    # The embedded server keeps JetStream under $STATE_DIRECTORY/nats, as under systemd.
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))

    async def produce(daemon: Daemon, sent: list[Frame]) -> None:
        source = await connect(endpoint_port(daemon, "instrument-in"))
        async with source.stream:
            await source.send(sent)
            publisher = daemon.endpoints["to-jetstream"]
            before = publisher.status.frames_out
            # Acknowledged by JetStream (after a killed server, once the unanswered
            # publishes have waited out ack_timeout, 10 s, and been sent again).
            with trio.fail_after(PATIENCE):
                while publisher.status.frames_out < before + len(sent):  # noqa: ASYNC110
                    await trio.sleep(0.01)

    async with daemon_of(site) as a:
        assert a.nats_server is not None
        assert a.nats_server.store_dir == tmp_path / "state" / "nats"
        async with daemon_of(datacentre) as b:
            pipeline = await connect(endpoint_port(b, "pipeline"))
            async with pipeline.stream:
                await produce(a, [METADATA, *frames(0, 100)])
                assert await read(pipeline, 101) == [METADATA, *frames(0, 100)]

        # The data centre is away: the site spools.
        await produce(a, frames(100, 200))

        # Restarted, the data centre's daemon resumes the spool at once: what it reads goes
        # into its stream before any client could connect, so the stream itself is watched.
        tap: list[Subscription] = []
        async with daemon_of(datacentre, tap) as b:
            (stream,) = tap
            # Latest metadata first, then resumed where the durable consumer stopped.
            got = await take(stream, 101)
            assert got == [METADATA, *frames(100, 200)]

            # The site's nats-server is killed; framewire starts it again, on its port.
            server = a.nats_server
            killed = server.pid
            assert killed is not None
            os.kill(killed, signal.SIGKILL)
            await produce(a, frames(200, 300))
            assert server.restarts == 1
            got += await take(stream, 100)

            # The whole site daemon restarts (and its server with it); JetStream's files stay.
            a.request_shutdown()
            await wait_until(lambda: a.state == "stopped")
            async with daemon_of(site) as a2:
                await produce(a2, frames(300, 400))
                got += await take(stream, 100)
            # Nothing more is on its way (no frame twice).
            with trio.move_on_after(1):
                extra = await stream.receive_batch()
                pytest.fail(f"more frames than sent: {extra}")

    data = got[1:]
    assert got[0] == METADATA
    assert [int(frame.headers["seq"]) for frame in data] == list(range(100, 400))
    assert data == frames(100, 400)
