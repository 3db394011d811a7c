"""Keeping one outgoing connection up: connect, hand over, back off, connect again.

Shared by every endpoint that dials out (a receiver in connect mode, a sender). Logs one line
per change of state, not one per failed attempt, and keeps the endpoint's status current:
``state`` is ``connecting``, ``connected`` or ``reconnecting`` and ``detail.next_attempt_in``
the delay before the next attempt.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Final, NoReturn

import trio

from ..config import Address
from .backoff import Backoff
from .endpoints._base import EndpointStatus
from .transport import Connection, Connector

__all__ = ["Ended", "describe_connect_error", "keep_connected"]


class Ended(str):
    """How a connection ended, when that was a normal end (the peer ended its stream, the
    stream it was fed ended): :func:`keep_connected` logs it at INFO, not as a warning."""

    __slots__ = ()


#: How a failed connect reads in a log line, by errno (others use the system's text).
_REASONS: Final = {
    errno.ECONNREFUSED: "connection refused (nothing listens there)",
    errno.ETIMEDOUT: "timed out",
    errno.EHOSTUNREACH: "no route to host",
    errno.ENETUNREACH: "network unreachable",
    errno.ENOENT: "no such socket file",
    errno.EACCES: "permission denied",
    errno.ECONNRESET: "connection reset by the peer",
}


def describe_connect_error(exc: BaseException, timeout: float) -> str:
    """Why a connect failed, in words: refused, timed out, no such host, TLS verification
    failed (the TLS connector's message), ... never just "all attempts failed".

    trio.open_tcp_stream raises one OSError for all the addresses it tried, with each
    attempt's error in an exception group as its cause: those are the reasons given.
    """
    if isinstance(exc, trio.TooSlowError):
        return f"no answer within {timeout:g}s"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name: {exc.strerror or exc}"
    reasons: list[str] = []
    for leaf in _leaves(exc.__cause__) if isinstance(exc.__cause__, BaseExceptionGroup) else []:
        reason = _reason(leaf)
        if reason not in reasons:
            reasons.append(reason)
    return "; ".join(reasons) if reasons else _reason(exc)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        leaves += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return leaves


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno in _REASONS:
        return _REASONS[exc.errno]
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[:1].lower() + exc.strerror[1:]
    return str(exc) or type(exc).__name__


async def keep_connected(
    connector: Connector,
    address: Address,
    use: Callable[[Connection], Awaitable[str]],
    *,
    backoff: Backoff,
    connect_timeout: float | Callable[[], float],
    status: EndpointStatus,
    log: logging.Logger,
    hear_verdict: bool = False,
) -> NoReturn:
    """Connect to ``address`` and run ``use(connection)``, again and again, until cancelled.

    ``use`` returns (or the connection closes with) a description of how the connection
    ended, for the log: an :class:`Ended` for a normal end (logged at INFO), any other
    string for a problem (a WARNING). A connection that lasted
    ``backoff.config.stable_after`` resets the backoff. Connection failures (OSError, or no
    answer within ``connect_timeout``, or what it returns when called before each attempt:
    a reload may change it) are retried; any other exception from ``connector``
    or ``use`` propagates.

    With ``hear_verdict`` (an endpoint that only sends) a TLS 1.3 connection is used only
    once the server has not refused our certificate
    (:meth:`~framewire.daemon.transport.Connection.hear_tls_verdict`); a refusal is a
    connection failure like the others, so frames are never written into it.
    """
    last_problem: str | None = None
    while True:
        status.state = "connecting"
        timeout = connect_timeout() if callable(connect_timeout) else connect_timeout
        try:
            with trio.fail_after(timeout):
                stream = await connector()
            connection = Connection(stream, peer=str(address))
            if hear_verdict:
                try:
                    await connection.hear_tls_verdict()  # bounded by TLS_VERDICT_WAIT
                except BaseException:  # refused, or cancelled: the stream is ours to close
                    await trio.aclose_forcefully(stream)
                    raise
        except (OSError, trio.TooSlowError) as exc:
            problem = describe_connect_error(exc, timeout)
            if problem != last_problem:
                log.warning("cannot connect to %s: %s; retrying with backoff", address, problem)
                last_problem = problem
            status.record_error(problem)
        else:
            last_problem = None
            connected_at = trio.current_time()
            status.state = "connected"
            log.info("connected to %s", address)
            try:
                outcome = await use(connection)
            finally:
                await trio.aclose_forcefully(stream)
            level = logging.INFO if isinstance(outcome, Ended) else logging.WARNING
            log.log(level, "connection to %s ended: %s; reconnecting", address, outcome)
            if trio.current_time() - connected_at >= backoff.config.stable_after:
                backoff.reset()
        delay = backoff.next_delay()
        status.state = "reconnecting"
        status.detail["next_attempt_in"] = round(delay, 3)
        await trio.sleep(delay)
