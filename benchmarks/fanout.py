"""Fan-out: idle clients' memory, one frame reaching every client, CPU per GB over client counts.

Runs a framewire daemon (its own process) with a ``receiver`` (native, TCP) publishing into
the stream ``fan`` and a ``server`` (native, lossy) serving it, then three cases:

- **idle**: ``--clients`` connections (default 10,000) to the server that read nothing; the
  daemon's RSS (``VmRSS``) before they connect and once they are all subscribed, and the
  difference per client.
- **one frame**: with those clients connected, one 64-byte frame is sent to the receiver,
  ``--rounds`` times; each time, the wall time from the write until the last client has the
  whole frame, and the daemon's CPU time for it (the one robust figure on a busy machine).
- **scaling**: for 1, 10, 100, 1,000 clients (``--scaling``), a producer process writes
  64 KiB frames as fast as the daemon takes them for ``--duration`` seconds; this process
  reads every client; the daemon's CPU per delivered GB, and its ratio to that with one
  client.

``--baseline PATH`` runs every case first with the framewire package at PATH (another
checkout, e.g. ``/work/main``), so before and after come from the same run on the same machine
state. Each figure is the median of ``--repeat`` runs. Clients and producer run in this
process and its child, on loopback; ``ulimit -n`` must allow the clients (the soft limit is
raised to the hard one here, and by the daemon itself).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from _harness import (
    HOST,
    Child,
    all_stopped,
    cpu_seconds,
    daemon_argv,
    exit_on_sigterm,
    free_ports,
    machine_busy_seconds,
    machine_text,
    script_argv,
    wait_for_port,
    warn_if_busy,
)

from framewire.frame import Frame, FrameKind
from framewire.protocols.native import NativeEncoder

#: Connections opened at once before waiting for the daemon to accept them.
CONNECT_BATCH: Final = 500
SMALL_PAYLOAD: Final = 64
SCALING_PAYLOAD: Final = 64 * 1024
TARGET_IDLE_MIB: Final = 100.0
TARGET_ONE_FRAME_MS: Final = 100.0
#: The ``tree`` that stands for the plain fan-out loop (the floor) instead of a daemon.
FLOOR: Final = "floor"


def wire_of(payload_size: int, count: int = 1) -> bytes:
    frame = Frame(FrameKind.DATA, "bench", bytes(payload_size))
    return b"".join(NativeEncoder().encode(frame)) * count


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def write_config(workdir: Path, clients: int) -> tuple[Path, int, int]:
    receiver_port, server_port = free_ports(2)
    config = workdir / "fanout.toml"
    config.write_text(
        f"""
[endpoints.in]
kind = "receiver"
listen = "tcp://{HOST}:{receiver_port}"
stream = "fan"

