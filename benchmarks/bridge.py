"""Rogue bridge throughput: framewire between two Rogue peers against a direct pyzmq pair.

Run ``python benchmarks/bridge.py`` (``--help`` for options). For Rogue frames with a 1 MiB
and with a 64-byte payload it measures, in one run, between processes on 127.0.0.1:

direct
    a pyzmq PUSH (a Rogue TcpClient's outbound socket: IMMEDIATE, LINGER 0) sending the
    4-part Rogue message [flags, channel, error, payload] straight into a pyzmq PULL that
    counts messages: what ZeroMQ and two Python processes can move, the ceiling;
bridged
    the same sender pushes into a framewire daemon (``python -m framewire run <temporary
    config>``, its own process) with two ``bridge`` endpoints in the server role: ``in`` on
    ports P/P+1 publishes what the sender pushes into the stream ``relay``; ``out`` on
    Q/Q+1 sends that stream to the same counting PULL, connected as a Rogue TcpClient. Every
    frame is decoded into a framewire frame (flags, channel, error as headers), published,
    queued (lossless) and encoded again.

The rate is taken at the receiver over ``--duration`` seconds, starting ``--warmup``
seconds after its first message; the receiver checks that the first message is the one
sent. Every socket in both cases has the same high-water mark (``--hwm``; by default 1000
messages for 64-byte frames, as Rogue leaves it, and 64 for 1 MiB frames so that queues
stay within memory), and the daemon's endpoints use it as ``max_queue_frames``. The script
runs itself as the child processes (``--role``, not for direct use); every process it starts
is stopped on the way out (SIGTERM, then SIGKILL), and every wait has a time limit.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Final

import zmq

HOST: Final = "127.0.0.1"
MIB: Final = 1 << 20
START_TIMEOUT: Final = 20.0
STOP_TIMEOUT: Final = 5.0
FLAGS, CHANNEL, ERROR = 0x1234, 5, 0


def payload_of(size: int) -> bytes:
    return (bytes(range(256)) * (size // 256 + 1))[:size]


def message(size: int) -> list[bytes]:
    return [struct.pack("<H", FLAGS), bytes([CHANNEL]), bytes([ERROR]), payload_of(size)]


def default_hwm(size: int) -> int:
    return 64 if size >= MIB else 1000


def consecutive_free_ports() -> int:
    """A port P such that P and P+1 are both free right now."""
    for _ in range(100):
        with socket.socket() as first:
            first.bind((HOST, 0))
            port: int = first.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind((HOST, port + 1))
                except OSError:
                    continue
                return port
    raise RuntimeError("no two consecutive free ports found")


# -- the Rogue peers (plain blocking pyzmq) --------------------------------------------------


def sender(port: int, size: int, hwm: int, seconds: float) -> None:
    """A Rogue TcpClient's outbound side: PUSH connected to ``port``, sending flat out."""
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.IMMEDIATE, 1)
    push.setsockopt(zmq.LINGER, 0)
    push.setsockopt(zmq.SNDHWM, hwm)
    push.setsockopt(zmq.SNDTIMEO, int(START_TIMEOUT * 1000))
    push.connect(f"tcp://{HOST}:{port}")
    parts = message(size)
    copy = size < 65536
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            push.send_multipart(parts, copy=copy)
    except zmq.Again:
        pass  # the receiver has measured and gone
    finally:
        push.close()
        context.term()


def receiver(port: int, bind: bool, size: int, hwm: int, warmup: float, duration: float) -> None:
    """Counts Rogue messages on a PULL bound to (or, as a TcpClient, connected to) ``port``."""
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.setsockopt(zmq.RCVHWM, hwm)
    pull.setsockopt(zmq.RCVTIMEO, int(START_TIMEOUT * 1000))
    if bind:
        pull.bind(f"tcp://{HOST}:{port}")
    else:
        pull.connect(f"tcp://{HOST}:{port}")
    print("ready", flush=True)
    copy = size < 65536
    try:
        first = pull.recv_multipart(0, copy)
        if [part if isinstance(part, bytes) else part.bytes for part in first] != message(size):
            raise SystemExit("receiver: the first message differs from the one sent")
        start = time.monotonic() + warmup
        while time.monotonic() < start:
            pull.recv_multipart(0, copy)
        count, t0 = 0, time.monotonic()
        end = t0 + duration
        while (now := time.monotonic()) < end:
            pull.recv_multipart(0, copy)
            count += 1
    except zmq.Again:
        raise SystemExit("receiver: no message within the time limit") from None
    finally:
        pull.close()
        context.term()
    print(json.dumps({"messages": count, "bytes": count * size, "seconds": now - t0}))


# -- orchestration ---------------------------------------------------------------------------


class Child:
    """A child process whose stdout is read line by line, with timeouts."""

    def __init__(self, argv: Sequence[str], *, stderr: int | None = None) -> None:
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr
        )
        self._pending = b""

    def readline(self, timeout: float) -> str:
        """The next line. Raises RuntimeError on timeout or if the child exits first."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"{self.proc.args!r}: no output within {timeout:g}s")
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    code = self.proc.wait(STOP_TIMEOUT)
                    raise RuntimeError(f"a child exited (status {code}) before answering")
                self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line.decode()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def role(name: str, args: argparse.Namespace, **options: object) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), f"--role={name}"]
    argv += [f"--warmup={args.warmup}", f"--duration={args.duration}"]
    return argv + [f"--{key.replace('_', '-')}={value}" for key, value in options.items()]


DAEMON_CONFIG: Final = """
[daemon]
grace_period = "1s"
log_level = "warning"

