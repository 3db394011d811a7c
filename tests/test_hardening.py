"""Hostile producers against a live in-process daemon: slots, metadata bounds, memory release.

Each test drives the daemon through its listening sockets, as a hostile or confused peer
would, and checks the promise that matters: a bad connection costs only itself.
"""

from __future__ import annotations

import gc
import logging
import struct
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from framewire import Frame, FrameKind
from framewire.daemon import Daemon, flow
from framewire.daemon.endpoints import receiver as receiver_module
from framewire.daemon.status import build_snapshot
from framewire.protocols import Decoder, g3

from .g3frames import g3_frame
from .helpers import connect, endpoint_port, port_of, running_daemon, wait_until

CONFIG = """
[streams.camera]
max_metadata_types = 8
max_metadata_bytes = "64KiB"

[endpoints.in]
kind = "receiver"
listen = "tcp://127.0.0.1:0"
stream = "camera"
protocol = "{protocol}"
max_clients = 3

[endpoints.out]
kind = "server"
listen = "tcp://127.0.0.1:0"
stream = "camera"
"""


def config(protocol: str = "native") -> str:
    return CONFIG.format(protocol=protocol)


def ports(daemon: Daemon) -> tuple[int, int]:
    endpoints = daemon.endpoints
    return port_of(endpoints["in"].status.address[0]), port_of(endpoints["out"].status.address[0])


def data(i: int) -> Frame:
    return Frame(FrameKind.DATA, "sample", i.to_bytes(4, "big") * 16, timestamp=i)


def meta(type_: str, size: int = 100) -> Frame:
    return Frame(FrameKind.METADATA, type_, b"m" * size)


def producers(daemon: Daemon) -> int:
    return len(daemon.endpoints["in"].status.clients)


# -- slots: silent connections cannot lock producers out ------------------------------------


async def test_silent_connections_yield_their_slots_to_a_producer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with running_daemon(config()) as daemon:
        port_in, port_out = ports(daemon)
        client = await connect(port_out)
        await wait_until(lambda: len(daemon.endpoints["out"].status.clients) == 1)
        silent = [await trio.open_tcp_stream("127.0.0.1", port_in) for _ in range(3)]
        await wait_until(lambda: producers(daemon) == 3)
        # Every slot is taken by a connection that sent nothing; a producer still gets in.
        producer = await connect(port_in)
        await producer.send([data(1)])
        with trio.fail_after(10):
            assert await client.read(1) == [data(1)]
        # The oldest silent connection made room, and was told so by being closed.
        with trio.fail_after(10):
            assert await silent[0].receive_some(10) == b""
        assert any("to make room for" in r.getMessage() for r in caplog.records)
        # Two more producers take the other silent connections' slots; once every
        # connection has proven itself, newcomers are refused instead.
        proven = [producer]
        for i in range(2):
            extra = await connect(port_in)
            await extra.send([data(10 + i)])
            proven.append(extra)
        with trio.fail_after(10):
            await client.read(3)
        late = await trio.open_tcp_stream("127.0.0.1", port_in)
        with trio.fail_after(10):
            assert await late.receive_some(10) == b""
        assert any(
            "every connection has delivered frames" in r.getMessage() for r in caplog.records
        )
        for peer in proven:
            await peer.stream.aclose()
        for stream in [*silent, late]:
            await stream.aclose()
        await client.stream.aclose()


# -- the metadata cache is bounded per stream ----------------------------------------------


