"""Shared test helpers: native-protocol peers over real loopback sockets or memory streams."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import trio
import trio.testing

from framewire import Frame
from framewire.config import Config, parse_config
from framewire.daemon import Daemon
from framewire.daemon.stream import Subscription
from framewire.protocols.native import NativeDecoder, NativeEncoder

ENCODER = NativeEncoder()


def encode(frames: Sequence[Frame]) -> bytes:
    return b"".join(bytes(b) for b in ENCODER.encode_batch(frames))


def port_of(address: str) -> int:
    """The port of a status address such as ``127.0.0.1:4536``."""
    return int(address.rsplit(":", 1)[1])


class NativePeer:
    """A test peer that reads native frames from a stream, keeping the raw bytes too."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.decoder = NativeDecoder(max_frame_size=1 << 26)
        self.frames: list[Frame] = []
        self.raw = bytearray()

    async def read(self, count: int) -> list[Frame]:
        """Read until ``count`` frames in all have arrived; return them."""
        while len(self.frames) < count:
            data = await self.stream.receive_some(1 << 16)
            if not data:
                raise EOFError(f"stream closed after {len(self.frames)} of {count} frames")
            self.raw += data
            self.frames += self.decoder.feed(data)
        return self.frames[:count]

    async def read_to_end(self) -> list[Frame]:
        """Read until the peer closes; return every frame."""
        while data := await self.stream.receive_some(1 << 16):
            self.raw += data
            self.frames += self.decoder.feed(data)
        self.decoder.end_of_input()
        return self.frames

    async def send(self, frames: Sequence[Frame]) -> None:
        await self.stream.send_all(encode(frames))


async def connect(port: int) -> NativePeer:
    return NativePeer(await trio.open_tcp_stream("127.0.0.1", port))


async def wait_until(predicate: Callable[[], bool], *, patience: float = 30) -> None:
    """Poll ``predicate`` until it holds (TooSlowError after ``patience`` seconds).

    Only for state that offers no event to wait on, such as log records or an endpoint's
    client table; frames are awaited through a subscription instead. ``patience`` is only a
    last guard against a hang, so it is generous: on a machine whose CPUs are busy with other
    work, what takes milliseconds alone can take seconds.
    """
    with trio.fail_after(patience):
        while not predicate():  # noqa: ASYNC110 - nothing to wait on but the state itself
            await trio.sleep(0.005)


@asynccontextmanager
async def running_daemon(
    config: Config | str, *, source: str = "<test>", config_path: Path | None = None
) -> AsyncIterator[Daemon]:
    """A daemon running ``config`` (a Config or TOML text) in-process; shut down on exit."""
    daemon = Daemon(
        parse_config(config) if isinstance(config, str) else config,
        source=source,
        config_path=config_path,
    )
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            await nursery.start(daemon.run)
        yield daemon
        daemon.request_shutdown()


def endpoint_port(daemon: Daemon, name: str) -> int:
    """The port endpoint ``name`` is bound to (its first address)."""
    return port_of(daemon.endpoints[name].status.address[0])


async def server_clients(daemon: Daemon, count: int, name: str = "out") -> list[NativePeer]:
    """``count`` native clients of the server endpoint ``name``, each connected once the
    server counts the one before (so they are in its client table in this order)."""
    status = daemon.endpoints[name].status
    port = endpoint_port(daemon, name)
    peers: list[NativePeer] = []
    for _ in range(count):
        peers.append(await connect(port))
        await wait_until(lambda: len(status.clients) == len(peers))
    return peers


async def parked(subscription: Subscription, nursery: trio.Nursery) -> list[list[Frame]]:
    """Start a consumer of ``subscription`` that records each batch; return once it waits."""
    batches: list[list[Frame]] = []

    async def consume() -> None:
        while True:
            batches.append(await subscription.receive_batch())

    nursery.start_soon(consume)
    await trio.testing.wait_all_tasks_blocked()
    return batches
