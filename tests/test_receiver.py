"""The receiver's connect mode: reconnect with exponential backoff and jitter (MockClock)."""

from __future__ import annotations

import errno
import itertools
import logging
import random
from collections.abc import Sequence

import pytest
import trio
import trio.testing

from framewire import Frame, FrameKind
from framewire.config import Address, BackoffConfig, ReceiverConfig
from framewire.daemon.backoff import Backoff
from framewire.daemon.endpoints import EndpointContext, Transports
from framewire.daemon.endpoints.receiver import ReceiverEndpoint
from framewire.daemon.stream import StreamRegistry
from framewire.daemon.transport import Connector

from .helpers import encode

UPSTREAM = Address("tcp", "192.0.2.1", 4536)  # never dialled: the connector is injected


class ScriptedUpstream(Transports):
    """A connector that refuses ``refusals`` times, then hands out memory streams."""

    def __init__(self, refusals: int) -> None:
        super().__init__()
        self.refusals = refusals
        self.attempts: list[float] = []
        self.accepted: trio.MemorySendChannel[trio.abc.Stream]
        self.accepted, self.connections = trio.open_memory_channel[trio.abc.Stream](10)

    async def listen(self, address: Address) -> Sequence[trio.abc.Listener[trio.abc.Stream]]:
        raise AssertionError("connect mode never listens")

    def connector(self, address: Address) -> Connector:
        assert address == UPSTREAM

        async def connect() -> trio.abc.Stream:
            self.attempts.append(trio.current_time())
            await trio.lowlevel.checkpoint()
            if len(self.attempts) <= self.refusals:
                raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
            ours, theirs = trio.testing.memory_stream_pair()
            self.accepted.send_nowait(theirs)
            return ours

        return connect


def receiver(
    transports: Transports, backoff: BackoffConfig, seed: int = 7
) -> tuple[ReceiverEndpoint, StreamRegistry]:
    streams = StreamRegistry()
    config = ReceiverConfig(stream="s", connect=UPSTREAM, reconnect=backoff)
    endpoint = ReceiverEndpoint(
        "upstream", config, EndpointContext(streams, transports), rng=random.Random(seed)
    )
    return endpoint, streams


BACKOFF = BackoffConfig(initial=0.5, maximum=16.0, factor=2.0, stable_after=10.0)


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


async def test_backoff_schedule_while_upstream_is_down(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="framewire")
    upstream = ScriptedUpstream(refusals=9)
    endpoint, streams = receiver(upstream, BACKOFF, seed=7)
    published = streams.get("s").subscribe()
    expected = Backoff(BACKOFF, random.Random(7))
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.run)
        with trio.fail_after(300):
            connection = await upstream.connections.receive()
        await connection.send_all(encode([Frame(FrameKind.DATA, "x", b"hello")]))
        with trio.fail_after(5):
            assert await published.receive_batch() == [Frame(FrameKind.DATA, "x", b"hello")]
        nursery.cancel_scope.cancel()
    observed = gaps(upstream.attempts)
    assert len(observed) == 9
    # The exact jittered schedule of a Backoff with the same seed...
    assert observed == pytest.approx([expected.next_delay() for _ in range(9)])
    # ...which lies within [ceiling/2, ceiling] for ceilings 0.5, 1, 2, 4, 8, 16, 16, ...
    ceilings = [0.5, 1, 2, 4, 8, 16, 16, 16, 16]
    for gap, ceiling in zip(observed, ceilings, strict=True):
        assert ceiling / 2 <= gap <= ceiling
    # One log line for the outage, not one per attempt.
    refused = [r for r in caplog.records if "cannot connect" in r.getMessage()]
    assert len(refused) == 1
    assert endpoint.status.state == "connected"


