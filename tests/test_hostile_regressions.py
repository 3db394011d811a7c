"""Regression tests for hostile peers, each against its own live daemon (a subprocess).

Each names the promise it keeps: memory bounded by bytes received and by configuration, never
by lengths a peer announces or by how many bad connections come and go; a bounded metadata
cache; idle connections that cannot lock real producers out, nor producers trickling inside
a frame (``frame_timeout``); a pathological G3 frame that
does not stop another stream. Memory is read from /proc (VmRSS) and polled for a few seconds
before judging; nothing asserts how long anything took.
"""

from __future__ import annotations

import random
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from framewire import Frame, FrameKind
from framewire.protocols.aedat4 import Aedat4Decoder
from framewire.protocols.g3 import G3Decoder
from framewire.protocols.native import HEADER as NATIVE_HEADER
from framewire.protocols.native import KEEPALIVE as NATIVE_KEEPALIVE
from framewire.protocols.native import MAGIC, VERSION, NativeDecoder

from .aedat4frames import ioheader, packet
from .hostile_daemon import (
    MIB,
    ControlPair,
    DaemonProcess,
    absurd_header,
    close_abruptly,
    connect,
    native_bytes,
)

StartDaemon = Callable[..., DaemonProcess]

CONTROL = """
[endpoints.ctl-in]
kind = "receiver"
listen = "tcp://127.0.0.1:0"
stream = "control"

[endpoints.ctl-out]
kind = "server"
listen = "tcp://127.0.0.1:0"
stream = "control"
policy = "lossless"
max_queue_frames = 100000
"""


def relay(name: str, protocol: str, extra_in: str = "", extra_out: str = "") -> str:
    """A receiver ``NAME-in`` and a server ``NAME-out`` of stream NAME, both ``protocol``."""
    return f"""
[endpoints.{name}-in]
kind = "receiver"
listen = "tcp://127.0.0.1:0"
stream = "{name}"
protocol = "{protocol}"
{extra_in}
[endpoints.{name}-out]
kind = "server"
listen = "tcp://127.0.0.1:0"
stream = "{name}"
protocol = "{protocol}"
{extra_out}
"""


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[StartDaemon]:
    """Start a daemon with a config text and the endpoint names it must announce; every
    daemon started is stopped at the end of the test."""
    started: list[DaemonProcess] = []

    def start(config: str, *expect: str) -> DaemonProcess:
        daemon = DaemonProcess('[daemon]\ngrace_period = "1s"\n' + config, tmp_path, expect=expect)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


def max_rss_while(daemon: DaemonProcess, done: threading.Event) -> Callable[[], int]:
    """Sample the daemon's RSS every 20 ms until ``done``; returns a function giving the
    largest value seen (call it after ``done`` is set)."""
    peak = [daemon.rss()]

    def sample() -> None:
        while not done.wait(0.02):
            try:
                peak[0] = max(peak[0], daemon.rss())
            except (OSError, RuntimeError):
                return

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()

    def result() -> int:
        thread.join(5)
        return max(peak[0], daemon.rss())

    return result


def stays_below(daemon: DaemonProcess, limit: int, seconds: float = 2.0) -> int:
    """Sample RSS for ``seconds``; the largest value seen (the caller compares it with
    ``limit``; sampling stops early once it is passed)."""
    peak = daemon.rss()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and peak <= limit:
        time.sleep(0.05)
        peak = max(peak, daemon.rss())
    return peak


# -- (a) announced lengths do not commit memory -------------------------------------------------

PRODUCERS = 16
ANNOUNCED = 60 * MIB
#: What one silent producer may cost: its receive buffer (256 KiB) and bookkeeping, with room.
PER_PRODUCER = 2 * MIB


@pytest.mark.parametrize("protocol", ["native", "datalink", "g3", "aedat4"])
def test_headers_announcing_60_mib_cost_what_was_received(
    start_daemon: StartDaemon, protocol: str
) -> None:
    daemon = start_daemon(relay("s", protocol), "s-in")
    before = daemon.rss()
    rng = random.Random(0)
    producers: list[socket.socket] = []
    try:
        for _ in range(PRODUCERS):
            sock = connect(daemon.addresses["s-in"])
            header = absurd_header(protocol, ANNOUNCED, rng)
            if protocol == "native":  # the payload length, whatever the random choice was
                header = NATIVE_HEADER.pack(MAGIC, VERSION, 0, 1, 0, 0, 0, ANNOUNCED, 0) + b"t"
            if protocol == "aedat4":  # a valid IOHeader, then a packet announcing 60 MiB
                header = ioheader() + struct.pack("<iI", 0, ANNOUNCED)
                if producers:  # one producer at a time: the others announce an IOHeader
                    header = struct.pack("<I", ANNOUNCED)
            sock.sendall(header + bytes(1000))
            producers.append(sock)
        limit = before + PRODUCERS * PER_PRODUCER
        peak = stays_below(daemon, limit)
        assert peak <= limit, (
            f"{PRODUCERS} producers announcing {ANNOUNCED // MIB} MiB each and sending ~1 KB"
            f" raised RSS by {(peak - before) / MIB:.0f} MiB"
        )
    finally:
        for sock in producers:
            close_abruptly(sock)
    assert daemon.alive()


