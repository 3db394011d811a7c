"""The command line as an operator meets it: one-line failures, status in every URL form and
across a daemon restart, tokens kept out of ps, recv and send over TLS and UNIX sockets,
``recv --listen``. Every command runs as a subprocess."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest
import trio

from framewire import Frame, FrameKind, cli
from framewire.daemon import Policy
from framewire.protocols.native import NativeDecoder

from .helpers import encode, port_of, running_daemon
from .test_cli import ENV, FRAMEWIRE, PATIENCE, DaemonProcess, run_cli
from .test_tls_unix import Pki, tmp  # noqa: F401 - tmp is a fixture

trustme = pytest.importorskip("trustme")

FRAMES = [Frame(FrameKind.METADATA, "setup", b"{}", timestamp=5)] + [
    Frame(FrameKind.DATA, "sample", bytes(100), timestamp=6 + i) for i in range(3)
]
LINES = [["METADATA", "setup", "2", "5"]] + [
    ["DATA", "sample", "100", str(6 + i)] for i in range(3)
]


@pytest.fixture
def pki(tmp: Path) -> Pki:  # noqa: F811 - the fixture imported above
    return Pki(tmp)


@pytest.fixture
def recording(tmp_path: Path) -> Path:
    path = tmp_path / "frames.fw"
    path.write_bytes(encode(FRAMES))
    return path


@contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port nothing listens on (it was just bound and released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    yield port


# -- every subcommand fails in one line ----------------------------------------------------


async def test_every_subcommand_fails_in_one_line_without_a_traceback(
    tmp_path: Path, recording: Path
) -> None:
    missing = str(tmp_path / "missing")
    with closed_port() as closed, socket.create_server(("127.0.0.1", 0)) as busy:
        in_use = busy.getsockname()[1]
        cases: list[tuple[list[str], str]] = [
            (["run", f"{missing}.toml"], "cannot read the file"),
            (["run", "--log-level", "loud"], "invalid choice: 'loud'"),
            (["run", "--bogus"], "unrecognized arguments: --bogus"),
            (["check"], "the following arguments are required: CONFIG"),
            (["check", f"{missing}.toml"], "cannot read the file"),
            (["recv", "127.0.0.1"], 'has no scheme: write "tcp://127.0.0.1"'),
            (["recv", f"tcp://127.0.0.1:{closed}"], "connection refused; is a framewire server"),
            (["recv", f"unix://{missing}.sock"], "no such file or directory"),
            (["recv", f"tls://127.0.0.1:{closed}", "--ca", missing], "cannot load CA file"),
            (["recv", f"tcp://127.0.0.1:{closed}", "--cert", missing], "only for a tls://"),
            (["recv", "--listen", f"tcp://127.0.0.1:{in_use}"], "address already in use"),
            (["recv", "--listen", "tls://127.0.0.1:0"], "needs --cert and --key"),
            (["recv", "--count", "x", f"tcp://127.0.0.1:{closed}"], "invalid int value"),
            (["recv"], "give an ADDRESS to connect to, or --listen ADDRESS"),
            (["send", f"tcp://127.0.0.1:{closed}", missing], "cannot read"),
            (
                ["send", f"tcp://127.0.0.1:{closed}", "--protocol", "raw", str(recording)],
                "connection refused; is a framewire receiver listening there?",
            ),
            (["send", str(recording), f"tcp://127.0.0.1:{closed}"], "the address comes first"),
            (["send", "--protocol", "nope", "tcp://127.0.0.1:1"], "invalid choice: 'nope'"),
            (
                ["status", f"127.0.0.1:{closed}"],
                f"cannot reach the status server at ws://127.0.0.1:{closed}/: connection "
                "refused; is the daemon running with a [status] table?",
            ),
            (["status", f"http://127.0.0.1:{closed}"], f"ws://127.0.0.1:{closed}/: connection"),
            (["status", "ftp://127.0.0.1:1"], "unsupported scheme 'ftp'"),
            (["status", "--token-file", missing], "cannot read the token file"),
            (["status", f"https://127.0.0.1:{closed}", "--ca", missing], "cannot load the CA"),
            (["bench"], "invalid choice: 'bench'"),
        ]
        results: dict[int, subprocess.CompletedProcess[bytes]] = {}
        limit = trio.CapacityLimiter(2)

        async def run(index: int, argv: list[str]) -> None:
            async with limit:
                results[index] = await run_cli(*argv)

        async with trio.open_nursery() as nursery:
            for index, (argv, _) in enumerate(cases):
                nursery.start_soon(run, index, argv)
    for index, (argv, expected) in enumerate(cases):
        result = results[index]
        err = result.stderr.decode()
        assert result.returncode != 0, argv
        assert "Traceback" not in err, (argv, err)
        assert len(err.splitlines()) == 1, (argv, err)
        assert expected in err, (argv, err)
        if expected == "cannot read the file":  # a configuration's problem names the file first
            assert err.startswith(f"{argv[1]}: error: "), (argv, err)
        else:
            assert err.startswith(f"framewire {argv[0]}: ") or argv[0] == "bench", (argv, err)


# -- status ----------------------------------------------------------------------------------

STATUS = """
[daemon]
grace_period = "1s"

