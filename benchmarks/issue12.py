"""Every row of issue 12's table, each with its anchor measured in the same run.

Run ``python benchmarks/issue12.py`` (``--quick`` for a smoke run, ``--repeat N`` for medians
of N runs, ``--rows`` to choose rows; ``--help``). Each row prints framewire's figure, its
baseline measured in the same run, their ratio, the issue's target and whether it is met, and
the CPU that other processes on the machine used while it was measured (share of one CPU,
the largest over the row's measurements). README.md (this directory) describes every row.

The rows reuse the other scripts: relay.py's producer, consumer and daemon for every
throughput row (framewire, a direct pair, nginx's stream proxy, socat), g3_fanout.py for the
G3 row; the ZeroMQ anchors, fan-out clients and latency probes live here and run as child
processes of this script (``--role``, not for direct use). An anchor that is not installed
(nginx with its stream module, socat, pyzmq, spt3g) is skipped with a printed note. Every
process started is stopped on the way out, and every wait has a time limit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import relay
from _harness import (
    BUSY_MACHINE,
    HOST,
    MIB,
    Child,
    ChildTimeout,
    CpuSamples,
    all_stopped,
    cpu_seconds,
    daemon_argv,
    exit_on_sigterm,
    free_port,
    free_ports,
    machine_text,
    payload_of,
    script_argv,
    wait_for_port,
)

GB: Final = 1e9
START_TIMEOUT: Final = 20.0
IO_TIMEOUT: Final = 10.0
SAMPLE_INTERVAL: Final = 0.05
#: How long the daemon's CPU is measured with every idle client connected.
IDLE_WINDOW: Final = 2.0
NGINX_STREAM_MODULE: Final = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
ROWS: Final = ("relay", "fanout", "latency", "g3")

# -- one printed row ------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table: what ``--rows`` section measured it, and its verdict."""

    case: str
    figure: str
    baseline: str
    ratio: str
    target: str
    met: bool | None  # None: no target, or not measured
    others: float | None  # the largest share of one CPU other processes used meanwhile


