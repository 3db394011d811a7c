"""Hostile input cannot hurt the daemon: a fuzz campaign against a live daemon (a subprocess).

framewire promises that a bad input closes only the connection it came on (with one log line)
and that memory is bounded by configuration, never by what a peer sends. One daemon serves the
whole module, with an endpoint of every kind a peer can reach (receivers of every decoding
protocol, links, TLS, a UNIX socket, servers whose clients write garbage, the status port),
while a control pair exchanges a numbered sequence on its own stream. Each hypothesis example
is one connection: random bytes, valid frames mutated, headers announcing absurd lengths,
partial frames, tiny connections. After the campaign (the last test of the module): the daemon
is alive, every control frame arrived in order, its memory and open files are back near their
level after a warm-up, and its log holds no traceback.

The inputs are drawn from a seeded ``random.Random`` that hypothesis supplies
(``st.randoms``), so the campaign is deterministic (``derandomize=True``) and the same input
generators drive benchmarks/hostile.py. A failing example names its input
(:meth:`HostileInput.describe`).
"""

from __future__ import annotations

import random
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .hostile_daemon import (
    MIB,
    TARGETS,
    ControlPair,
    DaemonProcess,
    HostileInput,
    SilentPeers,
    Target,
    client_tls_context,
    deliver,
    hostile_config,
    hostile_input,
    tls_files,
    tracebacks,
)

#: Examples per target: 11 data targets and the status port, a few milliseconds each.
EXAMPLES = 300
#: Inputs per target before the baseline is measured (first allocations, lazy imports).
WARMUP = 60
RSS_MARGIN_FRACTION = 0.15
RSS_MARGIN_BYTES = 20 * MIB
FD_MARGIN = 5


@dataclass(repr=False)
class Campaign:
    daemon: DaemonProcess
    control: ControlPair
    tls: ssl.SSLContext
    silent: SilentPeers = field(default_factory=SilentPeers)
    baseline_rss: int = 0
    baseline_fds: int = 0
    log_offset: int = 0
    sent: dict[str, int] = field(default_factory=dict)
    #: Log lines at the baseline.
    baseline_lines: int = 0

    last: dict[str, str] = field(default_factory=dict)

    def send(self, target: Target, rng: random.Random) -> str:
        """Deliver one hostile input to ``target``; its description.

        Raises AssertionError, naming the input before, if ``target`` no longer accepts
        connections.
        """
        hostile = hostile_input(target.protocol, rng)
        try:
            deliver(
                self.daemon.addresses[target.address_key],
                hostile,
                tls=self.tls if target.transport == "tls" else None,
                silent=self.silent,
            )
        except OSError as exc:
            raise AssertionError(
                f"{target.name} refuses connections ({exc}) after the input"
                f" {self.last.get(target.name, '(none)')}"
            ) from None
        self.sent[target.name] = self.sent.get(target.name, 0) + 1
        self.last[target.name] = hostile.describe()
        return self.last[target.name]

    def new_log(self) -> str:
        text = self.daemon.log()
        new, self.log_offset = text[self.log_offset :], len(text)
        return new


@pytest.fixture(scope="module")
def campaign() -> Iterator[Campaign]:
    with (
        tempfile.TemporaryDirectory(prefix="fw-hostile-") as name,
        tls_files(Path(name)) as pem,
    ):
        directory = Path(name)
        cert = pem[1] if pem is not None else None
        targets = [t for t in TARGETS if t.address_key != "in-tls" or pem is not None]
        daemon = DaemonProcess(
            hostile_config(directory, cert),
            directory,
            expect=["ctl-in", "ctl-out", *(t.address_key for t in targets)],
        )
        try:
            control = ControlPair(daemon.addresses["ctl-in"], daemon.addresses["ctl-out"])
            control.start(lambda: daemon.wait_log(r"ctl-out: client \S+ connected"))
            state = Campaign(daemon, control, client_tls_context())
            rng = random.Random(1)
            for target in targets:
                # The status port is fuzzed last, by its own test: the warm-up must not
                # break it for the others.
                if target.role != "status":
                    for _ in range(WARMUP):
                        state.send(target, rng)
            state.silent.close_all()
            daemon.settle(lambda: False, timeout=1.0)  # let closes be processed
            state.baseline_rss, state.baseline_fds = daemon.rss(), daemon.fds()
            state.baseline_lines = len(daemon.log().splitlines())
            state.sent.clear()
            state.new_log()
            try:
                yield state
            finally:
                state.silent.close_all()
                control.close()
        finally:
            daemon.stop()


