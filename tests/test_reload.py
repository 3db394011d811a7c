"""Hot reload: unchanged endpoints keep their clients; changed, removed and new ones follow."""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from framewire import Frame, FrameKind
from framewire.config import Address, load_config, parse_config
from framewire.daemon import Daemon
from framewire.daemon.endpoints import Endpoint, SenderEndpoint, ServerEndpoint, Transports
from framewire.daemon.status import build_snapshot
from framewire.protocols.native import END_OF_STREAM, KEEPALIVE

from .helpers import NativePeer, connect, port_of, running_daemon, wait_until

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
policy = "lossless"

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

        # "change" changes a bound (which could be applied in place) and its policy (which
        # cannot): a restart, as before.
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


# -- a reload is applied whole, or not at all ------------------------------------------------


def server(name: str, port: int, extra: str = "") -> str:
    return f"""
[endpoints.{name}]
kind = "server"
listen = "tcp://127.0.0.1:{port}"
stream = "s"
{extra}
"""


def free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_a_reload_onto_a_taken_port_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "fw.toml"
    base = server("a", free_tcp_port())
    path.write_text(base)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        async with running(path) as daemon:
            stream = daemon.streams.get("s")
            client = await connect(port(daemon, "a"))
            await wait_until(lambda: len(daemon.endpoints["a"].status.clients) == 1)
            path.write_text(base + server("b", taken.getsockname()[1]))
            assert not await daemon.reload_from_file()
            assert set(daemon.endpoints) == {"a"}
            assert daemon.last_reload is not None
            assert daemon.last_reload["ok"] is False
            error = str(daemon.last_reload["error"])
            assert "untouched" in error
            assert (
                f"endpoints.b.listen: cannot listen on tcp://127.0.0.1:{taken.getsockname()[1]}"
                in error
            )
            assert "address already in use" in error
            # The old endpoint's client never noticed.
            await stream.publish([frame(1)])
            with trio.fail_after(10):
                assert await client.read(1) == [frame(1)]
            await client.stream.aclose()
    finally:
        taken.close()


async def test_a_reload_with_a_missing_certificate_keeps_the_changed_endpoint_serving(
    tmp_path: Path,
) -> None:
    path = tmp_path / "fw.toml"
    port_a = free_tcp_port()
    path.write_text(server("a", port_a))
    async with running(path) as daemon:
        stream = daemon.streams.get("s")
        client = await connect(port_a)
        await wait_until(lambda: len(daemon.endpoints["a"].status.clients) == 1)
        missing = tmp_path / "missing.pem"
        path.write_text(
            server("a", port_a).replace("tcp://", "tls://")
            + f'[endpoints.a.tls]\ncertificate = "{missing}"\nkey = "{missing}"\n'
        )
        assert not await daemon.reload_from_file()
        assert "endpoints.a.tls.certificate" in str(
            daemon.last_reload and daemon.last_reload["error"]
        )
        await stream.publish([frame(2)])
        with trio.fail_after(10):
            assert await client.read(1) == [frame(2)]
        await client.stream.aclose()


class FailsToBindOnce(Transports):
    """Refuses the first bind of one port after a reload begins (a race the checks miss)."""

    def __init__(self) -> None:
        super().__init__()
        self.refuse: int | None = None

    async def listen(self, address: Address) -> Sequence[trio.abc.Listener[trio.abc.Stream]]:
        if address.port == self.refuse:
            self.refuse = None
            raise OSError(errno.EADDRINUSE, f"cannot listen on {address}: address already in use")
        return await super().listen(address)


