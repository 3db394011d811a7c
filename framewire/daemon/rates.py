"""Frames and bytes per second, per endpoint and per client, over the last status interval.

The status server calls :meth:`RateMeter.sample` once per interval; every snapshot built in
between carries the rates of the last full interval (so a snapshot sent to a client that
just connected does not measure a sliver of time). A counter is compared only with an
earlier reading of the same object: an endpoint a reload replaced, or a client that
reconnected, starts again from zero rather than showing a negative rate.

It also keeps each endpoint's recent rates, one point per interval, in a bounded ring
(:class:`RateRing`): :meth:`RateMeter.history` is what a dashboard opened now draws at once
instead of starting from an empty graph. A ring holds at most :data:`MAX_HISTORY_POINTS`
points (15 minutes at the default 1 s interval; at a shorter interval the last 900
intervals): 32 bytes a point, about 29 KB an endpoint, plus 8 bytes a point for their times.
An endpoint a reload removed loses its ring at the next sample.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Mapping
from typing import Any, Final

from .endpoints import ClientInfo, Endpoint, EndpointStatus

__all__ = [
    "ENDPOINT_COUNTERS",
    "HISTORY_SECONDS",
    "MAX_HISTORY_POINTS",
    "RateMeter",
    "RateRing",
    "history_points",
]

#: The endpoint counters that get a rate, as named in the snapshot.
ENDPOINT_COUNTERS: Final = ("frames_in", "bytes_in", "frames_out", "bytes_out")
#: How far back an endpoint's rate history reaches, in seconds, when the interval allows.
HISTORY_SECONDS: Final = 15 * 60.0
#: The most points a rate ring keeps, whatever the interval: the bound on its memory.
MAX_HISTORY_POINTS: Final = 900


def history_points(interval: float) -> int:
    """Points a ring keeps at a status ``interval`` (seconds): :data:`HISTORY_SECONDS` of
    them, at most :data:`MAX_HISTORY_POINTS`, at least 2. Raises ValueError for an interval
    that is not positive."""
    if not interval > 0:
        raise ValueError(f"expected a positive interval, got {interval!r}")
    return max(2, min(MAX_HISTORY_POINTS, math.ceil(HISTORY_SECONDS / interval)))


class RateRing:
    """The newest ``capacity`` points of ``width`` numbers each, oldest first, in one flat
    array of doubles: ``8 * width * capacity`` bytes, allocated once. Appending to a full
    ring forgets its oldest point. Never raises but for a ``capacity`` below 1 or a point
    of the wrong width (ValueError)."""

    __slots__ = ("_length", "_start", "_values", "capacity", "width")

    def __init__(self, capacity: int, width: int = 1) -> None:
        if capacity < 1 or width < 1:
            raise ValueError(f"a ring needs room for a point, got {capacity} x {width}")
        self.capacity, self.width = capacity, width
        self._values = array("d", bytes(8 * width * capacity))
        self._start = 0
        self._length = 0

    def __len__(self) -> int:
        return self._length

    @property
    def nbytes(self) -> int:
        """The memory its points take: fixed at creation, however many are appended."""
        return self._values.itemsize * len(self._values)

    def append(self, point: Iterable[float]) -> None:
        values = tuple(point)
        if len(values) != self.width:
            raise ValueError(f"expected {self.width} numbers, got {len(values)}")
        slot = (self._start + self._length) % self.capacity
        if self._length == self.capacity:
            self._start = (self._start + 1) % self.capacity
        else:
            self._length += 1
        base = slot * self.width
        self._values[base : base + self.width] = array("d", values)

    def points(self) -> list[tuple[float, ...]]:
        """Every point kept, oldest first."""
        width, capacity = self.width, self.capacity
        return [
            tuple(self._values[(slot := (self._start + i) % capacity) * width : (slot + 1) * width])
            for i in range(self._length)
        ]

    def column(self, index: int) -> list[float]:
        """The ``index``-th number of every point, oldest first."""
        width, capacity = self.width, self.capacity
        return [
            self._values[((self._start + i) % capacity) * width + index]
            for i in range(self._length)
        ]

    def resized(self, capacity: int) -> RateRing:
        """A ring of ``capacity`` holding this one's newest points (as many as fit)."""
        ring = RateRing(capacity, self.width)
        for point in self.points()[-capacity:]:
            ring.append(point)
        return ring


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
        self._capacity = history_points(1.0)
        #: When each point of the rings was taken (Unix time), oldest first.
        self._times = RateRing(self._capacity)
        #: Each endpoint's rates, one point per sample, as ENDPOINT_COUNTERS.
        self._history: dict[str, RateRing] = {}

    def keep_history(self, points: int) -> None:
        """Keep ``points`` points per ring from now on (see :func:`history_points`); rings
        that shrink keep their newest. Raises ValueError below 1."""
        if points < 1:
            raise ValueError(f"expected at least 1 point, got {points}")
        if points == self._capacity:
            return
        self._capacity = points
        self._times = self._times.resized(points)
        self._history = {name: ring.resized(points) for name, ring in self._history.items()}

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
        # The rings: an endpoint gone is forgotten; the first reading measures nothing.
        self._history = {name: ring for name, ring in self._history.items() if name in endpoints}
        if span is None:
            return
        self._times.append((now,))
        for name, rates in endpoint_rates.items():
            ring = self._history.get(name)
            if ring is None:
                ring = self._history[name] = RateRing(self._capacity, len(ENDPOINT_COUNTERS))
            ring.append(rates[counter] for counter in ENDPOINT_COUNTERS)

    def history(self) -> dict[str, Any]:
        """The rates kept (see docs/status.md, ``history``): ``points`` (a ring's bound),
        ``times`` (when each point was taken, oldest first) and, per endpoint, one list per
        counter, as long as ``times`` or shorter (an endpoint added later: its points are
        the newest ones)."""
        return {
            "points": self._capacity,
            "times": [round(t, 3) for t in self._times.column(0)],
            "endpoints": {
                name: {
                    counter: ring.column(index) for index, counter in enumerate(ENDPOINT_COUNTERS)
                }
                for name, ring in self._history.items()
            },
        }

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
