"""Every row of issue 12's table, each with its anchor measured in the same run.

Run ``python benchmarks/issue12.py`` (``--quick`` for a smoke run, ``--repeat N`` for medians
of N runs, ``--rows`` to choose rows; ``--help``). Each row prints framewire's figure, its
baseline measured in the same run, their ratio, the issue's target and whether it is met, and
the CPU that other processes on the machine used while it was measured (share of one CPU,
the largest over the row's measurements). README.md (this directory) describes every row.

The rows reuse the other scripts, each measurement's one home: relay.py's producer,
consumer and daemon for every throughput row (framewire, a direct pair, nginx's stream proxy,
socat), fanout.py for the idle-clients, one-frame and scaling rows, latency.py for the
latency row, g3_fanout.py for the G3 row; only the ZeroMQ anchors live here and run as child
processes of this script (``--role``, not for direct use). An anchor that is not installed
(nginx with its stream module, socat, pyzmq, spt3g) is skipped with a printed note. Every
process started is stopped on the way out, and every wait has a time limit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Final

import fanout
import latency
import relay
from _harness import (
    BUSY_MACHINE,
    GB,
    HOST,
    IO_TIMEOUT,
    MIB,
    START_TIMEOUT,
    TABLE_HEAD,
    Child,
    CpuSamples,
    Row,
    all_stopped,
    exit_on_sigterm,
    free_port,
    free_ports,
    machine_text,
    median,
    payload_of,
    print_row,
    raise_open_files,
    sample_until_line,
    script_argv,
    wait_for_listen,
    wait_for_port,
    worst,
)

NGINX_STREAM_MODULE: Final = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
ROWS: Final = ("relay", "fanout", "latency", "g3")

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


# -- fan-out: fanout.py ------------------------------------------------------------------------


def fanout_rows(args: argparse.Namespace, workdir: Path) -> list[Row]:
    """fanout.py's idle clients, one frame to all (against its plain-Python floor) and
    scaling over ``--fanout-clients``, for this checkout's daemon."""
    idle: list[fanout.OneFrameResult] = []
    plains: list[fanout.OneFrameResult] = []
    scale: dict[int, list[fanout.ScaleResult]] = {}
    for run in range(args.repeat):
        print(f"fan-out rows, run {run + 1} of {args.repeat}:", flush=True)
        result = fanout.idle_measure(workdir, None, args.idle_clients, args.idle_frames)
        idle.append(result)
        print(
            f"  {args.idle_clients:,} idle clients: daemon RSS {result.rss / MIB:.1f} MiB"
            f" ({result.rss_before / MIB:.1f} MiB before they connected), daemon CPU while"
            f" idle {result.idle_cpu or 0:.0%}; one frame to all:"
            f" {', '.join(f'{t:.1f}' for t in result.last_ms)} ms"
            f", daemon CPU {result.cpu_ms or 0:.1f} ms per frame"
            + (f"; others {result.others:.0%}" if result.others is not None else ""),
            flush=True,
        )
        plain = fanout.plain_measure(args.idle_clients, args.idle_frames)
        plains.append(plain)
        print(
            f"  the same clients served by a plain-Python loop of sends:"
            f" {', '.join(f'{t:.1f}' for t in plain.last_ms)} ms (its loops of sends:"
            f" {', '.join(f'{t:.1f}' for t in plain.loop_ms)} ms)"
            f", its CPU {plain.cpu_ms or 0:.1f} ms per frame"
            + (f"; others {plain.others:.0%}" if plain.others is not None else ""),
            flush=True,
        )
        for clients in args.fanout_clients:
            scaled = fanout.scale_measure(
                workdir,
                None,
                clients,
                payload_size=args.fanout_size,
                warmup=args.warmup,
                duration=args.duration,
            )
            scale.setdefault(clients, []).append(scaled)
            cost = scaled.cpu_per_gb
            print(
                f"  {clients:>5} clients: {scaled.delivered / scaled.seconds / GB:.2f} GB/s"
                f" delivered, daemon CPU {scaled.daemon_cpu or 0:.2f} s,"
                f" {cost or 0:.3f} s per delivered GB"
                + (f"; others {scaled.others:.0%}" if scaled.others is not None else ""),
                flush=True,
            )
    n = args.idle_clients
    rss = statistics.median(r.rss for r in idle)
    per_client = statistics.median((r.rss - r.rss_before) / n for r in idle)
    last = statistics.median(statistics.median(r.last_ms) for r in idle)
    plain_ms = statistics.median(r.median_ms for r in plains)
    per_run = [r.median_ms / f.median_ms for r, f in zip(idle, plains, strict=True)]
    idle_others = worst([r.others for r in idle] + [r.others for r in plains])
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
            f" {median([r.cpu_ms for r in idle]) or 0:.1f} ms)",
            f"a plain-Python loop of send() to the same clients: {plain_ms:.1f} ms (its CPU"
            f" {median([r.cpu_ms for r in plains]) or 0:.1f} ms)",
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
                f"{(cost_ratio := fanout.scale_ratio(scale, first, most)):.2f}x at {most:,}",
                "<= 1.0x",
                cost_ratio <= 1.0,
                worst([r.others for rs in scale.values() for r in rs]),
            )
        )
    return rows


