"""What ``framewire check`` verifies beyond the schema: the files, directories and addresses a
loaded configuration refers to, and how its endpoints meet in streams.

It lives beside the transports, whose TLS set-up it uses (``framewire.config`` imports
nothing from the daemon). The loader (:func:`~framewire.config.load_config`) checks the file
alone, so it gives the same answer anywhere. :func:`check_config` looks at this machine as
the daemon would see it when started from the current directory:

Errors (``framewire check`` exits with status 2, every one listed):

- a TLS certificate, key or CA file that cannot be read, or that the daemon's own TLS set-up
  (:func:`framewire.daemon.transport.server_tls_context` / ``client_tls_context``) refuses;
- a ``file`` endpoint's input that cannot be opened (or a ``.gz`` one that is not gzip);
- a ``nats`` endpoint's ``nkey_seed`` or ``creds`` file that cannot be read, or either
  without the ``nkeys`` package nats-py signs with;
- a secret file (``[status] token_file``, a ``nats`` endpoint's ``password_file`` or
  ``token_file``) that cannot be read, is empty or holds more than one line; secret paths
  (these, ``nkey_seed``, ``creds`` and TLS files) are looked up as the daemon does, a
  relative one in ``$CREDENTIALS_DIRECTORY`` when that is set
  (:mod:`framewire.daemon.credentials`);
- a ``recorder`` directory that is not writable, or cannot be created (its nearest existing
  parent is not a writable directory);
- a disk buffer (``[endpoints.NAME.buffer] type = "disk"``) whose directory (``path``, or its
  default under the state directory) cannot be created or written, or that is also the
  directory of another endpoint's disk buffer (the second would find it locked);
- with ``[nats] embedded = true``: no nats-server program to run, a ``store_dir`` that cannot
  be created or written, a ``config_file`` that cannot be read or that has a ``jetstream``
  block of its own (it would replace the generated one);
- a UNIX socket (or ZeroMQ ``ipc://``) listening path whose directory does not exist, is on a
  filesystem that cannot hold a socket file (``/proc``, ``/sys``: the kernel's views of
  itself) or is not writable, or that is taken by a file that is not a socket;
- listeners that overlap: TCP by port and interface (``*``, ``0.0.0.0`` and ``::`` cover every
  address of their family on the port, ``*`` both families, and ZeroMQ binds ``::``
  dual-stack; host names are resolved and overlap when they share an address; a Rogue bridge
  in the server role binds P and P+1; a ZeroMQ bind naming a network interface is left out),
  UNIX sockets by path (one line per listener, naming every listener before it that it
  overlaps); and a listening host name that does not resolve.

Warnings (printed; the file is still usable): a secret (``token``, ``password``, an NKey
seed) written inline in a configuration file that every user may read, and a password in an
embedded nats-server's ``config_file`` that every user may read; the embedded
nats-server's ``max_store``, or a JetStream ``max_bytes`` on it, above the free space of the
store's disk; a disk buffer's ``max_size`` above the free space of its disk; a stream with
publishers but no subscribers, or
subscribers but no publishers, and a ``[streams.NAME]`` table no endpoint uses, each with the
nearest stream name when one looks like a typo.

Not verified: remote peers (connect addresses and NATS servers are neither resolved nor
tried), whether a listening port is free right now (a running daemon holds its own ports, so
probing them before a reload would only report those), and anything that changes after the
check.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import shutil
import socket
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Final

import attrs

from ..config import (
    Address,
    BridgeConfig,
    BufferConfig,
    Config,
    EndpointConfig,
    FileConfig,
    LinkConfig,
    NatsConfig,
    NatsServerConfig,
    PubSubConfig,
    RecorderConfig,
    TLSConfig,
    ZmqAddress,
    format_size,
)
from .credentials import NKEYS_MISSING, nkeys_installed, with_secrets
from .nats import NatsServerFailed, default_store_dir, find_binary
from .statedir import default_buffer_dir, default_history_dir

__all__ = ["CheckReport", "Resolver", "check_config", "resolve_host"]

#: Resolves a host name to listen on into IP address strings; raises OSError if it cannot.
Resolver = Callable[[str], list[str]]

_GZIP_MAGIC: Final = b"\x1f\x8b"


@attrs.frozen
class CheckReport:
    """What :func:`check_config` found: ``errors`` make the file unusable here, ``warnings``
    are likely mistakes. Each is one ``path: message`` line."""

    errors: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


def resolve_host(host: str) -> list[str]:
    """The addresses a listener on ``host`` binds, as trio and ZeroMQ look them up.

    Raises OSError (``socket.gaierror``) with the resolver's reason when the name does not
    resolve.
    """
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def check_config(
    config: Config,
    *,
    resolve: Resolver = resolve_host,
    config_file: str | Path | None = None,
    offline: bool = False,
) -> CheckReport:
    """Check ``config`` against this machine. Never raises for a problem it finds: every one
    is a line of the report. ``resolve`` looks up listening host names (tests pass their own).
    ``config_file``, the file ``config`` was loaded from, is looked at for secrets written
    inline in it while others may read it (a warning each).

    ``offline`` (``framewire check --offline``, for CI on another machine) looks at the file
    alone: no host name is resolved (listeners overlap only when they name the same host, or
    one takes every interface) and nothing on this machine is looked at (files, directories,
    sockets, free space, secret files, stream histories, the nats-server program); two disk
    buffers in one directory and how endpoints meet in streams are still checked.
    """
    inline = _inline_secrets(config, Path(config_file)) if config_file is not None else []
    errors: list[str] = []
    warnings = inline + _stream_warnings(config) + _replays(config)
    if not offline:
        config, secret_problems = with_secrets(config)
        errors += [str(problem) for problem in secret_problems]
        for name, endpoint in config.endpoints.items():
            errors += _endpoint_files(f"endpoints.{name}", endpoint)
        if config.nats is not None and config.nats.embedded:
            errors += _embedded_nats(config.nats)
            warnings += _embedded_nats_space(config) + _nats_config_secrets(config.nats)
        errors += _histories(config)
    errors += _overlapping_listeners(config, None if offline else resolve)
    buffer_errors, buffer_warnings = _disk_buffers(config, offline=offline)
    return CheckReport(tuple(errors + buffer_errors), tuple(warnings + buffer_warnings))


def _histories(config: Config) -> list[str]:
    """Each stream history's directory: writable."""
    errors: list[str] = []
    for name, stream in config.streams.items():
        history = stream.history
        if history is None:
            continue
        directory = Path(history.path) if history.path is not None else default_history_dir(name)
        problem = _writable_directory(directory)
        if problem:
            errors.append(f"streams.{name}.history.path: {problem}")
    return errors


