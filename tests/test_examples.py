"""Every example config shipped under config/ is valid, and demo.toml is the default."""

from __future__ import annotations

from pathlib import Path

import pytest

from framewire.config import default_config_text, load_config, parse_config

EXAMPLES = sorted((Path(__file__).parent.parent / "config").rglob("*.toml"))


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 3


@pytest.mark.parametrize(
    "path",
    EXAMPLES,
    ids=lambda p: p.parent.name + "/" + p.name if p.parent.name != "config" else p.name,
)
def test_example_config_is_valid(path: Path) -> None:
    assert load_config(path).endpoints


def test_demo_example_matches_the_embedded_default() -> None:
    demo = load_config(Path(__file__).parent.parent / "config" / "demo.toml")
    assert demo == parse_config(default_config_text())
