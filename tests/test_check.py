"""``framewire check``: the files, directories and listeners a configuration names, and how its
endpoints meet in streams (framewire/daemon/checks.py; docs/configuration.md)."""

from __future__ import annotations

import gzip
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from framewire.cli import main
from framewire.config import parse_config
from framewire.daemon.checks import CheckReport, check_config, resolve_host

FRAMEWIRE = [sys.executable, "-m", "framewire"]
HOSTS = {"localhost": ["127.0.0.1", "::1"], "daq": ["10.0.0.5"], "v6only": ["::1"]}


def resolve(host: str) -> list[str]:
    """A resolver that needs no network: the names in HOSTS, and nothing else."""
    if host in HOSTS:
        return HOSTS[host]
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


def check(text: str) -> CheckReport:
    return check_config(parse_config(text), resolve=resolve)


def errors(text: str) -> list[str]:
    return list(check(text).errors)


def warnings(text: str) -> list[str]:
    return list(check(text).warnings)


def server(name: str, listen: str, stream: str = "s", extra: str = "") -> str:
    return f'[endpoints.{name}]\nkind = "server"\nlisten = "{listen}"\nstream = "{stream}"\n{extra}'


def receiver(name: str, listen: str, stream: str = "s") -> str:
    return f'[endpoints.{name}]\nkind = "receiver"\nlisten = "{listen}"\nstream = "{stream}"\n'


def generator(name: str, stream: str) -> str:
    return f'[endpoints.{name}]\nkind = "generator"\nstream = "{stream}"\n'


@pytest.fixture
def tmp() -> Iterator[Path]:
    # Short paths: a UNIX socket path has at most 107 bytes.
    with tempfile.TemporaryDirectory(prefix="fw-") as directory:
        yield Path(directory)


# -- a clean file ---------------------------------------------------------------------------


def test_a_clean_configuration_has_nothing_to_report(tmp: Path) -> None:
    recording = tmp / "in.fw"
    recording.write_bytes(b"")
    text = (
        receiver("in", "tcp://127.0.0.1:4536", "g3")
        + server("out", "tcp://[::1]:4536", "g3")  # another address family: no overlap
        + server("local", f"unix://{tmp}/out.sock", "g3")
        + f'[endpoints.rec]\nkind = "recorder"\npath = "{tmp}/new/day/run.fw"\nstream = "g3"\n'
        + f'[endpoints.replay]\nkind = "file"\npath = "{recording}"\nstream = "g3"\n'
        + '[status]\nlisten = "127.0.0.1:8765"\n'
    )
    assert check(text) == CheckReport()


# -- files ----------------------------------------------------------------------------------


def test_missing_tls_files_are_named_by_their_path() -> None:
    tls = '[endpoints.out.tls]\ncertificate = "/nonexistent/x.pem"\nkey = "/nonexistent/x.key"\n'
    assert errors(server("out", "tls://127.0.0.1:4536", extra=tls) + generator("g", "s")) == [
        "endpoints.out.tls.certificate: cannot read /nonexistent/x.pem: No such file or directory",
        "endpoints.out.tls.key: cannot read /nonexistent/x.key: No such file or directory",
    ]


def test_tls_files_are_loaded_as_the_daemon_loads_them(tmp: Path) -> None:
    garbage = tmp / "garbage.pem"
    garbage.write_text("not a certificate\n")
    tls = f'[endpoints.out.tls]\ncertificate = "{garbage}"\nkey = "{garbage}"\n'
    [line] = errors(server("out", "tls://127.0.0.1:4536", extra=tls) + generator("g", "s"))
    assert line.startswith(f"endpoints.out.tls: cannot load certificate {garbage} with key ")
    # Connecting: the CA file is loaded too.
    text = (
        f'[endpoints.up]\nkind = "receiver"\nconnect = "tls://127.0.0.1:4536"\nstream = "s"\n'
        f'[endpoints.up.tls]\nca = "{garbage}"\n' + server("out", "tcp://127.0.0.1:4537")
    )
    [line] = errors(text)
    assert line.startswith(f"endpoints.up.tls: cannot load CA file {garbage}: ")


