"""The daemon's memory under client churn: what each connection leaves behind.

Run ``python benchmarks/churn.py`` (``--help`` for options). It starts a framewire daemon
(its own process, ``python -m framewire run``) and then opens ``--connects`` client
connections spread evenly over ``--seconds``, sampling the daemon's resident memory
(``VmRSS`` from ``/proc/PID/status``) and its open descriptors before, during and after the
churn, for ``--after`` seconds once the last client has gone (by default past the daemon's
heap trim, every 30 s, so that what is still resident then is held, not free).

Two loads (``--mode``):

- ``churn``: one generator publishing ``--frame-size`` (64 KiB) native frames at ``--rate``
  frames/s, served by one ``server``; every client is one of three kinds, in turn: a
  *reader* (reads for a random 0.1-1 s, then closes), an *idle* client (connects, reads
  nothing for a random 0.1-1 s: its queue fills and drops, then closes) and a *resetter*
  (reads a random part of the first frame, then resets the connection with ``SO_LINGER``
  0: the daemon is mid-frame).
- ``soak``: mixed traffic: the 64 KiB native server, a raw server of 1 KiB frames, a raw
  ``receiver`` that the clients also connect to as producers (they send a few KiB, then
  close or reset), a ``sender`` feeding a second ``receiver`` of the same daemon over
  loopback, and the status port, whose ``/metrics`` is read every 5 s. Clients go to the
  servers and the producers' receiver in turn.

The summary gives RSS and descriptors at the start, after the first minute of churn (the
soak's reference), at the end of the churn and at the end; the growth per connection from
the start to the end; and whether a heap trim ran in between (one runs every 30 s).

``--tracemalloc N`` runs the daemon under ``tracemalloc`` (N frames per traceback) through a
small ``python -c`` wrapper that dumps a snapshot and the count of live objects by type on
SIGUSR1; the script takes one before the churn and one at the end and prints the largest
differences of both (the allocator's view: what Python still holds, against what the
process keeps resident). With ``--garbage`` the daemon's garbage collector is off and each
dump first collects, counting by type what was in reference cycles since the last one: what
each connection leaves for the collector (nothing, since the fix for issue 23).
Tracing slows the daemon several times over: use it to find what is held, not for figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import selectors
import signal
import socket
import struct
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from _harness import (
    HOST,
    Child,
    exit_on_sigterm,
    free_ports,
    machine_text,
    raise_open_files,
    tree_env,
)

from framewire.config import parse_size

MIB: Final = 1 << 20
#: The daemon's heap trim interval (framewire.daemon.service.HEAP_TRIM_INTERVAL).
TRIM_INTERVAL: Final = 30.0
#: How long a client waits for its connect or its first bytes before it gives up.
CLIENT_TIMEOUT: Final = 10.0

CHURN_CONFIG: Final = """\
[daemon]
grace_period = "1s"
log_level = "warning"

[status]
listen = "{host}:{status_port}"

[endpoints.gen]
kind = "generator"
stream = "big"
rate = {rate}
size = {frame_size}

[endpoints.big-out]
kind = "server"
listen = "tcp://{host}:{port}"
protocol = "native"
stream = "big"
max_clients = 100000
max_queue_frames = 8
"""

SOAK_CONFIG: Final = (
    CHURN_CONFIG
    + """
[endpoints.small-gen]
kind = "generator"
stream = "small"
rate = 200.0
size = 1024

[endpoints.small-out]
kind = "server"
listen = "tcp://{host}:{raw_port}"
protocol = "raw"
stream = "small"
max_clients = 100000

[endpoints.producers-in]
kind = "receiver"
listen = "tcp://{host}:{producer_port}"
protocol = "raw"
stream = "produced"
max_clients = 100000

[endpoints.relay-out]
kind = "sender"
connect = "tcp://{host}:{relay_port}"
stream = "small"

