"""ProducerSequences (framewire/protocols/nats.py): a reader's exactly-once and loss count
from the publisher's own numbers, whatever the stream holds: retries stored twice, messages
discarded, chunks and packs, restarts from a snapshot."""

from __future__ import annotations

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st

from framewire import Frame, FrameKind
from framewire.protocols.nats import (
    HEADER_MSG_ID,
    HEADER_SEQ,
    FrameLayout,
    FramePacker,
    ProducerSequences,
)


@attrs.frozen
class Stored:
    """One message as the stream holds it: its headers, and which publish it came from."""

    headers: dict[str, str]
    message: int  # index in the producer's messages
    frame: int  # the (first) frame it carries


def published(units: list[tuple[str, int]], producer: str = "p") -> list[Stored]:
    """The messages one publisher run lays out for ``units`` (("single"|"chunked"|"pack", n))."""
    layout = FrameLayout("fw.s", producer, msg_ids=True)
    packer = FramePacker(layout, max_frames=64, max_bytes=1 << 16)
    messages: list[Stored] = []
    for shape, n in units:
        if shape == "pack":
            frames = [Frame(FrameKind.DATA, "t", b"x" * 8, i) for i in range(n)]
            built = packer.units(frames, 1 << 16, lambda frame, error: None)
            parts = [message for unit in built for message in unit.messages]
        elif shape == "chunked":
            frame = Frame(FrameKind.DATA, "t", b"y" * (1000 * n), 1)
            parts = layout.messages(frame, 1400)
        else:
            parts = layout.messages(Frame(FrameKind.DATA, "t", b"z", 1), 1 << 16)
        for part in parts:
            number = int(part.headers[HEADER_MSG_ID].rpartition("-")[2])
            messages.append(Stored(dict(part.headers), number, int(part.headers[HEADER_SEQ])))
    return messages


def frames_of(messages: list[Stored]) -> dict[int, set[int]]:
    """Each frame's messages (a pack's frames all map to its one message)."""
    owners: dict[int, set[int]] = {}
    for index, stored in enumerate(messages):
        count = int(stored.headers.get("Fw-Pack", "1"))
        for frame in range(stored.frame, stored.frame + count):
            owners.setdefault(frame, set()).add(index)
    return owners


units = st.lists(
    st.tuples(st.sampled_from(["single", "chunked", "pack"]), st.integers(2, 4)),
    min_size=1,
    max_size=25,
)


@settings(max_examples=300, deadline=None)
@given(units=units, data=st.data())
def test_retries_are_dropped_and_discarded_frames_counted(
    units: list[tuple[str, int]], data: st.DataObject
) -> None:
    messages = published(units)
    # The stream: some messages discarded (neither the first, which the reader saw, since
    # a producer first seen is its own start, nor the last, which makes a gap visible),
    # and retries, each storing again a run of messages already stored, right after it.
    kept = [
        index
        for index in range(len(messages))
        if index in (0, len(messages) - 1) or not data.draw(st.booleans(), label=f"drop {index}")
    ]
    stream: list[int] = []
    for position, index in enumerate(kept):
        stream.append(index)
        if data.draw(st.integers(0, 5), label=f"retry after {index}") == 0:
            back = data.draw(st.integers(1, position + 1), label="retried messages")
            stream += kept[position - back + 1 : position + 1]
    sequences = ProducerSequences()
    delivered = []
    lost = 0
    for index in stream:
        check = sequences.check(messages[index].headers)
        lost += check.lost
        if not check.duplicate:
            delivered.append(index)
    assert delivered == kept  # each stored message once, in order
    missing = set(range(len(messages))) - set(kept)
    assert lost == sum(1 for owners in frames_of(messages).values() if owners & missing)


