"""Prometheus metrics: the daemon's figures, read afresh on every scrape of ``GET /metrics``.

:class:`DaemonMetrics` is a prometheus_client custom collector over the same live objects
the status snapshot reads, registered with the standard process, platform and GC collectors
on a registry of its own; :meth:`DaemonMetrics.exposition` is the text format.

Counters never go backwards. An endpoint's own counters start at zero whenever the daemon
creates it anew (a reload that changes its configuration), so the daemon hands each endpoint
it retires to :meth:`DaemonMetrics.retire`, which keeps that endpoint's final totals under
its name and adds them to whatever endpoint bears the name later (also after it was removed
and added back). A crash restart keeps the endpoint object, and its counters, anyway.

Client series are keyed by what stays the same when a client reconnects: its endpoint and
its peer's host (never the ephemeral port, which would start a new series at every
reconnect); the clients of one host on one endpoint are summed (their queues), or the
fullest is taken (:func:`fill_ratio`). They are bounded: the first ``max_clients`` (endpoint,
host) pairs (by endpoint, then by the order their first client connected) get series of
their own; the rest are summed per endpoint under ``host="other"``. Per-client detail (the
peer's port included) is in the status snapshot only.

An endpoint's last frame is exported as an age (seconds since its ``frames_in`` or
``frames_out`` last grew), with no series before its first frame in that direction.
"""

from __future__ import annotations

import re
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
from .history import history_metrics
from .nats import EmbeddedNatsServer
from .stream import Stream, Subscription

__all__ = [
    "CONTENT_TYPE",
    "ENDPOINT_STATES",
    "HEALTHY_STATES",
    "DaemonMetrics",
    "MetricsView",
    "fill_ratio",
    "peer_host",
]

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
#: The host label of the series that sums the clients beyond ``max_clients``.
OTHER_CLIENTS: Final = "other"
#: A peer named ``host:port`` or ``[v6 host]:port`` (see transport.peer_name).
_HOST_PORT: Final = re.compile(r"\[(?P<v6>[^\]]*)\]:\d+|(?P<host>[^:\[\]]+):\d+")

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
    "rewinds_served",
    "rewinds_refused",
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
        "rewinds_served": _int(detail.get("rewinds", 0)),
        "rewinds_refused": _int(detail.get("rewinds_refused", 0)),
    }


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