[endpoints.relay-in]
kind = "receiver"
listen = "tcp://{host}:{relay_port}"
protocol = "native"
stream = "relayed"
"""
)

#: The wrapper that runs the daemon under tracemalloc, with a SIGUSR1 dump (argv: config,
#: frames per traceback, dump directory, "garbage" or "").
TRACING_WRAPPER: Final = """\
import collections, gc, json, os, signal, sys, tracemalloc
config, depth, dumps, garbage = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
tracemalloc.start(depth)
taken = [0]
def by_type(objects):
    return collections.Counter(type(o).__module__ + "." + type(o).__qualname__ for o in objects)
def dump(signum, frame):
    taken[0] += 1
    cycles = {}
    if garbage:
        # Every cycle made since the last dump (the collector is off): count, then free.
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        cycles = by_type(gc.garbage)
        gc.set_debug(0)
        gc.garbage.clear()
        gc.collect()
    counts = by_type(gc.get_objects())
    tracemalloc.take_snapshot().dump(os.path.join(dumps, f"{taken[0]}.snapshot"))
    with open(os.path.join(dumps, f"{taken[0]}.types.json"), "w") as out:
        json.dump({"counts": counts, "gc": gc.get_count(), "garbage": cycles}, out)
    with open(os.path.join(dumps, f"{taken[0]}.done"), "w"):
        pass
signal.signal(signal.SIGUSR1, dump)
if garbage:
    gc.disable()