async def test_a_producer_passing_the_metadata_bound_is_refused_and_the_stream_serves_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with running_daemon(config()) as daemon:
        port_in, port_out = ports(daemon)
        flood = await connect(port_in)
        await flood.send([meta(f"T{i}") for i in range(20)])
        # Refused at the ninth type: its connection is closed, with one line naming the stream.
        with trio.fail_after(10):
            assert await flood.stream.receive_some(10) == b""
        refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert len(refusals) == 1
        assert "'camera'" in refusals[0]
        assert "8 metadata types" in refusals[0]
        stream = daemon.streams.get("camera")
        assert len(stream.metadata) == 8
        assert stream.metadata_refused == 1
        shown = build_snapshot(daemon)["streams"]["camera"]
        assert (shown["metadata_cached"], shown["metadata_refused"]) == (8, 1)
        assert shown["metadata_bytes"] == stream.metadata.nbytes <= 64 * 1024
        # A new client is not cut off by the full cache, and gets the metadata, then data.
        client = await connect(port_out)
        await wait_until(lambda: len(daemon.endpoints["out"].status.clients) == 1)
        producer = await connect(port_in)
        await producer.send([data(7)])
        with trio.fail_after(10):
            frames = await client.read(9)
        assert [f.type for f in frames] == [f"T{i}" for i in range(8)] + ["sample"]
        for peer in (flood, producer, client):
            await peer.stream.aclose()


# -- a failed connection's memory returns at once, whatever the GC does ------------------------


@pytest.fixture
def gc_disabled() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


BAD_INPUTS = {
    "native": [b"XX", b"FW\x01\x00" + b"\xff" * 24, b"FW\x01"],
    "g3": [b"\x07\x00", struct.pack("<BIiI", 1, 2, 0, 0), struct.pack("<BIiI", 1, 1, 5, 0x53)],
    "aedat4": [b"\x00" * 12, b"garbage-garbage"],
    "datalink": [b"\x00\x00", b"Z" * 40],
}