def fuzz(target: Target, campaign: Campaign, rng: random.Random) -> None:
    if target.address_key not in campaign.daemon.addresses:
        pytest.skip("trustme is not installed")
    described = campaign.send(target, rng)
    assert campaign.daemon.alive(), f"the daemon died after {described}"
    new = campaign.new_log()
    assert "Traceback" not in new, f"traceback after {described}:\n{new[-3000:]}"


CAMPAIGN_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


DATA_TARGETS = [t for t in TARGETS if t.role != "status"]
STATUS = next(t for t in TARGETS if t.role == "status")


@pytest.mark.parametrize("target", DATA_TARGETS, ids=[t.name for t in DATA_TARGETS])
@CAMPAIGN_SETTINGS
@given(rng=st.randoms(use_true_random=False))
def test_hostile_input_closes_only_its_connection(
    campaign: Campaign, target: Target, rng: random.Random
) -> None:
    fuzz(target, campaign, rng)


@CAMPAIGN_SETTINGS
@given(
    name=st.sampled_from([t.name for t in DATA_TARGETS if t.transport == "tcp" and not t.endpoint]),
    rng=st.randoms(use_true_random=False),
)
def test_many_tiny_connections(campaign: Campaign, name: str, rng: random.Random) -> None:
    """Connections of 0-2 bytes, spread over every plain TCP endpoint."""
    tiny = HostileInput("tiny", (rng.randbytes(rng.randint(0, 2)),))
    deliver(campaign.daemon.addresses[name], tiny)
    campaign.sent[name] = campaign.sent.get(name, 0) + 1
    assert campaign.daemon.alive(), f"the daemon died after {tiny.describe()} to {name}"


def test_after_the_campaign_the_daemon_is_whole(campaign: Campaign) -> None:
    """After every data endpoint's campaign: alive, control complete and in order, open
    files back near their level after the warm-up, no traceback."""
    daemon = campaign.daemon
    campaign.silent.close_all()
    assert daemon.alive(), daemon.log()[-3000:]
    received = campaign.control.finish()
    assert campaign.control.problems == []
    assert campaign.control.sent > 0
    assert received == list(range(campaign.control.sent))
    fd_limit = campaign.baseline_fds + FD_MARGIN
    # Closing is asynchronous in the daemon: poll for a few seconds before judging.
    daemon.settle(lambda: daemon.fds() <= fd_limit)
    assert daemon.fds() <= fd_limit, (campaign.baseline_fds, daemon.fds())
    assert tracebacks(daemon.log()) == []
    # About one line per bad connection: a producer's or client's "connected" and its
    # outcome, a TLS handshake failure. Loosely: at most 3 a connection, plus a few.
    connections = sum(campaign.sent.values())
    lines = len(daemon.log().splitlines()) - campaign.baseline_lines
    assert lines <= 3 * connections + 50, (lines, connections)


def test_after_the_campaign_memory_is_back(campaign: Campaign) -> None:
    """RSS back within max(+15 %, +20 MiB) of its level after the warm-up."""
    daemon = campaign.daemon
    campaign.silent.close_all()
    rss_limit = campaign.baseline_rss + max(
        RSS_MARGIN_BYTES, int(campaign.baseline_rss * RSS_MARGIN_FRACTION)
    )
    daemon.settle(lambda: daemon.rss() <= rss_limit)
    assert daemon.rss() <= rss_limit, (
        f"RSS {daemon.rss() / MIB:.1f} MiB after the campaign,"
        f" {campaign.baseline_rss / MIB:.1f} MiB after the warm-up"
    )


@CAMPAIGN_SETTINGS
@given(rng=st.randoms(use_true_random=False))
def test_status_port_takes_hostile_requests(campaign: Campaign, rng: random.Random) -> None:
    """Random bytes, mutated upgrade requests (bad paths such as ``//[x/?token=a``,
    non-ASCII header bytes) and huge headers; each closes only its own connection."""
    fuzz(STATUS, campaign, rng)


def test_after_the_status_campaign_the_daemon_is_alive(campaign: Campaign) -> None:
    daemon = campaign.daemon
    daemon.settle(lambda: not daemon.alive(), timeout=2.0)  # a crash takes a moment
    assert daemon.alive(), daemon.log()[-3000:]
    assert tracebacks(daemon.log()) == []
