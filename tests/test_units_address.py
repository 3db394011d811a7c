"""Sizes, durations (framewire/config/_units.py) and addresses (framewire/config/_address.py)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from framewire.config import Address, format_size, parse_address, parse_duration, parse_size

FAST = settings(max_examples=100, deadline=None, database=None)

KiB, MiB, GiB, TiB = 1024, 1024**2, 1024**3, 1024**4


# -- sizes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (0, 0),
        (4096, 4096),
        (2**63 - 1, 2**63 - 1),
        ("0", 0),
        ("4096", 4096),
        ("4096B", 4096),
        ("4096 b", 4096),
        ("1kB", 1000),
        ("1KB", 1000),
        ("1kb", 1000),
        ("2MB", 2_000_000),
        ("1.5GB", 1_500_000_000),
        ("1.5 GB", 1_500_000_000),
        ("3TB", 3 * 1000**4),
        ("1KiB", KiB),
        ("1kib", KiB),
        ("0.5KiB", 512),
        ("256MiB", 256 * MiB),
        ("256mib", 256 * MiB),
        ("  64 MiB  ", 64 * MiB),
        ("1.5GiB", 3 * GiB // 2),
        ("2TiB", 2 * TiB),
        ("1.25 KiB", 1280),
        ("0.3kB", 300),
        ("2.3MB", 2_300_000),
    ],
)
def test_parse_size_valid(text: object, expected: int) -> None:
    result = parse_size(text)
    assert result == expected
    assert type(result) is int


@pytest.mark.parametrize(
    "value",
    [
        True,
        False,
        -1,
        "-1",
        "-1KiB",
        "1.5",
        "1.5B",
        "0.1KiB",
        "1.0001kB",
        "",
        " ",
        "MiB",
        "1e3",
        "1,000",
        "1 MiB extra",
        "64 furlongs",
        "1 K",
        "1 KIBS",
        ".5KiB",
        "5.KiB",
        1.0,
        1.5,
        None,
        [],
        {},
    ],
)
def test_parse_size_invalid(value: object) -> None:
    with pytest.raises(ValueError, match="size") as excinfo:
        parse_size(value)
    # The message names the bad value.
    assert repr(value) in str(excinfo.value) or str(value) in str(excinfo.value)


def test_parse_size_rejects_bools_explicitly() -> None:
    # bool is an int subclass: True must not become 1 byte.
    with pytest.raises(ValueError, match="got True"):
        parse_size(True)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("4.1GB", 4_100_000_000), ("4.1MB", 4_100_000), ("8.2GB", 8_200_000_000)],
)
def test_parse_size_exact_decimal_sizes(text: str, expected: int) -> None:
    assert parse_size(text) == expected


def test_parse_size_large_integer_string_is_exact() -> None:
    assert parse_size("9007199254740993") == 2**53 + 1


def test_parse_size_huge_number_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size("1" + "0" * 400 + "B")
    with pytest.raises(ValueError, match="too large"):
        parse_size(2**63)


@FAST
@given(number=st.integers(0, 10**6), unit=st.sampled_from(["", "B", "KiB", "MiB", "GiB", "TiB"]))
def test_parse_size_integers_with_binary_units(number: int, unit: str) -> None:
    factor = {"": 1, "B": 1, "KiB": KiB, "MiB": MiB, "GiB": GiB, "TiB": TiB}[unit]
    assert parse_size(f"{number}{unit}") == number * factor
    assert parse_size(f"{number} {unit.lower()}") == number * factor


# -- durations -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0.0),
        (5, 5.0),
        (0.25, 0.25),
        (1e9, 1e9),
        ("5s", 5.0),
        ("5 s", 5.0),
        ("5S", 5.0),
        ("0s", 0.0),
        ("1.5s", 1.5),
        ("250ms", 0.25),
        ("2m", 120.0),
        ("1min", 60.0),
        ("1h", 3600.0),
        ("1.5h", 5400.0),
        ("10us", 1e-5),
        (" 3 ms ", 0.003),
    ],
)
def test_parse_duration_valid(value: object, expected: float) -> None:
    result = parse_duration(value)
    assert result == pytest.approx(expected, rel=1e-12)
    assert type(result) is float


@pytest.mark.parametrize(
    "value",
    [
        True,
        False,
        -1,
        -0.5,
        math.inf,
        -math.inf,
        math.nan,
        "-5s",
        "5",
        "5d",
        "5 seconds",
        "",
        "s",
        "1e3s",
        "5s5",
        None,
        [],
    ],
)
def test_parse_duration_invalid(value: object) -> None:
    with pytest.raises(ValueError, match="duration") as excinfo:
        parse_duration(value)
    assert repr(value) in str(excinfo.value)


def test_parse_duration_huge_string_is_refused() -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration("1" + "0" * 400 + "s")


# -- format_size -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nbytes", "text"),
    [
        (0, "0B"),
        (1, "1B"),
        (1023, "1023B"),
        (1024, "1KiB"),
        (1536, "1.5KiB"),
        (1025, "1.0KiB"),
        (64 * MiB, "64MiB"),
        (64 * MiB + 512 * KiB, "64.5MiB"),
        (GiB, "1GiB"),
        (3 * GiB + 1, "3.0GiB"),
        (TiB, "1TiB"),
        (1536 * GiB, "1.5TiB"),
    ],
)
def test_format_size(nbytes: int, text: str) -> None:
    assert format_size(nbytes) == text


@FAST
@given(number=st.integers(1, 1023), factor=st.sampled_from([1, KiB, MiB, GiB]))
def test_format_size_exact_values_parse_back(number: int, factor: int) -> None:
    assert parse_size(format_size(number * factor)) == number * factor


# -- addresses -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "listening", "expected"),
    [
        ("tcp://127.0.0.1:4536", False, Address("tcp", "127.0.0.1", 4536)),
        ("tcp://127.0.0.1:4536", True, Address("tcp", "127.0.0.1", 4536)),
        ("tcp://localhost:1", False, Address("tcp", "localhost", 1)),
        ("tcp://example.com:80", False, Address("tcp", "example.com", 80)),
        ("tcp://example.com.:80", False, Address("tcp", "example.com.", 80)),
        (
            "tcp://daq-01.lab.example.org:65535",
            False,
            Address("tcp", "daq-01.lab.example.org", 65535),
        ),
        ("tcp://" + "a" * 63 + ":1", False, Address("tcp", "a" * 63, 1)),
        ("tcp://*:4537", True, Address("tcp", None, 4537)),
        ("tcp://*:0", True, Address("tcp", None, 0)),
        ("tcp://127.0.0.1:0", True, Address("tcp", "127.0.0.1", 0)),
        ("tcp://[::1]:4536", False, Address("tcp", "::1", 4536)),
        ("tcp://[::]:0", True, Address("tcp", "::", 0)),
        ("tcp://[2001:db8::1]:80", False, Address("tcp", "2001:db8::1", 80)),
        ("tcp://[fe80::1%eth0]:80", False, Address("tcp", "fe80::1%eth0", 80)),
        ("tcp://0.0.0.0:80", True, Address("tcp", "0.0.0.0", 80)),
        ("tcp://host:080", False, Address("tcp", "host", 80)),
    ],
)
def test_parse_address_valid(text: str, listening: bool, expected: Address) -> None:
    address = parse_address(text, listening=listening)
    assert address == expected
    assert address.bind_host == expected.host


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tcp://*:4537", "only for listening"),
        ("tcp://127.0.0.1:0", "port 0 is only for listening"),
        ("tcp://[::1]:0", "port 0 is only for listening"),
        ("tcp://*:0", "only for listening"),
    ],
)
def test_listening_only_addresses_are_refused_for_connecting(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as excinfo:
        parse_address(text)
    assert repr(text) in str(excinfo.value)


@pytest.mark.parametrize("listening", [False, True])
@pytest.mark.parametrize(
    ("text", "message"),
    [
        # scheme
        ("127.0.0.1:4536", 'has no scheme: write "tcp://127.0.0.1:4536"'),
        ("udp://host:1", "unsupported scheme 'udp' \\(supported: tcp, tls, unix\\)"),
        ("TCP://host:1", "unsupported scheme 'TCP'"),
        ("ws://host:1", "unsupported scheme 'ws'"),
        ("://host:1", "unsupported scheme ''"),
        # port
        ("tcp://host", "expected tcp://host:port"),
        ("tcp://host:", "port must be a number from 0 to 65535"),
        ("tcp://host:65536", "port must be a number from 0 to 65535"),
        ("tcp://host:99999999", "port must be a number from 0 to 65535"),
        ("tcp://host:-1", "port must be a number from 0 to 65535"),
        ("tcp://host:+80", "port must be a number from 0 to 65535"),
        ("tcp://host:http", "port must be a number from 0 to 65535"),
        ("tcp://host:80/path", "port must be a number from 0 to 65535"),
        ("tcp://host: 80", "port must be a number from 0 to 65535"),
        ("tcp://[::1]", "expected tcp://\\[ipv6\\]:port"),
        ("tcp://[::1]:", "port must be a number"),
        ("tcp://[::1]80", "expected tcp://\\[ipv6\\]:port"),
        # host
        ("tcp://:80", "expected tcp://host:port"),
        ("tcp://-bad:80", "'-bad' is not a valid host name"),
        ("tcp://under_score:80", "'under_score' is not a valid host name"),
        ("tcp://a..b:80", "'a..b' is not a valid host name"),
        ("tcp://.:80", "'.' is not a valid host name"),
        ("tcp://ex ample:80", "'ex ample' is not a valid host name"),
        ("tcp://user@host:80", "'user@host' is not a valid host name"),
        ("tcp://" + "a" * 64 + ":80", "is not a valid host name"),
        ("tcp://[127.0.0.1]:80", "'127.0.0.1' is not an IPv6 address"),
        ("tcp://[zz::1]:80", "is not an IPv6 address"),
        ("tcp://[*]:80", "'\\*' is not an IPv6 address"),
        ("tcp://[]:80", "'' is not an IPv6 address"),
    ],
)
def test_parse_address_invalid(text: str, message: str, listening: bool) -> None:
    with pytest.raises(ValueError, match=message) as excinfo:
        parse_address(text, listening=listening)
    assert repr(text) in str(excinfo.value)


@pytest.mark.parametrize("value", [None, 4536, b"tcp://host:1", ["tcp://host:1"]])
def test_parse_address_needs_a_string(value: object) -> None:
    with pytest.raises(ValueError, match="expected an address such as") as excinfo:
        parse_address(value)
    assert repr(value) in str(excinfo.value)


@pytest.mark.parametrize("text", ["tcp://::1:4536", "tcp://2001:db8::1:80"])
def test_unbracketed_ipv6_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"brackets|expected"):
        parse_address(text)


@pytest.mark.parametrize("port", ["\u0664\u0665\u0663\u0666", "\u00b2", "\uff18\uff10"])
def test_non_ascii_digits_are_not_a_port(port: str) -> None:
    with pytest.raises(ValueError, match="port must be a number from 0 to 65535"):
        parse_address(f"tcp://host:{port}")


def test_host_label_ending_in_hyphen_is_refused() -> None:
    with pytest.raises(ValueError, match="is not a valid host name"):
        parse_address("tcp://bad-.example:80")


@pytest.mark.parametrize(
    ("text", "listening"),
    [
        ("tcp://127.0.0.1:4536", False),
        ("tcp://example.com:80", False),
        ("tcp://*:4537", True),
        ("tcp://[::1]:4536", False),
        ("tcp://[2001:db8::1]:0", True),
    ],
)
def test_address_str_round_trips(text: str, listening: bool) -> None:
    address = parse_address(text, listening=listening)
    assert str(address) == text
    assert parse_address(str(address), listening=listening) == address


def test_address_with_port() -> None:
    address = parse_address("tcp://*:0", listening=True)
    bound = address.with_port(4537)
    assert bound == Address("tcp", None, 4537)
    assert address.port == 0  # frozen: a new object
    assert str(bound) == "tcp://*:4537"


@FAST
@given(
    host=st.sampled_from(["127.0.0.1", "::1", "10.0.0.7", "fe80::2", "daq.example.org", "h"]),
    port=st.integers(1, 65535),
)
def test_parse_address_round_trip_any_port(host: str, port: int) -> None:
    address = Address("tcp", host, port)
    assert parse_address(str(address)) == address
    assert parse_address(str(address), listening=True) == address


@FAST
@given(text=st.text(max_size=40))
def test_parse_address_raises_only_value_error(text: str) -> None:
    for listening in (False, True):
        try:
            address = parse_address(text, listening=listening)
        except ValueError:
            continue
        assert address.scheme == "tcp"
        assert 0 <= address.port <= 65535
