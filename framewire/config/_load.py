"""Loading TOML into the schema with a strict cattrs converter, and saying what is wrong.

Strict means: unknown keys are errors, and no silent coercion (``9.7`` is not an int,
``"yes"`` is not a bool). Every problem found is reported, each as ``path: message``, e.g.
``endpoints.g3-out.max_queue_frames: expected a positive number, got -1``.
"""

from __future__ import annotations

import difflib
import importlib.resources
import tomllib
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

import attrs
import cattrs
from cattrs.errors import ForbiddenExtraKeysError
from cattrs.gen import make_dict_structure_fn, make_mapping_structure_fn

from ._address import Address
from ._schema import (
    ENDPOINT_KINDS,
    Check,
    Config,
    EndpointConfig,
    FieldError,
    NatsConfig,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    describe,
)

__all__ = ["ConfigError", "default_config_text", "load_config", "parse_config"]


class ConfigError(ValueError):
    """A configuration that cannot be used. ``errors`` lists every problem, one per line.
    ``config`` is the configuration when the text was well formed and only the checks across
    its tables failed (``framewire check`` goes on to check it against the machine), else
    None."""

    def __init__(self, source: str, errors: list[str], *, config: Config | None = None) -> None:
        self.source = source
        self.errors = errors
        self.config = config
        super().__init__(f"{source}: " + "; ".join(errors))

    def __str__(self) -> str:
        lines = "\n".join(f"  {error}" for error in self.errors)
        count = len(self.errors)
        return (
            f"{self.source}: {count} error{'s' if count != 1 else ''} in the configuration\n{lines}"
        )


def _check_of(t: Any) -> Check | None:
    if typing.get_origin(t) is not typing.Annotated:
        return None
    return next((m for m in t.__metadata__ if isinstance(m, Check)), None)


def _checked_hook(t: Any) -> Callable[[object, object], object]:
    check = _check_of(t)
    assert check is not None
    parse = check.parse
    return lambda value, _: parse(value)


def _is_literal(t: Any) -> bool:
    return typing.get_origin(t) is typing.Literal


def _literal_hook(t: Any) -> Callable[[object, object], object]:
    allowed = typing.get_args(t)

    def structure(value: object, _: object) -> object:
        if value not in allowed or type(value) is not type(allowed[0]):
            choices = ", ".join(repr(a) for a in allowed)
            raise ValueError(f"expected one of {choices}, got {describe(value)}")
        return value

    return structure


def _is_str_dict(t: Any) -> bool:
    return typing.get_origin(t) is dict


def _make_converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=True)
    # Plain types are strict too: no 9.7 -> 9, no "yes" -> True.
    for plain, strict in (
        (int, StrictInt),
        (float, StrictFloat),
        (bool, StrictBool),
        (str, StrictStr),
    ):
        converter.register_structure_hook(plain, _checked_hook(strict))
    converter.register_structure_hook_factory(lambda t: _check_of(t) is not None, _checked_hook)
    converter.register_structure_hook_factory(_is_literal, _literal_hook)

    def dict_hook_factory(t: Any) -> Callable[[object, object], object]:
        inner = make_mapping_structure_fn(t, converter)

        def structure(value: object, _: object) -> object:
            if not isinstance(value, dict):
                raise ValueError(f"expected a table, got {describe(value)}")
            return inner(value, t)

        return structure

    converter.register_structure_hook_factory(_is_str_dict, dict_hook_factory)

    def table_hook_factory(cls: Any) -> Callable[[object, object], object]:
        inner = make_dict_structure_fn(cls, converter, _cattrs_forbid_extra_keys=True)

        def structure(value: object, _: object) -> object:
            if not isinstance(value, dict):
                raise ValueError(f"expected a table, got {describe(value)}")
            return inner(value, cls)

        return structure

    converter.register_structure_hook_factory(attrs.has, table_hook_factory)

    def structure_endpoint(value: object, _: object) -> EndpointConfig:
        if not isinstance(value, dict):
            raise ValueError(f"expected a table, got {describe(value)}")
        kind = value.get("kind")
        if kind is None:
            raise FieldError("kind", f"missing; one of: {', '.join(ENDPOINT_KINDS)}")
        cls = ENDPOINT_KINDS.get(kind) if isinstance(kind, str) else None
        if cls is None:
            hint = _suggestion(kind, list(ENDPOINT_KINDS)) if isinstance(kind, str) else ""
            raise FieldError(
                "kind",
                f"unknown endpoint kind {kind!r}{hint} (known: {', '.join(ENDPOINT_KINDS)})",
            )
        return converter.structure(value, cls)

    converter.register_structure_hook(EndpointConfig, structure_endpoint)
    return converter


