"""The status websocket: figures match traffic; bad, junk and stuck clients are closed."""

from __future__ import annotations

import errno
import gc
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio_websocket import open_websocket_url, wrap_client_stream

from framewire import Frame, FrameKind
from framewire.cli import render_status
from framewire.config import parse_config
from framewire.daemon import Daemon
from framewire.daemon.status import HANDSHAKE_SLOTS, SCHEMA, StatusServer

from .helpers import connect, endpoint_port, port_of, running_daemon, wait_until

CONFIG = """
[status]
listen = "127.0.0.1:0"
interval = "50ms"
{token}

[endpoints.in]
kind = "receiver"
listen = "tcp://127.0.0.1:0"
stream = "s"

[endpoints.out]
kind = "server"
listen = "tcp://127.0.0.1:0"
stream = "s"
max_queue_frames = 8
max_queue_bytes = "1MiB"
"""


@asynccontextmanager
async def running(token: str = "") -> AsyncIterator[tuple[Daemon, str]]:
    daemon = Daemon(parse_config(CONFIG.format(token=f'token = "{token}"' if token else "")))
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            await nursery.start(daemon.run)
        assert daemon.status_server is not None
        yield daemon, f"ws://127.0.0.1:{daemon.status_server.port}/"
        daemon.request_shutdown()


