"""The two loops every connection runs: frames in from a peer, frames out to a peer.

They join a :class:`Connection` to a codec and a stream; they never parse bytes themselves.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence

import trio

from ..frame import Buffer, Frame
from ..protocols import Decoder, Encoder
from .stream import Subscription, SubscriptionClosed
from .transport import Connection

__all__ = ["receive_frames", "send_subscription"]

#: The most frames and bytes one write gathers from a subscription queue.
BATCH_FRAMES = 4096
BATCH_BYTES = 4 << 20


async def receive_frames(
    connection: Connection,
    decoder: Decoder,
    publish: Callable[[Sequence[Frame]], Awaitable[None]],
    *,
    on_activity: Callable[[], None] | None = None,
) -> None:
    """Read ``connection`` until the peer closes or ends its stream; publish every frame.

    Returns normally on a clean end (EOF at a frame boundary, or the protocol's
    end-of-stream). Raises :class:`ProtocolError` for bad bytes (including EOF inside a
    frame) and trio.BrokenResourceError when the connection breaks.
    """
    while not decoder.ended:
        nbytes = await connection.receive_into(decoder.get_buffer())
        if on_activity is not None:
            on_activity()
        if nbytes == 0:
            decoder.end_of_input()
            return
        frames = decoder.buffer_updated(nbytes)
        if frames:
            await publish(frames)


async def send_subscription(
    connection: Connection,
    subscription: Subscription,
    encoder: Encoder,
    *,
    on_sent: Callable[[int, int], None] | None = None,
    send_timeout: float = math.inf,
) -> SubscriptionClosed:
    """Send everything ``subscription`` yields until it closes; return why it closed.

    Frames are drained in batches and written with one (gather) write per batch. When the
    subscription ends gracefully the protocol's end-of-stream marker is sent. Raises
    trio.BrokenResourceError if the peer goes away, trio.TooSlowError if one write takes
    longer than ``send_timeout`` (the connection is then unusable), ValueError if a frame
    cannot be encoded.
    """
    encode_batch = encoder.encode_batch
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
        buffers: list[Buffer] = encode_batch(batch)
        with trio.fail_after(send_timeout):
            await connection.send(buffers)
        if on_sent is not None:
            on_sent(len(batch), subscription.last_batch_bytes)
