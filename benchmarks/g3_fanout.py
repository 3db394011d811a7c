"""G3 fan-out: a real G3NetworkSender serving G3Readers itself, and through a framewire daemon.

Run ``python benchmarks/g3_fanout.py`` (``--help`` for options). It measures, side by side,
in one run:

direct
    a real spt3g ``G3NetworkSender`` in listen mode (``hostname='*'``, ``max_queue_size=0``),
    its own process, fans 8 MB Scan frames out to ``--readers`` real ``G3Reader`` processes
    (``tcp://127.0.0.1:PORT``);
relayed
    the same source, as a ``G3NetworkSender`` in connect mode, pushes into a framewire daemon
    (``python -m framewire run CONFIG``, its own process) with a g3 ``receiver`` and a
    lossless g3 ``server`` (``close_on_end = true``) that the same readers connect to.

In both cases the source first sends a small Observation frame every 75 ms (a listen-mode
sender accepts connections only while it processes a frame) until every reader has received
one; then, on "go", a Calibration frame, ``--frames`` Scan frames, and EndProcessing. Each
reader counts Scan frames, checks their sequence numbers, and reports the times of its first
and last Scan. The measured phase runs from the first reader's first Scan to the last
reader's last Scan; the CPU time of every process in it is read from /proc.

The script runs itself as the source and reader processes (``--role``, not for direct use).
Every process it starts is terminated on the way out (SIGTERM, then SIGKILL), and every wait
has a timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from _harness import (
    CLOCK_TICKS,
    HOST,
    Child,
    ChildTimeout,
    CpuSamples,
    cpu_text,
    daemon_argv,
    exit_on_sigterm,
    free_port,
    machine_text,
    script_argv,
    warn_if_busy,
)

STREAM: Final = "bench"
#: How often the source sends a warm-up Observation frame while waiting for "go".
WARMUP_INTERVAL: Final = 0.075
#: How long a process gets to start (print its first line).
START_TIMEOUT: Final = 20.0
#: G3Reader's socket timeout (SO_RCVTIMEO): idle this long, a reader ends its stream.
READER_TIMEOUT: Final = 60.0
#: How often the CPU times of every process are sampled during a measurement.
SAMPLE_INTERVAL: Final = 0.05

DAEMON_CONFIG: Final = """\
[daemon]
grace_period = "1s"
log_level = "info"

[endpoints.bench-in]
kind = "receiver"
listen = "tcp://{host}:0"
protocol = "g3"
stream = "{stream}"
max_frame_size = "64MiB"

[endpoints.bench-out]
kind = "server"
listen = "tcp://{host}:0"
protocol = "g3"
stream = "{stream}"
policy = "lossless"
max_queue_frames = {max_queue_frames}
max_queue_bytes = "{max_queue_mib}MiB"
max_clients = {max_clients}
close_on_end = true
"""
RECEIVER_LINE: Final = re.compile(r"receiving g3 into stream '\w+' on [\d.]+:(\d+)")
SERVER_LINE: Final = re.compile(r"serving stream '\w+' as g3 on [\d.]+:(\d+)")
CLIENT_LINE: Final = re.compile(r"client \S+ connected \((\d+) now\)")
DISCONNECT_LINE: Final = re.compile(
    r"client \S+ disconnected: .*\(sent (\d+) frames, (?:\d+ bytes; )?dropped (\d+)\b"
)


def main_thread_cpu_seconds(pid: int) -> float | None:
    """utime + stime of the main thread of ``pid`` (its thread id is the pid), from /proc, or
    None if it is gone."""
    try:
        with open(f"/proc/{pid}/task/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@dataclass
class SourceCpuSamples(CpuSamples):
    """CpuSamples that also sample the source's main thread, as ``source main``.

    The source's main thread builds each frame (numpy, G3VectorDouble) and, inside
    ``sender(frame)``, serialises it (copy and CRC; ``n_serializers=0``). The rest of the
    source's CPU is G3NetworkSender's send threads: one per reader in listen mode (direct),
    one to the daemon in connect mode (relayed).
    """

    source_pid: int = 0

    def take(self) -> None:
        super().take()
        value = main_thread_cpu_seconds(self.source_pid)
        if value is not None:
            self.samples[-1][1]["source main"] = value


# -- the source and reader processes -------------------------------------------------------


class StdinLines:
    """Lines from the orchestrator on stdin, read with a timeout (no buffering surprises)."""

    def __init__(self) -> None:
        self._pending = b""

    def next(self, timeout: float) -> str | None:
        """The next line, or None if none came within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            readable, _, _ = select.select([0], [], [], left)
            if readable:
                chunk = os.read(0, 4096)
                if not chunk:
                    raise SystemExit("source: stdin closed")
                self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line.decode().strip()