def _replays(config: Config) -> list[str]:
    """A server's ``replay`` needs its stream's history."""
    warnings: list[str] = []
    for name, endpoint in config.endpoints.items():
        replay = getattr(endpoint, "replay", None)
        stream = getattr(endpoint, "stream", None)
        if replay is None or not isinstance(stream, str):
            continue
        settings = config.streams.get(stream)
        if settings is None or settings.history is None:
            warnings.append(
                f"endpoints.{name}.replay: stream {stream!r} keeps no history (add "
                f"[streams.{stream}.history]): its clients get the live stream only"
            )
    return warnings


def _disk_buffers(config: Config, *, offline: bool = False) -> tuple[list[str], list[str]]:
    """Each disk buffer's directory: its own, and (unless ``offline``) writable, its disk big
    enough."""
    errors: list[str] = []
    warnings: list[str] = []
    owners: dict[str, str] = {}
    for name, endpoint in config.endpoints.items():
        buffer = getattr(endpoint, "buffer", None)
        if not isinstance(buffer, BufferConfig) or not buffer.is_disk:
            continue
        directory = Path(buffer.path) if buffer.path is not None else default_buffer_dir(name)
        where = f"endpoints.{name}.buffer.path"
        key = os.path.realpath(directory)
        if key in owners:
            errors.append(
                f"{where}: {directory} is also the disk buffer of endpoint {owners[key]!r}; "
                "give each buffer a directory of its own"
            )
            continue
        owners[key] = name
        if offline:
            continue
        problem = _writable_directory(directory)
        if problem:
            errors.append(f"{where}: {problem}")
            continue
        existing = directory
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        try:
            free = shutil.disk_usage(existing).free
        except OSError:
            continue
        if buffer.disk_max_size > free:
            warnings.append(
                f"endpoints.{name}.buffer.max_size: {format_size(buffer.disk_max_size)} is more "
                f"than the {format_size(free)} free on the disk of {existing}: the buffer will "
                "find the disk full before its own bound"
            )
    return errors, warnings


