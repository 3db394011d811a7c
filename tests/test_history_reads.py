"""HistoryReader's reads: whole records into the reader's buffer, checked there, from the page
cache on the caller's thread (``read_nowait``) or waiting in a worker thread (``read``);
damage met by such a read, reads that would wait, short reads, records larger than the
buffer, a kernel without RWF_NOWAIT, and a replay through a daemon whose reads fall back."""

from __future__ import annotations

import errno
import itertools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from framewire.frame import Frame, FrameKind
from framewire.spool import StreamHistory, _history
from framewire.spool._format import RECORD_HEADER_SIZE, Record, SegmentDecoder
from framewire.spool._history import HistoryReader

from .test_rewind import cal, rewind_10s_while_live, seqs

S = 1_000_000_000
T0 = 1_800_000_000 * S
MIB = 1 << 20


def data(i: int, size: int = 1000) -> Frame:
    return Frame(FrameKind.DATA, "d", i.to_bytes(4, "little") * (size // 4), 0)


def number(frame: Frame) -> int:
    return int.from_bytes(bytes(frame.payload)[:4], "little")


def read_nowait_all(reader: HistoryReader) -> tuple[list[Frame], int]:
    """Every frame, as a replay reads them: from the page cache while it can, else waiting
    (as the worker thread would); and how many times it had to wait."""
    frames: list[Frame] = []
    waited = 0
    while True:
        batch = reader.read_nowait(64, 1 << 20)
        if batch is None:
            waited += 1
            batch = reader.read(64, 1 << 20)
        if not batch:
            break
        frames += [frame for _, frame in batch]
    reader.close()
    return frames, waited


def build(path: Path, sizes: list[int], *, segment_size: int = 4 * MIB) -> StreamHistory:
    """A history of one data frame per size (frame i carries i), a second apart."""
    history = StreamHistory.open(path, max_bytes=256 * MIB, segment_size=segment_size)
    for i, size in enumerate(sizes):
        history.append([data(i, size)], T0 + i * S)
    return history


def records_of(segment: Path) -> list[Record]:
    decoder = SegmentDecoder()
    return [e for e in decoder.feed(segment.read_bytes()) if isinstance(e, Record)]


class Preadv:
    """``os.preadv`` as the reader calls it, with what the page cache "holds" decided by the
    test: ``uncached(call)`` says whether a RWF_NOWAIT read finds nothing (EAGAIN), and
    ``short`` (if set) caps how much a RWF_NOWAIT read brings."""

    def __init__(
        self, uncached: Callable[[int], bool] = lambda call: False, short: int | None = None
    ) -> None:
        self.uncached = uncached
        self.short = short
        self.nowait_calls = 0
        self.waiting_calls = 0

    def __call__(self, fd: int, buffers: list[memoryview], offset: int, flags: int = 0) -> int:
        if not flags:
            self.waiting_calls += 1
            return os.preadv(fd, buffers, offset)
        assert flags == os.RWF_NOWAIT
        self.nowait_calls += 1
        if self.uncached(self.nowait_calls):
            raise BlockingIOError(errno.EAGAIN, "would block")
        if self.short is not None:
            buffers = [buffers[0][: self.short]]
        return os.preadv(fd, buffers, offset, flags)


needs_nowait = pytest.mark.skipif(
    not hasattr(os, "RWF_NOWAIT"), reason="no RWF_NOWAIT on this platform"
)


@needs_nowait
def test_read_nowait_reads_the_page_cache_on_the_callers_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frames of every size (small, around the 1 MiB buffer, larger than it, larger than its
    most) across segments: all come, in order, once; only the opening of each segment (and
    the record over the buffer's most) are left to a waiting read."""
    sizes = [1000] * 50 + [MIB - 100, MIB + 4000] + [64 << 10] * 40 + [9 * MIB] + [1000] * 5
    preadv = Preadv()
    monkeypatch.setattr(_history, "_preadv", preadv)
    with build(tmp_path / "h", sizes) as history:
        segments = history.stats().segments
        assert segments > 2
        frames, waited = read_nowait_all(history.reader(0))
    assert [number(f) for f in frames] == list(range(len(sizes)))
    assert [len(f.payload) for f in frames] == sizes
    # Each segment after the first is opened by a waiting read (the first reader opened
    # the first); its end is met there too; the 9 MiB record is read into its own memory.
    assert waited <= 2 * segments + 2
    assert preadv.nowait_calls > waited


def test_a_corrupt_record_met_by_an_in_place_read_is_skipped_and_counted(
    tmp_path: Path,
) -> None:
    """A flipped payload byte (valid header) and a broken header, each in the middle of a
    1 MiB read of small records: each record is skipped and counted, never returned; the
    records after each come, and reads go on whole afterwards."""
    path = tmp_path / "h"
    with build(path, [1000] * 300) as history:
        (segment,) = sorted(path.glob("*.seg"))
        records = records_of(segment)
        with open(segment, "r+b") as file:
            # Record 100's payload, then record 200's header magic.
            file.seek(records[100].offset + RECORD_HEADER_SIZE + 500)
            byte = file.read(1)
            file.seek(records[100].offset + RECORD_HEADER_SIZE + 500)
            file.write(bytes([byte[0] ^ 0x40]))
            file.seek(records[200].offset)
            file.write(b"XXXX")
        reader = history.reader(0)
        frames, _ = read_nowait_all(reader)
        assert [number(f) for f in frames] == [i for i in range(300) if i not in (100, 200)]
        assert reader.frames_missed == 2
        # The waiting read gives the same.
        blocking = history.reader(0)
        got: list[Frame] = []
        while batch := blocking.read(64, 1 << 20):
            got += [frame for _, frame in batch]
        assert [number(f) for f in got] == [number(f) for f in frames]
        assert blocking.frames_missed == 2


@needs_nowait
def test_a_read_that_would_wait_is_left_to_read_which_goes_on_from_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every third RWF_NOWAIT read finds its bytes uncached: read_nowait returns what it
    read before (or None), counts it, and read() goes on from the same place."""
    preadv = Preadv(uncached=lambda call: call % 3 == 0)
    monkeypatch.setattr(_history, "_preadv", preadv)
    sizes = [3000] * 2000 + [MIB + 10] * 3 + [3000] * 100
    with build(tmp_path / "h", sizes, segment_size=2 * MIB) as history:
        reader = history.reader(0)
        frames, waited = read_nowait_all(reader)
    assert [number(f) for f in frames] == list(range(len(sizes)))
    assert reader.frames_missed == 0
    assert reader.uncached_reads >= preadv.nowait_calls // 3
    assert waited >= preadv.nowait_calls // 3
    assert preadv.waiting_calls >= waited


@needs_nowait
def test_short_reads_from_the_page_cache_lose_and_repeat_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RWF_NOWAIT reads that bring less than asked (the rest not cached): records cut by
    them are read again whole, records in them come once."""
    monkeypatch.setattr(_history, "_preadv", Preadv(short=70_000))
    sizes = [5000, 100, 65536, 40_000, 200_000, 7] * 30
    with build(tmp_path / "h", sizes) as history:
        reader = history.reader(0)
        frames, _ = read_nowait_all(reader)
    assert [number(f) for f in frames if len(f.payload) >= 4] == [
        i for i, size in enumerate(sizes) if size >= 4
    ]
    assert [len(f.payload) for f in frames] == [size - size % 4 for size in sizes]
    assert reader.frames_missed == 0


def test_records_alike_are_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read takes as many whole records of the size last read as fit the buffer: a stream
    of records alike is read with no record cut at the end of a read and read again (the
    first read, which knows no size yet, cuts one)."""
    got: list[int] = []

    def counting(fd: int, buffers: list[memoryview], offset: int, flags: int = 0) -> int:
        got.append(os.preadv(fd, buffers, offset, flags))
        return got[-1]

    monkeypatch.setattr(_history, "_preadv", counting)
    path = tmp_path / "h"
    with build(path, [65536] * 100, segment_size=16 * MIB) as history:
        (segment,) = path.glob("*.seg")
        reader = history.reader(0)
        frames, _ = read_nowait_all(reader)
    assert len(frames) == 100
    record = RECORD_HEADER_SIZE + len(frames[0].wire or b"")
    assert sum(got) <= segment.stat().st_size + record


@pytest.mark.parametrize("error", [errno.EOPNOTSUPP, errno.EINVAL])
def test_a_filesystem_that_refuses_rwf_nowait_is_read_by_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: int
) -> None:
    """The kernel refuses RWF_NOWAIT: the reader stops asking (one refusal) and every read
    is left to read()."""
    calls: list[int] = []

    def refusing(fd: int, buffers: list[memoryview], offset: int, flags: int = 0) -> int:
        calls.append(flags)
        if flags:
            raise OSError(error, os.strerror(error))
        return os.preadv(fd, buffers, offset)

    monkeypatch.setattr(_history, "_preadv", refusing)
    with build(tmp_path / "h", [2000] * 1000) as history:
        reader = history.reader(0)
        frames, waited = read_nowait_all(reader)
    assert [number(f) for f in frames] == list(range(1000))
    assert sum(1 for flags in calls if flags) <= 1
    assert waited == reader.uncached_reads
    assert waited > 1


def drop_pages(path: Path) -> None:
    """Write back ``path`` and drop its pages from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def pages_can_be_dropped(directory: Path) -> bool:
    probe = directory / "probe"
    probe.write_bytes(bytes(1 << 16))
    drop_pages(probe)
    fd = os.open(probe, os.O_RDONLY)
    try:
        os.preadv(fd, [bytearray(4096)], 0, os.RWF_NOWAIT)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
        probe.unlink()
    return False


@needs_nowait
def test_pages_dropped_from_the_page_cache_are_read_by_read(tmp_path: Path) -> None:
    """The real kernel: segments whose pages were dropped (fsync, then
    POSIX_FADV_DONTNEED) are not read by read_nowait (EAGAIN, or a short read while the
    readahead it started comes in), which leaves them to read(); everything comes once."""
    if not pages_can_be_dropped(tmp_path):
        pytest.skip("this filesystem keeps its pages in memory (tmpfs?)")
    path = tmp_path / "h"
    with build(path, [30_000] * 200) as history:
        reader = history.reader(0)
        for segment in sorted(path.glob("*.seg")):
            drop_pages(segment)
        frames, waited = read_nowait_all(reader)
    assert [number(f) for f in frames] == list(range(200))
    assert reader.uncached_reads >= 1
    assert waited >= reader.uncached_reads


async def test_rewind_with_uncached_reads_then_live_without_gap_or_duplicate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through a daemon: the replay's reads find their bytes uncached every other time
    (worker thread) while the stream goes on; the client gets the metadata, then every
    frame once, across the seam."""
    preadv: Any = Preadv(uncached=lambda call: call % 2 == 0)
    if not hasattr(os, "RWF_NOWAIT"):
        preadv = os.preadv
    monkeypatch.setattr(_history, "_preadv", preadv)
    frames, _ = await rewind_10s_while_live(tmp_path)
    assert frames[0] == cal(2)
    assert seqs(frames[1:]) == list(range(200, 1400))
    if isinstance(preadv, Preadv):
        assert preadv.waiting_calls >= 1
        assert preadv.nowait_calls >= 1


async def test_a_replay_whose_sends_write_nothing_still_lets_other_tasks_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reads from the page cache do not yield, and a send with nothing to write (every
    frame left out) does not either: the replay yields every few batches all the same."""
    from framewire.daemon.endpoints import _rewind

    monkeypatch.setattr(_rewind, "_BATCH_BYTES", 1)  # a batch per read
    monkeypatch.setattr(_history, "_READ_BUFFER", 64 << 10)  # a read: 3 frames
    sends = 0
    seen: list[int] = []

    async def send(frames: list[Frame]) -> None:
        nonlocal sends
        sends += 1  # writes nothing: no checkpoint

    async def other() -> None:
        while True:
            seen.append(sends)
            await trio.lowlevel.checkpoint()

    with build(tmp_path / "h", [20_000] * 400, segment_size=64 * MIB) as history:
        reader = history.reader(0)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(other)
                await trio.lowlevel.checkpoint()  # other starts
                await _rewind._replay(reader, send, None)
                nursery.cancel_scope.cancel()
    assert sends > 100
    # Trio runs the tasks ready at a checkpoint in either order: other may see the
    # replay's sends in steps of up to two yields' worth.
    steps = [b - a for a, b in itertools.pairwise(seen)]
    assert max(steps) <= 2 * _rewind._YIELD_BATCHES
