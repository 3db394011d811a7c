"""``frame_timeout``: a frame in progress has a deadline (receivers and links, MockClock).

A producer that starts a frame and then trickles it (one byte a second into 4 MiB) is never
idle, so nothing else ever drops it: it holds its slot for ever. frame_timeout closes such
a connection with one log line (peer, the frame's announced size, the bytes received, the
timeout) and counts it in ``detail.frames_timed_out``, while a slow producer whose every
frame arrives within the timeout, and a producer idle between frames, are left alone.
"""

from __future__ import annotations

import logging
import re
import socket
import tempfile
from collections.abc import Sequence

import pytest
import trio
import trio.testing

from framewire import Frame, FrameKind
from framewire.config import (
    Address,
    BackoffConfig,
    LinkConfig,
    ReceiverConfig,
    TLSConfig,
    parse_address,
)
from framewire.daemon.endpoints import EndpointContext, Transports
from framewire.daemon.endpoints.link import LinkEndpoint
from framewire.daemon.endpoints.receiver import ReceiverEndpoint
from framewire.daemon.stream import Policy, QueueBounds, StreamRegistry
from framewire.daemon.transport import Connector
from framewire.protocols import get as get_protocol
from framewire.protocols._framing import LARGE_FRAME
from framewire.protocols.native import KEEPALIVE

from .aedat4frames import body, ioheader, packet
from .g3frames import g3_frame
from .helpers import encode, port_of

UPSTREAM = Address("tcp", "192.0.2.1", 4536)  # never dialled: the connector is injected
BACKOFF = BackoffConfig(initial=0.5, maximum=16.0, factor=2.0, stable_after=10.0)
TIMEOUT = 60.0
#: The line a frame timeout writes, whatever else it is part of.
EXPIRED = re.compile(
    r"its frame of (\d+) bytes was not complete within frame_timeout \((\d+)s\): "
    r"(\d+) bytes of it received"
)


def data(i: int, size: int = 64) -> Frame:
    return Frame(FrameKind.DATA, "sample", bytes([i % 251]) * size, i)


#: A 4 MiB frame's bytes: a trickler sends its start, then a byte a second.
BIG = encode([data(7, 4 << 20)])


class MemoryUpstream(Transports):
    """A connector handing out memory streams (or, with ``tcp``, loopback TCP connections);
    the test gets the other end of each."""

    def __init__(self, *, tcp: bool = False) -> None:
        super().__init__()
        self.tcp = tcp
        self.attempts: list[float] = []
        self.accepted: trio.MemorySendChannel[trio.abc.Stream]
        self.accepted, self.connections = trio.open_memory_channel[trio.abc.Stream](10)

    async def listen(self, address: Address) -> Sequence[trio.abc.Listener[trio.abc.Stream]]:
        raise AssertionError("connect mode never listens")

    def connector(self, address: Address) -> Connector:
        async def connect() -> trio.abc.Stream:
            self.attempts.append(trio.current_time())
            ours: trio.abc.Stream
            theirs: trio.abc.Stream
            if self.tcp:
                ours, theirs = await tcp_pair()
            else:
                await trio.lowlevel.checkpoint()
                ours, theirs = trio.testing.memory_stream_pair()
            self.accepted.send_nowait(theirs)
            return ours

        return connect


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """Two ends of a loopback TCP connection (numeric address: no lookups)."""
    listener = trio.socket.socket()
    with listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        theirs = trio.socket.socket()
        await theirs.connect(listener.getsockname())
        ours, _ = await listener.accept()
    return trio.SocketStream(ours), trio.SocketStream(theirs)


async def open_producer(port: int) -> trio.SocketStream:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


async def trickle(stream: trio.abc.Stream, rest: bytes, interval: float = 1.0) -> int:
    """Send ``rest`` a byte every ``interval`` seconds until the peer is gone; return the
    bytes sent."""
    sent = 0
    try:
        for i in range(len(rest)):
            await stream.send_all(rest[i : i + 1])
            sent += 1
            await trio.sleep(interval)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    return sent


