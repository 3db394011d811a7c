"""A link against Datalink as the real library behaves (issue 14).

The real Datalink is a C++ library with a ctypes binding, built from its source; it is not
on PyPI (the packages named "datalink" there are unrelated), so these tests cannot run it.
The peers here emulate it: they play a Datalink ``TCPLink`` exactly as
shared/notes/rogue-datalink-zmq.md ("What the real Datalink does, run against framewire")
describes it:

* it never sends a keepalive (its application never calls ``write_keep_alive``), and with
  its default timeout (-1) it never times out;
* it reads EOF as "no data": it notices a closed connection only when one of its own
  writes fails, and only then does a client reconnect or a server accept again;
* a server serves one peer at a time; connections made meanwhile wait in its listen
  backlog (10), and the kernel completes them without the application knowing;
* it drops every message whose timestamp is below 0; its Python ``write(bytes)`` writes
  -1.0.

Bytes are built by hand from the notes' layout, not with framewire's codec. MockClock tests
run over memory streams; the last tests use real sockets on 127.0.0.1, one per behaviour.
"""

from __future__ import annotations

import logging
import random
import socket
import struct
from collections.abc import Sequence

import pytest
import trio
import trio.testing

from framewire import Frame, FrameKind
from framewire.config import Address, BackoffConfig, LinkConfig, parse_config
from framewire.daemon.backoff import Backoff
from framewire.daemon.endpoints import EndpointContext, Transports
from framewire.daemon.endpoints import link as link_module
from framewire.daemon.endpoints.link import LinkEndpoint
from framewire.daemon.stream import Policy, StreamRegistry, Subscription
from framewire.daemon.transport import Connector, enable_tcp_keepalive, tcp_socket_of

from .helpers import port_of

SERVER = Address("tcp", "192.0.2.1", 4550)  # never dialled: the transports are in memory
BACKOFF = BackoffConfig(initial=0.5, maximum=16.0, factor=2.0, stable_after=10.0)
HOUR = 3600.0
#: The listen backlog a Datalink server asks for.
DATALINK_BACKLOG = 10


def message(payload: bytes, timestamp: float) -> bytes:
    """One Datalink message, from the notes' layout."""
    return (
        b"\x20" * 5
        + struct.pack("<q", len(payload))
        + struct.pack("<d", timestamp)
        + b"\x21" * 5
        + payload
        + b"\x22" * 5
    )