_CONVERTER: Final = _make_converter()


def _errors(exc: BaseException, path: str) -> Iterator[str]:
    """Flatten a cattrs error tree into ``path: message`` lines."""
    for note in getattr(exc, "__notes__", ()):
        if isinstance(note, cattrs.AttributeValidationNote):
            path = _join(path, note.name)
        elif isinstance(note, cattrs.IterableValidationNote):
            path = _join(path, str(note.index))
    if isinstance(exc, ForbiddenExtraKeysError):
        known = [field.name for field in attrs.fields(exc.cl)] if attrs.has(exc.cl) else []
        for key in sorted(exc.extra_fields):
            yield f"{_join(path, key)}: unknown key{_suggestion(key, known)}"
        return
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            yield from _errors(sub, path)
        return
    if isinstance(exc, FieldError):
        yield f"{_join(path, exc.field)}: {exc}"
    elif isinstance(exc, KeyError):
        yield f"{path}: required key missing"
    elif isinstance(exc, ValueError | TypeError):
        yield f"{path or '(top level)'}: {exc}"
    else:  # pragma: no cover - a converter bug, reported rather than hidden
        yield f"{path or '(top level)'}: {type(exc).__name__}: {exc}"


def _suggestion(key: str, known: list[str]) -> str:
    """`` (did you mean 'policy'?)`` when ``key`` looks like a typo of a known key, else ``""``."""
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _cross_checks(config: Config) -> list[str]:
    errors = []
    bound: dict[Address, str] = {}
    if config.status is not None and config.status.listen.port != 0:
        bound[config.status.listen] = "[status]"
    embedded_nats = config.nats is not None and config.nats.embedded
    for name, endpoint in config.endpoints.items():
        if isinstance(endpoint, NatsConfig) and not endpoint.servers and not embedded_nats:
            errors.append(
                f"endpoints.{name}.servers: required key missing (or set [nats] embedded = "
                "true to use a nats-server framewire runs itself)"
            )
    for name, endpoint in config.endpoints.items():
        listen = getattr(endpoint, "listen", None)
        if not isinstance(listen, Address) or (listen.port == 0 and not listen.is_unix):
            continue
        if listen.scheme == "tls":  # the same port as tcp://
            listen = attrs.evolve(listen, scheme="tcp")
        if listen in bound:
            other = bound[listen]
            owner = other if other == "[status]" else f"endpoint {other!r}"
            errors.append(f"endpoints.{name}.listen: {listen} is also the address of {owner}")
        bound[listen] = name
    return errors


#: The error for a file without endpoints: it would run nothing, and on a reload it would stop
#: every endpoint (an empty file saved by mistake, a truncated copy).
NO_ENDPOINTS: Final = (
    "no endpoints configured; a configuration needs at least one [endpoints.NAME] table "
    "(to stop every endpoint, stop the daemon)"
)


def parse_config(text: str, source: str = "<config>") -> Config:
    """Parse TOML text into a :class:`Config`. Raises :class:`ConfigError` listing every error.

    Text with no endpoints (an empty file included) is an error, reported once the rest of the
    text is well formed:
    ``framewire check``, ``framewire run FILE`` and a reload all refuse it. Code that builds a
    :class:`Config` directly may leave ``endpoints`` empty.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [f"not valid TOML: {exc}"]) from None
    try:
        config = _CONVERTER.structure(data, Config)
    except Exception as exc:
        raise ConfigError(source, list(dict.fromkeys(_errors(exc, "")))) from None
    problems = ([] if config.endpoints else [NO_ENDPOINTS]) + _cross_checks(config)
    if problems:
        raise ConfigError(source, problems, config=config)
    return config


def load_config(path: str | Path) -> Config:
    """Read and parse a config file. Raises :class:`ConfigError` (also for unreadable files)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), [f"cannot read the file: {exc}"]) from None
    return parse_config(text, str(path))


def default_config_text() -> str:
    """The embedded default configuration used by ``framewire run`` with no file."""
    return importlib.resources.files(__package__).joinpath("default.toml").read_text("utf-8")
