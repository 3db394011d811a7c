"""The command line, as a user runs it: the daemon, recv and send as subprocesses."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import trio

from framewire import Frame, FrameKind

from .helpers import encode

CONFIG = """
[daemon]
grace_period = "2s"

[endpoints.in]
kind = "receiver"
listen = "tcp://127.0.0.1:0"
stream = "s"

[endpoints.out]
kind = "server"
listen = "tcp://127.0.0.1:0"
stream = "s"
"""

FRAMEWIRE = [sys.executable, "-m", "framewire"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
#: The last guard on waiting for a child process (a log line, its exit). Every wait is on an
#: event; this only ends a test that would hang. It is generous because on a machine whose
#: CPUs are busy with other work, starting a Python process and importing framewire alone
#: can take many seconds, and one wait may span two such starts (recv waits for the send).
PATIENCE = 120.0


class DaemonProcess:
    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.log = ""

    async def wait_for(self, pattern: str, count: int = 1) -> re.Match[str]:
        """Read the daemon's log until ``pattern`` has appeared ``count`` times."""
        assert self.process.stderr is not None
        with trio.fail_after(PATIENCE):
            while len(matches := list(re.finditer(pattern, self.log))) < count:
                chunk = await self.process.stderr.receive_some(4096)
                if not chunk:
                    raise AssertionError(f"daemon exited; log:\n{self.log}")
                self.log += chunk.decode()
        return matches[count - 1]


async def run_cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(PATIENCE):
        return await trio.run_process(
            [*FRAMEWIRE, *args],
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=ENV,
        )


async def test_run_recv_send_and_sigterm(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(CONFIG)
    process = await trio.lowlevel.open_process(
        [*FRAMEWIRE, "run", str(config)], stderr=subprocess.PIPE, env=ENV
    )
    daemon = DaemonProcess(process)
    try:
        port_in = (await daemon.wait_for(r"receiving native .* on 127\.0\.0\.1:(\d+)")).group(1)
        port_out = (await daemon.wait_for(r"serving stream .* on 127\.0\.0\.1:(\d+)")).group(1)
        frames = [Frame(FrameKind.METADATA, "setup", b"{}", timestamp=5)]
        frames += [Frame(FrameKind.DATA, "sample", bytes(100), timestamp=6 + i) for i in range(4)]
        recording = tmp_path / "frames.fw"
        recording.write_bytes(encode(frames))
        async with trio.open_nursery() as nursery:
            results: dict[str, subprocess.CompletedProcess[bytes]] = {}

            async def receive() -> None:
                results["recv"] = await run_cli(
                    "recv", f"tcp://127.0.0.1:{port_out}", "--count", "5"
                )

            nursery.start_soon(receive)
            await daemon.wait_for(r"client 127\.0\.0\.1:\d+ connected", count=1)
            sent = await run_cli("send", f"tcp://127.0.0.1:{port_in}", str(recording))
            assert sent.returncode == 0, sent.stderr
        lines = results["recv"].stdout.decode().splitlines()
        assert [line.split() for line in lines] == [
            ["METADATA", "setup", "2", "5"],
            *[["DATA", "sample", "100", str(6 + i)] for i in range(4)],
        ]
        # --output writes the frames themselves; stdin works for send.
        saved = tmp_path / "saved.fw"
        async with trio.open_nursery() as nursery:

            async def save() -> None:
                results["save"] = await run_cli(
                    "recv", f"tcp://127.0.0.1:{port_out}", "--count", "3", "--output", str(saved)
                )

            nursery.start_soon(save)
            await daemon.wait_for(r"client 127\.0\.0\.1:\d+ connected", count=2)
            sent = await run_cli(
                "send", f"tcp://127.0.0.1:{port_in}", "-", stdin=encode(frames[1:3])
            )
            assert sent.returncode == 0, sent.stderr
        assert results["save"].returncode == 0
        # The late joiner got the cached metadata first, then the new frames.
        assert saved.read_bytes() == encode([frames[0], *frames[1:3]])
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(PATIENCE):
            code = await process.wait()
        assert process.stderr is not None
        await process.stderr.aclose()
    assert code == 0


async def test_bad_config_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(
        CONFIG.replace('stream = "s"\n', 'stream = "s"\nmax_queue_frames = -1\n', 1)
        + '\n[endpoints.x]\nkind = "nope"\n'
    )
    for command in ("run", "check"):
        result = await run_cli(command, str(config))
        assert result.returncode == 2
        err = result.stderr.decode()
        assert "Traceback" not in err
        assert "endpoints.x.kind: unknown endpoint kind 'nope'" in err
    missing = await run_cli("check", str(tmp_path / "missing.toml"))
    assert missing.returncode == 2
    assert "cannot read the file" in missing.stderr.decode()


async def test_check_summarises_a_good_config(tmp_path: Path) -> None:
    config = tmp_path / "good.toml"
    config.write_text(CONFIG)
    result = await run_cli("check", str(config))
    assert result.returncode == 0
    out = result.stdout.decode()
    assert "OK, 2 endpoints" in out
    assert "in: receiver listen tcp://127.0.0.1:0" in out
