"""The two loops every connection runs: frames in from a peer, frames out to a peer.

They join a :class:`Connection` to a codec and a stream; they never parse bytes themselves.
"""

from __future__ import annotations

import logging
import math
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import trio

from .. import protocols
from ..frame import Buffer, Frame, frame_count
from ..protocols import Decoder, Encoder
from .frametimeout import FrameClock
from .stream import Subscription, SubscriptionClosed
from .transport import Connection

__all__ = ["receive_frames", "send_frames", "send_subscription"]

#: Where close_when_peer_leaves reads what listening peers send, for all of them at once.
_DISCARDED: Final = memoryview(bytearray(4096))
#: The most frames and bytes one write gathers from a subscription queue.
BATCH_FRAMES = 4096
BATCH_BYTES = 4 << 20


def make_decoder(
    protocol: str, max_frame_size: int, verify_crc: bool = False, *, blocks: bool = False
) -> Decoder:
    """A decoder for ``protocol``; ``verify_crc`` only for protocols that have a CRC.

    With ``blocks`` a decoder that can cut :class:`~framewire.frame.FrameBlock` objects does
    (the caller must count ``nframes``: :func:`framewire.frame.frame_count`).
    """
    spec = protocols.get(protocol)
    if verify_crc:
        decoder = spec.make_decoder(max_frame_size, verify_crc=True)
    else:
        decoder = spec.make_decoder(max_frame_size)
    if blocks and isinstance(decoder, protocols.FrameDecoder):
        decoder.blocks = True
    return decoder


class UnencodableFrames:
    """Counts frames a protocol cannot carry, and logs the first of each type once."""

    def __init__(self, log: logging.Logger, protocol: str, detail: dict[str, object]) -> None:
        self.log = log
        self.protocol = protocol
        self.count = 0
        self._detail = detail
        self._types: set[str] = set()

    def __call__(self, frame: Frame, error: ValueError) -> None:
        self.count += 1
        self._detail["frames_unencodable"] = self.count
        if frame.type not in self._types and len(self._types) < 1024:
            self._types.add(frame.type)
            self.log.warning("dropping %r frames: not %s (%s)", frame.type, self.protocol, error)


def encode_frames(
    encoder: Encoder,
    frames: Sequence[Frame],
    unencodable: Callable[[Frame, ValueError], None],
) -> list[Buffer]:
    """Encode ``frames``; a frame the protocol cannot carry is left out and reported."""
    try:
        return encoder.encode_batch(frames)
    except ValueError:
        out: list[Buffer] = []
        for frame in frames:
            try:
                encoder.encode_into(frame, out)
            except ValueError as exc:
                unencodable(frame, exc)
        return out


async def send_frames(
    connection: Connection,
    encoder: Encoder,
    frames: Sequence[Frame],
    unencodable: Callable[[Frame, ValueError], None],
    *,
    send_timeout: float = math.inf,
    nframes: int | None = None,
) -> tuple[int, int]:
    """Encode ``frames`` and write them with one (gather) write. ``nframes``: how many frames
    ``frames`` stand for, when the caller knows (else counted here).

    Bytes a direct write left unsent (:meth:`Connection.write_nowait`) go first (they were
    counted when it began). Returns the frames and bytes actually written (a block counts
    its frames): a frame the protocol cannot carry is left out, reported to ``unencodable``
    and not counted. Raises
    trio.BrokenResourceError if the peer is gone and trio.TooSlowError if the write takes
    longer than ``send_timeout`` (the connection is then unusable).
    """
    skipped = 0

    def skip(frame: Frame, error: ValueError) -> None:
        nonlocal skipped
        skipped += 1
        unencodable(frame, error)

    buffers = encode_frames(encoder, frames, skip)
    before = connection.bytes_sent
    if buffers or connection.has_unsent:
        if send_timeout == math.inf:  # no cancel scope per write where none is needed
            await connection.send(buffers)
        else:
            with trio.fail_after(send_timeout):
                await connection.send(buffers)
    if nframes is None:
        nframes = frame_count(frames)
    return nframes - skipped, connection.bytes_sent - before


async def _finish_write(connection: Connection, send_timeout: float) -> None:
    """Write what a direct write left unsent on ``connection`` (already counted)."""
    if send_timeout == math.inf:
        await connection.send(())
    else:
        with trio.fail_after(send_timeout):
            await connection.send(())