def _embedded_nats(nats: NatsServerConfig) -> list[str]:
    """The embedded nats-server's program, store directory and extra configuration file."""
    errors: list[str] = []
    try:
        find_binary(nats.binary)
    except NatsServerFailed as exc:
        errors.append(f"nats.binary: {exc}")
    store = Path(nats.store_dir) if nats.store_dir is not None else default_store_dir()
    problem = _writable_directory(store)
    if problem:
        errors.append(f"nats.store_dir: {problem}")
    if nats.config_file is not None:
        problem = _unreadable(nats.config_file)
        if problem:
            errors.append(f"nats.config_file: {problem}")
        elif "jetstream" in _top_level_keys(Path(nats.config_file).read_text(errors="replace")):
            errors.append(
                f"nats.config_file: {nats.config_file} has a jetstream block of its own, which "
                "would replace framewire's whole (store_dir, max_store, domain); leave it out "
                "and set the domain with [nats] domain"
            )
    return errors


def _embedded_nats_space(config: Config) -> list[str]:
    """Warnings: JetStream bounds above the free space of the store's disk."""
    nats = config.nats
    assert nats is not None
    store = Path(nats.store_dir) if nats.store_dir is not None else default_store_dir()
    while not store.exists() and store != store.parent:
        store = store.parent
    try:
        free = shutil.disk_usage(store).free
    except OSError:
        return []
    where = f"the {format_size(free)} free on the disk of {store}"
    warnings = []
    if nats.max_store > free:
        warnings.append(
            f"nats.max_store: {format_size(nats.max_store)} is more than {where}: JetStream "
            "refuses publishes once the disk is full, before its own bound"
        )
    for name, endpoint in config.endpoints.items():
        if (
            isinstance(endpoint, NatsConfig)
            and not endpoint.servers
            and endpoint.mode == "jetstream"
            and endpoint.max_bytes > free
        ):
            warnings.append(
                f"endpoints.{name}.max_bytes: {format_size(endpoint.max_bytes)} is more than "
                f"{where}"
            )
    return warnings


def _top_level_keys(text: str) -> set[str]:
    """The keys at the top level of a nats-server configuration file (outside every block;
    comments and quoted strings skipped)."""
    keys: set[str] = set()
    depth = 0
    line_start = True
    index = 0
    length = len(text)
    while index < length:
        char = text[index]
        if char == "#" or text.startswith("//", index):
            index = text.find("\n", index)
            if index < 0:
                break
            continue
        if char in "\"'":
            end = text.find(char, index + 1)
            index = length if end < 0 else end + 1
            line_start = False
            continue
        if char in "{[":
            depth += 1
        elif char in "}]":
            depth = max(0, depth - 1)
        elif char == "\n" or char == ",":
            line_start = True
        elif not char.isspace():
            if line_start and depth == 0:
                match = _KEY.match(text, index)
                if match is not None:
                    keys.add(match.group(0).lower())
                    index = match.end()
                    line_start = False
                    continue
            line_start = False
        index += 1
    return keys


_KEY: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


# -- secrets -------------------------------------------------------------------------------

#: An NKey seed as ``nk`` writes it: "S", the key type, 56 base32 characters.
_NKEY_SEED: Final = re.compile(r"S[UAONCPX][A-Z2-7]{56}")


