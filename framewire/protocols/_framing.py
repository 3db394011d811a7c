"""Buffer management shared by every length-delimited decoder.

Decoders in framewire follow the buffered-protocol shape: the I/O layer asks for a writable
buffer with :meth:`FrameDecoder.get_buffer`, reads into it (``recv_into``), and reports how
many bytes arrived with :meth:`FrameDecoder.buffer_updated`, which returns the frames that are
now complete. Tests and file readers can use :meth:`FrameDecoder.feed` instead. Nothing here
touches a socket.

Small frames are cut out of one reused receive buffer (one copy each, so a queued frame never
pins the whole buffer). A frame larger than :data:`LARGE_FRAME` gets a buffer of its own, and
the I/O layer reads straight into it. The receive buffer starts at
:data:`RECEIVE_BUFFER_SIZE` and doubles, up to :data:`MAX_RECEIVE_BUFFER`, each time a read
fills all the room it was given with frames it holds: a peer that keeps it full with a bulk
stream of small frames is read in larger gulps, with fewer system calls per byte; a quiet or
trickling peer, or one sending large frames, never grows it.

Memory follows the bytes that arrived, never the length a peer announced: a large frame's
buffer starts at :data:`FIRST_LARGE_BUFFER`, twice what has arrived of it, or the size of
the last large frame the connection delivered whole with its read-ahead (whichever is
largest), and doubles as it fills, up to the frame's size and its read-ahead. So a
connection holds at most its receive buffer plus twice what has arrived of its current frame
or its last frame, whatever its header claims.
A finished frame's buffer is trimmed to the frame (any slack above 1/16 of it is copied
away), so the size a queue counts for a frame is what the frame holds.

Whole reads: an I/O layer that can read into a new ``bytes`` object (``recv(n)`` on a socket
allocates it without zero-filling it) sets :attr:`FrameDecoder.whole_reads`. A large frame's
buffer then ends at the frame (no read-ahead; a stepwise frame's buffer, sized by the frame
before it, ends there when the two are as large), so after it the stream is at a frame
boundary with nothing buffered, and :meth:`FrameDecoder.whole_read_size` asks for the
size of that frame: a stream of equal large frames is then read a frame per read, each
straight into the bytes object that becomes its ``wire``, with no buffer of its own to
zero-fill and no copy. The I/O layer hands such reads to :meth:`FrameDecoder.bytes_received`.
A read that brings anything else (a shorter read, a different frame size, small frames) is
taken as an ordinary read would be. What is asked for is bounded by a frame that already
arrived whole, and the bytes object holds only what arrived.

A decoder that raised :class:`ProtocolError` keeps only the error's class and message and
drops its buffers at once: no reference cycle through a traceback keeps a dead connection's
memory alive until a garbage collection.
"""

from __future__ import annotations

from typing import Final

from ..frame import Buffer, Frame
from ._errors import FrameTooLarge, ProtocolError, TruncatedFrame

__all__ = [
    "FIRST_LARGE_BUFFER",
    "LARGE_FRAME",
    "MAX_RECEIVE_BUFFER",
    "RECEIVE_BUFFER_SIZE",
    "FrameDecoder",
]

#: Size of the reused receive buffer when a connection starts.
RECEIVE_BUFFER_SIZE: Final = 256 * 1024
#: The most the receive buffer grows to while reads keep filling it.
MAX_RECEIVE_BUFFER: Final = 1024 * 1024
#: Frames above this size are read into a buffer of their own instead of the shared one.
#: Frames up to it are cut out of the receive buffer (which holds at least two of them), so
#: one read takes several of them: a 64 KiB frame costs a copy out of the receive buffer
#: instead of a zero-filled buffer of its own, a read and a write of its own.
LARGE_FRAME: Final = 128 * 1024
#: The least a large frame's own buffer starts with (it then doubles as bytes arrive).
FIRST_LARGE_BUFFER: Final = 128 * 1024
#: How far a read into a large frame's buffer may go past the frame's known end (at most a
#: sixteenth of the frame, so the slack a finished frame keeps stays small).
READ_AHEAD: Final = 64 * 1024


def _read_ahead(needed: int) -> int:
    return min(READ_AHEAD, needed >> 4)