def test_good_tls_files_pass(tmp: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    chain = tmp / "server.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(chain))
    tls = f'[endpoints.out.tls]\ncertificate = "{chain}"\nkey = "{chain}"\n'
    assert errors(server("out", "tls://127.0.0.1:4536", extra=tls) + generator("g", "s")) == []


def test_file_endpoint_input_must_be_readable(tmp: Path) -> None:
    def file_endpoint(path: Path) -> str:
        return f'[endpoints.f]\nkind = "file"\npath = "{path}"\nstream = "s"\n' + server(
            "out", "tcp://127.0.0.1:4536"
        )

    missing = tmp / "missing.fw"
    assert errors(file_endpoint(missing)) == [
        f"endpoints.f.path: cannot read {missing}: No such file or directory"
    ]
    assert errors(file_endpoint(tmp)) == [f"endpoints.f.path: cannot read {tmp}: Is a directory"]
    plain = tmp / "run.fw.gz"
    plain.write_bytes(b"FW not compressed")
    assert errors(file_endpoint(plain)) == [
        f"endpoints.f.path: {plain} is not gzip-compressed (a path ending in .gz is read as gzip)"
    ]
    plain.write_bytes(gzip.compress(b"frames"))
    assert errors(file_endpoint(plain)) == []


def test_recorder_directory_must_be_creatable(tmp: Path) -> None:
    def recorder(path: Path) -> str:
        return f'[endpoints.r]\nkind = "recorder"\npath = "{path}"\nstream = "s"\n' + generator(
            "g", "s"
        )

    blocker = tmp / "blocker"
    blocker.write_text("a file where a directory should be")
    assert errors(recorder(blocker / "day" / "run.fw")) == [
        f"endpoints.r.path: cannot create files in {blocker / 'day'}: {blocker} is not a directory"
    ]
    assert errors(recorder(tmp / "run.fw")) == []
    assert errors(recorder(tmp / "a" / "b" / "run.fw")) == []  # created when it starts
    assert not (tmp / "a").exists()  # ... but not by the check


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_recorder_directory_must_be_writable(tmp: Path) -> None:
    locked = tmp / "locked"
    locked.mkdir(mode=0o500)
    text = f'[endpoints.r]\nkind = "recorder"\npath = "{locked}/x/run.fw"\nstream = "s"\n'
    assert errors(text + generator("g", "s")) == [
        f"endpoints.r.path: cannot create {locked}/x: {locked} is not writable"
    ]


def disk_sender(name: str, path: Path | None, extra: str = "") -> str:
    where = f'path = "{path}"\n' if path is not None else ""
    return (
        f'[endpoints.{name}]\nkind = "sender"\nconnect = "tcp://127.0.0.1:9"\nstream = "s"\n'
        f'[endpoints.{name}.buffer]\ntype = "disk"\n{where}{extra}'
    )


def test_two_disk_buffers_may_not_share_a_directory(tmp: Path) -> None:
    text = generator("g", "s") + disk_sender("a", tmp / "buf") + disk_sender("b", tmp / "buf")
    assert errors(text) == [
        f"endpoints.b.buffer.path: {tmp / 'buf'} is also the disk buffer of endpoint 'a'; "
        "give each buffer a directory of its own"
    ]
    # The same directory written another way is the same directory.
    text = generator("g", "s") + disk_sender("a", tmp / "buf") + disk_sender("b", tmp / "x/../buf")
    assert len(errors(text)) == 1
    text = generator("g", "s") + disk_sender("a", tmp / "a") + disk_sender("b", tmp / "b")
    assert errors(text) == []


def test_a_link_and_a_recorder_may_not_share_a_disk_buffer_directory(tmp: Path) -> None:
    directory = tmp / "buf"
    buffer = f'[endpoints.{{}}.buffer]\ntype = "disk"\npath = "{directory}"\n'
    link = '[endpoints.l]\nkind = "link"\nlisten = "tcp://127.0.0.1:0"\nsubscribe = "s"\n'
    recorder = f'[endpoints.r]\nkind = "recorder"\npath = "{tmp}/run.fw"\nstream = "s"\n'
    text = generator("g", "s") + link + buffer.format("l") + recorder + buffer.format("r")
    assert errors(text) == [
        f"endpoints.r.buffer.path: {directory} is also the disk buffer of endpoint 'l'; "
        "give each buffer a directory of its own"
    ]


def test_two_default_disk_buffers_are_apart(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp / "state"))
    text = generator("g", "s") + disk_sender("a", None) + disk_sender("b", None)
    assert errors(text) == []
    # One named explicitly as the other's default is the same directory.
    text = generator("g", "s") + disk_sender("a", None) + disk_sender("b", tmp / "state/buffers/a")
    assert errors(text) == [
        f"endpoints.b.buffer.path: {tmp}/state/buffers/a is also the disk buffer of endpoint "
        "'a'; give each buffer a directory of its own"
    ]


