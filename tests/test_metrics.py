"""Plain HTTP on the status port: /metrics (Prometheus), /status.json, 404, the token; and
the rates in the snapshot."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any, cast

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from framewire import Frame, FrameKind
from framewire.config import parse_config
from framewire.daemon import Daemon
from framewire.daemon.endpoints import ClientInfo, Endpoint, EndpointStatus
from framewire.daemon.rates import RateMeter
from framewire.daemon.status import SCHEMA

from .helpers import connect, endpoint_port, wait_until

CONFIG = """
[status]
listen = "127.0.0.1:0"
interval = "50ms"
metrics_max_clients = {max_clients}
{token}

[endpoints.in]
kind = "receiver"
listen = "tcp://127.0.0.1:0"
stream = "s"
{receiver_extra}

[endpoints.out]
kind = "server"
listen = "tcp://127.0.0.1:0"
stream = "s"
max_queue_frames = 8
max_queue_bytes = "1MiB"
"""


def config(*, token: str = "", max_clients: int = 100, receiver_extra: str = "") -> str:
    return CONFIG.format(
        token=f'token = "{token}"' if token else "",
        max_clients=max_clients,
        receiver_extra=receiver_extra,
    )


@asynccontextmanager
async def running(text: str) -> AsyncIterator[tuple[Daemon, int]]:
    daemon = Daemon(parse_config(text))
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            await nursery.start(daemon.run)
        assert daemon.status_server is not None
        yield daemon, daemon.status_server.port
        daemon.request_shutdown()


async def http_get(port: int, target: str, *headers: str) -> tuple[int, dict[str, str], bytes]:
    """GET ``target`` from the status port: (status, headers, body)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    extra = "".join(f"{header}\r\n" for header in headers)
    request = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}\r\n"
    received = b""
    with trio.fail_after(10):
        await stream.send_all(request.encode())
        while chunk := await stream.receive_some(65536):
            received += chunk
    await stream.aclose()
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines)
    assert int(fields["content-length"]) == len(body)
    return int(status_line.split()[1]), fields, body


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(port: int, *headers: str) -> Samples:
    """/metrics, parsed by prometheus_client's own parser: value by (name, labels)."""
    status, fields, body = await http_get(port, "/metrics", *headers)
    assert status == 200
    assert fields["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def data(i: int, size: int = 100) -> Frame:
    return Frame(FrameKind.DATA, "d", bytes(size), timestamp=i)


#: The native wire size of one metadata frame "m" with payload "{}" and of data(i).
METADATA_WIRE = 28 + 1 + 2
DATA_WIRE = 28 + 1 + 100


async def test_metrics_count_exactly_the_traffic_sent() -> None:
    async with running(config()) as (daemon, port):
        client = await connect(endpoint_port(daemon, "out"))
        producer = await connect(endpoint_port(daemon, "in"))
        await wait_until(lambda: len(daemon.streams.get("s").subscriptions) == 1)
        await producer.send([Frame(FrameKind.METADATA, "m", b"{}")] + [data(i) for i in range(6)])
        with trio.fail_after(10):
            await client.read(7)
        wire = METADATA_WIRE + 6 * DATA_WIRE
        await wait_until(lambda: daemon.endpoints["out"].status.frames_out == 7)
        samples = await scrape(port)
        frames, nbytes = "framewire_endpoint_frames_total", "framewire_endpoint_bytes_total"
        assert value(samples, frames, endpoint="in", direction="in") == 7
        assert value(samples, nbytes, endpoint="in", direction="in") == wire
        assert value(samples, frames, endpoint="out", direction="out") == 7
        assert value(samples, nbytes, endpoint="out", direction="out") == wire
        assert value(samples, "framewire_frames_dropped_total", endpoint="out") == 0
        assert value(samples, "framewire_endpoint_up", endpoint="out") == 1
        assert value(samples, "framewire_endpoint_state", endpoint="out", state="running") == 1
        assert value(samples, "framewire_endpoint_state", endpoint="out", state="stopped") == 0
        assert value(samples, "framewire_endpoint_info", endpoint="out", kind="server") == 1
        assert value(samples, "framewire_clients", endpoint="out") == 1
        assert value(samples, "framewire_clients", endpoint="in") == 1
        assert value(samples, "framewire_stream_frames_total", stream="s") == 7
        assert value(samples, "framewire_reloads_total", outcome="ok") == 0
        assert value(samples, "framewire_info", version=daemon_version()) == 1
        # the standard process metrics, on the daemon's own registry
        assert value(samples, "process_resident_memory_bytes") > 0
        assert any(name == "python_info" for name, _ in samples)
        for peer in (client, producer):
            await peer.stream.aclose()


def daemon_version() -> str:
    from framewire import __version__

    return __version__


async def test_metrics_count_the_drops_of_a_stalled_client() -> None:
    async with running(config()) as (daemon, port):
        stalled = await trio.open_tcp_stream("127.0.0.1", endpoint_port(daemon, "out"))
        stream = daemon.streams.get("s")
        await wait_until(lambda: len(stream.subscriptions) == 1)
        for i in range(400):  # 25 MiB, far beyond the socket buffers
            await stream.publish([data(i, size=64 * 1024)])
        (subscription,) = stream.subscriptions
        samples = await scrape(port)
        dropped = value(samples, "framewire_frames_dropped_total", endpoint="out")
        assert dropped == subscription.frames_dropped > 0
        # Its series are keyed by its host, never by its ephemeral port.
        queued = value(samples, "framewire_client_queue_frames", endpoint="out", host="127.0.0.1")
        assert queued == subscription.queued_frames <= 8
        assert (
            value(samples, "framewire_client_queue_bytes", endpoint="out", host="127.0.0.1")
            == subscription.queued_bytes
        )
        fill = max(subscription.queued_frames / 8, subscription.queued_bytes / (1 << 20))
        assert fill > 0.5
        assert (
            value(samples, "framewire_client_queue_fill_ratio", endpoint="out", host="127.0.0.1")
            == fill
        )
        assert value(samples, "framewire_client_connections", endpoint="out", host="127.0.0.1") == 1
        await stalled.aclose()
        # The client is gone; its drops stay counted.
        await wait_until(lambda: not daemon.endpoints["out"].status.clients)
        after = await scrape(port)
        assert value(after, "framewire_frames_dropped_total", endpoint="out") == dropped


async def test_counters_never_go_backwards_across_a_reload_that_changes_an_endpoint() -> None:
    async with running(config()) as (daemon, port):
        producer = await connect(endpoint_port(daemon, "in"))
        await producer.send([data(i) for i in range(5)])
        await wait_until(lambda: daemon.endpoints["in"].status.frames_in == 5)
        await producer.stream.aclose()
        old = daemon.endpoints["in"]
        before = await scrape(port)
        frames = "framewire_endpoint_frames_total"
        assert value(before, frames, endpoint="in", direction="in") == 5
        changes = await daemon.reload(
            parse_config(config(receiver_extra='max_frame_size = "1MiB"'))
        )
        assert changes == ["changed in"]
        assert daemon.endpoints["in"] is not old
        assert daemon.endpoints["in"].status.frames_in == 0  # a new object starts at 0
        after = await scrape(port)
        assert value(after, frames, endpoint="in", direction="in") == 5
        assert value(after, "framewire_endpoint_bytes_total", endpoint="in", direction="in") == (
            5 * DATA_WIRE
        )
        producer = await connect(endpoint_port(daemon, "in"))
        await producer.send([data(i) for i in range(3)])
        await wait_until(lambda: daemon.endpoints["in"].status.frames_in == 3)
        later = await scrape(port)
        assert value(later, frames, endpoint="in", direction="in") == 8
        await producer.stream.aclose()


async def connect_from(host: str, port: int) -> trio.SocketStream:
    """A connection to 127.0.0.1:``port`` from the loopback address ``host``."""
    return await trio.open_tcp_stream("127.0.0.1", port, local_address=host)


def client_series(samples: Samples, name: str = "framewire_client_queue_frames") -> set[str]:
    """The host labels of the series ``name``."""
    return {dict(labels)["host"] for metric, labels in samples if metric == name}


async def test_per_client_series_are_bounded() -> None:
    async with running(config(max_clients=1)) as (daemon, port):
        out = endpoint_port(daemon, "out")
        status = daemon.endpoints["out"].status
        first = [await connect_from("127.0.0.1", out) for _ in range(2)]
        await wait_until(lambda: len(status.clients) == 2)
        later = [await connect_from("127.0.0.2", out) for _ in range(3)]
        await wait_until(lambda: len(status.clients) == 5)
        samples = await scrape(port)
        # One series per (endpoint, host), the first host's; the second is beyond the bound.
        assert client_series(samples) == {"127.0.0.1", "other"}
        connections = "framewire_client_connections"
        assert value(samples, connections, endpoint="out", host="127.0.0.1") == 2
        assert value(samples, connections, endpoint="out", host="other") == 3
        for stream in first + later:
            await stream.aclose()


async def test_a_client_that_reconnects_keeps_its_series() -> None:
    async with running(config()) as (daemon, port):
        out = endpoint_port(daemon, "out")
        status = daemon.endpoints["out"].status
        peers: list[tuple[str, int]] = []
        seen: list[set[str]] = []
        for _ in range(3):
            stream = await connect_from("127.0.0.2", out)
            peers.append(stream.socket.getsockname())
            await wait_until(lambda: len(status.clients) == 1)
            samples = await scrape(port)
            seen.append(
                client_series(samples) | client_series(samples, "framewire_client_connections")
            )
            await stream.aclose()
            await wait_until(lambda: not status.clients)
        assert len({port for _, port in peers}) == 3  # three ephemeral ports ...
        assert seen == [{"127.0.0.2"}] * 3  # ... one series
        # The port stays in the status snapshot, per client.
        stream = await connect_from("127.0.0.2", out)
        await wait_until(lambda: len(status.clients) == 1)
        (client,) = status.clients.values()
        assert client.peer == f"127.0.0.2:{stream.socket.getsockname()[1]}"
        await stream.aclose()


async def test_status_json_is_one_snapshot_and_other_paths_are_404() -> None:
    async with running(config()) as (_, port):
        status, fields, body = await http_get(port, "/status.json")
        assert status == 200
        assert fields["content-type"] == "application/json"
        snapshot = json.loads(body)
        assert snapshot["schema"] == SCHEMA
        assert set(snapshot["endpoints"]) == {"in", "out"}
        assert snapshot["endpoints"]["in"]["rates"] == {
            "frames_in": 0.0,
            "bytes_in": 0.0,
            "frames_out": 0.0,
            "bytes_out": 0.0,
        }
        for target in ("/status", "/../../etc/passwd", "/metrics/x", "/index.html"):
            status, _, body = await http_get(port, target)
            assert status == 404
            assert body.count(b"\n") == 1
            assert b"etc" not in body  # the path is not echoed
        status, fields, body = await http_get(port, "/")
        assert status == 200
        assert fields["content-type"] == "text/html; charset=utf-8"
        assert "script-src 'sha256-" in fields["content-security-policy"]
        assert b"<title>framewire</title>" in body


async def test_the_token_guards_every_path() -> None:
    async with running(config(token="s3cret")) as (_, port):
        for target in ("/", "/metrics", "/status.json", "/nothing"):
            status, _, body = await http_get(port, target)
            assert status == 401
            # It says how to give the token: in the address, or in a header.
            assert body.startswith(b"a valid token is required")
            assert b"/?token=YOUR_TOKEN" in body
            assert b"Authorization: Bearer YOUR_TOKEN" in body
            status, _, _ = await http_get(port, target + "?token=wrong")
            assert status == 401
        for target in ("/", "/status.json"):
            status, _, _ = await http_get(port, target + "?token=s3cret")
            assert status == 200
        samples = await scrape(port, "Authorization: Bearer s3cret")
        assert ("framewire_clients", frozenset({("endpoint", "out")})) in samples
        status, _, _ = await http_get(port, "/nothing?token=s3cret")
        assert status == 404


async def raw_exchange(port: int, request: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    received = b""
    with trio.fail_after(10):
        await stream.send_all(request)
        while chunk := await stream.receive_some():
            received += chunk
    await stream.aclose()
    return received


async def test_head_is_answered_without_a_body_and_other_methods_are_refused() -> None:
    async with running(config()) as (_, port):
        refused = await raw_exchange(
            port, b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
        )
        assert refused.startswith(b"HTTP/1.1 405")
        assert b"allow: GET, HEAD" in refused
        head = await raw_exchange(port, b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert head.endswith(b"\r\n\r\n")  # the head only
        assert b"content-length: 0" not in head


def fake_endpoints(status: EndpointStatus) -> dict[str, Endpoint[Any]]:
    return {"e": cast("Endpoint[Any]", SimpleNamespace(status=status))}


def test_rates_are_per_second_over_the_last_interval() -> None:
    meter = RateMeter()
    status = EndpointStatus(kind="server")
    client = ClientInfo("peer:1", subscription=cast(Any, object()))
    status.clients[1] = client
    endpoints = fake_endpoints(status)
    meter.sample(endpoints, 100.0)
    assert meter.endpoint("e")["frames_out"] == 0.0  # one reading: no rate yet
    first_interval = meter.interval
    assert first_interval is None
    status.frames_out, status.bytes_out = 50, 5000
    client.frames_sent, client.bytes_sent = 50, 5000
    meter.sample(endpoints, 102.0)
    assert meter.interval == 2.0
    assert meter.endpoint("e") == {
        "frames_in": 0.0,
        "bytes_in": 0.0,
        "frames_out": 25.0,
        "bytes_out": 2500.0,
    }
    assert meter.client(client) == {"frames_sent": 25.0, "bytes_sent": 2500.0}
    # A replaced endpoint (a reload) starts again from zero instead of going negative.
    fresh = EndpointStatus(kind="server")
    meter.sample(fake_endpoints(fresh), 103.0)
    assert meter.endpoint("e")["frames_out"] == 0.0
    # A producer's rates are named like its counters.
    producer = ClientInfo("peer:2", frames_in=4, bytes_in=40)
    fresh.clients[2] = producer
    meter.sample(fake_endpoints(fresh), 104.0)
    producer.frames_in = 14
    meter.sample(fake_endpoints(fresh), 105.0)
    assert meter.client(producer) == {"frames_received": 10.0, "bytes_received": 0.0}


def test_the_status_table_shows_rates_and_bytes_beside_totals() -> None:
    from framewire.cli import render_status

    client = {
        "peer": "127.0.0.1:5000",
        "connected_since": 1000.0,
        "queue_frames": 2,
        "queue_bytes": 2048,
        "frames_sent": 600,
        "bytes_sent": 3 << 20,
        "frames_dropped": 1,
        "rates": {"frames_sent": 12.5, "bytes_sent": 64 * 1024.0},
    }
    endpoint = {
        "kind": "server",
        "state": "running",
        "address": ["127.0.0.1:4540"],
        "frames_in": 0,
        "bytes_in": 0,
        "frames_out": 600,
        "bytes_out": 3 << 20,
        "rates": {"frames_in": 0.0, "bytes_in": 0.0, "frames_out": 12.5, "bytes_out": 65536.0},
        "frames_dropped": 1,
        "restarts": 0,
        "last_error": None,
        "clients": [client],
    }
    snapshot = {
        "time": 1060.0,
        "daemon": {"version": "x", "pid": 1, "state": "running", "uptime": 60.0, "config": "c"},
        "endpoints": {"out": endpoint},
    }
    lines = render_status(snapshot).splitlines()
    row = next(line for line in lines if line.startswith("out "))
    assert row.split()[3:11] == ["0", "0.0", "0B", "0B/s", "600", "12.5", "3MiB", "64KiB/s"]
    (client_line,) = [line for line in lines if "client" in line]
    assert "sent 600 (12.5/s, 3MiB, 64KiB/s)  dropped 1" in client_line


class FakeClock:
    """A clock for the last-frame stamps that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_the_last_frame_age_is_the_time_since_the_last_frame_each_way() -> None:
    clock = FakeClock()
    async with running(config()) as (daemon, port):
        for name in ("in", "out"):
            daemon.endpoints[name].status.clock = clock
        age = "framewire_endpoint_last_frame_age_seconds"
        samples = await scrape(port)
        assert not [labels for name, labels in samples if name == age]  # no frame yet: absent
        client = await connect(endpoint_port(daemon, "out"))
        producer = await connect(endpoint_port(daemon, "in"))
        await wait_until(lambda: len(daemon.streams.get("s").subscriptions) == 1)
        await producer.send([data(i) for i in range(3)])
        with trio.fail_after(10):
            await client.read(3)
        await wait_until(lambda: daemon.endpoints["out"].status.frames_out == 3)
        clock.now += 7.5
        samples = await scrape(port)
        assert value(samples, age, endpoint="in", direction="in") == 7.5
        assert value(samples, age, endpoint="out", direction="out") == 7.5
        # A receiver sends nothing, a server receives nothing: no series those ways.
        assert (age, frozenset({("endpoint", "in"), ("direction", "out")})) not in samples
        assert (age, frozenset({("endpoint", "out"), ("direction", "in")})) not in samples
        # One more frame in: that way starts again, the other goes on ageing.
        await producer.send([data(3)])
        await wait_until(lambda: daemon.endpoints["in"].status.frames_in == 4)
        with trio.fail_after(10):
            await client.read(4)
        await wait_until(lambda: daemon.endpoints["out"].status.frames_out == 4)
        clock.now += 2
        samples = await scrape(port)
        assert value(samples, age, endpoint="in", direction="in") == 2
        await producer.stream.aclose()
        # A reload that replaces the endpoint keeps its last frame: the age goes on.
        old = daemon.endpoints["in"]
        await daemon.reload(parse_config(config(receiver_extra='max_frame_size = "1MiB"')))
        assert daemon.endpoints["in"] is not old
        daemon.endpoints["in"].status.clock = clock
        clock.now += 3
        samples = await scrape(port)
        assert value(samples, age, endpoint="in", direction="in") == 5
        await client.stream.aclose()


QUEUES = """
[status]
listen = "127.0.0.1:0"

[endpoints.link]
kind = "link"
listen = "tcp://127.0.0.1:0"
subscribe = "s"
policy = "lossy"
max_queue_frames = 4
max_queue_bytes = "2MiB"

[endpoints.sender]
kind = "sender"
connect = "tcp://127.0.0.1:{refusing}"
stream = "s"
max_queue_frames = 6
max_queue_bytes = "3MiB"
reconnect = {{ initial = "10s" }}

[endpoints.out]
kind = "server"
listen = "tcp://127.0.0.1:0"
stream = "s"
"""


async def test_endpoint_queues_and_their_bounds() -> None:
    with trio.socket.socket() as refusing:  # bound, not listening: connects are refused
        await refusing.bind(("127.0.0.1", 0))
        text = QUEUES.format(refusing=refusing.getsockname()[1])
        async with running(text) as (daemon, port):
            stream = daemon.streams.get("s")
            await stream.publish([data(i) for i in range(3)])
            link = daemon.endpoints["link"].status
            await wait_until(lambda: link.current_detail().get("queue_frames") == 3)
            samples = await scrape(port)
            queue = "framewire_endpoint_queue_"
            assert value(samples, queue + "frames", endpoint="link") == 3
            assert value(samples, queue + "bytes", endpoint="link") == link.detail["queue_bytes"]
            assert link.detail["queue_bytes"] == 3 * data(0).size
            assert value(samples, queue + "max_frames", endpoint="link") == 4
            assert value(samples, queue + "max_bytes", endpoint="link") == 2 << 20
            # The sender's queue is its memory buffer, bounded by its own settings.
            assert value(samples, queue + "frames", endpoint="sender") == 3
            assert value(samples, queue + "bytes", endpoint="sender") == 3 * data(0).size
            assert value(samples, queue + "max_frames", endpoint="sender") == 6
            assert value(samples, queue + "max_bytes", endpoint="sender") == 3 << 20
            # A server has no queue of its own (its clients' are the client series).
            assert (queue + "frames", frozenset({("endpoint", "out")})) not in samples


def test_a_peer_host_is_its_name_without_the_port() -> None:
    from framewire.daemon.metrics import peer_host

    assert peer_host("10.0.0.5:40112") == "10.0.0.5"
    assert peer_host("[::1]:40112") == "::1"
    assert peer_host("[fe80::1%eth0]:5") == "fe80::1%eth0"
    assert peer_host("camera.example.org:4536") == "camera.example.org"
    # UNIX sockets and other streams have no port to leave out: their name is kept.
    assert peer_host("unix:/run/framewire/cam.sock") == "unix:/run/framewire/cam.sock"
    assert peer_host("disconnected peer") == "disconnected peer"
    assert peer_host("MemoryStream") == "MemoryStream"


async def test_an_endpoint_queue_is_read_as_it_is_while_the_endpoint_waits_on_its_peer() -> None:
    pytest.importorskip("zmq")
    from .rogue_peer import consecutive_free_ports
    from .test_bridge import bridge, rogue_frame, send_blocked
    from .test_bridge import running as bridge_running

    endpoint, streams = bridge("server", consecutive_free_ports(), max_queue_frames=4)
    outgoing = streams.get("to-rogue")
    async with bridge_running(endpoint):
        await outgoing.publish([rogue_frame(0, 1, 0, b"first")])
        await trio.testing.wait_all_tasks_blocked()
        assert send_blocked(endpoint)  # no peer: its first frame waits in a send
        for seq in range(1, 4):
            await outgoing.publish([rogue_frame(seq, 1, 0, b"more")])
        await trio.testing.wait_all_tasks_blocked()
        # The bridge takes nothing more meanwhile, and its status says what waits: the frame
        # in the send and the three queued, at the queue's bound.
        detail = endpoint.status.current_detail()
        assert detail["queue_frames"] == 4
        assert detail["queue_max_frames"] == 4