async def test_a_start_that_fails_after_the_checks_restores_the_previous_configuration(
    tmp_path: Path,
) -> None:
    path = tmp_path / "fw.toml"
    port_a, port_b = free_tcp_port(), free_tcp_port()
    path.write_text(server("a", port_a))
    transports = FailsToBindOnce()
    daemon = Daemon(load_config(path), source=str(path), config_path=path, transports=transports)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            await nursery.start(daemon.run)
        path.write_text(server("a", port_a, "max_queue_frames = 7") + server("b", port_b))
        transports.refuse = port_b
        assert not await daemon.reload_from_file()
        assert daemon.last_reload is not None
        assert "restored" in str(daemon.last_reload["error"])
        assert set(daemon.endpoints) == {"a"}
        assert daemon.endpoints["a"].config.max_queue_frames == 1024  # the previous one
        client = await connect(port_a)  # and it serves on its address
        await wait_until(lambda: len(daemon.endpoints["a"].status.clients) == 1)
        await daemon.streams.get("s").publish([frame(3)])
        with trio.fail_after(10):
            assert await client.read(1) == [frame(3)]
        await client.stream.aclose()
        daemon.request_shutdown()


async def test_a_changed_endpoint_hands_its_listening_socket_to_its_successor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The address never stops accepting: a client connecting after the old endpoint stopped
    and before its successor started waits in the socket's backlog and is served."""
    path = tmp_path / "fw.toml"
    port_a = free_tcp_port()
    path.write_text(server("a", port_a))
    async with running(path) as daemon:
        before = daemon.endpoints["a"]
        real_start = daemon.supervisor.start_endpoint
        between: list[NativePeer] = []

        async def start_after_a_connect(endpoint: Endpoint[Any], **kwargs: bool) -> None:
            if endpoint.name == "a":
                assert "a" not in daemon.endpoints  # the old one is gone...
                between.append(await connect(port_a))  # ...yet the port accepts
            await real_start(endpoint, **kwargs)

        monkeypatch.setattr(daemon.supervisor, "start_endpoint", start_after_a_connect)
        path.write_text(server("a", port_a, 'policy = "lossless"'))
        assert await daemon.reload_from_file()
        after = daemon.endpoints["a"]
        assert after is not before
        assert after.config.policy == "lossless"
        (client,) = between
        await wait_until(lambda: len(after.status.clients) == 1)
        await daemon.streams.get("s").publish([frame(4)])
        with trio.fail_after(10):
            assert await client.read(1) == [frame(4)]
        await client.stream.aclose()


# -- changes applied in place: the clients stay connected ----------------------------------


def big(i: int) -> Frame:
    """A 64 KiB frame: 400 of them are more than any socket buffers hold."""
    return Frame(FrameKind.DATA, "d", i.to_bytes(4, "big") * (16 << 10), timestamp=i)


async def stall_one_of_two(daemon: Daemon) -> tuple[ServerEndpoint, trio.SocketStream, NativePeer]:
    """A client of server "out" that never reads, and one that keeps up; 400 big frames
    published, so the first one's queue is full and its writer waits."""
    endpoint = daemon.endpoints["out"]
    assert isinstance(endpoint, ServerEndpoint)
    stalled = await trio.open_tcp_stream("127.0.0.1", port(daemon, "out"))
    await wait_until(lambda: len(endpoint.status.clients) == 1)
    fast = await connect(port(daemon, "out"))
    await wait_until(lambda: len(endpoint.status.clients) == 2)
    stream = daemon.streams.get("s")
    frames = [big(i) for i in range(400)]
    with trio.fail_after(30):
        for start in range(0, len(frames), 8):
            await stream.publish(frames[start : start + 8])
            assert (await fast.read(start + 8))[-1] == frames[start + 7]
    return endpoint, stalled, fast


