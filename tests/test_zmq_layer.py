"""The trio-driven ZeroMQ layer on its own: waiting, sharing a socket, closing, cancelling."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from framewire.daemon.lograte import RateLimitedWarning
from framewire.daemon.zeromq import AsyncSocket, open_context
from framewire.frame import Buffer

zmq = pytest.importorskip("zmq")

#: A last guard on each wait, not a measure of speed: every wait ends on its event, and a
#: machine whose CPUs are busy with other work can take many seconds over what is instant
#: alone (starting a process, a reconnect, a store's catch-up).
PATIENCE = 60.0


def bind_any(socket: AsyncSocket) -> str:
    socket.socket.bind("tcp://127.0.0.1:*")
    address: str = socket.socket.getsockopt_string(zmq.LAST_ENDPOINT)
    return address


async def test_multipart_messages_arrive_whole_and_in_order() -> None:
    async with open_context() as context:
        with (
            AsyncSocket.make(context, zmq.PULL) as pull,
            AsyncSocket.make(context, zmq.PUSH) as push,
        ):
            push.socket.connect(bind_any(pull))
            messages = [[b"%d" % i, b"", b"x" * i] for i in range(200)]
            with trio.fail_after(PATIENCE):
                async with trio.open_nursery() as nursery:

                    async def send_all() -> None:
                        for message in messages:
                            await push.send_multipart(message)

                    nursery.start_soon(send_all)
                    received: list[list[Buffer]] = []
                    while len(received) < len(messages):
                        received += await pull.receive_batch(max_messages=7)
    assert received == messages


async def test_large_parts_arrive_without_a_copy_and_small_ones_as_bytes() -> None:
    big, small = b"B" * 100_000, b"s"
    messages = [[b"h", big], [b"h", small], [b"h", small], [b"h", big], [b"h", big], [b"h", small]]
    async with open_context() as context:
        with (
            AsyncSocket.make(context, zmq.PULL) as pull,
            AsyncSocket.make(context, zmq.PUSH) as push,
        ):
            push.socket.connect(bind_any(pull))
            with trio.fail_after(PATIENCE):
                for message in messages:
                    await push.send_multipart(message)
                received = [await pull.receive_multipart() for _ in messages]
    assert [[bytes(part) for part in parts] for parts in received] == messages
    # After a large part the socket reads without copying: large parts are views then.
    assert [type(parts[1]) for parts in received] == [
        bytes,  # large, but the socket was copying
        bytes,  # small: always bytes
        bytes,
        bytes,  # large after a small one: copied
        memoryview,  # large after a large one: a view of ZeroMQ's buffer
        bytes,
    ]


async def test_a_send_waits_while_no_peer_is_connected_then_goes_through() -> None:
    async with open_context() as context:
        with AsyncSocket.make(context, zmq.PUSH) as push:
            push.socket.setsockopt(zmq.IMMEDIATE, 1)
            address = bind_any(push)
            assert push.send_multipart_nowait([b"now?"]) is False
            done = trio.Event()

            async def send() -> None:
                await push.send_multipart([b"later"])
                done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                await trio.testing.wait_all_tasks_blocked()
                assert not done.is_set()
                with AsyncSocket.make(context, zmq.PULL) as pull:
                    pull.socket.connect(address)
                    with trio.fail_after(PATIENCE):
                        assert await pull.receive_multipart() == [b"later"]
                        await done.wait()


async def test_two_tasks_share_one_socket_through_back_pressure() -> None:
    """One task sends while another receives on the same socket; both often wait, on one
    descriptor, with high-water marks of 2: neither may miss a wake-up."""
    count = 2000
    async with open_context() as context:
        with (
            AsyncSocket.make(context, zmq.PAIR, sndhwm=2, rcvhwm=2) as ours,
            AsyncSocket.make(context, zmq.PAIR, sndhwm=2, rcvhwm=2) as echo,
        ):
            ours.socket.connect(bind_any(echo))

            async def echo_back() -> None:
                for _ in range(count):
                    await echo.send_multipart(await echo.receive_multipart())

            async def send() -> None:
                for i in range(count):
                    await ours.send_multipart([b"%d" % i, b"y" * 4096])

            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(echo_back)
                    nursery.start_soon(send)
                    received = [await ours.receive_multipart() for _ in range(count)]
    assert [int(parts[0]) for parts in received] == list(range(count))


async def test_closing_wakes_a_waiting_task_with_closed_resource_error() -> None:
    async with open_context() as context:
        pull = AsyncSocket.make(context, zmq.PULL)
        bind_any(pull)
        async with trio.open_nursery() as nursery:

            async def wait() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await pull.receive_multipart()

            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            pull.close()
        assert pull.closed
        with pytest.raises(trio.ClosedResourceError):
            pull.receive_multipart_nowait()
        pull.close()  # idempotent


async def test_a_cancelled_receive_takes_nothing() -> None:
    async with open_context() as context:
        with (
            AsyncSocket.make(context, zmq.PULL) as pull,
            AsyncSocket.make(context, zmq.PUSH) as push,
        ):
            push.socket.connect(bind_any(pull))
            with trio.CancelScope() as scope:
                scope.cancel()
                await pull.receive_multipart()
            assert scope.cancelled_caught
            with trio.fail_after(PATIENCE):
                await push.send_multipart([b"kept"])
                assert await pull.receive_multipart() == [b"kept"]


async def test_options_and_linger_are_set() -> None:
    async with open_context() as context:
        with AsyncSocket.make(context, zmq.PUSH, sndhwm=7, rcvhwm=9, linger_ms=0) as push:
            assert push.socket.getsockopt(zmq.SNDHWM) == 7
            assert push.socket.getsockopt(zmq.RCVHWM) == 9
            assert push.socket.getsockopt(zmq.LINGER) == 0


async def test_rate_limited_warning_counts_all_and_logs_once_per_interval(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    detail: dict[str, object] = {}
    warn = RateLimitedWarning(
        logging.getLogger("test.lograte"), "bad input", detail=detail, key="bad", interval=10
    )
    for _ in range(5):
        warn("odd")
    await trio.sleep(10)
    warn("odder")
    lines = [record.getMessage() for record in caplog.records]
    assert lines == [
        "bad input: odd (1 in all)",
        "bad input: odder (6 in all; 4 more since the last report)",
    ]
    assert detail == {"bad": 6}
    assert (warn.count, warn.lines) == (6, 2)