async def test_reconnects_after_upstream_closes_and_resets_after_a_stable_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    upstream = ScriptedUpstream(refusals=3)
    endpoint, streams = receiver(upstream, BACKOFF)
    published = streams.get("s").subscribe()
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.run)
        with trio.fail_after(300):
            first = await upstream.connections.receive()
        assert endpoint.backoff.attempt == 3
        # A stable connection (longer than stable_after) ends: the backoff starts over.
        await trio.sleep(BACKOFF.stable_after + 1)
        await first.send_all(encode([Frame(FrameKind.DATA, "x", b"1")]))
        await first.aclose()
        closed_at = trio.current_time()
        with trio.fail_after(300):
            second = await upstream.connections.receive()
        assert upstream.attempts[-1] - closed_at <= BACKOFF.initial
        # A short-lived connection does not reset it: the next delay grows.
        await second.aclose()
        closed_at = trio.current_time()
        with trio.fail_after(300):
            third = await upstream.connections.receive()
        assert BACKOFF.initial <= upstream.attempts[-1] - closed_at <= 2 * BACKOFF.initial
        assert endpoint.backoff.attempt == 2
        await third.send_all(encode([Frame(FrameKind.DATA, "x", b"3")]))
        with trio.fail_after(5):
            received = await published.receive_batch()
            if len(received) < 2:
                received += await published.receive_batch()
        assert [bytes(f.payload) for f in received] == [b"1", b"3"]
        nursery.cancel_scope.cancel()


async def test_bad_bytes_from_upstream_reconnect(autojump_clock: trio.testing.MockClock) -> None:
    upstream = ScriptedUpstream(refusals=0)
    endpoint, streams = receiver(upstream, BACKOFF)
    published = streams.get("s").subscribe()
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.run)
        with trio.fail_after(60):
            first = await upstream.connections.receive()
            await first.send_all(b"garbage garbage garbage garbage")
            second = await upstream.connections.receive()
            await second.send_all(encode([Frame(FrameKind.DATA, "x", b"ok")]))
            assert await published.receive_batch() == [Frame(FrameKind.DATA, "x", b"ok")]
        assert endpoint.status.last_error is not None
        assert "bad magic" in endpoint.status.last_error
        nursery.cancel_scope.cancel()


async def test_idle_upstream_is_dropped(autojump_clock: trio.testing.MockClock) -> None:
    upstream = ScriptedUpstream(refusals=0)
    streams = StreamRegistry()
    config = ReceiverConfig(stream="s", connect=UPSTREAM, reconnect=BACKOFF, idle_timeout=30.0)
    endpoint = ReceiverEndpoint("upstream", config, EndpointContext(streams, upstream))
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.run)
        with trio.fail_after(120):
            await upstream.connections.receive()  # connects, then hears nothing
            await upstream.connections.receive()  # dropped after 30 s and reconnected
        assert 30 <= gaps(upstream.attempts)[0] <= 30 + BACKOFF.initial
        nursery.cancel_scope.cancel()


def test_backoff_ceilings_and_reset() -> None:
    backoff = Backoff(BACKOFF, random.Random(1))
    ceilings: list[float] = []
    for _ in range(8):
        ceilings.append(backoff.ceiling())
        delay = backoff.next_delay()
        assert ceilings[-1] / 2 <= delay <= ceilings[-1]
    assert ceilings == [0.5, 1, 2, 4, 8, 16, 16, 16]
    backoff.reset()
    assert backoff.ceiling() == 0.5


async def test_idle_timeout_counts_from_the_last_read(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Frames every 20 s keep a connection with a 30 s idle timeout up; it is dropped 30 s
    after the last one (the endpoint's idle watch, not a deadline moved per read)."""
    upstream = ScriptedUpstream(refusals=0)
    streams = StreamRegistry()
    config = ReceiverConfig(stream="s", connect=UPSTREAM, reconnect=BACKOFF, idle_timeout=30.0)
    endpoint = ReceiverEndpoint("upstream", config, EndpointContext(streams, upstream))
    frame = Frame(FrameKind.DATA, "x", b"tick")
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.run)
        with trio.fail_after(300):
            producer = await upstream.connections.receive()
            for _ in range(5):
                await producer.send_all(encode([frame]))
                await trio.sleep(20)
            last = trio.current_time() - 20
            await upstream.connections.receive()  # dropped, then reconnected
        assert len(upstream.attempts) == 2
        assert 30 <= upstream.attempts[1] - last <= 30 + BACKOFF.initial
        assert endpoint.status.frames_in == 5
        nursery.cancel_scope.cancel()
