"""The ``framewire`` command: run | check | recv | send | status.

Options and positional arguments may come in any order (``framewire send ADDRESS --protocol
raw FILE``). Every failure a user can cause or meet (a bad flag or address, a missing file,
nothing listening, a refused token, a failed TLS handshake) ends the command with ONE line on
stderr saying what failed, why and what to try, and a non-zero exit status: 2 for bad usage
or a bad configuration, 1 for the rest. A traceback means a bug.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import io
import json
import logging
import os
import re
import signal
import ssl
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Final, NoReturn, TextIO
from urllib.parse import urlsplit, urlunsplit

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    ConnectionTimeout,
    DisconnectionTimeout,
    HandshakeError,
    open_websocket_url,
)

from . import protocols
from ._logging import LOG_FORMATS, LogFormat, setup_logging, stderr_is_journal
from ._version import __version__
from .client import RewindRefused, gap_of, rewind_answer, rewind_request
from .config import (
    Address,
    BackoffConfig,
    Config,
    ConfigError,
    KeyPositions,
    TLSConfig,
    default_config_text,
    format_size,
    key_positions,
    load_config,
    parse_address,
    parse_config,
    parse_duration,
)
from .daemon.backoff import Backoff
from .daemon.flow import receive_frames
from .daemon.transport import (
    Connection,
    Connector,
    TLSListener,
    bound_addresses,
    client_tls_context,
    connector_for,
    open_listeners,
    server_tls_context,
    tls_connector,
)
from .frame import Frame
from .protocols import native

__all__ = ["Failure", "build_parser", "main", "render_status", "status_url", "terminal_width"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

#: Connecting (and a TLS handshake) gives up after this many seconds.
CONNECT_TIMEOUT: Final = 10.0
#: Seconds ``framewire send`` waits after its last frame for a TLS server to close, and so to
#: show that it accepted us (a TLS 1.3 server may refuse our certificate that late).
CLOSE_PATIENCE: Final = 10.0
#: The status server sends a snapshot at least this often, or it is considered gone.
STATUS_SILENCE: Final = 30.0
#: The status server ``framewire status`` and ``reload`` read without a URL: the demo's.
STATUS_URL: Final = "ws://127.0.0.1:8765/"
#: The environment variable ``framewire status`` takes the token from.
TOKEN_VARIABLE: Final = "FRAMEWIRE_STATUS_TOKEN"
#: ``status --watch`` waits between reconnect attempts: 0.5 s doubling up to 5 s, jittered.
WATCH_BACKOFF: Final = BackoffConfig(initial=0.5, maximum=5.0, factor=2.0, stable_after=0.0)


class Failure(Exception):
    """A failure the command reports as one line on stderr, exiting with ``code``; the line
    starts with ``framewire COMMAND:`` unless ``prefixed`` is False (the message then names
    its subject first, as a configuration error names its file)."""

    def __init__(self, message: str, code: int = EXIT_FAILURE, *, prefixed: bool = True) -> None:
        super().__init__(message)
        self.code = code
        self.prefixed = prefixed


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


class _CommandParser(_Parser):
    """A subcommand's parser: options and positional arguments in any order
    (``framewire send ADDRESS --protocol raw FILE``)."""

    _intermixing = False

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        # The top-level parser hands a subcommand its arguments through parse_known_args;
        # parse_known_intermixed_args calls it again, plainly, for each of its two passes.
        if self._intermixing:
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def _reason(exc: BaseException) -> str:
    """The most telling short reason in ``exc``, its causes and (for exception groups) their
    members: ``connection refused`` for an OSError with an errno, else the first message."""
    queue: list[BaseException] = [exc]
    seen: set[int] = set()
    fallback = ""
    while queue:
        current = queue.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return f"certificate verify failed: {current.verify_message}"
        if isinstance(current, ssl.SSLError):
            return _tls_reason(current)
        if isinstance(current, OSError) and current.errno in errno.errorcode:
            text = os.strerror(current.errno or 0)
            return text[:1].lower() + text[1:]
        if not fallback and str(current):
            fallback = str(current)
        if isinstance(current, BaseExceptionGroup):
            queue.extend(current.exceptions)
        if current.__cause__ is not None:
            queue.append(current.__cause__)
        elif current.__context__ is not None and not current.__suppress_context__:
            queue.append(current.__context__)
    return fallback or type(exc).__name__


def _tls_reason(error: ssl.SSLError) -> str:
    """What a TLS error means to someone running ``framewire recv`` or ``send`` (an
    SSLError's errno is OpenSSL's, not the OS's: never read it as one)."""
    reason = str(error.reason or error).upper()
    if "CERTIFICATE_REQUIRED" in reason or "PEER_DID_NOT_RETURN_A_CERTIFICATE" in reason:
        return "the server requires a client certificate: give --cert and --key"
    if any(word in reason for word in ("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN")):
        return (
            "the server refused our client certificate (not signed by a CA it trusts, or "
            "not for this use): check --cert and --key"
        )
    if isinstance(error, ssl.SSLEOFError) or "EOF" in reason:
        return "the server closed the TLS connection without saying why"
    if "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER_FAILURE" in reason:
        return "the server does not speak TLS there: use tcp://"
    return f"TLS: {(error.reason or str(error)).lower().replace('_', ' ')}"


class _TLSVerdict:
    """What a TLS server says of a client that only sends (``framewire send``).

    A TLS 1.3 server judges the client's certificate after the client thinks the handshake
    done, so its refusal (an alert) comes while we send, or after we have sent everything.
    Only a receive that is already waiting when a write breaks can read it (a broken
    SSLStream reads nothing more), so :meth:`listen` waits in one from the start; and
    :meth:`confirm` waits for the server's close, which comes after its alert if it sent
    one. None of them raises: each says what it heard."""

    def __init__(self, stream: trio.SSLStream[trio.abc.Stream]) -> None:
        self._stream = stream
        self._listening = trio.CancelScope()
        self._done = trio.Event()
        self._closed = False  # the server's close_notify came
        self._broken: trio.BrokenResourceError | None = None

    async def listen(self) -> None:
        """Read (and drop: a receiver sends a sender nothing) until the server closes, the
        connection breaks (its refusal, or a reset), or :meth:`confirm` stops us."""
        # trio's SSLStream stays usable after a cancelled receive unless a handshake was
        # in progress, and ours was done before we were started (the connector waits).
        with self._listening:
            try:
                while await self._stream.receive_some():
                    pass
                self._closed = True
            except trio.BrokenResourceError as exc:
                self._broken = exc
        self._done.set()

    async def after_break(self) -> trio.BrokenResourceError | None:
        """After a write broke: how the connection broke as our reader saw it (a TLS alert
        in its cause if the server refused us). What broke the write came after the alert,
        so the alert is read at once; the wait is a last guard."""
        with trio.move_on_after(CONNECT_TIMEOUT):
            await self._done.wait()
        return self._broken

    async def confirm(self, patience: float, *, ended: bool) -> trio.BrokenResourceError | bool:
        """After the last write: wait up to ``patience`` seconds for the server to close.
        After an end-of-stream marker (``ended``) a framewire receiver closes by itself;
        otherwise we close our side of TLS first (close_notify). True when the server
        closed (it had read all we sent), False when it did not in time, the error when
        the connection broke (a TLS alert in its cause if the server refused us)."""
        with trio.move_on_after(patience):
            if ended:
                await self._done.wait()
            else:
                self._listening.cancel()
                await self._done.wait()
                if not self._closed and self._broken is None:
                    try:
                        await self._stream.unwrap()
                    except trio.BrokenResourceError as exc:
                        self._broken = exc
            closed = self._broken
            # A server that closes without a close_notify (as framewire's receiver does)
            # had read all we sent, or its close would have been a reset.
            if closed is None or isinstance(closed.__cause__, ssl.SSLEOFError):
                return True
            return closed
        return False


def _refused(error: BaseException | None) -> ssl.SSLError | None:
    """The TLS alert behind ``error``, if the peer sent one (not a bare end of connection)."""
    cause = error.__cause__ if error is not None else None
    if isinstance(cause, ssl.SSLError) and not isinstance(cause, ssl.SSLEOFError):
        return cause
    return None


class _OutputClosed(Exception):
    """Whoever read our standard output stopped reading (``framewire status | head``)."""


def _show(text: str, *, flush: bool = False) -> None:
    """Print ``text`` on stdout; raise :class:`_OutputClosed` if stdout is a closed pipe."""
    try:
        print(text, flush=flush)
    except BrokenPipeError:
        raise _OutputClosed from None


def _run(function: Callable[..., Awaitable[int]], *args: Any) -> int:
    """``trio.run(function, *args)``, with a :class:`Failure` raised inside a nursery
    unwrapped from its exception group."""
    try:
        return trio.run(function, *args)
    except BaseExceptionGroup as group:
        failures, _ = group.split((Failure, _OutputClosed))
        if failures is not None:
            first: BaseException = failures
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None
        raise


# -- run, check ---------------------------------------------------------------------------


def _load(path: str | None) -> tuple[Config, str]:
    if path is None:
        return parse_config(default_config_text(), "<embedded default>"), "<embedded default>"
    return load_config(path), str(Path(path).absolute())


def _summary(config: Config) -> list[str]:
    lines = []
    for name, endpoint in config.endpoints.items():
        parts = []
        for key in ("listen", "connect", "path"):
            value = getattr(endpoint, key, None)
            if value is not None:
                parts.append(f"{key} {value}")
        if endpoint.kind == "generator":
            parts.append(f"{endpoint.rate:g} frames/s of {format_size(endpoint.size)}")
        protocol = getattr(endpoint, "protocol", None)
        if protocol is not None:
            parts.append(protocol)
        if endpoint.kind == "bridge" or endpoint.kind == "pubsub":
            parts.insert(0, f"{endpoint.role} {endpoint.address}")
        if endpoint.kind == "link" or endpoint.kind == "bridge":
            for key in ("publish", "subscribe"):
                value = getattr(endpoint, key)
                if value is not None:
                    parts.append(f"{key} {value!r}")
        else:
            parts.append(f"stream {endpoint.stream!r}")
        lines.append(f"  {name}: {endpoint.kind} " + ", ".join(parts))
    return lines


def _load_or_fail(path: str | None) -> tuple[Config, str]:
    try:
        return _load(path)
    except ConfigError as exc:
        raise _config_failure(exc.errors, path or exc.source, _positions(path)) from None


def _positions(path: str | None) -> KeyPositions | None:
    """Where the keys of the file at ``path`` are, or None if it cannot be read."""
    if path is None:
        return key_positions(default_config_text())
    try:
        return key_positions(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return None


#: Where tomllib says a syntax error is.
_TOML_AT: Final = re.compile(r" ?\(at line (\d+), column (\d+)\)$")


def _diagnostic(file: str, severity: str, problem: str, positions: KeyPositions | None) -> str:
    """``FILE:LINE:COLUMN: SEVERITY: PATH: MESSAGE`` for a ``PATH: MESSAGE`` problem of a
    configuration file (``FILE: SEVERITY: ...`` when it cannot be placed), as compilers write
    them and editors read them."""
    where = ""
    at = _TOML_AT.search(problem)
    if at is not None:
        where, problem = f"{at[1]}:{at[2]}", problem[: at.start()]
    else:
        path, colon, rest = problem.partition(": ")
        if colon and positions is not None and path and " " not in path:
            position = positions.locate(path, key=rest.startswith("unknown key"))
            where = "" if position is None else str(position)
    return f"{file}:{where}: {severity}: {problem}" if where else f"{file}: {severity}: {problem}"


def _sorted_diagnostics(
    file: str, severity: str, problems: Sequence[str], positions: KeyPositions | None
) -> list[str]:
    """Each problem as a diagnostic line, in the order of the file (unplaced ones first)."""
    lines = [_diagnostic(file, severity, problem, positions) for problem in problems]

    def place(line: str) -> tuple[int, int]:
        match = re.match(re.escape(file) + r":(\d+):(\d+): ", line)
        return (int(match[1]), int(match[2])) if match else (0, 0)

    return sorted(lines, key=place)


def _config_failure(problems: Sequence[str], file: str, positions: KeyPositions | None) -> Failure:
    """Every problem of a configuration file, one diagnostic line each."""
    lines = _sorted_diagnostics(file, "error", problems, positions)
    return Failure("\n".join(lines), EXIT_USAGE, prefixed=False)


def cmd_run(args: argparse.Namespace) -> int:
    config, source = _load_or_fail(args.config)
    log_format: LogFormat = args.log_format
    setup_logging(args.log_level or config.daemon.log_level, log_format)
    if args.config is None:
        lines = ["running the embedded demo (a generator feeding a server)."]
        for name, endpoint in config.endpoints.items():
            if endpoint.kind == "server":
                lines.append(f"{name}: connect with  framewire recv {endpoint.listen}")
        for line in lines:
            if log_format == "json":  # every line of stderr stays a JSON object
                logging.getLogger("framewire.cli").info("%s", line)
            else:
                print(f"framewire: {line}", file=sys.stderr)
    # The daemon and its checks load only for the commands that use them: the others
    # (status, recv, send, ...) start in a third of the time.
    from .daemon import DaemonStartFailed, serve

    try:
        trio.run(serve, config, source, Path(source) if args.config else None)
    except DaemonStartFailed as exc:  # each failure was logged as one line
        if log_format == "json":  # every line of stderr stays a JSON object
            logging.getLogger("framewire.cli").error("not started: %s", exc)
        else:  # under the journal, at priority 3 like the failures before it
            priority = "<3>" if stderr_is_journal() else ""
            print(f"{priority}framewire: not started: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:  # pragma: no cover - e.g. no signal support
        raise Failure(_reason(exc)) from None
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    file: str = args.config
    positions = _positions(file)
    try:
        config = load_config(file)
        errors: list[str] = []
    except ConfigError as exc:
        if exc.config is None:  # not a configuration at all: nothing more to check
            raise _config_failure(exc.errors, file, positions) from None
        config, errors = exc.config, exc.errors  # only the checks across tables failed
    from .daemon.checks import check_config

    report = check_config(config, config_file=file, offline=args.offline)
    # The machine's check of the listeners names every listener each one overlaps: it
    # replaces the file's own check of identical addresses.
    checked = {error.partition(": ")[0] for error in report.errors}
    errors = [error for error in errors if error.partition(": ")[0] not in checked]
    errors += report.errors
    priority = "<4>" if stderr_is_journal() else ""  # findable with journalctl -p warning
    for line in _sorted_diagnostics(file, "warning", report.warnings, positions):
        print(f"{priority}{line}", file=sys.stderr)
    if errors:
        raise _config_failure(errors, file, positions)
    count = len(config.endpoints)
    offline = " (offline: the file alone, not this machine)" if args.offline else ""
    print(f"{file}: OK, {count} endpoint{'s' if count != 1 else ''}{offline}")
    for line in _summary(config):
        print(line)
    return EXIT_OK


# -- recv, send ---------------------------------------------------------------------------


def _describe(frame: Frame) -> str:
    """One line per frame: kind, type, payload size in bytes, timestamp (ns since the epoch)."""
    payload = frame.payload
    size = payload.nbytes if isinstance(payload, memoryview) else len(payload)
    return f"{frame.kind.name:<8} {frame.type:<16} {size:>10} {frame.timestamp}"


def _address(text: str, *, listening: bool = False) -> Address:
    try:
        return parse_address(text, listening=listening)
    except ValueError as exc:
        raise Failure(str(exc), EXIT_USAGE) from None


def _tls_config(args: argparse.Namespace, address: Address, *, listening: bool) -> TLSConfig | None:
    """The TLS settings ``--ca``, ``--cert``, ``--key`` and ``--server-name`` make for
    ``address``: None unless it is ``tls://``. Raises :class:`Failure` for flags that do not
    fit the address."""
    flags = {"--ca": args.ca, "--cert": args.cert, "--key": args.key}
    flags["--server-name"] = args.server_name
    if address.scheme != "tls":
        given = [flag for flag, value in flags.items() if value is not None]
        if given:
            raise Failure(
                f"{', '.join(given)}: only for a tls:// address, not {address}", EXIT_USAGE
            )
        return None
    if (args.cert is None) != (args.key is None):
        raise Failure(
            "give both --cert and --key (a certificate and its key), or neither", EXIT_USAGE
        )
    if listening and args.cert is None:
        raise Failure(
            f"listening on {address} needs --cert and --key (the certificate senders verify)",
            EXIT_USAGE,
        )
    if listening and args.server_name is not None:
        raise Failure("--server-name: only for connecting", EXIT_USAGE)
    return TLSConfig(
        certificate=args.cert,
        key=args.key,
        ca=args.ca,
        require_client_cert=listening and args.ca is not None,
        server_name=args.server_name,
    )


async def _connect(args: argparse.Namespace, address: Address, hint: str) -> trio.abc.Stream:
    """Connect to ``address`` (TLS for ``tls://``, verified against ``--ca`` or the system's
    trust store). Raises :class:`Failure` saying why not."""
    tls = _tls_config(args, address, listening=False)
    connect: Connector = connector_for(address)
    if tls is not None:
        try:
            context = client_tls_context(tls)
        except ValueError as exc:
            raise Failure(str(exc)) from None
        connect = tls_connector(
            connect,
            context,
            address=address,
            server_name=tls.server_name,
            handshake_timeout=CONNECT_TIMEOUT,
        )
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            return await connect()
    except trio.TooSlowError:
        raise Failure(
            f"cannot connect to {address}: no answer within {CONNECT_TIMEOUT:g}s; {hint}"
        ) from None
    except OSError as exc:
        if str(exc).startswith("TLS handshake"):
            raise Failure(f"{exc}; check --ca and --server-name") from None
        raise Failure(f"cannot connect to {address}: {_reason(exc)}; {hint}") from None


async def _accept_one(args: argparse.Namespace, address: Address) -> Connection:
    """Listen on ``address``, say where on stderr, accept one sender, stop listening.
    Raises :class:`Failure` when it cannot listen (or load the certificate)."""
    tls = _tls_config(args, address, listening=True)
    context: ssl.SSLContext | None = None
    if tls is not None:
        try:
            context = server_tls_context(tls)
        except ValueError as exc:
            raise Failure(str(exc)) from None
    try:
        listeners = await open_listeners(address)
    except OSError as exc:
        raise Failure(f"{exc.strerror or exc}") from None
    if context is not None:
        listeners = [
            TLSListener(listener, context, handshake_timeout=CONNECT_TIMEOUT)
            for listener in listeners
        ]
    try:
        where = ", ".join(bound_addresses(listeners))
        print(f"framewire recv: listening on {where}", file=sys.stderr, flush=True)
        return await _first_sender(listeners, where)
    finally:
        for listener in listeners:
            await trio.aclose_forcefully(listener)


async def _first_sender(
    listeners: Sequence[trio.abc.Listener[trio.abc.Stream]], where: str
) -> Connection:
    """The first connection on any of ``listeners`` whose TLS handshake (if any) succeeds.
    A failed handshake is one line on stderr, and the wait goes on."""
    accepted: list[trio.abc.Stream] = []
    while True:
        accepted.clear()
        async with trio.open_nursery() as nursery:

            async def accept(listener: trio.abc.Listener[trio.abc.Stream]) -> None:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    raise Failure(f"cannot accept on {where}: {_reason(exc)}") from None
                accepted.append(stream)
                nursery.cancel_scope.cancel()

            for listener in listeners:
                nursery.start_soon(accept, listener)
        for extra in accepted[1:]:
            await trio.aclose_forcefully(extra)
        connection = Connection(accepted[0], handshake_timeout=CONNECT_TIMEOUT)
        try:
            await connection.establish()
        except trio.BrokenResourceError as exc:
            await trio.aclose_forcefully(connection.stream)
            print(f"framewire recv: {exc}; still listening", file=sys.stderr, flush=True)
            continue
        print(f"framewire recv: sender {connection.peer} connected", file=sys.stderr, flush=True)
        return connection


def _parse_since(text: str) -> float | datetime.datetime:
    """``--since``: a span back (``10s``, ``1.5m``, ``250ms``) or a time with its zone
    (``2026-12-07T10:00:00Z``)."""
    try:
        return parse_duration(text)
    except ValueError:
        pass
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise Failure(
            f"--since {text!r}: expected a span such as 10s or a time such as 2026-12-07T10:00:00Z",
            EXIT_USAGE,
        ) from None
    if when.tzinfo is None:
        raise Failure(f"--since {text!r}: give the time zone (Z for UTC)", EXIT_USAGE)
    return when


def _iso(ns: int) -> str:
    return (
        datetime.datetime.fromtimestamp(ns / 1e9, tz=datetime.UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


async def _recv(args: argparse.Namespace, out: TextIO, sink: BinaryIO | None) -> int:
    spec = protocols.get(args.protocol)
    decoder = spec.make_decoder(args.max_frame_size)
    encoder = spec.make_encoder()
    if args.listen is not None:
        connection = await _accept_one(args, _address(args.listen, listening=True))
    else:
        address = _address(args.address)
        stream = await _connect(args, address, "is a framewire server listening there?")
        connection = Connection(stream, peer=str(address))
    received = 0
    rewinding = args.since is not None
    if rewinding or args.gaps:
        assert isinstance(decoder, native.NativeDecoder)  # checked with the arguments
        decoder.accept_notices = True
        request = rewind_request(args.since_value, args.rate, gaps=args.gaps)
        await connection.send([request])

    def rewind_answered(first: Frame) -> None:
        """Print where the replay starts (``first`` is the server's answer); raise if it
        refused or did not answer."""
        try:
            start = rewind_answer(first)
        except RewindRefused as exc:
            raise Failure(str(exc)) from None
        later = "; the history starts later" if start.clamped else ""
        print(
            f"framewire recv: rewound to {_iso(start.start_ns)} (asked {_iso(start.asked_ns)}"
            f"{later}), rate {start.rate}; live follows",
            file=sys.stderr,
            flush=True,
        )

    def notice(item: native.Notice) -> None:
        """A gap: a line among the frames (on stderr when the frames go to a file)."""
        if item.what != "gap":
            return
        gap = gap_of(item)
        line = (
            f"GAP      {gap.frames} frames ({gap.bytes} bytes) dropped by the server between "
            f"{gap.after_ns} and {gap.before_ns}"
        )
        print(line, file=out if sink is None else sys.stderr, flush=True)

    class Enough(Exception):
        pass

    async def take(frames: Sequence[Frame]) -> None:
        nonlocal received, rewinding
        try:
            try:
                for frame in frames:
                    if rewinding:
                        rewinding = False
                        rewind_answered(frame)
                        if isinstance(frame, native.Notice):
                            continue
                    if isinstance(frame, native.Notice):
                        notice(frame)
                        continue
                    if sink is not None:
                        for buffer in encoder.encode(frame):
                            sink.write(buffer)
                    else:
                        print(_describe(frame), file=out)
                    received += 1
                    if args.count and received >= args.count:
                        raise Enough
            finally:
                (out if sink is None else sink).flush()  # keep a pipe live
        except BrokenPipeError:
            raise _OutputClosed from None
        await trio.lowlevel.checkpoint()

    async with connection.stream:
        try:
            with contextlib.suppress(Enough):
                await receive_frames(connection, decoder, take)
            if rewinding:
                raise Failure(
                    f"{connection.peer} closed the connection without answering the rewind"
                )
        except protocols.ProtocolError as exc:
            raise Failure(
                f"bad {args.protocol} data from {connection.peer} after {received} frames: "
                f"{exc}; is --protocol right?"
            ) from None
        except trio.BrokenResourceError as exc:
            raise Failure(
                f"connection to {connection.peer} broke after {received} frames: {_reason(exc)}"
            ) from None
    if not connection.bytes_received and not isinstance(connection.stream, trio.SSLStream):
        # A TLS server waits for a ClientHello that a plain client never sends, then hangs
        # up: that is all a plain client sees of it.
        print(
            f"framewire recv: 0 frames: {connection.peer} closed the connection without "
            "sending a byte (if it speaks TLS, use tls://)",
            file=sys.stderr,
        )
        return EXIT_OK
    print(f"framewire recv: {received} frames", file=sys.stderr)
    return EXIT_OK


def _check_recv_args(args: argparse.Namespace) -> None:
    if (args.address is None) == (args.listen is None):
        raise Failure(
            "give an ADDRESS to connect to, or --listen ADDRESS to wait for a sender (not both)",
            EXIT_USAGE,
        )
    if args.count < 0:
        raise Failure("--count: expected 0 (no limit) or a positive number", EXIT_USAGE)
    if (args.since is not None or args.gaps) and (
        args.listen is not None or args.protocol != "native"
    ):
        raise Failure("--since and --gaps need a native server to connect to", EXIT_USAGE)
    args.since_value = None
    if args.rate != "full" and args.since is None:
        raise Failure("--rate: applies to --since only", EXIT_USAGE)
    if args.since is not None:
        args.since_value = _parse_since(args.since)
        try:
            rewind_request(args.since_value, args.rate)
        except ValueError as exc:
            raise Failure(f"--since: {exc}", EXIT_USAGE) from None


def cmd_recv(args: argparse.Namespace) -> int:
    _check_recv_args(args)
    try:
        if args.output == "-":
            return _run(_recv, args, sys.stdout, sys.stdout.buffer)
        if args.output:
            try:
                sink = open(args.output, "wb")  # noqa: SIM115 - closed below
            except OSError as exc:
                raise Failure(f"cannot write {args.output}: {_reason(exc)}") from None
            with sink:
                return _run(_recv, args, sys.stdout, sink)
        return _run(_recv, args, sys.stdout, None)
    except OSError as exc:  # e.g. stdout is a closed pipe
        raise Failure(_reason(exc)) from None
    except KeyboardInterrupt:
        return EXIT_OK


async def _send(args: argparse.Namespace, source: io.BufferedIOBase) -> int:
    address = _address(args.address)
    stream = await _connect(args, address, "is a framewire receiver listening there?")
    verdict = _TLSVerdict(stream) if isinstance(stream, trio.SSLStream) else None
    async with stream, trio.open_nursery() as nursery:
        if verdict is not None:
            nursery.start_soon(verdict.listen)
        await _send_frames(args, source, address, stream, verdict)
        nursery.cancel_scope.cancel()
    return EXIT_OK


async def _send_frames(
    args: argparse.Namespace,
    source: io.BufferedIOBase,
    address: Address,
    stream: trio.abc.Stream,
    verdict: _TLSVerdict | None,
) -> None:
    """Send ``source`` over ``stream`` and say how many frames went; over TLS, hear the
    server's verdict first. Raises :class:`Failure` saying why not."""
    spec = protocols.get(args.protocol)
    decoder = spec.make_decoder(args.max_frame_size)
    encoder = spec.make_encoder()
    connection = Connection(stream, peer=str(address))
    sent = 0
    confirmed: trio.BrokenResourceError | bool = True
    try:
        while True:
            # read1: whatever is available (up to 1 MiB), so a live pipe is not held back.
            chunk = await trio.to_thread.run_sync(source.read1, 1 << 20)
            if not chunk:
                decoder.end_of_input()
                break
            frames = decoder.feed(chunk)
            if frames:
                await connection.send(encoder.encode_batch(frames))
                sent += len(frames)
        marker = encoder.end_of_stream()
        if marker:
            await connection.send([marker])
        if verdict is not None:
            confirmed = await verdict.confirm(CLOSE_PATIENCE, ended=bool(marker))
    except protocols.ProtocolError as exc:
        raise Failure(
            f"{args.file} is not {args.protocol} data after {sent} frames: {exc}; "
            "is --protocol right?"
        ) from None
    except trio.BrokenResourceError as exc:
        heard = await verdict.after_break() if verdict is not None else None
        confirmed = heard if heard is not None and _refused(heard) is not None else exc
    except OSError as exc:
        raise Failure(f"cannot read {args.file}: {_reason(exc)}") from None
    if isinstance(confirmed, trio.BrokenResourceError):
        reason = _reason(confirmed)
        if verdict is not None and args.cert is None and "client certificate" not in reason:
            # A TLS 1.3 server judges our certificate after we think the handshake is done:
            # whatever broke the connection, it may have been that.
            reason += " (the server may require a client certificate: give --cert and --key)"
        raise Failure(f"connection to {address} broke after {sent} frames: {reason}")
    if confirmed:
        print(f"framewire send: {sent} frames", file=sys.stderr)
    else:
        print(
            f"framewire send: {sent} frames (not confirmed: the server had not closed "
            f"{CLOSE_PATIENCE:g}s after the last; it may still be reading)",
            file=sys.stderr,
        )


def cmd_send(args: argparse.Namespace) -> int:
    if "://" not in args.address and "://" in args.file:
        raise Failure(
            f"the address comes first: framewire send {args.file} {args.address}", EXIT_USAGE
        )
    _address(args.address)  # a bad address before anything is read
    if args.file == "-":
        stdin = sys.stdin.buffer
        assert isinstance(stdin, io.BufferedIOBase)
        return _run(_send, args, stdin)
    try:
        source = open(args.file, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise Failure(f"cannot read {args.file}: {_reason(exc)}") from None
    with source:
        return _run(_send, args, source)


# -- status -------------------------------------------------------------------------------


def _age(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


#: Endpoint states in which its last error is current, not history.
_TROUBLED: Final = frozenset({"restarting", "reconnecting", "connecting", "failed", "stopped"})


def render_status(snapshot: dict[str, Any], width: int | None = None) -> str:
    """A status snapshot as a terminal table. With ``width``, no line is longer: the table
    leaves out its least telling columns (totals first, then restarts, bytes/s, the address)
    and shortens addresses and names until it fits, and the other lines wrap."""
    daemon = snapshot["daemon"]
    lines = [
        f"framewire {daemon['version']}  pid {daemon['pid']}  {daemon['state']}  "
        f"up {_age(daemon['uptime'])}  config {daemon['config']}"
    ]
    reload = daemon.get("last_reload")
    if reload:
        outcome = "ok" if reload["ok"] else f"FAILED: {reload['error'].splitlines()[-1].strip()}"
        lines.append(f"last reload: {outcome}")
    nats = daemon.get("nats_server")
    if nats:
        line = (
            f"embedded nats-server: {nats['state']}  pid {nats['pid'] or '-'}  {nats['url']}"
            f"  restarts {nats['restarts']}"
        )
        if nats["last_error"]:
            line += f"  last error: {nats['last_error']}"
        lines.append(line)
    # Held streams first: while one is held, nothing new reaches any of its subscribers.
    lines += _held_streams(snapshot)
    lines.append("")
    rows: list[list[str]] = []
    below: list[str | int] = []  # under the header: a row of the table (its index), or a line
    for name, endpoint in snapshot["endpoints"].items():
        rates = endpoint.get("rates", {})
        below.append(len(rows))
        rows.append(
            [
                name,
                endpoint["kind"],
                endpoint["state"],
                *_figures(endpoint, rates, "in"),
                *_figures(endpoint, rates, "out"),
                str(endpoint["frames_dropped"]),
                str(endpoint["restarts"]),
                ", ".join(endpoint["address"]),
            ]
        )
        now = snapshot["time"]
        if endpoint["last_error"]:
            when = endpoint.get("last_error_at")
            age = f" {_age(now - when)} ago" if when else ""
            # Kept as history: say whether the endpoint is still in trouble.
            past = "" if endpoint["state"] in _TROUBLED else ", healthy since"
            below.append(f"{'':<18} last error{age}{past}: {endpoint['last_error']}")
        for client in endpoint["clients"]:
            rates = client.get("rates", {})
            if "queue_frames" in client:
                sent = _flow(client, rates, "sent")
                figures = (
                    f"queue {client['queue_frames']} frames/{format_size(client['queue_bytes'])}"
                    f"  sent {sent}  dropped {client['frames_dropped']}"
                )
                if client.get("frames_unencodable"):
                    figures += f"  unencodable {client['frames_unencodable']}"
            else:
                figures = f"received {_flow(client, rates, 'received')}"
            below.append(
                f"{'':<18} client {client['peer']:<22} for {_age(now - client['connected_since'])}"
                f"  {figures}"
            )
    header, table = _table(rows, width)
    lines += [header, "-" * len(header)]
    lines += [table[item] if isinstance(item, int) else item for item in below]
    if width is not None:
        lines = [part for line in lines for part in _wrap(line, width)]
    return "\n".join(lines)


#: The table's columns: header, alignment, default width, and how soon it goes when the
#: table must be narrower (0: never; higher: sooner). The address comes last and takes the
#: room that is left; it goes when its turn (_ADDRESS_GOES) comes.
_COLUMNS: Final = (
    ("endpoint", "<", 18, 0),
    ("kind", "<", 9, 2),
    ("state", "<", 12, 1),
    ("frames in", ">", 11, 10),
    ("/s", ">", 8, 3),
    ("bytes in", ">", 9, 12),
    ("/s", ">", 9, 7),
    ("frames out", ">", 11, 11),
    ("/s", ">", 8, 4),
    ("bytes out", ">", 9, 13),
    ("/s", ">", 9, 8),
    ("dropped", ">", 9, 5),
    ("restarts", ">", 8, 9),
)
_ADDRESS_GOES: Final = 6
#: A rate column's header when its total is left out.
_RATE_HEADERS: Final = {4: "in/s", 6: "in B/s", 8: "out/s", 10: "out B/s"}
#: The address column is shown only with at least this many characters of room.
_MIN_ADDRESS: Final = 12


def _table(rows: list[list[str]], width: int | None) -> tuple[str, list[str]]:
    """The header and the rows of the endpoint table, ``width`` characters at most."""
    kept = list(range(len(_COLUMNS)))

    def headers() -> list[str]:
        return [
            _RATE_HEADERS[i] if i in _RATE_HEADERS and i - 1 not in kept else _COLUMNS[i][0]
            for i in range(len(_COLUMNS))
        ]

    def sizes_of(names: list[str]) -> list[int]:
        return [
            max(
                [len(names[i]) if width is not None else _COLUMNS[i][2]]
                + [len(row[i]) for row in rows]
            )
            for i in range(len(_COLUMNS))
        ]

    sizes = sizes_of(headers())
    address = 2 + _MIN_ADDRESS  # the room the address needs, 0 once it is left out
    if width is not None:  # as narrow as the cells allow, then fewer columns
        while len(kept) > 1 and sum(sizes[i] + 1 for i in kept) - 1 + address > width:
            going = max(kept, key=lambda i: _COLUMNS[i][3])
            if address and _COLUMNS[going][3] < _ADDRESS_GOES:
                address = 0  # the address goes first
                continue
            kept.remove(going)
            sizes = sizes_of(headers())
        sizes[0] = min(sizes[0], width)  # a name longer than the terminal
    names = headers()

    def line(cells: list[str]) -> str:
        parts = []
        for i in kept:
            cell = _shorten(cells[i], sizes[i])
            parts.append(f"{cell:{_COLUMNS[i][1]}{sizes[i]}}")
        return " ".join(parts)

    header = line(names)
    room = None if width is None else width - len(header) - 2
    show_address = room is None or (address > 0 and room >= _MIN_ADDRESS)
    if show_address:
        header += "  address"
    elif width is not None:
        header = header.rstrip()
    table = []
    for row in rows:
        text = line(row)
        if show_address:
            text += "  " + (row[-1] if room is None else _shorten(row[-1], room))
        table.append(text.rstrip() if width is not None else text)
    return header, table


def _shorten(text: str, size: int) -> str:
    """``text``, cut to ``size`` characters with a ``…`` when longer."""
    return text if len(text) <= size else text[: max(size - 1, 0)] + "…"


def _wrap(line: str, width: int) -> list[str]:
    """``line`` wrapped to ``width``, its continuations indented two more than it."""
    if len(line) <= width:
        return [line]
    lead = len(line) - len(line.lstrip(" "))
    indent = " " * min(lead + 2, width // 2)
    return textwrap.wrap(line, width, subsequent_indent=indent, break_on_hyphens=False) or [
        line[:width]
    ]


def _held_streams(snapshot: dict[str, Any]) -> list[str]:
    """One line per held stream (``streams.NAME.held_by``), and one per holder under it:
    its endpoint and queue against its bounds."""
    lines: list[str] = []
    for name, stream in (snapshot.get("streams") or {}).items():
        if not stream.get("held_by"):
            continue
        held = f" for {_age(stream['held_for'])}" if "held_for" in stream else ""
        lines.append(
            f"HELD: stream {name!r}{held} by {', '.join(stream['held_by'])}: its publishers "
            f"wait, nothing new reaches its subscribers (held {_age(stream['held_seconds'])} "
            "in all)"
        )
        for holder in stream.get("holders", []):
            label = holder["subscription"]
            who = holder["endpoint"] if label in ("", holder["endpoint"]) else label
            lines.append(
                f"  {who}: queue {holder['queue_frames']}/{holder['queue_max_frames']} frames, "
                f"{format_size(holder['queue_bytes'])}/{format_size(holder['queue_max_bytes'])}"
            )
    return lines


def _rate(per_second: float) -> str:
    return f"{per_second:.0f}" if per_second >= 100 else f"{per_second:.1f}"


def _figures(endpoint: dict[str, Any], rates: dict[str, float], direction: str) -> list[str]:
    """Frames, frames/s, bytes, bytes/s of one direction: the table's cells."""
    frames, nbytes = f"frames_{direction}", f"bytes_{direction}"
    return [
        str(endpoint[frames]),
        _rate(rates.get(frames, 0.0)),
        format_size(endpoint.get(nbytes, 0)),
        format_size(int(rates.get(nbytes, 0.0))) + "/s",
    ]


def _flow(client: dict[str, Any], rates: dict[str, float], what: str) -> str:
    """``12345 (10.0/s, 1.2MiB, 12KiB/s)``: a client's frames and bytes sent or received."""
    frames, nbytes = f"frames_{what}", f"bytes_{what}"
    return (
        f"{client[frames]} ({_rate(rates.get(frames, 0.0))}/s, "
        f"{format_size(client.get(nbytes, 0))}, {format_size(int(rates.get(nbytes, 0.0)))}/s)"
    )


_SCHEMES: Final = {"ws": "ws", "wss": "wss", "http": "ws", "https": "wss"}


def status_url(text: str) -> str:
    """The websocket URL for ``host:port``, ``ws://``, ``wss://``, ``http://`` (ws) or
    ``https://`` (wss). Raises :class:`Failure` for anything else."""
    url = text if "://" in text else f"ws://{text}"
    parts = urlsplit(url)
    scheme = _SCHEMES.get(parts.scheme.lower())
    expected = "expected host:port or a ws://, wss://, http:// or https:// URL"
    if scheme is None:
        raise Failure(f"{text!r}: unsupported scheme {parts.scheme!r}; {expected}", EXIT_USAGE)
    try:
        port = parts.port
    except ValueError:
        raise Failure(f"{text!r}: bad port; {expected}", EXIT_USAGE) from None
    if not parts.hostname or (port is None and "://" not in text):
        raise Failure(f"{text!r}: no host or port; {expected}", EXIT_USAGE)
    return urlunsplit((scheme, parts.netloc, parts.path or "/", parts.query, ""))


def _token(args: argparse.Namespace) -> str | None:
    """The status token: ``--token``, else ``--token-file``, else $FRAMEWIRE_STATUS_TOKEN."""
    if args.token is not None:
        return str(args.token)
    if args.token_file is not None:
        try:
            token = Path(args.token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise Failure(f"cannot read the token file {args.token_file}: {_reason(exc)}") from None
        if not token:
            raise Failure(f"the token file {args.token_file} is empty")
        return token
    return os.environ.get(TOKEN_VARIABLE) or None


def _status_failure(url: str, exc: BaseException, token: str | None) -> Failure:
    """One line for why reading ``url`` failed. Its ``code`` is EXIT_USAGE for failures
    that retrying cannot cure (a refused token, not a status server)."""
    if isinstance(exc, ConnectionRejected):
        body = (exc.body or b"").decode("utf-8", "replace").strip()
        if exc.status_code in (401, 403):
            if token is None:
                return Failure(
                    f"the status server at {url} requires a token; give it with --token-file "
                    f"PATH or ${TOKEN_VARIABLE} (or --token, which ps shows)",
                    EXIT_USAGE,
                )
            return Failure(
                f"the status server at {url} refused the token (HTTP {exc.status_code}); "
                "is it the [status] token of this daemon's configuration?",
                EXIT_USAGE,
            )
        if exc.status_code == 503:
            return Failure(f"the status server at {url} is busy: {body or 'HTTP 503'}")
        return Failure(
            f"{url} answered HTTP {exc.status_code}{': ' + body if body else ''}; "
            "is it a framewire status server?",
            EXIT_USAGE,
        )
    if isinstance(exc, ConnectionTimeout):
        return Failure(f"cannot reach the status server at {url}: no answer within 5s")
    if isinstance(exc, (HandshakeError, OSError)):
        return Failure(
            f"cannot reach the status server at {url}: {_reason(exc)}; "
            "is the daemon running with a [status] table?"
        )
    if isinstance(exc, trio.TooSlowError):
        return Failure(f"the status server at {url} sent nothing for {STATUS_SILENCE:g}s")
    if isinstance(exc, ConnectionClosed):
        reason = exc.reason
        why = f"{reason.name} ({reason.code})" if reason is not None else "closed"
        if reason is not None and reason.reason:
            why += f": {reason.reason}"
        return Failure(f"the status server at {url} closed the connection: {why}")
    return Failure(f"the status server at {url}: {_reason(exc)}")


def terminal_width() -> int | None:
    """How wide the status table may be: ``$COLUMNS`` when set, else the width of the
    terminal standard output is on; None (no limit) when it is not a terminal."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    try:
        if os.isatty(sys.stdout.fileno()):
            return os.get_terminal_size(sys.stdout.fileno()).columns or None
    except (OSError, ValueError):  # no file descriptor (captured), or not a terminal
        pass
    return None


def _render(url: str, message: str | bytes, *, as_json: bool = False) -> str:
    try:
        if as_json:
            document = json.loads(message)
            if not isinstance(document, dict) or "schema" not in document:
                raise ValueError("not a status snapshot")
            return json.dumps(document, separators=(",", ":"))
        return render_status(json.loads(message), terminal_width())
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        raise Failure(
            f"{url} sent a document this framewire cannot show ({type(exc).__name__}: {exc}); "
            "is it a framewire status server of the same version?"
        ) from None


#: What reading a status server can fail with (see :func:`_status_failure`).
_STATUS_ERRORS = (
    HandshakeError,
    ConnectionClosed,
    DisconnectionTimeout,
    OSError,
    trio.TooSlowError,
)


@contextlib.asynccontextmanager
async def _status_socket(
    url: str, token: str | None, context: ssl.SSLContext | None
) -> AsyncIterator[Callable[[], Awaitable[str | bytes]]]:
    """A websocket to the status server at ``url``; yields a function that returns its next
    message, raising trio.TooSlowError after :data:`STATUS_SILENCE` seconds without one
    (the other failures are in :data:`_STATUS_ERRORS`)."""
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else None
    async with open_websocket_url(
        url, context, extra_headers=headers, connect_timeout=5, disconnect_timeout=1
    ) as connection:

        async def next_message() -> str | bytes:
            with trio.fail_after(STATUS_SILENCE):
                return await connection.get_message()

        yield next_message


def _status_tls(args: argparse.Namespace, url: str) -> ssl.SSLContext | None:
    """The TLS context for a status URL (``--ca`` for ``wss://``); None for ``ws://``.
    Raises :class:`Failure` for a CA file that cannot be loaded, or ``--ca`` without TLS."""
    if not url.startswith("wss:"):
        if args.ca is not None:
            raise Failure("--ca: only for a wss:// or https:// URL", EXIT_USAGE)
        return None
    try:
        return ssl.create_default_context(cafile=args.ca)
    except (OSError, ssl.SSLError) as exc:
        raise Failure(f"cannot load the CA file {args.ca}: {_reason(exc)}") from None


async def _status(args: argparse.Namespace, url: str, token: str | None) -> int:
    context = _status_tls(args, url)
    backoff = Backoff(WATCH_BACKOFF)
    shown = False  # at least one snapshot: the daemon was up
    gone = False
    while True:
        try:
            async with _status_socket(url, token, context) as next_message:
                while True:
                    message = await next_message()
                    text = _render(url, message, as_json=args.json)
                    if not args.watch:
                        _show(text)
                        return EXIT_OK
                    _show(text if args.json else "\x1b[H\x1b[2J" + text, flush=True)
                    shown, gone = True, False
                    backoff.reset()
        except _STATUS_ERRORS as exc:
            failure = _status_failure(url, exc, token)
            if not args.watch or failure.code == EXIT_USAGE:
                raise failure from None
            if not shown and not gone:  # not up yet: wait for it, as for a restart
                print(
                    f"framewire status: no status server at {url} yet ({_reason(exc)}); "
                    "waiting for it",
                    file=sys.stderr,
                    flush=True,
                )
                gone = True
        if not gone:
            print("framewire status: status server gone; reconnecting", file=sys.stderr, flush=True)
            gone = True
        await trio.sleep(backoff.next_delay())


def cmd_status(args: argparse.Namespace) -> int:
    url = status_url(args.url)
    token = _token(args)
    try:
        return _run(_status, args, url, token)
    except KeyboardInterrupt:
        return EXIT_OK


# -- reload -------------------------------------------------------------------------------

#: ``framewire reload`` waits this long (seconds, ``--timeout``) for the daemon to report
#: the reload it asked for.
RELOAD_TIMEOUT: Final = 60.0


def _pid_from_file(path: str) -> int:
    """The process id written in ``path``. Raises :class:`Failure` saying why there is none."""
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise Failure(f"cannot read the pid file {path}: {_reason(exc)}") from None
    if not text.isdigit() or int(text) <= 0:
        raise Failure(f"the pid file {path} holds {text[:40]!r}, not a process id", EXIT_USAGE)
    return int(text)


async def _read_status(
    url: str,
    token: str | None,
    context: ssl.SSLContext | None,
    until: Callable[[dict[str, Any]], bool],
    *,
    retry: bool,
) -> dict[str, Any]:
    """The first snapshot from the status server at ``url`` for which ``until`` is true.
    Without ``retry`` the first failure to read raises :class:`Failure`; with it, the
    connection is made again (with backoff) until the caller's deadline, as after a reload
    that restarted [status], and only a failure retrying cannot cure (a refused token) raises."""
    backoff = Backoff(WATCH_BACKOFF)
    while True:
        try:
            async with _status_socket(url, token, context) as next_message:
                while True:
                    message = await next_message()
                    try:
                        snapshot = json.loads(message)
                        if not isinstance(snapshot["daemon"]["pid"], int):
                            raise TypeError("daemon.pid is not a number")
                    except (ValueError, KeyError, TypeError) as exc:
                        raise Failure(
                            f"{url} sent a document this framewire cannot read "
                            f"({type(exc).__name__}: {exc}); is it a framewire status server?"
                        ) from None
                    backoff.reset()
                    if until(snapshot):
                        return dict(snapshot)
        except _STATUS_ERRORS as exc:
            failure = _status_failure(url, exc, token)
            if not retry or failure.code == EXIT_USAGE:
                raise failure from None
        await trio.sleep(backoff.next_delay())


def _signal_reload(pid: int, source: str) -> None:
    """Send SIGHUP to ``pid``. Raises :class:`Failure` saying why it could not."""
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise Failure(f"no process {pid} ({source}): is the daemon running?") from None
    except PermissionError:
        raise Failure(
            f"not allowed to signal the daemon (pid {pid}, {source}): run framewire reload as "
            "its user or as root, or use systemctl reload for a systemd service"
        ) from None


def _describe_reload(reload: dict[str, Any]) -> str:
    changes = reload.get("changes") or []
    return "; ".join(changes) if changes else "nothing changed"


async def _reload(args: argparse.Namespace, url: str, token: str | None) -> int:
    context = _status_tls(args, url)
    filed = _pid_from_file(args.pid_file) if args.pid_file is not None else None
    try:
        with trio.fail_after(args.timeout):
            snapshot = await _read_status(url, token, context, lambda _: True, retry=False)
    except (Failure, trio.TooSlowError) as exc:
        failure = (
            exc
            if isinstance(exc, Failure)
            else Failure(f"the status server at {url} sent nothing for {args.timeout:g}s")
        )
        if filed is None:
            raise failure from None
        _signal_reload(filed, f"from {args.pid_file}")
        raise Failure(
            f"sent SIGHUP to pid {filed} (from {args.pid_file}); the daemon's log says what the "
            f"reload did, its status server cannot: {failure}"
        ) from None
    from .daemon.status import pid_namespace

    daemon = snapshot["daemon"]
    pid: int = daemon["pid"]
    here = daemon.get("pid_namespace") is not None and daemon["pid_namespace"] == pid_namespace()
    if filed is not None:
        if here and filed != pid:
            raise Failure(
                f"the pid file {args.pid_file} says {filed}, but the daemon at {url} is pid {pid}",
                EXIT_USAGE,
            )
        pid, source = filed, f"from {args.pid_file}"
    elif not here:
        raise Failure(
            f"the daemon at {url} (pid {pid}) runs on another machine or in another PID "
            "namespace: run framewire reload there, or give --pid-file",
            EXIT_USAGE,
        )
    else:
        source = f"from {url}"
    if daemon.get("state") == "reloading":
        raise Failure(f"the daemon at {url} is reloading already; try again when it is done")
    if daemon.get("state") != "running":
        raise Failure(f"the daemon at {url} is {daemon.get('state')}, not running")
    before = daemon.get("last_reload")

    def reloaded(snapshot: dict[str, Any]) -> bool:
        after = snapshot["daemon"].get("last_reload")
        return bool(after) and after != before

    _signal_reload(pid, source)
    try:
        with trio.fail_after(args.timeout):
            snapshot = await _read_status(url, token, context, reloaded, retry=True)
    except trio.TooSlowError:
        raise Failure(
            f"sent SIGHUP to pid {pid}, but the status server at {url} reported no reload "
            f"within {args.timeout:g}s; the daemon's log says what happened"
        ) from None
    after = snapshot["daemon"]["last_reload"]
    config = snapshot["daemon"].get("config", "")
    if not after.get("ok"):
        error = str(after.get("error", "")).rstrip()
        raise Failure(
            f"pid {pid} did not reload {config}; it still runs the previous configuration:\n"
            + error
        )
    _show(f"framewire reload: pid {pid} reloaded {config}: {_describe_reload(after)}")
    return EXIT_OK


def cmd_reload(args: argparse.Namespace) -> int:
    url = status_url(args.url)
    token = _token(args)
    if args.timeout <= 0:
        raise Failure("--timeout: expected a positive number of seconds", EXIT_USAGE)
    try:
        return _run(_reload, args, url, token)
    except KeyboardInterrupt:
        return 130


# -- the parser ---------------------------------------------------------------------------


def _size(text: str) -> int:
    from .config import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_tls_flags(parser: argparse.ArgumentParser, *, listening: bool) -> None:
    group = parser.add_argument_group("TLS (tls:// addresses)")
    if listening:
        ca_help = (
            "connecting: verify the server against this CA file (default: the system's trust "
            "store); listening: require a client certificate signed by it"
        )
    else:
        ca_help = "verify the server against this CA file (default: the system's trust store)"
    group.add_argument("--ca", metavar="FILE", help=ca_help)
    group.add_argument("--cert", metavar="FILE", help="certificate to present (PEM)")
    group.add_argument("--key", metavar="FILE", help="its private key (PEM)")
    group.add_argument(
        "--server-name",
        metavar="NAME",
        help="name to verify the server's certificate against (default: the address's host)",
    )


#: Each command's examples for its ``--help``: a command line (shell pipes allowed) and what
#: it does. tests/test_operator_cli.py parses every one.
EXAMPLES: Final[dict[str, list[tuple[str, str]]]] = {
    "run": [
        ("framewire run", "the embedded demo: a generator served on tcp://127.0.0.1:4540"),
        ("framewire run config/relay.toml", "a relay: producers on 4536, clients on 4537"),
        (
            "framewire run /etc/framewire/framewire.toml --log-format json",
            "one JSON object per log line, for a log shipper",
        ),
    ],
    "check": [
        (
            "framewire check /etc/framewire/framewire.toml",
            "before a reload: every problem, at its line and column",
        ),
        (
            "framewire check --offline config/site-instrument.toml",
            "in CI: the file alone (no name resolved, no file looked at)",
        ),
    ],
    "recv": [
        ("framewire recv tcp://127.0.0.1:4540", "one line per frame: kind, type, size, time"),
        (
            "framewire recv tcp://127.0.0.1:4540 --count 100 --output run.fw",
            "save 100 frames to a file",
        ),
        ("framewire recv tls://relay.example:4537 --ca ca.pem", "over TLS, verified by ca.pem"),
        ("framewire recv --listen tcp://127.0.0.1:4540", "wait for one sender instead"),
    ],
    "send": [
        ("framewire send tcp://127.0.0.1:4536 run.fw", "send a recorded file to a receiver"),
        (
            "framewire recv tcp://127.0.0.1:4540 --output - | framewire send tcp://127.0.0.1:4536",
            "pipe one daemon's stream into another",
        ),
        ("framewire send unix:///run/framewire/in.sock --protocol raw capture.bin", "raw bytes"),
    ],
    "status": [
        ("framewire status", "the demo's status (ws://127.0.0.1:8765/)"),
        ("framewire status 127.0.0.1:8766 --watch", "keep it updating; wait for the daemon"),
        (
            "framewire status 127.0.0.1:8766 --json --token-file /etc/framewire/status.token",
            "one line of JSON, for scripts",
        ),
    ],
    "reload": [
        ("framewire reload 127.0.0.1:8766", "re-read the file; print what changed, or why not"),
        (
            "framewire reload 127.0.0.1:8766 --pid-file /run/framewire.pid",
            "signal the pid in the file",
        ),
    ],
}


def _examples(command: str | None) -> str:
    """The ``examples:`` section of a ``--help`` (of every command's, without ``command``)."""
    lines = ["examples:"]
    for name, examples in EXAMPLES.items():
        if command is None:
            lines.append(f"  {examples[0][0]}\n      {examples[0][1]}")
        elif name == command:
            lines += [f"  {line}\n      {what}" for line, what in examples]
    if command is None:
        lines.append("\nEach command's options and examples: framewire COMMAND --help")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="framewire",
        description="Relay framed data streams between instruments and monitors.",
        epilog=_examples(None),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"framewire {__version__}")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_CommandParser
    )

    run = commands.add_parser("run", help="run the daemon (the embedded demo without CONFIG)")
    run.add_argument("config", nargs="?", metavar="CONFIG", help="TOML configuration file")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="text",
        help="text (default; syslog priorities under journald) or json (one object per line)",
    )
    run.set_defaults(func=cmd_run)

    check = commands.add_parser("check", help="validate a configuration file")
    check.add_argument("config", metavar="CONFIG")
    check.add_argument(
        "--offline",
        action="store_true",
        help="check the file alone, as CI on another machine can: resolve no host names and "
        "look at nothing on this machine (files, directories, sockets, free space)",
    )
    check.set_defaults(func=cmd_check)

    protocol_help = f"wire protocol ({', '.join(protocols.names())}; default native)"
    address_help = "tcp://host:port, tls://host:port or unix:///path"
    recv = commands.add_parser(
        "recv", help="connect to a server (or wait for a sender) and print or save its frames"
    )
    recv.add_argument("address", nargs="?", metavar="ADDRESS", help=address_help)
    recv.add_argument("--listen", metavar="ADDRESS", help="instead: wait for one sender on ADDRESS")
    recv.add_argument("--protocol", default="native", choices=protocols.names(), help=protocol_help)
    recv.add_argument("--count", type=int, default=0, help="stop after N frames")
    recv.add_argument(
        "--output", metavar="FILE", help="write the frames to FILE (- for stdout) instead"
    )
    recv.add_argument("--max-frame-size", type=_size, default=64 << 20, help="default 64MiB")
    recv.add_argument(
        "--since",
        metavar="WHEN",
        help="rewind first (a native server whose stream keeps a history): a span back "
        "such as 10s, or a time such as 2026-12-07T10:00:00Z; live follows",
    )
    recv.add_argument(
        "--gaps",
        action="store_true",
        help="ask a native server with gap_frames to say where it drops frames for this "
        "client (a GAP line at that point)",
    )
    recv.add_argument(
        "--rate",
        default="full",
        metavar="RATE",
        help="with --since: full (default), original, or a factor of the original speed",
    )
    _add_tls_flags(recv, listening=True)
    recv.set_defaults(func=cmd_recv)

    send = commands.add_parser("send", help="send frames from a file (or stdin) to a receiver")
    send.add_argument("address", metavar="ADDRESS", help=address_help)
    send.add_argument("file", nargs="?", default="-", metavar="FILE", help="default: stdin")
    send.add_argument("--protocol", default="native", choices=protocols.names(), help=protocol_help)
    send.add_argument("--max-frame-size", type=_size, default=64 << 20, help="default 64MiB")
    _add_tls_flags(send, listening=False)
    send.set_defaults(func=cmd_send)

    status = commands.add_parser("status", help="show a running daemon's status")
    status.add_argument(
        "url",
        nargs="?",
        default=STATUS_URL,
        metavar="URL",
        # Not %(default)s: argparse hides a positional's default while it parses intermixed
        # options, and --help is such an option.
        help=f"host:port, ws://, wss://, http:// or https:// (default {STATUS_URL})",
    )
    status.add_argument(
        "--watch", action="store_true", help="keep updating; reconnect if the daemon goes away"
    )
    status.add_argument(
        "--json",
        action="store_true",
        help="print the snapshot as JSON on one line (with --watch: one line per snapshot)",
    )
    status.add_argument("--token-file", metavar="PATH", help="read the [status] token from PATH")
    status.add_argument(
        "--token",
        help=f"the [status] token (visible to other users in ps: prefer --token-file or "
        f"${TOKEN_VARIABLE})",
    )
    status.add_argument("--ca", metavar="FILE", help="for wss://: verify against this CA file")
    status.set_defaults(func=cmd_status)

    reload = commands.add_parser(
        "reload",
        help="make a running daemon re-read its configuration file and say what changed",
    )
    reload.add_argument(
        "url",
        nargs="?",
        default=STATUS_URL,
        metavar="URL",
        help="its status server: host:port, ws://, wss://, http:// or https:// "
        f"(default {STATUS_URL})",
    )
    reload.add_argument(
        "--pid-file",
        metavar="PATH",
        help="signal the pid in PATH (default: the pid the status server reports, when it runs "
        "on this machine)",
    )
    reload.add_argument("--token-file", metavar="PATH", help="read the [status] token from PATH")
    reload.add_argument(
        "--token",
        help=f"the [status] token (visible to other users in ps: prefer --token-file or "
        f"${TOKEN_VARIABLE})",
    )
    reload.add_argument("--ca", metavar="FILE", help="for wss://: verify against this CA file")
    reload.add_argument(
        "--timeout",
        type=float,
        default=RELOAD_TIMEOUT,
        metavar="SECONDS",
        help="give up waiting for the outcome after this long (default %(default)g)",
    )
    reload.set_defaults(func=cmd_reload)
    for name, command in commands.choices.items():
        command.epilog = _examples(name)
        command.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # Reported by the subcommand (the top-level parser would name only "framewire").
        prog = f"framewire {args.command}"
        print(
            f"{prog}: unrecognized arguments: {' '.join(extra)} (see {prog} --help)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        code: int = args.func(args)
    except Failure as failure:
        prefix = f"framewire {args.command}: " if failure.prefixed else ""
        text = f"{prefix}{failure}"
        if stderr_is_journal():  # e.g. ExecStartPre=framewire check: findable with -p err
            text = "\n".join(f"<3>{line}" for line in text.split("\n"))
        print(text, file=sys.stderr)
        return failure.code
    except _OutputClosed:
        # Quietly, like other filters; and no second complaint when Python flushes stdout.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        return 130
    return code