[endpoints.out]
kind = "server"
listen = "tcp://{HOST}:{server_port}"
stream = "fan"
max_clients = {clients + 16}
"""
    )
    return config, receiver_port, server_port


class Daemon:
    """A framewire daemon (``tree`` None: this checkout's; a path: that checkout's), or
    with ``tree`` :data:`FLOOR`, the plain fan-out loop of :func:`run_floor`."""

    def __init__(self, workdir: Path, tree: str | None, clients: int) -> None:
        config, self.receiver_port, self.server_port = write_config(workdir, clients)
        env = dict(os.environ)
        if tree is not None and tree != FLOOR:
            env["PYTHONPATH"] = tree
        log = open(workdir / "daemon.log", "wb")  # noqa: SIM115 - closed in stop()
        self._log = log
        argv = daemon_argv(config)
        if tree == FLOOR:
            argv = script_argv(
                __file__, role="floor", port=self.receiver_port, server_port=self.server_port
            )
        # Run in workdir: ``python -m`` puts the working directory first on sys.path, and
        # the baseline's framewire must win over a checkout there.
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=log, env=env, cwd=workdir
        )
        self.pid = self.proc.pid
        wait_for_port(self.server_port, 30.0)
        wait_for_port(self.receiver_port, 30.0)
        time.sleep(0.3)
        self.base_fds = open_fds(self.pid)
        self.producer = socket.create_connection((HOST, self.receiver_port))
        self.producer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def stop(self) -> None:
        self.producer.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def connect_clients(daemon: Daemon, count: int) -> list[socket.socket]:
    """``count`` connections to the server, returned once the daemon holds them all."""
    sockets: list[socket.socket] = []
    expected = daemon.base_fds + 1  # the producer's connection
    for start in range(0, count, CONNECT_BATCH):
        for _ in range(min(CONNECT_BATCH, count - start)):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.connect((HOST, daemon.server_port))
            sock.setblocking(False)
            sockets.append(sock)
        expected_now = expected + len(sockets)
        deadline = time.monotonic() + 60
        while open_fds(daemon.pid) < expected_now:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the daemon accepted {open_fds(daemon.pid)} of {count}")
            time.sleep(0.01)
    return sockets


def settle(pid: int, quiet: float = 0.3, timeout: float = 30.0) -> None:
    """Wait until ``pid`` used almost no CPU for ``quiet`` seconds (its clients are set up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = cpu_seconds(pid) or 0.0
        time.sleep(quiet)
        if (cpu_seconds(pid) or 0.0) - before < quiet * 0.05:
            return


def read_until_all(poller: select.epoll, fds: dict[int, socket.socket], need: int) -> float:
    """Read every client until each got ``need`` more bytes; the time the last one did."""
    pending = {fd: need for fd in fds}
    last = time.perf_counter()
    buffer = bytearray(1 << 16)
    deadline = time.monotonic() + 60
    while pending:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(pending)} clients never got the frame")
        for fd, _ in poller.poll(1.0):
            left = pending.get(fd)
            if left is None:
                continue
            got = fds[fd].recv_into(buffer)
            if got == 0:
                raise RuntimeError("the daemon closed a client")
            left -= got
            if left <= 0:
                del pending[fd]
                last = time.perf_counter()
            else:
                pending[fd] = left
    return last


def idle_and_one_frame(
    workdir: Path, tree: str | None, clients: int, rounds: int
) -> dict[str, float]:
    daemon = Daemon(workdir, tree, clients)
    sockets: list[socket.socket] = []
    try:
        settle(daemon.pid)
        rss_before = rss_bytes(daemon.pid)
        sockets = connect_clients(daemon, clients)
        settle(daemon.pid)
        rss_after = rss_bytes(daemon.pid)
        poller = select.epoll()
        fds = {sock.fileno(): sock for sock in sockets}
        for fd in fds:
            poller.register(fd, select.EPOLLIN)
        wire = wire_of(SMALL_PAYLOAD)
        walls, cpus, others = [], [], []
        for _ in range(rounds + 1):  # the first round warms up
            settle(daemon.pid, quiet=0.1)
            cpu0 = cpu_seconds(daemon.pid) or 0.0
            machine0, _ = machine_busy_seconds()
            own0 = time.process_time()
            t0 = time.perf_counter()
            daemon.producer.sendall(wire)
            t1 = read_until_all(poller, fds, len(wire))
            time.sleep(0.05)  # let the daemon finish its bookkeeping for this frame
            cpu = (cpu_seconds(daemon.pid) or 0.0) - cpu0
            machine = machine_busy_seconds()[0] - machine0
            own = time.process_time() - own0
            walls.append(t1 - t0)
            cpus.append(cpu)
            others.append(max(0.0, machine - cpu - own) / (time.perf_counter() - t0))
        poller.close()
        return {
            "rss_before": rss_before,
            "rss_after": rss_after,
            "wall": statistics.median(walls[1:]),
            "cpu": statistics.median(cpus[1:]),
            "others": max(others[1:]),
        }
    finally:
        for sock in sockets:
            sock.close()
        daemon.stop()