async def test_a_reload_changing_only_bounds_keeps_every_client(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="framewire")
    path = tmp_path / "fw.toml"
    path.write_text(server("out", 0, "max_queue_frames = 64"))
    async with running(path) as daemon:
        endpoint, stalled, fast = await stall_one_of_two(daemon)
        clients = list(endpoint.status.clients.values())
        slow = clients[0].subscription
        assert slow is not None
        queued, dropped = slow.queued_frames, slow.frames_dropped
        assert queued > 8

        path.write_text(server("out", 0, "max_queue_frames = 8"))
        with trio.fail_after(20):
            assert await daemon.reload_from_file()  # as SIGHUP does
        line = "changed in place out (max_queue_frames 64 -> 8)"
        assert daemon.last_reload is not None
        assert daemon.last_reload["changes"] == [line]
        assert line in caplog.text
        # The same endpoint, the same clients with the same queues: nobody reconnected.
        assert daemon.endpoints["out"] is endpoint
        assert list(endpoint.status.clients.values()) == clients
        assert daemon.config.endpoints["out"] == endpoint.config
        assert endpoint.config.max_queue_frames == 8
        # Status shows the new bound, and it holds: the lossy queue dropped its oldest data.
        snapshot = build_snapshot(daemon)["endpoints"]["out"]["clients"]
        assert [client["queue_max_frames"] for client in snapshot] == [8, 8]
        assert slow.queued_frames == 8
        assert slow.frames_dropped == dropped + queued - 8
        stream = daemon.streams.get("s")
        more = [big(i) for i in range(400, 420)]
        with trio.fail_after(30):
            for start in range(0, len(more), 4):
                await stream.publish(more[start : start + 4])
                assert slow.queued_frames <= 8
                assert (await fast.read(400 + start + 4))[-1] == more[start + 3]
        # The client that keeps up got every frame on its one connection.
        assert fast.frames == [big(i) for i in range(420)]
        assert clients[1].frames_sent == 420
        assert clients[1].subscription is not None
        assert clients[1].subscription.frames_dropped == 0
        await stalled.aclose()
        await fast.stream.aclose()


async def test_a_reload_changing_decimation_keeps_the_client(tmp_path: Path) -> None:
    path = tmp_path / "fw.toml"
    path.write_text(server("out", 0))
    async with running(path) as daemon:
        endpoint = daemon.endpoints["out"]
        assert isinstance(endpoint, ServerEndpoint)
        stream = daemon.streams.get("s")
        client = await connect(port(daemon, "out"))
        await wait_until(lambda: len(endpoint.status.clients) == 1)
        (info,) = endpoint.status.clients.values()
        subscription = info.subscription
        assert subscription is not None

        async def publish(first: int, last: int) -> None:
            for i in range(first, last + 1):  # one by one: each may go direct
                await stream.publish([frame(i)])

        async def reload(extra: str) -> list[str]:
            path.write_text(server("out", 0, extra))
            with trio.fail_after(20):
                assert await daemon.reload_from_file()
            assert daemon.last_reload is not None
            assert daemon.endpoints["out"] is endpoint
            return list(daemon.last_reload["changes"])

        await publish(0, 1)
        with trio.fail_after(10):
            assert await client.read(2) == [frame(0), frame(1)]

        def written_directly() -> bool:
            assert subscription is not None
            return subscription.group is not None

        assert written_directly()  # while idle

        assert await reload("decimate = { d = 2 }") == [
            "changed in place out (decimate {} -> {d = 2})"
        ]
        assert not written_directly()  # a decimating client takes its queue
        await publish(2, 5)
        assert await reload("decimate = { d = 3 }") == [
            "changed in place out (decimate {d = 2} -> {d = 3})"
        ]
        await publish(6, 8)  # the count goes on: the 6th frame seen is kept
        assert await reload("") == ["changed in place out (decimate {d = 3} -> {})"]
        assert written_directly()  # again
        await publish(9, 10)
        with trio.fail_after(10):
            assert await client.read(7) == [frame(i) for i in (0, 1, 3, 5, 7, 9, 10)]
        assert subscription.frames_decimated == 4
        snapshot = build_snapshot(daemon)["endpoints"]["out"]
        assert snapshot["clients"][0]["frames_decimated"] == 4
        assert info.frames_sent == 7
        await client.stream.aclose()


