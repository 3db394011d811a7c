"""The configuration loader (framewire/config/_load.py, _schema.py) and ``framewire check``.

Strict loading: unknown keys are errors, values are never coerced (except an integer where a
number is expected), and every error in a file comes back at once, each line naming the path
of the bad value and the value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest

from framewire import protocols
from framewire.cli import main
from framewire.config import (
    Address,
    BackoffConfig,
    Config,
    ConfigError,
    DaemonConfig,
    GeneratorConfig,
    ReceiverConfig,
    ServerConfig,
    StatusConfig,
    default_config_text,
    load_config,
    parse_config,
)
from framewire.config._load import NO_ENDPOINTS
from framewire.config._schema import ENDPOINT_KINDS

KNOWN_PROTOCOLS = ", ".join(protocols.names())  # "native, raw" today
KNOWN_KINDS = ", ".join(ENDPOINT_KINDS)

COMPLETE = """
[daemon]
grace_period = "250ms"
log_level = "debug"

[daemon.restart]
initial = "100ms"
maximum = "1m"
factor = 3
stable_after = 30

[streams.camera]
max_metadata_types = 32
max_metadata_bytes = "8MiB"

[status]
listen = "127.0.0.1:9000"
interval = "500ms"
token = "s3cret"
max_clients = 4
metrics_max_clients = 20

[endpoints.g3-in]
kind = "receiver"
listen = "tcp://*:4536"
protocol = "native"
stream = "g3"
max_frame_size = "256MiB"
max_clients = 4
connect_timeout = "5s"
idle_timeout = "2m"
frame_timeout = "15m"

[endpoints.g3-in.reconnect]
initial = "250ms"
maximum = "10s"
factor = 1.5
stable_after = "1h"

[endpoints.upstream]
kind = "receiver"
connect = "tcp://[::1]:4600"
protocol = "raw"
stream = "raw.feed"

[endpoints.g3-out]
kind = "server"
listen = "tcp://127.0.0.1:4537"
protocol = "native"
stream = "g3"
max_clients = 10
policy = "lossless"
max_queue_frames = 100
max_queue_bytes = "1GiB"
max_metadata_frames = 50
max_metadata_bytes = "1.5MB"
decimate = { Scan = 10, Timepoint = 0 }
send_timeout = 2