def run_source(args: argparse.Namespace) -> None:
    """A G3NetworkSender: listen mode (``--mode listen``) or connect mode (``--mode connect``).

    Prints ``ready SCAN_WIRE_BYTES`` once listening or connected, sends warm-up Observation
    frames until "go", then a Calibration, the Scan frames and EndProcessing, prints a JSON
    line, and waits for "exit" (a listen-mode sender's clients see EOF only when it exits).
    """
    import numpy
    from spt3g import core

    per_key = [args.doubles // args.keys + (i < args.doubles % args.keys) for i in range(args.keys)]

    def scan(seq: int) -> Any:
        frame = core.G3Frame(core.G3FrameType.Scan)
        for key, doubles in enumerate(per_key):
            frame[f"data{key}"] = core.G3VectorDouble(numpy.zeros(doubles))
        frame["seq"] = core.G3Int(seq)
        return frame

    scan_bytes = len(scan(0).__getstate__()[1])
    if args.mode == "listen":
        sender = core.G3NetworkSender(hostname="*", port=args.port, max_queue_size=0)
    else:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                sender = core.G3NetworkSender(hostname=HOST, port=args.port, max_queue_size=0)
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    print(f"ready {scan_bytes}", flush=True)

    stdin = StdinLines()
    deadline = time.monotonic() + args.seconds
    warmups = 0
    while True:
        observation = core.G3Frame(core.G3FrameType.Observation)
        observation["warmup"] = core.G3Int(warmups)
        sender(observation)
        warmups += 1
        line = stdin.next(WARMUP_INTERVAL)
        if line == "go":
            break
        if line is not None:
            raise SystemExit(f"source: unexpected input {line!r}")
        if time.monotonic() > deadline:
            raise SystemExit("source: no 'go' in time")

    go_at = time.monotonic()
    calibration = core.G3Frame(core.G3FrameType.Calibration)
    calibration["frames"] = core.G3Int(args.frames)
    sender(calibration)
    for seq in range(args.frames):
        sender(scan(seq))
    sender(core.G3Frame(core.G3FrameType.EndProcessing))  # waits until every queue is sent
    if args.mode == "connect":
        del sender  # closes the connection: the relay's end of stream
    print(json.dumps({"go": go_at, "sent": time.monotonic(), "warmups": warmups}), flush=True)
    line = stdin.next(args.seconds)
    if line != "exit":
        raise SystemExit(f"source: expected 'exit', got {line!r}")


def run_reader(args: argparse.Namespace) -> None:
    """A G3Reader on ``--url``. Prints ``connected``, ``ready`` (first frame of any type),
    ``done {json}`` (``--frames`` Scans, or the end of the stream if it came first) and
    ``end {json}`` at the end of the stream (to catch extra frames)."""
    from spt3g import core

    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            reader = core.G3Reader(args.url, timeout=READER_TIMEOUT)
            break
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    print("connected", flush=True)
    scan_type = core.G3FrameType.Scan
    scans = others = out_of_order = 0
    first = last = 0.0
    ready = done = False

    def report() -> str:
        return json.dumps(
            {
                "scans": scans,
                "others": others,
                "out_of_order": out_of_order,
                "first": first,
                "last": last,
            }
        )

    while True:
        got = reader.Process(None)
        now = time.monotonic()
        if not got:
            break
        for frame in got:
            if not ready:
                print("ready", flush=True)
                ready = True
            if frame.type == scan_type:
                if scans == 0:
                    first = now
                last = now
                if int(frame["seq"]) != scans:
                    out_of_order += 1
                scans += 1
                if scans == args.frames:
                    print(f"done {report()}", flush=True)
                    done = True
            else:
                others += 1
    if not done:
        print(f"done {report()}", flush=True)
    print(f"end {report()}", flush=True)


# -- child processes ------------------------------------------------------------------------


def start_child(name: str, argv: Sequence[str], stderr_path: Path) -> Child:
    """A child with a pipe to its stdin, its stderr in ``stderr_path``."""
    return Child(name, argv, stdin=subprocess.PIPE, stderr_path=stderr_path)


def wait_lines(
    children: Sequence[Child],
    timeout: float,
    *,
    tick: Callable[[], None] | None = None,
    prefix: str | None = None,
) -> dict[Child, str]:
    """The next line of each child (checked to start with ``prefix``), waiting for all.

    ``tick`` is called at least every SAMPLE_INTERVAL while waiting. Raises ChildTimeout if
    some child has not answered within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    lines: dict[Child, str] = {}
    while True:
        for child in children:
            if child not in lines:
                line = child.buffered_line()
                if line is not None:
                    if prefix is not None and not line.startswith(prefix):
                        raise RuntimeError(f"{child.name}: expected {prefix!r}, got {line!r}")
                    lines[child] = line
        waiting = [child for child in children if child not in lines]
        if not waiting:
            return lines
        left = deadline - time.monotonic()
        if left <= 0:
            names = ", ".join(child.name for child in waiting)
            raise ChildTimeout(f"no {prefix or 'output'!r} within {timeout:g}s from {names}")
        by_fd = {child.fd: child for child in waiting}
        readable, _, _ = select.select(list(by_fd), [], [], min(left, SAMPLE_INTERVAL))
        for fd in readable:
            by_fd[fd].fill()
        if tick is not None:
            tick()


def role_argv(role: str, args: argparse.Namespace, *extra: str) -> list[str]:
    return script_argv(
        __file__,
        f"--role={role}",
        f"--frames={args.frames}",
        f"--doubles={args.doubles}",
        f"--keys={args.keys}",
        *extra,
    )


# -- the daemon -----------------------------------------------------------------------------


def start_daemon(workdir: Path, args: argparse.Namespace, run: int) -> tuple[Child, Path]:
    config = workdir / f"fanout-{run}.toml"
    config.write_text(
        DAEMON_CONFIG.format(
            host=HOST,
            stream=STREAM,
            max_queue_frames=args.max_queue_frames,
            max_queue_mib=args.max_queue_mib,
            max_clients=max(args.readers, 10),
        )
    )
    log = workdir / f"daemon-{run}.log"
    return start_child("daemon", daemon_argv(config), log), log


def wait_for_log(
    daemon: Child, log: Path, pattern: re.Pattern[str], timeout: float, count: int = 1
) -> list[re.Match[str]]:
    """Poll the daemon's log until ``pattern`` matched ``count`` lines; return the matches."""
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace")
        matches = list(pattern.finditer(text))
        if len(matches) >= count:
            return matches
        if daemon.proc.poll() is not None:
            raise RuntimeError(f"daemon exited with status {daemon.proc.returncode}:\n{text}")
        if time.monotonic() > deadline:
            raise ChildTimeout(
                f"daemon: {len(matches)} of {count} log lines matching {pattern.pattern!r}"
                f" after {timeout:g}s"
            )
        time.sleep(0.02)


# -- one measurement ------------------------------------------------------------------------


@dataclass
class Result:
    path: str  # "direct" or "relayed"
    readers: int
    frames: int  # Scan frames sent
    scan_bytes: int  # wire size of one Scan frame
    delivered: list[int]  # Scan frames each reader received
    extra: list[int]  # Scan frames a reader received after its "done" (should be 0)
    out_of_order: int
    seconds: float  # first reader's first Scan to last reader's last Scan
    cpu: dict[str, float | None]
    dropped: int | None = None  # relayed: as the daemon logged it

    @property
    def total(self) -> int:
        return sum(self.delivered)

    @property
    def lossless(self) -> bool:
        return (
            all(count == self.frames for count in self.delivered)
            and not any(self.extra)
            and not self.out_of_order
            and not self.dropped
        )

    @property
    def frames_per_second(self) -> float:
        return self.total / self.seconds if self.seconds > 0 else 0.0

    @property
    def gb_per_second(self) -> float:
        return self.frames_per_second * self.scan_bytes / 1e9

    @property
    def serving_cpu(self) -> float | None:
        return self.cpu["serving"]

    @property
    def sending_cpu(self) -> float | None:
        """The serving CPU without building and serialising the frames: G3NetworkSender's
        send threads (direct; its process minus its main thread), the daemon (relayed; the
        relayed source builds and serialises the frames itself)."""
        if self.path == "relayed":
            return self.serving_cpu
        serving, main = self.serving_cpu, self.cpu["source main"]
        return None if serving is None or main is None else serving - main

    @property
    def path_cpu(self) -> float | None:
        """CPU of everything on the frames' path: source, daemon (relayed), readers, irq."""
        parts = [self.serving_cpu, self.cpu["readers"], self.cpu["irq"]]
        if self.path == "relayed":
            parts.append(self.cpu["source"])
        return None if None in parts else sum(part for part in parts if part is not None)


def measure(args: argparse.Namespace, workdir: Path, relayed: bool, run: int) -> Result:
    """One case. Every process it starts is stopped before it returns or raises."""
    path = "relayed" if relayed else "direct"
    children: list[Child] = []

    def start(name: str, argv: list[str], stderr: str | None = None) -> Child:
        child = start_child(name, argv, workdir / f"{stderr or name}-{path}-{run}.log")
        children.append(child)
        return child

    daemon: Child | None = None
    log: Path | None = None
    try:
        if relayed:
            daemon, log = start_daemon(workdir, args, run)
            children.append(daemon)
            receiver = wait_for_log(daemon, log, RECEIVER_LINE, START_TIMEOUT)[0]
            server = wait_for_log(daemon, log, SERVER_LINE, START_TIMEOUT)[0]
            source_port, reader_port = int(receiver.group(1)), int(server.group(1))
            source: Child | None = None
        else:
            source_port = reader_port = free_port()
            source = start(
                "source", role_argv("source", args, "--mode=listen", f"--port={source_port}")
            )
            scan_bytes = int(source.readline(START_TIMEOUT).split()[1])

        url = f"--url=tcp://{HOST}:{reader_port}"
        readers = [
            start(f"reader {i}", role_argv("reader", args, url), f"reader{i}")
            for i in range(args.readers)
        ]
        wait_lines(readers, START_TIMEOUT, prefix="connected")
        if relayed:
            assert daemon is not None
            assert log is not None
            wait_for_log(daemon, log, CLIENT_LINE, START_TIMEOUT, count=args.readers)
            source = start(
                "source", role_argv("source", args, "--mode=connect", f"--port={source_port}")
            )
            scan_bytes = int(source.readline(START_TIMEOUT).split()[1])
        assert source is not None
        # Every reader is connected (accepted, for the listen-mode sender) and has its first
        # warm-up frame: start the measured phase.
        wait_lines(readers, START_TIMEOUT, prefix="ready")

        pids = {"source": source.pid, "harness": os.getpid()}
        pids.update({reader.name: reader.pid for reader in readers})
        if daemon is not None:
            pids["daemon"] = daemon.pid
        cpu = SourceCpuSamples(pids, source_pid=source.pid)
        cpu.take()
        source.send_line("go")
        run_timeout = START_TIMEOUT + args.frames * args.readers * args.doubles * 8 / 50e6
        done = wait_lines(readers, run_timeout, tick=cpu.take, prefix="done ")
        cpu.take()  # every process is still running: the listen-mode source waits for "exit"
        sent = json.loads(source.readline(run_timeout))
        source.send_line("exit")
        ends = wait_lines(readers, START_TIMEOUT, prefix="end ")
        dropped = None
        if daemon is not None and log is not None:
            lines = wait_for_log(daemon, log, DISCONNECT_LINE, START_TIMEOUT, count=args.readers)
            dropped = sum(int(match.group(2)) for match in lines)
    except Exception:
        for child in children:
            child.stop()
        print(f"{path} case failed; logs:", file=sys.stderr)
        for child in children:
            assert child.stderr_path is not None
            text = child.stderr_path.read_text(errors="replace").strip()
            if text:
                print(f"--- {child.name}:\n{text[-3000:]}", file=sys.stderr)
        raise
    finally:
        for child in children:
            child.stop()
    if daemon is not None and daemon.proc.returncode not in (0, -signal.SIGTERM):
        assert log is not None
        raise RuntimeError(
            f"daemon exit status {daemon.proc.returncode}; its log:\n"
            + log.read_text(errors="replace")
        )

    reports = [json.loads(done[reader].split(" ", 1)[1]) for reader in readers]
    finals = [json.loads(ends[reader].split(" ", 1)[1]) for reader in readers]
    firsts = [r["first"] for r in reports if r["scans"]]
    lasts = [r["last"] for r in reports if r["scans"]]
    t0, t1 = (min(firsts), max(lasts)) if firsts else (sent["go"], sent["sent"])
    serving = "daemon" if relayed else "source"
    used: dict[str, float | None] = {
        "serving": cpu.used(serving, t0, t1),
        "source": cpu.used("source", t0, t1) if relayed else None,
        "source main": cpu.used("source main", t0, t1),
    }
    reader_cpu = [cpu.used(reader.name, t0, t1) for reader in readers]
    used["readers"] = None if None in reader_cpu else sum(v for v in reader_cpu if v is not None)
    machine = cpu.used("machine", t0, t1)
    harness = cpu.used("harness", t0, t1)
    ours = [v for v in (used["serving"], used["source"], used["readers"], harness) if v is not None]
    irq = used["irq"] = cpu.used("irq", t0, t1)
    if machine is None or irq is None:
        used["others"] = None
    else:
        used["others"] = max(0.0, machine - irq - sum(ours))
    used["machine"] = machine
    return Result(
        path=path,
        readers=args.readers,
        frames=args.frames,
        scan_bytes=scan_bytes,
        delivered=[r["scans"] for r in reports],
        extra=[f["scans"] - r["scans"] for r, f in zip(reports, finals, strict=True)],
        out_of_order=sum(f["out_of_order"] for f in finals),
        seconds=t1 - t0,
        cpu=used,
        dropped=dropped,
    )


# -- reporting ------------------------------------------------------------------------------


HEADER: Final = (
    f"{'path':<8} {'delivered':>11} {'window':>7} {'frames/s':>9} {'GB/s':>6}"
    f"  {'serving CPU':>11}  {'source CPU':>11}  {'readers CPU':>11}  {'irq':>5}  {'others':>6}"
    "  lossless"
)


def share(used: float | None, seconds: float) -> str:
    return "-" if used is None or seconds <= 0 else f"{used / seconds:.0%}"


def print_row(result: Result) -> None:
    expected = result.frames * result.readers
    others = result.cpu["others"]
    verdict = "yes" if result.lossless else "NO"
    details = []
    if any(count != result.frames for count in result.delivered):
        details.append("per reader " + ",".join(map(str, result.delivered)))
    if any(result.extra):
        details.append(f"extra {sum(result.extra)}")
    if result.out_of_order:
        details.append(f"out of order {result.out_of_order}")
    if result.dropped:
        details.append(f"daemon dropped {result.dropped}")
    print(
        f"{result.path:<8} {f'{result.total}/{expected}':>11} {result.seconds:6.2f}s"
        f" {result.frames_per_second:9.1f} {result.gb_per_second:6.2f}"
        f"  {cpu_text(result.serving_cpu, result.seconds)}"
        f"  {cpu_text(result.cpu['source'], result.seconds)}"
        f"  {cpu_text(result.cpu['readers'], result.seconds)}"
        f"  {share(result.cpu['irq'], result.seconds):>5}"
        f"  {share(others, result.seconds):>6}"
        f"  {verdict}{' (' + '; '.join(details) + ')' if details else ''}",
        flush=True,
    )


def median(values: Sequence[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return statistics.median(known) if known else None


def per_frame(result: Result, used: float | None) -> float | None:
    """CPU seconds per delivered frame; None if unknown."""
    return None if used is None or not result.total else used / result.total


def paired_ratio(
    results: dict[str, list[Result]], value: Callable[[Result], float | None]
) -> float | None:
    """Median over runs of relayed/direct ``value``, each run's cases paired."""
    ratios = []
    for relayed, direct in zip(results["relayed"], results["direct"], strict=True):
        a, b = value(relayed), value(direct)
        if a is not None and b:
            ratios.append(a / b)
    return statistics.median(ratios) if ratios else None


def ms(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds * 1e3:.2f} ms"


def ratio_text(value: float | None) -> str:
    return "?" if value is None else f"{value:.3f}"


#: Issue 12's targets: relayed/direct delivered frames/s, and daemon CPU per delivered frame
#: against the G3NetworkSender process's.
TARGET_RATE: Final = 0.95
TARGET_CPU: Final = 0.8
#: A case whose processes kept this share of every CPU busy was bound by the machine.
SATURATED: Final = 0.9


def print_summary(results: dict[str, list[Result]]) -> None:
    direct, relayed = results["direct"], results["relayed"]
    runs = len(direct)
    print(f"\nsummary (medians of {runs} run{'s' if runs != 1 else ''} per case; ratios are")
    print("medians of each run's relayed/direct):")
    d_fps = statistics.median(r.frames_per_second for r in direct)
    r_fps = statistics.median(r.frames_per_second for r in relayed)
    d_gbs = statistics.median(r.gb_per_second for r in direct)
    r_gbs = statistics.median(r.gb_per_second for r in relayed)
    fps_ratio = paired_ratio(results, lambda r: r.frames_per_second)
    print(
        f"  delivered frames/s: direct {d_fps:.1f} ({d_gbs:.2f} GB/s),"
        f" relayed {r_fps:.1f} ({r_gbs:.2f} GB/s), relayed/direct {ratio_text(fps_ratio)}"
        f" (target >= {TARGET_RATE})"
    )

    def median_per_frame(rs: list[Result], value: Callable[[Result], float | None]) -> float | None:
        return median([per_frame(r, value(r)) for r in rs])

    cpu_ratio = paired_ratio(results, lambda r: per_frame(r, r.serving_cpu))
    print(
        "  serving CPU per delivered frame (issue 12's figure): G3NetworkSender"
        f" {ms(median_per_frame(direct, lambda r: r.serving_cpu))}, framewire daemon"
        f" {ms(median_per_frame(relayed, lambda r: r.serving_cpu))},"
        f" relayed/direct {ratio_text(cpu_ratio)} (target <= {TARGET_CPU})"
    )
    print(
        "    but the G3NetworkSender's figure includes building and serialising the frames"
        " on its main thread"
        f" ({ms(median_per_frame(direct, lambda r: r.cpu['source main']))}), which the"
        " relayed source does for the daemon"
        f" ({ms(median_per_frame(relayed, lambda r: r.cpu['source main']))});"
    )
    sending_ratio = paired_ratio(results, lambda r: per_frame(r, r.sending_cpu))
    print(
        "    without it, G3NetworkSender's send threads"
        f" {ms(median_per_frame(direct, lambda r: r.sending_cpu))} against the daemon:"
        f" relayed/direct {ratio_text(sending_ratio)}"
    )
    end_to_end = paired_ratio(
        results,
        lambda r: per_frame(
            r,
            r.serving_cpu
            if r.path == "direct" or r.serving_cpu is None or r.cpu["source"] is None
            else r.serving_cpu + r.cpu["source"],
        ),
    )
    print(
        "  end to end, source + daemon against the serving source: relayed/direct"
        f" {ratio_text(end_to_end)}"
    )
    path_ratio = paired_ratio(results, lambda r: per_frame(r, r.path_cpu))
    print(
        "  CPU of everything on the path (source, daemon, readers, irq) per delivered frame:"
        f" direct {ms(median_per_frame(direct, lambda r: r.path_cpu))},"
        f" relayed {ms(median_per_frame(relayed, lambda r: r.path_cpu))},"
        f" direct/relayed {ratio_text(None if path_ratio is None else 1 / path_ratio)}"
    )
    cpus = os.cpu_count() or 1
    busy = {
        path: median(
            [None if r.cpu["machine"] is None else r.cpu["machine"] / r.seconds / cpus for r in rs]
        )
        for path, rs in results.items()
    }
    daemon_busy = median(
        [None if r.serving_cpu is None else r.serving_cpu / r.seconds for r in relayed]
    )
    readers_busy = median(
        [
            None if r.cpu["readers"] is None else r.cpu["readers"] / r.seconds / r.readers
            for r in results["direct"] + relayed
        ]
    )
    d_busy, r_busy = busy["direct"], busy["relayed"]
    if d_busy is not None and r_busy is not None:
        print(
            f"  machine busy (every process and irq): direct {d_busy:.0%}, relayed {r_busy:.0%}"
            f" of {cpus} CPUs; the daemon {daemon_busy or 0:.0%} of one CPU,"
            f" each reader {readers_busy or 0:.0%}"
        )
        if min(d_busy, r_busy) >= SATURATED:
            print(
                "    both cases were bound by the machine, not by the daemon: frames/s follow"
                " the CPU of everything on the path (and of other processes), so the frames/s"
                " ratio is near the direct/relayed figure above"
            )
    lossless = all(r.lossless for rs in results.values() for r in rs)
    print(
        f"  every reader got every Scan frame, in order, in every run: "
        f"{'yes' if lossless else 'NO'}"
    )
    met = (
        lossless
        and fps_ratio is not None
        and fps_ratio >= TARGET_RATE
        and cpu_ratio is not None
        and cpu_ratio <= TARGET_CPU
    )
    print(
        f"  target (issue 12: frames/s at least {TARGET_RATE}x G3NetworkSender's, losslessly,"
        f" with at most {TARGET_CPU}x its serving CPU per delivered frame):"
        f" {'met' if met else 'NOT met'}"
    )
    warn_if_busy(
        (
            r.cpu["others"] / r.seconds
            for rs in results.values()
            for r in rs
            if r.cpu["others"] and r.seconds > 0
        ),
        "rates and ratios are unreliable",
    )


# -- main -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Fan G3 Scan frames out to G3Readers: G3NetworkSender against framewire."
    )
    parser.add_argument(
        "--frames", type=int, default=100, help="Scan frames per case (default 100)"
    )
    parser.add_argument("--readers", type=int, default=10, help="G3Reader processes (default 10)")
    parser.add_argument(
        "--doubles",
        type=int,
        default=1_000_000,
        help="doubles in each Scan frame's vector (default 1000000: an 8 MB frame)",
    )
    parser.add_argument(
        "--keys",
        type=int,
        default=1,
        help="split each Scan frame's doubles over this many vectors (keys) (default 1)",
    )
    parser.add_argument("--quick", action="store_true", help="a short run: --frames 10 --repeat 1")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each case (default 3)")
    parser.add_argument(
        "--max-queue-frames",
        type=int,
        default=64,
        help="the server's max_queue_frames (default 64)",
    )
    parser.add_argument(
        "--max-queue-mib",
        type=int,
        default=1024,
        help="the server's max_queue_bytes, in MiB (default 1024)",
    )
    parser.add_argument(
        "--keep-logs", action="store_true", help="print the daemon's log of each relayed run"
    )
    # Internal: how the script runs itself as the source and the readers.
    parser.add_argument("--role", choices=["source", "reader"], help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["listen", "connect"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=300.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.frames, args.repeat = 10, 1
    if min(args.frames, args.readers, args.doubles, args.keys, args.repeat) < 1:
        parser.error("--frames, --readers, --doubles, --keys and --repeat must be at least 1")
    if args.keys > args.doubles:
        parser.error("--keys must not exceed --doubles")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "source":
        run_source(args)
        return 0
    if args.role == "reader":
        run_reader(args)
        return 0

    exit_on_sigterm()
    print(
        f"framewire G3 fan-out benchmark: {machine_text()}, {args.frames} Scan frames of"
        f" {args.doubles * 8 / 1e6:g} MB ({args.keys} key{'s' if args.keys != 1 else ''})"
        f" to {args.readers} G3Readers per case"
    )
    print(HEADER)
    results: dict[str, list[Result]] = {"direct": [], "relayed": []}
    with tempfile.TemporaryDirectory(prefix="framewire-g3-bench-") as tmp:
        workdir = Path(tmp)
        for run in range(args.repeat):
            # Alternate the order, so that a drift in what else the machine does is shared.
            for relayed in (False, True) if run % 2 == 0 else (True, False):
                result = measure(args, workdir, relayed, run)
                print_row(result)
                results[result.path].append(result)
            if args.keep_logs:
                print((workdir / f"daemon-{run}.log").read_text(errors="replace"))
    print_summary(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
