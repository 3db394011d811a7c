"""``protocol = "raw"``: bytes as they come, netcat-style.

Each read becomes one DATA frame of type ``"raw"`` holding exactly the bytes that arrived, so
frame boundaries are wherever the transport happened to cut. Reads start at 256 KiB; each read
that fills the buffer doubles it, up to 1 MiB (and ``max_frame_size``), so a bulk stream is
read in larger gulps. Encoding writes the payload of
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

    Each frame holds a copy of its bytes (never a view on the reused buffer), so a queue
    counts what a frame holds.
    """

    protocol = PROTOCOL

    def __init__(self, *, max_frame_size: int, buffer_size: int = 256 * 1024) -> None:
        if max_frame_size <= 0:
            raise ValueError("max_frame_size must be positive")
        self.max_frame_size = max_frame_size
        self._buffer = bytearray(min(buffer_size, max_frame_size))
        self._view = memoryview(self._buffer)
        self._max_buffer = max(len(self._buffer), min(MAX_RECEIVE_BUFFER, max_frame_size))
        self.ended = False

    def get_buffer(self) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> list[Frame]:
        if not nbytes:
            return []
        view = self._view
        frame = Frame(FrameKind.DATA, TYPE, view[:nbytes].tobytes())
        if nbytes == len(view) and nbytes < self._max_buffer:
            # The read filled the buffer: the peer has more. Read more at once next time.
            try:
                self._buffer = bytearray(min(2 * nbytes, self._max_buffer))
            except MemoryError:
                self._max_buffer = nbytes
            else:
                self._view = memoryview(self._buffer)
        return [frame]

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


class RawEncoder(FrameEncoder):
    """Writes each frame's payload bytes."""

    protocol = PROTOCOL

    def encode_into(self, frame: Frame, out: list[Buffer]) -> None:
        out.append(frame.payload)
