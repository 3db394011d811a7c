"""The commands an operator runs against a live daemon: ``framewire reload``, ``status --watch``
started before the daemon, and a status table that fits the terminal. Every command runs as a
subprocess against a daemon subprocess, as an operator runs them."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import WebSocketRequest, serve_websocket

from framewire.cli import EXAMPLES, build_parser, main, render_status

from .test_cli import ENV, FRAMEWIRE, DaemonProcess
from .test_cli_ops import closed_port
from .test_tls_unix import tmp  # noqa: F401 - a fixture

TOKEN = "sesame"

CONFIG = """
[daemon]
grace_period = "1s"

[status]
listen = "127.0.0.1:{port}"
interval = "100ms"
token = "{token}"

[endpoints.source]
kind = "generator"
stream = "demo"
rate = 20.0
size = 100

[endpoints.{server}]
kind = "server"
listen = "{listen}"
stream = "demo"
"""


def config_text(
    *, port: int = 0, server: str = "out", listen: str = "tcp://127.0.0.1:0", extra: str = ""
) -> str:
    return CONFIG.format(port=port, token=TOKEN, server=server, listen=listen) + extra


@asynccontextmanager
async def daemon_process(config: Path) -> AsyncIterator[tuple[DaemonProcess, int]]:
    """``framewire run CONFIG`` as a subprocess, once its status server listens (its port is
    yielded); stopped with SIGTERM."""
    process = await trio.lowlevel.open_process(
        [*FRAMEWIRE, "run", str(config)], stderr=subprocess.PIPE, env=ENV
    )
    daemon = DaemonProcess(process)
    try:
        match = await daemon.wait_for(r"status websocket on ws://127\.0\.0\.1:(\d+)/")
        yield daemon, int(match.group(1))
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            await process.wait()
        assert process.stderr is not None
        await process.stderr.aclose()


async def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {key: value for key, value in ENV.items() if key != "COLUMNS"}
    environment["FRAMEWIRE_STATUS_TOKEN"] = TOKEN
    environment.update(env)
    with trio.fail_after(60):
        result = await trio.run_process(
            [*FRAMEWIRE, *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=environment,
        )
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


# -- reload -----------------------------------------------------------------------------------


async def test_reload_of_a_running_daemon_says_what_changed(tmp_path: Path) -> None:
    config = tmp_path / "daemon.toml"
    config.write_text(config_text())
    async with daemon_process(config) as (daemon, port):
        pid = daemon.process.pid
        same = await cli("reload", f"127.0.0.1:{port}")
        assert same.returncode == 0, same.stderr
        assert same.stdout.splitlines() == [
            f"framewire reload: pid {pid} reloaded {config}: nothing changed"
        ]
        await daemon.wait_for(r"reloaded .*: nothing changed")

        # A changed endpoint, a new one: each named, as the daemon applied them.
        config.write_text(
            config_text().replace("rate = 20.0", "rate = 10.0")
            + '\n[endpoints.extra]\nkind = "server"\nlisten = "tcp://127.0.0.1:0"\n'
            'stream = "demo"\n'
        )
        changed = await cli("reload", f"http://127.0.0.1:{port}")
        assert changed.returncode == 0, changed.stderr
        assert changed.stdout.splitlines() == [
            f"framewire reload: pid {pid} reloaded {config}: changed source; added extra"
        ]

        # A broken file: the daemon keeps the previous configuration, and reload says why.
        config.write_text(config_text().replace("rate = 20.0", "rate = -1.0"))
        refused = await cli("reload", f"127.0.0.1:{port}")
        assert refused.returncode == 1
        assert refused.stdout == ""
        lines = refused.stderr.splitlines()
        assert lines[0] == (
            f"framewire reload: pid {pid} did not reload {config}; it still runs the previous "
            "configuration:"
        )
        assert any(line.strip().startswith("endpoints.source.rate: ") for line in lines[1:]), lines
        assert "Traceback" not in refused.stderr

        # The status JSON agrees with what reload printed.
        status = await cli("status", "--json", f"127.0.0.1:{port}")
        snapshot = json.loads(status.stdout)
        assert snapshot["daemon"]["last_reload"]["ok"] is False
        assert set(snapshot["endpoints"]) == {"source", "out", "extra"}


async def test_reload_through_a_pid_file(tmp_path: Path) -> None:
    config = tmp_path / "daemon.toml"
    config.write_text(config_text())
    async with daemon_process(config) as (daemon, port):
        pid_file = tmp_path / "framewire.pid"
        pid_file.write_text(f"{daemon.process.pid}\n")
        config.write_text(config_text(server="renamed"))
        done = await cli("reload", "--pid-file", str(pid_file), f"127.0.0.1:{port}")
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == [
            f"framewire reload: pid {daemon.process.pid} reloaded {config}: "
            "removed out; added renamed"
        ]
        # A pid file that names another process is refused, and nothing is signalled.
        with trio.fail_after(20):
            sleeper = await trio.lowlevel.open_process(["sleep", "60"])
        try:
            pid_file.write_text(f"{sleeper.pid}\n")
            wrong = await cli("reload", "--pid-file", str(pid_file), f"127.0.0.1:{port}")
            assert wrong.returncode == 2
            assert wrong.stderr.splitlines() == [
                f"framewire reload: the pid file {pid_file} says {sleeper.pid}, but the daemon "
                f"at ws://127.0.0.1:{port}/ is pid {daemon.process.pid}"
            ]
            assert sleeper.poll() is None  # not signalled
        finally:
            sleeper.kill()
            await sleeper.wait()


async def test_reload_through_a_pid_file_of_a_daemon_without_status(tmp_path: Path) -> None:
    """No status server to read the outcome from: the signal is sent, and reload says it cannot
    tell what the reload did (exit 1); the daemon's log does."""
    config = tmp_path / "quiet.toml"
    text = config_text()
    config.write_text(text[: text.index("[status]")] + text[text.index("[endpoints.source]") :])
    process = await trio.lowlevel.open_process(
        [*FRAMEWIRE, "run", str(config)], stderr=subprocess.PIPE, env=ENV
    )
    daemon = DaemonProcess(process)
    try:
        await daemon.wait_for(r"serving stream 'demo'")
        pid_file = tmp_path / "quiet.pid"
        pid_file.write_text(f"{process.pid}\n")
        with closed_port() as port:
            result = await cli("reload", "--pid-file", str(pid_file), f"127.0.0.1:{port}")
        assert result.returncode == 1
        assert result.stderr.splitlines() == [
            f"framewire reload: sent SIGHUP to pid {process.pid} (from {pid_file}); the daemon's "
            "log says what the reload did, its status server cannot: cannot reach the status "
            f"server at ws://127.0.0.1:{port}/: connection refused; is the daemon running with a "
            "[status] table?"
        ]
        await daemon.wait_for(r"reloaded .*: nothing changed")
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            await process.wait()
        assert process.stderr is not None
        await process.stderr.aclose()