def _inline_secrets(config: Config, config_file: Path) -> list[str]:
    """A warning for each secret written in ``config_file`` while users other than its owner
    and group may read the file (mode & 0o004); none when it cannot be read or is private."""
    try:
        mode = stat.S_IMODE(os.stat(config_file).st_mode)
    except OSError:
        return []
    if not mode & stat.S_IROTH:
        return []
    found: list[tuple[str, str]] = []
    if config.status is not None and config.status.token is not None:
        found.append(("status.token", "status.token_file"))
    for name, endpoint in config.endpoints.items():
        if not isinstance(endpoint, NatsConfig):
            continue
        where = f"endpoints.{name}"
        if endpoint.password is not None:
            found.append((f"{where}.password", f"{where}.password_file"))
        if endpoint.token is not None:
            found.append((f"{where}.token", f"{where}.token_file"))
        for key in ("nkey_seed", "creds"):
            value: str | None = getattr(endpoint, key)
            if value is not None and _NKEY_SEED.search(value):
                found.append((f"{where}.{key}", f"{where}.{key} (the path of a file holding it)"))
    return [
        f"{key}: a secret written inline in {config_file}, which every user of this machine "
        f"can read (mode {mode:04o}); name a file with {instead} (see Secrets in "
        f"docs/configuration.md), or make the file private (chmod o-r {config_file})"
        for key, instead in found
    ]


#: A password in nats-server's configuration syntax: a ``password``/``pass``/``token`` key,
#: or a URL with ``user:password@``.
_NATS_SECRET: Final = re.compile(
    r"^\s*(?:password|pass|token|auth_token)\s*[:=]|\w://[^\s/@:\"']+:[^\s/@\"']+@",
    re.IGNORECASE | re.MULTILINE,
)


def _nats_config_secrets(nats: NatsServerConfig) -> list[str]:
    """A warning when ``[nats] config_file`` holds a password and every user may read it."""
    if nats.config_file is None:
        return []
    try:
        mode = stat.S_IMODE(os.stat(nats.config_file).st_mode)
        text = Path(nats.config_file).read_text(errors="replace")
    except OSError:
        return []  # an error of its own (_embedded_nats)
    lines = (line for line in text.splitlines() if not line.lstrip().startswith(("#", "//")))
    if not mode & stat.S_IROTH or not _NATS_SECRET.search("\n".join(lines)):
        return []
    return [
        f"nats.config_file: {nats.config_file} holds a password, and every user of this "
        f"machine can read it (mode {mode:04o}); make it private (chmod o-r "
        f"{nats.config_file}; see Secrets in docs/configuration.md for the service)"
    ]


# -- files and directories ------------------------------------------------------------------


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _unreadable(path: str) -> str | None:
    """Why ``path`` cannot be opened for reading, or None."""
    try:
        with open(path, "rb"):
            return None
    except OSError as exc:
        return f"cannot read {path}: {_reason(exc)}"


def _endpoint_files(prefix: str, endpoint: EndpointConfig) -> list[str]:
    errors: list[str] = []
    tls: TLSConfig | None = getattr(endpoint, "tls", None)
    listen: Address | None = getattr(endpoint, "listen", None)
    if tls is not None:
        errors += _tls_files(f"{prefix}.tls", tls, listening=listen is not None)
    if listen is not None and listen.path is not None:
        errors += _socket_path(f"{prefix}.listen", listen.path)
    if isinstance(endpoint, FileConfig):
        problem = _input_file(endpoint.path)
        if problem:
            errors.append(f"{prefix}.path: {problem}")
    elif isinstance(endpoint, RecorderConfig):
        problem = _writable_directory(Path(endpoint.path).parent)
        if problem:
            errors.append(f"{prefix}.path: {problem}")
    elif isinstance(endpoint, NatsConfig):
        for field in ("nkey_seed", "creds"):
            named: str | None = getattr(endpoint, field)
            if named is not None and (problem := _unreadable(named)):
                errors.append(f"{prefix}.{field}: {problem}")
            elif named is not None and not nkeys_installed():
                errors.append(f"{prefix}.{field}: {NKEYS_MISSING}")
    elif isinstance(endpoint, PubSubConfig) and endpoint.role == "publisher":
        address = endpoint.address
        if address.transport == "ipc" and not address.path.startswith("@"):
            errors += _socket_path(f"{prefix}.address", address.path)
    return errors


