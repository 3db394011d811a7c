"""Frame blocks: native DATA frames that arrived back to back move through a stream as one
object, and every guarantee still holds frame by frame (counters, bounds, metadata, drops)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from framewire import Frame, FrameKind
from framewire.daemon.endpoints.server import ServerEndpoint
from framewire.daemon.stream import Policy, QueueBounds, Stream, Subscription
from framewire.frame import FrameBlock, frame_count
from framewire.protocols import ProtocolError
from framewire.protocols.native import (
    MAX_BLOCK_BYTES,
    MAX_BLOCK_FRAMES,
    NativeBlock,
    NativeDecoder,
)

from .helpers import connect, encode, port_of, running_daemon, wait_until

DATA, META = FrameKind.DATA, FrameKind.METADATA


def sample(i: int, size: int = 64, type_: str = "sample") -> Frame:
    return Frame(DATA, type_, bytes([i % 251]) * size, timestamp=1_000 + i)


def decode(wire: bytes, step: int, *, blocks: bool) -> list[Frame]:
    decoder = NativeDecoder(max_frame_size=1 << 22)
    decoder.blocks = blocks
    out: list[Frame] = []
    for start in range(0, len(wire), step):
        out += decoder.feed(wire[start : start + step])
    decoder.end_of_input()
    return out


def flatten(frames: list[Frame]) -> list[Frame]:
    out: list[Frame] = []
    for frame in frames:
        out += frame.frames() if isinstance(frame, FrameBlock) else [frame]
    return out


def block_of(frames: list[Frame]) -> NativeBlock:
    """The frames, which must be uniform DATA frames of one type, cut as one block."""
    (block,) = decode(encode(frames) + encode([Frame(META, "end", b"")]), 1 << 20, blocks=True)[:1]
    assert isinstance(block, NativeBlock)
    assert block.nframes == len(frames)
    return block


MIXED = (
    [sample(i) for i in range(300)]  # a uniform run, longer than one block
    + [Frame(META, "calibration", b"c1", 5)]  # metadata in the middle
    + [sample(i, size=i % 37) for i in range(60)]  # same type, varying lengths
    + [sample(i, type_="other") for i in range(5)]  # another type
    + [Frame(DATA, "sample", b"h", 7, {"unit": "K"})]  # headers: never in a block
    + [sample(i, size=70_000) for i in range(3)]  # large frames: never in a block
    + [sample(i, size=300) for i in range(40)]
)


@pytest.mark.parametrize("step", [1 << 20, 4096, 1000, 97, 29])
def test_blocks_split_back_into_exactly_the_frames_sent(step: int) -> None:
    wire = encode(MIXED)
    plain = decode(wire, step, blocks=False)
    cut = decode(wire, step, blocks=True)
    assert plain == MIXED
    assert flatten(cut) == MIXED
    assert frame_count(cut) == len(MIXED)
    for frame in cut:
        if isinstance(frame, FrameBlock):
            # Only DATA, never more than a block's bounds, its own bytes (not a view on the
            # receive buffer), and exactly its frames' wire bytes back to back.
            assert frame.kind is DATA
            assert 1 < frame.nframes <= MAX_BLOCK_FRAMES
            assert type(frame.wire) is bytes
            assert frame.size == len(frame.wire) <= MAX_BLOCK_BYTES
            assert frame.wire == b"".join(bytes(f.wire or b"") for f in frame.frames())
    if step >= 4096:
        assert any(isinstance(frame, FrameBlock) for frame in cut)
    metadata = [frame for frame in cut if frame.kind is META]
    assert [frame.type for frame in metadata] == ["calibration"]
    assert not isinstance(metadata[0], FrameBlock)


def test_a_run_stops_at_a_frame_that_differs_in_any_header_byte() -> None:
    frames = [sample(i) for i in range(40)]
    wire = bytearray(encode(frames))
    size = len(wire) // len(frames)
    wire[20 * size + 3] = 1  # frame 20's kind: METADATA
    cut = decode(bytes(wire), 1 << 20, blocks=True)
    assert [(type(f).__name__, f.nframes, f.kind) for f in cut] == [
        ("NativeBlock", 20, DATA),
        ("Frame", 1, META),
        ("NativeBlock", 19, DATA),
    ]


@pytest.mark.parametrize("offset", [0, 2, 5, 6, 8])  # magic, version, flags, count, headers
def test_a_bad_frame_after_a_run_is_still_refused(offset: int) -> None:
    frames = [sample(i) for i in range(40)]
    wire = bytearray(encode(frames))
    wire[30 * (len(wire) // len(frames)) + offset] ^= 0x40
    with pytest.raises(ProtocolError):
        decode(bytes(wire), 1 << 20, blocks=True)


@pytest.mark.parametrize("step", [1 << 20, 1000])
def test_a_stream_without_runs_is_decoded_frame_by_frame_then_runs_are_blocks_again(
    step: int,
) -> None:
    alternating = [sample(i, type_=("a", "b")[i % 2]) for i in range(500)]
    pairs = [sample(i, type_=("a", "b")[i // 2 % 2]) for i in range(100)]
    run = [sample(i) for i in range(300)]
    frames = alternating + pairs + run + alternating
    cut = decode(encode(frames), step, blocks=True)
    assert flatten(cut) == frames
    # Runs too short to pay for a block are single frames; the long run is blocks again
    # (after the tries that failed during the alternation, it is found within 64 frames).
    blocks = [frame for frame in cut if isinstance(frame, FrameBlock)]
    assert all(block.type == "sample" for block in blocks)
    assert frame_count(blocks) >= 300 - 64


def test_block_decoding_is_off_by_default() -> None:
    cut = decode(encode([sample(i) for i in range(50)]), 1 << 20, blocks=False)
    assert not any(isinstance(frame, FrameBlock) for frame in cut)


# -- streams ------------------------------------------------------------------------------


async def drain(subscription: Subscription) -> list[Frame]:
    out: list[Frame] = []
    with trio.fail_after(5):
        while subscription.queued_frames:
            out += await subscription.receive_batch()
    return out


async def test_a_lossy_queue_drops_whole_blocks_and_counts_their_frames() -> None:
    stream = Stream("s")
    sub = stream.subscribe(bounds=QueueBounds(max_frames=80), blocks_of="native")
    blocks = [block_of([sample(10 * b + i) for i in range(10)]) for b in range(10)]
    await stream.publish(blocks)
    assert stream.frames_in == 100
    assert sub.queued_frames == 80
    assert sub.frames_dropped == 20
    assert sub.bytes_dropped == blocks[0].size + blocks[1].size
    assert sub.queued_bytes == sum(block.size for block in blocks[2:])
    got = await drain(sub)
    assert got == blocks[2:]  # the oldest went first; the blocks themselves, not copies
    assert all(a is b for a, b in zip(got, blocks[2:], strict=True))
    assert sub.frames_out == 80
    assert sub.queued_frames == sub.queued_bytes == 0


async def test_a_lossy_queue_never_drops_metadata_published_between_blocks() -> None:
    stream = Stream("s")
    sub = stream.subscribe(bounds=QueueBounds(max_frames=40), blocks_of="native")
    calibration = Frame(META, "calibration", b"c1", 5)
    first = [block_of([sample(i) for i in range(5)]) for _ in range(3)]
    second = [block_of([sample(i) for i in range(5)]) for _ in range(8)]
    await stream.publish([*first, calibration, *second])
    got = await drain(sub)
    # The oldest data went, block by block, to stay within 40 frames; the metadata stayed.
    assert got == [calibration, *second[1:]]
    assert sub.frames_dropped == 20
    assert frame_count(got) == 36
    # The metadata reached the cache as a frame: a late joiner gets it first.
    late = stream.subscribe(blocks_of="native")
    assert await drain(late) == [calibration]


async def test_subscribers_that_cannot_take_a_block_get_its_frames() -> None:
    stream = Stream("s")
    frames = [sample(i) for i in range(12)]
    plain = stream.subscribe()  # another protocol: it re-encodes every frame
    decimating = stream.subscribe(blocks_of="native", decimate={"sample": 4})
    small = stream.subscribe(blocks_of="native", bounds=QueueBounds(max_frames=64))
    whole = stream.subscribe(blocks_of="native")
    lossless = stream.subscribe(policy=Policy.LOSSLESS)
    lossless_decimating = stream.subscribe(
        policy=Policy.LOSSLESS, blocks_of="native", decimate={"sample": 3}
    )
    block = block_of(frames)
    await stream.publish([block])
    for sub in (plain, small, lossless):
        got = await drain(sub)
        assert got == frames
        assert not any(isinstance(f, FrameBlock) for f in got)
    assert await drain(decimating) == frames[3::4]
    assert decimating.frames_decimated == 9
    assert await drain(lossless_decimating) == frames[2::3]
    assert await drain(whole) == [block]
    assert whole.frames_out == plain.frames_out == 12


async def test_a_lossless_queue_is_bounded_in_frames_when_it_holds_blocks() -> None:
    stream = Stream("s")
    sub = stream.subscribe(
        bounds=QueueBounds(max_frames=80), policy=Policy.LOSSLESS, blocks_of="native"
    )
    blocks = [block_of([sample(10 * b + i) for i in range(10)]) for b in range(12)]
    published = trio.Event()

    async def publish() -> None:
        await stream.publish(blocks)
        published.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(publish)
        await trio.testing.wait_all_tasks_blocked()
        assert not published.is_set()
        assert sub.queued_frames == 80
        got = await sub.receive_batch(max_frames=25)
        # A block that would pass max_frames waits for the next batch.
        assert got == blocks[:2]
        assert sub.last_batch_frames == 20
        with trio.fail_after(5):
            while frame_count(got) < 120:
                got += await sub.receive_batch()
            await published.wait()
    assert got == blocks
    assert sub.frames_out == 120
    assert sub.frames_dropped == 0


# -- through the daemon -------------------------------------------------------------------

CONFIG = """
[endpoints.in]
kind = "receiver"
listen = "tcp://127.0.0.1:0"
stream = "camera"

