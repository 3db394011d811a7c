"""The ``framewire`` command: run | check | recv | send."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from . import protocols
from ._version import __version__
from .config import (
    Config,
    ConfigError,
    check_config,
    default_config_text,
    format_size,
    load_config,
    parse_address,
    parse_config,
)
from .daemon import DaemonStartFailed, serve
from .daemon.flow import receive_frames
from .daemon.transport import Connection, Connector, connector_for
from .frame import Frame

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


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


def cmd_run(args: argparse.Namespace) -> int:
    try:
        config, source = _load(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    _setup_logging(args.log_level or config.daemon.log_level)
    if args.config is None:
        print(
            "framewire: running the embedded demo (a generator feeding a server).", file=sys.stderr
        )
        for name, endpoint in config.endpoints.items():
            if endpoint.kind == "server":
                print(
                    f"framewire: {name}: connect with  framewire recv {endpoint.listen}",
                    file=sys.stderr,
                )
    try:
        trio.run(serve, config, source, Path(source) if args.config else None)
    except DaemonStartFailed as exc:  # each failure was logged as one line
        print(f"framewire: not started: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:  # pragma: no cover - e.g. no signal support
        print(f"framewire: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    try:
        config, source = _load(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    report = check_config(config)
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if report.errors:
        print(ConfigError(source, list(report.errors)), file=sys.stderr)
        return EXIT_USAGE
    count = len(config.endpoints)
    print(f"{source}: OK, {count} endpoint{'s' if count != 1 else ''}")
    for line in _summary(config):
        print(line)
    return EXIT_OK


def _describe(frame: Frame) -> str:
    """One line per frame: kind, type, payload size in bytes, timestamp (ns since the epoch)."""
    payload = frame.payload
    size = payload.nbytes if isinstance(payload, memoryview) else len(payload)
    return f"{frame.kind.name:<8} {frame.type:<16} {size:>10} {frame.timestamp}"


def _plain_connector(text: str) -> Connector:
    """A connector for a ``tcp://`` or ``unix://`` address. Raises ValueError otherwise."""
    address = parse_address(text)
    if address.scheme == "tls":
        raise ValueError(f"{address}: the command line tools do not speak TLS")
    return connector_for(address)


async def _recv(args: argparse.Namespace, out: TextIO, sink: BinaryIO | None) -> int:
    connect = _plain_connector(args.address)
    spec = protocols.get(args.protocol)
    decoder = spec.make_decoder(args.max_frame_size)
    encoder = spec.make_encoder()
    stream = await connect()
    received = 0

    class Enough(Exception):
        pass

    async def take(frames: Sequence[Frame]) -> None:
        nonlocal received
        try:
            for frame in frames:
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
        await trio.lowlevel.checkpoint()

    async with stream:
        with contextlib.suppress(Enough):
            await receive_frames(Connection(stream), decoder, take)
    print(f"framewire recv: {received} frames", file=sys.stderr)
    return EXIT_OK