async def send_slowly(stream: trio.abc.Stream, wire: bytes, pieces: int, gap: float) -> None:
    """Send ``wire`` in ``pieces`` parts, ``gap`` seconds apart (none after the last)."""
    step = -(-len(wire) // pieces)
    for start in range(0, len(wire), step):
        if start:
            await trio.sleep(gap)
        await stream.send_all(wire[start : start + step])


def connect_receiver(
    upstream: MemoryUpstream, **options: object
) -> tuple[ReceiverEndpoint, StreamRegistry]:
    streams = StreamRegistry()
    options.setdefault("frame_timeout", TIMEOUT)
    config = ReceiverConfig(
        stream="s",
        connect=UPSTREAM,
        reconnect=BACKOFF,
        **options,  # type: ignore[arg-type]
    )
    return ReceiverEndpoint("upstream", config, EndpointContext(streams, upstream)), streams


def expiries(caplog: pytest.LogCaptureFixture) -> list[tuple[logging.LogRecord, re.Match[str]]]:
    found = []
    for record in caplog.records:
        match = EXPIRED.search(record.getMessage())
        if match is not None:
            found.append((record, match))
    return found


# -- the decoder says what the frame in progress announced ------------------------------------


def wires_of(protocol: str) -> list[bytes]:
    """A frame's bytes to start with, then a small and a large frame, in ``protocol``."""
    if protocol == "aedat4":
        small, large = b"x" * 100, b"y" * (3 * LARGE_FRAME)
        return [ioheader(), packet(0, body(payload=small)), packet(0, body(payload=large))]
    if protocol == "g3":
        return [g3_frame("Scan", {b"a": b"x" * n}) for n in (10, 100, 3 * LARGE_FRAME)]
    encoder = get_protocol(protocol).make_encoder()
    frames = [data(0), data(1, 100), data(2, 3 * LARGE_FRAME)]
    return [b"".join(bytes(b) for b in encoder.encode(frame)) for frame in frames]


@pytest.mark.parametrize("protocol", ["native", "datalink", "aedat4", "g3"])
def test_the_decoder_tells_the_size_of_the_frame_in_progress(protocol: str) -> None:
    decoder = get_protocol(protocol).make_decoder(1 << 24)
    first, small, large = wires_of(protocol)
    assert decoder.pending_frame_size == 0
    assert len(decoder.feed(first)) == 1
    assert decoder.pending_frame_size == 0
    for wire in (small, large):  # each in progress, then complete
        assert decoder.feed(wire[:60]) == []
        assert decoder.buffered == 60
        if protocol == "g3":  # sizes come key by key: at least what was walked so far
            assert 60 < decoder.pending_frame_size <= len(wire)
        else:
            assert decoder.pending_frame_size == len(wire)
        assert decoder.feed(wire[60:-1]) == []
        assert decoder.pending_frame_size == len(wire)
        assert len(decoder.feed(wire[-1:])) == 1
        assert decoder.pending_frame_size == 0
        assert decoder.buffered == 0


def test_raw_bytes_have_no_frame_in_progress() -> None:
    decoder = get_protocol("raw").make_decoder(1 << 20)
    decoder.feed(b"abc")
    assert decoder.pending_frame_size == 0


# -- a receiver in connect mode, over memory streams ----------------------------------------


async def test_a_trickling_producer_is_closed_after_frame_timeout(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="framewire")
    upstream = MemoryUpstream()
    endpoint, _ = connect_receiver(upstream)
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.run)
        with trio.fail_after(600):
            producer = await upstream.connections.receive()
            await producer.send_all(encode([data(1)]) + BIG[:100])
            began = trio.current_time()
            nursery.start_soon(trickle, producer, BIG[100:])
            again = await upstream.connections.receive()  # dropped, then reconnected
        assert began + TIMEOUT <= upstream.attempts[1] <= began + TIMEOUT + BACKOFF.initial
        assert endpoint.status.frames_in == 1
        assert endpoint.status.detail["frames_timed_out"] == 1
        nursery.cancel_scope.cancel()
    await again.aclose()
    [(record, match)] = expiries(caplog)
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert message.startswith(f"connection to {UPSTREAM} ended: closed: its frame of")
    size, timeout, received = (int(group) for group in match.groups())
    assert size == len(BIG)
    assert timeout == TIMEOUT
    assert 100 + TIMEOUT - 1 <= received <= 100 + TIMEOUT + 1
    assert match.group(0) in str(endpoint.status.last_error)


