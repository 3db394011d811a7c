"""The supervisor: crashes are logged by name and restarted with backoff; others carry on."""

from __future__ import annotations

import logging
import random

import pytest
import trio
import trio.testing

from framewire.config import BackoffConfig, GeneratorConfig
from framewire.daemon.endpoints import Endpoint, EndpointContext
from framewire.daemon.endpoints.generator import GeneratorEndpoint
from framewire.daemon.stream import StreamRegistry
from framewire.daemon.supervisor import Supervisor

RESTART = BackoffConfig(initial=1.0, maximum=8.0, factor=2.0, stable_after=60.0)


class Flaky(Endpoint[GeneratorConfig]):
    """Binds, then crashes ``crashes`` times before running quietly."""

    kind = "flaky"

    def __init__(self, name: str, context: EndpointContext, crashes: int) -> None:
        super().__init__(name, GeneratorConfig(stream="unused"), context)
        self.crashes = crashes
        self.starts: list[float] = []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.starts.append(trio.current_time())
        task_status.started()
        await trio.sleep(0.5)
        if len(self.starts) <= self.crashes:
            raise RuntimeError(f"boom {len(self.starts)}")
        await self._stop_requested.wait()


class FailsToBind(Endpoint[GeneratorConfig]):
    kind = "unbindable"

    def __init__(self, name: str, context: EndpointContext) -> None:
        super().__init__(name, GeneratorConfig(stream="unused"), context)
        self.attempts = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.attempts += 1
        await trio.lowlevel.checkpoint()
        raise OSError(98, "cannot listen on tcp://127.0.0.1:1: address already in use")


async def test_crashing_endpoint_restarts_with_backoff_and_spares_the_others(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="framewire")
    streams = StreamRegistry()
    context = EndpointContext(streams)
    supervisor = Supervisor(RESTART, rng=random.Random(3))
    flaky = Flaky("flaky", context, crashes=3)
    steady = GeneratorEndpoint("steady", GeneratorConfig(stream="s", rate=10.0), context)
    received = streams.get("s").subscribe()
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        await supervisor.start_endpoint(steady)
        await supervisor.start_endpoint(flaky)
        await trio.sleep(60)
        assert flaky.status.restarts == 3
        assert flaky.status.state == "running"
        assert flaky.status.last_error == "RuntimeError: boom 3"
        # Restart delays grow: ceilings 1, 2, 4 (each jittered into [c/2, c]).
        delays = [b - a - 0.5 for a, b in zip(flaky.starts, flaky.starts[1:], strict=False)]
        for delay, ceiling in zip(delays, [1, 2, 4], strict=True):
            assert ceiling / 2 <= delay <= ceiling
        # The generator never noticed: about 10 frames a second for 60 s.
        assert steady.status.state == "running"
        assert steady.status.restarts == 0
        assert 590 <= received.queued_frames <= 602
        await supervisor.stop_all(grace=1.0)
        assert supervisor.endpoints == {}
        nursery.cancel_scope.cancel()
    crashes = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(crashes) == 3
    assert all("endpoint flaky failed" in r.getMessage() for r in crashes)


async def test_endpoint_failing_to_bind_is_retried_without_blocking_startup(
    autojump_clock: trio.testing.MockClock,
) -> None:
    context = EndpointContext(StreamRegistry())
    supervisor = Supervisor(RESTART, rng=random.Random(3))
    unbindable = FailsToBind("in", context)
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        with trio.fail_after(1):
            await supervisor.start_endpoint(unbindable)  # returns after the first failure
        assert unbindable.status.state == "restarting"
        assert "address already in use" in (unbindable.status.last_error or "")
        await trio.sleep(30)
        assert unbindable.attempts >= 5
        nursery.cancel_scope.cancel()


async def test_finished_endpoint_is_not_restarted(autojump_clock: trio.testing.MockClock) -> None:
    streams = StreamRegistry()
    supervisor = Supervisor(RESTART)
    received = streams.get("s").subscribe()
    generator = GeneratorEndpoint(
        "burst", GeneratorConfig(stream="s", rate=0.0, count=10), EndpointContext(streams)
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        await supervisor.start_endpoint(generator)
        await trio.sleep(10)
        assert generator.status.state == "finished"
        assert generator.status.restarts == 0
        nursery.cancel_scope.cancel()
    assert received.queued_frames == 11  # the metadata frame, then ten data frames


class CrashesWith(Endpoint[GeneratorConfig]):
    """Binds, then fails once with ``error``; then runs quietly."""

    kind = "crashing"

    def __init__(self, name: str, context: EndpointContext, error: Exception) -> None:
        super().__init__(name, GeneratorConfig(stream="unused"), context)
        self.error: Exception | None = error

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.lowlevel.checkpoint()
        error, self.error = self.error, None
        if error is not None:
            raise error
        await self._stop_requested.wait()


@pytest.mark.parametrize(
    ("error", "traceback"),
    [
        (ValueError("tls: cannot load certificate /x.pem with key /x.key: no such file"), False),
        (ImportError("the bridge endpoint needs pyzmq: pip install 'framewire[zmq]'"), False),
        (OSError(98, "cannot listen on tcp://127.0.0.1:1: address already in use"), False),
        (RuntimeError("a bug"), True),
    ],
)
async def test_operational_failures_are_one_line_bugs_keep_their_traceback(
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    error: Exception,
    traceback: bool,
) -> None:
    caplog.set_level(logging.DEBUG, logger="framewire")
    supervisor = Supervisor(RESTART, rng=random.Random(3))
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        endpoint = CrashesWith("e", EndpointContext(StreamRegistry()), error)
        await supervisor.start_endpoint(endpoint)
        with trio.fail_after(30):
            while endpoint.status.restarts == 0 or endpoint.status.state != "running":  # noqa: ASYNC110 - state only
                await trio.sleep(0.1)
        supervisor.cancel()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert (errors[0].exc_info is not None) is traceback
    assert str(error.args[-1]) in errors[0].getMessage()
    if not traceback:  # the traceback is there for debugging, at DEBUG
        assert any(r.exc_info for r in caplog.records if r.levelno == logging.DEBUG)
