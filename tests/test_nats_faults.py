"""The NATS endpoint under the faults a site's link meets, against a real nats-server: a link
whose acks stall for longer than the stream's duplicate_window, a stream whose bounds discard
what a reader has not read, a metadata frame the far stream refuses. Each test checks what
the operator is told (counters, log lines) as strictly as what is delivered.

The stalls are real time (the server's duplicate_window is), so these tests last a few
seconds each; nothing in them asserts on time.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from framewire import Frame, FrameKind
from framewire.config import parse_config
from framewire.daemon import Daemon

from .helpers import connect, endpoint_port, running_daemon, wait_until
from .nats_helpers import (
    PATIENCE,
    NatsServer,
    StallingProxy,
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


def stored_ids(url: str, stream: str = "FW_camera") -> list[str]:
    """The Nats-Msg-Id of every message the JetStream stream holds, in order."""

    async def main() -> list[str]:
        client = await nats.connect(url)
        try:
            js = client.jetstream()
            info = await js.stream_info(stream)
            ids = []
            for sequence in range(info.state.first_seq, info.state.last_seq + 1):
                message = await js.get_msg(stream, sequence)
                ids.append((message.headers or {}).get("Nats-Msg-Id", ""))
            return ids
        finally:
            await client.close()

    return asyncio.run(main())


#: A durable JetStream reader that reads the whole stream.
DURABLE = 'durable = "archive"\nstart = "all"'


@asynccontextmanager
async def durable_pair(url: str) -> AsyncIterator[tuple[Daemon, Daemon]]:
    """Daemon A publishing to JetStream at ``url`` and daemon B reading it with the durable
    consumer ``archive``, each once its endpoint is publishing / subscribed."""
    async with (
        running_daemon(publisher_toml(url, mode="jetstream")) as a,
        running_daemon(subscriber_toml(url, mode="jetstream", extra=DURABLE)) as b,
    ):
        await wait_state(nats_endpoint(a, "to-nats"), "publishing")
        await wait_state(nats_endpoint(b, "from-nats"), "subscribed")
        yield a, b


async def test_acks_stalled_past_the_duplicate_window_deliver_each_frame_once(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Daemon A publishes at full rate through a link whose server-to-client direction
    stalls for 6 s, three times the 2 s duplicate_window, with several publish windows in
    flight. A's retries of publishes whose acks were stuck come back after the server has
    forgotten their ids, so the stream holds them twice; daemon B, reading it, drops each
    second copy by the publisher's own numbers and says how many it dropped."""
    caplog.set_level(logging.INFO, logger="framewire")
    url = nats_server.url
    sent = frames_of(3000, size=4096)
    publisher = 'duplicate_window = "2s"\nack_timeout = "1s"\nmax_inflight_bytes = "1MiB"'
    async with trio.open_nursery() as nursery:
        proxy = StallingProxy(nats_server.port)
        await nursery.start(proxy.run)
        proxied = f"nats://127.0.0.1:{proxy.port}"
        async with running_daemon(publisher_toml(proxied, mode="jetstream", extra=publisher)) as a:
            writer = nats_endpoint(a, "to-nats")
            await wait_state(writer, "publishing")
            async with producer(a) as source:

                async def send_all() -> None:
                    for start in range(0, len(sent), 100):
                        await source.send(sent[start : start + 100])

                nursery.start_soon(send_all)
                await wait_until(lambda: writer.status.frames_out >= 500)
                proxy.hold(upstream=False)  # the acks stall; publishes still reach the server
                await wait_until(lambda: count(writer, "acks_pending") > 0)
                await trio.sleep(6)  # three duplicate windows
                proxy.resume()
                with trio.fail_after(4 * PATIENCE):
                    await writer.wait_for_state("publishing")
                await wait_until(lambda: writer.status.frames_out == len(sent), patience=60)
        nursery.cancel_scope.cancel()
    ids = await trio.to_thread.run_sync(stored_ids, url)
    twice = sum(n - 1 for n in Counter(ids).values())
    assert twice > 0, "the stall stored nothing twice: the test did not make its fault"
    async with running_daemon(subscriber_toml(url, mode="jetstream", extra=DURABLE)) as b:
        reader = nats_endpoint(b, "from-nats")
        client = await connect(endpoint_port(b, "out"))
        got = await read(client, len(sent))
        await wait_until(lambda: count(reader, "duplicates_dropped") == twice, patience=60)
        await client.stream.aclose()
        metrics = b.metrics.exposition().decode()
    assert f'framewire_nats_duplicates_dropped_total{{endpoint="from-nats"}} {twice}.0' in metrics
    assert got == sent
    assert count(reader, "frames_lost_upstream") == 0
    assert count(reader, "messages_lost_upstream") == 0
    assert not [r for r in caplog.records if "lost upstream" in r.getMessage()]


