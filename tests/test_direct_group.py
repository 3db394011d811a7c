"""Direct groups: a publish offered once to a server endpoint's idle clients and written to
their sockets in one loop (stream.DirectGroup, the server's group of idle clients), with the
counters settled lazily but exact whenever read."""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections.abc import Sequence

import pytest
import trio
import trio.lowlevel
import trio.testing

from framewire import Frame, FrameKind
from framewire.daemon import Daemon
from framewire.daemon.endpoints.server import ServerEndpoint
from framewire.daemon.status import build_snapshot
from framewire.daemon.stream import (
    DirectGroup,
    QueueBounds,
    Stream,
    Subscription,
    SubscriptionClosed,
)

from .helpers import NativePeer, connect, encode, parked, running_daemon, server_clients, wait_until

pytestmark = pytest.mark.skipif(not hasattr(socket, "socketpair"), reason="needs socketpair")


def data(number: int, size: int = 64) -> Frame:
    return Frame(FrameKind.DATA, "sample", number.to_bytes(4, "big") * (size // 4), timestamp=1)


def meta(body: bytes) -> Frame:
    return Frame(FrameKind.METADATA, "config", body, timestamp=1)


# -- the stream-level group (no sockets) ----------------------------------------------------


class Group(DirectGroup[str]):
    """A group whose writer "writes" by recording, and answers per member as told."""

    def __init__(self, stream: Stream, *, session_types: frozenset[str] = frozenset()) -> None:
        super().__init__(stream, bounds=QueueBounds(), blocks_of=None, session_types=session_types)
        self.names: dict[Subscription, str] = {}
        #: Per member name: "refuse" or "start" (else written whole).
        self.answers: dict[str, str] = {}
        self.written_to: list[tuple[str, list[Frame]]] = []
        self.settled: dict[str, tuple[int, int]] = {}

    def target(self, subscription: Subscription) -> str | None:
        return self.names.get(subscription)

    def settle(self, subscription: Subscription, frames: int, written: int) -> None:
        name = self.names[subscription]
        before = self.settled.get(name, (0, 0))
        self.settled[name] = (before[0] + frames, before[1] + written)

    def offer(
        self, frames: Sequence[Frame], count: int, size: int, metadata: bool, blocks: bool
    ) -> None:
        if not self.may_write(frames, metadata, blocks):
            self.refuse_all(frames)
            return
        for subscription, name in self.members.copy().items():
            answer = self.answers.get(name)
            if answer == "refuse":
                self.refused(subscription, frames)
                continue
            self.written_to.append((name, list(frames)))
            if answer == "start":
                self.started(subscription, count, size)
        self.written(count, size, 2 * size)  # "as written": twice the frames' size


async def test_an_idle_member_is_written_through_its_group_and_its_counters_are_exact() -> None:
    stream = Stream("s")
    group = Group(stream)
    stream.add_group(group)
    subscription = stream.subscribe()
    group.names[subscription] = "a"
    subscription.group = group
    frames = [meta(b"m"), data(1), data(2)]
    size = sum(frame.size for frame in frames)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            batches = await parked(subscription, nursery)
            assert subscription in group.members  # parked with nothing queued: idle
            stream.publish_nowait(frames)
            stream.publish_nowait([data(3)])
            await trio.testing.wait_all_tasks_blocked()
            assert batches == []  # never woken
            assert group.written_to == [("a", frames), ("a", [data(3)])]
            # Owed, not settled, yet exact when read.
            assert group.settled == {}
            assert subscription.frames_out == 4
            assert subscription.bytes_out == size + data(3).size
            assert subscription.direct_owed == (4, 2 * (size + data(3).size))
            # Leaving settles what it is owed, once.
            subscription.group = None
            assert subscription not in group.members
            assert group.settled == {"a": (4, 2 * (size + data(3).size))}
            assert subscription.frames_out == 4
            assert subscription.direct_owed == (0, 0)
            # Offered one by one again (it has no direct writer: queued, consumer woken).
            stream.publish_nowait([data(4)])
            await trio.testing.wait_all_tasks_blocked()
            assert batches == [[data(4)]]
            assert subscription.frames_out == 5
            nursery.cancel_scope.cancel()


async def test_a_member_leaves_while_frames_are_queued_and_rejoins_when_it_waits_again() -> None:
    stream = Stream("s")
    group = Group(stream)
    stream.add_group(group)
    subscription = stream.subscribe()
    group.names[subscription] = "a"
    subscription.group = group
    # No consumer waits yet: not a member, the frame is queued.
    stream.publish_nowait([data(1)])
    assert not group.members
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            batches = await parked(subscription, nursery)
            assert batches == [[data(1)]]  # the queue first
            assert subscription in group.members  # then idle again
            # Refused: it leaves, the frames are queued and its consumer gets them.
            group.answers["a"] = "refuse"
            stream.publish_nowait([data(2)])
            assert subscription not in group.members
            assert subscription.queued_frames == 1
            await trio.testing.wait_all_tasks_blocked()
            assert batches == [[data(1)], [data(2)]]
            assert subscription in group.members
            # Started: it leaves, counts the publish, and is woken (empty batch) to finish.
            group.answers["a"] = "start"
            stream.publish_nowait([data(3)])
            assert subscription not in group.members
            assert subscription.frames_out == 3
            # Published before the woken consumer runs: queued behind the unfinished write.
            stream.publish_nowait([data(4)])
            assert subscription.queued_frames == 1
            await trio.testing.wait_all_tasks_blocked()
            # Its batch holds data(4): its connection writes the rest of data(3) first.
            assert batches == [[data(1)], [data(2)], [data(4)]]
            assert subscription in group.members
            nursery.cancel_scope.cancel()
    assert group.written_to == [("a", [data(3)])]
    assert subscription.frames_out == 4
    # A cancelled consumer is no member.
    assert subscription not in group.members


async def test_a_publish_the_group_may_not_write_is_queued_for_every_member() -> None:
    stream = Stream("s")
    group = Group(stream, session_types=frozenset({"config"}))
    stream.add_group(group)
    subscriptions = [stream.subscribe(session_types=frozenset({"config"})) for _ in range(3)]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            all_batches = []
            for number, subscription in enumerate(subscriptions):
                group.names[subscription] = str(number)
                subscription.group = group
                all_batches.append(await parked(subscription, nursery))
            assert len(group.members) == 3
            stream.publish_nowait([meta(b"header"), data(1)])  # a session header to judge
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert group.written_to == []
    assert all(batches == [[meta(b"header"), data(1)]] for batches in all_batches)


async def test_a_subscription_the_group_cannot_serve_is_refused() -> None:
    stream = Stream("s")
    group = Group(stream)
    with pytest.raises(ValueError, match="decimates"):
        stream.subscribe(decimate={"sample": 2}).group = group
    with pytest.raises(ValueError, match="blocks"):
        stream.subscribe(blocks_of="native").group = group
    with pytest.raises(ValueError, match="another stream"):
        Stream("other").subscribe().group = group


async def test_a_closed_member_leaves_its_group_and_its_stream() -> None:
    stream = Stream("s")
    group = Group(stream)
    stream.add_group(group)
    subscription = stream.subscribe()
    other = stream.subscribe()
    group.names[subscription] = "a"
    subscription.group = group
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await parked(other, nursery)

            async def closed_consumer() -> None:
                with pytest.raises(SubscriptionClosed, match="gone"):
                    await subscription.receive_batch()

            nursery.start_soon(closed_consumer)
            await trio.testing.wait_all_tasks_blocked()
            stream.publish_nowait([data(1)])
            assert subscription in group.members
            subscription.close("gone")
            assert subscription not in group.members
            assert group.settled == {"a": (1, 2 * data(1).size)}
            assert stream.subscriptions == [other]
            stream.publish_nowait([data(2)])
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert group.written_to == [("a", [data(1)])]
    assert subscription.frames_out == 1
    # Removing the group lets its (here: no) members go; publishing goes on without it.
    stream.remove_group(group)
    stream.publish_nowait([data(3)])
    assert other.queued_frames == 1


async def test_a_subscriber_that_joins_during_a_publish_gets_the_cache_not_the_publish() -> None:
    """A subscription made while a publish is being offered (here: by the group's writer,
    mid-loop) is offered none of it: it starts with the cache, which holds the publish's
    metadata already, and the next publish."""
    stream = Stream("s")
    joined: list[Subscription] = []

    class Joining(Group):
        def offer(
            self, frames: Sequence[Frame], count: int, size: int, metadata: bool, blocks: bool
        ) -> None:
            if not joined:
                joined.append(stream.subscribe())
            super().offer(frames, count, size, metadata, blocks)

    group = Joining(stream)
    stream.add_group(group)
    member = stream.subscribe()
    group.names[member] = "a"
    member.group = group
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await parked(member, nursery)
            stream.publish_nowait([meta(b"setup"), data(1)])
            (newcomer,) = joined
            assert newcomer.queued_frames == 1
            stream.publish_nowait([data(2)])
            assert await newcomer.receive_batch() == [meta(b"setup"), data(2)]
            nursery.cancel_scope.cancel()
    assert group.written_to == [("a", [meta(b"setup"), data(1)]), ("a", [data(2)])]


# -- through a daemon: receiver -> stream -> lossy server -> real TCP clients ----------------

CONFIG = """
[daemon]
grace_period = "5s"

[endpoints.in]
kind = "receiver"
listen = "tcp://127.0.0.1:0"
stream = "camera"

[endpoints.out]
kind = "server"
listen = "tcp://127.0.0.1:0"
stream = "camera"
max_queue_frames = 100000
max_queue_bytes = "256MiB"
max_clients = 8
"""


def server_of(daemon: Daemon) -> ServerEndpoint:
    out = daemon.endpoints["out"]
    assert isinstance(out, ServerEndpoint)
    return out


def subscription_of(daemon: Daemon, peer: NativePeer) -> Subscription:
    """The daemon's subscription for the client ``peer``."""
    assert isinstance(peer.stream, trio.SocketStream)
    host, port = peer.stream.socket.getsockname()[:2]
    for client in server_of(daemon).status.clients.values():
        if client.peer == f"{host}:{port}":
            assert client.subscription is not None
            return client.subscription
    raise AssertionError("no such client")


async def test_idle_clients_are_written_by_the_group_and_status_is_exact_between_publishes() -> (
    None
):
    frames = [meta(b"first"), data(1), data(2), meta(b"second"), data(3)]
    async with running_daemon(CONFIG) as daemon:
        peers = await server_clients(daemon, 3)
        out = server_of(daemon)
        group = out._group
        assert group is not None
        stream = daemon.streams.get("camera")
        with trio.fail_after(10):
            for number, frame in enumerate(frames, 1):
                await trio.testing.wait_all_tasks_blocked()
                assert len(group.members) == 3  # every writer parked with nothing left
                await stream.publish([frame])
                # Read between publishes: exact, though no client's counters were touched.
                nbytes = len(encode(frames[:number]))
                snapshot = build_snapshot(daemon)["endpoints"]["out"]
                assert snapshot["frames_out"] == 3 * number
                assert snapshot["bytes_out"] == 3 * nbytes
                for entry in snapshot["clients"]:
                    assert (entry["frames_sent"], entry["bytes_sent"]) == (number, nbytes)
                    assert entry["frames_in_flight"] == 0
                for client in out.status.clients.values():
                    assert client.subscription is not None
                    assert client.subscription.frames_out == number
                    assert client.subscription.bytes_out == sum(f.size for f in frames[:number])
            for peer in peers:
                assert await peer.read(len(frames)) == frames
                assert bytes(peer.raw) == encode(frames)
        assert group.publishes_refused == group.members_refused == 0
        assert group.members_started == group.members_broken == 0
        for peer in peers:
            await peer.stream.aclose()
        # Gone: settled into the counters the disconnect line gives.
        await wait_until(lambda: not out.status.clients)
        assert not group.members
        assert out.status.frames_out == 3 * len(frames)


async def test_a_partial_write_leaves_the_group_finishes_first_then_rejoins() -> None:
    """A client that does not read until its socket is full: the group's write to it is
    left half done (its writer finishes it), later frames queue behind it, metadata among
    them; once it reads, everything arrives whole and in order, and it is idle again."""
    async with running_daemon(CONFIG) as daemon:
        slow, quick = await server_clients(daemon, 2)
        out = server_of(daemon)
        group = out._group
        assert group is not None
        slow_subscription = subscription_of(daemon, slow)
        stream = daemon.streams.get("camera")
        sent: list[Frame] = []
        size = 5001 * 4  # odd-sized frames: a full socket takes part of one
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(quick.read, 1 << 30)  # keeps reading (until cancelled)
                number = 0
                while not group.members_started:
                    number += 1
                    frame = data(number, size) if number % 50 else meta(b"m%d" % number)
                    sent.append(frame)
                    await stream.publish([frame])
                    await trio.lowlevel.checkpoint()
                assert slow_subscription not in group.members
                for extra in (data(100_001, size), meta(b"late"), data(100_002, size)):
                    sent.append(extra)
                    await stream.publish([extra])
                assert await slow.read(len(sent)) == sent
                await wait_until(lambda: len(quick.frames) >= len(sent))
                await trio.testing.wait_all_tasks_blocked()
                assert slow_subscription in group.members  # idle again
                nursery.cancel_scope.cancel()
        assert quick.frames[: len(sent)] == sent
        assert bytes(slow.raw) == encode(sent)
        wire = len(encode(sent))
        assert out.status.frames_out == 2 * len(sent)
        assert out.status.bytes_out == 2 * wire
        assert out.status.dropped_total == 0
        for client in out.status.clients.values():
            assert (client.frames_sent, client.bytes_sent) == (len(sent), wire)
        for peer in (slow, quick):
            await peer.stream.aclose()


async def test_a_client_that_resets_mid_publish_is_closed_alone_with_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="framewire")
    async with running_daemon(CONFIG) as daemon:
        first, gone, last = await server_clients(daemon, 3)
        out = server_of(daemon)
        group = out._group
        assert group is not None
        stream = daemon.streams.get("camera")
        assert isinstance(gone.stream, trio.SocketStream)
        host, port = gone.stream.socket.getsockname()[:2]
        with trio.fail_after(10):
            await trio.testing.wait_all_tasks_blocked()
            stream.publish_nowait([data(1)])
            assert len(group.members) == 3
            # Reset: the RST reaches the daemon's socket inside close(), before any task
            # (the hang-up watch included) runs again; the group meets it in its loop, with
            # a member before it and one after.
            gone.stream.socket.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            gone.stream.socket.close()
            stream.publish_nowait([data(2)])  # never raises into the publisher
            assert group.members_broken == 1
            stream.publish_nowait([data(3)])
            for peer in (first, last):
                assert await peer.read(3) == [data(1), data(2), data(3)]
            await wait_until(lambda: len(out.status.clients) == 2)
        lines = [r.getMessage() for r in caplog.records if f"{host}:{port}" in r.getMessage()]
        assert len([line for line in lines if "disconnected" in line]) == 1, lines
        # It got data(1) only: the line counts what it was sent.
        assert "disconnected: connection lost (send failed:" in lines[-1], lines
        assert f"sent 1 frames, {len(encode([data(1)]))} bytes" in lines[-1], lines
        assert out.status.frames_out == 2 * 3 + 1
        for peer in (first, last):
            await peer.stream.aclose()


async def test_a_client_joining_between_publishes_gets_the_cache_first_then_live_frames() -> None:
    async with running_daemon(CONFIG) as daemon:
        (early,) = await server_clients(daemon, 1)
        out = server_of(daemon)
        group = out._group
        assert group is not None
        stream = daemon.streams.get("camera")
        port = int(out.status.address[0].rsplit(":", 1)[1])
        with trio.fail_after(10):
            await trio.testing.wait_all_tasks_blocked()
            await stream.publish([meta(b"setup"), data(1)])
            late = await connect(port)
            while len(out.status.clients) < 2:
                await trio.lowlevel.checkpoint()
            # Published as soon as the newcomer is there: its replay (the cache) goes first
            # whether these queue behind it or find it idle.
            late_subscription = subscription_of(daemon, late)
            stream.publish_nowait([data(2)])
            stream.publish_nowait([meta(b"setup2"), data(3)])
            assert await late.read(4) == [meta(b"setup"), data(2), meta(b"setup2"), data(3)]
            await trio.testing.wait_all_tasks_blocked()
            assert late_subscription in group.members  # idle now: the group writes it
            stream.publish_nowait([data(4)])
            assert await late.read(5) == [
                meta(b"setup"),
                data(2),
                meta(b"setup2"),
                data(3),
                data(4),
            ]
            assert await early.read(6) == [
                meta(b"setup"),
                data(1),
                data(2),
                meta(b"setup2"),
                data(3),
                data(4),
            ]
        for peer in (early, late):
            await peer.stream.aclose()


async def test_a_closed_socket_is_never_written_through_a_reused_descriptor() -> None:
    """A member's socket closed under the group (its descriptor freed and taken by a new
    socket) is not written: the group looks the descriptor up from the socket for each
    write, and a closed socket's is -1. The frames are queued for its writer instead."""
    async with running_daemon(CONFIG) as daemon:
        victim, other = await server_clients(daemon, 2)
        out = server_of(daemon)
        group = out._group
        assert group is not None
        subscription = subscription_of(daemon, victim)
        with trio.fail_after(10):
            await trio.testing.wait_all_tasks_blocked()
            sock = group.members[subscription]
            number = sock.fileno()
            sock.close()  # behind the daemon's back: the number is free now
            fresh, fresh_peer = socket.socketpair()
            reused = [s for s in (fresh, fresh_peer) if s.fileno() == number]
            assert reused, "the freed descriptor number was not reused by the next socket"
            with fresh, fresh_peer:
                daemon.streams.get("camera").publish_nowait([data(1)])
                assert group.members_refused == 1
                assert subscription not in group.members
                fresh.setblocking(False)
                fresh_peer.setblocking(False)
                for s in (fresh, fresh_peer):
                    with pytest.raises(BlockingIOError):
                        s.recv(1)  # nothing written to whoever holds the number now
            assert await other.read(1) == [data(1)]
            # Its writer finds the connection closed: that client is gone, alone.
            await wait_until(lambda: len(out.status.clients) == 1)
        for peer in (victim, other):
            await peer.stream.aclose()


async def test_members_that_queue_nothing_of_a_refused_publish_stay_idle_members() -> None:
    """A repeated session header is skipped by each member's queue: nothing queued, nobody
    woken, and every member is idle in its group again."""
    stream = Stream("s")
    group = Group(stream, session_types=frozenset({"config"}))
    stream.add_group(group)
    subscription = stream.subscribe(session_types=frozenset({"config"}))
    group.names[subscription] = "a"
    subscription.group = group
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            stream.publish_nowait([meta(b"header")])
            batches = await parked(subscription, nursery)
            assert batches == [[meta(b"header")]]
            assert subscription in group.members
            stream.publish_nowait([meta(b"header")])  # the same header again: skipped
            assert subscription in group.members
            stream.publish_nowait([data(1)])
            await trio.testing.wait_all_tasks_blocked()
            assert batches == [[meta(b"header")]]
            nursery.cancel_scope.cancel()
    assert group.written_to == [("a", [data(1)])]


async def test_a_connection_gives_its_plain_socket_only_while_nothing_is_being_sent() -> None:
    from framewire.daemon.transport import Connection

    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    connection = Connection(trio.SocketStream(trio.socket.from_stdlib_socket(ours)), "pair")
    with theirs:
        plain = connection.idle_plain_socket()
        assert plain is not None
        assert plain.fileno() == connection.socket_fd
        # A direct write left unsent: not idle until the connection has sent the rest.
        data = bytes(1 << 20)
        written = os.write(plain.fileno(), data)
        connection.wrote_directly(data, written, len(data))
        assert connection.has_unsent
        assert connection.idle_plain_socket() is None
        assert connection.bytes_sent == len(data)
        await connection.aclose()
        assert plain.fileno() == -1  # the very socket trio closed
    left, _right = trio.testing.memory_stream_pair()
    assert Connection(left, "memory").idle_plain_socket() is None
