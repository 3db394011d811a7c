""":class:`DiskQueue`: the spool's file I/O, over the sans-IO format of :mod:`._format`.

Synchronous plain Python (``os.writev``, ``os.pread``, ``fcntl.flock``). Not thread-safe:
one call at a time (the daemon runs a whole batch of calls in one ``trio.to_thread`` hop).
See the package docstring for the format and the guarantees.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections import deque
from collections.abc import Iterable
from types import TracebackType
from typing import Final, Literal

import attrs

from ..frame import Buffer, Frame, FrameBlock
from ..protocols import ProtocolError
from ..protocols.native import NativeEncoder
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
    POSITION_FILE_SIZE,
    POSITION_SLOT_OFFSETS,
    POSITION_SLOT_SIZE,
    RECORD_HEADER_SIZE,
    SEGMENT_APPENDED,
    SEGMENT_CARRIED,
    SEGMENT_HEADER_SIZE,
    Event,
    Record,
    SegmentDecoder,
    SegmentHeader,
    Torn,
    crc32c,
    decode_position,
    encode_position,
    encode_record,
    frame_of,
    pack_record_header,
    parse_record_header,
    parse_segment_name,
    segment_name,
)

__all__ = ["DEFAULT_SEGMENT_SIZE", "DiskQueue", "SpoolStats", "SyncPolicy", "WhenFull"]

SyncPolicy = Literal["none", "batch", "interval"]
WhenFull = Literal["block", "drop_oldest"]

DEFAULT_SEGMENT_SIZE: Final = 64 * 1024 * 1024
#: A segment is at most this share of ``max_size`` (so a drop or a deletion frees room in
#: steps of at most an eighth of the queue).
SEGMENT_SHARE: Final = 8
#: The smallest segment size (the header and a few records).
MIN_SEGMENT_SIZE: Final = 4096
LOCK_FILE: Final = "lock"
POSITION_FILE: Final = "position"
#: Buffers per writev (Linux's IOV_MAX is 1024) and bytes per writev.
_IOV_MAX: Final = 1024
_WRITE_CHUNK: Final = 16 * 1024 * 1024
#: Records from this size on are read exactly (a header, then the payload into its own
#: bytes object); smaller ones in chunks of _READ_AHEAD.
_LARGE_RECORD: Final = 32 * 1024
_READ_AHEAD: Final = 256 * 1024
_FULL_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT})


@attrs.frozen
class SpoolStats:
    """A snapshot of a queue's counters (the status and metrics of a disk buffer)."""

    #: Frames in the queue not yet committed (frames handed out by read_batch included).
    frames: int
    #: Bytes of segment files on disk (what ``max_size`` bounds).
    bytes: int
    max_bytes: int
    segments: int
    #: DATA frames dropped by ``when_full = "drop_oldest"`` since the queue was opened.
    dropped_frames: int
    #: Regions of bad bytes skipped (each a run of corrupt or unreadable records).
    corrupt_regions: int
    corrupt_bytes: int
    #: Records known lost in those regions (from the gaps in the sequence numbers).
    corrupt_records: int
    #: Bytes of a torn last record cut off when the queue was opened.
    torn_bytes: int
    #: Whether the position file was missing or unreadable when the queue was opened, so
    #: delivery restarted at the oldest frame on disk (frames delivered before may come
    #: again).
    position_lost: bool


class _Segment:
    __slots__ = ("end_seq", "first_seq", "indexed", "kind", "last_record", "meta", "path", "size")

    def __init__(self, path: str, first_seq: int, kind: int, size: int) -> None:
        self.path = path
        self.first_seq = first_seq
        self.kind = kind
        self.size = size
        #: Carried segments: the end of the range they stand for; appended: unused (0).
        self.end_seq = 0
        #: Carried segments: the last record's sequence number (-1: none).
        self.last_record = -1
        #: Metadata records written or scanned in this run: (seq, offset, size).
        self.meta: list[tuple[int, int, int]] = []
        #: Whether ``meta`` lists every metadata record of the segment.
        self.indexed = False


class _Reader:
    """Where the read cursor is: a segment, an open file, a decoder and its events."""

    __slots__ = ("decoder", "events", "fd", "offset", "segment", "small")

    def __init__(self, segment: _Segment, fd: int, offset: int, decoder: SegmentDecoder) -> None:
        self.segment = segment
        self.fd = fd
        self.offset = offset
        self.decoder = decoder
        self.events: deque[Event] = deque()
        #: Whether the last record was small: then read ahead in chunks (payloads are
        #: copied out of them); else read each header and each payload exactly.
        self.small = True


