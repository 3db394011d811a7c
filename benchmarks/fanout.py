"""Fan-out: idle clients' memory, one frame reaching every client, CPU per GB over client counts.

The one home of issue 12's fan-out rows: issue12.py imports :func:`idle_measure`,
:func:`plain_measure` and :func:`scale_measure` from here; run on its own, this script
prints the same figures for this checkout's daemon and, with ``--baseline PATH``, for the
framewire package of another checkout (e.g. ``/work/main``) measured in the same run, so
before and after come from one machine state. A framewire daemon (its own process) has a
``receiver`` (native, TCP) publishing into the stream ``fan`` and a ``server`` serving it:

- **idle**: ``--clients`` connections (default 10,000) to a lossy server that read nothing;
  the daemon's RSS (``VmRSS``) before they connect and once they are all connected and it
  is quiet, the difference per client, and the daemon's CPU share while they stay idle.
- **one frame**: with those clients connected, one 64-byte frame is sent to the receiver,
  ``--rounds`` times, 0.2 s apart; each time, the wall time from the write until the last
  client has the whole frame, and the daemon's CPU per frame (the robust figure on a busy
  machine). The floor: the same clients served by a plain-Python process that sends the
  frame to every socket in a loop of blocking ``send`` calls, timed the same way; with
  ``--floor-threads N`` also that loop split over N threads (``send`` releases the GIL:
  does a second core help?).
- **scaling**: for 1, 10, 100, 1,000 clients (``--scaling``) of a lossless server,
  relay.py's producer writes 64 KiB frames flat out for ``--duration`` seconds; the
  daemon's CPU per GB of payload delivered to all clients together, and its ratio to that
  at the fewest clients (the median of the ratios within each run).

The clients are cheap: a few processes of this script (``--role=clients``), each holding
many non-blocking sockets in one epoll set, each raising ``RLIMIT_NOFILE`` to its hard
limit. "others" is the share of one CPU that other processes on the machine used meanwhile
(the largest over runs); above 20% a warning follows. Every process started is stopped on
the way out, and every wait has a time limit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import relay
from _harness import (
    GB,
    HOST,
    IO_TIMEOUT,
    MIB,
    SAMPLE_INTERVAL,
    START_TIMEOUT,
    Child,
    CpuSamples,
    all_stopped,
    cpu_seconds,
    daemon_argv,
    exit_on_sigterm,
    free_ports,
    machine_text,
    median,
    others_during,
    raise_open_files,
    rss_bytes,
    script_argv,
    tree_env,
    wait_for_listen,
    warn_if_busy,
    worst,
)

SMALL_PAYLOAD: Final = 64
TARGET_IDLE_MIB: Final = 100.0
TARGET_ONE_FRAME_MS: Final = 100.0
#: How long the daemon's CPU is measured with every idle client connected.
IDLE_WINDOW: Final = 2.0


# -- the clients: many sockets in few processes ---------------------------------------------


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


def client_processes(clients: int) -> int:
    """How many processes hold ``clients`` idle clients: up to 4, at least 500 each."""
    return max(1, min(4, clients // 500))


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


# -- the daemon -----------------------------------------------------------------------------

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


@dataclass
class Daemon:
    """A running fan-out daemon: its process, its ports, and its open files when started."""

    child: Child
    receiver_port: int
    server_port: int
    base_fds: int

    @property
    def pid(self) -> int:
        return self.child.pid


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@contextlib.contextmanager
def fanout_daemon(
    workdir: Path, clients: int, policy: str, tree: str | None = None
) -> Iterator[Daemon]:
    """A daemon (the framewire of checkout ``tree``; None: this one's) with a native receiver
    and a server for ``clients``, both listening and the daemon quiet; stopped on the way
    out. RuntimeError if it does not listen within START_TIMEOUT."""
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
    argv = daemon_argv(config)
    with Child("daemon", argv, stderr_path=log, env=tree_env(tree), cwd=workdir) as child:
        wait_for_listen(receiver_port, child)
        wait_for_listen(server_port, child)
        settle(child.pid)
        yield Daemon(child, receiver_port, server_port, open_fds(child.pid))


def wait_connected(daemon: Daemon, clients: int, timeout: float) -> None:
    """Wait until the daemon holds a file for each of ``clients`` more connections than it
    had when started (whichever checkout it runs, so no log line is relied on), then until
    it is quiet; RuntimeError after ``timeout`` or if it exits."""
    deadline = time.monotonic() + timeout
    while (held := open_fds(daemon.pid) - daemon.base_fds) < clients:
        if daemon.child.proc.poll() is not None:
            raise RuntimeError(f"daemon exited with status {daemon.child.proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"daemon: {held} of {clients} clients after {timeout:g}s")
        time.sleep(0.05)
    settle(daemon.pid)


def settle(pid: int, quiet: float = 0.3, timeout: float = 30.0) -> None:
    """Wait until ``pid`` used under 5% of a CPU for ``quiet`` seconds (its clients are set
    up), or ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = cpu_seconds(pid) or 0.0
        time.sleep(quiet)
        if (cpu_seconds(pid) or 0.0) - before < quiet * 0.05:
            return


# -- idle clients and one frame to all ------------------------------------------------------


@dataclass
class OneFrameResult:
    """Idle clients' memory, then frames timed to the last client, for a daemon or the
    plain-Python floor (then ``serving`` is that process)."""

    rss_before: int  # the serving process's RSS before the clients connected
    rss: int  # with every client connected
    idle_cpu: float | None  # its CPU share with every client connected and idle
    last_ms: list[float]  # per frame: publish to the last client's receipt
    cpu_ms: float | None  # its CPU per frame delivered to every client
    others: float | None
    loop_ms: list[float]  # the floor only: its loops of sends alone

    @property
    def median_ms(self) -> float:
        return statistics.median(self.last_ms)


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
    return times, per_frame, others_during(cpu, t_start, t_end)


def idle_cpu_share(pid: int) -> float | None:
    """``pid``'s CPU share over IDLE_WINDOW seconds from now."""
    before, start = cpu_seconds(pid), time.monotonic()
    time.sleep(IDLE_WINDOW)
    after, end = cpu_seconds(pid), time.monotonic()
    return None if before is None or after is None else (after - before) / (end - start)


def idle_measure(workdir: Path, tree: str | None, clients: int, frames: int) -> OneFrameResult:
    """``clients`` idle clients of a lossy server: the daemon's RSS and idle CPU, then
    ``frames`` 64-byte frames published one at a time, each timed to its arrival at the
    last client."""
    frame = relay.encode_frame(SMALL_PAYLOAD)
    with fanout_daemon(workdir, clients, "lossy", tree) as daemon, all_stopped() as children:
        before = rss_bytes(daemon.pid)
        group = start_clients(
            children, daemon.server_port, clients, client_processes(clients), len(frame), 600
        )
        wait_connected(daemon, clients, START_TIMEOUT + clients / 100)
        rss = rss_bytes(daemon.pid)
        idle_cpu = idle_cpu_share(daemon.pid)
        pids = {"daemon": daemon.pid, "harness": os.getpid()}
        pids.update({child.name: child.pid for child in group})
        with socket.create_connection((HOST, daemon.receiver_port), timeout=IO_TIMEOUT) as producer:
            time.sleep(0.5)  # the receiver has accepted the producer

            def publish() -> int:
                sent = time.perf_counter_ns()
                producer.sendall(frame)
                return sent

            times, cpu_ms, others = time_frames(group, frames, publish, CpuSamples(pids), "daemon")
        for child in group:
            child.send_line("exit")
    return OneFrameResult(before, rss, idle_cpu, times, cpu_ms, others, [])


def run_plain_server(args: argparse.Namespace) -> None:
    """The plain-Python fan-out floor: listen (``ready PORT``), accept ``--count``
    clients (``accepted N``), then for each ``send`` line on stdin, send one
    ``--payload-size`` native frame to every client in a loop of blocking ``send`` calls and
    print ``sent START END`` (perf_counter_ns before and after the loop). With ``--threads``
    N > 1 the clients are split into N equal shares, each sent to by its own thread
    (``send`` releases the GIL), and the loop ends when every thread is done."""
    raise_open_files()
    frame = relay.encode_frame(args.payload_size)
    with socket.create_server((HOST, 0), backlog=4096) as listener:
        print(f"ready {listener.getsockname()[1]}", flush=True)
        listener.settimeout(START_TIMEOUT)
        sockets = [listener.accept()[0] for _ in range(args.count)]
    print(f"accepted {len(sockets)}", flush=True)
    shares = [sockets[index :: args.threads] for index in range(args.threads)]

    def send_to(share: list[socket.socket]) -> None:
        for sock in share:
            sock.send(frame)

    with ThreadPoolExecutor(max_workers=args.threads) as pool:
        for line in sys.stdin:
            if line.strip() != "send":
                break
            sent = time.perf_counter_ns()
            if args.threads == 1:
                send_to(sockets)
            else:
                for done in [pool.submit(send_to, share) for share in shares]:
                    done.result(IO_TIMEOUT)
            print(f"sent {sent} {time.perf_counter_ns()}", flush=True)


def plain_measure(clients: int, frames: int, threads: int = 1) -> OneFrameResult:
    """The same clients and frames as :func:`idle_measure`, served by
    :func:`run_plain_server` (sending from ``threads`` threads): its RSS and idle CPU, the
    times to the last client, its loops of sends alone, its CPU per frame."""
    frame_size = len(relay.encode_frame(SMALL_PAYLOAD))
    with all_stopped() as children:
        server = Child(
            "plain server",
            script_argv(
                __file__, "--role=plain-server", count=clients, payload_size=64, threads=threads
            ),
            stdin=subprocess.PIPE,
        )
        children.append(server)
        port = server.ready_port(START_TIMEOUT)
        before = rss_bytes(server.pid)
        group = start_clients(children, port, clients, client_processes(clients), frame_size, 600)
        words = server.readline(START_TIMEOUT + clients / 100).split()
        if words != ["accepted", str(clients)]:
            raise RuntimeError(f"plain server: unexpected {' '.join(words)!r}")
        rss = rss_bytes(server.pid)
        idle_cpu = idle_cpu_share(server.pid)
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

        times, cpu_ms, others = time_frames(
            group, frames, publish, CpuSamples(pids), "plain server"
        )
        for child in group:
            child.send_line("exit")
    return OneFrameResult(before, rss, idle_cpu, times, cpu_ms, others, loops)


# -- scaling over client counts -------------------------------------------------------------


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


def scale_measure(
    workdir: Path,
    tree: str | None,
    clients: int,
    *,
    payload_size: int,
    warmup: float,
    duration: float,
) -> ScaleResult:
    """``payload_size`` frames from relay.py's producer, flat out, to ``clients`` lossless
    clients (in one or two processes); the daemon's CPU per GB of payload the clients
    received in ``duration`` seconds after ``warmup``."""
    frame_size = len(relay.encode_frame(payload_size))
    processes = max(1, min(2, clients))
    with (
        fanout_daemon(workdir, clients, "lossless", tree) as daemon,
        all_stopped() as children,
    ):
        group = start_clients(children, daemon.server_port, clients, processes, 0, 600)
        wait_connected(daemon, clients, START_TIMEOUT + clients / 100)
        seconds = warmup + duration + 2 * START_TIMEOUT
        producer = Child(
            "producer",
            script_argv(
                relay.__file__,
                "--role=producer",
                port=daemon.receiver_port,
                payload_size=payload_size,
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
        pause(warmup + 0.3)
        bytes0, t0 = report()
        pause(duration)
        bytes1, t1 = report()
        cpu.take()
        for child in group:
            child.send_line("exit")
    delivered = (bytes1 - bytes0) // frame_size * payload_size
    return ScaleResult(
        clients, delivered, t1 - t0, cpu.used("daemon", t0, t1), others_during(cpu, t0, t1)
    )


def scale_ratio(scale: dict[int, list[ScaleResult]], first: int, most: int) -> float:
    """The median over runs of the CPU per delivered GB at ``most`` clients over that at
    ``first`` in the same run (NaN if no run has both)."""
    ratios = []
    for low, high in zip(scale[first], scale[most], strict=True):
        if low.cpu_per_gb and high.cpu_per_gb:
            ratios.append(high.cpu_per_gb / low.cpu_per_gb)
    return statistics.median(ratios) if ratios else float("nan")


# -- command line ---------------------------------------------------------------------------


def print_one_frame(label: str, runs: list[OneFrameResult], clients: int) -> None:
    """A line of the idle/one-frame table: medians over ``runs``, others the largest."""
    before = statistics.median(r.rss_before for r in runs)
    after = statistics.median(r.rss for r in runs)
    wall = statistics.median(r.median_ms for r in runs)
    cpu = median(r.cpu_ms for r in runs)
    idle = median(r.idle_cpu for r in runs)
    others = worst(r.others for r in runs)
    print(
        f"{label:<28} {before / MIB:8.1f} MiB {after / MIB:6.1f} MiB"
        f" {(after - before) / clients / 1024:7.2f} KiB {idle or 0:8.0%}"
        f" {wall:7.1f} ms {cpu or 0:8.1f} ms {'-' if others is None else f'{others:.0%}':>7}"
    )
    if runs[0].loop_ms:
        loops = statistics.median(statistics.median(r.loop_ms) for r in runs)
        print(f"{'':<28} its loop of sends alone: {loops:.1f} ms")
    else:
        print(
            f"{'':<28} targets: RSS < {TARGET_IDLE_MIB:g} MiB:"
            f" {'met' if after / MIB < TARGET_IDLE_MIB else 'NOT met'};"
            f" one frame < {TARGET_ONE_FRAME_MS:g} ms:"
            f" {'met' if wall < TARGET_ONE_FRAME_MS else 'NOT met'}"
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=10_000, help="idle clients")
    parser.add_argument("--rounds", type=int, default=5, help="frames sent to all clients")
    parser.add_argument("--scaling", default="1,10,100,1000", help="client counts")
    parser.add_argument("--size", type=int, default=64 * 1024, help="scaling payload bytes")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per scaling case")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds before measuring")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--baseline", help="checkout whose framewire runs as the baseline")
    parser.add_argument("--skip", default="", help="cases to skip: idle,scaling")
    parser.add_argument(
        "--floor-threads",
        type=int,
        default=1,
        help="also measure the floor's loop of sends split over this many threads",
    )
    # Internal: how the script runs itself as its helper processes.
    parser.add_argument("--role", choices=sorted(ROLES), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--frame-size", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--payload-size", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.scaling = sorted(int(count) for count in args.scaling.split(","))
    if args.repeat < 1 or args.rounds < 1 or min(args.scaling, default=0) < 1:
        parser.error("--repeat, --rounds and the client counts must be positive")
    return args


ROLES: Final[dict[str, Callable[[argparse.Namespace], None]]] = {
    "clients": run_clients,
    "plain-server": run_plain_server,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role is not None:
        ROLES[args.role](args)
        return 0
    exit_on_sigterm()
    raise_open_files()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard < args.clients + 100:
        print(f"open-files limit {hard} is too low for {args.clients} clients: raise ulimit -n")
        return 2
    trees: list[tuple[str, str | None]] = []
    if args.baseline:
        trees.append((f"baseline ({args.baseline})", args.baseline))
    trees.append(("this tree", None))
    skip = set(args.skip.split(","))
    print(f"framewire fan-out benchmark: {machine_text()}", flush=True)
    others: list[float | None] = []
    with tempfile.TemporaryDirectory(prefix="fanout-") as tmp:
        workdir = Path(tmp)
        if "idle" not in skip:
            print(
                f"\n{args.clients:,} idle clients, then {args.rounds} 64-byte frames one at a"
                f" time to all, median of {args.repeat}"
            )
            print(
                f"{'serving':<28} {'RSS before':>11} {'RSS after':>10} {'per client':>11}"
                f" {'idle CPU':>8} {'one frame':>10} {'CPU/frame':>11} {'others':>7}",
                flush=True,
            )
            floor = [plain_measure(args.clients, args.rounds) for _ in range(args.repeat)]
            others += [r.others for r in floor]
            print_one_frame("plain loop of sends (floor)", floor, args.clients)
            if args.floor_threads > 1:
                split = [
                    plain_measure(args.clients, args.rounds, args.floor_threads)
                    for _ in range(args.repeat)
                ]
                others += [r.others for r in split]
                print_one_frame(f"the same, {args.floor_threads} threads", split, args.clients)
            for label, tree in trees:
                runs = [
                    idle_measure(workdir, tree, args.clients, args.rounds)
                    for _ in range(args.repeat)
                ]
                others += [r.others for r in runs]
                print_one_frame(label, runs, args.clients)
        if "scaling" not in skip:
            print(
                f"\nscaling: {args.size // 1024} KiB frames flat out to a lossless server,"
                f" {args.duration:g} s per case, median of {args.repeat}"
            )
            print(
                f"{'daemon':<28} {'clients':>7} {'delivered':>13} {'daemon CPU':>11}"
                f" {'CPU per GB':>11} {f'vs {args.scaling[0]:,}':>11} {'others':>7}",
                flush=True,
            )
            for label, tree in trees:
                scale: dict[int, list[ScaleResult]] = {}
                for _ in range(args.repeat):
                    for count in args.scaling:
                        result = scale_measure(
                            workdir,
                            tree,
                            count,
                            payload_size=args.size,
                            warmup=args.warmup,
                            duration=args.duration,
                        )
                        scale.setdefault(count, []).append(result)
                for count, results in scale.items():
                    others += [r.others for r in results]
                    busiest = worst(r.others for r in results)
                    rate = statistics.median(r.delivered * 8 / r.seconds / GB for r in results)
                    ratio = scale_ratio(scale, args.scaling[0], count)
                    print(
                        f"{label:<28} {count:>7,} {rate:7.2f} Gbit/s"
                        f" {median(r.daemon_cpu for r in results) or 0:9.2f} s"
                        f" {median(r.cpu_per_gb for r in results) or 0:8.3f} s {ratio:10.2f}x"
                        f" {'-' if busiest is None else f'{busiest:.0%}':>7}"
                    )
    warn_if_busy(
        [o for o in others if o is not None],
        "wall times are unreliable; compare the CPU figures",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
