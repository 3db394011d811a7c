"""In-process: the Python a publish costs per idle direct-written client, against a plain loop.

One lossy native server endpoint's clients, built in this process without its accept loop:
``--clients`` socketpairs (UNIX, non-blocking), each with a subscription, a parked writer
task and the endpoint's direct writer, as ``ServerEndpoint._feed_client`` sets them up. Each
round publishes one 64-byte frame (written straight to every client's socket) and, over the
same sockets, runs a plain loop of ``os.write`` of the same 97 bytes; the fastest of
``--rounds`` of each and their difference per client are printed. ``--stub-write`` replaces
the daemon's ``os.write`` (the connection's and the endpoint's group's) with one that writes
nothing (the Python alone). Every round's
bytes are read out of the peers first, so no socket fills. To compare with another checkout,
run this file with ``PYTHONPATH=PATH`` from a directory outside this one.

Fails (AssertionError) if a writer task was woken or the endpoint's counters miss a frame.
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import time
from collections.abc import Sequence

import trio
import trio.testing

import framewire.daemon.transport as transport
from framewire import Frame, FrameKind
from framewire.config._address import parse_address
from framewire.config._schema import ServerConfig
from framewire.daemon.endpoints import server
from framewire.daemon.endpoints._base import ClientInfo, EndpointContext
from framewire.daemon.endpoints.server import ServerEndpoint
from framewire.daemon.stream import QueueBounds, StreamRegistry, Subscription
from framewire.daemon.transport import Connection


class _NoWrite:
    """``os`` with a ``write`` that takes every byte and writes none."""

    def __getattr__(self, name: str) -> object:
        return getattr(os, name)

    @staticmethod
    def write(fd: int, data: bytes) -> int:
        return len(data)


async def measure(clients: int, rounds: int) -> tuple[float, float]:
    """The fastest publish and the fastest plain loop, in seconds."""
    streams = StreamRegistry()
    endpoint = ServerEndpoint(
        "server",
        ServerConfig(
            listen=parse_address("tcp://127.0.0.1:0", listening=True),
            stream="fan",
            max_clients=clients,
        ),
        EndpointContext(streams),
    )
    # Set as _serve sets it when a client comes (an attribute of no use to older checkouts).
    stream = endpoint._stream = streams.get("fan")
    config = endpoint.config
    bounds = QueueBounds(config.max_queue_frames, config.max_queue_bytes)
    sockets: list[tuple[socket.socket, socket.socket]] = []
    # The endpoint's group of idle clients, as _serve makes it (None in older checkouts,
    # whose clients are offered each publish one by one).
    group = None
    group_type = getattr(server, "_DirectClients", None)
    if group_type is not None:
        group = endpoint._group = group_type(endpoint, stream)
        stream.add_group(group)

    async def parked(subscription: Subscription) -> None:
        await subscription.receive_batch()
        raise AssertionError("a direct-written client's writer was woken")

    async with trio.open_nursery() as nursery:
        for number in range(clients):
            ours, peer = socket.socketpair()
            ours.setblocking(False)
            peer.setblocking(False)
            sockets.append((ours, peer))
            connection = Connection(trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
            connection.yield_on_send = False
            subscription = stream.subscribe(
                bounds=bounds, label=f"client {number}", blocks_of="native"
            )
            client = ClientInfo(f"client {number}", subscription=subscription)
            endpoint.status.clients[id(client)] = client
            feed = endpoint._feed_type(client)
            feed.connection = connection
            subscription.direct = feed
            if group is not None:
                subscription.group = group
            nursery.start_soon(parked, subscription)
        await trio.testing.wait_all_tasks_blocked()
        frames: Sequence[Frame] = [Frame(FrameKind.DATA, "sample", b"x" * 64, timestamp=1)]
        data = b"y" * 97
        fds = [ours.fileno() for ours, _ in sockets]

        def drain() -> None:
            for _, peer in sockets:
                try:
                    while peer.recv(65536):
                        pass
                except BlockingIOError:
                    pass

        publishes: list[float] = []
        loops: list[float] = []
        gc.disable()
        try:
            for _ in range(rounds):
                drain()
                start = time.perf_counter()
                stream.publish_nowait(frames)
                publishes.append(time.perf_counter() - start)
                drain()
                start = time.perf_counter()
                write = os.write
                for fd in fds:
                    write(fd, data)
                loops.append(time.perf_counter() - start)
        finally:
            gc.enable()
        assert endpoint.status.frames_out == rounds * clients, endpoint.status.frames_out
        nursery.cancel_scope.cancel()
    for ours, peer in sockets:
        ours.close()
        peer.close()
    return min(publishes), min(loops)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--clients", type=int, default=5000, help="socketpairs (2 fds each)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--stub-write", action="store_true", help="the daemon writes nothing")
    args = parser.parse_args(argv)
    if args.stub_write:
        transport.os = _NoWrite()  # type: ignore[attr-defined,assignment]
        if hasattr(server, "os"):  # where the endpoint's group writes
            server.os = _NoWrite()
    publish, loop = trio.run(measure, args.clients, args.rounds)
    clients = args.clients
    print(
        f"{clients} clients: publish {publish * 1e3:.2f} ms ({publish / clients * 1e6:.2f} µs"
        f" per client), plain os.write loop {loop * 1e3:.2f} ms"
        f" ({loop / clients * 1e6:.2f} µs); publish - loop {(publish - loop) / clients * 1e6:.2f}"
        " µs per client"
    )


if __name__ == "__main__":
    main()
