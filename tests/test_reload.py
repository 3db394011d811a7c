"""Hot reload: unchanged endpoints keep their clients; changed, removed and new ones follow."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from pathlib import Path

import trio

from framewire import Frame, FrameKind
from framewire.config import load_config
from framewire.daemon import Daemon
from framewire.protocols.native import END_OF_STREAM

from .helpers import connect, port_of, running_daemon, wait_until

BASE = """
[daemon]
grace_period = "2s"

[endpoints.keep]
kind = "server"
listen = "tcp://127.0.0.1:0"
stream = "s"

[endpoints.change]
kind = "server"
listen = "tcp://127.0.0.1:0"
stream = "s"
max_queue_frames = 100

[endpoints.remove]
kind = "server"
listen = "tcp://127.0.0.1:0"
stream = "s"
"""

NEW = """
[daemon]
grace_period = "2s"

[endpoints.keep]
kind = "server"
listen = "tcp://127.0.0.1:0"
stream = "s"

[endpoints.change]
kind = "server"
listen = "tcp://127.0.0.1:0"
stream = "s"
max_queue_frames = 200

[endpoints.add]
kind = "server"
listen = "tcp://127.0.0.1:0"
stream = "s"
"""


def frame(i: int) -> Frame:
    return Frame(FrameKind.DATA, "d", i.to_bytes(4, "big"), timestamp=i)


def running(path: Path) -> AbstractAsyncContextManager[Daemon]:
    return running_daemon(load_config(path), source=str(path), config_path=path)


def port(daemon: Daemon, name: str) -> int:
    return port_of(daemon.endpoints[name].status.address[0])


async def test_reload_keeps_unchanged_clients(tmp_path: Path) -> None:
    path = tmp_path / "fw.toml"
    path.write_text(BASE)
    async with running(path) as daemon:
        stream = daemon.streams.get("s")
        kept = await connect(port(daemon, "keep"))
        changed = await connect(port(daemon, "change"))
        removed = await connect(port(daemon, "remove"))
        keep_endpoint = daemon.endpoints["keep"]
        await wait_until(lambda: len(stream.subscriptions) == 3)
        await stream.publish([frame(0)])
        with trio.fail_after(10):
            assert await kept.read(1) == [frame(0)]

        path.write_text(NEW)
        with trio.fail_after(20):
            assert await daemon.reload_from_file()
        assert daemon.last_reload is not None
        assert daemon.last_reload["ok"]
        assert sorted(daemon.last_reload["changes"]) == [
            "added add",
            "changed change",
            "removed remove",
        ]
        assert daemon.endpoints["keep"] is keep_endpoint
        assert sorted(daemon.endpoints) == ["add", "change", "keep"]

        # Clients of changed and removed endpoints were closed cleanly after their frames.
        with trio.fail_after(10):
            assert await changed.read_to_end() == [frame(0)]
            assert await removed.read_to_end() == [frame(0)]
        assert bytes(changed.raw).endswith(END_OF_STREAM)
        # The kept client never noticed, and keeps receiving.
        added = await connect(port(daemon, "add"))
        await wait_until(lambda: len(stream.subscriptions) == 2)
        await stream.publish([frame(1), frame(2)])
        with trio.fail_after(10):
            assert await kept.read(3) == [frame(0), frame(1), frame(2)]
            assert await added.read(2) == [frame(1), frame(2)]
        for peer in (kept, changed, removed, added):
            await peer.stream.aclose()


async def test_broken_file_keeps_the_running_config(tmp_path: Path) -> None:
    path = tmp_path / "fw.toml"
    path.write_text(BASE)
    async with running(path) as daemon:
        stream = daemon.streams.get("s")
        client = await connect(port(daemon, "keep"))
        endpoints = dict(daemon.endpoints)
        config = daemon.config
        path.write_text(BASE.replace("max_queue_frames = 100", "max_queue_frames = -1"))
        with trio.fail_after(10):
            assert not await daemon.reload_from_file()
        assert daemon.config is config
        assert daemon.endpoints == endpoints
        assert daemon.last_reload is not None
        assert not daemon.last_reload["ok"]
        assert "endpoints.change.max_queue_frames" in daemon.last_reload["error"]
        path.unlink()
        with trio.fail_after(10):
            assert not await daemon.reload_from_file()
        assert "cannot read the file" in daemon.last_reload["error"]
        path.write_bytes(b"")  # a zero-byte file would otherwise remove every endpoint
        with trio.fail_after(10):
            assert not await daemon.reload_from_file()
        assert "no endpoints configured" in daemon.last_reload["error"]
        assert daemon.endpoints == endpoints
        await wait_until(lambda: len(stream.subscriptions) == 1)
        await stream.publish([frame(7)])
        with trio.fail_after(10):
            assert await client.read(1) == [frame(7)]
        await client.stream.aclose()
