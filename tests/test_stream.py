"""Streams and subscriptions: replay, lossy and lossless policies, bounds, decimation."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from framewire import Frame, FrameKind
from framewire.config import StreamConfig
from framewire.daemon.stream import (
    MetadataLimitExceeded,
    Policy,
    QueueBounds,
    Stream,
    StreamRegistry,
    Subscription,
    SubscriptionClosed,
)

DATA, META = FrameKind.DATA, FrameKind.METADATA


def data(name: str, size: int = 10, type_: str = "d") -> Frame:
    return Frame(DATA, type_, name.encode().ljust(size, b"."))


def meta(type_: str, name: str, size: int = 10) -> Frame:
    return Frame(META, type_, name.encode().ljust(size, b"."))


def names(frames: list[Frame]) -> list[str]:
    return [bytes(f.payload).rstrip(b".").decode() for f in frames]


async def receive_all(subscription: Subscription) -> list[Frame]:
    out: list[Frame] = []
    while subscription.queued_frames:
        out += await subscription.receive_batch()
    return out


async def test_replay_is_latest_metadata_in_first_seen_order() -> None:
    stream = Stream("s")
    await stream.publish(
        [meta("O", "O1"), meta("W", "W"), meta("C", "C1"), data("S1"), meta("C", "C2")]
    )
    await stream.publish([meta("O", "O2"), data("S2"), meta("G", "G")])
    late = stream.subscribe()
    assert names(await receive_all(late)) == ["O2", "W", "C2", "G"]
    await stream.publish([data("S3")])
    assert names(await receive_all(late)) == ["S3"]


async def test_lossy_drops_oldest_data_never_metadata_and_keeps_order() -> None:
    stream = Stream("s")
    sub = stream.subscribe(bounds=QueueBounds(max_frames=3))
    await stream.publish([data("D1"), data("D2"), meta("C", "C1"), data("D3"), data("D4")])
    # At the bound, the oldest data frames went first; metadata stayed in its place.
    assert names(await receive_all(sub)) == ["C1", "D3", "D4"]
    assert sub.frames_dropped == 2
    await stream.publish([meta("C", "C2"), meta("H", "H1"), meta("W", "W1"), data("D5")])
    # Metadata alone fills the queue: it is all kept (beyond the bound) and data is dropped.
    assert names(await receive_all(sub)) == ["C2", "H1", "W1"]
    assert sub.frames_dropped == 3


async def test_lossy_byte_bound() -> None:
    stream = Stream("s")
    sub = stream.subscribe(bounds=QueueBounds(max_frames=100, max_bytes=100))
    await stream.publish([data(f"D{i}", size=30) for i in range(5)])
    assert sub.queued_bytes <= 100
    assert names(await receive_all(sub)) == ["D2", "D3", "D4"]
    # A frame bigger than the whole bound still gets through an empty queue.
    await stream.publish([data("BIG", size=500)])
    assert names(await receive_all(sub)) == ["BIG"]


async def test_metadata_hard_cap_closes_the_subscription() -> None:
    stream = Stream("s", max_metadata_types=3)
    sub = stream.subscribe(bounds=QueueBounds(max_frames=4, max_metadata_frames=3))
    # Three types fill the cache (and the cap); a fourth metadata frame queued passes the cap.
    await stream.publish([meta(f"T{i}", f"M{i}") for i in range(3)] + [meta("T0", "M0 again")])
    assert sub.closed
    assert "hard cap" in (sub.close_reason or "")
    with pytest.raises(SubscriptionClosed) as info:
        await sub.receive_batch()
    assert not info.value.graceful
    assert sub not in stream.subscriptions
    # Other subscribers are unaffected.
    other = stream.subscribe(bounds=QueueBounds(max_metadata_frames=10))
    assert len(await receive_all(other)) == 3


async def test_a_full_metadata_cache_never_cuts_a_new_subscriber_off() -> None:
    """The per-subscriber metadata cap is raised to the cache's bounds, whatever is configured."""
    stream = Stream("s", max_metadata_types=3, max_metadata_bytes=300)
    await stream.publish([meta(f"T{i}", f"M{i}", size=100) for i in range(3)])
    sub = stream.subscribe(bounds=QueueBounds(max_metadata_frames=1, max_metadata_bytes=250))
    assert not sub.closed
    assert [f.type for f in await receive_all(sub)] == ["T0", "T1", "T2"]


