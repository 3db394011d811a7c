"""How the daemon's log reads: under journald, as JSON, and with expected failures on one line.

The daemon runs as a subprocess the way systemd runs it: stderr to a pipe whose device and
inode are in ``JOURNAL_STREAM``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import sys
from pathlib import Path

import pytest
import trio

from framewire._logging import (
    JsonFormatter,
    TextFormatter,
    setup_logging,
    stderr_is_journal,
    syslog_priority,
)

from .test_cli import ENV, FRAMEWIRE, PATIENCE

# A server whose certificate is missing: the daemon logs why and exits with status 1.
MISSING_CERTIFICATE = """
[daemon]
grace_period = "1s"

[endpoints.source]
kind = "generator"
stream = "demo"
rate = 10.0
size = 100

[endpoints.plain]
kind = "server"
listen = "tcp://127.0.0.1:0"
stream = "demo"

[endpoints.out]
kind = "server"
listen = "tls://127.0.0.1:0"
stream = "demo"

[endpoints.out.tls]
certificate = "{missing}/cert.pem"
key = "{missing}/key.pem"
"""


async def run_daemon(config: Path, *options: str, journal: bool = False) -> tuple[int, str]:
    """Run the daemon, stderr to a pipe, until it exits; its exit status and its log.

    With ``journal``, ``JOURNAL_STREAM`` names the pipe's device and inode, as systemd
    names the journal's socket."""
    env = dict(ENV)
    env.pop("JOURNAL_STREAM", None)
    read_end, write_end = os.pipe()
    if journal:
        info = os.fstat(write_end)
        env["JOURNAL_STREAM"] = f"{info.st_dev}:{info.st_ino}"
    try:
        process = await trio.lowlevel.open_process(
            [*FRAMEWIRE, "run", str(config), *options], stderr=write_end, env=env
        )
    finally:
        os.close(write_end)
    log = b""
    async with trio.lowlevel.FdStream(read_end) as stderr:
        try:
            with trio.fail_after(PATIENCE):
                while chunk := await stderr.receive_some(65536):
                    log += chunk
                code = await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    return code, log.decode()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "missing-cert.toml"
    path.write_text(MISSING_CERTIFICATE.format(missing=tmp_path / "missing"))
    return path


async def test_under_journald_lines_carry_priorities_and_no_timestamp(config: Path) -> None:
    code, text = await run_daemon(config, journal=True)
    assert code == 1
    lines = text.splitlines()
    for line in lines[:-1]:
        assert re.match(r"<[3467]>[A-Z]+ +framewire\.[a-z.-]+: ", line), line
    # The expected failure is one line at priority 3, its traceback left for DEBUG.
    failure = next(line for line in lines if "endpoint out cannot start" in line)
    assert failure.startswith("<3>ERROR   framewire.supervisor: ")
    assert "cannot load certificate" in failure
    assert "Traceback" not in text
    assert any(line.startswith("<6>INFO    framewire.endpoint.plain: ") for line in lines)
    assert lines[-1].startswith("<3>framewire: not started: ")


async def test_a_traceback_under_journald_keeps_its_priority_on_every_line(config: Path) -> None:
    code, text = await run_daemon(config, "--log-level", "debug", journal=True)
    assert code == 1
    assert "<7>Traceback (most recent call last):" in text
    assert all(re.match(r"<[0-7]>", line) for line in text.splitlines())


async def test_without_journald_lines_have_a_timestamp(config: Path) -> None:
    code, text = await run_daemon(config)
    assert code == 1
    failure = next(line for line in text.splitlines() if "endpoint out cannot start" in line)
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ERROR +framewire\.supervisor: ", failure)
    assert "<3>" not in text
    assert "Traceback" not in text


async def test_json_log_is_one_object_per_line(config: Path) -> None:
    code, text = await run_daemon(config, "--log-format", "json")
    assert code == 1
    records = [json.loads(line) for line in text.splitlines()]
    assert all({"time", "level", "logger", "message"} <= record.keys() for record in records)
    failure = next(r for r in records if r["message"].startswith("endpoint out cannot start"))
    assert failure["level"] == "ERROR"
    assert failure["logger"] == "framewire.supervisor"
    assert "exception" not in failure  # an expected failure: its traceback is for DEBUG
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d", failure["time"])
    assert records[-1]["message"].startswith("not started: ")
    debug = [
        json.loads(line)
        for line in (await run_daemon(config, "--log-format", "json", "--log-level", "debug"))[
            1
        ].splitlines()
    ]
    assert any(r.get("exception", "").startswith("Traceback") for r in debug)


async def test_a_bad_configuration_under_journald_is_an_error(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[endpoints.x]\nkind = "nope"\n')
    code, text = await run_daemon(config, journal=True)
    assert code == 2
    # As framewire check writes it: the file, the line and column of the value.
    assert text.startswith(f"<3>{config}:2:8: error: endpoints.x.kind: unknown endpoint kind")
    assert text.count("\n") == 1


async def test_a_bad_log_format_is_a_usage_error() -> None:
    with trio.fail_after(PATIENCE):
        result = await trio.run_process(
            [*FRAMEWIRE, "run", "--log-format", "xml"],
            capture_stderr=True,
            check=False,
            env=ENV,
        )
    assert result.returncode == 2
    assert result.stderr.decode().count("\n") == 1
    assert "invalid choice: 'xml'" in result.stderr.decode()


# -- the pieces ----------------------------------------------------------------------------


def test_journal_detection_compares_device_and_inode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with (tmp_path / "a").open("w") as a, (tmp_path / "b").open("w") as b:
        info = os.fstat(a.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")
        assert stderr_is_journal(a)
        assert not stderr_is_journal(b)  # inherited variable, redirected stream
        monkeypatch.setenv("JOURNAL_STREAM", "nonsense")
        assert not stderr_is_journal(a)
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not stderr_is_journal(a)
    assert not stderr_is_journal(io.StringIO())  # no file descriptor


def test_priorities() -> None:
    assert [syslog_priority(level) for level in (50, 40, 30, 20, 10, 5)] == [2, 3, 4, 6, 7, 7]


def record_with_exception(name: str) -> logging.LogRecord:
    try:
        raise FileNotFoundError(2, "No such file or directory")
    except FileNotFoundError:
        return logging.getLogger(name).makeRecord(
            name, logging.ERROR, __file__, 1, "cannot open %s", ("x.pem",), sys.exc_info()
        )


def test_a_traceback_is_rendered_as_the_caller_attached_it() -> None:
    record = record_with_exception("fw-test.bug")
    journal = TextFormatter(journal=True).format(record).splitlines()
    assert journal[0] == "<3>ERROR   fw-test.bug: cannot open x.pem"
    assert journal[1] == "<3>Traceback (most recent call last):"
    assert journal[-1] == "<3>FileNotFoundError: [Errno 2] No such file or directory"
    exception = json.loads(JsonFormatter().format(record))["exception"]
    assert exception.startswith("Traceback")
    assert exception.endswith("FileNotFoundError: [Errno 2] No such file or directory")


def test_setup_logging_replaces_the_handlers() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        out = io.StringIO()
        setup_logging("warning", "json", stream=out)
        setup_logging("warning", "json", stream=out)
        assert len(root.handlers) == 1
        logging.getLogger("fw-test.setup").warning("hello %d", 1)
        assert json.loads(out.getvalue())["message"] == "hello 1"
        with pytest.raises(ValueError, match="unknown log format"):
            setup_logging("info", "xml")  # type: ignore[arg-type]
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