def _number(value: object) -> float | None:
    """``value`` if it is a number (not a bool), else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    return None


def peer_host(peer: str) -> str:
    """The host part of a client's peer name: ``10.0.0.5`` for ``10.0.0.5:40112``, ``::1``
    for ``[::1]:40112``; any other name (``unix:/run/x.sock``, a memory stream's) as it is."""
    match = _HOST_PORT.fullmatch(peer)
    if match is None:
        return peer
    return match["v6"] if match["v6"] is not None else match["host"]


def fill_ratio(subscription: Subscription) -> float:
    """How full ``subscription``'s queue is: its fill of the nearer of its two bounds (frames,
    bytes), 0 when empty, 1 (or a little over, for one large frame) when full."""
    bounds = subscription.bounds
    return max(
        subscription.queued_frames / bounds.max_frames,
        subscription.queued_bytes / bounds.max_bytes,
    )


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
        #: When the endpoints of that name it retired last moved a frame, by direction.
        self._retired_frame_at: dict[str, dict[str, float]] = {}
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
        last = self._retired_frame_at.setdefault(name, {})
        for direction in ("in", "out"):
            at = endpoint.status.last_frame_at(direction)
            if at is not None:
                last[direction] = max(at, last.get(direction, at))

    def _last_frame_age(self, name: str, status: EndpointStatus, direction: str) -> float | None:
        """Seconds since the endpoint ``name`` (this one, or one it replaced) last moved a
        frame in ``direction``; None if none ever did."""
        stamps = [
            at
            for at in (
                status.last_frame_at(direction),
                self._retired_frame_at.get(name, {}).get(direction),
            )
            if at is not None
        ]
        if not stamps:
            return None
        return max(0.0, status.clock() - max(stamps))

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
        yield from self._queue_metrics(daemon.endpoints)
        yield from self._client_metrics(daemon.endpoints)
        yield from self._stream_metrics(daemon.streams)
        yield from self._nats_metrics(daemon.endpoints, daemon.nats_server)
        yield from self._buffer_metrics(daemon.endpoints)
        yield from self._rewind_metrics(daemon.endpoints)
        yield from history_metrics(daemon.streams)

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
        last_frame = GaugeMetricFamily(
            "framewire_endpoint_last_frame_age_seconds",
            "Seconds since an endpoint last received (in) or wrote or published (out) a frame "
            "(no series before its first)",
            labels=["endpoint", "direction"],
        )
        for name, endpoint in endpoints.items():
            status = endpoint.status
            totals = self._lifetime_totals(name, status)
            for direction in ("in", "out"):
                frames.add_metric([name, direction], totals[f"frames_{direction}"])
                nbytes.add_metric([name, direction], totals[f"bytes_{direction}"])
                age = self._last_frame_age(name, status, direction)
                if age is not None:
                    last_frame.add_metric([name, direction], age)
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
        yield from (
            frames,
            nbytes,
            *simple.values(),
            info,
            up,
            state,
            error_at,
            link,
            clients,
            last_frame,
        )

    def _queue_metrics(self, endpoints: Mapping[str, Endpoint[Any]]) -> Iterable[Metric]:
        """What waits in memory for the far end of a consuming endpoint (a sender, link,
        bridge, recorder, pubsub or NATS publisher), and the bounds of that queue, read from
        its status detail (``queue_*``): its stream subscription's queue and the frames taken
        and not yet delivered; with a disk buffer, the hand-over queue in front of it (the
        buffer itself is the ``framewire_buffer_*`` series)."""
        families = {
            key: GaugeMetricFamily(f"framewire_endpoint_{key}", text, labels=["endpoint"])
            for key, text in (
                ("queue_frames", "Frames waiting in memory for an endpoint's far end"),
                ("queue_bytes", "Bytes waiting in memory for an endpoint's far end"),
                ("queue_max_frames", "The bound of an endpoint's queue, in frames"),
                ("queue_max_bytes", "The bound of an endpoint's queue, in bytes"),
            )
        }
        for name, endpoint in endpoints.items():
            detail = endpoint.status.current_detail()
            for key, family in families.items():
                reading = _number(detail.get(key))
                if reading is not None:
                    family.add_metric([name], reading)
        yield from families.values()

    def _client_metrics(self, endpoints: Mapping[str, Endpoint[Any]]) -> Iterable[Metric]:
        """Per (endpoint, peer host): connections, and the queues of the clients fed."""
        connections = GaugeMetricFamily(
            "framewire_client_connections",
            f"An endpoint's connections from one host now (host={OTHER_CLIENTS!r}: the sum "
            "over hosts beyond [status] metrics_max_clients)",
            labels=["endpoint", "host"],
        )
        queue_frames = GaugeMetricFamily(
            "framewire_client_queue_frames",
            f"Frames queued for a server's clients on one host (host={OTHER_CLIENTS!r}: as above)",
            labels=["endpoint", "host"],
        )
        queue_bytes = GaugeMetricFamily(
            "framewire_client_queue_bytes",
            f"Bytes queued for a server's clients on one host (host={OTHER_CLIENTS!r}: as above)",
            labels=["endpoint", "host"],
        )
        queue_fill = GaugeMetricFamily(
            "framewire_client_queue_fill_ratio",
            "The fullest queue of a server's clients on one host: its fill of its nearer "
            "bound (frames, bytes), 0 to 1",
            labels=["endpoint", "host"],
        )
        room = self._max_clients()
        for name, endpoint in endpoints.items():
            hosts: dict[str, list[Subscription | None]] = {}
            for client in list(endpoint.status.clients.values()):
                host = peer_host(client.peer)
                if host not in hosts and room <= 0:
                    host = OTHER_CLIENTS
                elif host not in hosts:
                    room -= 1
                hosts.setdefault(host, []).append(client.subscription)
            for host, subscriptions in hosts.items():
                connections.add_metric([name, host], len(subscriptions))
                fed = [each for each in subscriptions if each is not None]
                if not fed:
                    continue
                queue_frames.add_metric([name, host], sum(each.queued_frames for each in fed))
                queue_bytes.add_metric([name, host], sum(each.queued_bytes for each in fed))
                queue_fill.add_metric([name, host], max(fill_ratio(each) for each in fed))
        yield from (connections, queue_frames, queue_bytes, queue_fill)

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

    def _rewind_metrics(self, endpoints: Mapping[str, Endpoint[Any]]) -> Iterable[Metric]:
        """Rewinds (a client's ``--since``, a ``replay``) of every server, by outcome."""
        rewinds = CounterMetricFamily(
            "framewire_rewinds",
            "Rewinds a server began (served) or refused (a time or rate it cannot serve, a "
            "stream without history)",
            labels=["endpoint", "outcome"],
        )
        for name, endpoint in endpoints.items():
            if endpoint.status.kind == "server":
                totals = self._lifetime_totals(name, endpoint.status)
                rewinds.add_metric([name, "served"], totals["rewinds_served"])
                rewinds.add_metric([name, "refused"], totals["rewinds_refused"])
        yield rewinds

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
                reading = _number(detail.get(key))
                if reading is not None:
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