# -- (b) bad connections leave nothing behind ---------------------------------------------------


def test_3000_bad_connections_leave_memory_where_it_was(start_daemon: StartDaemon) -> None:
    daemon = start_daemon(relay("s", "native"), "s-in")
    address = daemon.addresses["s-in"]

    def bad_connections(count: int) -> None:
        for _ in range(count):
            sock = connect(address)
            sock.sendall(b"XX")  # not b"FW": a bad magic
            close_abruptly(sock)

    bad_connections(100)  # warm-up: first allocations
    # One outcome line per connection ("producer PEER: closed: bad magic ...").
    outcome = r"s-in: producer [^\n]*: "
    daemon.wait_log(outcome, count=100)
    before = daemon.rss()
    bad_connections(3000)
    daemon.wait_log(outcome, count=3100, timeout=60)
    limit = before + 16 * MIB
    daemon.settle(lambda: daemon.rss() <= limit)
    assert daemon.rss() <= limit, (
        f"RSS {daemon.rss() / MIB:.0f} MiB after 3000 bad connections, {before / MIB:.0f} before"
    )
    assert daemon.alive()


# -- (c) the metadata cache is bounded ------------------------------------------------------------

METADATA_TYPES = 20_000
METADATA_SIZE = 8 * 1024


@pytest.mark.parametrize(
    ("bounds", "bound_hit"),
    [
        ("", "the bound of 256 metadata types"),  # the documented default
        (
            '[streams.meta]\nmax_metadata_types = 1000\nmax_metadata_bytes = "4MiB"\n',
            "the bound of 4194304 bytes of metadata",  # 512 frames of 8 KiB: bytes first
        ),
    ],
    ids=["default-bounds", "configured-bounds"],
)
def test_a_flood_of_metadata_types_is_refused_and_the_stream_lives_on(
    start_daemon: StartDaemon, bounds: str, bound_hit: str
) -> None:
    """20,000 metadata types of 8 KiB (160 MiB) pass both the default bounds of a stream's
    metadata cache and configured ones: the producer is refused with a log line naming the
    stream, and a new client of the stream still gets live data."""
    daemon = start_daemon(bounds + relay("meta", "native"), "meta-in", "meta-out")
    flooder = connect(daemon.addresses["meta-in"], timeout=30)
    closed_by_daemon = False
    try:
        for start in range(0, METADATA_TYPES, 500):
            batch = [
                Frame(FrameKind.METADATA, f"type-{n}", bytes(METADATA_SIZE))
                for n in range(start, start + 500)
            ]
            flooder.sendall(native_bytes(batch))
    except OSError:
        closed_by_daemon = True
    if not closed_by_daemon:  # everything was written: the daemon must still close it
        flooder.settimeout(10)
        try:
            closed_by_daemon = flooder.recv(1) == b""
        except OSError:
            closed_by_daemon = True
    close_abruptly(flooder)
    assert closed_by_daemon, "the daemon took 20,000 metadata types of 8 KiB"
    daemon.wait_log(r"meta-in: producer \S+: .*stream 'meta'.*" + re.escape(bound_hit))
    # A new client of the stream connects and gets live data after whatever is replayed.
    client = connect(daemon.addresses["meta-out"], timeout=30)
    try:
        daemon.wait_log(r"meta-out: client \S+ connected")
        producer = connect(daemon.addresses["meta-in"])
        producer.sendall(native_bytes([Frame(FrameKind.DATA, "live", b"after the flood")]))
        decoder = NativeDecoder(max_frame_size=1 << 26)
        while True:
            data = client.recv(1 << 16)
            assert data, "the new client was closed before any data arrived"
            if any(frame.type == "live" for frame in decoder.feed(data)):
                break
        close_abruptly(producer)
    finally:
        close_abruptly(client)
    assert daemon.alive()


# -- (d), (e) idle connections cannot lock real producers out ------------------------------------