class DiskQueue:
    """A write-ahead queue of frames in segment files under one directory.

    Open it with :meth:`open`; see the package docstring (:mod:`framewire.spool`) for the
    format, the guarantees and how failures surface.
    """

    def __init__(self) -> None:  # use DiskQueue.open()
        self._closed = True

    # -- opening and closing ----------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        max_size: int,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
        when_full: WhenFull = "block",
        sync: SyncPolicy = "interval",
        sync_interval: float = 1.0,
        max_record_size: int = DEFAULT_MAX_RECORD_SIZE,
    ) -> DiskQueue:
        """Open (creating it if needed) the queue in directory ``path`` and recover it.

        ``segment_size`` is clamped to at most ``max_size / 8``. Raises
        :class:`SpoolLocked` if another queue has the directory open, :class:`SpoolIOError`
        if it cannot be created, read or written, ValueError for bad settings.
        """
        if when_full not in ("block", "drop_oldest"):
            raise ValueError(f"when_full must be 'block' or 'drop_oldest', not {when_full!r}")
        if sync not in ("none", "batch", "interval"):
            raise ValueError(f"sync must be 'none', 'batch' or 'interval', not {sync!r}")
        if sync_interval <= 0:
            raise ValueError("sync_interval must be positive")
        if max_record_size <= 0:
            raise ValueError("max_record_size must be positive")
        if max_size < 4 * MIN_SEGMENT_SIZE:
            raise ValueError(f"max_size must be at least {4 * MIN_SEGMENT_SIZE} bytes")
        queue = cls()
        queue._setup(
            os.fspath(path),
            max_size=max_size,
            segment_size=max(MIN_SEGMENT_SIZE, min(segment_size, max_size // SEGMENT_SHARE)),
            when_full=when_full,
            sync=sync,
            sync_interval=sync_interval,
            max_record_size=max_record_size,
        )
        return queue

    def _setup(
        self,
        directory: str,
        *,
        max_size: int,
        segment_size: int,
        when_full: WhenFull,
        sync: SyncPolicy,
        sync_interval: float,
        max_record_size: int,
    ) -> None:
        self.directory = directory
        self.max_size = max_size
        self.segment_size = segment_size
        self.when_full: WhenFull = when_full
        self.sync_policy: SyncPolicy = sync
        self.sync_interval = sync_interval
        self.max_record_size = max_record_size
        self._encoder = NativeEncoder()
        self._segments: list[_Segment] = []
        self._wfd = -1
        self._lock_fd = -1
        self._pos_fd = -1
        self._generation = 0
        self._next_seq = 0
        self._committed = 0
        self._read_last = -1
        self._ready: deque[tuple[int, Frame]] = deque()
        self._returned = 0
        self._reader: _Reader | None = None
        self._frames = 0
        self._dropped = 0
        self._corrupt_regions = 0
        self._corrupt_bytes = 0
        self._corrupt_records = 0
        self._torn_bytes = 0
        self._position_lost = False
        self._last_sync = time.monotonic()
        self._dirty = False
        self._closed = False
        try:
            self._recover()
        except OSError as exc:
            self._close_files()
            self._closed = True
            raise self._error(exc, "cannot open the queue") from None
        except BaseException:
            self._close_files()
            self._closed = True
            raise

    def close(self) -> None:
        """Sync (unless ``sync = "none"``) and close the files. Frames handed out and not
        committed are delivered again by the next queue opened on the directory."""
        if self._closed:
            return
        try:
            if self.sync_policy != "none":
                self.sync()
        finally:
            self._closed = True
            self._close_files()

    def __enter__(self) -> DiskQueue:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- what the caller sees ---------------------------------------------------------------

    @property
    def frames(self) -> int:
        """Frames in the queue that are not committed."""
        return self._frames

    @property
    def bytes(self) -> int:
        """Bytes of segment files on disk."""
        return sum(segment.size for segment in self._segments)

    def stats(self) -> SpoolStats:
        return SpoolStats(
            frames=self._frames,
            bytes=self.bytes,
            max_bytes=self.max_size,
            segments=len(self._segments),
            dropped_frames=self._dropped,
            corrupt_regions=self._corrupt_regions,
            corrupt_bytes=self._corrupt_bytes,
            corrupt_records=self._corrupt_records,
            torn_bytes=self._torn_bytes,
            position_lost=self._position_lost,
        )

    # -- appending --------------------------------------------------------------------------

    def append(self, frames: Iterable[Frame]) -> int:
        """Write ``frames`` (in order) to the queue; return how many were taken.

        All of them, unless the queue is full: with ``when_full = "block"`` the frames that
        do not fit are left to the caller (wait for a :meth:`commit` to free room, then
        append the rest); with ``"drop_oldest"`` the oldest DATA frames are dropped first
        (whole segments; their metadata is kept), and frames are left only when nothing
        more can be dropped. A :class:`~framewire.frame.FrameBlock` counts as its frames.

        Raises :class:`RecordTooLarge` (before writing anything) for a frame whose record
        is over ``max_record_size`` or could never fit within ``max_size``, ValueError for
        a frame the native format cannot encode, :class:`SpoolDiskFull` or
        :class:`SpoolIOError` if a write fails: the frames of this call are then cut off
        again (none of them will be delivered); frames dropped to make room stay dropped.
        """
        self._check_open()
        batch: list[Frame] = []
        for frame in frames:
            if isinstance(frame, FrameBlock):
                batch += frame.frames()
            else:
                batch.append(frame)
        if not batch:
            return 0
        records: list[tuple[list[Buffer], int, bool]] = []
        seq = self._next_seq
        limit = min(self.max_record_size + RECORD_HEADER_SIZE, self.max_size // 2)
        for frame in batch:
            parts: list[Buffer] = []
            size = encode_record(seq, frame, self._encoder, parts)
            if size > limit:
                raise RecordTooLarge(
                    f"spool {self.directory}: a {size}-byte record is over the largest this "
                    f"queue takes ({limit} bytes: max_record_size, or half of max_size)"
                )
            records.append((parts, size, frame.is_metadata))
            seq += 1
        return self._write(records)

    def _write(self, records: list[tuple[list[Buffer], int, bool]]) -> int:
        start_count = len(self._segments)
        start_active = self._segments[-1]
        start_size = start_active.size
        start_seq = self._next_seq
        taken = 0
        try:
            iov: list[Buffer] = []
            iov_bytes = 0
            iov_records = 0
            used = self.bytes
            for parts, size, metadata in records:
                active = self._segments[-1]
                if used + iov_bytes + size > self.max_size:
                    self._flush(iov, iov_bytes, iov_records)
                    iov, iov_bytes, iov_records = [], 0, 0
                    if self.when_full == "block" or not self._make_room(size):
                        break
                    used = self.bytes
                    active = self._segments[-1]
                if (
                    active.size + iov_bytes + size > self.segment_size
                    and active.size + iov_bytes > SEGMENT_HEADER_SIZE
                ):
                    self._flush(iov, iov_bytes, iov_records)
                    iov, iov_bytes, iov_records = [], 0, 0
                    self._roll()
                    used = self.bytes
                    active = self._segments[-1]
                if metadata:
                    active.meta.append((start_seq + taken, active.size + iov_bytes, size))
                iov += parts
                iov_bytes += size
                iov_records += 1
                taken += 1
                if len(iov) >= _IOV_MAX - 8 or iov_bytes >= _WRITE_CHUNK:
                    self._flush(iov, iov_bytes, iov_records)
                    used += iov_bytes
                    iov, iov_bytes, iov_records = [], 0, 0
            self._flush(iov, iov_bytes, iov_records)
            self._after_write()
        except OSError as exc:
            self._undo_write(start_count, start_active, start_size, start_seq, taken)
            raise self._error(exc, "cannot append (the batch was undone)") from None
        return taken

    def _flush(self, iov: list[Buffer], nbytes: int, records: int) -> None:
        """Write ``iov`` (``records`` records, ``nbytes`` in all) to the active segment."""
        if not nbytes:
            return
        active = self._segments[-1]
        if os.fstat(self._wfd).st_nlink == 0:
            raise FileNotFoundError(errno.ENOENT, "the segment file was deleted", active.path)
        written = os.writev(self._wfd, iov)
        while written < nbytes:  # a short write: write the rest
            rest = b"".join(bytes(part) for part in iov)[written:]
            more = os.write(self._wfd, rest)
            if more <= 0:
                raise OSError(errno.EIO, "short write", active.path)
            written += more
        active.size += nbytes
        self._next_seq += records
        self._frames += records
        self._dirty = True

    def _undo_write(self, count: int, active: _Segment, size: int, seq: int, taken: int) -> None:
        """Cut off what a failed append wrote; close the queue if that fails too."""
        try:
            rolled = len(self._segments) > count
            for segment in self._segments[count:]:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(segment.path)
            del self._segments[count:]
            if active in self._segments:
                if self._segments[-1] is not active:  # rolled, then the old one was dropped
                    raise OSError(errno.EIO, "cannot undo", active.path)
                if rolled:
                    if self._wfd >= 0:
                        os.close(self._wfd)
                        self._wfd = -1
                    self._wfd = os.open(active.path, os.O_WRONLY | os.O_CLOEXEC)
                if rolled or os.fstat(self._wfd).st_size != size:
                    os.ftruncate(self._wfd, size)
                os.lseek(self._wfd, size, os.SEEK_SET)
                active.size = size
                active.meta = [entry for entry in active.meta if entry[0] < seq]
                self._frames -= self._next_seq - seq
                self._next_seq = seq
            else:
                raise OSError(errno.EIO, "cannot undo", active.path)
            if self._reader is not None and self._reader.segment not in self._segments:
                self._drop_reader()
        except OSError:
            self._closed = True
            self._close_files()

    def _roll(self) -> None:
        """Start a new active segment at the next sequence number."""
        old_fd, self._wfd = self._wfd, -1
        if old_fd >= 0:
            try:
                if self.sync_policy != "none":
                    os.fdatasync(old_fd)
            finally:
                os.close(old_fd)
        segment = self._create_segment(self._next_seq)
        self._segments.append(segment)

    def _create_segment(self, first_seq: int) -> _Segment:
        path = os.path.join(self.directory, segment_name(first_seq))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        segment = _Segment(path, first_seq, SEGMENT_APPENDED, 0)
        segment.indexed = True
        try:
            header = SegmentHeader(SEGMENT_APPENDED, first_seq).pack()
            if os.write(fd, header) != len(header):
                raise OSError(errno.EIO, "short write", path)
            if self.sync_policy == "batch":
                os.fdatasync(fd)
                self._sync_directory()
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        segment.size = SEGMENT_HEADER_SIZE
        self._wfd = fd
        return segment

    def _after_write(self) -> None:
        if self.sync_policy == "batch":
            os.fdatasync(self._wfd)
            self._dirty = False
        elif self.sync_policy == "interval":
            self._sync_if_due()

    # -- dropping the oldest ----------------------------------------------------------------

    def _make_room(self, needed: int) -> bool:
        """Drop the oldest appended segment (carrying its metadata and frames in flight into
        the carried segment) until ``needed`` more bytes fit; False if nothing is left to
        drop."""
        while self.bytes + needed > self.max_size:
            index = 1 if self._segments[0].kind == SEGMENT_CARRIED else 0
            if index >= len(self._segments):
                return False
            victim = self._segments[index]
            if victim is self._segments[-1]:
                if self._next_seq == victim.first_seq:
                    return False  # the active segment is empty: nothing to drop
                self._roll()
            self._drop(index)
        return True

    def _drop(self, index: int) -> None:
        victim = self._segments[index]
        carried_old = self._segments[0] if index == 1 else None
        victim_end = self._range_end(index)
        keep: list[Buffer] = []
        kept = 0
        last_kept = -1
        # 1. What the old carried segment still holds for the reader.
        if carried_old is not None:
            for record in self._scan(carried_old):
                if record.seq >= self._committed:
                    keep += _record_buffers(record)
                    kept += 1
                    last_kept = record.seq
        # 2. The victim's frames in flight (decoded, not committed), from memory.
        for seq, frame in self._ready:
            if victim.first_seq <= seq < victim_end:
                encode_record(seq, frame, self._encoder, keep)
                kept += 1
                last_kept = seq
        # 3. The victim's metadata the reader has not reached; its data there is dropped.
        unread_from = max(self._read_last + 1, victim.first_seq)
        unread = max(0, victim_end - unread_from)
        metadata = 0
        for record in self._victim_metadata(victim, unread_from):
            keep += _record_buffers(record)
            kept += 1
            metadata += 1
            last_kept = record.seq
        dropped = max(0, unread - metadata)
        first = carried_old.first_seq if carried_old is not None else victim.first_seq
        replaced = [victim] if carried_old is None else [carried_old, victim]
        new: _Segment | None = None
        if kept:
            header = SegmentHeader(SEGMENT_CARRIED, first, victim_end, kept).pack()
            new = self._write_whole(first, [header, *keep])
            new.end_seq = victim_end
            new.last_record = last_kept
        for segment in replaced:
            if new is None or segment.path != new.path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(segment.path)
        self._segments[: index + 1] = [new] if new is not None else []
        self._frames -= dropped
        self._dropped += dropped
        if self._reader is not None and self._reader.segment in replaced:
            self._drop_reader()

    def _victim_metadata(self, victim: _Segment, unread_from: int) -> list[Record]:
        """The victim's valid metadata records from sequence number ``unread_from`` on."""
        if victim.indexed:
            records: list[Record] = []
            fd = os.open(victim.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                for seq, offset, size in victim.meta:
                    if seq < unread_from:
                        continue
                    decoder = SegmentDecoder(
                        max_record_size=self.max_record_size, offset=offset, last_seq=seq - 1
                    )
                    records += [
                        event
                        for event in decoder.feed(os.pread(fd, size, offset))
                        if isinstance(event, Record) and event.metadata
                    ]
            finally:
                os.close(fd)
            return records
        return [r for r in self._scan(victim) if r.metadata and r.seq >= unread_from]

    def _write_whole(self, first_seq: int, buffers: list[Buffer]) -> _Segment:
        """Write a carried segment whole under a temporary name, then rename it to its own
        (replacing the segment of that name, if any, in one step)."""
        path = os.path.join(self.directory, segment_name(first_seq))
        temporary = path + ".tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        size = 0
        try:
            for start in range(0, len(buffers), _IOV_MAX - 8):
                chunk = buffers[start : start + _IOV_MAX - 8]
                want = sum(len(memoryview(b).cast("B")) for b in chunk)
                if os.writev(fd, chunk) != want:
                    raise OSError(errno.EIO, "short write", temporary)
                size += want
            if self.sync_policy != "none":
                os.fdatasync(fd)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        os.close(fd)
        os.rename(temporary, path)
        if self.sync_policy != "none":
            self._sync_directory()
        return _Segment(path, first_seq, SEGMENT_CARRIED, size)

    def _scan(self, segment: _Segment) -> list[Record]:
        """Every valid record of a (non-active) segment, read from disk."""
        decoder = SegmentDecoder(max_record_size=self.max_record_size)
        records: list[Record] = []
        fd = os.open(segment.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            offset = 0
            while True:
                data = os.pread(fd, max(decoder.wanted(), 1 << 20), offset)
                if not data:
                    break
                offset += len(data)
                records += [e for e in decoder.feed(data) if isinstance(e, Record)]
        finally:
            os.close(fd)
        return records

    # -- reading ----------------------------------------------------------------------------

    def read_batch(self, max_frames: int, max_bytes: int) -> list[Frame]:
        """The next frames, oldest first, without consuming them: at most ``max_frames``
        and, after the first, at most ``max_bytes`` (counted in ``Frame.size``).

        Calling it again before :meth:`commit` returns the same frames first. Corrupt
        records on the way are skipped and counted (:meth:`stats`), never returned. Raises
        :class:`SpoolIOError` if a read fails.
        """
        self._check_open()
        if max_frames <= 0:
            return []
        out: list[Frame] = []
        total = 0
        for _, frame in self._ready:
            if len(out) >= max_frames or (out and total + frame.size > max_bytes):
                self._returned = max(self._returned, len(out))
                return out
            out.append(frame)
            total += frame.size
        try:
            while len(out) < max_frames and (not out or total < max_bytes):
                decoded = self._next_frame()
                if decoded is None:
                    break
                self._ready.append(decoded)
                frame = decoded[1]
                if out and total + frame.size > max_bytes:
                    break
                out.append(frame)
                total += frame.size
        except OSError as exc:
            self._drop_reader()
            raise self._error(exc, "cannot read") from None
        self._returned = max(self._returned, len(out))
        return out

    def commit(self, count: int) -> None:
        """Consume the first ``count`` frames :meth:`read_batch` returned: they will not be
        delivered again. Persists the read position and deletes segments fully delivered.
        Raises ValueError if ``count`` is more than was returned, :class:`SpoolIOError` if
        the position cannot be written (the position then stays where it was)."""
        self._check_open()
        if count < 0 or count > self._returned:
            raise ValueError(f"cannot commit {count} frames: {self._returned} were handed out")
        if count == 0:
            return
        committed = self._ready[count - 1][0] + 1
        try:
            self._write_position(committed)
        except OSError as exc:
            raise self._error(exc, "cannot save the read position") from None
        for _ in range(count):
            self._ready.popleft()
        self._returned -= count
        self._committed = committed
        self._frames -= count
        try:
            self._delete_delivered()
            if self.sync_policy == "batch":
                os.fdatasync(self._pos_fd)
            elif self.sync_policy == "interval":
                self._sync_if_due()
        except OSError as exc:
            raise self._error(exc, "cannot finish a commit") from None

    def _next_frame(self) -> tuple[int, Frame] | None:
        while True:
            record = self._next_record()
            if record is None:
                return None
            try:
                return record.seq, frame_of(record)
            except ProtocolError:
                # The checksums matched, so a program wrote this: not one of ours.
                self._count_corrupt(record.size, 1)
                self._frames -= 1
                self._read_last = record.seq

    def _next_record(self) -> Record | None:
        while True:
            reader = self._reader
            if reader is None:
                reader = self._locate()
                if reader is None:
                    return None
            while reader.events:
                event = reader.events.popleft()
                if isinstance(event, Record):
                    if event.seq <= self._read_last:
                        continue
                    self._note_gap(reader.segment, event.seq)
                    self._read_last = event.seq
                    reader.small = event.size < _LARGE_RECORD
                    return event
                self._count_corrupt(event.size, 0)
            segment = reader.segment
            end = segment.size
            if reader.offset >= end:
                if segment is self._segments[-1]:
                    return None  # caught up with the writer
                for event in reader.decoder.end_of_input():
                    self._count_corrupt(event.size, 0)
                index = self._segments.index(segment)
                self._note_gap(segment, self._segments[index + 1].first_seq)
                # Whatever of its range is not read by now was dropped or lost.
                self._read_last = max(self._read_last, self._range_end(index) - 1)
                self._drop_reader()
                continue
            want = reader.decoder.wanted()
            if want < _LARGE_RECORD and reader.small:
                want = _READ_AHEAD
            want = min(want, end - reader.offset)
            data = os.pread(reader.fd, want, reader.offset)
            if not data:  # the file is shorter than we knew: cut off from outside
                segment.size = reader.offset
                continue
            reader.offset += len(data)
            reader.events.extend(reader.decoder.feed(data))

    def _note_gap(self, segment: _Segment, seq: int) -> None:
        """Count the records missing before ``seq`` in an appended segment (corrupt ones)."""
        if segment.kind != SEGMENT_APPENDED:
            return
        expected = max(self._read_last + 1, segment.first_seq)
        if seq > expected:
            lost = seq - expected
            self._corrupt_records += lost
            self._frames -= lost
            self._read_last = seq - 1

    def _count_corrupt(self, nbytes: int, records: int) -> None:
        self._corrupt_regions += 1
        self._corrupt_bytes += nbytes
        self._corrupt_records += records

    def _locate(self) -> _Reader | None:
        """Open the reader on the segment that holds the next record to decode."""
        wanted = self._read_last + 1
        for index, segment in enumerate(self._segments):
            if segment is not self._segments[-1] and (
                self._range_end(index) <= wanted
                or (segment.kind == SEGMENT_CARRIED and segment.last_record < wanted)
            ):
                continue
            fd = os.open(segment.path, os.O_RDONLY | os.O_CLOEXEC)
            offset = 0
            if segment.kind == SEGMENT_APPENDED and wanted > segment.first_seq:
                # Walk the record headers to the first record at or after ``wanted``.
                offset = SEGMENT_HEADER_SIZE
                while offset + RECORD_HEADER_SIZE <= segment.size:
                    head = os.pread(fd, RECORD_HEADER_SIZE, offset)
                    if len(head) < RECORD_HEADER_SIZE:
                        break
                    header = parse_record_header(head, max_record_size=self.max_record_size)
                    if header is None or header.seq >= wanted:
                        break
                    offset += header.size
            # Records before ``wanted`` that the walk did not pass are decoded and skipped.
            decoder = SegmentDecoder(max_record_size=self.max_record_size, offset=offset)
            self._reader = _Reader(segment, fd, offset, decoder)
            return self._reader
        return None

    def _drop_reader(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            with contextlib.suppress(OSError):
                os.close(reader.fd)

    def _range_end(self, index: int) -> int:
        """The end (exclusive) of the sequence numbers segment ``index`` stands for."""
        segment = self._segments[index]
        if segment.kind == SEGMENT_CARRIED:
            return segment.end_seq
        if index + 1 < len(self._segments):
            return self._segments[index + 1].first_seq
        return self._next_seq

    def _delete_delivered(self) -> None:
        while len(self._segments) > 1:
            segment = self._segments[0]
            if segment.kind == SEGMENT_CARRIED:
                done = segment.last_record < self._committed
            else:
                done = self._segments[1].first_seq <= self._committed
            if not done:
                return
            if self._reader is not None and self._reader.segment is segment:
                self._drop_reader()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(segment.path)
            del self._segments[0]

    # -- the position file and syncing ------------------------------------------------------

    def _write_position(self, committed: int) -> None:
        if os.fstat(self._pos_fd).st_nlink == 0:
            raise FileNotFoundError(errno.ENOENT, "the position file was deleted", POSITION_FILE)
        generation = self._generation + 1
        slot = encode_position(generation, committed)
        offset = POSITION_SLOT_OFFSETS[generation % 2]
        if os.pwrite(self._pos_fd, slot, offset) != len(slot):
            raise OSError(errno.EIO, "short write", POSITION_FILE)
        self._generation = generation
        self._dirty = True

    def sync(self) -> None:
        """Flush the active segment and the position file to the device now (fdatasync).
        With ``sync = "interval"`` the daemon may call it from a timer, so that frames
        appended just before a quiet spell do not wait for the next append to be synced."""
        self._check_open()
        try:
            os.fdatasync(self._wfd)
            os.fdatasync(self._pos_fd)
            self._sync_directory()
        except OSError as exc:
            raise self._error(exc, "cannot sync") from None
        self._dirty = False
        self._last_sync = time.monotonic()

    def _sync_if_due(self) -> None:
        if self._dirty and time.monotonic() - self._last_sync >= self.sync_interval:
            os.fdatasync(self._wfd)
            os.fdatasync(self._pos_fd)
            self._sync_directory()
            self._dirty = False
            self._last_sync = time.monotonic()

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- recovery ---------------------------------------------------------------------------

    def _recover(self) -> None:
        directory = self.directory
        os.makedirs(directory, exist_ok=True)
        self._take_lock()
        names = os.listdir(directory)
        for name in names:
            if name.endswith(".tmp"):
                os.unlink(os.path.join(directory, name))
        self._read_position()
        found: list[tuple[int, str]] = []
        for name in names:
            first = parse_segment_name(name)
            if first is not None:
                found.append((first, os.path.join(directory, name)))
        found.sort()
        segments: list[_Segment] = []
        carried_end = -1
        for first, path in found:
            with open(path, "rb") as file:
                header = SegmentHeader.parse(file.read(SEGMENT_HEADER_SIZE))
                size = os.fstat(file.fileno()).st_size
            if header is not None and header.first_seq != first:
                header = None
            if first < carried_end:
                # Left over from a drop that a crash interrupted: the carried segment
                # before it already holds what it had to keep.
                os.unlink(path)
                continue
            kind = SEGMENT_APPENDED if header is None else header.kind
            segment = _Segment(path, first, kind, size)
            if header is not None and kind == SEGMENT_CARRIED:
                segment.end_seq = header.end_seq
                carried_end = header.end_seq
            segments.append(segment)
        self._segments = segments
        self._tail_next = -1
        frames = 0
        next_seq = max(self._committed, carried_end, 0)
        for index, segment in enumerate(segments):
            last = index == len(segments) - 1
            if segment.kind == SEGMENT_CARRIED:
                records = self._scan(segment)
                segment.last_record = records[-1].seq if records else -1
                segment.meta = [(r.seq, r.offset, r.size) for r in records if r.metadata]
                frames += sum(1 for r in records if r.seq >= self._committed)
            elif last:
                last_seq, count = self._recover_tail(segment)
                frames += count
                next_seq = max(next_seq, segment.first_seq, last_seq + 1)
            else:
                following = segments[index + 1].first_seq
                frames += max(0, following - max(segment.first_seq, self._committed))
                next_seq = max(next_seq, following)
        self._next_seq = next_seq
        self._frames = frames
        active = segments[-1] if segments else None
        reusable = (
            active is not None
            and active.kind == SEGMENT_APPENDED
            and active.size >= SEGMENT_HEADER_SIZE
            and self._tail_next == next_seq
        )
        if active is not None and reusable:
            self._wfd = os.open(active.path, os.O_WRONLY | os.O_CLOEXEC)
            os.lseek(self._wfd, active.size, os.SEEK_SET)
        else:
            if active is not None and active.size < SEGMENT_HEADER_SIZE:
                os.unlink(active.path)  # a segment cut off before its header was whole
                segments.pop()
            name_taken = any(s.first_seq == next_seq for s in segments)
            if name_taken:  # an empty appended segment at next_seq whose header is bad
                victim = next(s for s in segments if s.first_seq == next_seq)
                os.unlink(victim.path)
                segments.remove(victim)
            segments.append(self._create_segment(next_seq))
        self._read_last = self._committed - 1
        self._delete_delivered()

    def _recover_tail(self, segment: _Segment) -> tuple[int, int]:
        """Scan the last appended segment: index its metadata, cut off a torn tail.
        Returns the last valid sequence number (or first_seq - 1) and the frames from the
        committed position to it (records lost to corruption among them are subtracted
        when the reader meets them)."""
        decoder = SegmentDecoder(max_record_size=self.max_record_size)
        last_seq = segment.first_seq - 1
        fd = os.open(segment.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            offset = 0
            events: list[Event] = []
            while True:
                data = os.pread(fd, max(decoder.wanted(), 1 << 20), offset)
                if not data:
                    events = decoder.end_of_input()
                else:
                    offset += len(data)
                    events = decoder.feed(data)
                for event in events:
                    # Corrupt regions are counted when the reader meets them, as in every
                    # other segment (so they are counted once, and only if not delivered).
                    if isinstance(event, Record):
                        last_seq = event.seq
                        if event.metadata:
                            segment.meta.append((event.seq, event.offset, event.size))
                    elif isinstance(event, Torn):
                        self._torn_bytes += event.size
                        os.ftruncate(fd, event.offset)
                        if self.sync_policy != "none":
                            os.fdatasync(fd)
                        segment.size = event.offset
                if not data:
                    break
        finally:
            os.close(fd)
        segment.indexed = True
        self._tail_next = last_seq + 1 if decoder.header is not None else -1
        return last_seq, max(0, last_seq + 1 - max(segment.first_seq, self._committed))

    def _take_lock(self) -> None:
        path = os.path.join(self.directory, LOCK_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SpoolLocked(
                f"spool {self.directory} is in use by another queue (process {holder}); "
                "give each buffer a directory of its own"
            ) from None
        except OSError:
            os.close(fd)
            raise
        self._lock_fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    def _read_position(self) -> None:
        path = os.path.join(self.directory, POSITION_FILE)
        self._pos_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        size = os.fstat(self._pos_fd).st_size
        if size < POSITION_FILE_SIZE:
            # Give both slots their blocks now, so a commit never needs a new block (and
            # never fails for want of one on a full file system).
            os.pwrite(self._pos_fd, bytes(POSITION_FILE_SIZE - size), size)
        slots = [os.pread(self._pos_fd, POSITION_SLOT_SIZE, o) for o in POSITION_SLOT_OFFSETS]
        position = decode_position(slots)
        if position is None:
            # Lost only if a slot was ever written: a queue never committed has zeros.
            self._position_lost = any(slot.strip(b"\0") for slot in slots)
            self._generation, self._committed = 0, 0
        else:
            self._generation, self._committed = position

    # -- errors -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise SpoolClosed(f"spool {self.directory}: the queue is closed")

    def _error(self, exc: OSError, what: str) -> SpoolError:
        where = exc.filename or self.directory
        if exc.errno in _FULL_ERRNOS:
            return SpoolDiskFull(
                f"spool {self.directory}: {what}: no space left on the device ({where})"
            )
        reason = exc.strerror or str(exc)
        gone = "" if self._closed is False else " (the queue is now closed: open it again)"
        return SpoolIOError(f"spool {self.directory}: {what}: {reason} ({where}){gone}")

    def _close_files(self) -> None:
        self._drop_reader()
        for name in ("_wfd", "_pos_fd", "_lock_fd"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, -1)


def _record_buffers(record: Record) -> list[Buffer]:
    """A record read from disk, as buffers to write again (its header rebuilt)."""
    payload = record.payload
    return [pack_record_header(record.seq, record.metadata, len(payload), crc32c(payload)), payload]
