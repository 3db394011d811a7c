"""The health of the JetStream stream an endpoint publishes to or reads from: its bytes and
messages against its bounds, its leader, and (for a stream with ``retention = "interest"``)
whether any reader keeps frames in it at all.

:class:`StreamWatch` asks the server every :data:`WATCH_INTERVAL` seconds and writes what it
hears into the endpoint's ``status.detail`` (``stream_*`` keys, see docs/status.md). It logs
changes only: the publisher (the stream's owner) one WARNING when the stream passes
:data:`FILL_WARNING` of a bound (and one INFO once it is back below :data:`FILL_REARM`; a
stream that fills again within :data:`FILL_QUIET` seconds of that INFO, as a bounded stream
does while a reader works through a backlog, is not logged again, nor is its next drain:
``stream_fill`` in status says where it is); both sides one WARNING when the stream has no
leader or cannot be asked, and one INFO when it is back.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Final

import trio

from ...config import format_size
from ._thread import NatsThread, describe_nats_error

if TYPE_CHECKING:
    from ..endpoints.nats import NatsEndpoint

__all__ = ["FILL_WARNING", "WATCH_INTERVAL", "StreamWatch"]

#: Seconds between two looks at the stream.
WATCH_INTERVAL: Final = 2.0
#: The fill (of max_bytes or max_msgs) at which the publisher warns, once.
FILL_WARNING: Final = 0.8
#: The fill below which it says so and may warn again.
FILL_REARM: Final = 0.7
#: Seconds after the INFO that the stream is below :data:`FILL_REARM` again during which
#: it fills and drains without a log line.
FILL_QUIET: Final = 60.0
#: Seconds a stream that sources another domain's may go without hearing from it, while
#: that domain's stream answers, before the sourcing is restarted (nats-server itself
#: retries a stalled source only after 10 s times its failures, up to 2 minutes).
SOURCE_STALL: Final = 15.0
#: Seconds between two restarts of a stalled sourcing.
SOURCE_RESTART_INTERVAL: Final = 30.0


class StreamWatch:
    """Watches the endpoint's JetStream stream until cancelled. Never raises for what the
    server says (or does not): that is the state it reports."""

    def __init__(self, endpoint: NatsEndpoint, thread: NatsThread) -> None:
        self.endpoint = endpoint
        self.thread = thread
        self.owner = endpoint.layout.owner
        self._full_warned = False
        #: Whether the last crossing of FILL_WARNING was logged (not within FILL_QUIET).
        self._full_logged = False
        #: Until when (trio's clock) a new crossing of FILL_WARNING is not logged.
        self._fill_quiet_until = -math.inf
        self._no_reader_warned = False
        self._problem: str | None = None
        self._source_problem: str | None = None
        self._next_source_restart = -math.inf
        endpoint.status.detail.update(
            stream_state="unknown",
            stream_leader=None,
            stream_bytes=0,
            stream_messages=0,
            stream_max_bytes=0,
            stream_max_messages=0,
            stream_fill=0.0,
        )

    async def run(self) -> None:
        endpoint = self.endpoint
        while True:
            await endpoint.wait_connected()
            await self.look()
            await trio.sleep(WATCH_INTERVAL)

    async def look(self) -> None:
        """Ask the server once and report."""
        endpoint = self.endpoint
        layout = endpoint.layout
        interest = self.owner and layout.retention == "interest"

        async def ask() -> tuple[Any, list[Any] | None]:
            js = endpoint.jetstream()
            info = await js.stream_info(layout.stream)
            consumers = await js.consumers_info(layout.stream) if interest else None
            return info, consumers

        try:
            info, consumers = await self.thread.call(ask, within=endpoint.config.connect_timeout)
        except Exception as exc:
            self._trouble("unavailable", describe_nats_error(exc))
            return
        cluster = info.cluster
        if cluster is not None and not cluster.leader:
            self._trouble("no_leader", "it has no leader (its replicas cannot elect one)")
            return
        self._fine(cluster.leader if cluster is not None else None)
        try:
            self._report_fill(info)
            if consumers is not None:
                self._report_readers(consumers)
            if layout.source_domain is not None:
                await self._watch_source(info)
        except (AttributeError, TypeError, ValueError) as exc:
            # What the server said is not what nats-py documents: say so, keep publishing.
            self._trouble("unknown", f"an answer to STREAM.INFO that makes no sense ({exc!r})")

    def _trouble(self, state: str, why: str) -> None:
        detail = self.endpoint.status.detail
        detail["stream_state"] = state
        problem = f"JetStream stream {self.endpoint.layout.stream}: {why}"
        if problem != self._problem:
            self._problem = problem
            self.endpoint.log.warning("%s", problem)
            self.endpoint.status.record_error(problem)

    def _fine(self, leader: str | None) -> None:
        detail = self.endpoint.status.detail
        detail["stream_state"] = "ok"
        detail["stream_leader"] = leader
        if self._problem is not None:
            self._problem = None
            self.endpoint.log.info(
                "JetStream stream %s answers again%s",
                self.endpoint.layout.stream,
                f" (leader {leader})" if leader else "",
            )

    def _report_fill(self, info: Any) -> None:
        endpoint = self.endpoint
        detail = endpoint.status.detail
        state, config = info.state, info.config
        max_bytes = max(config.max_bytes or 0, 0)
        max_messages = max(config.max_msgs or 0, 0)
        fills = []
        if max_bytes:
            fills.append(state.bytes / max_bytes)
        if max_messages:
            fills.append(state.messages / max_messages)
        fill = max(fills, default=0.0)
        detail.update(
            stream_bytes=state.bytes,
            stream_messages=state.messages,
            stream_max_bytes=max_bytes,
            stream_max_messages=max_messages,
            stream_fill=round(fill, 4),
        )
        if not self.owner:
            return
        what = (
            f"JetStream stream {endpoint.layout.stream} holds {format_size(state.bytes)} in "
            f"{state.messages} messages"
            + (f" of max_bytes {format_size(max_bytes)}" if max_bytes else "")
            + (f" and max_msgs {max_messages}" if max_messages else "")
        )
        if fill >= FILL_WARNING and not self._full_warned:
            self._full_warned = True
            self._full_logged = trio.current_time() >= self._fill_quiet_until
            if not self._full_logged:
                return
            if str(getattr(config.discard, "value", config.discard)) == "new":
                then = "when it is full, publishing waits for the readers to make room"
            else:
                then = "when it is full, its oldest frames go, read or not"
            endpoint.log.warning("%s (%.0f%% full): %s", what, 100 * fill, then)
        elif fill < FILL_REARM and self._full_warned:
            self._full_warned = False
            if self._full_logged:
                self._fill_quiet_until = trio.current_time() + FILL_QUIET
                endpoint.log.info("%s (%.0f%% full)", what, 100 * fill)

    def _report_readers(self, consumers: list[Any]) -> None:
        """``retention = "interest"``: frames no consumer's filter covers leave at once."""
        endpoint = self.endpoint
        data_subject = f"{endpoint.layout.subject}.data.x"
        readers = [
            consumer for consumer in consumers if _covers(_filters(consumer.config), data_subject)
        ]
        endpoint.status.detail["stream_readers"] = len(readers)
        if not readers and not self._no_reader_warned:
            self._no_reader_warned = True
            endpoint.log.warning(
                'JetStream stream %s has no reader\'s consumer (retention = "interest"): '
                "what is published now is removed at once; start the reading endpoint (its "
                "durable consumer) first",
                endpoint.layout.stream,
            )
        elif readers and self._no_reader_warned:
            self._no_reader_warned = False
            endpoint.log.info(
                "JetStream stream %s has %d reader(s) again", endpoint.layout.stream, len(readers)
            )

    async def _watch_source(self, info: Any) -> None:
        """A stream that sources the same-named stream of another domain (a hub's copy of a
        site's): report when it last heard from it; restart a sourcing that stalled while
        the other domain answers."""
        endpoint = self.endpoint
        layout = endpoint.layout
        detail = endpoint.status.detail
        source = (info.sources or [None])[0]
        if source is None:
            return
        active = (
            source.active / 1e9 if isinstance(source.active, int) and source.active >= 0 else None
        )
        detail["source_active"] = None if active is None else round(active, 1)
        detail["source_lag"] = source.lag or 0
        error = source.error
        if error:
            description = error.get("description") if isinstance(error, dict) else error
            self._source_trouble(
                f"cannot source it from domain {layout.source_domain}: {description}",
                key=f"error {description}",
            )
            return
        if active is not None and active <= SOURCE_STALL:
            if self._source_problem is not None:
                self._source_problem = None
                endpoint.log.info(
                    "JetStream stream %s sources from domain %s again",
                    layout.stream,
                    layout.source_domain,
                )
            return
        now = trio.current_time()
        if now < self._next_source_restart:
            return
        client = endpoint.client
        domain = layout.source_domain
        frames_config = layout.configs()[0]

        async def restart() -> None:
            # Ask the other domain first: only a link that works is worth a restart.
            await client.jetstream(domain=domain).stream_info(layout.stream)
            js = endpoint.jetstream()
            await js.update_stream(frames_config.evolve(sources=[]))
            await js.update_stream(frames_config)

        try:
            await self.thread.call(restart, within=endpoint.config.connect_timeout)
        except Exception as exc:
            self._source_trouble(
                f"has not heard from domain {domain} for "
                + ("ever" if active is None else f"{active:.0f} s")
                + f" ({describe_nats_error(exc)})",
                key=f"silent {domain}",
            )
            return
        self._next_source_restart = now + SOURCE_RESTART_INTERVAL
        endpoint.count("source_restarts")
        endpoint.log.info(
            "JetStream stream %s had not heard from domain %s for %s while it answers: "
            "sourcing restarted",
            layout.stream,
            domain,
            "ever" if active is None else f"{active:.0f} s",
        )

    def _source_trouble(self, why: str, *, key: str) -> None:
        """One WARNING per trouble (``key``: what stays the same while it lasts, however the
        text's figures change); the text is the endpoint's last error meanwhile."""
        problem = f"JetStream stream {self.endpoint.layout.stream} {why}"
        self.endpoint.status.record_error(problem)
        if key != self._source_problem:
            self._source_problem = key
            self.endpoint.log.warning("%s", problem)


def _filters(config: Any) -> list[str]:
    """A consumer's filter subjects (none: the whole stream)."""
    many = getattr(config, "filter_subjects", None)
    if many:
        return list(many)
    one = getattr(config, "filter_subject", None)
    return [one] if one else [">"]


def _covers(filters: list[str], subject: str) -> bool:
    """Whether any of ``filters`` (NATS wildcards ``*`` and ``>``) matches ``subject``."""
    tokens = subject.split(".")
    for pattern in filters:
        parts = pattern.split(".")
        for index, part in enumerate(parts):
            if part == ">":
                return index < len(tokens)
            if index >= len(tokens) or (part != "*" and part != tokens[index]):
                break
        else:
            if len(parts) == len(tokens):
                return True
    return False
