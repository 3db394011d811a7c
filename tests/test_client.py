"""framewire.client, trio and blocking, against a link endpoint of an in-process daemon."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np
import numpy.typing as npt
import pytest
import trio
import trio.testing

from framewire import Frame, FrameKind
from framewire.client import (
    BlockingClient,
    Client,
    ConnectionClosed,
    array_from_frame,
    frame_from_array,
    open_client,
)
from framewire.config import parse_config
from framewire.daemon import Daemon, Policy, Subscription
from framewire.daemon.endpoints.link import LinkEndpoint
from framewire.protocols.native import END_OF_STREAM, KEEPALIVE

from .helpers import port_of, wait_until

CONFIG = """
[endpoints.app]
kind = "link"
listen = "tcp://127.0.0.1:0"
protocol = "{protocol}"
publish = "from-app"
subscribe = "to-app"
keepalive = "200ms"
timeout = "30s"
"""
#: The link's timeout above is only a last guard: how it judges a silent peer is tested on
#: the MockClock in test_link.py. Here, that an idle client keeps the link up is shown by
#: the keepalives the link hears from it, which no busy machine can fake or lose.
IDLE_KEEPALIVES = 5

ARRAYS: list[npt.NDArray[np.generic]] = [
    np.arange(12, dtype="<f8").reshape(3, 4),
    np.arange(24, dtype=">i4").reshape(2, 3, 4),
    np.array(7, dtype=np.int64),
    np.zeros((0, 5), dtype=np.uint8),
    np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3)),
    np.array([[True, False], [False, True]]),
    np.array([1 + 2j, 3 - 4j], dtype=np.complex64),
    np.array(["ab", "c"]),
    np.linspace(0, 1, 1 << 17, dtype=np.float32).reshape(256, 512),
]


@asynccontextmanager
async def daemon(protocol: str = "native") -> AsyncIterator[tuple[Daemon, str]]:
    instance = Daemon(parse_config(CONFIG.format(protocol=protocol)))
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            await nursery.start(instance.run)
        port = port_of(instance.endpoints["app"].status.address[0])
        yield instance, f"tcp://127.0.0.1:{port}"
        instance.request_shutdown()


def from_app(instance: Daemon) -> Subscription:
    return instance.streams.get("from-app").subscribe(policy=Policy.LOSSLESS)


async def frames_of(subscription: Subscription, count: int) -> list[Frame]:
    frames: list[Frame] = []
    with trio.fail_after(10):
        while len(frames) < count:
            frames += await subscription.receive_batch()
    return frames


async def link_up(instance: Daemon) -> None:
    endpoint = instance.endpoints["app"]
    assert isinstance(endpoint, LinkEndpoint)
    with trio.fail_after(10):
        await endpoint.wait_for_state("up")


async def hears_keepalives(instance: Daemon, count: int) -> None:
    """Wait until the link has heard ``count`` more keepalives from its client."""

    def heard() -> int:
        value = instance.endpoints["app"].status.detail.get("keepalives_received", 0)
        assert isinstance(value, int)
        return value

    before = heard()
    await wait_until(lambda: heard() >= before + count)


def data(i: int) -> Frame:
    return Frame(FrameKind.DATA, "sample", b"%d" % i, timestamp=i, headers={"i": str(i)})


def same(a: npt.NDArray[np.generic], b: npt.NDArray[np.generic]) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(a, b))


# -- trio -------------------------------------------------------------------------------


async def test_trio_client_sends_and_receives_frames() -> None:
    async with daemon() as (instance, address):
        received = from_app(instance)
        await instance.streams.get("to-app").publish([data(1), data(2)])
        async with open_client(address, keepalive=0.2) as client:
            await link_up(instance)
            with trio.fail_after(10):
                assert [await client.receive(), await client.receive()] == [data(1), data(2)]
            await client.send(data(3))
            await client.send_many([data(4), data(5)])
            assert await frames_of(received, 3) == [data(3), data(4), data(5)]
            # Idle for a while: the client's keepalives hold the link up.
            await hears_keepalives(instance, IDLE_KEEPALIVES)
            assert instance.endpoints["app"].status.state == "up"
            assert instance.endpoints["app"].status.detail["connections"] == 1


async def test_trio_client_array_round_trip() -> None:
    async with daemon() as (instance, address):
        received = from_app(instance)
        async with open_client(address) as client:
            for array in ARRAYS:
                await client.send_array(array, headers={"camera": "left"})
            frames = await frames_of(received, len(ARRAYS))
            for array, frame in zip(ARRAYS, frames, strict=True):
                assert frame.type == "ndarray"
                assert frame.headers["camera"] == "left"
                assert same(array_from_frame(frame), array)
            # Back to the client: it rebuilds each array without knowing its shape.
            await instance.streams.get("to-app").publish(frames)
            with trio.fail_after(10):
                for array in ARRAYS:
                    back = await client.receive_array(copy=True)
                    assert same(back, array)
                    assert back.flags.writeable


async def test_trio_client_over_datalink() -> None:
    async with daemon("datalink") as (instance, address):
        received = from_app(instance)
        async with open_client(address, protocol="datalink") as client:
            await client.send(Frame(FrameKind.DATA, "x", b"hello", 1_500_000_000))
            assert await frames_of(received, 1) == [
                Frame(FrameKind.DATA, "datalink", b"hello", 1_500_000_000)
            ]
            await instance.streams.get("to-app").publish([frame_from_array(np.arange(3))])
            with trio.fail_after(10):
                frame = await client.receive()
            assert frame.type == "datalink"
            with pytest.raises(ValueError, match="no dtype and shape headers"):
                array_from_frame(frame)


async def test_trio_client_peer_timeout_and_clean_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    client = Client(ours, peer_timeout=5.0)
    await theirs.send_all(KEEPALIVE)
    with pytest.raises(TimeoutError, match="nothing from the peer for 5s"):
        await client.receive()
    await theirs.send_all(END_OF_STREAM)
    with pytest.raises(ConnectionClosed) as closed:
        await client.receive()
    assert closed.value.clean


# -- blocking ---------------------------------------------------------------------------


def blocking_session(address: str) -> list[Frame]:
    """In a thread: receive two frames and two arrays, send three frames and the arrays."""
    with BlockingClient(address, keepalive=0.2, timeout=10) as client:
        received = [client.receive(), client.receive()]
        arrays = [client.receive_array() for _ in ARRAYS]
        for array, expected in zip(arrays, ARRAYS, strict=True):
            assert same(array, expected)
        client.send(data(3))
        client.send_many([data(4), data(5)])
        for array in ARRAYS:
            client.send_array(array)
        return received


async def test_blocking_client_sends_and_receives_frames_and_arrays() -> None:
    async with daemon() as (instance, address):
        received = from_app(instance)
        # Published before the client connects: the link's queue holds them for it.
        await instance.streams.get("to-app").publish(
            [data(1), data(2), *[frame_from_array(a) for a in ARRAYS]]
        )
        with trio.fail_after(20):
            got = await trio.to_thread.run_sync(blocking_session, address)
        assert got == [data(1), data(2)]
        frames = await frames_of(received, 3 + len(ARRAYS))
        assert frames[:3] == [data(3), data(4), data(5)]
        for frame, array in zip(frames[3:], ARRAYS, strict=True):
            assert same(array_from_frame(frame), array)


def blocking_idle(address: str) -> Frame:
    """Wait in receive() while the link hears the client's keepalives."""
    with BlockingClient(address, keepalive=0.2, timeout=10) as client:
        return client.receive()


