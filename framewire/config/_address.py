"""Transport addresses: ``tcp://host:port`` (``tcp://*:port`` for all interfaces),
``tls://host:port`` (TCP with TLS on top) and ``unix:///absolute/path`` (a UNIX socket)."""

from __future__ import annotations

import ipaddress
from typing import Final

import attrs

__all__ = ["Address", "parse_address"]

SCHEMES: Final = ("tcp", "tls", "unix")
#: Longest UNIX socket path, in bytes (``sun_path`` holds 108 with the terminating NUL).
MAX_UNIX_PATH: Final = 107


@attrs.frozen
class Address:
    """A parsed transport address.

    ``host`` is ``None`` for ``*`` (every interface). IPv6 literals are written in brackets:
    ``tcp://[::1]:4536``. A ``unix`` address has no host and port 0, and its socket file in
    ``path``; other addresses have no path.
    """

    scheme: str
    host: str | None
    port: int
    path: str | None = None

    @property
    def bind_host(self) -> str | None:
        return self.host

    @property
    def is_unix(self) -> bool:
        return self.scheme == "unix"

    def __str__(self) -> str:
        if self.path is not None:
            return f"{self.scheme}://{self.path}"
        host = "*" if self.host is None else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"{self.scheme}://{host}:{self.port}"

    def with_port(self, port: int) -> Address:
        return attrs.evolve(self, port=port)


def parse_address(text: object, *, listening: bool = False) -> Address:
    """Parse ``tcp://host:port``, ``tls://host:port`` or ``unix:///path``.

    Raises ValueError saying what is wrong and what is expected. With ``listening``, port 0
    (pick a free port) and host ``*`` are allowed; to connect, a concrete host and port are
    required. A UNIX socket path must be absolute and at most 107 bytes long.
    """
    if not isinstance(text, str):
        raise ValueError(f'expected an address such as "tcp://127.0.0.1:4536", got {text!r}')
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise ValueError(f'address {text!r} has no scheme: write "tcp://{text}"')
    if scheme not in SCHEMES:
        raise ValueError(
            f"address {text!r}: unsupported scheme {scheme!r} (supported: {', '.join(SCHEMES)})"
        )
    if scheme == "unix":
        return _unix_address(text, rest)
    host, port = split_host_port(text, scheme, rest)
    if host == "*":
        if not listening:
            raise ValueError(f"address {text!r}: '*' (every interface) is only for listening")
        return Address(scheme, None, port)
    if port == 0 and not listening:
        raise ValueError(f"address {text!r}: port 0 is only for listening")
    if not valid_host(host):
        raise ValueError(f"address {text!r}: {host!r} is not a valid host name or IP address")
    return Address(scheme, host, port)


def split_host_port(text: str, scheme: str, rest: str) -> tuple[str, int]:
    """``host:port`` or ``[ipv6]:port`` (``rest``, the part after ``scheme://`` of ``text``).

    The host is returned unchecked (it may be ``*``); the port is 0 to 65535. Raises
    ValueError naming ``text``.
    """
    if rest.startswith("["):
        host, bracket, port_text = rest[1:].partition("]")
        if not bracket or not port_text.startswith(":"):
            raise ValueError(f"address {text!r}: expected {scheme}://[ipv6]:port")
        port_text = port_text[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"address {text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, colon, port_text = rest.rpartition(":")
        if not colon or not host:
            raise ValueError(f"address {text!r}: expected {scheme}://host:port")
        if ":" in host:
            raise ValueError(f"address {text!r}: write an IPv6 address in brackets: [{host}]")
    if port_text == "*":
        raise ValueError(f"address {text!r}: write port 0 for a free port")
    if not (port_text.isascii() and port_text.isdigit()) or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"address {text!r}: port must be a number from 0 to 65535")
    return host, int(port_text)


def _unix_address(text: str, path: str) -> Address:
    if not path.startswith("/"):
        raise ValueError(
            f"address {text!r}: a UNIX socket path must be absolute: unix:///run/framewire/x.sock"
        )
    if "\0" in path or path.endswith("/"):
        raise ValueError(f"address {text!r}: {path!r} is not a socket file path")
    size = len(path.encode("utf-8", "surrogateescape"))
    if size > MAX_UNIX_PATH:
        raise ValueError(
            f"address {text!r}: UNIX socket path is {size} bytes long; "
            f"the most the system allows is {MAX_UNIX_PATH}"
        )
    return Address("unix", None, 0, path)


def valid_host(host: str) -> bool:
    """A host name or an IP address literal (IPv6 without brackets)."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if all(label.isdigit() for label in labels):
        return False  # digits and dots only, yet not an IPv4 address (e.g. 999.1.1.1)
    return len(host) <= 253 and all(
        0 < len(label) <= 63
        and label.isascii()
        and label.replace("-", "").isalnum()
        and label[0] != "-"
        and label[-1] != "-"
        for label in labels
    )
