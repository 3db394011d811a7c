"""Direct writes: a publish written straight to idle clients' sockets, without waking their
writer tasks (stream.Subscription.direct, Connection.write_nowait, the server's feed)."""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections.abc import Sequence

import pytest
import trio
import trio.testing

from framewire import Frame, FrameKind
from framewire.daemon import Daemon
from framewire.daemon.endpoints.server import DIRECT_MAX_BYTES
from framewire.daemon.stream import DirectWrite, QueueBounds, Stream, Subscription
from framewire.daemon.transport import Connection
from framewire.protocols.native import NativeBlock

from .helpers import NativePeer, connect, encode, parked, running_daemon, server_clients, wait_until

pytestmark = pytest.mark.skipif(not hasattr(socket, "socketpair"), reason="needs socketpair")


def data(number: int, size: int = 64) -> Frame:
    return Frame(FrameKind.DATA, "sample", number.to_bytes(4, "big") * (size // 4), timestamp=1)


def meta(body: bytes) -> Frame:
    return Frame(FrameKind.METADATA, "config", body, timestamp=1)


class Writer:
    """A direct writer for stream-level tests: records what it was handed, answers ``answer``."""

    def __init__(self, answer: DirectWrite) -> None:
        self.answer = answer
        self.calls: list[list[Frame]] = []

    def __call__(self, frames: Sequence[Frame]) -> DirectWrite:
        self.calls.append(list(frames))
        return self.answer


# -- the stream-level hook (no sockets) ------------------------------------------------------


async def test_frames_written_directly_count_as_delivered_and_leave_the_consumer_parked() -> None:
    stream = Stream("s")
    subscription = stream.subscribe()
    writer = subscription.direct = Writer(DirectWrite.WRITTEN)
    frames = [meta(b"m"), data(1), data(2)]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            batches = await parked(subscription, nursery)
            stream.publish_nowait(frames)
            await trio.testing.wait_all_tasks_blocked()
            assert writer.calls == [frames]
            assert batches == []  # never woken
            assert subscription.queued_frames == subscription.queued_bytes == 0
            assert subscription.frames_out == 3
            assert subscription.bytes_out == sum(frame.size for frame in frames)
            # Refused: queued as usual and the consumer gets them.
            writer.answer = DirectWrite.REFUSED
            stream.publish_nowait([data(3)])
            await trio.testing.wait_all_tasks_blocked()
            assert batches == [[data(3)]]
            assert subscription.frames_out == 4
            nursery.cancel_scope.cancel()


async def test_the_writer_is_not_asked_while_frames_are_queued_or_nobody_waits() -> None:
    stream = Stream("s")
    subscription = stream.subscribe()
    writer = subscription.direct = Writer(DirectWrite.WRITTEN)
    stream.publish_nowait([data(1)])  # no consumer waiting yet: queued
    assert writer.calls == []
    assert subscription.queued_frames == 1
    stream.publish_nowait([data(2)])  # the queue is not empty: queued behind it, in order
    assert writer.calls == []
    with trio.fail_after(10):
        assert await subscription.receive_batch() == [data(1), data(2)]


@pytest.mark.parametrize("case", ["decimate", "session", "block"])
async def test_the_writer_is_not_asked_for_frames_the_queue_must_judge(case: str) -> None:
    """Decimation counts per subscription, a session header must be compared, a block too
    large to take whole must be split: those frames go through the queue."""
    stream = Stream("s")
    frames: list[Frame]
    if case == "decimate":
        subscription = stream.subscribe(decimate={"sample": 2})
        frames = [data(1), data(2)]
    elif case == "session":
        subscription = stream.subscribe(session_types=frozenset({"config"}))
        frames = [meta(b"header")]
    else:
        subscription = stream.subscribe(bounds=QueueBounds(max_frames=16), blocks_of="native")
        # Four frames, more than an eighth of its 16: split, not taken whole.
        frames = [NativeBlock("sample", encode([data(n) for n in range(4)]), 4)]
    writer = subscription.direct = Writer(DirectWrite.WRITTEN)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            batches = await parked(subscription, nursery)
            stream.publish_nowait(frames)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert writer.calls == []
    assert batches  # the consumer was woken with the frames the queue kept


async def test_a_block_goes_direct_whole_or_split_and_counts_its_frames() -> None:
    """The stream works out a publish's count and size once: a subscriber that takes the
    block whole and one that gets it split are both handed it directly and count 4 frames."""
    stream = Stream("s")
    whole = stream.subscribe(blocks_of="native")
    split = stream.subscribe()
    block = NativeBlock("sample", encode([data(n) for n in range(4)]), 4)
    whole_writer = whole.direct = Writer(DirectWrite.WRITTEN)
    split_writer = split.direct = Writer(DirectWrite.WRITTEN)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            batches = await parked(whole, nursery)
            batches += await parked(split, nursery)
            stream.publish_nowait([block])
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert batches == []
    assert whole_writer.calls == [[block]]
    assert split_writer.calls == [list(block.frames())]
    for subscription in (whole, split):
        assert subscription.frames_out == 4
        assert subscription.bytes_out == block.size
    assert stream.frames_in == 4


async def test_a_started_write_wakes_the_consumer_with_an_empty_batch_then_frames_queue() -> None:
    stream = Stream("s")
    subscription = stream.subscribe()
    writer = subscription.direct = Writer(DirectWrite.STARTED)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            batches = await parked(subscription, nursery)
            stream.publish_nowait([data(1)])
            await trio.testing.wait_all_tasks_blocked()
            assert batches == [[]]  # woken only to finish the write
            # Frames published before the woken consumer runs queue behind the unfinished
            # write; its batch holds them (its connection writes the rest of the write first).
            stream.publish_nowait([data(2)])
            stream.publish_nowait([data(3)])
            assert subscription.queued_frames == 1
            await trio.testing.wait_all_tasks_blocked()
            assert batches == [[], [data(3)]]  # one wake-up: the write, then data(3)
            writer.answer = DirectWrite.REFUSED
            stream.publish_nowait([data(4)])
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert batches == [[], [data(3)], [data(4)]]
    assert writer.calls == [[data(1)], [data(2)], [data(4)]]
    assert subscription.frames_out == 4


async def test_a_writer_that_closes_the_subscription_gets_nothing_queued() -> None:
    stream = Stream("s")
    subscription = stream.subscribe()
    other = stream.subscribe()

    def broken(frames: Sequence[Frame]) -> DirectWrite:
        subscription.close("connection lost (send failed: reset)")
        return DirectWrite.REFUSED

    subscription.direct = broken
    closed: list[str] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def consume() -> None:
                try:
                    await subscription.receive_batch()
                except Exception as exc:  # SubscriptionClosed
                    closed.append(str(exc))

            nursery.start_soon(consume)
            await trio.testing.wait_all_tasks_blocked()
            stream.publish_nowait([data(1)])
    assert closed == ["connection lost (send failed: reset)"]
    assert subscription.queued_frames == 0
    assert subscription.frames_out == 0
    assert stream.subscriptions == [other]
    assert other.queued_frames == 1  # the publisher carried on


# -- Connection.write_nowait ----------------------------------------------------------------


def socket_pair() -> tuple[Connection, socket.socket]:
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
    return Connection(stream, peer="pair"), theirs


def unsent(connection: Connection) -> bool:
    return connection.has_unsent


def read_all(peer: socket.socket, nbytes: int) -> bytes:
    peer.settimeout(10)
    out = bytearray()
    while len(out) < nbytes:
        chunk = peer.recv(nbytes - len(out))
        assert chunk, "closed early"
        out += chunk
    return bytes(out)


async def test_write_nowait_keeps_what_the_socket_did_not_take_and_send_writes_it_first() -> None:
    connection, peer = socket_pair()
    first = bytes(range(256)) * 4096  # 1 MiB: far more than the socket takes at once
    with peer, trio.fail_after(10):
        written = connection.write_nowait(first)
        assert 0 < written < len(first)
        assert unsent(connection)
        assert connection.bytes_sent == len(first)  # counted whole: the rest is its to write
        # Busy with the rest: a second direct write is refused, nothing is kept.
        assert connection.write_nowait(b"never") == 0
        got: list[bytes] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: trio.to_thread.run_sync(
                    lambda: got.append(read_all(peer, len(first) + len(b"after")))
                )
            )
            await connection.send([b"after"])
        assert got == [first + b"after"]
        assert not unsent(connection)
        assert connection.bytes_sent == len(first) + len(b"after")
        # Idle again: a small write goes whole.
        assert connection.write_nowait(b"whole") == 5
        assert read_all(peer, 5) == b"whole"
    await connection.aclose()


async def test_write_nowait_to_a_full_socket_writes_and_keeps_nothing() -> None:
    connection, peer = socket_pair()
    fd = connection.socket_fd
    assert fd is not None
    with peer:
        try:  # fill it (non-blocking): the peer reads nothing
            while True:
                os.write(fd, bytes(4096))
        except BlockingIOError:
            pass
        assert connection.write_nowait(b"x" * 100) == 0
        assert not connection.has_unsent
        assert connection.bytes_sent == 0
    await connection.aclose()


async def test_write_nowait_to_a_peer_that_reset_raises_broken_resource() -> None:
    connection, peer = socket_pair()
    peer.close()
    with pytest.raises(trio.BrokenResourceError):
        connection.write_nowait(b"x")
    await connection.aclose()
    assert connection.write_nowait(b"x") == 0  # closed: not written, not raised


# -- through a daemon: receiver -> stream -> lossy server -> real TCP clients ----------------

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
max_queue_frames = 100000
max_queue_bytes = "256MiB"
max_clients = 8
"""


class Recording:
    """Wraps a client's direct writer and records what it answered."""

    def __init__(self, subscription: Subscription) -> None:
        inner = subscription.direct
        assert inner is not None, "the server gave its client no direct writer"
        self.inner = inner
        self.answers: list[DirectWrite] = []
        subscription.direct = self

    def __call__(self, frames: Sequence[Frame]) -> DirectWrite:
        answer = self.inner(frames)
        self.answers.append(answer)
        return answer


async def clients_of(daemon: Daemon, count: int) -> list[tuple[NativePeer, Recording]]:
    """``count`` native clients of ``out``, each with its direct writer recorded."""
    out = daemon.endpoints["out"]
    peers = await server_clients(daemon, count)
    recordings = {}
    for client in out.status.clients.values():
        assert client.subscription is not None
        recordings[client.peer] = Recording(client.subscription)
    result = []
    for peer in peers:
        assert isinstance(peer.stream, trio.SocketStream)
        host, port_ = peer.stream.socket.getsockname()[:2]
        result.append((peer, recordings[f"{host}:{port_}"]))
    return result


async def idle(daemon: Daemon) -> None:
    """Until every client's writer waits on its subscription again (and everything else
    waits too)."""
    await trio.testing.wait_all_tasks_blocked()


async def test_frames_go_direct_to_idle_clients_intact_in_order_and_counted() -> None:
    frames = [meta(b"first"), data(1), data(2), meta(b"second"), data(3)]
    async with running_daemon(CONFIG) as daemon:
        clients = await clients_of(daemon, 3)
        stream = daemon.streams.get("camera")
        with trio.fail_after(10):
            for frame in frames:
                await idle(daemon)
                await stream.publish([frame])  # what the receiver does with each read
            for peer, recording in clients:
                assert await peer.read(len(frames)) == frames
                assert bytes(peer.raw) == encode(frames)
                assert recording.answers == [DirectWrite.WRITTEN] * len(frames)
        out = daemon.endpoints["out"].status
        assert out.frames_out == 3 * len(frames)
        assert out.bytes_out == 3 * len(encode(frames))
        for client in out.clients.values():
            assert client.frames_sent == len(frames)
            assert client.bytes_sent == len(encode(frames))
            assert client.subscription is not None
            assert client.subscription.frames_out == len(frames)
        for peer, _ in clients:
            await peer.stream.aclose()


async def test_a_client_whose_socket_fills_gets_the_rest_then_the_queue_in_order() -> None:
    """A client that does not read until its socket is full: a direct write is left half
    done (the writer finishes it), later frames queue behind it, metadata among them; once
    it reads, every frame arrives whole and in order, as at the client that kept reading."""
    async with running_daemon(CONFIG) as daemon:
        (slow, slow_writes), (quick, _) = await clients_of(daemon, 2)
        stream = daemon.streams.get("camera")
        sent: list[Frame] = []
        size = 5001 * 4  # odd-sized frames: a full socket takes part of one
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(quick.read, 1 << 30)  # keeps reading (until cancelled)
                number = 0
                while DirectWrite.STARTED not in slow_writes.answers:
                    number += 1
                    frame = data(number, size) if number % 50 else meta(b"m%d" % number)
                    sent.append(frame)
                    await stream.publish([frame])
                    await trio.lowlevel.checkpoint()
                # A few more behind the unfinished write, metadata among them.
                for extra in (data(100_001, size), meta(b"late"), data(100_002, size)):
                    sent.append(extra)
                    await stream.publish([extra])
                assert await slow.read(len(sent)) == sent
                await wait_until(lambda: len(quick.frames) >= len(sent))
                nursery.cancel_scope.cancel()
        assert quick.frames[: len(sent)] == sent
        assert bytes(slow.raw) == encode(sent)
        assert DirectWrite.WRITTEN in slow_writes.answers
        out = daemon.endpoints["out"].status
        await wait_until(lambda: out.bytes_out == 2 * len(encode(sent)))
        assert out.frames_out == 2 * len(sent)
        assert out.dropped_total == 0
        for peer in (slow, quick):
            await peer.stream.aclose()


async def test_a_client_that_resets_is_closed_alone_with_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="framewire")
    async with running_daemon(CONFIG) as daemon:
        clients = await clients_of(daemon, 3)
        (gone, _), *others = clients
        stream = daemon.streams.get("camera")
        assert isinstance(gone.stream, trio.SocketStream)
        host, port = gone.stream.socket.getsockname()[:2]
        with trio.fail_after(10):
            await idle(daemon)
            # Reset: the RST reaches the daemon's socket inside close(), before any task
            # (the hang-up watch included) runs again.
            gone.stream.socket.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            gone.stream.socket.close()
            stream.publish_nowait([data(1)])  # never raises into the publisher
            stream.publish_nowait([data(2)])
            for peer, _ in others:
                assert await peer.read(2) == [data(1), data(2)]
            out = daemon.endpoints["out"].status
            await wait_until(lambda: len(out.clients) == 2)
        lines = [r.getMessage() for r in caplog.records if f"{host}:{port}" in r.getMessage()]
        assert len([line for line in lines if "disconnected" in line]) == 1, lines
        assert "disconnected: connection lost (send failed:" in lines[-1], lines
        assert out.frames_out == 4
        for peer, _ in others:
            await peer.stream.aclose()


