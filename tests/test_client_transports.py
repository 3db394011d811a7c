"""framewire.client over tls:// and unix://: the trio client and the BlockingClient against a
link endpoint of an in-process daemon (certificates made with trustme)."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from framewire import Frame, FrameKind
from framewire.client import BlockingClient, open_client
from framewire.daemon import Daemon, Policy

from .helpers import port_of, running_daemon
from .test_tls_unix import RECEIVER, Pki, tmp  # noqa: F401 - tmp is a fixture

trustme = pytest.importorskip("trustme")

LINK = """
[endpoints.app]
kind = "link"
listen = "{listen}"
publish = "from-app"
subscribe = "to-app"
keepalive = "200ms"
timeout = "5s"
{tls}
"""


@pytest.fixture
def pki(tmp: Path) -> Pki:  # noqa: F811 - the fixture imported above
    return Pki(tmp)


def data(i: int) -> Frame:
    return Frame(FrameKind.DATA, "sample", b"%d" % i, timestamp=i)


@asynccontextmanager
async def tls_link(pki: Pki) -> AsyncIterator[tuple[Daemon, str]]:
    table = f'[endpoints.app.tls]\ncertificate = "{pki.server_cert}"\nkey = "{pki.server_cert}"\n'
    async with running_daemon(LINK.format(listen="tls://127.0.0.1:0", tls=table)) as daemon:
        address = daemon.endpoints["app"].status.address[0]
        yield daemon, f"tls://127.0.0.1:{port_of(address)}"


@asynccontextmanager
async def unix_link(directory: Path) -> AsyncIterator[tuple[Daemon, str]]:
    address = f"unix://{directory}/app.sock"
    async with running_daemon(LINK.format(listen=address, tls="")) as daemon:
        yield daemon, address


async def round_trip_trio(daemon: Daemon, address: str, context: ssl.SSLContext | None) -> None:
    """One frame each way through the trio client."""
    from_app = daemon.streams.get("from-app").subscribe(policy=Policy.LOSSLESS)
    await daemon.streams.get("to-app").publish([data(1)])
    async with open_client(address, ssl_context=context) as client:
        with trio.fail_after(10):
            assert await client.receive() == data(1)
            await client.send(data(2))
            assert await from_app.receive_batch() == [data(2)]


def round_trip_blocking(address: str, context: ssl.SSLContext | None) -> tuple[Frame, str | None]:
    """In a thread: receive a frame and send one back through a BlockingClient."""
    with BlockingClient(address, timeout=10, ssl_context=context) as client:
        frame = client.receive()
        client.send(data(4))
        return frame, client.tls_version


async def round_trip_both(daemon: Daemon, address: str, context: ssl.SSLContext | None) -> None:
    await round_trip_trio(daemon, address, context)
    from_app = daemon.streams.get("from-app").subscribe(policy=Policy.LOSSLESS)
    await daemon.streams.get("to-app").publish([data(3)])
    with trio.fail_after(20):
        frame, version = await trio.to_thread.run_sync(round_trip_blocking, address, context)
        assert frame == data(3)
        assert await from_app.receive_batch() == [data(4)]
    assert (version is not None) == address.startswith("tls://")


async def test_both_clients_over_tls(pki: Pki) -> None:
    async with tls_link(pki) as (daemon, address):
        await round_trip_both(daemon, address, ssl.create_default_context(cafile=pki.ca_file))


def connect_blocking(address: str, context: ssl.SSLContext | None = None) -> None:
    with BlockingClient(address, timeout=10, ssl_context=context):
        pass


async def test_tls_is_verified_by_default_and_never_plain(pki: Pki) -> None:
    async with tls_link(pki) as (_, address):
        # No context: the system's trust store, which does not know the test CA. Refused,
        # and said why, by both clients: they did TLS, not plain TCP.
        with pytest.raises(ConnectionError, match="certificate verify failed"):
            async with open_client(address):
                pass
        with trio.fail_after(20), pytest.raises(ConnectionError, match="certificate verify"):
            await trio.to_thread.run_sync(connect_blocking, address)
        # The right CA but the wrong name.
        context = ssl.create_default_context(cafile=pki.ca_file)
        with pytest.raises(ConnectionError, match="certificate verify failed"):
            async with open_client(address, ssl_context=context, server_name="other.example"):
                pass
    # TLS settings with an address that is not tls:// are a mistake, not ignored.
    with pytest.raises(ValueError, match="tls:// addresses only"):
        BlockingClient("tcp://127.0.0.1:1", ssl_context=ssl.create_default_context())


def test_blocking_tls_client_against_a_plain_server_fails_clearly() -> None:
    """A BlockingClient given tls:// to a plain TCP peer fails its handshake, in one line."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        listener.settimeout(10)

        def answer_in_plain() -> None:
            peer, _ = listener.accept()
            with peer:
                peer.recv(4096)  # the ClientHello
                peer.sendall(b"not TLS at all\r\n" * 8)

        thread = threading.Thread(target=answer_in_plain)
        thread.start()
        try:
            with pytest.raises(ConnectionError, match=r"^TLS handshake with tls://127\.0\.0\.1"):
                BlockingClient(f"tls://127.0.0.1:{port}", timeout=10)
        finally:
            thread.join(10)


async def test_both_clients_over_unix_sockets(tmp: Path) -> None:  # noqa: F811
    async with unix_link(tmp) as (daemon, address):
        await round_trip_both(daemon, address, None)
    missing = f"unix://{tmp}/missing.sock"
    with pytest.raises(FileNotFoundError):
        async with open_client(missing):
            pass
    with pytest.raises(FileNotFoundError):
        BlockingClient(missing, timeout=10)


def client_context(pki: Pki, cert: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki.ca_file)
    if cert is not None:
        context.load_cert_chain(cert)
    return context


async def test_a_client_refused_by_a_tls_13_receiver_is_told_before_it_sends(pki: Pki) -> None:
    """A TLS 1.3 receiver judges the client's certificate after the handshake: both clients
    wait for that verdict, so a refused one raises, saying why, instead of sending frames the
    receiver drops; an accepted one sends, and its frames arrive."""
    table = pki.server_table(f'ca = "{pki.ca_file}"', "require_client_cert = true")
    config = RECEIVER.format(tls=table.replace(".out.", ".in."))
    async with running_daemon(config) as daemon:
        address = f"tls://127.0.0.1:{port_of(daemon.endpoints['in'].status.address[0])}"
        arrived = daemon.streams.get("s").subscribe(policy=Policy.LOSSLESS)
        for cert, reason in (
            (None, "the server requires a client certificate"),
            (pki.stranger_cert, "the server refused our client certificate"),
        ):
            with pytest.raises(ConnectionError, match=reason), trio.fail_after(30):
                async with open_client(address, ssl_context=client_context(pki, cert)):
                    pass

            def blocking(cert: str | None = cert) -> None:
                BlockingClient(address, timeout=10, ssl_context=client_context(pki, cert))

            with pytest.raises(ConnectionError, match=reason), trio.fail_after(30):
                await trio.to_thread.run_sync(blocking)
        context = client_context(pki, pki.client_cert)
        async with open_client(address, ssl_context=context) as client:
            await client.send(data(1))

        def send_blocking() -> None:
            with BlockingClient(address, timeout=10, ssl_context=context) as client:
                client.send(data(2))

        await trio.to_thread.run_sync(send_blocking)
        got: list[Frame] = []
        with trio.fail_after(30):
            while len(got) < 2:
                got += await arrived.receive_batch()
        assert got == [data(1), data(2)]