class DatalinkApp:
    """One end of a Datalink ``TCPLink`` and the application over it (see the module).

    :meth:`read_loop` is its background thread: it queues received messages, drops
    keepalives and messages with a negative timestamp, and on EOF simply keeps the
    connection (no data). :meth:`write` is the application writing; a write that fails marks
    the connection lost, as Datalink's ``_write_with_invalid_state`` does.
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.received: list[tuple[bytes, float]] = []
        self.dropped_negative = 0
        self.keepalives_heard = 0
        self.eof = trio.Event()
        self.lost = False
        self._buffer = bytearray()
        self._arrived = trio.Event()

    async def read_loop(self) -> None:
        while True:
            try:
                data = await self.stream.receive_some(1 << 16)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self.eof.set()  # "no data": the link stays OPENED
                return
            self._buffer += data
            while len(self._buffer) >= 31:
                assert self._buffer[:5] == b"\x20" * 5
                (size,) = struct.unpack_from("<q", self._buffer, 5)
                (timestamp,) = struct.unpack_from("<d", self._buffer, 13)
                if len(self._buffer) < 31 + size:
                    break
                payload = bytes(self._buffer[26 : 26 + size])
                assert self._buffer[26 + size : 31 + size] == b"\x22" * 5
                del self._buffer[: 31 + size]
                if size == 0:
                    self.keepalives_heard += 1
                elif timestamp < 0:
                    self.dropped_negative += 1
                else:
                    self.received.append((payload, timestamp))
                    self._arrived.set()
                    self._arrived = trio.Event()

    @property
    def saw_eof(self) -> bool:
        return self.eof.is_set()

    async def write(self, payload: bytes, timestamp: float = -1.0) -> bool:
        """Datalink's Python ``write(bytes)``: timestamp -1.0 unless given. False (and the
        connection marked lost) when the write fails."""
        try:
            await self.stream.send_all(message(payload, timestamp))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.lost = True
            return False
        return True

    async def wait_for(self, count: int) -> list[tuple[bytes, float]]:
        with trio.fail_after(60):
            while len(self.received) < count:
                await self._arrived.wait()
        return self.received


class DatalinkServer(Transports):
    """A Datalink ``TcpServer`` that framewire connects to (see the module): it accepts one
    connection, and the next only after a write of its own has failed. Meanwhile, connections
    complete into its backlog; past the backlog, connecting hangs."""

    def __init__(self, nursery: trio.Nursery) -> None:
        super().__init__()
        self.nursery = nursery
        self.attempts: list[float] = []
        self.backlog: list[trio.abc.Stream] = []
        self.app: DatalinkApp | None = None
        self.served: list[DatalinkApp] = []

    async def listen(self, address: Address) -> Sequence[trio.abc.Listener[trio.abc.Stream]]:
        raise AssertionError("framewire connects to a Datalink server")

    def connector(self, address: Address) -> Connector:
        async def connect() -> trio.abc.Stream:
            self.attempts.append(trio.current_time())
            await trio.lowlevel.checkpoint()
            if len(self.backlog) >= DATALINK_BACKLOG:
                await trio.sleep_forever()  # SYNs dropped: framewire's connect_timeout
            ours, theirs = trio.testing.memory_stream_pair()
            self.backlog.append(theirs)
            if self.app is None:
                self.accept()
            return ours

        return connect

    def accept(self) -> None:
        stream = self.backlog.pop(0)
        self.app = DatalinkApp(stream)
        self.served.append(self.app)
        self.nursery.start_soon(self.app.read_loop)

    async def write(self, payload: bytes, timestamp: float = -1.0) -> bool:
        """The server application writes; on failure it closes and accepts again."""
        assert self.app is not None
        if await self.app.write(payload, timestamp):
            return True
        self.app = None
        if self.backlog:
            self.accept()
        return False


class DatalinkClients(Transports):
    """Where Datalink clients (and strays) connect to a listening framewire link."""

    def __init__(self) -> None:
        super().__init__()
        self.send_channel, self.receive_channel = trio.open_memory_channel[trio.abc.Stream](16)

    async def listen(self, address: Address) -> Sequence[trio.abc.Listener[trio.abc.Stream]]:
        await trio.lowlevel.checkpoint()
        return [_ChannelListener(self.receive_channel)]

    def connector(self, address: Address) -> Connector:
        raise AssertionError("the link listens")

    async def connect(self, nursery: trio.Nursery) -> DatalinkApp:
        ours, theirs = trio.testing.memory_stream_pair()
        await self.send_channel.send(theirs)
        app = DatalinkApp(ours)
        nursery.start_soon(app.read_loop)
        return app


class _ChannelListener(trio.abc.Listener[trio.abc.Stream]):
    def __init__(self, channel: trio.MemoryReceiveChannel[trio.abc.Stream]) -> None:
        self.channel = channel

    async def accept(self) -> trio.abc.Stream:
        return await self.channel.receive()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def datalink_link(network: Transports, streams: StreamRegistry, **options: object) -> LinkEndpoint:
    config = LinkConfig(
        protocol="datalink",
        reconnect=BACKOFF,
        keepalive=1.0,
        timeout=5.0,
        publish="in",
        subscribe="out",
        **options,  # type: ignore[arg-type]
    )
    return LinkEndpoint("link", config, EndpointContext(streams, network), rng=random.Random(7))


def frame(payload: bytes, ns: int = 1_700_000_000_000_000_000) -> Frame:
    return Frame(FrameKind.DATA, "x", payload, ns)


async def frames_of(subscription: Subscription, count: int) -> list[Frame]:
    frames: list[Frame] = []
    with trio.fail_after(60):
        while len(frames) < count:
            frames += await subscription.receive_batch()
    return frames


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "framewire.endpoint.link"]


IDLE_PERIODS = [7.0, 60.0, HOUR, 600.0]


# -- a silent Datalink peer keeps the link, in both roles --------------------------------


async def test_a_silent_datalink_server_keeps_the_link_for_an_hour_and_more(
    autojump_clock: trio.testing.MockClock,
) -> None:
    streams = StreamRegistry()
    received = streams.get("in").subscribe(policy=Policy.LOSSLESS)
    async with trio.open_nursery() as nursery:
        server = DatalinkServer(nursery)
        endpoint = datalink_link(server, streams, connect=SERVER)
        await nursery.start(endpoint.run)
        with trio.fail_after(5):
            await endpoint.wait_for_state("up")  # up on connecting: the server says nothing
        for n, idle in enumerate(IDLE_PERIODS):
            await trio.sleep(idle)
            assert endpoint.status.state == "up"
            # After any idle period, a frame each way arrives.
            assert await server.write(b"to framewire %d" % n, 1000.0 + n)
            await streams.get("out").publish([frame(b"to datalink %d" % n, (2000 + n) * 10**9)])
            assert server.app is not None
            await server.app.wait_for(n + 1)
        arrived = await frames_of(received, len(IDLE_PERIODS))
        nursery.cancel_scope.cancel()
    assert [(f.payload, f.timestamp) for f in arrived] == [
        (b"to framewire %d" % n, (1000 + n) * 10**9) for n in range(len(IDLE_PERIODS))
    ]
    assert server.served[0].received == [
        (b"to datalink %d" % n, 2000.0 + n) for n in range(len(IDLE_PERIODS))
    ]
    # Never hung up on: one connection, which the server never saw end (EOF would wedge it).
    assert len(server.attempts) == 1
    assert len(server.served) == 1
    assert not server.served[0].saw_eof
    assert endpoint.connections == 1
    assert server.served[0].keepalives_heard > 0  # framewire's keepalives, for its timeout


async def test_a_silent_datalink_client_keeps_the_link_for_an_hour_and_more(
    autojump_clock: trio.testing.MockClock,
) -> None:
    streams = StreamRegistry()
    received = streams.get("in").subscribe(policy=Policy.LOSSLESS)
    network = DatalinkClients()
    endpoint = datalink_link(network, streams, listen=SERVER)
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.run)
        client = await network.connect(nursery)
        with trio.fail_after(5):
            await endpoint.wait_for_state("up")  # up on connecting
        for n, idle in enumerate(IDLE_PERIODS):
            await trio.sleep(idle)
            assert endpoint.status.state == "up"
            assert await client.write(b"to framewire %d" % n, 1000.0 + n)
            await streams.get("out").publish([frame(b"to datalink %d" % n, (2000 + n) * 10**9)])
            await client.wait_for(n + 1)
        arrived = await frames_of(received, len(IDLE_PERIODS))
        nursery.cancel_scope.cancel()
    assert [(f.payload, f.timestamp) for f in arrived] == [
        (b"to framewire %d" % n, (1000 + n) * 10**9) for n in range(len(IDLE_PERIODS))
    ]
    assert client.received == [
        (b"to datalink %d" % n, 2000.0 + n) for n in range(len(IDLE_PERIODS))
    ]
    assert not client.saw_eof
    assert not client.lost
    assert endpoint.connections == 1


async def test_a_broken_connection_to_a_wedged_server_does_not_pile_up_in_its_backlog(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The connection breaks under a server that has not noticed (it reads EOF as no data):
    framewire reconnects once, after a backoff delay, and waits in the server's backlog
    instead of retrying; when the server's next write fails, it accepts framewire's
    connection and what framewire queued arrives."""
    streams = StreamRegistry()
    received = streams.get("in").subscribe(policy=Policy.LOSSLESS)
    async with trio.open_nursery() as nursery:
        server = DatalinkServer(nursery)
        endpoint = datalink_link(server, streams, connect=SERVER)
        await nursery.start(endpoint.run)
        with trio.fail_after(5):
            await endpoint.wait_for_state("up")
        first = server.app
        assert first is not None
        # framewire's side of the connection breaks (a network fault): the server's
        # application is not told; framewire reconnects into the server's backlog.
        broken_at = trio.current_time()
        await trio.aclose_forcefully(first.stream)  # the server's end is gone
        await trio.sleep(HOUR)
        assert len(server.attempts) == 2  # one reconnect, not one per backoff delay
        first_delay = Backoff(BACKOFF, random.Random(7)).next_delay()
        assert server.attempts[1] - broken_at == pytest.approx(first_delay)
        assert len(server.backlog) == 1
        await streams.get("out").publish([frame(b"queued while wedged")])
        # The server's application writes: the write fails, it closes and accepts again.
        assert not await server.write(b"lost with the old connection", 5.0)
        assert server.app is not None
        assert server.app is not first
        assert await server.write(b"after the re-accept", 6.0)
        assert (await server.app.wait_for(1))[0] == (b"queued while wedged", 1_700_000_000.0)
        (arrived,) = await frames_of(received, 1)
        nursery.cancel_scope.cancel()
    assert arrived.payload == b"after the re-accept"