def test_a_disk_buffer_directory_must_be_creatable_and_writable(tmp: Path) -> None:
    blocker = tmp / "blocker"
    blocker.write_text("a file where a directory should be")
    assert errors(generator("g", "s") + disk_sender("a", blocker / "buf")) == [
        f"endpoints.a.buffer.path: cannot create files in {blocker / 'buf'}: "
        f"{blocker} is not a directory"
    ]
    assert errors(generator("g", "s") + disk_sender("a", blocker)) == [
        f"endpoints.a.buffer.path: cannot create files in {blocker}: {blocker} is not a directory"
    ]
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp / "locked"
        locked.mkdir(mode=0o500)
        assert errors(generator("g", "s") + disk_sender("a", locked / "buf")) == [
            f"endpoints.a.buffer.path: cannot create {locked}/buf: {locked} is not writable"
        ]


def test_a_disk_buffer_larger_than_its_disk_is_a_warning(tmp: Path) -> None:
    text = generator("g", "s") + disk_sender("a", tmp / "buf", 'max_size = "1000TiB"\n')
    (warning,) = [w for w in warnings(text) if "buffer" in w]
    assert warning.startswith("endpoints.a.buffer.max_size: 1000TiB is more than the ")


def test_replay_without_a_history_is_a_warning(tmp: Path) -> None:
    text = server("out", "tcp://127.0.0.1:4600", extra='replay = "30s"\n') + generator("g", "s")
    assert warnings(text) == [
        "endpoints.out.replay: stream 's' keeps no history (add [streams.s.history]): its "
        "clients get the live stream only"
    ]
    history = f'[streams.s.history]\nmax_bytes = "1GiB"\npath = "{tmp}/h"\n'
    assert warnings(text + history) == []


def test_a_history_directory_must_be_writable(tmp: Path) -> None:
    (tmp / "file").write_text("")
    text = generator("g", "s") + server("out", "tcp://127.0.0.1:4600")
    text += f'[streams.s.history]\nmax_bytes = "1GiB"\npath = "{tmp}/file/h"\n'
    assert errors(text) == [
        f"streams.s.history.path: cannot create files in {tmp}/file/h: {tmp}/file is not a "
        "directory"
    ]


def test_unix_socket_directory_must_exist(tmp: Path) -> None:
    assert errors(server("out", f"unix://{tmp}/nodir/out.sock") + generator("g", "s")) == [
        f"endpoints.out.listen: cannot listen on {tmp}/nodir/out.sock: no directory {tmp}/nodir"
    ]
    (tmp / "taken").write_text("")
    assert errors(server("out", f"unix://{tmp}/taken") + generator("g", "s")) == [
        f"endpoints.out.listen: cannot listen on {tmp}/taken: it exists and is not a socket"
    ]


# -- listeners ------------------------------------------------------------------------------


def test_three_listeners_on_one_port() -> None:
    text = (
        receiver("a", "tcp://127.0.0.1:4536")
        + receiver("b", "tcp://*:4536")
        + server("c", "tcp://localhost:4536")
    )
    assert errors(text) == [
        "endpoints.b.listen: tcp://*:4536 overlaps tcp://127.0.0.1:4536 of endpoint 'a' "
        "(both take 127.0.0.1, port 4536)",
        # Every listener it overlaps, not only the first.
        "endpoints.c.listen: tcp://localhost:4536 overlaps tcp://127.0.0.1:4536 of endpoint 'a' "
        "(both take 127.0.0.1, port 4536); and tcp://*:4536 of endpoint 'b' (both take "
        "127.0.0.1, port 4536)",
    ]


