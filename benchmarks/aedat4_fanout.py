"""aedat4 fan-out: a real dv-processing NetworkWriter serving NetworkReaders itself, and
through a framewire daemon.

Run ``python benchmarks/aedat4_fanout.py`` (``--help`` for options). It measures, side by
side, in one run:

direct
    a real ``NetworkWriter`` (its own process) serves ``--readers`` real ``NetworkReader``
    processes;
relayed
    the same writer has one client, a framewire daemon (``python -m framewire run CONFIG``,
    its own process) with an aedat4 ``receiver`` in connect mode and an aedat4 ``server``
    that the same number of readers connect to.

Once every reader has its IOHeader, the writer writes ``--batches`` EventStores of
``--events`` events each (one prepared store, written again and again), at most ``--rate``
stores a second. Each reader counts events until none came for 2 s and reports the count and
the times of its first and last batch. Reported: events/s delivered to all readers (from the
first reader's first batch to the last reader's last batch) and the CPU seconds, read from
/proc, of the serving process: the writer (direct) or framewire (relayed), plus the writer's
in the relayed run.

The script runs itself as writer and reader processes (``--role``, not for direct use). Every
process it starts is killed on the way out, and every wait has a timeout.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _harness import (
    Child,
    all_stopped,
    cpu_seconds,
    daemon_argv,
    free_port,
    script_argv,
    wait_for_port,
)

PATIENCE = 60.0


def cpu_of(child: Child) -> float:
    """User + system CPU seconds of ``child`` (from /proc); it must still be running."""
    seconds = cpu_seconds(child.pid)
    if seconds is None:
        raise RuntimeError(f"{child.name}: gone before its CPU time was read")
    return seconds


# -- roles (separate processes) ---------------------------------------------------------------


def run_writer(port: int, clients: int, batches: int, events: int, rate: float) -> None:
    import dv_processing as dv

    stream = dv.io.Stream.EventStream(0, "events", "DVXplorer_test", (640, 480))
    writer = dv.io.NetworkWriter("127.0.0.1", port, stream, 64)
    store = dv.EventStore()
    for k in range(events):
        store.push_back(1_000_000 + k, k % 640, (7 * k) % 480, bool(k % 2))
    print("ready", flush=True)
    deadline = time.monotonic() + PATIENCE
    while writer.getClientCount() < clients and time.monotonic() < deadline:
        time.sleep(0.01)
    sys.stdin.readline()  # "go"
    period = 1.0 / rate
    start = time.monotonic()
    for index in range(batches):
        delay = start + index * period - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        writer.writeEvents(store)
    while writer.getQueuedPacketCount() and time.monotonic() < deadline + PATIENCE:
        time.sleep(0.01)
    print("written", flush=True)
    sys.stdin.readline()  # "exit"
    os._exit(0)


def run_reader(port: int) -> None:
    import dv_processing as dv

    reader = dv.io.NetworkReader("127.0.0.1", port)
    print("connected", flush=True)
    count = 0
    first = last = 0.0
    deadline = time.monotonic() + 10 * PATIENCE
    while time.monotonic() < deadline:
        batch = reader.getNextEventBatch()
        now = time.time()
        if batch is None:
            if (count and now - last > 2.0) or not reader.isRunning():
                break
            time.sleep(0.0005)
            continue
        if not count:
            first = now
        count += batch.size()
        last = now
    print(f"{count} {first} {last}", flush=True)
    os._exit(0)


# -- the driver --------------------------------------------------------------------------------


def role(*args: object) -> list[str]:
    return script_argv(__file__, "--role", *args)


RELAY = """
[endpoints.in]
kind = "receiver"
connect = "tcp://127.0.0.1:{upstream}"
protocol = "aedat4"
stream = "camera"

[endpoints.out]
kind = "server"
listen = "tcp://127.0.0.1:{downstream}"
protocol = "aedat4"
stream = "camera"
max_queue_frames = 4096
max_queue_bytes = "256MiB"
"""


def measure(relayed: bool, args: argparse.Namespace) -> dict[str, float]:
    with all_stopped(kill=True) as started, tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        clients = 1 if relayed else args.readers
        writer_argv = role("writer", port, clients, args.batches, args.events, args.rate)
        writer = Child("writer", writer_argv, stdin=subprocess.PIPE)
        started.append(writer)
        assert writer.readline(PATIENCE) == "ready"
        serving_port = port
        relay: Child | None = None
        if relayed:
            serving_port = free_port()
            config = Path(tmp) / "relay.toml"
            config.write_text(RELAY.format(upstream=port, downstream=serving_port))
            relay = Child("daemon", daemon_argv(config), stderr=subprocess.DEVNULL)
            started.append(relay)
            wait_for_port(serving_port, PATIENCE, relay)
            time.sleep(0.5)  # the receiver connects and gets the header
        readers = [Child("reader", role("reader", serving_port)) for _ in range(args.readers)]
        started += readers
        for reader in readers:
            assert reader.readline(PATIENCE) == "connected"
        serving = relay if relay is not None else writer
        cpu_before = cpu_of(serving)
        writer_before = cpu_of(writer)
        writer.send_line("go")
        assert writer.readline(PATIENCE) == "written"
        results = [tuple(map(float, reader.readline(PATIENCE).split())) for reader in readers]
        cpu = cpu_of(serving) - cpu_before
        writer_cpu = cpu_of(writer) - writer_before
        writer.send_line("exit")
        events = sum(r[0] for r in results)
        span = max(r[2] for r in results) - min(r[1] for r in results)
        expected = args.batches * args.events * args.readers
        return {
            "events": events,
            "lost": expected - events,
            "events_per_s": events / span if span > 0 else float("nan"),
            "serving_cpu": cpu,
            "writer_cpu": writer_cpu,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--events", type=int, default=5000, help="events per batch")
    parser.add_argument("--rate", type=float, default=400.0, help="batches per second, at most")
    parser.add_argument("--role", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        name, *rest = args.role
        if name == "writer":
            port, clients, batches, events = map(int, rest[:4])
            run_writer(port, clients, batches, events, float(rest[4]))
        else:
            run_reader(int(rest[0]))
        return
    total = args.batches * args.events
    print(
        f"{args.readers} readers, {args.batches} batches of {args.events} events "
        f"({total * 16 / 1e6:.0f} MB of events per reader), at most {args.rate:g} batches/s"
    )
    print(
        f"{'':8} {'events/s (all readers)':>24} {'lost':>8} "
        f"{'serving CPU s':>14} {'writer CPU s':>13}"
    )
    for name, relayed in (("direct", False), ("relayed", True)):
        result = measure(relayed, args)
        print(
            f"{name:8} {result['events_per_s']:>24,.0f} {result['lost']:>8,.0f} "
            f"{result['serving_cpu']:>14.2f} {result['writer_cpu']:>13.2f}"
        )


if __name__ == "__main__":
    main()
