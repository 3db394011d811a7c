"""Rewinding a stream's history to one client against reading the same segment files.

Builds a history of ``--total`` bytes of native DATA frames of each ``--sizes`` (in
``--dir``, default a temporary directory), starts a daemon (a child process) whose stream
keeps that history and serves it natively, then, in one run, ``--repeat`` times, the order
alternating:

* **rewind**: a client connects, sends the rewind request (``since`` an hour back: the
  whole history) and reads everything the server sends (``recv_into`` a reused 1 MiB buffer,
  discarded) until it has the history's frames;
* **files->socket**: the anchor: a plain child process reads the same segment files
  sequentially (``readv`` into a 1 MiB buffer) and ``sendall``s them to the same client
  reader over loopback TCP, as ``cat segments | nc`` would;
* **files read**: the segment files read sequentially, nothing else (what the page cache
  gives a ``cat`` to /dev/null).

All read from the page cache (the history was just written; 1 GiB fits). MB/s are 10^6
bytes per second (of frames for the rewind, of segment files for the others); each ratio
(rewind over anchor) is the median of the ratios within each repetition. Also the CPU
time (user and system, from /proc) per GB of the daemon during the rewind and of the
files->socket child during its run, and their ratio (anchor over daemon: 1 is the daemon
as frugal as the anchor), which a busy machine disturbs far less than the rates. The
target of issue 25 is 0.8 (of the rates).

``--baseline PATH`` rewinds the same history (its files hard-linked into a directory of its
own) through a second daemon running the framewire of the checkout at PATH (e.g. the main
branch), interleaved with the others in each repetition: a second row per size, and a
change is compared with what it changes in the same run.

    .venv/bin/python benchmarks/rewind.py                     # 64 KiB and 1 MiB, 1 GiB each
    .venv/bin/python benchmarks/rewind.py --total 256MiB --sizes 64KiB
    .venv/bin/python benchmarks/rewind.py --baseline ../main --repeat 9
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _harness import (
    MIB,
    cpu_seconds,
    free_port,
    machine_text,
    payload_of,
    size_label,
    tree_env,
    wait_for_port,
)

from framewire.client import rewind_request
from framewire.config import parse_size
from framewire.frame import Frame, FrameKind
from framewire.protocols.native import NativeEncoder
from framewire.spool import StreamHistory

CONFIG = """
[streams.s.history]
max_bytes = {max_bytes}
path = "{path}"

