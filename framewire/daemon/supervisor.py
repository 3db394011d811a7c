"""The supervisor: hosts endpoints, restarts the ones that crash, stops them on request.

Every endpoint runs in its own cancel scope inside the supervisor's nursery and is started
with ``nursery.start``, so :meth:`Supervisor.start_endpoint` returns once the endpoint is
bound. If its first attempt fails before it is bound, it is retried in the background, or,
with ``retry_first=False`` (the daemon's start), given up with :class:`StartFailed`: an
endpoint that cannot take its local resources (bind, open a file, load certificates, import
its extra) is a start-up failure, not something to retry forever while claiming to run. After
it has started, an exception from an endpoint is logged with its name, recorded in its status
and answered with a restart after a backoff delay with jitter; it never reaches another
endpoint. An endpoint whose ``run`` returns normally is finished: it stays down, and stays in
:attr:`Supervisor.endpoints` (state ``finished``, final counters) until it is stopped or
replaced.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from ..config import BackoffConfig
from .backoff import Backoff
from .endpoints import Endpoint

__all__ = ["StartFailed", "Supervisor", "unwrap_error"]

log = logging.getLogger("framewire.supervisor")


class StartFailed(Exception):
    """An endpoint could not start (its first attempt failed before it was bound).

    ``reason`` names the resource and the OS reason, e.g. ``cannot listen on
    tcp://127.0.0.1:4536: address already in use``.
    """

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"endpoint {name} cannot start: {reason}")
        self.name = name
        self.reason = reason


@attrs.define(eq=False)
class _Child:
    endpoint: Endpoint[Any]
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    done: trio.Event = attrs.field(factory=trio.Event)


class Supervisor:
    """Hosts named endpoints. Use :meth:`run` with ``nursery.start`` before anything else."""

    def __init__(self, restart: BackoffConfig, *, rng: random.Random | None = None) -> None:
        self.restart = restart
        self._rng = rng
        self._children: dict[str, _Child] = {}
        # Endpoints whose run returned (a generator with a count, a file without loop): shown
        # until they are stopped or replaced.
        self._finished: dict[str, Endpoint[Any]] = {}
        self._nursery: trio.Nursery | None = None

    @property
    def endpoints(self) -> dict[str, Endpoint[Any]]:
        """Every endpoint hosted: running, restarting or finished."""
        hosted = dict(self._finished)
        hosted.update((name, child.endpoint) for name, child in self._children.items())
        return hosted

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host endpoints until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def cancel(self) -> None:
        """Stop hosting at once: every endpoint and helper task is cancelled."""
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def start_task(self, function: Callable[..., Awaitable[object]], *args: object) -> None:
        """Run a helper task (e.g. the watchdog) that lives and dies with the supervisor."""
        if self._nursery is None:
            raise RuntimeError("the supervisor is not running")
        self._nursery.start_soon(function, *args)

    async def start_endpoint(self, endpoint: Endpoint[Any], *, retry_first: bool = True) -> None:
        """Start ``endpoint`` and return once its first attempt has bound or failed.

        A failed first attempt is retried in the background, or with ``retry_first=False``
        raises :class:`StartFailed` (after one log line); the endpoint is then not hosted.
        """
        if self._nursery is None:
            raise RuntimeError("the supervisor is not running")
        if endpoint.name in self._children:
            raise ValueError(f"endpoint {endpoint.name!r} is already running")
        self._finished.pop(endpoint.name, None)
        child = _Child(endpoint)
        self._children[endpoint.name] = child
        await self._nursery.start(self._supervise, child, retry_first)
        if endpoint.status.state == "failed":
            raise StartFailed(endpoint.name, endpoint.status.last_error or "unknown error")

    async def stop_endpoint(self, name: str, grace: float) -> None:
        """Ask ``name`` to stop gracefully; cancel it after ``grace`` seconds; wait for it."""
        self._finished.pop(name, None)
        child = self._children.get(name)
        if child is None:
            return
        child.endpoint.request_stop()
        child.scope.deadline = min(child.scope.deadline, trio.current_time() + grace)
        await child.done.wait()

    async def stop_all(self, grace: float) -> None:
        """Stop every endpoint at once, all within one ``grace`` period."""
        async with trio.open_nursery() as nursery:
            for name in list(self._children):
                nursery.start_soon(self.stop_endpoint, name, grace)

    async def _supervise(
        self, child: _Child, retry_first: bool, *, task_status: trio.TaskStatus[None]
    ) -> None:
        endpoint = child.endpoint
        status = endpoint.status
        backoff = Backoff(self.restart, self._rng)
        reported = False
        try:
            with child.scope:
                while not endpoint.stop_requested:
                    began = trio.current_time()
                    try:
                        async with trio.open_nursery() as nursery:
                            await nursery.start(endpoint.run)
                            if status.state in ("starting", "restarting"):
                                status.state = "running"
                            if not reported:
                                task_status.started()
                                reported = True
                    except Exception as exc:
                        error = unwrap_error(exc)
                        if not reported and not retry_first:
                            status.state = "failed"
                            status.record_error(_describe(error))
                            log.error(
                                "endpoint %s cannot start: %s", endpoint.name, status.last_error
                            )
                            log.debug("endpoint %s start failure", endpoint.name, exc_info=error)
                            return
                        status.restarts += 1
                        if isinstance(error, _OPERATIONAL):
                            # Expected in operation (a resource gone, a port taken): one
                            # line; the traceback only for debugging.
                            status.record_error(_describe(error))
                            log.error("endpoint %s failed: %s", endpoint.name, status.last_error)
                            log.debug("endpoint %s failure", endpoint.name, exc_info=error)
                        else:  # a bug: the traceback is what the report needs
                            status.record_error(f"{type(error).__name__}: {error}")
                            log.error(
                                "endpoint %s failed: %s",
                                endpoint.name,
                                status.last_error,
                                exc_info=error,
                            )
                    else:
                        if not endpoint.stop_requested:
                            status.state = "finished"
                            log.info("endpoint %s finished", endpoint.name)
                        break
                    if not reported:
                        task_status.started()
                        reported = True
                    if trio.current_time() - began >= self.restart.stable_after:
                        backoff.reset()
                    delay = backoff.next_delay()
                    status.state = "restarting"
                    status.detail["restart_in"] = round(delay, 3)
                    log.info("restarting endpoint %s in %.1fs", endpoint.name, delay)
                    await trio.sleep(delay)
        finally:
            if status.state == "finished":
                self._finished[endpoint.name] = endpoint
            elif status.state != "failed":
                status.state = "stopped"
            self._children.pop(endpoint.name, None)
            child.done.set()
            if not reported:
                task_status.started()


#: Failures that operating a daemon brings (resources, files, certificates, extras), logged
#: as one line; anything else is a bug and is logged with its traceback.
_OPERATIONAL = (OSError, ValueError, ImportError)


def _describe(error: BaseException) -> str:
    """One line for a start-up failure: the resource and the reason, without a class name
    where the message already says it all (OSError and ValueError messages name the
    address or file)."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror if error.filename is None else f"{error.filename}: {error.strerror}"
    if isinstance(error, (OSError, ValueError, ImportError)) and str(error):
        return str(error)
    return f"{type(error).__name__}: {error}"


def unwrap_error(exc: BaseException) -> BaseException:
    """The single exception inside nested one-element groups, for a readable log line."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
