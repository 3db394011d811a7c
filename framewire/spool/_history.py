""":class:`StreamHistory`: a stream's recent frames on disk, indexed by arrival time.

The records and segment headers are the spool's (:mod:`._format`); what a history adds is
a time index and the metadata current at each segment's start. A history directory holds,
for each segment ``NNNNNNNNNNNNNNNNNNNN`` (the sequence number of its first record):

``NNN.seg``
    An appended segment of the spool format: records with consecutive sequence numbers,
    each one frame in the native format (as :mod:`framewire.spool` documents).
``NNN.idx``
    The time index: 32-byte entries, one per appended batch (frames the stream published
    together, which arrived together)::

        0   8  sequence number of the batch's first record (u64)
        8   8  arrival time, nanoseconds since the Unix epoch (i64; the daemon's clock)
        16  8  offset of that record in NNN.seg (u64)
        24  4  CRC-32C of bytes 0-23
        28  4  zero

    The index is by **arrival time** (``time.time_ns()`` when the stream published the
    frames), not by the frames' own timestamps: those may be 0 (unknown), out of order or
    in another clock. Entries are in order of sequence number and (the clock permitting)
    of time; a reader takes the first entry at or after the time asked for.
``NNN.meta``
    The metadata current when the segment was started (the latest METADATA frame of each
    type, in first-seen order), as records of a spool segment (sequence numbers 0, 1, ...).
    Written, and synced to the page cache, before ``NNN.seg`` is created; so a replay from
    any kept point starts with this snapshot, brought up to date by the segment's own
    metadata records before the point.
``lock``
    The process id of the history that has the directory open, under ``flock``.

Bounds: the files of all segments (``.seg``, ``.idx`` and ``.meta``) never add up to more
than ``max_bytes`` after an append; the oldest segment goes first, whole. A segment whose
newest entry is older than ``max_age`` goes too (:meth:`StreamHistory.trim`, called at
every append and by the daemon's timer). A segment holds at most ``segment_size`` bytes
(default ``max_bytes / 8`` up to 64 MiB), so room comes back in steps of an eighth at most.

Restart: :meth:`StreamHistory.open` scans the directory; the last segment is decoded whole,
bytes after its last valid record (a torn write) are cut off, and index entries that point
past it are cut off too. Appends go on after the last record. A segment without a ``.meta``
file (a crash between the two, or deleted by hand) replays with the metadata of its own
records only.

Durability: no ``fsync`` except at :meth:`StreamHistory.close`: a history is a window on the
recent past, not a ledger. A crash of the process loses nothing appended; a power loss can
lose what the kernel had not yet written (the torn tail is cut off at the next open).

A directory removed under an open history (by hand, a disk unmounted) is made again at
the next append, which starts a new segment there; the segments that went with it are
forgotten. Bounds changed while open (:meth:`StreamHistory.set_bounds`, a reload) apply
at once; segments started after the change are sized for the new bound.

Failures: :class:`SpoolLocked` (another history has the directory open),
:class:`SpoolIOError` / :class:`SpoolDiskFull` (an append could not be written: it is cut
off again and the caller counts the frames as dropped), :class:`SpoolClosed`. Corruption in
a kept segment never raises: the reader skips bad records (as the spool's decoder does) and
counts them in :attr:`HistoryReader.frames_missed`.

Threads: appends and trims come from one thread at a time (the daemon's writer task, one
``trio.to_thread`` hop per batch). Readers (:meth:`StreamHistory.reader`) may run in other
threads at the same time: each has its own file descriptors and reads only records the
writer had finished when the reader was made (or, for a reader whose end lies ahead,
records below its end once :attr:`StreamHistory.next_seq` has passed them); the segment list
is guarded by a lock. A segment deleted under a reader (trimmed) stays readable through the
reader's open descriptor; one deleted before the reader reached it is skipped, and its
frames counted in :attr:`HistoryReader.frames_missed`.

Reads: a reader reads whole records from a record boundary, as many of the size it last
met as fit 1 MiB (one record whole when it is larger, up to 8 MiB; a record cut by the end
of a read is read again whole next time), with one ``preadv`` into a buffer of its own
that it reuses; it checks each record there as the segment decoder would (header, order,
payload CRC-32C) and copies it out into ``bytes`` of its own, so every frame it returns owns
its memory and the buffer never leaves the reader. Anything irregular (damage, a torn tail)
and records over 8 MiB go through :class:`SegmentDecoder` as bytes read for it, until the
next record boundary. :meth:`HistoryReader.read_nowait` reads only what the page cache holds
(``RWF_NOWAIT``), for a caller on an event loop; what it cannot read is left to
:meth:`HistoryReader.read`, which waits for the disk (in a worker thread).
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import os
import struct
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

import attrs

from ..frame import Buffer, Frame, FrameBlock
from ..protocols import ProtocolError
from ..protocols.native import HEADER, NativeBlock, NativeEncoder
from ._errors import (
    RecordTooLarge,
    SpoolClosed,
    SpoolDiskFull,
    SpoolError,
    SpoolIOError,
    SpoolLocked,
)
from ._format import (
    DEFAULT_MAX_RECORD_SIZE,
    FLAG_BLOCK,
    FLAG_METADATA,
    RECORD_HEADER_SIZE,
    SEGMENT_APPENDED,
    SEGMENT_HEADER_SIZE,
    Event,
    Record,
    SegmentDecoder,
    SegmentHeader,
    Torn,
    crc32c,
    encode_record,
    frame_of,
    pack_record_header,
    parse_record_header,
    parse_segment_name,
    segment_name,
)

__all__ = [
    "INDEX_ENTRY_SIZE",
    "HistoryReader",
    "HistoryStats",
    "IndexEntry",
    "StreamHistory",
    "decode_index",
    "encode_index_entry",
]

_INDEX: Final = struct.Struct("<QqQ")
INDEX_ENTRY_SIZE: Final = 32
_CRC: Final = struct.Struct("<I")
_MAX_SEGMENT: Final = 64 << 20
_READ_CHUNK: Final = 1 << 20
_IOV_MAX: Final = 1024
#: Records at least this large are read one by one, straight into their own objects (by
#: the segment decoder, after damage, and for records over :data:`_READ_BUFFER_MAX`).
_LARGE_RECORD: Final = 16 << 10
#: A reader's read buffer: each ``preadv`` fills it with whole records from a record
#: boundary, which are checked there and copied out one by one (every frame owns its bytes).
#: Sized to stay in a core's cache (1 MiB of L2 here), reused from read to read.
_READ_BUFFER: Final = 1 << 20
#: The read buffer grows to hold one record whole up to this size; a larger record is read
#: by the segment decoder into memory of its own (a replay does that in a worker thread).
_READ_BUFFER_MAX: Final = 8 << 20
#: ``preadv`` (the module's, so that tests can make a read find its bytes uncached) and the
#: flag with which it fails (EAGAIN), or reads less, rather than wait for the disk.
_preadv: Callable[..., int] = os.preadv
_RWF_NOWAIT: Final[int | None] = getattr(os, "RWF_NOWAIT", None)


# -- the time index, sans-IO ----------------------------------------------------------------


@attrs.frozen
class IndexEntry:
    """One appended batch: its first record's sequence number, its arrival time and where
    that record starts in the segment."""

    seq: int
    time_ns: int
    offset: int


def encode_index_entry(entry: IndexEntry) -> bytes:
    """The 32 bytes of one index entry."""
    body = _INDEX.pack(entry.seq, entry.time_ns, entry.offset)
    return body + _CRC.pack(crc32c(body)) + bytes(4)


def decode_index(data: Buffer) -> list[IndexEntry]:
    """The valid entries at the start of ``data``: decoding stops at the first entry whose
    checksum fails, whose sequence number or offset does not grow, or that is cut short (a
    torn tail). Never raises."""
    entries: list[IndexEntry] = []
    view = memoryview(data)
    for start in range(0, len(view) - INDEX_ENTRY_SIZE + 1, INDEX_ENTRY_SIZE):
        body = view[start : start + _INDEX.size]
        (check,) = _CRC.unpack_from(view, start + _INDEX.size)
        if check != crc32c(bytes(body)) or any(view[start + 28 : start + 32]):
            break
        seq, time_ns, offset = _INDEX.unpack_from(view, start)
        if entries and (seq <= entries[-1].seq or offset <= entries[-1].offset):
            break
        entries.append(IndexEntry(seq, time_ns, offset))
    return entries


def entry_at(entries: Sequence[IndexEntry], time_ns: int) -> int:
    """The index of the first entry that arrived at or after ``time_ns`` (``len(entries)``
    if none did). Entries are searched in order of sequence number; with a clock that went
    back, the first entry at or after the time wins."""
    for index, entry in enumerate(entries):
        if entry.time_ns >= time_ns:
            return index
    return len(entries)


# -- the directory --------------------------------------------------------------------------


@attrs.define
class _Segment:
    first_seq: int
    #: Arrival time of its first and newest batch (0 while it has none).
    first_time: int = 0
    last_time: int = 0
    #: Bytes of its three files.
    nbytes: int = 0
    #: Whether its ``.meta`` file exists (else its start metadata is unknown).
    has_meta: bool = True


#: A record to append: its buffers, its size, its frame.
_Record = tuple[list[Buffer], int, Frame]


@attrs.define
class _Batch:
    """Records appended together (one index entry): the number of the first, the arrival
    time, the records, and how many frames they number."""

    first: int
    arrival: int
    records: list[_Record]
    count: int


@attrs.define
class HistoryStats:
    """What a history holds and has done. ``frames``/``bytes`` are on disk now."""

    segments: int
    bytes: int
    oldest_ns: int
    newest_ns: int
    next_seq: int
    #: Frames numbered from the oldest kept segment's first up to :attr:`next_seq` (frames
    #: the history left out in between, such as those its writer dropped, are counted too).
    frames: int
    frames_appended: int
    segments_dropped: int
    torn_bytes: int


class StreamHistory:
    """A stream's recent frames on disk, time-indexed. See the module docstring.

    Raises :class:`SpoolLocked` from :meth:`open` if another history has the directory,
    :class:`SpoolIOError` if it cannot be created or read.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int,
        max_age_ns: int | None,
        segment_size: int,
        max_record_size: int,
        clock: Callable[[], int],
        run_starts: frozenset[str] = frozenset(),
    ) -> None:
        self.path = path
        #: Metadata types that start a run: the metadata current after one is its own and
        #: what came after it (as the stream's cache keeps it).
        self.run_starts = run_starts
        self.max_bytes = max_bytes
        self.max_age_ns = max_age_ns
        self.segment_size = segment_size
        self.max_record_size = max_record_size
        self._clock = clock
        self._lock = threading.Lock()
        self._segments: list[_Segment] = []
        self._lock_fd = -1
        self._seg_fd = -1
        self._idx_fd = -1
        self._seg_size = 0
        self._idx_size = 0
        self._encoder = NativeEncoder()
        #: The latest metadata frame of each type, first-seen order (for the next ``.meta``).
        self._metadata: dict[str, Frame] = {}
        self._next_seq = 0
        self._closed = False
        self.frames_appended = 0
        self.segments_dropped = 0
        self.torn_bytes = 0
        #: Times the directory was found gone and made again (see :meth:`append`).
        self.directory_lost = 0
        #: The record limit asked for at :meth:`open` (the bound may lower it).
        self._record_limit = max_record_size

    # -- opening ----------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        max_bytes: int,
        max_age: float | None = None,
        segment_size: int | None = None,
        max_record_size: int = DEFAULT_MAX_RECORD_SIZE,
        clock: Callable[[], int] = time.time_ns,
        run_starts: frozenset[str] = frozenset(),
    ) -> StreamHistory:
        """Open (creating it if need be) the history in ``path``, recovering a torn tail.

        ``max_age`` is in seconds (None: bounded by bytes only); ``clock`` gives the arrival
        time in nanoseconds since the epoch (tests pass their own).
        """
        if max_bytes < 4 * SEGMENT_HEADER_SIZE:
            raise ValueError(f"max_bytes {max_bytes} is too small for a history")
        size, record_size = _sizes(max_bytes, segment_size, max_record_size)
        history = cls(
            Path(path),
            max_bytes=max_bytes,
            max_age_ns=None if max_age is None else int(max_age * 1e9),
            segment_size=size,
            max_record_size=record_size,
            clock=clock,
            run_starts=run_starts,
        )
        history._record_limit = max_record_size
        try:
            history._open()
        except OSError as exc:
            history._close_fds()
            raise SpoolIOError(f"history {path}: {exc.strerror or exc}") from exc
        except BaseException:
            history._close_fds()
            raise
        return history

    def _open(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        self._lock_fd = fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise SpoolLocked(
                f"history {self.path}: another history has it open (pid {pid})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        firsts = sorted(
            seq
            for seq in (parse_segment_name(p.name) for p in self.path.iterdir())
            if seq is not None
        )
        for name in self.path.iterdir():
            stem, _dot, ext = name.name.partition(".")
            if ext in ("idx", "meta") and parse_segment_name(f"{stem}.seg") not in firsts:
                name.unlink(missing_ok=True)  # the rest of a segment deleted by hand
        for first in firsts:
            segment = _Segment(first)
            entries = self._read_index(first)
            if entries:
                segment.first_time = entries[0].time_ns
                segment.last_time = entries[-1].time_ns
            segment.has_meta = self._file(first, "meta").exists()
            self._segments.append(segment)
        if self._segments:
            self._recover_last()
        for segment in self._segments:
            segment.nbytes = self._size_of(segment.first_seq)

    def _recover_last(self) -> None:
        """Decode the last segment whole: cut off its torn tail (and index entries past it),
        learn the next sequence number and the metadata current at its end."""
        last = self._segments[-1]
        self._metadata = self._read_meta(last.first_seq)
        decoder = SegmentDecoder(max_record_size=self.max_record_size)
        end = SEGMENT_HEADER_SIZE
        last_seq = last.first_seq - 1
        with open(self._file(last.first_seq, "seg"), "rb") as file:
            while chunk := file.read(_READ_CHUNK):
                for event in decoder.feed(chunk):
                    if isinstance(event, Record):
                        last_seq, end = event.seq, event.offset + event.size
                        self._take_metadata(event)
            for event in decoder.end_of_input():
                if isinstance(event, Torn):
                    self.torn_bytes += event.size
        if decoder.header is None:
            # Not even a header: a segment created by a crash before its first write.
            self._delete(last)
            self._segments.pop()
            self._next_seq = last.first_seq
            return
        seg_path = self._file(last.first_seq, "seg")
        if seg_path.stat().st_size > end:
            os.truncate(seg_path, end)
        entries = [e for e in self._read_index(last.first_seq) if e.offset < end]
        idx_path = self._file(last.first_seq, "idx")
        if idx_path.exists() and idx_path.stat().st_size != len(entries) * INDEX_ENTRY_SIZE:
            os.truncate(idx_path, len(entries) * INDEX_ENTRY_SIZE)
        last.first_time = entries[0].time_ns if entries else 0
        last.last_time = entries[-1].time_ns if entries else 0
        self._next_seq = last_seq + 1
        if entries:
            # Append to it again.
            self._seg_fd = os.open(seg_path, os.O_WRONLY | os.O_APPEND)
            self._idx_fd = os.open(idx_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self._seg_size = end
            self._idx_size = len(entries) * INDEX_ENTRY_SIZE
        else:
            self._delete(last)
            self._segments.pop()

    def _take_metadata(self, record: Record) -> None:
        if record.metadata:
            with contextlib.suppress(ProtocolError):
                frame = frame_of(record)
                _keep_metadata(self._metadata, frame, self.run_starts)

    # -- appending --------------------------------------------------------------------------

    @property
    def next_seq(self) -> int:
        """The sequence number the next frame appended will get."""
        return self._next_seq

    def append(
        self, frames: Sequence[Frame], arrival_ns: int | None = None, *, seq: int | None = None
    ) -> int:
        """Append ``frames`` (one batch: one index entry, arrival ``arrival_ns``, default
        the clock's now); blocks are split. Return the sequence number of the first.

        ``seq`` (at least :attr:`next_seq`) numbers the first frame: the numbers skipped
        stand for frames the history lost on the way in (a reader counts them in
        :attr:`HistoryReader.frames_missed`).

        Rolls to a new segment when the active one is full, or when the directory is gone
        (removed under the history: it is made again, its lost segments forgotten and
        counted in :attr:`directory_lost`), then deletes the oldest
        segments until the files are within ``max_bytes`` and drops segments older than
        ``max_age``. Raises :class:`RecordTooLarge` (nothing written) for a frame over the
        record limit (half of ``max_bytes`` at most), :class:`SpoolDiskFull` or
        :class:`SpoolIOError` if the write failed (it was cut off again; of a batch larger
        than a segment, the chunks written before the failing one stay),
        :class:`SpoolClosed` after :meth:`close`.
        """
        if self._closed:
            raise SpoolClosed(f"history {self.path} is closed")
        now = self._clock() if arrival_ns is None else arrival_ns
        first = self._next_seq if seq is None else max(seq, self._next_seq)
        records, _ = self._records(frames, first)
        if records and self._seg_fd >= 0 and not self.path.is_dir():
            self._close_active()  # the next write rolls, and makes the directory again
        self._append_split(first, now, records)
        return first

    def append_batches(
        self, batches: Sequence[tuple[Sequence[Frame], int, int]]
    ) -> tuple[int, int, SpoolError | None]:
        """Append several batches, each ``(frames, arrival_ns, seq)`` as :meth:`append`
        takes them, with as few writes as the segments allow: the records of consecutive
        batches that fit in the active segment go in one ``writev`` and their index entries
        (one per batch, as ever) in one write. Whether the directory is still there is
        checked once per call.

        Returns the frames written, the frames of the batches that failed, and the error of
        the last failure (None: none). A frame over the record limit fails its own batch; a
        failed write fails the batches written with it (they are cut off again) and the
        ones after go on. Raises :class:`SpoolClosed` after :meth:`close`.
        """
        if self._closed:
            raise SpoolClosed(f"history {self.path} is closed")
        written = failed = 0
        error: SpoolError | None = None
        if self._seg_fd >= 0 and not self.path.is_dir():
            self._close_active()  # the next write rolls, and makes the directory again
        pending: list[_Batch] = []
        pending_size = 0

        def flush() -> None:
            nonlocal written, failed, error, pending_size
            if not pending:
                return
            count = sum(batch.count for batch in pending)
            try:
                self._write_chunk(pending)
            except SpoolError as exc:
                failed, error = failed + count, exc
            else:
                written += count
            pending.clear()
            pending_size = 0

        following = 0  # the number after the last batch taken
        for frames, arrival, seq in batches:
            first = max(seq, self._next_seq, following)
            try:
                records, count = self._records(frames, first)
            except RecordTooLarge as exc:
                failed += sum(frame.nframes for frame in frames)
                error = exc
                continue
            if not records:
                continue
            size = sum(record[1] for record in records)
            if size > self.segment_size:
                flush()
                try:
                    self._append_split(first, arrival, records)
                except SpoolError as exc:
                    failed, error = failed + count, exc
                else:
                    written += count
                following = first + count
                continue
            room = (
                self.segment_size - self._seg_size
                if self._seg_fd >= 0 and self._seg_size > SEGMENT_HEADER_SIZE
                else self.segment_size
            )
            if pending and pending_size + size > room:
                flush()
            pending.append(_Batch(first, arrival, records, count))
            pending_size += size
            following = first + count
        flush()
        self.trim(batches[-1][1] if batches else None)
        return written, failed, error

    def _records(self, frames: Sequence[Frame], first: int) -> tuple[list[_Record], int]:
        """Each frame's record (its buffers, its size, its frame), numbered from ``first``
        (a native block is one record of several frames, one sequence number each; other
        blocks are split), and how many frames they number. Raises
        :class:`RecordTooLarge` for a frame over the record limit."""
        records: list[_Record] = []
        number = first
        for frame in frames:
            parts = (
                [frame]
                if not isinstance(frame, FrameBlock) or _native_block(frame)
                else frame.frames()
            )
            for part in parts:
                buffers: list[Buffer] = []
                if isinstance(part, FrameBlock):
                    wire = part.wire
                    assert wire is not None
                    buffers += (
                        pack_record_header(number, False, len(wire), crc32c(wire), block=True),
                        wire,
                    )
                    size = RECORD_HEADER_SIZE + len(wire)
                else:
                    size = encode_record(number, part, self._encoder, buffers)
                if size > self.max_record_size:
                    raise RecordTooLarge(
                        f"history {self.path}: a frame of {size} bytes is over the record "
                        f"limit of {self.max_record_size}"
                    )
                records.append((buffers, size, part))
                number += part.nframes
        return records, number - first

    def _append_split(self, first: int, now: int, records: list[_Record]) -> None:
        """Write one batch's records, cut into chunks that each fit a segment (each with an
        index entry of its own, the same arrival time), trimming after each."""
        start = 0
        chunk_first = first
        while start < len(records):
            stop, size = start + 1, records[start][1]
            while stop < len(records) and size + records[stop][1] <= self.segment_size:
                size += records[stop][1]
                stop += 1
            chunk = records[start:stop]
            count = sum(part.nframes for _, _, part in chunk)
            self._write_chunk([_Batch(chunk_first, now, chunk, count)])
            self.trim(now)
            chunk_first += count
            start = stop

    def _write_chunk(self, batches: list[_Batch]) -> None:
        """Write ``batches`` (together within one segment) with one ``writev`` and their
        index entries with one write, rolling to a new segment first if they do not fit.
        Raises :class:`SpoolIOError` / :class:`SpoolDiskFull` (all cut off again)."""
        nbytes = sum(size for batch in batches for _, size, _ in batch.records)
        first = batches[0].first
        if self._seg_fd < 0 or (
            self._seg_size > SEGMENT_HEADER_SIZE and self._seg_size + nbytes > self.segment_size
        ):
            self._roll(first, batches[0].arrival)
        segment = self._segments[-1]
        offset = position = self._seg_size
        buffers: list[Buffer] = []
        entries: list[bytes] = []
        for batch in batches:
            entries.append(encode_index_entry(IndexEntry(batch.first, batch.arrival, position)))
            for parts, size, _ in batch.records:
                buffers += parts
                position += size
        try:
            _writev_all(self._seg_fd, buffers)
            _write_all(self._idx_fd, b"".join(entries))
        except OSError as exc:
            self._undo(offset)
            raise _io_error(self.path, "append", exc) from exc
        self._seg_size += nbytes
        self._idx_size += INDEX_ENTRY_SIZE * len(batches)
        last = batches[-1]
        with self._lock:
            if not segment.first_time:
                segment.first_time = batches[0].arrival
            segment.last_time = max(segment.last_time, last.arrival)
            segment.nbytes += nbytes + INDEX_ENTRY_SIZE * len(batches)
            self._next_seq = last.first + last.count
        for batch in batches:
            for _, _, frame in batch.records:
                if frame.is_metadata:
                    _keep_metadata(self._metadata, frame, self.run_starts)
            self.frames_appended += batch.count

    def _undo(self, offset: int) -> None:
        """Cut a failed append off again (the index first: it points into the segment)."""
        with contextlib.suppress(OSError):
            os.ftruncate(self._idx_fd, self._idx_size)
        with contextlib.suppress(OSError):
            os.ftruncate(self._seg_fd, offset)

    def _roll(self, first: int, now: int) -> None:
        """Start segment ``first``: its ``.meta`` (the metadata current now) first, then its
        header. The active segment's files are closed."""
        self._close_active()
        if not self.path.is_dir():
            self._start_again()
        meta: list[Buffer] = [SegmentHeader(SEGMENT_APPENDED, 0).pack()]
        for seq, frame in enumerate(self._metadata.values()):
            encode_record(seq, frame, self._encoder, meta)
        meta_path = self._file(first, "meta")
        header = SegmentHeader(SEGMENT_APPENDED, first).pack()
        try:
            _write_file(meta_path, b"".join(meta))
            self._seg_fd = os.open(
                self._file(first, "seg"), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC, 0o644
            )
            _write_all(self._seg_fd, header)
            self._idx_fd = os.open(
                self._file(first, "idx"), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC, 0o644
            )
        except OSError as exc:
            self._close_active()
            for ext in ("seg", "idx", "meta"):
                self._file(first, ext).unlink(missing_ok=True)
            raise _io_error(self.path, "start a segment", exc) from exc
        self._seg_size = SEGMENT_HEADER_SIZE
        self._idx_size = 0
        segment = _Segment(first, nbytes=SEGMENT_HEADER_SIZE + sum(map(len, meta)))
        with self._lock:
            self._segments.append(segment)

    def set_bounds(
        self, *, max_bytes: int, max_age: float | None, now_ns: int | None = None
    ) -> int:
        """Bound the history anew (a reload): ``max_bytes`` and ``max_age`` (seconds, None:
        by bytes only) as :meth:`open` takes them. Segments started from now on are sized
        for the new bound; what the new bounds no longer allow goes at once (oldest first;
        the active segment stays until the next roll, as ever). Returns how many segments
        went (``now_ns``: the arrival clock's now, default the history's clock). Call it
        from the thread that appends. Raises ValueError for a ``max_bytes`` :meth:`open`
        would refuse (nothing changes then)."""
        if max_bytes < 4 * SEGMENT_HEADER_SIZE:
            raise ValueError(f"max_bytes {max_bytes} is too small for a history")
        self.max_bytes = max_bytes
        self.max_age_ns = None if max_age is None else int(max_age * 1e9)
        self.segment_size, self.max_record_size = _sizes(max_bytes, None, self._record_limit)
        return self.trim(now_ns)

    def _start_again(self) -> None:
        """The directory went (removed by hand, an unmounted disk): forget the segments that
        went with it (readers count their frames as missed) and make it again, locked, so
        the history goes on from the next frame. Raises OSError if it cannot be made."""
        with self._lock:
            self.segments_dropped += len(self._segments)
            self._segments.clear()
        self.directory_lost += 1
        if self._lock_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = -1
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        self._lock_fd = fd
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    def trim(self, now_ns: int | None = None) -> int:
        """Delete the oldest segments while the files pass ``max_bytes`` (never the active
        one) and every segment whose newest batch is older than ``max_age``. Return how many
        went."""
        now = self._clock() if now_ns is None else now_ns
        dropped = 0
        while True:
            with self._lock:
                segments = self._segments
                if not segments:
                    break
                oldest = segments[0]
                total = sum(s.nbytes for s in segments)
                active = self._seg_fd >= 0 and oldest is segments[-1]
                too_old = self.max_age_ns is not None and oldest.last_time < now - self.max_age_ns
                if not too_old and (total <= self.max_bytes or active):
                    break
                segments.pop(0)
            if active:
                self._close_active()
            self._delete(oldest)
            self.segments_dropped += 1
            dropped += 1
        return dropped

    # -- reading ----------------------------------------------------------------------------

    @property
    def oldest_ns(self) -> int:
        """Arrival time of the oldest batch kept (0: nothing kept)."""
        with self._lock:
            return next((s.first_time for s in self._segments if s.first_time), 0)

    @property
    def newest_ns(self) -> int:
        """Arrival time of the newest batch kept (0: nothing kept)."""
        with self._lock:
            return max((s.last_time for s in self._segments), default=0)

    def reader(self, since_ns: int, end_seq: int | None = None) -> HistoryReader:
        """A reader of the frames that arrived at or after ``since_ns`` and have a sequence
        number below ``end_seq`` (default: :attr:`next_seq` now). A ``since_ns`` before the
        oldest frame kept starts at the oldest (:attr:`HistoryReader.clamped`); one after
        the newest gives no frames, only the metadata current at the end.

        The reader first returns the metadata current at its start, then the frames."""
        if self._closed:
            raise SpoolClosed(f"history {self.path} is closed")
        with self._lock:
            segments = [attrs.evolve(s) for s in self._segments]
            end = self._next_seq if end_seq is None else end_seq
            metadata_now = list(self._metadata.values())
        return HistoryReader(self, segments, since_ns, end, metadata_now)

    def reader_from(self, seq: int, end_seq: int) -> HistoryReader:
        """A reader of the frames numbered from ``seq`` up to ``end_seq``, without the
        metadata prefix (for a reader that goes on where another stopped). Frames of the
        range no longer kept are counted in :attr:`HistoryReader.frames_missed`."""
        if self._closed:
            raise SpoolClosed(f"history {self.path} is closed")
        with self._lock:
            segments = [attrs.evolve(s) for s in self._segments]
        return HistoryReader(self, segments, 0, end_seq, [], from_seq=seq)

    def stats(self) -> HistoryStats:
        with self._lock:
            segments = list(self._segments)
        next_seq = self._next_seq
        return HistoryStats(
            segments=len(segments),
            bytes=sum(s.nbytes for s in segments),
            oldest_ns=self.oldest_ns,
            newest_ns=self.newest_ns,
            next_seq=next_seq,
            frames=next_seq - segments[0].first_seq if segments else 0,
            frames_appended=self.frames_appended,
            segments_dropped=self.segments_dropped,
            torn_bytes=self.torn_bytes,
        )

    # -- closing ----------------------------------------------------------------------------

    def close(self) -> None:
        """Sync and close the active segment and release the directory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for fd in (self._seg_fd, self._idx_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.fdatasync(fd)
        self._close_fds()

    def __enter__(self) -> StreamHistory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- files ------------------------------------------------------------------------------

    def _file(self, first: int, ext: str) -> Path:
        return self.path / f"{segment_name(first)[:-4]}.{ext}"

    def _size_of(self, first: int) -> int:
        total = 0
        for ext in ("seg", "idx", "meta"):
            with contextlib.suppress(OSError):
                total += self._file(first, ext).stat().st_size
        return total

    def _read_index(self, first: int) -> list[IndexEntry]:
        try:
            return decode_index(self._file(first, "idx").read_bytes())
        except OSError:
            return []

    def _read_meta(self, first: int) -> dict[str, Frame]:
        frames: dict[str, Frame] = {}
        try:
            data = self._file(first, "meta").read_bytes()
        except OSError:
            return frames
        decoder = SegmentDecoder(max_record_size=self.max_record_size)
        for event in decoder.feed(data):
            if isinstance(event, Record):
                with contextlib.suppress(ProtocolError):
                    frame = frame_of(event)
                    frames[frame.type] = frame
        return frames

    def _delete(self, segment: _Segment) -> None:
        # The segment first: a crash then leaves only an index and a meta file, removed at
        # the next open.
        for ext in ("seg", "idx", "meta"):
            with contextlib.suppress(OSError):
                self._file(segment.first_seq, ext).unlink()

    def _close_active(self) -> None:
        for fd in (self._seg_fd, self._idx_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._seg_fd = self._idx_fd = -1
        self._seg_size = self._idx_size = 0

    def _close_fds(self) -> None:
        self._close_active()
        if self._lock_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = -1


class HistoryReader:
    """Reads a history from a time on (see :meth:`StreamHistory.reader`). Synchronous; one
    call at a time; may run in another thread than the writer's.

    :meth:`read` returns ``(arrival_ns, frame)`` pairs: first the metadata current at the
    start (arrival: the start's), then the frames in order; an empty list at the end.
    """

    def __init__(
        self,
        history: StreamHistory,
        segments: list[_Segment],
        since_ns: int,
        end_seq: int,
        metadata_now: list[Frame],
        *,
        from_seq: int | None = None,
    ) -> None:
        self._history = history
        self.end_seq = end_seq
        #: Set when the time asked for was before the oldest frame kept: the reader starts
        #: at the oldest instead (its arrival time here).
        self.clamped: int | None = None
        #: Frames in the range read that it could not return: lost on the way in (the
        #: writer was behind or a write failed), corrupt on disk, or in a segment deleted
        #: (trimmed) before the reader reached it.
        self.frames_missed = 0
        self._segments = [s for s in segments if s.first_seq < end_seq]
        self._pending: list[tuple[int, Frame]] = []
        #: Reads that found their bytes not in the page cache (or could not tell: no
        #: ``RWF_NOWAIT`` here), so :meth:`read_nowait` left them to :meth:`read`.
        self.uncached_reads = 0
        #: Set after damage: the segment decoder reads bytewise (see :meth:`_irregular`)
        #: until the next record boundary; None while whole records are read in place.
        self._decoder: SegmentDecoder | None = None
        self._file: int = -1
        self._position = 0
        #: The sequence number of the last record read (whole-record reads check order).
        self._last_seq = -1
        #: The record size the next whole-record read expects: that of the record the last
        #: one cut short, else of the last record it read. It reads as many of that size as
        #: fill the buffer (at least one): a stream's records tend to be alike, so a read
        #: ends on a record boundary rather than cut a record that must be read again.
        self._need = 0
        self._buffer = bytearray()
        #: Whether this read may only take what the page cache holds (:meth:`read_nowait`).
        self._nowait = False
        #: Whether the kernel reads this history's files with RWF_NOWAIT (else never tried).
        self._nowait_works = _RWF_NOWAIT is not None
        self._entries: list[IndexEntry] = []
        self._entry = 0
        self._time = 0
        self._next = end_seq  # the sequence number expected next
        self._done = False
        #: The sequence number and arrival time of the first frame returned (end_seq and
        #: 0 when there is none).
        self.start_seq = end_seq
        self.start_ns = 0
        self._from = -1
        self._large = False
        if from_seq is None:
            self._start(since_ns, metadata_now)
        else:
            self._start_at(from_seq)

    def _start_at(self, seq: int) -> None:
        segments = self._segments
        # The last segment that starts at or before seq (or the first one).
        while len(segments) > 1 and segments[1].first_seq <= seq:
            segments.pop(0)
        if not segments or seq >= self.end_seq:
            self._done = True
            self.frames_missed += max(0, self.end_seq - seq)
            return
        segment = segments[0]
        entries = self._history._read_index(segment.first_seq)
        before = [entry for entry in entries if entry.seq <= seq]
        start = before[-1] if before else (entries[0] if entries else None)
        fd = self._open(segment) if start is not None else -1
        if start is None or fd < 0:
            self._next = seq  # read() moves on to the next segment (no file open)
            return
        if start.seq > seq:
            self.frames_missed += start.seq - seq
        self._from = seq
        self.start_seq, self.start_ns = max(seq, start.seq), start.time_ns
        self._entries, self._entry = entries, entries.index(start)
        self._file = fd
        self._begin(start.offset, start.seq - 1)
        self._next = start.seq

    def _start(self, since_ns: int, metadata_now: list[Frame]) -> None:
        history = self._history
        segments = self._segments
        while segments and not segments[0].first_time:
            segments.pop(0)  # nothing indexed: nothing to replay from it
        if segments and since_ns < segments[0].first_time:
            self.clamped = segments[0].first_time
        # The segment to start in: the first whose newest batch is at or after since_ns.
        lasts = [s.last_time for s in segments]
        index = (
            bisect.bisect_left(lasts, since_ns)
            if lasts == sorted(lasts)
            else next((i for i, t in enumerate(lasts) if t >= since_ns), len(lasts))
        )
        del segments[:index]
        while segments:
            segment = segments[0]
            entries = history._read_index(segment.first_seq)
            at = entry_at(entries, since_ns)
            if at < len(entries) and entries[at].seq < self.end_seq:
                break
            segments.pop(0)
        if not segments:
            # Nothing at or after since_ns below end_seq: the metadata now, no frames.
            self._pending = [(since_ns, frame) for frame in metadata_now]
            self._done = True
            return
        metadata = history._read_meta(segment.first_seq)
        start = entries[at]
        self.start_seq, self.start_ns = start.seq, start.time_ns
        self._entries, self._entry = entries, at
        # Bring the snapshot up to date with the segment's metadata before the start.
        fd = self._open(segment)
        if fd < 0:
            self._pending = [(start.time_ns, frame) for frame in metadata_now]
            self._done = True
            return
        if start.offset > SEGMENT_HEADER_SIZE:
            decoder = SegmentDecoder(max_record_size=history.max_record_size)
            position = 0
            while position < start.offset:
                chunk = os.pread(fd, min(_READ_CHUNK, start.offset - position), position)
                if not chunk:
                    break
                position += len(chunk)
                for event in decoder.feed(chunk):
                    if isinstance(event, Record) and event.metadata:
                        with contextlib.suppress(ProtocolError):
                            frame = frame_of(event)
                            _keep_metadata(metadata, frame, history.run_starts)
        self._pending = [(start.time_ns, frame) for frame in metadata.values()]
        self._file = fd
        self._begin(start.offset, start.seq - 1)
        self._next = start.seq

    def _open(self, segment: _Segment) -> int:
        try:
            return os.open(self._history._file(segment.first_seq, "seg"), os.O_RDONLY)
        except FileNotFoundError:
            return -1

    def _begin(self, offset: int, last_seq: int) -> None:
        """Read on from ``offset``, a record boundary after record ``last_seq``."""
        self._position = offset
        self._last_seq = last_seq
        self._need = 0
        self._decoder = None

    def read(self, max_frames: int = 1024, max_bytes: int = 4 << 20) -> list[tuple[int, Frame]]:
        """The next frames (at least one unless the reader is at its end): ``(arrival_ns,
        frame)`` pairs. Raises :class:`SpoolIOError` if a read failed."""
        out = self._read(max_frames, max_bytes, nowait=False)
        assert out is not None
        return out

    def read_nowait(
        self, max_frames: int = 1024, max_bytes: int = 4 << 20
    ) -> list[tuple[int, Frame]] | None:
        """As :meth:`read`, but for a caller on an event loop: it never waits for the disk
        (``preadv`` with ``RWF_NOWAIT``: only what the page cache holds) and opens no file.
        Returns the frames read before a read would have waited (at least one, or the empty
        list at the end), or None if it could read nothing so: then :meth:`read` (in a
        worker thread) reads on from the same place. Always None where the kernel cannot
        read without waiting (no ``RWF_NOWAIT``, or a filesystem that refuses it). Raises
        :class:`SpoolIOError` if a read failed."""
        return self._read(max_frames, max_bytes, nowait=True)

    def _read(
        self, max_frames: int, max_bytes: int, *, nowait: bool
    ) -> list[tuple[int, Frame]] | None:
        out = self._pending
        self._pending = []
        size = sum(frame.size for _, frame in out)
        self._nowait = nowait
        try:
            while not self._done and len(out) < max_frames and size < max_bytes:
                size += self._read_some(out, max_frames - len(out))
        except _WouldBlock:
            if not out:
                return None
        except OSError as exc:
            raise _io_error(self._history.path, "read", exc) from exc
        finally:
            self._nowait = False
        return out

    def _read_some(self, out: list[tuple[int, Frame]], room: int) -> int:
        if self._file < 0:
            self._next_segment_now()
            return 0
        events = self._read_records() if self._decoder is None else self._read_bytewise()
        if events is None:
            self._next_segment_now()
            return 0
        size = 0
        entries = self._entries
        for event in events:
            if not isinstance(event, Record):
                continue
            self._large = len(event.payload) >= _LARGE_RECORD
            if event.seq >= self.end_seq:
                self._done = True
                break
            if event.seq < self._from:
                self._next = event.seq + 1
                continue
            if event.seq != self._next:
                self.frames_missed += event.seq - self._next
            self._next = event.seq + 1
            while self._entry + 1 < len(entries) and entries[self._entry + 1].seq <= event.seq:
                self._entry += 1
            try:
                frame = _block_of(event) if event.block else frame_of(event)
            except ProtocolError:
                # A block's other frames are counted from the gap to the next record.
                self.frames_missed += 1
                continue
            self._next = event.seq + frame.nframes
            arrival = entries[self._entry].time_ns if entries else self.start_ns
            out.append((arrival, frame))
            size += frame.size
        if self._next >= self.end_seq:
            self._done = True
        return max(size, 1)

    def _read_records(self) -> list[Event] | None:
        """Whole records from :attr:`_position` on, read into the read buffer with one
        ``preadv`` and checked there (header, order, payload CRC-32C) as the segment decoder
        checks them; each valid record's payload is copied out into ``bytes`` of its own. A
        record the read cut short is read again whole next time; anything irregular is left
        to the decoder (:meth:`_irregular`). None at the end of the file (or inside a record
        there: a torn tail, which the next segment's numbers account for)."""
        start = self._position
        if self._need > _READ_BUFFER_MAX:
            # Too large for the buffer: the decoder reads it into memory of its own.
            self._decoder = SegmentDecoder(
                max_record_size=self._history.max_record_size,
                offset=start,
                last_seq=self._last_seq,
            )
            return self._read_bytewise()
        need = self._need
        # A whole number of records of the size expected fills the buffer: a stream of
        # records alike is read with no record cut (and read again) at the end of a read.
        view = self._view(max(need, _READ_BUFFER // need * need) if need else _READ_BUFFER)
        got = self._fill(view, start)
        if not got:
            return None
        events: list[Event] = []
        pos, last = 0, self._last_seq
        limit = self._history.max_record_size
        while got - pos >= RECORD_HEADER_SIZE:
            header = parse_record_header(view, pos, max_record_size=limit)
            if header is None or header.seq <= last:
                return self._irregular(events, view[pos:got], start + pos, last)
            seq, flags, length = header.seq, header.flags, header.length
            end = pos + RECORD_HEADER_SIZE + length
            if end > got:
                need = end - pos
                break
            payload = bytes(view[pos + RECORD_HEADER_SIZE : end])
            if crc32c(payload) != header.payload_crc:
                return self._irregular(events, view[pos:got], start + pos, last)
            events.append(
                Record(seq, flags == FLAG_METADATA, payload, start + pos, flags == FLAG_BLOCK)
            )
            last, need, pos = seq, end - pos, end
        if not events and got < len(view):
            if self._nowait:
                raise _WouldBlock  # perhaps only the rest is not cached: read() tells
            return None  # the file ends inside a record
        self._position, self._last_seq, self._need = start + pos, last, need
        return events

    def _irregular(
        self, events: list[Event], rest: memoryview, offset: int, last_seq: int
    ) -> list[Event]:
        """``rest`` (at ``offset``, after record ``last_seq``) does not start with the next
        valid record: from there the segment decoder reads bytewise, as it reads any damage
        (it finds the next valid record and skips what lies between), until the next record
        boundary; then whole-record reads go on. ``events``: the records before it."""
        self._decoder = SegmentDecoder(
            max_record_size=self._history.max_record_size, offset=offset, last_seq=last_seq
        )
        events += self._decoder.feed(bytes(rest))
        self._position = offset + len(rest)
        self._settle()
        return events

    def _read_bytewise(self) -> list[Event] | None:
        """The next bytes through the segment decoder: large records as it asks (header,
        then exactly the payload, which it keeps without a copy when read into memory of its
        own), small ones a chunk at a time. None at the end of the file."""
        decoder = self._decoder
        assert decoder is not None
        want = decoder.wanted()
        size = want if self._large or want >= _LARGE_RECORD else _READ_CHUNK
        if not self._nowait:
            chunk = os.pread(self._file, size, self._position)
        else:
            if size > _READ_BUFFER_MAX:
                raise _WouldBlock  # read() reads it into memory of its own
            view = self._view(size)
            chunk = bytes(view[: self._fill(view, self._position)])
        if not chunk:
            return None
        events = decoder.feed(chunk)
        # Read on from where the decoder's consumed bytes end (it keeps a partial record).
        self._position += len(chunk)
        self._settle()
        return events

    def _settle(self) -> None:
        """Back to whole-record reads once the decoder stands at a record boundary with
        nothing buffered and no damage open (its offset is the end of its last record)."""
        decoder = self._decoder
        if decoder is not None and decoder.offset == decoder.good_end:
            self._begin(decoder.offset, decoder.last_seq)

    def _view(self, size: int) -> memoryview:
        """The first ``size`` bytes of the read buffer (grown to hold them)."""
        if len(self._buffer) < size:
            self._buffer = bytearray(size)
        return memoryview(self._buffer)[:size]

    def _fill(self, view: memoryview, offset: int) -> int:
        """Read the file into ``view`` from ``offset``; how many bytes came (0: its end).
        In :meth:`read_nowait`, only what the page cache holds, perhaps less than asked;
        raises :class:`_WouldBlock` if that is nothing (and records it)."""
        if not self._nowait:
            return _preadv(self._file, [view], offset)
        if not self._nowait_works or _RWF_NOWAIT is None:
            self.uncached_reads += 1
            raise _WouldBlock
        try:
            return _preadv(self._file, [view], offset, _RWF_NOWAIT)
        except BlockingIOError:
            self.uncached_reads += 1
            raise _WouldBlock from None
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            self._nowait_works = False  # a filesystem that cannot: read() reads all
            self.uncached_reads += 1
            raise _WouldBlock from None

    def _next_segment_now(self) -> None:
        if self._nowait:
            raise _WouldBlock  # it opens a file and reads its index
        self._next_segment()

    def _next_segment(self) -> None:
        if self._file >= 0:
            os.close(self._file)
            self._file = -1
        self._segments.pop(0)
        while self._segments:
            segment = self._segments[0]
            fd = self._open(segment)
            if fd < 0:
                # Trimmed before the reader reached it.
                after = self._segments[1].first_seq if len(self._segments) > 1 else self.end_seq
                self.frames_missed += max(0, min(after, self.end_seq) - segment.first_seq)
                self._segments.pop(0)
                continue
            if segment.first_seq > self._next:
                self.frames_missed += segment.first_seq - self._next
            self._file = fd
            self._entries = self._history._read_index(segment.first_seq)
            self._entry = 0
            self._next = segment.first_seq
            self._begin(SEGMENT_HEADER_SIZE, segment.first_seq - 1)
            return
        self._decoder = None
        if self._next < self.end_seq:
            # The rest was not (yet) on disk when the reader was made: the caller waited
            # for the writer, so it was dropped (or trimmed) on the way.
            self.frames_missed += self.end_seq - self._next
        self._done = True

    def close(self) -> None:
        if self._file >= 0:
            with contextlib.suppress(OSError):
                os.close(self._file)
            self._file = -1
        self._done = True
        self._buffer = bytearray()

    def __enter__(self) -> HistoryReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _WouldBlock(Exception):
    """A :meth:`HistoryReader.read_nowait` read would wait for the disk (or open a file)."""


def _sizes(max_bytes: int, segment_size: int | None, max_record_size: int) -> tuple[int, int]:
    """The segment size (``segment_size``, or an eighth of ``max_bytes`` up to 64 MiB; a
    quarter at most) and the record limit (half of ``max_bytes`` at most) for a bound."""
    size = segment_size or min(_MAX_SEGMENT, max(max_bytes // 8, 4096))
    size = max(SEGMENT_HEADER_SIZE * 2, min(size, max_bytes // 4))
    return size, min(max_record_size, max_bytes // 2)


def _keep_metadata(metadata: dict[str, Frame], frame: Frame, run_starts: frozenset[str]) -> None:
    """Keep ``frame`` as the latest of its type; a type that starts a run retires the rest."""
    if frame.type in run_starts:
        metadata.clear()
    metadata[frame.type] = frame


def _native_block(frame: FrameBlock) -> bool:
    """Whether ``frame`` is kept as one BLOCK record: a native block (its wire is native
    DATA frames back to back, as :class:`~framewire.protocols.native.NativeBlock` holds)."""
    return frame.wire_protocol == "native" and frame.wire is not None


def _block_of(record: Record) -> FrameBlock:
    """The native block a BLOCK record holds. Raises :class:`ProtocolError` unless its
    payload is DATA frames of one type without headers or flags, back to back, exactly."""
    wire = record.payload
    unpack = HEADER.unpack_from
    position, end, count = 0, len(wire), 0
    type_raw = b""
    timestamp = 0
    while position < end:
        if end - position < 28:
            raise ProtocolError(f"record {record.seq}: a block that ends inside a header")
        magic, version, kind, type_len, flags, headers, _, payload_len, stamp = unpack(
            wire, position
        )
        raw = wire[position + 28 : position + 28 + type_len]
        if count == 0:
            type_raw, timestamp = raw, stamp
        if magic != b"FW" or version != 1 or kind or flags or headers or raw != type_raw:
            raise ProtocolError(f"record {record.seq}: a block holds a frame it may not")
        position += 28 + type_len + payload_len
        count += 1
    if position != end or not count:
        raise ProtocolError(f"record {record.seq}: a block's frames do not add up")
    try:
        type_tag = type_raw.decode()
    except UnicodeDecodeError:
        raise ProtocolError(f"record {record.seq}: a type that is not UTF-8") from None
    return NativeBlock(type_tag, wire, count, timestamp)


def _writev_all(fd: int, buffers: list[Buffer]) -> None:
    """Write ``buffers`` in order with as few ``writev`` calls as the kernel allows."""
    views = [memoryview(buffer).cast("B") for buffer in buffers]
    index = 0
    while index < len(views):
        written = os.writev(fd, views[index : index + _IOV_MAX])
        while written:
            view = views[index]
            if written >= len(view):
                written -= len(view)
                index += 1
            else:
                views[index] = view[written:]
                written = 0
        while index < len(views) and not len(views[index]):
            index += 1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)


def _io_error(path: Path, what: str, exc: OSError) -> SpoolIOError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return SpoolDiskFull(f"history {path}: cannot {what}: the disk is full")
    return SpoolIOError(f"history {path}: cannot {what}: {exc.strerror or exc}")