# -- latency: latency.py --------------------------------------------------------------------


def latency_rows(args: argparse.Namespace, workdir: Path) -> list[Row]:
    """latency.py's direct and relayed cases (this checkout's daemon), alternating."""
    direct: list[latency.LatencyResult] = []
    relayed: list[latency.LatencyResult] = []
    for run in range(args.repeat):
        print(f"latency rows, run {run + 1} of {args.repeat}:", flush=True)
        for name, results, tree in (
            ("direct", direct, latency.DIRECT),
            ("framewire", relayed, None),
        ):
            result = latency.measure(
                workdir,
                tree,
                rate=args.latency_rate,
                payload_size=args.latency_size,
                duration=args.latency_seconds,
            )
            results.append(result)
            print(
                f"  {name:<10} p50/p99/p99.9 {'/'.join(f'{v:.0f}' for v in result.percentiles)} us"
                + (
                    f", daemon CPU {result.daemon_cpu_us:.1f} us per frame"
                    if result.daemon_cpu_us is not None
                    else ""
                )
                + (f"; others {result.others:.0%}" if result.others is not None else ""),
                flush=True,
            )
    pairs = list(zip(relayed, direct, strict=True))
    d = [statistics.median(f.percentiles[i] for f in direct) for i in range(3)]
    r = [statistics.median(f.percentiles[i] for f in relayed) for i in range(3)]
    cpu = median([f.daemon_cpu_us for f in relayed])
    ratios = [
        statistics.median(a.percentiles[i] / b.percentiles[i] for a, b in pairs) for i in range(3)
    ]
    return [
        Row(
            f"{args.latency_size // 1024} KiB frames at {args.latency_rate / 1000:g} kHz,"
            " latency p50/p99/p99.9",
            "/".join(f"{v:.0f}" for v in r)
            + " us"
            + ("" if cpu is None else f" (daemon CPU {cpu:.1f} us per frame)"),
            "direct pair " + "/".join(f"{v:.0f}" for v in d) + " us",
            "/".join(f"{v:.1f}" for v in ratios),
            f"p99 < {latency.TARGET_P99_US:g} us, p99.9 < {latency.TARGET_P999_US:g} us",
            r[1] < latency.TARGET_P99_US and r[2] < latency.TARGET_P999_US,
            worst([f.others for f in direct + relayed]),
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
        [
            "--repeat",
            "1",
            "--frames",
            str(args.g3_frames),
            "--readers",
            "10",
            "--send-buffer",
            args.g3_send_buffer,
        ]
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
            + ("" if args.g3_send_buffer == "none" else f" (send_buffer {args.g3_send_buffer})")
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
    parser.add_argument(
        "--g3-send-buffer",
        default="4MiB",
        help="the G3 server's send_buffer (default 4MiB, as docs/configuration.md advises for"
        " frames larger than the autotuned buffer; none: the kernel's autotuning)",
    )
    # Internal: how the script runs itself as its helper processes.
    parser.add_argument("--role", choices=sorted(ROLES), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--payload-size", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=60.0, help=argparse.SUPPRESS)
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
