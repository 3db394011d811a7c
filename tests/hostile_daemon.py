"""A live framewire daemon with an endpoint of every kind a hostile peer can reach, a control
pair that must lose nothing, and hostile inputs for each endpoint.

Shared by tests/test_hostile.py, tests/test_hostile_regressions.py and benchmarks/hostile.py.
Only blocking sockets and threads: the daemon is a subprocess, and nothing here runs trio.

How things fail: :class:`DaemonProcess` raises RuntimeError (quoting the daemon's log) when the
daemon exits or does not announce an endpoint within its start timeout; :class:`ControlPair`
records what went wrong (a refused connection, an EOF, a frame out of order) in ``problems``
instead of raising in its threads.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from framewire import Frame, FrameKind
from framewire.protocols.datalink import HEADER as DATALINK_HEADER
from framewire.protocols.datalink import HEADER_END as DATALINK_HEADER_END
from framewire.protocols.datalink import START as DATALINK_START
from framewire.protocols.datalink import DatalinkEncoder
from framewire.protocols.native import HEADER as NATIVE_HEADER
from framewire.protocols.native import KEEPALIVE as NATIVE_KEEPALIVE
from framewire.protocols.native import MAGIC, VERSION, NativeDecoder, NativeEncoder

from .aedat4frames import body, ioheader, packet
from .g3frames import g3_frame

HOST: Final = "127.0.0.1"
MIB: Final = 1 << 20
#: The receivers' max_frame_size in the hostile config (the default, 64 MiB).
MAX_FRAME_SIZE: Final = 64 * MIB
#: The type of the control pair's frames; each carries its number in the header ``seq``.
CONTROL_TYPE: Final = "control"

# -- the daemon --------------------------------------------------------------------------------

#: Endpoint name -> how a hostile peer talks to it: the protocol it speaks, and how it is
#: reached (tcp, tls or unix); ``role`` says whether the peer is a producer (receiver or link)
#: or a client of a server.
Role = Literal["producer", "client", "status"]


@dataclass(frozen=True)
class Target:
    """One way in: ``name`` (the endpoint's, unless ``endpoint`` names another), the protocol
    of the inputs, and how they are sent (``tls``: inside a TLS session; ``tcp`` to a TLS
    endpoint: plaintext where a handshake should be)."""

    name: str
    protocol: str
    role: Role
    transport: Literal["tcp", "tls", "unix"] = "tcp"
    endpoint: str = ""

    @property
    def address_key(self) -> str:
        """The endpoint whose address the inputs go to."""
        return self.endpoint or self.name


TARGETS: Final = (
    Target("in-native", "native", "producer"),
    Target("in-raw", "raw", "producer"),
    Target("in-g3", "g3", "producer"),
    Target("in-g3-crc", "g3", "producer"),
    Target("in-aedat4", "aedat4", "producer"),
    Target("in-datalink", "datalink", "producer"),
    Target("link-native", "native", "producer"),
    Target("link-datalink", "datalink", "producer"),
    Target("in-tls", "native", "producer", "tls"),
    Target("in-tls-plain", "native", "producer", "tcp", endpoint="in-tls"),
    Target("in-unix", "native", "producer", "unix"),
    Target("out-native", "native", "client"),
    Target("out-aedat4", "aedat4", "client"),
    Target("status", "http", "status"),
)


def hostile_config(directory: Path, cert_pem: Path | None) -> str:
    """The TOML of the hostile daemon: every target of :data:`TARGETS` on an ephemeral port,
    plus the control pair (``ctl-in`` -> stream ``control`` -> ``ctl-out``, lossless).

    Without certificates there is no TLS receiver.
    """
    sections = [
        '[daemon]\ngrace_period = "1s"\n',
        '[status]\nlisten = "127.0.0.1:0"\n',
        _endpoint("ctl-in", "receiver", "tcp://127.0.0.1:0", "control", "native"),
        _endpoint(
            "ctl-out",
            "server",
            "tcp://127.0.0.1:0",
            "control",
            "native",
            'policy = "lossless"\nmax_queue_frames = 100000\nmax_queue_bytes = "64MiB"\n',
        ),
    ]
    for name, protocol in (
        ("in-native", "native"),
        ("in-raw", "raw"),
        ("in-g3", "g3"),
        ("in-aedat4", "aedat4"),
        ("in-datalink", "datalink"),
    ):
        sections.append(_endpoint(name, "receiver", "tcp://127.0.0.1:0", name, protocol))
    sections.append(
        _endpoint("in-g3-crc", "receiver", "tcp://127.0.0.1:0", "in-g3-crc", "g3")
        + "verify_crc = true\n"
    )
    for name, protocol in (("link-native", "native"), ("link-datalink", "datalink")):
        sections.append(
            f'[endpoints.{name}]\nkind = "link"\nlisten = "tcp://127.0.0.1:0"\n'
            f'protocol = "{protocol}"\npublish = "{name}"\ntimeout = "2s"\n'
        )
    if cert_pem is not None:
        sections.append(
            _endpoint("in-tls", "receiver", "tls://127.0.0.1:0", "in-tls", "native")
            + f'[endpoints.in-tls.tls]\ncertificate = "{cert_pem}"\nkey = "{cert_pem}"\n'
            + 'handshake_timeout = "2s"\n'
        )
    sections.append(
        _endpoint("in-unix", "receiver", f"unix://{directory}/in.sock", "in-unix", "native")
    )
    sections.append(_endpoint("out-native", "server", "tcp://127.0.0.1:0", "in-native", "native"))
    sections.append(_endpoint("out-aedat4", "server", "tcp://127.0.0.1:0", "in-aedat4", "aedat4"))
    return "\n".join(sections)


def _endpoint(
    name: str, kind: str, listen: str, stream: str, protocol: str, extra: str = ""
) -> str:
    return (
        f'[endpoints.{name}]\nkind = "{kind}"\nlisten = "{listen}"\nstream = "{stream}"\n'
        f'protocol = "{protocol}"\n{extra}'
    )


_ANNOUNCED = re.compile(
    r"framewire\.endpoint\.(?P<name>[\w.-]+): (?:receiving|serving|link listening).*? on "
    r"(?:tls )?(?P<address>unix:\S+|[\d.]+:\d+)"
)
_STATUS = re.compile(r"status websocket on ws://(?P<address>[\d.]+:\d+)/")


class DaemonProcess:
    """``framewire run CONFIG`` as a subprocess, its log (stderr) in a file.

    ``addresses`` maps each listening endpoint's name (and ``status``) to ``(host, port)`` or
    a UNIX socket path, read from the daemon's log once it has announced them all.
    """

    def __init__(self, config_text: str, directory: Path, *, expect: Sequence[str]) -> None:
        self.directory = directory
        self.config_path = directory / "daemon.toml"
        self.config_path.write_text(config_text)
        self.log_path = directory / "daemon.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "framewire", "run", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=env,
            )
        self.addresses: dict[str, tuple[str, int] | str] = {}
        try:
            self._wait_for(expect)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait_for(self, expect: Sequence[str], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            text = self.log()
            for match in _ANNOUNCED.finditer(text):
                address = match["address"]
                if address.startswith("unix:"):
                    self.addresses[match["name"]] = address.removeprefix("unix:")
                else:
                    host, port = address.rsplit(":", 1)
                    self.addresses[match["name"]] = (host, int(port))
            if status := _STATUS.search(text):
                host, port = status["address"].rsplit(":", 1)
                self.addresses["status"] = (host, int(port))
            if all(name in self.addresses for name in expect):
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                missing = sorted(set(expect) - set(self.addresses))
                raise RuntimeError(
                    f"daemon did not announce {missing} (status {self.proc.poll()}); log:\n"
                    + text[-4000:]
                )
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, pattern: str, count: int = 1, timeout: float = 20.0) -> None:
        """Wait until ``pattern`` (a regular expression) has appeared ``count`` times in the
        log; RuntimeError after ``timeout`` seconds or if the daemon exits."""
        deadline = time.monotonic() + timeout
        while len(re.findall(pattern, self.log())) < count:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"no {pattern!r} x{count} in the log:\n{self.log()[-3000:]}")
            time.sleep(0.02)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss(self) -> int:
        """Resident memory in bytes (VmRSS)."""
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def settle(
        self,
        good: Callable[[], bool],
        *,
        timeout: float = 30.0,
    ) -> bool:
        """Poll ``good()`` until it holds or ``timeout`` seconds pass; its last answer.

        The default is generous, a last guard: it ends as soon as ``good()`` holds, and a
        daemon on a machine whose CPUs are busy may take seconds to close what it must."""
        deadline = time.monotonic() + timeout
        while not good():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after 10 s; the exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def tracebacks(log: str) -> list[str]:
    """Each traceback in the log, with the line before it (what was being logged)."""
    lines = log.splitlines()
    return [
        "\n".join(lines[max(0, i - 1) : i + 12])
        for i, line in enumerate(lines)
        if line.startswith("Traceback") or "Traceback (most recent call last)" in line
    ]


# -- connecting -------------------------------------------------------------------------------


def client_tls_context() -> ssl.SSLContext:
    """A TLS client context that does not verify the daemon (the peers here are hostile,
    not careful)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def connect(
    address: tuple[str, int] | str, *, tls: ssl.SSLContext | None = None, timeout: float = 5.0
) -> socket.socket:
    """A blocking socket connected to ``address`` (TCP, or a UNIX socket path), with
    ``timeout`` on every operation; wrapped in TLS when ``tls`` is given."""
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
        if tls is not None:
            return tls.wrap_socket(sock, server_hostname="127.0.0.1")
    except BaseException:
        sock.close()
        raise
    return sock


def close_abruptly(sock: socket.socket) -> None:
    """Close with a RST (SO_LINGER 0) where possible, so no TIME_WAIT piles up."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


# -- the control pair ------------------------------------------------------------------------

NATIVE = NativeEncoder()


def native_bytes(frames: Sequence[Frame]) -> bytes:
    return b"".join(bytes(b) for b in NATIVE.encode_batch(frames))


def control_frame(seq: int, size: int = 64) -> Frame:
    return Frame(
        FrameKind.DATA, CONTROL_TYPE, bytes(size), timestamp=seq, headers={"seq": str(seq)}
    )


@dataclass(repr=False)
class ControlPair:
    """A producer on ``ctl-in`` and a client of ``ctl-out``, exchanging frames numbered from 0.

    ``start()`` connects the client first (so nothing is published before it subscribes) and
    then runs a sender thread (one frame every ``interval`` seconds, or as fast as the
    daemon takes them with 0) and a reader thread. ``finish()`` stops sending, waits up to
    ``timeout`` for every frame sent to arrive, and returns the numbers received; anything
    that went wrong (EOF, a frame out of order, a refused connection) is in ``problems``.
    ``ping_pong=True`` sends the next frame only once the previous one has arrived.
    """

    producer_address: tuple[str, int] | str
    client_address: tuple[str, int] | str
    interval: float = 0.002
    ping_pong: bool = False
    sent: int = 0
    received: list[int] = field(default_factory=list)
    #: (daemon-independent) monotonic time of each arrival, parallel to ``received``.
    arrivals: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    on_arrival: Callable[[int], None] | None = None

    def start(self, subscribed: Callable[[], None]) -> None:
        """Connect the client, wait for ``subscribed()`` to return (the daemon has taken the
        client: see :meth:`DaemonProcess.wait_log`), then start producing."""
        self._stop = threading.Event()
        self._arrived = threading.Condition()
        self._client = connect(self.client_address, timeout=30)
        subscribed()
        self._producer = connect(self.producer_address, timeout=30)
        self._reader = threading.Thread(target=self._read, name="control-reader", daemon=True)
        self._writer = threading.Thread(target=self._write, name="control-writer", daemon=True)
        self._reader.start()
        self._writer.start()

    def _write(self) -> None:
        try:
            while not self._stop.is_set():
                self._producer.sendall(native_bytes([control_frame(self.sent)]))
                self.sent += 1
                if self.ping_pong:
                    with self._arrived:
                        self._arrived.wait_for(
                            lambda: len(self.received) >= self.sent or self._stop.is_set(), 30
                        )
                elif self.interval:
                    self._stop.wait(self.interval)
        except OSError as exc:
            self.problems.append(f"control producer: {exc!r} after {self.sent} frames")

    def _read(self) -> None:
        decoder = NativeDecoder(max_frame_size=1 << 20)
        try:
            while True:
                data = self._client.recv(65536)
                if not data:
                    if not self._stop.is_set() or len(self.received) < self.sent:
                        self.problems.append(f"control client: EOF after {len(self.received)}")
                    return
                for frame in decoder.feed(data):
                    if frame.type != CONTROL_TYPE:
                        continue
                    seq = int(frame.headers["seq"])
                    if seq != len(self.received):
                        self.problems.append(f"control frame {seq} arrived as {len(self.received)}")
                    with self._arrived:
                        self.received.append(seq)
                        self.arrivals.append(time.monotonic())
                        self._arrived.notify_all()
                    if self.on_arrival is not None:
                        self.on_arrival(seq)
        except TimeoutError:
            if not self._stop.is_set():
                self.problems.append(f"control client: nothing for 30 s at {len(self.received)}")
        except OSError as exc:
            if not self._stop.is_set() or len(self.received) < self.sent:
                self.problems.append(f"control client: {exc!r}")

    def wait_for(self, count: int, timeout: float = 30.0) -> bool:
        """Wait until ``count`` frames have arrived; whether they did within ``timeout``."""
        with self._arrived:
            return self._arrived.wait_for(lambda: len(self.received) >= count, timeout)

    def finish(self, timeout: float = 30.0) -> list[int]:
        self._stop.set()
        with self._arrived:
            self._arrived.notify_all()
        self._writer.join(timeout)
        self.wait_for(self.sent, timeout)
        self._stop_reading()
        return self.received

    def close(self) -> None:
        """Stop both threads and close both sockets (safe to call again, or after finish)."""
        self._stop.set()
        with self._arrived:
            self._arrived.notify_all()
        self._writer.join(5)
        self._stop_reading()

    def _stop_reading(self) -> None:
        close_abruptly(self._producer)
        with contextlib.suppress(OSError):
            self._client.shutdown(socket.SHUT_RDWR)
        self._reader.join(5)
        close_abruptly(self._client)


# -- hostile inputs ---------------------------------------------------------------------------

Ending = Literal["close", "silent", "half-close"]


@dataclass(frozen=True)
class HostileInput:
    """What one hostile connection does: send ``chunks`` one by one, then end as ``ending``
    says (``silent``: stay open, doing nothing, until later)."""

    kind: str
    chunks: tuple[bytes, ...]
    ending: Ending = "close"

    def describe(self) -> str:
        data = b"".join(self.chunks)
        shown = data[:96].hex()
        more = f"...(+{len(data) - 96} bytes)" if len(data) > 96 else ""
        return f"{self.kind}/{self.ending}: {len(data)} bytes {shown}{more}"


def valid_stream(protocol: str, rng: random.Random) -> bytes:
    """A short valid byte stream of ``protocol`` (what a well-behaved peer would send)."""
    count = rng.randint(1, 3)
    if protocol == "native":
        frames = [Frame(FrameKind.METADATA, "setup", b"{}", timestamp=1, headers={"a": "b"})]
        frames += [
            Frame(FrameKind.DATA, "sample", rng.randbytes(rng.randint(0, 300)), timestamp=i)
            for i in range(count)
        ]
        return native_bytes(frames) + (NATIVE_KEEPALIVE if rng.random() < 0.3 else b"")
    if protocol == "datalink":
        encoder = DatalinkEncoder()
        out = b""
        for i in range(count):
            frame = Frame(FrameKind.DATA, "d", rng.randbytes(rng.randint(1, 300)), timestamp=i)
            out += b"".join(bytes(b) for b in encoder.encode(frame))
        return out
    if protocol == "g3":
        out = g3_frame("Calibration", {b"cal": rng.randbytes(rng.randint(0, 64))})
        for _ in range(count):
            out += g3_frame("Timepoint", {b"t": rng.randbytes(rng.randint(0, 64))})
        return out
    if protocol == "aedat4":
        out = ioheader(((0, "EVTS"), (1, "IMUS")))
        for _ in range(count):
            if rng.random() < 0.5:
                out += packet(0)
            else:
                out += packet(1, body("IMUS", rng.randbytes(rng.randint(0, 40))))
        return out
    if protocol == "http":
        return http_request(rng)
    return rng.randbytes(rng.randint(1, 512))  # raw: anything is valid


def http_request(rng: random.Random) -> bytes:
    """A websocket upgrade request, with a random path, token and extra headers."""
    path = rng.choice(
        ["/", "/?token=a", "//[x/?token=a", "/%ff%00?token=%zz", "http://[::1/", "*", "/" * 300]
    )
    headers = [
        b"Host: 127.0.0.1",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        b"Sec-WebSocket-Version: 13",
    ]
    if rng.random() < 0.3:
        headers.append(b"Authorization: Bearer " + rng.randbytes(rng.randint(0, 40)))
    return b"GET " + path.encode() + b" HTTP/1.1\r\n" + b"\r\n".join(headers) + b"\r\n\r\n"


def mutate(data: bytes, rng: random.Random) -> bytes:
    """``data`` with a few bit flips, insertions, deletions or a truncation."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        if not out:
            out += rng.randbytes(rng.randint(1, 8))
        elif choice < 0.4:
            position = rng.randrange(len(out))
            out[position] ^= 1 << rng.randrange(8)
        elif choice < 0.6:
            position = rng.randrange(len(out) + 1)
            out[position:position] = rng.randbytes(rng.randint(1, 16))
        elif choice < 0.8:
            position = rng.randrange(len(out))
            del out[position : position + rng.randint(1, 16)]
        else:
            del out[rng.randrange(len(out)) :]
    return bytes(out)


#: Lengths a hostile header announces.
ABSURD_LENGTHS: Final = (
    2**31 - 1,
    2**31,
    2**32 - 1,
    2**40,
    2**63 - 1,
    MAX_FRAME_SIZE - 1,
    MAX_FRAME_SIZE,
    MAX_FRAME_SIZE + 1,
    60 * MIB,
)


def absurd_header(protocol: str, length: int, rng: random.Random) -> bytes:
    """The start of a frame of ``protocol`` announcing ``length`` bytes to come."""
    if protocol == "native":
        field_ = rng.choice(("payload", "headers", "type"))
        if field_ == "payload":
            return NATIVE_HEADER.pack(MAGIC, VERSION, 0, 1, 0, 0, 0, length % 2**64, 0) + b"t"
        if field_ == "headers":
            return NATIVE_HEADER.pack(MAGIC, VERSION, 0, 1, 0, 0xFFFF, length % 2**32, 0, 0) + b"t"
        return NATIVE_HEADER.pack(MAGIC, VERSION, 1, 255, 0, 0xFFFF, 0xFFFFFFFF, 2**64 - 1, 0)
    if protocol == "datalink":
        signed = length if length < 2**63 else -1
        return DATALINK_HEADER.pack(DATALINK_START, signed, 1.0, DATALINK_HEADER_END)
    if protocol == "g3":
        nkeys = rng.choice((1, 2, 1 << 20, 2**31 - 1))
        return b"\x01" + struct.pack("<IiI", 1, nkeys, ord("H")) + struct.pack("<Q", length % 2**64)
    if protocol == "aedat4":
        if rng.random() < 0.5:
            return struct.pack("<I", length % 2**32) + b"\x18\x00\x00\x00IOHE"
        return ioheader() + struct.pack("<iI", 0, length % 2**32)
    if protocol == "http":
        return b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * rng.randint(8000, 70000)
    return rng.randbytes(64)


def hostile_input(protocol: str, rng: random.Random) -> HostileInput:
    """One hostile connection's worth of input for an endpoint speaking ``protocol``."""
    choice = rng.random()
    if choice < 0.25:
        data = rng.randbytes(rng.choice((0, 1, 2, rng.randint(3, 64), rng.randint(65, 4096))))
        return HostileInput("random", (data,), rng.choice(("close", "close", "half-close")))
    if choice < 0.6:
        data = mutate(valid_stream(protocol, rng), rng)
        return HostileInput("mutated", _split(data, rng), "close")
    if choice < 0.8:
        length = rng.choice(ABSURD_LENGTHS)
        header = absurd_header(protocol, length, rng)
        tail = rng.randbytes(rng.randint(0, 2048)) if rng.random() < 0.5 else b""
        return HostileInput(f"announces-{length}", (header, tail), rng.choice(("close", "silent")))
    if choice < 0.9:
        data = valid_stream(protocol, rng)
        return HostileInput("partial", (data[: rng.randrange(max(1, len(data)))],), "close")
    return HostileInput("tiny", (rng.randbytes(rng.randint(0, 2)),), "close")


def _split(data: bytes, rng: random.Random) -> tuple[bytes, ...]:
    if len(data) < 2 or rng.random() < 0.5:
        return (data,)
    cut = rng.randrange(1, len(data))
    return (data[:cut], data[cut:])


class SilentPeers:
    """Connections that went silent, kept open up to ``limit`` at a time (the oldest is
    closed to make room), so silence is exercised without sleeping."""

    def __init__(self, limit: int = 4) -> None:
        self.limit = limit
        self.open: deque[socket.socket] = deque()

    def keep(self, sock: socket.socket) -> None:
        self.open.append(sock)
        while len(self.open) > self.limit:
            close_abruptly(self.open.popleft())

    def close_all(self) -> None:
        while self.open:
            close_abruptly(self.open.popleft())


def deliver(
    address: tuple[str, int] | str,
    hostile: HostileInput,
    *,
    tls: ssl.SSLContext | None = None,
    silent: SilentPeers | None = None,
    timeout: float = 5.0,
) -> None:
    """Open a connection, send ``hostile``'s chunks, end it as it says.

    The daemon closing the connection at any point is a fine outcome (BrokenPipe, reset,
    a TLS error); a connection that cannot be made at all raises OSError.
    """
    sock = connect(address, tls=tls, timeout=timeout)
    try:
        for chunk in hostile.chunks:
            if chunk:
                sock.sendall(chunk)
    except (OSError, ssl.SSLError):
        close_abruptly(sock)
        return
    if hostile.ending == "silent" and silent is not None:
        silent.keep(sock)
        return
    if hostile.ending == "half-close":
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
            sock.recv(1024)
    close_abruptly(sock)


@contextlib.contextmanager
def tls_files(directory: Path) -> Iterator[tuple[Path, Path] | None]:
    """(CA, server certificate and key) PEM files made with trustme; None without it."""
    try:
        import trustme
    except ImportError:
        yield None
        return
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca_path, cert_path = directory / "ca.pem", directory / "server.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    yield ca_path, cert_path
