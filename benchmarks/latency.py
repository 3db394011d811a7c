"""Latency of paced frames through the relay, against a direct connection in the same run.

A producer process writes native DATA frames (64 KiB payload by default) at a fixed rate
(1 kHz by default; it sleeps to just before each slot, then spins), each with
CLOCK_MONOTONIC at the moment of writing in its payload's first 8 bytes; the consumer (this
process) reads whole frames, checks the first one's bytes, and takes the difference on
arrival (TCP_NODELAY on both ends). Cases:

- **direct**: the producer connects straight to the consumer;
- **relayed**: through a framewire daemon (``receiver`` then ``server``, native, lossy,
  default settings), its own process;
- with ``--history SIZE``, **relayed, history**: the same daemon whose stream also keeps a
  history of SIZE (``[streams.lat.history]``, a fresh directory each run, removed after).

``--baseline PATH`` adds a relayed case run with the framewire package at PATH (another
checkout), and with ``--history`` one whose stream keeps a history too, so before and after
come from one run. The cases alternate within each of the
``--repeat`` runs. Prints p50/p99/p99.9/max of each case (median over the runs; max is the
largest of any run), the relay's CPU per frame, the frames the history left out (it drops
what it cannot write rather than hold the relay), and the targets of issue 12 (relayed p99
< 0.5 ms, p99.9 < 1 ms). Percentiles depend heavily on what else the machine
does: see "others" (the share of one CPU other processes used; above 20% a warning
follows). The one home of issue 12's latency row: issue12.py imports :func:`measure`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from _harness import (
    HOST,
    IO_TIMEOUT,
    START_TIMEOUT,
    Child,
    CpuSamples,
    all_stopped,
    daemon_argv,
    exit_on_sigterm,
    free_ports,
    machine_text,
    median,
    others_during,
    script_argv,
    tree_env,
    wait_for_listen,
    warn_if_busy,
    worst,
)

from framewire.config import parse_size
from framewire.frame import Frame, FrameKind
from framewire.protocols.native import NativeEncoder
from framewire.spool import StreamHistory

#: The ``tree`` of the case without a relay.
DIRECT: Final = "direct"
TYPE: Final = "lat"
TARGET_P99_US: Final = 500.0
TARGET_P999_US: Final = 1000.0
#: How long the consumer gives the daemon's server to subscribe it before the first frame:
#: a server whose stream keeps a history first waits up to 250 ms for a rewind request.
SUBSCRIBE_WAIT: Final = 0.3
SUBSCRIBE_WAIT_HISTORY: Final = 0.8


def wire_of(payload_size: int) -> bytearray:
    frame = Frame(FrameKind.DATA, TYPE, bytes(payload_size))
    return bytearray(b"".join(NativeEncoder().encode(frame)))


def stamp_at(wire: bytes | bytearray, payload_size: int) -> int:
    """Where the send time goes in a frame's wire bytes: the payload's first 8 bytes."""
    return len(wire) - payload_size


def run_producer(args: argparse.Namespace) -> None:
    """Write ``--count`` stamped frames to ``--port``, one every 1/``--rate`` seconds."""
    wire = wire_of(args.payload_size)
    at = stamp_at(wire, args.payload_size)
    sock = socket.create_connection((HOST, args.port), timeout=START_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    period = 1e9 / args.rate
    start = time.monotonic_ns()
    with sock:
        for number in range(args.count):
            due = start + int(number * period)
            while (now := time.monotonic_ns()) < due:
                if due - now > 200_000:
                    time.sleep((due - now - 150_000) / 1e9)
            wire[at : at + 8] = time.monotonic_ns().to_bytes(8, "little")
            sock.sendall(wire)


def consume(sock: socket.socket, payload_size: int, count: int, skip: int) -> list[float]:
    """Read ``count`` frames; the latency of each after the first ``skip``, in microseconds.

    RuntimeError if the connection closes early or the first frame is not the one sent
    (apart from its stamp); TimeoutError from the socket's timeout if a frame is late.
    """
    expected = wire_of(payload_size)
    at = stamp_at(expected, payload_size)
    buffer = bytearray(len(expected))
    view = memoryview(buffer)
    latencies = []
    for index in range(count):
        got = 0
        while got < len(buffer):
            n = sock.recv_into(view[got:])
            if n == 0:
                raise RuntimeError(f"connection closed after {index} frames")
            got += n
        arrived = time.monotonic_ns()
        if index == 0 and (buffer[:at] != expected[:at] or buffer[at + 8 :] != expected[at + 8 :]):
            raise RuntimeError("the first frame differs from the one sent")
        if index >= skip:
            sent = int.from_bytes(buffer[at : at + 8], "little")
            latencies.append((arrived - sent) / 1000)
    return latencies


def percentile(values: Sequence[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


@dataclass
class LatencyResult:
    """One case's latency percentiles and largest latency in microseconds, the relay's CPU
    per frame (None when direct), the share of one CPU that other processes used meanwhile,
    and, for a daemon with a history, how many of the frames sent it left out (else None)."""

    p50: float
    p99: float
    p999: float
    daemon_cpu_us: float | None
    others: float | None
    max: float = 0.0
    history_dropped: int | None = None

    @property
    def percentiles(self) -> tuple[float, float, float]:
        return self.p50, self.p99, self.p999


LATENCY_CONFIG: Final = """\
[endpoints.in]
kind = "receiver"
listen = "tcp://{host}:{receiver_port}"
stream = "lat"

