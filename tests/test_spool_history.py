"""StreamHistory: the time index, metadata at any kept point, bounds, restart, torn tails."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from framewire.frame import Frame, FrameKind
from framewire.protocols.native import NativeBlock, NativeEncoder
from framewire.spool import SpoolLocked, StreamHistory
from framewire.spool._history import (
    INDEX_ENTRY_SIZE,
    HistoryReader,
    IndexEntry,
    decode_index,
    encode_index_entry,
    entry_at,
)

S = 1_000_000_000  # one second in ns
T0 = 1_800_000_000 * S


def data(i: int, size: int = 100) -> Frame:
    return Frame(FrameKind.DATA, "d", i.to_bytes(4, "little") * (size // 4), 0)


def meta(kind: str, i: int) -> Frame:
    return Frame(FrameKind.METADATA, kind, f"{kind}{i}".encode(), 0)


def read_all(reader: HistoryReader, batch: int = 5) -> list[tuple[int, Frame]]:
    out: list[tuple[int, Frame]] = []
    while got := reader.read(batch, 1 << 30):
        out += got
    reader.close()
    return out


def ids(frames: list[tuple[int, Frame]]) -> list[str]:
    """``m:Cal0`` for metadata, ``7`` for data frame 7."""
    return [
        f"m:{bytes(f.payload).decode()}"
        if f.is_metadata
        else str(int.from_bytes(bytes(f.payload)[:4], "little"))
        for _, f in frames
    ]


def test_reader_starts_with_metadata_current_at_the_point(tmp_path: Path) -> None:
    with StreamHistory.open(tmp_path / "h", max_bytes=1 << 20, segment_size=600) as history:
        history.append([meta("Cal", 0), meta("Obs", 0)], T0)
        for i in range(40):
            batch = [data(i)]
            if i == 10:
                batch.insert(0, meta("Cal", 1))
            if i == 25:
                batch.insert(0, meta("Obs", 1))
            history.append(batch, T0 + i * S // 20)
        assert history.stats().segments > 3  # the point is in a later segment than the meta
        got = read_all(history.reader(T0 + 30 * S // 20))
        # Cal 1 came at frame 10 and Obs 1 at 25 (another segment): both current at 30,
        # in first-seen order of their types.
        assert ids(got) == ["m:Cal1", "m:Obs1", *map(str, range(30, 40))]
        assert [t for t, _ in got[2:]] == [T0 + i * S // 20 for i in range(30, 40)]
        # Mid-way: Cal 1 known, Obs still 0; the Obs 1 record comes in order.
        got = read_all(history.reader(T0 + 20 * S // 20))
        assert ids(got)[:2] == ["m:Cal1", "m:Obs0"]
        assert ids(got)[2:] == [*map(str, range(20, 25)), "m:Obs1", *map(str, range(25, 40))]


def test_end_seq_bounds_the_reader_and_a_point_after_the_newest_gives_metadata_only(
    tmp_path: Path,
) -> None:
    with StreamHistory.open(tmp_path / "h", max_bytes=1 << 20) as history:
        history.append([meta("Cal", 0)], T0)
        for i in range(10):
            history.append([data(i)], T0 + i * S)
        end = history.next_seq
        history.append([data(10)], T0 + 10 * S)
        assert ids(read_all(history.reader(T0 + 5 * S, end))) == ["m:Cal0", *"56789"]
        reader = history.reader(T0 + 60 * S)
        assert ids(read_all(reader)) == ["m:Cal0"]
        assert reader.start_seq == history.next_seq


def test_a_time_before_the_oldest_is_clamped_to_the_oldest(tmp_path: Path) -> None:
    with StreamHistory.open(tmp_path / "h", max_bytes=1 << 20) as history:
        for i in range(5):
            history.append([data(i)], T0 + i * S)
        reader = history.reader(T0 - 3600 * S)
        assert reader.clamped == T0
        assert ids(read_all(reader)) == list("01234")


def test_bounded_in_bytes_keeps_only_the_newest(tmp_path: Path) -> None:
    path = tmp_path / "h"
    limit = 64 * 1024
    with StreamHistory.open(path, max_bytes=limit) as history:
        for i in range(2000):
            history.append([data(i, 200)], T0 + i * S // 100)
            on_disk = sum(p.stat().st_size for p in path.iterdir() if p.name != "lock")
            assert on_disk <= limit
        assert history.segments_dropped > 0
        got = ids(read_all(history.reader(0)))
        # What is kept is a contiguous run ending with the newest frame.
        assert got[-1] == "1999"
        assert got == [str(i) for i in range(int(got[0]), 2000)]
        assert int(got[0]) > 1000


def test_max_age_drops_old_segments(tmp_path: Path) -> None:
    with StreamHistory.open(
        tmp_path / "h", max_bytes=1 << 20, max_age=10, segment_size=1000
    ) as history:
        for i in range(100):
            history.append([data(i)], T0 + i * S)
        got = read_all(history.reader(0))
        first_time = got[0][0]
        assert first_time >= T0 + (99 - 10 - 10) * S  # within max_age plus one segment
        assert history.trim(T0 + 200 * S) > 0
        assert read_all(history.reader(0)) == []


def test_reopen_continues_and_cuts_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "h"
    with StreamHistory.open(path, max_bytes=1 << 20, segment_size=2000) as history:
        history.append([meta("Cal", 0)], T0)
        for i in range(30):
            history.append([data(i)], T0 + i * S)
    last = max(path.glob("*.seg"))
    with open(last, "ab") as file:
        file.write(b"\x89FWR" + b"\x01" * 20)  # a record cut short by a crash
    with open(last.with_suffix(".idx"), "ab") as file:
        file.write(b"\x07" * 10)
    with StreamHistory.open(path, max_bytes=1 << 20, segment_size=2000) as history:
        assert history.torn_bytes == 24
        assert history.next_seq == 31
        history.append([data(30)], T0 + 30 * S)
        assert os.path.getsize(last.with_suffix(".idx")) % INDEX_ENTRY_SIZE == 0
        got = ids(read_all(history.reader(T0 + 25 * S)))
        assert got == ["m:Cal0", *map(str, range(25, 31))]


def test_reopen_carries_the_metadata_into_the_next_segment(tmp_path: Path) -> None:
    path = tmp_path / "h"
    with StreamHistory.open(path, max_bytes=1 << 20, segment_size=400) as history:
        history.append([meta("Cal", 7)], T0)
        history.append([data(0)], T0 + S)
    with StreamHistory.open(path, max_bytes=1 << 20, segment_size=400) as history:
        for i in range(1, 20):
            history.append([data(i)], T0 + (i + 1) * S)
        assert history.stats().segments > 2
        assert ids(read_all(history.reader(T0 + 18 * S))) == ["m:Cal7", "17", "18", "19"]


def test_one_directory_one_history(tmp_path: Path) -> None:
    with StreamHistory.open(tmp_path / "h", max_bytes=1 << 20), pytest.raises(SpoolLocked):
        StreamHistory.open(tmp_path / "h", max_bytes=1 << 20)


# -- properties -----------------------------------------------------------------------------


@given(
    st.lists(
        st.tuples(st.integers(0, 2**40), st.integers(-(2**62), 2**62), st.integers(1, 2**20)),
        max_size=20,
    ),
    st.integers(0, 40 * INDEX_ENTRY_SIZE),
)
def test_index_decodes_a_prefix_of_any_torn_file(raw: list[tuple[int, int, int]], cut: int) -> None:
    entries: list[IndexEntry] = []
    seq = offset = 0
    for step, time_ns, grow in raw:
        seq += step + 1
        offset += grow
        entries.append(IndexEntry(seq, time_ns, offset))
    data = b"".join(map(encode_index_entry, entries))
    assert decode_index(data) == entries
    got = decode_index(data[:cut])
    assert got == entries[: min(cut, len(data)) // INDEX_ENTRY_SIZE]


@given(st.lists(st.integers(0, 100), min_size=1, max_size=30), st.integers(-5, 3100))
def test_entry_at_is_the_first_at_or_after(gaps: list[int], at: int) -> None:
    times: list[int] = []
    now = 0
    for gap in gaps:
        now += gap
        times.append(now)
    entries = [IndexEntry(i, t, i + 1) for i, t in enumerate(times)]
    index = entry_at(entries, at)
    assert all(t < at for t in times[:index])
    assert index == len(times) or times[index] >= at


@settings(
    deadline=None, max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(st.tuples(st.integers(1, 8), st.integers(10, 3000), st.booleans()), max_size=60),
    st.integers(8 * 1024, 64 * 1024),
)
def test_bounds_hold_and_replay_is_an_ordered_suffix(
    tmp_path_factory: pytest.TempPathFactory,
    batches: list[tuple[int, int, bool]],
    limit: int,
) -> None:
    path = tmp_path_factory.mktemp("h")
    number = 0
    with StreamHistory.open(path, max_bytes=limit) as history:
        for index, (count, size, with_meta) in enumerate(batches):
            frames = [meta("M", index)] if with_meta else []
            for _ in range(count):
                frames.append(data(number, size))
                number += 1
            history.append(frames, T0 + index * S)
            on_disk = sum(p.stat().st_size for p in path.iterdir() if p.name != "lock")
            assert on_disk <= limit
        got = [i for i in ids(read_all(history.reader(0))) if not i.startswith("m:")]
    if number:
        assert got == [str(i) for i in range(number - len(got), number)]
        assert got  # the newest batch is always kept


def test_reader_from_a_sequence_number_goes_on_without_metadata(tmp_path: Path) -> None:
    with StreamHistory.open(tmp_path / "h", max_bytes=1 << 20, segment_size=500) as history:
        history.append([meta("Cal", 0)], T0)
        for i in range(30):
            history.append([data(i), data(100 + i)], T0 + i * S)
        assert history.stats().segments > 3
        # Frame 0 is the metadata; data i is 1 + 2i, data 100 + i is 2 + 2i.
        got = ids(read_all(history.reader_from(1 + 2 * 12 + 1, 1 + 2 * 20)))
        assert got == ["112", *[x for i in range(13, 20) for x in (str(i), str(100 + i))]]
        reader = history.reader_from(history.next_seq, history.next_seq)
        assert read_all(reader) == []
        assert reader.frames_missed == 0


def test_a_seq_gap_counts_frames_missed(tmp_path: Path) -> None:
    with StreamHistory.open(tmp_path / "h", max_bytes=1 << 20) as history:
        history.append([data(0)], T0)
        history.append([data(1)], T0 + S, seq=5)
        assert history.next_seq == 6
        reader = history.reader(0)
        assert ids(read_all(reader)) == ["0", "1"]
        assert reader.frames_missed == 4


def native_block(first: int, count: int) -> NativeBlock:
    frames = [
        Frame(FrameKind.DATA, "d", i.to_bytes(4, "little") * 8, i)
        for i in range(first, first + count)
    ]
    wire = b"".join(bytes(b) for f in frames for b in NativeEncoder().encode(f))
    return NativeBlock("d", wire, count, first)


def test_a_native_block_is_one_record_of_many_frames(tmp_path: Path) -> None:
    path = tmp_path / "h"
    with StreamHistory.open(path, max_bytes=1 << 20) as history:
        history.append([meta("Cal", 0)], T0)
        history.append([native_block(0, 50), data(50)], T0 + S)
        history.append([native_block(51, 20)], T0 + 2 * S)
        assert history.next_seq == 1 + 71
        got = read_all(history.reader(T0 + S // 2))
        assert [type(f) for _, f in got] == [Frame, NativeBlock, Frame, NativeBlock]
        assert [f.nframes for _, f in got] == [1, 50, 1, 20]
        assert got[1][1].wire == native_block(0, 50).wire
        block = got[1][1]
        assert isinstance(block, NativeBlock)
        assert ids([(0, f) for f in block.frames()]) == list(map(str, range(50)))
    # A damaged block costs its frames, counted; the rest is read.
    segment = next(path.glob("*.seg"))
    raw = bytearray(segment.read_bytes())
    wire = native_block(0, 50).wire
    assert isinstance(wire, bytes)
    at = raw.find(wire) + 500
    raw[at] ^= 0xFF
    segment.write_bytes(bytes(raw))
    with StreamHistory.open(path, max_bytes=1 << 20) as history:
        reader = history.reader(T0 + S // 2)
        got = read_all(reader)
        assert [f.nframes for _, f in got] == [1, 1, 20]
        assert reader.frames_missed == 50


def test_a_run_start_retires_the_previous_runs_metadata(tmp_path: Path) -> None:
    with StreamHistory.open(
        tmp_path / "h", max_bytes=1 << 20, segment_size=400, run_starts=frozenset({"Obs"})
    ) as history:
        history.append([meta("Obs", 1), meta("Wiring", 1), meta("Cal", 1)], T0)
        for i in range(10):
            history.append([data(i)], T0 + (1 + i) * S)
        history.append([meta("Obs", 2), meta("Cal", 2)], T0 + 20 * S)
        for i in range(10, 20):
            history.append([data(i)], T0 + (11 + i) * S)
        assert history.stats().segments > 3
        assert ids(read_all(history.reader(T0 + 5 * S)))[:3] == ["m:Obs1", "m:Wiring1", "m:Cal1"]
        # After the second Observation: its run's metadata only (the segment's .meta too).
        assert ids(read_all(history.reader(T0 + 28 * S))) == ["m:Obs2", "m:Cal2", "17", "18", "19"]


def test_a_history_bounded_at_16_mib_keeps_only_the_newest(tmp_path: Path) -> None:
    path = tmp_path / "h"
    limit = 16 << 20
    with StreamHistory.open(path, max_bytes=limit) as history:
        for i in range(768):  # 48 MiB of 64 KiB frames, 8 a batch
            history.append([data(8 * i + k, 64 << 10) for k in range(8)], T0 + i * S)
            assert sum(p.stat().st_size for p in path.iterdir() if p.name != "lock") <= limit
        got = [int(x) for x in ids(read_all(history.reader(0), batch=64))]
    assert got == list(range(got[0], 8 * 768))
    assert 8 * 768 - len(got) > 2 * len(got)  # two thirds and more went, oldest first
    assert len(got) * (64 << 10) > limit * 3 // 4  # and what is kept nearly fills the bound