def scaling(workdir: Path, tree: str | None, clients: int, duration: float) -> dict[str, float]:
    daemon = Daemon(workdir, tree, clients)
    sockets: list[socket.socket] = []
    try:
        sockets = connect_clients(daemon, clients)
        settle(daemon.pid)
        daemon.producer.close()
        with all_stopped() as children:
            producer = Child(
                "producer",
                script_argv(
                    __file__,
                    role="producer",
                    port=daemon.receiver_port,
                    seconds=duration + 30,
                ),
            )
            children.append(producer)
            poller = select.epoll()
            fds = {sock.fileno(): sock for sock in sockets}
            for fd in fds:
                poller.register(fd, select.EPOLLIN)
            buffer = bytearray(1 << 20)
            received = 0

            def drain(until: float) -> int:
                got = 0
                while time.monotonic() < until:
                    for fd, _ in poller.poll(0.1):
                        with contextlib.suppress(BlockingIOError):
                            got += fds[fd].recv_into(buffer)
                return got

            drain(time.monotonic() + 0.5)  # warm-up
            cpu0 = cpu_seconds(daemon.pid) or 0.0
            busy0, _ = machine_busy_seconds()
            own0 = time.process_time()
            t0 = time.monotonic()
            received = drain(t0 + duration)
            elapsed = time.monotonic() - t0
            cpu = (cpu_seconds(daemon.pid) or 0.0) - cpu0
            busy = machine_busy_seconds()[0] - busy0
            own = time.process_time() - own0
            producer_cpu = cpu_seconds(producer.pid) or 0.0
            poller.close()
        # "others": everything but the daemon, this process and the producer (whose CPU is
        # counted from its start, so this errs low).
        others = max(0.0, busy - cpu - own - producer_cpu) / elapsed
        return {
            "gb": received / 1e9,
            "cpu": cpu,
            "cpu_per_gb": cpu / (received / 1e9) if received else float("inf"),
            "gbit_s": received * 8 / elapsed / 1e9,
            "others": others,
        }
    finally:
        for sock in sockets:
            sock.close()
        daemon.stop()


def run_floor(args: argparse.Namespace) -> None:
    """The floor: a plain Python loop that accepts clients and writes whatever the producer
    sends to each of them in turn (no framing, queues, tasks or hang-up handling). Runs
    until it is terminated."""
    resource.setrlimit(resource.RLIMIT_NOFILE, resource.getrlimit(resource.RLIMIT_NOFILE)[1:] * 2)
    listener = socket.create_server((HOST, args.server_port), backlog=65535)
    source = socket.create_server((HOST, args.port))
    poller = select.epoll()
    poller.register(listener.fileno(), select.EPOLLIN)
    poller.register(source.fileno(), select.EPOLLIN)
    clients: list[socket.socket] = []
    producer: socket.socket | None = None
    while True:
        for fd, _ in poller.poll():
            if fd == listener.fileno():
                client, _ = listener.accept()
                client.setblocking(False)
                clients.append(client)
            elif fd == source.fileno():
                producer, _ = source.accept()
                poller.register(producer.fileno(), select.EPOLLIN)
            elif producer is not None and fd == producer.fileno():
                data = producer.recv(1 << 16)
                if not data:  # e.g. a probe of the port: wait for the next producer
                    poller.unregister(producer.fileno())
                    producer.close()
                    producer = None
                    continue
                for client in clients:
                    try:  # noqa: SIM105 - the cheapest form in the loop being measured
                        os.write(client.fileno(), data)
                    except OSError:
                        pass


def run_producer(args: argparse.Namespace) -> None:
    block = wire_of(SCALING_PAYLOAD, 16)
    sock = socket.create_connection((HOST, args.port))
    deadline = time.monotonic() + args.seconds
    with sock:
        while time.monotonic() < deadline:
            sock.sendall(block)