async def snapshot_where(url: str, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Read snapshots until one satisfies ``predicate``."""
    async with open_websocket_url(url, connect_timeout=5, disconnect_timeout=1) as ws:
        with trio.fail_after(10):
            while True:
                snapshot: dict[str, Any] = json.loads(await ws.get_message())
                if predicate(snapshot):
                    return snapshot


def data(i: int, size: int = 100) -> Frame:
    return Frame(FrameKind.DATA, "d", bytes(size), timestamp=i)


async def test_snapshot_on_connect_and_figures_match_traffic() -> None:
    async with running() as (daemon, url):
        first = await snapshot_where(url, lambda s: True)
        assert first["schema"] == SCHEMA
        assert first["daemon"]["state"] == "running"
        assert set(first["endpoints"]) == {"in", "out"}
        port_in = port_of(daemon.endpoints["in"].status.address[0])
        port_out = port_of(daemon.endpoints["out"].status.address[0])
        client = await connect(port_out)
        producer = await connect(port_in)
        await producer.send([Frame(FrameKind.METADATA, "m", b"{}")] + [data(i) for i in range(6)])
        with trio.fail_after(10):
            await client.read(7)

        def settled(s: dict[str, Any]) -> bool:
            clients = s["endpoints"]["out"]["clients"]
            return bool(clients) and clients[0]["frames_sent"] == 7

        snap = await snapshot_where(url, settled)
        receiver, server = snap["endpoints"]["in"], snap["endpoints"]["out"]
        wire = 7 * 28 + 1 + 2 + 6 * (1 + 100)
        assert (receiver["frames_in"], receiver["bytes_in"]) == (7, wire)
        assert receiver["clients"][0]["frames_received"] == 7
        assert (server["frames_out"], server["bytes_out"]) == (7, wire)
        assert server["frames_dropped"] == 0
        (entry,) = server["clients"]
        assert (entry["queue_frames"], entry["queue_bytes"]) == (0, 0)
        assert snap["streams"]["s"] == {
            "frames_in": 7,
            "bytes_in": wire,
            "subscribers": 1,
            "metadata_cached": 1,
            "metadata_bytes": 28 + len("m") + len(b"{}"),  # the native frame's wire size
            "metadata_refused": 0,
            "metadata_types": ["m"],
            "history": None,
            # A lossy client holds nothing back: the stream flows.
            "held_by": [],
            "held_since": None,
            "held_for": 0.0,
            "held_seconds": 0.0,
            "holds": 0,
            "holders": [],
        }
        assert "out" in render_status(snap)
        for peer in (client, producer):
            await peer.stream.aclose()


async def test_drops_of_a_stalled_client_are_counted() -> None:
    async with running() as (daemon, url):
        port_out = port_of(daemon.endpoints["out"].status.address[0])
        stalled = await trio.open_tcp_stream("127.0.0.1", port_out)
        stream = daemon.streams.get("s")
        await wait_until(lambda: len(stream.subscriptions) == 1)
        for i in range(400):  # 25 MiB, far beyond the socket buffers
            await stream.publish([data(i, size=64 * 1024)])
        snap = await snapshot_where(url, lambda s: s["endpoints"]["out"]["frames_dropped"] > 0)
        (entry,) = snap["endpoints"]["out"]["clients"]
        assert entry["frames_dropped"] == snap["endpoints"]["out"]["frames_dropped"]
        # Every frame is accounted for once: dropped, written, queued, or being written.
        in_flight = entry["frames_in_flight"]
        assert (
            entry["frames_dropped"] + entry["frames_sent"] + entry["queue_frames"] + in_flight
            == 400
        )
        assert entry["bytes_sent"] == entry["frames_sent"] * (28 + 1 + 64 * 1024)
        assert entry["queue_frames"] <= 8
        assert entry["queue_bytes"] <= 1 << 20
        await stalled.aclose()


async def raw_handshake(port: int, path: str = "/") -> tuple[trio.SocketStream, bytes]:
    """A websocket opening handshake by hand; returns the stream and the response head.

    Used where the client must misbehave (never read) or be refused: a hand-made client
    keeps the test independent of the client library's own handling of those cases.
    """
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    with trio.fail_after(5):
        while b"\r\n\r\n" not in head:
            chunk = await stream.receive_some(1)
            if not chunk:
                break
            head += chunk
    return stream, head


async def test_token_is_required_when_configured() -> None:
    async with running(token="s3cret") as (daemon, url):
        assert daemon.status_server is not None
        port = daemon.status_server.port
        for path in ("/", "/?token=wrong"):
            stream, head = await raw_handshake(port, path)
            assert head.startswith(b"HTTP/1.1 401")
            await stream.aclose()
        stream, head = await raw_handshake(port, "/?token=s3cret")
        assert head.startswith(b"HTTP/1.1 101")
        await stream.aclose()
        ok = await snapshot_where(url + "?token=s3cret", lambda s: True)
        assert ok["schema"] == SCHEMA
        header = [(b"authorization", b"Bearer s3cret")]
        async with open_websocket_url(url, extra_headers=header, connect_timeout=5) as ws:
            with trio.fail_after(5):
                assert json.loads(await ws.get_message())["schema"] == SCHEMA


async def test_a_client_that_sends_junk_is_closed() -> None:
    async with running() as (daemon, _):
        assert daemon.status_server is not None
        stream, head = await raw_handshake(daemon.status_server.port)
        assert head.startswith(b"HTTP/1.1 101")
        # One masked text frame, as a client must send it (RFC 6455 section 5.3).
        payload, mask = b"please do something", b"\x01\x02\x03\x04"
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        await stream.send_all(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
        received = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                received += chunk
        # Snapshots, then a close frame with code 1008 (policy violation), then EOF.
        close = received.rindex(b"\x88")
        assert received[close + 2 : close + 4] == (1008).to_bytes(2, "big")
        await stream.aclose()


UPGRADE = (
    b"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def upgrade_request(path: bytes = b"/", host: bytes = b"127.0.0.1") -> bytes:
    return UPGRADE.replace(b"{path}", path).replace(b"{host}", host)


async def send_and_read_to_end(port: int, request: bytes) -> bytes:
    """Send ``request`` to the status port; return everything the server says until it closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    received = b""
    with trio.fail_after(10):
        try:
            await stream.send_all(request)
            while chunk := await stream.receive_some(65536):
                received += chunk
        except trio.BrokenResourceError:
            pass  # reset by the server: as good as a close
    await stream.aclose()
    return received


async def still_serving(daemon: Daemon, url: str) -> None:
    """The daemon is running, a status client gets snapshots and ``in`` still relays to ``out``."""
    assert daemon.state == "running"
    first = await snapshot_where(url, lambda s: True)
    assert first["daemon"]["state"] == "running"
    client = await connect(endpoint_port(daemon, "out"))
    stream = daemon.streams.get("s")
    await wait_until(lambda: len(stream.subscriptions) == 1)
    producer = await connect(endpoint_port(daemon, "in"))
    await producer.send([data(1), data(2)])
    with trio.fail_after(10):
        assert [f.timestamp for f in await client.read(2)] == [1, 2]
    for peer in (client, producer):
        await peer.stream.aclose()


async def test_a_non_ascii_host_header_does_not_kill_the_daemon(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # wsproto raises UnicodeDecodeError in trio-websocket's reader task; that once ended
    # the daemon. Now it ends that connection, with one line naming the peer and why.
    caplog.set_level(logging.INFO, "framewire.status")
    async with running() as (daemon, url):
        assert daemon.status_server is not None
        port = daemon.status_server.port
        await send_and_read_to_end(port, upgrade_request(host=b"\xff"))
        await still_serving(daemon, url)
    (line,) = [r for r in caplog.records if "UnicodeDecodeError" in r.getMessage()]
    assert line.levelno == logging.WARNING
    assert "status connection dropped: 127.0.0.1:" in line.getMessage()
    assert line.exc_info is None  # the traceback only at DEBUG


async def test_a_path_urlsplit_rejects_is_judged_by_its_token_alone() -> None:
    # urlsplit("//[x/?token=a") raises ValueError("Invalid IPv6 URL"); that once killed
    # the daemon. The query is read without it: the right token gets past the token check
    # (to a 404: the websocket is at / only), a wrong one not.
    async with running(token="a") as (daemon, url):
        assert daemon.status_server is not None
        port = daemon.status_server.port
        refused = await send_and_read_to_end(port, upgrade_request(path=b"//[x/?token=b"))
        assert refused.startswith(b"HTTP/1.1 401")
        stream, head = await raw_handshake(port, "//[x/?token=a")
        assert head.startswith(b"HTTP/1.1 404")
        await stream.aclose()
        await still_serving(daemon, url + "?token=a")


class ScriptedListener(trio.abc.Listener[trio.abc.Stream]):
    """A listener whose accept() hands out, in order, what the test puts in: a stream to
    return or an exception to raise."""

    def __init__(self) -> None:
        self.send, self._receive = trio.open_memory_channel[trio.abc.Stream | Exception](16)

    async def accept(self) -> trio.abc.Stream:
        item = await self._receive.receive()
        if isinstance(item, Exception):
            raise item
        return item

    async def aclose(self) -> None:
        self._receive.close()
        await trio.lowlevel.checkpoint()


def scripted_server(listener: ScriptedListener, **options: Any) -> StatusServer:
    async def listen() -> Sequence[trio.abc.Listener[trio.abc.Stream]]:
        return [listener]

    return StatusServer(
        lambda: {"schema": SCHEMA}, host="memory", port=0, interval=1.0, listen=listen, **options
    )


async def memory_client_snapshot(listener: ScriptedListener) -> dict[str, Any]:
    """Connect a websocket client through ``listener`` over a memory stream; its first
    snapshot."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    await listener.send.send(server_stream)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            # Typed for sockets, but any trio Stream works.
            ws = await wrap_client_stream(nursery, client_stream, "127.0.0.1", "/")  # type: ignore[arg-type]
            snapshot: dict[str, Any] = json.loads(await ws.get_message())
            await ws.aclose()
    return snapshot


class NeverReads(trio.abc.Stream):
    """The server's end of a client that reads the response to its handshake, then nothing
    more: every later send waits, as on a socket whose buffers are full, until cancelled."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._responded = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._responded:
            await trio.sleep_forever()
        self._responded = True
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self._stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self._stream.aclose()


async def test_a_stuck_status_client_is_closed_and_stalls_no_one(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # Time is the MockClock's: send_timeout is judged in the server's own seconds, so a
    # busy machine cannot make the good reader look stuck too.
    caplog.set_level(logging.INFO, "framewire.status")
    listener = ScriptedListener()

    async def listen() -> Sequence[trio.abc.Listener[trio.abc.Stream]]:
        return [listener]

    snapshot = {"padding": "x" * 4096}
    server = StatusServer(
        lambda: snapshot, host="memory", port=0, interval=0.02, send_timeout=0.5, listen=listen
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        stuck, stuck_server_side = trio.testing.memory_stream_pair()
        await listener.send.send(NeverReads(stuck_server_side))
        head = b""
        with trio.fail_after(5):
            await stuck.send_all(upgrade_request())
            while b"\r\n\r\n" not in head:
                head += await stuck.receive_some()
        assert head.startswith(b"HTTP/1.1 101")  # accepted, then never reads again
        await wait_until(lambda: server.clients == 1)
        good, good_server_side = trio.testing.memory_stream_pair()
        await listener.send.send(good_server_side)
        received = received_while_stuck = 0
        async with trio.open_nursery() as reader:
            # Typed for sockets, but any trio Stream works.
            ws = await wrap_client_stream(reader, good, "127.0.0.1", "/")  # type: ignore[arg-type]
            with trio.fail_after(20):
                # The reader keeps getting snapshots while the stuck one waits to be dropped.
                while server.clients == 2 or received < 5:
                    assert json.loads(await ws.get_message()) == snapshot
                    received += 1
                    received_while_stuck += server.clients == 2
            await ws.aclose()
        assert trio.current_time() >= 0.5
        # A fresh snapshot every 0.02 s through the 0.5 s the stuck one was given.
        assert received_while_stuck >= 10
        await wait_until(lambda: server.clients == 0)
        await stuck.aclose()
        nursery.cancel_scope.cancel()
    (line,) = [r for r in caplog.records if "not reading" in r.getMessage()]
    assert line.levelno == logging.INFO
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_accept_waits_out_running_out_of_descriptors(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "framewire.status")
    listener = ScriptedListener()
    server = scripted_server(listener)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        for code in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS) * 3:
            await listener.send.send(OSError(code, "out of resources"))
        assert (await memory_client_snapshot(listener))["schema"] == SCHEMA
        nursery.cancel_scope.cancel()
    lines = [r for r in caplog.records if "cannot accept" in r.getMessage()]
    assert len(lines) == 1  # twelve failures in 1.2 s: one line, the rest counted
    assert "out of resources" in lines[0].getMessage()


async def test_any_other_accept_error_ends_run() -> None:
    listener = ScriptedListener()
    server = scripted_server(listener)
    with pytest.RaisesGroup(OSError, flatten_subgroups=True), trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            await listener.send.send(OSError(errno.EBADF, "Bad file descriptor"))


async def test_a_silent_connection_is_closed_after_the_handshake_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    listener = ScriptedListener()
    server = scripted_server(listener, handshake_timeout=5.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        client, server_side = trio.testing.memory_stream_pair()
        await listener.send.send(server_side)
        with trio.fail_after(60):
            assert await client.receive_some() == b""  # closed by the server
        assert trio.current_time() >= 5.0
        await wait_until(lambda: server.connections == 0)
        nursery.cancel_scope.cancel()


async def raw_status_server(nursery: trio.Nursery, **options: Any) -> tuple[StatusServer, int]:
    server = StatusServer(
        lambda: {"schema": SCHEMA}, host="127.0.0.1", port=0, interval=0.05, **options
    )
    port: int = await nursery.start(server.run)
    return server, port


async def test_a_bad_request_or_a_hang_up_ends_the_connection_at_once() -> None:
    # The handshake timeout is far away: only the server noticing ends these connections.
    async with trio.open_nursery() as nursery:
        server, port = await raw_status_server(nursery, handshake_timeout=3600)
        response = await send_and_read_to_end(port, b"NOT HTTP AT ALL\r\n\r\n")
        assert response.startswith(b"HTTP/1.1 400")
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(upgrade_request()[:30])
        await stream.send_eof()
        with trio.fail_after(10):
            assert await stream.receive_some() == b""
        await stream.aclose()
        await wait_until(lambda: server.connections == 0)
        nursery.cancel_scope.cancel()


async def test_clients_beyond_max_clients_are_refused_and_silent_connections_capped() -> None:
    async with trio.open_nursery() as nursery:
        server, port = await raw_status_server(nursery, max_clients=1)
        first, head = await raw_handshake(port)
        assert head.startswith(b"HTTP/1.1 101")
        second, head = await raw_handshake(port)
        assert head.startswith(b"HTTP/1.1 503")
        await second.aclose()
        silent = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(HANDSHAKE_SLOTS)]
        await wait_until(lambda: server.connections == 1 + HANDSHAKE_SLOTS)
        one_too_many = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(10):
            assert await one_too_many.receive_some() == b""
        for stream in [first, one_too_many, *silent]:
            await stream.aclose()
        await wait_until(lambda: server.connections == 0)
        nursery.cancel_scope.cancel()


async def test_the_status_server_is_restarted_when_its_listener_fails(
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The first listener breaks (EBADF) after the daemon started; the status server is
    started again on a fresh one and says so, while the endpoints relay on."""
    caplog.set_level(logging.INFO)
    real_listen = StatusServer._open_tcp_listeners
    first = ScriptedListener()
    opened: list[int] = []

    async def listen(self: StatusServer) -> Sequence[trio.abc.Listener[trio.abc.Stream]]:
        opened.append(1)
        return [first] if len(opened) == 1 else await real_listen(self)

    monkeypatch.setattr(StatusServer, "_open_tcp_listeners", listen)
    async with running() as (daemon, _):
        server = daemon.status_server
        assert server is not None
        assert server.state == "running"
        await first.send.send(OSError(errno.EBADF, "Bad file descriptor"))
        await wait_until(lambda: server.restarts == 1 and server.state == "running")
        assert daemon.state == "running"
        assert len(opened) == 2
        url = f"ws://127.0.0.1:{server.port}/"
        snapshot = await snapshot_where(url, lambda s: True)
        health = snapshot["daemon"]["status_server"]
        assert health["restarts"] == 1
        assert "Bad file descriptor" in health["last_error"]
        await still_serving(daemon, url)
    failures = [r for r in caplog.records if "status websocket failed" in r.getMessage()]
    assert len(failures) == 1
    assert failures[0].levelno == logging.ERROR


def hostile_request() -> st.SearchStrategy[bytes]:
    """Bytes a hostile or broken client might send to the status port."""
    request = upgrade_request(path=b"/?token=t")
    header_bytes = st.binary(min_size=1, max_size=64).filter(lambda b: b"\r\n" not in b)
    return st.one_of(
        st.binary(max_size=2048),
        st.builds(lambda host: upgrade_request(path=b"/?token=t", host=host), header_bytes),
        st.builds(lambda path: upgrade_request(path=path), header_bytes),
        st.builds(
            lambda name, value: request.replace(
                b"\r\n\r\n", b"\r\n" + name + b": " + value + b"\r\n\r\n"
            ),
            header_bytes,
            header_bytes,
        ),
        st.builds(
            lambda size: request[:-2] + b"X-Pad: " + b"a" * size + b"\r\n\r\n",
            st.integers(0, 100_000),
        ),
        st.builds(lambda cut: request[:cut], st.integers(0, len(request))),
        st.builds(lambda junk: request + junk, st.binary(max_size=512)),
        st.builds(
            lambda at, byte: request[:at] + bytes([byte]) + request[at + 1 :],
            st.integers(0, len(request) - 1),
            st.integers(0, 255),
        ),
    )


@settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    st.lists(st.tuples(hostile_request(), st.booleans()), min_size=1, max_size=4),
)
async def test_hostile_bytes_never_stop_the_status_server(
    requests: list[tuple[bytes, bool]],
) -> None:
    """Whatever comes in (each request either followed by EOF or left hanging, slowloris
    style), the server stays up and a proper client still gets its snapshot."""
    async with trio.open_nursery() as nursery:
        server, port = await raw_status_server(nursery, token="t")
        hanging = []
        for payload, hang in requests:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            try:
                await stream.send_all(payload)
                if not hang:
                    await stream.send_eof()
                    with trio.fail_after(10):
                        while await stream.receive_some():
                            pass
            except trio.BrokenResourceError:
                pass  # reset by the server
            if hang:
                hanging.append(stream)
            else:
                await stream.aclose()
        snapshot = await snapshot_where(f"ws://127.0.0.1:{port}/?token=t", lambda s: True)
        assert snapshot["schema"] == SCHEMA
        for stream in hanging:
            await stream.aclose()
        await wait_until(lambda: server.connections == 0)
        nursery.cancel_scope.cancel()


async def test_a_reload_that_changes_status_restarts_it_with_the_new_settings() -> None:
    async with running() as (daemon, _):
        old = daemon.status_server
        assert old is not None
        changes = await daemon.reload(parse_config(CONFIG.format(token='token = "t"')))
        assert changes == ["restarted status"]
        new = daemon.status_server
        assert new is not None
        assert new is not old
        response = await send_and_read_to_end(new.port, upgrade_request())
        assert response.startswith(b"HTTP/1.1 401")
        await still_serving(daemon, f"ws://127.0.0.1:{new.port}/?token=t")


async def test_bad_requests_free_their_connections_without_a_collection() -> None:
    """h11 leaves each parse error in a reference cycle holding the whole connection; the
    status server breaks it, so bad requests (and plain HTTP ones) cost nothing once closed,
    whatever the GC."""

    def sockets() -> int:
        return sum(1 for o in gc.get_objects() if isinstance(o, trio.SocketStream))

    gc.collect()
    gc.disable()
    try:
        async with trio.open_nursery() as nursery:
            server, port = await raw_status_server(nursery)
            before = sockets()
            for request, answer in (
                (b"NOT HTTP AT ALL\r\n\r\n", b"400"),
                (b"GET / HTTP/1.1\r\nHost: \xff\r\n\r\n", b"200"),  # the page
                (b"GET //[x/?token=a HTTP/1.1\r\nHost: x\r\n\r\n", b"404"),
                (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n", b"431"),
            ) * 5:
                response = await send_and_read_to_end(port, request)
                assert response.startswith(b"HTTP/1.1 " + answer)
            await wait_until(lambda: server.connections == 0)
            # At most the last one stays referenced (the accept loop's variable), not 20.
            await wait_until(lambda: sockets() <= before + 1)
            nursery.cancel_scope.cancel()
    finally:
        gc.enable()


async def test_the_page_is_read_at_start_so_an_upgrade_under_the_daemon_changes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``pip install -U`` under a running daemon replaces (or removes) the page's files; the
    page was read when the status server started, so ``GET /`` still serves it."""
    import importlib.resources

    from framewire.daemon import dashboard

    monkeypatch.delitem(dashboard.DASHBOARD.__dict__, "_parts", raising=False)
    async with trio.open_nursery() as nursery:
        _, port = await raw_status_server(nursery)

        def gone(package: str) -> Any:
            raise FileNotFoundError(f"{package}/page.html")

        monkeypatch.setattr(importlib.resources, "files", gone)
        response = await send_and_read_to_end(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert response.startswith(b"HTTP/1.1 200")
        assert b"<html" in response.lower()
        nursery.cancel_scope.cancel()


async def test_the_websocket_is_at_root_only_and_the_token_comes_before_the_method() -> None:
    """An upgrade on another path is 404 (docs/status.md says so); a request without the
    token is 401 whatever its method, so a caller without it learns nothing; with it, a
    method other than GET and HEAD is 405."""
    async with trio.open_nursery() as nursery:
        _, port = await raw_status_server(nursery, token="t")
        elsewhere = await send_and_read_to_end(port, upgrade_request(path=b"/other?token=t"))
        assert elsewhere.startswith(b"HTTP/1.1 404")
        for request, answer in (
            (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", b"401"),
            (b"DELETE /metrics HTTP/1.1\r\nHost: x\r\n\r\n", b"401"),
            (b"POST /?token=t HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", b"405"),
        ):
            response = await send_and_read_to_end(port, request)
            assert response.startswith(b"HTTP/1.1 " + answer), (request, response[:40])
        nursery.cancel_scope.cancel()


async def status_json(port: int, query: str = "") -> dict[str, Any]:
    """One snapshot from ``GET /status.json`` (``query``: e.g. ``?history=1``)."""
    response = await send_and_read_to_end(
        port, f"GET /status.json{query} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    )
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    snapshot: dict[str, Any] = json.loads(body)
    return snapshot


async def test_every_configured_stream_is_listed_before_any_traffic(tmp_path: Path) -> None:
    """A stream whose producer never came (a receiver's, a server's, one named in
    [streams]) is in the snapshot at once, with zeros; so is one a reload adds."""
    config = f"""
[status]
listen = "127.0.0.1:0"

[streams.configured-only]
max_metadata_types = 8

[endpoints.in]
kind = "receiver"
listen = "tcp://127.0.0.1:0"
stream = "quiet"

[endpoints.out]
kind = "server"
listen = "tcp://127.0.0.1:0"
stream = "also-quiet"

[endpoints.archive]
kind = "recorder"
path = "{tmp_path / "run.fw"}"
stream = "recorded"
"""
    async with running_daemon(config) as daemon:
        assert daemon.status_server is not None
        port = daemon.status_server.port
        streams = (await status_json(port))["streams"]
        assert set(streams) == {"configured-only", "quiet", "also-quiet", "recorded"}
        assert streams["quiet"]["frames_in"] == 0
        assert streams["also-quiet"]["subscribers"] == 0
        added = config + (
            '\n[endpoints.late]\nkind = "receiver"\nlisten = "tcp://127.0.0.1:0"\n'
            'stream = "added-by-reload"\n'
        )
        await daemon.reload(parse_config(added))
        assert "added-by-reload" in (await status_json(port))["streams"]


async def test_a_recorders_bytes_in_are_the_bytes_it_took_from_the_stream(
    tmp_path: Path,
) -> None:
    """``bytes_in`` of a recorder: the bytes of the frames it took from its stream. Then the
    producer leaves (its stream ends) and the daemon stops at once: the recorder, stopping
    just as its stream ended, stops (it used to spin without a checkpoint, for ever)."""
    config = f"""
[status]
listen = "127.0.0.1:0"

[endpoints.in]
kind = "receiver"
listen = "tcp://127.0.0.1:0"
stream = "s"

[endpoints.archive]
kind = "recorder"
path = "{tmp_path / "run.fw"}"
stream = "s"
"""
    async with running_daemon(config) as daemon:
        assert daemon.status_server is not None
        producer = await connect(endpoint_port(daemon, "in"))
        await producer.send([data(i, size=1000) for i in range(5)])
        recorder = daemon.endpoints["archive"].status
        await wait_until(lambda: recorder.frames_in == 5)
        snapshot = await status_json(daemon.status_server.port)
        archive = snapshot["endpoints"]["archive"]
        assert archive["frames_in"] == 5
        # Every byte the stream took in (frames as they came off the wire), no more.
        assert archive["bytes_in"] == snapshot["streams"]["s"]["bytes_in"] > 5 * 1000
        await producer.stream.aclose()


async def test_the_rate_history_comes_when_asked_for() -> None:
    """``?history=1``: the websocket's first snapshot and /status.json carry each endpoint's
    recent rates (one point per interval, the newest the snapshot's own rates); without it,
    no snapshot does."""
    async with running() as (daemon, url):
        assert daemon.status_server is not None
        port = daemon.status_server.port
        producer = await connect(endpoint_port(daemon, "in"))
        for i in range(5):
            await producer.send([data(i)])
            points = len(daemon.rates.history()["times"])
            await wait_until(lambda: len(daemon.rates.history()["times"]) > points)  # noqa: B023
        plain = await snapshot_where(url, lambda s: True)
        assert "history" not in plain
        assert "history" not in await status_json(port)
        async with open_websocket_url(url + "?history=1", connect_timeout=5) as ws:
            with trio.fail_after(10):
                first = json.loads(await ws.get_message())
                second = json.loads(await ws.get_message())
        assert "history" not in second  # once, on connect
        history = first["history"]
        assert history["points"] == 900  # 15 minutes at 50 ms: bounded at 900
        series = history["endpoints"]["in"]
        assert len(history["times"]) >= 5
        assert history["times"] == sorted(history["times"])
        assert len(series["frames_in"]) == len(history["times"])
        assert series["frames_in"][-1] == first["endpoints"]["in"]["rates"]["frames_in"]
        # The frames sent showed up as rates; nothing went out (no client).
        assert max(series["frames_in"]) > 0
        assert max(series["bytes_in"]) > 0
        assert set(history["endpoints"]["out"]["frames_out"]) == {0.0}
        json_history = (await status_json(port, "?history=1"))["history"]
        assert set(json_history["endpoints"]) == {"in", "out"}
        await producer.stream.aclose()
