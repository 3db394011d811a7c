"""What the spool raises. Every error's message is one line naming the directory or file."""

from __future__ import annotations

__all__ = [
    "RecordTooLarge",
    "SpoolClosed",
    "SpoolDiskFull",
    "SpoolError",
    "SpoolIOError",
    "SpoolLocked",
]


class SpoolError(Exception):
    """Base class: the spool could not do what was asked. Nothing was half-applied: an
    append that raises has written nothing that a reader will see (its bytes were cut off
    again), a commit that raises has not moved the read position."""


class SpoolLocked(SpoolError):
    """Another :class:`~framewire.spool.DiskQueue` (in this process or another) holds the
    directory's lock file. Two queues on one directory would corrupt each other."""


class SpoolIOError(SpoolError):
    """The directory or one of its files could not be read or written: it was deleted, it
    is not writable, a read failed. The message names the path and the operating system's
    reason. If the queue could not undo a failed append, it is closed and must be opened
    again (recovery cuts off what the failed append left)."""


class SpoolDiskFull(SpoolIOError):
    """The file system is full (ENOSPC) or the user's quota is spent (EDQUOT). The append
    was undone; the queue stays usable and the same append may be tried again later."""


class SpoolClosed(SpoolError):
    """The queue was closed (or closed itself after an error it could not undo)."""


class RecordTooLarge(SpoolError, ValueError):
    """A frame's encoding is over the queue's ``max_record_size`` (or could never fit within
    ``max_size``). Raised before anything of the batch is written."""