async def test_a_reload_changing_send_timeout_applies_to_a_waiting_write(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A stalled client's write waits under a 60 s send_timeout; the reload makes it 0.2 s:
    that client is disconnected for it (the test waits 20 s at most), the other stays."""
    caplog.set_level(logging.INFO, logger="framewire")
    path = tmp_path / "fw.toml"
    path.write_text(server("out", 0, 'send_timeout = "60s"'))
    async with running(path) as daemon:
        endpoint, stalled, fast = await stall_one_of_two(daemon)
        kept = list(endpoint.status.clients.values())[1]
        path.write_text(server("out", 0, 'send_timeout = "0.2s"'))
        with trio.fail_after(20):
            assert await daemon.reload_from_file()
        assert daemon.last_reload is not None
        assert daemon.last_reload["changes"] == ["changed in place out (send_timeout 1m -> 0.2s)"]
        await wait_until(lambda: len(endpoint.status.clients) == 1, patience=20)
        assert list(endpoint.status.clients.values()) == [kept]
        assert "send stalled for more than 0.2s" in caplog.text
        await daemon.streams.get("s").publish([big(400)])
        with trio.fail_after(10):
            assert (await fast.read(401))[-1] == big(400)
        await stalled.aclose()
        await fast.stream.aclose()


@pytest.mark.parametrize("extra", ["", "max_queue_frames = 8"], ids=["address", "and bounds"])
async def test_a_reload_changing_the_address_still_restarts(tmp_path: Path, extra: str) -> None:
    path = tmp_path / "fw.toml"
    port_a, port_b = free_tcp_port(), free_tcp_port()
    path.write_text(server("out", port_a))
    async with running(path) as daemon:
        before = daemon.endpoints["out"]
        client = await connect(port_a)
        await wait_until(lambda: len(before.status.clients) == 1)
        path.write_text(server("out", port_b, extra))
        with trio.fail_after(20):
            assert await daemon.reload_from_file()
        assert daemon.last_reload is not None
        assert daemon.last_reload["changes"] == ["changed out"]
        assert daemon.endpoints["out"] is not before
        with trio.fail_after(10):
            assert await client.read_to_end() == []  # its client was let go
        again = await connect(port_b)
        await wait_until(lambda: len(daemon.endpoints["out"].status.clients) == 1)
        await daemon.streams.get("s").publish([frame(5)])
        with trio.fail_after(10):
            assert await again.read(1) == [frame(5)]
        await client.stream.aclose()
        await again.stream.aclose()


def consumer(kind: str, tmp_path: Path, far: int, queue: str) -> str:
    """An endpoint ``x`` of ``kind`` that takes stream "s" through an outbox, with ``queue``
    (its bounds); its far end (port ``far``) is absent, which changes nothing here."""
    tables = {
        "sender": f'kind = "sender"\nconnect = "tcp://127.0.0.1:{far}"\nstream = "s"',
        "recorder": f'kind = "recorder"\npath = "{tmp_path / "out.fw"}"\nstream = "s"',
        "link": f'kind = "link"\nconnect = "tcp://127.0.0.1:{far}"\nsubscribe = "s"',
        "bridge": (
            f'kind = "bridge"\nrole = "client"\naddress = "tcp://127.0.0.1:{far}"\nsubscribe = "s"'
        ),
        "pubsub": (
            'kind = "pubsub"\nrole = "publisher"\naddress = "tcp://127.0.0.1:0"\nstream = "s"'
        ),
    }
    return f"[endpoints.x]\n{tables[kind]}\n{queue}\n"


@pytest.mark.parametrize("kind", ["sender", "recorder", "link", "bridge", "pubsub"])
async def test_a_reload_changing_a_consumers_bounds_applies_them_in_place(
    tmp_path: Path, kind: str
) -> None:
    path = tmp_path / "fw.toml"
    far = free_tcp_port()
    path.write_text(consumer(kind, tmp_path, far, "max_queue_frames = 100"))
    async with running(path) as daemon:
        endpoint = daemon.endpoints["x"]
        outbox = getattr(endpoint, "outbox", None)
        assert outbox is not None
        await wait_until(lambda: outbox.subscription is not None)
        subscription = outbox.subscription
        assert subscription.bounds.max_frames == 100
        path.write_text(
            consumer(kind, tmp_path, far, 'max_queue_frames = 200\nmax_queue_bytes = "1MiB"')
        )
        with trio.fail_after(20):
            assert await daemon.reload_from_file()
        assert daemon.last_reload is not None
        assert daemon.last_reload["changes"] == [
            "changed in place x (max_queue_frames 100 -> 200, max_queue_bytes 64MiB -> 1MiB)"
        ]
        assert daemon.endpoints["x"] is endpoint
        assert outbox.subscription is subscription
        assert (subscription.bounds.max_frames, subscription.bounds.max_bytes) == (200, 1 << 20)
        status = build_snapshot(daemon)["endpoints"]["x"]
        assert status["detail"]["buffer_max_bytes"] == 1 << 20


async def test_a_reload_changing_a_senders_bound_keeps_its_connection(tmp_path: Path) -> None:
    """A lossy sender whose reader stalls: the lowered bound drops its oldest frames at once,
    and the reader, on the one connection it accepted, then gets the newest frames."""
    accepted: list[trio.SocketStream] = []
    got_one = trio.Event()

    async def reader(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        got_one.set()
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(partial(trio.serve_tcp, reader, 0, host="127.0.0.1"))
        reader_port = listener.socket.getsockname()[1]
        sender = (
            f'[endpoints.x]\nkind = "sender"\nconnect = "tcp://127.0.0.1:{reader_port}"\n'
            'stream = "s"\nbuffer.when_full = "drop_oldest"\n'
        )
        path = tmp_path / "fw.toml"
        path.write_text(sender + "max_queue_frames = 64\n")
        async with running(path) as daemon:
            endpoint = daemon.endpoints["x"]
            assert isinstance(endpoint, SenderEndpoint)
            outbox = endpoint.outbox
            with trio.fail_after(10):
                await got_one.wait()
            stream = daemon.streams.get("s")
            for start in range(0, 400, 8):  # 25 MiB: the connection stalls
                await stream.publish([big(i) for i in range(start, start + 8)])
            await stream.publish([big(i) for i in range(400, 464)])  # the queue is full
            subscription = outbox.subscription
            assert subscription is not None
            assert subscription.queued_frames == 64
            dropped = subscription.frames_dropped

            path.write_text(sender + "max_queue_frames = 8\n")
            with trio.fail_after(20):
                assert await daemon.reload_from_file()
            assert daemon.last_reload is not None
            assert daemon.last_reload["changes"] == [
                "changed in place x (max_queue_frames 64 -> 8)"
            ]
            assert outbox.subscription is subscription
            assert subscription.queued_frames == 8
            assert subscription.frames_dropped == dropped + 56
            assert endpoint.status.current_detail()["queue_frames"] == 8 + outbox.taken_frames
            # The reader reads now: the same connection brings the newest frames, last.
            peer = NativePeer(accepted[0])
            with trio.fail_after(30):
                while not peer.frames or peer.frames[-1] != big(463):
                    await peer.read(len(peer.frames) + 1)
            assert [frame.timestamp for frame in peer.frames[-8:]] == list(range(456, 464))
            assert len(accepted) == 1
            assert endpoint.status.state == "connected"
        nursery.cancel_scope.cancel()


async def test_a_senders_timeouts_and_backoff_change_in_place() -> None:
    far = free_tcp_port()
    table = f'[endpoints.x]\nkind = "sender"\nconnect = "tcp://127.0.0.1:{far}"\nstream = "s"\n'
    async with running_daemon(table) as daemon:
        endpoint = daemon.endpoints["x"]
        assert isinstance(endpoint, SenderEndpoint)
        changed = table + 'send_timeout = "5s"\nconnect_timeout = "2s"\nreconnect.initial = "1s"\n'
        with trio.fail_after(20):
            changes = await daemon.reload(parse_config(changed))
        assert changes == [
            "changed in place x (reconnect.initial 0.5s -> 1s, connect_timeout 10s -> 2s, "
            "send_timeout 30s -> 5s)"
        ]
        assert daemon.endpoints["x"] is endpoint
        assert isinstance(endpoint, SenderEndpoint)
        assert endpoint.backoff.config.initial == 1.0
        assert endpoint.config.connect_timeout == 2.0


async def test_a_lowered_max_clients_keeps_the_connected_clients_and_refuses_the_next(
    tmp_path: Path,
) -> None:
    path = tmp_path / "fw.toml"
    path.write_text(server("out", 0, "max_clients = 4"))
    async with running(path) as daemon:
        endpoint = daemon.endpoints["out"]
        first, second = await connect(port(daemon, "out")), await connect(port(daemon, "out"))
        await wait_until(lambda: len(endpoint.status.clients) == 2)
        path.write_text(server("out", 0, "max_clients = 1"))
        with trio.fail_after(20):
            assert await daemon.reload_from_file()
        assert daemon.last_reload is not None
        assert daemon.last_reload["changes"] == ["changed in place out (max_clients 4 -> 1)"]
        third = await connect(port(daemon, "out"))
        with trio.fail_after(10):
            assert await third.read_to_end() == []  # refused: closed at once
        assert endpoint.status.detail["clients_refused"] == 1
        await daemon.streams.get("s").publish([frame(1)])
        with trio.fail_after(10):
            assert await first.read(1) == [frame(1)]
            assert await second.read(1) == [frame(1)]
        for peer in (first, second, third):
            await peer.stream.aclose()


async def test_a_links_bounds_and_backoff_change_in_place_on_its_connection(
    tmp_path: Path,
) -> None:
    accepted: list[trio.SocketStream] = []
    got_one = trio.Event()

    async def peer(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        await stream.send_all(KEEPALIVE)  # the link is up once its peer said something
        got_one.set()
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(partial(trio.serve_tcp, peer, 0, host="127.0.0.1"))
        table = (
            f'[endpoints.x]\nkind = "link"\nconnect = "tcp://127.0.0.1:'
            f'{listener.socket.getsockname()[1]}"\nsubscribe = "s"\ntimeout = "1h"\n'
        )
        path = tmp_path / "fw.toml"
        path.write_text(table)
        async with running(path) as daemon:
            endpoint = daemon.endpoints["x"]
            with trio.fail_after(10):
                await got_one.wait()
            await wait_until(lambda: endpoint.status.state == "up")
            path.write_text(
                table + 'max_queue_frames = 8\nconnect_timeout = "2s"\nreconnect.maximum = "5s"\n'
            )
            with trio.fail_after(20):
                assert await daemon.reload_from_file()
            assert daemon.last_reload is not None
            assert daemon.last_reload["changes"] == [
                "changed in place x (reconnect.maximum 30s -> 5s, connect_timeout 10s -> 2s, "
                "max_queue_frames 1024 -> 8)"
            ]
            assert daemon.endpoints["x"] is endpoint
            assert getattr(endpoint, "backoff").config.maximum == 5.0  # noqa: B009
            outbox = getattr(endpoint, "outbox")  # noqa: B009
            assert outbox.subscription.bounds.max_frames == 8
            # The same connection carries the next frame.
            await daemon.streams.get("s").publish([frame(9)])
            reader = NativePeer(accepted[0])
            with trio.fail_after(10):
                while frame(9) not in reader.frames:
                    await reader.read(len(reader.frames) + 1)
            assert len(accepted) == 1
            assert endpoint.status.state == "up"
        nursery.cancel_scope.cancel()
