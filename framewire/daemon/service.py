"""The daemon: streams, a supervisor full of endpoints, signals and graceful shutdown."""

from __future__ import annotations

import logging
import signal
import time
from typing import Any

import trio

from .._version import __version__
from ..config import Config
from .endpoints import Endpoint, EndpointContext, Transports, make_endpoint
from .stream import StreamRegistry
from .supervisor import Supervisor

__all__ = ["Daemon", "serve"]

log = logging.getLogger("framewire.daemon")


class Daemon:
    """Runs one configuration until shutdown is requested.

    ``await nursery.start(daemon.run)`` returns once every endpoint is bound (or has failed
    its first attempt and is being retried). :meth:`request_shutdown` starts a graceful
    shutdown: endpoints stop accepting, clients get their queued frames within
    ``daemon.grace_period``, then everything is closed and :meth:`run` returns.
    """

    def __init__(
        self,
        config: Config,
        *,
        source: str = "<embedded default>",
        transports: Transports | None = None,
    ) -> None:
        self.config = config
        self.source = source
        self.streams = StreamRegistry()
        self.context = EndpointContext(self.streams, transports or Transports())
        self.supervisor = Supervisor(config.daemon.restart)
        self.started_at = time.time()
        self._shutdown = trio.Event()

    @property
    def endpoints(self) -> dict[str, Endpoint[Any]]:
        return self.supervisor.endpoints

    def request_shutdown(self) -> None:
        self._shutdown.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.supervisor.run)
            for name, endpoint_config in self.config.endpoints.items():
                await self.supervisor.start_endpoint(
                    make_endpoint(name, endpoint_config, self.context)
                )
            log.info(
                "framewire %s running %d endpoints from %s",
                __version__,
                len(self.config.endpoints),
                self.source,
            )
            task_status.started()
            await self._shutdown.wait()
            grace = self.config.daemon.grace_period
            log.info("shutting down (grace period %gs)", grace)
            await self.supervisor.stop_all(grace)
            nursery.cancel_scope.cancel()
        log.info("stopped")


async def serve(config: Config, source: str) -> None:
    """Run ``config`` until SIGINT or SIGTERM, then shut down gracefully.

    A second signal during the grace period stops at once.
    """
    daemon = Daemon(config, source=source)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                count = 0
                async for signum in signals:
                    count += 1
                    name = signal.Signals(signum).name
                    if count == 1:
                        log.info("received %s", name)
                        daemon.request_shutdown()
                    else:
                        log.warning("received %s again; stopping now", name)
                        nursery.cancel_scope.cancel()

            nursery.start_soon(watch_signals)
            await daemon.run()
            nursery.cancel_scope.cancel()
