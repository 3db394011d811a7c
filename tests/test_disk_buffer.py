"""Disk buffers (``[endpoints.NAME.buffer] type = "disk"``) through a real daemon and real
loopback sockets: a sender whose reader is away takes everything its producer sends onto the
disk, survives SIGKILL, and delivers it all in order to a reader that appears later;
``drop_oldest`` keeps the newest data and every metadata frame; and each fault (a full disk,
a deleted or unwritable directory, a corrupt segment, two endpoints on one directory) is one
log line and a state in status, never a crash.

The reader's port is reserved by a socket that is bound but not listening (so a connect to it
is refused), and made to listen when the test wants a reader there: nothing else can take
the port in between.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from framewire import Frame, FrameKind
from framewire.config import parse_config
from framewire.daemon import Daemon
from framewire.protocols.native import NativeDecoder

from .helpers import NativePeer, connect, encode, endpoint_port, running_daemon, wait_until
from .hostile_daemon import DaemonProcess
from .test_metrics import running, scrape, value

MIB = 1 << 20


def meta(type_: str, body: bytes) -> Frame:
    return Frame(FrameKind.METADATA, type_, body)


def data(i: int, size: int = 64) -> Frame:
    body = i.to_bytes(8, "big") * (size // 8)
    return Frame(FrameKind.DATA, "d", body, timestamp=i)


@contextmanager
def reserved_port() -> Iterator[socket.socket]:
    """A loopback socket bound to a free port but not listening: connects are refused."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock
    finally:
        sock.close()


async def accept_reader(sock: socket.socket) -> NativePeer:
    """Make the reserved socket listen; the sender's next connection, as a native peer."""
    sock.listen(1)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock.dup()))
    with trio.fail_after(30):
        stream = await listener.accept()
    await listener.aclose()
    return NativePeer(stream)


def config(port: int, directory: Path, buffer: str = "", sender: str = "") -> str:
    return f"""
[daemon]
grace_period = "2s"

[endpoints.in]
kind = "receiver"
listen = "tcp://127.0.0.1:0"
stream = "s"
max_frame_size = "4MiB"

[endpoints.out]
kind = "sender"
connect = "tcp://127.0.0.1:{port}"
stream = "s"
max_queue_frames = 64
max_queue_bytes = "4MiB"
reconnect = {{ initial = "50ms", maximum = "200ms" }}
{sender}

[endpoints.out.buffer]
type = "disk"
path = "{directory}"
{buffer}
"""


def detail(daemon: Daemon, name: str = "out") -> dict[str, object]:
    return daemon.endpoints[name].status.current_detail()


async def test_a_reader_that_comes_later_gets_everything_in_order(tmp_path: Path) -> None:
    sent = [meta("config", b"v1")] + [data(i, 4096) for i in range(2000)]
    with reserved_port() as sock:
        async with running_daemon(config(sock.getsockname()[1], tmp_path / "buf")) as daemon:
            producer = await connect(endpoint_port(daemon, "in"))
            with trio.fail_after(30):
                await producer.send(sent)  # more than the sender's queue: the disk takes it
            await wait_until(lambda: detail(daemon)["buffer_frames"] == len(sent), patience=30)
            assert detail(daemon)["buffer_state"] == "ok"
            assert daemon.endpoints["out"].status.state in ("connecting", "reconnecting")
            reader = await accept_reader(sock)
            with trio.fail_after(30):
                got = await reader.read(len(sent))
            assert got == sent
            await wait_until(lambda: detail(daemon)["buffer_frames"] == 0)
            assert detail(daemon)["buffer_dropped_frames"] == 0
            await producer.stream.aclose()
            await reader.stream.aclose()


async def test_drop_oldest_keeps_the_newest_data_and_every_metadata_frame(tmp_path: Path) -> None:
    first = [meta("config", b"v1")] + [data(i, 16384) for i in range(100)]
    second = [meta("config", b"v2"), meta("cal", b"c1")] + [data(i, 16384) for i in range(100, 200)]
    sent = first + second
    options = 'max_size = "1MiB"\nwhen_full = "drop_oldest"'
    with reserved_port() as sock:
        text = config(sock.getsockname()[1], tmp_path / "buf", options)
        async with running_daemon(text) as daemon:
            producer = await connect(endpoint_port(daemon, "in"))
            with trio.fail_after(30):
                await producer.send(sent)  # 3 MiB into 1 MiB: never held

            def settled() -> bool:
                figures = detail(daemon)
                held = figures["buffer_frames"]
                dropped = figures["buffer_dropped_frames"]
                assert isinstance(held, int)
                assert isinstance(dropped, int)
                return held + dropped == len(sent)

            await wait_until(settled, patience=30)
            figures = detail(daemon)
            assert isinstance(figures["buffer_bytes"], int)
            assert figures["buffer_bytes"] <= MIB
            dropped = figures["buffer_dropped_frames"]
            assert isinstance(dropped, int)
            assert dropped > 0
            reader = await accept_reader(sock)
            with trio.fail_after(30):
                got = await reader.read(len(sent) - dropped)
            assert [f for f in got if f.is_metadata] == [f for f in sent if f.is_metadata]
            kept = [f for f in got if not f.is_metadata]
            assert kept == [data(i, 16384) for i in range(200 - len(kept), 200)]
            # Metadata keeps its place: v2 after the data before it, before the data after it.
            v2 = got.index(meta("config", b"v2"))
            assert all(f.timestamp < 100 for f in got[:v2] if not f.is_metadata)
            assert all(f.timestamp >= 100 for f in got[v2:] if not f.is_metadata)
            await producer.stream.aclose()
            await reader.stream.aclose()