class WrongThenRight(Transports):
    """The first connections reach something that is not Datalink (it answers garbage at
    once); later ones reach a silent Datalink server."""

    def __init__(self, nursery: trio.Nursery, wrong: int) -> None:
        super().__init__()
        self.nursery = nursery
        self.wrong = wrong
        self.apps: list[DatalinkApp] = []

    async def listen(self, address: Address) -> Sequence[trio.abc.Listener[trio.abc.Stream]]:
        raise AssertionError("the link connects")

    def connector(self, address: Address) -> Connector:
        async def connect() -> trio.abc.Stream:
            ours, theirs = trio.testing.memory_stream_pair()
            if self.wrong:
                self.wrong -= 1
                await theirs.send_all(b"SSH-2.0-OpenSSH_9.6\r\n")
            else:
                app = DatalinkApp(theirs)
                self.apps.append(app)
                self.nursery.start_soon(app.read_loop)
            return ours

        return connect


async def test_a_series_of_failed_connections_is_logged_once_and_the_recovery_too(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A datalink link is up on connecting, so a peer that is not Datalink makes it go up
    and down at every attempt: the log says so once, then says "up" again when a peer
    proves to be one."""
    caplog.set_level(logging.INFO, logger="framewire")
    streams = StreamRegistry()
    received = streams.get("in").subscribe(policy=Policy.LOSSLESS)
    async with trio.open_nursery() as nursery:
        network = WrongThenRight(nursery, wrong=4)
        endpoint = datalink_link(network, streams, connect=SERVER)
        await nursery.start(endpoint.run)
        await trio.sleep(HOUR)  # four backoff delays, then an hour of a silent peer
        assert len(network.apps) == 1
        assert endpoint.status.state == "up"
        assert await network.apps[0].write(b"at last", 1.0)
        await frames_of(received, 1)
        nursery.cancel_scope.cancel()
    lines = messages(caplog)
    assert len([m for m in lines if m.startswith("link down")]) == 1
    assert len([m for m in lines if m.startswith("link up")]) == 2
    assert endpoint.connections == 5


# -- timestamps -------------------------------------------------------------------------


async def test_negative_timestamps_are_neither_forwarded_nor_written(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Datalink's Python write(bytes) sends -1.0: framewire reads "no timestamp" (0); a
    frame without a timestamp or from before 1970 reaches a Datalink peer as 0.0 (a
    negative one would be dropped). A datalink-to-datalink relay keeps it that way."""
    streams = StreamRegistry()
    received = streams.get("in").subscribe(policy=Policy.LOSSLESS)
    network = DatalinkClients()
    endpoint = datalink_link(network, streams, listen=SERVER)
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.run)
        client = await network.connect(nursery)
        await client.write(b"python default")  # timestamp -1.0
        await client.write(b"far past", -1e9)
        arrived = await frames_of(received, 2)
        assert [(f.payload, f.timestamp) for f in arrived] == [
            (b"python default", 0),
            (b"far past", 0),
        ]
        out = streams.get("out")
        await out.publish([frame(b"no timestamp", 0), frame(b"1969", -86_400 * 10**9)])
        await out.publish(arrived)  # relayed as they came off the wire
        got = await client.wait_for(4)
        nursery.cancel_scope.cancel()
    assert client.dropped_negative == 0
    assert got == [
        (b"no timestamp", 0.0),
        (b"1969", 0.0),
        (b"python default", 0.0),
        (b"far past", 0.0),
    ]