async def test_metadata_cache_refuses_a_type_past_its_bound() -> None:
    stream = Stream("s", max_metadata_types=2)
    sub = stream.subscribe()
    with pytest.raises(MetadataLimitExceeded, match=r"'s'.*'T2'.*bound of 2 metadata types"):
        await stream.publish(
            [meta("T0", "a"), data("D0"), meta("T1", "b"), meta("T2", "c"), data("D1")]
        )
    # What came before the refused frame was published; it and what followed were not.
    assert names(await receive_all(sub)) == ["a", "D0", "b"]
    assert stream.metadata_refused == 1
    # Newer frames of known types still replace the cached ones; data still flows.
    await stream.publish([meta("T0", "a2"), data("D2")])
    assert names(list(stream.metadata)) == ["a2", "b"]
    assert names(await receive_all(sub)) == ["a2", "D2"]


async def test_metadata_cache_refuses_bytes_past_its_bound() -> None:
    stream = Stream("s", max_metadata_bytes=250)
    await stream.publish([meta("T0", "a", size=100), meta("T1", "b", size=100)])
    with pytest.raises(MetadataLimitExceeded, match="250 bytes"):
        await stream.publish([meta("T2", "c", size=100)])
    # Replacing a type by a frame of the same size fits; a bigger one does not.
    await stream.publish([meta("T1", "b2", size=100)])
    with pytest.raises(MetadataLimitExceeded):
        stream.publish_nowait([meta("T1", "b3", size=200)])
    assert len(stream.metadata) == 2
    assert stream.metadata.nbytes <= 250


async def test_registry_applies_stream_settings() -> None:
    registry = StreamRegistry()
    registry.configure({"cam": StreamConfig(max_metadata_types=5, max_metadata_bytes=1000)})
    assert registry.get("cam").metadata.max_types == 5
    assert registry.get("other").metadata.max_types == StreamConfig().max_metadata_types
    registry.configure({"other": StreamConfig(max_metadata_types=7)})
    assert registry.get("other").metadata.max_types == 7
    assert registry.get("cam").metadata.max_bytes == StreamConfig().max_metadata_bytes


async def test_lossless_publisher_waits_for_room() -> None:
    stream = Stream("s")
    sub = stream.subscribe(bounds=QueueBounds(max_frames=2), policy=Policy.LOSSLESS)
    published = trio.Event()

    async def publisher() -> None:
        await stream.publish([data(f"D{i}") for i in range(5)])
        published.set()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(publisher)
            await trio.testing.wait_all_tasks_blocked()
            assert not published.is_set()
            assert sub.queued_frames == 2
            received: list[Frame] = []
            while len(received) < 5:
                received += await sub.receive_batch(max_frames=1)
                assert sub.queued_frames <= 2
    assert published.is_set()
    assert names(received) == [f"D{i}" for i in range(5)]
    assert sub.frames_dropped == 0


async def test_a_waiting_publisher_queues_after_the_consumer_emptied_the_queue() -> None:
    """The consumer takes everything (an empty subscription lets go of its queue's storage)
    while the publisher waits for room: what it queues next still arrives, in order."""
    stream = Stream("s")
    sub = stream.subscribe(bounds=QueueBounds(max_frames=2), policy=Policy.LOSSLESS)
    received: list[Frame] = []
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.publish, [data(f"D{i}") for i in range(7)])
            while len(received) < 7:
                await trio.testing.wait_all_tasks_blocked()
                received += await sub.receive_batch()  # all that is queued
                assert sub.queued_frames == 0 or len(received) < 7
    assert names(received) == [f"D{i}" for i in range(7)]
    # And the lossy path after an emptied queue, metadata first as ever.
    stream = Stream("lossy")
    lossy = stream.subscribe()
    stream.publish_nowait([meta("m", "M1"), data("A")])
    assert names(await lossy.receive_batch()) == ["M1", "A"]
    stream.publish_nowait([data("B")])
    assert names(await lossy.receive_batch()) == ["B"]
    lossy.close("done")
    assert lossy.queued_frames == 0


async def test_lossless_publisher_is_released_when_the_subscriber_leaves() -> None:
    stream = Stream("s")
    sub = stream.subscribe(bounds=QueueBounds(max_frames=1), policy=Policy.LOSSLESS)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.publish, [data("a"), data("b"), data("c")])
            await trio.testing.wait_all_tasks_blocked()
            sub.close("client gone")
    assert stream.subscriptions == []


async def test_the_batch_being_published_reaches_lossy_subscribers_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stream = Stream("s")
    lossy = stream.subscribe(bounds=QueueBounds(max_frames=100))
    stream.subscribe(bounds=QueueBounds(max_frames=1), policy=Policy.LOSSLESS)
    with trio.move_on_after(1):
        await stream.publish([data(f"D{i}") for i in range(10)])
    assert lossy.queued_frames == 10