async def test_slow_frames_within_the_timeout_and_idle_gaps_are_left_alone(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Three 4 MiB frames each taking 50 s (150 s on one connection, over twice the
    timeout), then an hour of silence between frames: one connection throughout."""
    upstream = MemoryUpstream()
    endpoint, streams = connect_receiver(upstream)
    published = streams.get("s").subscribe()
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.run)
        with trio.fail_after(7200):
            producer = await upstream.connections.receive()
            for _ in range(3):
                await send_slowly(producer, BIG, pieces=11, gap=5.0)  # 50 s a frame
            await trio.sleep(3600)
            await producer.send_all(encode([data(2)]))
            got: list[Frame] = []
            while len(got) < 4:
                got += await published.receive_batch()
        assert [frame.timestamp for frame in got] == [7, 7, 7, 2]
        assert len(upstream.attempts) == 1
        assert "frames_timed_out" not in endpoint.status.detail
        nursery.cancel_scope.cancel()
    assert expiries(caplog) == []


async def test_time_spent_publishing_into_a_held_stream_is_not_the_producers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A read completes a frame and brings the start of the next; publishing the first
    waits 5 minutes for room in a lossless queue. The next frame's clock starts when
    reading resumes, so it is not timed out though its start arrived long before."""
    upstream = MemoryUpstream()
    endpoint, streams = connect_receiver(upstream)
    held = streams.get("s").subscribe(bounds=QueueBounds(max_frames=1), policy=Policy.LOSSLESS)
    first, second = encode([data(1, 1000)]), encode([data(2, 1000)])
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.run)
        with trio.fail_after(1200):
            producer = await upstream.connections.receive()
            await producer.send_all(encode([data(0)]))  # fills the lossless queue
            await trio.testing.wait_all_tasks_blocked()
            await producer.send_all(first[:10])  # a frame in progress: its clock starts
            await trio.sleep(TIMEOUT / 2)
            await producer.send_all(first[10:] + second[:10])  # publishing `first` waits
            await trio.sleep(300)
            got = await held.receive_batch()  # room: `first` goes in, reading resumes
            await trio.sleep(TIMEOUT / 2)
            await producer.send_all(second[10:])
            while len(got) < 3:
                got += await held.receive_batch()
        assert [frame.timestamp for frame in got] == [0, 1, 2]
        assert len(upstream.attempts) == 1
        assert "frames_timed_out" not in endpoint.status.detail
        nursery.cancel_scope.cancel()


async def test_frame_timeout_zero_turns_it_off(autojump_clock: trio.testing.MockClock) -> None:
    upstream = MemoryUpstream()
    streams = StreamRegistry()
    config = ReceiverConfig(stream="s", connect=UPSTREAM, reconnect=BACKOFF, frame_timeout=0.0)
    endpoint = ReceiverEndpoint("upstream", config, EndpointContext(streams, upstream))
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.run)
        with trio.fail_after(100_000):
            producer = await upstream.connections.receive()
            await producer.send_all(BIG[:100])
            await trio.sleep(86_400)
        assert len(upstream.attempts) == 1
        assert len(endpoint.status.clients) == 1
        nursery.cancel_scope.cancel()


# -- real loopback TCP: a frame the reader waits for whole in the socket ---------------------


@pytest.fixture
def patient_clock() -> trio.testing.MockClock:
    """An autojump clock that first lets 50 ms of real time pass with nothing to do: the
    kernel's ACKs of a trickle (real-time timers) come in before virtual time jumps on."""
    return trio.testing.MockClock(autojump_threshold=0.05)


