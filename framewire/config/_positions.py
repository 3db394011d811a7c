"""Where each key of a TOML text is: line and column, for messages that point into the file.

:mod:`tomllib` gives values without positions. :func:`key_positions` scans text that
:mod:`tomllib` has already accepted and maps the dotted path of every table, key and array
element (``endpoints.cam.listen``, ``endpoints.cam.decimate.Timepoint``, ``nats.servers.0``)
to where its key and its value start. :meth:`KeyPositions.locate` finds the nearest placed
path for an error's path: a missing key is placed at the header of its table.

The scanner assumes well-formed TOML (it never raises for text tomllib accepted; for other
text its answer is whatever it found before it lost its way, possibly nothing).
"""

from __future__ import annotations

import bisect
import contextlib
import re
import tomllib
from typing import Final

import attrs

__all__ = ["KeyPositions", "Position", "key_positions"]


@attrs.frozen
class Position:
    """A 1-based line and column in the text."""

    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.line}:{self.column}"


@attrs.frozen
class _Placed:
    key: Position  # the key (for a table: its [header])
    value: Position  # the value (for a table: its [header] too)


class KeyPositions:
    """The positions of a TOML text's keys by dotted path (the paths of configuration errors:
    keys joined with ``.``, array elements by their index)."""

    def __init__(self, placed: dict[str, _Placed]) -> None:
        self._placed = placed

    def locate(self, path: str, *, key: bool = False) -> Position | None:
        """Where the value at ``path`` starts (its key's start with ``key``), or failing that,
        where the nearest enclosing table or key is; None when nothing on the path is placed
        (a top-level problem, or text the scanner could not follow)."""
        parts = path.split(".")
        while parts:
            placed = self._placed.get(".".join(parts))
            if placed is not None:
                return placed.key if key else placed.value
            parts.pop()
        return None

    def __contains__(self, path: str) -> bool:
        return path in self._placed


_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")
_BASIC_STRING: Final = re.compile(r'"(?:[^"\\\n]|\\.)*"')
_LITERAL_STRING: Final = re.compile(r"'[^'\n]*'")
_SPACE: Final = re.compile(r"[ \t]*")
#: A scalar that is not a string: numbers, booleans, dates and times (which may hold a space).
_SCALAR: Final = re.compile(r"[^,\]}\n#]*")


class _LostWay(Exception):
    """The text is not what the scanner expects (tomllib would have refused it)."""


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.index = 0
        self._line_starts = [0] + [m.end() for m in re.finditer(r"\n", text)]
        self.placed: dict[str, _Placed] = {}
        self._array_tables: dict[str, int] = {}

    def position(self, index: int) -> Position:
        line = bisect.bisect_right(self._line_starts, index)
        return Position(line, index - self._line_starts[line - 1] + 1)

    def place(self, path: list[str], key: int, value: int) -> None:
        self.placed.setdefault(".".join(path), _Placed(self.position(key), self.position(value)))

    def peek(self, count: int = 1) -> str:
        return self.text[self.index : self.index + count]

    def skip_space(self) -> None:
        self.index = _SPACE.match(self.text, self.index).end()  # type: ignore[union-attr]

    def skip_blank(self) -> None:
        """Spaces, newlines and comments."""
        while self.index < len(self.text):
            char = self.text[self.index]
            if char in " \t\r\n":
                self.index += 1
            elif char == "#":
                end = self.text.find("\n", self.index)
                self.index = len(self.text) if end < 0 else end
            else:
                return

    def key(self) -> list[str]:
        """A dotted key, each part unquoted."""
        parts = []
        while True:
            self.skip_space()
            for pattern in (_BARE_KEY, _BASIC_STRING, _LITERAL_STRING):
                match = pattern.match(self.text, self.index)
                if match is not None:
                    token = match.group(0)
                    parts.append(
                        token if pattern is _BARE_KEY else tomllib.loads(f"k = {token}")["k"]
                    )
                    self.index = match.end()
                    break
            else:
                raise _LostWay
            self.skip_space()
            if self.peek() != ".":
                return parts
            self.index += 1

    def value(self, path: list[str]) -> None:
        """Skip one value, placing it and whatever it holds."""
        text = self.text
        start = self.index
        if text.startswith(('"""', "'''"), start):
            quote = text[start : start + 3]
            end = start + 3
            while True:
                end = text.find(quote, end)
                if end < 0:
                    raise _LostWay
                if quote == '"""' and _escaped(text, end):
                    end += 1
                    continue
                break
            while text.startswith(quote[0], end + 3):  # up to two quotes may end the string
                end += 1
            self.index = end + 3
        elif text.startswith(('"', "'"), start):
            pattern = _BASIC_STRING if text[start] == '"' else _LITERAL_STRING
            match = pattern.match(text, start)
            if match is None:
                raise _LostWay
            self.index = match.end()
        elif text.startswith("[", start):
            self.index += 1
            count = 0
            while True:
                self.skip_blank()
                if self.peek() == "]":
                    self.index += 1
                    break
                element = self.index
                self.place([*path, str(count)], element, element)
                self.value([*path, str(count)])
                count += 1
                self.skip_blank()
                if self.peek() == ",":
                    self.index += 1
        elif text.startswith("{", start):
            self.index += 1
            while True:
                self.skip_space()
                if self.peek() == "}":
                    self.index += 1
                    break
                if self.peek() == ",":
                    self.index += 1
                    continue
                self.key_value(path)
        else:
            match = _SCALAR.match(text, start)
            assert match is not None  # it matches the empty string
            if match.end() == start:
                raise _LostWay
            self.index = match.end()

    def key_value(self, table: list[str]) -> None:
        key_start = self.index
        parts = self.key()
        for depth in range(1, len(parts)):  # a.b = 1 makes table a
            self.place([*table, *parts[:depth]], key_start, key_start)
        if self.peek() != "=":
            raise _LostWay
        self.index += 1
        self.skip_space()
        self.place([*table, *parts], key_start, self.index)
        self.value([*table, *parts])

    def header(self) -> list[str]:
        start = self.index
        array = self.peek(2) == "[["
        self.index += 2 if array else 1
        parts = self.key()
        closing = "]]" if array else "]"
        if self.peek(len(closing)) != closing:
            raise _LostWay
        self.index += len(closing)
        for depth in range(1, len(parts)):
            self.place(parts[:depth], start, start)
        if array:
            name = ".".join(parts)
            index = self._array_tables.get(name, 0)
            self._array_tables[name] = index + 1
            self.place(parts, start, start)
            parts = [*parts, str(index)]
        self.place(parts, start, start)
        return parts

    def document(self) -> None:
        table: list[str] = []
        while True:
            self.skip_blank()
            if self.index >= len(self.text):
                return
            if self.peek() == "[":
                table = self.header()
            else:
                self.key_value(table)


def _escaped(text: str, index: int) -> bool:
    """Whether the character at ``index`` follows an odd number of backslashes."""
    count = 0
    while index > count and text[index - count - 1] == "\\":
        count += 1
    return count % 2 == 1


def key_positions(text: str) -> KeyPositions:
    """The positions of every table, key and array element in ``text`` (TOML that tomllib
    accepts). Never raises: for text it cannot follow, what it placed before that."""
    scanner = _Scanner(text)
    with contextlib.suppress(_LostWay, tomllib.TOMLDecodeError, IndexError):
        scanner.document()
    return KeyPositions(scanner.placed)
