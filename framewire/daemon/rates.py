"""Frames and bytes per second, per endpoint and per client, over the last status interval.

The status server calls :meth:`RateMeter.sample` once per interval; every snapshot built in
between carries the rates of the last full interval (so a snapshot sent to a client that
just connected does not measure a sliver of time). A counter is compared only with an
earlier reading of the same object: an endpoint a reload replaced, or a client that
reconnected, starts again from zero rather than showing a negative rate.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from .endpoints import ClientInfo, Endpoint, EndpointStatus

__all__ = ["ENDPOINT_COUNTERS", "RateMeter"]

#: The endpoint counters that get a rate, as named in the snapshot.
ENDPOINT_COUNTERS: Final = ("frames_in", "bytes_in", "frames_out", "bytes_out")


def _endpoint_reading(status: EndpointStatus) -> tuple[int, ...]:
    return (status.frames_in, status.bytes_in, status.frames_out, status.bytes_out)


def _client_reading(client: ClientInfo) -> tuple[int, int]:
    if client.subscription is not None:
        return (client.frames_sent, client.bytes_sent)
    return (client.frames_in, client.bytes_in)


def _client_names(client: ClientInfo) -> tuple[str, str]:
    if client.subscription is not None:
        return ("frames_sent", "bytes_sent")
    return ("frames_received", "bytes_received")


class RateMeter:
    """Per-second rates from two readings of the daemon's counters, an interval apart.

    Readings are kept by object (an :class:`EndpointStatus`, a :class:`ClientInfo`), so
    objects that went away are forgotten at the next :meth:`sample` and never compared with
    their successors. Never raises.
    """

    def __init__(self) -> None:
        self.interval: float | None = None
        self._at: float | None = None
        self._endpoints: dict[str, tuple[EndpointStatus, tuple[int, ...]]] = {}
        self._clients: dict[int, tuple[ClientInfo, tuple[int, int]]] = {}
        self._endpoint_rates: dict[str, dict[str, float]] = {}
        self._client_rates: dict[int, dict[str, float]] = {}

    def sample(self, endpoints: Mapping[str, Endpoint[Any]], now: float) -> None:
        """Read every counter at ``now`` (Unix time) and compute the rates since the last
        reading. The first reading, and any object first seen now, gives rates of 0."""
        span = None if self._at is None else now - self._at
        if span is not None and span <= 0:
            return  # a clock step backwards: keep the rates we have
        endpoint_readings: dict[str, tuple[EndpointStatus, tuple[int, ...]]] = {}
        client_readings: dict[int, tuple[ClientInfo, tuple[int, int]]] = {}
        endpoint_rates: dict[str, dict[str, float]] = {}
        client_rates: dict[int, dict[str, float]] = {}
        for name, endpoint in endpoints.items():
            status = endpoint.status
            reading = _endpoint_reading(status)
            endpoint_readings[name] = (status, reading)
            earlier = self._endpoints.get(name)
            endpoint_rates[name] = _rates(
                ENDPOINT_COUNTERS,
                reading,
                earlier[1] if earlier is not None and earlier[0] is status else None,
                span,
            )
            for client in list(status.clients.values()):
                key = id(client)
                client_reading = _client_reading(client)
                client_readings[key] = (client, client_reading)
                before = self._clients.get(key)
                client_rates[key] = _rates(
                    _client_names(client),
                    client_reading,
                    before[1] if before is not None and before[0] is client else None,
                    span,
                )
        self._at, self.interval = now, span
        self._endpoints, self._clients = endpoint_readings, client_readings
        self._endpoint_rates, self._client_rates = endpoint_rates, client_rates

    def endpoint(self, name: str) -> dict[str, float]:
        """The rates of endpoint ``name`` (per second, keyed like its counters): zeros
        before it has been read twice."""
        return self._endpoint_rates.get(name) or dict.fromkeys(ENDPOINT_COUNTERS, 0.0)

    def client(self, client: ClientInfo) -> dict[str, float]:
        """The rates of ``client``: zeros before it has been read twice."""
        known = self._clients.get(id(client))
        if known is not None and known[0] is client:
            return self._client_rates[id(client)]
        return dict.fromkeys(_client_names(client), 0.0)


def _rates(
    names: tuple[str, ...],
    now: tuple[int, ...],
    before: tuple[int, ...] | None,
    span: float | None,
) -> dict[str, float]:
    if before is None or span is None:
        return dict.fromkeys(names, 0.0)
    return {
        name: round(max(0, value - earlier) / span, 3)
        for name, value, earlier in zip(names, now, before, strict=True)
    }