@settings(max_examples=200, deadline=None)
@given(units=units, data=st.data())
def test_a_reader_restarted_from_a_snapshot_at_its_ack_point_delivers_nothing_twice(
    units: list[tuple[str, int]], data: st.DataObject
) -> None:
    messages = published(units)
    cut = data.draw(st.integers(0, len(messages)), label="messages read before the crash")
    first = ProducerSequences()
    for stored in messages[:cut]:
        assert not first.check(stored.headers).duplicate
    # The reader acknowledges up to the last whole frame: before a chunked frame still coming.
    acked = cut
    while acked > 0 and not _ends_a_frame(messages[acked - 1]):
        acked -= 1
    state = first.snapshot()
    # Redelivery starts anywhere at or before the ack point (acks lost with the server).
    resume = data.draw(st.integers(0, acked), label="first message redelivered")
    second = ProducerSequences()
    assert second.restore(state)
    delivered = []
    lost = 0
    for index in range(resume, len(messages)):
        check = second.check(messages[index].headers)
        lost += check.lost
        if not check.duplicate:
            delivered.append(index)
    assert delivered == list(range(acked, len(messages)))
    assert lost == 0


def _ends_a_frame(stored: Stored) -> bool:
    chunk = stored.headers.get("Fw-Chunk")
    if chunk is None:
        return True
    index, count = chunk.split("/")
    return index == count


def test_producers_are_independent_and_the_least_recent_is_forgotten() -> None:
    a = published([("single", 1)] * 3, producer="a")
    b = published([("single", 1)] * 3, producer="b")
    sequences = ProducerSequences(max_producers=2)
    for one, other in zip(a, b, strict=True):
        assert sequences.check(one.headers).lost == 0
        assert sequences.check(other.headers).lost == 0
    assert sequences.check(a[1].headers).duplicate
    c = published([("single", 1)], producer="c")
    sequences.check(c[0].headers)  # forgets b, the least recently seen
    assert sorted(sequences.snapshot()) == ["a", "c"]
    assert not sequences.check(b[0].headers).duplicate  # not recognised: forgotten


def test_messages_without_the_headers_are_accepted_and_bad_snapshots_refused() -> None:
    sequences = ProducerSequences()
    assert not sequences.check(None).duplicate
    assert not sequences.check({"Fw-Kind": "data"}).duplicate
    assert not sequences.check({HEADER_MSG_ID: "x-1", HEADER_SEQ: "no"}).duplicate
    assert not sequences.restore({"p": [1]})
    assert not sequences.restore({"p": [1, -2]})
    assert not sequences.restore([1, 2])
    assert sequences.restore({"p": [5, 9]})
    assert sequences.check({HEADER_MSG_ID: "p-4", HEADER_SEQ: "8"}).duplicate
    check = sequences.check({HEADER_MSG_ID: "p-7", HEADER_SEQ: "12"})
    assert (check.lost, check.first_lost) == (3, 9)


header_values = st.one_of(
    st.text(max_size=30),
    st.from_regex(r"[0-9a-f]{0,14}-[0-9]{0,22}", fullmatch=True),
    st.from_regex(r"[0-9]{0,22}", fullmatch=True),
    st.from_regex(r"[0-9]{1,3}/[0-9]{1,3}", fullmatch=True),
)


@settings(max_examples=500, deadline=None)
@given(
    st.lists(
        st.dictionaries(
            st.sampled_from(["Nats-Msg-Id", "Fw-Seq", "Fw-Chunk", "Fw-Pack", "Fw-Kind"]),
            header_values,
        ),
        max_size=40,
    ),
    st.one_of(
        st.none(),
        st.dictionaries(st.text(max_size=5), st.lists(st.integers(-5, 2**70), max_size=3)),
        st.lists(st.integers()),
    ),
)
def test_any_headers_and_any_kept_state_never_raise(
    messages: list[dict[str, str]], kept: object
) -> None:
    """What any NATS client may publish, and whatever the bucket holds, is taken without an
    exception; the memory stays within its bound of producers."""
    sequences = ProducerSequences(max_producers=4)
    sequences.restore(kept)
    for headers in messages:
        check = sequences.check(headers)
        assert check.lost >= 0
    assert len(sequences) <= 4
    assert sequences.restore(sequences.snapshot())


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=70), max_size=20))
def test_any_flow_reply_is_taken_without_an_exception(replies: list[bytes]) -> None:
    import trio

    from framewire.daemon.nats._publisher import ReaderCredit

    async def main() -> None:
        credit = ReaderCredit()
        credit.sent = 1 << 30
        for reply in replies:
            credit.heard(reply)
        assert credit.readers <= len(replies)

    trio.run(main)
