"""The disk buffer's engine (framewire.spool.DiskQueue) against plain sequential file I/O.

For each frame size, in one run, several repetitions, the order alternating: write
``--total`` bytes of native frames to a DiskQueue (``append`` in batches of ``--batch``) and
read them back (``read_batch`` + ``commit`` until empty); and, as the baseline, write the
same frames' bytes to one file in the same directory with one ``os.write`` each and read
the file back sequentially, three times: ``readv`` into a reused 1 MiB buffer, and
``os.read`` of 1 MiB into a new ``bytes`` dropped at once (both a bare copy into
cache-warm memory: the strict baseline is the faster of the two in each repetition), and
one ``os.read`` per frame into memory of its own, the last ``--batch`` of them kept until
the next batch is read (what a reader that hands frames on must do, as the queue does).
MB/s (10^6 bytes of frames per second) and the ratios queue/baseline, the median of the
ratios within each repetition.
``--cold`` drops the page cache before every read (root only), so all read from the
device; otherwise all read what the write left in the page cache.

    .venv/bin/python benchmarks/disk_buffer.py                 # 64 KiB and 1 MiB, 1 GiB each
    .venv/bin/python benchmarks/disk_buffer.py --cold --sync batch
    .venv/bin/python benchmarks/disk_buffer.py --clock cpu     # CPU time: a busy machine
    .venv/bin/python benchmarks/disk_buffer.py --keep-open     # one queue open throughout
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

from _harness import MIB, machine_text, payload_of, size_label

from framewire.frame import Frame, FrameKind
from framewire.protocols.native import NativeEncoder
from framewire.spool import DiskQueue

#: What a measurement counts: wall time (the default), or with ``--clock cpu`` the CPU time
#: of this process (user and system: the kernel's page-cache copies included, waits for the
#: device not), which other programs on a busy machine disturb far less.
clock = time.perf_counter


def bench_frame(size: int) -> Frame:
    """A DATA frame as a native receiver makes it: its wire bytes kept."""
    frame = Frame(FrameKind.DATA, "bench", payload_of(size), 1)
    wire = b"".join(bytes(b) for b in NativeEncoder().encode(frame))
    return Frame(FrameKind.DATA, "bench", memoryview(wire)[-size:], 1, {}, wire, "native")


def drop_caches(directory: Path, cold: bool) -> None:
    if cold:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")


def plain_write(directory: Path, frame: Frame, count: int, sync: str, batch: int) -> float:
    wire = frame.wire
    assert wire is not None
    fd = os.open(directory / "plain", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    start = clock()
    for index in range(count):
        os.write(fd, wire)
        if sync == "batch" and index % batch == batch - 1:
            os.fdatasync(fd)
    if sync != "none":
        os.fdatasync(fd)
    seconds = clock() - start
    os.close(fd)
    return seconds


def plain_read(directory: Path, cold: bool) -> float:
    """Read the file into one reused 1 MiB buffer."""
    drop_caches(directory, cold)
    buffer = bytearray(MIB)
    fd = os.open(directory / "plain", os.O_RDONLY)
    start = clock()
    while os.readv(fd, [buffer]):
        pass
    seconds = clock() - start
    os.close(fd)
    return seconds


def plain_read_fresh(directory: Path, cold: bool) -> float:
    """Read the file 1 MiB at a time with ``os.read``, each into a new ``bytes`` dropped at
    once (so the allocator hands the same memory back: no page faults, a cache-warm
    destination). The other candidate for the strictest baseline: on some machines it beats
    ``readv`` into a reused buffer."""
    drop_caches(directory, cold)
    fd = os.open(directory / "plain", os.O_RDONLY)
    start = clock()
    while os.read(fd, MIB):
        pass
    seconds = clock() - start
    os.close(fd)
    return seconds


def plain_read_owned(directory: Path, frame_size: int, batch: int, cold: bool) -> float:
    """Read the file one frame at a time, each into memory of its own (``bytes``), keeping
    the last ``batch`` frames until the next batch is read; then delete the file."""
    drop_caches(directory, cold)
    fd = os.open(directory / "plain", os.O_RDONLY)
    start = clock()
    frames: list[bytes] = []
    while True:
        batch_frames = [os.read(fd, frame_size) for _ in range(batch)]
        if not batch_frames[-1]:
            break
        frames = batch_frames
    seconds = clock() - start
    del frames
    os.close(fd)
    os.unlink(directory / "plain")
    return seconds


def open_queue(directory: Path, frame: Frame, count: int, sync: str) -> DiskQueue:
    return DiskQueue.open(
        directory / "queue",
        max_size=4 * count * frame.size,
        sync=sync,  # type: ignore[arg-type]
    )


def queue_write(queue: DiskQueue, frame: Frame, count: int, sync: str, batch: int) -> float:
    frames = [frame] * batch
    start = clock()
    for _ in range(count // batch):
        queue.append(frames)
    if sync != "none":
        queue.sync()
    return clock() - start


def queue_read(queue: DiskQueue, directory: Path, count: int, batch: int, cold: bool) -> float:
    drop_caches(directory, cold)
    got = 0
    start = clock()
    while frames := queue.read_batch(batch, 64 * MIB):
        got += len(frames)
        queue.commit(len(frames))
    seconds = clock() - start
    assert got == count, f"read {got} frames of {count}"
    return seconds


def run_plain(
    directory: Path, frame: Frame, count: int, args: argparse.Namespace
) -> tuple[float, float, float, float]:
    """Seconds to write the frames' bytes with plain file I/O, to read them into one reused
    buffer, 1 MiB at a time into new memory dropped at once, and frame by frame into memory
    of their own."""
    return (
        plain_write(directory, frame, count, args.sync, args.batch),
        plain_read(directory, args.cold),
        plain_read_fresh(directory, args.cold),
        plain_read_owned(directory, len(frame.wire or b""), args.batch, args.cold),
    )


def run_queue(
    directory: Path,
    frame: Frame,
    count: int,
    args: argparse.Namespace,
    kept: DiskQueue | None = None,
) -> tuple[float, float]:
    """Seconds to append the frames to a DiskQueue and to read and commit them: in the queue
    ``kept`` open (``--keep-open``), else in a new queue opened for the writes and again for
    the reads, deleted after."""
    if kept is not None:
        return (
            queue_write(kept, frame, count, args.sync, args.batch),
            queue_read(kept, directory, count, args.batch, args.cold),
        )
    with open_queue(directory, frame, count, args.sync) as queue:
        write = queue_write(queue, frame, count, args.sync, args.batch)
    with open_queue(directory, frame, count, args.sync) as queue:
        read = queue_read(queue, directory, count, args.batch, args.cold)
    shutil.rmtree(directory / "queue")
    return write, read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=f"{64 * 1024},{MIB}", help="payload sizes in bytes")
    parser.add_argument("--total", type=int, default=1024 * MIB, help="bytes per measurement")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="unmeasured rounds first (in a VM, the first touch of guest memory by the page"
        " cache costs several times the copy itself)",
    )
    parser.add_argument("--batch", type=int, default=64, help="frames per append and read")
    parser.add_argument("--sync", default="none", choices=["none", "batch", "interval"])
    parser.add_argument("--cold", action="store_true", help="drop the page cache before reads")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="measure wall time, or this process's CPU time (for hot runs on a busy machine:"
        " it leaves out waits for the device and for the CPU)",
    )
    parser.add_argument(
        "--keep-open",
        action="store_true",
        help="one queue per frame size, open for all rounds (as a daemon keeps its buffer's),"
        " instead of a new one opened for each round's writes and again for its reads",
    )
    args = parser.parse_args()
    global clock
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    directory = Path(tempfile.mkdtemp(prefix="fw-disk-bench-", dir=args.dir))
    print(
        f"# {machine_text()}; {directory} (sync={args.sync}, {'cold' if args.cold else 'hot'},"
        f" {args.clock} clock{', queue kept open' if args.keep_open else ''})"
    )
    try:
        for size in (int(s) for s in args.sizes.split(",")):
            frame = bench_frame(size)
            count = max(args.batch, args.total // size // args.batch * args.batch)
            nbytes = count * len(frame.wire or b"")
            keys = ("pw", "pr", "pf", "ps", "po", "qw", "qr")
            rates: dict[str, list[float]] = {k: [] for k in keys}
            ratios: dict[str, list[float]] = {"w": [], "r": [], "o": []}
            kept = open_queue(directory, frame, count, args.sync) if args.keep_open else None
            plain = partial(run_plain, directory, frame, count, args)
            queued = partial(run_queue, directory, frame, count, args, kept)
            for _ in range(args.warmup):  # unmeasured: see --warmup
                plain()
                queued()
            for rep in range(args.repeat):
                if rep % 2:
                    qw, qr = queued()
                    pw, pr, pf, po = plain()
                else:
                    pw, pr, pf, po = plain()
                    qw, qr = queued()
                # The strict baseline: the faster of the two plain reads of this repetition.
                ps = min(pr, pf)
                for key, seconds in (
                    ("pw", pw),
                    ("pr", pr),
                    ("pf", pf),
                    ("ps", ps),
                    ("po", po),
                    ("qw", qw),
                    ("qr", qr),
                ):
                    rates[key].append(nbytes / seconds / 1e6)
                ratios["w"].append(pw / qw)
                ratios["r"].append(ps / qr)
                ratios["o"].append(po / qr)
                print(
                    f"  {size_label(size)} run {rep + 1}: write {nbytes / qw / 1e6:7.0f} MB/s vs"
                    f" {nbytes / pw / 1e6:7.0f}, read {nbytes / qr / 1e6:7.0f} MB/s vs"
                    f" {nbytes / pr / 1e6:7.0f} (readv, reused buffer),"
                    f" {nbytes / pf / 1e6:7.0f} (os.read, new memory dropped),"
                    f" {nbytes / po / 1e6:7.0f} (own memory)",
                    flush=True,
                )
            med = {key: statistics.median(values) for key, values in rates.items()}
            print(
                f"| {size_label(size)} frames, {nbytes / MIB:.0f} MiB | write {med['qw']:,.0f} MB/s"
                f" | plain write {med['pw']:,.0f} MB/s | {statistics.median(ratios['w']):.2f}x"
                f" | read+commit {med['qr']:,.0f} MB/s | strict plain read {med['ps']:,.0f} MB/s"
                f" (readv reused {med['pr']:,.0f}, os.read new {med['pf']:,.0f})"
                f" | {statistics.median(ratios['r']):.2f}x"
                f" | plain read, own memory {med['po']:,.0f} MB/s"
                f" | {statistics.median(ratios['o']):.2f}x |",
                flush=True,
            )
            if kept is not None:
                kept.close()
                shutil.rmtree(directory / "queue")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
