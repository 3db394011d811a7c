"""Stream history and rewind through a real daemon and real sockets: the seam with the live
stream, the metadata at the point, pacing, restarts, refusals, old clients, transports.

Frames are published into the daemon's stream by the test, and the history's arrival clock
is replaced by one the test moves 50 ms per frame: a 20 frame/s stream without waiting for
it (the rewind itself runs on real sockets and the real worker threads)."""

from __future__ import annotations

import datetime
import logging
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from framewire import Frame, FrameKind
from framewire.client import (
    Client,
    FramesLost,
    Gap,
    RewindRefused,
    RewindStart,
    open_client,
    rewind_request,
)
from framewire.daemon import Daemon
from framewire.daemon.history import HistoryWriter
from framewire.daemon.status import build_snapshot
from framewire.protocols.native import KIND_REQUEST, encode_control

from .helpers import connect, endpoint_port, running_daemon, wait_until
from .test_tls_unix import Pki, tmp  # noqa: F401 - tmp is a fixture

S = 1_000_000_000
T0 = 1_800_000_000 * S
STEP = S // 20  # 20 frames a second

CONFIG = """
[streams.s.history]
max_bytes = "16MiB"
path = "{path}"

[endpoints.out]
kind = "server"
listen = "{listen}"
protocol = "native"
stream = "s"
max_queue_frames = 100000
{extra}
"""


