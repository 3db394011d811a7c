"""Sizes ("256MiB") and durations ("5s") as people write them in config files."""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Final

__all__ = ["format_duration", "format_size", "parse_duration", "parse_size"]

_SIZE_UNITS: Final = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_DURATION_UNITS: Final = {
    "us": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "min": 60.0,
    "h": 3600.0,
}
_MAX_SIZE: Final = 2**63 - 1
_NUMBER_UNIT: Final = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", re.ASCII)


def parse_size(value: object) -> int:
    """Bytes from an integer or a string such as ``"256MiB"``, ``"1.5 GB"``, ``"4096"``.

    Units: B, kB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB (powers of 1024), any case.
    Raises ValueError for anything else, for negative values and for fractional bytes.
    """
    if isinstance(value, bool):
        raise ValueError(f'expected a size such as "64MiB" or a number of bytes, got {value!r}')
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"expected a size of 0 bytes or more, got {value}")
        if value > _MAX_SIZE:
            raise ValueError(f"size {value} is too large")
        return value
    if isinstance(value, str):
        match = _NUMBER_UNIT.fullmatch(value)
        if match and match.group(2).lower() in _SIZE_UNITS:
            # Exact arithmetic: "4.1GB" is 4,100,000,000 bytes, not 4099999999.9999995.
            number = Fraction(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
            if number.denominator != 1:
                raise ValueError(f"size {value!r} is not a whole number of bytes")
            if number.numerator > _MAX_SIZE:
                raise ValueError(f"size {value!r} is too large")
            return number.numerator
    raise ValueError(
        f'expected a size such as "64MiB", "1.5GB" or a number of bytes, got {value!r}'
    )


def parse_duration(value: object) -> float:
    """Seconds from a number (seconds) or a string such as ``"5s"``, ``"250ms"``, ``"2m"``.

    Units: us, ms, s, m (or min), h. Raises ValueError for anything else or negative values.
    """
    if isinstance(value, bool):
        raise ValueError(f'expected a duration such as "5s", got {value!r}')
    if isinstance(value, int | float):
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"expected a duration of 0 or more seconds, got {value!r}")
        return float(value)
    if isinstance(value, str):
        match = _NUMBER_UNIT.fullmatch(value)
        if match and match.group(2).lower() in _DURATION_UNITS:
            seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]
            if not math.isfinite(seconds):
                raise ValueError(f"duration {value!r} is too large")
            return seconds
    raise ValueError(f'expected a duration such as "5s", "250ms" or "2m", got {value!r}')


def format_size(nbytes: int) -> str:
    """``67108864`` → ``"64MiB"``; exact where possible, else one decimal."""
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if nbytes >= factor:
            if nbytes % factor == 0:
                return f"{nbytes // factor}{unit}"
            return f"{nbytes / factor:.1f}{unit}"
    return f"{nbytes}B"


def format_duration(seconds: float) -> str:
    """``120.0`` → ``"2m"``, ``1.5`` → ``"1.5s"``: as a configuration would write it."""
    for unit, factor in (("h", 3600), ("m", 60)):
        if seconds >= factor and seconds % factor == 0:
            return f"{int(seconds // factor)}{unit}"
    return f"{seconds:g}s"
