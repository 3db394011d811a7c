"""G3 fan-out: a real G3NetworkSender serving G3Readers itself, and through a framewire daemon.

Run ``python benchmarks/g3_fanout.py`` (``--help`` for options). It measures, side by side,
in one run:

direct
    a real spt3g ``G3NetworkSender`` in listen mode (``hostname='*'``, ``max_queue_size=0``),
    its own process, fans 8 MB Scan frames out to ``--readers`` real ``G3Reader`` processes
    (``tcp://127.0.0.1:PORT``);
relayed
    the same source, as a ``G3NetworkSender`` in connect mode, pushes into a framewire daemon
    (``python -m framewire run CONFIG``, its own process) with a g3 ``receiver`` and a
    lossless g3 ``server`` (``close_on_end = true``) that the same readers connect to;
floor-threads, floor-loop (``--floors``)
    the same source and readers through the simplest copying relay there is, this script as
    a plain process (``--role floor``): it receives each frame whole into a reused buffer
    (finding its end from the G3 length fields, nothing else), and writes it to every reader
    with blocking ``sendall`` calls, from one thread per reader (``threads``: the next
    frames are received meanwhile, into FLOOR_SLOTS buffers) or from one thread, one reader
    after another (``loop``). No queues, no framing, no event loop: what a copying relay
    costs on this machine with no machinery of its own.

In every case the source first sends a small Observation frame every 75 ms (a listen-mode
sender accepts connections only while it processes a frame) until every reader has received
one; then, on "go", a Calibration frame, ``--frames`` Scan frames, and EndProcessing. Each
reader counts Scan frames, checks their sequence numbers, and reports the times of its first
and last Scan. The measured phase runs from the first reader's first Scan to the last
reader's last Scan; the CPU time of every process in it is read from /proc.

The script runs itself as the source, reader and floor processes (``--role``, not for direct
use).
Every process it starts is terminated on the way out (SIGTERM, then SIGKILL), and every wait
has a timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from _harness import (
    CLOCK_TICKS,
    HOST,
    Child,
    ChildTimeout,
    CpuSamples,
    cpu_text,
    daemon_argv,
    exit_on_sigterm,
    free_port,
    machine_text,
    script_argv,
    warn_if_busy,
)

STREAM: Final = "bench"
#: How often the source sends a warm-up Observation frame while waiting for "go".
WARMUP_INTERVAL: Final = 0.075
#: How long a process gets to start (print its first line).
START_TIMEOUT: Final = 20.0
#: G3Reader's socket timeout (SO_RCVTIMEO): idle this long, a reader ends its stream.
READER_TIMEOUT: Final = 60.0
#: How often the CPU times of every process are sampled during a measurement.
SAMPLE_INTERVAL: Final = 0.05

DAEMON_CONFIG: Final = """\
[daemon]
grace_period = "1s"
log_level = "info"

[endpoints.bench-in]
kind = "receiver"
listen = "tcp://{host}:0"
protocol = "g3"
stream = "{stream}"
max_frame_size = "64MiB"

[endpoints.bench-out]
kind = "server"
listen = "tcp://{host}:0"
protocol = "g3"
stream = "{stream}"
policy = "lossless"
max_queue_frames = {max_queue_frames}
max_queue_bytes = "{max_queue_mib}MiB"
max_clients = {max_clients}
close_on_end = true
{send_buffer}"""
RECEIVER_LINE: Final = re.compile(r"receiving g3 into stream '\w+' on [\d.]+:(\d+)")
SERVER_LINE: Final = re.compile(r"serving stream '\w+' as g3 on [\d.]+:(\d+)")
CLIENT_LINE: Final = re.compile(r"client \S+ connected \((\d+) now\)")
DISCONNECT_LINE: Final = re.compile(
    r"client \S+ disconnected: .*\(sent (\d+) frames, (?:\d+ bytes; )?dropped (\d+)\b"
)


def main_thread_cpu_seconds(pid: int) -> float | None:
    """utime + stime of the main thread of ``pid`` (its thread id is the pid), from /proc, or
    None if it is gone."""
    try:
        with open(f"/proc/{pid}/task/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@dataclass
class SourceCpuSamples(CpuSamples):
    """CpuSamples that also sample the source's main thread, as ``source main``.

    The source's main thread builds each frame (numpy, G3VectorDouble) and, inside
    ``sender(frame)``, serialises it (copy and CRC; ``n_serializers=0``). The rest of the
    source's CPU is G3NetworkSender's send threads: one per reader in listen mode (direct),
    one to the daemon in connect mode (relayed).
    """

    source_pid: int = 0

    def take(self) -> None:
        super().take()
        value = main_thread_cpu_seconds(self.source_pid)
        if value is not None:
            self.samples[-1][1]["source main"] = value


# -- the source and reader processes -------------------------------------------------------


class StdinLines:
    """Lines from the orchestrator on stdin, read with a timeout (no buffering surprises)."""

    def __init__(self) -> None:
        self._pending = b""

    def next(self, timeout: float) -> str | None:
        """The next line, or None if none came within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            readable, _, _ = select.select([0], [], [], left)
            if readable:
                chunk = os.read(0, 4096)
                if not chunk:
                    raise SystemExit("source: stdin closed")
                self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line.decode().strip()


