"""The pubsub endpoint against plain pyzmq peers (the real xdas peers are in tests/interop)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from framewire import Frame, FrameKind
from framewire.config import PubSubConfig, ZmqAddress, parse_config, parse_zmq_address
from framewire.daemon.endpoints import EndpointContext, PubSubEndpoint
from framewire.daemon.stream import StreamRegistry
from framewire.daemon.zeromq import AsyncSocket, open_context

from .helpers import wait_until

zmq = pytest.importorskip("zmq")

#: A last guard on each wait, not a measure of speed: every wait ends on its event, and a
#: machine whose CPUs are busy with other work can take many seconds over what is instant
#: alone (starting a process, a reconnect, a store's catch-up).
PATIENCE = 60.0


@asynccontextmanager
async def running(endpoint: PubSubEndpoint) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        with trio.fail_after(PATIENCE):
            await nursery.start(endpoint.run)
        yield
        nursery.cancel_scope.cancel()


def endpoint_of(config: PubSubConfig) -> tuple[PubSubEndpoint, StreamRegistry]:
    streams = StreamRegistry()
    return PubSubEndpoint("zmq", config, EndpointContext(streams), log_interval=3600), streams


async def test_publisher_welcomes_counts_subscribers_and_sends_payloads(tmp_path: Path) -> None:
    address = ZmqAddress("ipc", path=str(tmp_path / "pub.sock"))
    config = PubSubConfig(role="publisher", address=address, stream="s", max_queue_frames=50)
    endpoint, streams = endpoint_of(config)
    async with running(endpoint), open_context() as context:
        assert endpoint.status.address == [str(address)]
        with AsyncSocket.make(context, zmq.SUB) as sub:
            sub.socket.connect(str(address))
            sub.socket.setsockopt(zmq.SUBSCRIBE, b"")
            with trio.fail_after(PATIENCE):
                assert await sub.receive_multipart() == [b"xdas"]
                await endpoint.wait_for_subscribers(1)
                await streams.get("s").publish(
                    [Frame(FrameKind.DATA, "t", b"packet %d" % i) for i in range(3)]
                )
                got = [await sub.receive_multipart() for _ in range(3)]
        assert got == [[b"packet %d" % i] for i in range(3)]
        await wait_until(lambda: endpoint.subscribers == 0)
    assert endpoint.status.frames_out == 3


async def test_publisher_high_water_mark_comes_from_the_queue_bounds() -> None:
    config = PubSubConfig(
        role="publisher",
        address=ZmqAddress("tcp", "127.0.0.1", 0),
        stream="s",
        welcome="",
        max_queue_frames=37,
    )
    endpoint, _ = endpoint_of(config)
    seen: list[int] = []
    original = AsyncSocket.make

    def spy(context: object, socket_type: int, **options: int | None) -> AsyncSocket:
        socket = original(context, socket_type, **options)  # type: ignore[arg-type]
        seen.append(int(socket.socket.getsockopt(zmq.SNDHWM)))
        return socket

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AsyncSocket, "make", spy)
        async with running(endpoint):
            pass
    assert seen == [37]


async def test_subscriber_skips_the_welcome_and_drops_multipart_messages(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="framewire")
    async with open_context() as context:
        with AsyncSocket.make(context, zmq.XPUB) as xpub:
            xpub.socket.setsockopt(zmq.XPUB_WELCOME_MSG, b"xdas")
            xpub.socket.bind("tcp://127.0.0.1:*")
            port = int(xpub.socket.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
            config = PubSubConfig(
                role="subscriber",
                address=ZmqAddress("tcp", "127.0.0.1", port),
                stream="s",
                type="das",
                max_queue_frames=64,
            )
            endpoint, streams = endpoint_of(config)
            received = streams.get("s").subscribe()
            async with running(endpoint):
                with trio.fail_after(PATIENCE):
                    assert (await xpub.receive_multipart())[0] == b"\x01"  # subscribed
                    await wait_until(lambda: endpoint.status.detail["welcomes"] == 1)
                    for _ in range(5):
                        await xpub.send_multipart([b"two", b"parts"])
                    await xpub.send_multipart([b"\x89HDF opaque"])
                    frames = await received.receive_batch()
    assert frames == [Frame(FrameKind.DATA, "das", b"\x89HDF opaque")]
    assert endpoint.status.detail["messages_dropped"] == 5
    warnings = [r.getMessage() for r in caplog.records if "single-part" in r.getMessage()]
    assert warnings == [
        "dropped messages that are not single-part packets: a message of 2 parts (1 in all)"
    ]


def test_pubsub_configs_from_toml() -> None:
    config = parse_config(
        """
