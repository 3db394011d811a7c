"""The site-to-datacentre example pair (config/site-instrument.toml and config/nats-site.conf,
a leaf node in JetStream domain "site"; config/datacentre.toml and config/nats-hub.conf, the
hub in domain "hub") relays a stream durably, as docs/spanning-machines.md says: the files as
shipped, with only addresses, certificate paths and directories pointed at this test's own
(the leaf node link over TLS with a trustme CA, the leaf node user of nats-hub.conf).

Faults on the way: a restart of the data centre's daemon (its durable consumer resumes where
it stopped), a SIGKILL of the site's embedded nats-server (framewire restarts it; publishing
retries; the hub's copy catches up), and a restart of the whole site daemon (JetStream's
files stay). A client of the data centre's pipeline gets the frames byte-identical; across
the faults, the data centre's stream must get the latest metadata first, then every frame
once. The try-it pair (config/try-leaf/) runs too, as shipped but for its ports.
"""

from __future__ import annotations

import logging
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
#: A last guard on each wait, not a measure of speed: every wait ends on its event, and a
#: machine whose CPUs are busy with other work can take many seconds over what is instant
#: alone (starting a process, a reconnect, a store's catch-up).
PATIENCE = 120.0
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


def localised(name: str, root: Path, ports: dict[str, int]) -> str:
    """An example file with its machine-specific parts pointed into ``root`` and at
    ``ports`` (``site``, ``hub``: the two servers' client ports; ``leaf``: the hub's leaf
    node port)."""
    text = (CONFIG / name).read_text()
    half = "hub" if name in ("datacentre.toml", "try-leaf/hub.toml") else "site"
    for old, new in (
        ("/etc/framewire/", f"{root}/etc/"),
        ("/var/lib/framewire/", f"{root}/archive/"),
        ('store_dir = "try-leaf-state/', f'store_dir = "{root}/try-state-'),
        ("config/try-leaf/", f"{root}/etc/try-"),
        ('listen = "127.0.0.1:4222"', f'listen = "127.0.0.1:{ports[half]}"'),
        ('listen = "127.0.0.1:4223"', f'listen = "127.0.0.1:{ports[half]}"'),
        ('listen = "127.0.0.1:4224"', f'listen = "127.0.0.1:{ports[half]}"'),
        ("0.0.0.0:7422", f"127.0.0.1:{ports['leaf']}"),
        ("127.0.0.1:7422", f"127.0.0.1:{ports['leaf']}"),
        ("hub.example.org:7422", f"127.0.0.1:{ports['leaf']}"),
        ("127.0.0.1:8765", "127.0.0.1:0"),
        ("127.0.0.1:8766", "127.0.0.1:0"),
        ("127.0.0.1:8767", "127.0.0.1:0"),
    ):
        text = text.replace(old, new)
    if "store_dir" not in text:
        text = text.replace(
            "embedded = true", f'embedded = true\nstore_dir = "{root}/state-{half}"'
        )
    for port in (4536, 4537, 4538, 4547):
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
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="framewire")
    etc = tmp_path / "etc"
    etc.mkdir()
    (tmp_path / "archive").mkdir()
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(etc / "hub-ca.pem"))
    certificate = ca.issue_cert("hub.example.org", "127.0.0.1")
    certificate.private_key_pem.write_to_path(str(etc / "hub-nats.key"))
    certificate.cert_chain_pems[0].write_to_path(str(etc / "hub-nats.crt"))
    ports = {"site": free_port(), "hub": free_port(), "leaf": free_port()}
    for name in ("nats-site.conf", "nats-hub.conf"):
        (etc / name).write_text(localised(name, tmp_path, ports))
    site = localised("site-instrument.toml", tmp_path, ports)
    datacentre = localised("datacentre.toml", tmp_path, ports)

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
        assert a.nats_server.store_dir == tmp_path / "state-site"
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

    # The hub says once per outage that it has not heard from the site (not every 2 s).
    silent = [r for r in caplog.records if "has not heard from domain site" in r.getMessage()]
    assert len(silent) <= 2, [r.getMessage() for r in silent]
    data = got[1:]
    assert got[0] == METADATA
    assert [int(frame.headers["seq"]) for frame in data] == list(range(100, 400))
    assert data == frames(100, 400)


async def test_the_try_it_pair_runs_on_one_machine(tmp_path: Path) -> None:
    """config/try-leaf/: the commands of docs/spanning-machines.md, as shipped but for the
    ports and the state directories: the hub's client gets the generator's metadata first,
    then its frames in order."""
    etc = tmp_path / "etc"
    etc.mkdir()
    ports = {"site": free_port(), "hub": free_port(), "leaf": free_port()}
    for name in ("site.conf", "hub.conf"):
        (etc / f"try-{name}").write_text(localised(f"try-leaf/{name}", tmp_path, ports))
    hub_toml = localised("try-leaf/hub.toml", tmp_path, ports)
    async with (
        daemon_of(hub_toml) as hub,
        daemon_of(localised("try-leaf/site.toml", tmp_path, ports)),
    ):
        client = await connect(endpoint_port(hub, "out"))
        async with client.stream:
            got = await read(client, 5)
    assert got[0].kind is FrameKind.METADATA
    assert [frame.kind for frame in got[1:]] == [FrameKind.DATA] * 4
    stamps = [frame.timestamp for frame in got[1:]]
    assert stamps == sorted(stamps)
