"""The daemon: streams, a supervisor full of endpoints, status, systemd, signals.

:class:`Daemon` runs one configuration and can swap in another (:meth:`Daemon.reload`);
:func:`serve` wires it to signals (SIGTERM/SIGINT: graceful shutdown; SIGHUP: reload the
file), to systemd's notify socket and to the open-files limit.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import platform
import resource
import signal
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Final

import trio

from .._version import __version__
from ..config import (
    Address,
    Config,
    ConfigError,
    HistoryConfig,
    StatusConfig,
    StreamConfig,
    format_size,
    load_config,
)
from ..spool import SpoolError, StreamHistory
from .backoff import Backoff
from .checks import check_config
from .credentials import nats_server_secrets, with_secrets
from .endpoints import Endpoint, EndpointContext, Transports, make_endpoint, start_order
from .history import ArrivalClock, HistoryWriter
from .metrics import DaemonMetrics
from .nats import EmbeddedNatsServer, with_embedded_servers
from .notify import SystemdNotifier
from .rates import RateMeter, history_points
from .statedir import default_history_dir
from .status import StatusServer, build_snapshot
from .stream import StreamRegistry, watch_holds
from .supervisor import StartFailed, Supervisor, unwrap_error
from .transport import open_listeners

__all__ = ["Daemon", "DaemonStartFailed", "ReloadRefused", "raise_open_files_limit", "serve"]


class ReloadRefused(Exception):
    """A reload was not applied: new or changed endpoints could not take their resources.

    ``problems`` has one ``path: reason`` line each. With ``restored`` the new configuration
    had begun and the previous one was restored (clients of the changed endpoints were
    disconnected); otherwise nothing was touched.
    """

    def __init__(self, problems: list[str], *, restored: bool = False) -> None:
        what = (
            "reload failed; the previous configuration was restored"
            if restored
            else "reload refused; still running the previous configuration, untouched"
        )
        super().__init__("\n  ".join([f"{what}:", *problems]))
        self.problems = problems
        self.restored = restored


class DaemonStartFailed(Exception):
    """Endpoints could not take their local resources at start: the daemon is not ready.

    Each failure was logged as one line; ``failures`` has them, in start order.
    """

    def __init__(self, failures: list[StartFailed]) -> None:
        names = ", ".join(failure.name for failure in failures)
        super().__init__(f"{len(failures)} endpoint(s) cannot start: {names}")
        self.failures = failures


log = logging.getLogger("framewire.daemon")

#: Seconds between updates of systemd's STATUS= line.
STATUS_INTERVAL = 5.0
#: The longest shutdown waits for the history writers to write what they hold (seconds).
HISTORY_CLOSE_TIMEOUT = 10.0


class Daemon:
    """Runs one configuration until shutdown is requested.

    ``await nursery.start(daemon.run)`` returns once every endpoint is bound (or has failed
    its first attempt and is being retried in the background) and then tells systemd
    ``READY=1``. :meth:`request_shutdown` starts a graceful shutdown: endpoints stop
    accepting, clients get their queued frames within ``daemon.grace_period``, then
    everything is closed and :meth:`run` returns.
    """

    def __init__(
        self,
        config: Config,
        *,
        source: str = "<embedded default>",
        config_path: Path | None = None,
        transports: Transports | None = None,
        notifier: SystemdNotifier | None = None,
    ) -> None:
        self.config = config
        self.source = source
        self.config_path = config_path
        self.streams = StreamRegistry()
        self.streams.configure(config.streams)
        _make_configured_streams(self.streams, config)
        self.context = EndpointContext(self.streams, transports or Transports())
        self.supervisor = Supervisor(config.daemon.restart)
        self.notifier = notifier or SystemdNotifier(None)
        self.started_at = time.time()
        self.state = "starting"
        self.last_reload: dict[str, Any] | None = None
        #: Reloads from the file (SIGHUP) so far, by outcome: "ok", "failed".
        self.reloads: dict[str, int] = {"ok": 0, "failed": 0}
        self.rates = RateMeter()
        self.metrics = DaemonMetrics(self, self._metrics_max_clients)
        self.status_server: StatusServer | None = None
        #: The nats-server started for ``[nats] embedded = true``, else None.
        self.nats_server: EmbeddedNatsServer | None = None
        if config.nats is not None and config.nats.embedded:
            self.nats_server = EmbeddedNatsServer(
                nats_server_secrets(config.nats), config.daemon.restart
            )
        self._status_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._shutdown = trio.Event()
        self._running = trio.Event()
        self._reload_lock = trio.Lock()
        #: The writers of the streams that keep a history, by stream name.
        self.histories: dict[str, HistoryWriter] = {}

    @property
    def endpoints(self) -> dict[str, Endpoint[Any]]:
        return self.supervisor.endpoints

    def _metrics_max_clients(self) -> int:
        status = self.config.status
        return status.metrics_max_clients if status is not None else 0

    def request_shutdown(self) -> None:
        self._shutdown.set()

    def summary(self) -> str:
        """One line for systemd's STATUS=."""
        endpoints = self.endpoints.values()
        clients = sum(len(e.status.clients) for e in endpoints)
        failing = sum(1 for e in endpoints if e.status.state == "restarting")
        text = f"{len(endpoints)} endpoints, {clients} connections"
        if failing:
            text += f", {failing} restarting"
        if self.status_server is not None and self.status_server.state == "restarting":
            text += ", status websocket restarting"
        return text

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start every endpoint, say READY, run until :meth:`request_shutdown`, shut down.

        Raises :class:`DaemonStartFailed` (before anything is reported ready) when endpoints
        cannot take their local resources; those that did start are stopped again. A secret
        file that cannot be read (:mod:`framewire.daemon.credentials`) fails the start
        before anything is started.
        """
        self.config, problems = with_secrets(self.config)
        failures: list[StartFailed] = []
        for problem in problems:
            failures.append(StartFailed(problem.owner, str(problem)))
            what = "status websocket" if problem.owner == "status" else f"endpoint {problem.owner}"
            log.error("%s cannot start: %s", what, problem)
        if failures:
            self.state = "failed"
            names = ", ".join(dict.fromkeys(failure.name for failure in failures))
            await self.notifier.status(f"cannot start: {names}")
            raise DaemonStartFailed(failures)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.supervisor.run)
            failures += await self._open_histories(nursery)
            if self.nats_server is not None:
                # First, so that nats endpoints find it; READY=1 waits for it like the rest.
                try:
                    await nursery.start(self.nats_server.run)
                except StartFailed as failure:
                    failures.append(failure)
                self.config = self._with_embedded_nats(self.config)
            for name, endpoint_config in start_order(self.config.endpoints):
                try:
                    await self.supervisor.start_endpoint(
                        make_endpoint(name, endpoint_config, self.context), retry_first=False
                    )
                except StartFailed as failure:
                    failures.append(failure)
            try:
                await self._start_status(self.config.status)
            except StartFailed as failure:
                failures.append(failure)
            if failures:
                # Not ready: say why, stop what did start; the caller exits non-zero.
                self.state = "failed"
                names = ", ".join(failure.name for failure in failures)
                await self.notifier.status(f"cannot start: {names}")
                await self.supervisor.stop_all(0)
                await self._stop_nats_server()
                await self._close_histories()
                nursery.cancel_scope.cancel()
            else:
                await self._serve(nursery, task_status)
        if failures:
            raise DaemonStartFailed(failures)
        self.state = "stopped"
        log.info("stopped")

    async def _serve(self, nursery: trio.Nursery, task_status: trio.TaskStatus[None]) -> None:
        if self.notifier.watchdog_interval is not None:
            self.supervisor.start_task(self._watchdog, self.notifier.watchdog_interval)
        self.supervisor.start_task(self._return_memory, heap_trimmer())
        if self.notifier.enabled:
            self.supervisor.start_task(self._report_status)
        # Log the streams held back by a lossless consumer for longer than a second.
        self.supervisor.start_task(watch_holds, self.streams)
        self.state = "running"
        log.info(
            "framewire %s running %d endpoints from %s",
            __version__,
            len(self.config.endpoints),
            self.source,
        )
        await self.notifier.ready(self.summary())
        self._running.set()
        task_status.started()
        await self._shutdown.wait()
        self.state = "stopping"
        await self.notifier.stopping()
        grace = self.config.daemon.grace_period
        log.info("shutting down (grace period %gs)", grace)
        await self.supervisor.stop_all(grace)
        # Last: the nats endpoints have drained into it by now.
        await self._stop_nats_server()
        await self._close_histories()
        nursery.cancel_scope.cancel()

    async def _open_histories(self, nursery: trio.Nursery) -> list[StartFailed]:
        """Open the history of every stream that keeps one and start its writer; a history
        that cannot be opened (locked by another daemon, not writable) is a failure to
        start, named ``streams.NAME.history``."""
        failures: list[StartFailed] = []
        for name, stream_config in self.config.streams.items():
            if stream_config.history is not None:
                failure = await self._open_history(name, stream_config, nursery)
                if failure is not None:
                    failures.append(failure)
        return failures

    async def _open_history(
        self, name: str, stream_config: StreamConfig, nursery: trio.Nursery
    ) -> StartFailed | None:
        """Open the history of stream ``name`` and start its writer in ``nursery``; or log
        why it cannot be opened and return that."""
        config = stream_config.history
        assert config is not None
        path = Path(config.path) if config.path is not None else default_history_dir(name)
        try:
            history = await trio.to_thread.run_sync(
                partial(
                    StreamHistory.open,
                    path,
                    max_bytes=config.max_bytes,
                    max_age=config.max_age,
                    run_starts=frozenset(stream_config.run_starts),
                )
            )
        except (SpoolError, OSError) as exc:
            log.error("streams.%s.history cannot open %s: %s", name, path, exc)
            return StartFailed(f"streams.{name}.history", str(exc))
        writer = HistoryWriter(
            name, history, max_queue_bytes=config.max_queue_bytes, clock=ArrivalClock()
        )
        stats = history.stats()
        log.info(
            "stream %r keeps its history in %s (%d segments, %d bytes kept)",
            name,
            path,
            stats.segments,
            stats.bytes,
        )
        self.streams.get(name).history = writer
        self.histories[name] = writer
        nursery.start_soon(writer.run)
        return None

    async def _close_history(self, name: str) -> None:
        """Stop the writer of stream ``name``'s history: it writes what is queued (within
        :data:`HISTORY_CLOSE_TIMEOUT`) and closes."""
        writer = self.histories.pop(name)
        self.streams.get(name).history = None
        writer.stop()
        with trio.move_on_after(HISTORY_CLOSE_TIMEOUT):
            await writer.finished.wait()

    async def _reload_histories(self, old: Config, config: Config) -> list[str]:
        """Apply the history settings of a reload; one line per stream whose history
        changed. Bounds (``max_bytes``, ``max_age``, ``max_queue_bytes``) and ``run_starts``
        apply in place; a history added is opened, one removed is closed (its files stay),
        one whose ``path`` changed is closed and the new one opened. A history that cannot
        be opened is logged and said in the line; the rest of the reload stands."""
        changes: list[str] = []
        names = dict.fromkeys([*old.streams, *config.streams])
        for name in names:
            before = old.streams.get(name)
            after = config.streams.get(name)
            was = before.history if before is not None else None
            now = after.history if after is not None else None
            run_starts = after.run_starts if after is not None else ()
            writer = self.histories.get(name)
            if was == now and (
                writer is None or writer.history.run_starts == frozenset(run_starts)
            ):
                continue
            if now is None:
                if writer is not None:
                    path = writer.history.path
                    await self._close_history(name)
                    changes.append(f"history of stream {name} removed (its files stay in {path})")
                continue
            assert after is not None
            if writer is not None and was is not None and was.path == now.path:
                try:
                    await writer.set_bounds(
                        max_bytes=now.max_bytes,
                        max_age=now.max_age,
                        max_queue_bytes=now.max_queue_bytes,
                        run_starts=frozenset(run_starts),
                    )
                except SpoolError as exc:  # pragma: no cover - closed only when stopping
                    changes.append(f"history of stream {name} unchanged: {exc}")
                    continue
                changes.append(f"history of stream {name} changed in place ({_bounds(was, now)})")
                continue
            if writer is not None:
                await self._close_history(name)
            assert self._nursery is not None
            failure = await self._open_history(name, after, self._nursery)
            if failure is not None:
                changes.append(f"history of stream {name} cannot open: {failure.reason}")
            else:
                changes.append(f"history of stream {name} {'moved' if writer else 'added'}")
        return changes

    async def _close_histories(self) -> None:
        """Stop the streams' history writers: each writes what is queued and closes."""
        for name, writer in self.histories.items():
            self.streams.get(name).history = None
            writer.stop()
        with trio.move_on_after(HISTORY_CLOSE_TIMEOUT):
            for writer in self.histories.values():
                await writer.finished.wait()

    def _with_embedded_nats(self, config: Config) -> Config:
        """``config`` with the embedded server as the ``servers`` of nats endpoints giving
        none (unchanged without an embedded server, or before its port is known)."""
        server = self.nats_server
        if server is None or server.url is None:
            return config
        return with_embedded_servers(config, server.url)

    async def _stop_nats_server(self) -> None:
        if self.nats_server is not None:
            await self.nats_server.stop()

    async def _return_memory(self, trim: Callable[[], object] | None) -> None:
        """Every :data:`HEAP_TRIM_INTERVAL`: free the garbage in reference cycles (a full
        collection), then give the heap's free memory back to the system (``trim``, None
        where the allocator has none).

        The collector's own thresholds are set so high (:func:`tune_garbage_collector`)
        that, left to itself, it would free cyclic garbage that reached its oldest
        generation almost never, and a quiet daemon none at all: each trim would then find
        little to give back. The collection costs a few milliseconds, up to about 30 with
        deep queues, once per interval.
        """
        while True:
            await trio.sleep(HEAP_TRIM_INTERVAL)
            gc.collect()
            if trim is not None:
                trim()

    async def _watchdog(self, interval: float) -> None:
        """``WATCHDOG=1`` every ``interval`` seconds while the supervisor runs.

        It runs inside the supervisor's nursery, so a dead or wedged supervisor (or event
        loop) stops the pings and systemd restarts the service.
        """
        while True:
            await self.notifier.watchdog()
            await trio.sleep(interval)

    async def _report_status(self) -> None:
        """Keep systemd's STATUS= line (``systemctl status``) current, when it changes."""
        last = self.summary()  # what READY=1 carries
        while True:
            await trio.sleep(STATUS_INTERVAL)
            summary = self.summary()
            if summary != last and self.state == "running":
                await self.notifier.status(summary)
                last = summary

    async def _start_status(self, config: StatusConfig | None) -> None:
        """(Re)start the status server for ``config`` (None: stop it) and return once it
        listens. Raises :class:`StartFailed` (after one log line) if it cannot listen."""
        if self._status_scope is not None:
            self._status_scope.cancel()
            self._status_scope = self.status_server = None
        if config is None or self._nursery is None:
            return
        server = StatusServer(
            lambda: build_snapshot(self, self.rates),
            host=config.listen.host or "",
            port=config.listen.port,
            interval=config.interval,
            token=config.token,
            max_clients=config.max_clients,
            tick=lambda: self.rates.sample(self.endpoints, time.time()),
            metrics=self.metrics.exposition,
            history=self.rates.history,
        )
        self.rates.keep_history(history_points(config.interval))
        self.status_server = server
        self._status_scope = trio.CancelScope()
        await self._nursery.start(self._supervise_status, server, config, self._status_scope)
        if server.state == "stopped" and server.last_error is not None:
            raise StartFailed("status", server.last_error)

    async def _supervise_status(
        self,
        server: StatusServer,
        config: StatusConfig,
        scope: trio.CancelScope,
        *,
        task_status: trio.TaskStatus[None],
    ) -> None:
        """Run ``server`` in ``scope`` like an endpoint: if it fails after it started (its
        listener broke), log one line, show it in status, and start it again after a backoff
        delay with jitter (``daemon.restart``). A failure to listen at the first start is
        logged and the daemon runs on without status. Nothing reaches the daemon's nursery."""
        backoff = Backoff(self.config.daemon.restart)
        reported = False
        with scope:
            while True:
                began = trio.current_time()
                try:
                    async with trio.open_nursery() as nursery:
                        await nursery.start(server.run)
                        if not reported:
                            task_status.started()
                            reported = True
                except Exception as exc:
                    if not reported:
                        error = unwrap_error(exc)
                        reason = error.strerror if isinstance(error, OSError) else None
                        server.last_error = f"cannot listen on {config.listen}: {reason or error}"
                        log.error("status websocket unavailable: %s", server.last_error)
                        server.state = "stopped"
                        task_status.started()
                        return
                    error = unwrap_error(exc)
                    server.last_error = f"{type(error).__name__}: {error}"
                    server.restarts += 1
                    if trio.current_time() - began >= self.config.daemon.restart.stable_after:
                        backoff.reset()
                    delay = backoff.next_delay()
                    server.state = "restarting"
                    log.error(
                        "status websocket failed: %s; restarting in %.1fs", server.last_error, delay
                    )
                    log.debug("status websocket failure", exc_info=exc)
                    await trio.sleep(delay)
                else:
                    return  # run() only returns when cancelled

    async def reload(self, config: Config) -> list[str]:
        """Switch to ``config``; return what changed, one line per endpoint touched.

        As nginx does it: the reload is applied only if every new or changed endpoint can
        take its local resources. First they are checked (certificates, files, directories,
        overlapping listeners, and a trial bind of every address no running endpoint holds);
        if any cannot, :class:`ReloadRefused` is raised and nothing was touched. Then
        endpoints whose configuration is unchanged keep running and keep their clients;
        so do changed ones whose changes are all to fields they take live
        (:attr:`Endpoint.live_fields`: bounds, decimation, timeouts...), which are applied to
        the running endpoint and its clients (``changed in place NAME (field old -> new,
        ...)``) once everything else succeeded; other changed and removed ones are stopped
        (their clients get what is queued, within the grace period); those changed and new
        ones are started. A changed endpoint on the same
        address hands its listening socket to its successor, so the address never stops
        accepting. Should a start still fail, the previous configuration is restored and
        :class:`ReloadRefused` says why. Secret files (``token_file``, ``password_file``) are
        read again first: one that cannot be read refuses the reload; a changed one changes
        the endpoint (or status) that uses it, which is restarted.
        """
        async with self._reload_lock:
            old = self.config
            # Secret files are read again: a changed one changes what uses it.
            config, secret_problems = with_secrets(config)
            if secret_problems:
                raise ReloadRefused([str(problem) for problem in secret_problems])
            if config.nats != old.nats:
                raise ReloadRefused(
                    [
                        "nats: changes to [nats] (the embedded nats-server) take effect when "
                        "framewire restarts (restart the service)"
                    ]
                )
            config = self._with_embedded_nats(config)
            live = self._live_changes(old, config)
            touched = [
                name
                for name, endpoint_config in config.endpoints.items()
                if old.endpoints.get(name) != endpoint_config and name not in live
            ]
            leaving = [
                name
                for name, endpoint_config in old.endpoints.items()
                if config.endpoints.get(name) != endpoint_config and name not in live
            ]
            # The addresses of endpoints about to stop are held for their successors (and
            # so need no trial bind: they are ours).
            transports = self.context.transports
            for name in leaving:
                address = getattr(old.endpoints[name], "listen", None)
                if isinstance(address, Address):
                    transports.hold(address)
            try:
                problems = await self._preflight(config, touched, list(live))
                if problems:
                    raise ReloadRefused(problems)
                return await self._apply(old, config, touched, leaving, live)
            finally:
                await transports.release()

    def _live_changes(self, old: Config, config: Config) -> dict[str, list[str]]:
        """The running endpoints whose change to ``config`` can be applied in place, each
        with its changes (see :meth:`Endpoint.live_changes`)."""
        live: dict[str, list[str]] = {}
        for name, endpoint_config in config.endpoints.items():
            endpoint = self.endpoints.get(name)
            if endpoint is None or old.endpoints.get(name) in (None, endpoint_config):
                continue
            changes = endpoint.live_changes(endpoint_config)
            if changes is not None:
                live[name] = changes
        return live

    async def _preflight(self, config: Config, touched: list[str], live: list[str]) -> list[str]:
        """What would stop the new or changed endpoints from starting (or the ones changed
        in place from taking their new settings), one line each."""
        problems: list[str] = []
        if touched or live:
            problems += await self._check_endpoints(config, touched + live)
        return problems + await self._trial_binds(config, touched)

    async def _check_endpoints(self, config: Config, touched: list[str]) -> list[str]:
        report = await trio.to_thread.run_sync(check_config, config)
        prefixes = tuple(f"endpoints.{name}." for name in touched)
        return [
            line
            for line in report.errors
            if line.startswith(prefixes) or not line.startswith("endpoints.")
        ]

    async def _trial_binds(self, config: Config, touched: list[str]) -> list[str]:
        """Bind every new address nothing of ours holds, and let go at once: a port another
        program holds is found before anything is touched."""
        problems: list[str] = []
        transports = self.context.transports
        old_status, new_status = self.config.status, config.status
        if (
            new_status is not None
            and new_status.listen.port
            and (old_status is None or old_status.listen != new_status.listen)
        ):
            problem = await _cannot_bind(new_status.listen)
            if problem is not None:
                problems.append(f"status.listen: {problem}")
        for name in touched:
            address = getattr(config.endpoints[name], "listen", None)
            if not isinstance(address, Address) or transports.holds(address):
                continue
            if not address.is_unix and address.port == 0:
                continue
            problem = await _cannot_bind(address)
            if problem is not None:
                problems.append(f"endpoints.{name}.listen: {problem}")
        return problems

    async def _apply(
        self,
        old: Config,
        config: Config,
        touched: list[str],
        leaving: list[str],
        live: dict[str, list[str]],
    ) -> list[str]:
        grace = old.daemon.grace_period
        changes: list[str] = []
        for name in leaving:
            await self._retire(name, grace)
            changes.append(f"{'removed' if name not in config.endpoints else 'changed'} {name}")
        self.config = config
        self.supervisor.restart = config.daemon.restart
        failures: list[StartFailed] = []
        started: list[str] = []
        for name, endpoint_config in start_order(config.endpoints):
            if name not in touched:
                continue
            try:
                await self.supervisor.start_endpoint(
                    make_endpoint(name, endpoint_config, self.context), retry_first=False
                )
            except StartFailed as failure:
                failures.append(failure)
                continue
            started.append(name)
            if name not in old.endpoints:
                changes.append(f"added {name}")
        if failures:
            # Back to the previous configuration: what started goes, what left comes back.
            for name in started:
                await self._retire(name, 0)
            self.config = old
            self.supervisor.restart = old.daemon.restart
            for name, endpoint_config in start_order(old.endpoints):
                if name in leaving:
                    await self.supervisor.start_endpoint(
                        make_endpoint(name, endpoint_config, self.context)
                    )
            raise ReloadRefused(
                [f"endpoints.{failure.name}: {failure.reason}" for failure in failures],
                restored=True,
            )
        _make_configured_streams(self.streams, config)
        if config.streams != old.streams:
            self.streams.configure(config.streams)
            changes.append("stream settings")
            changes += await self._reload_histories(old, config)
        for name, lines in live.items():
            # Once nothing can fail: the endpoint and its clients take the new values.
            self.endpoints[name].reconfigure(config.endpoints[name])
            changes.append(f"changed in place {name} ({', '.join(lines)})")
        if config.status != old.status:
            try:
                await self._start_status(config.status)
            except StartFailed as failure:  # a race the trial bind could not see; logged
                changes.append(f"status unavailable: {failure.reason}")
            else:
                changes.append("restarted status")
        logging.getLogger("framewire").setLevel(config.daemon.log_level.upper())
        return changes

    async def _retire(self, name: str, grace: float) -> None:
        """Stop endpoint ``name`` for good (a reload changed or removed it); its final
        counters go on in /metrics under its name."""
        endpoint = self.endpoints.get(name)
        await self.supervisor.stop_endpoint(name, grace)
        if endpoint is not None:
            self.metrics.retire(name, endpoint)

    async def reload_from_file(self) -> bool:
        """Reload from :attr:`config_path` (SIGHUP). On any error keep the running config.

        The outcome is logged and kept in :attr:`last_reload` for status. Returns success.
        """
        await self._running.wait()
        if self.state != "running":
            return False
        await self.notifier.reloading()
        self.state = "reloading"
        started = time.time()
        try:
            if self.config_path is None:
                raise ConfigError(self.source, ["nothing to reload: running the embedded default"])
            config = load_config(self.config_path)
        except ConfigError as exc:
            self.last_reload = {"time": round(started, 3), "ok": False, "error": str(exc)}
            log.error("reload failed; still running the previous configuration:\n%s", exc)
            ok = False
        else:
            try:
                changes = await self.reload(config)
            except ReloadRefused as refused:
                self.last_reload = {"time": round(started, 3), "ok": False, "error": str(refused)}
                log.error("%s", refused)
                ok = False
            else:
                self.last_reload = {"time": round(started, 3), "ok": True, "changes": changes}
                log.info("reloaded %s: %s", self.source, "; ".join(changes) or "nothing changed")
                ok = True
        self.reloads["ok" if ok else "failed"] += 1
        self.state = "running"
        await self.notifier.ready(
            self.summary()
            if ok
            else f"reload failed, running the previous config; {self.summary()}"
        )
        return ok