class FakeArrival:
    """The history's arrival clock, moved by the test."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


def data(i: int) -> Frame:
    return Frame(FrameKind.DATA, "d", b"x" * 32, i, {"seq": str(i)})


def cal(version: int) -> Frame:
    return Frame(FrameKind.METADATA, "cal", b"cal%d" % version, 0)


@asynccontextmanager
async def daemon_with_history(
    directory: Path, listen: str = "tcp://127.0.0.1:0", extra: str = ""
) -> AsyncIterator[tuple[Daemon, FakeArrival]]:
    config = CONFIG.format(path=directory / "history", listen=listen, extra=extra)
    async with running_daemon(config) as daemon:
        clock = FakeArrival()
        daemon.histories["s"].clock = clock  # type: ignore[assignment]
        yield daemon, clock


async def publish(daemon: Daemon, clock: FakeArrival, first: int, count: int) -> None:
    """Frames ``first`` .. ``first + count - 1``, one per 50 ms of arrival time; a new
    calibration at frame 150."""
    stream = daemon.streams.get("s")
    for i in range(first, first + count):
        if i == 150:
            await stream.publish([cal(2)])
        await stream.publish([data(i)])
        clock.now += STEP


async def written(daemon: Daemon) -> None:
    writer = daemon.histories["s"]
    with trio.fail_after(10):
        await writer.wait_written(writer.assigned)


def seqs(frames: list[Frame]) -> list[int]:
    return [int(frame.headers["seq"]) for frame in frames if not frame.is_metadata]


async def receive(client: Client, count: int) -> list[Frame]:
    frames: list[Frame] = []
    with trio.fail_after(20):
        while len(frames) < count:
            frames.append(await client.receive())
    return frames


def address_of(daemon: Daemon) -> str:
    return f"tcp://127.0.0.1:{endpoint_port(daemon, 'out')}"


async def rewind_10s_while_live(tmp_path: Path) -> tuple[list[Frame], RewindStart | None]:
    """A client rewinds 10 s of a 20 frame/s stream (metadata, then 400 frames) while the
    producer goes on (1,000 more): the frames it gets (metadata first), and its rewind's
    start."""
    async with daemon_with_history(tmp_path) as (daemon, clock):
        await daemon.streams.get("s").publish([cal(1)])
        await publish(daemon, clock, 0, 400)  # 20 s at 20 frames/s
        await written(daemon)
        async with trio.open_nursery() as nursery:
            # The producer goes on while the client rewinds: the seam falls somewhere in it.
            async def go_on() -> None:
                for start in range(400, 1400, 10):
                    await publish(daemon, clock, start, 10)
                    await trio.sleep(0.001)

            async with open_client(address_of(daemon), since=10) as client:
                nursery.start_soon(go_on)
                frames = await receive(client, 1 + 1200)
    return frames, client.rewind


async def test_rewind_10s_then_live_without_gap_or_duplicate(tmp_path: Path) -> None:
    frames, rewind = await rewind_10s_while_live(tmp_path)
    assert rewind is not None
    assert rewind.start_ns == T0 + 200 * STEP
    assert not rewind.clamped
    # The calibration current 10 s back (the second one), then every frame once.
    assert frames[0] == cal(2)
    assert seqs(frames[1:]) == list(range(200, 1400))
    assert all(not frame.is_metadata for frame in frames[1:])


async def test_the_metadata_comes_in_order_within_the_replay(tmp_path: Path) -> None:
    async with daemon_with_history(tmp_path) as (daemon, clock):
        await daemon.streams.get("s").publish([cal(1)])
        await publish(daemon, clock, 0, 200)
        await written(daemon)
        async with open_client(address_of(daemon), since=(clock.now - (T0 + 140 * STEP)) / S) as c:
            frames = await receive(c, 1 + 10 + 1 + 50)
        assert frames[0] == cal(1)
        assert seqs(frames[1:11]) == list(range(140, 150))
        assert frames[11] == cal(2)
        assert seqs(frames[12:]) == list(range(150, 200))


async def test_a_time_given_as_a_datetime(tmp_path: Path) -> None:
    async with daemon_with_history(tmp_path) as (daemon, clock):
        await publish(daemon, clock, 0, 100)
        await written(daemon)
        when = datetime.datetime.fromtimestamp((T0 + 60 * STEP) / S, tz=datetime.UTC)
        async with open_client(address_of(daemon), since=when) as client:
            frames = await receive(client, 40)
            assert client.rewind is not None
            assert client.rewind.asked_ns == T0 + 60 * STEP
        assert seqs(frames) == list(range(60, 100))


async def test_original_rate_paces_the_replay(tmp_path: Path) -> None:
    async with daemon_with_history(tmp_path) as (daemon, clock):
        await publish(daemon, clock, 0, 200)
        await written(daemon)
        # 5 s of history at 10 times the original speed: the last frame (4.95 s after the
        # first) no sooner than 0.495 s after the request.
        began = trio.current_time()
        async with open_client(address_of(daemon), since=5, rate=10) as client:
            first = await receive(client, 1)
            rest = await receive(client, 100)  # with the calibration at 150
            took = trio.current_time() - began
            assert client.rewind is not None
            assert client.rewind.rate == "10"
        assert seqs(first + rest) == list(range(100, 200))
        assert took >= 99 * STEP / S / 10


async def test_restart_keeps_the_history(tmp_path: Path) -> None:
    async with daemon_with_history(tmp_path) as (daemon, clock):
        await daemon.streams.get("s").publish([cal(1)])
        await publish(daemon, clock, 0, 100)
        await written(daemon)
    async with daemon_with_history(tmp_path) as (daemon, clock):
        clock.now = T0 + 200 * STEP
        await publish(daemon, clock, 100, 20)
        await written(daemon)
        async with open_client(address_of(daemon), since=3600) as client:
            frames = await receive(client, 1 + 120)
            assert client.rewind is not None
            assert client.rewind.clamped  # the history starts later than an hour back
        assert frames[0] == cal(1)  # from the first run, on disk
        assert seqs(frames[1:]) == list(range(120))


async def test_refusals_are_clear(tmp_path: Path) -> None:
    async with daemon_with_history(tmp_path) as (daemon, clock):
        await publish(daemon, clock, 0, 10)
        future = datetime.datetime.fromtimestamp((clock.now + 3600 * S) / S, tz=datetime.UTC)
        for since, rate, why in (
            (future, "full", "in the future"),
            (1, "1e9", "at most 1000"),
            (1, "0", "above 0"),
            (1, "fast", "expected full, original or a factor"),
        ):
            async with open_client(address_of(daemon), since=since, rate=rate) as client:
                with trio.fail_after(10), pytest.raises(RewindRefused, match=why):
                    await client.receive()


async def test_an_oversized_request_closes_the_connection(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="framewire")
    async with daemon_with_history(tmp_path) as (daemon, clock):
        await publish(daemon, clock, 0, 10)
        peer = await connect(endpoint_port(daemon, "out"))
        # Headers 60 KiB long: over the 4 KiB a request may have. One log line, closed.
        big = encode_control(KIND_REQUEST, {"a": "b"})[:28]
        big = big[:8] + (60_000).to_bytes(4, "little") + big[12:]
        await peer.stream.send_all(big)
        with trio.fail_after(10):
            assert await peer.read_to_end() == []
        await peer.stream.aclose()
    bad = [r.getMessage() for r in caplog.records if "bad request" in r.getMessage()]
    assert len(bad) == 1
    assert "a control frame of 60028 bytes (at most 4096)" in bad[0]


async def test_an_old_client_that_sends_nothing_is_served_as_ever(tmp_path: Path) -> None:
    async with daemon_with_history(tmp_path) as (daemon, clock):
        await daemon.streams.get("s").publish([cal(1)])
        await publish(daemon, clock, 0, 10)
        peer = await connect(endpoint_port(daemon, "out"))
        await wait_until(lambda: len(daemon.endpoints["out"].status.clients) == 1)
        await publish(daemon, clock, 10, 5)
        with trio.fail_after(10):
            frames = await peer.read(6)
        assert frames[0] == cal(1)
        assert seqs(frames[1:]) == list(range(10, 15))
        await peer.stream.aclose()


async def test_a_server_without_history_does_not_answer(tmp_path: Path) -> None:
    config = CONFIG.replace("[streams.s.history]", "[streams.other.history]").format(
        path=tmp_path / "h", listen="tcp://127.0.0.1:0", extra=""
    )
    async with running_daemon(config) as daemon:
        await daemon.streams.get("s").publish([cal(1)])
        async with open_client(address_of(daemon), since=10) as client:
            with trio.fail_after(10), pytest.raises(RewindRefused, match="did not answer"):
                await client.receive()


async def test_rewind_over_unix_and_tls(tmp: Path) -> None:  # noqa: F811 - the fixture
    pki = Pki(tmp)
    tls = f'[endpoints.out.tls]\ncertificate = "{pki.server_cert}"\nkey = "{pki.server_cert}"'
    context = ssl.create_default_context(cafile=pki.ca_file)
    for listen, extra in ((f"unix://{tmp}/out.sock", ""), ("tls://127.0.0.1:0", tls)):
        async with daemon_with_history(tmp / listen[:3], listen, extra) as (daemon, clock):
            await publish(daemon, clock, 0, 100)
            await written(daemon)
            address = listen if listen.startswith("unix") else address_of(daemon)
            address = address.replace("tcp://", "tls://")
            kwargs = {"ssl_context": context} if "tls" in address else {}
            async with open_client(address, since=1, **kwargs) as client:  # type: ignore[arg-type]
                frames = await receive(client, 20)
        assert seqs(frames) == list(range(80, 100))


def test_the_request_frame() -> None:
    with pytest.raises(ValueError, match="time zone"):
        rewind_request(datetime.datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="0 or more"):
        rewind_request(-1)
    assert rewind_request(0.5, "original")[3] == KIND_REQUEST


async def test_history_figures(tmp_path: Path) -> None:
    async with daemon_with_history(tmp_path) as (daemon, clock):
        await publish(daemon, clock, 0, 100)
        await written(daemon)
        writer: HistoryWriter = daemon.histories["s"]
        detail = writer.detail()
        assert detail["frames_dropped"] == 0
        assert detail["queued_frames"] == 0
        assert detail["span_seconds"] == pytest.approx(99 * STEP / S)


async def run_recv(*args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(30):
        return await trio.run_process(
            [sys.executable, "-m", "framewire", "recv", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


async def test_framewire_recv_since(tmp: Path) -> None:  # noqa: F811 - the fixture
    pki = Pki(tmp)
    tls = f'[endpoints.out.tls]\ncertificate = "{pki.server_cert}"\nkey = "{pki.server_cert}"'
    for listen, extra in (
        ("tcp://127.0.0.1:0", ""),
        (f"unix://{tmp}/out.sock", ""),
        ("tls://127.0.0.1:0", tls),
    ):
        async with daemon_with_history(tmp / listen[:3], listen, extra) as (daemon, clock):
            await daemon.streams.get("s").publish([cal(1)])
            await publish(daemon, clock, 0, 100)
            await written(daemon)
            address = listen
            if not listen.startswith("unix"):
                address = address_of(daemon).replace("tcp://", listen[:6])
            ca = ["--ca", pki.ca_file] if listen.startswith("tls") else []
            done = await run_recv(address, *ca, "--since", "2s", "--count", "41")
            assert done.returncode == 0, done.stderr
            lines = done.stdout.decode().splitlines()
            assert lines[0].split()[:2] == ["METADATA", "cal"]
            assert [int(line.split()[-1]) for line in lines[1:]] == list(range(60, 100))
            assert "framewire recv: rewound to 2027-01-15T08:00:03.000Z" in done.stderr.decode()
            refused = await run_recv(address, *ca, "--since", "2s", "--rate", "1e9")
            assert refused.returncode != 0
            assert "the server refused the rewind: rate '1e9'" in refused.stderr.decode()


async def test_framewire_recv_since_usage() -> None:
    done = await run_recv("tcp://127.0.0.1:9", "--since", "2026-12-07T10:00:00")
    assert done.returncode == 2
    assert b"give the time zone" in done.stderr
    done = await run_recv("tcp://127.0.0.1:9", "--rate", "original")
    assert b"--rate: applies to --since only" in done.stderr


async def test_status_shows_the_history(tmp_path: Path) -> None:
    async with daemon_with_history(tmp_path) as (daemon, clock):
        await publish(daemon, clock, 0, 20)
        await written(daemon)
        streams = build_snapshot(daemon)["streams"]
        history = streams["s"]["history"]
        assert history["frames_dropped"] == 0
        assert history["oldest_ns"] == T0
        assert history["newest_ns"] == T0 + 19 * STEP
        assert history["bytes"] > 20 * 60


GAP_SERVER = """
[endpoints.out]
kind = "server"
listen = "tcp://127.0.0.1:0"
protocol = "native"
stream = "s"
max_queue_frames = 4
gap_frames = true
"""


def big(i: int) -> Frame:
    return Frame(FrameKind.DATA, "big", b"%08d" % i * (32 << 10), i)


async def flood(daemon: Daemon, count: int) -> None:
    """``count`` frames of 256 KiB, far more than the socket buffers and a queue of 4 hold."""
    stream = daemon.streams.get("s")
    for i in range(count):
        await stream.publish([big(i)])


def check_gaps(items: list[Frame | Gap], count: int) -> int:
    """Every frame once, and each gap exactly the frames missing where it stands; returns
    the frames the gaps account for."""
    lost = 0
    last = -1
    for index, item in enumerate(items):
        if isinstance(item, Gap):
            after = items[index + 1]
            assert isinstance(after, Frame)
            assert item.frames == after.timestamp - last - 1
            assert item.bytes == item.frames * big(0).size
            assert item.after_ns == max(last, 0)
            assert item.before_ns == after.timestamp
            lost += item.frames
        else:
            assert item.timestamp > last
            assert item.timestamp == last + 1 or isinstance(items[index - 1], Gap)
            last = item.timestamp
    assert last == count - 1
    assert lost + sum(1 for item in items if not isinstance(item, Gap)) == count
    return lost


async def test_gap_frames_tell_a_slow_client_exactly_what_it_lost() -> None:
    async with running_daemon(GAP_SERVER) as daemon:
        async with open_client(address_of(daemon), gaps=True) as client:
            await wait_until(lambda: len(daemon.endpoints["out"].status.clients) == 1)
            await flood(daemon, 200)
            items: list[Frame | Gap] = []
            with trio.fail_after(30):
                while not items or isinstance(items[-1], Gap) or items[-1].timestamp < 199:
                    items.append(await client.receive_with_gaps())
        assert check_gaps(items, 200) > 0


async def test_receive_raises_frames_lost_and_goes_on() -> None:
    async with running_daemon(GAP_SERVER) as daemon:
        async with open_client(address_of(daemon), gaps=True) as client:
            await wait_until(lambda: len(daemon.endpoints["out"].status.clients) == 1)
            await flood(daemon, 100)
            items: list[Frame | Gap] = []
            with trio.fail_after(30):
                while not items or isinstance(items[-1], Gap) or items[-1].timestamp < 99:
                    try:
                        items.append(await client.receive())
                    except FramesLost as lost:
                        items.append(lost.gap)
        assert check_gaps(items, 100) > 0


async def test_a_client_that_did_not_ask_gets_no_gap_frames() -> None:
    async with running_daemon(GAP_SERVER) as daemon:
        peer = await connect(endpoint_port(daemon, "out"))
        await wait_until(lambda: len(daemon.endpoints["out"].status.clients) == 1)
        await flood(daemon, 100)
        daemon.streams.get("s").end_subscriptions("done")
        with trio.fail_after(30):
            frames = await peer.read_to_end()  # a NOTICE would be a protocol error here
        await peer.stream.aclose()
        assert frames[-1].timestamp == 99
        assert len(frames) < 100


async def test_framewire_recv_gaps_prints_them() -> None:
    async with running_daemon(GAP_SERVER) as daemon:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "framewire", "recv", address_of(daemon), "--gaps"],
            stdout=subprocess.PIPE,
        )
        try:
            await wait_until(lambda: len(daemon.endpoints["out"].status.clients) == 1)
            process.send_signal(signal.SIGSTOP)  # a reader that stalls
            await flood(daemon, 100)
            process.send_signal(signal.SIGCONT)
            daemon.streams.get("s").end_subscriptions("done")
            assert process.stdout is not None
            output = b""
            with trio.fail_after(30):
                while chunk := await process.stdout.receive_some(1 << 16):
                    output += chunk
                await process.wait()
        finally:
            process.kill()
            await process.wait()
    items: list[Frame | Gap] = []
    for line in output.decode().splitlines():
        words = line.split()
        if words[0] == "GAP":
            items.append(Gap(int(words[1]), int(words[3][1:]), int(words[-3]), int(words[-1])))
        else:
            items.append(big(int(words[-1])))
    assert check_gaps(items, 100) > 0


async def test_replay_gives_a_client_that_asks_nothing_the_last_seconds(tmp_path: Path) -> None:
    async with daemon_with_history(tmp_path, extra='replay = "2s"') as (daemon, clock):
        await daemon.streams.get("s").publish([cal(1)])
        await publish(daemon, clock, 0, 100)
        await written(daemon)
        peer = await connect(endpoint_port(daemon, "out"))  # an old client: no request
        await wait_until(lambda: len(daemon.endpoints["out"].status.clients) == 1)
        await publish(daemon, clock, 100, 10)
        with trio.fail_after(10):
            frames = await peer.read(1 + 50)
        await peer.stream.aclose()
        # No NOTICE (it did not ask): the metadata current 2 s back, 40 frames, then live.
        assert frames[0] == cal(1)
        assert seqs(frames[1:]) == list(range(60, 110))