def median(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def worst(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def print_row(row: Row) -> None:
    met = "-" if row.met is None else ("met" if row.met else "NOT met")
    others = "-" if row.others is None else f"{row.others:.0%}"
    print(
        f"| {row.case} | {row.figure} | {row.baseline} | {row.ratio} | {row.target} | {met}"
        f" | {others} |",
        flush=True,
    )


TABLE_HEAD: Final = (
    "| case | framewire | baseline in the same run | ratio | target | met? | others |\n"
    "|---|---|---|---|---|---|---|"
)


# -- proxies: nginx's stream proxy and socat ------------------------------------------------

NGINX_CONFIG: Final = """\
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
load_module {module};
events {{ worker_connections 64; }}
stream {{
    server {{
        listen {host}:{port};
        proxy_pass {host}:{upstream};
        proxy_buffer_size 256k;
    }}
}}
"""


def nginx_missing() -> str | None:
    """Why nginx's stream proxy cannot run here, or None."""
    if shutil.which("nginx") is None:
        return "nginx is not installed (apt-get install nginx libnginx-mod-stream)"
    if not NGINX_STREAM_MODULE.exists():
        return f"nginx's stream module is missing ({NGINX_STREAM_MODULE}: libnginx-mod-stream)"
    return None


@contextlib.contextmanager
def nginx_proxy(workdir: Path, upstream: int) -> Iterator[tuple[int, int]]:
    """nginx (one process: no master, no daemon) relaying a port to ``upstream`` with 256 KiB
    buffers; yields (its port, its pid). RuntimeError if it does not listen in time."""
    prefix = workdir / "nginx"
    prefix.mkdir(exist_ok=True)
    port = free_port()
    config = prefix / "nginx.conf"
    config.write_text(
        NGINX_CONFIG.format(
            prefix=prefix, module=NGINX_STREAM_MODULE, host=HOST, port=port, upstream=upstream
        )
    )
    argv = ["nginx", "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(config)]
    with Child("nginx", argv, stderr_path=prefix / "stderr.log") as child:
        wait_for_listen(port, child)
        yield port, child.pid


@contextlib.contextmanager
def socat_proxy(workdir: Path, upstream: int) -> Iterator[tuple[int, int]]:
    """socat relaying one connection to ``upstream`` with 256 KiB buffers (``-b``)."""
    port = free_port()
    argv = [
        "socat",
        "-b",
        str(256 * 1024),
        f"TCP-LISTEN:{port},bind={HOST},reuseaddr",
        f"TCP:{HOST}:{upstream}",
    ]
    with Child("socat", argv, stderr_path=workdir / "socat.log") as child:
        wait_for_listen(port, child)
        yield port, child.pid


def wait_for_listen(port: int, child: Child) -> None:
    """Wait until ``port`` is in LISTEN state (from /proc/net/tcp) without connecting to it:
    a proxy would relay the probe to the consumer, which accepts exactly one connection.
    RuntimeError after START_TIMEOUT or if ``child`` exits first."""
    needle = f"{socket.htonl(0x7F000001):08X}:{port:04X}"
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if child.proc.poll() is not None:
            raise RuntimeError(f"{child.name} exited with status {child.proc.returncode}")
        with open("/proc/net/tcp") as table:
            for line in table:
                fields = line.split()
                if len(fields) > 3 and fields[1] == needle and fields[3] == "0A":
                    return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{child.name}: not listening on {port} after {START_TIMEOUT:g}s")
        time.sleep(0.02)


# -- ZeroMQ anchors: PUSH/PULL point to point, and through zmq.proxy -----------------------


def run_zmq_pull(args: argparse.Namespace) -> None:
    """Bind a PULL socket (port 0: a free one, printed as ``ready PORT``) or connect it
    (``--port``); count messages over the window; print a JSON line like relay.py's
    consumer (``bytes`` = messages x payload size, ``t0``, ``t1``); then wait to be stopped."""
    import zmq

    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVTIMEO, int(IO_TIMEOUT * 1000))
    if args.port:
        pull.connect(f"tcp://{HOST}:{args.port}")
        print(f"ready {args.port}", flush=True)
    else:
        port = pull.bind_to_random_port(f"tcp://{HOST}")
        print(f"ready {port}", flush=True)
    recv = pull.recv
    first = recv()
    if len(first) != args.payload_size:
        raise SystemExit("zmq-pull: the first message has the wrong size")
    start_at = time.monotonic() + args.warmup
    while time.monotonic() < start_at:
        for _ in range(1000):
            recv()
    count = 0
    t0 = time.monotonic()
    end_at = t0 + args.duration
    now = t0
    while now < end_at:
        for _ in range(1000):
            recv()
        count += 1000
        now = time.monotonic()
    print(json.dumps({"bytes": count * args.payload_size, "t0": t0, "t1": now}), flush=True)
    time.sleep(START_TIMEOUT)


def run_zmq_push(args: argparse.Namespace) -> None:
    """Connect a PUSH socket to ``--port`` and send ``--payload-size``-byte messages flat out
    (blocking at the high-water mark) until stopped or ``--seconds`` pass."""
    import zmq

    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(f"tcp://{HOST}:{args.port}")
    message = payload_of(args.payload_size)
    send = push.send
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        for _ in range(1000):
            send(message)


def run_zmq_proxy(args: argparse.Namespace) -> None:
    """zmq.proxy from a bound PULL (frontend) to a PUSH connected to ``--port``; prints
    ``ready FRONTEND_PORT``; runs until stopped."""
    import zmq

    context = zmq.Context()
    frontend = context.socket(zmq.PULL)
    backend = context.socket(zmq.PUSH)
    backend.connect(f"tcp://{HOST}:{args.port}")
    port = frontend.bind_to_random_port(f"tcp://{HOST}")
    print(f"ready {port}", flush=True)
    zmq.proxy(frontend, backend)


def zmq_measure(args: argparse.Namespace, *, proxied: bool) -> relay.Result:
    """64-byte messages PUSH -> PULL, or PUSH -> zmq.proxy (its own process) -> PULL; the
    proxy's CPU is the result's ``daemon`` CPU."""
    size = 64
    common = {"payload_size": size, "warmup": args.warmup, "duration": args.duration}
    with all_stopped() as children:
        pull = Child("zmq-pull", script_argv(__file__, "--role=zmq-pull", **common))
        children.append(pull)
        pull_port = pull.ready_port(START_TIMEOUT)
        pids = {"consumer": pull.pid}
        push_port = pull_port
        if proxied:
            proxy = Child("zmq-proxy", script_argv(__file__, "--role=zmq-proxy", port=pull_port))
            children.append(proxy)
            push_port = proxy.ready_port(START_TIMEOUT)
            pids["daemon"] = proxy.pid
        seconds = args.warmup + args.duration + 2 * START_TIMEOUT
        push = Child(
            "zmq-push",
            script_argv(__file__, "--role=zmq-push", port=push_port, seconds=seconds, **common),
        )
        children.append(push)
        pids["producer"] = push.pid
        line, cpu = sample_until_line(pull, pids, args.warmup + args.duration + START_TIMEOUT)
    return result_of("zmq proxy" if proxied else "zmq direct", size, size, json.loads(line), cpu)


def sample_until_line(child: Child, pids: dict[str, int], timeout: float) -> tuple[str, CpuSamples]:
    """Sample the CPU of ``pids`` (and of the machine) until ``child`` prints a line."""
    cpu = CpuSamples(pids)
    cpu.take()
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = child.readline(SAMPLE_INTERVAL)
            break
        except ChildTimeout:
            if time.monotonic() > deadline:
                raise
        cpu.take()
    cpu.take()
    return line, cpu


def result_of(
    path: str, payload_size: int, frame_size: int, report: dict[str, float], cpu: CpuSamples
) -> relay.Result:
    t0, t1 = report["t0"], report["t1"]
    used = {name: cpu.used(name, t0, t1) for name in ("daemon", "producer", "consumer")}
    machine = cpu.used("machine", t0, t1)
    ours = [value for value in used.values() if value is not None]
    used["others"] = None if machine is None else max(0.0, machine - sum(ours))
    return relay.Result(
        path=path,
        payload_size=payload_size,
        frame_size=frame_size,
        nbytes=int(report["bytes"]),
        seconds=t1 - t0,
        cpu=used,
    )


def free_pair() -> tuple[int, int]:
    """Two ports that were free a moment ago: a receiver's and a server's."""
    first, second = free_ports(2)
    return first, second


# -- the throughput rows --------------------------------------------------------------------


def cpu_per_gb(result: relay.Result) -> float | None:
    """The relay's CPU seconds per GB (10^9 bytes) of payload delivered."""
    used = result.cpu.get("daemon")
    payload = result.nbytes / result.frame_size * result.payload_size
    return None if used is None or payload <= 0 else used / (payload / GB)


def us_per_frame(result: relay.Result) -> float | None:
    return result.daemon_us_per_frame


def others_share(result: relay.Result) -> float | None:
    others = result.cpu.get("others")
    return None if others is None or result.seconds <= 0 else others / result.seconds


def relay_rows(args: argparse.Namespace, workdir: Path) -> list[Row]:
    """1 MiB native (direct, framewire, nginx, socat), 1 MiB raw, 64 KiB, 64 B (framewire,
    pyzmq point to point, pyzmq through zmq.proxy)."""
    relay_args = argparse.Namespace(
        warmup=args.warmup,
        duration=args.duration,
        max_queue_frames=65536,
        max_queue_bytes=64 * MIB,
        profile=None,
    )
    native_ports, raw_ports = free_pair(), free_pair()
    relay_args.receiver_port, relay_args.server_port = native_ports
    notes = []
    if (why := nginx_missing()) is not None:
        notes.append(f"note: nginx rows skipped: {why}")
    if shutil.which("socat") is None:
        notes.append("note: socat row skipped: socat is not installed (apt-get install socat)")
    try:
        import zmq  # noqa: F401

        has_zmq = True
    except ImportError:
        has_zmq = False
        notes.append("note: pyzmq rows skipped: pip install -e '.[test]'")
    for note in notes:
        print(note, flush=True)

    results: dict[str, list[relay.Result]] = {}

    def keep(result: relay.Result) -> None:
        results.setdefault(result.path, []).append(result)
        line = (
            f"  {result.path:<16} {result.frames_per_second:>12,.0f} frames/s"
            f" {result.payload_gbit_per_second:7.2f} Gbit/s"
        )
        if (cost := cpu_per_gb(result)) is not None:
            line += f"  relay CPU {cost:.3f} s/GB, {us_per_frame(result):.2f} us/frame"
        if (others := others_share(result)) is not None:
            line += f"  others {others:.0%}"
        print(line, flush=True)

    with (
        relay.start_daemon(workdir, relay_args, ports=native_ports) as native,
        relay.start_daemon(workdir, relay_args, protocol="raw", ports=raw_ports) as raw,
    ):
        for daemon, ports in ((native, native_ports), (raw, raw_ports)):
            for port in ports:
                wait_for_port(port, START_TIMEOUT, daemon)
        for run in range(args.repeat):
            print(f"relay rows, run {run + 1} of {args.repeat}:", flush=True)
            keep(relay.measure(MIB, relay_args, None, path="1 MiB direct"))
            keep(relay.measure(MIB, relay_args, native, path="1 MiB framewire"))
            if nginx_missing() is None:
                proxy: relay.Proxy = lambda port: nginx_proxy(workdir, port)  # noqa: E731
                keep(relay.measure(MIB, relay_args, None, proxy=proxy, path="1 MiB nginx"))
            if shutil.which("socat") is not None:
                proxy = lambda port: socat_proxy(workdir, port)  # noqa: E731
                keep(relay.measure(MIB, relay_args, None, proxy=proxy, path="1 MiB socat"))
            keep(
                relay.measure(
                    MIB, relay_args, raw, protocol="raw", ports=raw_ports, path="1 MiB raw"
                )
            )
            keep(relay.measure(64 * 1024, relay_args, native, path="64 KiB framewire"))
            keep(relay.measure(64, relay_args, native, path="64 B framewire"))
            if has_zmq:
                keep(zmq_measure(args, proxied=False))
                keep(zmq_measure(args, proxied=True))

    def med(path: str, value: Callable[[relay.Result], float | None]) -> float | None:
        return median([value(r) for r in results.get(path, [])])

    def ratio(path: str, base: str, value: Callable[[relay.Result], float | None]) -> float:
        """The median over runs of ``value`` of ``path`` / that of ``base`` in the same run."""
        pairs = zip(results.get(path, []), results.get(base, []), strict=True)
        values = [(value(a), value(b)) for a, b in pairs]
        found = median([a / b for a, b in values if a is not None and b])
        if found is None:
            raise RuntimeError(f"no {path} / {base} ratio measured")
        return found

    def busy(*paths: str) -> float | None:
        return worst([others_share(r) for p in paths for r in results.get(p, [])])

    def gbit(r: relay.Result) -> float:
        return r.payload_gbit_per_second

    def fps(r: relay.Result) -> float:
        return r.frames_per_second

    rows = []
    direct, framewire = med("1 MiB direct", gbit), med("1 MiB framewire", gbit)
    assert direct is not None
    assert framewire is not None
    rows.append(
        Row(
            "1 MiB native frames relayed, Gbit/s",
            f"{framewire:.2f}",
            f"direct socket pair {direct:.2f}",
            f"{(ratio_1m := ratio('1 MiB framewire', '1 MiB direct', gbit)):.2f}",
            ">= 0.5",
            ratio_1m >= 0.5,
            busy("1 MiB direct", "1 MiB framewire"),
        )
    )
    fw_cost = med("1 MiB framewire", cpu_per_gb)
    for name, label in (
        ("nginx", "nginx stream proxy, 256 KiB buffers"),
        ("socat", "socat -b 256k"),
    ):
        cost = med(f"1 MiB {name}", cpu_per_gb)
        if cost is None or fw_cost is None:
            rows.append(
                Row(
                    f"1 MiB, relay CPU per GB vs {name}",
                    "-",
                    f"{label}: skipped",
                    "-",
                    "<= 1.0x" if name == "nginx" else "-",
                    None,
                    None,
                )
            )
            continue
        rows.append(
            Row(
                "1 MiB, relay CPU per GB" + ("" if name == "nginx" else " (socat)"),
                f"{fw_cost:.3f} s",
                f"{label}: {cost:.3f} s",
                f"{(cost_ratio := ratio('1 MiB framewire', f'1 MiB {name}', cpu_per_gb)):.2f}x"
                " the CPU",
                "<= 1.0x" if name == "nginx" else "- (for information)",
                cost_ratio <= 1.0 if name == "nginx" else None,
                busy("1 MiB framewire", f"1 MiB {name}"),
            )
        )
    raw_rate, raw_cost = med("1 MiB raw", gbit), med("1 MiB raw", cpu_per_gb)
    assert raw_rate is not None
    rows.append(
        Row(
            "1 MiB raw bytes relayed",
            f"{raw_rate:.2f} Gbit/s, {raw_cost or 0:.3f} s CPU/GB",
            f"direct pair {direct:.2f} Gbit/s",
            f"{(raw_ratio := ratio('1 MiB raw', '1 MiB direct', gbit)):.2f}",
            ">= 0.45",
            raw_ratio >= 0.45,
            busy("1 MiB direct", "1 MiB raw"),
        )
    )
    small, small_cost = med("64 B framewire", fps), med("64 B framewire", us_per_frame)
    assert small is not None
    figure = f"{small:,.0f}/s ({small_cost or 0:.2f} us CPU each)"
    zmq_direct = med("zmq direct", fps)
    zmq_proxy, proxy_cost = med("zmq proxy", fps), med("zmq proxy", us_per_frame)
    if zmq_direct is None or zmq_proxy is None:
        rows.append(
            Row(
                "64 B frames relayed, frames/s",
                figure,
                "pyzmq: skipped",
                "-",
                ">= 1.0",
                None,
                busy("64 B framewire"),
            )
        )
    else:
        rows.append(
            Row(
                "64 B frames relayed, frames/s",
                figure,
                f"pyzmq PUSH/PULL point to point {zmq_direct:,.0f}/s",
                f"{(small_ratio := ratio('64 B framewire', 'zmq direct', fps)):.2f}",
                ">= 1.0",
                small_ratio >= 1.0,
                busy("64 B framewire", "zmq direct"),
            )
        )
        cpu_ratio = ratio("64 B framewire", "zmq proxy", us_per_frame)
        rows.append(
            Row(
                "64 B frames relayed, vs a zmq proxy",
                figure,
                f"PUSH -> zmq proxy -> PULL {zmq_proxy:,.0f}/s ({proxy_cost or 0:.2f} us CPU each)",
                f"{ratio('64 B framewire', 'zmq proxy', fps):.2f} (CPU/frame {cpu_ratio:.2f}x)",
                "CPU/frame <= 1.0x the proxy's",
                cpu_ratio <= 1.0,
                busy("64 B framewire", "zmq proxy"),
            )
        )
    mid_cost = med("64 KiB framewire", cpu_per_gb)
    if mid_cost is not None and fw_cost:
        rows.append(
            Row(
                "64 KiB frames, CPU per GB",
                f"{mid_cost:.3f} s",
                f"the same daemon at 1 MiB: {fw_cost:.3f} s",
                f"{(mid_ratio := ratio('64 KiB framewire', '1 MiB framewire', cpu_per_gb)):.2f}x",
                "<= 1.3x",
                mid_ratio <= 1.3,
                busy("64 KiB framewire", "1 MiB framewire"),
            )
        )
    return rows


# -- fan-out: many cheap clients ------------------------------------------------------------


def raise_open_files() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run_clients(args: argparse.Namespace) -> None:
    """``--count`` clients of the server at ``--port`` in one process, read with epoll.

    Prints ``connected N`` once every connection is up. With ``--frame-size`` > 0, prints
    ``frame K NS`` when every client has received K whole frames (NS: perf_counter_ns of the
    last one). On a ``report`` line from stdin, prints ``{"bytes": received so far, "t":
    monotonic time}``; on ``exit`` or the end of stdin, exits. A closed connection is an
    error (SystemExit).
    """
    raise_open_files()
    count, frame_size = args.count, args.frame_size
    sockets = []
    for _ in range(count):
        sock = socket.create_connection((HOST, args.port), timeout=START_TIMEOUT)
        sock.setblocking(False)
        sockets.append(sock)
    print(f"connected {count}", flush=True)
    poller = select.epoll()
    # fd -> (index, the socket's recv_into): the loop below does the least work per event.
    readers = {}
    for index, sock in enumerate(sockets):
        poller.register(sock.fileno(), select.EPOLLIN)
        readers[sock.fileno()] = (index, sock.recv_into)
    poller.register(0, select.EPOLLIN)
    received = [0] * count
    frames_done = [0] * count
    clients_done: dict[int, int] = {}
    total = 0
    view = memoryview(bytearray(MIB))
    pending = b""
    perf_counter_ns = time.perf_counter_ns
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        for fd, _ in poller.poll(1.0, 4096):
            if fd == 0:
                chunk = os.read(0, 4096)
                if not chunk:
                    return
                pending += chunk
                while b"\n" in pending:
                    line, _, pending = pending.partition(b"\n")
                    if line == b"exit":
                        return
                    print(json.dumps({"bytes": total, "t": time.monotonic()}), flush=True)
                continue
            index, recv_into = readers[fd]
            n = recv_into(view)
            if not n:
                raise SystemExit(f"clients: connection {index} closed by the daemon")
            total += n
            if frame_size:
                received[index] += n
                while received[index] >= (frames_done[index] + 1) * frame_size:
                    frames_done[index] += 1
                    frame = frames_done[index]
                    clients_done[frame] = clients_done.get(frame, 0) + 1
                    if clients_done[frame] == count:
                        print(f"frame {frame} {perf_counter_ns()}", flush=True)


FANOUT_CONFIG: Final = """\
[daemon]
grace_period = "1s"
log_level = "info"

[endpoints.in]
kind = "receiver"
listen = "tcp://{host}:{receiver_port}"
stream = "fan"

[endpoints.out]
kind = "server"
listen = "tcp://{host}:{server_port}"
stream = "fan"
policy = "{policy}"
max_clients = {max_clients}
max_queue_frames = 64
max_queue_bytes = "64MiB"
"""

CONNECTED_LINE: Final = re.compile(r"client \S+ connected \((\d+) now\)")


@contextlib.contextmanager
def fanout_daemon(
    workdir: Path, clients: int, policy: str
) -> Iterator[tuple[Child, Path, int, int]]:
    """A daemon with a native receiver and a server for ``clients``; yields it, its log,
    the receiver's and the server's port."""
    receiver_port, server_port = free_ports(2)
    config = workdir / f"fanout-{clients}.toml"
    config.write_text(
        FANOUT_CONFIG.format(
            host=HOST,
            receiver_port=receiver_port,
            server_port=server_port,
            policy=policy,
            max_clients=clients + 16,
        )
    )
    log = workdir / f"fanout-{clients}.log"
    with Child("daemon", daemon_argv(config), stderr_path=log) as daemon:
        wait_for_port(receiver_port, START_TIMEOUT, daemon)
        wait_for_listen(server_port, daemon)
        yield daemon, log, receiver_port, server_port


def wait_connected(daemon: Child, log: Path, clients: int, timeout: float) -> None:
    """Wait until the daemon logs its ``clients``-th client; RuntimeError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        if daemon.proc.poll() is not None:
            raise RuntimeError(f"daemon exited with status {daemon.proc.returncode}")
        text = log.read_text(errors="replace")
        counts = [int(m.group(1)) for m in CONNECTED_LINE.finditer(text)]
        if counts and max(counts) >= clients:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"daemon: {max(counts, default=0)} of {clients} clients after {timeout:g}s"
            )
        time.sleep(0.1)


def start_clients(
    children: list[Child], port: int, clients: int, processes: int, frame_size: int, seconds: float
) -> list[Child]:
    """``clients`` clients spread over ``processes`` processes; waits until all connected."""
    group = []
    for index in range(processes):
        count = clients // processes + (1 if index < clients % processes else 0)
        argv = script_argv(
            __file__,
            "--role=clients",
            port=port,
            count=count,
            frame_size=frame_size,
            seconds=seconds,
        )
        child = Child(f"clients {index}", argv, stdin=subprocess.PIPE)
        children.append(child)
        group.append(child)
    for child in group:
        line = child.readline(START_TIMEOUT + clients / 200)
        if not line.startswith("connected"):
            raise RuntimeError(f"{child.name}: unexpected output {line!r}")
    return group


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


@dataclass
class IdleResult:
    rss: int
    rss_before: int
    idle_cpu: float | None  # the daemon's CPU share with every client connected and idle
    last_ms: list[float]  # per frame: publish to the last client's receipt
    others: float | None
    plain_ms: list[float]  # the same, from a plain-Python loop of sends to the same clients
    plain_loop_ms: list[float]  # that loop alone
    daemon_cpu_ms: float | None  # the daemon's CPU per frame delivered to every client
    plain_cpu_ms: float | None  # the plain server's
    plain_others: float | None


def time_frames(
    group: list[Child], frames: int, publish: Callable[[], int], cpu: CpuSamples, serving: str
) -> tuple[list[float], float | None, float | None]:
    """Publish ``frames`` frames one at a time (``publish`` returns when it started, in
    perf_counter_ns) and time each to its arrival at the last client of ``group``, in ms;
    the CPU of ``cpu``'s process ``serving`` per frame, in ms (it is idle between frames);
    and the share of one CPU that processes other than ``cpu``'s used meanwhile."""
    times = []
    cpu.take()
    t_start = time.monotonic()
    for number in range(1, frames + 1):
        sent = publish()
        lasts = []
        for child in group:
            words = child.readline(START_TIMEOUT).split()
            if words[:2] != ["frame", str(number)]:
                raise RuntimeError(f"{child.name}: unexpected {' '.join(words)!r}")
            lasts.append(int(words[2]))
        times.append((max(lasts) - sent) / 1e6)
        cpu.take()
        time.sleep(0.2)
    t_end = time.monotonic()
    cpu.take()
    served = cpu.used(serving, t_start, t_end)
    per_frame = None if served is None else served / frames * 1e3
    machine = cpu.used("machine", t_start, t_end)
    ours = [cpu.used(name, t_start, t_end) for name in cpu.pids]
    if machine is None or None in ours:
        return times, per_frame, None
    others = max(0.0, machine - sum(v for v in ours if v is not None)) / (t_end - t_start)
    return times, per_frame, others


def idle_measure(args: argparse.Namespace, workdir: Path) -> IdleResult:
    """``--idle-clients`` idle clients: the daemon's RSS, then ``--idle-frames`` 64-byte
    frames published one at a time, each timed to its arrival at the last client."""
    clients = args.idle_clients
    frame = relay.encode_frame(64)
    with fanout_daemon(workdir, clients, "lossy") as (daemon, log, receiver_port, server_port):
        time.sleep(0.5)
        before = rss_bytes(daemon.pid)
        with all_stopped() as children:
            group = start_clients(
                children, server_port, clients, client_processes(clients), len(frame), 600
            )
            wait_connected(daemon, log, clients, START_TIMEOUT + clients / 100)
            time.sleep(1.0)
            rss = rss_bytes(daemon.pid)
            idle_before, idle_start = cpu_seconds(daemon.pid), time.monotonic()
            time.sleep(IDLE_WINDOW)
            idle_after, idle_end = cpu_seconds(daemon.pid), time.monotonic()
            idle_cpu = (
                None
                if idle_before is None or idle_after is None
                else (idle_after - idle_before) / (idle_end - idle_start)
            )
            pids = {"daemon": daemon.pid, "harness": os.getpid()}
            pids.update({child.name: child.pid for child in group})
            with socket.create_connection((HOST, receiver_port), timeout=IO_TIMEOUT) as producer:
                time.sleep(0.5)  # the receiver has accepted the producer

                def publish() -> int:
                    sent = time.perf_counter_ns()
                    producer.sendall(frame)
                    return sent

                times, daemon_ms, others = time_frames(
                    group, args.idle_frames, publish, CpuSamples(pids), "daemon"
                )
            for child in group:
                child.send_line("exit")
    plain, loops, plain_cpu, plain_others = plain_fanout_measure(args)
    return IdleResult(
        rss=rss,
        rss_before=before,
        idle_cpu=idle_cpu,
        last_ms=times,
        others=others,
        plain_ms=plain,
        plain_loop_ms=loops,
        daemon_cpu_ms=daemon_ms,
        plain_cpu_ms=plain_cpu,
        plain_others=plain_others,
    )


def client_processes(clients: int) -> int:
    """How many processes hold ``clients`` idle clients: up to 4, at least 500 each."""
    return max(1, min(4, clients // 500))


def run_plain_server(args: argparse.Namespace) -> None:
    """The plain-Python fan-out baseline: listen (``ready PORT``), accept ``--count``
    clients (``accepted N``), then for each ``send`` line on stdin, send one
    ``--payload-size`` native frame to every client in a loop of blocking ``send`` calls and
    print ``sent START END`` (perf_counter_ns before and after the loop)."""
    raise_open_files()
    frame = relay.encode_frame(args.payload_size)
    with socket.create_server((HOST, 0), backlog=4096) as listener:
        print(f"ready {listener.getsockname()[1]}", flush=True)
        listener.settimeout(START_TIMEOUT)
        sockets = [listener.accept()[0] for _ in range(args.count)]
    print(f"accepted {len(sockets)}", flush=True)
    for line in sys.stdin:
        if line.strip() != "send":
            break
        sent = time.perf_counter_ns()
        for sock in sockets:
            sock.send(frame)
        print(f"sent {sent} {time.perf_counter_ns()}", flush=True)


def plain_fanout_measure(
    args: argparse.Namespace,
) -> tuple[list[float], list[float], float | None, float | None]:
    """The same clients and frames as idle_measure, served by run_plain_server: the times
    to the last client, the times of the server's loops of sends alone, the server's CPU
    per frame (all in ms), the others' CPU share."""
    clients = args.idle_clients
    frame_size = len(relay.encode_frame(64))
    with all_stopped() as children:
        server = Child(
            "plain server",
            script_argv(__file__, "--role=plain-server", count=clients, payload_size=64),
            stdin=subprocess.PIPE,
        )
        children.append(server)
        port = server.ready_port(START_TIMEOUT)
        group = start_clients(children, port, clients, client_processes(clients), frame_size, 600)
        words = server.readline(START_TIMEOUT + clients / 100).split()
        if words != ["accepted", str(clients)]:
            raise RuntimeError(f"plain server: unexpected {' '.join(words)!r}")
        pids = {"plain server": server.pid, "harness": os.getpid()}
        loops: list[float] = []
        pids.update({child.name: child.pid for child in group})

        def publish() -> int:
            server.send_line("send")
            words = server.readline(START_TIMEOUT).split()
            if len(words) != 3 or words[0] != "sent":
                raise RuntimeError(f"plain server: unexpected {' '.join(words)!r}")
            loops.append((int(words[2]) - int(words[1])) / 1e6)
            return int(words[1])

        times, server_ms, others = time_frames(
            group, args.idle_frames, publish, CpuSamples(pids), "plain server"
        )
        for child in group:
            child.send_line("exit")
    return times, loops, server_ms, others


@dataclass
class ScaleResult:
    clients: int
    delivered: int  # payload bytes delivered to all clients in the window
    seconds: float
    daemon_cpu: float | None
    others: float | None

    @property
    def cpu_per_gb(self) -> float | None:
        if self.daemon_cpu is None or not self.delivered:
            return None
        return self.daemon_cpu / (self.delivered / GB)


def scale_measure(args: argparse.Namespace, workdir: Path, clients: int) -> ScaleResult:
    """``--fanout-size`` frames from relay.py's producer, flat out, to ``clients`` lossless
    clients; the daemon's CPU per GB of payload the clients received in the window."""
    size = args.fanout_size
    frame_size = len(relay.encode_frame(size))
    processes = max(1, min(2, clients))
    with (
        fanout_daemon(workdir, clients, "lossless") as (daemon, log, receiver_port, server_port),
        all_stopped() as children,
    ):
        group = start_clients(children, server_port, clients, processes, 0, 600)
        wait_connected(daemon, log, clients, START_TIMEOUT + clients / 100)
        seconds = args.warmup + args.duration + 2 * START_TIMEOUT
        producer = Child(
            "producer",
            script_argv(
                relay.__file__,
                "--role=producer",
                port=receiver_port,
                payload_size=size,
                seconds=seconds,
            ),
        )
        children.append(producer)
        pids = {"daemon": daemon.pid, "producer": producer.pid, "harness": os.getpid()}
        pids.update({child.name: child.pid for child in group})
        cpu = CpuSamples(pids)

        def report() -> tuple[int, float]:
            for child in group:
                child.send_line("report")
            reports = [json.loads(child.readline(IO_TIMEOUT)) for child in group]
            return sum(r["bytes"] for r in reports), max(r["t"] for r in reports)

        def pause(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                cpu.take()
                time.sleep(SAMPLE_INTERVAL)

        # The clients have received something once the producer has started sending.
        cpu.take()
        pause(args.warmup + 0.3)
        bytes0, t0 = report()
        pause(args.duration)
        bytes1, t1 = report()
        cpu.take()
        for child in group:
            child.send_line("exit")
    used = cpu.used("daemon", t0, t1)
    machine = cpu.used("machine", t0, t1)
    ours = [cpu.used(name, t0, t1) for name in pids]
    others = (
        None
        if machine is None or None in ours
        else max(0.0, machine - sum(v for v in ours if v is not None)) / (t1 - t0)
    )
    delivered = (bytes1 - bytes0) // frame_size * size
    return ScaleResult(clients, delivered, t1 - t0, used, others)


def scale_ratio(scale: dict[int, list[ScaleResult]], first: int, most: int) -> float:
    """The median over runs of the CPU per delivered GB at ``most`` clients over that at
    ``first`` in the same run."""
    ratios = []
    for low, high in zip(scale[first], scale[most], strict=True):
        if low.cpu_per_gb and high.cpu_per_gb:
            ratios.append(high.cpu_per_gb / low.cpu_per_gb)
    return statistics.median(ratios) if ratios else float("nan")


def fanout_rows(args: argparse.Namespace, workdir: Path) -> list[Row]:
    idle: list[IdleResult] = []
    scale: dict[int, list[ScaleResult]] = {}
    for run in range(args.repeat):
        print(f"fan-out rows, run {run + 1} of {args.repeat}:", flush=True)
        result = idle_measure(args, workdir)
        idle.append(result)
        print(
            f"  {args.idle_clients:,} idle clients: daemon RSS {result.rss / MIB:.1f} MiB"
            f" ({result.rss_before / MIB:.1f} MiB before they connected), daemon CPU while"
            f" idle {result.idle_cpu or 0:.0%}; one frame to all:"
            f" {', '.join(f'{t:.1f}' for t in result.last_ms)} ms"
            f", daemon CPU {result.daemon_cpu_ms or 0:.1f} ms per frame"
            + (f"; others {result.others:.0%}" if result.others is not None else ""),
            flush=True,
        )
        print(
            f"  the same clients served by a plain-Python loop of sends:"
            f" {', '.join(f'{t:.1f}' for t in result.plain_ms)} ms (its loops of sends:"
            f" {', '.join(f'{t:.1f}' for t in result.plain_loop_ms)} ms)"
            f", its CPU {result.plain_cpu_ms or 0:.1f} ms per frame"
            + (f"; others {result.plain_others:.0%}" if result.plain_others is not None else ""),
            flush=True,
        )
        for clients in args.fanout_clients:
            scaled = scale_measure(args, workdir, clients)
            scale.setdefault(clients, []).append(scaled)
            cost = scaled.cpu_per_gb
            print(
                f"  {clients:>5} clients: {scaled.delivered / scaled.seconds / GB:.2f} GB/s"
                f" delivered, daemon CPU {cost or 0:.3f} s per delivered GB"
                + (f"; others {scaled.others:.0%}" if scaled.others is not None else ""),
                flush=True,
            )
    n = args.idle_clients
    rss = statistics.median(r.rss for r in idle)
    per_client = statistics.median((r.rss - r.rss_before) / n for r in idle)
    last = statistics.median(statistics.median(r.last_ms) for r in idle)
    plain = statistics.median(statistics.median(r.plain_ms) for r in idle)
    per_run = [statistics.median(r.last_ms) / statistics.median(r.plain_ms) for r in idle]
    idle_others = worst([r.others for r in idle] + [r.plain_others for r in idle])
    rows = [
        Row(
            f"{n:,} idle clients, daemon RSS",
            f"{rss / MIB:.1f} MiB ({per_client / 1024:.1f} KiB per client; daemon CPU while"
            f" idle {median([r.idle_cpu for r in idle]) or 0:.0%})",
            "-",
            "-",
            "< 100 MiB",
            rss < 100 * MIB,
            None,
        ),
        Row(
            f"one frame reaching all {n:,} clients",
            f"{last:.1f} ms ({last * 1000 / n:.1f} us per client; daemon CPU"
            f" {median([r.daemon_cpu_ms for r in idle]) or 0:.1f} ms)",
            f"a plain-Python loop of send() to the same clients: {plain:.1f} ms (its CPU"
            f" {median([r.plain_cpu_ms for r in idle]) or 0:.1f} ms)",
            f"{statistics.median(per_run):.1f}",
            "< 100 ms",
            last < 100,
            idle_others,
        ),
    ]
    costs = {c: median([r.cpu_per_gb for r in rs]) for c, rs in scale.items()}
    first, most = min(costs), max(costs)
    low, high = costs[first], costs[most]
    if low and high:
        figure = " / ".join(f"{costs[c] or 0:.3f}" for c in sorted(costs))
        rows.append(
            Row(
                f"fan-out, daemon CPU per delivered GB, {'/'.join(f'{c:,}' for c in sorted(costs))}"
                f" clients, {args.fanout_size // 1024} KiB frames",
                f"{figure} s",
                f"{first:,} client{'s' if first != 1 else ''}: {low:.3f} s",
                f"{(cost_ratio := scale_ratio(scale, first, most)):.2f}x at {most:,}",
                "<= 1.0x",
                cost_ratio <= 1.0,
                worst([r.others for rs in scale.values() for r in rs]),
            )
        )
    return rows


# -- latency: 64 KiB frames at 1 kHz --------------------------------------------------------


def stamp_offset(frame: bytes | bytearray, payload_size: int) -> int:
    """Where the payload starts in an encoded frame (the send time goes in its first 8 bytes)."""
    return len(frame) - payload_size


def run_latency_producer(args: argparse.Namespace) -> None:
    """Send ``--count`` frames of ``--payload-size`` to ``--port`` at ``--rate`` per second,
    each with perf_counter_ns() (CLOCK_MONOTONIC, shared by every process) in its payload's
    first 8 bytes, written just before the frame is sent."""
    frame = bytearray(relay.encode_frame(args.payload_size))
    offset = stamp_offset(frame, args.payload_size)
    period = 1e9 / args.rate
    with socket.create_connection((HOST, args.port), timeout=IO_TIMEOUT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start = time.perf_counter_ns()
        for number in range(args.count):
            wait = (start + number * period - time.perf_counter_ns()) / 1e9
            if wait > 0:
                time.sleep(wait)
            frame[offset : offset + 8] = time.perf_counter_ns().to_bytes(8, "little")
            sock.sendall(frame)
        time.sleep(START_TIMEOUT)  # stay connected until stopped


def run_latency_consumer(args: argparse.Namespace) -> None:
    """Receive ``--count`` frames (connect to ``--port``, or listen if 0 and print ``ready
    PORT``), check their bytes, and print a JSON line of latencies in microseconds, in
    arrival order, skipping the first ``--skip``."""
    expected = relay.encode_frame(args.payload_size)
    offset = stamp_offset(expected, args.payload_size)
    if args.port:
        sock = socket.create_connection((HOST, args.port), timeout=IO_TIMEOUT)
        print(f"ready {args.port}", flush=True)
    else:
        with socket.create_server((HOST, 0)) as listener:
            print(f"ready {listener.getsockname()[1]}", flush=True)
            listener.settimeout(START_TIMEOUT)
            sock, _ = listener.accept()
    sock.settimeout(IO_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    size = len(expected)
    view = memoryview(bytearray(size))
    latencies = []
    for number in range(args.count):
        have = 0
        while have < size:
            n = sock.recv_into(view[have:])
            if not n:
                raise SystemExit(f"latency consumer: closed after {number} frames")
            have += n
        arrived = time.perf_counter_ns()
        if number == 0 and (
            view[:offset] != expected[:offset] or view[offset + 8 :] != expected[offset + 8 :]
        ):
            raise SystemExit("latency consumer: the first frame differs from the one sent")
        if number >= args.skip:
            latencies.append((arrived - int.from_bytes(view[offset : offset + 8], "little")) / 1e3)
    print(json.dumps(latencies), flush=True)
    time.sleep(START_TIMEOUT)


def percentiles(values: Sequence[float]) -> tuple[float, float, float]:
    """p50, p99, p99.9 (nearest rank)."""
    ordered = sorted(values)

    def rank(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, int(-(-p * len(ordered) // 1)) - 1))]

    return rank(0.5), rank(0.99), rank(0.999)


def latency_measure(
    args: argparse.Namespace, ports: tuple[int, int] | None, daemon: Child | None
) -> tuple[tuple[float, float, float], float | None]:
    """Percentiles through the daemon (``ports``: receiver, server) or direct; and the
    others' CPU share meanwhile."""
    count = int(args.latency_seconds * args.latency_rate)
    skip = min(count // 10, int(0.2 * args.latency_rate))
    common = {"payload_size": args.latency_size, "count": count}
    with all_stopped() as children:
        consumer = Child(
            "latency consumer",
            script_argv(
                __file__,
                "--role=latency-consumer",
                port=ports[1] if ports else 0,
                skip=skip,
                **common,
            ),
        )
        children.append(consumer)
        port = consumer.ready_port(START_TIMEOUT)
        producer = Child(
            "latency producer",
            script_argv(
                __file__,
                "--role=latency-producer",
                port=ports[0] if ports else port,
                rate=args.latency_rate,
                **common,
            ),
        )
        children.append(producer)
        pids = {"producer": producer.pid, "consumer": consumer.pid, "harness": os.getpid()}
        if daemon is not None:
            pids["daemon"] = daemon.pid
        line, cpu = sample_until_line(consumer, pids, args.latency_seconds + START_TIMEOUT)
        t0, t1 = cpu.samples[0][0], cpu.samples[-1][0]
    machine = cpu.used("machine", t0, t1)
    ours = [cpu.used(name, t0, t1) for name in pids]
    others = (
        None
        if machine is None or None in ours
        else max(0.0, machine - sum(v for v in ours if v is not None)) / (t1 - t0)
    )
    return percentiles(json.loads(line)), others


def latency_rows(args: argparse.Namespace, workdir: Path) -> list[Row]:
    relay_args = argparse.Namespace(max_queue_frames=65536, max_queue_bytes=64 * MIB, profile=None)
    ports = (relay_args.receiver_port, relay_args.server_port) = free_pair()
    direct: list[tuple[float, float, float]] = []
    relayed: list[tuple[float, float, float]] = []
    others: list[float | None] = []
    with relay.start_daemon(workdir, relay_args, ports=ports) as daemon:
        for port in ports:
            wait_for_port(port, START_TIMEOUT, daemon)
        for run in range(args.repeat):
            print(f"latency rows, run {run + 1} of {args.repeat}:", flush=True)
            for name, results, via in (("direct", direct, None), ("framewire", relayed, daemon)):
                figures, busy = latency_measure(args, ports if via else None, via)
                results.append(figures)
                others.append(busy)
                print(
                    f"  {name:<10} p50/p99/p99.9 {'/'.join(f'{v:.0f}' for v in figures)} us"
                    + (f"; others {busy:.0%}" if busy is not None else ""),
                    flush=True,
                )
    pairs = list(zip(relayed, direct, strict=True))
    d = [statistics.median(f[i] for f in direct) for i in range(3)]
    r = [statistics.median(f[i] for f in relayed) for i in range(3)]
    return [
        Row(
            f"{args.latency_size // 1024} KiB frames at {args.latency_rate / 1000:g} kHz,"
            " latency p50/p99/p99.9",
            "/".join(f"{v:.0f}" for v in r) + " us",
            "direct pair " + "/".join(f"{v:.0f}" for v in d) + " us",
            "/".join(f"{statistics.median(a[i] / b[i] for a, b in pairs):.1f}" for i in range(3)),
            "p99 < 500 us, p99.9 < 1000 us",
            r[1] < 500 and r[2] < 1000,
            worst(others),
        )
    ]


# -- G3 fan-out: g3_fanout.py ---------------------------------------------------------------


def g3_rows(args: argparse.Namespace, workdir: Path) -> list[Row]:
    try:
        import spt3g  # noqa: F401
    except ImportError:
        print("note: G3 row skipped: spt3g is not installed (pip install -e '.[test]')")
        return []
    import g3_fanout

    g3_args = g3_fanout.parse_args(
        ["--repeat", "1", "--frames", str(args.g3_frames), "--readers", "10"]
    )
    results: dict[str, list[g3_fanout.Result]] = {"direct": [], "relayed": []}
    print(f"G3 rows ({args.g3_frames} Scan frames of 8 MB to 10 G3Readers):", flush=True)
    print("  " + g3_fanout.HEADER, flush=True)
    for run in range(args.repeat):
        for relayed in (False, True) if run % 2 == 0 else (True, False):
            result = g3_fanout.measure(g3_args, workdir, relayed, run)
            print("  ", end="")
            g3_fanout.print_row(result)
            results[result.path].append(result)
    fps = {p: median([r.frames_per_second for r in rs]) for p, rs in results.items()}
    per = {
        p: median([None if r.serving_cpu is None else r.serving_cpu / r.total for r in rs])
        for p, rs in results.items()
    }
    lossless = all(r.lossless for rs in results.values() for r in rs)
    d, r = fps["direct"], fps["relayed"]
    pd, pr = per["direct"], per["relayed"]
    assert d is not None
    assert r is not None
    assert pd is not None
    assert pr is not None
    pairs = list(zip(results["relayed"], results["direct"], strict=True))
    rate_ratio = statistics.median(a.frames_per_second / b.frames_per_second for a, b in pairs)
    cpu_ratio = median(
        [
            (a.serving_cpu / a.total) / (b.serving_cpu / b.total)
            for a, b in pairs
            if a.serving_cpu is not None and b.serving_cpu
        ]
    )
    others = worst(
        [
            None if r.cpu["others"] is None else r.cpu["others"] / r.seconds
            for rs in results.values()
            for r in rs
        ]
    )
    return [
        Row(
            "G3 fan-out, 8 MB Scans to 10 real G3Readers",
            f"{r:.1f} frames/s, serving CPU {pr * 1e3:.2f} ms/frame"
            + ("" if lossless else " (LOSSY)"),
            f"G3NetworkSender serving directly {d:.1f} frames/s, {pd * 1e3:.2f} ms/frame",
            f"{rate_ratio:.2f} (CPU/frame {cpu_ratio or 0:.2f}x)",
            "frames/s >= 0.95, CPU/frame <= 0.8x",
            lossless and rate_ratio >= 0.95 and cpu_ratio is not None and cpu_ratio <= 0.8,
            others,
        )
    ]


# -- main -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Reproduce every row of issue 12's table, each against its anchor."
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs of each case (default 3)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: one run, short windows, 1,000 idle clients, fewer frames",
    )
    parser.add_argument(
        "--rows", default=",".join(ROWS), help=f"sections to run (default {','.join(ROWS)})"
    )
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per rate case")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds before measuring")
    parser.add_argument("--idle-clients", type=int, default=10_000)
    parser.add_argument("--idle-frames", type=int, default=5, help="frames timed to all")
    parser.add_argument(
        "--fanout-clients", default="1,10,100,1000", help="client counts for fan-out scaling"
    )
    parser.add_argument("--fanout-size", type=int, default=64 * 1024, help="payload bytes")
    parser.add_argument("--latency-size", type=int, default=64 * 1024, help="payload bytes")
    parser.add_argument("--latency-rate", type=int, default=1000, help="frames per second")
    parser.add_argument("--latency-seconds", type=float, default=10.0, help="per case")
    parser.add_argument("--g3-frames", type=int, default=100, help="Scan frames per G3 case")
    # Internal: how the script runs itself as its helper processes.
    parser.add_argument("--role", choices=sorted(ROLES), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--payload-size", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--frame-size", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--skip", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=int, default=1000, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeat, args.warmup, args.duration = 1, 0.2, 1.0
        args.idle_clients, args.idle_frames = min(args.idle_clients, 1000), 2
        args.latency_seconds, args.g3_frames = 2.0, 10
    args.rows = [row for row in args.rows.split(",") if row]
    args.fanout_clients = sorted(int(c) for c in args.fanout_clients.split(","))
    unknown = set(args.rows) - set(ROWS)
    if unknown:
        parser.error(f"unknown rows {', '.join(sorted(unknown))}; choose from {', '.join(ROWS)}")
    if args.repeat < 1 or args.duration <= 0 or min(args.fanout_clients, default=0) < 1:
        parser.error("--repeat, --duration and the client counts must be positive")
    return args


ROLES: Final[dict[str, Callable[[argparse.Namespace], None]]] = {
    "zmq-pull": run_zmq_pull,
    "zmq-push": run_zmq_push,
    "zmq-proxy": run_zmq_proxy,
    "clients": run_clients,
    "latency-producer": run_latency_producer,
    "latency-consumer": run_latency_consumer,
    "plain-server": run_plain_server,
}

SECTIONS: Final[dict[str, Callable[[argparse.Namespace, Path], list[Row]]]] = {
    "relay": relay_rows,
    "fanout": fanout_rows,
    "latency": latency_rows,
    "g3": g3_rows,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role is not None:
        ROLES[args.role](args)
        return 0
    exit_on_sigterm()
    raise_open_files()
    started = time.monotonic()
    print(
        f"framewire issue 12 benchmarks: {machine_text()}, median of {args.repeat}"
        f" run{'s' if args.repeat != 1 else ''}, {args.duration:g}s per rate case",
        flush=True,
    )
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="framewire-issue12-") as tmp:
        for section in args.rows:
            rows += SECTIONS[section](args, Path(tmp))
    print(
        f"\nsummary ({time.monotonic() - started:.0f} s; 'others': the largest share of one"
        " CPU that other processes used during the row's measurements):"
    )
    print(TABLE_HEAD)
    for row in rows:
        print_row(row)
    busiest = worst([row.others for row in rows])
    if busiest is not None and busiest > BUSY_MACHINE:
        print(
            f"warning: the machine was busy: other processes used up to {busiest:.0%} of a CPU"
            " during a measurement; rates, ratios and latencies are unreliable (CPU per GB or"
            " per frame much less so)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
