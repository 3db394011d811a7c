"""Loading TOML into the schema with a strict cattrs converter, and saying what is wrong.

Strict means: unknown keys are errors, and no silent coercion (``9.7`` is not an int,
``"yes"`` is not a bool). Every problem found is reported, each as ``path: message``, e.g.
``endpoints.g3-out.max_queue_frames: expected a positive number, got -1``.
"""

from __future__ import annotations

import importlib.resources
import tomllib
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

import cattrs
from cattrs.errors import ForbiddenExtraKeysError
from cattrs.gen import make_mapping_structure_fn

from ._address import Address, parse_address
from ._schema import (
    ENDPOINT_KINDS,
    Config,
    Duration,
    EndpointConfig,
    FieldError,
    ListenAddress,
    Name,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveDuration,
    PositiveFloat,
    PositiveInt,
    PositiveSize,
    ProtocolName,
    Size,
    check_name,
    check_protocol,
)
from ._units import parse_duration, parse_size

__all__ = ["ConfigError", "default_config_text", "load_config", "parse_config"]

_TYPE_WORDS: Final = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


class ConfigError(ValueError):
    """A configuration that cannot be used. ``errors`` lists every problem, one per line."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = errors
        super().__init__(f"{source}: " + "; ".join(errors))

    def __str__(self) -> str:
        lines = "\n".join(f"  {error}" for error in self.errors)
        count = len(self.errors)
        return (
            f"{self.source}: {count} error{'s' if count != 1 else ''} in the configuration\n{lines}"
        )


def _describe(value: object) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value)


def _strict(expected: type) -> Callable[[object, object], object]:
    def structure(value: object, _: object) -> object:
        if expected is float and type(value) is int:
            return float(value)
        if type(value) is not expected:
            raise ValueError(f"expected {_TYPE_WORDS[expected]}, got {_describe(value)}")
        return value

    return structure


def _ignore_type(check: Callable[[object], object]) -> Callable[[object, object], object]:
    return lambda value, _: check(value)


def _is_literal(t: Any) -> bool:
    return typing.get_origin(t) is typing.Literal


def _literal_hook(t: Any) -> Callable[[object, object], object]:
    allowed = typing.get_args(t)

    def structure(value: object, _: object) -> object:
        if value not in allowed or type(value) is not type(allowed[0]):
            choices = ", ".join(repr(a) for a in allowed)
            raise ValueError(f"expected one of {choices}, got {_describe(value)}")
        return value

    return structure


def _is_str_dict(t: Any) -> bool:
    return typing.get_origin(t) is dict


def _make_converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=True)
    for t in (int, float, bool, str):
        converter.register_structure_hook(t, _strict(t))
    strict_int, strict_float, strict_str = _strict(int), _strict(float), _strict(str)

    def positive(value: Any) -> Any:
        if value <= 0:
            word = "integer" if type(value) is int else "number"
            raise ValueError(f"expected a positive {word}, got {value!r}")
        return value

    def non_negative(value: Any) -> Any:
        if value < 0:
            raise ValueError(f"expected 0 or more, got {value!r}")
        return value

    checked: dict[Any, Callable[[object], object]] = {
        PositiveInt: lambda v: positive(strict_int(v, int)),
        NonNegativeInt: lambda v: non_negative(strict_int(v, int)),
        PositiveFloat: lambda v: positive(strict_float(v, float)),
        NonNegativeFloat: lambda v: non_negative(strict_float(v, float)),
        PositiveSize: lambda v: positive(parse_size(v)),
        PositiveDuration: lambda v: positive(parse_duration(v)),
        Name: lambda v: check_name(typing.cast(str, strict_str(v, str))),
        ProtocolName: lambda v: check_protocol(typing.cast(str, strict_str(v, str))),
    }
    for newtype, check in checked.items():
        converter.register_structure_hook(newtype, _ignore_type(check))
    converter.register_structure_hook_factory(_is_literal, _literal_hook)
    converter.register_structure_hook(Size, lambda value, _: Size(parse_size(value)))
    converter.register_structure_hook(Duration, lambda value, _: Duration(parse_duration(value)))
    converter.register_structure_hook(Address, lambda value, _: parse_address(value))
    converter.register_structure_hook(
        ListenAddress, lambda value, _: ListenAddress(parse_address(value, listening=True))
    )

    def dict_hook_factory(t: Any) -> Callable[[object, object], object]:
        inner = make_mapping_structure_fn(t, converter)

        def structure(value: object, _: object) -> object:
            if not isinstance(value, dict):
                raise ValueError(f"expected a table, got {_describe(value)}")
            return inner(value, t)

        return structure

    converter.register_structure_hook_factory(_is_str_dict, dict_hook_factory)

    def structure_endpoint(value: object, _: object) -> EndpointConfig:
        if not isinstance(value, dict):
            raise ValueError(f"expected a table, got {_describe(value)}")
        kind = value.get("kind")
        if kind is None:
            raise FieldError("kind", f"missing; one of: {', '.join(ENDPOINT_KINDS)}")
        cls = ENDPOINT_KINDS.get(kind) if isinstance(kind, str) else None
        if cls is None:
            raise FieldError(
                "kind", f"unknown endpoint kind {kind!r} (known: {', '.join(ENDPOINT_KINDS)})"
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
        for key in sorted(exc.extra_fields):
            yield f"{_join(path, key)}: unknown key"
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


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _cross_checks(config: Config) -> list[str]:
    errors = []
    bound: dict[Address, str] = {}
    for name, endpoint in config.endpoints.items():
        listen = getattr(endpoint, "listen", None)
        if listen is None or listen.port == 0:
            continue
        if listen in bound:
            errors.append(
                f"endpoints.{name}.listen: {listen} is also the address of endpoint "
                f"{bound[listen]!r}"
            )
        bound[listen] = name
    return errors


def parse_config(text: str, source: str = "<config>") -> Config:
    """Parse TOML text into a :class:`Config`. Raises :class:`ConfigError` listing every error."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [f"not valid TOML: {exc}"]) from None
    try:
        config = _CONVERTER.structure(data, Config)
    except Exception as exc:
        raise ConfigError(source, list(dict.fromkeys(_errors(exc, "")))) from None
    problems = _cross_checks(config)
    if problems:
        raise ConfigError(source, problems)
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