async def test_a_memory_buffer_that_drops_oldest_never_holds_the_producer(tmp_path: Path) -> None:
    sent = [meta("config", b"v1")] + [data(i, 1024) for i in range(500)]
    with reserved_port() as sock:
        text = f"""
[endpoints.in]
kind = "receiver"
listen = "tcp://127.0.0.1:0"
stream = "s"

[endpoints.out]
kind = "sender"
connect = "tcp://127.0.0.1:{sock.getsockname()[1]}"
stream = "s"
max_queue_frames = 16
reconnect = {{ initial = "50ms", maximum = "200ms" }}
buffer = {{ when_full = "drop_oldest" }}
"""
        async with running_daemon(text) as daemon:
            producer = await connect(endpoint_port(daemon, "in"))
            with trio.fail_after(30):
                await producer.send(sent)
            await wait_until(
                lambda: detail(daemon)["buffer_dropped_frames"] == len(sent) - 16, patience=20
            )
            figures = detail(daemon)
            assert figures["buffer_type"] == "memory"
            assert figures["buffer_frames"] == 16  # the metadata and the newest data
            reader = await accept_reader(sock)
            with trio.fail_after(30):
                got = await reader.read(16)
            assert got == [sent[0], *sent[-15:]]
            await producer.stream.aclose()
            await reader.stream.aclose()


async def test_buffer_metrics_and_a_dropped_total_that_survives_a_reload(tmp_path: Path) -> None:
    options = 'max_size = "1MiB"\nwhen_full = "drop_oldest"'
    with reserved_port() as sock:
        text = '[status]\nlisten = "127.0.0.1:0"\n' + config(
            sock.getsockname()[1], tmp_path / "buf", options
        )
        async with running(text) as (daemon, port):
            producer = await connect(endpoint_port(daemon, "in"))
            sent = [meta("config", b"v1")] + [data(i, 16384) for i in range(200)]
            await producer.send(sent)

            def settled() -> bool:
                figures = detail(daemon)
                held, dropped = figures["buffer_frames"], figures["buffer_dropped_frames"]
                assert isinstance(held, int)
                assert isinstance(dropped, int)
                return held + dropped == len(sent)

            await wait_until(settled, patience=30)
            figures = detail(daemon)
            samples = await scrape(port)
            for key in ("buffer_bytes", "buffer_frames", "buffer_max_bytes"):
                assert value(samples, f"framewire_{key}", endpoint="out") == figures[key]
            dropped = value(samples, "framewire_buffer_dropped_frames_total", endpoint="out")
            assert dropped == figures["buffer_dropped_frames"]
            assert dropped > 0
            # A reload that restarts the sender (a change to its disk buffer: never applied
            # in place) makes a new endpoint: its total goes on.
            changed = text.replace(
                'when_full = "drop_oldest"', 'when_full = "drop_oldest"\nsync = "batch"'
            )
            assert await daemon.reload(parse_config(changed)) == ["changed out"]
            # The same directory, and one more frame: the stream's metadata, replayed to the
            # new endpoint's subscription (once its intake has put it in).
            held = figures["buffer_frames"]
            assert isinstance(held, int)
            await wait_until(lambda: detail(daemon)["buffer_state"] == "ok", patience=20)
            await wait_until(lambda: detail(daemon)["buffer_frames"] == held + 1, patience=20)
            after = await scrape(port)
            assert value(after, "framewire_buffer_dropped_frames_total", endpoint="out") == dropped
            assert value(after, "framewire_buffer_frames", endpoint="out") == held + 1
            await producer.stream.aclose()


# -- faults ----------------------------------------------------------------------------