def _make_configured_streams(streams: StreamRegistry, config: Config) -> None:
    """Make every stream ``config`` names (``[streams.NAME]``, and each endpoint's
    ``stream``, ``publish`` and ``subscribe``) now, not when its first producer or client
    comes: status and the dashboard list a stream that has seen no traffic yet."""
    names = list(config.streams)
    for endpoint in config.endpoints.values():
        for field in ("stream", "publish", "subscribe"):
            name = getattr(endpoint, field, None)
            if isinstance(name, str):
                names.append(name)
    for name in names:
        streams.get(name)


async def _cannot_bind(address: Address) -> str | None:
    """Why listening on ``address`` fails right now (a trial bind, let go at once), or None."""
    try:
        for listener in await open_listeners(address):
            await listener.aclose()
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def tune_garbage_collector() -> None:
    """Make the cyclic garbage collector cheap for a process full of queued frames.

    Every queued Frame is tracked by the collector, and with deep queues the default
    thresholds spent a third of the relay's CPU walking them (30 ms full collections). Frames
    form no reference cycles, so collecting rarely loses nothing: objects made at startup are
    frozen out of its way, and a collection runs after 100,000 net allocations instead of 700.
    What a connection holds must be freed by reference counting when it closes (no cycles:
    tests/test_client_memory.py); cyclic garbage that slips through anyway waits at most
    :data:`HEAP_TRIM_INTERVAL` for the full collection before each heap trim.
    """
    gc.freeze()
    gc.set_threshold(100_000, 20, 100)


