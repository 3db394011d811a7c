"""The Rogue bridge against a pyzmq peer that follows Rogue's socket pairing, both roles."""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from framewire import Frame, FrameKind
from framewire.config import BridgeConfig, ZmqAddress, parse_config
from framewire.daemon import zeromq
from framewire.daemon.endpoints import EndpointContext
from framewire.daemon.endpoints.bridge import BridgeEndpoint
from framewire.daemon.stream import Policy, QueueBounds, StreamRegistry, Subscription

from .rogue_peer import PATIENCE, consecutive_free_ports, rogue_peer

pytest.importorskip("zmq")

METADATA_CHANNEL = 7


def bridge(role: str, port: int, **options: object) -> tuple[BridgeEndpoint, StreamRegistry]:
    host = None if role == "server" and options.pop("any_host", False) else "127.0.0.1"
    config = BridgeConfig(
        role=role,  # type: ignore[arg-type]
        address=ZmqAddress("tcp", host, port),
        publish="from-rogue",
        subscribe="to-rogue",
        metadata_channels=(METADATA_CHANNEL,),
        **options,  # type: ignore[arg-type]
    )
    streams = StreamRegistry()
    endpoint = BridgeEndpoint("rogue", config, EndpointContext(streams), log_interval=3600)
    return endpoint, streams


@asynccontextmanager
async def running(endpoint: BridgeEndpoint) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        with trio.fail_after(PATIENCE):
            await nursery.start(endpoint.run)
        yield
        nursery.cancel_scope.cancel()


async def next_frames(subscription: Subscription, count: int) -> list[Frame]:
    frames: list[Frame] = []
    with trio.fail_after(PATIENCE):
        while len(frames) < count:
            frames += await subscription.receive_batch()
    return frames


def send_blocked(endpoint: BridgeEndpoint) -> bool:
    return endpoint.status.detail["send_blocked"] is True


def rogue_frame(flags: int, channel: int, error: int, payload: bytes) -> Frame:
    kind = FrameKind.METADATA if channel == METADATA_CHANNEL else FrameKind.DATA
    headers = {"flags": str(flags), "channel": str(channel), "error": str(error)}
    return Frame(kind, f"ch{channel}", payload, 0, headers)


SAMPLES = [
    (0x1234, 3, 0, b"first"),
    (0xFFFF, 255, 255, b"all ones"),
    (0, METADATA_CHANNEL, 2, b"metadata"),
    (1, 0, 0, bytes(range(256)) * 4096),  # 1 MiB
]


@pytest.mark.parametrize("role", ["server", "client"])
async def test_flags_channel_and_error_round_trip_both_ways(role: str) -> None:
    port = consecutive_free_ports()
    endpoint, streams = bridge(role, port)
    inbound = streams.get("from-rogue").subscribe(policy=Policy.LOSSLESS)
    peer_role = "client" if role == "server" else "server"
    async with running(endpoint), rogue_peer(peer_role, port) as peer:
        # Rogue -> framewire: each message becomes a frame with the three fields as headers.
        for sample in SAMPLES:
            await peer.send(*sample)
        received = await next_frames(inbound, len(SAMPLES))
        assert received == [rogue_frame(*sample) for sample in SAMPLES]
        assert [frame.kind for frame in received] == [
            FrameKind.DATA,
            FrameKind.DATA,
            FrameKind.METADATA,
            FrameKind.DATA,
        ]
        # framewire -> Rogue: the headers become the message's fields again.
        with trio.fail_after(PATIENCE):
            await streams.get("to-rogue").publish(received)
        echoed = [await peer.receive() for _ in SAMPLES]
        assert echoed == SAMPLES
        # A frame from another protocol, without the headers, goes out with zeros.
        with trio.fail_after(PATIENCE):
            await streams.get("to-rogue").publish([Frame(FrameKind.DATA, "x", b"plain")])
        assert await peer.receive() == (0, 0, 0, b"plain")
    status = endpoint.status
    assert (status.frames_in, status.frames_out) == (len(SAMPLES), len(SAMPLES) + 1)
    ports = [int(address.rsplit(":", 1)[1]) for address in status.address]
    assert ports == ([port, port + 1] if role == "server" else [port + 1, port])


@pytest.mark.parametrize("role", ["server", "client"])
async def test_with_no_peer_sending_waits_and_loses_nothing(role: str) -> None:
    port = consecutive_free_ports()
    endpoint, streams = bridge(role, port, max_queue_frames=4)
    outgoing = streams.get("to-rogue")
    # A lossy monitor on the same stream is not held back by the bridge.
    monitor = outgoing.subscribe(bounds=QueueBounds(max_frames=1000))
    total = 40
    published = 0

    async def publish_all() -> None:
        nonlocal published
        for seq in range(total):
            await outgoing.publish([rogue_frame(seq, 1, 0, b"%d" % seq)])
            published += 1

    async with running(endpoint), trio.open_nursery() as nursery:
        nursery.start_soon(publish_all)
        await trio.testing.wait_all_tasks_blocked()
        # No peer: the bridge holds its first frame in a send that waits, its queue is
        # full, and the publisher waits for room. Nothing was dropped.
        assert send_blocked(endpoint)
        assert endpoint.status.frames_out == 0
        assert published < total
        assert endpoint.status.frames_dropped == 0
        held = published
        peer_role = "client" if role == "server" else "server"
        async with rogue_peer(peer_role, port) as peer:
            got = [await peer.receive() for _ in range(total)]
    assert got == [(seq, 1, 0, b"%d" % seq) for seq in range(total)]
    assert held >= 4
    assert endpoint.status.frames_out == total
    assert not send_blocked(endpoint)
    assert monitor.queued_frames == total