def run_source(args: argparse.Namespace) -> None:
    """A G3NetworkSender: listen mode (``--mode listen``) or connect mode (``--mode connect``).

    Prints ``ready SCAN_WIRE_BYTES`` once listening or connected, sends warm-up Observation
    frames until "go", then a Calibration, the Scan frames and EndProcessing, prints a JSON
    line, and waits for "exit" (a listen-mode sender's clients see EOF only when it exits).
    """
    import numpy
    from spt3g import core

    per_key = [args.doubles // args.keys + (i < args.doubles % args.keys) for i in range(args.keys)]

    def scan(seq: int) -> Any:
        frame = core.G3Frame(core.G3FrameType.Scan)
        for key, doubles in enumerate(per_key):
            frame[f"data{key}"] = core.G3VectorDouble(numpy.zeros(doubles))
        frame["seq"] = core.G3Int(seq)
        return frame

    scan_bytes = len(scan(0).__getstate__()[1])
    if args.mode == "listen":
        sender = core.G3NetworkSender(hostname="*", port=args.port, max_queue_size=0)
    else:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                sender = core.G3NetworkSender(hostname=HOST, port=args.port, max_queue_size=0)
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    print(f"ready {scan_bytes}", flush=True)

    stdin = StdinLines()
    deadline = time.monotonic() + args.seconds
    warmups = 0
    while True:
        observation = core.G3Frame(core.G3FrameType.Observation)
        observation["warmup"] = core.G3Int(warmups)
        sender(observation)
        warmups += 1
        line = stdin.next(WARMUP_INTERVAL)
        if line == "go":
            break
        if line is not None:
            raise SystemExit(f"source: unexpected input {line!r}")
        if time.monotonic() > deadline:
            raise SystemExit("source: no 'go' in time")

    go_at = time.monotonic()
    calibration = core.G3Frame(core.G3FrameType.Calibration)
    calibration["frames"] = core.G3Int(args.frames)
    sender(calibration)
    for seq in range(args.frames):
        sender(scan(seq))
    sender(core.G3Frame(core.G3FrameType.EndProcessing))  # waits until every queue is sent
    if args.mode == "connect":
        del sender  # closes the connection: the relay's end of stream
    print(json.dumps({"go": go_at, "sent": time.monotonic(), "warmups": warmups}), flush=True)
    line = stdin.next(args.seconds)
    if line != "exit":
        raise SystemExit(f"source: expected 'exit', got {line!r}")


def run_reader(args: argparse.Namespace) -> None:
    """A G3Reader on ``--url``. Prints ``connected``, ``ready`` (first frame of any type),
    ``done {json}`` (``--frames`` Scans, or the end of the stream if it came first) and
    ``end {json}`` at the end of the stream (to catch extra frames)."""
    from spt3g import core

    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            reader = core.G3Reader(args.url, timeout=READER_TIMEOUT)
            break
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    print("connected", flush=True)
    scan_type = core.G3FrameType.Scan
    scans = others = out_of_order = 0
    first = last = 0.0
    ready = done = False

    def report() -> str:
        return json.dumps(
            {
                "scans": scans,
                "others": others,
                "out_of_order": out_of_order,
                "first": first,
                "last": last,
            }
        )

    while True:
        got = reader.Process(None)
        now = time.monotonic()
        if not got:
            break
        for frame in got:
            if not ready:
                print("ready", flush=True)
                ready = True
            if frame.type == scan_type:
                if scans == 0:
                    first = now
                last = now
                if int(frame["seq"]) != scans:
                    out_of_order += 1
                scans += 1
                if scans == args.frames:
                    print(f"done {report()}", flush=True)
                    done = True
            else:
                others += 1
    if not done:
        print(f"done {report()}", flush=True)
    print(f"end {report()}", flush=True)


# -- the floor: the simplest copying relay --------------------------------------------------

#: A name or blob longer than this makes the floor give up (it relays benchmark frames only).
FLOOR_MAX_LENGTH: Final = 1 << 30
#: Frames the threaded floor may hold: it receives frame k while its threads still send
#: frames k-FLOOR_SLOTS+1 ... k-1.
FLOOR_SLOTS: Final = 3
FLOOR_MODES: Final = ("threads", "loop")
_G3_HEADER: Final = {1: struct.Struct("<BIiI"), 0: struct.Struct(">BIiI")}
_G3_LENGTH: Final = {1: struct.Struct("<Q"), 0: struct.Struct(">Q")}
_END_PROCESSING: Final = ord("Z")


def socket_timeouts(sock: socket.socket, seconds: float) -> None:
    """SO_RCVTIMEO and SO_SNDTIMEO: a blocking call that waits longer raises (EAGAIN), and
    the socket stays in blocking mode, so a ``send`` of a whole frame is one system call (as
    G3NetworkSender's ``write``) rather than Python's poll-then-send loop."""
    whole = int(seconds)
    value = struct.pack("ll", whole, int((seconds - whole) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


class FloorFrames:
    """Receives G3 frames whole from a blocking socket, each into a reusable buffer.

    Finds each frame's end the only way G3 allows: it reads the 13-byte header, then each
    name and blob's u64 length and the bytes it announces (one ``recv`` of the blob and the
    next length field, or of the last blob and the CRC), so an 8 MB frame costs a handful of
    system calls and one copy. No CRC check, no object per frame. Raises RuntimeError on bytes
    that are not G3, or a stream that ends inside a frame; ``BlockingIOError`` if the sender
    stays silent longer than the socket's SO_RCVTIMEO.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def _fill(self, buffer: bytearray, start: int, end: int, *, at_boundary: bool = False) -> bool:
        """Receive bytes ``start:end`` of ``buffer``; False on EOF before the first byte of a
        frame (``at_boundary``)."""
        view = memoryview(buffer)
        try:
            while start < end:
                got = self.sock.recv_into(view[start:end], end - start, socket.MSG_WAITALL)
                if not got:
                    if at_boundary:
                        return False
                    raise RuntimeError("floor: the source's stream ended inside a frame")
                start += got
                at_boundary = False
        finally:
            view.release()
        return True

    def receive(self, buffer: bytearray) -> tuple[bytearray, int, int] | None:
        """The next frame: (the buffer holding it, its length, its type code); the buffer is
        ``buffer`` or, if the frame did not fit, a larger copy of it. None at the end of the
        stream."""
        if not self._fill(buffer, 0, 13, at_boundary=True):
            return None
        flag = buffer[0]
        if flag > 1:
            raise RuntimeError(f"floor: bad G3 endian flag {flag}")
        _, version, nkeys, code = _G3_HEADER[flag].unpack_from(buffer)
        if version != 1 or nkeys < 0:
            raise RuntimeError(f"floor: not a G3 frame (version {version}, {nkeys} keys)")
        unpack = _G3_LENGTH[flag].unpack_from
        position = 13
        if nkeys:
            self._fill(buffer, position, position + 8)
        for field_number in range(2 * nkeys):
            (length,) = unpack(buffer, position)
            if length > FLOOR_MAX_LENGTH:
                raise RuntimeError(f"floor: implausible G3 length {length}")
            # This name or blob, then the next length field, or the CRC after the last blob.
            end = position + 8 + length + (8 if field_number < 2 * nkeys - 1 else 4)
            if end > len(buffer):
                bigger = bytearray(max(end, 2 * len(buffer)))
                bigger[: position + 8] = memoryview(buffer)[: position + 8]
                buffer = bigger
            self._fill(buffer, position + 8, end)
            position += 8 + length
        if not nkeys:
            self._fill(buffer, 13, 17)
            return buffer, 17, code
        return buffer, position + 4, code


def floor_threads(source: FloorFrames, readers: list[socket.socket], seconds: float) -> int:
    """One thread per reader, each ``sendall``-ing every frame; the main thread receives the
    next frames meanwhile, into FLOOR_SLOTS reused buffers. Returns the frames relayed.

    Each reader's thread has two semaphores: ``go`` (released once per frame received, so it
    counts the frames that thread may send) and ``done`` (released once per frame it sent).
    Before reusing a slot, the main thread takes one ``done`` of every reader: each thread
    sends in order, so that is every reader having sent the slot's previous frame. A thread
    blocks only on its own semaphore, so a frame costs a few futex calls, not a wake-up of
    every thread (as one shared Condition would).
    """
    slots: list[tuple[bytearray, int]] = [(bytearray(1 << 20), 0) for _ in range(FLOOR_SLOTS)]
    go = [threading.Semaphore(0) for _ in readers]
    done = [threading.Semaphore(0) for _ in readers]
    received = [0]  # frames in slots, in order: frame k is in slots[k % FLOOR_SLOTS]
    failures: list[BaseException] = []

    def acquire(semaphore: threading.Semaphore) -> None:
        if not semaphore.acquire(timeout=seconds):
            raise TimeoutError(f"floor: no progress in {seconds:g}s")
        if failures:
            raise RuntimeError("floor: a reader's thread failed") from failures[0]

    def send_to(index: int, sock: socket.socket) -> None:
        frame = 0
        try:
            while True:
                acquire(go[index])
                if frame == received[0]:  # the one release after the last frame: the end
                    return
                buffer, length = slots[frame % FLOOR_SLOTS]
                with memoryview(buffer) as view:
                    sock.sendall(view[:length])
                frame += 1
                done[index].release()
        except BaseException as error:
            failures.append(error)
            for semaphore in done:  # wake the main thread, wherever it waits
                semaphore.release()

    threads = [
        threading.Thread(target=send_to, args=(index, sock), daemon=True)
        for index, sock in enumerate(readers)
    ]
    for thread in threads:
        thread.start()
    try:
        while True:
            if received[0] >= FLOOR_SLOTS:
                for semaphore in done:
                    acquire(semaphore)  # every reader has sent frame received - FLOOR_SLOTS
            slot = received[0] % FLOOR_SLOTS
            while True:
                frame = source.receive(slots[slot][0])
                if frame is None or frame[2] != _END_PROCESSING:
                    break
            if frame is None:
                break
            slots[slot] = frame[:2]
            received[0] += 1
            for semaphore in go:
                semaphore.release()
    finally:
        for semaphore in go:  # one more than the frames: the end, after the last frame
            semaphore.release()
    for thread in threads:
        thread.join(seconds)
        if thread.is_alive():
            raise TimeoutError(f"floor: a reader's thread still sending after {seconds:g}s")
    if failures:
        raise RuntimeError("floor: a reader's thread failed") from failures[0]
    return received[0]


def floor_loop(source: FloorFrames, readers: list[socket.socket]) -> int:
    """One thread: receive a frame, ``sendall`` it to each reader in turn, repeat. Returns
    the frames relayed."""
    buffer = bytearray(1 << 20)
    relayed = 0
    while (frame := source.receive(buffer)) is not None:
        buffer, length, code = frame
        if code == _END_PROCESSING:
            continue
        with memoryview(buffer) as view:
            for sock in readers:
                sock.sendall(view[:length])
        relayed += 1
    return relayed


def run_floor(args: argparse.Namespace) -> None:
    """The floor relay: listens for ``--readers`` readers, then for one connect-mode source,
    relays every frame to every reader (``--floor-mode``), closes the readers' sockets when
    the source's stream ends, and exits. Prints ``ready SOURCE_PORT READER_PORT``,
    ``accepted`` once every reader is connected, and a JSON line at the end."""
    with contextlib.ExitStack() as stack:
        listeners = []
        for _ in range(2):
            listener = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            listener.bind((HOST, 0))
            listener.listen(max(args.readers, 16))
            listener.settimeout(START_TIMEOUT)
            listeners.append(listener)
        source_listener, reader_listener = listeners
        print(
            f"ready {source_listener.getsockname()[1]} {reader_listener.getsockname()[1]}",
            flush=True,
        )
        readers = []
        for _ in range(args.readers):
            sock = stack.enter_context(reader_listener.accept()[0])
            sock.setblocking(True)
            socket_timeouts(sock, READER_TIMEOUT)
            if args.floor_sndbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, args.floor_sndbuf)
            readers.append(sock)
        print("accepted", flush=True)
        source_sock = stack.enter_context(source_listener.accept()[0])
        source_sock.setblocking(True)
        socket_timeouts(source_sock, args.seconds)
        source = FloorFrames(source_sock)
        if args.floor_mode == "threads":
            relayed = floor_threads(source, readers, args.seconds)
        else:
            relayed = floor_loop(source, readers)
    print(json.dumps({"relayed": relayed}), flush=True)


# -- child processes ------------------------------------------------------------------------


def start_child(name: str, argv: Sequence[str], stderr_path: Path) -> Child:
    """A child with a pipe to its stdin, its stderr in ``stderr_path``."""
    return Child(name, argv, stdin=subprocess.PIPE, stderr_path=stderr_path)


def wait_lines(
    children: Sequence[Child],
    timeout: float,
    *,
    tick: Callable[[], None] | None = None,
    prefix: str | None = None,
) -> dict[Child, str]:
    """The next line of each child (checked to start with ``prefix``), waiting for all.

    ``tick`` is called at least every SAMPLE_INTERVAL while waiting. Raises ChildTimeout if
    some child has not answered within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    lines: dict[Child, str] = {}
    while True:
        for child in children:
            if child not in lines:
                line = child.buffered_line()
                if line is not None:
                    if prefix is not None and not line.startswith(prefix):
                        raise RuntimeError(f"{child.name}: expected {prefix!r}, got {line!r}")
                    lines[child] = line
        waiting = [child for child in children if child not in lines]
        if not waiting:
            return lines
        left = deadline - time.monotonic()
        if left <= 0:
            names = ", ".join(child.name for child in waiting)
            raise ChildTimeout(f"no {prefix or 'output'!r} within {timeout:g}s from {names}")
        by_fd = {child.fd: child for child in waiting}
        readable, _, _ = select.select(list(by_fd), [], [], min(left, SAMPLE_INTERVAL))
        for fd in readable:
            by_fd[fd].fill()
        if tick is not None:
            tick()


def role_argv(role: str, args: argparse.Namespace, *extra: str) -> list[str]:
    return script_argv(
        __file__,
        f"--role={role}",
        f"--frames={args.frames}",
        f"--doubles={args.doubles}",
        f"--keys={args.keys}",
        *extra,
    )


# -- the daemon -----------------------------------------------------------------------------


def start_daemon(workdir: Path, args: argparse.Namespace, run: int) -> tuple[Child, Path]:
    config = workdir / f"fanout-{run}.toml"
    config.write_text(
        DAEMON_CONFIG.format(
            host=HOST,
            stream=STREAM,
            max_queue_frames=args.max_queue_frames,
            max_queue_mib=args.max_queue_mib,
            max_clients=max(args.readers, 10),
            send_buffer=""
            if args.send_buffer == "none"
            else f'send_buffer = "{args.send_buffer}"\n',
        )
    )
    log = workdir / f"daemon-{run}.log"
    return start_child("daemon", daemon_argv(config), log), log


def wait_for_log(
    daemon: Child, log: Path, pattern: re.Pattern[str], timeout: float, count: int = 1
) -> list[re.Match[str]]:
    """Poll the daemon's log until ``pattern`` matched ``count`` lines; return the matches."""
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace")
        matches = list(pattern.finditer(text))
        if len(matches) >= count:
            return matches
        if daemon.proc.poll() is not None:
            raise RuntimeError(f"daemon exited with status {daemon.proc.returncode}:\n{text}")
        if time.monotonic() > deadline:
            raise ChildTimeout(
                f"daemon: {len(matches)} of {count} log lines matching {pattern.pattern!r}"
                f" after {timeout:g}s"
            )
        time.sleep(0.02)


# -- one measurement ------------------------------------------------------------------------


@dataclass
class Result:
    path: str  # "direct", "relayed" (the daemon) or "floor-MODE" (the floor relay)
    readers: int
    frames: int  # Scan frames sent
    scan_bytes: int  # wire size of one Scan frame
    delivered: list[int]  # Scan frames each reader received
    extra: list[int]  # Scan frames a reader received after its "done" (should be 0)
    out_of_order: int
    seconds: float  # first reader's first Scan to last reader's last Scan
    cpu: dict[str, float | None]
    dropped: int | None = None  # relayed: as the daemon logged it

    @property
    def total(self) -> int:
        return sum(self.delivered)

    @property
    def lossless(self) -> bool:
        return (
            all(count == self.frames for count in self.delivered)
            and not any(self.extra)
            and not self.out_of_order
            and not self.dropped
        )

    @property
    def frames_per_second(self) -> float:
        return self.total / self.seconds if self.seconds > 0 else 0.0

    @property
    def gb_per_second(self) -> float:
        return self.frames_per_second * self.scan_bytes / 1e9

    @property
    def serving_cpu(self) -> float | None:
        return self.cpu["serving"]

    @property
    def sending_cpu(self) -> float | None:
        """The serving CPU without building and serialising the frames: G3NetworkSender's
        send threads (direct; its process minus its main thread), the daemon (relayed; the
        relayed source builds and serialises the frames itself)."""
        if self.path != "direct":
            return self.serving_cpu
        serving, main = self.serving_cpu, self.cpu["source main"]
        return None if serving is None or main is None else serving - main

    @property
    def path_cpu(self) -> float | None:
        """CPU of everything on the frames' path: source, daemon (relayed), readers, irq."""
        parts = [self.serving_cpu, self.cpu["readers"], self.cpu["irq"]]
        if self.path != "direct":
            parts.append(self.cpu["source"])
        return None if None in parts else sum(part for part in parts if part is not None)


def measure(
    args: argparse.Namespace, workdir: Path, relayed: bool, run: int, *, floor: str | None = None
) -> Result:
    """One case: direct (``relayed`` false), through the daemon (``relayed``), or through the
    floor relay (``floor``: a FLOOR_MODES entry). Every process it starts is stopped before it
    returns or raises."""
    path = f"floor-{floor}" if floor else "relayed" if relayed else "direct"
    children: list[Child] = []

    def start(name: str, argv: list[str], stderr: str | None = None) -> Child:
        child = start_child(name, argv, workdir / f"{stderr or name}-{path}-{run}.log")
        children.append(child)
        return child

    daemon: Child | None = None
    relay: Child | None = None  # the daemon or the floor: what serves the readers
    log: Path | None = None
    try:
        source: Child | None = None
        if floor:
            relay = start(
                "floor",
                role_argv(
                    "floor",
                    args,
                    f"--floor-mode={floor}",
                    f"--readers={args.readers}",
                    f"--floor-sndbuf={args.floor_sndbuf}",
                ),
            )
            ready = relay.readline(START_TIMEOUT).split()
            if len(ready) != 3 or ready[0] != "ready":
                raise RuntimeError(f"floor: unexpected output {' '.join(ready)!r}")
            source_port, reader_port = int(ready[1]), int(ready[2])
        elif relayed:
            relay = daemon = start_daemon(workdir, args, run)[0]
            log = daemon.stderr_path
            assert log is not None
            children.append(daemon)
            receiver = wait_for_log(daemon, log, RECEIVER_LINE, START_TIMEOUT)[0]
            server = wait_for_log(daemon, log, SERVER_LINE, START_TIMEOUT)[0]
            source_port, reader_port = int(receiver.group(1)), int(server.group(1))
        else:
            source_port = reader_port = free_port()
            source = start(
                "source", role_argv("source", args, "--mode=listen", f"--port={source_port}")
            )
            scan_bytes = int(source.readline(START_TIMEOUT).split()[1])

        url = f"--url=tcp://{HOST}:{reader_port}"
        readers = [
            start(f"reader {i}", role_argv("reader", args, url), f"reader{i}")
            for i in range(args.readers)
        ]
        wait_lines(readers, START_TIMEOUT, prefix="connected")
        if relay is not None:
            if daemon is not None:
                assert log is not None
                wait_for_log(daemon, log, CLIENT_LINE, START_TIMEOUT, count=args.readers)
            else:
                accepted = relay.readline(START_TIMEOUT)
                if accepted != "accepted":
                    raise RuntimeError(f"floor: unexpected output {accepted!r}")
            source = start(
                "source", role_argv("source", args, "--mode=connect", f"--port={source_port}")
            )
            scan_bytes = int(source.readline(START_TIMEOUT).split()[1])
        assert source is not None
        # Every reader is connected (accepted, for the listen-mode sender) and has its first
        # warm-up frame: start the measured phase.
        wait_lines(readers, START_TIMEOUT, prefix="ready")

        pids = {"source": source.pid, "harness": os.getpid()}
        pids.update({reader.name: reader.pid for reader in readers})
        if relay is not None:
            pids["relay"] = relay.pid
        cpu = SourceCpuSamples(pids, source_pid=source.pid)
        cpu.take()
        source.send_line("go")
        run_timeout = START_TIMEOUT + args.frames * args.readers * args.doubles * 8 / 50e6
        done = wait_lines(readers, run_timeout, tick=cpu.take, prefix="done ")
        cpu.take()  # every process is still running: the listen-mode source waits for "exit"
        sent = json.loads(source.readline(run_timeout))
        source.send_line("exit")
        ends = wait_lines(readers, START_TIMEOUT, prefix="end ")
        dropped = None
        if daemon is not None and log is not None:
            lines = wait_for_log(daemon, log, DISCONNECT_LINE, START_TIMEOUT, count=args.readers)
            dropped = sum(int(match.group(2)) for match in lines)
        if floor and relay is not None:
            relay.readline(START_TIMEOUT)  # its JSON line: it relayed the whole stream
    except Exception:
        for child in children:
            child.stop()
        print(f"{path} case failed; logs:", file=sys.stderr)
        for child in children:
            assert child.stderr_path is not None
            text = child.stderr_path.read_text(errors="replace").strip()
            if text:
                print(f"--- {child.name}:\n{text[-3000:]}", file=sys.stderr)
        raise
    finally:
        for child in children:
            child.stop()
    if daemon is not None and daemon.proc.returncode not in (0, -signal.SIGTERM):
        assert log is not None
        raise RuntimeError(
            f"daemon exit status {daemon.proc.returncode}; its log:\n"
            + log.read_text(errors="replace")
        )

    reports = [json.loads(done[reader].split(" ", 1)[1]) for reader in readers]
    finals = [json.loads(ends[reader].split(" ", 1)[1]) for reader in readers]
    firsts = [r["first"] for r in reports if r["scans"]]
    lasts = [r["last"] for r in reports if r["scans"]]
    t0, t1 = (min(firsts), max(lasts)) if firsts else (sent["go"], sent["sent"])
    serving = "source" if relay is None else "relay"
    used: dict[str, float | None] = {
        "serving": cpu.used(serving, t0, t1),
        "source": None if relay is None else cpu.used("source", t0, t1),
        "source main": cpu.used("source main", t0, t1),
    }
    reader_cpu = [cpu.used(reader.name, t0, t1) for reader in readers]
    used["readers"] = None if None in reader_cpu else sum(v for v in reader_cpu if v is not None)
    machine = cpu.used("machine", t0, t1)
    harness = cpu.used("harness", t0, t1)
    ours = [v for v in (used["serving"], used["source"], used["readers"], harness) if v is not None]
    irq = used["irq"] = cpu.used("irq", t0, t1)
    if machine is None or irq is None:
        used["others"] = None
    else:
        used["others"] = max(0.0, machine - irq - sum(ours))
    used["machine"] = machine
    return Result(
        path=path,
        readers=args.readers,
        frames=args.frames,
        scan_bytes=scan_bytes,
        delivered=[r["scans"] for r in reports],
        extra=[f["scans"] - r["scans"] for r, f in zip(reports, finals, strict=True)],
        out_of_order=sum(f["out_of_order"] for f in finals),
        seconds=t1 - t0,
        cpu=used,
        dropped=dropped,
    )


# -- reporting ------------------------------------------------------------------------------


HEADER: Final = (
    f"{'path':<13} {'delivered':>11} {'window':>7} {'frames/s':>9} {'GB/s':>6}"
    f"  {'serving CPU':>11}  {'source CPU':>11}  {'readers CPU':>11}  {'irq':>5}  {'others':>6}"
    "  lossless"
)


def share(used: float | None, seconds: float) -> str:
    return "-" if used is None or seconds <= 0 else f"{used / seconds:.0%}"


def print_row(result: Result) -> None:
    expected = result.frames * result.readers
    others = result.cpu["others"]
    verdict = "yes" if result.lossless else "NO"
    details = []
    if any(count != result.frames for count in result.delivered):
        details.append("per reader " + ",".join(map(str, result.delivered)))
    if any(result.extra):
        details.append(f"extra {sum(result.extra)}")
    if result.out_of_order:
        details.append(f"out of order {result.out_of_order}")
    if result.dropped:
        details.append(f"daemon dropped {result.dropped}")
    print(
        f"{result.path:<13} {f'{result.total}/{expected}':>11} {result.seconds:6.2f}s"
        f" {result.frames_per_second:9.1f} {result.gb_per_second:6.2f}"
        f"  {cpu_text(result.serving_cpu, result.seconds)}"
        f"  {cpu_text(result.cpu['source'], result.seconds)}"
        f"  {cpu_text(result.cpu['readers'], result.seconds)}"
        f"  {share(result.cpu['irq'], result.seconds):>5}"
        f"  {share(others, result.seconds):>6}"
        f"  {verdict}{' (' + '; '.join(details) + ')' if details else ''}",
        flush=True,
    )


def median(values: Sequence[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return statistics.median(known) if known else None


def per_frame(result: Result, used: float | None) -> float | None:
    """CPU seconds per delivered frame; None if unknown."""
    return None if used is None or not result.total else used / result.total


def paired_ratio(
    results: dict[str, list[Result]],
    value: Callable[[Result], float | None],
    case: str = "relayed",
    baseline: str = "direct",
) -> float | None:
    """Median over runs of ``case``/``baseline`` ``value`` (default relayed/direct), each
    run's cases paired."""
    ratios = []
    for relayed, direct in zip(results[case], results[baseline], strict=True):
        a, b = value(relayed), value(direct)
        if a is not None and b:
            ratios.append(a / b)
    return statistics.median(ratios) if ratios else None


def ms(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds * 1e3:.2f} ms"


def ratio_text(value: float | None) -> str:
    return "?" if value is None else f"{value:.3f}"


#: Issue 12's targets: relayed/direct delivered frames/s, and daemon CPU per delivered frame
#: against the G3NetworkSender process's.
TARGET_RATE: Final = 0.95
TARGET_CPU: Final = 0.8
#: A case whose processes kept this share of every CPU busy was bound by the machine.
SATURATED: Final = 0.9


def print_summary(results: dict[str, list[Result]]) -> None:
    direct, relayed = results["direct"], results["relayed"]
    runs = len(direct)
    print(f"\nsummary (medians of {runs} run{'s' if runs != 1 else ''} per case; ratios are")
    print("medians of each run's relayed/direct):")
    d_fps = statistics.median(r.frames_per_second for r in direct)
    r_fps = statistics.median(r.frames_per_second for r in relayed)
    d_gbs = statistics.median(r.gb_per_second for r in direct)
    r_gbs = statistics.median(r.gb_per_second for r in relayed)
    fps_ratio = paired_ratio(results, lambda r: r.frames_per_second)
    print(
        f"  delivered frames/s: direct {d_fps:.1f} ({d_gbs:.2f} GB/s),"
        f" relayed {r_fps:.1f} ({r_gbs:.2f} GB/s), relayed/direct {ratio_text(fps_ratio)}"
        f" (target >= {TARGET_RATE})"
    )

    def median_per_frame(rs: list[Result], value: Callable[[Result], float | None]) -> float | None:
        return median([per_frame(r, value(r)) for r in rs])

    cpu_ratio = paired_ratio(results, lambda r: per_frame(r, r.serving_cpu))
    print(
        "  serving CPU per delivered frame (issue 12's figure): G3NetworkSender"
        f" {ms(median_per_frame(direct, lambda r: r.serving_cpu))}, framewire daemon"
        f" {ms(median_per_frame(relayed, lambda r: r.serving_cpu))},"
        f" relayed/direct {ratio_text(cpu_ratio)} (target <= {TARGET_CPU})"
    )
    print(
        "    but the G3NetworkSender's figure includes building and serialising the frames"
        " on its main thread"
        f" ({ms(median_per_frame(direct, lambda r: r.cpu['source main']))}), which the"
        " relayed source does for the daemon"
        f" ({ms(median_per_frame(relayed, lambda r: r.cpu['source main']))});"
    )
    sending_ratio = paired_ratio(results, lambda r: per_frame(r, r.sending_cpu))
    print(
        "    without it, G3NetworkSender's send threads"
        f" {ms(median_per_frame(direct, lambda r: r.sending_cpu))} against the daemon:"
        f" relayed/direct {ratio_text(sending_ratio)}"
    )
    end_to_end = paired_ratio(
        results,
        lambda r: per_frame(
            r,
            r.serving_cpu
            if r.path == "direct" or r.serving_cpu is None or r.cpu["source"] is None
            else r.serving_cpu + r.cpu["source"],
        ),
    )
    print(
        "  end to end, source + daemon against the serving source: relayed/direct"
        f" {ratio_text(end_to_end)}"
    )
    path_ratio = paired_ratio(results, lambda r: per_frame(r, r.path_cpu))
    print(
        "  CPU of everything on the path (source, daemon, readers, irq) per delivered frame:"
        f" direct {ms(median_per_frame(direct, lambda r: r.path_cpu))},"
        f" relayed {ms(median_per_frame(relayed, lambda r: r.path_cpu))},"
        f" direct/relayed {ratio_text(None if path_ratio is None else 1 / path_ratio)}"
    )
    cpus = os.cpu_count() or 1
    busy = {
        path: median(
            [None if r.cpu["machine"] is None else r.cpu["machine"] / r.seconds / cpus for r in rs]
        )
        for path, rs in results.items()
    }
    daemon_busy = median(
        [None if r.serving_cpu is None else r.serving_cpu / r.seconds for r in relayed]
    )
    readers_busy = median(
        [
            None if r.cpu["readers"] is None else r.cpu["readers"] / r.seconds / r.readers
            for r in results["direct"] + relayed
        ]
    )
    d_busy, r_busy = busy["direct"], busy["relayed"]
    if d_busy is not None and r_busy is not None:
        print(
            f"  machine busy (every process and irq): direct {d_busy:.0%}, relayed {r_busy:.0%}"
            f" of {cpus} CPUs; the daemon {daemon_busy or 0:.0%} of one CPU,"
            f" each reader {readers_busy or 0:.0%}"
        )
        if min(d_busy, r_busy) >= SATURATED:
            print(
                "    both cases were bound by the machine, not by the daemon: frames/s follow"
                " the CPU of everything on the path (and of other processes), so the frames/s"
                " ratio is near the direct/relayed figure above"
            )
    for path in results:
        if path.startswith("floor-"):
            print_floor_summary(results, path, median_per_frame)
    lossless = all(r.lossless for rs in results.values() for r in rs)
    print(
        f"  every reader got every Scan frame, in order, in every run: "
        f"{'yes' if lossless else 'NO'}"
    )
    met = (
        lossless
        and fps_ratio is not None
        and fps_ratio >= TARGET_RATE
        and cpu_ratio is not None
        and cpu_ratio <= TARGET_CPU
    )
    print(
        f"  target (issue 12: frames/s at least {TARGET_RATE}x G3NetworkSender's, losslessly,"
        f" with at most {TARGET_CPU}x its serving CPU per delivered frame):"
        f" {'met' if met else 'NOT met'}"
    )
    warn_if_busy(
        (
            r.cpu["others"] / r.seconds
            for rs in results.values()
            for r in rs
            if r.cpu["others"] and r.seconds > 0
        ),
        "rates and ratios are unreliable",
    )


def print_floor_summary(
    results: dict[str, list[Result]],
    path: str,
    median_per_frame: Callable[[list[Result], Callable[[Result], float | None]], float | None],
) -> None:
    """The floor relay ``path`` against G3NetworkSender, and the daemon against it."""
    floor = results[path]

    def serving(r: Result) -> float | None:
        return per_frame(r, r.serving_cpu)

    def on_path(r: Result) -> float | None:
        return per_frame(r, r.path_cpu)

    def rate(r: Result) -> float:
        return r.frames_per_second

    fps_ratio = paired_ratio(results, rate, path)
    cpu_ratio = paired_ratio(results, serving, path)
    path_ratio = paired_ratio(results, on_path, path)
    print(
        f"  {path} (a floor: a plain relay, blocking sendall of each frame to each reader):"
        f" {statistics.median(rate(r) for r in floor):.1f} frames/s, floor/direct"
        f" {ratio_text(fps_ratio)}; its CPU per delivered frame"
        f" {ms(median_per_frame(floor, lambda r: r.serving_cpu))}, floor/direct"
        f" {ratio_text(cpu_ratio)}; everything on the path"
        f" {ms(median_per_frame(floor, lambda r: r.path_cpu))}, direct/floor"
        f" {ratio_text(None if path_ratio is None else 1 / path_ratio)}"
    )
    reachable = fps_ratio is not None and fps_ratio >= TARGET_RATE
    reachable = reachable and cpu_ratio is not None and cpu_ratio <= TARGET_CPU
    print(
        f"    issue 12's targets (>= {TARGET_RATE}x frames/s, <= {TARGET_CPU}x CPU) met by this"
        f" floor: {'yes' if reachable else 'no'}; the daemon against it: frames/s"
        f" {ratio_text(paired_ratio(results, rate, 'relayed', path))}, CPU per frame"
        f" {ratio_text(paired_ratio(results, serving, 'relayed', path))}"
    )


# -- main -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Fan G3 Scan frames out to G3Readers: G3NetworkSender against framewire."
    )
    parser.add_argument(
        "--frames", type=int, default=100, help="Scan frames per case (default 100)"
    )
    parser.add_argument("--readers", type=int, default=10, help="G3Reader processes (default 10)")
    parser.add_argument(
        "--doubles",
        type=int,
        default=1_000_000,
        help="doubles in each Scan frame's vector (default 1000000: an 8 MB frame)",
    )
    parser.add_argument(
        "--keys",
        type=int,
        default=1,
        help="split each Scan frame's doubles over this many vectors (keys) (default 1)",
    )
    parser.add_argument("--quick", action="store_true", help="a short run: --frames 10 --repeat 1")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each case (default 3)")
    parser.add_argument(
        "--max-queue-frames",
        type=int,
        default=64,
        help="the server's max_queue_frames (default 64)",
    )
    parser.add_argument(
        "--max-queue-mib",
        type=int,
        default=1024,
        help="the server's max_queue_bytes, in MiB (default 1024)",
    )
    parser.add_argument(
        "--keep-logs", action="store_true", help="print the daemon's log of each relayed run"
    )
    parser.add_argument(
        "--floors",
        default="threads,loop",
        help="floor relays to measure too, comma-separated: threads (one sending thread per"
        " reader), loop (one thread, one reader after another), or none (default both)",
    )
    parser.add_argument(
        "--send-buffer",
        default="none",
        help="the daemon's server send_buffer, e.g. \"4MiB\" (default none: the kernel's"
        " autotuning)",
    )
    parser.add_argument(
        "--floor-sndbuf",
        type=int,
        default=0,
        help="SO_SNDBUF the floor sets on readers' sockets, in bytes (default 0: the kernel's"
        " autotuning)",
    )
    # Internal: how the script runs itself as the source, the readers and the floor.
    parser.add_argument("--role", choices=["source", "reader", "floor"], help=argparse.SUPPRESS)
    parser.add_argument("--floor-mode", choices=FLOOR_MODES, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["listen", "connect"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=300.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.frames, args.repeat = 10, 1
    if min(args.frames, args.readers, args.doubles, args.keys, args.repeat) < 1:
        parser.error("--frames, --readers, --doubles, --keys and --repeat must be at least 1")
    if args.keys > args.doubles:
        parser.error("--keys must not exceed --doubles")
    args.floors = [] if args.floors == "none" else args.floors.split(",")
    if any(mode not in FLOOR_MODES for mode in args.floors):
        parser.error(f"--floors: each of {', '.join(FLOOR_MODES)}, or none")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "source":
        run_source(args)
        return 0
    if args.role == "reader":
        run_reader(args)
        return 0
    if args.role == "floor":
        run_floor(args)
        return 0

    exit_on_sigterm()
    print(
        f"framewire G3 fan-out benchmark: {machine_text()}, {args.frames} Scan frames of"
        f" {args.doubles * 8 / 1e6:g} MB ({args.keys} key{'s' if args.keys != 1 else ''})"
        f" to {args.readers} G3Readers per case"
    )
    print(HEADER)
    cases: list[tuple[bool, str | None]] = [(False, None), (True, None)]
    cases += [(False, mode) for mode in args.floors]
    results: dict[str, list[Result]] = {}
    with tempfile.TemporaryDirectory(prefix="framewire-g3-bench-") as tmp:
        workdir = Path(tmp)
        for run in range(args.repeat):
            # Alternate the order, so that a drift in what else the machine does is shared.
            for relayed, floor in cases if run % 2 == 0 else reversed(cases):
                result = measure(args, workdir, relayed, run, floor=floor)
                print_row(result)
                results.setdefault(result.path, []).append(result)
            if args.keep_logs:
                print((workdir / f"daemon-{run}.log").read_text(errors="replace"))
    print_summary(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