def _tls_files(prefix: str, tls: TLSConfig, *, listening: bool) -> list[str]:
    """Each named file readable, then the daemon's own TLS set-up, which loads them all."""
    errors = []
    for field in ("certificate", "key", "ca"):
        path: str | None = getattr(tls, field)
        if path is not None:
            problem = _unreadable(path)
            if problem:
                errors.append(f"{prefix}.{field}: {problem}")
    if errors:
        return errors
    # Imported here: the daemon imports the config package.
    from .transport import client_tls_context, server_tls_context

    try:
        (server_tls_context if listening else client_tls_context)(tls)
    except ValueError as exc:
        return [f"{prefix}: {str(exc).removeprefix('tls: ')}"]
    return []


def _input_file(path: str) -> str | None:
    try:
        with open(path, "rb") as handle:
            start = handle.read(len(_GZIP_MAGIC))
    except OSError as exc:
        return f"cannot read {path}: {_reason(exc)}"
    if path.endswith(".gz") and start and start != _GZIP_MAGIC:
        return f"{path} is not gzip-compressed (a path ending in .gz is read as gzip)"
    return None


def _writable_directory(directory: Path) -> str | None:
    """Why files cannot be created in ``directory`` (made first if missing), or None."""
    existing = directory
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"cannot create files in {directory}: {existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        if existing == directory:
            return f"cannot create files in {directory}: permission denied"
        return f"cannot create {directory}: {existing} is not writable"
    return None


def _socket_path(prefix: str, path: str) -> list[str]:
    directory = Path(path).parent
    if not directory.is_dir():
        return [f"{prefix}: cannot listen on {path}: no directory {directory}"]
    mounted = _filesystem_of(directory)
    if mounted is not None and mounted[1] in _NO_SOCKETS:
        mount, kind = mounted
        return [
            f"{prefix}: cannot listen on {path}: {mount} is a {kind} filesystem, which cannot "
            "hold a socket file; choose a directory on a real filesystem, such as "
            "/run/framewire"
        ]
    if not os.access(directory, os.W_OK | os.X_OK):
        return [f"{prefix}: cannot listen on {path}: {directory} is not writable"]
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return []
    if not stat.S_ISSOCK(mode):
        return [f"{prefix}: cannot listen on {path}: it exists and is not a socket"]
    return []


#: Filesystems of the kernel's views of itself, where no socket file can be created (root's
#: permission to write there notwithstanding).
_NO_SOCKETS: Final = frozenset(
    {
        "proc",
        "sysfs",
        "cgroup",
        "cgroup2",
        "debugfs",
        "tracefs",
        "securityfs",
        "pstore",
        "bpf",
        "configfs",
        "efivarfs",
        "fusectl",
        "binfmt_misc",
        "mqueue",
        "nsfs",
        "selinuxfs",
        "devpts",
        "hugetlbfs",
        "rpc_pipefs",
    }
)