def median_of(results: Sequence[dict[str, float]], key: str) -> float:
    return statistics.median(result[key] for result in results)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5, help="frames sent to all clients")
    parser.add_argument("--scaling", default="1,10,100,1000", help="client counts")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per scaling case")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--baseline", help="checkout whose framewire runs as the baseline")
    parser.add_argument("--skip", default="", help="cases to skip: idle,scaling")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--server-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "producer":
        run_producer(args)
        return 0
    if args.role == "floor":
        run_floor(args)
        return 0
    exit_on_sigterm()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < args.clients + 100:
        print(f"open-files limit {hard} is too low for {args.clients} clients: raise ulimit -n")
        return 2
    trees: list[tuple[str, str | None]] = [("plain loop (floor)", FLOOR)]
    if args.baseline:
        trees.append((f"baseline ({args.baseline})", str(Path(args.baseline).resolve())))
    trees.append(("this tree", None))
    skip = set(args.skip.split(","))
    print(f"framewire fan-out benchmark: {machine_text()}")
    others: list[float] = []
    with tempfile.TemporaryDirectory(prefix="fanout-") as tmp:
        workdir = Path(tmp)
        if "idle" not in skip:
            print(f"\n{args.clients:,} clients, one 64-byte frame to all, median of {args.repeat}")
            print(
                f"{'daemon':<28} {'RSS before':>11} {'RSS after':>10} {'per client':>11}"
                f" {'one frame':>10} {'daemon CPU':>11} {'others':>7}"
            )
            for label, tree in trees:
                runs = [
                    idle_and_one_frame(workdir, tree, args.clients, args.rounds)
                    for _ in range(args.repeat)
                ]
                before, after = median_of(runs, "rss_before"), median_of(runs, "rss_after")
                wall_ms = median_of(runs, "wall") * 1e3
                others += [run["others"] for run in runs]
                print(
                    f"{label:<28} {before / 2**20:8.1f} MiB {after / 2**20:6.1f} MiB"
                    f" {(after - before) / args.clients / 1024:7.2f} KiB"
                    f" {median_of(runs, 'wall') * 1e3:7.1f} ms"
                    f" {median_of(runs, 'cpu') * 1e3:8.1f} ms"
                    f" {max(run['others'] for run in runs):6.0%}"
                )
                print(
                    f"{'':<28} targets: RSS < {TARGET_IDLE_MIB:g} MiB:"
                    f" {'met' if after / 2**20 < TARGET_IDLE_MIB else 'NOT met'};"
                    f" one frame < {TARGET_ONE_FRAME_MS:g} ms:"
                    f" {'met' if wall_ms < TARGET_ONE_FRAME_MS else 'NOT met'}"
                )
        if "scaling" not in skip:
            counts = [int(count) for count in args.scaling.split(",")]
            print(
                f"\nscaling: 64 KiB frames as fast as the daemon takes them, {args.duration:g} s"
                f" per case, median of {args.repeat}"
            )
            print(
                f"{'daemon':<28} {'clients':>7} {'delivered':>13} {'daemon CPU':>11}"
                f" {'CPU per GB':>11} {'vs 1 client':>11} {'others':>7}"
            )
            for label, tree in trees:
                if tree == FLOOR:
                    continue  # it forwards bytes without back-pressure: not comparable
                one: float | None = None
                for count in counts:
                    runs = [
                        scaling(workdir, tree, count, args.duration) for _ in range(args.repeat)
                    ]
                    per_gb = median_of(runs, "cpu_per_gb")
                    if count == counts[0]:
                        one = per_gb
                    others += [run["others"] for run in runs]
                    ratio = f"{per_gb / one:10.2f}x" if one else f"{'-':>11}"
                    print(
                        f"{label:<28} {count:>7,} {median_of(runs, 'gbit_s'):7.2f} Gbit/s"
                        f" {median_of(runs, 'cpu'):9.2f} s {per_gb:8.3f} s {ratio}"
                        f" {max(run['others'] for run in runs):6.0%}"
                    )
    warn_if_busy(others, "wall times are unreliable; compare the daemon CPU figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
