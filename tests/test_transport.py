"""Listeners: the listen backlog is the system's largest, so a burst of connects is queued;
an endpoint's accept loop outlasts a shortage of descriptors, logging it rate-limited."""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from framewire import Frame, FrameKind
from framewire.config import Address, ServerConfig
from framewire.daemon import transport
from framewire.daemon.endpoints import EndpointContext, Transports
from framewire.daemon.endpoints.server import ServerEndpoint
from framewire.daemon.stream import StreamRegistry
from framewire.daemon.transport import (
    bound_addresses,
    open_listeners,
    open_unix_listener,
    system_backlog,
)

from .helpers import NativePeer, wait_until

#: More unaccepted connections than the old fixed backlog of 128 let the kernel queue.
BURST = 300

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="Linux listen-queue behaviour")


@pytest.fixture
def roomy_system() -> None:
    if system_backlog() < BURST:
        pytest.skip(f"net.core.somaxconn is {system_backlog()}, below {BURST}")


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: UNIX socket paths are limited to 108 bytes."""
    with tempfile.TemporaryDirectory(prefix="fw-") as name:
        yield Path(name)


def test_system_backlog_reads_somaxconn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    setting = tmp_path / "somaxconn"
    setting.write_text("4096\n")
    monkeypatch.setattr(transport, "_SOMAXCONN_PATH", str(setting))
    assert system_backlog() == 4096
    setting.write_text("1000000\n")
    assert system_backlog() == 0xFFFF  # the kernel keeps it in 16 bits
    monkeypatch.setattr(transport, "_SOMAXCONN_PATH", str(tmp_path / "absent"))
    assert system_backlog() == socket.SOMAXCONN


@linux_only
async def test_a_tcp_listener_queues_a_burst_beyond_128_unaccepted_connections(
    roomy_system: None,
) -> None:
    """With a backlog of 128 the kernel drops the SYNs of connections past 129 that nobody
    accepts, and their connect() never completes: this would time out."""
    (listener,) = await open_listeners(Address("tcp", "127.0.0.1", 0))
    assert isinstance(listener, trio.SocketListener)
    port = listener.socket.getsockname()[1]
    try:
        with contextlib.ExitStack() as clients, trio.fail_after(20):
            for _ in range(BURST):
                client = clients.enter_context(trio.socket.socket())
                await client.connect(("127.0.0.1", port))
    finally:
        await listener.aclose()


async def test_tcp_backlog_is_left_to_trio_unless_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """None makes trio ask for 65535, which the kernel caps at net.core.somaxconn."""
    asked: list[int | None] = []
    real = trio.open_tcp_listeners

    async def recording(port: int, **options: Any) -> list[trio.SocketListener]:
        asked.append(options["backlog"])
        return await real(port, **options)

    monkeypatch.setattr(trio, "open_tcp_listeners", recording)
    for backlog in (None, 7):
        for listener in await open_listeners(Address("tcp", "127.0.0.1", 0), backlog=backlog):
            await listener.aclose()
    assert asked == [None, 7]


def unix_connects(path: Path, count: int) -> tuple[list[socket.socket], list[int]]:
    """``count`` non-blocking connects to ``path``: the sockets and each connect's errno."""
    sockets, codes = [], []
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        sockets.append(sock)
        codes.append(sock.connect_ex(str(path)))
    return sockets, codes


@linux_only
async def test_a_unix_listener_queues_a_burst_and_honours_a_given_backlog(
    short_dir: Path, roomy_system: None
) -> None:
    path = short_dir / "s.sock"
    async with await open_unix_listener(Address("unix", None, 0, str(path))):
        sockets, codes = unix_connects(path, BURST)
        for sock in sockets:
            sock.close()
    assert codes == [0] * BURST
    # A small backlog given by the caller is what listen() gets: Linux queues backlog + 1.
    async with await open_unix_listener(Address("unix", None, 0, str(path)), backlog=4):
        sockets, codes = unix_connects(path, 8)
        for sock in sockets:
            sock.close()
    assert codes == [0] * 5 + [errno.EAGAIN] * 3


class ExhaustedListener(trio.abc.Listener[trio.abc.Stream]):
    """Fails ``failures`` accepts with EMFILE, then hands out one memory stream."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.attempts = 0
        self.client: trio.abc.Stream | None = None
        self.accepted = trio.Event()

    async def accept(self) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        self.attempts += 1
        if self.attempts <= self.failures:
            raise OSError(errno.EMFILE, "Too many open files")
        if self.client is not None:
            await trio.sleep_forever()
        ours, self.client = trio.testing.memory_stream_pair()
        self.accepted.set()
        return ours

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class Exhausted(Transports):
    def __init__(self, listener: ExhaustedListener) -> None:
        super().__init__()
        self.listener = listener

    async def listen(self, address: Address) -> Sequence[trio.abc.Listener[trio.abc.Stream]]:
        return [self.listener]


async def test_a_shortage_of_descriptors_is_retried_and_logged_at_most_every_10_s(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """150 failed accepts, 100 ms apart (15 s): two log lines, not 150; then the client
    that could finally be accepted is served."""
    listener = ExhaustedListener(failures=150)
    streams = StreamRegistry()
    config = ServerConfig(listen=Address("tcp", "127.0.0.1", 0), stream="s")
    endpoint = ServerEndpoint("out", config, EndpointContext(streams, Exhausted(listener)))
    frame = Frame(FrameKind.DATA, "d", b"after the shortage")
    with caplog.at_level(logging.WARNING, logger="framewire.endpoint.out"):
        async with trio.open_nursery() as nursery:
            with trio.fail_after(60):
                await nursery.start(endpoint.run)
                await listener.accepted.wait()  # after 15 s of mock time
                await wait_until(lambda: len(endpoint.status.clients) == 1)
                await streams.get("s").publish([frame])
                assert listener.client is not None
                assert await NativePeer(listener.client).read(1) == [frame]
            nursery.cancel_scope.cancel()
    assert endpoint.status.detail["accept_failures"] == 150
    lines = [r.getMessage() for r in caplog.records if "accept failed" in r.getMessage()]
    assert len(lines) == 2
    assert "Too many open files" in lines[0]
    assert "(1 in all)" in lines[0]
    assert "100 more since the last report" in lines[1]  # 10 s of failures, 100 ms apart


async def test_a_held_listener_is_parked_for_its_successor_not_closed() -> None:
    transports = Transports()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    fixed = Address("tcp", "127.0.0.1", port)
    (first,) = await transports.bind(fixed)
    assert bound_addresses([first]) == [f"127.0.0.1:{port}"]
    transports.hold(fixed)
    woken: list[type[BaseException]] = []

    async def acceptor() -> None:
        try:
            await first.accept()
        except trio.ClosedResourceError as exc:
            woken.append(type(exc))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(acceptor)
        await trio.testing.wait_all_tasks_blocked()
        await first.aclose()  # parked: the waiting acceptor is told it is closed...
    assert woken == [trio.ClosedResourceError]
    # ...but the socket still accepts: a client connects before the successor binds.
    client = await trio.open_tcp_stream("127.0.0.1", port)
    (second,) = await transports.bind(fixed)
    with trio.fail_after(10):
        accepted = await second.accept()
    await client.send_all(b"x")
    assert await accepted.receive_some(1) == b"x"
    for stream in (client, accepted):
        await stream.aclose()
    await second.aclose()
    # Nobody took it this time: release closes it.
    await transports.release()
    with pytest.raises(OSError, match="all attempts"):
        await trio.open_tcp_stream("127.0.0.1", port)
