"""DiskQueue: appends, reads, commits, recovery after crashes, corruption, bounds, faults."""

from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from framewire.frame import Buffer, Frame, FrameKind
from framewire.spool import (
    DiskQueue,
    RecordTooLarge,
    SpoolClosed,
    SpoolDiskFull,
    SpoolIOError,
    SpoolLocked,
)
from framewire.spool._format import SEGMENT_HEADER_SIZE

SMALL = 64 * 1024


def data(i: int, size: int = 100) -> Frame:
    return Frame(FrameKind.DATA, "d", i.to_bytes(4, "little") * (size // 4), i)


def meta(i: int) -> Frame:
    return Frame(FrameKind.METADATA, "m", b"meta" * 10, i, {"i": str(i)})


def segment_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.seg"))


def drain(queue: DiskQueue, batch: int = 7) -> list[Frame]:
    out: list[Frame] = []
    while got := queue.read_batch(batch, 1 << 30):
        out += got
        queue.commit(len(got))
    return out


def snapshot(directory: Path) -> Path:
    """The directory as a crash would leave it (the page cache survives a process)."""
    copy = Path(tempfile.mkdtemp(prefix="spool-crash-"))
    for item in directory.iterdir():
        if item.name != "lock":
            shutil.copy(item, copy / item.name)
    return copy


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    return tmp_path / "spool"


def test_frames_come_back_in_order_and_survive_reopening(spool: Path) -> None:
    frames = [meta(0)] + [data(i, 1000) for i in range(1, 300)]
    with DiskQueue.open(spool, max_size=1 << 20, segment_size=SMALL) as queue:
        assert queue.append(frames) == 300
        assert queue.frames == 300
        assert queue.bytes == segment_bytes(spool) <= 1 << 20
        assert len(list(spool.glob("*.seg"))) > 1
        batch = queue.read_batch(10, 1 << 30)
        assert batch == frames[:10]
        assert queue.read_batch(10, 1 << 30) == batch  # not consumed
        queue.commit(4)
    with DiskQueue.open(spool, max_size=1 << 20, segment_size=SMALL) as queue:
        assert queue.frames == 296
        assert drain(queue) == frames[4:]
        assert queue.frames == 0
        assert len(list(spool.glob("*.seg"))) == 1  # delivered segments are deleted


def test_read_batch_respects_its_bounds(spool: Path) -> None:
    with DiskQueue.open(spool, max_size=1 << 20) as queue:
        queue.append([data(i, 1000) for i in range(10)])
        assert len(queue.read_batch(3, 1 << 30)) == 3
        assert len(queue.read_batch(10, 2500)) == 2
        assert len(queue.read_batch(10, 1)) == 1  # always at least one
        with pytest.raises(ValueError, match="handed out"):
            queue.commit(4)


def test_blocks_are_stored_as_their_frames(spool: Path) -> None:
    from framewire.protocols.native import NativeDecoder, NativeEncoder

    frames = [data(i, 64) for i in range(20)]
    wire = b"".join(bytes(b) for b in NativeEncoder().encode_batch(frames))
    decoder = NativeDecoder(max_frame_size=1 << 20)
    decoder.blocks = True
    cut = decoder.feed(wire)
    assert len(cut) < 20
    with DiskQueue.open(spool, max_size=1 << 20) as queue:
        assert queue.append(cut) == 20
        assert drain(queue) == frames


# -- crashes --------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    program=st.lists(
        st.tuples(st.integers(0, 12), st.integers(0, 2000), st.integers(0, 9)),
        min_size=1,
        max_size=12,
    ),
    cut_share=st.floats(0, 1),
    policy=st.sampled_from(["block", "drop_oldest"]),
)
def test_a_crash_at_any_byte_of_the_last_write_loses_only_that_write(
    program: list[tuple[int, int, int]], cut_share: float, policy: str
) -> None:
    """Appends, reads and commits; then a crash that cuts the last append anywhere. The
    queue opened afterwards delivers exactly what was not committed, minus a suffix of that
    last append, in order; never a committed frame, never a damaged one."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "q"
        queue = DiskQueue.open(
            directory,
            max_size=1 << 22,
            segment_size=16 * 1024,
            when_full="drop_oldest" if policy == "drop_oldest" else "block",
            sync="none",
        )
        made = 0
        pending: list[Frame] = []  # appended, not committed
        last: list[Frame] = []
        before = 0
        for count, size, commit in program:
            last = [
                meta(made + i) if (made + i) % 5 == 0 else data(made + i, size)
                for i in range(count)
            ]
            made += count
            active = max(directory.glob("*.seg"))
            before = active.stat().st_size
            assert queue.append(last) == len(last)
            pending += last
            handed = queue.read_batch(commit, 1 << 30)
            assert handed == pending[: len(handed)]
            queue.commit(len(handed) // 2)
            del pending[: len(handed) // 2]
        crashed = snapshot(directory)
        queue.close()
        active = max(crashed.glob("*.seg"))
        size = active.stat().st_size
        if active.name != max(directory.glob("*.seg")).name or before > size:
            before = SEGMENT_HEADER_SIZE
        cut = before + round((size - before) * cut_share)
        os.truncate(active, cut)
        with DiskQueue.open(crashed, max_size=1 << 22, segment_size=16 * 1024) as reopened:
            got = drain(reopened)
            assert reopened.stats().corrupt_regions == 0
        shutil.rmtree(crashed)
        # What survived: every frame not committed, in order, but for a suffix of the last
        # append (the crash may have cut it anywhere).
        assert got == pending[: len(got)]
        assert len(got) >= len(pending) - len(last)


def test_a_torn_tail_is_cut_off_and_appends_go_on(spool: Path) -> None:
    with DiskQueue.open(spool, max_size=1 << 20, sync="batch") as queue:
        queue.append([data(i) for i in range(10)])
    active = max(spool.glob("*.seg"))
    os.truncate(active, active.stat().st_size - 7)
    with DiskQueue.open(spool, max_size=1 << 20) as queue:
        assert queue.frames == 9
        assert queue.stats().torn_bytes > 0
        queue.append([data(100)])
        assert [f.timestamp for f in drain(queue)] == [*range(9), 100]


def test_a_lost_position_file_redelivers_rather_than_loses(spool: Path) -> None:
    with DiskQueue.open(spool, max_size=1 << 20) as queue:
        queue.append([data(i) for i in range(10)])
        queue.commit(len(queue.read_batch(4, 1 << 30)))
    (spool / "position").write_bytes(b"garbage")
    with DiskQueue.open(spool, max_size=1 << 20) as queue:
        assert queue.stats().position_lost
        assert [f.timestamp for f in drain(queue)] == list(range(10))


def test_a_queue_never_committed_has_not_lost_its_position(spool: Path) -> None:
    with DiskQueue.open(spool, max_size=1 << 20) as queue:
        queue.append([data(i) for i in range(3)])
    with DiskQueue.open(spool, max_size=1 << 20) as queue:
        assert not queue.stats().position_lost
        assert queue.frames == 3


# -- corruption -----------------------------------------------------------------------------


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(where=st.floats(0, 1), flip=st.integers(1, 255), committed=st.integers(0, 5))
def test_flipped_bytes_are_skipped_and_counted_never_delivered(
    where: float, flip: int, committed: int
) -> None:
    frames = [meta(0)] + [data(i, 300) for i in range(1, 60)]
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "q"
        with DiskQueue.open(directory, max_size=1 << 20, segment_size=8192) as queue:
            queue.append(frames)
            queue.commit(len(queue.read_batch(committed, 1 << 30)))
        segments = sorted(directory.glob("*.seg"))
        total = sum(p.stat().st_size for p in segments)
        position = min(int(where * total), total - 1)
        for path in segments:
            size = path.stat().st_size
            if position < size:
                raw = bytearray(path.read_bytes())
                raw[position] ^= flip
                path.write_bytes(raw)
                break
            position -= size
        with DiskQueue.open(directory, max_size=1 << 20, segment_size=8192) as queue:
            got = drain(queue)
            stats = queue.stats()
    expected = frames[committed:]
    # Every frame delivered is one of the originals, in order, undamaged.
    iterator = iter(expected)
    assert all(any(f == e for e in iterator) for f in got)
    missing = len(expected) - len(got)
    assert missing <= 1
    if missing:
        assert stats.corrupt_regions + (stats.torn_bytes > 0) >= 1
        assert stats.frames == 0


# -- bounds ---------------------------------------------------------------------------------


def test_block_takes_what_fits_and_room_comes_back_with_commits(spool: Path) -> None:
    with DiskQueue.open(spool, max_size=256 * 1024, segment_size=16 * 1024) as queue:
        frames = [data(i, 4000) for i in range(100)]
        taken = queue.append(frames)
        assert 0 < taken < 100
        assert queue.bytes == segment_bytes(spool) <= 256 * 1024
        assert queue.append(frames[taken:]) == 0
        got = queue.read_batch(30, 1 << 30)
        queue.commit(len(got))
        more = queue.append(frames[taken:])
        assert more > 0
        assert queue.bytes == segment_bytes(spool) <= 256 * 1024
        assert got + drain(queue) == frames[: taken + more]


def test_drop_oldest_keeps_the_newest_data_and_every_metadata_frame(spool: Path) -> None:
    max_size = 256 * 1024
    frames = [meta(i) if i % 50 == 0 else data(i, 2000) for i in range(1000)]
    with DiskQueue.open(
        spool, max_size=max_size, segment_size=16 * 1024, when_full="drop_oldest"
    ) as queue:
        for start in range(0, 1000, 37):
            assert queue.append(frames[start : start + 37]) == len(frames[start : start + 37])
            assert queue.bytes == segment_bytes(spool) <= max_size
        stats = queue.stats()
        got = drain(queue, batch=50)
    assert [f for f in got if f.is_metadata] == [f for f in frames if f.is_metadata]
    kept = [f for f in got if not f.is_metadata]
    all_data = [f for f in frames if not f.is_metadata]
    assert kept == all_data[len(all_data) - len(kept) :]  # the newest, in order
    assert stats.dropped_frames == len(all_data) - len(kept) > 0
    assert got == [f for f in frames if f in got]  # metadata in its place among the data


def test_drop_oldest_keeps_frames_in_flight(spool: Path) -> None:
    frames = [data(i, 2000) for i in range(600)]
    with DiskQueue.open(
        spool, max_size=128 * 1024, segment_size=16 * 1024, when_full="drop_oldest"
    ) as queue:
        queue.append(frames[:40])
        handed = queue.read_batch(10, 1 << 30)
        assert queue.append(frames[40:]) == 560  # the segment being read is dropped
        assert queue.read_batch(10, 1 << 30) == handed
        queue.commit(10)
        rest = drain(queue)
        assert queue.stats().dropped_frames == 590 - len(rest)
    assert handed + rest == [f for f in frames if f in handed + rest]
    assert rest[-1] == frames[-1]


def test_drop_oldest_carries_metadata_across_a_crash(spool: Path) -> None:
    frames = [meta(i) if i % 40 == 0 else data(i, 3000) for i in range(400)]
    with DiskQueue.open(
        spool, max_size=128 * 1024, segment_size=16 * 1024, when_full="drop_oldest"
    ) as queue:
        queue.append(frames)
        crashed = snapshot(spool)
    try:
        with DiskQueue.open(crashed, max_size=128 * 1024, segment_size=16 * 1024) as queue:
            got = drain(queue)
    finally:
        shutil.rmtree(crashed)
    assert [f for f in got if f.is_metadata] == [f for f in frames if f.is_metadata]
    assert got[-1] == frames[-1]


def test_a_frame_that_cannot_fit_is_refused_before_anything_is_written(spool: Path) -> None:
    with DiskQueue.open(spool, max_size=64 * 1024, max_record_size=10_000) as queue:
        with pytest.raises(RecordTooLarge, match="max_record_size"):
            queue.append([data(0), data(1, 20_000)])
        assert queue.frames == 0
        assert queue.bytes == SEGMENT_HEADER_SIZE


# -- faults ---------------------------------------------------------------------------------


def test_a_second_queue_on_the_directory_is_refused(spool: Path) -> None:
    with DiskQueue.open(spool, max_size=1 << 20):
        with pytest.raises(SpoolLocked, match=f"spool {spool} is in use by another queue"):
            DiskQueue.open(spool, max_size=1 << 20)
        code = (
            "import sys\nfrom framewire.spool import DiskQueue, SpoolLocked\n"
            "try:\n    DiskQueue.open(sys.argv[1], max_size=1 << 20)\n"
            "except SpoolLocked as exc:\n    print(exc)\n"
        )
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
        result = subprocess.run(
            [os.sys.executable, "-c", code, str(spool)],  # type: ignore[attr-defined]
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert f"(process {os.getpid()})" in result.stdout
    with DiskQueue.open(spool, max_size=1 << 20):
        pass


@pytest.fixture
def failing_writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """os.writev writes half of what it is given, then the next call fails with ENOSPC,
    while the list holds a 1; ordinary writes otherwise."""
    real = os.writev
    armed = [0]

    def writev(fd: int, buffers: list[Buffer]) -> int:
        if not armed[0]:
            return real(fd, buffers)
        armed[0] = 0
        joined = b"".join(bytes(b) for b in buffers)
        os.write(fd, joined[: len(joined) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "writev", writev)
    return armed


def test_a_full_disk_undoes_the_append(spool: Path, failing_writes: list[int]) -> None:
    with DiskQueue.open(spool, max_size=1 << 20, segment_size=SMALL) as queue:
        queue.append([data(i, 1000) for i in range(5)])
        size = queue.bytes
        failing_writes[0] = 1
        with pytest.raises(SpoolDiskFull, match="no space left on the device") as info:
            queue.append([data(i, 1000) for i in range(5, 10)])
        assert "\n" not in str(info.value)
        assert (queue.frames, queue.bytes, segment_bytes(spool)) == (5, size, size)
        queue.append([data(10, 1000)])
        assert [f.timestamp for f in queue.read_batch(100, 1 << 30)] == [0, 1, 2, 3, 4, 10]
    with DiskQueue.open(spool, max_size=1 << 20) as queue:
        assert [f.timestamp for f in drain(queue)] == [0, 1, 2, 3, 4, 10]
        assert queue.stats().torn_bytes == 0


def test_a_real_full_file_system(tmp_path: Path) -> None:
    mount = tmp_path / "tiny"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
        capture_output=True,
        timeout=30,
    )
    if result.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: " + result.stderr.decode().strip())
    try:
        with DiskQueue.open(mount / "q", max_size=8 << 20, segment_size=SMALL) as queue:
            frames = [data(i, 20_000) for i in range(100)]
            taken = 0
            error: SpoolDiskFull | None = None
            for frame in frames:
                try:
                    taken += queue.append([frame])
                except SpoolDiskFull as exc:
                    error = exc
                    break
            assert error is not None, "a 1 MiB file system must fill up"
            assert queue.frames == taken > 0
            assert queue.bytes == segment_bytes(mount / "q")
            assert drain(queue) == frames[:taken]
    finally:
        subprocess.run(["umount", str(mount)], check=True, timeout=30)


def test_a_deleted_directory_is_an_error_not_a_silent_loss(spool: Path) -> None:
    queue = DiskQueue.open(spool, max_size=1 << 20)
    queue.append([data(0)])
    shutil.rmtree(spool)
    with pytest.raises(SpoolIOError, match=f"spool {spool}: cannot append") as info:
        queue.append([data(1)])
    assert "\n" not in str(info.value)
    with pytest.raises(SpoolIOError, match=f"spool {spool}: cannot read: No such file"):
        queue.read_batch(1, 1 << 30)
    with pytest.raises(SpoolIOError, match="cannot sync"):
        queue.close()  # the files are closed all the same
    with pytest.raises(SpoolClosed):
        queue.append([data(2)])


def test_a_directory_that_cannot_be_made_is_an_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(SpoolIOError, match=f"spool {blocker / 'q'}: cannot open the queue"):
        DiskQueue.open(blocker / "q", max_size=1 << 20)


def test_a_closed_queue_says_so(spool: Path) -> None:
    queue = DiskQueue.open(spool, max_size=1 << 20)
    queue.close()
    with pytest.raises(SpoolClosed):
        queue.append([data(0)])


@pytest.mark.parametrize("sync", ["none", "batch", "interval"])
def test_every_sync_policy_round_trips(spool: Path, sync: str) -> None:
    frames = [data(i, 500) for i in range(50)]
    with DiskQueue.open(spool, max_size=1 << 20, segment_size=8192, sync=sync) as queue:  # type: ignore[arg-type]
        queue.append(frames[:25])
        queue.append(frames[25:])
        queue.sync()
        assert drain(queue) == frames


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rnd=st.randoms(use_true_random=False), segment_size=st.sampled_from([1 << 20, 4 << 20]))
def test_reads_at_the_writers_heels_as_an_outbox_reads_deliver_everything_once(
    rnd: random.Random, segment_size: int
) -> None:
    # Appends of random batches interleaved with reads that take the frames held so far
    # again (skip, as the outbox does) and commits of random counts: every frame comes out
    # once, in order, whole, though reads stop at the writer and go on in place later.
    # Reads take about 1 MiB of whole records at a time: a backlog of several MiB cuts
    # records at the ends of reads, which are then read again whole.
    sizes = [100, 20_000, 70_000, 300_000]
    with tempfile.TemporaryDirectory() as tmp:
        queue = DiskQueue.open(Path(tmp) / "q", max_size=64 << 20, segment_size=segment_size)
        appended: list[Frame] = []
        delivered: list[Frame] = []
        taken: list[Frame] = []

        def take(more: int) -> None:
            held = sum(f.size for f in taken)
            taken.extend(
                queue.read_batch(len(taken) + more, held + rnd.choice([1, 200_000]))[len(taken) :]
            )

        for _ in range(60):
            if rnd.random() < 0.5:
                batch = [
                    data(len(appended) + j, rnd.choice(sizes)) for j in range(rnd.randint(1, 6))
                ]
                appended += batch[: queue.append(batch)]
            else:
                take(rnd.randint(1, 5))
                if taken and rnd.random() < 0.6:
                    count = rnd.randint(1, len(taken))
                    queue.commit(count)
                    delivered += taken[:count]
                    del taken[:count]
        while True:
            take(10)
            if not taken:
                break
            queue.commit(len(taken))
            delivered += taken
            taken.clear()
        queue.close()
    assert delivered == appended
