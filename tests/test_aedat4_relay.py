"""aedat4 sessions and bad input, through a real daemon on loopback (no dv-processing)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from framewire.config import parse_config
from framewire.daemon import Daemon
from framewire.daemon.stream import Policy, QueueBounds, Stream, SubscriptionClosed
from framewire.protocols.aedat4 import Aedat4Decoder

from .aedat4frames import body, ioheader, packet
from .helpers import port_of, wait_until

RELAY = """
[endpoints.dv-in]
kind = "receiver"
listen = "tcp://127.0.0.1:0"
protocol = "aedat4"
stream = "camera"

[endpoints.dv-out]
kind = "server"
listen = "tcp://127.0.0.1:0"
protocol = "aedat4"
stream = "camera"
"""
HEADER_A = ioheader([(0, "EVTS")])
HEADER_B = ioheader([(0, "EVTS")], compression=1)


OPENED: list[trio.abc.Stream] = []


@asynccontextmanager
async def relay() -> AsyncIterator[tuple[Daemon, int, int]]:
    daemon = Daemon(parse_config(RELAY))
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(10):
                await nursery.start(daemon.run)
            ports = [port_of(daemon.endpoints[n].status.address[0]) for n in ("dv-in", "dv-out")]
            yield daemon, ports[0], ports[1]
            daemon.request_shutdown()
    finally:
        while OPENED:
            await trio.aclose_forcefully(OPENED.pop())


class Client:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.decoder = Aedat4Decoder(max_frame_size=1 << 20)
        self.wires: list[bytes] = []

    async def read(self, count: int) -> list[bytes]:
        with trio.fail_after(10):
            while len(self.wires) < count:
                data = await self.stream.receive_some(65536)
                if not data:
                    raise EOFError(f"closed after {len(self.wires)} frames")
                self.wires += [bytes(f.payload) for f in self.decoder.feed(data)]
        return self.wires[:count]

    async def closed(self) -> bool:
        """Read to EOF (True), or to a reset; frames read on the way are kept."""
        with trio.fail_after(10):
            try:
                while data := await self.stream.receive_some(65536):
                    self.wires += [bytes(f.payload) for f in self.decoder.feed(data)]
            except trio.BrokenResourceError:
                pass
        return True


async def client(port: int, daemon: Daemon, count: int) -> Client:
    server = daemon.endpoints["dv-out"]
    expected = len(server.status.clients) + 1
    peer = Client(await trio.open_tcp_stream("127.0.0.1", port))
    OPENED.append(peer.stream)
    await wait_until(lambda: len(server.status.clients) == expected)
    return peer


def header_cached(daemon: Daemon, header: bytes) -> bool:
    cached = list(daemon.streams.get("camera").metadata)
    return len(cached) == 1 and bytes(cached[0].payload) == header


# -- the stream's session rule ---------------------------------------------------------------


async def test_a_subscriber_gets_one_header_and_is_ended_by_a_different_one() -> None:
    from framewire.protocols.aedat4 import Aedat4Decoder as Decoder

    stream = Stream("camera")
    frames_a = Decoder(max_frame_size=1 << 20).feed(HEADER_A + packet() + packet())
    frames_a2 = Decoder(max_frame_size=1 << 20).feed(HEADER_A + packet())
    frames_b = Decoder(max_frame_size=1 << 20).feed(HEADER_B)
    for policy in Policy:
        lossy = stream.subscribe(
            policy=policy, session_types=frozenset({"IOHeader"}), bounds=QueueBounds()
        )
        await stream.publish(frames_a)
        await stream.publish(frames_a2)  # the same header again: not repeated
        assert [f.type for f in await lossy.receive_batch()] == ["IOHeader"] + ["EVTS"] * 3
        await stream.publish(frames_a[1:2])
        await stream.publish(frames_b)  # a new session: drain, then end
        assert [f.type for f in await lossy.receive_batch()] == ["EVTS"]
        with pytest.raises(SubscriptionClosed, match="IOHeader changed") as closed:
            await lossy.receive_batch()
        assert closed.value.graceful
        # A newcomer gets the new header only.
        newcomer = stream.subscribe(policy=policy, session_types=frozenset({"IOHeader"}))
        assert [bytes(f.payload) for f in await newcomer.receive_batch()] == [HEADER_B]
        newcomer.close("done")
        stream.metadata.clear()


# -- through the daemon ----------------------------------------------------------------------


async def test_reconnecting_upstream_same_header_continues_different_header_closes() -> None:
    async with relay() as (daemon, producer_port, client_port):
        async with await trio.open_tcp_stream("127.0.0.1", producer_port) as producer:
            await producer.send_all(HEADER_A + packet(0, body(payload=b"1" * 16)))
            await wait_until(lambda: header_cached(daemon, HEADER_A))
            early = await client(client_port, daemon, 1)
            await producer.send_all(packet(0, body(payload=b"2" * 16)))
            assert (await early.read(2))[0] == HEADER_A
        # The same header from a new connection: the session continues, no second header.
        async with await trio.open_tcp_stream("127.0.0.1", producer_port) as producer:
            await producer.send_all(HEADER_A + packet(0, body(payload=b"3" * 16)))
            assert (await early.read(3))[1:] == [
                packet(0, body(payload=b"2" * 16)),
                packet(0, body(payload=b"3" * 16)),
            ]
        # A different header: the early client is closed, a new one gets the new header.
        lz4 = b"\x04\x22\x4d\x18" + b"4" * 12
        async with await trio.open_tcp_stream("127.0.0.1", producer_port) as producer:
            await producer.send_all(HEADER_B + packet(0, lz4))
            assert await early.closed()
            assert early.wires == early.wires[:3]  # nothing of the new session
            await wait_until(lambda: header_cached(daemon, HEADER_B))
            late = await client(client_port, daemon, 1)
            await producer.send_all(packet(0, lz4))
            assert await late.read(2) == [HEADER_B, packet(0, lz4)]


async def test_a_client_that_writes_is_disconnected(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with (
        relay() as (daemon, producer_port, client_port),
        await trio.open_tcp_stream("127.0.0.1", producer_port) as producer,
    ):
        await producer.send_all(HEADER_A)
        await wait_until(lambda: header_cached(daemon, HEADER_A))
        rude = await client(client_port, daemon, 1)
        await rude.read(1)
        await rude.stream.send_all(b"hello")
        assert await rude.closed()
        await wait_until(lambda: not daemon.endpoints["dv-out"].status.clients)
    assert any(
        "the client sent 5 bytes; aedat4 clients only listen" in record.getMessage()
        for record in caplog.records
    )


async def test_unknown_stream_id_closes_the_upstream_and_is_never_forwarded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with relay() as (daemon, producer_port, client_port):
        async with await trio.open_tcp_stream("127.0.0.1", producer_port) as producer:
            await producer.send_all(HEADER_A)
            await wait_until(lambda: header_cached(daemon, HEADER_A))
            reader = await client(client_port, daemon, 1)
            await producer.send_all(packet(0))
            await reader.read(2)
            await producer.send_all(packet(9) + packet(0))
            with trio.fail_after(10):
                assert await producer.receive_some(100) == b""  # framewire hung up
        assert await reader.read(2) == [HEADER_A, packet(0)]
        # The bad packet and everything after it on that connection were not forwarded.
        with trio.move_on_after(0.2):
            await reader.read(3)
        assert len(reader.wires) == 2
    assert any(
        "stream id 9, which the IOHeader does not declare" in record.getMessage()
        for record in caplog.records
    )


async def test_a_second_producer_is_refused_while_one_is_connected(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with (
        relay() as (daemon, producer_port, _),
        await trio.open_tcp_stream("127.0.0.1", producer_port) as first,
    ):
        await first.send_all(HEADER_A)
        await wait_until(lambda: header_cached(daemon, HEADER_A))
        async with await trio.open_tcp_stream("127.0.0.1", producer_port) as second:
            # Refused once it shows it is a producer (its header), not for connecting.
            await second.send_all(HEADER_A)
            with trio.fail_after(10):
                assert await second.receive_some(100) == b""
    assert any("takes one producer at a time" in r.getMessage() for r in caplog.records)


async def test_a_silent_connection_does_not_hold_the_stream_against_a_camera() -> None:
    """A port probe (or a confused client) connected first never locks the camera out."""
    async with (
        relay() as (daemon, producer_port, _),
        await trio.open_tcp_stream("127.0.0.1", producer_port) as _silent,
        await trio.open_tcp_stream("127.0.0.1", producer_port) as _garbage,
        await trio.open_tcp_stream("127.0.0.1", producer_port) as camera,
    ):
        await _garbage.send_all(b"GET / HTTP/1.1\r\n\r\n")
        await camera.send_all(HEADER_A)
        await wait_until(lambda: header_cached(daemon, HEADER_A))
