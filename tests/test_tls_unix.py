"""TLS (certificates made with trustme) and UNIX socket transports."""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from framewire import Frame, FrameKind
from framewire.config import Address, ConfigError, TLSConfig, parse_address, parse_config
from framewire.daemon import Daemon
from framewire.daemon.endpoints import Transports
from framewire.daemon.stream import Policy
from framewire.daemon.transport import (
    Connection,
    HandshakeFailed,
    TLSListener,
    TLSRefused,
    open_unix_listener,
    server_tls_context,
)

from .helpers import NativePeer, port_of, running_daemon, wait_until
from .test_systemd import free_port

trustme = pytest.importorskip("trustme")

SERVED = """
[endpoints.source]
kind = "generator"
stream = "demo"
rate = 1000.0
size = 100

[endpoints.out]
kind = "server"
listen = "{listen}"
stream = "demo"
{tls}
"""


@pytest.fixture
def tmp() -> Iterator[Path]:
    # Short paths: a UNIX socket path has at most 107 bytes.
    with tempfile.TemporaryDirectory(prefix="fw-") as directory:
        yield Path(directory)


class Pki:
    def __init__(self, directory: Path) -> None:
        self.ca = trustme.CA()
        self.other_ca = trustme.CA()
        self.dir = directory
        self.ca_file = self.write("ca.pem", self.ca.cert_pem)
        self.other_ca_file = self.write("other-ca.pem", self.other_ca.cert_pem)
        server = self.ca.issue_cert("127.0.0.1", "localhost")
        self.server_cert = self.write("server.pem", server.private_key_and_cert_chain_pem)
        client = self.ca.issue_cert("client")
        self.client_cert = self.write("client.pem", client.private_key_and_cert_chain_pem)
        stranger = self.other_ca.issue_cert("client")
        self.stranger_cert = self.write("stranger.pem", stranger.private_key_and_cert_chain_pem)

    def write(self, name: str, blob: object) -> str:
        path = self.dir / name
        blob.write_to_path(str(path))  # type: ignore[attr-defined]
        return str(path)

    def server_table(self, *extra: str) -> str:
        lines = [f'certificate = "{self.server_cert}"', f'key = "{self.server_cert}"', *extra]
        return "[endpoints.out.tls]\n" + "\n".join(lines) + "\n"


@pytest.fixture
def pki(tmp: Path) -> Pki:
    return Pki(tmp)


async def read_some_frames(stream: trio.abc.Stream) -> None:
    peer = NativePeer(stream)
    with trio.fail_after(10):
        frames = await peer.read(3)
    assert frames[0].is_metadata
    await stream.aclose()


class Running:
    def __init__(self, text: str) -> None:
        self.daemon = Daemon(parse_config(text))

    def address(self) -> str:
        return self.daemon.endpoints["out"].status.address[0]


async def start(nursery: trio.Nursery, text: str) -> Running:
    running = Running(text)
    with trio.fail_after(10):
        await nursery.start(running.daemon.run)
    return running


def client_tls(pki: Pki, *, cert: str | None = None, ca: str | None = None) -> TLSConfig:
    return TLSConfig(certificate=cert, key=cert, ca=ca or pki.ca_file)


async def dial(address: str, tls: TLSConfig) -> trio.abc.Stream:
    connect = Transports().dial(parse_address(address), tls=tls)
    with trio.fail_after(10):
        return await connect()


# -- TLS -------------------------------------------------------------------------------------


async def test_tls_server_with_verifying_client(pki: Pki) -> None:
    async with trio.open_nursery() as nursery:
        running = await start(
            nursery, SERVED.format(listen="tls://127.0.0.1:0", tls=pki.server_table())
        )
        port = port_of(running.address())
        assert running.address().startswith("tls ")
        await read_some_frames(await dial(f"tls://127.0.0.1:{port}", client_tls(pki)))
        # A client that trusts another CA refuses the server (verification is on by default).
        with pytest.raises(ConnectionError, match="certificate verify failed"):
            await dial(f"tls://127.0.0.1:{port}", client_tls(pki, ca=pki.other_ca_file))
        # ... unless told not to verify.
        unverified = TLSConfig(verify=False)
        await read_some_frames(await dial(f"tls://127.0.0.1:{port}", unverified))
        running.daemon.request_shutdown()


