"""Rates and their history: the ring each endpoint's rates are kept in is bounded."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import pytest

from framewire.daemon.endpoints import Endpoint, EndpointStatus
from framewire.daemon.rates import (
    ENDPOINT_COUNTERS,
    MAX_HISTORY_POINTS,
    RateMeter,
    RateRing,
    history_points,
)


def endpoints(**statuses: EndpointStatus) -> dict[str, Endpoint[Any]]:
    return {
        name: cast("Endpoint[Any]", SimpleNamespace(status=status))
        for name, status in statuses.items()
    }


def test_a_ring_keeps_its_newest_points_in_memory_fixed_at_creation() -> None:
    ring = RateRing(3, width=2)
    assert ring.points() == []
    assert len(ring) == 0
    size = ring.nbytes
    assert size == 3 * 2 * 8
    for i in range(10):
        ring.append((i, -i))
    assert ring.points() == [(7.0, -7.0), (8.0, -8.0), (9.0, -9.0)]
    assert ring.column(1) == [-7.0, -8.0, -9.0]
    assert ring.nbytes == size
    assert ring.resized(2).points() == [(8.0, -8.0), (9.0, -9.0)]
    assert ring.resized(5).points() == ring.points()
    with pytest.raises(ValueError, match="expected 2 numbers"):
        ring.append((1.0,))
    with pytest.raises(ValueError, match="needs room"):
        RateRing(0)


def test_points_kept_are_15_minutes_at_most_900() -> None:
    assert history_points(1.0) == 900
    assert history_points(5.0) == 180
    assert history_points(0.05) == MAX_HISTORY_POINTS == 900
    assert history_points(3600.0) == 2
    with pytest.raises(ValueError, match="positive interval"):
        history_points(0.0)


def test_the_meter_keeps_each_endpoints_rates_bounded_and_forgets_one_removed() -> None:
    meter = RateMeter()
    meter.keep_history(5)
    a, b = EndpointStatus(kind="generator"), EndpointStatus(kind="server")
    both = endpoints(a=a, b=b)
    meter.sample(both, 100.0)
    assert meter.history() == {"points": 5, "times": [], "endpoints": {}}  # no rate yet
    for second in range(1, 13):
        a.frames_out, a.bytes_out = 10 * second, 1000 * second
        meter.sample(both, 100.0 + second)
    history = meter.history()
    assert history["times"] == [108.0, 109.0, 110.0, 111.0, 112.0]
    assert set(history["endpoints"]) == {"a", "b"}
    assert set(history["endpoints"]["a"]) == set(ENDPOINT_COUNTERS)
    assert history["endpoints"]["a"]["frames_out"] == [10.0] * 5
    assert history["endpoints"]["a"]["bytes_out"] == [1000.0] * 5
    assert history["endpoints"]["b"]["frames_out"] == [0.0] * 5
    # The newest point is the rate a snapshot carries.
    assert meter.endpoint("a")["frames_out"] == 10.0
    # A reload removed b: its ring goes; a ring added later is shorter, its points newest.
    c = EndpointStatus(kind="server")
    meter.sample(endpoints(a=a, c=c), 113.0)
    history = meter.history()
    assert set(history["endpoints"]) == {"a", "c"}
    assert len(history["endpoints"]["c"]["frames_out"]) == 1
    assert len(history["endpoints"]["a"]["frames_out"]) == 5
    # A new interval keeps the newest points that fit.
    meter.keep_history(2)
    assert meter.history()["times"] == [112.0, 113.0]
    assert len(meter.history()["endpoints"]["a"]["frames_in"]) == 2