def receive_one(sock: socket.socket, decoder: NativeDecoder | Aedat4Decoder, type_: str) -> None:
    """Read from ``sock`` until a frame of ``type_`` arrives (socket timeout otherwise)."""
    while True:
        data = sock.recv(1 << 16)
        assert data, "closed before the frame arrived"
        if any(frame.type == type_ for frame in decoder.feed(data)):
            return


def test_16_idle_connections_do_not_lock_a_producer_out(start_daemon: StartDaemon) -> None:
    daemon = start_daemon(relay("s", "native", "max_clients = 16\n"), "s-in", "s-out")
    idle = [connect(daemon.addresses["s-in"]) for _ in range(16)]
    client = connect(daemon.addresses["s-out"], timeout=5)
    try:
        daemon.wait_log(r"s-out: client \S+ connected")
        producer = connect(daemon.addresses["s-in"])
        try:
            producer.sendall(native_bytes([Frame(FrameKind.DATA, "real", b"data")] * 3))
            try:
                receive_one(client, NativeDecoder(max_frame_size=1 << 20), "real")
            except TimeoutError:
                pytest.fail("a real producer was locked out by 16 idle connections")
        finally:
            close_abruptly(producer)
    finally:
        for sock in [*idle, client]:
            close_abruptly(sock)


@pytest.mark.parametrize("first", ["idle", "invalid-then-idle"])
def test_an_idle_connection_does_not_lock_a_camera_out(
    start_daemon: StartDaemon, first: str
) -> None:
    daemon = start_daemon(relay("dv", "aedat4"), "dv-in", "dv-out")
    squatter = connect(daemon.addresses["dv-in"])
    if first == "invalid-then-idle":
        squatter.sendall(ioheader()[:6])  # the start of an IOHeader, then nothing
    client = connect(daemon.addresses["dv-out"], timeout=5)
    try:
        daemon.wait_log(r"dv-in: producer \S+ connected")
        camera = connect(daemon.addresses["dv-in"])
        try:
            camera.sendall(ioheader() + packet(0) * 3)
            try:
                receive_one(client, Aedat4Decoder(max_frame_size=1 << 20), "EVTS")
            except TimeoutError:
                pytest.fail(f"a camera was locked out by an {first} connection")
        finally:
            close_abruptly(camera)
    finally:
        close_abruptly(squatter)
        close_abruptly(client)


class Trickler:
    """A peer sending ``rest`` a byte every ``interval`` seconds from a thread, until the
    daemon closes the connection (or ``stop``)."""

    def __init__(self, sock: socket.socket, rest: bytes, interval: float = 0.2) -> None:
        self.sock = sock
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(rest, interval), daemon=True)
        self.thread.start()

    def _run(self, rest: bytes, interval: float) -> None:
        for i in range(len(rest)):
            try:
                self.sock.sendall(rest[i : i + 1])
            except OSError:
                return
            if self.stop.wait(interval):
                return

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        close_abruptly(self.sock)


#: The log line of a frame timeout: peer, announced size, bytes received, the timeout.
FRAME_TIMED_OUT = (
    r"127\.0\.0\.1:\d+: (?:closed: )?its frame of {size} bytes was not complete within "
    r"frame_timeout \(2s\): \d+ bytes of it received"
)


def test_tricklers_inside_a_frame_do_not_hold_their_slots_for_ever(
    start_daemon: StartDaemon,
) -> None:
    """Issue #23: two proven producers each announce a 4 MiB frame and send a byte every
    0.2 s, holding both of a receiver's slots (a newcomer is refused) and a link; with
    frame_timeout = 2s each is closed with one line and a new producer gets in."""
    daemon = start_daemon(
        relay("s", "native", 'max_clients = 2\nframe_timeout = "2s"\n')
        + '[endpoints.l]\nkind = "link"\nlisten = "tcp://127.0.0.1:0"\npublish = "l"\n'
        + 'frame_timeout = "2s"\n',
        "s-in",
        "s-out",
        "l",
    )
    big = native_bytes([Frame(FrameKind.DATA, "huge", bytes(4 * MIB))])
    timed_out = FRAME_TIMED_OUT.format(size=len(big))
    client = connect(daemon.addresses["s-out"], timeout=10)
    tricklers: list[Trickler] = []
    try:
        daemon.wait_log(r"s-out: client \S+ connected")
        decoder = NativeDecoder(max_frame_size=1 << 23)
        producers = [connect(daemon.addresses["s-in"]) for _ in range(2)]
        for producer in producers:
            producer.sendall(native_bytes([Frame(FrameKind.DATA, "proof", b"x")]))
            receive_one(client, decoder, "proof")
        refused = connect(daemon.addresses["s-in"])
        try:
            assert refused.recv(10) == b"", "a third producer got a slot"
        finally:
            close_abruptly(refused)
        peer = connect(daemon.addresses["l"])
        peer.sendall(NATIVE_KEEPALIVE + native_bytes([Frame(FrameKind.DATA, "proof", b"x")]))
        daemon.wait_log(r"link up: ")
        for sock in [*producers, peer]:
            sock.sendall(big[:100])
            tricklers.append(Trickler(sock, big[100:]))
        daemon.wait_log(r"producer " + timed_out, count=2)
        daemon.wait_log(r"link down: " + timed_out)
        newcomer = connect(daemon.addresses["s-in"])
        try:
            newcomer.sendall(native_bytes([Frame(FrameKind.DATA, "real", b"data")]))
            receive_one(client, decoder, "real")
        finally:
            close_abruptly(newcomer)
    finally:
        for trickler in tricklers:
            trickler.close()
        close_abruptly(client)
    assert len(re.findall(timed_out, daemon.log())) == 3
    assert not re.findall(r"Traceback", daemon.log())


