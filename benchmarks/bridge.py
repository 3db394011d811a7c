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
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Final

import zmq
from _harness import (
    HOST,
    MIB,
    Child,
    add_case_options,
    add_role_options,
    all_stopped,
    apply_quick,
    daemon_argv,
    exit_on_sigterm,
    machine_text,
    payload_of,
    report,
    report_rate,
    script_argv,
    size_label,
    wait_for_port,
)

START_TIMEOUT: Final = 20.0
FLAGS, CHANNEL, ERROR = 0x1234, 5, 0


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
    report(count, count * size, now - t0)


# -- orchestration ---------------------------------------------------------------------------


def role(name: str, args: argparse.Namespace, **options: object) -> list[str]:
    return script_argv(
        __file__, f"--role={name}", warmup=args.warmup, duration=args.duration, **options
    )


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


def measure(path: str, size: int, hwm: int, args: argparse.Namespace) -> dict[str, float]:
    """One case; return the receiver's report."""
    seconds = args.warmup + args.duration + 2 * START_TIMEOUT
    with (
        tempfile.TemporaryDirectory(prefix="framewire-bridge-bench-") as workdir,
        tempfile.TemporaryFile() as log,
        all_stopped() as children,
    ):
        return _measure(path, size, hwm, args, seconds, children, log, Path(workdir))


def _measure(
    path: str,
    size: int,
    hwm: int,
    args: argparse.Namespace,
    seconds: float,
    children: list[Child],
    log: IO[bytes],
    workdir: Path,
) -> dict[str, float]:
    try:
        if path == "direct":
            port = consecutive_free_ports()
            sink = Child(
                "receiver", role("receiver", args, port=port, bind=1, payload_size=size, hwm=hwm)
            )
            children.append(sink)
            if sink.readline(START_TIMEOUT) != "ready":
                raise RuntimeError("receiver: unexpected output")
            source_port = port
        else:
            p = consecutive_free_ports()
            q = consecutive_free_ports()
            while q in (p - 1, p, p + 1):
                q = consecutive_free_ports()
            config = workdir / "bench.toml"
            config.write_text(DAEMON_CONFIG.format(host=HOST, p=p, q=q, hwm=hwm))
            daemon = Child("daemon", daemon_argv(config), stderr=log.fileno())
            children.append(daemon)
            wait_for_port(q + 1, START_TIMEOUT, daemon)
            sink = Child(
                "receiver",
                role("receiver", args, port=q + 1, bind=0, payload_size=size, hwm=hwm),
            )
            children.append(sink)
            if sink.readline(START_TIMEOUT) != "ready":
                raise RuntimeError("receiver: unexpected output")
            source_port = p
        children.append(
            Child(
                "sender",
                role("sender", args, port=source_port, payload_size=size, hwm=hwm, seconds=seconds),
            )
        )
        result: dict[str, float] = json.loads(sink.readline(seconds))
        return result
    except Exception:
        log.seek(0)
        sys.stderr.write(log.read().decode(errors="replace"))
        raise


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add_case_options(parser, duration=2.0, quick_duration=0.8)
    parser.add_argument("--hwm", type=int, default=0, help="high-water mark (default: by size)")
    add_role_options(parser)
    parser.add_argument("--bind", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    apply_quick(args, 0.8)
    if args.role == "sender":
        sender(args.port, args.payload_size, args.hwm, args.seconds)
        return 0
    if args.role == "receiver":
        receiver(
            args.port, bool(args.bind), args.payload_size, args.hwm, args.warmup, args.duration
        )
        return 0

    exit_on_sigterm()
    print(
        f"framewire bridge benchmark: {machine_text()}, pyzmq {zmq.__version__} (libzmq "
        f"{zmq.zmq_version()}), warm-up {args.warmup:g}s, {args.duration:g}s per case"
    )
    print(f"{'payload':>8}  {'path':<8} {'hwm':>5} {'received rate':>20}  {'bridged/direct':>14}")
    for size in (int(text) for text in args.sizes.split(",")):
        label = size_label(size)
        hwm = args.hwm or default_hwm(size)
        direct = measure("direct", size, hwm, args)
        print(f"{label:>8}  {'direct':<8} {hwm:>5} {report_rate(direct, size):>20}", flush=True)
        bridged = measure("bridged", size, hwm, args)
        ratio = (bridged["messages"] / bridged["seconds"]) / (
            direct["messages"] / direct["seconds"]
        )
        print(
            f"{label:>8}  {'bridged':<8} {hwm:>5} {report_rate(bridged, size):>20}  {ratio:>14.3f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
