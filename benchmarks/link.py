"""Link throughput: a framewire link pair against a direct socket pair, in one run.

Run ``python benchmarks/link.py`` (``--help`` for options). For 1 MiB and 64-byte timestamped
messages it measures, side by side, between two processes on 127.0.0.1:

direct
    a blocking ``sendall`` of pre-encoded Datalink messages into a blocking ``recv_into``
    that only counts bytes: what the kernel and two Python processes can move, the ceiling;
link (datalink) and link (native)
    two processes, each running one ``LinkEndpoint`` (the receiving one listens, the sending
    one connects). The sender's application task makes a fresh timestamped frame for every
    message and publishes it into the stream its link sends (lossless: it waits for room);
    the receiving link decodes, publishes into its stream, and an application task there
    takes the frames out of a lossless subscription and counts them. Everything a framewire
    application pays is in the figure: frame objects, queues, encoding, keepalives, decoding.

The rate is taken in the receiving process over ``--duration`` seconds, starting
``--warmup`` seconds after the first message arrived. The script runs itself as the four
kinds of child process (``--role``, not for direct use); every process it starts is stopped
on the way out (SIGTERM, then SIGKILL), and every wait has a time limit.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
import time
from collections.abc import Sequence
from typing import Final

import trio
from _harness import (
    HOST,
    MIB,
    Child,
    add_case_options,
    add_role_options,
    apply_quick,
    exit_on_sigterm,
    machine_text,
    payload_of,
    report,
    report_rate,
    script_argv,
    size_label,
)

from framewire.config import Address, LinkConfig
from framewire.daemon.endpoints import EndpointContext
from framewire.daemon.endpoints.link import LinkEndpoint
from framewire.daemon.stream import Policy, QueueBounds, StreamRegistry
from framewire.frame import Frame, FrameKind
from framewire.protocols.datalink import DatalinkEncoder

#: Datalink's README: "~4.3 Gb/s in Python" with 1 MiB messages over local TCP.
DATALINK_PYTHON_GBIT: Final = 4.3
BLOCK_BYTES: Final = 4 * MIB
IO_TIMEOUT: Final = 10.0
START_TIMEOUT: Final = 15.0
QUEUE_FRAMES: Final = 65536
QUEUE_BYTES: Final = 64 * MIB


def datalink_message(size: int) -> bytes:
    frame = Frame(FrameKind.DATA, "bench", payload_of(size), time.time_ns())
    return b"".join(bytes(b) for b in DatalinkEncoder().encode(frame))


def batch_size(payload_size: int) -> int:
    """Messages per publish: about 4 MiB, at most 1024."""
    return max(1, min(1024, BLOCK_BYTES // payload_size))


# -- the direct pair ------------------------------------------------------------------------


def direct_sender(port: int, payload_size: int, seconds: float) -> None:
    one = datalink_message(payload_size)
    block = one * max(1, BLOCK_BYTES // len(one))
    deadline = time.monotonic() + seconds
    with socket.create_connection((HOST, port), timeout=IO_TIMEOUT) as sock:
        try:
            while time.monotonic() < deadline:
                sock.sendall(block)
        except ConnectionError:
            pass  # the receiver has measured and gone


def direct_receiver(payload_size: int, warmup: float, duration: float) -> None:
    message_size = len(datalink_message(payload_size))
    with socket.create_server((HOST, 0)) as listener:
        print(f"ready {listener.getsockname()[1]}", flush=True)
        listener.settimeout(START_TIMEOUT)
        sock, _ = listener.accept()
    with sock:
        sock.settimeout(IO_TIMEOUT)
        view = memoryview(bytearray(BLOCK_BYTES))
        if not sock.recv_into(view):
            raise SystemExit("direct receiver: closed before the first message")
        start = time.monotonic() + warmup
        while time.monotonic() < start:
            sock.recv_into(view)
        total, t0 = 0, time.monotonic()
        end = t0 + duration
        while (now := time.monotonic()) < end:
            n = sock.recv_into(view)
            if not n:
                raise SystemExit("direct receiver: closed during the measurement")
            total += n
    report(total / message_size, total / message_size * payload_size, now - t0)


# -- the link pair --------------------------------------------------------------------------


async def link_sender(port: int, protocol: str, payload_size: int, seconds: float) -> None:
    streams = StreamRegistry()
    config = LinkConfig(
        connect=Address("tcp", HOST, port),
        protocol=protocol,
        subscribe="out",
        policy="lossless",
        max_queue_frames=QUEUE_FRAMES,
        max_queue_bytes=QUEUE_BYTES,
        timeout=IO_TIMEOUT,
    )
    endpoint = LinkEndpoint("bench-out", config, EndpointContext(streams))
    payload = payload_of(payload_size)
    n = batch_size(payload_size)
    out = streams.get("out")
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.run)
        with trio.fail_after(START_TIMEOUT):
            await endpoint.wait_for_state("up")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            now = time.time_ns()
            await out.publish([Frame(FrameKind.DATA, "bench", payload, now) for _ in range(n)])
        nursery.cancel_scope.cancel()


async def link_receiver(protocol: str, payload_size: int, warmup: float, duration: float) -> None:
    streams = StreamRegistry()
    config = LinkConfig(
        listen=Address("tcp", HOST, 0),
        protocol=protocol,
        publish="in",
        timeout=IO_TIMEOUT,
    )
    endpoint = LinkEndpoint("bench-in", config, EndpointContext(streams))
    received = streams.get("in").subscribe(
        policy=Policy.LOSSLESS, bounds=QueueBounds(QUEUE_FRAMES, QUEUE_BYTES)
    )
    expected = payload_of(payload_size)
    async with trio.open_nursery() as nursery:
        await nursery.start(endpoint.run)
        print(f"ready {endpoint.status.address[0].rsplit(':', 1)[1]}", flush=True)
        with trio.fail_after(START_TIMEOUT):
            first = await received.receive_batch(QUEUE_FRAMES, QUEUE_BYTES)
        if bytes(first[0].payload) != expected or not first[0].timestamp:
            raise SystemExit("link receiver: the first message differs from the one sent")
        start = time.monotonic() + warmup
        while time.monotonic() < start:
            with trio.fail_after(IO_TIMEOUT):
                await received.receive_batch(QUEUE_FRAMES, QUEUE_BYTES)
        frames, t0 = 0, time.monotonic()
        end = t0 + duration
        while (now := time.monotonic()) < end:
            with trio.fail_after(IO_TIMEOUT):
                frames += len(await received.receive_batch(QUEUE_FRAMES, QUEUE_BYTES))
        nursery.cancel_scope.cancel()
    report(frames, frames * payload_size, now - t0)


# -- orchestration --------------------------------------------------------------------------


def role(name: str, args: argparse.Namespace, **options: object) -> list[str]:
    return script_argv(
        __file__, f"--role={name}", warmup=args.warmup, duration=args.duration, **options
    )


def measure(path: str, payload_size: int, args: argparse.Namespace) -> dict[str, float]:
    """One case: start the receiver, then the sender; return the receiver's report."""
    protocol = path.split()[-1].strip("()") if path != "direct" else "datalink"
    kind = "direct" if path == "direct" else "link"
    seconds = args.warmup + args.duration + 2 * START_TIMEOUT
    receiver_argv = role(f"{kind}-receiver", args, payload_size=payload_size, protocol=protocol)
    with Child("receiver", receiver_argv) as receiver:
        port = receiver.ready_port(START_TIMEOUT)
        sender_argv = role(
            f"{kind}-sender",
            args,
            port=port,
            payload_size=payload_size,
            protocol=protocol,
            seconds=seconds,
        )
        with Child("sender", sender_argv):
            result: dict[str, float] = json.loads(
                receiver.readline(args.warmup + args.duration + 2 * START_TIMEOUT)
            )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add_case_options(parser, duration=2.0, quick_duration=0.8)
    parser.add_argument(
        "--protocols", default="datalink,native", help="link protocols (default both)"
    )
    add_role_options(parser)
    parser.add_argument("--protocol", default="datalink", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    apply_quick(args, 0.8)

    # A child's link logs its peer leaving at the end; that is expected, not news.
    logging.getLogger("framewire").setLevel(logging.ERROR)
    if args.role == "direct-sender":
        direct_sender(args.port, args.payload_size, args.seconds)
    elif args.role == "direct-receiver":
        direct_receiver(args.payload_size, args.warmup, args.duration)
    elif args.role == "link-sender":
        trio.run(link_sender, args.port, args.protocol, args.payload_size, args.seconds)
    elif args.role == "link-receiver":
        trio.run(link_receiver, args.protocol, args.payload_size, args.warmup, args.duration)
    if args.role is not None:
        return 0

    exit_on_sigterm()
    sizes = [int(size) for size in args.sizes.split(",")]
    paths = ["direct"] + [f"link ({p})" for p in args.protocols.split(",")]
    print(
        f"framewire link benchmark: {machine_text()}, "
        f"warm-up {args.warmup:g}s, {args.duration:g}s per case"
    )
    print(f"{'payload':>8}  {'path':<16} {'received rate':>20}  {'link/direct':>11}")
    summary: list[str] = []
    for size in sizes:
        label = size_label(size)
        direct: dict[str, float] | None = None
        for path in paths:
            result = measure(path, size, args)
            if path == "direct":
                direct = result
                ratio = ""
            else:
                assert direct is not None
                per_second = result["messages"] / result["seconds"]
                ratio_value = per_second / (direct["messages"] / direct["seconds"])
                ratio = f"{ratio_value:.3f}"
                if size >= MIB:
                    gbit = result["bytes"] * 8 / result["seconds"] / 1e9
                    verdict = "beats" if gbit > DATALINK_PYTHON_GBIT else "does NOT beat"
                    summary.append(
                        f"  {label} {path}: {gbit:.2f} Gbit/s {verdict} Datalink's claimed "
                        f"{DATALINK_PYTHON_GBIT} Gbit/s from Python ({ratio_value:.2f} x direct)"
                    )
            print(
                f"{label:>8}  {path:<16} {report_rate(result, size):>20}  {ratio:>11}", flush=True
            )
    if summary:
        print("\nsummary:")
        print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