# -- stray connections in listen mode ------------------------------------------------------


async def test_strays_do_not_evict_a_datalink_peer_and_a_datalink_newcomer_does(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="framewire")
    streams = StreamRegistry()
    received = streams.get("in").subscribe(policy=Policy.LOSSLESS)
    network = DatalinkClients()
    endpoint = datalink_link(network, streams, listen=SERVER)
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.run)
        peer = await network.connect(nursery)
        with trio.fail_after(5):
            await endpoint.wait_for_state("up")
        await trio.sleep(HOUR)  # the peer has said nothing at all, and keeps the link
        silent = await network.connect(nursery)
        garbage = await network.connect(nursery)
        await garbage.stream.send_all(b"GET / HTTP/1.1\r\n\r\n")
        await trio.sleep(10)  # past the vetting window (timeout, 5 s)
        assert silent.saw_eof  # both closed
        assert garbage.saw_eof
        assert not peer.saw_eof
        assert await peer.write(b"still here", 1.0)
        await streams.get("out").publish([frame(b"for the peer")])
        assert (await peer.wait_for(1))[0][0] == b"for the peer"
        # A newcomer that speaks Datalink takes over (a restarted peer, say).
        newcomer = await network.connect(nursery)
        await trio.sleep(1)
        assert await newcomer.write(b"hello from the new one", 2.0)
        with trio.fail_after(5):
            await peer.eof.wait()  # the old peer is let go
        await streams.get("out").publish([frame(b"for the newcomer")])
        assert (await newcomer.wait_for(1))[0][0] == b"for the newcomer"
        arrived = await frames_of(received, 2)
        nursery.cancel_scope.cancel()
    assert [f.payload for f in arrived] == [b"still here", b"hello from the new one"]
    assert endpoint.connections == 2
    lines = messages(caplog)
    kept = [m for m in lines if "the link stays with its peer" in m]
    assert len(kept) == 2
    assert any("nothing valid within 5s" in m for m in kept)
    assert any("bad bytes" in m for m in kept)
    took = [m for m in lines if "takes over the link" in m]
    assert len(took) == 1
    assert "it sent a valid frame" in took[0]