[status]
listen = "127.0.0.1:{port}"
interval = "200ms"
token = "sesame"

[endpoints.source]
kind = "generator"
stream = "demo"
rate = 20.0
size = 100

[endpoints.out]
kind = "server"
listen = "tcp://127.0.0.1:0"
stream = "demo"
"""


@asynccontextmanager
async def status_daemon(directory: Path, port: int = 0) -> AsyncIterator[tuple[DaemonProcess, int]]:
    """A daemon subprocess with a token-protected status server; stopped with SIGTERM."""
    config = directory / f"status-{port}.toml"
    config.write_text(STATUS.format(port=port))
    process = await trio.lowlevel.open_process(
        [*FRAMEWIRE, "run", str(config)], stderr=subprocess.PIPE, env=ENV
    )
    daemon = DaemonProcess(process)
    try:
        match = await daemon.wait_for(r"status websocket on ws://127\.0\.0\.1:(\d+)/")
        yield daemon, int(match.group(1))
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(PATIENCE):
            await process.wait()
        assert process.stderr is not None
        await process.stderr.aclose()


async def run_status(*args: str, token: str | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {key: value for key, value in ENV.items() if key != "FRAMEWIRE_STATUS_TOKEN"}
    if token is not None:
        env["FRAMEWIRE_STATUS_TOKEN"] = token
    with trio.fail_after(PATIENCE):
        return await trio.run_process(
            [*FRAMEWIRE, "status", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
        )


async def test_status_url_forms_and_tokens(tmp_path: Path) -> None:
    async with status_daemon(tmp_path) as (_, port):
        token_file = tmp_path / "token"
        token_file.write_text("sesame\n")
        for url in (f"127.0.0.1:{port}", f"ws://127.0.0.1:{port}/", f"http://127.0.0.1:{port}"):
            shown = await run_status(url, token="sesame")
            assert shown.returncode == 0, shown.stderr
            assert re.search(r"^out +server +running", shown.stdout.decode(), re.MULTILINE)
        from_file = await run_status("--token-file", str(token_file), f"127.0.0.1:{port}")
        assert from_file.returncode == 0, from_file.stderr
        # --token on the command line still works (and the option comes after the URL).
        assert (await run_status(f"127.0.0.1:{port}", "--token", "sesame")).returncode == 0
        # --json: one snapshot, on one line, for scripts.
        as_json = await run_status(f"127.0.0.1:{port}", "--json", token="sesame")
        assert as_json.returncode == 0, as_json.stderr
        (line,) = as_json.stdout.decode().splitlines()
        snapshot = json.loads(line)
        assert snapshot["schema"] == "framewire.status/1"
        assert "rates" in snapshot["endpoints"]["out"]

        wrong = await run_status(f"127.0.0.1:{port}", token="open-sesame")
        none = await run_status(f"127.0.0.1:{port}")
        for result, expected in (
            (wrong, "refused the token (HTTP 401)"),
            (none, "requires a token; give it with --token-file PATH or $FRAMEWIRE_STATUS_TOKEN"),
        ):
            err = result.stderr.decode()
            assert result.returncode == 2
            assert len(err.splitlines()) == 1, err
            assert expected in err
            assert "Traceback" not in err


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


async def test_status_watch_reconnects_when_the_daemon_restarts(tmp_path: Path) -> None:
    env = {**ENV, "FRAMEWIRE_STATUS_TOKEN": "sesame"}
    async with status_daemon(tmp_path) as (daemon, port):
        watch = await trio.lowlevel.open_process(
            [*FRAMEWIRE, "status", "--watch", f"127.0.0.1:{port}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            # Ctrl-C is what this test sends: give the child SIGINT's default even when the
            # test runner inherited it ignored (a shell runs background jobs that way, and an
            # ignored SIGINT stays ignored across exec).
            preexec_fn=_default_sigint,
        )
        assert watch.stdout is not None
        assert watch.stderr is not None
        out, err = b"", b""

        async def read_until(pattern: bytes, *, stderr: bool = False, count: int = 1) -> None:
            nonlocal out, err
            stream = watch.stderr if stderr else watch.stdout
            assert stream is not None
            with trio.fail_after(PATIENCE):
                while len(re.findall(pattern, err if stderr else out)) < count:
                    chunk = await stream.receive_some(65536)
                    assert chunk, (out.decode(), err.decode())
                    if stderr:
                        err += chunk
                    else:
                        out += chunk

        try:
            await read_until(rb"pid (\d+)")
            first_pid = re.findall(rb"pid (\d+)", out)[0]
            daemon.process.send_signal(signal.SIGTERM)
            await read_until(rb"status server gone; reconnecting\n", stderr=True)
            with trio.fail_after(PATIENCE):
                await daemon.process.wait()  # its port is free again
            async with status_daemon(tmp_path, port):
                await read_until(rb"pid (?!" + first_pid + rb"\b)\d+")
            watch.send_signal(signal.SIGINT)
            with trio.fail_after(PATIENCE):
                code = await watch.wait()
        finally:
            if watch.returncode is None:
                watch.kill()
                await watch.wait()
            await watch.stdout.aclose()
            await watch.stderr.aclose()
        assert code == 0
        assert err.decode().count("status server gone; reconnecting") == 1, err
        assert b"Traceback" not in err


# -- recv and send over TLS and UNIX sockets ----------------------------------------------

SERVED = """
[endpoints.source]
kind = "file"
path = "{recording}"
stream = "demo"

