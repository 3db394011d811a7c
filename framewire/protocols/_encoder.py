"""The shared half of every encoder: batches and control frames around ``encode_into``."""

from __future__ import annotations

from collections.abc import Iterable

from ..frame import Buffer, Frame

__all__ = ["FrameEncoder"]


class FrameEncoder:
    """Base class. Subclasses implement :meth:`encode_into` and may override the control
    frames; everything else is built on it."""

    protocol: str = ""

    def encode_into(self, frame: Frame, out: list[Buffer]) -> None:
        """Append ``frame``'s buffers to ``out``; append nothing if it raises ValueError."""
        raise NotImplementedError

    def encode(self, frame: Frame) -> list[Buffer]:
        out: list[Buffer] = []
        self.encode_into(frame, out)
        return out

    def encode_batch(self, frames: Iterable[Frame]) -> list[Buffer]:
        out: list[Buffer] = []
        encode_into = self.encode_into
        for frame in frames:
            encode_into(frame, out)
        return out

    def keepalive(self) -> bytes:
        """The protocol's keepalive, or ``b""`` if it has none."""
        return b""

    def end_of_stream(self) -> bytes:
        """The protocol's end-of-stream marker, or ``b""`` if it has none."""
        return b""