@pytest.mark.parametrize(
    ("first", "second", "shared"),
    [
        ("tcp://0.0.0.0:4536", "tcp://127.0.0.1:4536", "127.0.0.1"),
        ("tcp://[::]:4536", "tcp://[::1]:4536", "::1"),
        ("tcp://*:4536", "tcp://[::1]:4536", "::1"),
        ("tcp://*:4536", "tcp://0.0.0.0:4536", "every IPv4 interface"),
        ("tcp://daq:4536", "tcp://10.0.0.5:4536", "10.0.0.5"),
        ("tcp://localhost:4536", "tcp://v6only:4536", "::1"),
    ],
)
def test_overlapping_tcp_listeners(first: str, second: str, shared: str) -> None:
    [line] = errors(receiver("a", first) + server("b", second))
    assert line == (
        f"endpoints.b.listen: {second} overlaps {first} of "
        f"endpoint 'a' (both take {shared}, port 4536)"
    )


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("tcp://127.0.0.1:4536", "tcp://127.0.0.1:4537"),  # other port
        ("tcp://127.0.0.1:4536", "tcp://127.0.0.2:4536"),  # other address
        ("tcp://127.0.0.1:4536", "tcp://[::1]:4536"),  # other family
        ("tcp://127.0.0.1:4536", "tcp://[::]:4536"),  # trio binds :: for IPv6 only
        ("tcp://0.0.0.0:4536", "tcp://[::1]:4536"),
        ("tcp://127.0.0.1:0", "tcp://*:0"),  # free ports, picked at start
        ("tcp://daq:4536", "tcp://localhost:4536"),
    ],
)
def test_listeners_that_do_not_overlap(first: str, second: str) -> None:
    assert errors(receiver("a", first) + server("b", second)) == []


def test_status_listener_overlaps_too() -> None:
    text = server("out", "tcp://*:8765") + generator("g", "s") + "[status]\n"
    assert errors(text) == [
        "endpoints.out.listen: tcp://*:8765 overlaps tcp://127.0.0.1:8765 of [status] "
        "(both take 127.0.0.1, port 8765)"
    ]


def test_a_bridge_server_binds_two_ports() -> None:
    bridge = (
        '[endpoints.b]\nkind = "bridge"\nrole = "server"\naddress = "tcp://*:9000"\npublish = "s"\n'
    )
    assert errors(server("out", "tcp://127.0.0.1:9001") + bridge) == [
        "endpoints.b.address: tcp://*:9001 (the bridge's second port) overlaps "
        "tcp://127.0.0.1:9001 of endpoint 'out' (both take 127.0.0.1, port 9001)"
    ]
    assert errors(server("out", "tcp://127.0.0.1:9002") + bridge) == []
    client = bridge.replace('"server"', '"client"').replace("*", "127.0.0.1")
    assert errors(server("out", "tcp://127.0.0.1:9001") + client) == []  # it connects


def test_zeromq_wildcards_take_both_families() -> None:
    publisher = (
        '[endpoints.p]\nkind = "pubsub"\nrole = "publisher"\naddress = "tcp://[::]:5555"\n'
        'stream = "s"\n'
    )
    assert errors(receiver("in", "tcp://127.0.0.1:5555") + publisher) == [
        "endpoints.p.address: tcp://[::]:5555 overlaps tcp://127.0.0.1:5555 of endpoint 'in' "
        "(both take 127.0.0.1, port 5555)"
    ]


def test_zeromq_may_bind_an_interface_by_name() -> None:
    [interface, *_] = [name for _, name in socket.if_nameindex()]
    publisher = (
        '[endpoints.p]\nkind = "pubsub"\nrole = "publisher"\n'
        f'address = "tcp://{interface}:5555"\nstream = "s"\n'
    )
    assert errors(generator("g", "s") + publisher) == []  # not resolved as a host name
    assert errors(generator("g", "s") + publisher.replace(interface, "daq-typo")) == [
        "endpoints.p.address: cannot resolve 'daq-typo': Name or service not known"
    ]


