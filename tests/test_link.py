"""The link endpoint: keepalives, dead peers, reconnects and queues (MockClock, memory streams).

Two links are joined by :class:`MemoryNetwork`, a Transports that hands the connecting link
one end of a memory stream pair and the listening link's listener the other, and that can
refuse connections or cut every open one to stage an outage. The last tests use real
sockets on 127.0.0.1, one per protocol.
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import random
import struct
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from framewire import Frame, FrameKind
from framewire.config import Address, BackoffConfig, LinkConfig, parse_config
from framewire.daemon import Daemon
from framewire.daemon.backoff import Backoff
from framewire.daemon.endpoints import EndpointContext, Transports
from framewire.daemon.endpoints.link import LinkEndpoint
from framewire.daemon.status import build_snapshot
from framewire.daemon.stream import Policy, QueueBounds, StreamRegistry, Subscription
from framewire.daemon.transport import Connector
from framewire.protocols.datalink import KEEPALIVE as DATALINK_KEEPALIVE
from framewire.protocols.native import END_OF_STREAM, KEEPALIVE, NativeDecoder

from .helpers import encode, port_of, wait_until

SERVER = Address("tcp", "192.0.2.1", 4550)  # never dialled: the transports are in memory
BACKOFF = BackoffConfig(initial=0.5, maximum=16.0, factor=2.0, stable_after=10.0)


class MemoryListener(trio.abc.Listener[trio.abc.Stream]):
    def __init__(self) -> None:
        self.send_channel, self.receive_channel = trio.open_memory_channel[trio.abc.Stream](16)

    async def accept(self) -> trio.abc.Stream:
        return await self.receive_channel.receive()

    async def aclose(self) -> None:
        self.receive_channel.close()
        await trio.lowlevel.checkpoint()


class MemoryNetwork(Transports):
    """Listeners and connectors over memory streams, with outages on demand."""

    def __init__(self) -> None:
        super().__init__()
        self.listeners: dict[Address, MemoryListener] = {}
        self.refusing = False
        self.attempts: list[float] = []
        self.open_streams: list[trio.abc.Stream] = []

    async def listen(self, address: Address) -> Sequence[trio.abc.Listener[trio.abc.Stream]]:
        listener = self.listeners[address] = MemoryListener()
        await trio.lowlevel.checkpoint()
        return [listener]

    def connector(self, address: Address) -> Connector:
        async def connect() -> trio.abc.Stream:
            self.attempts.append(trio.current_time())
            await trio.lowlevel.checkpoint()
            listener = self.listeners.get(address)
            if self.refusing or listener is None:
                raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
            ours, theirs = trio.testing.memory_stream_pair()
            self.open_streams += [ours, theirs]
            listener.send_channel.send_nowait(theirs)
            return ours

        return connect

    async def cut(self) -> None:
        """Break every open connection (both ends see it at once)."""
        streams, self.open_streams = self.open_streams, []
        for stream in streams:
            await trio.aclose_forcefully(stream)


def link(
    network: Transports,
    streams: StreamRegistry,
    *,
    seed: int = 7,
    name: str = "link",
    **options: object,
) -> LinkEndpoint:
    config = LinkConfig(reconnect=BACKOFF, keepalive=1.0, timeout=5.0, **options)  # type: ignore[arg-type]
    return LinkEndpoint(name, config, EndpointContext(streams, network), rng=random.Random(seed))


@attrs.define
class Pair:
    """Two linked links: ``a`` listens, ``b`` connects. a sends a-to-b, b sends b-to-a."""

    network: MemoryNetwork
    a_streams: StreamRegistry
    b_streams: StreamRegistry
    a: LinkEndpoint
    b: LinkEndpoint

    def at_b(self) -> Subscription:
        """What b receives (from a)."""
        return self.b_streams.get("from-a").subscribe(policy=Policy.LOSSLESS)

    def at_a(self) -> Subscription:
        """What a receives (from b)."""
        return self.a_streams.get("from-b").subscribe(policy=Policy.LOSSLESS)


@asynccontextmanager
async def linked_pair() -> AsyncIterator[Pair]:
    network = MemoryNetwork()
    a_streams, b_streams = StreamRegistry(), StreamRegistry()
    a = link(network, a_streams, name="a", listen=SERVER, publish="from-b", subscribe="to-b")
    b = link(network, b_streams, name="b", connect=SERVER, publish="from-a", subscribe="to-a")
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await nursery.start(b.run)
        yield Pair(network, a_streams, b_streams, a, b)
        nursery.cancel_scope.cancel()


def data(i: int, size: int = 8) -> Frame:
    return Frame(FrameKind.DATA, "sample", i.to_bytes(4, "big") * (size // 4), timestamp=i)


def meta(version: int) -> Frame:
    return Frame(FrameKind.METADATA, "calibration", b"v%d" % version, timestamp=version)


async def frames_of(subscription: Subscription, count: int) -> list[Frame]:
    frames: list[Frame] = []
    with trio.fail_after(120):
        while len(frames) < count:
            frames += await subscription.receive_batch()
    return frames


async def both_up(pair: Pair) -> None:
    with trio.fail_after(60):
        await pair.a.wait_for_state("up")
        await pair.b.wait_for_state("up")


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def messages(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == f"framewire.endpoint.{name}"]


# -- the link comes up and carries frames both ways ----------------------------------------


async def test_frames_flow_both_ways(autojump_clock: trio.testing.MockClock) -> None:
    async with linked_pair() as pair:
        at_a, at_b = pair.at_a(), pair.at_b()
        await both_up(pair)
        await pair.a_streams.get("to-b").publish([meta(1), data(1), data(2)])
        await pair.b_streams.get("to-a").publish([data(3)])
        assert await frames_of(at_b, 3) == [meta(1), data(1), data(2)]
        assert await frames_of(at_a, 1) == [data(3)]
        assert pair.a.status.state == pair.b.status.state == "up"
        assert pair.a.status.detail["link"] == "up"
        assert pair.b.status.detail["peer"] == str(SERVER)


# -- a 60-second outage -----------------------------------------------------------------


async def test_outage_backoff_schedule_and_recovery(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="framewire")
    async with linked_pair() as pair:
        at_a, at_b = pair.at_a(), pair.at_b()
        await both_up(pair)
        assert len(pair.network.attempts) == 1
        caplog.clear()

        # The network goes away for 60 seconds: every connection breaks, every attempt is
        # refused. Frames published meanwhile wait in the links' queues.
        pair.network.refusing = True
        await pair.network.cut()
        outage_began = trio.current_time()
        with trio.fail_after(10):
            await pair.b.wait_for_state("reconnecting")
        assert pair.b.status.detail["link"] == "down"
        assert isinstance(pair.b.status.detail["next_attempt_in"], float)
        assert pair.b.status.detail["next_attempt_in"] > 0
        await pair.a_streams.get("to-b").publish([data(1), data(2)])
        await pair.b_streams.get("to-a").publish([data(3)])
        await trio.sleep_until(outage_began + 60)
        pair.network.refusing = False
        await both_up(pair)
        recovered_at = trio.current_time()

        # Frames wait out the outage and arrive, in both directions, after it.
        assert await frames_of(at_b, 2) == [data(1), data(2)]
        assert await frames_of(at_a, 1) == [data(3)]
        await pair.a_streams.get("to-b").publish([data(4)])
        await pair.b_streams.get("to-a").publish([data(5)])
        assert await frames_of(at_b, 1) == [data(4)]
        assert await frames_of(at_a, 1) == [data(5)]

    # The exact schedule: the gaps between attempts are those of a Backoff with the same
    # seed. The first attempt after the break comes one backoff delay after it.
    attempts = pair.network.attempts[1:]
    expected = Backoff(BACKOFF, random.Random(7))
    delays = [expected.next_delay() for _ in attempts]
    assert attempts[0] - outage_began == pytest.approx(delays[0])
    assert gaps(attempts) == pytest.approx(delays[1:])
    ceilings = [min(0.5 * 2**n, 16.0) for n in range(len(delays))]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert attempts[-2] < outage_began + 60 <= attempts[-1] <= recovered_at
    # ...and the attempts stop at the first one after the outage: that one succeeded.
    elapsed = list(itertools.accumulate(delays))
    assert len(attempts) == next(i for i, t in enumerate(elapsed) if t >= 60) + 1

    # One log line per change of state, not one per attempt.
    lines = messages(caplog, "b")
    down = [line for line in lines if line.startswith("link down")]
    refused = [line for line in lines if "connection refused" in line]
    up = [line for line in lines if line.startswith("link up")]
    assert len(down) == 1
    assert len(refused) == 1
    assert len(up) == 1
    assert len(lines) == 3


async def test_backoff_resets_after_a_stable_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with linked_pair() as pair:
        await both_up(pair)
        for _ in range(3):  # short-lived connections: the backoff keeps growing
            await pair.network.cut()
            await pair.b.wait_for_state("reconnecting")
            await both_up(pair)
        assert pair.b.backoff.attempt == 3
        await trio.sleep(BACKOFF.stable_after + 1)
        await pair.network.cut()
        await pair.b.wait_for_state("reconnecting")
        assert pair.b.backoff.attempt == 1  # reset, then one delay drawn
        next_attempt_in = pair.b.status.detail["next_attempt_in"]
        assert isinstance(next_attempt_in, float)
        assert next_attempt_in <= BACKOFF.initial


# -- liveness ---------------------------------------------------------------------------


class SilentAfterHello(Transports):
    """Connects to a scripted peer that sends one keepalive, then nothing, never closing."""

    def __init__(self, hello: bytes = KEEPALIVE) -> None:
        super().__init__()
        self.hello = hello
        self.attempts: list[float] = []
        self.peers: list[trio.abc.Stream] = []

    async def listen(self, address: Address) -> Sequence[trio.abc.Listener[trio.abc.Stream]]:
        raise AssertionError("connect mode never listens")

    def connector(self, address: Address) -> Connector:
        async def connect() -> trio.abc.Stream:
            self.attempts.append(trio.current_time())
            ours, theirs = trio.testing.memory_stream_pair()
            await theirs.send_all(self.hello)
            self.peers.append(theirs)
            return ours

        return connect


async def test_dead_peer_is_detected_within_timeout(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="framewire")
    network = SilentAfterHello()
    endpoint = link(network, StreamRegistry(), connect=SERVER, publish="in")
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.run)
        with trio.fail_after(5):
            await endpoint.wait_for_state("up")
        up_at = trio.current_time()
        with trio.fail_after(60):
            await endpoint.wait_for_state("reconnecting")
        down_at = trio.current_time()
        nursery.cancel_scope.cancel()
    # The peer said its last word at up_at: the link gave up exactly `timeout` later.
    assert down_at - up_at == pytest.approx(5.0)
    assert any("heard nothing from the peer for 5s" in m for m in messages(caplog, "link"))


async def test_a_side_that_only_sends_keeps_a_healthy_link(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork()
    sender_streams, reader_streams = StreamRegistry(), StreamRegistry()
    # The sender publishes nothing it receives; the reader sends nothing but keepalives.
    sender = link(network, sender_streams, name="sender", listen=SERVER, subscribe="out")
    reader = link(network, reader_streams, name="reader", connect=SERVER, publish="in")
    received = reader_streams.get("in").subscribe(policy=Policy.LOSSLESS)
    async with trio.open_nursery() as nursery:
        await nursery.start(sender.run)
        await nursery.start(reader.run)
        out = sender_streams.get("out")
        for i in range(120):  # one frame every 0.5 s for a minute: 12 timeouts' worth
            await out.publish([data(i)])
            await trio.sleep(0.5)
        assert await frames_of(received, 120) == [data(i) for i in range(120)]
        # Ten idle seconds: keepalives both ways hold it up.
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    assert len(network.attempts) == 1
    assert sender.connections == reader.connections == 1
    assert reader.keepalives_sent > 0  # what kept the sender's timer from expiring
    assert sender.status.state == reader.status.state == "up"


async def test_keepalives_are_sent_only_when_idle(autojump_clock: trio.testing.MockClock) -> None:
    async with linked_pair() as pair:
        await both_up(pair)
        await trio.sleep(10.5)
        idle_keepalives = pair.a.keepalives_sent
        assert 10 <= idle_keepalives <= 12  # about one a second
        out = pair.a_streams.get("to-b")
        for i in range(40):  # data every 0.25 s: no keepalive needed
            await out.publish([data(i)])
            await trio.sleep(0.25)
        assert pair.a.keepalives_sent <= idle_keepalives + 1


# -- bad input --------------------------------------------------------------------------


class GarbagePeer(Transports):
    """Every connection gets the same bytes from the peer, which then stays open."""

    def __init__(self, garbage: bytes) -> None:
        super().__init__()
        self.garbage = garbage
        self.attempts: list[float] = []
        self.peers: list[trio.abc.Stream] = []

    async def listen(self, address: Address) -> Sequence[trio.abc.Listener[trio.abc.Stream]]:
        raise AssertionError("connect mode never listens")

    def connector(self, address: Address) -> Connector:
        async def connect() -> trio.abc.Stream:
            self.attempts.append(trio.current_time())
            ours, theirs = trio.testing.memory_stream_pair()
            if self.garbage:
                await theirs.send_all(self.garbage)
            self.peers.append(theirs)
            return ours

        return connect


def datalink_header(size: int, timestamp: float = 1.0) -> bytes:
    return b" " * 5 + struct.pack("<q", size) + struct.pack("<d", timestamp) + b"!" * 5


@pytest.mark.parametrize(
    ("protocol", "garbage", "problem"),
    [
        ("datalink", b"XXXXX" + bytes(21), "bad start marker"),
        ("datalink", b" " * 5 + bytes(16) + b"?????", "bad header end marker"),
        ("datalink", datalink_header(3) + b"abc" + b"xxxxx", "bad footer"),
        ("datalink", datalink_header(-5), "negative message size"),
        ("datalink", datalink_header(1 << 60), "exceeds the maximum frame size"),
        ("native", b"garbage garbage garbage garbage", "bad magic"),
        ("native", b"", "heard nothing from the peer for 5s"),
    ],
)
async def test_bad_peers_are_dropped_and_retried_with_backoff(
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    protocol: str,
    garbage: bytes,
    problem: str,
) -> None:
    caplog.set_level(logging.INFO, logger="framewire")
    network = GarbagePeer(garbage)
    endpoint = link(network, StreamRegistry(), connect=SERVER, publish="in", protocol=protocol)
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.run)
        with trio.fail_after(120):
            while len(network.attempts) < 6:
                await endpoint.wait_for_state("reconnecting")
                await endpoint.wait_for_state("connecting")
        nursery.cancel_scope.cancel()
    # A native link is never up (its peer never said anything valid); a datalink link is up
    # on connecting, until the bad bytes arrive. Either way the delays between attempts grow
    # as the backoff says.
    if protocol == "native":
        assert endpoint.connections == 0
    else:  # the last attempt may have been cut short by the test's end
        assert endpoint.connections >= len(network.attempts) - 1
    assert endpoint.status.last_error is not None
    assert problem in endpoint.status.last_error
    expected = Backoff(BACKOFF, random.Random(7))
    silence = 5.0 if not garbage else 0.0
    assert gaps(network.attempts) == pytest.approx(
        [silence + expected.next_delay() for _ in range(5)]
    )
    # One line for the whole series (and for datalink, one "link up" before it).
    lines = messages(caplog, "link")
    down = [m for m in lines if "is down" in m or "link down" in m]
    assert len(down) == 1
    assert problem in down[0]
    assert len([m for m in lines if m.startswith("link up")]) == (protocol == "datalink")


# -- the queue while down ---------------------------------------------------------------


async def test_lossy_queue_while_down_keeps_metadata_and_the_newest_data(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork()
    network.refusing = True
    a_streams, b_streams = StreamRegistry(), StreamRegistry()
    a = link(network, a_streams, name="a", listen=SERVER, publish="in")
    b = link(
        network,
        b_streams,
        name="b",
        connect=SERVER,
        subscribe="out",
        policy="lossy",
        max_queue_frames=4,
    )
    received = a_streams.get("in").subscribe(policy=Policy.LOSSLESS)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await nursery.start(b.run)
        out = b_streams.get("out")
        # Publishing never waits while the link is down; old data makes room for new.
        out.publish_nowait([meta(1), *[data(i) for i in range(10)], meta(2), data(10)])
        b._refresh_figures()
        assert b.status.detail["queue_frames"] == 4
        assert b.status.frames_dropped == 9
        await trio.sleep(30)
        network.refusing = False
        frames = await frames_of(received, 4)
        nursery.cancel_scope.cancel()
    assert frames == [meta(1), data(9), meta(2), data(10)]


async def test_lossless_queue_while_down_holds_the_publisher_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork()
    network.refusing = True
    a_streams, b_streams = StreamRegistry(), StreamRegistry()
    a = link(network, a_streams, name="a", listen=SERVER, publish="in")
    b = link(
        network,
        b_streams,
        name="b",
        connect=SERVER,
        subscribe="out",
        policy="lossless",
        max_queue_frames=4,
    )
    received = a_streams.get("in").subscribe(policy=Policy.LOSSLESS)
    published = 0

    async def publisher() -> None:
        nonlocal published
        out = b_streams.get("out")
        for i in range(10):
            await out.publish([data(i)])
            published += 1

    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await nursery.start(b.run)
        nursery.start_soon(publisher)
        await trio.sleep(30)
        assert published == 4  # the queue is full: the publisher waits
        b._refresh_figures()
        assert b.status.detail["queue_frames"] == 4
        assert b.status.frames_dropped == 0
        network.refusing = False
        frames = await frames_of(received, 10)
        assert published == 10
        nursery.cancel_scope.cancel()
    assert frames == [data(i) for i in range(10)]


async def test_metadata_is_replayed_after_a_reconnect(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with linked_pair() as pair:
        at_b = pair.at_b()
        await both_up(pair)
        await pair.a_streams.get("to-b").publish([meta(1), data(1)])
        assert await frames_of(at_b, 2) == [meta(1), data(1)]
        await pair.network.cut()
        await both_up(pair)
        await pair.a_streams.get("to-b").publish([data(2)])
        # A restarted peer needs the metadata current for the next frame first.
        assert await frames_of(at_b, 2) == [meta(1), data(2)]


# -- listen mode ------------------------------------------------------------------------


async def test_a_new_connection_replaces_the_current_one(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="framewire")
    network = MemoryNetwork()
    streams = StreamRegistry()
    endpoint = link(network, streams, listen=SERVER, subscribe="out", publish="in")
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.run)
        connect = network.connector(SERVER)
        first = await connect()
        await first.send_all(KEEPALIVE)
        with trio.fail_after(5):
            await endpoint.wait_for_state("up")
        second = await connect()
        await second.send_all(encode([data(7)]))
        received = streams.get("in").subscribe()
        with trio.fail_after(5):
            # The first connection is closed: reading it ends (after the link's keepalive).
            while await first.receive_some(1 << 16):
                pass
        await streams.get("out").publish([data(8)])
        decoder = NativeDecoder(max_frame_size=1 << 20)
        frames: list[Frame] = []
        with trio.fail_after(5):
            while not frames:
                frames += decoder.feed(await second.receive_some(1 << 16))
        assert frames == [data(8)]
        assert await frames_of(received, 1) == [data(7)]
        nursery.cancel_scope.cancel()
    assert any("replaced by a new connection" in m for m in messages(caplog, "link"))


async def test_a_stray_connection_takes_nothing_from_a_connected_peer(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A newcomer that sends nothing valid is closed with one line; the peer keeps the link."""
    caplog.set_level(logging.INFO, logger="framewire")
    network = MemoryNetwork()
    streams = StreamRegistry()
    endpoint = link(network, streams, listen=SERVER, publish="in")
    received = streams.get("in").subscribe()
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.run)
        connect = network.connector(SERVER)
        peer = await connect()
        await peer.send_all(KEEPALIVE)
        with trio.fail_after(5):
            await endpoint.wait_for_state("up")
        silent, garbage = await connect(), await connect()
        await garbage.send_all(b"XX")
        with trio.fail_after(5):  # garbage: closed at once
            while await garbage.receive_some(1 << 16):
                pass
        # The silent one is vetted for `timeout` (5 s); the peer keeps talking meanwhile.
        for i in range(8):
            await peer.send_all(encode([data(i)]))
            await trio.sleep(1)
        with trio.fail_after(1):
            while await silent.receive_some(1 << 16):
                pass
        assert await frames_of(received, 8) == [data(i) for i in range(8)]
        assert endpoint.status.state == "up"
        nursery.cancel_scope.cancel()
    lines = [m for m in messages(caplog, "link") if "the link stays with its peer" in m]
    assert all("the link stays with its peer StapledStream:" in line for line in lines)
    assert len(lines) == 2
    assert any("bad bytes" in line for line in lines)
    assert any("nothing valid within 5s" in line for line in lines)
    assert not any("replaced by a new connection" in m for m in messages(caplog, "link"))