[endpoints.out]
kind = "server"
listen = "{listen}"
stream = "demo"
{tls}
"""


def frame_lines(result: subprocess.CompletedProcess[bytes]) -> list[list[str]]:
    assert result.returncode == 0, result.stderr
    return [line.split() for line in result.stdout.decode().splitlines()]


async def test_recv_from_a_server_over_tls_and_unix(pki: Pki, tmp: Path, recording: Path) -> None:  # noqa: F811
    table = f'[endpoints.out.tls]\ncertificate = "{pki.server_cert}"\nkey = "{pki.server_cert}"\n'
    config = SERVED.format(recording=recording, listen="tls://127.0.0.1:0", tls=table)
    async with running_daemon(config) as daemon:
        port = port_of(daemon.endpoints["out"].status.address[0])
        address = f"tls://127.0.0.1:{port}"
        # The file endpoint has published and finished: its metadata is cached for us.
        got = await run_cli("recv", address, "--count", "1", "--ca", pki.ca_file)
        assert frame_lines(got) == LINES[:1]
        # Verification is on by default: the system store does not know the test CA.
        refused = await run_cli("recv", address, "--count", "1")
        err = refused.stderr.decode()
        assert refused.returncode == 1
        assert err.splitlines() == [
            f"framewire recv: TLS handshake with {address} failed: certificate verify failed: "
            "unable to get local issuer certificate; check --ca and --server-name"
        ]
        wrong_name = await run_cli(
            "recv", address, "--ca", pki.ca_file, "--server-name", "elsewhere.example"
        )
        assert "certificate verify failed" in wrong_name.stderr.decode()
    path = tmp / "out.sock"
    config = SERVED.format(recording=recording, listen=f"unix://{path}", tls="")
    async with running_daemon(config):
        got = await run_cli("recv", "--count", "1", f"unix://{path}")
        assert frame_lines(got) == LINES[:1]


@asynccontextmanager
async def listening_recv(*args: str) -> AsyncIterator[tuple[trio.Process, str]]:
    """``framewire recv --listen ...`` as a subprocess, once it says where it listens."""
    process = await trio.lowlevel.open_process(
        [*FRAMEWIRE, "recv", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV
    )
    assert process.stderr is not None
    log = ""
    try:
        with trio.fail_after(PATIENCE):
            while not (match := re.search(r"listening on (?:tls )?(\S+)\n", log)):
                chunk = await process.stderr.receive_some(4096)
                assert chunk, log
                log += chunk.decode()
        yield process, match.group(1)
    finally:
        if process.returncode is None:
            with trio.move_on_after(PATIENCE):
                await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


async def finish(process: trio.Process) -> subprocess.CompletedProcess[bytes]:
    """Wait for ``process`` and collect what it printed."""
    assert process.stdout is not None
    assert process.stderr is not None
    out = err = b""
    with trio.fail_after(PATIENCE):
        while chunk := await process.stdout.receive_some(65536):
            out += chunk
        while chunk := await process.stderr.receive_some(65536):
            err += chunk
        code = await process.wait()
    return subprocess.CompletedProcess(process.args, code, out, err)


async def test_recv_listens_for_framewire_send_over_tcp_and_tls(pki: Pki, recording: Path) -> None:
    async with listening_recv("--listen", "tcp://127.0.0.1:0") as (process, where):
        # Options between the positional arguments, as the README writes them.
        sent = await run_cli("send", f"tcp://{where}", "--protocol", "native", str(recording))
        assert sent.returncode == 0, sent.stderr
        assert frame_lines(await finish(process)) == LINES
    async with listening_recv(
        "--listen", "tls://127.0.0.1:0", "--cert", pki.server_cert, "--key", pki.server_cert
    ) as (process, where):
        # A sender that does not trust the certificate fails; the receiver keeps listening.
        untrusting = await run_cli("send", f"tls://{where}", str(recording))
        assert "certificate verify failed" in untrusting.stderr.decode()
        sent = await run_cli("send", f"tls://{where}", str(recording), "--ca", pki.ca_file)
        assert sent.returncode == 0, sent.stderr
        assert sent.stderr.decode() == "framewire send: 4 frames\n"  # recv closed: confirmed
        done = await finish(process)
        assert frame_lines(done) == LINES
        assert "TLS handshake with" in done.stderr.decode()
        assert "still listening" in done.stderr.decode()


async def test_send_over_tls_says_when_the_server_never_closes(
    pki: Pki, recording: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A TLS server that takes send's frames but never closes: send cannot know that it
    accepted them, so after CLOSE_PATIENCE it says the count is not confirmed (exit 0).
    ``main`` runs in a thread of this process so that the patience can be short; the server
    never closes, so no speed of the machine changes the outcome."""
    monkeypatch.setattr(cli, "CLOSE_PATIENCE", 0.2)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server_cert)
    tcp = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = tcp.socket.getsockname()[1]
    listener = trio.SSLListener(tcp, context)
    decoder = NativeDecoder(max_frame_size=1 << 20)
    frames: list[Frame] = []

    async def hold_one() -> None:
        """Accept one sender, read everything, and never close before it does."""
        stream = await listener.accept()
        with contextlib.suppress(trio.BrokenResourceError):
            while data := await stream.receive_some():
                frames.extend(decoder.feed(data))
        await stream.aclose()

    argv = ["send", f"tls://127.0.0.1:{port}", "--ca", pki.ca_file, str(recording)]
    async with listener:
        with trio.fail_after(PATIENCE):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(hold_one)
                code = await trio.to_thread.run_sync(cli.main, argv)
    assert code == 0
    assert capsys.readouterr().err == (
        "framewire send: 4 frames (not confirmed: the server had not closed 0.2s after the "
        "last; it may still be reading)\n"
    )
    assert frames == FRAMES
    assert decoder.ended