async def test_frames_the_stream_discards_before_they_are_read_are_counted_and_logged(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A reader away while the stream's max_bytes discards the oldest frames is told, on
    its return, exactly how many frames of the publisher never came, in one WARNING with
    the ranges; what the stream still held arrives once, in order."""
    caplog.set_level(logging.INFO, logger="framewire")
    url = nats_server.url
    first = frames_of(100, size=1000)
    later = frames_of(2000, start=100, size=1000)
    limited = 'max_bytes = "256KiB"'
    async with running_daemon(publisher_toml(url, mode="jetstream", extra=limited)) as a:
        writer = nats_endpoint(a, "to-nats")
        await wait_state(writer, "publishing")
        async with producer(a) as source:
            reader_toml = subscriber_toml(url, mode="jetstream", extra=DURABLE + "\n" + limited)
            async with running_daemon(reader_toml) as b:
                client = await connect(endpoint_port(b, "out"))
                await source.send(first)
                assert await read(client, len(first)) == first
                reader = nats_endpoint(b, "from-nats")
                # Acknowledged (and kept) before B goes away.
                await wait_until(lambda: count(reader, "consumer_pending") == 0)
                await client.stream.aclose()
            await source.send(later)
            await wait_until(lambda: writer.status.frames_out == len(first) + len(later))
    held = await trio.to_thread.run_sync(messages_held, url)
    async with running_daemon(reader_toml) as b:
        reader = nats_endpoint(b, "from-nats")
        client = await connect(endpoint_port(b, "out"))
        # The frames the stream still holds: a tail of ``later``.
        got = await read(client, held)
        await wait_until(lambda: any("lost upstream" in r.getMessage() for r in caplog.records))
        await client.stream.aclose()
        metrics = b.metrics.exposition().decode()
    lost = len(later) - len(got)
    assert 0 < lost < len(later)
    assert got == later[lost:]
    assert count(reader, "frames_lost_upstream") == lost
    assert count(reader, "duplicates_dropped") == 0
    lines = [r.getMessage() for r in caplog.records if "lost upstream" in r.getMessage()]
    assert len(lines) == 1, lines
    assert f"frames {len(first)} to {len(first) + lost - 1} of publisher" in lines[0]
    assert f"({lost} frames;" in lines[0]
    assert f"discarded {lost} messages" in lines[0]
    assert f'framewire_nats_frames_lost_total{{endpoint="from-nats"}} {lost}.0' in metrics
    assert f'framewire_nats_messages_lost_total{{endpoint="from-nats"}} {lost}.0' in metrics


@pytest.mark.parametrize("mode", ["core", "jetstream"])
async def test_a_refused_metadata_frame_drops_only_itself(
    nats_server: NatsServer, mode: str
) -> None:
    """Daemon B's stream keeps two metadata types; the third type, arriving over NATS in
    one batch with data after it, is refused alone and counted: the data still arrives."""
    url = nats_server.url
    metadata = [Frame(FrameKind.METADATA, name, name.encode(), 1) for name in "ABC"]
    data = frames_of(10)
    bounded = "\n[streams.camera]\nmax_metadata_types = 2\n"
    extra = DURABLE if mode == "jetstream" else ""
    async with running_daemon(publisher_toml(url, mode=mode)) as a:
        writer = nats_endpoint(a, "to-nats")
        await wait_state(writer, "publishing")
        async with running_daemon(subscriber_toml(url, mode=mode, extra=extra) + bounded) as b:
            reader = nats_endpoint(b, "from-nats")
            await wait_state(reader, "subscribed")
            client = await connect(endpoint_port(b, "out"))
            async with producer(a) as source:
                await source.send(metadata + data)
                got = await read(client, 2 + len(data))
            await wait_until(lambda: count(reader, "metadata_refused") == 1)
            await client.stream.aclose()
    assert got == metadata[:2] + data
    assert b.streams.get("camera").metadata_refused == 1


def messages_held(url: str, stream: str = "FW_camera") -> int:
    async def main() -> int:
        client = await nats.connect(url)
        try:
            info = await client.jetstream().stream_info(stream)
            return int(info.state.messages)
        finally:
            await client.close()

    return asyncio.run(main())


def stream_settings(url: str, stream: str = "FW_camera") -> tuple[int, str]:
    async def main() -> tuple[int, str]:
        client = await nats.connect(url)
        try:
            info = await client.jetstream().stream_info(stream)
            discard = info.config.discard
            return info.config.max_bytes, str(getattr(discard, "value", discard))
        finally:
            await client.close()

    return asyncio.run(main())


async def test_a_reader_never_rewrites_the_publishers_stream_and_says_how_it_differs(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The publisher owns the stream's settings; a reader that starts later with other
    settings (and the default ``create = true``) leaves them and says so in one line; a
    reader that leaves them at their defaults says nothing."""
    caplog.set_level(logging.INFO, logger="framewire")
    url = nats_server.url
    owned = 'max_bytes = "1MiB"'
    async with running_daemon(publisher_toml(url, mode="jetstream", extra=owned)) as a:
        await wait_state(nats_endpoint(a, "to-nats"), "publishing")
    assert await trio.to_thread.run_sync(stream_settings, url) == (1 << 20, "old")
    for extra in ("", 'max_bytes = "2MiB"\nmax_age = "1h"'):
        async with running_daemon(subscriber_toml(url, mode="jetstream", extra=extra)) as b:
            await wait_state(nats_endpoint(b, "from-nats"), "subscribed")
        assert await trio.to_thread.run_sync(stream_settings, url) == (1 << 20, "old")
    lines = [
        r.getMessage() for r in caplog.records if "kept as its publisher made it" in r.getMessage()
    ]
    assert lines == [
        "JetStream stream FW_camera is kept as its publisher made it: max_bytes 1MiB "
        "(configured here: 2MiB); max_age none (configured here: 1h); a reader never "
        "changes a stream's settings"
    ]


async def test_a_blackholed_link_is_stale_then_dropped_and_nothing_is_lost(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The link between daemon B and the server stops forwarding anything, both ways, for
    14 s while daemon A publishes: B says within seconds that the server does not answer
    (state ``stale``, one WARNING), drops the connection after its unanswered pings (one
    WARNING), reconnects once the link forwards again, and delivers every frame once."""
    caplog.set_level(logging.INFO, logger="framewire")
    url = nats_server.url
    sent = frames_of(2000, size=2000)
    reader_settings = (
        'durable = "archive"\nstart = "all"\nping_interval = "2s"\n'
        'max_outstanding_pings = 3\nconnect_timeout = "2s"'
    )
    async with trio.open_nursery() as nursery:
        proxy = StallingProxy(nats_server.port)
        await nursery.start(proxy.run)
        proxied = f"nats://127.0.0.1:{proxy.port}"
        async with (
            running_daemon(publisher_toml(url, mode="jetstream")) as a,
            running_daemon(subscriber_toml(proxied, mode="jetstream", extra=reader_settings)) as b,
        ):
            writer = nats_endpoint(a, "to-nats")
            reader = nats_endpoint(b, "from-nats")
            await wait_state(writer, "publishing")
            await wait_state(reader, "subscribed")
            client = await connect(endpoint_port(b, "out"))
            async with producer(a) as source:
                await source.send(sent[:500])
                assert await read(client, 500) == sent[:500]
                proxy.hold()
                await source.send(sent[500:])
                await wait_state(reader, "stale")
                assert b.endpoints["from-nats"].status.state == "stale"
                await wait_state(reader, "disconnected")
                await trio.sleep(6)  # longer than the pings and the connect timeout
                proxy.resume()
                got = await read(client, len(sent))
                await client.stream.aclose()
            await wait_state(reader, "subscribed")
        nursery.cancel_scope.cancel()
    assert got == sent
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    stale = [line for line in warnings if "has not answered for" in line]
    assert len(stale) == 1, warnings
    assert "the link may be down" in stale[0]
    dropped = [line for line in warnings if line.startswith("disconnected from NATS")]
    assert len(dropped) == 1, warnings


async def test_core_flow_control_keeps_a_reader_of_mebibyte_frames_from_being_cut_off(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Core NATS, 1 MiB frames as fast as the producer can send them: with flow_control the
    publisher stays within 16 MiB of its reader, so the server never has 64 MiB (its
    max_pending) queued for it and never cuts it off; every frame arrives."""
    caplog.set_level(logging.WARNING, logger="framewire")
    url = nats_server.url
    sent = frames_of(300, size=1 << 20)
    publisher = 'flow_control = true\npolicy = "lossless"'
    async with (
        running_daemon(publisher_toml(url, mode="core", extra=publisher)) as a,
        running_daemon(subscriber_toml(url, mode="core")) as b,
    ):
        writer = nats_endpoint(a, "to-nats")
        reader = nats_endpoint(b, "from-nats")
        await wait_state(writer, "publishing")
        await wait_state(reader, "subscribed")
        client = await connect(endpoint_port(b, "out"))
        async with producer(a) as source, trio.open_nursery() as nursery:
            nursery.start_soon(source.send, sent)
            got = await read(client, len(sent))
        await client.stream.aclose()
        assert count(writer, "flow_readers") == 1
    assert got == sent
    assert count(reader, "reconnects") == 0
    assert reader.status.frames_dropped == 0
    assert not [r for r in caplog.records if "disconnected" in r.getMessage()]


def test_reader_credit_ignores_garbage_and_waits_only_for_live_readers() -> None:
    from framewire.daemon.nats._publisher import FLOW_WINDOW, ReaderCredit

    async def main() -> None:
        credit = ReaderCredit()
        credit.sent = 3 * FLOW_WINDOW
        for garbage in (b"", b"x", b"abc 12 3", b"ABC 1", b"a " + b"9" * 30):
            credit.heard(garbage)
        assert credit.readers == 0
        assert not await credit.room(1)  # nobody to wait for
        credit.heard(b"ab12 10")
        assert credit.readers == 1
        with trio.move_on_after(1) as waiting:
            await credit.room(1)
        assert waiting.cancelled_caught  # 3 windows ahead of the reader: it waits
        credit.heard(b"ab12 " + str(3 * FLOW_WINDOW).encode())
        assert not await credit.room(2 * FLOW_WINDOW)  # caught up: even a big batch goes

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def readers_record(url: str) -> bytes | None:
    async def main() -> bytes | None:
        client = await nats.connect(url)
        try:
            kv = await client.jetstream().key_value("FW_camera_READERS")
            entry = await kv.get("archive")
            return bytes(entry.value or b"")
        except Exception:
            return None
        finally:
            await client.close()

    return asyncio.run(main())


async def test_a_reader_that_cannot_open_its_bucket_at_first_tries_again(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bucket where a durable reader keeps what it handled does not open at first (a
    server busy electing a leader): one WARNING, and it is tried again, so what the reader
    handles is kept once it opens."""
    from framewire.daemon.nats import _jetstream, _subscriber

    caplog.set_level(logging.INFO, logger="framewire")
    failures = [RuntimeError("JetStream system temporarily unavailable")]
    opened = _jetstream.ReaderMarks.open

    async def flaky_open(*args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return await opened(*args, **kwargs)

    monkeypatch.setattr(_jetstream.ReaderMarks, "open", flaky_open)
    monkeypatch.setattr(_subscriber, "MARKS_RETRY", 0.0)
    url = nats_server.url
    sent = frames_of(50)
    async with durable_pair(url) as (a, b):
        client = await connect(endpoint_port(b, "out"))
        async with producer(a) as source:
            await source.send(sent)
            assert await read(client, len(sent)) == sent
        await client.stream.aclose()
        await wait_until(
            lambda: any(
                "now" in r.getMessage() and "bucket" in r.getMessage() for r in caplog.records
            )
        )
    record = await trio.to_thread.run_sync(readers_record, url)
    assert record is not None
    assert b'"producers"' in record
    warned = [r for r in caplog.records if "cannot keep what this reader handled" in r.getMessage()]
    assert len(warned) == 1


@pytest.mark.parametrize("how", ["crash", "reload"])
async def test_a_restarted_reader_does_not_give_live_clients_the_metadata_again(
    nats_server: NatsServer,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    how: str,
) -> None:
    """A JetStream reader starts by publishing the metadata current where it starts reading,
    for a daemon that has none yet. When the reader endpoint starts again in a running
    daemon (after a crash, or a reload that changed it), the stream already holds that
    metadata: a live client of the stream gets it once, not once per restart."""
    from framewire.daemon.nats import _subscriber

    caplog.set_level(logging.INFO, logger="framewire")
    url = nats_server.url
    metadata = Frame(FrameKind.METADATA, "observation", b"obs-1", timestamp=1)
    before, after = frames_of(50), frames_of(50, start=50)
    save_marks = _subscriber.NatsSubscriber._save_marks
    fault: list[None] = []

    async def save_then_maybe_crash(self: Any, thread: Any, upto: Any) -> bool:
        if fault:
            fault.pop()
            raise RuntimeError("a reader's fault, for the test")
        return await save_marks(self, thread, upto)

    monkeypatch.setattr(_subscriber.NatsSubscriber, "_save_marks", save_then_maybe_crash)
    async with durable_pair(url) as (a, b):
        client = await connect(endpoint_port(b, "out"))
        async with producer(a) as source:
            await source.send([metadata, *before])
            assert await read(client, 1 + len(before)) == [metadata, *before]
            if how == "crash":
                fault.append(None)  # the next batch's marks fail: the endpoint dies
                await source.send(after[:1])
                await wait_until(
                    lambda: any(
                        "endpoint from-nats failed" in r.getMessage() for r in caplog.records
                    )
                )
            else:
                extra = DURABLE + '\nack_timeout = "3s"'
                changed = subscriber_toml(url, mode="jetstream", extra=extra)
                assert await b.reload(parse_config(changed)) == ["changed from-nats"]
            await wait_state(nats_endpoint(b, "from-nats"), "subscribed")
            await source.send(after if how == "reload" else after[1:])
            got = await read(client, 1 + len(before) + len(after))
    await client.stream.aclose()
    assert got == [metadata, *before, *after]


async def test_a_reader_that_cannot_read_a_skipped_range_tries_again_without_failing(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the reader endpoint died with a batch unacknowledged, its next run reads the
    messages the consumer skipped from the stream itself. When that read fails (a stream
    electing a leader does not answer), the endpoint says so (state ``error``, one WARNING)
    and tries again: it does not fail a second time, and every frame arrives once, in
    order."""
    from framewire.daemon.nats import _jetstream, _subscriber

    caplog.set_level(logging.INFO, logger="framewire")
    url = nats_server.url
    before, after = frames_of(50), frames_of(50, start=50)
    save_marks = _subscriber.NatsSubscriber._save_marks
    read_range = _jetstream.read_stream_range
    crash: list[None] = []
    read_faults: list[None] = []
    states: list[str] = []

    async def save_then_maybe_crash(self: Any, thread: Any, upto: Any) -> bool:
        if crash:
            crash.pop()
            read_faults.append(None)  # the next run's first read of the stream fails
            raise RuntimeError("a reader's fault, for the test")
        return await save_marks(self, thread, upto)

    async def failing_read(*args: Any, **kwargs: Any) -> Any:
        if read_faults:
            read_faults.pop()
            raise TimeoutError("the stream does not answer, for the test")
        return await read_range(*args, **kwargs)

    monkeypatch.setattr(_subscriber.NatsSubscriber, "_save_marks", save_then_maybe_crash)
    monkeypatch.setattr(_subscriber, "read_stream_range", failing_read)
    async with durable_pair(url) as (a, b):
        client = await connect(endpoint_port(b, "out"))
        async with producer(a) as source:
            await source.send(before)
            assert await read(client, len(before)) == before
            crash.append(None)
            await source.send(after[:1])
            await wait_until(
                lambda: any("endpoint from-nats failed" in r.getMessage() for r in caplog.records)
            )
            await wait_state(nats_endpoint(b, "from-nats"), "subscribed")
            reader = nats_endpoint(b, "from-nats")
            await source.send(after[1:])
            got = await read(client, len(before) + len(after))
            states.append(str(reader.status.detail.get("last_error")))
    await client.stream.aclose()
    assert got == [*before, *after]
    assert not read_faults, "the test's fault was never met: no range was read"
    failed = [r for r in caplog.records if "endpoint from-nats failed" in r.getMessage()]
    assert len(failed) == 1, [r.getMessage() for r in failed]
    warned = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "skipped by the consumer" in r.getMessage()
    ]
    assert len(warned) == 1, warned
    assert "no answer from NATS" in warned[0]
    assert states
    assert "skipped by the consumer" in states[0]
    assert count(reader, "gap_messages_read") >= 1
