"""Hostile-input campaign: a long fuzzing run against a live framewire daemon.

Run ``python benchmarks/hostile.py`` (``--help`` for options; ``--inputs 2000 --soak 30`` for
a smoke run). It starts the daemon (``python -m framewire run CONFIG``, its own process) with
the endpoints of tests/test_hostile.py: receivers of every decoding protocol, native and
datalink links, a TLS receiver (if trustme is installed), a UNIX socket receiver, a native and
an aedat4 server, the status websocket, and a control pair (a producer into a native receiver,
a client of a lossless native server) that exchanges a numbered sequence the whole time.

Then, for each endpoint in turn, ``--inputs`` hostile connections (random bytes, valid frames
mutated, headers announcing absurd lengths, partial frames, tiny connections; the generators
of tests/hostile_daemon.py) from ``--workers`` threads; then a mixed soak of ``--soak``
seconds where every endpoint is attacked at once. Per endpoint it prints the inputs sent,
connections the daemon refused or could not take, the daemon's RSS and open files before and
after (after up to 5 s for closes to settle), control frames lost, tracebacks that appeared
in the daemon's log, and the inputs per second achieved.

The status port goes last (a status-port crash would end the run early; the run then says
so; ``--targets`` without ``status`` keeps it out). Everything is on loopback; every loop is
bounded by a count or a deadline, every socket operation has a timeout, and the daemon is
stopped on the way out.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from _harness import MIB, exit_on_sigterm, machine_text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.hostile_daemon

from tests.hostile_daemon import (
    TARGETS,
    ControlPair,
    DaemonProcess,
    SilentPeers,
    Target,
    client_tls_context,
    deliver,
    hostile_config,
    hostile_input,
    tls_files,
    tracebacks,
)

#: How long closes get to be processed before memory and files are read after a phase.
SETTLE_SECONDS = 5.0


@dataclass
class Tally:
    """What one phase did to one endpoint."""

    name: str
    sent: int = 0
    refused: int = 0
    first_refusal: str = ""
    seconds: float = 0.0
    rss_before: int = 0
    rss_after: int = 0
    fds_before: int = 0
    fds_after: int = 0
    control_lost: int = 0
    tracebacks: int = 0

    def row(self) -> str:
        rate = self.sent / self.seconds if self.seconds else 0.0
        return (
            f"{self.name:<14} {self.sent:>9,} {self.refused:>8,}"
            f" {self.rss_before / MIB:>8.1f} {self.rss_after / MIB:>8.1f}"
            f" {self.fds_before:>6} {self.fds_after:>6}"
            f" {self.control_lost:>7} {self.tracebacks:>5} {rate:>9,.0f}"
        )


HEADER = (
    f"{'endpoint':<14} {'inputs':>9} {'refused':>8} {'RSS MiB':>8} {'after':>8}"
    f" {'fds':>6} {'after':>6} {'ctl lost':>7} {'tbs':>5} {'inputs/s':>9}"
)


class Campaign:
    def __init__(self, daemon: DaemonProcess, control: ControlPair, seed: int) -> None:
        self.daemon = daemon
        self.control = control
        self.seed = seed
        self.tls = client_tls_context()
        self.tracebacks_seen = 0
        self.lock = threading.Lock()

    def attack(
        self, target: Target, tally: Tally, *, count: int | None, deadline: float, worker: int
    ) -> None:
        """Send hostile inputs to ``target`` until ``count`` are sent (None: no limit) or
        ``deadline`` (monotonic) passes; refusals are counted, the first one described."""
        rng = random.Random(f"{self.seed}-{target.name}-{worker}")
        silent = SilentPeers(limit=2)
        address = self.daemon.addresses[target.address_key]
        tls = self.tls if target.transport == "tls" else None
        sent = 0
        last = "(none)"
        try:
            while (count is None or sent < count) and time.monotonic() < deadline:
                hostile = hostile_input(target.protocol, rng)
                try:
                    deliver(address, hostile, tls=tls, silent=silent, timeout=5.0)
                except OSError as exc:
                    with self.lock:
                        tally.refused += 1
                        if not tally.first_refusal:
                            tally.first_refusal = f"{exc!r} after {last}"
                    if not self.daemon.alive():
                        return
                    time.sleep(0.01)  # do not spin on a port that refuses
                sent += 1
                last = hostile.describe()
                with self.lock:
                    tally.sent += 1
        finally:
            silent.close_all()

    def measure(self, tally: Tally, *, before: bool) -> None:
        if not self.daemon.alive():
            return
        if before:
            tally.rss_before, tally.fds_before = self.daemon.rss(), self.daemon.fds()
            return
        start_rss, start_fds = tally.rss_before, tally.fds_before
        self.daemon.settle(
            lambda: self.daemon.rss() <= start_rss + 20 * MIB and self.daemon.fds() <= start_fds,
            timeout=SETTLE_SECONDS,
        )
        tally.rss_after, tally.fds_after = self.daemon.rss(), self.daemon.fds()

    def control_lost(self) -> int:
        """Control frames sent so far that have not arrived within 10 s."""
        expected = self.control.sent
        self.control.wait_for(expected, timeout=10)
        return max(0, expected - len(self.control.received))

    def new_tracebacks(self) -> int:
        total = len(tracebacks(self.daemon.log()))
        new, self.tracebacks_seen = total - self.tracebacks_seen, total
        return new

    def phase(
        self,
        name: str,
        targets: Sequence[Target],
        *,
        count: int | None,
        seconds: float | None,
        workers: int,
    ) -> Tally:
        """Attack ``targets`` at once with ``workers`` threads each, for ``count`` inputs per
        target or ``seconds``; one tally for them all."""
        tally = Tally(name)
        self.measure(tally, before=True)
        deadline = time.monotonic() + (seconds if seconds is not None else 24 * 3600)
        threads = [
            threading.Thread(
                target=self.attack,
                args=(target, tally),
                kwargs={
                    "count": None if count is None else _share(count, workers, i),
                    "deadline": deadline,
                    "worker": i,
                },
                daemon=True,
            )
            for target in targets
            for i in range(workers)
        ]
        start = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        tally.seconds = time.monotonic() - start
        self.measure(tally, before=False)
        tally.control_lost = self.control_lost()
        tally.tracebacks = self.new_tracebacks()
        return tally


def _share(count: int, workers: int, index: int) -> int:
    """Worker ``index``'s part of ``count`` inputs split between ``workers``."""
    return count // workers + (1 if index < count % workers else 0)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--inputs", type=int, default=100_000, help="hostile inputs per endpoint (100000)"
    )
    parser.add_argument("--soak", type=float, default=600.0, help="seconds of the mixed soak (600)")
    parser.add_argument("--workers", type=int, default=3, help="threads per endpoint (3)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the inputs (1)")
    parser.add_argument(
        "--targets",
        default=",".join(t.name for t in TARGETS),
        help="endpoints to attack, comma-separated (default: all)",
    )
    args = parser.parse_args(argv)
    if args.inputs < 0 or args.soak < 0 or args.workers < 1:
        parser.error("--inputs and --soak must be >= 0, --workers >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    wanted = set(args.targets.split(","))
    unknown = wanted - {t.name for t in TARGETS}
    if unknown:
        print(f"unknown targets: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    print(f"framewire hostile-input campaign: {machine_text()}")
    print(f"{args.inputs:,} inputs per endpoint, {args.workers} threads each, soak {args.soak:g}s")
    with (
        tempfile.TemporaryDirectory(prefix="fw-hostile-") as name,
        tls_files(Path(name)) as pem,
    ):
        directory = Path(name)
        targets = [
            t for t in TARGETS if t.name in wanted and (t.transport != "tls" or pem is not None)
        ]
        # The status port last: if it takes the daemon down, everything else was measured.
        targets.sort(key=lambda t: t.role == "status")
        daemon = DaemonProcess(
            hostile_config(directory, pem[1] if pem else None),
            directory,
            expect=["ctl-in", "ctl-out", *(t.address_key for t in targets)],
        )
        try:
            return run(daemon, targets, args)
        finally:
            code = daemon.stop()
            print(f"daemon exit status {code}; log: {len(daemon.log().splitlines())} lines")


def run(daemon: DaemonProcess, targets: Sequence[Target], args: argparse.Namespace) -> int:
    control = ControlPair(daemon.addresses["ctl-in"], daemon.addresses["ctl-out"])
    control.start(lambda: daemon.wait_log(r"ctl-out: client \S+ connected"))
    campaign = Campaign(daemon, control, args.seed)
    print(f"daemon pid {daemon.pid}: RSS {daemon.rss() / MIB:.1f} MiB, {daemon.fds()} fds")
    print(HEADER)
    tallies: list[Tally] = []
    for target in targets:
        if not daemon.alive():
            print(f"{target.name:<14} skipped: the daemon is gone")
            continue
        tally = campaign.phase(
            target.name, [target], count=args.inputs, seconds=None, workers=args.workers
        )
        tallies.append(tally)
        print(tally.row(), flush=True)
    if args.soak > 0 and daemon.alive():
        tally = campaign.phase("soak (all)", targets, count=None, seconds=args.soak, workers=1)
        tallies.append(tally)
        print(tally.row(), flush=True)
    alive = daemon.alive()
    received = control.finish(timeout=30) if alive else control.received
    in_order = received == list(range(len(received)))
    print()
    print(
        f"control: {control.sent:,} sent, {len(received):,} received,"
        f" {'in order' if in_order else 'OUT OF ORDER'}; problems: {control.problems or 'none'}"
    )
    for tally in tallies:
        if tally.first_refusal:
            print(f"{tally.name}: first refusal: {tally.first_refusal}")
    found = tracebacks(daemon.log())
    print(f"daemon {'alive' if alive else 'DEAD'}; {len(found)} traceback(s) in its log")
    for text in found[:3]:
        print("---\n" + text)
    healthy = alive and in_order and len(received) == control.sent and not found
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