@pytest.mark.usefixtures("gc_disabled")
@pytest.mark.parametrize("protocol", sorted(BAD_INPUTS))
async def test_bad_connections_free_their_decoders_without_a_collection(
    protocol: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoders: list[weakref.ref[Decoder]] = []
    make_decoder = flow.make_decoder

    def tracked(*args: object, **kwargs: object) -> Decoder:
        decoder = make_decoder(*args, **kwargs)  # type: ignore[arg-type]
        decoders.append(weakref.ref(decoder))
        return decoder

    monkeypatch.setattr(receiver_module, "make_decoder", tracked)
    async with running_daemon(config(protocol)) as daemon:
        port_in, _ = ports(daemon)
        for bad in BAD_INPUTS[protocol] * 3:
            async with await trio.open_tcp_stream("127.0.0.1", port_in) as stream:
                await stream.send_all(bad)
                await stream.send_eof()
                with trio.fail_after(10):
                    while await stream.receive_some(10):
                        pass
        await wait_until(lambda: producers(daemon) == 0)
        expected = len(BAD_INPUTS[protocol]) * 3
        await wait_until(lambda: len(decoders) == expected)
        # Reference counting alone freed every decoder (and its 256 KiB buffer).
        await wait_until(lambda: all(ref() is None for ref in decoders))


# -- G3 decoding is linear in the frame ------------------------------------------------------


def test_g3_frame_of_many_keys_is_walked_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each length field is read once however many reads the frame arrives in (it was
    walked from the start at every read: 32 s of CPU for one 16 MiB frame of 2^20 keys)."""
    nkeys = 4096
    frame = (
        struct.pack("<BIiI", 1, 1, nkeys, ord("S")) + struct.pack("<QQ", 0, 0) * nkeys + b"\0\0\0\0"
    )
    reads = 0
    real = g3._LENGTH[1]

    class Counting:
        def unpack_from(self, buffer: memoryview, offset: int) -> tuple[int, ...]:
            nonlocal reads
            reads += 1
            return real.unpack_from(buffer, offset)

    monkeypatch.setitem(g3._LENGTH, 1, Counting())
    decoder = g3.G3Decoder(max_frame_size=1 << 20)
    chunks = [frame[i : i + 100] for i in range(0, len(frame), 100)]
    decoded = []
    for chunk in chunks:
        decoded += decoder.feed(chunk)
    assert len(decoded) == 1
    assert bytes(decoded[0].wire or b"") == frame
    assert reads == 2 * nkeys


async def test_refused_producer_logs_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    """Bad bytes: exactly one WARNING line for the connection, and no traceback."""
    caplog.set_level(logging.INFO)
    async with running_daemon(config()) as daemon:
        port_in, _ = ports(daemon)
        async with await trio.open_tcp_stream("127.0.0.1", port_in) as stream:
            await stream.send_all(b"NOT A FRAME AT ALL")
            with trio.fail_after(10):
                assert await stream.receive_some(10) == b""
        await wait_until(lambda: producers(daemon) == 0)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "bad magic" in warnings[0].getMessage()
    assert not any(r.exc_info for r in caplog.records)


@pytest.mark.usefixtures("gc_disabled")
async def test_failed_tls_handshakes_free_their_state_without_a_collection(
    tmp_path: Path,
) -> None:
    """trio.SSLStream holds itself in a cycle; framewire breaks it after the handshake."""
    trustme = pytest.importorskip("trustme")
    pem = tmp_path / "server.pem"
    trustme.CA().issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
    tls_config = f"""
[endpoints.in]
kind = "receiver"
listen = "tls://127.0.0.1:0"
stream = "s"

[endpoints.in.tls]
certificate = "{pem}"
key = "{pem}"
"""

    def tls_streams() -> int:
        return sum(1 for o in gc.get_objects() if isinstance(o, trio.SSLStream))

    before = tls_streams()
    async with running_daemon(tls_config) as daemon:
        port = port_of(daemon.endpoints["in"].status.address[0].split()[-1])
        for _ in range(20):
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                await stream.send_all(b"\x16\x03\x01\x00\x05not-a-client-hello")
                with trio.fail_after(10):
                    while await stream.receive_some(100):
                        pass
        await wait_until(lambda: producers(daemon) == 0)
        await wait_until(lambda: tls_streams() == before)


# -- counters count what happened -------------------------------------------------------------


async def test_a_g3_server_fed_native_frames_counts_only_what_it_wrote() -> None:
    """Frames a g3 client cannot take are unencodable, not sent (they used to count as sent)."""
    g3_config = """
[endpoints.in]
kind = "receiver"
listen = "tcp://127.0.0.1:0"
stream = "s"

[endpoints.out]
kind = "server"
listen = "tcp://127.0.0.1:0"
stream = "s"
protocol = "g3"
"""
    carried = [g3_frame("Scan", {b"k": bytes([i]) * 100}) for i in range(3)]
    async with running_daemon(g3_config) as daemon:
        port_in, port_out = ports(daemon)
        client = await trio.open_tcp_stream("127.0.0.1", port_out)
        await wait_until(lambda: len(daemon.endpoints["out"].status.clients) == 1)
        producer = await connect(port_in)
        frames = [Frame(FrameKind.DATA, "Scan", payload) for payload in carried]
        frames[1:1] = [data(i) for i in range(4)]  # native frames that are not G3
        await producer.send(frames)
        received = b""
        with trio.fail_after(10):
            while len(received) < sum(map(len, carried)):
                received += await client.receive_some(1 << 16)
        assert received == b"".join(carried)

        def settled() -> bool:
            shown = build_snapshot(daemon)["endpoints"]["out"]
            return bool(shown["frames_out"] == 3 and shown["detail"] == {"frames_unencodable": 4})

        # The counters move once the write returns, which may be after the bytes arrived.
        await wait_until(settled)
        snap = build_snapshot(daemon)["endpoints"]["out"]
        assert (snap["frames_out"], snap["bytes_out"]) == (3, len(received))
        (entry,) = snap["clients"]
        assert (entry["frames_sent"], entry["bytes_sent"]) == (3, len(received))
        assert (entry["frames_unencodable"], entry["frames_in_flight"]) == (4, 0)
        await producer.stream.aclose()
        await client.aclose()


async def test_a_bug_in_one_producers_handling_costs_only_that_producer(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Defence in depth: an exception no handler expected closes its connection alone."""
    make_decoder = flow.make_decoder

    class Broken:
        def __getattr__(self, name: str) -> object:
            raise RuntimeError("a bug in a decoder")

    created = 0

    def second_is_broken(*args: object, **kwargs: object) -> object:
        nonlocal created
        created += 1
        return Broken() if created == 2 else make_decoder(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(receiver_module, "make_decoder", second_is_broken)
    async with running_daemon(config()) as daemon:
        port_in, port_out = ports(daemon)
        client = await connect(port_out)
        await wait_until(lambda: len(daemon.endpoints["out"].status.clients) == 1)
        good = await connect(port_in)
        await good.send([data(1)])
        with trio.fail_after(10):
            assert await client.read(1) == [data(1)]
        bad = await connect(port_in)
        await bad.send([data(99)])
        with trio.fail_after(10):
            assert await bad.stream.receive_some(10) == b""
        # The good producer is still connected and still relayed.
        await good.send([data(2)])
        with trio.fail_after(10):
            assert await client.read(2) == [data(1), data(2)]
        assert daemon.endpoints["in"].status.restarts == 0
        assert any("failed unexpectedly" in r.getMessage() for r in caplog.records)
        for peer in (good, bad, client):
            await peer.stream.aclose()


def test_the_heap_is_trimmed_on_glibc() -> None:
    """After a burst the allocator's free memory goes back to the system (malloc_trim)."""
    import platform

    from framewire.daemon.service import heap_trimmer

    trim = heap_trimmer()
    if platform.libc_ver()[0] != "glibc":
        assert trim is None
        return
    assert trim is not None
    burst = [bytearray(256 * 1024) for _ in range(64)]  # 16 MiB, then freed
    del burst
    trim()  # returns 1 when memory was released, 0 when none could be; never fails


def test_a_lost_connection_always_says_why() -> None:
    """``connection lost (...)`` names the cause trio's BrokenResourceError was raised from,
    and is never empty (a dv writer closing its TLS connection gave ``connection lost ()``)."""
    import ssl

    from framewire.daemon.flow import describe_loss

    def broken(cause: BaseException | None) -> trio.BrokenResourceError:
        try:
            try:
                if cause is not None:
                    raise cause
                raise trio.BrokenResourceError
            except BaseException as exc:
                if cause is None:
                    raise
                raise trio.BrokenResourceError from exc
        except trio.BrokenResourceError as error:
            return error

    eof = ssl.SSLEOFError(8, "EOF occurred in violation of protocol")
    assert describe_loss(broken(eof)) == (
        "the peer closed the TLS connection without saying so (no close_notify)"
    )
    reset = ConnectionResetError(104, "Connection reset by peer")
    assert describe_loss(broken(reset)) == "connection reset by peer"
    assert describe_loss(broken(None)) == "BrokenResourceError (no reason given)"


async def test_clients_refused_by_a_full_server_are_counted_not_a_line_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """200 connections to a server at its max_clients: every one refused and counted, the
    log has one line for them all (10,000 attempts were 10,000 lines)."""
    caplog.set_level(logging.INFO, logger="framewire")
    config = """
[endpoints.out]
kind = "server"
listen = "tcp://127.0.0.1:0"
stream = "s"
max_clients = 1
"""
    async with running_daemon(config) as daemon:
        server = daemon.endpoints["out"]
        port = endpoint_port(daemon, "out")
        first = await trio.open_tcp_stream("127.0.0.1", port)
        await wait_until(lambda: len(server.status.clients) == 1)
        for _ in range(200):
            extra = await trio.open_tcp_stream("127.0.0.1", port)
            with trio.fail_after(10):
                assert await extra.receive_some() == b""  # closed at once
            await extra.aclose()
        await wait_until(lambda: server.status.detail.get("clients_refused") == 200)
        await first.aclose()
    lines = [r.getMessage() for r in caplog.records if "max_clients (1) reached" in r.getMessage()]
    assert len(lines) == 1, lines
