"""framewire between real dv-processing peers (from PyPI; every peer in its own process).

A real NetworkWriter is framewire's upstream (a receiver in connect mode); real NetworkReaders
are clients of framewire's server. A dv reader aborts its process on a packet it does not
expect and never reconnects, so every check here runs the peers as subprocesses with a
timeout on every wait.
"""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from framewire.daemon import Daemon
from framewire.frame import Frame
from framewire.protocols.aedat4 import Aedat4Decoder

from ..helpers import port_of, running_daemon
from .peers import PATIENCE, Peer, dv_peer

pytestmark = pytest.mark.interop
pytest.importorskip("dv_processing")
trustme = pytest.importorskip("trustme")

BATCHES = 5
EVENTS = 500
#: Timestamps of the first and second round of writes.
ROUND_A, ROUND_B = 1_000_000, 2_000_000

RELAY = """
[daemon]
grace_period = "2s"

[endpoints.dv-in]
kind = "receiver"
connect = "{upstream}"
protocol = "aedat4"
stream = "camera"
reconnect = {{ initial = "50ms", maximum = "1s" }}
{upstream_tls}

[endpoints.dv-out]
kind = "server"
listen = "{downstream}"
protocol = "aedat4"
stream = "camera"
max_queue_bytes = "{queue_bytes}"
{downstream_tls}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        number: int = s.getsockname()[1]
        return number


class Setup:
    """Addresses and certificates for one transport."""

    def __init__(self, transport: str, directory: Path) -> None:
        self.transport = transport
        self.writer_args: list[str] = []
        self.reader_args: list[str] = []
        upstream_tls = downstream_tls = ""
        if transport == "unix":
            writer_path = str(directory / "writer.sock")
            self.writer_address = writer_path
            self.upstream = f"unix://{writer_path}"
            self.downstream = f"unix://{directory / 'relay.sock'}"
        else:
            port = free_port()
            self.writer_address = str(port)
            scheme = "tls" if transport == "tls" else "tcp"
            self.upstream = f"{scheme}://127.0.0.1:{port}"
            self.downstream = f"{scheme}://127.0.0.1:0"
        if transport == "lz4":
            self.writer_args.append("--lz4")
        if transport == "tls":
            ca = trustme.CA()
            files = {}
            for name, blob in {
                "ca.pem": ca.cert_pem,
                "writer.pem": ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem,
                "relay.pem": ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem,
                "reader.pem": ca.issue_cert("reader").private_key_and_cert_chain_pem,
            }.items():
                blob.write_to_path(str(directory / name))
                files[name] = str(directory / name)
            # dv takes a certificate chain and a key file: one PEM holding both serves as
            # either.
            self.writer_args += ["--tls", files["writer.pem"], files["writer.pem"], files["ca.pem"]]
            self.reader_args += ["--tls", files["reader.pem"], files["reader.pem"]]
            # The writer demands a client certificate signed by its CA; framewire verifies
            # the writer's certificate against the same CA (on by default).
            upstream_tls = (
                "[endpoints.dv-in.tls]\n"
                f'certificate = "{files["relay.pem"]}"\nkey = "{files["relay.pem"]}"\n'
                f'ca = "{files["ca.pem"]}"\n'
            )
            downstream_tls = (
                "[endpoints.dv-out.tls]\n"
                f'certificate = "{files["relay.pem"]}"\nkey = "{files["relay.pem"]}"\n'
            )
        self.upstream_tls, self.downstream_tls = upstream_tls, downstream_tls

    def config(self, queue_bytes: str = "64MiB") -> str:
        return RELAY.format(
            upstream=self.upstream,
            downstream=self.downstream,
            upstream_tls=self.upstream_tls,
            downstream_tls=self.downstream_tls,
            queue_bytes=queue_bytes,
        )

    def reader_address(self, daemon: Daemon) -> str:
        address = daemon.endpoints["dv-out"].status.address[0]
        if self.transport == "unix":
            return address.removeprefix("unix:")
        return str(port_of(address))


async def header_cached(daemon: Daemon) -> None:
    stream = daemon.streams.get("camera")
    await wait_until_patient(lambda: len(stream.metadata) == 1)


async def wait_until_patient(predicate: Callable[[], bool]) -> None:
    """Poll ``predicate`` (state with no event to wait on) for up to PATIENCE seconds."""
    with trio.fail_after(PATIENCE):
        while not predicate():  # noqa: ASYNC110 - nothing to wait on but the state itself
            await trio.sleep(0.01)


async def connected(reader: Peer, compression: str) -> None:
    line = await reader.line()
    assert line == f"connected DVXplorer_test {compression}", line


@pytest.mark.parametrize("transport", ["tcp", "lz4", "tls", "unix"])
async def test_writer_to_two_readers_the_late_one_decodes_the_same_events(
    transport: str,
) -> None:
    with tempfile.TemporaryDirectory(prefix="fw-dv-") as tmp:
        setup = Setup(transport, Path(tmp))
        compression = "CompressionType.LZ4" if transport == "lz4" else "CompressionType.NONE"
        async with dv_peer("write", setup.writer_address, *setup.writer_args) as writer:
            assert await writer.line() == "ready"
            async with running_daemon(setup.config()) as daemon:
                await header_cached(daemon)
                address = setup.reader_address(daemon)
                count = BATCHES * EVENTS
                async with dv_peer(
                    "read", address, str(ROUND_B), str(count), *setup.reader_args
                ) as early:
                    await connected(early, compression)
                    # A raw client sees exactly what framewire forwards.
                    raw = await open_raw(transport, address)
                    server = daemon.endpoints["dv-out"]
                    clients = 1 if raw is None else 2
                    await wait_until_patient(lambda: len(server.status.clients) == clients)
                    await writer.tell(f"write {BATCHES} {ROUND_A} {EVENTS}")
                    assert (await writer.line()).startswith("wrote ")
                    async with dv_peer(
                        "read", address, str(ROUND_B), str(count), *setup.reader_args
                    ) as late:
                        await connected(late, compression)
                        await wait_until_patient(lambda: len(server.status.clients) == clients + 1)
                        await writer.tell(f"write {BATCHES} {ROUND_B} {EVENTS}")
                        written = (await writer.line()).split()[1]
                        early_result = (await early.line()).split()
                        late_result = (await late.line()).split()
                    assert early_result == ["done", str(2 * count), written]
                    assert late_result == ["done", str(count), written]
                    await check_raw(raw, 2 * BATCHES, lz4=transport == "lz4")
                    await writer.tell("exit")


async def open_raw(transport: str, address: str) -> trio.abc.Stream | None:
    """A plain-socket client of framewire's server (not for TLS)."""
    if transport == "tls":
        return None
    if transport == "unix":
        return await trio.open_unix_socket(address)
    return await trio.open_tcp_stream("127.0.0.1", int(address))


