"""Where a TOML text's keys are (framewire/config/_positions.py), for messages that point into
a configuration file."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from framewire.config import Position, key_positions

SAMPLE = '''# comment
title = """multi
line "quoted" \\""" still"""
lit = \'\'\'a
b\'\'\'
"quoted key".x = 1   # c
a.b.c = [1, [2, 3], {x = 1, y = "z,]}"}]
when = 1979-05-27 07:32:00Z
[table . "sub"]
arr = [
  "x", # c
  'y',
]
[[arr2]]
n = 1
[[arr2]]
n = 2
inline = { p = { q = 'r' }, s = true }
'''


@pytest.mark.parametrize(
    ("path", "value", "key"),
    [
        ("title", (2, 9), (2, 1)),
        ("lit", (4, 7), (4, 1)),
        ("quoted key.x", (6, 18), (6, 1)),
        ("a.b.c", (7, 9), (7, 1)),
        ("a.b.c.1.0", (7, 14), (7, 14)),
        ("a.b.c.2.y", (7, 33), (7, 29)),
        ("when", (8, 8), (8, 1)),
        ("table.sub", (9, 1), (9, 1)),
        ("table.sub.arr.1", (12, 3), (12, 3)),
        ("arr2.1.n", (17, 5), (17, 1)),
        ("arr2.1.inline.p.q", (18, 22), (18, 18)),
        ("arr2.1.inline.s", (18, 33), (18, 29)),
        ("table.sub.missing", (9, 1), (9, 1)),  # the nearest: its table
    ],
)
def test_every_kind_of_key_is_placed(
    path: str, value: tuple[int, int], key: tuple[int, int]
) -> None:
    positions = key_positions(SAMPLE)
    assert positions.locate(path) == Position(*value)
    assert positions.locate(path, key=True) == Position(*key)


def paths(data: Any, prefix: str = "") -> Iterator[str]:
    items = data.items() if isinstance(data, dict) else enumerate(data)
    for key, value in items:
        path = f"{prefix}{key}"
        yield path
        if isinstance(value, dict | list):
            yield from paths(value, f"{path}.")


@pytest.mark.parametrize(
    "example", sorted((Path(__file__).parent.parent / "config").glob("**/*.toml")), ids=str
)
def test_every_key_of_the_examples_is_placed(example: Path) -> None:
    text = example.read_text()
    positions = key_positions(text)
    lines = text.splitlines()
    for path in paths(tomllib.loads(text)):
        assert path in positions, path
        where = positions.locate(path, key=True)
        assert where is not None
        last = path.rsplit(".", 1)[-1]
        assert last in lines[where.line - 1][where.column - 1 :] or last.isdigit(), path


def test_text_it_cannot_follow_gives_what_it_placed_before() -> None:
    positions = key_positions('a = 1\nb = "unterminated\nc = 3\n')
    assert positions.locate("a") == Position(1, 5)
    assert positions.locate("c") is None
    assert positions.locate("") is None