async def test_reload_without_a_daemon_fails_in_one_line(tmp_path: Path) -> None:
    with closed_port() as port:
        result = await cli("reload", f"127.0.0.1:{port}")
        assert result.returncode == 1
        assert result.stderr.splitlines() == [
            f"framewire reload: cannot reach the status server at ws://127.0.0.1:{port}/: "
            "connection refused; is the daemon running with a [status] table?"
        ]
        missing = tmp_path / "missing.pid"
        result = await cli("reload", "--pid-file", str(missing), f"127.0.0.1:{port}")
        assert result.returncode == 1
        assert result.stderr.startswith(f"framewire reload: cannot read the pid file {missing}")


@asynccontextmanager
async def fake_status_server(snapshot: dict[str, Any]) -> AsyncIterator[int]:
    """A websocket that sends ``snapshot`` to whoever connects: a daemon's status server as
    seen from another machine."""

    async def handler(request: WebSocketRequest) -> None:
        connection = await request.accept()
        await connection.send_message(json.dumps(snapshot))
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
        yield server.port
        nursery.cancel_scope.cancel()


async def test_reload_never_signals_a_pid_of_another_machine() -> None:
    with trio.fail_after(20):
        sleeper = await trio.lowlevel.open_process(["sleep", "60"])
    try:
        snapshot = {
            "schema": "framewire.status/1",
            "daemon": {
                "pid": sleeper.pid,  # the same number, on another machine
                "pid_namespace": "another-boot/pid:[4026531836]",
                "state": "running",
                "last_reload": None,
            },
        }
        async with fake_status_server(snapshot) as port:
            result = await cli("reload", f"127.0.0.1:{port}")
        assert result.returncode == 2
        assert result.stderr.splitlines() == [
            f"framewire reload: the daemon at ws://127.0.0.1:{port}/ (pid {sleeper.pid}) runs on "
            "another machine or in another PID namespace: run framewire reload there, or give "
            "--pid-file"
        ]
        assert sleeper.poll() is None  # never signalled
    finally:
        sleeper.kill()
        await sleeper.wait()


# -- status --watch before the daemon ----------------------------------------------------------