async def test_a_full_lossless_subscriber_holds_back_lossy_subscribers_of_its_stream() -> None:
    """The documented behaviour (docs/configuration.md, ``policy = "lossless"``): while a
    lossless queue is full the publisher waits, so no later frame reaches anyone on the stream,
    lossy subscribers included; once it drains, they get every frame again."""
    stream = Stream("s")
    lossy = stream.subscribe(bounds=QueueBounds(max_frames=100))
    lossless = stream.subscribe(bounds=QueueBounds(max_frames=2), policy=Policy.LOSSLESS)
    sent = [f"D{i}" for i in range(6)]

    async def producer() -> None:
        for name in sent:
            await stream.publish([data(name)])

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(producer)
            await trio.testing.wait_all_tasks_blocked()
            # D0, D1 fill the lossless queue; the producer waits in publish(D2), which was
            # offered to the lossy subscriber before the wait. Nothing after it arrives.
            assert lossless.queued_frames == 2
            assert names(await receive_all(lossy)) == ["D0", "D1", "D2"]
            await trio.testing.wait_all_tasks_blocked()
            assert lossy.queued_frames == 0
            received: list[Frame] = []
            while len(received) < len(sent):
                received += await lossless.receive_batch()
        assert names(received) == sent
        assert names(await receive_all(lossy)) == ["D3", "D4", "D5"]
    assert lossy.frames_dropped == 0


@pytest.mark.parametrize(
    ("every", "expected"),
    [(3, ["T3", "T6", "T9"]), (1, [f"T{i}" for i in range(1, 11)]), (0, [])],
)
async def test_decimation_keeps_every_nth(every: int, expected: list[str]) -> None:
    stream = Stream("s")
    sub = stream.subscribe(decimate={"T": every})
    frames = []
    for i in range(1, 11):
        frames += [data(f"T{i}", type_="T"), data(f"H{i}", type_="H")]
    frames.append(meta("T", "meta-T"))  # metadata is never decimated, even of that type
    await stream.publish(frames)
    received = names(await receive_all(sub))
    assert [n for n in received if n.startswith("T")] == expected
    assert [n for n in received if n.startswith("H")] == [f"H{i}" for i in range(1, 11)]
    assert received[-1] == "meta-T"
    assert sub.frames_decimated == 10 - len(expected)


async def test_lossless_decimation() -> None:
    stream = Stream("s")
    sub = stream.subscribe(policy=Policy.LOSSLESS, decimate={"T": 2})
    await stream.publish([data(f"T{i}", type_="T") for i in range(1, 7)])
    assert names(await receive_all(sub)) == ["T2", "T4", "T6"]


async def test_end_drains_then_closes_gracefully() -> None:
    registry = StreamRegistry()
    stream = registry.get("s")
    assert registry.get("s") is stream
    sub = stream.subscribe()
    await stream.publish([data("a"), data("b")])
    registry.end_all("shutting down")
    await stream.publish([data("c")])  # after the end: not delivered
    assert names(await sub.receive_batch()) == ["a", "b"]
    with pytest.raises(SubscriptionClosed) as info:
        await sub.receive_batch()
    assert info.value.graceful
    assert info.value.reason == "shutting down"


async def test_receive_batch_waits_for_frames_and_wakes_on_close() -> None:
    stream = Stream("s")
    sub = stream.subscribe()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def consumer() -> None:
                assert names(await sub.receive_batch()) == ["x"]
                with pytest.raises(SubscriptionClosed):
                    await sub.receive_batch()

            nursery.start_soon(consumer)
            await trio.testing.wait_all_tasks_blocked()
            stream.publish_nowait([data("x")])
            await trio.testing.wait_all_tasks_blocked()
            sub.close("bye")


async def test_counters() -> None:
    stream = Stream("s")
    sub = stream.subscribe(bounds=QueueBounds(max_frames=2))
    await stream.publish([data("a"), data("b"), data("c")])
    await receive_all(sub)
    assert (stream.frames_in, stream.bytes_in) == (3, 30)
    assert (sub.frames_out, sub.bytes_out) == (2, 20)
    assert (sub.frames_dropped, sub.bytes_dropped) == (1, 10)
    assert (sub.queued_frames, sub.queued_bytes) == (0, 0)


def test_bounds_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_frames"):
        QueueBounds(max_frames=0)


