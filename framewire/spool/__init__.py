"""The disk engine (manual to be written)."""

from ._errors import RecordTooLarge as RecordTooLarge
from ._errors import SpoolClosed as SpoolClosed
from ._errors import SpoolDiskFull as SpoolDiskFull
from ._errors import SpoolError as SpoolError
from ._errors import SpoolIOError as SpoolIOError
from ._errors import SpoolLocked as SpoolLocked
from ._queue import DEFAULT_SEGMENT_SIZE as DEFAULT_SEGMENT_SIZE
from ._queue import DiskQueue as DiskQueue
from ._queue import SpoolStats as SpoolStats
from ._queue import SyncPolicy as SyncPolicy
from ._queue import WhenFull as WhenFull