async def test_recv_listens_for_a_sender_endpoint_over_unix(tmp: Path, recording: Path) -> None:  # noqa: F811
    path = tmp / "recv.sock"
    async with listening_recv("--listen", f"unix://{path}", "--count", "4") as (process, _):
        sender = f"""
[endpoints.source]
kind = "file"
path = "{recording}"
stream = "demo"

[endpoints.to-recv]
kind = "sender"
connect = "unix://{path}"
stream = "demo"
"""
        async with running_daemon(sender):
            done = await finish(process)
    assert frame_lines(done) == LINES
    assert not await trio.Path(path).exists()  # the listener removed its socket file


async def test_tls_client_errors_name_their_cause(
    pki: Pki, recording: Path, tmp_path: Path
) -> None:
    """Against a server that requires a client certificate, recv without one says so (it
    said "exec format error": the server now sends its alert), and so does send, whose
    writes break on the refusal (it said "broken pipe": a broken TLS stream reads no alert,
    so send reads in a task of its own from the start); recv with tcp:// against a TLS port
    says it may speak TLS (it said "0 frames")."""
    # A TLS 1.3 client thinks the handshake done before the server has judged it, so a few
    # frames fit in the socket buffers and a sender can be gone before the verdict comes
    # (on a busy machine it was): 32 MiB cannot be written until the server reads, which it
    # never does, so the sender must hear the verdict however slow the machine.
    big = tmp_path / "big.fw"
    big.write_bytes(encode([Frame(FrameKind.DATA, "d", bytes(1 << 20))] * 32))
    table = (
        f'[endpoints.out.tls]\ncertificate = "{pki.server_cert}"\nkey = "{pki.server_cert}"\n'
        f'ca = "{pki.ca_file}"\nrequire_client_cert = true\n'
        f'[endpoints.in]\nkind = "receiver"\nlisten = "tls://127.0.0.1:0"\nstream = "x"\n'
        f'[endpoints.in.tls]\ncertificate = "{pki.server_cert}"\nkey = "{pki.server_cert}"\n'
        f'ca = "{pki.ca_file}"\nrequire_client_cert = true\n'
    )
    config = SERVED.format(recording=recording, listen="tls://127.0.0.1:0", tls=table)
    async with running_daemon(config) as daemon:
        out = port_of(daemon.endpoints["out"].status.address[0])
        inbound = port_of(daemon.endpoints["in"].status.address[0])
        needs = "the server requires a client certificate: give --cert and --key"
        refused = await run_cli("recv", f"tls://127.0.0.1:{out}", "--ca", pki.ca_file)
        assert refused.returncode == 1
        assert needs in refused.stderr.decode(), refused.stderr
        sent = await run_cli("send", f"tls://127.0.0.1:{inbound}", "--ca", pki.ca_file, str(big))
        assert sent.returncode == 1
        assert needs in sent.stderr.decode(), sent.stderr
        plain = await run_cli("recv", f"tcp://127.0.0.1:{out}")
        assert "closed the connection without sending a byte (if it speaks TLS, use tls://)" in (
            plain.stderr.decode()
        ), plain.stderr


