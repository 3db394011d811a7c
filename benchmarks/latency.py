"""Latency of paced frames through the relay, against a direct connection in the same run.

A producer process writes native DATA frames (64 KiB payload by default) at a fixed rate
(1 kHz by default), each stamped with CLOCK_MONOTONIC at the moment of writing; the consumer
(this process) stamps it again when the whole frame has arrived. Cases:

- **direct**: the producer connects straight to the consumer;
- **relayed**: through a framewire daemon (``receiver`` then ``server``, native, lossy,
  default settings), its own process.

``--baseline PATH`` adds a relayed case run with the framewire package at PATH (another
checkout), so before and after come from one run. Prints p50/p99/p99.9 of each case
(median over ``--repeat`` runs) and the targets of issue 12 (relayed p99 < 0.5 ms,
p99.9 < 1 ms). Percentiles depend heavily on what else the machine does: see "others".
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from _harness import (
    HOST,
    Child,
    all_stopped,
    cpu_seconds,
    daemon_argv,
    exit_on_sigterm,
    free_ports,
    machine_busy_seconds,
    machine_text,
    script_argv,
    wait_for_port,
    warn_if_busy,
)

from framewire.frame import Frame, FrameKind
from framewire.protocols.native import NativeEncoder

TYPE: Final = "lat"
#: Where the send time sits in a frame's wire bytes: after the 28-byte header and the type.
STAMP_AT: Final = 28 + len(TYPE)
TARGET_P99_US: Final = 500.0
TARGET_P999_US: Final = 1000.0


def wire_of(payload_size: int) -> bytearray:
    frame = Frame(FrameKind.DATA, TYPE, bytes(payload_size))
    return bytearray(b"".join(NativeEncoder().encode(frame)))


def run_producer(args: argparse.Namespace) -> None:
    """Write one stamped frame every 1/rate seconds to --port until --seconds pass."""
    wire = wire_of(args.payload_size)
    sock = socket.create_connection((HOST, args.port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    period = 1e9 / args.rate
    start = time.monotonic_ns()
    end = start + int(args.seconds * 1e9)
    due = start
    with sock:
        while due < end:
            while (now := time.monotonic_ns()) < due:
                if due - now > 200_000:
                    time.sleep((due - now - 150_000) / 1e9)
            wire[STAMP_AT : STAMP_AT + 8] = time.monotonic_ns().to_bytes(8, "little")
            sock.sendall(wire)
            due += int(period)


def consume(sock: socket.socket, frame_size: int, count: int, skip: int) -> list[float]:
    """Read ``count`` frames; the latency of each after the first ``skip``, in microseconds."""
    buffer = bytearray(frame_size)
    view = memoryview(buffer)
    latencies = []
    for index in range(count):
        got = 0
        while got < frame_size:
            n = sock.recv_into(view[got:])
            if n == 0:
                raise RuntimeError(f"connection closed after {index} frames")
            got += n
        arrived = time.monotonic_ns()
        if index >= skip:
            sent = int.from_bytes(buffer[STAMP_AT : STAMP_AT + 8], "little")
            latencies.append((arrived - sent) / 1000)
    return latencies


def percentile(values: Sequence[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def measure(args: argparse.Namespace, workdir: Path, tree: str | None) -> dict[str, float]:
    """One case: ``tree`` None and not relayed means direct."""
    frame_size = len(wire_of(args.payload_size))
    count = int(args.rate * args.duration)
    skip = int(args.rate * 0.5)
    relayed = tree != "direct"
    with all_stopped() as children:
        daemon_pid = None
        if relayed:
            receiver_port, server_port = free_ports(2)
            config = workdir / "latency.toml"
            config.write_text(
                f'[endpoints.in]\nkind = "receiver"\nlisten = "tcp://{HOST}:{receiver_port}"\n'
                f'stream = "lat"\n\n[endpoints.out]\nkind = "server"\n'
                f'listen = "tcp://{HOST}:{server_port}"\nstream = "lat"\n'
            )
            env = dict(os.environ)
            if tree is not None:
                env["PYTHONPATH"] = tree
            daemon = subprocess.Popen(
                daemon_argv(config),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
                cwd=workdir,  # python -m puts the working directory first on sys.path
            )
            try:
                wait_for_port(server_port, 30.0)
                wait_for_port(receiver_port, 30.0)
                sock = socket.create_connection((HOST, server_port))
                time.sleep(0.3)  # subscribed before the first frame
                producer_port = receiver_port
                daemon_pid = daemon.pid
                return _run(
                    args, children, sock, producer_port, frame_size, count, skip, daemon_pid
                )
            finally:
                daemon.terminate()
                daemon.wait(10)
        listener = socket.create_server((HOST, 0))
        producer_port = listener.getsockname()[1]
        with listener:
            producer = _start_producer(args, children, producer_port, count)
            sock, _ = listener.accept()
        return _consume_and_report(args, producer, sock, frame_size, count, skip, None)


def _start_producer(
    args: argparse.Namespace, children: list[Child], port: int, count: int
) -> Child:
    producer = Child(
        "producer",
        script_argv(
            __file__,
            role="producer",
            port=port,
            rate=args.rate,
            payload_size=args.payload_size,
            seconds=count / args.rate,
        ),
    )
    children.append(producer)
    return producer


def _run(
    args: argparse.Namespace,
    children: list[Child],
    sock: socket.socket,
    port: int,
    frame_size: int,
    count: int,
    skip: int,
    daemon_pid: int,
) -> dict[str, float]:
    producer = _start_producer(args, children, port, count)
    return _consume_and_report(args, producer, sock, frame_size, count, skip, daemon_pid)


def _consume_and_report(
    args: argparse.Namespace,
    producer: Child,
    sock: socket.socket,
    frame_size: int,
    count: int,
    skip: int,
    daemon_pid: int | None,
) -> dict[str, float]:
    with sock:
        busy0, _ = machine_busy_seconds()
        own0 = time.process_time()
        daemon0 = cpu_seconds(daemon_pid) if daemon_pid else 0.0
        t0 = time.monotonic()
        latencies = consume(sock, frame_size, count, skip)
        elapsed = time.monotonic() - t0
        busy = machine_busy_seconds()[0] - busy0
        own = time.process_time() - own0
        daemon = ((cpu_seconds(daemon_pid) or 0.0) - (daemon0 or 0.0)) if daemon_pid else 0.0
        producer_cpu = cpu_seconds(producer.pid) or 0.0
    return {
        "p50": percentile(latencies, 0.5),
        "p99": percentile(latencies, 0.99),
        "p999": percentile(latencies, 0.999),
        "daemon_cpu_per_frame_us": daemon / len(latencies) * 1e6 if daemon_pid else 0.0,
        "others": max(0.0, busy - own - daemon - producer_cpu) / elapsed,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=1000.0, help="frames per second")
    parser.add_argument("--payload-size", type=int, default=64 * 1024)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per case")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--baseline", help="checkout whose framewire runs as a baseline too")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "producer":
        run_producer(args)
        return 0
    exit_on_sigterm()
    cases: list[tuple[str, str | None]] = [("direct", "direct")]
    if args.baseline:
        cases.append((f"relayed, {args.baseline}", str(Path(args.baseline).resolve())))
    cases.append(("relayed, this tree", None))
    print(f"framewire latency benchmark: {machine_text()}")
    print(
        f"{args.payload_size} B payloads at {args.rate:g} Hz, {args.duration:g} s per case,"
        f" medians of {args.repeat} runs (the first 0.5 s of each is left out)"
    )
    print(f"{'case':<32} {'p50':>8} {'p99':>8} {'p99.9':>8} {'daemon CPU/frame':>17} {'others':>7}")
    others: list[float] = []
    with tempfile.TemporaryDirectory(prefix="latency-") as tmp:
        for label, tree in cases:
            runs = [measure(args, Path(tmp), tree) for _ in range(args.repeat)]
            others += [run["others"] for run in runs]

            def med(key: str, runs: list[dict[str, float]] = runs) -> float:
                return statistics.median(run[key] for run in runs)

            cpu = f"{med('daemon_cpu_per_frame_us'):11.1f} us" if tree != "direct" else "-"
            print(
                f"{label:<32} {med('p50'):5.0f} us {med('p99'):5.0f} us {med('p999'):5.0f} us"
                f" {cpu:>17} {max(run['others'] for run in runs):6.0%}"
            )
            if tree != "direct":
                met = med("p99") < TARGET_P99_US and med("p999") < TARGET_P999_US
                print(
                    f"{'':<32} target p99 < {TARGET_P99_US:g} us and p99.9 <"
                    f" {TARGET_P999_US:g} us: {'met' if met else 'NOT met'}"
                )
    warn_if_busy(others, "percentiles are unreliable")
    return 0


if __name__ == "__main__":
    sys.exit(main())