async def test_lossy_policy_drops_the_oldest_data_instead_of_waiting() -> None:
    port = consecutive_free_ports()
    endpoint, streams = bridge("server", port, max_queue_frames=4, policy="lossy")
    async with running(endpoint):
        with trio.fail_after(PATIENCE):
            for seq in range(100):
                await streams.get("to-rogue").publish([rogue_frame(seq, 1, 0, b"x")])
        await trio.testing.wait_all_tasks_blocked()
        endpoint.status.current_detail()
        assert endpoint.status.frames_dropped > 0
        assert send_blocked(endpoint)


async def test_bad_messages_are_dropped_counted_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="framewire")
    port = consecutive_free_ports()
    endpoint, streams = bridge("server", port)
    inbound = streams.get("from-rogue").subscribe()
    bad = [
        [b"\x00\x00", b"\x01", b"\x00"],  # three parts
        [b"\x00\x00", b"\x01", b"\x00", b"payload", b"extra"],  # five parts
        [b"\x00", b"\x01", b"\x00", b"payload"],  # flags of one byte
        [b"\x00\x00", b"\x01\x02", b"\x00", b"payload"],  # channel of two bytes
        [b"\x00\x00", b"\x01", b"", b"payload"],  # empty error
    ] * 20
    async with running(endpoint), rogue_peer("client", port) as peer:
        for parts in bad:
            await peer.send_parts(parts)
        await peer.send(5, 1, 0, b"good")
        assert await next_frames(inbound, 1) == [rogue_frame(5, 1, 0, b"good")]
    assert endpoint.status.detail["messages_dropped"] == len(bad)
    lines = [r.getMessage() for r in caplog.records if "bad Rogue messages" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].endswith("got 3 (1 in all)")


async def test_frames_rogue_cannot_carry_are_counted_and_skipped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = consecutive_free_ports()
    endpoint, streams = bridge("server", port)
    async with running(endpoint), rogue_peer("client", port) as peer:
        with trio.fail_after(PATIENCE):
            await streams.get("to-rogue").publish(
                [
                    Frame(FrameKind.DATA, "x", b""),
                    Frame(FrameKind.DATA, "x", b"y", headers={"channel": "256"}),
                    Frame(FrameKind.DATA, "x", b"after"),
                ]
            )
        assert await peer.receive() == (0, 0, 0, b"after")
    assert endpoint.status.detail["frames_unencodable"] == 2


async def test_stop_sends_what_is_queued_first() -> None:
    port = consecutive_free_ports()
    endpoint, streams = bridge("server", port)
    async with rogue_peer("client", port) as peer:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(PATIENCE):
                await nursery.start(endpoint.run)
                await streams.get("to-rogue").publish(
                    [rogue_frame(seq, 2, 0, b"q") for seq in range(10)]
                )
            endpoint.request_stop()
        assert [await peer.receive() for _ in range(10)] == [(seq, 2, 0, b"q") for seq in range(10)]


async def test_a_bridge_without_pyzmq_fails_at_start_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(zeromq, "_zmq", None)
    monkeypatch.setitem(sys.modules, "zmq", None)
    endpoint, _ = bridge("server", 4000)
    with pytest.raises(zeromq.ZmqUnavailable, match=r"framewire\[zmq\]"):
        await endpoint.run()


def test_bridge_config_from_toml() -> None:
    config = parse_config(
        """
[endpoints.rogue]
kind = "bridge"
protocol = "rogue"
role = "client"
address = "tcp://127.0.0.1:8000"
publish = "in"
subscribe = "out"
metadata_channels = [4, 1, 4]
"""
    )
    endpoint = config.endpoints["rogue"]
    assert isinstance(endpoint, BridgeConfig)
    assert endpoint.metadata_channels == (1, 4)
    assert endpoint.policy == "lossless"
    assert str(endpoint.address) == "tcp://127.0.0.1:8000"


@pytest.mark.parametrize(
    ("table", "error"),
    [
        ('role = "server"\naddress = "tcp://*:0"', "P and P+1"),
        ('role = "server"\naddress = "tcp://*:65535"', "from 1 to 65534"),
        ('role = "client"\naddress = "tcp://*:8000"', "connects, so it needs a host"),
        ('role = "server"\naddress = "ipc:///tmp/x"', "tcp on two ports"),
        ('role = "peer"\naddress = "tcp://*:8000"', "'server', 'client'"),
        ('role = "server"\naddress = "tcp://*:8000"\nmetadata_channels = [256]', "0 to 255"),
        ('role = "server"\naddress = "tcp://*:8000"\nmetadata_channels = 3', "an array"),
        ('role = "server"\naddress = "tcp://*:8000"\nprotocol = "g3"', "'rogue'"),
        ('role = "server"\naddress = "tcp://*:8000"\nsubscribe = "in"', "must differ"),
    ],
)
def test_bad_bridge_configs_say_what_is_wrong(table: str, error: str) -> None:
    with pytest.raises(ValueError, match=r"endpoints\.b") as info:
        parse_config(f'[endpoints.b]\nkind = "bridge"\npublish = "in"\n{table}\n')
    assert error in str(info.value)
