"""What a connection leaves behind once it is gone: nothing that waits for the collector.

The daemon runs the cyclic garbage collector rarely (``tune_garbage_collector``), so state
that only a collection frees stays resident for a long time: a client that left kept its
subscription, connection, socket and their frames (a few KiB each) in a reference cycle
until then. These tests disable the collector and count what is left.
"""

from __future__ import annotations

import gc
import socket
import struct
import weakref
from collections.abc import Callable, Iterator

import pytest
import trio
import trio.testing

from framewire import Frame, FrameKind
from framewire.daemon import service
from framewire.daemon.endpoints._base import ClientInfo
from framewire.daemon.endpoints.server import ServerEndpoint
from framewire.daemon.stream import (
    QueueBounds,
    Stream,
    StreamRegistry,
    Subscription,
    SubscriptionClosed,
)
from framewire.daemon.transport import Connection

from .helpers import endpoint_port, running_daemon, wait_until

CONFIG = """
[daemon]
grace_period = "1s"

[endpoints.out]
kind = "server"
listen = "tcp://127.0.0.1:0"
protocol = "native"
stream = "big"
max_queue_frames = 4
"""


@pytest.fixture
def gc_disabled() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def held(kind: type) -> int:
    """Objects of exactly ``kind`` the collector tracks: alive, or garbage not yet freed
    (with the collector disabled, garbage in a reference cycle stays)."""
    return sum(1 for o in gc.get_objects() if type(o) is kind)


def frame(size: int) -> Frame:
    return Frame(FrameKind.DATA, "sample", b"\x5a" * size)


async def leave(how: str, port: int, server: ServerEndpoint, served: Stream) -> None:
    """One client of ``server`` (listening on ``port``): it connects, gets a frame
    published into ``served`` once the server has it, and leaves ``how``."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    sock = stream.socket
    with trio.fail_after(10):
        await wait_until(lambda: len(server.status.clients) == 1)
        if how == "resets before a frame is written to it":
            await trio.testing.wait_all_tasks_blocked()  # its writer waits: it is idle
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            # No checkpoint in between: the server's write to the idle client fails.
            await served.publish([frame(1024)])
        elif how == "reads, then closes":
            await served.publish([frame(64 * 1024)])
            got = 0
            while got < 64 * 1024:
                got += len(await stream.receive_some(1 << 16))
        elif how == "resets mid-frame":
            # A frame larger than the socket buffers: the daemon is still writing it.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await served.publish([frame(8 << 20)])
            await stream.receive_some(1000)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:  # never reads: its frames stay queued until it closes
            await served.publish([frame(64 * 1024)] * 8)
        await stream.aclose()
        await wait_until(lambda: not server.status.clients)


WAYS_OUT = [
    "reads, then closes",
    "resets mid-frame",
    "never reads",
    "resets before a frame is written to it",
]


@pytest.mark.usefixtures("gc_disabled")
@pytest.mark.parametrize("how", WAYS_OUT)
async def test_clients_that_left_are_freed_without_a_collection(how: str) -> None:
    async with running_daemon(CONFIG) as daemon:
        server = daemon.endpoints["out"]
        assert isinstance(server, ServerEndpoint)
        served = daemon.streams.get("big")
        before = {kind: held(kind) for kind in (Connection, Subscription, ClientInfo, Frame)}
        for _ in range(10):
            await leave(how, endpoint_port(daemon, "out"), server, served)
        if how == "resets before a frame is written to it":
            assert server._group is not None
            assert server._group.members_broken == 10  # the write failed, not the watch
        # Every client's state went with its last reference, not with a collection; and
        # so did the frames published to it.
        await wait_until(lambda: all(held(kind) == count for kind, count in before.items()))


@pytest.mark.usefixtures("gc_disabled")
@pytest.mark.parametrize("graceful", [True, False])
async def test_a_closed_subscription_raises_an_exception_that_does_not_hold_it(
    graceful: bool,
) -> None:
    """The SubscriptionClosed a consumer gets has a traceback whose frames hold the
    subscription; the subscription must not hold that exception in turn."""
    stream = StreamRegistry().get("s")
    before = held(Subscription)
    subscription = stream.subscribe(bounds=QueueBounds(4, 1 << 20))
    if graceful:
        subscription.end("the stream ended")
    else:
        subscription.close("cut off")
    for _ in range(2):  # asked again, it says so again
        with pytest.raises(SubscriptionClosed) as raised:
            await subscription.receive_batch()
        assert raised.value.graceful is graceful
    del raised, subscription
    assert held(Subscription) == before


@pytest.mark.usefixtures("gc_disabled")
@pytest.mark.parametrize("allocator_trims", [True, False])
async def test_cyclic_garbage_is_freed_before_each_heap_trim(
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    allocator_trims: bool,
) -> None:
    """Every HEAP_TRIM_INTERVAL the daemon runs a full collection, then trims the heap, so
    whatever still forms reference cycles is given back, on a quiet daemon too."""

    class Cycle:
        def __init__(self) -> None:
            self.me = self

    garbage = Cycle()
    collected = weakref.ref(garbage)
    del garbage
    trims: list[bool] = []  # for each trim: was the garbage freed by then?

    def heap_trimmer() -> Callable[[], object] | None:
        return (lambda: trims.append(collected() is None)) if allocator_trims else None

    monkeypatch.setattr(service, "heap_trimmer", heap_trimmer)
    async with running_daemon(CONFIG):
        await trio.sleep(service.HEAP_TRIM_INTERVAL - 1)
        assert collected() is not None  # nothing collects it in between
        await trio.sleep(2)
        assert collected() is None
        assert trims == ([True] if allocator_trims else [])