async def test_two_endpoints_on_one_directory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with reserved_port() as sock:
        text = config(sock.getsockname()[1], tmp_path / "shared")
        text += f"""
[endpoints.out2]
kind = "sender"
connect = "tcp://127.0.0.1:{sock.getsockname()[1]}"
stream = "other"
buffer = {{ type = "disk", path = "{tmp_path / "shared"}" }}
"""
        async with running_daemon(text) as daemon:
            await wait_until(
                lambda: (
                    {detail(daemon, n)["buffer_state"] for n in ("out", "out2")} == {"ok", "locked"}
                )
            )
            locked = next(
                n for n in ("out", "out2") if detail(daemon, n)["buffer_state"] == "locked"
            )
            problem = detail(daemon, locked)["buffer_error"]
            assert isinstance(problem, str)
            assert "in use by another queue" in problem
            await trio.sleep(1.5)  # it retries: still one line
            lines = [r for r in caplog.records if "cannot open the disk buffer" in r.getMessage()]
            assert len(lines) == 1
            assert daemon.endpoints[locked].status.state != "failed"


async def test_a_directory_that_cannot_be_made_then_can(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the buffer's parent should be")
    sent = [meta("config", b"v1")] + [data(i) for i in range(50)]
    with reserved_port() as sock:
        async with running_daemon(config(sock.getsockname()[1], blocker / "buf")) as daemon:
            await wait_until(lambda: detail(daemon)["buffer_state"] == "unwritable")
            producer = await connect(endpoint_port(daemon, "in"))
            await producer.send(sent)  # held in the hand-over queue meanwhile
            blocker.unlink()
            await wait_until(lambda: detail(daemon)["buffer_frames"] == len(sent), patience=40)
            assert detail(daemon)["buffer_state"] == "ok"
            reader = await accept_reader(sock)
            with trio.fail_after(30):
                assert await reader.read(len(sent)) == sent
            problems = [
                r for r in caplog.records if "cannot open the disk buffer" in r.getMessage()
            ]
            assert len(problems) == 1
            assert any("works again" in r.getMessage() for r in caplog.records)
            await producer.stream.aclose()
            await reader.stream.aclose()


async def test_a_deleted_directory_is_made_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "buf"
    with reserved_port() as sock:
        async with running_daemon(config(sock.getsockname()[1], directory)) as daemon:
            producer = await connect(endpoint_port(daemon, "in"))
            await producer.send([meta("config", b"v1")] + [data(i) for i in range(10)])
            await wait_until(lambda: detail(daemon)["buffer_frames"] == 11)
            for child in directory.iterdir():
                child.unlink()
            directory.rmdir()
            later = [data(i) for i in range(10, 20)]
            await producer.send(later)
            await wait_until(
                lambda: any("disk buffer failed" in r.getMessage() for r in caplog.records)
            )
            await wait_until(lambda: detail(daemon)["buffer_frames"] == 10, patience=30)
            assert detail(daemon)["buffer_state"] == "ok"
            assert directory.is_dir()
            reader = await accept_reader(sock)
            with trio.fail_after(30):
                assert await reader.read(10) == later
            assert daemon.endpoints["out"].status.restarts == 0
            await producer.stream.aclose()
            await reader.stream.aclose()


async def test_a_full_disk_holds_the_stream_and_loses_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = False
    real_writev = os.writev

    def writev(fd: int, buffers: Any) -> int:
        if full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_writev(fd, buffers)

    monkeypatch.setattr(os, "writev", writev)
    sent = [meta("config", b"v1")] + [data(i) for i in range(40)]
    with reserved_port() as sock:
        async with running_daemon(config(sock.getsockname()[1], tmp_path / "buf")) as daemon:
            producer = await connect(endpoint_port(daemon, "in"))
            await producer.send(sent[:21])
            await wait_until(lambda: detail(daemon)["buffer_frames"] == 21)
            full = True
            await producer.send(sent[21:])
            await wait_until(lambda: detail(daemon)["buffer_state"] == "disk_full")
            assert detail(daemon)["buffer_frames"] == 21
            full = False
            await wait_until(lambda: detail(daemon)["buffer_frames"] == len(sent), patience=20)
            assert detail(daemon)["buffer_state"] == "ok"
            reader = await accept_reader(sock)
            with trio.fail_after(30):
                assert await reader.read(len(sent)) == sent
            lines = [r for r in caplog.records if "no space left" in r.getMessage().lower()]
            assert len(lines) == 1
            await producer.stream.aclose()
            await reader.stream.aclose()


async def test_a_corrupt_record_is_skipped_counted_and_never_delivered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "buf"
    sent = [meta("config", b"v1")] + [data(i, 4096) for i in range(100)]
    with reserved_port() as sock:
        text = config(sock.getsockname()[1], directory)
        async with running_daemon(text) as daemon:
            producer = await connect(endpoint_port(daemon, "in"))
            await producer.send(sent)
            await wait_until(lambda: detail(daemon)["buffer_frames"] == len(sent))
            await producer.stream.aclose()
        (segment,) = directory.glob("*.seg")
        damaged = bytearray(segment.read_bytes())
        middle = len(damaged) // 2
        damaged[middle : middle + 8] = bytes(b ^ 0xFF for b in damaged[middle : middle + 8])
        segment.write_bytes(damaged)
        async with running_daemon(text) as daemon:
            reader = await accept_reader(sock)
            await wait_until(lambda: detail(daemon)["buffer_corrupt_records"] == 1)
            with trio.fail_after(30):
                got = await reader.read(len(sent) - 1)
            assert got[0] == sent[0]
            assert all(frame in sent for frame in got)
            assert [f.timestamp for f in got[1:]] == sorted(f.timestamp for f in got[1:])
            assert len(set(f.timestamp for f in got[1:])) == 99
            warnings = [r for r in caplog.records if "skipped corrupt bytes" in r.getMessage()]
            assert len(warnings) == 1
            await reader.stream.aclose()


# -- a real daemon process: 160 MiB, SIGKILL, restart ------------------------------------


def status_json(daemon: DaemonProcess) -> dict[str, Any]:
    address = daemon.addresses["status"]
    assert isinstance(address, tuple)
    host, port = address
    with urllib.request.urlopen(f"http://{host}:{port}/status.json", timeout=10) as answer:
        document: dict[str, Any] = json.loads(answer.read())
    return document


def wait_for_detail(daemon: DaemonProcess, key: str, value: object, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        seen = status_json(daemon)["endpoints"]["out"]["detail"].get(key)
        if seen == value:
            return
        if time.monotonic() > deadline or not daemon.alive():
            raise AssertionError(
                f"detail.{key} is {seen!r}, not {value!r}:\n{daemon.log()[-3000:]}"
            )
        time.sleep(0.05)


def read_frames(sock: socket.socket, count: int, timeout: float = 60) -> tuple[list[Frame], bytes]:
    """Listen on the reserved socket, take one connection, read ``count`` native frames."""
    sock.listen(1)
    sock.settimeout(timeout)
    connection, _ = sock.accept()
    decoder = NativeDecoder(max_frame_size=64 * MIB)
    frames: list[Frame] = []
    raw = bytearray()
    with connection:
        connection.settimeout(timeout)
        while len(frames) < count:
            chunk = connection.recv(1 << 20)
            if not chunk:
                raise EOFError(f"the sender closed after {len(frames)} of {count} frames")
            raw += chunk
            frames += decoder.feed(chunk)
    return frames, bytes(raw)


def process_config(port: int, directory: Path) -> str:
    return f"""
[daemon]
grace_period = "2s"

[status]
listen = "127.0.0.1:0"

[endpoints.in]
kind = "receiver"
listen = "tcp://127.0.0.1:0"
stream = "s"

[endpoints.out]
kind = "sender"
connect = "tcp://127.0.0.1:{port}"
stream = "s"
reconnect = {{ initial = "50ms", maximum = "200ms" }}

[endpoints.out.buffer]
type = "disk"
path = "{directory}"
max_size = "512MiB"
"""


def test_160_mib_ride_out_a_reader_outage_and_a_sigkill(tmp_path: Path) -> None:
    """The producer's sends all complete while no reader exists; the daemon is SIGKILLed
    and started again; the reader that appears then gets every byte, in order."""
    frames = [meta("config", b"run 7"), meta("calibration", b"\x01" * 1000)]
    frames += [data(i, MIB) for i in range(160)]
    wire = encode(frames)
    with reserved_port() as sock:
        config_text = process_config(sock.getsockname()[1], tmp_path / "buffer")
        first = DaemonProcess(config_text, tmp_path, expect=["in", "status"])
        try:
            producer_address = first.addresses["in"]
            assert isinstance(producer_address, tuple)
            with socket.create_connection(producer_address, timeout=60) as producer:
                producer.sendall(wire)  # completes: nothing holds the producer back
            wait_for_detail(first, "buffer_frames", len(frames))
            assert status_json(first)["endpoints"]["out"]["state"] != "connected"
            os.kill(first.pid, signal.SIGKILL)
            first.proc.wait(10)
        finally:
            first.stop()
        (tmp_path / "daemon.log").rename(tmp_path / "first.log")
        second = DaemonProcess(config_text, tmp_path, expect=["in", "status"])
        try:
            wait_for_detail(second, "buffer_frames", len(frames))
            got, raw = read_frames(sock, len(frames))
            assert got == frames
            assert raw == wire  # byte for byte: nothing before it, nothing between
            wait_for_detail(second, "buffer_frames", 0)
            assert "Traceback" not in second.log()
        finally:
            assert second.stop() == 0