async def receive_frames(
    connection: Connection,
    decoder: Decoder,
    publish: Callable[[Sequence[Frame]], Awaitable[None]],
    *,
    on_activity: Callable[[], None] | None = None,
    frame_clock: FrameClock | None = None,
) -> None:
    """Read ``connection`` until the peer closes or ends its stream; publish every frame.

    With ``frame_clock`` the clock knows, after every read, whether a frame is in progress
    (and the connection tells it when a whole read waits for a frame whose start arrived):
    see :mod:`~framewire.daemon.frametimeout`. Returns normally on a clean end (EOF at a
    frame boundary, or the protocol's end-of-stream). Raises :class:`ProtocolError` for bad
    bytes (including EOF inside a frame) and trio.BrokenResourceError when the connection
    breaks.
    """
    read = connection.frame_reader(decoder)
    if frame_clock is not None:
        connection.frame_waiting = frame_clock.frame_waiting
    while not decoder.ended:
        nbytes, frames = await read()
        if on_activity is not None:
            on_activity()
        if nbytes == 0:
            decoder.end_of_input()
            return
        if frames:
            if frame_clock is not None:
                frame_clock.frames_done()
            await publish(frames)
        if frame_clock is not None:
            frame_clock.reading(decoder.buffered)


async def send_subscription(
    connection: Connection,
    subscription: Subscription,
    encoder: Encoder,
    *,
    unencodable: Callable[[Frame, ValueError], None],
    on_sent: Callable[[int, int], None] | None = None,
    send_timeout: float = math.inf,
) -> SubscriptionClosed:
    """Send everything ``subscription`` yields until it closes; return why it closed.

    Frames are drained in batches and written with one (gather) write per batch; after each
    write ``on_sent(frames, nbytes)`` gets what was written (frames the protocol cannot carry
    are not). An empty batch (the subscription's direct writer left part of a write to this
    task: see :class:`~framewire.daemon.stream.DirectWrite`) finishes that write; its frames
    and bytes were counted when it began. When the subscription
    ends gracefully the protocol's end-of-stream marker is sent. Raises
    trio.BrokenResourceError if the peer goes away, trio.TooSlowError if one write takes
    longer than ``send_timeout`` (the connection is then unusable), ValueError if a frame
    cannot be encoded.
    """
    while True:
        try:
            batch = await subscription.receive_batch(BATCH_FRAMES, BATCH_BYTES)
        except SubscriptionClosed as closed:
            if closed.graceful:
                marker = encoder.end_of_stream()
                if marker:
                    with trio.fail_after(send_timeout):
                        await connection.send([marker])
            return closed
        if not batch:
            await _finish_write(connection, send_timeout)
            continue
        frames, nbytes = await send_frames(
            connection,
            encoder,
            batch,
            unencodable,
            send_timeout=send_timeout,
            nframes=subscription.last_batch_frames,
        )
        if on_sent is not None:
            on_sent(frames, nbytes)


async def close_when_peer_leaves(
    connection: Connection,
    cancel_scope: trio.CancelScope,
    *,
    on_input: Callable[[int], None] | None = None,
) -> None:
    """For peers that only listen: read and discard; on their EOF (or an error) cancel.

    Run it beside a writer, in the nursery whose ``cancel_scope`` this is, so a peer that
    hangs up is noticed at once even when there is nothing to send. With ``on_input`` the
    peer may not send anything at all: the first bytes it sends are reported to
    ``on_input(nbytes)`` and the scope is cancelled (the caller then closes the connection).
    """
    buffer = _DISCARDED  # shared: what listeners send is never looked at
    try:
        while nbytes := await connection.receive_into(buffer):
            if on_input is not None:
                on_input(nbytes)
                break
    except trio.BrokenResourceError:
        pass
    cancel_scope.cancel()


def first_error(group: BaseExceptionGroup[BaseException]) -> str:
    """The message of the first exception in ``group``, for a log line."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return describe_loss(exc)


def describe_loss(exc: BaseException) -> str:
    """Why a connection was lost, for a log line: the first cause with something to say
    (trio's BrokenResourceError often says nothing itself; the OS or TLS error it was raised
    from does), never an empty text."""
    seen = 0
    cause: BaseException | None = exc
    while cause is not None and seen < 8:
        seen += 1
        if isinstance(cause, ssl.SSLEOFError) or (
            isinstance(cause, ssl.SSLError) and "EOF" in str(cause)
        ):
            return "the peer closed the TLS connection without saying so (no close_notify)"
        if isinstance(cause, ssl.SSLError):
            return f"TLS: {cause.reason or cause}".lower()
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror.lower()
        text = str(cause)
        if text:
            return text
        cause = cause.__cause__ or cause.__context__
    return f"{type(exc).__name__} (no reason given)"
