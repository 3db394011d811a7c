"""Secrets the configuration names by file: where their paths lead, and reading them.

The keys that name secret files:

- ``[status] token_file``, and a ``nats`` endpoint's ``password_file`` and ``token_file``:
  read here, by :func:`with_secrets`, when the daemon starts and on every reload (so a
  changed file is a changed configuration: the reload restarts what uses it);
- a ``nats`` endpoint's ``nkey_seed`` and ``creds``: read by nats-py each time it connects;
- every ``tls`` table's ``certificate``, ``key`` and ``ca``: read when the endpoint starts;
- ``[nats] config_file`` (the embedded nats-server's own settings, which may hold
  passwords): read by nats-server when it starts.

A relative path in any of these is looked up in ``$CREDENTIALS_DIRECTORY`` when that is set
(systemd sets it for a unit with ``LoadCredential=``), else, as every other path, relative to
the working directory. An absolute path is used as written.

A secret file holds the secret and at most one trailing newline (``\\n`` or ``\\r\\n``),
which is not part of it; nothing else is stripped. Nothing here logs a secret, and the
schema leaves ``token`` and ``password`` out of its reprs.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from typing import Final

import attrs

from ..config import (
    Config,
    EndpointConfig,
    NatsConfig,
    NatsServerConfig,
    StatusConfig,
    TLSConfig,
)

__all__ = [
    "CREDENTIALS_DIRECTORY",
    "MAX_SECRET_SIZE",
    "NKEYS_MISSING",
    "SecretProblem",
    "SecretUnreadable",
    "nats_server_secrets",
    "nkeys_installed",
    "read_secret",
    "secret_path",
    "with_secrets",
]

#: The environment variable systemd sets to the directory of a unit's ``LoadCredential=``
#: files.
CREDENTIALS_DIRECTORY: Final = "CREDENTIALS_DIRECTORY"


#: Why a ``nats`` endpoint with ``nkey_seed`` or ``creds`` cannot start without nkeys.
NKEYS_MISSING: Final = (
    "nkey_seed and creds need the nkeys package (it signs the server's challenge): "
    "pip install 'framewire[nats]'"
)


def nkeys_installed() -> bool:
    """Whether the ``nkeys`` package, which nats-py signs with, can be imported."""
    try:
        return importlib.util.find_spec("nkeys") is not None
    except (ImportError, ValueError):
        return False


#: The largest token or password file read (a bigger one is a mistake: a wrong path).
MAX_SECRET_SIZE: Final = 64 << 10


class SecretUnreadable(Exception):
    """A secret file that cannot be used; the message names the file and says why."""


@attrs.frozen
class SecretProblem:
    """A secret file that cannot be used: ``owner`` is ``"status"`` or the endpoint's name,
    ``key`` the path of the configuration key (``endpoints.up.password_file``)."""

    owner: str
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


def secret_path(path: str, environ: Mapping[str, str] | None = None) -> str:
    """Where the secret file ``path`` is: a relative path in ``$CREDENTIALS_DIRECTORY`` when
    that is set (and not empty), else ``path`` unchanged."""
    directory = (os.environ if environ is None else environ).get(CREDENTIALS_DIRECTORY)
    if not directory or os.path.isabs(path):
        return path
    return os.path.join(directory, path)


def read_secret(path: str) -> str:
    """The secret in the file ``path``, less one trailing newline.

    Raises :class:`SecretUnreadable` when the file cannot be read, is larger than
    :data:`MAX_SECRET_SIZE`, is not UTF-8, is empty, or holds more than one line (a line
    break inside a token or password is a mistake, and in an HTTP header an attack). The
    message never contains the file's content.
    """
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_SECRET_SIZE + 1)
    except OSError as exc:
        raise SecretUnreadable(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_SECRET_SIZE:
        raise SecretUnreadable(
            f"{path} is larger than {MAX_SECRET_SIZE >> 10} KiB: not a token or password"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretUnreadable(f"{path} is not UTF-8 text") from None
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise SecretUnreadable(f"{path} is empty")
    if "\n" in text or "\r" in text:
        raise SecretUnreadable(
            f"{path} holds more than one line (a secret file holds the secret and at most one "
            "trailing newline)"
        )
    return text


def with_secrets(
    config: Config, environ: Mapping[str, str] | None = None
) -> tuple[Config, list[SecretProblem]]:
    """``config`` with its secrets in hand: the ``token_file`` and ``password_file`` keys read
    into ``token`` and ``password`` (the ``*_file`` key then None), and every other secret
    path looked up as :func:`secret_path` says (absolute ones unchanged).

    Never raises for a secret file: each one that cannot be read is a
    :class:`SecretProblem`, and its key is left as it was. Applying it twice changes
    nothing more than applying it once.
    """
    problems: list[SecretProblem] = []
    status = config.status
    if status is not None:
        status = _status(status, environ, problems)
    endpoints = {
        name: _endpoint(name, endpoint, environ, problems)
        for name, endpoint in config.endpoints.items()
    }
    nats = config.nats
    if nats is not None:
        nats = nats_server_secrets(nats, environ)
    changed = status != config.status or endpoints != config.endpoints or nats != config.nats
    if changed:
        config = attrs.evolve(config, status=status, endpoints=endpoints, nats=nats)
    return config, problems


def nats_server_secrets(
    nats: NatsServerConfig, environ: Mapping[str, str] | None = None
) -> NatsServerConfig:
    """``[nats]`` with its ``config_file`` (which may hold the leaf node's or the clients'
    passwords) looked up as :func:`secret_path` says; nats-server reads it."""
    return attrs.evolve(nats, config_file=_path(nats.config_file, environ))


def _status(
    status: StatusConfig, environ: Mapping[str, str] | None, problems: list[SecretProblem]
) -> StatusConfig:
    if status.token_file is None:
        return status
    try:
        token = read_secret(secret_path(status.token_file, environ))
    except SecretUnreadable as exc:
        problems.append(SecretProblem("status", "status.token_file", str(exc)))
        return status
    return attrs.evolve(status, token=token, token_file=None)


def _endpoint(
    name: str,
    endpoint: EndpointConfig,
    environ: Mapping[str, str] | None,
    problems: list[SecretProblem],
) -> EndpointConfig:
    tls = getattr(endpoint, "tls", None)
    if isinstance(tls, TLSConfig):
        # Every kind that has a tls key has it as TLSConfig | None; mypy sees the union.
        endpoint = attrs.evolve(endpoint, tls=_tls(tls, environ))  # type: ignore[arg-type]
    if not isinstance(endpoint, NatsConfig):
        return endpoint
    password, password_file = endpoint.password, endpoint.password_file
    if password_file is not None:
        try:
            password = read_secret(secret_path(password_file, environ))
        except SecretUnreadable as exc:
            problems.append(SecretProblem(name, f"endpoints.{name}.password_file", str(exc)))
        else:
            password_file = None
    token, token_file = endpoint.token, endpoint.token_file
    if token_file is not None:
        try:
            token = read_secret(secret_path(token_file, environ))
        except SecretUnreadable as exc:
            problems.append(SecretProblem(name, f"endpoints.{name}.token_file", str(exc)))
        else:
            token_file = None
    return attrs.evolve(
        endpoint,
        password=password,
        password_file=password_file,
        token=token,
        token_file=token_file,
        nkey_seed=_path(endpoint.nkey_seed, environ),
        creds=_path(endpoint.creds, environ),
    )


def _tls(tls: TLSConfig, environ: Mapping[str, str] | None) -> TLSConfig:
    return attrs.evolve(
        tls,
        certificate=_path(tls.certificate, environ),
        key=_path(tls.key, environ),
        ca=_path(tls.ca, environ),
    )


def _path(path: str | None, environ: Mapping[str, str] | None) -> str | None:
    return None if path is None else secret_path(path, environ)