async def check_raw(stream: trio.abc.Stream | None, packets: int, *, lz4: bool) -> None:
    """The raw client got one IOHeader and ``packets`` whole packets, LZ4 ones untouched."""
    if stream is None:
        return
    decoder = Aedat4Decoder(max_frame_size=1 << 26)
    frames: list[Frame] = []
    with trio.fail_after(PATIENCE):
        while len(frames) < 1 + packets:
            data = await stream.receive_some(1 << 16)
            assert data, f"closed after {len(frames)} frames"
            frames += decoder.feed(data)
    await stream.aclose()
    assert decoder.header is not None
    assert decoder.header.compression == (1 if lz4 else 0)
    assert [frame.type for frame in frames] == ["IOHeader"] + ["EVTS"] * packets
    for frame in frames[1:]:
        body = bytes(frame.payload)[8:]
        assert body.startswith(b"\x04\x22\x4d\x18") if lz4 else body[8:12] == b"EVTS"


async def test_a_stalled_reader_does_not_slow_another_and_memory_stays_bounded() -> None:
    with tempfile.TemporaryDirectory(prefix="fw-dv-") as tmp:
        setup = Setup("tcp", Path(tmp))
        async with dv_peer("write", setup.writer_address) as writer:
            assert await writer.line() == "ready"
            async with running_daemon(setup.config(queue_bytes="2MiB")) as daemon:
                await header_cached(daemon)
                address = setup.reader_address(daemon)
                server = daemon.endpoints["dv-out"]
                # A client that reads nothing, with the smallest receive buffer.
                stalled = socket.socket()
                stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                stalled.connect(("127.0.0.1", int(address)))
                try:
                    batches, size = 100, 20_000  # 100 packets of 320 kB: 32 MB in all
                    async with dv_peer("read", address, str(ROUND_B), str(batches * size)) as fast:
                        await connected(fast, "CompressionType.NONE")
                        await wait_until_patient(lambda: len(server.status.clients) == 2)
                        peer = f"127.0.0.1:{stalled.getsockname()[1]}"
                        clients = server.status.clients.values()
                        stalled_client = next(c for c in clients if c.peer == peer)
                        fast_client = next(c for c in clients if c.peer != peer)
                        received = daemon.endpoints["dv-in"].status
                        # Paced by the fast reader's progress, not its speed: each batch goes
                        # once framewire has written the last one to the fast reader, so on
                        # a machine too busy to run that reader at once its queue (2 MiB)
                        # never fills, while the stalled reader's does.
                        await writer.tell(f"write {batches} {ROUND_B} {size} paced")
                        for index in range(batches):
                            assert await writer.line() == f"batch {index}"
                            await wait_until_patient(
                                lambda: (
                                    received.frames_in >= index + 2  # noqa: B023
                                    and fast_client.frames_sent >= received.frames_in
                                )
                            )
                            await writer.tell("next")
                        written = (await writer.line()).split()[1]
                        result = (await fast.line()).split()
                    assert result == ["done", str(batches * size), written]
                    subscription = stalled_client.subscription
                    assert subscription is not None
                    assert subscription.frames_dropped > 0
                    # Bounded by configuration: at most max_queue_bytes queued (plus the
                    # one packet a queue always admits), whatever the client's speed.
                    assert subscription.queued_bytes <= 2 * 1024 * 1024 + 400_000
                finally:
                    stalled.close()
                await writer.tell("exit")