@pytest.mark.parametrize("stranger_says", [b"", b"XX"], ids=["silent", "garbage"])
def test_a_stray_connection_does_not_take_a_link_from_its_peer(
    start_daemon: StartDaemon, stranger_says: bytes
) -> None:
    # The peer sends one keepalive and then nothing until its frame, seconds later on a busy
    # machine: the link's dead-peer timeout is far beyond that, so only the stranger can
    # cost the peer its link.
    daemon = start_daemon(
        '[endpoints.l]\nkind = "link"\nlisten = "tcp://127.0.0.1:0"\npublish = "a"\n'
        'timeout = "60s"\n'
        '[endpoints.out]\nkind = "server"\nlisten = "tcp://127.0.0.1:0"\nstream = "a"\n',
        "l",
        "out",
    )
    client = connect(daemon.addresses["out"], timeout=5)
    peer = connect(daemon.addresses["l"])
    strangers: list[socket.socket] = []
    try:
        daemon.wait_log(r"out: client \S+ connected")
        peer.sendall(NATIVE_KEEPALIVE)
        daemon.wait_log(r"l: link up")
        stranger = connect(daemon.addresses["l"])
        strangers.append(stranger)
        if stranger_says:
            stranger.sendall(stranger_says)
        # Give the daemon a moment to deal with the stranger: until it names it in the log
        # (closed it, or replaced the peer with it), for up to 2 s (a silent stranger that is
        # left alone may never be named).
        named = re.compile(rf"l: .*127\.0\.0\.1:{stranger.getsockname()[1]}\b")
        daemon.settle(lambda: named.search(daemon.log()) is not None, timeout=2.0)
        try:
            peer.sendall(native_bytes([Frame(FrameKind.DATA, "after", b"still here")]))
            receive_one(client, NativeDecoder(max_frame_size=1 << 20), "after")
        except (OSError, AssertionError) as exc:
            pytest.fail(f"the link's peer was dropped for a stray connection: {exc!r}")
    finally:
        for sock in (client, peer, *strangers):
            close_abruptly(sock)


# -- (f) a pathological G3 frame does not stop another stream ---------------------------------


def test_a_g3_frame_of_a_million_empty_keys_does_not_stop_another_stream(
    start_daemon: StartDaemon,
) -> None:
    """16 MiB of 2^20 empty keys into a g3 receiver, while a control pair plays ping-pong on
    its own stream: control frames arrive while the big frame is being sent and decoded.

    What this shows is interleaving, not speed: it fails if decoding the frame holds the event
    loop from its first byte to its delivery. (It cannot see a decoder that is merely slow
    but yields between reads; no assertion here is about time.)
    """
    daemon = start_daemon(CONTROL + relay("g3", "g3"), "ctl-in", "ctl-out", "g3-in", "g3-out")
    control = ControlPair(daemon.addresses["ctl-in"], daemon.addresses["ctl-out"], ping_pong=True)
    control.start(lambda: daemon.wait_log(r"ctl-out: client \S+ connected"))
    g3_client = connect(daemon.addresses["g3-out"], timeout=120)
    daemon.wait_log(r"g3-out: client \S+ connected")
    keys = 1 << 20
    big = b"\x01" + struct.pack("<IiI", 1, keys, ord("H")) + bytes(16 * keys) + bytes(4)
    try:
        assert control.wait_for(20), control.problems
        before = len(control.received)
        producer = connect(daemon.addresses["g3-in"], timeout=120)
        producer.sendall(big)
        sent_all = len(control.received)
        decoder = G3Decoder(max_frame_size=1 << 26)
        frames: list[Frame] = []
        while not frames:
            data = g3_client.recv(1 << 20)
            assert data, "the g3 client was closed before the big frame arrived"
            frames += decoder.feed(data)
        delivered = len(control.received)
        close_abruptly(producer)
        assert len(frames[0].payload) == len(big)
        received = control.finish()
    finally:
        close_abruptly(g3_client)
        control.close()
    assert control.problems == []
    assert received == list(range(control.sent))
    # Control frames arrived while the big frame was in flight, from its first byte to its
    # delivery.
    assert delivered > before, (before, sent_all, delivered)
    assert daemon.alive()