@pytest.mark.parametrize("protocol", ["native", "raw"])
async def test_send_of_a_few_frames_hears_a_tls_servers_verdict(
    pki: Pki, recording: Path, protocol: str
) -> None:
    """A TLS 1.3 server judges the client's certificate after the client thinks the
    handshake done, so a few small frames fit in the socket buffers before the verdict
    comes: send waits for the server to close (after native's end of stream; after our
    close_notify for raw, which has none) before it says the frames went. It exited 0,
    "4 frames", when the server had refused it. With a certificate the frames arrive and
    send says so."""
    config = (
        f'[endpoints.in]\nkind = "receiver"\nlisten = "tls://127.0.0.1:0"\nstream = "x"\n'
        f'protocol = "{protocol}"\n'
        f'[endpoints.in.tls]\ncertificate = "{pki.server_cert}"\nkey = "{pki.server_cert}"\n'
        f'ca = "{pki.ca_file}"\nrequire_client_cert = true\n'
    )
    send = ["send", "--protocol", protocol, "--ca", pki.ca_file]
    async with running_daemon(config) as daemon:
        address = f"tls://127.0.0.1:{port_of(daemon.endpoints['in'].status.address[0])}"
        refused = await run_cli(*send, address, str(recording))
        assert refused.returncode == 1, refused.stderr
        # The frames written before the alert arrived, or none once it had.
        assert re.fullmatch(
            f"framewire send: connection to {re.escape(address)} broke after [0-4] frames: "
            "the server requires a client certificate: give --cert and --key\n",
            refused.stderr.decode(),
        ), refused.stderr
        with daemon.streams.get("x").subscribe(policy=Policy.LOSSLESS) as subscription:
            client = ["--cert", pki.client_cert, "--key", pki.client_cert]
            accepted = await run_cli(*send, *client, address, str(recording))
            assert accepted.returncode == 0, accepted.stderr
            got: list[Frame] = []
            size = len(encode(FRAMES))  # the recording's bytes
            with trio.fail_after(PATIENCE):
                while (
                    len(got) < len(FRAMES)
                    if protocol == "native"
                    else sum(len(frame.payload) for frame in got) < size
                ):
                    got += await subscription.receive_batch()
        if protocol == "native":
            assert accepted.stderr.decode() == "framewire send: 4 frames\n"
            assert got == FRAMES
        else:
            assert accepted.stderr.decode() == f"framewire send: {len(got)} frames\n"
            assert b"".join(bytes(frame.payload) for frame in got) == encode(FRAMES)