#: Seconds between two returns of the heap's free memory to the system.
HEAP_TRIM_INTERVAL: Final = 30.0


def heap_trimmer() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)``: give the free memory of the heap back to the system
    (whole free pages anywhere in it, not only at its top). None elsewhere.

    The allocator keeps up to 128 MiB of freed buffers for reuse (see
    :func:`tune_memory_allocator`); after a burst (a flood of connections, each with its
    receive buffer) that memory would stay with the process for good. Trimming every
    :data:`HEAP_TRIM_INTERVAL` seconds (after a full garbage collection) returns it, at the
    cost of a few milliseconds and of faulting pages in again for the next burst.
    """
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        trim: Callable[[int], object] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return lambda: trim(0)


def tune_memory_allocator() -> bool:
    """Let glibc's malloc keep and reuse large frame buffers instead of mapping each anew.

    By default every buffer over 128 KiB is a fresh mmap: a 1 MiB frame cost about 45 page
    faults and its pages zeroed by the kernel, then unmapped when the frame was delivered.
    Serving buffers up to 32 MiB from the heap, and trimming the heap only when 128 MiB are
    free at its top, cut the relay's CPU per 1 MiB frame by about a third (benchmarks/relay.py).
    The cost: up to 128 MiB of freed memory may stay with the process. Only on glibc; returns
    whether the settings took.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 128 << 20))