async def test_a_silent_newcomer_takes_over_when_the_peer_leaves(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The documented rule's other half: a newcomer that has not spoken yet gets the link if
    the established peer's connection ends while it is vetted (a Datalink client that
    reconnected: it speaks only when its application writes)."""
    caplog.set_level(logging.INFO, logger="framewire")
    streams = StreamRegistry()
    received = streams.get("in").subscribe(policy=Policy.LOSSLESS)
    network = DatalinkClients()
    endpoint = datalink_link(network, streams, listen=SERVER)
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.run)
        old = await network.connect(nursery)
        with trio.fail_after(5):
            await endpoint.wait_for_state("up")
        new = await network.connect(nursery)
        await trio.sleep(1)
        await old.stream.aclose()  # the old connection ends within the vetting window
        await trio.sleep(HOUR)  # the new one stays, silent
        assert not new.saw_eof
        await streams.get("out").publish([frame(b"for the new one")])
        assert (await new.wait_for(1))[0][0] == b"for the new one"
        assert await new.write(b"from the new one", 3.0)
        (arrived,) = await frames_of(received, 1)
        nursery.cancel_scope.cancel()
    assert arrived.payload == b"from the new one"
    took = [m for m in messages(caplog) if "takes over the link" in m]
    assert len(took) == 1
    assert "ended" in took[0]


# -- configuration ----------------------------------------------------------------------


async def test_peer_keepalives_turns_the_dead_peer_timeout_on_for_datalink(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="framewire")
    streams = StreamRegistry()
    network = DatalinkClients()
    endpoint = datalink_link(network, streams, listen=SERVER, peer_keepalives=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.run)
        client = await network.connect(nursery)
        await client.stream.send_all(message(b"", 1.0))  # write_keep_alive(), once
        with trio.fail_after(5):
            await endpoint.wait_for_state("up")  # up once heard
        with trio.fail_after(60):
            await endpoint.wait_for_state("listening")
            await client.eof.wait()  # framewire hung up
        await trio.sleep(1)  # and logged why
        nursery.cancel_scope.cancel()
    assert any("heard nothing from the peer for 5s" in m for m in messages(caplog))


@pytest.mark.parametrize(
    ("table", "expects"),
    [
        ('protocol = "datalink"', False),
        ('protocol = "datalink"\npeer_keepalives = true', True),
        ('protocol = "datalink"\npeer_keepalives = false', False),
        ('protocol = "native"', True),
        ('protocol = "native"\npeer_keepalives = true', True),
    ],
)
def test_which_links_expect_keepalives(table: str, expects: bool) -> None:
    config = parse_config(
        f'[endpoints.l]\nkind = "link"\nconnect = "tcp://127.0.0.1:9"\npublish = "in"\n{table}\n'
    )
    link_config = config.endpoints["l"]
    assert isinstance(link_config, LinkConfig)
    assert link_config.expects_peer_keepalives is expects
    assert link_config.dead_host_timeout == 30.0


@pytest.mark.parametrize(
    ("table", "error"),
    [
        ("peer_keepalives = false", r"endpoints\.l\.peer_keepalives: .*datalink"),
        ('protocol = "datalink"\npeer_keepalives = "yes"', "true or false"),
        ('dead_host_timeout = "1s"', r"dead_host_timeout: must be at least 3s"),
        ('protocol = "datalink"\npeer_keepalives = true\nkeepalive = "5s"', "shorter than"),
    ],
)
def test_bad_liveness_settings(table: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_config(
            f'[endpoints.l]\nkind = "link"\nlisten = "tcp://127.0.0.1:0"\npublish = "x"\n{table}\n'
        )


def test_without_peer_keepalives_the_timeout_need_not_exceed_the_keepalive() -> None:
    """With a silent peer ``timeout`` only bounds the vetting of newcomers."""
    config = parse_config(
        '[endpoints.l]\nkind = "link"\nlisten = "tcp://127.0.0.1:0"\npublish = "x"\n'
        'protocol = "datalink"\nkeepalive = "5s"\ntimeout = "2s"\n'
    )
    assert isinstance(config.endpoints["l"], LinkConfig)


# -- real sockets, one per behaviour -----------------------------------------------------


class SocketDatalinkPeer:
    """A hand-written Datalink peer on a real socket: never sends keepalives."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def read_message(self) -> tuple[bytes, float]:
        """The next message with a payload (keepalives skipped)."""
        while True:
            while len(self.buffer) < 31 or len(self.buffer) < 31 + int.from_bytes(
                self.buffer[5:13], "little", signed=True
            ):
                data = await self.stream.receive_some(1 << 16)
                if not data:
                    raise EOFError("framewire closed the connection")
                self.buffer += data
            (size,) = struct.unpack_from("<q", self.buffer, 5)
            (timestamp,) = struct.unpack_from("<d", self.buffer, 13)
            payload = bytes(self.buffer[26 : 26 + size])
            del self.buffer[: 31 + size]
            if size:
                return payload, timestamp