async def test_mutual_tls_and_a_failed_handshake_is_one_line(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    table = pki.server_table(f'ca = "{pki.ca_file}"', "require_client_cert = true")
    async with trio.open_nursery() as nursery:
        running = await start(nursery, SERVED.format(listen="tls://127.0.0.1:0", tls=table))
        address = f"tls://127.0.0.1:{port_of(running.address())}"
        for stranger in (None, pki.stranger_cert):
            caplog.clear()
            stream: trio.abc.Stream | None = None
            try:
                stream = await dial(address, client_tls(pki, cert=stranger))
                # TLS 1.3: the client learns of the refusal on its first read.
                with trio.fail_after(10):
                    assert await stream.receive_some(100) == b""
            except (ConnectionError, trio.BrokenResourceError):
                pass
            finally:
                if stream is not None:
                    await trio.aclose_forcefully(stream)
            server = running.daemon.endpoints["out"]
            await wait_until(lambda: any("TLS handshake" in r.getMessage() for r in caplog.records))
            lines = [r.getMessage() for r in caplog.records if r.name.endswith(".out")]
            assert len(lines) == 1, lines
            assert lines[0].startswith("TLS handshake with 127.0.0.1:")
            assert not server.status.clients
        # The listener kept accepting: a client with a good certificate is served.
        await read_some_frames(await dial(address, client_tls(pki, cert=pki.client_cert)))
        running.daemon.request_shutdown()


RECEIVER = """
[endpoints.in]
kind = "receiver"
listen = "tls://127.0.0.1:0"
stream = "s"
{tls}
"""

SENDER = """
[endpoints.source]
kind = "generator"
stream = "s"
rate = 1000.0
count = 20

[endpoints.out]
kind = "sender"
connect = "{connect}"
stream = "s"
reconnect = {{ initial = "50ms", maximum = "200ms" }}

[endpoints.out.tls]
ca = "{ca}"
{cert}
"""


async def test_a_sender_refused_by_a_tls_13_receiver_writes_nothing_and_says_why(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """TLS 1.3 finishes a client's handshake before the server judges its certificate: a
    sender without the certificate a receiver requires used to write frames into the refused
    connection and count them sent. Now it writes nothing and says why, once; when the
    receiver stops requiring one, it delivers every frame."""
    caplog.set_level(logging.INFO)
    port = free_port()
    listen = RECEIVER.replace("127.0.0.1:0", f"127.0.0.1:{port}")
    mutual = pki.server_table(f'ca = "{pki.ca_file}"', "require_client_cert = true")
    connect = f"tls://127.0.0.1:{port}"
    async with running_daemon(SENDER.format(connect=connect, ca=pki.ca_file, cert="")) as sending:
        out = sending.endpoints["out"].status
        source = sending.endpoints["source"].status
        async with running_daemon(listen.format(tls=mutual.replace(".out.", ".in."))) as receiver:
            refused = receiver.endpoints["in"].status

            def refusals() -> int:
                return sum("TLS handshake with" in r.getMessage() for r in caplog.records)

            await wait_until(lambda: source.frames_out == 21)  # the metadata and 20 frames
            # Several refused attempts (a backoff of at most 200 ms), none written into.
            await wait_until(lambda: refusals() >= 3)
            assert out.last_error == (
                "the server requires a client certificate ([tls] certificate and key)"
            )
            assert out.frames_out == 0
            assert refused.frames_in == 0
            warnings = [
                r.getMessage()
                for r in caplog.records
                if r.levelno >= logging.WARNING and r.name.endswith(".out")
            ]
            # Once (the first, before the receiver was up, is "connection refused").
            assert warnings[1:] == [
                f"cannot connect to {connect}: the server requires a client certificate "
                "([tls] certificate and key); retrying with backoff"
            ]
        # The receiver comes back without requiring a client certificate: nothing was lost.
        async with running_daemon(
            listen.format(tls=pki.server_table().replace(".out.", ".in."))
        ) as receiver:
            accepted = receiver.endpoints["in"].status
            await wait_until(lambda: accepted.frames_in == 21)
            assert out.frames_out == 21


LINK = """
[endpoints.l]
kind = "link"
{where}
publish = "in"
subscribe = "out"
reconnect = {{ initial = "50ms", maximum = "200ms" }}

[endpoints.l.tls]
{tls}
"""


async def test_a_link_refused_by_a_tls_13_peer_loses_nothing(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """A connecting link without the certificate its peer requires writes nothing into the
    refused connection: its frames wait, and reach the peer once it accepts the link."""
    port = free_port()
    where = f'listen = "tls://127.0.0.1:{port}"'
    served = f'certificate = "{pki.server_cert}"\nkey = "{pki.server_cert}"'
    mutual = f'{served}\nca = "{pki.ca_file}"\nrequire_client_cert = true'
    dialing = LINK.format(where=f'connect = "tls://127.0.0.1:{port}"', tls=f'ca = "{pki.ca_file}"')
    frames = [Frame(FrameKind.METADATA, "m", b"meta"), Frame(FrameKind.DATA, "d", b"x" * 1000, 1)]
    async with running_daemon(dialing) as dialer:
        link = dialer.endpoints["l"].status
        async with running_daemon(LINK.format(where=where, tls=mutual)) as peer:
            await dialer.streams.get("out").publish(frames)
            await wait_until(
                lambda: sum("TLS handshake with" in r.getMessage() for r in caplog.records) >= 3
            )
            assert link.last_error == (
                "cannot connect: the server requires a client certificate ([tls] certificate "
                "and key)"
            )
            assert link.frames_out == 0
            assert peer.endpoints["l"].status.frames_in == 0
        async with running_daemon(LINK.format(where=where, tls=served)) as peer:
            # Subscribed before the link can deliver (it waits TLS_VERDICT_WAIT first).
            arrived = peer.streams.get("in").subscribe(policy=Policy.LOSSLESS)
            got: list[Frame] = []
            with trio.fail_after(30):
                while len(got) < len(frames):
                    got += await arrived.receive_batch()
            assert [(f.kind, f.type, bytes(f.payload)) for f in got] == [
                (f.kind, f.type, bytes(f.payload)) for f in frames
            ]


async def test_a_sending_client_hears_a_refusal_or_waits_its_patience(pki: Pki) -> None:
    """framewire's receivers send a TLS 1.3 client nothing before their first write: an
    accepted client hears nothing within its patience; a refused one hears the alert, with
    the reason."""
    table = pki.server_table(f'ca = "{pki.ca_file}"', "require_client_cert = true")
    async with running_daemon(RECEIVER.format(tls=table.replace(".out.", ".in."))) as receiver:
        address = f"tls://127.0.0.1:{port_of(receiver.endpoints['in'].status.address[0])}"
        stream = await dial(address, client_tls(pki, cert=pki.client_cert))
        with trio.fail_after(10):
            assert await Connection(stream).hear_tls_verdict(patience=0.05) is False
        await stream.aclose()
        for cert, reason in (
            (None, "the server requires a client certificate"),
            (pki.stranger_cert, "the server refused our client certificate"),
        ):
            stream = await dial(address, client_tls(pki, cert=cert))
            with pytest.raises(TLSRefused, match=reason), trio.fail_after(10):
                await Connection(stream).hear_tls_verdict(patience=60)
            await trio.aclose_forcefully(stream)


@pytest.mark.parametrize("speaks_first", [False, True])
def test_a_sending_client_hears_an_openssl_servers_session_ticket_at_once(
    pki: Pki, speaks_first: bool
) -> None:
    """An OpenSSL server (the ssl module's, as stunnel's or nginx's) sends its session
    tickets when it accepts a client: the client goes on at once, however long its patience;
    what the server sent meanwhile is read next."""
    context = server_tls_context(TLSConfig(certificate=pki.server_cert, key=pki.server_cert))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            with listener.accept()[0] as raw, context.wrap_socket(raw, server_side=True) as tls:
                tls.settimeout(30)
                if not speaks_first:
                    assert tls.recv(1) == b"?"
                tls.sendall(b"hello")
                tls.recv(1)  # until the client closes

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, serve)
                stream = await dial(f"tls://127.0.0.1:{port}", client_tls(pki))
                connection = Connection(stream)
                with trio.fail_after(30):
                    assert await connection.hear_tls_verdict(patience=3600) is True
                    if not speaks_first:
                        assert isinstance(stream, trio.SSLStream)
                        assert stream.session is not None
                        assert stream.session.has_ticket
                        await connection.send([b"?"])
                    buffer = memoryview(bytearray(5))
                    got = 0
                    while got < 5:
                        got += await connection.receive_into(buffer[got:])
                assert bytes(buffer) == b"hello"
                await trio.aclose_forcefully(stream)

        trio.run(main)


def test_tls_12_is_allowed_by_default_and_13_can_be_required(pki: Pki) -> None:
    default = server_tls_context(TLSConfig(certificate=pki.server_cert, key=pki.server_cert))
    assert default.minimum_version.name == "TLSv1_2"  # dv's peers speak only TLS 1.2
    strict = server_tls_context(
        TLSConfig(certificate=pki.server_cert, key=pki.server_cert, minimum_version="1.3")
    )
    assert strict.minimum_version.name == "TLSv1_3"
    with pytest.raises(ValueError, match="cannot load certificate /nonexistent"):
        server_tls_context(TLSConfig(certificate="/nonexistent", key="/nonexistent"))


async def test_handshake_timeout_with_a_silent_client(
    pki: Pki, mock_clock: trio.testing.MockClock
) -> None:
    mock_clock.autojump_threshold = 0
    server_stream, _client_stream = trio.testing.memory_stream_pair()
    listener = TLSListener(
        MemoryListener(server_stream),
        server_tls_context(TLSConfig(certificate=pki.server_cert, key=pki.server_cert)),
        handshake_timeout=3.0,
    )
    accepted = await listener.accept()
    connection = Connection(accepted, peer="silent", handshake_timeout=listener.handshake_timeout)
    start = trio.current_time()
    with pytest.raises(HandshakeFailed, match="TLS handshake with silent failed: no handshake"):
        await connection.establish()
    assert trio.current_time() - start == pytest.approx(3.0)


class MemoryListener(trio.abc.Listener[trio.abc.Stream]):
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream

    async def accept(self) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        return self.stream

    async def aclose(self) -> None:
        await self.stream.aclose()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('listen = "tls://127.0.0.1:0"', "tls: listen = 'tls://127.0.0.1:0' needs a \\[tls\\]"),
        (
            'listen = "tcp://127.0.0.1:0"\n[endpoints.out.tls]\ncertificate = "c"\nkey = "k"',
            "a \\[tls\\] table needs a tls:// address",
        ),
        (
            'listen = "tls://127.0.0.1:0"\n[endpoints.out.tls]\nca = "c"',
            "tls.certificate: required to listen",
        ),
        (
            'listen = "tls://127.0.0.1:0"\n[endpoints.out.tls]\ncertificate = "c"',
            "tls.key: set both certificate and key",
        ),
        (
            'listen = "tls://127.0.0.1:0"\n[endpoints.out.tls]\ncertificate = "c"\nkey = "k"\n'
            "require_client_cert = true",
            "tls.ca: require_client_cert needs ca",
        ),
        (
            'listen = "tls://127.0.0.1:0"\n[endpoints.out.tls]\ncertificate = "c"\nkey = "k"\n'
            'minimum_version = "1.1"',
            "minimum_version: expected one of '1.2', '1.3'",
        ),
        ('listen = "unix:///run/x.sock"\nsocket_mode = "999"', "not an octal number"),
        ('listen = "unix:///run/x.sock"\nsocket_mode = 4096', "permission bits only"),
        ('listen = "unix://run/x.sock"', "must be absolute"),
        ('listen = "unix:///' + "x" * 120 + '"', "the most the system allows is 107"),
    ],
)
def test_transport_config_errors(text: str, message: str) -> None:
    config = '[endpoints.out]\nkind = "server"\nstream = "s"\n' + text
    with pytest.raises(ConfigError, match=message):
        parse_config(config)


