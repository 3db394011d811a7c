"""Readiness tells the truth: an endpoint that cannot take its local resources stops the start.

The daemon runs as a real process under a datagram NOTIFY_SOCKET, as systemd runs it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from framewire import Frame, FrameKind
from framewire.config import parse_config
from framewire.daemon import Daemon, DaemonStartFailed
from framewire.daemon.reconnect import describe_connect_error
from framewire.daemon.status import build_snapshot
from framewire.daemon.supervisor import StartFailed
from framewire.protocols.native import END_OF_STREAM

from .helpers import encode, running_daemon, wait_until
from .test_systemd import NotifySocket, free_port


def run_daemon(config: Path, notify: NotifySocket) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "framewire", "run", str(config)],
        env={**os.environ, "NOTIFY_SOCKET": notify.address},
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_taken_port_is_a_start_failure_not_ready(tmp_path: Path) -> None:
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    config = tmp_path / "fw.toml"
    config.write_text(
        f"""
[endpoints.fine]
kind = "server"
listen = "tcp://127.0.0.1:0"
stream = "s"

[endpoints.clash]
kind = "receiver"
listen = "tcp://127.0.0.1:{port}"
stream = "s"

[endpoints.replay]
kind = "file"
path = "{tmp_path / "missing.fw"}"
stream = "s"
"""
    )
    process = run_daemon(config, notify)
    try:
        _, stderr = process.communicate(timeout=30)
        assert process.returncode == 1
        messages = []
        notify.sock.settimeout(0.5)
        while True:
            try:
                messages.append(notify.receive())
            except TimeoutError:
                break
        assert not any("READY" in message for message in messages)
        assert any(message.get("STATUS", "").startswith("cannot start") for message in messages)
        lines = stderr.splitlines()
        assert "Traceback" not in stderr
        clash = [line for line in lines if "endpoint clash cannot start" in line]
        assert len(clash) == 1
        assert f"127.0.0.1:{port}" in clash[0]
        assert "address already in use" in clash[0]
        missing = [line for line in lines if "endpoint replay cannot start" in line]
        assert len(missing) == 1
        assert "missing.fw" in missing[0]
        assert lines[-1].startswith("framewire: not started: 2 endpoint(s) cannot start")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        notify.close()
        taken.close()


def test_an_upstream_that_is_down_is_not_a_start_failure(tmp_path: Path) -> None:
    """Remote availability is not readiness: a connect-mode receiver retries, READY is sent."""
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    config = tmp_path / "fw.toml"
    config.write_text(
        f"""
[endpoints.upstream]
kind = "receiver"
connect = "tcp://127.0.0.1:{free_port()}"
stream = "s"
"""
    )
    process = run_daemon(config, notify)
    try:
        assert notify.receive()["READY"] == "1"
        process.send_signal(signal.SIGTERM)
        assert notify.receive() == {"STOPPING": "1"}
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        process.communicate(timeout=10)
        notify.close()


async def only_start_failure(daemon: Daemon) -> StartFailed:
    """Run ``daemon``, which must fail to start for exactly one reason; that reason."""
    with pytest.raises(DaemonStartFailed) as info, trio.fail_after(10):
        await daemon.run()
    (failure,) = info.value.failures
    return failure


async def test_start_failure_in_process_names_each_endpoint(tmp_path: Path) -> None:
    config = parse_config(
        f"""
[endpoints.cert]
kind = "server"
listen = "tls://127.0.0.1:0"
stream = "s"

[endpoints.cert.tls]
certificate = "{tmp_path / "no-cert.pem"}"
key = "{tmp_path / "no-key.pem"}"

[endpoints.ok]
kind = "server"
listen = "tcp://127.0.0.1:0"
stream = "s"
"""
    )
    daemon = Daemon(config)
    failure = await only_start_failure(daemon)
    assert failure.name == "cert"
    assert "no-cert.pem" in failure.reason
    assert daemon.state == "failed"


async def test_finished_endpoints_stay_in_status_with_final_counters() -> None:
    config = """