async def closed(stream: trio.abc.Stream) -> None:
    """Return once the other end has closed ``stream`` (EOF or a reset)."""
    try:
        while await stream.receive_some(1 << 16):
            pass
    except trio.BrokenResourceError:
        pass


def real_link(streams: StreamRegistry, **options: object) -> LinkEndpoint:
    config = LinkConfig(
        protocol="datalink",
        keepalive=0.05,
        timeout=0.2,
        publish="in",
        subscribe="out",
        **options,  # type: ignore[arg-type]
    )
    return LinkEndpoint("link", config, EndpointContext(streams, Transports()))


async def test_real_sockets_silent_datalink_peers_in_both_roles(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Idle for several times ``timeout``, a silent peer keeps the link, and the link's
    sockets have TCP keepalive on (how a vanished host is found instead)."""
    configured: list[trio.abc.Stream] = []
    enable = enable_tcp_keepalive

    def spy(stream: trio.abc.Stream, dead_host_timeout: float) -> bool:
        configured.append(stream)
        return enable(stream, dead_host_timeout)

    monkeypatch.setattr(link_module, "enable_tcp_keepalive", spy)
    a_streams, b_streams = StreamRegistry(), StreamRegistry()
    at_a = a_streams.get("in").subscribe(policy=Policy.LOSSLESS)
    at_b = b_streams.get("in").subscribe(policy=Policy.LOSSLESS)
    with trio.socket.socket() as datalink_server:
        await datalink_server.bind(("127.0.0.1", 0))
        datalink_server.listen(DATALINK_BACKLOG)
        server_port = datalink_server.getsockname()[1]
        listening = real_link(a_streams, listen=Address("tcp", "127.0.0.1", 0))
        connecting = real_link(b_streams, connect=Address("tcp", "127.0.0.1", server_port))
        async with trio.open_nursery() as nursery:
            with trio.fail_after(10):
                await nursery.start(listening.run)
                await nursery.start(connecting.run)
                client = SocketDatalinkPeer(
                    await trio.open_tcp_stream("127.0.0.1", port_of(listening.status.address[0]))
                )
                accepted, _ = await datalink_server.accept()
                server = SocketDatalinkPeer(trio.SocketStream(accepted))
                await listening.wait_for_state("up")
                await connecting.wait_for_state("up")
            await trio.sleep(1.0)  # five timeouts of silence from both peers
            with trio.fail_after(10):
                assert listening.status.state == connecting.status.state == "up"
                await client.stream.send_all(message(b"client to framewire", 1.0))
                await server.stream.send_all(message(b"server to framewire", 2.0))
                await a_streams.get("out").publish([frame(b"framewire to client")])
                await b_streams.get("out").publish([frame(b"framewire to server")])
                assert (await client.read_message())[0] == b"framewire to client"
                assert (await server.read_message())[0] == b"framewire to server"
                assert (await frames_of(at_a, 1))[0].payload == b"client to framewire"
                assert (await frames_of(at_b, 1))[0].payload == b"server to framewire"
            assert listening.connections == connecting.connections == 1
            sockets = [tcp_socket_of(stream) for stream in configured]
            assert len(sockets) == 2
            for sock in sockets:
                assert sock is not None
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                idle = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)
                interval = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL)
                probes = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)
                assert (idle, interval, probes) == (15, 5, 3)  # 30 s in all
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 30_000
            await client.stream.aclose()
            await server.stream.aclose()
            nursery.cancel_scope.cancel()


async def test_real_sockets_strays_and_a_datalink_newcomer() -> None:
    streams = StreamRegistry()
    received = streams.get("in").subscribe(policy=Policy.LOSSLESS)
    endpoint = real_link(streams, listen=Address("tcp", "127.0.0.1", 0))
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            await nursery.start(endpoint.run)
            port = port_of(endpoint.status.address[0])
            peer = SocketDatalinkPeer(await trio.open_tcp_stream("127.0.0.1", port))
            await endpoint.wait_for_state("up")
            silent = await trio.open_tcp_stream("127.0.0.1", port)
            garbage = await trio.open_tcp_stream("127.0.0.1", port)
            await garbage.send_all(b"SSH-2.0-OpenSSH_9.6\r\n")
            # Both are closed (the silent one after `timeout`); the peer keeps the link.
            for stray in (garbage, silent):
                await closed(stray)
            await streams.get("out").publish([frame(b"for the peer")])
            assert (await peer.read_message())[0] == b"for the peer"
            newcomer = SocketDatalinkPeer(await trio.open_tcp_stream("127.0.0.1", port))
            await newcomer.stream.send_all(message(b"new peer", 4.0))
            with pytest.raises(EOFError):
                await peer.read_message()  # the old peer is let go
            await streams.get("out").publish([frame(b"for the newcomer")])
            assert (await newcomer.read_message())[0] == b"for the newcomer"
            assert (await frames_of(received, 1))[0].payload == b"new peer"
        for stream in (peer.stream, silent, garbage, newcomer.stream):
            await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_real_sockets_timestamps_below_zero() -> None:
    streams = StreamRegistry()
    received = streams.get("in").subscribe(policy=Policy.LOSSLESS)
    endpoint = real_link(streams, listen=Address("tcp", "127.0.0.1", 0))
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            await nursery.start(endpoint.run)
            port = port_of(endpoint.status.address[0])
            peer = SocketDatalinkPeer(await trio.open_tcp_stream("127.0.0.1", port))
            await peer.stream.send_all(message(b"python default", -1.0))
            (arrived,) = await frames_of(received, 1)
            assert arrived.timestamp == 0
            await streams.get("out").publish([frame(b"1969", -1), arrived])
            assert await peer.read_message() == (b"1969", 0.0)
            assert await peer.read_message() == (b"python default", 0.0)
        await peer.stream.aclose()
        nursery.cancel_scope.cancel()