async def test_a_large_frame_waited_for_whole_in_the_socket_is_timed_out(
    patient_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """After a large frame the reader waits for the next one whole in the kernel (SO_RCVLOWAT):
    no read returns and the decoder holds nothing while it trickles in. The idle timeout
    sees bytes arriving and never drops it; frame_timeout does, naming the size its header
    announced."""
    caplog.set_level(logging.INFO, logger="framewire")
    upstream = MemoryUpstream(tcp=True)
    endpoint, _ = connect_receiver(upstream, idle_timeout=40.0, frame_timeout=240.0)
    large = encode([data(3, 3 * LARGE_FRAME)])
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.run)
        with trio.fail_after(900):
            producer = await upstream.connections.receive()
            await producer.send_all(large)  # read whole: the next read waits for a frame whole
            await producer.send_all(large[:100])
            began = trio.current_time()
            nursery.start_soon(trickle, producer, large[100:], 30.0)
            again = await upstream.connections.receive()
        assert began + 240 <= upstream.attempts[1] <= began + 240 + BACKOFF.initial
        assert endpoint.status.frames_in == 1
        assert endpoint.status.detail["frames_timed_out"] == 1
        nursery.cancel_scope.cancel()
    await producer.aclose()
    await again.aclose()
    [(_, match)] = expiries(caplog)
    size, timeout, received = (int(group) for group in match.groups())
    assert (size, timeout) == (len(large), 240)
    assert 100 + 240 // 30 <= received <= 100 + 240 // 30 + 1