async def test_large_publishes_go_through_the_writer_task() -> None:
    async with running_daemon(CONFIG) as daemon:
        [(peer, recording)] = await clients_of(daemon, 1)
        stream = daemon.streams.get("camera")
        big = data(7, DIRECT_MAX_BYTES)  # its encoding is larger than DIRECT_MAX_BYTES
        with trio.fail_after(10):
            await idle(daemon)
            await stream.publish([big])
            assert await peer.read(1) == [big]
        assert recording.answers == [DirectWrite.REFUSED]
        assert daemon.endpoints["out"].status.frames_out == 1
        await peer.stream.aclose()


@pytest.mark.parametrize(
    "setting", ['policy = "lossless"', "decimate = { sample = 2 }"], ids=["lossless", "decimate"]
)
async def test_lossless_and_decimating_servers_keep_the_writer_task_path(setting: str) -> None:
    config = CONFIG.replace("max_clients = 8", f"max_clients = 8\n{setting}")
    async with running_daemon(config) as daemon:
        out = daemon.endpoints["out"]
        port = int(out.status.address[0].rsplit(":", 1)[1])
        peer = await connect(port)
        await wait_until(lambda: len(out.status.clients) == 1)
        (client,) = out.status.clients.values()
        assert client.subscription is not None
        assert client.subscription.direct is None
        with trio.fail_after(10):
            await daemon.streams.get("camera").publish([data(1), data(2)])
            assert await peer.read(1) == [data(2) if "decimate" in setting else data(1)]
        await peer.stream.aclose()
