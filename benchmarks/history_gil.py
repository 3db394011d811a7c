"""How late a paced thread wakes while a history writer thread appends what it hands over.

The GIL side of a stream history, without sockets: the main thread stands for the relay's
trio thread, hands a DATA frame to a writer thread every 1/``--rate`` s and sleeps to the
next slot; its lateness (wake-up time minus slot, which includes waiting for the GIL after
the sleep) is what a relayed frame would wait too. The writer thread appends each round with
``StreamHistory.append_batches`` (the daemon's call) at a niceness of its own. Modes, which
alternate within each of ``--repeat`` runs: ``none`` (no writer) and ``niceN`` (a writer at
niceness +N). Run it with the CPUs busy (e.g. two ``while :; do :; done`` loops) to see a
low-priority writer that is set aside while it holds the GIL stall the main thread.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from framewire.frame import Frame, FrameKind
from framewire.spool import StreamHistory

Batch = tuple[Sequence[Frame], int, int]


def lateness(mode: str, size: int, rate: float, seconds: float, workdir: Path) -> list[float]:
    """One run of ``mode``: the main thread's lateness per slot in microseconds, sorted,
    the first 0.5 s left out. OSError from the history (a full disk)."""
    path = Path(tempfile.mkdtemp(dir=workdir))
    history = StreamHistory.open(path, max_bytes=256 << 20)
    queued: collections.deque[Batch] = collections.deque()
    cond = threading.Condition()
    stopping = False

    def writer(niceness: int) -> None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
        while True:
            with cond:
                while not queued and not stopping:
                    cond.wait()
                if not queued:
                    return
                batches = list(queued)
                queued.clear()
            history.append_batches(batches)

    thread = None
    if mode != "none":
        thread = threading.Thread(target=writer, args=(int(mode.removeprefix("nice")),))
        thread.start()
    payload = bytes(size)
    late = []
    start = time.monotonic()
    try:
        for number in range(int(seconds * rate)):
            if thread is not None:
                with cond:
                    queued.append(([Frame(FrameKind.DATA, "lat", payload)], time.time_ns(), number))
                    cond.notify()
            due = start + (number + 1) / rate
            if (wait := due - time.monotonic()) > 0:
                time.sleep(wait)
            late.append((time.monotonic() - due) * 1e6)
    finally:
        if thread is not None:
            with cond:
                stopping = True
                cond.notify()
            thread.join()
        history.close()
        shutil.rmtree(path)
    return sorted(late[int(rate * 0.5) :])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", default="none,nice10,nice5,nice3,nice0")
    parser.add_argument("--payload-size", type=int, default=64)
    parser.add_argument("--rate", type=float, default=10_000.0, help="frames per second")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per run")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    bad = [m for m in modes if m != "none" and not m.removeprefix("nice").isdigit()]
    if bad:
        parser.error(f"--modes: {', '.join(bad)}: each is none or niceN")
    runs: dict[str, list[list[float]]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory(prefix="history-gil-") as tmp:
        for _ in range(args.repeat):
            for mode in modes:
                runs[mode].append(
                    lateness(mode, args.payload_size, args.rate, args.duration, Path(tmp))
                )
    print(
        f"{args.payload_size} B frames at {args.rate:g}/s, {args.duration:g} s x {args.repeat}:"
        " the main thread's lateness, p50/p99/p99.9 (medians of the runs) and max (of all), us"
    )
    for mode in modes:
        shares = [
            statistics.median(r[min(len(r) - 1, int(share * len(r)))] for r in runs[mode])
            for share in (0.5, 0.99, 0.999)
        ]
        largest = max(r[-1] for r in runs[mode])
        print(f"{mode:<8} " + " ".join(f"{v:8.0f}" for v in (*shares, largest)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
