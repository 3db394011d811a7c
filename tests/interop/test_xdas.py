"""framewire between real xdas peers: ZMQPublisher -> framewire -> two ZMQSubscribers.

Every xdas peer runs in its own process (tests/interop/xdas_peer.py); every wait on one has
a timeout (peers.PATIENCE).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from framewire.config import parse_config
from framewire.daemon import Daemon
from framewire.daemon.endpoints import PubSubEndpoint

from ..helpers import wait_until
from .peers import PATIENCE, Peer, run_peer
from .test_g3 import free_port

pytestmark = pytest.mark.interop
pytest.importorskip("zmq")
pytest.importorskip("xdas")

XDAS_PEER = Path(__file__).with_name("xdas_peer.py")

RELAY = """
[endpoints.from-xdas]
kind = "pubsub"
role = "subscriber"
address = "tcp://127.0.0.1:{upstream}"
stream = "das"

[endpoints.to-xdas]
kind = "pubsub"
role = "publisher"
address = "tcp://127.0.0.1:0"
stream = "das"
"""


@asynccontextmanager
async def xdas_peer(*args: str) -> AsyncIterator[Peer]:
    """Run ``xdas_peer.py ARGS``; kill it on the way out if it is still running."""
    # Not from inside the xdas package: its signal.py would shadow the stdlib's.
    async with run_peer(XDAS_PEER, *args, cwd=XDAS_PEER.parent) as peer:
        yield peer


async def lines(peer: Peer, count: int) -> list[str]:
    return [await peer.line() for _ in range(count)]


async def test_publisher_to_framewire_to_two_subscribers_the_late_one_from_when_it_joined() -> None:
    upstream = free_port()
    daemon = Daemon(parse_config(RELAY.format(upstream=upstream)))
    async with trio.open_nursery() as nursery:
        with trio.fail_after(PATIENCE):
            await nursery.start(daemon.run)
        publisher_endpoint = daemon.endpoints["to-xdas"]
        assert isinstance(publisher_endpoint, PubSubEndpoint)
        out = publisher_endpoint.status.address[0]
        assert out.startswith("tcp://127.0.0.1:")
        assert not out.endswith(":0")
        async with (
            xdas_peer("publish", f"tcp://127.0.0.1:{upstream}") as source,
            xdas_peer("subscribe", out) as early,
            # Started now, so that its imports are done by the time it is to join.
            xdas_peer("subscribe-on-cue", out) as late,
        ):
            # The source waits for framewire's subscription; the early subscriber for
            # framewire's welcome.
            await source.expect("ready")
            await early.expect("subscribed")
            with trio.fail_after(PATIENCE):
                await publisher_endpoint.wait_for_subscribers(1)
            await late.expect("loaded")
            await source.tell("send 0 4")
            first = await lines(source, 5)
            assert await lines(early, 5) == [line.replace("sent", "got") for line in first]
            await late.tell("subscribe")
            await late.expect("subscribed")
            with trio.fail_after(PATIENCE):
                await publisher_endpoint.wait_for_subscribers(2)
            await source.tell("send 5 9")
            second = await lines(source, 5)
            expected = [line.replace("sent", "got") for line in second]
            assert await lines(early, 5) == expected
            # The late subscriber gets what was published from when it joined on.
            assert await lines(late, 5) == expected
            late.process.kill()
            with trio.fail_after(PATIENCE):
                await late.process.wait()
            # A subscriber that leaves is no longer counted.
            await wait_until(lambda: publisher_endpoint.subscribers == 1, patience=PATIENCE)
        subscriber_status = daemon.endpoints["from-xdas"].status
        assert subscriber_status.frames_in == 10
        assert subscriber_status.detail["welcomes"] == 1
        assert publisher_endpoint.status.frames_out == 10
        daemon.request_shutdown()
