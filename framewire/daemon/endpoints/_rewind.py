"""Rewind for native clients of a server: the request, its checks, and the replay from the
stream's history up to a seam with the live stream.

The protocol (docs/protocol.md, "Requests and notices"): right after connecting (after the
TLS handshake), a client may send one REQUEST frame (kind ``0x82``, headers only). A server
whose stream keeps a history waits :data:`REQUEST_WAIT` for it (a client that sends
nothing, as every client before this request existed, is then served as ever, that much
later); other servers do not wait and never read it. The server answers a rewind request
with one NOTICE frame (kind ``0x83``) before any frame: ``notice = rewind`` and where the
replay starts, or ``notice = refused`` and why (then END_OF_STREAM, and the connection
closes).

The seam: the replay reads the history up to what is written, then again from there while
much more has come in since; then, in one step without a checkpoint, it subscribes the
client to the live stream (without the metadata cache: the history carried the metadata)
and notes the history's next sequence number. It waits for the writer to have written
everything below that number, replays up to it, and hands the live subscription to the
ordinary writer. Every frame published is numbered in the history as it is published, so
a frame is either below the seam (replayed) or after it (live): no gap, no duplicate.
Frames the history lost on the way in (its writer was behind) are missing from the replay
and counted (``detail.rewind_frames_missed``).

Rate: ``full`` sends the history as fast as the client takes it; ``original`` (or a factor
``F``: F times the original speed) paces every frame the replay reads by its arrival time,
the frames that reached the history while the replay ran included, up to the seam; after
the seam the live stream flows as it comes. At a factor above 1 the replay gains on the
live stream and reaches the seam (once fewer than :data:`CATCH_UP_FRAMES` frames are left);
at ``original`` it keeps the distance it started with: the client gets a copy of the stream
delayed by that much, read from the history, and joins the live stream only if the stream
pauses long enough (or holds fewer frames than that over the distance).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Final

import attrs
import trio

from ...frame import Buffer, Frame
from ...protocols import ProtocolError
from ...protocols.native import (
    END_OF_STREAM,
    KIND_NOTICE,
    KIND_REQUEST,
    MAX_CONTROL_SIZE,
    NativeEncoder,
    control_size,
    encode_control,
    parse_control,
)
from ...spool import HistoryReader, SpoolError
from ..history import HistoryWriter
from ..stream import Subscription
from ..transport import Connection

__all__ = [
    "CATCH_UP_FRAMES",
    "MAX_RATE",
    "REQUEST_WAIT",
    "GapReporter",
    "RewindRefused",
    "RewindRequest",
    "parse_rewind",
    "read_request",
    "replay_history",
]

#: How long a server whose stream keeps a history waits for a client's REQUEST (seconds).
REQUEST_WAIT: Final = 0.25
#: The fastest paced replay (times the original speed) a client may ask for.
MAX_RATE: Final = 1000.0
#: A time asked for may lie this far (ns) after the server's now (clocks differ a little).
FUTURE_SLACK_NS: Final = 1_000_000_000
#: While more than this many frames came in after the part replayed, read the history
#: again before joining the live stream (which queues what comes during the last part).
CATCH_UP_FRAMES: Final = 1024
_BATCH_FRAMES: Final = 1024
#: A replay reads about this much, then sends it (one gather write).
_BATCH_BYTES: Final = 1 << 20
#: A replay yields to the other tasks at least once every this many batches.
_YIELD_BATCHES: Final = 16


class RewindRefused(Exception):
    """A rewind request the server will not serve; the message says why."""


@attrs.frozen
class RewindRequest:
    """A checked rewind request: where to start (nanoseconds since the epoch, on the
    server's arrival clock) and the pace (0: full speed; else times the original)."""

    since_ns: int
    rate: float
    #: Whether the client asked (it gets a NOTICE first); a server's ``replay`` gives every
    #: client a rewind it did not ask for, and answers nothing.
    answer: bool = True


async def read_request(connection: Connection) -> dict[str, str] | None:
    """The headers of the REQUEST frame the client sends first, or None if it sends none
    within :data:`REQUEST_WAIT` (or sends something else first: that is given back to the
    connection untouched). Raises :class:`ProtocolError` for a malformed request and
    trio.BrokenResourceError if the connection broke."""
    data = b""
    for attempt in range(2):
        with trio.move_on_after(REQUEST_WAIT) as waited:
            while len(data) < 28:
                more = await connection.receive_bytes(MAX_CONTROL_SIZE - len(data))
                if not more:
                    break
                data += more
                if data[:2] != b"FW"[: len(data)]:
                    break
        # Bytes the kernel holds as the wait ended (a stalled machine) are read after all.
        if attempt or not waited.cancelled_caught or not connection.bytes_waiting():
            break
    if len(data) < 28:
        if data:
            connection.give_back(data)
        return None
    size = control_size(data)
    if size is None:
        connection.give_back(data)
        return None
    with trio.fail_after(REQUEST_WAIT * 4):
        while len(data) < size:
            more = await connection.receive_bytes(size - len(data))
            if not more:
                raise ProtocolError("the connection ended inside a request")
            data += more
    if len(data) > size:
        connection.give_back(data[size:])
    return parse_control(data[:size], KIND_REQUEST)


def parse_rewind(headers: Mapping[str, str], now_ns: int) -> RewindRequest | None:
    """The rewind a request asks for (None if it asks for none). ``since_ns`` is a time,
    ``ago_ns`` a span before ``now_ns``; ``rate`` is ``full`` (the default), ``original``
    or a factor. Raises :class:`RewindRefused` for a time in the future, a negative span,
    both or neither given with a rate, a rate that is not a number in (0, MAX_RATE]."""
    since, ago, rate_text = headers.get("since_ns"), headers.get("ago_ns"), headers.get("rate")
    if since is None and ago is None:
        if rate_text is not None:
            raise RewindRefused("a rate without since_ns or ago_ns")
        return None
    if since is not None and ago is not None:
        raise RewindRefused("give since_ns or ago_ns, not both")
    try:
        value = int(since if since is not None else ago)  # type: ignore[arg-type]
    except ValueError:
        raise RewindRefused(f"not a whole number of nanoseconds: {since or ago!r}") from None
    if ago is not None:
        if value < 0:
            raise RewindRefused(f"ago_ns {value} is negative")
        start = now_ns - value
    else:
        start = value
        if start > now_ns + FUTURE_SLACK_NS:
            raise RewindRefused(
                f"since_ns {start} is {(start - now_ns) / 1e9:.3f}s in the future (the "
                "server's clock)"
            )
    return RewindRequest(start, _parse_rate(rate_text))


def _parse_rate(text: str | None) -> float:
    if text is None or text == "full":
        return 0.0
    if text == "original":
        return 1.0
    try:
        rate = float(text)
    except ValueError:
        raise RewindRefused(f"rate {text!r}: expected full, original or a factor") from None
    if not (0 < rate <= MAX_RATE) or math.isnan(rate):
        raise RewindRefused(f"rate {text!r}: a factor must be above 0 and at most {MAX_RATE:g}")
    return rate


def notice(headers: Mapping[str, str]) -> bytes:
    """A NOTICE frame."""
    return encode_control(KIND_NOTICE, headers)


async def refuse(connection: Connection, reason: str) -> None:
    """Tell the client its request is refused (a NOTICE, then END_OF_STREAM)."""
    with trio.move_on_after(REQUEST_WAIT * 4):
        await connection.send([notice({"notice": "refused", "reason": reason}), END_OF_STREAM])


class _Pacer:
    """When each replayed frame is due on trio's clock: every frame the replay reads from
    the history, those that arrived while it ran included, keeps its spacing from the start
    (divided by ``rate``)."""

    def __init__(self, rate: float, start_ns: int) -> None:
        self.rate = rate
        self.start_ns = start_ns
        self.t0 = trio.current_time()

    def due(self, arrival_ns: int) -> float:
        return self.t0 + (arrival_ns - self.start_ns) / 1e9 / self.rate


async def _replay(
    reader: HistoryReader,
    send: Callable[[list[Frame]], Awaitable[None]],
    pace: _Pacer | None,
) -> int:
    """Send what ``reader`` reads, paced or not; return the sequence number it ends at.

    Each batch (about :data:`_BATCH_BYTES`) is read on this thread, from the page cache
    (:meth:`~framewire.spool.HistoryReader.read_nowait`), then sent, as ``cat | nc`` does:
    the bytes a read copies out are still in this core's cache when they are sent. Only a
    read that would wait for the disk (or open the next segment) goes to a worker thread,
    so a cold disk never holds up the event loop. Every frame owns its bytes: nothing sent
    refers to the reader's buffer.
    """
    try:
        for count in itertools.count(1):
            batch = reader.read_nowait(_BATCH_FRAMES, _BATCH_BYTES)
            if batch is None:
                batch = await trio.to_thread.run_sync(reader.read, _BATCH_FRAMES, _BATCH_BYTES)
            if not batch:
                break
            await _send_batch(batch, send, pace)
            if not count % _YIELD_BATCHES:
                # A send yields, but one that had nothing to write (every frame left out as
                # unencodable, or a session header again) does not.
                await trio.lowlevel.checkpoint()
    finally:
        reader.close()
    return reader.end_seq


async def _send_batch(
    batch: list[tuple[int, Frame]],
    send: Callable[[list[Frame]], Awaitable[None]],
    pace: _Pacer | None,
) -> None:
    if pace is None:
        await send([frame for _, frame in batch])
        return
    pending: list[Frame] = []
    for arrival, frame in batch:
        due = pace.due(arrival)
        if due > trio.current_time():
            if pending:
                await send(pending)
                pending = []
            await trio.sleep_until(due)
        pending.append(frame)
    if pending:
        await send(pending)


async def replay_history(
    connection: Connection,
    writer: HistoryWriter,
    request: RewindRequest,
    subscribe: Callable[[], Subscription],
    send: Callable[[list[Frame]], Awaitable[None]],
) -> tuple[Subscription, int]:
    """Serve ``request``: a NOTICE saying where the replay starts, the metadata current
    there, the history up to the seam (see the module docstring), through ``send``; then
    return the live subscription ``subscribe()`` made at the seam, and how many frames of
    the range the history could not give (lost on the way in, or trimmed meanwhile).

    Raises :class:`~framewire.spool.SpoolError` if the history closed (the daemon is
    stopping) or a read failed, and what ``send`` raises; the subscription, if made, is
    closed then.
    """
    now = writer.clock()
    reader = await writer.reader(request.since_ns, writer.written)
    headers = {
        "notice": "rewind",
        "asked_ns": str(request.since_ns),
        "start_ns": str(reader.start_ns or now),
        "rate": "full" if not request.rate else f"{request.rate:g}",
    }
    if reader.clamped is not None:
        headers["clamped"] = "1"  # the history starts later than asked
    if request.answer:
        await connection.send([notice(headers)])
    pace = _Pacer(request.rate, reader.start_ns or now) if request.rate else None
    missed = 0
    history = writer.history
    position = await _replay(reader, send, pace)
    missed += reader.frames_missed
    while writer.assigned - position > CATCH_UP_FRAMES:
        if writer.written <= position:
            await writer.wait_written(position + 1)
            if writer.history_closed:
                raise SpoolError(f"history {history.path} is closed")
        reader = await trio.to_thread.run_sync(history.reader_from, position, writer.written)
        position = await _replay(reader, send, pace)
        missed += reader.frames_missed
    # The seam: subscribe and read the history's end in one step (no checkpoint between).
    subscription = subscribe()
    seam = writer.assigned
    try:
        await writer.wait_written(seam)
        reader = await trio.to_thread.run_sync(history.reader_from, position, seam)
        await _replay(reader, send, pace)
        missed += reader.frames_missed
    except BaseException:
        subscription.close("the rewind failed")
        raise
    return subscription, missed


class GapReporter(NativeEncoder):
    """A native encoder for a client that asked for gaps: before the first batch after its
    subscription dropped frames, a ``gap`` NOTICE with how many frames and bytes were
    dropped, between the timestamp of the last DATA frame sent (``after_ns``; a block's
    first frame's) and that of the next (``before_ns``). A lossy queue drops its oldest
    frames, so the loss lies exactly between the last batch sent and the next one."""

    def __init__(self, subscription: Subscription) -> None:
        self.subscription = subscription
        self._frames = subscription.frames_dropped
        self._bytes = subscription.bytes_dropped
        self._last_ns = 0

    def encode_batch(self, frames: Iterable[Frame]) -> list[Buffer]:
        frames = list(frames)
        out = super().encode_batch(frames)  # first: it raises for an unencodable frame
        subscription = self.subscription
        data = [frame.timestamp for frame in frames if not frame.is_metadata]
        lost = subscription.frames_dropped - self._frames
        if lost:
            nbytes = subscription.bytes_dropped - self._bytes
            self._frames, self._bytes = subscription.frames_dropped, subscription.bytes_dropped
            headers = {
                "notice": "gap",
                "frames": str(lost),
                "bytes": str(nbytes),
                "after_ns": str(self._last_ns),
                "before_ns": str(data[0] if data else 0),
            }
            out.insert(0, notice(headers))
        if data:
            self._last_ns = data[-1]
        return out
