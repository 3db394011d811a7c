"""Relay throughput: producer -> consumer directly, and through a framewire daemon.

Run ``python benchmarks/relay.py`` (``--help`` for options). For each frame size (1 MiB and
64-byte payloads) it measures, side by side:

direct
    a producer process writes native-protocol frames over loopback TCP straight to a
    consumer process;
relayed
    the same producer writes to a framewire daemon (``python -m framewire run CONFIG``, its
    own process) with a ``receiver`` endpoint publishing into the stream ``bench`` and a
    lossless ``server`` endpoint serving it; the consumer connects to the server.

The rate is what the consumer receives during a fixed window after a warm-up, counted from the
first byte it receives. CPU use of every process during that window is read from /proc.

``--protocols native,raw`` relays raw bytes too (a second daemon, ``protocol = "raw"``);
``--baseline PATH`` runs every relayed case a second time, interleaved, through a daemon
running the framewire of the checkout at PATH (e.g. the main branch), so a change is compared
with what it changes in the same run: the summary gives each daemon's ratio to the direct
pair and CPU per frame, and this checkout's rate and CPU over the baseline's.

The script runs itself as the producer and consumer processes (``--role``, not for direct
use). Every process it starts is terminated on the way out, and every wait has a timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Final

from _harness import (
    HOST,
    MIB,
    Child,
    add_role_options,
    cpu_text,
    daemon_argv,
    exit_on_sigterm,
    free_ports,
    machine_text,
    payload_of,
    rate_text,
    sample_until_line,
    script_argv,
    size_label,
    tree_env,
    wait_for_port,
    warn_if_busy,
)

from framewire import protocols
from framewire.frame import Frame, FrameKind

FRAME_TYPE: Final = "bench"
STREAM: Final = "bench"
#: The producer sends a pre-encoded block of about this many bytes with each sendall().
BLOCK_BYTES: Final = 4 * MIB
#: The consumer reads into a reused buffer of this size.
RECEIVE_BYTES: Final = 4 * MIB
#: A socket operation that makes no progress for this long is an error.
IO_TIMEOUT: Final = 10.0
#: How long a process gets to start (print its ready line).
START_TIMEOUT: Final = 15.0

TARGET_RATIO_1MIB: Final = 0.4
TARGET_FRAMES_64B: Final = 500_000

DAEMON_CONFIG: Final = """\
[daemon]
grace_period = "1s"
log_level = "info"

[endpoints.bench-in]
kind = "receiver"
listen = "tcp://{host}:{receiver_port}"
protocol = "{protocol}"
stream = "{stream}"

[endpoints.bench-out]
kind = "server"
listen = "tcp://{host}:{server_port}"
protocol = "{protocol}"
stream = "{stream}"
policy = "lossless"
max_queue_frames = {max_queue_frames}
max_queue_bytes = {max_queue_bytes}
"""


# -- frames ---------------------------------------------------------------------------------


def encode_frame(payload_size: int, protocol: str = "native") -> bytes:
    """One DATA frame with a ``payload_size``-byte payload and no headers, as wire bytes.

    For ``protocol = "raw"`` that is the payload itself: raw bytes have no framing.
    """
    if protocol == "raw":
        return payload_of(payload_size)
    frame = Frame(
        FrameKind.DATA, FRAME_TYPE, payload_of(payload_size), timestamp=1_700_000_000_000_000_000
    )
    encoder = protocols.get("native").make_encoder()
    return b"".join(bytes(buffer) for buffer in encoder.encode(frame))


# -- the producer and consumer processes ---------------------------------------------------


class Stop(Exception):
    """Raised by the producer's SIGTERM handler."""


def raise_stop(signum: int, frame: FrameType | None) -> None:
    raise Stop