from framewire.cli import main
sys.exit(main(["run", config]))
"""


# -- samples ---------------------------------------------------------------------------------


@dataclass
class Sample:
    at: float  # seconds since the start of the churn (negative before it)
    rss: int
    fds: int
    phase: str
    connected: int  # clients of the benchmark connected at that moment


def take_sample(pid: int, at: float, phase: str, connected: int) -> Sample:
    with open(f"/proc/{pid}/status") as status:
        rss = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
    return Sample(at, rss, len(os.listdir(f"/proc/{pid}/fd")), phase, connected)


# -- clients ---------------------------------------------------------------------------------


@dataclass
class Client:
    sock: socket.socket
    kind: str  # reader, idle, resetter, producer
    deadline: float  # when it closes (readers, idle clients), or gives up (the others)
    want: int = 0  # bytes a resetter reads before resetting; a producer's bytes to send
    got: int = 0
    connected: bool = False


@dataclass
class Tally:
    connects: int = 0
    failed: int = 0
    resets: int = 0
    closes: int = 0
    bytes_read: int = 0
    bytes_sent: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, exc: OSError) -> None:
        name = type(exc).__name__
        self.errors[name] = self.errors.get(name, 0) + 1


class Churn:
    """Open clients at a steady rate and let each do its part; non-blocking, one selector."""

    def __init__(self, targets: list[tuple[str, int]], frame_size: int, seed: int) -> None:
        self.targets = targets  # (kind of target, port): "server" or "producer"
        self.frame_size = frame_size
        self.random = random.Random(seed)
        self.selector = selectors.DefaultSelector()
        self.clients: dict[socket.socket, Client] = {}
        self.tally = Tally()
        self.buffer = bytearray(256 * 1024)
        self.payload = bytes(range(256)) * 16  # 4 KiB a producer writes at a time
        self.started = 0

    def start_one(self) -> None:
        target, port = self.targets[self.started % len(self.targets)]
        turn = self.started // len(self.targets)
        self.started += 1
        now = time.monotonic()
        if target == "producer":
            kind, want = "producer", self.random.randint(1, 16) * 4096
        else:
            kind = ("reader", "idle", "resetter")[turn % 3]
            want = self.random.randint(1, max(1, self.frame_size - 1))
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        hold = self.random.uniform(0.1, 1.0)
        client = Client(sock, kind, now + (hold if kind in ("reader", "idle") else CLIENT_TIMEOUT))
        client.want = want
        err = sock.connect_ex((HOST, port))
        if err not in (0, 115):  # EINPROGRESS
            self.tally.failed += 1
            sock.close()
            return
        self.tally.connects += 1
        self.clients[sock] = client
        self.selector.register(sock, selectors.EVENT_WRITE)

    def end(self, client: Client, *, reset: bool) -> None:
        sock = client.sock
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(sock)
        self.clients.pop(sock, None)
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.tally.resets += 1
        else:
            self.tally.closes += 1
        sock.close()

    def step(self, timeout: float) -> None:
        """Serve ready clients for up to ``timeout`` seconds; end those past their time."""
        for key, _ in self.selector.select(timeout):
            client = self.clients.get(key.fileobj)  # type: ignore[call-overload]
            if client is None:
                continue
            try:
                self._ready(client)
            except OSError as exc:
                self.tally.error(exc)
                self.end(client, reset=False)
        now = time.monotonic()
        for client in [c for c in self.clients.values() if c.deadline <= now]:
            self.end(client, reset=client.kind == "producer" and client.got % 2 == 1)

    def _ready(self, client: Client) -> None:
        sock = client.sock
        if not client.connected:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
            client.connected = True
            if client.kind == "producer":
                return  # stays registered for writing
            if client.kind == "idle":
                self.selector.unregister(sock)  # reads nothing: its queue fills
            else:
                self.selector.modify(sock, selectors.EVENT_READ)
            return
        if client.kind == "producer":
            sent = sock.send(self.payload[: min(len(self.payload), client.want - client.got)])
            client.got += sent
            self.tally.bytes_sent += sent
            if client.got >= client.want:
                # Every other producer resets instead of closing.
                self.end(client, reset=self.random.random() < 0.5)
            return
        limit = len(self.buffer)
        if client.kind == "resetter":
            limit = max(1, client.want - client.got)
        n = sock.recv_into(self.buffer, limit)
        if n == 0:
            self.end(client, reset=False)
            return
        client.got += n
        self.tally.bytes_read += n
        if client.kind == "resetter" and client.got >= client.want:
            self.end(client, reset=True)

    def close_all(self) -> None:
        for client in list(self.clients.values()):
            self.end(client, reset=False)


# -- the daemon ------------------------------------------------------------------------------


@contextlib.contextmanager
def daemon(args: argparse.Namespace, workdir: Path) -> Iterator[tuple[Child, dict[str, int]]]:
    names = ["port", "status_port", "raw_port", "producer_port", "relay_port"]
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    template = SOAK_CONFIG if args.mode == "soak" else CHURN_CONFIG
    config = workdir / "churn.toml"
    config.write_text(
        template.format(host=HOST, rate=args.rate, frame_size=args.frame_size, **ports)
    )
    if args.tracemalloc:
        dumps = workdir / "dumps"
        dumps.mkdir()
        argv = [sys.executable, "-c", TRACING_WRAPPER, str(config), str(args.tracemalloc)]
        argv += [str(dumps), "garbage" if args.garbage else ""]
    else:
        argv = [sys.executable, "-m", "framewire", "run", str(config)]
    env = tree_env(args.tree)
    cwd = workdir if args.tree is not None else None
    with Child("daemon", argv, stderr_path=workdir / "daemon.log", env=env, cwd=cwd) as child:
        wait_for_listening([ports["port"]], child)
        yield child, ports


def wait_for_listening(ports: list[int], child: Child) -> None:
    """Until every port is in LISTEN state (without connecting: that would be a client)."""
    needles = {f"{socket.htonl(0x7F000001):08X}:{port:04X}" for port in ports}
    deadline = time.monotonic() + 30.0
    while True:
        if child.proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with status {child.proc.returncode}")
        with open("/proc/net/tcp") as table:
            listening = {f.split()[1] for f in table if f.split()[3:4] == ["0A"]}
        if needles <= listening:
            return
        if time.monotonic() > deadline:
            raise RuntimeError("the daemon is not listening after 30 s")
        time.sleep(0.05)


def tracemalloc_dump(child: Child, workdir: Path, number: int) -> None:
    """Ask the tracing daemon for dump ``number``; wait until it is written."""
    os.kill(child.pid, signal.SIGUSR1)
    done = workdir / "dumps" / f"{number}.done"
    deadline = time.monotonic() + 120.0
    while not done.exists():
        if time.monotonic() > deadline or child.proc.poll() is not None:
            raise RuntimeError("the daemon wrote no tracemalloc dump")
        time.sleep(0.1)


def print_tracemalloc(workdir: Path, connects: int, top: int, garbage: bool) -> None:
    import tracemalloc

    dumps = workdir / "dumps"
    first = tracemalloc.Snapshot.load(str(dumps / "1.snapshot"))
    last = tracemalloc.Snapshot.load(str(dumps / "2.snapshot"))
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
    first, last = first.filter_traces(ignore), last.filter_traces(ignore)
    total = sum(s.size for s in last.statistics("filename")) - sum(
        s.size for s in first.statistics("filename")
    )
    print(
        f"\ntracemalloc: Python's own allocations grew {total / MIB:+.2f} MiB "
        f"({total / max(1, connects):+.0f} B per connection); largest differences:"
    )
    for stat in last.compare_to(first, "traceback")[:top]:
        frames = stat.traceback.format(limit=4)
        where = " <- ".join(line.strip() for line in frames if not line.startswith("    "))
        print(f"  {stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+7d} blocks  {where}")
    before = json.loads((dumps / "1.types.json").read_text())
    after = json.loads((dumps / "2.types.json").read_text())
    grew = sorted(
        ((after["counts"].get(k, 0) - before["counts"].get(k, 0), k) for k in after["counts"]),
        reverse=True,
    )[:top]
    if garbage:
        cycles: dict[str, int] = after["garbage"]
        print(f"in reference cycles during the churn: {sum(cycles.values())} objects")
        for name, n in sorted(cycles.items(), key=lambda item: -item[1])[:top]:
            print(f"  {n:8d} {name}")
    print(f"live objects tracked by gc, by type (gc counts {before['gc']} -> {after['gc']}):")
    for diff, name in grew:
        if diff:
            print(f"  {diff:+8d} {name}")


# -- the run ---------------------------------------------------------------------------------


def scrape_metrics(port: int) -> None:
    url = f"http://{HOST}:{port}/metrics"
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5.0) as answer:
        answer.read()


def run(args: argparse.Namespace) -> int:
    raise_open_files()
    exit_on_sigterm()
    tree = args.tree or str(Path(__file__).resolve().parent.parent)
    print(f"# churn.py --mode {args.mode}, daemon from {tree}: {machine_text()}")
    with tempfile.TemporaryDirectory(prefix="framewire-churn-") as tmp:
        workdir = Path(tmp)
        with daemon(args, workdir) as (child, ports):
            targets = [("server", ports["port"])]
            if args.mode == "soak":
                targets += [("server", ports["raw_port"]), ("producer", ports["producer_port"])]
            churn = Churn(targets, args.frame_size, args.seed)
            samples: list[Sample] = []
            t0 = time.monotonic() + args.before
            next_sample = time.monotonic()
            next_scrape = time.monotonic()
            # Settle first: the stream flows, the heap reaches its working size.
            while time.monotonic() < t0:
                if time.monotonic() >= next_sample:
                    samples.append(take_sample(child.pid, time.monotonic() - t0, "before", 0))
                    next_sample += args.interval
                time.sleep(0.05)
            if args.tracemalloc:
                tracemalloc_dump(child, workdir, 1)
                t0 = time.monotonic()
            samples.append(take_sample(child.pid, 0.0, "start", 0))
            gap = args.seconds / max(1, args.connects)
            next_connect = t0
            while churn.started < args.connects or churn.clients:
                now = time.monotonic()
                if now - t0 > args.seconds + 3 * CLIENT_TIMEOUT:
                    break  # stragglers: closed below
                while churn.started < args.connects and next_connect <= now:
                    churn.start_one()
                    next_connect += gap
                if now >= next_sample:
                    samples.append(take_sample(child.pid, now - t0, "churn", len(churn.clients)))
                    next_sample += args.interval
                if args.mode == "soak" and now >= next_scrape:
                    scrape_metrics(ports["status_port"])
                    next_scrape += 5.0
                churn.step(min(0.02, max(0.0, next_connect - time.monotonic())))
            churn.close_all()
            t_end = time.monotonic() - t0
            samples.append(take_sample(child.pid, t_end, "churn end", 0))
            while (now := time.monotonic()) - t0 < t_end + args.after:
                if now >= next_sample:
                    samples.append(take_sample(child.pid, now - t0, "after", 0))
                    next_sample += args.interval
                time.sleep(0.05)
            samples.append(take_sample(child.pid, time.monotonic() - t0, "end", 0))
            if args.tracemalloc:
                tracemalloc_dump(child, workdir, 2)
            if child.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited ({child.proc.returncode}) during the run")
        print_table(samples, args)
        print_summary(samples, churn.tally, args, t_end)
        if args.tracemalloc:
            print_tracemalloc(workdir, churn.tally.connects, args.top, args.garbage)
    return 0


def print_table(samples: list[Sample], args: argparse.Namespace) -> None:
    print(f"{'t (s)':>8} {'phase':<10} {'RSS MiB':>8} {'fds':>6} {'clients':>8}")
    for s in samples:
        print(f"{s.at:8.1f} {s.phase:<10} {s.rss / MIB:8.1f} {s.fds:6d} {s.connected:8d}")


def at_or_after(samples: list[Sample], t: float) -> Sample:
    return next((s for s in samples if s.at >= t), samples[-1])


def print_summary(
    samples: list[Sample], tally: Tally, args: argparse.Namespace, end: float
) -> None:
    start = next(s for s in samples if s.phase == "start")
    minute = at_or_after(samples, min(60.0, end))
    churn_end = next(s for s in samples if s.phase == "churn end")
    last = samples[-1]
    print(
        f"\nclients: {tally.connects} connected ({tally.failed} failed), {tally.resets} reset, "
        f"{tally.closes} closed; read {tally.bytes_read / MIB:.0f} MiB, "
        f"sent {tally.bytes_sent / MIB:.1f} MiB"
        + (f"; errors {tally.errors}" if tally.errors else "")
    )
    print(f"churn {end:.0f} s, then {args.after:.0f} s idle (trim every {TRIM_INTERVAL:.0f} s)")
    for label, s in (
        ("start", start),
        ("after 1 min", minute),
        ("churn end", churn_end),
        ("end", last),
    ):
        print(f"  {label:<12} t={s.at:6.1f}s  RSS {s.rss / MIB:6.1f} MiB  fds {s.fds}")
    growth = last.rss - start.rss
    print(
        f"growth start -> end: {growth / MIB:+.1f} MiB, "
        f"{growth / max(1, tally.connects):+.0f} B per connection; "
        f"1 min -> end: {(last.rss - minute.rss) / MIB:+.1f} MiB "
        f"({(last.rss - minute.rss) / minute.rss:+.1%})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("churn", "soak"), default="churn")
    parser.add_argument("--connects", type=int, default=6000)
    parser.add_argument("--seconds", type=float, default=60.0, help="churn duration")
    parser.add_argument("--before", type=float, default=10.0, help="settling before the churn")
    parser.add_argument("--after", type=float, default=40.0, help="sampling after the churn")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--frame-size", type=parse_size, default=64 * 1024)
    parser.add_argument("--rate", type=float, default=20.0, help="64 KiB frames per second")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--tree", help="run the daemon of this checkout (a baseline) instead of this one's"
    )
    parser.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES")
    parser.add_argument(
        "--garbage",
        action="store_true",
        help="with --tracemalloc: the daemon's collector off; count what was in cycles",
    )
    parser.add_argument("--top", type=int, default=15)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