def test_unix_and_tls_config_values() -> None:
    config = parse_config(
        '[endpoints.out]\nkind = "server"\nstream = "s"\nlisten = "unix:///run/fw/cam.sock"\n'
        'socket_mode = "0600"\n'
        '[endpoints.in]\nkind = "receiver"\nstream = "s"\nconnect = "tls://cam.example:7777"\n'
        '[endpoints.in.tls]\nca = "/etc/ca.pem"\nserver_name = "camera"\n'
    )
    out, receiver = config.endpoints["out"], config.endpoints["in"]
    assert out.listen == Address("unix", None, 0, "/run/fw/cam.sock")  # type: ignore[union-attr]
    assert str(out.listen) == "unix:///run/fw/cam.sock"  # type: ignore[union-attr]
    assert out.socket_mode == 0o600  # type: ignore[union-attr]
    assert receiver.tls == TLSConfig(ca="/etc/ca.pem", server_name="camera")  # type: ignore[union-attr]
    # Two endpoints on one socket path, or one port as tcp and tls, are refused.
    with pytest.raises(ConfigError, match="also the address of endpoint 'a'"):
        parse_config(
            '[endpoints.a]\nkind = "server"\nstream = "s"\nlisten = "unix:///run/x.sock"\n'
            '[endpoints.b]\nkind = "server"\nstream = "s"\nlisten = "unix:///run/x.sock"\n'
        )