def run_producer(
    port: int,
    payload_size: int,
    seconds: float,
    protocol: str = "native",
    *,
    io_timeout: float = IO_TIMEOUT,
) -> None:
    """Send frames to ``port`` until SIGTERM (or ``seconds``, a safety limit).

    A socket error (the peer went away early, a write stalled for ``io_timeout``) is raised:
    it means the measurement is broken.
    """
    signal.signal(signal.SIGTERM, raise_stop)
    one = encode_frame(payload_size, protocol)
    block = one * max(1, BLOCK_BYTES // len(one))
    deadline = time.monotonic() + seconds
    try:
        with socket.create_connection((HOST, port), timeout=io_timeout) as sock:
            sendall = sock.sendall
            while time.monotonic() < deadline:
                sendall(block)
    except Stop:
        pass


def run_consumer(
    port: int,
    payload_size: int,
    warmup: float,
    duration: float,
    protocol: str = "native",
    *,
    io_timeout: float = IO_TIMEOUT,
    first_frame_timeout: float = IO_TIMEOUT,
) -> None:
    """Receive from ``port`` (or listen, for port 0), measure, print a JSON result line:
    ``bytes`` (wire bytes in the window), ``t0``, ``t1``.

    Prints ``ready PORT`` once connected (or listening), then the result once the window is
    over; then stays connected, not reading, until it is terminated, so every process is
    still alive when the orchestrator takes its last CPU sample. The first frame may take
    ``first_frame_timeout`` to arrive, every later read ``io_timeout``.
    """
    expected = encode_frame(payload_size, protocol)
    if port:
        sock = socket.create_connection((HOST, port), timeout=io_timeout)
        print(f"ready {port}", flush=True)
    else:
        with socket.create_server((HOST, 0)) as listener:
            print(f"ready {listener.getsockname()[1]}", flush=True)
            listener.settimeout(START_TIMEOUT)
            sock, _ = listener.accept()
    sock.settimeout(first_frame_timeout)
    view = memoryview(bytearray(max(RECEIVE_BYTES, 2 * len(expected))))
    recv_into = sock.recv_into

    # The first frame must be exactly what the producer encoded.
    have = 0
    while have < len(expected):
        n = recv_into(view[have:])
        if not n:
            raise SystemExit("consumer: the connection closed before the first frame")
        have += n
    first_byte_at = time.monotonic()
    if view[: len(expected)] != expected:
        raise SystemExit("consumer: the first frame received differs from the one sent")
    sock.settimeout(io_timeout)

    total = have
    start_at = first_byte_at + warmup
    end_at = start_at + duration
    now = time.monotonic()
    while now < start_at:
        n = recv_into(view)
        if not n:
            raise SystemExit("consumer: the connection closed during the warm-up")
        total += n
        now = time.monotonic()
    t0, bytes0 = now, total
    while now < end_at:
        n = recv_into(view)
        if not n:
            raise SystemExit("consumer: the connection closed during the measurement")
        total += n
        now = time.monotonic()
    result = {"bytes": total - bytes0, "t0": t0, "t1": now}
    print(json.dumps(result), flush=True)
    time.sleep(START_TIMEOUT)


# -- child processes ------------------------------------------------------------------------


def role_argv(
    role: str, port: int, payload_size: int, args: argparse.Namespace, protocol: str = "native"
) -> list[str]:
    return script_argv(
        __file__,
        f"--role={role}",
        port=port,
        payload_size=payload_size,
        warmup=args.warmup,
        duration=args.duration,
        protocol=protocol,
    )


# -- one measurement ------------------------------------------------------------------------


@dataclass
class Result:
    path: str  # "direct" or "relayed"
    payload_size: int
    frame_size: int
    nbytes: int
    seconds: float
    cpu: dict[str, float | None]

    @property
    def frames_per_second(self) -> float:
        return self.nbytes / self.frame_size / self.seconds

    @property
    def payload_gbit_per_second(self) -> float:
        return self.frames_per_second * self.payload_size * 8 / 1e9

    @property
    def daemon_us_per_frame(self) -> float | None:
        """The daemon's CPU time per frame received by the consumer, in microseconds."""
        used = self.cpu.get("daemon")
        return None if used is None else used / (self.nbytes / self.frame_size) * 1e6


#: Starts a relay to a listening consumer's port; yields the port the producer connects to
#: and the relay's pid, whose CPU is counted as the daemon's; stops the relay on the way out.
Proxy = Callable[[int], contextlib.AbstractContextManager[tuple[int, int]]]


def measure(
    payload_size: int,
    args: argparse.Namespace,
    daemon: Child | None,
    *,
    protocol: str = "native",
    ports: tuple[int, int] | None = None,
    proxy: Proxy | None = None,
    path: str | None = None,
) -> Result:
    """One case: direct without a daemon, relayed through ``daemon`` (whose receiver and server
    listen on ``ports``, by default ``args.receiver_port`` and ``args.server_port``), or
    through what ``proxy`` starts (then ``daemon`` must be None). ``path`` names the case.

    Raises ChildTimeout or RuntimeError if a process fails to start or to report in time.
    """
    receiver_port, server_port = ports or (args.receiver_port, args.server_port)
    consumer_port = 0 if daemon is None else server_port
    consumer = Child("consumer", role_argv("consumer", consumer_port, payload_size, args, protocol))
    with consumer, contextlib.ExitStack() as relay:
        ready_port = consumer.ready_port(START_TIMEOUT)
        producer_port = ready_port if daemon is None else receiver_port
        relay_pid = None if daemon is None else daemon.pid
        if proxy is not None:
            producer_port, relay_pid = relay.enter_context(proxy(ready_port))
        producer_seconds = args.warmup + args.duration + 2 * START_TIMEOUT
        argv = role_argv("producer", producer_port, payload_size, args, protocol)
        argv.append(f"--seconds={producer_seconds}")
        producer = Child("producer", argv)
        with producer:
            pids = {"producer": producer.pid, "consumer": consumer.pid}
            if relay_pid is not None:
                pids["daemon"] = relay_pid
            # The last sample is taken after the window: every process is still running.
            line, cpu = sample_until_line(
                consumer, pids, args.warmup + args.duration + START_TIMEOUT
            )
    report = json.loads(line)
    t0, t1 = report["t0"], report["t1"]
    used = {name: cpu.used(name, t0, t1) for name in ("daemon", "producer", "consumer")}
    machine = cpu.used("machine", t0, t1)
    ours = [value for value in used.values() if value is not None]
    used["others"] = None if machine is None else max(0.0, machine - sum(ours))
    return Result(
        path=path or ("direct" if daemon is None else "relayed"),
        payload_size=payload_size,
        frame_size=len(encode_frame(payload_size, protocol)),
        nbytes=report["bytes"],
        seconds=t1 - t0,
        cpu=used,
    )


# -- the daemon -----------------------------------------------------------------------------


def start_daemon(
    workdir: Path,
    args: argparse.Namespace,
    *,
    protocol: str = "native",
    ports: tuple[int, int] | None = None,
    tree: str | None = None,
) -> Child:
    """A daemon relaying ``protocol`` from a receiver to a lossless server listening on
    ``ports`` (default ``args.receiver_port``, ``args.server_port``), running the framewire
    of the checkout ``tree`` (None: this one's); its log goes to :func:`daemon_log`."""
    receiver_port, server_port = ports or (args.receiver_port, args.server_port)
    config = workdir / f"relay-{protocol}{'-baseline' if tree else ''}.toml"
    config.write_text(
        DAEMON_CONFIG.format(
            host=HOST,
            receiver_port=receiver_port,
            server_port=server_port,
            stream=STREAM,
            protocol=protocol,
            max_queue_frames=args.max_queue_frames,
            max_queue_bytes=args.max_queue_bytes,
        )
    )
    if args.history and tree is None:
        with config.open("a") as file:
            file.write(
                f'\n[streams.{STREAM}.history]\nmax_bytes = "{args.history}"\n'
                f'path = "{workdir / "history"}"\n'
            )
    profile = ["-m", "cProfile", "-o", str(Path(args.profile).resolve())] if args.profile else []
    argv = daemon_argv(config, *profile)
    log = daemon_log(workdir, protocol, tree)
    if tree is None:
        return Child("daemon", argv, stderr_path=log)
    return Child("daemon", argv, stderr_path=log, env=tree_env(tree), cwd=workdir)


def daemon_log(workdir: Path, protocol: str = "native", tree: str | None = None) -> Path:
    """Where :func:`start_daemon` puts the log of a daemon."""
    return workdir / f"daemon-{protocol}{'-baseline' if tree else ''}.log"


# -- reporting ------------------------------------------------------------------------------


def print_row(result: Result) -> None:
    others = result.cpu.get("others")
    rate = rate_text(
        result.payload_size,
        result.payload_gbit_per_second,
        result.frames_per_second,
        "frames/s",
    )
    cpu = [
        cpu_text(result.cpu.get(name), result.seconds, width=12)
        for name in ("daemon", "producer", "consumer")
    ]
    print(
        f"{size_label(result.payload_size):>8}  {result.path:<12} {rate:>20}"
        f"  {cpu[0]}  {cpu[1]}  {cpu[2]}"
        f"  {'-' if others is None else f'{others / result.seconds:.0%}':>6}",
        flush=True,
    )


def print_summary(results: dict[tuple[int, str], list[Result]]) -> None:
    """The median of each case, its ratio to the direct pair, the target, and the daemon's
    CPU cost per frame; with a baseline, this checkout's figures over the baseline's."""
    runs = len(next(iter(results.values())))
    print(f"\nsummary (median of {runs} run{'s' if runs != 1 else ''} per case):")
    for payload_size in sorted({size for size, _ in results}, reverse=True):
        direct = results[(payload_size, "direct")]
        large = payload_size >= MIB
        for path in [p for size, p in results if size == payload_size and p != "direct"]:
            relayed = results[(payload_size, path)]
            if large:
                d = statistics.median(r.payload_gbit_per_second for r in direct)
                r = statistics.median(r.payload_gbit_per_second for r in relayed)
                figures = f"direct {d:.2f} Gbit/s, {path} {r:.2f} Gbit/s of payload"
                met = r / d >= TARGET_RATIO_1MIB
                target = f"target relayed/direct >= {TARGET_RATIO_1MIB}"
            else:
                d = statistics.median(r.frames_per_second for r in direct)
                r = statistics.median(r.frames_per_second for r in relayed)
                figures = f"direct {d:,.0f} frames/s, {path} {r:,.0f} frames/s"
                met = r >= TARGET_FRAMES_64B
                target = f"target relayed >= {TARGET_FRAMES_64B:,} frames/s"
            costs = [c for c in (result.daemon_us_per_frame for result in relayed) if c]
            cost = f"{statistics.median(costs):,.2f} us" if costs else "unknown"
            print(f"  {size_label(payload_size)} payload: {figures}, {path}/direct {r / d:.3f}")
            print(f"    {target}: {'met' if met else 'NOT met'}; daemon CPU per frame {cost}")
            if path.endswith("baseline"):
                ours = results.get((payload_size, path.replace("baseline", "relayed")), [])
                _print_against_baseline(ours, relayed)
    warn_if_busy(
        (r.cpu["others"] / r.seconds for rs in results.values() for r in rs if r.cpu["others"]),
        "rates and ratios are unreliable, compare the daemon CPU per relayed frame",
    )


def _print_against_baseline(ours: list[Result], baseline: list[Result]) -> None:
    """Medians over runs of this checkout's rate and CPU per frame over the baseline's,
    each run's pair measured one after the other."""
    rates = [a.frames_per_second / b.frames_per_second for a, b in zip(ours, baseline, strict=True)]
    costs = [
        a.daemon_us_per_frame / b.daemon_us_per_frame
        for a, b in zip(ours, baseline, strict=True)
        if a.daemon_us_per_frame and b.daemon_us_per_frame
    ]
    if rates:
        cost = f", CPU per frame {statistics.median(costs):.3f}x" if costs else ""
        print(f"    this checkout against the baseline: rate {statistics.median(rates):.3f}x{cost}")


# -- main -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure framewire relay throughput against a direct loopback connection."
    )
    parser.add_argument(
        "--duration", type=float, default=3.0, help="measured seconds per case (default 3)"
    )
    parser.add_argument(
        "--warmup", type=float, default=0.5, help="seconds before measuring (default 0.5)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a short run: --warmup 0.2 --duration 1"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs of each case (default 1)")
    parser.add_argument(
        "--sizes",
        default=f"{MIB},64",
        help="comma-separated payload sizes in bytes (default 1048576,64)",
    )
    parser.add_argument(
        "--max-queue-frames",
        type=int,
        default=65536,
        help="the server's max_queue_frames (default 65536)",
    )
    parser.add_argument(
        "--max-queue-bytes",
        type=int,
        default=64 * MIB,
        help="the server's max_queue_bytes (default 64 MiB)",
    )
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="run the daemon under cProfile and write its stats to FILE (slows it down)",
    )
    parser.add_argument(
        "--protocols",
        default="native",
        help="comma-separated protocols to relay, of native and raw (default native)",
    )
    parser.add_argument(
        "--baseline",
        metavar="PATH",
        help="a checkout whose framewire relays every case too, in the same run",
    )
    parser.add_argument(
        "--history",
        metavar="SIZE",
        help="give this checkout's daemon (not the baseline's) a stream history of SIZE "
        "(e.g. 1GiB): with --baseline . the two differ in the history only",
    )
    parser.add_argument("--keep-log", action="store_true", help="print the daemon's log at the end")
    # Internal: how the script runs itself as the producer and the consumer.
    add_role_options(parser, ["producer", "consumer"])
    parser.add_argument("--protocol", default="native", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.duration = 0.2, 1.0
    if args.duration <= 0 or args.warmup < 0 or args.repeat < 1:
        parser.error("--duration must be positive, --warmup not negative, --repeat at least 1")
    args.protocols = [name for name in args.protocols.split(",") if name]
    if not args.protocols or set(args.protocols) - {"native", "raw"}:
        parser.error("--protocols takes native and/or raw")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "producer":
        run_producer(args.port, args.payload_size, args.seconds, args.protocol)
        return 0
    if args.role == "consumer":
        run_consumer(args.port, args.payload_size, args.warmup, args.duration, args.protocol)
        return 0

    exit_on_sigterm()
    sizes = [int(size) for size in args.sizes.split(",")]
    args.receiver_port, args.server_port = free_ports(2)
    print(
        f"framewire relay benchmark: {machine_text()}, "
        f"warm-up {args.warmup:g}s, {args.duration:g}s per case"
        + (", daemon under cProfile" if args.profile else "")
        + (f", baseline {args.baseline}" if args.baseline else "")
    )
    print(
        f"{'payload':>8}  {'path':<12} {'received rate':>20}  {'daemon CPU':>12}"
        f"  {'producer CPU':>12}  {'consumer CPU':>12}  {'others':>6}"
    )
    trees: list[tuple[str, str | None]] = [("relayed", None)]
    if args.baseline:
        trees.append(("baseline", args.baseline))
    results: dict[tuple[int, str], list[Result]] = {}
    with tempfile.TemporaryDirectory(prefix="framewire-bench-") as tmp:
        workdir = Path(tmp)
        # Each (protocol, tree): its daemon, its ports and the name of its results.
        daemons: list[tuple[str, str | None, str, tuple[int, int]]] = []
        for protocol in args.protocols:
            for name, tree in trees:
                first, second = (
                    (args.receiver_port, args.server_port) if not daemons else free_ports(2)
                )
                ports = (first, second)
                path = name if protocol == "native" else f"{protocol} {name}"
                daemons.append((protocol, tree, path, ports))
        children: list[Child] = []
        try:
            with contextlib.ExitStack() as stack:
                for protocol, tree, _, ports in daemons:
                    child = stack.enter_context(
                        start_daemon(workdir, args, protocol=protocol, ports=ports, tree=tree)
                    )
                    for port in ports:
                        wait_for_port(port, START_TIMEOUT, child)
                    children.append(child)
                for _ in range(args.repeat):
                    for size in sizes:
                        cases = [measure(size, args, None)]
                        print_row(cases[0])
                        for child, (protocol, _, path, ports) in zip(
                            children, daemons, strict=True
                        ):
                            cases.append(
                                measure(
                                    size, args, child, protocol=protocol, ports=ports, path=path
                                )
                            )
                            print_row(cases[-1])
                        for result in cases:
                            results.setdefault((size, result.path), []).append(result)
        except Exception:
            for protocol, tree, _, _ in daemons:
                print(f"benchmark failed; the log of the {protocol} daemon ({tree or 'this'}):")
                print(daemon_log(workdir, protocol, tree).read_text(errors="replace"))
            raise
        for child, (protocol, tree, _, _) in zip(children, daemons, strict=True):
            status = child.proc.returncode
            if args.keep_log or status not in (None, 0, -signal.SIGTERM):
                print(f"\n{protocol} daemon ({tree or 'this checkout'}) exit status {status}; log:")
                print(daemon_log(workdir, protocol, tree).read_text(errors="replace"))
    print_summary(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
