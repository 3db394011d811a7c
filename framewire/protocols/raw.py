"""``protocol = "raw"``: bytes as they come, netcat-style.

Each read becomes one DATA frame of type ``"raw"`` holding exactly the bytes that arrived, so
frame boundaries are wherever the transport happened to cut. Reads start at 256 KiB; each read
that fills the buffer doubles it, up to 1 MiB (and ``max_frame_size``), so a bulk stream is
read in larger gulps. An I/O layer that can read into new bytes objects (a socket's
``recv(n)``) sets ``whole_reads`` and reads :meth:`RawDecoder.whole_read_size` bytes at a time
into :meth:`RawDecoder.bytes_received`: each read's bytes object is then the frame's payload,
with no copy out of a receive buffer. Encoding writes the payload of
every frame (of any kind) and nothing else. There is no metadata, keepalive or end-of-stream.
"""

from __future__ import annotations

from typing import Final

from ..frame import Buffer, Frame, FrameKind
from ._encoder import FrameEncoder
from ._framing import MAX_RECEIVE_BUFFER

__all__ = ["RawDecoder", "RawEncoder"]

PROTOCOL: Final = "raw"
TYPE: Final = "raw"


class RawDecoder:
    """Turns each chunk of input into a DATA frame of at most ``max_frame_size`` bytes.

    Each frame holds its own bytes (a copy, or the bytes object a whole read made; never a
    view on the reused buffer), so a queue counts what a frame holds.
    """

    protocol = PROTOCOL
    #: Whether the I/O side reads through :meth:`whole_read_size` / :meth:`bytes_received`
    #: (set it before the first read). The reused buffer is then never allocated.
    whole_reads: bool = False
    #: A whole read takes whatever the input holds (each read is a frame).
    wants_whole: bool = False

    def __init__(self, *, max_frame_size: int, buffer_size: int = 256 * 1024) -> None:
        if max_frame_size <= 0:
            raise ValueError("max_frame_size must be positive")
        self.max_frame_size = max_frame_size
        # The size of the next read: it doubles after each read that fills it.
        self._size = min(buffer_size, max_frame_size)
        self._max_buffer = max(self._size, min(MAX_RECEIVE_BUFFER, max_frame_size))
        # The reused buffer of get_buffer(), made on first use.
        self._view: memoryview | None = None
        self.ended = False

    def get_buffer(self) -> memoryview:
        view = self._view
        if view is None or len(view) != self._size:
            view = self._view = memoryview(bytearray(self._size))
        return view

    def buffer_updated(self, nbytes: int) -> list[Frame]:
        if not nbytes:
            return []
        view = self.get_buffer()
        frame = Frame(FrameKind.DATA, TYPE, view[:nbytes].tobytes())
        self._filled(nbytes)
        return [frame]

    def whole_read_size(self) -> int:
        """How many bytes the next read should take into a new bytes object of its own."""
        return self._size

    def whole_frame_size(self, head: bytes) -> int:
        """0: raw bytes have no frames to wait for whole (each read takes what is there)."""
        return 0

    def bytes_received(self, data: bytes) -> list[Frame]:
        """One read of at most :meth:`whole_read_size` bytes (not empty): its frame, which
        keeps ``data`` as its payload."""
        self._filled(len(data))
        return [Frame(FrameKind.DATA, TYPE, data)]

    def _filled(self, nbytes: int) -> None:
        if nbytes >= self._size and nbytes < self._max_buffer:
            # The read filled the buffer: the peer has more. Read more at once next time;
            # if that memory cannot be had, stay at this size for good.
            grown = min(2 * nbytes, self._max_buffer)
            if self._view is not None:
                try:
                    self._view = memoryview(bytearray(grown))
                except MemoryError:
                    self._max_buffer = nbytes
                    return
            self._size = grown

    def feed(self, data: Buffer) -> list[Frame]:
        source = memoryview(data).cast("B")
        step = self.max_frame_size
        return [
            Frame(FrameKind.DATA, TYPE, source[i : i + step].tobytes())
            for i in range(0, len(source), step)
        ]

    def end_of_input(self) -> None:
        """Raw input can end anywhere."""

    @property
    def buffered(self) -> int:
        return 0

    @property
    def pending_frame_size(self) -> int:
        """0: raw bytes have no frames in progress (each read is a frame)."""
        return 0


class RawEncoder(FrameEncoder):
    """Writes each frame's payload bytes."""

    protocol = PROTOCOL

    def encode_into(self, frame: Frame, out: list[Buffer]) -> None:
        out.append(frame.payload)