def cmd_recv(args: argparse.Namespace) -> int:
    try:
        if args.output == "-":
            return trio.run(_recv, args, sys.stdout, sys.stdout.buffer)
        if args.output:
            with open(args.output, "wb") as sink:
                return trio.run(_recv, args, sys.stdout, sink)
        return trio.run(_recv, args, sys.stdout, None)
    except (OSError, ValueError, trio.BrokenResourceError) as exc:
        print(f"framewire recv: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK


async def _send(args: argparse.Namespace, source: io.BufferedIOBase) -> int:
    connect = _plain_connector(args.address)
    spec = protocols.get(args.protocol)
    decoder = spec.make_decoder(args.max_frame_size)
    encoder = spec.make_encoder()
    stream = await connect()
    connection = Connection(stream)
    sent = 0
    async with stream:
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
    print(f"framewire send: {sent} frames", file=sys.stderr)
    return EXIT_OK


def cmd_send(args: argparse.Namespace) -> int:
    try:
        if args.file == "-":
            stdin = sys.stdin.buffer
            assert isinstance(stdin, io.BufferedIOBase)
            return trio.run(_send, args, stdin)
        with open(args.file, "rb") as source:
            return trio.run(_send, args, source)
    except (OSError, ValueError, trio.BrokenResourceError) as exc:
        print(f"framewire send: {exc}", file=sys.stderr)
        return EXIT_FAILURE


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


def render_status(snapshot: dict[str, Any]) -> str:
    """A status snapshot as a terminal table."""
    daemon = snapshot["daemon"]
    lines = [
        f"framewire {daemon['version']}  pid {daemon['pid']}  {daemon['state']}  "
        f"up {_age(daemon['uptime'])}  config {daemon['config']}"
    ]
    reload = daemon.get("last_reload")
    if reload:
        outcome = "ok" if reload["ok"] else f"FAILED: {reload['error'].splitlines()[-1].strip()}"
        lines.append(f"last reload: {outcome}")
    lines.append("")
    header = (
        f"{'endpoint':<18} {'kind':<9} {'state':<12} {'frames in':>11} {'frames out':>11} "
        f"{'dropped':>9} {'restarts':>8}  address"
    )
    lines += [header, "-" * len(header)]
    for name, endpoint in snapshot["endpoints"].items():
        lines.append(
            f"{name:<18} {endpoint['kind']:<9} {endpoint['state']:<12} "
            f"{endpoint['frames_in']:>11} {endpoint['frames_out']:>11} "
            f"{endpoint['frames_dropped']:>9} {endpoint['restarts']:>8}  "
            f"{', '.join(endpoint['address'])}"
        )
        if endpoint["last_error"]:
            lines.append(f"{'':<18} last error: {endpoint['last_error']}")
        now = snapshot["time"]
        for client in endpoint["clients"]:
            if "queue_frames" in client:
                figures = (
                    f"queue {client['queue_frames']} frames/{format_size(client['queue_bytes'])}"
                    f"  sent {client['frames_sent']}  dropped {client['frames_dropped']}"
                )
            else:
                figures = f"received {client['frames_received']}"
            lines.append(
                f"{'':<18} client {client['peer']:<22} for {_age(now - client['connected_since'])}"
                f"  {figures}"
            )
    return "\n".join(lines)


async def _status(args: argparse.Namespace) -> int:
    headers = [(b"authorization", f"Bearer {args.token}".encode())] if args.token else None
    async with open_websocket_url(
        args.url, extra_headers=headers, connect_timeout=5, disconnect_timeout=1
    ) as connection:
        while True:
            with trio.fail_after(30):
                message = await connection.get_message()
            text = render_status(json.loads(message))
            if not args.watch:
                print(text)
                return EXIT_OK
            print("\x1b[H\x1b[2J" + text, flush=True)


def cmd_status(args: argparse.Namespace) -> int:
    try:
        return trio.run(_status, args)
    except (OSError, trio.TooSlowError, HandshakeError, ConnectionClosed) as exc:
        print(f"framewire status: cannot read status from {args.url}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK


def _size(text: str) -> int:
    from .config import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="framewire", description="Relay framed data streams between instruments and monitors."
    )
    parser.add_argument("--version", action="version", version=f"framewire {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the daemon (the embedded demo without CONFIG)")
    run.add_argument("config", nargs="?", metavar="CONFIG", help="TOML configuration file")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.set_defaults(func=cmd_run)

    check = commands.add_parser("check", help="validate a configuration file")
    check.add_argument("config", metavar="CONFIG")
    check.set_defaults(func=cmd_check)

    protocol_help = f"wire protocol ({', '.join(protocols.names())}; default native)"
    recv = commands.add_parser("recv", help="connect to a server and print or save its frames")
    recv.add_argument("address", metavar="ADDRESS", help="tcp://host:port")
    recv.add_argument("--protocol", default="native", choices=protocols.names(), help=protocol_help)
    recv.add_argument("--count", type=int, default=0, help="stop after N frames")
    recv.add_argument(
        "--output", metavar="FILE", help="write the frames to FILE (- for stdout) instead"
    )
    recv.add_argument("--max-frame-size", type=_size, default=64 << 20, help="default 64MiB")
    recv.set_defaults(func=cmd_recv)

    send = commands.add_parser("send", help="send frames from a file (or stdin) to a receiver")
    send.add_argument("address", metavar="ADDRESS", help="tcp://host:port")
    send.add_argument("file", nargs="?", default="-", metavar="FILE", help="default: stdin")
    send.add_argument("--protocol", default="native", choices=protocols.names(), help=protocol_help)
    send.add_argument("--max-frame-size", type=_size, default=64 << 20, help="default 64MiB")
    send.set_defaults(func=cmd_send)

    status = commands.add_parser("status", help="show a running daemon's status")
    status.add_argument(
        "url", nargs="?", default="ws://127.0.0.1:8765/", metavar="URL", help="default %(default)s"
    )
    status.add_argument("--watch", action="store_true", help="keep updating")
    status.add_argument("--token", help="the [status] token, if one is set")
    status.set_defaults(func=cmd_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return code