[endpoints.in]
kind = "bridge"
role = "server"
address = "tcp://{host}:{p}"
publish = "relay"
max_queue_frames = {hwm}
max_queue_bytes = "256MiB"

[endpoints.out]
kind = "bridge"
role = "server"
address = "tcp://{host}:{q}"
subscribe = "relay"
max_queue_frames = {hwm}
max_queue_bytes = "256MiB"
"""


def wait_for_port(port: int, timeout: float) -> None:
    """Wait until something listens on ``port`` (the daemon has bound its sockets)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout:g}s")


def measure(path: str, size: int, hwm: int, args: argparse.Namespace) -> dict[str, float]:
    """One case; return the receiver's report."""
    seconds = args.warmup + args.duration + 2 * START_TIMEOUT
    children: list[Child] = []
    with tempfile.TemporaryFile() as log:
        return _measure(path, size, hwm, args, seconds, children, log)


def _measure(
    path: str,
    size: int,
    hwm: int,
    args: argparse.Namespace,
    seconds: float,
    children: list[Child],
    log: IO[bytes],
) -> dict[str, float]:
    try:
        if path == "direct":
            port = consecutive_free_ports()
            sink = Child(role("receiver", args, port=port, bind=1, payload_size=size, hwm=hwm))
            children.append(sink)
            if sink.readline(START_TIMEOUT) != "ready":
                raise RuntimeError("receiver: unexpected output")
            source_port = port
        else:
            p = consecutive_free_ports()
            q = consecutive_free_ports()
            while q in (p - 1, p, p + 1):
                q = consecutive_free_ports()
            config = Path(tempfile.mkdtemp(prefix="framewire-bridge-bench-")) / "bench.toml"
            config.write_text(DAEMON_CONFIG.format(host=HOST, p=p, q=q, hwm=hwm))
            daemon = Child(
                [sys.executable, "-m", "framewire", "run", str(config)], stderr=log.fileno()
            )
            children.append(daemon)
            wait_for_port(q + 1, START_TIMEOUT)
            sink = Child(role("receiver", args, port=q + 1, bind=0, payload_size=size, hwm=hwm))
            children.append(sink)
            if sink.readline(START_TIMEOUT) != "ready":
                raise RuntimeError("receiver: unexpected output")
            source_port = p
        children.append(
            Child(
                role("sender", args, port=source_port, payload_size=size, hwm=hwm, seconds=seconds)
            )
        )
        result: dict[str, float] = json.loads(sink.readline(seconds))
        return result
    except Exception:
        log.seek(0)
        sys.stderr.write(log.read().decode(errors="replace"))
        raise
    finally:
        for child in reversed(children):
            child.stop()


def rate(result: dict[str, float], size: int) -> str:
    if size >= MIB:
        return f"{result['bytes'] * 8 / result['seconds'] / 1e9:8.2f} Gbit/s"
    return f"{result['messages'] / result['seconds']:>12,.0f} msg/s"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=2.0, help="seconds measured per case")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds before measuring")
    parser.add_argument("--quick", action="store_true", help="--warmup 0.2 --duration 0.8")
    parser.add_argument(
        "--sizes", default=f"{MIB},64", help="payload sizes in bytes (default 1048576,64)"
    )
    parser.add_argument("--hwm", type=int, default=0, help="high-water mark (default: by size)")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--bind", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--payload-size", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.duration = 0.2, 0.8
    if args.role == "sender":
        sender(args.port, args.payload_size, args.hwm, args.seconds)
        return 0
    if args.role == "receiver":
        receiver(
            args.port, bool(args.bind), args.payload_size, args.hwm, args.warmup, args.duration
        )
        return 0

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    print(
        f"framewire bridge benchmark: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, "
        f"Python {sys.version.split()[0]}, pyzmq {zmq.__version__} (libzmq "
        f"{zmq.zmq_version()}), warm-up {args.warmup:g}s, {args.duration:g}s per case"
    )
    print(f"{'payload':>8}  {'path':<8} {'hwm':>5} {'received rate':>20}  {'bridged/direct':>14}")
    for size in (int(text) for text in args.sizes.split(",")):
        label = f"{size // MIB} MiB" if size % MIB == 0 else f"{size} B"
        hwm = args.hwm or default_hwm(size)
        direct = measure("direct", size, hwm, args)
        print(f"{label:>8}  {'direct':<8} {hwm:>5} {rate(direct, size):>20}", flush=True)
        bridged = measure("bridged", size, hwm, args)
        ratio = (bridged["messages"] / bridged["seconds"]) / (
            direct["messages"] / direct["seconds"]
        )
        print(
            f"{label:>8}  {'bridged':<8} {hwm:>5} {rate(bridged, size):>20}  {ratio:>14.3f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
