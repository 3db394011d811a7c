"""ZeroMQ addresses, as a ZeroMQ user writes them: ``tcp://host:port`` and ``ipc://path``.

``tcp://*:port`` binds every interface (IPv4 and IPv6) and ``tcp://host:0`` binds a free
port (the bound one is shown in status); both only where the endpoint binds. IPv6 literals go
in brackets. ``ipc://`` takes a path (relative paths are relative to the daemon's working
directory) or, on Linux, ``ipc://@name`` for the abstract namespace.
"""

from __future__ import annotations

from typing import Final, Literal

import attrs

from ._address import split_host_port, valid_host

__all__ = ["ZmqAddress", "parse_zmq_address"]

TRANSPORTS: Final = ("tcp", "ipc")
#: A UNIX socket path has room for 107 bytes and a terminating NUL (sun_path is 108).
MAX_IPC_PATH: Final = 107


@attrs.frozen
class ZmqAddress:
    """A parsed ZeroMQ address. ``str()`` gives the endpoint string ZeroMQ takes.

    For ``tcp``, ``host`` is None for ``*`` and ``path`` is empty; for ``ipc``, ``path`` is
    the socket path and ``host``/``port`` are None/0.
    """

    transport: Literal["tcp", "ipc"]
    host: str | None = None
    port: int = 0
    path: str = ""

    @property
    def is_ipv6(self) -> bool:
        return self.host is not None and ":" in self.host

    def __str__(self) -> str:
        if self.transport == "ipc":
            return f"ipc://{self.path}"
        host = "*" if self.host is None else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"tcp://{host}:{self.port}"

    def with_port(self, port: int) -> ZmqAddress:
        """The same tcp address with another port."""
        return attrs.evolve(self, port=port)


def parse_zmq_address(text: object, *, binding: bool = False) -> ZmqAddress:
    """Parse a ZeroMQ address. Raises ValueError saying what is wrong and what is expected.

    With ``binding``, ``*`` (every interface) and port 0 (a free port) are allowed; to
    connect, a concrete host and port are required.
    """
    if not isinstance(text, str):
        raise ValueError(
            f'expected a ZeroMQ address such as "tcp://127.0.0.1:5555" or "ipc:///run/x.sock", '
            f"got {text!r}"
        )
    transport, sep, rest = text.partition("://")
    if not sep:
        raise ValueError(f'address {text!r} has no transport: write "tcp://{text}"')
    if transport == "ipc":
        return _ipc(text, rest)
    if transport != "tcp":
        raise ValueError(
            f"address {text!r}: unsupported transport {transport!r} "
            f"(supported: {', '.join(TRANSPORTS)})"
        )
    host, port = split_host_port(text, "tcp", rest)
    if port == 0 and not binding:
        raise ValueError(f"address {text!r}: port 0 (a free port) is only for binding")
    if host == "*":
        if not binding:
            raise ValueError(f"address {text!r}: '*' (every interface) is only for binding")
        return ZmqAddress("tcp", None, port)
    if not valid_host(host):
        raise ValueError(f"address {text!r}: {host!r} is not a valid host name or IP address")
    return ZmqAddress("tcp", host, port)


def _ipc(text: str, path: str) -> ZmqAddress:
    if not path or path in ("@", "*"):
        raise ValueError(f'address {text!r}: expected ipc://PATH, e.g. "ipc:///run/framewire.sock"')
    if "\0" in path:
        raise ValueError(f"address {text!r}: a path cannot contain NUL")
    if len(path.encode()) > MAX_IPC_PATH:
        raise ValueError(
            f"address {text!r}: the path is {len(path.encode())} bytes; "
            f"UNIX socket paths have room for {MAX_IPC_PATH}"
        )
    return ZmqAddress("ipc", path=path)