def raise_open_files_limit(needed: int) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; warn if it is below ``needed``.

    Returns the (soft, hard) limits now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, target, exc)
    if soft < needed:
        log.warning(
            "the open-files limit (%d) is below what the configured max_clients may need (%d); "
            "raise LimitNOFILE (systemd) or ulimit -n",
            soft,
            needed,
        )
    return soft, hard


async def serve(config: Config, source: str, config_path: Path | None = None) -> None:
    """Run ``config`` until SIGINT or SIGTERM, then shut down gracefully.

    SIGHUP reloads ``config_path``. A second SIGINT/SIGTERM during the grace period stops at
    once. Talks to systemd when ``NOTIFY_SOCKET`` is set. Raises :class:`DaemonStartFailed`,
    without having said READY, when endpoints cannot take their local resources.
    """
    raise_open_files_limit(config.required_descriptors())
    tune_garbage_collector()
    tune_memory_allocator()
    notifier = SystemdNotifier.from_environment()
    daemon = Daemon(config, source=source, config_path=config_path, notifier=notifier)
    failed: DaemonStartFailed | None = None
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:

                async def watch_signals() -> None:
                    stopping = False
                    async for signum in signals:
                        name = signal.Signals(signum).name
                        if signum == signal.SIGHUP:
                            if not stopping:
                                log.info("received SIGHUP: reloading %s", source)
                                nursery.start_soon(daemon.reload_from_file)
                        elif not stopping:
                            log.info("received %s", name)
                            stopping = True
                            daemon.request_shutdown()
                        else:
                            log.warning("received %s again; stopping now", name)
                            nursery.cancel_scope.cancel()

                nursery.start_soon(watch_signals)
                try:
                    await daemon.run()
                except DaemonStartFailed as exc:
                    failed = exc
                nursery.cancel_scope.cancel()
    finally:
        notifier.close()
    if failed is not None:
        raise failed


def _bounds(was: HistoryConfig, now: HistoryConfig) -> str:
    """What a reload changed of a history's settings, ``field old -> new`` each."""
    lines = []
    for field in ("max_bytes", "max_age", "max_queue_bytes"):
        before, after = getattr(was, field), getattr(now, field)
        if before != after:
            if field == "max_age":
                lines.append(f"max_age {_age(before)} -> {_age(after)}")
            else:
                lines.append(f"{field} {format_size(before)} -> {format_size(after)}")
    return ", ".join(lines) or "run_starts"


def _age(seconds: float | None) -> str:
    return "none" if seconds is None else f"{seconds:g}s"
