"""The daemon in-process on ephemeral 127.0.0.1 ports: receiver → stream → server → clients."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from framewire import Frame, FrameKind
from framewire.config import parse_config
from framewire.daemon import Daemon
from framewire.daemon.endpoints import ServerEndpoint
from framewire.daemon.stream import Subscription
from framewire.protocols.native import END_OF_STREAM

from .helpers import connect, encode, port_of, running_daemon, wait_until

CONFIG = """
[daemon]
grace_period = "5s"

[endpoints.in]
kind = "receiver"
listen = "tcp://127.0.0.1:0"
stream = "camera"
max_frame_size = "1MiB"

[endpoints.out]
kind = "server"
listen = "tcp://127.0.0.1:0"
stream = "camera"
max_queue_frames = {queue}
max_queue_bytes = "{queue_bytes}"
max_clients = {max_clients}
"""


def make_config(queue: int = 1024, queue_bytes: str = "64MiB", max_clients: int = 8) -> str:
    return CONFIG.format(queue=queue, queue_bytes=queue_bytes, max_clients=max_clients)


@pytest.fixture
async def daemon() -> AsyncIterator[Daemon]:
    async with running_daemon(make_config()) as instance:
        yield instance


def ports(daemon: Daemon) -> tuple[int, int]:
    endpoints = daemon.endpoints
    return port_of(endpoints["in"].status.address[0]), port_of(endpoints["out"].status.address[0])


def meta(type_: str, body: bytes) -> Frame:
    return Frame(FrameKind.METADATA, type_, body, timestamp=1, headers={"unit": "K"})


def data(i: int, size: int = 64) -> Frame:
    return Frame(FrameKind.DATA, "sample", i.to_bytes(4, "big") * (size // 4), timestamp=i)


async def wait_for_clients(daemon: Daemon, count: int) -> None:
    await wait_until(lambda: len(daemon.endpoints["out"].status.clients) >= count)


async def wait_for_frames(subscription: Subscription, count: int) -> list[Frame]:
    frames: list[Frame] = []
    with trio.fail_after(10):
        while len(frames) < count:
            frames += await subscription.receive_batch()
    return frames


async def test_relay_with_late_joiner_gets_metadata_first_byte_identical(daemon: Daemon) -> None:
    port_in, port_out = ports(daemon)
    early = await connect(port_out)
    await wait_for_clients(daemon, 1)
    producer = await connect(port_in)
    first = [meta("config", b"v1"), data(0), meta("calibration", b"c1"), data(1)]
    first += [meta("config", b"v2")]
    watcher = daemon.streams.get("camera").subscribe()
    await producer.send(first)
    assert await wait_for_frames(watcher, len(first)) == first

    late = await connect(port_out)
    await wait_for_clients(daemon, 2)
    second = [data(i) for i in range(2, 50)]
    await producer.send(second)

    with trio.fail_after(10):
        early_frames = await early.read(len(first) + len(second))
        # The late joiner: the latest of each metadata type, in first-seen order, then live.
        late_frames = await late.read(2 + len(second))
    assert early_frames == first + second
    assert bytes(early.raw) == encode(first + second)
    assert late_frames[:2] == [meta("config", b"v2"), meta("calibration", b"c1")]
    assert late_frames[2:] == second
    assert bytes(late.raw) == encode([first[4], first[2], *second])
    for peer in (early, late, producer):
        await peer.stream.aclose()


async def test_stalled_client_slows_no_one_and_stays_bounded() -> None:
    async with running_daemon(make_config(queue=16, queue_bytes="1MiB")) as daemon:
        await check_stalled_client(daemon)


async def check_stalled_client(daemon: Daemon) -> None:
    port_in, port_out = ports(daemon)
    # A client that connects and never reads.
    stalled = await trio.open_tcp_stream("127.0.0.1", port_out)
    fast = await connect(port_out)
    await wait_for_clients(daemon, 2)
    producer = await connect(port_in)
    frames = [data(i, size=64 * 1024) for i in range(400)]  # 25 MiB: beyond any socket buffer
    server = daemon.endpoints["out"]
    assert isinstance(server, ServerEndpoint)
    subscriptions = {client.peer: client.subscription for client in server.status.clients.values()}
    with trio.fail_after(30):
        for start in range(0, len(frames), 8):
            batch = frames[start : start + 8]
            await producer.send(batch)
            # The fast client keeps up: it gets every frame while the other one stalls.
            got = await fast.read(start + len(batch))
            assert got[-1] == batch[-1]
            for subscription in subscriptions.values():
                assert subscription is not None
                assert subscription.queued_frames <= 16
                assert subscription.queued_bytes <= 1 << 20
    assert fast.frames == frames
    dropped = sorted(s.frames_dropped for s in subscriptions.values() if s is not None)
    assert dropped[0] == 0  # the fast client lost nothing
    assert dropped[1] > 0  # the stalled one lost data
    for stream in (stalled, fast.stream, producer.stream):
        await stream.aclose()


async def test_bad_producer_is_closed_with_one_log_line_and_others_carry_on(
    daemon: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="framewire")
    port_in, port_out = ports(daemon)
    client = await connect(port_out)
    good = await connect(port_in)
    await wait_for_clients(daemon, 1)
    await good.send([data(1)])
    bad = await trio.open_tcp_stream("127.0.0.1", port_in)
    await bad.send_all(b"this is not a framewire stream at all, just garbage")
    with trio.fail_after(10):
        assert await bad.receive_some(100) == b""  # the daemon closed it
    oversized = await trio.open_tcp_stream("127.0.0.1", port_in)
    await oversized.send_all(encode([data(9, size=2 << 20)])[:4096])  # over max_frame_size
    with trio.fail_after(10):
        assert await oversized.receive_some(100) == b""
    await good.send([data(2)])
    with trio.fail_after(10):
        assert await client.read(2) == [data(1), data(2)]
    lines = [
        r for r in caplog.records if r.name == "framewire.endpoint.in" and "closed:" in r.message
    ]
    assert len(lines) == 2
    assert "bad magic" in lines[0].getMessage()
    assert "maximum frame size" in lines[1].getMessage()
    for stream in (client.stream, good.stream, bad, oversized):
        await stream.aclose()


async def test_producer_vanishing_mid_frame_is_logged(
    daemon: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="framewire")
    port_in, _ = ports(daemon)
    producer = await trio.open_tcp_stream("127.0.0.1", port_in)
    await producer.send_all(encode([data(1), data(2)])[:-10])
    await producer.aclose()
    await wait_until(
        lambda: any(
            "ended" in r.getMessage() and "into a frame" in r.getMessage()
            for r in caplog.records
            if r.name == "framewire.endpoint.in"
        )
    )
    assert daemon.streams.get("camera").frames_in == 1


async def test_max_clients() -> None:
    async with running_daemon(make_config(max_clients=1)) as daemon:
        await check_max_clients(daemon)


async def check_max_clients(daemon: Daemon) -> None:
    _, port_out = ports(daemon)
    first = await connect(port_out)
    await wait_for_clients(daemon, 1)
    second = await trio.open_tcp_stream("127.0.0.1", port_out)
    with trio.fail_after(10):
        assert await second.receive_some(100) == b""
    assert len(daemon.endpoints["out"].status.clients) == 1
    await first.stream.aclose()
    await second.aclose()


async def test_graceful_shutdown_delivers_queued_frames() -> None:
    daemon = Daemon(parse_config(make_config()))
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            _, port_out = ports(daemon)
            client = await connect(port_out)
            await wait_for_clients(daemon, 1)
            frames = [data(i, size=4096) for i in range(1000)]  # within the queue bound
            await daemon.streams.get("camera").publish(frames)
            daemon.request_shutdown()
            received = await client.read_to_end()
    assert received == frames
    assert bytes(client.raw).endswith(END_OF_STREAM)
    await client.stream.aclose()


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
async def test_clients_coming_and_going_leak_no_descriptors(daemon: Daemon) -> None:
    _, port_out = ports(daemon)
    stream = daemon.streams.get("camera")
    await stream.publish([meta("config", b"v1")])
    baseline = open_descriptors()
    for _ in range(20):
        client = await connect(port_out)
        with trio.fail_after(10):
            await client.read(1)
        await client.stream.aclose()
        await wait_until(lambda: not daemon.endpoints["out"].status.clients)
    assert open_descriptors() == baseline


async def test_stream_ends_with_its_last_producer_not_with_a_probe() -> None:
    config = make_config() + "close_on_end = true\n"
    async with running_daemon(config) as daemon:
        port_in, port_out = ports(daemon)
        client = await connect(port_out)
        await wait_for_clients(daemon, 1)
        first = await connect(port_in)
        second = await connect(port_in)
        await first.send([data(1)])
        with trio.fail_after(10):
            assert await client.read(1) == [data(1)]
        # A port probe (connect, send nothing, close) ends nothing.
        probe = await trio.open_tcp_stream("127.0.0.1", port_in)
        await probe.aclose()
        # One producer leaving while another is still connected ends nothing either.
        await first.stream.aclose()
        await wait_until(lambda: len(daemon.endpoints["in"].status.clients) == 1)
        await second.send([data(2)])
        with trio.fail_after(10):
            assert await client.read(2) == [data(1), data(2)]
        # The last producer leaves: the client gets a clean end of stream.
        await second.stream.aclose()
        with trio.fail_after(10):
            assert await client.read_to_end() == [data(1), data(2)]
        assert bytes(client.raw).endswith(END_OF_STREAM)
        await client.stream.aclose()