# -- UNIX sockets ----------------------------------------------------------------------------


async def test_unix_server_mode_and_removal_on_shutdown(tmp: Path) -> None:
    path = tmp / "cam.sock"
    text = SERVED.format(listen=f"unix://{path}", tls="socket_mode = 0o600")
    async with trio.open_nursery() as nursery:
        running = await start(nursery, text)
        assert running.address() == f"unix:{path}"
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        await read_some_frames(await trio.open_unix_socket(str(path)))
        running.daemon.request_shutdown()
    assert not path.exists()


async def test_a_stale_socket_file_is_replaced(tmp: Path) -> None:
    path = tmp / "stale.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # bound, never listening, closed without unlink: stale
    stale.close()
    listener = await open_unix_listener(Address("unix", None, 0, str(path)))
    async with listener:
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o660
        client = await trio.open_unix_socket(str(path))
        accepted = await listener.accept()
        await client.send_all(b"x")
        assert await accepted.receive_some(1) == b"x"
        await client.aclose()
        await accepted.aclose()
    assert not path.exists()


async def test_a_live_socket_and_a_regular_file_are_left_alone(tmp: Path) -> None:
    path = tmp / "live.sock"
    address = Address("unix", None, 0, str(path))
    async with await open_unix_listener(address):
        with pytest.raises(OSError, match="another process is listening") as live:
            await open_unix_listener(address)
        assert live.value.errno == errno.EADDRINUSE
        assert path.exists()
    regular = tmp / "data.txt"
    regular.write_text("keep me")
    with pytest.raises(OSError, match="exists and is not a socket; not removing it") as exc:
        await open_unix_listener(Address("unix", None, 0, str(regular)))
    assert exc.value.errno == errno.EEXIST
    assert regular.read_text() == "keep me"