[endpoints.out]
kind = "server"
listen = "tcp://127.0.0.1:0"
stream = "camera"
policy = "{policy}"
"""


@pytest.mark.parametrize("policy", ["lossy", "lossless"])
async def test_relayed_blocks_arrive_byte_identical_with_exact_counters(policy: str) -> None:
    frames = [sample(i) for i in range(1000)]
    frames[400:400] = [Frame(META, "calibration", b"c1", 5)]
    async with running_daemon(CONFIG.format(policy=policy)) as daemon:
        server, receiver = daemon.endpoints["out"], daemon.endpoints["in"]
        assert isinstance(server, ServerEndpoint)
        client = await connect(port_of(server.status.address[0]))
        await wait_until(lambda: len(server.status.clients) == 1)
        producer = await connect(port_of(receiver.status.address[0]))
        await producer.send(frames)
        with trio.fail_after(10):
            got = await client.read(len(frames))
        assert got == frames
        assert bytes(client.raw) == encode(frames)
        (info,) = server.status.clients.values()
        await wait_until(lambda: info.frames_sent == len(frames))
        assert info.bytes_sent == len(client.raw)
        assert server.status.frames_out == len(frames)
        assert receiver.status.frames_in == len(frames)
        assert receiver.status.bytes_in == len(client.raw)
        assert daemon.streams.get("camera").frames_in == len(frames)
        await producer.stream.aclose()
        await client.stream.aclose()