[endpoints.out]
kind = "server"
listen = "tcp://{host}:{server_port}"
stream = "lat"
"""

HISTORY_CONFIG: Final = """
[streams.lat.history]
max_bytes = "{max_bytes}"
path = "{path}"
"""


def measure(
    workdir: Path,
    tree: str | None,
    *,
    rate: float,
    payload_size: int,
    duration: float,
    history: str | None = None,
) -> LatencyResult:
    """One case: ``tree`` DIRECT (producer straight to this process), or through a daemon
    running the framewire of checkout ``tree`` (None: this one's), whose stream keeps a
    history of ``history`` bytes (a size, "256MiB"; None: no history) in a fresh directory
    under ``workdir``, removed afterwards. ``duration`` seconds of frames at ``rate``; the
    first 0.5 s (at most a quarter) are left out.

    RuntimeError / TimeoutError as :func:`consume` (a frame lost on the way, the relay
    stalled); a daemon that does not start raises from :func:`wait_for_listen`."""
    count = int(rate * duration)
    skip = min(int(rate * 0.5), count // 4)
    history_path = Path(tempfile.mkdtemp(prefix="history-", dir=workdir)) if history else None
    try:
        result = _measure(workdir, tree, rate, payload_size, count, skip, history, history_path)
        if history_path is not None:
            # Every frame the history kept got the next sequence number; the directory is
            # fresh, so the number after the last one is how many it kept.
            with StreamHistory.open(history_path, max_bytes=parse_size(history)) as kept:
                result.history_dropped = count - kept.stats().next_seq
        return result
    finally:
        if history_path is not None:
            shutil.rmtree(history_path, ignore_errors=True)


def _measure(
    workdir: Path,
    tree: str | None,
    rate: float,
    payload_size: int,
    count: int,
    skip: int,
    history: str | None,
    history_path: Path | None,
) -> LatencyResult:
    with all_stopped() as children:
        daemon: Child | None = None
        if tree == DIRECT:
            with socket.create_server((HOST, 0)) as listener:
                producer = start_producer(
                    children, listener.getsockname()[1], rate, payload_size, count
                )
                listener.settimeout(START_TIMEOUT)
                sock, _ = listener.accept()
        else:
            receiver_port, server_port = free_ports(2)
            config = workdir / "latency.toml"
            text = LATENCY_CONFIG.format(
                host=HOST, receiver_port=receiver_port, server_port=server_port
            )
            if history is not None:
                text += HISTORY_CONFIG.format(max_bytes=history, path=history_path)
            config.write_text(text)
            daemon = Child(
                "daemon",
                daemon_argv(config),
                stderr_path=workdir / "latency-daemon.log",
                env=tree_env(tree),
                cwd=workdir,
            )
            children.append(daemon)
            wait_for_listen(receiver_port, daemon)
            wait_for_listen(server_port, daemon)
            sock = socket.create_connection((HOST, server_port), timeout=START_TIMEOUT)
            # subscribed before the first frame
            time.sleep(SUBSCRIBE_WAIT if history is None else SUBSCRIBE_WAIT_HISTORY)
            producer = start_producer(children, receiver_port, rate, payload_size, count)
        with sock:
            sock.settimeout(IO_TIMEOUT)
            pids = {"producer": producer.pid, "harness": os.getpid()}
            if daemon is not None:
                pids["daemon"] = daemon.pid
            cpu = CpuSamples(pids)
            cpu.take()
            t0 = time.monotonic()
            latencies = consume(sock, payload_size, count, skip)
            t1 = time.monotonic()
            cpu.take()
    used = cpu.used("daemon", t0, t1) if daemon is not None else None
    return LatencyResult(
        p50=percentile(latencies, 0.5),
        p99=percentile(latencies, 0.99),
        p999=percentile(latencies, 0.999),
        max=max(latencies),
        daemon_cpu_us=None if used is None else used / count * 1e6,
        others=others_during(cpu, t0, t1),
    )


def start_producer(
    children: list[Child], port: int, rate: float, payload_size: int, count: int
) -> Child:
    producer = Child(
        "producer",
        script_argv(
            __file__, role="producer", port=port, rate=rate, payload_size=payload_size, count=count
        ),
    )
    children.append(producer)
    return producer


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=1000.0, help="frames per second")
    parser.add_argument("--payload-size", type=int, default=64 * 1024)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per case")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--baseline", help="checkout whose framewire runs as a baseline too")
    parser.add_argument(
        "--history",
        metavar="SIZE",
        help="add a case whose daemon keeps a stream history of SIZE (e.g. 256MiB) beside "
        "the one without (with --baseline, for the baseline's daemon too)",
    )
    parser.add_argument("--role", choices=["producer"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "producer":
        run_producer(args)
        return 0
    if args.history is not None:
        try:
            parse_size(args.history)
        except ValueError as exc:
            parser.error(f"--history: {exc}")
    exit_on_sigterm()
    cases: list[tuple[str, str | None, str | None]] = [("direct", DIRECT, None)]
    if args.baseline:
        cases.append((f"relayed, {args.baseline}", args.baseline, None))
    cases.append(("relayed, this tree", None, None))
    if args.history:
        if args.baseline:
            cases.append((f"history {args.history}, {args.baseline}", args.baseline, args.history))
        cases.append((f"relayed, history {args.history}", None, args.history))
    print(f"framewire latency benchmark: {machine_text()}")
    print(
        f"{args.payload_size} B payloads at {args.rate:g} Hz, {args.duration:g} s per case,"
        f" medians of {args.repeat} runs, the cases alternating (the first 0.5 s of each is"
        " left out; max: the largest of any run)"
    )
    runs: dict[str, list[LatencyResult]] = {label: [] for label, _, _ in cases}
    with tempfile.TemporaryDirectory(prefix="latency-") as tmp:
        for run in range(args.repeat):
            for label, tree, history in cases:
                result = measure(
                    Path(tmp),
                    tree,
                    rate=args.rate,
                    payload_size=args.payload_size,
                    duration=args.duration,
                    history=history,
                )
                runs[label].append(result)
                print(
                    f"  run {run + 1} of {args.repeat}, {label}: p50/p99/p99.9/max"
                    f" {'/'.join(f'{v:.0f}' for v in (*result.percentiles, result.max))} us",
                    flush=True,
                )
    print(
        f"{'case':<32} {'p50':>8} {'p99':>8} {'p99.9':>8} {'max':>8}"
        f" {'daemon CPU/frame':>17} {'others':>7} {'history left out':>17}"
    )
    others: list[float | None] = []
    for label, tree, _ in cases:
        results = runs[label]
        others += [run.others for run in results]
        p50, p99, p999 = (statistics.median(r.percentiles[i] for r in results) for i in range(3))
        largest = max(run.max for run in results)
        cpu = median(run.daemon_cpu_us for run in results)
        busiest = worst(run.others for run in results)
        dropped = [run.history_dropped for run in results if run.history_dropped is not None]
        print(
            f"{label:<32} {p50:5.0f} us {p99:5.0f} us {p999:5.0f} us {largest:5.0f} us"
            f" {'-' if cpu is None else f'{cpu:11.1f} us':>17}"
            f" {'-' if busiest is None else f'{busiest:.0%}':>7}"
            f" {'/'.join(map(str, dropped)) if dropped else '-':>17}",
            flush=True,
        )
        if tree != DIRECT:
            met = p99 < TARGET_P99_US and p999 < TARGET_P999_US
            print(
                f"{'':<32} target p99 < {TARGET_P99_US:g} us and p99.9 <"
                f" {TARGET_P999_US:g} us: {'met' if met else 'NOT met'}"
            )
    warn_if_busy([o for o in others if o is not None], "percentiles are unreliable")
    return 0


if __name__ == "__main__":
    sys.exit(main())