# -- (g) a stalled client costs at most its queue bound --------------------------------------------

QUEUE_BYTES = 64 * MIB
#: Beyond the queue bound (+10 %, which covers the up to 1/16 of slack a decoded frame may
#: hold), what a stalled client may legitimately cost: the receive buffer (256 KiB) and the
#: frame being decoded (up to 128 KiB, plus its read-ahead); the writer's current gather-write
#: batch (at most 4 MiB, out of the queue but not yet accepted by the kernel); about 200 bytes
#: of bookkeeping per queued frame (~1,000 frames here); the allocator's slack for freed
#: frames of varied sizes; Python objects created on first use. Kernel socket buffers are
#: kernel memory, not in the daemon's RSS. 16 MiB covers all of that with room to spare.
ALLOWANCE = 16 * MIB


def test_a_stalled_client_costs_at_most_its_queue_bound(start_daemon: StartDaemon) -> None:
    daemon = start_daemon(
        relay("s", "native", extra_out='max_queue_bytes = "64MiB"\nmax_queue_frames = 100000\n'),
        "s-in",
        "s-out",
    )
    rng = random.Random(7)

    def frames(total: int) -> Iterator[bytes]:
        sent = 0
        while sent < total:
            size = rng.randint(65 * 1024, 128 * 1024)
            sent += size
            yield native_bytes([Frame(FrameKind.DATA, "sample", bytes(size))])

    producer = connect(daemon.addresses["s-in"], timeout=60)
    # Warm-up: 32 MiB through the daemon with no client, so the allocator has its pools.
    for chunk in frames(32 * MIB):
        producer.sendall(chunk)
    stalled = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(daemon.addresses["s-out"])
    try:
        daemon.wait_log(r"s-out: client \S+ connected")
        daemon.settle(lambda: False, timeout=0.5)
        before = daemon.rss()
        done = threading.Event()
        peak_of = max_rss_while(daemon, done)
        for chunk in frames(4 * QUEUE_BYTES):
            producer.sendall(chunk)
        # The receiver has read everything once a last frame reaches a live client.
        probe = connect(daemon.addresses["s-out"], timeout=30)
        daemon.wait_log(r"s-out: client \S+ connected", count=2)
        producer.sendall(native_bytes([Frame(FrameKind.DATA, "last", b"")]))
        receive_one(probe, NativeDecoder(max_frame_size=1 << 26), "last")
        close_abruptly(probe)
        done.set()
        peak = peak_of()
    finally:
        close_abruptly(stalled)
        close_abruptly(producer)
    limit = before + int(QUEUE_BYTES * 1.1) + ALLOWANCE
    assert peak <= limit, (
        f"a stalled client with a {QUEUE_BYTES // MIB} MiB queue raised RSS by"
        f" {(peak - before) / MIB:.0f} MiB"
    )
    assert daemon.alive()


# -- the status port -------------------------------------------------------------------------


def test_a_bad_status_request_and_a_reset_leave_the_daemon_running(
    start_daemon: StartDaemon,
) -> None:
    daemon = start_daemon(
        '[status]\nlisten = "127.0.0.1:0"\n' + relay("s", "native"), "status", "s-in"
    )
    for _ in range(3):
        sock = connect(daemon.addresses["status"])
        sock.sendall(b"\xff\xfe\r\n\r\n")  # not a request line
        close_abruptly(sock)  # RST before the daemon can answer
    # The status port still answers (a crash would close it, then end the daemon).
    sock = connect(daemon.addresses["status"])
    try:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert sock.recv(12).startswith(b"HTTP/1.1"), "the status port did not answer"
    except OSError as exc:
        pytest.fail(f"the status port is gone: {exc!r}")
    finally:
        close_abruptly(sock)
    daemon.settle(lambda: not daemon.alive(), timeout=1.0)
    assert daemon.alive(), daemon.log()[-3000:]
