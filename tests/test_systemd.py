"""systemd integration: the unit files, the notify protocol, the watchdog, the fd limit."""

from __future__ import annotations

import logging
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trio.testing

from framewire.config import parse_config
from framewire.daemon import Daemon
from framewire.daemon.notify import SystemdNotifier, monotonic_usec
from framewire.daemon.service import raise_open_files_limit

from .test_cli import PATIENCE

UNITS = sorted((Path(__file__).parent.parent / "systemd").glob("*.service"))
ANALYZE = shutil.which("systemd-analyze")


def test_units_exist() -> None:
    assert [unit.name for unit in UNITS] == ["framewire.service", "framewire@.service"]
    for unit in UNITS:
        text = unit.read_text()
        for line in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "Restart=on-failure"):
            assert line in text
        assert re.search(r"^WatchdogSec=\d+", text, re.M)
        assert int(re.search(r"^LimitNOFILE=(\d+)", text, re.M).group(1)) >= 65536  # type: ignore[union-attr]
        # A dynamic user on a read-only system may write only these: recordings, sockets.
        instance = "/%i" if "@" in unit.name else ""
        assert f"StateDirectory=framewire{instance}\n" in text
        assert f"RuntimeDirectory=framewire{instance}\n" in text


def test_shipped_configs_fit_the_units() -> None:
    """What the README installs as the service config has status; recordings go where the
    service may write."""
    configs = Path(__file__).parent.parent / "config"
    assert parse_config((configs / "relay.toml").read_text()).status is not None
    for path in configs.glob("*.toml"):
        for endpoint in parse_config(path.read_text()).endpoints.values():
            recording = getattr(endpoint, "path", None)
            if endpoint.kind == "recorder" and recording is not None:
                assert recording.startswith("/var/lib/framewire/"), path.name


