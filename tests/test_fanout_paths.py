"""The fan-out fast paths: Connection.send's write-at-once path and its send timeout, the
hang-up watch that replaces a reading task per client, and a subscription's direct wake-up."""

from __future__ import annotations

import math
import socket

import pytest
import trio
import trio.testing

from framewire.daemon.stream import QueueBounds, Stream
from framewire.daemon.transport import Connection, HangupWatch
from framewire.frame import Frame, FrameKind

from .helpers import wait_until

pytestmark = pytest.mark.skipif(not hasattr(socket, "socketpair"), reason="needs socketpair")


def socket_pair() -> tuple[trio.SocketStream, socket.socket]:
    """A trio stream and the plain socket at its other end (a UNIX socket pair)."""
    ours, theirs = socket.socketpair()
    return trio.SocketStream(trio.socket.from_stdlib_socket(ours)), theirs


async def read_exactly(peer: socket.socket, nbytes: int) -> bytes:
    """Read ``nbytes`` from the plain socket ``peer`` without blocking trio."""
    peer.setblocking(False)
    chunks = bytearray()
    while len(chunks) < nbytes:
        await trio.lowlevel.wait_readable(peer)
        chunk = peer.recv(nbytes - len(chunks))
        if not chunk:
            break
        chunks += chunk
    return bytes(chunks)


@pytest.mark.parametrize(
    "buffers",
    [
        [b"one buffer"],
        [b"small ", b"ones ", b"joined"],
        [bytes([n]) * (200 * 1024) for n in range(40)],  # 8 MB: gathered, partly waited for
        [memoryview(bytes(range(256)) * 40000)],  # one buffer larger than the socket's
        [bytes([n]) * (64 * 1024) for n in range(3)],  # few large ones: gathered, not joined
    ],
)
async def test_send_delivers_every_byte_in_order_whether_or_not_it_waits(
    buffers: list[bytes | memoryview],
) -> None:
    stream, peer = socket_pair()
    expected = b"".join(bytes(buffer) for buffer in buffers)
    connection = Connection(stream, peer="pair")
    connection.yield_on_send = False
    got: list[bytes] = []
    with trio.fail_after(30), peer:
        async with trio.open_nursery() as nursery:

            async def reader() -> None:
                got.append(await read_exactly(peer, len(expected)))

            nursery.start_soon(reader)
            await connection.send(buffers)
    assert got == [expected]
    assert connection.bytes_sent == len(expected)
    await stream.aclose()


async def test_send_timeout_fires_when_the_peer_takes_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A peer that stops reading: the write waits send_timeout (virtual) seconds, then
    raises TooSlowError; a write the kernel takes at once never does."""
    stream, peer = socket_pair()
    connection = Connection(stream, peer="pair")
    connection.send_timeout = 5.0
    with peer:
        await connection.send([b"taken at once"])
        start = trio.current_time()
        with trio.fail_after(60), pytest.raises(trio.TooSlowError):
            await connection.send([bytes(64 << 20)])
        assert trio.current_time() - start == pytest.approx(5.0)
    await stream.aclose()


async def test_a_cancelled_send_writes_nothing() -> None:
    stream, peer = socket_pair()
    connection = Connection(stream, peer="pair")
    connection.yield_on_send = False
    with peer:
        with trio.CancelScope() as scope:
            scope.cancel()
            await connection.send([b"never"])
        assert scope.cancelled_caught
        peer.setblocking(False)
        with pytest.raises(BlockingIOError):
            peer.recv(16)
    await stream.aclose()


async def test_send_after_close_is_a_closed_resource() -> None:
    stream, peer = socket_pair()
    connection = Connection(stream, peer="pair")
    await stream.aclose()
    with peer, pytest.raises(trio.ClosedResourceError):
        await connection.send([b"x"])


async def test_send_to_a_peer_that_left_is_a_broken_resource() -> None:
    stream, peer = socket_pair()
    connection = Connection(stream, peer="pair")
    peer.close()
    with pytest.raises(trio.BrokenResourceError):
        await connection.send([b"x"])
    await stream.aclose()


async def test_hangup_watch_reports_eof_discards_input_and_refuses_when_told() -> None:
    watch = HangupWatch()
    pairs = [socket_pair() for _ in range(3)]
    gone: list[int] = []
    inputs: list[int] = []
    connections = [Connection(stream, peer=f"pair {n}") for n, (stream, _) in enumerate(pairs)]
    keys = [
        watch.add(connections[0], lambda: gone.append(0)),
        watch.add(connections[1], lambda: gone.append(1)),
        watch.add(connections[2], lambda: gone.append(2), on_input=inputs.append),
    ]
    if None in keys:
        pytest.skip("no epoll here: the server reads each client itself")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch.run)
        with trio.fail_after(10):
            pairs[0][1].close()  # hangs up
            pairs[1][1].sendall(b"chatter")  # may talk: discarded
            pairs[2][1].sendall(b"abc")  # may not
            await wait_until(lambda: len(gone) == 2)
            await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert sorted(gone) == [0, 2]
    assert inputs == [3]
    for key in keys:
        assert key is not None
        watch.remove(key)
        watch.remove(key)  # idempotent
    watch.close()
    for stream, peer in pairs:
        peer.close()
        await stream.aclose()


async def test_hangup_watch_refuses_streams_that_are_not_plain_sockets() -> None:
    watch = HangupWatch()
    left, _right = trio.testing.memory_stream_pair()
    assert watch.add(Connection(left, peer="memory"), lambda: None) is None
    watch.close()


async def test_a_cancelled_consumer_can_wait_again_and_only_one_may_wait() -> None:
    stream = Stream("s")
    subscription = stream.subscribe(bounds=QueueBounds(max_frames=4))
    with trio.move_on_after(1) as scope:
        await subscription.receive_batch()
    assert scope.cancelled_caught
    frame = Frame(FrameKind.DATA, "d", b"x")
    got: list[list[Frame]] = []
    async with trio.open_nursery() as nursery:

        async def consume() -> None:
            got.append(await subscription.receive_batch())

        nursery.start_soon(consume)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await subscription.receive_batch()
        await stream.publish([frame])
    assert got == [[frame]]
    assert math.isinf(Connection(trio.testing.memory_stream_pair()[0], "m").send_timeout)
