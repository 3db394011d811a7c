"""Every example config shipped under config/ is valid, and demo.toml is the default."""

from __future__ import annotations

from pathlib import Path

import pytest

from framewire.config import Config, default_config_text, load_config, parse_config

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


def test_the_readmes_relay_and_the_demo_listen_on_different_addresses() -> None:
    """The README's relay in four terminals runs config/relay.toml beside the embedded demo
    on one machine: no address of one may be one of the other's."""
    relay = load_config(Path(__file__).parent.parent / "config" / "relay.toml")
    demo = parse_config(default_config_text())

    def addresses(config: Config) -> set[str]:
        found = {str(config.status.listen)} if config.status else set()
        for endpoint in config.endpoints.values():
            listen = getattr(endpoint, "listen", None)
            if listen is not None:
                found.add(str(listen))
        return found

    assert addresses(relay)
    assert not addresses(relay) & addresses(demo)