async def test_status_watch_waits_for_a_daemon_that_is_not_up_yet(tmp_path: Path) -> None:
    with closed_port() as port:
        env = {**ENV, "FRAMEWIRE_STATUS_TOKEN": TOKEN}
        watch = await trio.lowlevel.open_process(
            [*FRAMEWIRE, "status", "--watch", f"127.0.0.1:{port}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        assert watch.stdout is not None
        assert watch.stderr is not None
        err = b""
        out = b""
        try:
            with trio.fail_after(20):
                while b"waiting for it\n" not in err:
                    chunk = await watch.stderr.receive_some(4096)
                    assert chunk, err  # it did not give up
                    err += chunk
            assert watch.poll() is None
            config = tmp_path / "late.toml"
            config.write_text(config_text(port=port))
            async with daemon_process(config) as (daemon, _):
                with trio.fail_after(20):
                    while not re.search(rb"pid %d " % daemon.process.pid, out):
                        chunk = await watch.stdout.receive_some(65536)
                        assert chunk, (out, err)
                        out += chunk
        finally:
            watch.kill()
            await watch.wait()
            await watch.stdout.aclose()
            await watch.stderr.aclose()
        assert err.decode().splitlines() == [
            f"framewire status: no status server at ws://127.0.0.1:{port}/ yet (connection "
            "refused); waiting for it"
        ]
        assert re.search(rb"^out +server +running", out, re.MULTILINE), out


# -- the table fits the terminal ---------------------------------------------------------------


async def test_status_table_fits_80_columns(tmp: Path) -> None:  # noqa: F811
    sockets = tmp / "a-directory-with-a-long-name-for-sockets"
    sockets.mkdir()
    config = tmp / "wide.toml"
    config.write_text(
        config_text(server="camera-north-wing-out", listen=f"unix://{sockets}/out.sock")
    )
    async with daemon_process(config) as (_, port):
        narrow = await cli("status", f"127.0.0.1:{port}", COLUMNS="80")
        wide = await cli("status", f"127.0.0.1:{port}")  # a pipe, no COLUMNS: the whole table
    assert narrow.returncode == 0, narrow.stderr
    lines = narrow.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, narrow.stdout
    row = next(line for line in lines if line.startswith("camera-north-wing-out "))
    assert row.split()[1:3] == ["server", "running"]
    assert "in/s" in narrow.stdout  # the rates stay when the totals go
    assert max(len(line) for line in wide.stdout.splitlines()) > 80
    assert f"{sockets}/out.sock" in wide.stdout


def test_every_line_of_the_table_fits_any_width() -> None:
    endpoint = {
        "kind": "receiver",
        "state": "reconnecting",
        "address": ["tcp://daq-instrument-01.example.org:4536"],
        "frames_in": 123456789,
        "bytes_in": 10**12,
        "frames_out": 5,
        "bytes_out": 99,
        "rates": {"frames_in": 1234.5, "bytes_in": 1e9},
        "frames_dropped": 12,
        "restarts": 3,
        "last_error": "connection refused (nothing listens there), and then some more words",
        "last_error_at": 1000.0,
        "clients": [
            {
                "peer": "127.0.0.1:45678",
                "connected_since": 900.0,
                "queue_frames": 3,
                "queue_bytes": 3000,
                "frames_sent": 100,
                "bytes_sent": 1000,
                "frames_dropped": 0,
            }
        ],
    }
    snapshot = {
        "time": 1200.0,
        "daemon": {
            "version": "0.1.0",
            "pid": 1234,
            "state": "running",
            "uptime": 200.0,
            "config": "/etc/framewire/a-rather-long-configuration-file-name.toml",
        },
        "endpoints": {"camera-in-north-wing": endpoint, "out": {**endpoint, "clients": []}},
    }
    full = render_status(snapshot)
    assert max(len(line) for line in full.splitlines()) > 150
    for width in range(20, 200, 3):
        text = render_status(snapshot, width)
        assert max(len(line) for line in text.splitlines()) <= width, (width, text)
        assert "refused" in text  # the error wraps; it is never cut off
        assert "camera-in-north-wing" in text


# -- --help ------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [None, "run", "check", "recv", "send", "status", "reload"])
def test_help_shows_examples_that_are_real_command_lines(
    command: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--help"] if command is None else [command, "--help"]
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "\nexamples:\n" in out
    shown = [line.strip() for line in out.split("\nexamples:\n")[1].splitlines()]
    commands = [line for line in shown if line.startswith("framewire ")]
    assert commands, out
    if command is not None:
        assert commands == [line for line, _ in EXAMPLES[command]]
    for line in commands:
        for part in line.split(" | "):
            words = shlex.split(part)
            assert words[0] == "framewire"
            args, extra = build_parser().parse_known_args(words[1:])
            assert extra == [], line
            assert args.command in EXAMPLES
