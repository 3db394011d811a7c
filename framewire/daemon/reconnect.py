"""Keeping one outgoing connection up: connect, hand over, back off, connect again.

Shared by every endpoint that dials out (a receiver in connect mode, a sender). Logs one line
per change of state, not one per failed attempt, and keeps the endpoint's status current:
``state`` is ``connecting``, ``connected`` or ``reconnecting`` and ``detail.next_attempt_in``
the delay before the next attempt.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import NoReturn

import trio

from ..config import Address
from .backoff import Backoff
from .endpoints._base import EndpointStatus
from .transport import Connection, Connector

__all__ = ["keep_connected"]


async def keep_connected(
    connector: Connector,
    address: Address,
    use: Callable[[Connection], Awaitable[str]],
    *,
    backoff: Backoff,
    connect_timeout: float,
    status: EndpointStatus,
    log: logging.Logger,
) -> NoReturn:
    """Connect to ``address`` and run ``use(connection)``, again and again, until cancelled.

    ``use`` returns (or the connection closes with) a description of how the connection
    ended, for the log. A connection that lasted ``backoff.config.stable_after`` resets the
    backoff. Connection failures (OSError, or no answer within ``connect_timeout``) are
    retried; any other exception from ``connector`` or ``use`` propagates.
    """
    last_problem: str | None = None
    while True:
        status.state = "connecting"
        try:
            with trio.fail_after(connect_timeout):
                stream = await connector()
        except (OSError, trio.TooSlowError) as exc:
            problem = (
                f"no answer within {connect_timeout:g}s"
                if isinstance(exc, trio.TooSlowError)
                else exc.strerror or str(exc)
            )
            if problem != last_problem:
                log.warning("cannot connect to %s: %s; retrying with backoff", address, problem)
                last_problem = problem
            status.last_error = problem
        else:
            last_problem = None
            connected_at = trio.current_time()
            status.state = "connected"
            log.info("connected to %s", address)
            try:
                outcome = await use(Connection(stream, peer=str(address)))
            finally:
                await trio.aclose_forcefully(stream)
            log.warning("connection to %s ended: %s; reconnecting", address, outcome)
            if trio.current_time() - connected_at >= backoff.config.stable_after:
                backoff.reset()
        delay = backoff.next_delay()
        status.state = "reconnecting"
        status.detail["next_attempt_in"] = round(delay, 3)
        await trio.sleep(delay)
