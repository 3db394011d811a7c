"""Issue 22's gate (an experiment, not framewire code): how fast can a reader of the disk
buffer's segment files go if it checks every record's CRC-32C, produces frames and commits
a read position, but reads into one reused, page-aligned buffer and hands frames out as
views valid only until its next read (a lease)?

For each frame size, one run, rounds alternating in order: the issue's strict baseline
(the same frames' bytes written to one plain file frame by frame, read back with ``readv``
into a reused 1 MiB ``bytearray`` and with ``os.read`` of 1 MiB into new ``bytes``: the
faster of the two), a bare copy of the queue's own segment files into the lease buffer
(the strictest: same files, same page-cache folios, no checks), today's
``DiskQueue.read_batch`` + ``commit``, and the lease prototype (with and without the CRC,
delivered segments unlinked, truncated or renamed aside for reuse; and, as a bound, the
segments mapped with ``mmap`` and checked in place, with no copy at all). Each reader
reads a queue written fresh (unmeasured) by ``DiskQueue.append`` in batches of 64 frames
and closed: the prototype does not follow a live writer, resynchronise after a corrupt
record or recover. Ratios are the median of each repetition's strict/reader times, in CPU
time of this process and in wall time; the first repetition is a warm-up.

``--extras`` adds the cost of getting rid of a delivered 64 MiB segment (unlink,
ftruncate, rename aside) and of writing one into a new against a recycled file, and the
speed of ``preadv`` into buffers at a few offsets from a page boundary.

    .venv/bin/python benchmarks/lease_probe.py --extras       # about 2 minutes
    .venv/bin/python benchmarks/lease_probe.py --sizes 65536 --buffer 1048576
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import shutil
import statistics
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from _harness import MIB, machine_text, payload_of, size_label
from google_crc32c import extend

from framewire.frame import Frame, FrameKind
from framewire.protocols.native import NativeEncoder, decode_frame
from framewire.spool import DiskQueue
from framewire.spool._format import (
    POSITION_SLOT_OFFSETS,
    RECORD_HEADER_SIZE,
    RECORD_MAGIC,
    SEGMENT_HEADER_SIZE,
    SegmentHeader,
    encode_position,
)

_HEAD = struct.Struct("<4sBBHQIII")  # the record header with its own CRC (28 bytes)
#: The strict baseline: the faster of these two, in each repetition.
STRICT = ("strict: readv, reused bytearray", "strict: os.read, new bytes")
_CHAR_ARRAYS: dict[int, type[ctypes.Array[ctypes.c_char]]] = {}


def char_array(n: int) -> type[ctypes.Array[ctypes.c_char]]:
    """``c_char * n``, cached: a ctypes view has no ``bf_releasebuffer``, so
    google-crc32c's ``y#`` argument takes it without a copy (a memoryview it refuses)."""
    array = _CHAR_ARRAYS.get(n)
    if array is None:
        array = _CHAR_ARRAYS[n] = ctypes.c_char * n
    return array


def bench_frame(size: int) -> Frame:
    frame = Frame(FrameKind.DATA, "bench", payload_of(size), 1)
    wire = b"".join(bytes(b) for b in NativeEncoder().encode(frame))
    return Frame(FrameKind.DATA, "bench", memoryview(wire)[-size:], 1, {}, wire, "native")


