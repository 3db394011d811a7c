"""The sender endpoint: lossless and bounded, reconnecting, metadata replayed (MockClock)."""

from __future__ import annotations

import errno
import logging
import random
from collections.abc import Sequence

import pytest
import trio
import trio.testing

from framewire import Frame, FrameKind
from framewire.config import Address, BackoffConfig, SenderConfig, format_size
from framewire.daemon.endpoints import EndpointContext, Transports
from framewire.daemon.endpoints.sender import SenderEndpoint
from framewire.daemon.stream import StreamRegistry
from framewire.daemon.transport import Connector
from framewire.frame import FrameBlock
from framewire.protocols.native import NativeDecoder

from .helpers import NativePeer, encode, wait_until

READER = Address("tcp", "192.0.2.7", 4536)  # never dialled: the connector is injected
BACKOFF = BackoffConfig(initial=1.0, maximum=4.0, factor=2.0, stable_after=60.0)


class Readers(Transports):
    """Refuses while ``down``; otherwise hands out memory streams to the test."""

    def __init__(self) -> None:
        super().__init__()
        self.down = True
        self.attempts = 0
        self.accepted, self.connections = trio.open_memory_channel[trio.abc.Stream](10)

    async def listen(self, address: Address) -> Sequence[trio.abc.Listener[trio.abc.Stream]]:
        raise AssertionError("a sender never listens")

    def connector(self, address: Address) -> Connector:
        async def connect() -> trio.abc.Stream:
            self.attempts += 1
            await trio.lowlevel.checkpoint()
            if self.down:
                raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
            ours, theirs = trio.testing.memory_stream_pair()
            self.accepted.send_nowait(theirs)
            return ours

        return connect


def meta(type_: str, body: bytes) -> Frame:
    return Frame(FrameKind.METADATA, type_, body)


def data(i: int) -> Frame:
    return Frame(FrameKind.DATA, "d", i.to_bytes(4, "big") * 16, timestamp=i)


def sender(readers: Readers, **options: object) -> tuple[SenderEndpoint, StreamRegistry]:
    streams = StreamRegistry()
    config = SenderConfig(
        connect=READER,
        stream="s",
        reconnect=BACKOFF,
        **{"max_queue_frames": 8, **options},  # type: ignore[arg-type]
    )
    endpoint = SenderEndpoint(
        "out", config, EndpointContext(streams, readers), rng=random.Random(1)
    )
    return endpoint, streams


async def test_lossless_while_the_reader_is_away_and_bounded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    readers = Readers()
    endpoint, streams = sender(readers)
    stream = streams.get("s")
    published = 0

    async def publish() -> None:
        nonlocal published
        await stream.publish([meta("config", b"v1")])
        for i in range(20):
            await stream.publish([data(i)])
            published += 1

    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.run)
        nursery.start_soon(publish)
        await trio.sleep(30)
        # No reader: the queue is full at its bound and the publisher waits.
        assert published < 20
        (subscription,) = stream.subscriptions
        assert subscription.queued_frames <= 8
        assert readers.attempts > 3
        readers.down = False
        with trio.fail_after(60):
            peer = NativePeer(await readers.connections.receive())
            frames = await peer.read(21)
        assert frames == [meta("config", b"v1")] + [data(i) for i in range(20)]
        assert endpoint.status.state == "connected"
        nursery.cancel_scope.cancel()


async def test_reconnect_replays_the_metadata_current_for_the_next_frame(
    autojump_clock: trio.testing.MockClock,
) -> None:
    readers = Readers()
    readers.down = False
    endpoint, streams = sender(readers)
    stream = streams.get("s")
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.run)
        await stream.publish([meta("config", b"v1"), meta("cal", b"c1"), data(1)])
        with trio.fail_after(60):
            first = NativePeer(await readers.connections.receive())
            assert await first.read(3) == [meta("config", b"v1"), meta("cal", b"c1"), data(1)]
        await stream.publish([meta("cal", b"c2"), data(2)])
        with trio.fail_after(60):
            assert await first.read(5)
        # The reader goes away; meanwhile the stream moves on.
        await first.stream.aclose()
        await wait_until(lambda: endpoint.status.state == "reconnecting")
        await stream.publish([meta("cal", b"c3"), data(3)])
        with trio.fail_after(60):
            second = NativePeer(await readers.connections.receive())
            frames = await second.read(4)
        # Metadata as delivered so far (c2, not the newer c3 still queued), then the queue.
        assert frames == [meta("config", b"v1"), meta("cal", b"c2"), meta("cal", b"c3"), data(3)]
        nursery.cancel_scope.cancel()