async def test_max_clients_slots_held_by_tricklers_are_freed(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Two proven producers trickle inside 4 MiB frames and hold both slots: a newcomer is
    refused. After frame_timeout both are closed and a new producer gets in."""
    caplog.set_level(logging.INFO, logger="framewire")
    streams = StreamRegistry()
    config = ReceiverConfig(
        stream="s",
        listen=Address("tcp", "127.0.0.1", 0),
        max_clients=2,
        frame_timeout=TIMEOUT,
    )
    endpoint = ReceiverEndpoint("in", config, EndpointContext(streams, Transports()))
    published = streams.get("s").subscribe()
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.run)
        port = port_of(endpoint.status.address[0])
        tricklers = []
        with trio.fail_after(600):
            for i in range(2):
                producer = await open_producer(port)
                await producer.send_all(encode([data(i)]) + BIG[:100])
                tricklers.append(producer)
            got: list[Frame] = []
            while len(got) < 2:
                got += await published.receive_batch()
            for producer in tricklers:
                nursery.start_soon(trickle, producer, BIG[100:])
            refused = await open_producer(port)
            assert await refused.receive_some(10) == b""  # every slot proven: refused
            assert endpoint.status.detail["clients_refused"] == 1
            while endpoint.status.clients:  # noqa: ASYNC110 - no event for the client table
                await trio.sleep(1)
            assert trio.current_time() <= TIMEOUT + 2
            newcomer = await open_producer(port)
            await newcomer.send_all(encode([data(9)]))
            got = await published.receive_batch()
        assert [frame.timestamp for frame in got] == [9]
        assert endpoint.status.detail["frames_timed_out"] == 2
        nursery.cancel_scope.cancel()
    for stream in [*tricklers, refused, newcomer]:
        await stream.aclose()
    lines = expiries(caplog)
    assert len(lines) == 2
    for record, match in lines:
        assert record.levelno == logging.WARNING
        assert re.match(r"producer 127\.0\.0\.1:\d+: closed: its frame of", record.getMessage())
        assert int(match.group(1)) == len(BIG)


@pytest.mark.parametrize("transport", ["unix", "tls"])
async def test_a_trickler_over_unix_or_tls_is_closed_after_frame_timeout(
    transport: str, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The decoder sees the frame in progress whatever carries the bytes: a UNIX socket
    (no whole reads) or TLS (each trickled byte a record of its own)."""
    caplog.set_level(logging.INFO, logger="framewire")
    with tempfile.TemporaryDirectory(prefix="fw-") as directory:
        tls: TLSConfig | None = None
        client_tls: TLSConfig | None = None
        if transport == "tls":
            trustme = pytest.importorskip("trustme")
            ca = trustme.CA()
            chain = f"{directory}/server.pem"
            ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(chain)
            ca.cert_pem.write_to_path(f"{directory}/ca.pem")
            tls = TLSConfig(certificate=chain, key=chain)
            client_tls = TLSConfig(ca=f"{directory}/ca.pem")
            listen = parse_address("tls://127.0.0.1:0", listening=True)
        else:
            listen = parse_address(f"unix://{directory}/in.sock", listening=True)
        streams = StreamRegistry()
        config = ReceiverConfig(stream="s", listen=listen, tls=tls, frame_timeout=TIMEOUT)
        transports = Transports()
        endpoint = ReceiverEndpoint("in", config, EndpointContext(streams, transports))
        published = streams.get("s").subscribe()
        async with trio.open_nursery() as nursery:
            await nursery.start(endpoint.run)
            bound = endpoint.status.address[0]  # "tls 127.0.0.1:PORT" or "unix:PATH"
            address = f"tls://127.0.0.1:{port_of(bound)}" if transport == "tls" else str(listen)
            with trio.fail_after(600):
                producer = await transports.dial(parse_address(address), tls=client_tls)()
                await producer.send_all(encode([data(1)]) + BIG[:100])
                assert [frame.timestamp for frame in await published.receive_batch()] == [1]
                began = trio.current_time()
                sent = await trickle(producer, BIG[100:])
            assert began + TIMEOUT <= trio.current_time() <= began + TIMEOUT + 2
            assert endpoint.status.detail["frames_timed_out"] == 1
            assert not endpoint.status.clients
            nursery.cancel_scope.cancel()
        await producer.aclose()
    [(record, match)] = expiries(caplog)
    assert record.getMessage().startswith("producer ")
    size, timeout, received = (int(group) for group in match.groups())
    assert (size, timeout) == (len(BIG), TIMEOUT)
    assert TIMEOUT <= sent <= TIMEOUT + 3  # the last one or two may go out after the close
    assert 100 + TIMEOUT - 1 <= received <= 100 + TIMEOUT + 1


# -- the link ---------------------------------------------------------------------------------


def link(upstream: MemoryUpstream, frame_timeout: float) -> tuple[LinkEndpoint, StreamRegistry]:
    streams = StreamRegistry()
    config = LinkConfig(
        connect=UPSTREAM,
        publish="p",
        reconnect=BACKOFF,
        keepalive=1.0,
        timeout=5.0,
        frame_timeout=frame_timeout,
    )
    return LinkEndpoint("l", config, EndpointContext(streams, upstream)), streams


async def test_a_link_peer_trickling_a_frame_is_dropped_after_frame_timeout(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A byte a second keeps the dead-peer timer (5 s) happy for ever; frame_timeout does
    not."""
    caplog.set_level(logging.INFO, logger="framewire")
    upstream = MemoryUpstream()
    endpoint, _ = link(upstream, 30.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.run)
        with trio.fail_after(600):
            peer = await upstream.connections.receive()
            await peer.send_all(KEEPALIVE + encode([data(1)]) + BIG[:100])
            await endpoint.wait_for_state("up")
            began = trio.current_time()
            nursery.start_soon(trickle, peer, BIG[100:])
            again = await upstream.connections.receive()
        assert began + 30 <= upstream.attempts[1] <= began + 30 + BACKOFF.initial
        assert endpoint.status.detail["frames_timed_out"] == 1
        nursery.cancel_scope.cancel()
    await again.aclose()
    [(record, match)] = expiries(caplog)
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith(f"link down: {UPSTREAM}: its frame of")
    assert int(match.group(1)) == len(BIG)
    assert int(match.group(2)) == 30


async def test_a_link_peer_sending_slowly_but_within_frame_timeout_stays_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    upstream = MemoryUpstream()
    endpoint, streams = link(upstream, 30.0)
    published = streams.get("p").subscribe()
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.run)
        with trio.fail_after(600):
            peer = await upstream.connections.receive()
            for _ in range(3):  # 25 s a frame, 75 s in all; then 2 minutes of keepalives
                await send_slowly(peer, BIG, pieces=26, gap=1.0)
            for _ in range(120):
                await peer.send_all(KEEPALIVE)
                await trio.sleep(1)
            await peer.send_all(encode([data(2)]))
            got: list[Frame] = []
            while len(got) < 4:
                got += await published.receive_batch()
        assert [frame.timestamp for frame in got] == [7, 7, 7, 2]
        assert len(upstream.attempts) == 1
        assert endpoint.status.state == "up"
        assert "frames_timed_out" not in endpoint.status.detail
        nursery.cancel_scope.cancel()