class FrameDecoder:
    """Base class: cuts a byte stream into frames using the subclass's :meth:`_measure`.

    Subclasses implement two methods:

    * ``_measure(view, start, end) -> int``: look at the bytes ``view[start:end]`` (the start
      of a frame) and return how many bytes, counted from ``start``, are needed. If the result
      is ``<= end - start`` the frame is complete and exactly that long; otherwise at least that
      many bytes must arrive before measuring again. Raise :class:`ProtocolError` for bytes
      that cannot start a frame. The result is checked against :attr:`max_frame_size` here.
    * ``_make_frame(wire) -> Frame | None``: build the frame from its complete bytes (which it
      may keep as ``Frame.wire``); return ``None`` for control frames it consumed.

    After an error the decoder is poisoned: every later call raises an error of the same class
    and message, and its buffers are released.
    """

    #: True for protocols whose ``_measure`` can only say what the next step of a frame needs
    #: until the frame is complete (G3 walks its length fields one by one). Such a frame's
    #: own buffer then starts at what has arrived and the last large frame's size (the
    #: steps say nothing about its size) and doubles as it fills, instead of growing one
    #: step at a time, with one read per step.
    stepwise: bool = False

    protocol: str = ""
    #: Whether :meth:`buffer_updated` may return a :class:`~framewire.frame.FrameBlock` for
    #: frames that arrived back to back (decoders that cannot cut blocks ignore it). Off by
    #: default: only a caller that counts ``nframes`` (and publishes into a stream, which
    #: splits blocks for subscribers that cannot take them) should turn it on.
    blocks: bool = False
    #: Whether the I/O side reads with :meth:`whole_read_size` / :meth:`bytes_received`
    #: when asked to (set it before the first read; see the module docstring). Off by
    #: default: large frames are then read with a read-ahead into their own buffers.
    whole_reads: bool = False
    #: A whole read is worth making only whole: when the input holds less so far, the I/O
    #: side reads only the frame's start, and the rest into its own buffer.
    wants_whole: bool = True

    def __init__(self, *, max_frame_size: int, buffer_size: int = RECEIVE_BUFFER_SIZE) -> None:
        if max_frame_size <= 0:
            raise ValueError("max_frame_size must be positive")
        self.max_frame_size = max_frame_size
        self._buffer = bytearray(max(buffer_size, 2 * LARGE_FRAME))
        self._view = memoryview(self._buffer)
        self._start = 0
        self._end = 0
        # The receive buffer's growth: its largest size, the room the last get_buffer()
        # offered in it, and whether the last read filled that room.
        self._max_buffer = max(len(self._buffer), MAX_RECEIVE_BUFFER)
        self._offered = 0
        self._filled = False
        # A large frame being assembled in its own buffer: the buffer, the bytes filled and
        # the bytes known to be needed so far (the whole frame, or the next step of it).
        self._large: bytearray | None = None
        self._large_filled = 0
        self._large_needed = 0
        # The size of the last large frame completed: what the next one may start with.
        self._last_large = 0
        # What the partial frame in the receive buffer was last measured to need.
        self._partial_needed = 0
        # With whole reads: the size of the last large frame, when the stream is right
        # after it (nothing buffered), else 0: what whole_read_size() asks for.
        self._whole_size = 0
        # After an error: its class and message, never the exception itself (its traceback
        # would point back here and keep the buffers alive in a reference cycle).
        self._failure: tuple[type[ProtocolError], str] | None = None
        #: Set once the peer announced the end of its stream (protocols that have one).
        self.ended = False

    # -- the I/O side -----------------------------------------------------------------------

    def get_buffer(self) -> memoryview:
        """A writable buffer for the next read. Its length is the most that should be read.

        Raises the decoder's :class:`ProtocolError` again after a failure, and
        :class:`FrameTooLarge` when memory for a growing frame cannot be had.
        """
        if self._failure is not None:
            self._raise_failure()
        large = self._large
        if large is not None:
            filled = self._large_filled
            needed = self._large_needed
            # Read what the frame still needs and a little more: the start of the next frame,
            # so a stream of large frames does not take an extra read each. A stepwise frame
            # reads on past its next step, within its buffer, as far as the receive buffer
            # could take back if the frame ends sooner (not one read per step).
            if self.stepwise:
                limit = needed + len(self._buffer)
            elif self.whole_reads:  # end at the frame: the next one may come whole
                limit = needed
            else:
                limit = needed + _read_ahead(needed)
            if filled >= len(large):
                grown = max(2 * filled, filled + LARGE_FRAME)
                if self.stepwise:  # twice what has arrived, within the largest frame allowed
                    grown = min(grown, self.max_frame_size + READ_AHEAD)
                else:  # the frame's size is known: up to it
                    grown = min(grown, limit)
                large = self._grow_large(grown)
            return memoryview(large)[filled:limit]
        if self._start == self._end:
            self._start = self._end = 0
        if self._filled and len(self._buffer) < self._max_buffer:
            self._grow_receive_buffer()
        elif len(self._buffer) - self._end < LARGE_FRAME:
            # Move the partial frame (smaller than LARGE_FRAME) to the front.
            pending = self._end - self._start
            self._view[:pending] = self._view[self._start : self._end]
            self._start, self._end = 0, pending
        view = self._view[self._end :]
        self._offered = len(view)
        return view

    def buffer_updated(self, nbytes: int) -> list[Frame]:
        """Account for ``nbytes`` written into the last :meth:`get_buffer` result.

        Returns the frames completed by these bytes, oldest first. The buffer returned by
        :meth:`get_buffer` must no longer be in use.

        Raises:
            ProtocolError: the bytes are not valid for this protocol (or exceed the size limit).
                The decoder is then poisoned: every later call raises the same error.
        """
        if self._failure is not None:
            self._raise_failure()
        frames: list[Frame] = []
        self._whole_size = 0
        try:
            if self._large is not None:
                self._large_filled += nbytes
                if self._large_filled < self._large_needed or not self._finish_large(frames):
                    return frames
            else:
                self._end += nbytes
                self._filled = nbytes >= self._offered
            self._cut(frames)
            if self._large is not None:
                # Grow for a bulk stream of frames the receive buffer holds, not for one of
                # large frames (a larger gulp of one would only be copied into its own buffer).
                self._filled = False
        except ProtocolError as exc:
            self._fail(type(exc), str(exc))
            raise
        return frames

    def feed(self, data: Buffer) -> list[Frame]:
        """Decode ``data`` (any chunk of the stream); return the frames it completed."""
        if self._failure is not None:
            self._raise_failure()
        frames: list[Frame] = []
        source = memoryview(data).cast("B")
        while source:
            with self.get_buffer() as target:
                n = min(len(target), len(source))
                target[:n] = source[:n]
            source = source[n:]
            frames += self.buffer_updated(n)
        return frames

    def whole_read_size(self) -> int:
        """How many bytes the next read should take into a new bytes object of its own
        (then passed to :meth:`bytes_received`), or 0: read into :meth:`get_buffer`.

        Nonzero only with :attr:`whole_reads` on, right after a large frame that ended a
        read (nothing buffered): it is that frame's size, so the next one, if it is as
        large, arrives whole in one read. Never more than ``max_frame_size``.
        """
        return self._whole_size

    def whole_frame_size(self, head: bytes) -> int:
        """How many bytes the frame that ``head`` starts needs before it can be read whole
        into a new bytes object (for :meth:`bytes_received`), or 0: it cannot tell.

        ``head`` is the first bytes the input holds (peeked at, not taken); it is looked at
        only while :meth:`whole_read_size` asks for a read (the stream is at a frame
        boundary, nothing buffered) and only by a decoder that knows a frame's size from
        its header (not a stepwise one). Nonzero only for a large frame (over
        :data:`LARGE_FRAME`) within ``max_frame_size``: bytes that do not start a valid
        frame, or a frame over the limit, give 0, and the read that takes them fails as any
        read would. The size is what the header says, so it bounds what the I/O side waits
        for, never what it allocates: it reads only bytes that have arrived.
        """
        if not self._whole_size or self.stepwise or self._failure is not None or self.ended:
            return 0
        try:
            needed = self._measure(memoryview(head), 0, len(head))
        except ProtocolError:
            return 0
        return needed if LARGE_FRAME < needed <= self.max_frame_size else 0

    def bytes_received(self, data: bytes) -> list[Frame]:
        """Decode ``data``, read as :meth:`whole_read_size` asked (any length, not empty).

        Returns the frames it completed. When ``data`` is exactly one frame it becomes the
        frame's wire bytes, uncopied; otherwise it is taken as an ordinary read (copied into
        the decoder's buffers). Raises :class:`ProtocolError` as :meth:`buffer_updated`
        does, and poisons the decoder the same way.
        """
        if self._failure is not None:
            self._raise_failure()
        self._whole_size = 0
        if self._large is not None or self._start != self._end:
            return self.feed(data)
        frames: list[Frame] = []
        try:
            if self.ended:
                raise ProtocolError("bytes after end-of-stream")
            available = len(data)
            needed = self._check_size(self._measure(memoryview(data), 0, available))
            if needed != available:
                if needed > available and needed > LARGE_FRAME:
                    # The start of a large frame: into a buffer of its own, as a read would.
                    self._start_large(memoryview(data), 0, available, needed)
                    return frames
                return self.feed(data)
            frame = self._make_frame(data)
            if frame is not None:
                frames.append(frame)
            if needed > LARGE_FRAME:
                self._whole_size = needed
                self._last_large = needed
        except ProtocolError as exc:
            self._fail(type(exc), str(exc))
            raise
        return frames

    def end_of_input(self) -> None:
        """The input ended. Raises :class:`TruncatedFrame` if it ended inside a frame."""
        if self._failure is not None:
            self._raise_failure()
        pending = self._large_filled if self._large is not None else self._end - self._start
        if pending:
            self._fail(TruncatedFrame, f"stream ended {pending} bytes into a frame")
            self._raise_failure()

    @property
    def buffered(self) -> int:
        """Bytes received that do not yet form a complete frame."""
        return self._large_filled if self._large is not None else self._end - self._start

    @property
    def pending_frame_size(self) -> int:
        """How many bytes the frame in progress needs, as far as its bytes so far tell: its
        announced size once its header is whole (for a stepwise protocol such as G3, whose
        sizes come field by field, at least this many; while its header is incomplete, the
        header's size). 0 when no frame is in progress (nothing :attr:`buffered`)."""
        if self._large is not None:
            return self._large_needed
        return self._partial_needed if self._end > self._start else 0

    @property
    def failed(self) -> bool:
        """Whether the decoder has raised a :class:`ProtocolError` (and is now unusable)."""
        return self._failure is not None

    # -- the protocol side ------------------------------------------------------------------

    def _measure(self, view: memoryview, start: int, end: int) -> int:
        raise NotImplementedError

    def _make_frame(self, wire: bytes | bytearray) -> Frame | None:
        raise NotImplementedError

    def _check_size(self, needed: int) -> int:
        if needed > self.max_frame_size:
            raise FrameTooLarge(
                f"frame of at least {needed} bytes exceeds the maximum frame size "
                f"of {self.max_frame_size} bytes"
            )
        return needed

    # -- internals --------------------------------------------------------------------------

    def _fail(self, kind: type[ProtocolError], message: str) -> None:
        """Poison the decoder and let go of its buffers."""
        self._failure = (kind, message)
        self._whole_size = 0
        self._large = None
        self._large_filled = self._large_needed = 0
        self._buffer = bytearray()
        self._view = memoryview(self._buffer)
        self._start = self._end = 0
        self._max_buffer = 0

    def _raise_failure(self) -> None:
        assert self._failure is not None
        kind, message = self._failure
        raise kind(message)

    def _grow_receive_buffer(self) -> None:
        """Double the receive buffer (up to its largest size), keeping the pending bytes.
        Frames already cut hold copies, never views, so the old buffer is simply let go; if
        the memory cannot be had the buffer stays as it is, for good."""
        self._filled = False
        try:
            grown = bytearray(min(2 * len(self._buffer), self._max_buffer))
        except MemoryError:
            self._max_buffer = len(self._buffer)
            return
        pending = self._end - self._start
        grown[:pending] = self._view[self._start : self._end]
        self._buffer, self._view = grown, memoryview(grown)
        self._start, self._end = 0, pending

    def _grow_large(self, size: int) -> bytearray:
        """Grow the large frame's buffer to ``size`` bytes (the bytes filled are kept)."""
        large = self._large
        assert large is not None
        extra = size - len(large)
        try:
            try:
                large += bytes(extra)
            except BufferError:  # a caller still holds a view: grow into a new buffer
                grown = bytearray(size)
                grown[: self._large_filled] = memoryview(large)[: self._large_filled]
                large = self._large = grown
        except MemoryError:
            raise FrameTooLarge(
                f"cannot allocate {size} bytes for a frame of at least {self._large_needed} "
                "bytes: out of memory"
            ) from None
        return large

    def _finish_large(self, frames: list[Frame]) -> bool:
        """The large frame has the bytes it needed so far: complete it, or ask for more.

        True when the frame is complete; bytes read past its end are then moved to the
        receive buffer for :meth:`_cut`.
        """
        large = self._large
        assert large is not None
        filled = self._large_filled
        needed = self._check_size(self._measure(memoryview(large), 0, filled))
        if needed > filled:
            # A frame measured in steps (G3: key by key): wait for the next step. Its buffer
            # grows in place, when it is full, so the bytes read are not copied at every step.
            self._large_needed = needed
            return False
        surplus = filled - needed
        if self.whole_reads:
            # Read up to this frame's end and no further (a stepwise frame's buffer, sized
            # by this frame, ends there too if the next is as large): the next frame may
            # then be read whole.
            self._last_large = needed
            self._whole_size = 0 if surplus else needed
        else:
            # The next large frame may start with this one's size and read-ahead: a stream
            # of equal frames then reads each frame and the start of the next in one go.
            self._last_large = needed + _read_ahead(needed)
        self._view[:surplus] = memoryview(large)[needed:filled]
        self._start, self._end = 0, surplus
        self._large = None
        self._large_filled = self._large_needed = 0
        wire: bytes | bytearray = large
        try:
            del large[needed:]  # the frame's exact bytes, without a copy
        except BufferError:  # a caller still holds a view of the buffer: copy instead
            wire = bytes(memoryview(large)[:needed])
        else:
            # CPython keeps a bytearray's allocation when it shrinks by less than half: copy a
            # frame whose buffer holds much more than the frame, so queues count what is held.
            if large.__alloc__() - needed > (needed >> 4) + 64:
                wire = bytes(large)
        frame = self._make_frame(wire)
        if frame is not None:
            frames.append(frame)
        return True

    def _start_large(self, view: memoryview, start: int, end: int, needed: int) -> None:
        """Move the start of a large frame, ``view[start:end]``, into a buffer of its own.

        The buffer is sized by what has arrived, never by what the header announces: twice
        this frame's bytes so far, or the size of the last large frame this connection
        delivered whole (a steady stream of large frames then needs no regrowing). Raises
        :class:`FrameTooLarge` when the memory cannot be had.
        """
        available = end - start
        floor = max(2 * available, FIRST_LARGE_BUFFER, self._last_large)
        if self.stepwise:
            size = floor
        else:
            size = min(needed if self.whole_reads else needed + _read_ahead(needed), floor)
        try:
            large = bytearray(size)
        except MemoryError:
            raise FrameTooLarge(
                f"cannot allocate {size} bytes for a frame of at least "
                f"{needed} bytes: out of memory"
            ) from None
        large[:available] = view[start:end]
        self._large = large
        self._large_filled = available
        self._large_needed = needed

    def _cut(self, frames: list[Frame]) -> None:
        view = self._view
        start, end = self._start, self._end
        measure, make, limit = self._measure, self._make_frame, self.max_frame_size
        append = frames.append
        try:
            while start < end:
                if self.ended:
                    raise ProtocolError("bytes after end-of-stream")
                available = end - start
                needed = measure(view, start, end)
                if needed > limit:
                    self._check_size(needed)
                if needed > available:
                    if needed > LARGE_FRAME:
                        self._start_large(view, start, end, needed)
                        start = end
                    else:
                        self._partial_needed = needed
                    break
                frame = make(view[start : start + needed].tobytes())
                start += needed
                if frame is not None:
                    append(frame)
        finally:
            self._start, self._end = start, end
