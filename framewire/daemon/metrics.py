"""Prometheus metrics: the daemon's figures, read afresh on every scrape of ``GET /metrics``.

:class:`DaemonMetrics` is a prometheus_client custom collector over the same live objects
the status snapshot reads, registered with the standard process, platform and GC collectors
on a registry of its own; :meth:`DaemonMetrics.exposition` is the text format.

Counters never go backwards. An endpoint's own counters start at zero whenever the daemon
creates it anew (a reload that changes its configuration), so the daemon hands each endpoint
it retires to :meth:`DaemonMetrics.retire`, which keeps that endpoint's final totals under
its name and adds them to whatever endpoint bears the name later (also after it was removed
and added back). A crash restart keeps the endpoint object, and its counters, anyway.

Per-client series are bounded: the first ``max_clients`` clients (by endpoint, then by
connection order) get series of their own, labelled with their peer; the queues of the
rest are summed under ``client="other"``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from .._version import __version__
from .endpoints import Endpoint, EndpointStatus
from .nats import EmbeddedNatsServer
from .stream import Stream

__all__ = ["CONTENT_TYPE", "ENDPOINT_STATES", "HEALTHY_STATES", "DaemonMetrics", "MetricsView"]

#: The content type of the exposition (Prometheus text format 0.0.4).
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
#: Every state an endpoint can be in (docs/status.md); each gets a 0/1 series.
ENDPOINT_STATES: Final = (
    "starting",
    "running",
    "listening",
    "connecting",
    "connected",
    "reconnecting",
    "stale",
    "up",
    "recording",
    "restarting",
    "finished",
    "failed",
    "stopped",
)
#: States in which an endpoint does its work: ``framewire_endpoint_up`` is 1.
HEALTHY_STATES: Final = frozenset(
    {"running", "listening", "connected", "up", "recording", "finished"}
)
#: The client label of the series that sums the clients beyond ``max_clients``.
OTHER_CLIENTS: Final = "other"

#: The counters kept across an endpoint's replacement: name in :class:`_Totals`.
_COUNTERS: Final = (
    "frames_in",
    "bytes_in",
    "frames_out",
    "bytes_out",
    "dropped",
    "decimated",
    "unencodable",
    "restarts",
    "nats_frames_lost",
    "nats_messages_lost",
    "nats_duplicates_dropped",
    "buffer_dropped",
)
#: The NATS endpoint's gauges (``detail`` key, metric name, help).
_NATS_GAUGES: Final = (
    (
        "consumer_pending",
        "framewire_nats_consumer_pending",
        "Messages the JetStream consumer has not delivered yet (a reader's backlog in the stream)",
    ),
    ("acks_pending", "framewire_nats_acks_pending", "JetStream publishes awaiting their acks"),
    (
        "inflight_bytes",
        "framewire_nats_inflight_bytes",
        "Bytes of JetStream publishes awaiting their acks",
    ),
    ("stream_bytes", "framewire_nats_stream_bytes", "Bytes the JetStream stream holds"),
    ("stream_messages", "framewire_nats_stream_messages", "Messages the JetStream stream holds"),
    (
        "stream_max_bytes",
        "framewire_nats_stream_max_bytes",
        "The JetStream stream's max_bytes (0: none)",
    ),
    (
        "stream_max_messages",
        "framewire_nats_stream_max_messages",
        "The JetStream stream's max_msgs (0: none)",
    ),
    (
        "stream_fill",
        "framewire_nats_stream_fill_ratio",
        "The JetStream stream's fill of its nearest bound, 0 to 1",
    ),
)


class MetricsView(Protocol):
    """What :class:`DaemonMetrics` reads from the daemon."""

    @property
    def endpoints(self) -> Mapping[str, Endpoint[Any]]: ...
    @property
    def streams(self) -> Iterable[Stream]: ...
    @property
    def state(self) -> str: ...
    @property
    def started_at(self) -> float: ...
    @property
    def last_reload(self) -> dict[str, Any] | None: ...
    @property
    def reloads(self) -> Mapping[str, int]: ...
    @property
    def nats_server(self) -> EmbeddedNatsServer | None: ...


def _totals(status: EndpointStatus) -> dict[str, int]:
    """An endpoint's counters now: its own, plus those of its live clients' queues."""
    detail = status.current_detail()
    unencodable = detail.get("frames_unencodable", 0)
    return {
        "buffer_dropped": _int(detail.get("buffer_dropped_frames", 0)),
        "nats_frames_lost": _int(detail.get("frames_lost_upstream", 0)),
        "nats_messages_lost": _int(detail.get("messages_lost_upstream", 0)),
        "nats_duplicates_dropped": _int(detail.get("duplicates_dropped", 0)),
        "frames_in": status.frames_in,
        "bytes_in": status.bytes_in,
        "frames_out": status.frames_out,
        "bytes_out": status.bytes_out,
        "dropped": status.dropped_total,
        "decimated": status.decimated_total,
        "unencodable": unencodable if isinstance(unencodable, int) else 0,
        "restarts": status.restarts,
    }


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


class DaemonMetrics(Collector):
    """The daemon's metrics (see docs/status.md for the list), for one daemon's lifetime.

    ``max_clients`` is read on every scrape (so a reload that changes
    ``[status] metrics_max_clients`` applies at once). :meth:`collect` never raises on the
    daemon's data; it reads it without awaiting, so a scrape sees one consistent moment.
    """

    def __init__(self, daemon: MetricsView, max_clients: Callable[[], int]) -> None:
        self._daemon = daemon
        self._max_clients = max_clients
        #: Final totals of endpoints the daemon retired, by name.
        self._retired: dict[str, dict[str, int]] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        # The standard process_*, python_info and python_gc_* metrics, on our registry.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    def retire(self, name: str, endpoint: Endpoint[Any]) -> None:
        """Keep the final totals of ``endpoint`` (stopped, leaving the daemon) under
        ``name``, so the series of ``name`` go on from them."""
        totals = self._retired.setdefault(name, dict.fromkeys(_COUNTERS, 0))
        for key, value in _totals(endpoint.status).items():
            totals[key] += value

    def _lifetime_totals(self, name: str, status: EndpointStatus) -> dict[str, int]:
        """The counters of the endpoint ``name`` over the daemon's life: its own now plus
        those of the endpoints of that name it retired."""
        totals = _totals(status)
        for key, value in self._retired.get(name, {}).items():
            totals[key] += value
        return totals

    def exposition(self) -> bytes:
        """Every metric, in the Prometheus text format (:data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)

    def collect(self) -> Iterable[Metric]:
        daemon = self._daemon
        info = InfoMetricFamily("framewire", "framewire's version")
        info.add_metric([], {"version": __version__})
        yield info
        yield GaugeMetricFamily(
            "framewire_start_time_seconds",
            "When the daemon started (Unix time)",
            value=daemon.started_at,
        )
        yield from self._reload_metrics(daemon)
        yield from self._endpoint_metrics(daemon.endpoints)
        yield from self._client_metrics(daemon.endpoints)
        yield from self._stream_metrics(daemon.streams)
        yield from self._nats_metrics(daemon.endpoints, daemon.nats_server)
        yield from self._buffer_metrics(daemon.endpoints)

    def _reload_metrics(self, daemon: MetricsView) -> Iterable[Metric]:
        reloads = CounterMetricFamily(
            "framewire_reloads", "Configuration reloads (SIGHUP), by outcome", labels=["outcome"]
        )
        for outcome in ("ok", "failed"):
            reloads.add_metric([outcome], daemon.reloads.get(outcome, 0))
        yield reloads
        last = daemon.last_reload
        if last is not None:
            yield GaugeMetricFamily(
                "framewire_last_reload_success",
                "1 if the last reload was applied, 0 if it failed",
                value=1 if last.get("ok") else 0,
            )
            yield GaugeMetricFamily(
                "framewire_last_reload_timestamp_seconds",
                "When the last reload was attempted (Unix time)",
                value=float(last.get("time", 0)),
            )

    def _endpoint_metrics(self, endpoints: Mapping[str, Endpoint[Any]]) -> Iterable[Metric]:
        frames = CounterMetricFamily(
            "framewire_endpoint_frames",
            "Frames an endpoint received (in) or wrote or published (out)",
            labels=["endpoint", "direction"],
        )
        nbytes = CounterMetricFamily(
            "framewire_endpoint_bytes",
            "Bytes an endpoint received (in) or wrote (out)",
            labels=["endpoint", "direction"],
        )
        simple = {
            "dropped": CounterMetricFamily(
                "framewire_frames_dropped",
                "Data frames the lossy queues of an endpoint's clients dropped",
                labels=["endpoint"],
            ),
            "decimated": CounterMetricFamily(
                "framewire_frames_decimated",
                "Frames decimate left out for an endpoint's clients",
                labels=["endpoint"],
            ),
            "unencodable": CounterMetricFamily(
                "framewire_frames_unencodable",
                "Frames an endpoint's protocol could not carry",
                labels=["endpoint"],
            ),
            "restarts": CounterMetricFamily(
                "framewire_endpoint_restarts",
                "Times an endpoint crashed and was restarted",
                labels=["endpoint"],
            ),
        }
        info = InfoMetricFamily(
            "framewire_endpoint", "An endpoint's kind", labels=["endpoint", "kind"]
        )
        up = GaugeMetricFamily(
            "framewire_endpoint_up",
            "1 if an endpoint is doing its work (running, listening, connected, up, recording, "
            "finished), else 0",
            labels=["endpoint"],
        )
        state = GaugeMetricFamily(
            "framewire_endpoint_state",
            "1 for an endpoint's current state, 0 for the others",
            labels=["endpoint", "state"],
        )
        error_at = GaugeMetricFamily(
            "framewire_endpoint_last_error_timestamp_seconds",
            "When an endpoint's last error happened (Unix time)",
            labels=["endpoint"],
        )
        link = GaugeMetricFamily(
            "framewire_link_up", "1 while a link's peer is up, else 0", labels=["endpoint"]
        )
        clients = GaugeMetricFamily(
            "framewire_clients", "Connections an endpoint has now", labels=["endpoint"]
        )
        for name, endpoint in endpoints.items():
            status = endpoint.status
            totals = self._lifetime_totals(name, status)
            for direction in ("in", "out"):
                frames.add_metric([name, direction], totals[f"frames_{direction}"])
                nbytes.add_metric([name, direction], totals[f"bytes_{direction}"])
            for key, family in simple.items():
                family.add_metric([name], totals[key])
            info.add_metric([name], {"kind": status.kind})
            up.add_metric([name], 1 if status.state in HEALTHY_STATES else 0)
            for each in ENDPOINT_STATES:
                state.add_metric([name, each], 1 if status.state == each else 0)
            if status.last_error_at is not None:
                error_at.add_metric([name], status.last_error_at)
            if "link" in status.detail:
                link.add_metric([name], 1 if status.detail["link"] == "up" else 0)
            clients.add_metric([name], len(status.clients))
        yield from (frames, nbytes, *simple.values(), info, up, state, error_at, link, clients)

    def _client_metrics(self, endpoints: Mapping[str, Endpoint[Any]]) -> Iterable[Metric]:
        queue_frames = GaugeMetricFamily(
            "framewire_client_queue_frames",
            f"Frames queued for a server's client (client={OTHER_CLIENTS!r}: the sum over "
            "clients beyond [status] metrics_max_clients)",
            labels=["endpoint", "client"],
        )
        queue_bytes = GaugeMetricFamily(
            "framewire_client_queue_bytes",
            f"Bytes queued for a server's client (client={OTHER_CLIENTS!r}: as above)",
            labels=["endpoint", "client"],
        )
        room = self._max_clients()
        for name, endpoint in endpoints.items():
            other_frames = other_bytes = 0
            others = False
            for client in list(endpoint.status.clients.values()):
                subscription = client.subscription
                if subscription is None:
                    continue
                if room > 0:
                    room -= 1
                    queue_frames.add_metric([name, client.peer], subscription.queued_frames)
                    queue_bytes.add_metric([name, client.peer], subscription.queued_bytes)
                else:
                    others = True
                    other_frames += subscription.queued_frames
                    other_bytes += subscription.queued_bytes
            if others:
                queue_frames.add_metric([name, OTHER_CLIENTS], other_frames)
                queue_bytes.add_metric([name, OTHER_CLIENTS], other_bytes)
        yield queue_frames
        yield queue_bytes

    def _stream_metrics(self, streams: Iterable[Stream]) -> Iterable[Metric]:
        frames = CounterMetricFamily(
            "framewire_stream_frames", "Frames published into a stream", labels=["stream"]
        )
        nbytes = CounterMetricFamily(
            "framewire_stream_bytes", "Bytes published into a stream", labels=["stream"]
        )
        subscribers = GaugeMetricFamily(
            "framewire_stream_subscribers", "Subscriptions of a stream now", labels=["stream"]
        )
        held_seconds = CounterMetricFamily(
            "framewire_stream_held_seconds",
            "Seconds a stream's publishers waited for room in a lossless subscriber's queue",
            labels=["stream"],
        )
        held = GaugeMetricFamily(
            "framewire_stream_held",
            "1 while a lossless subscriber holds the stream back (its queue is full), else 0",
            labels=["stream"],
        )
        for stream in list(streams):
            frames.add_metric([stream.name], stream.frames_in)
            nbytes.add_metric([stream.name], stream.bytes_in)
            subscribers.add_metric([stream.name], len(stream.subscriptions))
            held_seconds.add_metric([stream.name], stream.held_seconds)
            held.add_metric([stream.name], 0 if stream.held_since is None else 1)
        yield from (frames, nbytes, subscribers, held_seconds, held)

    def _buffer_metrics(self, endpoints: Mapping[str, Endpoint[Any]]) -> Iterable[Metric]:
        """The buffers of consuming endpoints (``[endpoints.NAME.buffer]``)."""
        gauges = {
            key: GaugeMetricFamily(name, text, labels=["endpoint"])
            for key, name, text in (
                (
                    "buffer_bytes",
                    "framewire_buffer_bytes",
                    "Bytes an endpoint's buffer holds (a disk buffer: its segment files)",
                ),
                ("buffer_frames", "framewire_buffer_frames", "Frames an endpoint's buffer holds"),
                (
                    "buffer_max_bytes",
                    "framewire_buffer_max_bytes",
                    "An endpoint's buffer's bound in bytes (max_size)",
                ),
            )
        }
        dropped = CounterMetricFamily(
            "framewire_buffer_dropped_frames",
            'Data frames an endpoint\'s buffer dropped to make room (when_full = "drop_oldest")',
            labels=["endpoint"],
        )
        for name, endpoint in endpoints.items():
            status = endpoint.status
            detail = status.current_detail()
            if "buffer_type" not in detail:
                continue
            for key, gauge in gauges.items():
                gauge.add_metric([name], _int(detail.get(key, 0)))
            dropped.add_metric([name], self._lifetime_totals(name, status)["buffer_dropped"])
        yield from (*gauges.values(), dropped)

    def _nats_metrics(
        self, endpoints: Mapping[str, Endpoint[Any]], server: EmbeddedNatsServer | None
    ) -> Iterable[Metric]:
        counters = {
            "nats_frames_lost": CounterMetricFamily(
                "framewire_nats_frames_lost",
                "Frames of a publisher that never reached a reading NATS endpoint (the "
                "JetStream stream discarded them before they were read)",
                labels=["endpoint"],
            ),
            "nats_messages_lost": CounterMetricFamily(
                "framewire_nats_messages_lost",
                "JetStream messages the stream discarded before a reading endpoint read them",
                labels=["endpoint"],
            ),
            "nats_duplicates_dropped": CounterMetricFamily(
                "framewire_nats_duplicates_dropped",
                "Messages a reading NATS endpoint dropped as stored twice (retried publishes)",
                labels=["endpoint"],
            ),
        }
        gauges = {
            key: GaugeMetricFamily(name, text, labels=["endpoint"])
            for key, name, text in _NATS_GAUGES
        }
        connected = GaugeMetricFamily(
            "framewire_nats_connected",
            "1 while a NATS endpoint's connection is up, else 0",
            labels=["endpoint"],
        )
        stream_ok = GaugeMetricFamily(
            "framewire_nats_stream_ok",
            "1 while a NATS endpoint's JetStream stream answers and has a leader, else 0",
            labels=["endpoint"],
        )
        for name, endpoint in endpoints.items():
            status = endpoint.status
            if status.kind != "nats":
                continue
            totals = self._lifetime_totals(name, status)
            for key, family in counters.items():
                family.add_metric([name], totals[key])
            detail = status.detail
            for key, gauge in gauges.items():
                reading = detail.get(key)
                if isinstance(reading, (int, float)) and not isinstance(reading, bool):
                    gauge.add_metric([name], reading)
            connected.add_metric([name], 1 if status.state == "connected" else 0)
            if "stream_state" in detail:
                stream_ok.add_metric([name], 1 if detail["stream_state"] == "ok" else 0)
        yield from (*counters.values(), *gauges.values(), connected, stream_ok)
        if server is not None:
            yield GaugeMetricFamily(
                "framewire_nats_server_up",
                "1 while the embedded nats-server runs (not stopped, not suspended), else 0",
                value=1 if server.true_state == "running" else 0,
            )
            yield CounterMetricFamily(
                "framewire_nats_server_restarts",
                "Times the embedded nats-server exited and was started again",
                value=server.restarts,
            )