async def test_wait_handled_returns_once_the_consumer_comes_back_or_the_subscription_closes() -> (
    None
):
    stream = Stream("s")
    subscription = stream.subscribe(policy=Policy.LOSSLESS)
    frames = [Frame(FrameKind.DATA, "t", b"x", timestamp=n) for n in range(3)]
    await stream.publish(frames)
    mark = subscription.handled_mark()
    assert mark == 3
    handled: list[bool] = []

    async def waiter() -> None:
        await subscription.wait_handled(mark)
        handled.append(True)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert await subscription.receive_batch() == frames
            await trio.testing.wait_all_tasks_blocked()
            assert handled == []  # taken, not yet handled
            nursery.start_soon(subscription.receive_batch)  # back for more
            await trio.testing.wait_all_tasks_blocked()
            assert handled == [True]
            nursery.cancel_scope.cancel()
        # A closed subscription's frames are gone with it: nothing more to wait for.
        await stream.publish(frames)
        subscription.close("gone")
        await subscription.wait_handled(subscription.handled_mark() + 3)


# -- settings changed on a live subscription (a reload applied in place) -------------------


async def test_a_lowered_bound_drops_a_lossy_queues_oldest_data_at_once() -> None:
    stream = Stream("s")
    sub = stream.subscribe(bounds=QueueBounds(max_frames=5))
    await stream.publish([data("D1"), meta("C", "C1"), data("D2"), data("D3"), data("D4")])
    sub.reconfigure(bounds=QueueBounds(max_frames=2))
    assert sub.bounds.max_frames == 2
    assert (sub.queued_frames, sub.frames_dropped) == (2, 3)
    await stream.publish([data("D5")])  # and the new bound holds from then on
    assert names(await receive_all(sub)) == ["C1", "D5"]
    assert sub.frames_dropped == 4


async def test_a_lowered_bound_drops_nothing_of_a_lossless_queue_and_holds_the_publisher() -> None:
    stream = Stream("s")
    sub = stream.subscribe(bounds=QueueBounds(max_frames=4), policy=Policy.LOSSLESS)
    await stream.publish([data(f"D{i}") for i in range(4)])
    sub.reconfigure(bounds=QueueBounds(max_frames=2))
    assert (sub.queued_frames, sub.frames_dropped) == (4, 0)
    published = trio.Event()

    async def publish() -> None:
        await stream.publish([data("D4")])
        published.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(publish)
        await trio.testing.wait_all_tasks_blocked()
        assert stream.held_by == [sub.label]
        assert names(await sub.receive_batch(max_frames=2)) == ["D0", "D1"]
        await trio.testing.wait_all_tasks_blocked()
        assert not published.is_set()  # 2 queued: still no room under the new bound
        assert names(await sub.receive_batch(max_frames=1)) == ["D2"]
        with trio.fail_after(5):
            await published.wait()
    assert names(await receive_all(sub)) == ["D3", "D4"]


async def test_a_raised_bound_releases_a_waiting_lossless_publisher() -> None:
    stream = Stream("s")
    sub = stream.subscribe(bounds=QueueBounds(max_frames=1), policy=Policy.LOSSLESS)
    await stream.publish([data("D1")])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.publish, [data("D2")])
        await trio.testing.wait_all_tasks_blocked()
        assert stream.held_by == [sub.label]
        sub.reconfigure(bounds=QueueBounds(max_frames=2))
        with trio.fail_after(5):
            while stream.held_by:
                await trio.testing.wait_all_tasks_blocked()
    assert names(await receive_all(sub)) == ["D1", "D2"]


async def test_changed_decimation_goes_on_counting_where_it_was() -> None:
    stream = Stream("s")
    sub = stream.subscribe(decimate={"d": 2})
    await stream.publish([data(f"D{i}") for i in range(1, 4)])  # keeps D2
    sub.reconfigure(decimate={"d": 3, "e": 0})
    await stream.publish([data(f"D{i}") for i in range(4, 8)] + [data("E", type_="e")])
    sub.reconfigure(decimate={})
    await stream.publish([data("D8")])
    assert names(await receive_all(sub)) == ["D2", "D6", "D8"]
    assert sub.frames_decimated == 6
    with pytest.raises(ValueError, match=r"decimate\.d must be 0 or more"):
        sub.reconfigure(decimate={"d": -1})
    assert sub.decimate == {}


async def test_follows_end_can_change() -> None:
    stream = Stream("s")
    sub = stream.subscribe()
    sub.reconfigure(follows_end=True)
    stream.end_of_stream("done")
    with pytest.raises(SubscriptionClosed, match="done"):
        await sub.receive_batch()