class LeaseReader:
    """Reads a closed queue's segments in order into one page-aligned buffer; ``read()``
    returns the frames of the whole records the buffer got (views into it: valid until the
    next ``read()``); ``commit()`` writes the position slot and disposes of delivered
    segments. A record larger than the buffer is read into memory of its own."""

    def __init__(
        self,
        directory: Path,
        size: int,
        *,
        crc: bool = True,
        dispose: str = "keep",
        nowait: bool = True,
        header_crc: bool = True,
        decode: bool = True,
    ) -> None:
        self.directory = directory
        self.buffer = mmap.mmap(-1, size)
        self.view = memoryview(self.buffer)
        self.size = size
        self.crc = crc
        self.header_crc = header_crc
        self.decode = decode
        self.dispose = dispose
        self.flags = os.RWF_NOWAIT if nowait else 0
        self.segments = sorted(p for p in directory.iterdir() if p.suffix == ".seg")
        self.pos_fd = os.open(directory / "position", os.O_RDWR)
        self.generation = 1 << 20
        self.fd = -1
        self.offset = 0
        self.end = 0
        self.last_seq = -1
        self.record_size = 0
        self.delivered: list[Path] = []
        #: How many RWF_NOWAIT reads found pages not cached (then read blocking).
        self.again = 0

    def _open_next(self) -> bool:
        if self.fd >= 0:
            os.close(self.fd)
            self.delivered.append(self.segments.pop(0))
            self.fd = -1
        if not self.segments:
            return False
        self.fd = os.open(self.segments[0], os.O_RDONLY)
        self.end = os.fstat(self.fd).st_size
        head = os.pread(self.fd, SEGMENT_HEADER_SIZE, 0)
        if SegmentHeader.parse(head) is None:
            raise RuntimeError("bad segment header")
        self.offset = SEGMENT_HEADER_SIZE
        return True

    def _fill(self, want: int) -> int:
        try:
            return os.preadv(self.fd, [self.view[:want]], self.offset, self.flags)
        except BlockingIOError:
            self.again += 1
            return os.preadv(self.fd, [self.view[:want]], self.offset)

    def read(self) -> list[Frame]:
        while self.offset >= self.end:
            if not self._open_next():
                return []
        want = self.size
        if self.record_size:  # whole records only (they are often all one size)
            want = max(self.record_size, want // self.record_size * self.record_size)
        want = min(want, self.size, self.end - self.offset)
        got = self._fill(want)
        buffer, view, frames = self.buffer, self.view, []
        pos = 0
        while pos + RECORD_HEADER_SIZE <= got:
            magic, _v, _flags, _r, seq, length, pcrc, hcrc = _HEAD.unpack_from(buffer, pos)
            if (
                magic != RECORD_MAGIC
                or (self.header_crc and extend(0, bytes(view[pos : pos + 24])) != hcrc)
                or seq <= self.last_seq
            ):
                raise RuntimeError("corrupt header (the probe does not resynchronise)")
            start = pos + RECORD_HEADER_SIZE
            if start + length > got:
                if pos == 0:  # larger than the buffer: memory of its own
                    payload = os.pread(self.fd, length, self.offset + start)
                    if self.crc and extend(0, payload) != pcrc:
                        raise RuntimeError("corrupt payload")
                    frames.append(decode_frame(payload))
                    self.last_seq = seq
                    pos = start + length
                break
            if self.crc and extend(0, char_array(length).from_buffer(buffer, start)) != pcrc:
                raise RuntimeError("corrupt payload")
            wire = view[start : start + length]
            frames.append(decode_frame(wire) if self.decode else wire)  # type: ignore[arg-type]
            self.last_seq = seq
            pos = start + length
        self.record_size = pos // len(frames) if frames else 0
        self.offset += pos
        return frames

    def commit(self) -> None:
        self.generation += 1
        slot = encode_position(self.generation, self.last_seq + 1)
        os.pwrite(self.pos_fd, slot, POSITION_SLOT_OFFSETS[self.generation % 2])
        for path in self.delivered:
            if self.dispose == "unlink":
                os.unlink(path)
            elif self.dispose == "rename":
                os.rename(path, path.with_suffix(".free"))
            elif self.dispose == "truncate":
                os.truncate(path, 0)
        self.delivered.clear()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        os.close(self.pos_fd)
        self.view.release()
        self.buffer.close()


def write_queue(directory: Path, frame: Frame, count: int) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    with DiskQueue.open(directory, max_size=4 * count * frame.size, sync="none") as queue:
        frames = [frame] * 64
        for _ in range(count // 64):
            queue.append(frames)


def plain_write(path: Path, frame: Frame, count: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for _ in range(count):
        os.write(fd, frame.wire or b"")
    os.close(fd)


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds)."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


@dataclass
class Case:
    """One frame size's files and readers. Each reader reads them all (and asserts it)."""

    size: int
    frame: Frame
    count: int
    bufsize: int
    plain: Path
    queue: Path

    def strict_readv(self) -> None:
        buffer = bytearray(MIB)
        fd = os.open(self.plain, os.O_RDONLY)
        while os.readv(fd, [buffer]):
            pass
        os.close(fd)

    def strict_read(self) -> None:
        fd = os.open(self.plain, os.O_RDONLY)
        while os.read(fd, MIB):
            pass
        os.close(fd)

    def bare_segments(self) -> None:
        """A bare copy of the segment files into the lease buffer: no checks."""
        buffer = mmap.mmap(-1, self.bufsize)
        for seg in sorted(self.queue.glob("*.seg")):
            fd = os.open(seg, os.O_RDONLY)
            while os.readv(fd, [buffer]):
                pass
            os.close(fd)
        buffer.close()

    def current(self) -> None:
        """Today's path: ``read_batch(64, 64 MiB)`` + ``commit`` until empty."""
        size = 4 * self.count * self.frame.size
        with DiskQueue.open(self.queue, max_size=size, sync="none") as queue:
            got = 0
            while frames := queue.read_batch(64, 64 * MIB):
                got += len(frames)
                queue.commit(len(frames))
        assert got == self.count, (got, self.count)

    def lease(self, **options: Any) -> None:
        reader = LeaseReader(self.queue, self.bufsize, **options)
        got = 0
        while frames := reader.read():
            got += len(frames)
            reader.commit()
        reader.close()
        assert got == self.count, (got, self.count)

    def mapped(self) -> None:
        """Each segment mapped (private, never written), CRCs checked in place, frames as
        views of the mapping: no copy at all (a file cut short from outside would be a
        SIGBUS here, so this is a bound, not a candidate)."""
        got = 0
        for seg in sorted(self.queue.glob("*.seg")):
            fd = os.open(seg, os.O_RDONLY)
            end = os.fstat(fd).st_size
            area = mmap.mmap(fd, end, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            os.close(fd)
            view = memoryview(area)
            pos = SEGMENT_HEADER_SIZE
            frames = []
            while pos + RECORD_HEADER_SIZE <= end:
                magic, _v, _f, _r, _s, length, pcrc, hcrc = _HEAD.unpack_from(area, pos)
                if magic != RECORD_MAGIC or extend(0, bytes(view[pos : pos + 24])) != hcrc:
                    raise RuntimeError("corrupt header")
                start = pos + RECORD_HEADER_SIZE
                if extend(0, char_array(length).from_buffer(area, start)) != pcrc:
                    raise RuntimeError("corrupt payload")
                frames.append(decode_frame(view[start : start + length]))  # type: ignore[arg-type]
                pos = start + length
            got += len(frames)
            del frames
            view.release()
            area.close()
        assert got == self.count, (got, self.count)

    def readers(self) -> dict[str, tuple[bool, Callable[[], None]]]:
        """name: (whether it reads the queue, the reader)."""
        lease = partial(partial, self.lease)
        return {
            STRICT[0]: (False, self.strict_readv),
            STRICT[1]: (False, self.strict_read),
            "bare copy of the segments": (True, self.bare_segments),
            "read_batch + commit (main)": (True, self.current),
            "lease, CRC, unlink": (True, lease(dispose="unlink")),
            "lease, CRC, ftruncate": (True, lease(dispose="truncate")),
            "lease, CRC, rename aside": (True, lease(dispose="rename")),
            "lease, CRC, rename, no RWF_NOWAIT": (True, lease(dispose="rename", nowait=False)),
            "lease, CRC, segments kept": (True, lease()),
            "lease, header CRC only, kept": (True, lease(crc=False)),
            "lease, no CRC, kept": (True, lease(crc=False, header_crc=False)),
            "lease, no CRC, no Frame, kept": (
                True,
                lease(crc=False, header_crc=False, decode=False),
            ),
            "mmap, CRC, no copy, kept": (True, self.mapped),
        }


def measure(case: Case, args: argparse.Namespace) -> None:
    readers = case.readers()
    if args.only:
        keep = set(args.only.split("|")) | set(STRICT)
        readers = {k: v for k, v in readers.items() if k in keep}
    clocks = ("cpu", "wall")
    times = {(k, c): list[float]() for k in readers for c in clocks}
    ratios = {(k, c): list[float]() for k in readers for c in clocks}
    names = list(readers)
    for rep in range(args.repeat + 1):
        order = names if rep % 2 == 0 else names[::-1]
        got: dict[str, tuple[float, float]] = {}
        for name in order:
            needs_queue, fn = readers[name]
            if needs_queue:
                write_queue(case.queue, case.frame, case.count)
            got[name] = timed(fn)
        if rep == 0:
            continue  # warm-up
        for index, c in enumerate(clocks):
            strict = min(got[STRICT[0]][index], got[STRICT[1]][index])
            for name, seconds in got.items():
                times[name, c].append(seconds[index])
                ratios[name, c].append(strict / seconds[index])
    nbytes = case.count * len(case.frame.wire or b"")
    print(
        f"## {size_label(case.size)} frames, {nbytes / MIB:.0f} MiB,"
        f" lease buffer {case.bufsize} B, {args.repeat} runs"
    )
    print("| reader | CPU time | vs strict | wall time | vs strict |")
    for name in names:
        cells = [
            f"{nbytes / statistics.median(times[name, c]) / 1e6:,.0f} MB/s"
            f" | {statistics.median(ratios[name, c]):.2f}x"
            for c in clocks
        ]
        print(f"| {name} | {' | '.join(cells)} |", flush=True)


def disposal(directory: Path, repeat: int) -> None:
    """CPU time to get rid of a delivered 64 MiB segment whose pages are cached (unlink,
    ftruncate to 0, rename aside for reuse), and to write 64 MiB into a new file against
    into a file renamed aside (what reuse would save the writer)."""
    seg = 64 * MIB
    data = payload_of(4 * MIB)
    path, aside = directory / "a.seg", directory / "a.free"

    def fill(target: Path, flags: int) -> None:
        fd = os.open(target, os.O_WRONLY | flags, 0o644)
        for _ in range(seg // len(data)):
            os.write(fd, data)
        os.close(fd)

    def cached() -> None:
        for stale in (path, aside):
            stale.unlink(missing_ok=True)
        fill(path, os.O_CREAT | os.O_TRUNC)
        fd = os.open(path, os.O_RDONLY)
        while os.read(fd, MIB):
            pass
        os.close(fd)

    def cached_gone() -> None:
        cached()
        path.unlink()

    def cached_aside() -> None:
        cached()
        path.rename(aside)

    def truncate() -> None:
        fd = os.open(path, os.O_WRONLY)
        os.ftruncate(fd, 0)
        os.close(fd)

    steps: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
        "unlink": (cached, path.unlink),
        "ftruncate to 0": (cached, truncate),
        "rename aside": (cached, partial(path.rename, aside)),
        "write 64 MiB into a new file": (cached_gone, partial(fill, path, os.O_CREAT)),
        "write 64 MiB into a file renamed aside": (cached_aside, partial(fill, aside, 0)),
    }
    results: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeat):
        for name, (prepare, step) in steps.items():
            prepare()
            results[name].append(timed(step)[0])
    print(f"## a delivered 64 MiB segment, cached, {repeat} runs (CPU time, median)")
    for name, values in results.items():
        print(f"| {name} | {statistics.median(values) * 1e3:.2f} ms |")
    for stale in (path, aside):
        stale.unlink(missing_ok=True)


def alignment(directory: Path, repeat: int) -> None:
    """``preadv`` of a cached 512 MiB file, 1 MiB at a time, into a buffer that starts at
    a given offset from a page boundary (a fresh ``bytearray(1 MiB)`` from glibc starts 16
    bytes past one)."""
    path = directory / "aligned"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    block = payload_of(4 * MIB)
    for _ in range(128):
        os.write(fd, block)
    area = mmap.mmap(-1, 2 * MIB)
    view = memoryview(area)

    def read(offset: int) -> None:
        target = view[offset : offset + MIB]
        position = 0
        while n := os.preadv(fd, [target], position):
            position += n
        target.release()

    offsets = (0, 16, 32, 48, 64)
    results: dict[int, list[float]] = {offset: [] for offset in offsets}
    for run in range(repeat + 1):
        for offset in offsets:
            seconds = timed(partial(read, offset))[0]
            if run:
                results[offset].append(seconds)
    print(f"## destination alignment, 512 MiB, {repeat} runs (CPU time, median)")
    for offset, values in results.items():
        print(
            f"| {offset} B past a page | {512 * MIB / statistics.median(values) / 1e6:,.0f} MB/s |"
        )
    view.release()
    area.close()
    os.close(fd)
    path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=f"{64 * 1024},{MIB}")
    parser.add_argument("--total", type=int, default=1024 * MIB)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--buffer", type=int, default=2 * MIB + 8192, help="lease buffer")
    parser.add_argument("--only", default="", help="reader names, separated by |")
    parser.add_argument(
        "--extras", action="store_true", help="also segment disposal and buffer alignment"
    )
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()
    top = Path(tempfile.mkdtemp(prefix="fw-lease-probe-", dir=args.dir))
    print(f"# {machine_text()}; CPU time and wall time; {top}")
    try:
        for size in (int(s) for s in args.sizes.split(",")):
            frame = bench_frame(size)
            count = args.total // size // 64 * 64
            case = Case(size, frame, count, args.buffer, top / "plain", top / "queue")
            plain_write(case.plain, frame, count)
            measure(case, args)
        if args.extras:
            disposal(top, 2 * args.repeat + 1)
            alignment(top, args.repeat)
    finally:
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
