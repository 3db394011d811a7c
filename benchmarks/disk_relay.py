"""A live relay through a disk buffer: this checkout's daemon against another's, in one run.

A daemon receives native frames from a producer (``receiver``) and sends them on with a
``sender`` whose buffer is on disk (``[endpoints.out.buffer] type = "disk"``, sync policy
``--sync``, default ``interval``): every frame is written to the segment files and read
back from them (``read_batch`` + ``commit``) while the reader (a plain socket here, reading
with ``recv_into`` a reused 1 MiB buffer) keeps up. Per case, ``--total`` bytes of frames of one
size are sent as fast as the daemon takes them; the time runs from the first byte sent to
the last byte received. With ``--baseline PATH``, the framewire of that checkout relays
every case too, the order alternating, ``--repeat`` times; ratios (this over baseline) are
the medians of the per-run ratios. MB/s = 10^6 bytes of frames per second; daemon CPU is
its user and system time per GB (all its threads).

    .venv/bin/python benchmarks/disk_relay.py --baseline /work/main       # 64 KiB and 1 MiB
    .venv/bin/python benchmarks/disk_relay.py --sizes 1MiB --total 256MiB --repeat 5
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

from _harness import (
    HOST,
    IO_TIMEOUT,
    MIB,
    Child,
    cpu_seconds,
    daemon_argv,
    free_port,
    machine_text,
    payload_of,
    size_label,
    tree_env,
    wait_for_listen,
)

from framewire.config import parse_size
from framewire.frame import Frame, FrameKind
from framewire.protocols.native import NativeEncoder

CONFIG = """
[daemon]
log_level = "warning"

[endpoints.in]
kind = "receiver"
listen = "tcp://{host}:{receiver_port}"
protocol = "native"
stream = "s"

[endpoints.out]
kind = "sender"
connect = "tcp://{host}:{sink_port}"
protocol = "native"
stream = "s"

[endpoints.out.buffer]
type = "disk"
max_size = "{max_size}"
path = "{path}"
sync = "{sync}"
"""


def frames_blob(size: int, total: int) -> tuple[bytes, int]:
    """About 8 MiB of native DATA frames of ``size``-byte payloads back to back, and how
    many such blobs make ``total`` bytes."""
    wire = b"".join(
        bytes(b) for b in NativeEncoder().encode(Frame(FrameKind.DATA, "b", payload_of(size), 1))
    )
    blob = wire * max(1, (8 * MIB) // len(wire))
    return blob, max(1, total // len(blob))


class Sink:
    """A reader that accepts the daemon's sender and counts bytes until it has ``expected``."""

    def __init__(self, expected: int) -> None:
        self.listener = socket.create_server((HOST, 0))
        self.port = self.listener.getsockname()[1]
        self.expected = expected
        self.done = threading.Event()
        self.end = 0.0
        self.got = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        connection, _ = self.listener.accept()
        buffer = bytearray(MIB)
        with connection:
            while self.got < self.expected:
                n = connection.recv_into(buffer)
                if not n:
                    break
                self.got += n
        self.end = time.perf_counter()
        self.done.set()

    def close(self) -> None:
        self.listener.close()


def run_case(
    workdir: Path, tree: str | None, blob: bytes, count: int, index: int, sync: str
) -> tuple[float, float]:
    """One relay of ``count`` blobs: (MB/s, daemon CPU seconds per GB)."""
    expected = len(blob) * count
    sink = Sink(expected)
    receiver_port = free_port()
    case = workdir / f"case-{index}"
    case.mkdir()
    config = case / "daemon.toml"
    config.write_text(
        CONFIG.format(
            host=HOST,
            receiver_port=receiver_port,
            sink_port=sink.port,
            max_size=2 * expected + 64 * MIB,
            path=case / "buffer",
            sync=sync,
        )
    )
    try:
        with Child(
            "daemon",
            daemon_argv(config),
            stderr_path=case / "daemon.log",
            env=tree_env(tree),
            cwd=case,
        ) as daemon:
            wait_for_listen(receiver_port, daemon)
            with socket.create_connection((HOST, receiver_port)) as producer:
                cpu0 = cpu_seconds(daemon.pid) or 0.0
                start = time.perf_counter()
                for _ in range(count):
                    producer.sendall(blob)
                if not sink.done.wait(IO_TIMEOUT + expected / 50e6):
                    log = (case / "daemon.log").read_text()[-2000:]
                    raise RuntimeError(
                        f"{tree or 'this checkout'}: the sink got {sink.got} of {expected}"
                        f" bytes; the daemon's log ends:\n{log}"
                    )
                cpu = (cpu_seconds(daemon.pid) or 0.0) - cpu0
            seconds = sink.end - start
    finally:
        sink.close()
        shutil.rmtree(case, ignore_errors=True)
    return expected / seconds / 1e6, cpu / (expected / 1e9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="64KiB,1MiB", help="payload sizes")
    parser.add_argument("--total", type=parse_size, default=512 * MIB, help="bytes per case")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--baseline", metavar="PATH", help="a checkout relaying every case too")
    parser.add_argument("--dir", default=None, help="where the buffers go (default: a temp dir)")
    parser.add_argument(
        "--sync", default="interval", choices=["none", "interval", "batch"], help="the buffer's"
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="fw-disk-relay-", dir=args.dir))
    trees: list[str | None] = [None] if args.baseline is None else [None, args.baseline]
    print(
        f"# {machine_text()}; {workdir}; {args.total / MIB:.0f} MiB per case, sync={args.sync}",
        flush=True,
    )
    index = 0
    try:
        for size in (parse_size(s) for s in args.sizes.split(",")):
            blob, count = frames_blob(size, args.total)
            rates: dict[str | None, list[float]] = {tree: [] for tree in trees}
            cpus: dict[str | None, list[float]] = {tree: [] for tree in trees}
            ratios: list[float] = []
            cpu_ratios: list[float] = []
            for rep in range(args.repeat):
                order = trees if rep % 2 == 0 else trees[::-1]
                got: dict[str | None, tuple[float, float]] = {}
                for tree in order:
                    index += 1
                    got[tree] = run_case(workdir, tree, blob, count, index, args.sync)
                    rates[tree].append(got[tree][0])
                    cpus[tree].append(got[tree][1])
                line = f"  {size_label(size)} run {rep + 1}: this {got[None][0]:7.0f} MB/s" + (
                    f" {got[None][1]:.2f} CPU s/GB"
                )
                if args.baseline is not None:
                    base = got[args.baseline]
                    ratios.append(got[None][0] / base[0])
                    cpu_ratios.append(got[None][1] / base[1])
                    line += f", baseline {base[0]:7.0f} MB/s {base[1]:.2f} CPU s/GB"
                print(line, flush=True)
            row = (
                f"| {size_label(size)} | {statistics.median(rates[None]):,.0f} MB/s"
                f" | {statistics.median(cpus[None]):.2f} s/GB |"
            )
            if args.baseline is not None:
                row += (
                    f" {statistics.median(rates[args.baseline]):,.0f} MB/s"
                    f" | {statistics.median(cpus[args.baseline]):.2f} s/GB"
                    f" | {statistics.median(ratios):.2f}x | {statistics.median(cpu_ratios):.2f}x |"
                )
            print(row, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