async def test_close_on_end_closes_at_a_boundary_and_starts_afresh(
    autojump_clock: trio.testing.MockClock,
) -> None:
    readers = Readers()
    readers.down = False
    endpoint, streams = sender(readers, close_on_end=True)
    stream = streams.get("s")
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.run)
        await stream.publish([meta("config", b"v1"), data(1), data(2)])
        stream.end_of_stream("the run ended")
        with trio.fail_after(60):
            first = NativePeer(await readers.connections.receive())
            assert await first.read_to_end() == [meta("config", b"v1"), data(1), data(2)]
            await stream.publish([data(3)])
            second = NativePeer(await readers.connections.receive())
            assert await second.read(2) == [meta("config", b"v1"), data(3)]
        nursery.cancel_scope.cancel()


async def test_blocks_of_native_frames_are_sent_whole_and_counted_as_their_frames(
    autojump_clock: trio.testing.MockClock,
) -> None:
    readers = Readers()
    readers.down = False
    endpoint, streams = sender(readers, max_queue_frames=4096)
    stream = streams.get("s")
    frames = [data(i) for i in range(200)]
    frames[100:100] = [meta("config", b"v1")]
    decoder = NativeDecoder(max_frame_size=1 << 20)
    decoder.blocks = True
    cut = decoder.feed(encode(frames))
    assert any(isinstance(frame, FrameBlock) for frame in cut)
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.run)
        (subscription,) = stream.subscriptions
        assert subscription.blocks_of == "native"
        await stream.publish(cut)
        with trio.fail_after(60):
            peer = NativePeer(await readers.connections.receive())
            assert await peer.read(len(frames)) == frames
        # The blocks went out as the bytes that came in, and count as their frames.
        assert bytes(peer.raw) == encode(frames)
        await wait_until(lambda: endpoint.status.frames_out == len(frames))
        assert endpoint.status.bytes_out == len(peer.raw)
        nursery.cancel_scope.cancel()


class StalledReaders(Readers):
    """Hands out streams whose reader never reads: a write waits until it times out."""

    def connector(self, address: Address) -> Connector:
        async def connect() -> trio.abc.Stream:
            self.attempts += 1
            await trio.lowlevel.checkpoint()
            ours, theirs = trio.testing.lockstep_stream_pair()
            self.accepted.send_nowait(theirs)
            return ours

        return connect


async def test_a_write_the_reader_never_takes_ends_the_connection_after_send_timeout(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    readers = StalledReaders()
    endpoint, streams = sender(readers, send_timeout=5.0)
    caplog.set_level(logging.WARNING)
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.run)
        await streams.get("s").publish([data(1)])
        with trio.fail_after(60):
            await readers.connections.receive()
            await wait_until(lambda: readers.attempts >= 2)
        assert "a write stalled for more than 5s" in caplog.text
        nursery.cancel_scope.cancel()


async def test_a_stopped_sender_says_what_it_held_and_lost(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A memory buffer cannot outlive its endpoint: what a sender held when it stopped (its
    reader away) is lost, and it says so once, with the count, in the log and in
    ``frames_dropped``."""
    readers = Readers()
    endpoint, streams = sender(readers)
    stream = streams.get("s")
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.run)
        held = [meta("config", b"v1"), *(data(i) for i in range(5))]
        await stream.publish(held)
        await trio.sleep(10)
        assert readers.attempts > 1
        caplog.clear()
        endpoint.request_stop()
    lost = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    size = format_size(sum(frame.size for frame in held))
    assert lost == [
        f"6 frames ({size}) it still held are lost: the sender stopped "
        '(a [buffer] of type = "disk" keeps them for the next start)'
    ]
    assert endpoint.status.frames_dropped == 5  # DATA frames; the metadata is not counted
    assert endpoint.status.frames_out == 0