def test_unix_sockets_overlap_by_path(tmp: Path) -> None:
    (tmp / "sub").mkdir()
    publisher = (
        '[endpoints.p]\nkind = "pubsub"\nrole = "publisher"\n'
        f'address = "ipc://{tmp}/sub/../fw.sock"\nstream = "s"\n'
    )
    assert errors(receiver("in", f"unix://{tmp}/fw.sock") + publisher) == [
        f"endpoints.p.address: ipc://{tmp}/sub/../fw.sock is the socket unix://{tmp}/fw.sock "
        "of endpoint 'in'"
    ]


def test_a_listening_name_that_does_not_resolve() -> None:
    assert errors(
        receiver("in", "tcp://daq-typo:4536") + server("out", "tcp://127.0.0.1:4537")
    ) == ["endpoints.in.listen: cannot resolve 'daq-typo': Name or service not known"]


def test_the_real_resolver_answers_for_numeric_addresses_and_localhost() -> None:
    assert resolve_host("127.0.0.1") == ["127.0.0.1"]
    assert "127.0.0.1" in resolve_host("localhost")  # from /etc/hosts: no DNS


# -- streams --------------------------------------------------------------------------------


def test_a_stream_name_typo_is_a_warning_with_a_suggestion() -> None:
    text = generator("gen", "camera") + server("out", "tcp://127.0.0.1:4536", "camrea")
    report = check(text)
    assert report.errors == ()
    assert list(report.warnings) == [
        "endpoints.gen.stream: stream 'camera' has no subscribers (published by 'gen'): "
        "its frames go nowhere (did you mean 'camrea'?)",
        "endpoints.out.stream: stream 'camrea' has no publishers (read by 'out'): "
        "nothing will arrive (did you mean 'camera'?)",
    ]


def test_which_endpoints_publish_and_subscribe() -> None:
    text = (
        '[endpoints.l]\nkind = "link"\nconnect = "tcp://127.0.0.1:4600"\nprotocol = "datalink"\n'
        'publish = "from-peer"\nsubscribe = "to-peer"\n'
        '[endpoints.sub]\nkind = "pubsub"\nrole = "subscriber"\naddress = "tcp://127.0.0.1:5555"\n'
        'stream = "xdas"\n'
        '[endpoints.rec]\nkind = "recorder"\npath = "/tmp/run.fw"\nstream = "from-peer"\n'
        '[endpoints.snd]\nkind = "sender"\nconnect = "tcp://127.0.0.1:4601"\nstream = "xdas"\n'
    )
    assert warnings(text) == [
        "endpoints.l.subscribe: stream 'to-peer' has no publishers (read by 'l'): "
        "nothing will arrive"
    ]


def test_a_streams_table_no_endpoint_uses() -> None:
    text = generator("g", "camera") + server("out", "tcp://127.0.0.1:4536", "camera")
    assert warnings(text + "[streams.camrea]\n") == [
        "streams.camrea: no endpoint uses stream 'camrea' (did you mean 'camera'?)"
    ]


def test_several_publishers_are_named_once() -> None:
    text = receiver("a", "tcp://127.0.0.1:4536", "s") + generator("b", "s")
    assert warnings(text) == [
        "endpoints.a.stream: stream 's' has no subscribers (published by 'a', 'b'): "
        "its frames go nowhere"
    ]


# -- the command ----------------------------------------------------------------------------


