"""Connection.receive_into reads what a socket already holds without a trip through trio's
scheduler, yet a peer that floods its connection cannot starve the daemon's other tasks:
the reader yields at least every RECEIVE_YIELD_READS reads or RECEIVE_YIELD_BYTES bytes.
When a read or write has to wait it waits for readiness itself (not through trio's socket
methods), and a close or a peer that leaves still ends it as before."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from framewire.daemon import transport
from framewire.daemon.transport import RECEIVE_YIELD_READS, Connection

#: Bytes the flooding peer has put in the socket before the reader starts.
FLOOD = 64 * 1024


@pytest.fixture
def flooded() -> Iterator[tuple[Connection, socket.socket]]:
    """A connection whose peer has already written FLOOD bytes (a UNIX socket pair: the
    kernel holds them all), and the peer's end."""
    ours, theirs = socket.socketpair()
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * FLOOD)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * FLOOD)
    theirs.sendall(bytes(range(256)) * (FLOOD // 256))
    connection = Connection(trio.SocketStream(trio.socket.from_stdlib_socket(ours)), "flooder")
    try:
        yield connection, theirs
    finally:
        ours.close()
        theirs.close()


async def _read_counting_others(connection: Connection, reads: int, size: int) -> tuple[int, int]:
    """Read ``reads`` times ``size`` bytes while another task counts its turns; return the
    other task's turns and the bytes read."""
    turns = 0
    received = 0

    async def other_connection_task() -> None:
        nonlocal turns
        while True:
            await trio.lowlevel.checkpoint()
            turns += 1

    buffer = memoryview(bytearray(size))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(other_connection_task)
            await trio.lowlevel.checkpoint()  # let it start
            turns = 0
            for _ in range(reads):
                n = await connection.receive_into(buffer)
                assert n > 0
                received += n
            nursery.cancel_scope.cancel()
    return turns, received


async def test_a_flooding_peer_does_not_starve_other_tasks(
    flooded: tuple[Connection, socket.socket],
) -> None:
    connection, _ = flooded
    reads = 20 * RECEIVE_YIELD_READS
    turns, received = await _read_counting_others(connection, reads, 16)
    assert received == reads * 16
    # The other task ran about once per yield of the reader, which yields at least every
    # RECEIVE_YIELD_READS reads (half of that, to leave trio's batches some slack)...
    assert turns >= reads // (2 * RECEIVE_YIELD_READS)
    # ... and not after every read: data already there is read without a scheduler trip.
    assert turns <= reads // 2


async def test_the_reader_yields_after_its_byte_budget(
    flooded: tuple[Connection, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    connection, _ = flooded
    monkeypatch.setattr(transport, "RECEIVE_YIELD_BYTES", 4096)
    connection._read_credit_bytes = 4096
    reads = 48  # 1 KiB each: a yield every 4 reads, well before the read budget
    turns, received = await _read_counting_others(connection, reads, 1024)
    assert received == reads * 1024
    assert turns >= reads // 8


async def test_a_cancelled_reader_reads_nothing_even_when_data_is_there(
    flooded: tuple[Connection, socket.socket],
) -> None:
    connection, _ = flooded
    with trio.CancelScope() as scope:
        scope.cancel()
        await connection.receive_into(memoryview(bytearray(1024)))
    assert scope.cancelled_caught
    assert connection.bytes_received == 0


async def test_the_fast_path_still_sees_the_end_and_waits_for_data() -> None:
    ours, theirs = socket.socketpair()
    connection = Connection(trio.SocketStream(trio.socket.from_stdlib_socket(ours)), "peer")
    buffer = memoryview(bytearray(8))
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:

                async def write_later() -> None:
                    await trio.sleep(0.01)  # the reader waits for these in trio, not in a spin
                    theirs.sendall(b"abc")
                    theirs.shutdown(socket.SHUT_WR)

                nursery.start_soon(write_later)
                assert await connection.receive_into(buffer) == 3
                assert bytes(buffer[:3]) == b"abc"
                assert await connection.receive_into(buffer) == 0
    finally:
        ours.close()
        theirs.close()


async def test_a_reader_waiting_when_its_connection_is_closed_gets_closed_resource() -> None:
    ours, theirs = socket.socketpair()
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
    connection = Connection(stream, "peer")
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:

                async def close_soon() -> None:
                    await trio.testing.wait_all_tasks_blocked()
                    await stream.aclose()

                nursery.start_soon(close_soon)
                with pytest.raises(trio.ClosedResourceError):
                    await connection.receive_into(memoryview(bytearray(8)))
        # ... and reading it afterwards is a broken connection, as before.
        with pytest.raises(trio.BrokenResourceError):
            await connection.receive_into(memoryview(bytearray(8)))
    finally:
        theirs.close()


async def test_a_write_waiting_for_a_peer_that_leaves_is_a_broken_resource() -> None:
    ours, theirs = socket.socketpair()
    connection = Connection(trio.SocketStream(trio.socket.from_stdlib_socket(ours)), "peer")
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:

                async def leave_soon() -> None:
                    await trio.testing.wait_all_tasks_blocked()
                    theirs.close()

                nursery.start_soon(leave_soon)
                with pytest.raises(trio.BrokenResourceError):
                    await connection.send([bytes(16 << 20)])
    finally:
        ours.close()