[endpoints.in]
kind = "pubsub"
role = "subscriber"
address = "tcp://daq.example:5555"
stream = "das"

[endpoints.out]
kind = "pubsub"
role = "publisher"
address = "tcp://*:5556"
stream = "das"
max_queue_frames = 100
"""
    )
    subscriber, publisher = config.endpoints["in"], config.endpoints["out"]
    assert isinstance(subscriber, PubSubConfig)
    assert isinstance(publisher, PubSubConfig)
    assert str(subscriber.address) == "tcp://daq.example:5555"
    assert str(publisher.address) == "tcp://*:5556"
    assert publisher.max_queue_frames == 100


@pytest.mark.parametrize(
    ("table", "error"),
    [
        ('role = "subscriber"\naddress = "tcp://*:5555"', "connects, so it needs a host"),
        ('role = "subscriber"\naddress = "tcp://127.0.0.1:0"', "needs a host and a port"),
        ('role = "publisher"\naddress = "udp://127.0.0.1:5"', "unsupported transport 'udp'"),
        ('role = "publisher"\naddress = "127.0.0.1:5"', 'write "tcp://127.0.0.1:5"'),
        ('role = "publisher"\naddress = "tcp://127.0.0.1"', "expected tcp://host:port"),
        ('role = "publisher"\naddress = "tcp://::1:5"', "IPv6 address in brackets"),
        ('role = "publisher"\naddress = "tcp://host_name:5"', "not a valid host"),
        ('role = "publisher"\naddress = "tcp://127.0.0.1:70000"', "from 0 to 65535"),
        ('role = "publisher"\naddress = "ipc://"', "expected ipc://PATH"),
        ('role = "publisher"\naddress = "ipc:///' + "x" * 200 + '"', "room for 107"),
        ('role = "publisher"\naddress = "tcp://*:5"\ntopic = "a"', "only a subscriber"),
        ('role = "listener"\naddress = "tcp://*:5"', "'publisher', 'subscriber'"),
    ],
)
def test_bad_pubsub_configs_say_what_is_wrong(table: str, error: str) -> None:
    with pytest.raises(ValueError, match=r"endpoints\.p") as info:
        parse_config(f'[endpoints.p]\nkind = "pubsub"\nstream = "s"\n{table}\n')
    assert error in str(info.value)


def test_port_0_and_star_are_only_for_binding() -> None:
    assert parse_zmq_address("tcp://*:0", binding=True) == ZmqAddress("tcp", None, 0)
    with pytest.raises(ValueError, match="port 0"):
        parse_zmq_address("tcp://127.0.0.1:0")
    with pytest.raises(ValueError, match="only for binding"):
        parse_zmq_address("tcp://*:5")


def test_ipv6_and_abstract_addresses() -> None:
    config = parse_config(
        """
[endpoints.a]
kind = "pubsub"
role = "publisher"
address = "tcp://[::1]:5556"
stream = "s"

[endpoints.b]
kind = "pubsub"
role = "publisher"
address = "ipc://@framewire-test"
stream = "s"
"""
    )
    a, b = config.endpoints["a"], config.endpoints["b"]
    assert isinstance(a, PubSubConfig)
    assert isinstance(b, PubSubConfig)
    assert a.address.is_ipv6
    assert str(a.address) == "tcp://[::1]:5556"
    assert str(b.address) == "ipc://@framewire-test"
