"""The disk engine: a write-ahead queue of frames in checksummed segment files.

Disk buffers (issue 22) stand on it, and later a stream's history. Two layers:

* :mod:`framewire.spool._format`, sans-IO: the record, the segment header, the position
  slot, and :class:`SegmentDecoder`, which cuts a segment's bytes (fed in any chunking) into
  records, corrupt regions and a torn tail. No files, no trio.
* :class:`DiskQueue`, the file I/O at the edge: synchronous plain Python over one directory.
  It is not thread-safe: one call at a time. The daemon calls it from one worker thread
  (``trio.to_thread.run_sync``), a whole batch per hop: ``append`` takes a list of frames,
  ``read_batch`` returns one, ``commit`` takes a count.

Using it::

    queue = DiskQueue.open(path, max_size=1 << 30, when_full="block", sync="interval")
    taken = queue.append(frames)            # < len(frames) only when full: wait, retry
    batch = queue.read_batch(64, 4 << 20)   # the oldest frames, not consumed
    ...deliver them...
    queue.commit(len(batch))                # consumed: never delivered again
    queue.close()

The on-disk format (all integers little-endian; CRC-32C is Castagnoli's, as iSCSI and ext4
use it, via the google-crc32c package)
----------------------------------------------------------------------------------------

A directory holds ``lock``, ``position`` and segment files ``NNNNNNNNNNNNNNNNNNNN.seg``
whose 20 digits are the sequence number of the segment's first record, so a directory
listing sorted by name is the queue's order. Every record has a sequence number, one more
than the record appended before it (for the life of the directory).

Segment file: a 32-byte header, then records back to back::

    offset size field
    0      4    magic 0x89 'F' 'W' 'S'
    4      1    version (1)
    5      1    kind: 0 appended (records are appended to it), 1 carried (see drop_oldest)
    6      2    reserved, 0
    8      8    first sequence number (the one in the file's name)
    16     8    carried: the end (exclusive) of the sequence numbers it stands for; else 0
    24     4    carried: how many records it holds; else 0
    28     4    CRC-32C of bytes 0-27

Record: a 28-byte header, then the payload, which is one frame's encoding in framewire's
native format (docs/protocol.md; a frame that came off a native wire is stored as those
very bytes)::

    offset size field
    0      4    magic 0x89 'F' 'W' 'R'
    4      1    version (1)
    5      1    flags: bit 0 set for a METADATA frame; every other bit 0
    6      2    reserved, 0
    8      8    sequence number
    16     4    payload length L (at most the queue's max_record_size)
    20     4    CRC-32C of the payload
    24     4    CRC-32C of bytes 0-23 (so the record's checksum covers header and payload)
    28     L    payload

The records of an appended segment have consecutive sequence numbers, from the one in its
name up to the next segment's first: so a queue counts its frames from the names, and a
gap in the numbers tells how many records corruption took.

``position`` holds the read position, the sequence number of the next frame to deliver,
in two 28-byte slots at offsets 0 and 4096 (each in a block of its own), written in turn::

    0      4    magic 0x89 'F' 'W' 'P'
    4      1    version (1)
    5      3    0
    8      8    generation (one more at every commit)
    16     8    next sequence number to deliver
    24     4    CRC-32C of bytes 0-23

A commit is one ``pwrite`` of a slot, never a rename; on open the valid slot with the
highest generation wins, so a write torn by a crash leaves the other slot, one commit
older: at worst the last committed batch is delivered again, never a frame lost.

``lock`` holds the process id of the queue that has the directory open (under an
exclusive ``flock``).

Guarantees
----------

* **Order and once**: frames come out in the order they were appended. A committed frame
  is never delivered again by this directory (unless the position file itself is lost:
  then delivery restarts at the oldest frame on disk, and :meth:`DiskQueue.stats` says
  ``position_lost``). Frames handed out by ``read_batch`` and not committed (the batch in
  flight) are delivered again after a crash or a reopen: at least once for them only.
* **Nothing corrupt is delivered**: a record is delivered only if both its checksums match,
  its length is within ``max_record_size``, its sequence number is above the last one
  delivered, and its payload is one valid native frame whose kind matches the flags.
* **Corruption is skipped and counted**: after a bad record the decoder looks for the next
  record magic (a record whose header checked out but whose payload did not is skipped by
  its length) and goes on from the first valid record; the region is counted in
  ``corrupt_regions`` / ``corrupt_bytes``, and the records it took (from the gap in the
  sequence numbers) in ``corrupt_records``. A bad segment header costs no records.
* **Crash recovery**: on open the last segment is scanned; bytes after its last valid
  record (a record torn by a crash, or damage there, which looks the same) are cut off and
  counted in ``torn_bytes``; appends continue after the last valid record. Temporary files
  of an interrupted drop are removed, and a segment a finished drop had replaced is deleted.
  Frame and byte counts are exact after recovery (records that corruption took are
  subtracted when the reader meets them).
* **Memory is bounded**: no allocation follows a length field before its header's CRC has
  matched, and none above ``max_record_size``; the reader holds at most the batch it was
  asked for and one record.
* **Bounded on disk**: the segment files' sizes (the bytes on disk, not counting the 4 KiB
  position file and the lock file) never pass ``max_size``. ``segment_size`` (default
  64 MiB) is clamped to ``max_size / 8``, so room comes back in steps of at most an eighth.
  Fully delivered segments are deleted at the commit that finishes them.

When full
---------

``when_full = "block"``: ``append`` takes the frames that fit and returns how many; the
caller holds the rest (and so holds its stream back) until a commit frees a segment.

``when_full = "drop_oldest"``: to make room, the oldest appended segment is dropped whole.
Its METADATA records that the reader has not reached, and the records of frames in flight,
are first written (with their own sequence numbers) into the *carried* segment, which
takes the dropped segment's place in the order: it is written under a temporary name and
renamed over the previous carried segment (or over the dropped segment itself), then the
dropped segment is deleted; a crash between the two is finished at the next open. So
metadata is never dropped and keeps its place before the data that followed it; the DATA
frames dropped are counted in ``dropped_frames``. If nothing is left to drop (the queue
holds only metadata, frames in flight and the active segment), ``append`` returns short as
with "block".

Sync policies, their cost, and what a power loss can lose
---------------------------------------------------------

A crash of the process (SIGKILL included) loses nothing under any policy: every append and
commit is in the kernel's page cache when the call returns. A power loss or kernel crash
loses what the kernel had not yet written to the device:

* ``"none"``: never ``fsync``. Costs nothing. A power loss can lose the frames appended in
  the last ~30 s (the kernel's writeback delay, ``vm.dirty_expire_centisecs``), and the
  position can go back (frames committed in that time are delivered again). What survives
  is still checked: a torn tail is cut off, damaged records are skipped and counted.
* ``"batch"``: ``fdatasync`` the segment after every append and the position file after
  every commit (and the directory when a segment is created). A power loss loses nothing
  that an ``append`` returned for and repeats nothing committed. Costs a device flush per
  call: milliseconds on a disk, tens to hundreds of microseconds on an SSD with a power-safe
  cache; make batches large.
* ``"interval"`` (default, ``sync_interval`` 1 s): ``fdatasync`` during an append or commit
  once ``sync_interval`` has passed since the last one, at every segment roll, and at
  :meth:`DiskQueue.close`. A power loss loses at most the appends of the last interval
  (and of a quiet spell after it, unless the caller calls :meth:`DiskQueue.sync` from a
  timer); commits of that interval are delivered again. Costs one flush per interval.

How failures surface
--------------------

Each raises one exception with a one-line message naming the directory or file; nothing
is half-applied:

* :class:`SpoolLocked`: another queue (this process or another, named by its pid) has the
  directory open.
* :class:`SpoolDiskFull` (a :class:`SpoolIOError`): ENOSPC or EDQUOT. The failed append is
  cut off again (the segment truncated to its size before the call, segments it created
  deleted); the queue stays usable and the frames are still the caller's.
* :class:`SpoolIOError`: the directory or a file was deleted (checked before every write
  by the segment's link count, so a deleted directory is never written into silently),
  cannot be created or written, or a read failed. If a failed append cannot be undone, the
  queue closes itself (the message says so) and recovery at the next open cuts off the
  remains.
* :class:`RecordTooLarge`: a frame over ``max_record_size`` (or over half of ``max_size``),
  raised before anything of the batch is written.
* :class:`SpoolClosed`: the queue was closed.
* Corruption never raises: it is skipped and counted (:meth:`DiskQueue.stats`).
"""

from ._errors import RecordTooLarge as RecordTooLarge
from ._errors import SpoolClosed as SpoolClosed
from ._errors import SpoolDiskFull as SpoolDiskFull
from ._errors import SpoolError as SpoolError
from ._errors import SpoolIOError as SpoolIOError
from ._errors import SpoolLocked as SpoolLocked
from ._format import SegmentDecoder as SegmentDecoder
from ._history import HistoryReader as HistoryReader
from ._history import HistoryStats as HistoryStats
from ._history import StreamHistory as StreamHistory
from ._queue import DEFAULT_SEGMENT_SIZE as DEFAULT_SEGMENT_SIZE
from ._queue import DiskQueue as DiskQueue
from ._queue import SpoolStats as SpoolStats
from ._queue import SyncPolicy as SyncPolicy
from ._queue import WhenFull as WhenFull