[endpoints.burst]
kind = "generator"
stream = "s"
count = 5
rate = 0
"""
    async with running_daemon(config) as daemon:
        await wait_until(lambda: daemon.endpoints["burst"].status.state == "finished")
        status = daemon.endpoints["burst"].status
        assert status.frames_out == 6  # its metadata frame, then the five
        shown = build_snapshot(daemon)["endpoints"]["burst"]
        assert (shown["state"], shown["frames_out"]) == ("finished", 6)


async def test_connect_errors_say_why() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(OSError, match="all attempts") as refused:
        await trio.open_tcp_stream("127.0.0.1", port)
    assert describe_connect_error(refused.value, 10) == "connection refused (nothing listens there)"
    assert describe_connect_error(trio.TooSlowError(), 2.5) == "no answer within 2.5s"
    unresolvable = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert describe_connect_error(unresolvable, 10) == (
        "cannot resolve the host name: Name or service not known"
    )
    with pytest.raises(FileNotFoundError) as missing:
        await trio.open_unix_socket("/nonexistent/framewire.sock")
    assert describe_connect_error(missing.value, 10) == "no such socket file"


async def test_last_error_has_its_time_and_the_state_shows_recovery() -> None:
    port = free_port()
    config = f"""
[endpoints.up]
kind = "receiver"
connect = "tcp://127.0.0.1:{port}"
stream = "s"
[endpoints.up.reconnect]
initial = "10ms"
maximum = "20ms"
"""
    async with running_daemon(config) as daemon:
        status = daemon.endpoints["up"].status
        await wait_until(lambda: status.last_error is not None)
        assert status.last_error == "connection refused (nothing listens there)"
        assert status.last_error_at is not None
        shown = build_snapshot(daemon)["endpoints"]["up"]
        assert shown["last_error_at"] == status.last_error_at
        listener = socket.socket()
        listener.bind(("127.0.0.1", port))
        listener.listen()
        try:
            await wait_until(lambda: status.state == "connected")
            # Healthy again: the error is kept, with its time, as history.
            assert status.last_error == "connection refused (nothing listens there)"
        finally:
            listener.close()


async def test_a_normal_end_of_the_upstream_stream_is_info_not_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="framewire")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    config = f"""
[endpoints.up]
kind = "receiver"
connect = "tcp://127.0.0.1:{listener.getsockname()[1]}"
stream = "s"
"""
    try:
        async with running_daemon(config):
            upstream, _ = await trio.to_thread.run_sync(listener.accept)
            upstream.sendall(encode([Frame(FrameKind.DATA, "d", b"x")]) + END_OF_STREAM)
            upstream.close()
            await wait_until(
                lambda: any("ended its stream" in r.getMessage() for r in caplog.records)
            )
    finally:
        listener.close()
    (ended,) = [r for r in caplog.records if "ended its stream" in r.getMessage()]
    assert ended.levelno == logging.INFO


async def test_a_status_port_in_use_is_a_start_failure() -> None:
    """The status websocket is a configured resource too: no status, no READY."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        config = parse_config(
            f"""
[status]
listen = "127.0.0.1:{taken.getsockname()[1]}"

[endpoints.ok]
kind = "server"
listen = "tcp://127.0.0.1:0"
stream = "s"
"""
        )
        failure = await only_start_failure(Daemon(config))
        assert failure.name == "status"
        assert failure.reason.lower().endswith("address already in use")
    finally:
        taken.close()


def test_the_status_table_shows_a_past_error_as_past() -> None:
    from framewire.cli import render_status

    endpoint = {
        "kind": "receiver",
        "address": ["tcp://127.0.0.1:9"],
        "frames_in": 0,
        "frames_out": 0,
        "frames_dropped": 0,
        "restarts": 0,
        "last_error": "connection refused (nothing listens there)",
        "last_error_at": 1000.0,
        "clients": [],
    }
    snapshot = {
        "time": 1200.0,
        "daemon": {"version": "x", "pid": 1, "state": "running", "uptime": 200.0, "config": "c"},
        "endpoints": {
            "down": {**endpoint, "state": "reconnecting"},
            "up": {**endpoint, "state": "connected"},
        },
    }
    lines = render_status(snapshot).splitlines()
    errors = [line.strip() for line in lines if "last error" in line]
    assert errors == [
        "last error 3m20s ago: connection refused (nothing listens there)",
        "last error 3m20s ago, healthy since: connection refused (nothing listens there)",
    ]
