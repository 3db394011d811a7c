"""Zero-copy sending over loopback: what each way of writing a frame to N readers costs the sender.

Run ``python benchmarks/zerocopy_loopback.py`` (``--help`` for options). One process, the
sender, writes ``--frames`` frames of ``--size`` bytes to each of ``--readers`` TCP
connections on 127.0.0.1; another process reads them (one thread per connection, 1 MiB
``recv_into``). Per run and method it prints the sender's CPU per delivered frame and its
ratio to ``send`` in the same run, with the readers' CPU, the machine's interrupt time and
other processes' CPU in the same window. The methods:

send
    ``socket.sendall`` of the frame (a bytes object in memory), to each reader in turn.
sendfile
    the frame is in a memfd; ``os.sendfile(socket, memfd, offset, count)`` to each reader.
splice
    the frame is in a memfd; ``os.splice`` memfd -> pipe (``--pipe-size``, F_SETPIPE_SZ)
    -> socket, to each reader.
zerocopy
    ``SO_ZEROCOPY`` and ``send(frame, MSG_ZEROCOPY)``; the sender reads the completion
    notifications from the socket's error queue after each frame (it must, or the kernel's
    option memory runs out) and counts those that say the kernel copied the data anyway
    (``SO_EE_CODE_ZEROCOPY_COPIED``: Documentation/networking/msg_zerocopy.rst says a loopback
    receiver always gets a copy).

Each frame is in place before the measurement starts (a bytes object, or a memfd's page
cache), and is sent unchanged: the figures are the cost of the fan-out alone, not of getting
the frame in. The sender's CPU is its own ``getrusage(RUSAGE_SELF)`` from its first write to
its last; the readers' is theirs over their whole receive. Loopback TCP's receive path runs
partly in softirq context, charged to whichever process was running then, so the readers'
and ``irq`` columns say where the rest of the work went.

The script runs itself as the sender and the readers (``--role``, not for direct use).
Every process it starts is stopped on the way out (SIGTERM, then SIGKILL), and every wait
has a timeout.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import resource
import select
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from _harness import (
    HOST,
    MIB,
    START_TIMEOUT,
    Child,
    all_stopped,
    exit_on_sigterm,
    machine_busy_seconds,
    machine_text,
    payload_of,
    script_argv,
    warn_if_busy,
)

METHODS: Final = ("send", "sendfile", "splice", "zerocopy")
#: How long one blocking send or receive may wait before the run is abandoned.
IO_TIMEOUT: Final = 30.0
#: How much each reader thread asks for in one recv_into.
READ_SIZE: Final = 1 << 20
F_SETPIPE_SZ: Final = getattr(fcntl, "F_SETPIPE_SZ", 1031)
SO_ZEROCOPY: Final = getattr(socket, "SO_ZEROCOPY", 60)
MSG_ZEROCOPY: Final = getattr(socket, "MSG_ZEROCOPY", 0x4000000)
MSG_ERRQUEUE: Final = getattr(socket, "MSG_ERRQUEUE", 0x2000)
SPLICE_F_MORE: Final = getattr(os, "SPLICE_F_MORE", 4)
#: struct sock_extended_err: ee_errno, ee_origin, ee_type, ee_code, ee_pad, ee_info, ee_data.
EXTENDED_ERR: Final = struct.Struct("=IBBBBII")
SO_EE_ORIGIN_ZEROCOPY: Final = 5
SO_EE_CODE_ZEROCOPY_COPIED: Final = 1


def io_timeouts(sock: socket.socket, seconds: float) -> None:
    """SO_RCVTIMEO and SO_SNDTIMEO on a blocking socket: a call that waits longer fails with
    EAGAIN, and each send or receive stays one system call."""
    whole = int(seconds)
    value = struct.pack("ll", whole, int((seconds - whole) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


def cpu_now() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def stdin_line(timeout: float) -> str:
    """The next line on stdin (a short one from the orchestrator); SystemExit after
    ``timeout`` seconds or at EOF."""
    readable, _, _ = select.select([0], [], [], timeout)
    if not readable:
        raise SystemExit(f"no instruction on stdin within {timeout:g}s")
    line = os.read(0, 4096)
    if not line:
        raise SystemExit("stdin closed")
    return line.decode().strip()


# -- the sender -----------------------------------------------------------------------------


class ZerocopyCompletions:
    """Reads MSG_ZEROCOPY completion notifications from one socket's error queue (each
    socket numbers its sends on its own)."""

    def __init__(self) -> None:
        self.sends = 0  # MSG_ZEROCOPY sends made (each gets a number, counted from 0)
        self.completed = 0  # sends whose completion was read
        self.copied = 0  # of those, how many the kernel reported as copied after all

    def drain(self, sock: socket.socket, *, wait: bool) -> None:
        """Read every notification queued; with ``wait``, until every send has completed
        (polling for POLLERR, at most IO_TIMEOUT). Raises TimeoutError then."""
        deadline = time.monotonic() + IO_TIMEOUT
        while True:
            try:
                _, ancillary, _, _ = sock.recvmsg(0, 256, MSG_ERRQUEUE | socket.MSG_DONTWAIT)
            except BlockingIOError:
                if not wait or self.completed >= self.sends:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{self.sends - self.completed} sends never completed"
                    ) from None
                poller = select.poll()
                poller.register(sock, select.POLLERR)
                poller.poll(100)
                continue
            for _, _, data in ancillary:
                if len(data) < EXTENDED_ERR.size:
                    continue
                _, origin, _, code, _, first, last = EXTENDED_ERR.unpack_from(data)
                if origin != SO_EE_ORIGIN_ZEROCOPY:
                    continue
                count = last - first + 1  # a notification covers sends first..last
                self.completed += count
                if code & SO_EE_CODE_ZEROCOPY_COPIED:
                    self.copied += count


def send_zerocopy(sock: socket.socket, view: memoryview, completions: ZerocopyCompletions) -> None:
    """All of ``view`` with MSG_ZEROCOPY sends, reading completions when the kernel's option
    memory for them runs out (ENOBUFS)."""
    sent = 0
    while sent < len(view):
        try:
            sent += sock.send(view[sent:], MSG_ZEROCOPY)
        except OSError as error:
            if error.errno != errno.ENOBUFS:
                raise
            completions.drain(sock, wait=False)
            continue
        completions.sends += 1


def run_sender(args: argparse.Namespace) -> None:
    """Listens, prints ``ready PORT``, accepts ``--readers`` connections, prints
    ``accepted``, waits for ``go``, sends, and prints a JSON line."""
    frame = payload_of(args.size)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((HOST, 0))
    listener.listen(max(16, args.readers))
    listener.settimeout(START_TIMEOUT)
    print(f"ready {listener.getsockname()[1]}", flush=True)
    readers = []
    for _ in range(args.readers):
        sock = listener.accept()[0]
        sock.setblocking(True)
        io_timeouts(sock, IO_TIMEOUT)
        readers.append(sock)
    listener.close()
    memfd = pipe_read = pipe_write = -1
    if args.method in ("sendfile", "splice"):
        memfd = os.memfd_create("frame")
        os.write(memfd, frame)
    if args.method == "splice":
        pipe_read, pipe_write = os.pipe()
        fcntl.fcntl(pipe_write, F_SETPIPE_SZ, args.pipe_size)
    completions = [ZerocopyCompletions() for _ in readers]
    if args.method == "zerocopy":
        for sock in readers:
            sock.setsockopt(socket.SOL_SOCKET, SO_ZEROCOPY, 1)
    print("accepted", flush=True)
    if stdin_line(START_TIMEOUT) != "go":
        raise SystemExit("sender: expected 'go'")

    size = args.size
    view = memoryview(frame)
    start_cpu, start = cpu_now(), time.monotonic()
    for _ in range(args.frames):
        for sock, completed in zip(readers, completions, strict=True):
            if args.method == "send":
                sock.sendall(view)
            elif args.method == "sendfile":
                offset = 0
                while offset < size:
                    offset += os.sendfile(sock.fileno(), memfd, offset, size - offset)
            elif args.method == "splice":
                offset = 0
                while offset < size:
                    moved = os.splice(memfd, pipe_write, min(args.pipe_size, size - offset), offset)
                    offset += moved
                    while moved:
                        moved -= os.splice(pipe_read, sock.fileno(), moved, flags=SPLICE_F_MORE)
            else:
                send_zerocopy(sock, view, completed)
                completed.drain(sock, wait=False)
    if args.method == "zerocopy":
        for sock, completed in zip(readers, completions, strict=True):
            completed.drain(sock, wait=True)
    cpu, seconds = cpu_now() - start_cpu, time.monotonic() - start
    for sock in readers:
        sock.close()
    print(
        json.dumps(
            {
                "cpu": cpu,
                "seconds": seconds,
                "zerocopy_sends": sum(c.sends for c in completions),
                "zerocopy_copied": sum(c.copied for c in completions),
            }
        ),
        flush=True,
    )


# -- the readers ----------------------------------------------------------------------------


def run_readers(args: argparse.Namespace) -> None:
    """Connects ``--readers`` sockets to ``--port``, prints ``connected``, reads
    ``--frames`` x ``--size`` bytes on each (one thread each), and prints a JSON line."""
    socks = [
        socket.create_connection((HOST, args.port), START_TIMEOUT) for _ in range(args.readers)
    ]
    for sock in socks:
        sock.setblocking(True)
        io_timeouts(sock, IO_TIMEOUT)
    print("connected", flush=True)
    expected = args.frames * args.size
    received = [0] * len(socks)
    failures: list[BaseException] = []

    def read_all(index: int, sock: socket.socket) -> None:
        buffer = bytearray(READ_SIZE)
        try:
            while received[index] < expected:
                got = sock.recv_into(buffer)
                if not got:
                    break
                received[index] += got
        except BaseException as error:
            failures.append(error)

    start_cpu = cpu_now()
    threads = [
        threading.Thread(target=read_all, args=pair, daemon=True) for pair in enumerate(socks)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + IO_TIMEOUT + args.frames * args.readers * args.size / 100e6
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            raise SystemExit("readers: timed out")
    if failures:
        raise SystemExit(f"readers: {failures[0]!r}")
    print(json.dumps({"cpu": cpu_now() - start_cpu, "received": received}), flush=True)


# -- the orchestrator -----------------------------------------------------------------------


@dataclass
class Result:
    method: str
    size: int  # bytes per frame
    delivered: int  # frames delivered, summed over the readers
    sender_cpu: float
    readers_cpu: float
    seconds: float  # the sender's first write to the readers' report
    irq: float  # interrupt and softirq time on the whole machine in that window
    others: float  # every other process's CPU in that window
    zerocopy_sends: int
    zerocopy_copied: int

    @property
    def sender_per_frame(self) -> float:
        return self.sender_cpu / self.delivered

    @property
    def path_per_frame(self) -> float:
        """Sender, readers and interrupts: everything the fan-out cost the machine."""
        return (self.sender_cpu + self.readers_cpu + self.irq) / self.delivered


def measure(args: argparse.Namespace, method: str) -> Result:
    """One run of ``method``. Every process it starts is stopped before it returns."""
    options = {"frames": args.frames, "size": args.size, "readers": args.readers}
    with all_stopped() as children:
        sender = Child(
            "sender",
            script_argv(
                __file__, role="sender", method=method, pipe_size=args.pipe_size, **options
            ),
            stdin=subprocess.PIPE,
        )
        children.append(sender)
        port = sender.ready_port(START_TIMEOUT)
        readers = Child("readers", script_argv(__file__, role="readers", port=port, **options))
        children.append(readers)
        for child, line in ((readers, "connected"), (sender, "accepted")):
            answer = child.readline(START_TIMEOUT)
            if answer != line:
                raise RuntimeError(f"{child.name}: expected {line!r}, got {answer!r}")
        busy0, irq0 = machine_busy_seconds()
        start = time.monotonic()
        sender.send_line("go")
        timeout = START_TIMEOUT + args.frames * args.readers * args.size / 100e6
        sent = json.loads(sender.readline(timeout))
        read = json.loads(readers.readline(timeout))
        seconds = time.monotonic() - start
        busy1, irq1 = machine_busy_seconds()
    if any(count != args.frames * args.size for count in read["received"]):
        raise RuntimeError(f"{method}: readers got {read['received']} bytes")
    irq = irq1 - irq0
    return Result(
        method=method,
        size=args.size,
        delivered=args.frames * args.readers,
        sender_cpu=sent["cpu"],
        readers_cpu=read["cpu"],
        seconds=seconds,
        irq=irq,
        others=max(0.0, busy1 - busy0 - irq - sent["cpu"] - read["cpu"]),
        zerocopy_sends=sent["zerocopy_sends"],
        zerocopy_copied=sent["zerocopy_copied"],
    )


HEADER: Final = (
    f"{'run':>3} {'method':<9} {'sender CPU/frame':>16} {'vs send':>8} {'readers/frame':>13}"
    f" {'irq/frame':>9} {'path/frame':>10} {'vs send':>8} {'GB/s':>6} {'others':>6}"
)


def print_row(run: int, result: Result, baseline: Result | None) -> None:
    def ratio(value: Callable[[Result], float]) -> str:
        return "-" if baseline is None else f"{value(result) / value(baseline):.2f}x"

    notes = ""
    if result.zerocopy_sends:
        notes = f"  ({result.zerocopy_copied} of {result.zerocopy_sends} zero-copy sends copied)"
    frames = result.delivered
    print(
        f"{run:>3} {result.method:<9} {result.sender_per_frame * 1e3:13.3f} ms"
        f" {ratio(lambda r: r.sender_per_frame):>8}"
        f" {result.readers_cpu / frames * 1e3:10.3f} ms {result.irq / frames * 1e3:6.3f} ms"
        f" {result.path_per_frame * 1e3:7.3f} ms {ratio(lambda r: r.path_per_frame):>8}"
        f" {result.delivered * result.size / result.seconds / 1e9:6.2f}"
        f" {result.others / result.seconds:6.0%}{notes}",
        flush=True,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Sender CPU per delivered frame over loopback: send, sendfile, splice,"
        " MSG_ZEROCOPY."
    )
    parser.add_argument("--readers", type=int, default=10, help="connections (default 10)")
    parser.add_argument("--size", type=int, default=8 * MIB, help="bytes per frame (default 8 MiB)")
    parser.add_argument("--frames", type=int, default=40, help="frames per reader (default 40)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each method (default 3)")
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated, from {', '.join(METHODS)} (default all; send always runs)",
    )
    parser.add_argument(
        "--pipe-size", type=int, default=MIB, help="splice's pipe size (default 1 MiB)"
    )
    # Internal: how the script runs itself as the sender and the readers.
    parser.add_argument("--role", choices=["sender", "readers"], help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    if any(method not in METHODS for method in methods):
        parser.error(f"--methods: from {', '.join(METHODS)}")
    args.methods = ["send"] + [method for method in methods if method != "send"]
    if min(args.readers, args.size, args.frames, args.repeat, args.pipe_size) < 1:
        parser.error("--readers, --size, --frames, --repeat and --pipe-size must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "sender":
        run_sender(args)
        return 0
    if args.role == "readers":
        run_readers(args)
        return 0
    exit_on_sigterm()
    print(
        f"zero-copy over loopback: {machine_text()}, {args.frames} frames of {args.size:,} bytes"
        f" to each of {args.readers} readers per run"
    )
    print(HEADER)
    results: dict[str, list[Result]] = {method: [] for method in args.methods}
    ratios: dict[str, list[tuple[float, float]]] = {method: [] for method in args.methods}
    for run in range(args.repeat):
        # send first, then the others; their order alternates, so drift is shared.
        others = args.methods[1:] if run % 2 == 0 else args.methods[:0:-1]
        baseline = measure(args, "send")
        print_row(run, baseline, None)
        results["send"].append(baseline)
        for method in others:
            result = measure(args, method)
            print_row(run, result, baseline)
            results[method].append(result)
            ratios[method].append(
                (
                    result.sender_per_frame / baseline.sender_per_frame,
                    result.path_per_frame / baseline.path_per_frame,
                )
            )
    print(f"\nsummary (medians of {args.repeat} runs; ratios are each run's method/send):")
    for method, rs in results.items():
        sender = statistics.median(r.sender_per_frame for r in rs) * 1e3
        path = statistics.median(r.path_per_frame for r in rs) * 1e3
        line = f"  {method:<9} sender {sender:.3f} ms per delivered frame"
        if ratios[method]:
            line += f" ({statistics.median(a for a, _ in ratios[method]):.2f}x send)"
        line += f", sender + readers + irq {path:.3f} ms"
        if ratios[method]:
            line += f" ({statistics.median(b for _, b in ratios[method]):.2f}x send)"
        sends = sum(r.zerocopy_sends for r in rs)
        if sends:
            copied = sum(r.zerocopy_copied for r in rs)
            line += f"; the kernel copied {copied} of {sends} MSG_ZEROCOPY sends anyway"
        print(line)
    warn_if_busy(
        (r.others / r.seconds for rs in results.values() for r in rs if r.seconds > 0),
        "ratios are unreliable",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