[endpoints.synthetic]
kind = "generator"
stream = "g3"
rate = 100
size = "4KiB"
type = "Scan"
metadata_type = "Calibration"
count = 1000
"""

EXPECTED: dict[str, Any] = {
    "daemon": {
        "grace_period": 0.25,
        "log_level": "debug",
        "restart": {"initial": 0.1, "maximum": 60.0, "factor": 3.0, "stable_after": 30.0},
    },
    "status": {
        "listen": {"scheme": "tcp", "host": "127.0.0.1", "port": 9000, "path": None},
        "interval": 0.5,
        "token": "s3cret",
        "token_file": None,
        "max_clients": 4,
        "metrics_max_clients": 20,
    },
    "streams": {
        "camera": {
            "max_metadata_types": 32,
            "max_metadata_bytes": 8 << 20,
            "history": None,
            "run_starts": (),
        }
    },
    "endpoints": {
        "g3-in": {
            "kind": "receiver",
            "listen": {"scheme": "tcp", "host": None, "port": 4536, "path": None},
            "connect": None,
            "protocol": "native",
            "stream": "g3",
            "max_frame_size": 256 * 1024 * 1024,
            "max_clients": 4,
            "reconnect": {"initial": 0.25, "maximum": 10.0, "factor": 1.5, "stable_after": 3600.0},
            "connect_timeout": 5.0,
            "idle_timeout": 120.0,
            "frame_timeout": 900.0,
            "verify_crc": False,
            "tls": None,
            "socket_mode": 0o660,
        },
        "upstream": {
            "kind": "receiver",
            "listen": None,
            "connect": {"scheme": "tcp", "host": "::1", "port": 4600, "path": None},
            "protocol": "raw",
            "stream": "raw.feed",
            "max_frame_size": 64 << 20,
            "max_clients": 16,
            "reconnect": {"initial": 0.5, "maximum": 30.0, "factor": 2.0, "stable_after": 10.0},
            "connect_timeout": 10.0,
            "idle_timeout": 0.0,
            "frame_timeout": None,
            "verify_crc": False,
            "tls": None,
            "socket_mode": 0o660,
        },
        "g3-out": {
            "kind": "server",
            "listen": {"scheme": "tcp", "host": "127.0.0.1", "port": 4537, "path": None},
            "protocol": "native",
            "stream": "g3",
            "max_clients": 10,
            "policy": "lossless",
            "max_queue_frames": 100,
            "max_queue_bytes": 1 << 30,
            "max_metadata_frames": 50,
            "max_metadata_bytes": 1_500_000,
            "decimate": {"Scan": 10, "Timepoint": 0},
            "send_timeout": 2.0,
            "close_on_end": False,
            "send_buffer": None,
            "gap_frames": False,
            "replay": None,
            "tls": None,
            "socket_mode": 0o660,
        },
        "synthetic": {
            "kind": "generator",
            "stream": "g3",
            "rate": 100.0,
            "size": 4096,
            "type": "Scan",
            "metadata_type": "Calibration",
            "count": 1000,
        },
    },
    "nats": None,
}


SERVER = '[endpoints.g3-out]\nkind = "server"\nlisten = "tcp://*:4537"\nstream = "g3"\n'
RECEIVER = '[endpoints.in]\nkind = "receiver"\nstream = "g3"\nlisten = "tcp://*:4536"\n'
CONNECTOR = '[endpoints.in]\nkind = "receiver"\nstream = "g3"\nconnect = "tcp://host:4536"\n'
LINK = '[endpoints.l]\nkind = "link"\npublish = "p"\nlisten = "tcp://*:4550"\n'
GENERATOR = '[endpoints.gen]\nkind = "generator"\nstream = "g3"\n'


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as excinfo:
        parse_config(text)
    return excinfo.value.errors


def types_of(value: object) -> object:
    """The same nested structure with every leaf replaced by its type."""
    if isinstance(value, dict):
        return {key: types_of(item) for key, item in value.items()}
    return type(value)


# -- valid configurations ------------------------------------------------------------------


def test_embedded_default_parses() -> None:
    config = parse_config(default_config_text(), "<embedded default>")
    assert config == Config(
        daemon=DaemonConfig(grace_period=2.0),
        status=StatusConfig(listen=Address("tcp", "127.0.0.1", 8765)),
        endpoints={
            "demo-source": GeneratorConfig(stream="demo", rate=10.0, size=1024),
            "demo-out": ServerConfig(
                listen=Address("tcp", "127.0.0.1", 4540), stream="demo", protocol="native"
            ),
        },
    )


def test_a_file_with_only_endpoints_takes_every_other_default() -> None:
    config = parse_config(GENERATOR)
    assert config == Config(endpoints=config.endpoints)
    assert config == Config(daemon=DaemonConfig(), status=None, endpoints=config.endpoints)
    # An empty [status] table turns the status server on with its defaults.
    assert parse_config(GENERATOR + "[status]").status == StatusConfig()
    assert StatusConfig().listen == Address("tcp", "127.0.0.1", 8765)


def test_complete_config_with_every_endpoint_kind() -> None:
    config = parse_config(COMPLETE, "complete.toml")
    assert list(config.endpoints) == ["g3-in", "upstream", "g3-out", "synthetic"]
    assert isinstance(config.daemon, DaemonConfig)
    assert isinstance(config.daemon.restart, BackoffConfig)
    assert isinstance(config.status, StatusConfig)
    assert isinstance(config.endpoints["g3-in"], ReceiverConfig)
    assert isinstance(config.endpoints["upstream"], ReceiverConfig)
    assert isinstance(config.endpoints["g3-out"], ServerConfig)
    assert isinstance(config.endpoints["synthetic"], GeneratorConfig)
    as_dict = attrs.asdict(config)
    assert as_dict == EXPECTED
    # Integers where numbers are expected become floats; sizes stay integers.
    assert types_of(as_dict) == types_of(EXPECTED)
    receiver = config.endpoints["g3-in"]
    assert isinstance(receiver, ReceiverConfig)
    assert isinstance(receiver.listen, Address)
    assert str(receiver.listen) == "tcp://*:4536"
    upstream = config.endpoints["upstream"]
    assert isinstance(upstream, ReceiverConfig)
    assert str(upstream.connect) == "tcp://[::1]:4600"


def test_load_config_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "framewire.toml"
    path.write_text(COMPLETE, encoding="utf-8")
    assert load_config(path) == parse_config(COMPLETE)
    assert load_config(str(path)) == parse_config(COMPLETE)


def test_configs_compare_by_value() -> None:
    assert parse_config(COMPLETE) == parse_config(COMPLETE)
    changed = parse_config(COMPLETE.replace("max_clients = 10", "max_clients = 11"))
    assert changed != parse_config(COMPLETE)
    assert changed.endpoints["g3-in"] == parse_config(COMPLETE).endpoints["g3-in"]


@pytest.mark.parametrize(
    ("toml", "path", "value"),
    [
        (GENERATOR + "[daemon]\ngrace_period = 5", ("daemon", "grace_period"), 5.0),
        (GENERATOR + "[daemon.restart]\nfactor = 2", ("daemon", "restart", "factor"), 2.0),
        ('[endpoints.g]\nkind = "generator"\nstream = "s"\nrate = 0', ("g", "rate"), 0.0),
        ('[endpoints.g]\nkind = "generator"\nstream = "s"\nsize = 0', ("g", "size"), 0),
        ('[endpoints.g]\nkind = "generator"\nstream = "s"\nsize = "1.5 KB"', ("g", "size"), 1500),
    ],
)
def test_int_accepted_where_a_number_is_expected(
    toml: str, path: tuple[str, ...], value: float
) -> None:
    config = parse_config(toml)
    obj: Any = config if path[0] == "daemon" else config.endpoints
    for part in path:
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    assert obj == value
    assert type(obj) is type(value)


@pytest.mark.parametrize("base", [RECEIVER, CONNECTOR, LINK])
def test_frame_timeout_default_meets_the_largest_frame_at_1_mib_per_second(base: str) -> None:
    """Unset: 10 minutes, or max_frame_size at 1 MiB/s if that is longer (a 4 GiB frame on
    an 8.4 Mbit/s link); 0 turns it off; a value is taken as written."""

    def seconds(extra: str) -> float:
        endpoint: Any = next(iter(parse_config(base + extra).endpoints.values()))
        timeout: float = endpoint.frame_timeout_seconds
        return timeout

    assert seconds("") == 600.0
    assert seconds('max_frame_size = "4GiB"') == 4096.0
    assert seconds('max_frame_size = "1GiB"') == 1024.0
    assert seconds('frame_timeout = "90s"') == 90.0
    assert seconds('frame_timeout = "2h"\nmax_frame_size = "4GiB"') == 7200.0
    assert seconds("frame_timeout = 0") == float("inf")


def test_listening_on_port_zero_twice_is_not_a_duplicate() -> None:
    config = parse_config(
        '[endpoints.a]\nkind = "server"\nstream = "s"\nlisten = "tcp://127.0.0.1:0"\n'
        '[endpoints.b]\nkind = "server"\nstream = "s"\nlisten = "tcp://127.0.0.1:0"\n'
    )
    assert len(config.endpoints) == 2


# -- errors: one per line, path and value ----------------------------------------------------


ERROR_CASES: list[tuple[str, str]] = [
    # unknown keys, at every level
    ("foo = 1", "foo: unknown key"),
    ("[daemon]\nbogus = 1", "daemon.bogus: unknown key"),
    ("[daemon.restart]\nbogus = 1", "daemon.restart.bogus: unknown key"),
    (SERVER + "bogus = 2", "endpoints.g3-out.bogus: unknown key"),
    # ... and a near miss names the key it looks like
    (SERVER + "polcy = 'lossy'", "endpoints.g3-out.polcy: unknown key (did you mean 'policy'?)"),
    ("[endpoint.a]\nkind = 'generator'", "endpoint: unknown key (did you mean 'endpoints'?)"),
    ("[daemon]\nlog_lvl = 'info'", "daemon.log_lvl: unknown key (did you mean 'log_level'?)"),
    (RECEIVER + "[endpoints.in.reconnect]\nbogus = 2", "endpoints.in.reconnect.bogus: unknown key"),
    (GENERATOR + "listen = 'tcp://*:1'", "endpoints.gen.listen: unknown key"),
    ("[status]\nbogus = 1", "status.bogus: unknown key"),
    # no coercion
    (SERVER + "max_clients = 9.7", "endpoints.g3-out.max_clients: expected an integer, got 9.7"),
    (SERVER + "max_clients = 3.0", "endpoints.g3-out.max_clients: expected an integer, got 3.0"),
    (SERVER + "max_clients = true", "endpoints.g3-out.max_clients: expected an integer, got True"),
    (SERVER + "max_clients = '10'", "endpoints.g3-out.max_clients: expected an integer, got '10'"),
    (GENERATOR + "count = 1.5", "endpoints.gen.count: expected an integer, got 1.5"),
    (GENERATOR + "rate = true", "endpoints.gen.rate: expected a number, got True"),
    (GENERATOR + "rate = '10'", "endpoints.gen.rate: expected a number, got '10'"),
    (GENERATOR + "type = 1", "endpoints.gen.type: expected a string, got 1"),
    (GENERATOR + "type = true", "endpoints.gen.type: expected a string, got True"),
    (
        '[endpoints.gen]\nkind = "generator"\nstream = 1',
        "endpoints.gen.stream: expected a string, got 1",
    ),
    (SERVER + "protocol = 1", "endpoints.g3-out.protocol: expected a string, got 1"),
    (
        SERVER + "decimate = { Scan = 1.5 }",
        "endpoints.g3-out.decimate.Scan: expected an integer, got 1.5",
    ),
    (SERVER + "decimate = 3", "endpoints.g3-out.decimate: expected a table, got 3"),
    (SERVER + "decimate = [1]", "endpoints.g3-out.decimate: expected a table, got an array"),
    ("endpoints = 3", "endpoints: expected a table, got 3"),
    ('[[endpoints]]\nkind = "server"', "endpoints: expected a table, got an array"),
    ("[endpoints]\na = 3", "endpoints.a: expected a table, got 3"),
    # values out of range
    (
        SERVER + "max_queue_frames = -1",
        "endpoints.g3-out.max_queue_frames: expected a positive integer, got -1",
    ),
    (
        SERVER + "max_clients = 0",
        "endpoints.g3-out.max_clients: expected a positive integer, got 0",
    ),
    (
        SERVER + "max_queue_bytes = 0",
        "endpoints.g3-out.max_queue_bytes: expected a positive integer, got 0",
    ),
    (
        SERVER + "max_queue_bytes = -5",
        "endpoints.g3-out.max_queue_bytes: expected a size of 0 bytes or more, got -5",
    ),
    (
        SERVER + "max_queue_bytes = '1.5B'",
        "endpoints.g3-out.max_queue_bytes: size '1.5B' is not a whole number of bytes",
    ),
    (
        SERVER + "max_queue_bytes = '64 furlongs'",
        'endpoints.g3-out.max_queue_bytes: expected a size such as "64MiB", "1.5GB" or a '
        "number of bytes, got '64 furlongs'",
    ),
    (
        SERVER + "send_timeout = '0s'",
        "endpoints.g3-out.send_timeout: expected a positive number, got 0.0",
    ),
    (
        SERVER + "send_timeout = 'forever'",
        'endpoints.g3-out.send_timeout: expected a duration such as "5s", "250ms" or "2m", '
        "got 'forever'",
    ),
    (
        "[daemon]\ngrace_period = -1",
        "daemon.grace_period: expected a duration of 0 or more seconds, got -1",
    ),
    (
        "[daemon]\ngrace_period = inf",
        "daemon.grace_period: expected a duration of 0 or more seconds, got inf",
    ),
    (
        "[daemon]\ngrace_period = true",
        'daemon.grace_period: expected a duration such as "5s", got True',
    ),
    (GENERATOR + "rate = -1", "endpoints.gen.rate: expected 0 or more, got -1.0"),
    (GENERATOR + "count = -3", "endpoints.gen.count: expected 0 or more, got -3"),
    (GENERATOR + "size = -1", "endpoints.gen.size: expected a size of 0 bytes or more, got -1"),
    (
        SERVER + "decimate = { Scan = -1 }",
        "endpoints.g3-out.decimate.Scan: expected 0 or more, got -1",
    ),
    (
        '[endpoints.g3-out]\nkind = "server"\nlisten = "tcp://*:1"\nstream = "bad stream!"',
        "endpoints.g3-out.stream: 'bad stream!' is not a valid name "
        "(letters, digits, '_', '.', '-'; at most 64)",
    ),
    # choices
    (
        SERVER + "policy = 'sometimes'",
        "endpoints.g3-out.policy: expected one of 'lossy', 'lossless', got 'sometimes'",
    ),
    (
        SERVER + "policy = true",
        "endpoints.g3-out.policy: expected one of 'lossy', 'lossless', got True",
    ),
    (
        "[daemon]\nlog_level = 'verbose'",
        "daemon.log_level: expected one of 'debug', 'info', 'warning', 'error', got 'verbose'",
    ),
    (
        SERVER + "protocol = 'zmq'",
        f"endpoints.g3-out.protocol: unknown protocol 'zmq' (known: {KNOWN_PROTOCOLS})",
    ),
    ("[status]\ninterval = 0", "status.interval: expected a positive number, got 0.0"),
    (
        "[streams.cam]\nmax_metadata_types = 0",
        "streams.cam.max_metadata_types: expected a positive integer, got 0",
    ),
    (
        "[streams.cam]\nmax_types = 5",
        "streams.cam.max_types: unknown key (did you mean 'max_metadata_types'?)",
    ),
    (
        SERVER + "protocol = 'g3'\ngap_frames = true",
        "endpoints.g3-out.gap_frames: native servers only: other protocols have no GAP",
    ),
    (
        "[streams.cam]\nrun_starts = 'Observation'",
        "streams.cam.run_starts: expected an array of frame type names, got 'Observation'",
    ),
    (
        "[streams.cam]\nrun_starts = ['']",
        "streams.cam.run_starts: a frame type name is a non-empty string, got ''",
    ),
    (
        "[streams.cam.history]\nmax_bytes = '16KiB'",
        "streams.cam.history.max_bytes: a history needs at least 1MiB, got 16384",
    ),
    (
        "[streams.cam.history]\nmax_bytes = '16MiB'\nmax_age = -1",
        "streams.cam.history.max_age: expected a duration of 0 or more seconds, got -1",
    ),
    (
        "[streams.cam.history]\nmax_age = '10s'",
        "streams.cam.history.max_bytes: required key missing",
    ),
    (
        '[endpoints.r]\nkind = "receiver"\nlisten = "tcp://127.0.0.1:1"\nstream = "s"\n'
        'max_frame_size = "2TiB"',
        "endpoints.r.max_frame_size: 2199023255552 bytes is over the ceiling for one frame (4GiB)",
    ),
    ("[status]\ntoken = 5", "status.token: expected a string, got an integer"),
    ("[status]\nmax_clients = 0", "status.max_clients: expected a positive integer, got 0"),
    (
        "[status]\nlisten = 'nohost'",
        "status.listen: address 'tcp://nohost': expected tcp://host:port",
    ),
    # endpoint kinds
    (
        '[endpoints.x]\nstream = "s"',
        f"endpoints.x.kind: missing; one of: {KNOWN_KINDS}",
    ),
    (
        '[endpoints.x]\nkind = "relay"\nstream = "s"',
        f"endpoints.x.kind: unknown endpoint kind 'relay' (known: {KNOWN_KINDS})",
    ),
    (
        '[endpoints.x]\nkind = "recever"\nstream = "s"',
        f"endpoints.x.kind: unknown endpoint kind 'recever' (did you mean 'receiver'?) "
        f"(known: {KNOWN_KINDS})",
    ),
    (
        "[endpoints.x]\nkind = 3",
        f"endpoints.x.kind: unknown endpoint kind 3 (known: {KNOWN_KINDS})",
    ),
    ('[endpoints.x]\nkind = "server"\nstream = "s"', "endpoints.x.listen: required key missing"),
    # addresses
    (
        RECEIVER.replace("tcp://*:4536", "tcp://host"),
        "endpoints.in.listen: address 'tcp://host': expected tcp://host:port",
    ),
    (
        CONNECTOR.replace("tcp://host:4536", "tcp://*:4536"),
        "endpoints.in.connect: address 'tcp://*:4536': '*' (every interface) is only for listening",
    ),
    (
        CONNECTOR.replace("tcp://host:4536", "tcp://host:0"),
        "endpoints.in.connect: address 'tcp://host:0': port 0 is only for listening",
    ),
    (
        SERVER.replace("tcp://*:4537", "udp://*:4537"),
        "endpoints.g3-out.listen: address 'udp://*:4537': unsupported scheme 'udp' "
        "(supported: tcp, tls, unix)",
    ),
    (
        SERVER.replace('"tcp://*:4537"', "4537"),
        'endpoints.g3-out.listen: expected an address such as "tcp://127.0.0.1:4536", got 4537',
    ),
    # rules between fields
    (
        RECEIVER + 'connect = "tcp://host:1"',
        "endpoints.in.listen: set exactly one of listen or connect",
    ),
    (
        '[endpoints.in]\nkind = "receiver"\nstream = "g3"',
        "endpoints.in.listen: set exactly one of listen or connect",
    ),
    (
        RECEIVER + "[endpoints.in.reconnect]\ninitial = '5s'\nmaximum = '1s'",
        "endpoints.in.reconnect.maximum: must be at least initial (5.0s)",
    ),
    (
        RECEIVER + "[endpoints.in.reconnect]\nfactor = 0.5",
        "endpoints.in.reconnect.factor: expected a number of 1 or more, got 0.5",
    ),
    (
        GENERATOR + "type = 'x'\nmetadata_type = 'x'",
        "endpoints.gen.metadata_type: must differ from type",
    ),
    (
        SERVER + 'send_buffer = "2GiB"',
        "endpoints.g3-out.send_buffer: at most 1024MiB (the kernel doubles it, into a C int), "
        "got 2147483648",
    ),
    (
        SERVER + "send_buffer = 0",
        "endpoints.g3-out.send_buffer: expected a positive integer, got 0",
    ),
    (
        CONNECTOR + 'frame_timeout = "-5m"',
        'endpoints.in.frame_timeout: expected a duration such as "5s", "250ms" or "2m", '
        "got '-5m'",
    ),
    (
        LINK + "frame_timeout = true",
        'endpoints.l.frame_timeout: expected a duration such as "5s", got True',
    ),
]


@pytest.mark.parametrize(("toml", "line"), ERROR_CASES)
def test_error_names_the_path_and_the_value(toml: str, line: str) -> None:
    assert errors_of(toml) == [line]


def test_strict_bool_is_not_coerced() -> None:
    # No schema field is a bool today; the converter's bool hook must still refuse "yes".
    from framewire.config._load import _CONVERTER

    assert _CONVERTER.structure(True, bool) is True
    for value in ["yes", "true", 1, 0, None]:
        with pytest.raises(ValueError, match=f"expected true or false, got {value!r}"):
            _CONVERTER.structure(value, bool)


@pytest.mark.parametrize(
    ("toml", "line"),
    [
        ("daemon = 3", "daemon: expected a table, got 3"),
        ("status = 3", "status: expected a table, got 3"),
        ("[daemon]\nrestart = 'fast'", "daemon.restart: expected a table, got 'fast'"),
        (RECEIVER + "reconnect = 3", "endpoints.in.reconnect: expected a table, got 3"),
    ],
)
def test_non_table_for_a_section_names_the_value(toml: str, line: str) -> None:
    assert errors_of(toml) == [line]


def test_duplicate_listen_addresses() -> None:
    errors = errors_of(
        '[endpoints.a]\nkind = "server"\nstream = "s"\nlisten = "tcp://*:4536"\n'
        '[endpoints.b]\nkind = "receiver"\nstream = "s"\nlisten = "tcp://*:4536"\n'
        '[endpoints.c]\nkind = "server"\nstream = "s"\nlisten = "tcp://127.0.0.1:4537"\n'
        '[endpoints.d]\nkind = "server"\nstream = "s"\nlisten = "tcp://127.0.0.1:4537"\n'
        '[endpoints.e]\nkind = "receiver"\nstream = "s"\nconnect = "tcp://127.0.0.1:4537"\n'
    )
    assert errors == [
        "endpoints.b.listen: tcp://*:4536 is also the address of endpoint 'a'",
        "endpoints.d.listen: tcp://127.0.0.1:4537 is also the address of endpoint 'c'",
    ]


def test_all_errors_in_a_file_are_reported_together() -> None:
    text = """
        bogus = 1
        [daemon]
        grace_period = "soon"
        log_level = "loud"
        [daemon.restart]
        initial = -1
        [endpoints.g3-out]
        kind = "server"
        listen = "tcp://*:4537"
        stream = "g3"
        max_queue_frames = -1
        policy = "sometimes"
        decimate = { Scan = -2, Timepoint = 1 }
        extra = true
        [endpoints.in]
        kind = "receiver"
        stream = "g3"
        listen = "tcp://*:4536"
        protocol = "zmq"
        max_clients = 9.7
        [endpoints.in.reconnect]
        maximum = "never"
        [endpoints.gen]
        kind = "generator"
        stream = 1
        rate = "fast"
        [endpoints.nokind]
        stream = "g3"
        [endpoints.weird]
        kind = "relay"
    """
    with pytest.raises(ConfigError) as excinfo:
        parse_config(text, "bad.toml")
    errors = excinfo.value.errors
    assert sorted(errors) == sorted(
        [
            "bogus: unknown key",
            'daemon.grace_period: expected a duration such as "5s", "250ms" or "2m", got \'soon\'',
            "daemon.log_level: expected one of 'debug', 'info', 'warning', 'error', got 'loud'",
            "daemon.restart.initial: expected a duration of 0 or more seconds, got -1",
            "endpoints.g3-out.max_queue_frames: expected a positive integer, got -1",
            "endpoints.g3-out.policy: expected one of 'lossy', 'lossless', got 'sometimes'",
            "endpoints.g3-out.decimate.Scan: expected 0 or more, got -2",
            "endpoints.g3-out.extra: unknown key",
            f"endpoints.in.protocol: unknown protocol 'zmq' (known: {KNOWN_PROTOCOLS})",
            "endpoints.in.max_clients: expected an integer, got 9.7",
            'endpoints.in.reconnect.maximum: expected a duration such as "5s", "250ms" or "2m", '
            "got 'never'",
            "endpoints.gen.stream: expected a string, got 1",
            "endpoints.gen.rate: expected a number, got 'fast'",
            f"endpoints.nokind.kind: missing; one of: {KNOWN_KINDS}",
            f"endpoints.weird.kind: unknown endpoint kind 'relay' (known: {KNOWN_KINDS})",
        ]
    )
    assert len(set(errors)) == len(errors)
    message = str(excinfo.value)
    assert message.startswith(f"bad.toml: {len(errors)} errors in the configuration\n")
    assert message.splitlines()[1:] == [f"  {error}" for error in errors]


def test_single_value_rule_is_reported_alongside_other_errors() -> None:
    errors = errors_of("[daemon.restart]\ninitial = -1\nfactor = 0.5")
    assert sorted(errors) == [
        "daemon.restart.factor: expected a number of 1 or more, got 0.5",
        "daemon.restart.initial: expected a duration of 0 or more seconds, got -1",
    ]


@pytest.mark.parametrize(
    "text", ["", "# nothing yet\n", "[daemon]\ngrace_period = 1", "[endpoints]"]
)
def test_a_configuration_without_endpoints_is_refused(text: str) -> None:
    assert errors_of(text) == [NO_ENDPOINTS]
    assert NO_ENDPOINTS.startswith("no endpoints configured; ")


def test_no_endpoints_is_reported_with_the_cross_checks() -> None:
    errors = errors_of("[status]\nlisten = '127.0.0.1:8765'\n[endpoints]\n")
    assert errors == [NO_ENDPOINTS]


def test_an_empty_file_is_refused_by_the_loader(tmp_path: Path) -> None:
    path = tmp_path / "empty.toml"
    path.write_bytes(b"")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    assert excinfo.value.errors == [NO_ENDPOINTS]
    assert Config().endpoints == {}  # only the loader refuses; code may build an empty Config


def test_config_error_message_format() -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_config("foo = 1", "one.toml")
    error = excinfo.value
    assert isinstance(error, ValueError)
    assert error.source == "one.toml"
    assert error.errors == ["foo: unknown key"]
    assert str(error) == "one.toml: 1 error in the configuration\n  foo: unknown key"


@pytest.mark.parametrize(
    "text", ["x = [", "[daemon\n", "a = 1\na = 2", "= 3", "[daemon]\nx = 'unterminated"]
)
def test_invalid_toml(text: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_config(text, "broken.toml")
    assert excinfo.value.source == "broken.toml"
    [line] = excinfo.value.errors
    assert line.startswith("not valid TOML: ")


def test_unreadable_files_give_config_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as excinfo:
        load_config(missing)
    assert excinfo.value.source == str(missing)
    [line] = excinfo.value.errors
    assert line.startswith("cannot read the file: ")
    assert "No such file" in line

    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(tmp_path)  # a directory

    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"stream = '\xff\xfe'\n")
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(binary)


def test_load_config_reports_the_path_as_source(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("foo = 1\n", encoding="utf-8")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    assert excinfo.value.source == str(path)
    assert str(excinfo.value).startswith(f"{path}: 1 error")


# -- framewire check -------------------------------------------------------------------------


def test_check_good_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "good.toml"
    path.write_text(COMPLETE, encoding="utf-8")
    assert main(["check", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        f"{path}: OK, 4 endpoints",
        "  g3-in: receiver listen tcp://*:4536, native, stream 'g3'",
        "  upstream: receiver connect tcp://[::1]:4600, raw, stream 'raw.feed'",
        "  g3-out: server listen tcp://127.0.0.1:4537, native, stream 'g3'",
        "  synthetic: generator 100 frames/s of 4KiB, stream 'g3'",
    ]
    assert "Traceback" not in out + err


def test_check_file_with_one_endpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "one.toml"
    path.write_text(GENERATOR, encoding="utf-8")
    assert main(["check", str(path)]) == 0
    out, _ = capsys.readouterr()
    assert out.splitlines()[0] == f"{path}: OK, 1 endpoint"


def test_check_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        SERVER + "max_queue_frames = -1\npolicy = 'x'\nbogus = 1\n[daemon]\nlog_level = 'loud'\n",
        encoding="utf-8",
    )
    assert main(["check", str(path)]) == 2  # docs/configuration.md: status 2 on a bad file
    out, err = capsys.readouterr()
    assert out == ""
    assert "Traceback" not in err
    # Each error at the line and column of its value (of its key, for an unknown key).
    assert err.splitlines() == [
        f"{path}:5:20: error: endpoints.g3-out.max_queue_frames: expected a positive integer, "
        "got -1",
        f"{path}:6:10: error: endpoints.g3-out.policy: expected one of 'lossy', 'lossless', "
        "got 'x'",
        f"{path}:7:1: error: endpoints.g3-out.bogus: unknown key",
        f"{path}:9:13: error: daemon.log_level: expected one of 'debug', 'info', 'warning', "
        "'error', got 'loud'",
    ]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "cannot read the file"),
        ("x = [", "not valid TOML"),
        ("[endpoints.a]\nkind = 'server'\n", "endpoints.a.listen: required key missing"),
    ],
)
def test_check_unusable_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, expected: str
) -> None:
    path = tmp_path / "config.toml"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    assert main(["check", str(path)]) == 2
    out, err = capsys.readouterr()
    assert expected in err
    assert "Traceback" not in out + err
