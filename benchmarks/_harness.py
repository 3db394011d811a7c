"""What the benchmark scripts share: child processes, CPU accounting from /proc, ports, output.

Not a benchmark: the scripts in this directory import it (``from _harness import ...``; a
script's own directory is on ``sys.path`` when it is run as ``python benchmarks/NAME.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import select
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Final

HOST: Final = "127.0.0.1"
MIB: Final = 1 << 20
GB: Final = 1e9
#: How long a child gets to start (print its first line, listen, connect its clients).
START_TIMEOUT: Final = 20.0
#: How long a read from a child or a socket may wait once things run.
IO_TIMEOUT: Final = 10.0
#: How often CpuSamples are taken while a measurement runs.
SAMPLE_INTERVAL: Final = 0.05
#: How long a process gets to exit after SIGTERM (then SIGKILL), or after SIGKILL.
STOP_TIMEOUT: Final = 5.0
CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
#: CPU use by other processes (share of one CPU) above which a summary warns.
BUSY_MACHINE: Final = 0.2


# -- child processes ------------------------------------------------------------------------


class ChildTimeout(RuntimeError):
    """A child printed no line within the time allowed."""


class Child:
    """A child process whose stdout is read line by line, with timeouts.

    ``stdin`` is ``subprocess.DEVNULL`` unless given (``subprocess.PIPE`` for
    :meth:`send_line`). Its stderr goes to ``stderr`` (inherited if None), or to the file
    ``stderr_path``, whose end is then quoted if the child exits early. Used as a context
    manager, it is stopped on the way out. ``env`` and ``cwd`` are Popen's (see
    :func:`tree_env` for a daemon from another checkout).
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        stdin: int = subprocess.DEVNULL,
        stderr: int | IO[bytes] | None = None,
        stderr_path: Path | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.stderr_path = stderr_path
        with contextlib.ExitStack() as stack:
            if stderr_path is not None:
                stderr = stack.enter_context(open(stderr_path, "wb"))
            self.proc = subprocess.Popen(
                argv, stdin=stdin, stdout=subprocess.PIPE, stderr=stderr, env=env, cwd=cwd
            )
        self._pending = b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def fd(self) -> int:
        assert self.proc.stdout is not None
        return self.proc.stdout.fileno()

    def buffered_line(self) -> str | None:
        """A complete line already read, if any."""
        if b"\n" not in self._pending:
            return None
        line, _, self._pending = self._pending.partition(b"\n")
        return line.decode()

    def fill(self) -> None:
        """Read what is available (call when select() says the fd is readable).

        Raises RuntimeError if the child closed its stdout (it exited).
        """
        chunk = os.read(self.fd, 65536)
        if not chunk:
            code = self.proc.wait(STOP_TIMEOUT)
            message = f"{self.name}: exited (status {code}) before answering"
            if self.stderr_path is not None:
                tail = self.stderr_path.read_text(errors="replace")[-2000:]
                message += f"; stderr:\n{tail}"
            raise RuntimeError(message)
        self._pending += chunk

    def readline(self, timeout: float) -> str:
        """The next line of output.

        Raises ChildTimeout if none comes within ``timeout`` seconds, RuntimeError if the
        child exits first.
        """
        deadline = time.monotonic() + timeout
        while (line := self.buffered_line()) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChildTimeout(f"{self.name}: no output within {timeout:g}s")
            readable, _, _ = select.select([self.fd], [], [], left)
            if readable:
                self.fill()
        return line

    def ready_port(self, timeout: float) -> int:
        """The port of the next line, which must be ``ready PORT``."""
        ready = self.readline(timeout).split()
        if len(ready) != 2 or ready[0] != "ready":
            raise RuntimeError(f"{self.name}: unexpected output {' '.join(ready)!r}")
        return int(ready[1])

    def send_line(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def stop(self, *, kill: bool = False) -> None:
        """SIGTERM (SIGKILL at once with ``kill``), then SIGKILL if it has not exited within
        STOP_TIMEOUT; then close its pipes."""
        if self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()

    def __enter__(self) -> Child:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


@contextlib.contextmanager
def all_stopped(*, kill: bool = False) -> Iterator[list[Child]]:
    """A list to append children to; each is stopped (last started first) on the way out."""
    children: list[Child] = []
    try:
        yield children
    finally:
        for child in reversed(children):
            child.stop(kill=kill)


def script_argv(script: str, *args: object, **options: object) -> list[str]:
    """The command that runs ``script`` (a benchmark's ``__file__``) again as a child:
    ``args`` as they are, then ``--some-option=value`` for each of ``options``."""
    argv = [sys.executable, str(Path(script).resolve()), *map(str, args)]
    return argv + [f"--{key.replace('_', '-')}={value}" for key, value in options.items()]


def daemon_argv(config: Path, *python_options: str) -> list[str]:
    """The command that runs a framewire daemon with ``config``."""
    return [sys.executable, *python_options, "-m", "framewire", "run", str(config)]


def tree_env(tree: str | None) -> dict[str, str] | None:
    """The environment in which ``python -m framewire`` runs the framewire of the checkout
    ``tree`` (None: this one's, the environment unchanged). Run that child with its working
    directory elsewhere (``cwd``): ``python -m`` puts the working directory first on
    ``sys.path``, and a checkout there would win over ``tree``."""
    if tree is None:
        return None
    return {**os.environ, "PYTHONPATH": str(Path(tree).resolve())}


def raise_open_files() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit (many clients in one process)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # so that every child is stopped on the way out


def exit_on_sigterm() -> None:
    """Make SIGTERM raise SystemExit, so that every child is stopped on the way out."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)


# -- ports ----------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports that were free a moment ago."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((HOST, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def free_port() -> int:
    """A port that was free a moment ago."""
    return free_ports(1)[0]


def wait_for_port(port: int, timeout: float, child: Child | None = None) -> None:
    """Wait until something accepts connections on ``port``; RuntimeError after ``timeout``
    seconds, or as soon as ``child`` (the process that should listen) has exited."""
    deadline = time.monotonic() + timeout
    while True:
        if child is not None and child.proc.poll() is not None:
            raise RuntimeError(f"{child.name} exited with status {child.proc.returncode}")
        try:
            with socket.create_connection((HOST, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{child.name if child else 'port'}: port {port} not accepting"
                    f" after {timeout:g}s"
                ) from None
            time.sleep(0.05)


def wait_for_listen(port: int, child: Child) -> None:
    """Wait until ``port`` is in LISTEN state (from /proc/net/tcp) without connecting to it:
    a proxy would relay the probe to the consumer, which accepts exactly one connection, and
    a server would count it as a client. RuntimeError after START_TIMEOUT or if ``child``
    exits first."""
    needle = f"{socket.htonl(0x7F000001):08X}:{port:04X}"
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if child.proc.poll() is not None:
            raise RuntimeError(f"{child.name} exited with status {child.proc.returncode}")
        with open("/proc/net/tcp") as table:
            for line in table:
                fields = line.split()
                if len(fields) > 3 and fields[1] == needle and fields[3] == "0A":
                    return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{child.name}: not listening on {port} after {START_TIMEOUT:g}s")
        time.sleep(0.02)


# -- CPU time and memory from /proc -------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of ``pid`` (all its threads) from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # Fields after "(comm)" start at field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """The resident memory (``VmRSS``) of ``pid``; RuntimeError if /proc has none."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def machine_busy_seconds() -> tuple[float, float]:
    """CPU time used on every CPU by anything, including time stolen by a hypervisor; and
    the part of it spent in interrupts and softirqs (loopback TCP is largely softirq work,
    charged to no process)."""
    with open("/proc/stat") as stat:
        # cpu user nice system idle iowait irq softirq steal ...
        ticks = [int(value) for value in stat.readline().split()[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / CLOCK_TICKS, (ticks[5] + ticks[6]) / CLOCK_TICKS


@dataclass
class CpuSamples:
    """CPU times of some processes (and of the machine: ``machine``, ``irq``) sampled over
    time, to interpolate."""

    pids: dict[str, int]
    samples: list[tuple[float, dict[str, float]]] = field(default_factory=list)

    def take(self) -> None:
        now = time.monotonic()
        values = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        values["machine"], values["irq"] = machine_busy_seconds()
        self.samples.append((now, {k: v for k, v in values.items() if v is not None}))

    def at(self, name: str, when: float) -> float | None:
        points = [(t, values[name]) for t, values in self.samples if name in values]
        before = [p for p in points if p[0] <= when]
        after = [p for p in points if p[0] >= when]
        if not before or not after:
            return None
        (ta, va), (tb, vb) = before[-1], after[0]
        return va if tb == ta else va + (vb - va) * (when - ta) / (tb - ta)

    def used(self, name: str, t0: float, t1: float) -> float | None:
        start, end = self.at(name, t0), self.at(name, t1)
        return None if start is None or end is None else end - start


def others_during(cpu: CpuSamples, t0: float, t1: float) -> float | None:
    """The share of one CPU that processes other than ``cpu``'s used from ``t0`` to ``t1``
    (the machine's busy time minus theirs); None if a figure is missing."""
    machine = cpu.used("machine", t0, t1)
    ours = [cpu.used(name, t0, t1) for name in cpu.pids]
    if machine is None or t1 <= t0:
        return None
    known = [value for value in ours if value is not None]
    if len(known) < len(ours):
        return None
    return max(0.0, machine - sum(known)) / (t1 - t0)


def sample_until_line(child: Child, pids: dict[str, int], timeout: float) -> tuple[str, CpuSamples]:
    """Sample the CPU of ``pids`` (and of the machine) every SAMPLE_INTERVAL until ``child``
    prints a line; ChildTimeout after ``timeout`` seconds."""
    cpu = CpuSamples(pids)
    cpu.take()
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = child.readline(SAMPLE_INTERVAL)
            break
        except ChildTimeout:
            if time.monotonic() > deadline:
                raise
        cpu.take()
    cpu.take()
    return line, cpu


# -- payloads, reports, output --------------------------------------------------------------


def payload_of(size: int) -> bytes:
    """``size`` bytes of 0, 1, ..., 255, 0, 1, ..."""
    return (bytes(range(256)) * (size // 256 + 1))[:size]


def report(messages: float, payload_bytes: float, seconds: float) -> None:
    """A receiving child's result line, for :func:`report_rate`."""
    print(json.dumps({"messages": messages, "bytes": payload_bytes, "seconds": seconds}))


def size_label(payload_size: int) -> str:
    return f"{payload_size // MIB} MiB" if payload_size % MIB == 0 else f"{payload_size} B"


def rate_text(payload_size: int, gbit_per_second: float, per_second: float, unit: str) -> str:
    """Gbit/s of payload for payloads of 1 MiB and more, else messages per second."""
    if payload_size >= MIB:
        return f"{gbit_per_second:8.2f} Gbit/s"
    return f"{per_second:>12,.0f} {unit}"


def report_rate(result: Mapping[str, float], payload_size: int) -> str:
    """:func:`rate_text` of a :func:`report`, in msg/s."""
    seconds = result["seconds"]
    gbit = result["bytes"] * 8 / seconds / 1e9
    return rate_text(payload_size, gbit, result["messages"] / seconds, "msg/s")


def cpu_text(used: float | None, seconds: float, *, width: int = 11) -> str:
    """CPU seconds and their share of one CPU over ``seconds``; ``-`` if unknown."""
    if used is None:
        return f"{'-':>{width}}"
    return f"{used:5.2f}s {used / seconds:4.0%}" if seconds > 0 else f"{used:5.2f}s    -"


def machine_text() -> str:
    """CPUs, load and Python version, for a benchmark's first line."""
    return f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, Python {sys.version.split()[0]}"


def warn_if_busy(shares: Iterable[float], consequence: str) -> None:
    """Warn if other processes used more than BUSY_MACHINE of a CPU in some measurement."""
    busiest = max(shares, default=0.0)
    if busiest > BUSY_MACHINE:
        print(
            f"warning: other processes used up to {busiest:.0%} of a CPU during a measurement;"
            f" {consequence}"
        )


# -- command line ---------------------------------------------------------------------------


def add_case_options(
    parser: argparse.ArgumentParser, *, duration: float, quick_duration: float
) -> None:
    """--duration, --warmup, --quick and --sizes, as link.py and bridge.py have them."""
    parser.add_argument(
        "--duration", type=float, default=duration, help="seconds measured per case"
    )
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds before measuring")
    parser.add_argument(
        "--quick", action="store_true", help=f"--warmup 0.2 --duration {quick_duration:g}"
    )
    parser.add_argument(
        "--sizes", default=f"{MIB},64", help="payload sizes in bytes (default 1048576,64)"
    )


def add_role_options(parser: argparse.ArgumentParser, roles: Sequence[str] | None = None) -> None:
    """The hidden options with which a script runs itself as a child: --role, --port,
    --payload-size, --seconds (a safety limit)."""
    parser.add_argument("--role", choices=roles, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--payload-size", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=60.0, help=argparse.SUPPRESS)


def apply_quick(args: argparse.Namespace, duration: float) -> None:
    """With --quick: a 0.2 s warm-up and ``duration`` seconds per case."""
    if args.quick:
        args.warmup, args.duration = 0.2, duration


# -- issue 12's table -----------------------------------------------------------------------


@dataclass
class Row:
    """One line of issue 12's table (issue12.py prints them), and its verdict."""

    case: str
    figure: str
    baseline: str
    ratio: str
    target: str
    met: bool | None  # None: no target, or not measured
    others: float | None  # the largest share of one CPU other processes used meanwhile


TABLE_HEAD: Final = (
    "| case | framewire | baseline in the same run | ratio | target | met? | others |\n"
    "|---|---|---|---|---|---|---|"
)


def print_row(row: Row) -> None:
    met = "-" if row.met is None else ("met" if row.met else "NOT met")
    others = "-" if row.others is None else f"{row.others:.0%}"
    print(
        f"| {row.case} | {row.figure} | {row.baseline} | {row.ratio} | {row.target} | {met}"
        f" | {others} |",
        flush=True,
    )


def median(values: Iterable[float | None]) -> float | None:
    """The median of the known values, or None if there is none."""
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def worst(values: Iterable[float | None]) -> float | None:
    """The largest of the known values, or None if there is none."""
    known = [v for v in values if v is not None]
    return max(known) if known else None