def test_check_prints_warnings_and_still_succeeds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "typo.toml"
    path.write_text(generator("gen", "camera") + server("out", "tcp://127.0.0.1:0", "camrea"))
    assert main(["check", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"{path}: OK, 2 endpoints\n")
    # Each warning names the file, and the line and column of the value it is about.
    assert err.splitlines() == [
        f"{path}:3:10: warning: endpoints.gen.stream: stream 'camera' has no subscribers "
        "(published by 'gen'): its frames go nowhere (did you mean 'camrea'?)",
        f"{path}:7:10: warning: endpoints.out.stream: stream 'camrea' has no publishers "
        "(read by 'out'): nothing will arrive (did you mean 'camera'?)",
    ]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FRAMEWIRE, *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_an_empty_file_is_refused_by_check_and_run(tmp_path: Path) -> None:
    path = tmp_path / "empty.toml"
    path.write_bytes(b"")
    for command in ("check", "run"):
        result = run_cli(command, str(path))
        assert result.returncode == 2, command
        assert result.stdout == ""
        # One problem: one line (framewire/cli.py); several are listed under a count.
        assert result.stderr.splitlines() == [
            f"{path}: error: no endpoints configured; a configuration needs at "
            "least one [endpoints.NAME] table (to stop every endpoint, stop the daemon)",
        ]


def test_check_reports_every_problem_of_a_file_together(tmp: Path) -> None:
    path = tmp / "bad.toml"
    path.write_text(
        server(
            "out",
            "tls://127.0.0.1:4536",
            "camera",
            f'[endpoints.out.tls]\ncertificate = "{tmp}/x.pem"\nkey = "{tmp}/x.pem"\n',
        )
        + receiver("any", "tcp://*:4536", "camrea")
        + f'[endpoints.replay]\nkind = "file"\npath = "{tmp}/none.fw"\nstream = "camrea"\n'
        + server("sock", f"unix://{tmp}/no/fw.sock", "camrea")
    )
    result = run_cli("check", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    # One style for every line: FILE:LINE:COLUMN: SEVERITY: PATH: MESSAGE, in file order.
    assert result.stderr.splitlines() == [
        f"{path}:4:10: warning: endpoints.out.stream: stream 'camera' has no publishers (read by "
        "'out'): nothing will arrive (did you mean 'camrea'?)",
        f"{path}:6:15: error: endpoints.out.tls.certificate: cannot read {tmp}/x.pem: No such "
        "file or directory",
        f"{path}:7:7: error: endpoints.out.tls.key: cannot read {tmp}/x.pem: No such file or "
        "directory",
        f"{path}:10:10: error: endpoints.any.listen: tcp://*:4536 overlaps tls://127.0.0.1:4536 "
        "of endpoint 'out' (both take 127.0.0.1, port 4536)",
        f"{path}:14:8: error: endpoints.replay.path: cannot read {tmp}/none.fw: No such file or "
        "directory",
        f"{path}:18:10: error: endpoints.sock.listen: cannot listen on {tmp}/no/fw.sock: no "
        f"directory {tmp}/no",
    ]


def test_two_port_conflicts_are_both_reported(tmp: Path) -> None:
    """An identical address (which the loader refuses by itself) and an overlap (which only the
    machine's check sees) in one file: both are reported, each at its line and column."""
    path = tmp / "two.toml"
    path.write_text(
        receiver("a", "tcp://127.0.0.1:4536")
        + server("b", "tcp://127.0.0.1:4536")
        + receiver("c", "tcp://0.0.0.0:4540")
        + server("d", "tcp://127.0.0.1:4540")
    )
    result = run_cli("check", str(path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"{path}:7:10: error: endpoints.b.listen: tcp://127.0.0.1:4536 overlaps "
        "tcp://127.0.0.1:4536 of endpoint 'a' (both take 127.0.0.1, port 4536)",
        f"{path}:15:10: error: endpoints.d.listen: tcp://127.0.0.1:4540 overlaps "
        "tcp://0.0.0.0:4540 of endpoint 'c' (both take 127.0.0.1, port 4540)",
    ]


def test_a_syntax_error_and_a_missing_key_are_placed(tmp: Path) -> None:
    path = tmp / "broken.toml"
    path.write_text('[endpoints.a]\nkind = "server"\nstream = \n')
    result = run_cli("check", str(path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"{path}:3:10: error: not valid TOML: Invalid value"]
    path.write_text('# a server\n\n[endpoints.a]\nkind = "server"\nstream = "s"\n')
    result = run_cli("check", str(path))
    assert result.stderr.splitlines() == [  # at the table that lacks it
        f"{path}:3:1: error: endpoints.a.listen: required key missing"
    ]


def test_a_unix_socket_under_proc_is_refused(tmp: Path) -> None:
    """/proc accepts no socket file (even from root, whom its permissions let write): the daemon
    would fail to bind at start."""
    assert errors(server("out", "unix:///proc/fw.sock") + generator("g", "s")) == [
        "endpoints.out.listen: cannot listen on /proc/fw.sock: /proc is a proc filesystem, which "
        "cannot hold a socket file; choose a directory on a real filesystem, such as "
        "/run/framewire"
    ]
    publisher = (
        '[endpoints.p]\nkind = "pubsub"\nrole = "publisher"\naddress = "ipc:///sys/kernel/fw"\n'
        'stream = "s"\n'
    )
    [line] = errors(generator("g", "s") + publisher)
    assert line.startswith("endpoints.p.address: cannot listen on /sys/kernel/fw: /sys")
    assert "is a sysfs filesystem, which cannot hold a socket file" in line
    # A real filesystem is fine, and so is a directory that merely has "proc" in its name.
    (tmp / "proc").mkdir()
    assert errors(server("out", f"unix://{tmp}/proc/fw.sock") + generator("g", "s")) == []


@pytest.mark.parametrize("example", ["site-instrument.toml", "datacentre.toml"])
def test_offline_accepts_the_shipped_examples(example: str) -> None:
    """Their hosts, files and directories are the site's and the data centre's, not CI's."""
    path = Path(__file__).parent.parent / "config" / example
    result = run_cli("check", "--offline", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{path}: OK, ")
    assert "(offline: the file alone, not this machine)" in result.stdout.splitlines()[0]


def test_offline_still_reports_what_the_file_alone_shows(tmp: Path) -> None:
    path = tmp / "bad.toml"
    path.write_text(
        server("out", "tcp://127.0.0.1:4536", extra="max_queue_frames = -1\n")
        + receiver("in", "tcp://daq.invalid:4537")  # not resolved: no error
        + server("again", "tcp://daq.invalid:4537")  # the same name: the same address
        + server("sock", "unix:///proc/fw.sock")  # not looked at
        + generator("g", "s")
    )
    result = run_cli("check", "--offline", str(path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"{path}:5:20: error: endpoints.out.max_queue_frames: expected a positive integer, got -1"
    ]
    path.write_text(path.read_text().replace("max_queue_frames = -1\n", ""))
    result = run_cli("check", "--offline", str(path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"{path}:11:10: error: endpoints.again.listen: tcp://daq.invalid:4537 overlaps "
        "tcp://daq.invalid:4537 of endpoint 'in' (both take daq.invalid, port 4537)"
    ]


def test_offline_overlaps_of_names_and_wildcards() -> None:
    def offline(text: str) -> list[str]:
        return list(check_config(parse_config(text), offline=True).errors)

    assert offline(receiver("a", "tcp://*:4536") + server("b", "tcp://daq.invalid:4536")) == [
        "endpoints.b.listen: tcp://daq.invalid:4536 overlaps tcp://*:4536 of endpoint 'a' "
        "(both take every interface, port 4536)"
    ]
    # Whether a name is 127.0.0.1 is not known offline: not reported.
    assert offline(receiver("a", "tcp://127.0.0.1:4536") + server("b", "tcp://daq:4536")) == []


def test_under_journald_warnings_and_errors_carry_their_priorities(tmp: Path) -> None:
    """As an ExecStartPre= of a unit: journalctl -p warning finds both, -p err the errors."""
    path = tmp / "j.toml"
    path.write_text(generator("gen", "camera") + server("out", "unix:///proc/fw.sock", "camrea"))
    read_end, write_end = os.pipe()
    info = os.fstat(write_end)
    env = {**os.environ, "JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
    try:
        process = subprocess.Popen(
            [*FRAMEWIRE, "check", str(path)], stderr=write_end, stdout=subprocess.DEVNULL, env=env
        )
    finally:
        os.close(write_end)
    with os.fdopen(read_end, "rb") as stderr:
        text = stderr.read().decode()
    assert process.wait(timeout=60) == 2
    lines = text.splitlines()
    assert [line[:3] for line in lines] == ["<4>", "<4>", "<3>"], text
    assert lines[0].startswith(f"<4>{path}:3:10: warning: endpoints.gen.stream: ")
    assert lines[2].startswith(f"<3>{path}:6:10: error: endpoints.out.listen: ")