async def test_blocking_client_keeps_the_link_up_while_it_waits() -> None:
    async with daemon() as (instance, address):
        endpoint = instance.endpoints["app"]
        assert isinstance(endpoint, LinkEndpoint)
        async with trio.open_nursery() as nursery:

            async def idle_client() -> None:
                frame = await trio.to_thread.run_sync(blocking_idle, address)
                assert frame == data(9)

            nursery.start_soon(idle_client)
            await link_up(instance)
            await hears_keepalives(instance, IDLE_KEEPALIVES)
            assert endpoint.status.state == "up"
            assert endpoint.connections == 1
            await instance.streams.get("to-app").publish([data(9)])


def test_blocking_client_times_out_on_a_silent_peer() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        with BlockingClient(f"tcp://127.0.0.1:{port}", keepalive=0.05, timeout=0.3) as client:
            peer, _ = listener.accept()
            with peer:
                with pytest.raises(TimeoutError, match="nothing from the peer"):
                    client.receive()
                # While it waited it kept sending keepalives.
                peer.settimeout(10)
                assert peer.recv(1 << 16).startswith(KEEPALIVE)


def test_array_helpers_refuse_what_they_cannot_carry() -> None:
    with pytest.raises(ValueError, match="no portable byte form"):
        frame_from_array(np.array([object()]))
    with pytest.raises(ValueError, match="no portable byte form"):
        frame_from_array(np.zeros(2, dtype=[("a", "<i4"), ("b", "<f8")]))
    frame = frame_from_array(np.arange(4))
    short = Frame(frame.kind, frame.type, b"\x00" * 8, frame.timestamp, frame.headers)
    with pytest.raises(ValueError, match="does not hold an array"):
        array_from_frame(short)
    bad = Frame(frame.kind, frame.type, frame.payload, 0, {"dtype": "nonsense", "shape": "4"})
    with pytest.raises(ValueError, match="bad array headers"):
        array_from_frame(bad)