def installed_copy(unit: Path, tmp_path: Path) -> Path:
    """The unit as installed here: ExecStart pointing at this environment's framewire.

    `systemd-analyze verify` checks that ExecStart exists; the shipped unit names the path
    the README installs to (/opt/framewire), which this machine need not have.
    """
    executable = Path(sys.executable).with_name("framewire")
    assert executable.exists()
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace("/opt/framewire/bin/framewire", str(executable)))
    return copy


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_verifies_cleanly(unit: Path, tmp_path: Path) -> None:
    assert ANALYZE is not None
    result = subprocess.run(
        [ANALYZE, "verify", str(installed_copy(unit, tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""


def test_units_show_load_credential_for_a_token_a_key_and_a_password() -> None:
    for unit in UNITS:
        names = re.findall(r"^#LoadCredential=(\S+)$", unit.read_text(), re.M)
        prefix = "framewire-%i-" if "@" in unit.name else "framewire-"
        assert names == [f"{prefix}{name}" for name in ("status-token", "tls.key", "nats-password")]


def test_the_readme_service_section_loads_the_credentials_the_unit_names() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Running it as a service", 1)[1].split("\n## ", 1)[0]
    unit = re.findall(r"^#(LoadCredential=\S+)$", UNITS[0].read_text(), re.M)
    assert re.findall(r"^(LoadCredential=\S+)$", section, re.M) == unit
    for line in unit:  # each credential is written to the store and named in the TOML
        name = line.removeprefix("LoadCredential=")
        assert f"/etc/credstore/{name}\n" in section
        assert f'= "{name}"' in section


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_with_its_credentials_verifies_cleanly(unit: Path, tmp_path: Path) -> None:
    """The commented LoadCredential= lines, taken in, are a unit systemd accepts."""
    assert ANALYZE is not None
    copy = installed_copy(unit, tmp_path)
    copy.write_text(copy.read_text().replace("#LoadCredential=", "LoadCredential="))
    assert "\nLoadCredential=" in copy.read_text()
    result = subprocess.run(
        [ANALYZE, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_security_exposure_at_most_2(unit: Path, tmp_path: Path) -> None:
    assert ANALYZE is not None
    result = subprocess.run(
        [ANALYZE, "security", "--offline=true", str(installed_copy(unit, tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0


class NotifySocket:
    """A datagram socket standing in for systemd's notify socket."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path if not path.startswith("@") else "\0" + path[1:])
        self.sock.settimeout(PATIENCE)  # the daemon is a child process: a last guard
        self.address = path

    def receive(self) -> dict[str, str]:
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.splitlines())

    def close(self) -> None:
        self.sock.close()


CONFIG = """
[daemon]
grace_period = "2s"

[endpoints.out]
kind = "server"
listen = "tcp://127.0.0.1:{port}"
stream = "s"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notify_lifecycle_of_the_real_process(tmp_path: Path, abstract: bool) -> None:
    address = f"@framewire-test-{os.getpid()}" if abstract else str(tmp_path / "notify.sock")
    notify = NotifySocket(address)
    port = free_port()
    config = tmp_path / "fw.toml"
    config.write_text(CONFIG.format(port=port))
    env = {**os.environ, "NOTIFY_SOCKET": address}
    process = subprocess.Popen(
        [sys.executable, "-m", "framewire", "run", str(config)],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    try:
        ready = notify.receive()
        assert ready["READY"] == "1"
        assert "endpoints" in ready["STATUS"]
        # READY only once every endpoint is bound: the port accepts connections now.
        socket.create_connection(("127.0.0.1", port), timeout=5).close()

        config.write_text(
            CONFIG.format(port=port) + '\n[endpoints.more]\nkind = "generator"\nstream = "s"\n'
        )
        before = monotonic_usec()
        process.send_signal(signal.SIGHUP)
        reloading = notify.receive()
        after = monotonic_usec()
        assert reloading["RELOADING"] == "1"
        assert before <= int(reloading["MONOTONIC_USEC"]) <= after
        assert notify.receive()["READY"] == "1"

        process.send_signal(signal.SIGTERM)
        assert notify.receive() == {"STOPPING": "1"}
        assert process.wait(timeout=PATIENCE) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        notify.close()


class RecordingNotifier(SystemdNotifier):
    def __init__(self, watchdog_usec: int | None = None) -> None:
        super().__init__("@recording", watchdog_usec=watchdog_usec)
        self.messages: list[tuple[float, tuple[str, ...]]] = []

    async def notify(self, *fields: str) -> None:
        self.messages.append((trio.current_time(), fields))
        await trio.lowlevel.checkpoint()


async def test_watchdog_cadence_is_half_of_watchdog_usec(
    autojump_clock: trio.testing.MockClock,
) -> None:
    notifier = RecordingNotifier(watchdog_usec=10_000_000)
    daemon = Daemon(parse_config(CONFIG.format(port=0)), notifier=notifier)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        start = trio.current_time()
        await trio.sleep(21)
        pings = [t - start for t, fields in notifier.messages if fields == ("WATCHDOG=1",)]
        assert pings == pytest.approx([0, 5, 10, 15, 20], abs=0.01)
        daemon.request_shutdown()
    kinds = [fields[0] for _, fields in notifier.messages]
    assert kinds[0] == "READY=1"
    assert kinds[-1] == "STOPPING=1"


async def test_status_line_follows_changes(autojump_clock: trio.testing.MockClock) -> None:
    notifier = RecordingNotifier()
    daemon = Daemon(parse_config(CONFIG.format(port=0)), notifier=notifier)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        assert notifier.messages[0][1] == ("READY=1", "STATUS=1 endpoints, 0 connections")
        await trio.sleep(30)
        assert len(notifier.messages) == 1  # nothing changed: nothing sent
        port = int(daemon.endpoints["out"].status.address[0].rsplit(":", 1)[1])
        client = await trio.open_tcp_stream("127.0.0.1", port)
        await trio.sleep(6)
        assert notifier.messages[-1][1] == ("STATUS=1 endpoints, 1 connections",)
        await client.aclose()
        daemon.request_shutdown()


async def test_watchdog_stops_when_the_supervisor_is_gone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    notifier = RecordingNotifier(watchdog_usec=2_000_000)
    daemon = Daemon(parse_config(CONFIG.format(port=0)), notifier=notifier)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        await trio.sleep(5.5)
        assert sum(f == ("WATCHDOG=1",) for _, f in notifier.messages) == 6  # 0, 1, ... 5 s
        daemon.supervisor.cancel()
        count = len(notifier.messages)
        await trio.sleep(10)
        assert not any(f == ("WATCHDOG=1",) for _, f in notifier.messages[count:])
        nursery.cancel_scope.cancel()


async def test_outside_systemd_nothing_is_sent_and_nothing_fails() -> None:
    quiet = SystemdNotifier.from_environment({})
    assert not quiet.enabled
    assert quiet.watchdog_interval is None
    await quiet.ready("x")
    broken = SystemdNotifier.from_environment({"NOTIFY_SOCKET": "/nonexistent/notify.sock"})
    await broken.ready("x")  # logged at debug level, never raised
    assert broken.sent == []
    broken.close()


def test_watchdog_pid_must_be_ours() -> None:
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "4000000"}
    assert SystemdNotifier.from_environment(env).watchdog_interval == 2.0
    other = {**env, "WATCHDOG_PID": str(os.getpid() + 1)}
    assert SystemdNotifier.from_environment(other).watchdog_interval is None


def test_open_files_limit_is_raised_and_a_shortfall_warned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        new_soft, _ = raise_open_files_limit(10)
        assert new_soft == hard or hard == resource.RLIM_INFINITY
        with caplog.at_level(logging.WARNING, logger="framewire"):
            raise_open_files_limit(new_soft + 1)
        assert "open-files limit" in caplog.text
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