def _filesystem_of(directory: Path) -> tuple[str, str] | None:
    """The mount point and filesystem type ``directory`` is on (from /proc/self/mountinfo),
    or None where the system does not say."""
    try:
        table = Path("/proc/self/mountinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    target = os.path.realpath(directory)
    found: tuple[str, str] | None = None
    for line in table.splitlines():
        fields = line.split(" ")
        if len(fields) < 10 or "-" not in fields[6:]:
            continue
        mount = _unescape(fields[4])
        kind = fields[fields.index("-", 6) + 1]
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and (found is None or len(mount) >= len(found[0])):
            found = (mount, kind)  # the last of equal mount points is the one on top
    return found


def _unescape(field: str) -> str:
    """A mountinfo path: spaces, tabs, newlines and backslashes are written as octal."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


# -- listeners ------------------------------------------------------------------------------


@attrs.frozen
class _Listener:
    """One bound port (or socket path) and who binds it, for the overlap check."""

    path: str  # of the configured value, e.g. endpoints.a.listen
    owner: str  # [status] or endpoint 'a'
    shown: str  # the address as written, e.g. tcp://localhost:4536
    host: str | None = None  # None: every interface
    port: int = 0
    dual_stack: bool = False  # ZeroMQ: an IPv6 wildcard takes IPv4 too
    socket_path: str | None = None


def _listeners(config: Config) -> Iterable[_Listener]:
    if config.status is not None:
        yield _tcp("status.listen", "[status]", config.status.listen)
    for name, endpoint in config.endpoints.items():
        path, owner = f"endpoints.{name}", f"endpoint {name!r}"
        listen: Address | None = getattr(endpoint, "listen", None)
        if listen is not None:
            yield _tcp(f"{path}.listen", owner, listen)
        if isinstance(endpoint, BridgeConfig) and endpoint.role == "server":
            address = endpoint.address
            yield _zmq(f"{path}.address", owner, address)
            second = _zmq(f"{path}.address", owner, address.with_port(address.port + 1))
            yield attrs.evolve(second, shown=f"{second.shown} (the bridge's second port)")
        elif isinstance(endpoint, PubSubConfig) and endpoint.role == "publisher":
            yield _zmq(f"{path}.address", owner, endpoint.address)


def _tcp(path: str, owner: str, address: Address) -> _Listener:
    if address.path is not None:
        return _Listener(path, owner, str(address), socket_path=os.path.abspath(address.path))
    return _Listener(path, owner, str(address), address.host, address.port)


def _zmq(path: str, owner: str, address: ZmqAddress) -> _Listener:
    if address.transport == "ipc":
        ipc = address.path if address.path.startswith("@") else os.path.abspath(address.path)
        return _Listener(path, owner, str(address), socket_path=ipc)
    return _Listener(path, owner, str(address), address.host, address.port, dual_stack=True)


#: What a listener binds: (IP version, address) pairs; offline, a host name is (0, name).
_Bound = frozenset[tuple[int, ipaddress.IPv4Address | ipaddress.IPv6Address | str]]
_ANY4: Final = ipaddress.IPv4Address("0.0.0.0")
_ANY6: Final = ipaddress.IPv6Address("::")
_EVERYWHERE: Final[_Bound] = frozenset({(4, _ANY4), (6, _ANY6)})


def _bound(listener: _Listener, resolve: Resolver | None) -> _Bound:
    """The (IP version, address) pairs ``listener`` binds; without ``resolve``, a host name
    stands for itself. Raises OSError from ``resolve``."""
    if listener.host is None:
        return _EVERYWHERE
    try:
        ips = [ipaddress.ip_address(listener.host)]
    except ValueError:
        if resolve is None:
            return frozenset({(0, listener.host)})
        ips = [ipaddress.ip_address(ip.partition("%")[0]) for ip in resolve(listener.host)]
    bound: set[tuple[int, ipaddress.IPv4Address | ipaddress.IPv6Address | str]]
    bound = {(ip.version, ip) for ip in ips}
    if listener.dual_stack and _ANY6 in ips:
        bound.add((4, _ANY4))
    return frozenset(bound)


def _interface_names() -> set[str]:
    try:
        return {name for _, name in socket.if_nameindex()}
    except OSError:  # pragma: no cover - no interface list on this system
        return set()


def _shared(a: _Bound, b: _Bound) -> str | None:
    """An address both bound sets take on their port, in words, or None if they are apart
    (or, for an unresolved host name, not known to overlap)."""
    names = {ip for version, ip in a if version == 0}
    other_names = {ip for version, ip in b if version == 0}
    if names or other_names:
        same = sorted(str(name) for name in names & other_names)
        if same:
            return same[0]
        if (names and b >= _EVERYWHERE) or (other_names and a >= _EVERYWHERE):
            return "every interface"
        return None
    for version, ip in sorted(a, key=str):
        for other_version, other in sorted(b, key=str):
            assert not isinstance(ip, str)
            assert not isinstance(other, str)
            if version != other_version or not (
                ip == other or ip.is_unspecified or other.is_unspecified
            ):
                continue
            specific = other if ip.is_unspecified else ip
            if specific.is_unspecified:
                return f"every IPv{version} interface"
            return str(specific)
    return None


def _overlapping_listeners(config: Config, resolve: Resolver | None) -> list[str]:
    """One line per listener that overlaps listeners before it, naming each of them. Without
    ``resolve`` (offline) a host name binds only itself."""
    errors = []
    seen: list[tuple[_Listener, _Bound]] = []
    for listener in _listeners(config):
        if listener.socket_path is not None:
            same = next((o for o, _ in seen if o.socket_path == listener.socket_path), None)
            if same is not None:
                errors.append(
                    f"{listener.path}: {listener.shown} is the socket {same.shown} of {same.owner}"
                )
            seen.append((listener, frozenset()))
            continue
        if listener.port == 0:
            continue  # a free port, picked when it starts
        if listener.dual_stack and listener.host in _interface_names():
            continue  # ZeroMQ binds a network interface by name; its addresses are not known
        try:
            bound = _bound(listener, resolve)
        except OSError as exc:
            errors.append(f"{listener.path}: cannot resolve {listener.host!r}: {_reason(exc)}")
            continue
        overlaps = []
        for other, other_bound in seen:
            if other.socket_path is not None or other.port != listener.port:
                continue
            shared = _shared(bound, other_bound)
            if shared is not None:
                overlaps.append(
                    f"{other.shown} of {other.owner} (both take {shared}, port {listener.port})"
                )
        if overlaps:
            errors.append(f"{listener.path}: {listener.shown} overlaps {'; and '.join(overlaps)}")
        seen.append((listener, bound))
    return errors


# -- streams --------------------------------------------------------------------------------


def _stream_ends(
    config: Config,
) -> tuple[dict[str, list[tuple[str, str]]], dict[str, list[tuple[str, str]]]]:
    """Streams to their publishers and their subscribers: (path of the value, endpoint name)."""
    publishers: dict[str, list[tuple[str, str]]] = {}
    subscribers: dict[str, list[tuple[str, str]]] = {}
    for name, endpoint in config.endpoints.items():
        path = f"endpoints.{name}"
        ends: list[tuple[dict[str, list[tuple[str, str]]], str, str | None]] = []
        if isinstance(endpoint, LinkConfig | BridgeConfig):
            ends += [(publishers, "publish", endpoint.publish)]
            ends += [(subscribers, "subscribe", endpoint.subscribe)]
        elif isinstance(endpoint, PubSubConfig):
            side = subscribers if endpoint.role == "publisher" else publishers
            ends.append((side, "stream", endpoint.stream))
        elif isinstance(endpoint, NatsConfig):
            side = subscribers if endpoint.direction == "publish" else publishers
            ends.append((side, "stream", endpoint.stream))
        elif endpoint.kind in ("receiver", "file", "generator"):
            ends.append((publishers, "stream", endpoint.stream))
        else:  # server, sender, recorder
            ends.append((subscribers, "stream", endpoint.stream))
        for side, key, stream in ends:
            if stream is not None:
                side.setdefault(stream, []).append((f"{path}.{key}", name))
    return publishers, subscribers


def _did_you_mean(
    stream: str, candidates: dict[str, list[tuple[str, str]]], ends: list[tuple[str, str]]
) -> str:
    """`` (did you mean 'x'?)`` for the candidate stream ``stream`` looks like a typo of.

    A stream of the same endpoints is no candidate: a link's ``publish`` is not a typo of its
    ``subscribe``.
    """
    owners = {name for _, name in ends}
    names = [
        name
        for name, their_ends in candidates.items()
        if name != stream and not owners & {owner for _, owner in their_ends}
    ]
    close = difflib.get_close_matches(stream, names, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _names(ends: list[tuple[str, str]]) -> str:
    return ", ".join(repr(name) for _, name in ends)


def _stream_warnings(config: Config) -> list[str]:
    publishers, subscribers = _stream_ends(config)
    warnings = []
    for stream, ends in publishers.items():
        if stream not in subscribers:
            warnings.append(
                f"{ends[0][0]}: stream {stream!r} has no subscribers (published by "
                f"{_names(ends)}): its frames go nowhere{_did_you_mean(stream, subscribers, ends)}"
            )
    for stream, ends in subscribers.items():
        if stream not in publishers:
            warnings.append(
                f"{ends[0][0]}: stream {stream!r} has no publishers (read by {_names(ends)}): "
                f"nothing will arrive{_did_you_mean(stream, publishers, ends)}"
            )
    used = {**publishers, **subscribers}
    for stream in config.streams:
        if stream not in used:
            warnings.append(
                f"streams.{stream}: no endpoint uses stream {stream!r}"
                f"{_did_you_mean(stream, used, [])}"
            )
    return warnings