[endpoints.out]
kind = "server"
listen = "tcp://127.0.0.1:{port}"
protocol = "native"
stream = "s"
"""


def bench_frame(size: int) -> Frame:
    frame = Frame(FrameKind.DATA, "bench", payload_of(size), 1)
    wire = b"".join(bytes(b) for b in NativeEncoder().encode(frame))
    return Frame(FrameKind.DATA, "bench", memoryview(wire)[-size:], 1, {}, wire, "native")


def build(path: Path, size: int, total: int) -> int:
    """Write a history of ``total`` bytes of ``size``-byte frames; return the frames' bytes."""
    frame = bench_frame(size)
    wire = frame.wire
    assert wire is not None
    count = max(1, total // len(wire))
    batch = max(1, (4 * MIB) // len(wire))
    now = time.time_ns() - 60 * 1_000_000_000  # a minute ago, a frame a microsecond
    with StreamHistory.open(path, max_bytes=2 * total + 64 * MIB) as history:
        for first in range(0, count, batch):
            n = min(batch, count - first)
            history.append([frame] * n, now + first * 1000)
    return count * len(wire)


def read_files(path: Path) -> tuple[int, float]:
    buffer = bytearray(MIB)
    total = 0
    start = time.perf_counter()
    for segment in sorted(path.glob("*.seg")):
        fd = os.open(segment, os.O_RDONLY)
        try:
            while n := os.readv(fd, [buffer]):
                total += n
        finally:
            os.close(fd)
    return total, time.perf_counter() - start


def serve_files(port: int, path: Path) -> None:
    """The child behind the files-to-a-socket anchor: accept one client per line of stdin,
    send it the segment files (``readv`` into a 1 MiB buffer, then ``sendall``), close."""
    with socket.create_server(("127.0.0.1", port)) as listener:
        print("ready", flush=True)
        while sys.stdin.readline():
            client, _ = listener.accept()
            with client:
                buffer = bytearray(MIB)
                view = memoryview(buffer)
                for segment in sorted(path.glob("*.seg")):
                    fd = os.open(segment, os.O_RDONLY)
                    try:
                        while n := os.readv(fd, [buffer]):
                            client.sendall(view[:n])
                    finally:
                        os.close(fd)


def read_socket(port: int, expected: int, request: bytes = b"") -> tuple[int, float]:
    """Connect, send ``request``, read ``expected`` bytes (into a reused 1 MiB buffer)."""
    buffer = bytearray(MIB)
    total = 0
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        if request:
            sock.sendall(request)
        while total < expected:
            n = sock.recv_into(buffer)
            if not n:
                raise RuntimeError(f"the server closed after {total} of {expected} bytes")
            total += n
    return total, time.perf_counter() - start


def rewind(port: int, expected: int) -> tuple[int, float]:
    return read_socket(port, expected, rewind_request(3600.0))


def measure(size: int, args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="fw-rewind-", dir=args.dir))
    children: list[subprocess.Popen[str]] = []
    try:
        path = root / "history"
        frames_bytes = build(path, size, args.total)
        files_bytes = sum(p.stat().st_size for p in path.glob("*.seg"))
        port, files_port = free_port(), free_port()
        config = root / "config.toml"
        config.write_text(CONFIG.format(max_bytes=2 * args.total + 64 * MIB, path=path, port=port))
        daemon = subprocess.Popen(
            [sys.executable, "-m", "framewire", "run", str(config)],
            stderr=subprocess.DEVNULL,
            text=True,
        )
        children.append(daemon)
        daemons = {"rewind": (daemon, port)}
        if args.baseline:
            # The same segment files (and so the same cached pages), in a directory of its
            # own (each history locks its directory).
            other = root / "baseline-history"
            other.mkdir()
            for file in path.iterdir():
                if file.name != "lock":
                    os.link(file, other / file.name)
            other_port = free_port()
            other_config = root / "baseline.toml"
            other_config.write_text(
                CONFIG.format(max_bytes=2 * args.total + 64 * MIB, path=other, port=other_port)
            )
            baseline = subprocess.Popen(
                [sys.executable, "-m", "framewire", "run", str(other_config)],
                stderr=subprocess.DEVNULL,
                text=True,
                env=tree_env(args.baseline),
                cwd=root,
            )
            children.append(baseline)
            daemons["baseline"] = (baseline, other_port)
        files = subprocess.Popen(
            [sys.executable, __file__, "--serve-files", str(files_port), "--dir", str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        children.append(files)
        assert files.stdin is not None
        assert files.stdout is not None
        files.stdout.readline()
        for _, daemon_port in daemons.values():
            wait_for_port(daemon_port, 30)

        cpu: dict[str, list[float]] = {name: [] for name in [*daemons, "socket"]}

        def anchor() -> float:
            assert files.stdin is not None
            before = cpu_seconds(files.pid) or 0.0
            files.stdin.write("go\n")
            files.stdin.flush()
            seconds = read_socket(files_port, files_bytes)[1]
            cpu["socket"].append(((cpu_seconds(files.pid) or 0.0) - before) / files_bytes * 1e9)
            return files_bytes / seconds / 1e6

        def rewound(name: str) -> Callable[[], float]:
            def step() -> float:
                child, daemon_port = daemons[name]
                before = cpu_seconds(child.pid) or 0.0
                seconds = rewind(daemon_port, frames_bytes)[1]
                used = (cpu_seconds(child.pid) or 0.0) - before
                cpu[name].append(used / frames_bytes * 1e9)
                return frames_bytes / seconds / 1e6

            return step

        def read() -> float:
            return files_bytes / read_files(path)[1] / 1e6

        steps: dict[str, Callable[[], float]] = {name: rewound(name) for name in daemons}
        steps |= {"socket": anchor, "read": read}
        got: dict[str, list[float]] = {name: [] for name in steps}
        ratios: dict[tuple[str, str], list[float]] = {
            (name, anchor_name): [] for name in daemons for anchor_name in ("socket", "read")
        }
        for index in range(args.repeat):
            names = list(steps) if index % 2 == 0 else list(reversed(steps))
            run = {name: steps[name]() for name in names}
            for name, value in run.items():
                got[name].append(value)
            for name, anchor_name in ratios:
                ratios[name, anchor_name].append(run[name] / run[anchor_name])
        median = statistics.median
        for name in daemons:
            cpu_ratio = median(a / r for a, r in zip(cpu["socket"], cpu[name], strict=True))
            label = size_label(size) if name == "rewind" else "baseline"
            print(
                f"{label:>8} {median(got[name]):>12.0f} {median(got['socket']):>13.0f}"
                f" {median(ratios[name, 'socket']):>6.2f} {median(got['read']):>11.0f}"
                f" {median(ratios[name, 'read']):>6.2f} {median(cpu[name]):>10.2f}"
                f" {median(cpu['socket']):>10.2f} {cpu_ratio:>6.2f}",
                flush=True,
            )
    finally:
        for child in children:
            child.terminate()
            child.wait(30)
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--total", type=parse_size, default=1 << 30)
    parser.add_argument("--sizes", default="64KiB,1MiB")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument(
        "--baseline",
        metavar="PATH",
        help="a checkout whose framewire rewinds the same history too, in the same run",
    )
    parser.add_argument("--serve-files", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_files is not None:
        serve_files(args.serve_files, args.dir)
        return
    print(machine_text())
    print(
        f"history of {args.total / MIB:.0f} MiB per size; {args.repeat} repetitions"
        + (f"; baseline {args.baseline}" if args.baseline else "")
        + "\n"
    )
    print(
        f"{'frame':>8} {'rewind MB/s':>12} {'files->socket':>13} {'ratio':>6}"
        f" {'files read':>11} {'ratio':>6} {'CPU s/GB':>10} {'anchor CPU':>10} {'ratio':>6}"
    )
    for size in map(parse_size, args.sizes.split(",")):
        measure(size, args)


if __name__ == "__main__":
    main()