# -- stopping ---------------------------------------------------------------------------


async def test_stop_sends_the_queue_then_end_of_stream(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork()
    streams = StreamRegistry()
    endpoint = link(network, streams, listen=SERVER, subscribe="out")
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.run)
        peer = await network.connector(SERVER)()
        await peer.send_all(KEEPALIVE)
        with trio.fail_after(5):
            await endpoint.wait_for_state("up")
        await streams.get("out").publish([data(1), data(2)])
        endpoint.request_stop()
        received = bytearray()
        with trio.fail_after(5):
            while chunk := await peer.receive_some(1 << 16):
                received += chunk
    assert bytes(received).replace(KEEPALIVE, b"") == encode([data(1), data(2)]) + END_OF_STREAM


# -- configuration ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "error"),
    [
        ('listen = "tcp://127.0.0.1:0"\nconnect = "tcp://127.0.0.1:1"', "exactly one of"),
        ('listen = "tcp://127.0.0.1:0"\nprotocol = "raw"', "has no keepalive"),
        ('listen = "tcp://127.0.0.1:0"', "set publish, subscribe or both"),
        ('listen = "tcp://127.0.0.1:0"\npublish = "x"\nsubscribe = "x"', "must differ"),
        ('listen = "tcp://127.0.0.1:0"\npublish = "x"\nkeepalive = "5s"', "shorter than timeout"),
        ('listen = "tcp://127.0.0.1:0"\npublish = "x"\npolicy = "maybe"', "one of"),
    ],
)
def test_bad_link_tables(table: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_config(f'[endpoints.l]\nkind = "link"\n{table}\n')


def test_link_table_defaults() -> None:
    config = parse_config(
        '[endpoints.l]\nkind = "link"\nconnect = "tcp://127.0.0.1:9"\n'
        'publish = "in"\nprotocol = "datalink"\n'
    )
    link_config = config.endpoints["l"]
    assert isinstance(link_config, LinkConfig)
    assert (link_config.keepalive, link_config.timeout, link_config.policy) == (
        1.0,
        5.0,
        "lossless",
    )


# -- real sockets -----------------------------------------------------------------------


async def test_native_link_pair_over_loopback() -> None:
    a_streams, b_streams = StreamRegistry(), StreamRegistry()
    a = link(
        Transports(),
        a_streams,
        name="a",
        listen=Address("tcp", "127.0.0.1", 0),
        publish="from-b",
        subscribe="to-b",
    )
    at_a = a_streams.get("from-b").subscribe(policy=Policy.LOSSLESS)
    at_b = b_streams.get("from-a").subscribe(
        policy=Policy.LOSSLESS, bounds=QueueBounds(max_bytes=1 << 30)
    )
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            await nursery.start(a.run)
            port = port_of(a.status.address[0])
            b = link(
                Transports(),
                b_streams,
                name="b",
                connect=Address("tcp", "127.0.0.1", port),
                publish="from-a",
                subscribe="to-a",
            )
            await nursery.start(b.run)
            await a.wait_for_state("up")
            await b.wait_for_state("up")
        big = Frame(FrameKind.DATA, "image", bytes(range(256)) * 8192, 5, {"seq": "1"})
        await a_streams.get("to-b").publish([meta(1), big, data(2)])
        await b_streams.get("to-a").publish([data(3)])
        assert await frames_of(at_b, 3) == [meta(1), big, data(2)]
        assert await frames_of(at_a, 1) == [data(3)]
        nursery.cancel_scope.cancel()


async def test_datalink_link_talks_to_a_hand_written_datalink_peer() -> None:
    streams = StreamRegistry()
    endpoint = link(
        Transports(),
        streams,
        listen=Address("tcp", "127.0.0.1", 0),
        protocol="datalink",
        publish="in",
        subscribe="out",
    )
    received = streams.get("in").subscribe(policy=Policy.LOSSLESS)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            await nursery.start(endpoint.run)
            port = port_of(endpoint.status.address[0])
            peer = await trio.open_tcp_stream("127.0.0.1", port)
            # What Datalink's write(b"hello", 5, 1.5) and writeKeepAlive() put on the wire.
            await peer.send_all(datalink_header(5, 1.5) + b"hello" + b'"' * 5)
            await peer.send_all(datalink_header(0, 1.0) + b'"' * 5)
            assert await frames_of(received, 1) == [
                Frame(FrameKind.DATA, "datalink", b"hello", 1_500_000_000)
            ]
            await endpoint.wait_for_state("up")
            await streams.get("out").publish([Frame(FrameKind.DATA, "x", b"world", 2_250_000_000)])
            expected = datalink_header(5, 2.25) + b"world" + b'"' * 5
            got = b""
            while expected not in got:
                got += await peer.receive_some(1 << 16)
            # Anything else it sent is Datalink keepalives.
            assert got.replace(expected, b"").replace(DATALINK_KEEPALIVE, b"") == b""
            await peer.aclose()
        nursery.cancel_scope.cancel()


async def test_databridge_example_joins_two_datalink_peers() -> None:
    """config/databridge.toml on ephemeral ports: A <-> framewire <-> B, both Datalink."""
    example = (Path(__file__).parent.parent / "config" / "databridge.toml").read_text()
    with trio.socket.socket() as b_listener:
        await b_listener.bind(("127.0.0.1", 0))
        b_listener.listen()
        b_port = b_listener.getsockname()[1]
        text = example.replace("127.0.0.1:4550", "127.0.0.1:0").replace(
            "127.0.0.1:4551", f"127.0.0.1:{b_port}"
        )
        instance = Daemon(parse_config(text))
        async with trio.open_nursery() as nursery:
            with trio.fail_after(10):
                await nursery.start(instance.run)
                a_port = port_of(instance.endpoints["side-a"].status.address[0])
                a = await trio.open_tcp_stream("127.0.0.1", a_port)
                b_socket, _ = await b_listener.accept()
                b = trio.SocketStream(b_socket)
                await a.send_all(datalink_header(5, 1.5) + b"to-b!" + b'"' * 5)
                await b.send_all(datalink_header(5, 2.5) + b"to-a!" + b'"' * 5)
                at_b, at_a = b"", b""
                while b"to-b!" not in at_b:
                    at_b += await b.receive_some(1 << 16)
                while b"to-a!" not in at_a:
                    at_a += await a.receive_some(1 << 16)
            # Each side got the other's message, byte for byte, amid keepalives.
            assert at_b.replace(DATALINK_KEEPALIVE, b"") == (
                datalink_header(5, 1.5) + b"to-b!" + b'"' * 5
            )
            assert at_a.replace(DATALINK_KEEPALIVE, b"") == (
                datalink_header(5, 2.5) + b"to-a!" + b'"' * 5
            )
            # The status snapshot shows both links up, with their peers. A link counts a frame
            # as out once its write returned, which can be just after the peer read it.
            links = [instance.endpoints[name].status for name in ("side-a", "side-b")]
            await wait_until(lambda: all(status.frames_out == 1 for status in links))
            snapshot = json.loads(json.dumps(build_snapshot(instance)))
            for name in ("side-a", "side-b"):
                endpoint = snapshot["endpoints"][name]
                assert endpoint["kind"] == "link"
                assert endpoint["state"] == "up"
                assert endpoint["detail"]["link"] == "up"
                assert endpoint["detail"]["connections"] == 1
                assert endpoint["frames_in"] == endpoint["frames_out"] == 1
            await a.aclose()
            await b.aclose()
            instance.request_shutdown()
