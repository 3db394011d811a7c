"""The site and hub topology, against two real nats-server processes: a site's leaf node
(JetStream domain ``site``) where daemon A publishes, and a hub (domain ``hub``) where daemon
B reads with ``source_domain = "site"``: B's own streams on the hub source the site's across
the leaf node link, and B reads them durably. Also the embedded server's ``[nats] domain``.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
import trio

from framewire.config import parse_config
from framewire.daemon.checks import check_config
from framewire.daemon.nats import server_config_text

from .helpers import connect, endpoint_port, running_daemon, wait_until
from .nats_helpers import (
    METADATA,
    ConfiguredNatsServer,
    count,
    frames_of,
    nats_endpoint,
    producer,
    publisher_toml,
    read,
    subscriber_toml,
    wait_state,
)

nats = pytest.importorskip("nats")

HUB_READER = 'durable = "datacentre"\nstart = "all"\nsource_domain = "site"'


def hub_streams(url: str) -> dict[str, list[str]]:
    """The hub's FW_camera and FW_camera_META: the streams each sources, and their subjects."""

    async def main() -> dict[str, list[str]]:
        client = await nats.connect(url)
        try:
            js = client.jetstream()
            found = {}
            for name in ("FW_camera", "FW_camera_META"):
                info = await js.stream_info(name)
                sources = [
                    f"{source.name}@{source.external.api if source.external else ''}"
                    for source in info.config.sources or []
                ]
                found[name] = sources + list(info.config.subjects or [])
            return found
        finally:
            await client.close()

    return asyncio.run(main())


async def test_a_hub_reads_a_sites_stream_across_the_leaf_link_durably(
    site_and_hub: tuple[ConfiguredNatsServer, ConfiguredNatsServer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="framewire")
    site, hub = site_and_hub
    first = frames_of(300, size=2000)
    later = frames_of(300, start=300, size=2000)
    reader = subscriber_toml(hub.url, mode="jetstream", extra=HUB_READER)
    async with running_daemon(publisher_toml(site.url, mode="jetstream")) as a:
        writer = nats_endpoint(a, "to-nats")
        await wait_state(writer, "publishing")
        async with producer(a) as source:
            await source.send(METADATA + first)
            async with running_daemon(reader) as b:
                client = await connect(endpoint_port(b, "out"))
                got = await read(client, len(METADATA) + len(first))
                await client.stream.aclose()
            assert got == METADATA + first
            # B away; A goes on at the site.
            await source.send(later)
            await wait_until(lambda: writer.status.frames_out == len(METADATA) + 600)
    # B back, a late joiner at the hub: the site's metadata first, then what it missed.
    async with running_daemon(reader) as b:
        subscriber = nats_endpoint(b, "from-nats")
        client = await connect(endpoint_port(b, "out"))
        got = await read(client, len(METADATA) + len(later))
        await client.stream.aclose()
        assert count(subscriber, "duplicates_dropped") == 0
        assert count(subscriber, "frames_lost_upstream") == 0
        await wait_until(lambda: subscriber.status.detail.get("source_active") is not None)
    assert got == METADATA + later
    assert await trio.to_thread.run_sync(hub_streams, hub.url) == {
        "FW_camera": ["FW_camera@$JS.site.API"],
        "FW_camera_META": ["FW_camera_META@$JS.site.API"],
    }
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_the_embedded_servers_domain_and_a_config_file_that_adds_a_leaf_remote(
    tmp_path: Path,
) -> None:
    """``[nats] domain`` goes into the generated jetstream block, so a config_file that only
    adds ``leafnodes`` keeps the store, its bounds and the domain; a config_file with a
    jetstream block of its own (which would replace the generated one) is refused."""
    leaf = tmp_path / "leaf.conf"
    leaf.write_text('leafnodes { remotes: [ { url: "nats-leaf://hub.example:7422" } ] }\n')
    text = f"""
[nats]
embedded = true
store_dir = "{tmp_path / "js"}"
domain = "site"
config_file = "{leaf}"

[endpoints.to-hub]
kind = "nats"
direction = "publish"
stream = "camera"
mode = "jetstream"

[endpoints.gen]
kind = "generator"
stream = "camera"
"""
    config = parse_config(text)
    assert config.nats is not None
    generated = server_config_text(config.nats, tmp_path / "js", 4222)
    block = generated[generated.index("jetstream {") : generated.index("}")]
    assert 'domain: "site"' in block
    assert "max_file_store" in block
    assert generated.rstrip().endswith('include "../leaf.conf"')
    assert check_config(config).errors == ()
    leaf.write_text("jetstream { domain: site }\n" + leaf.read_text())
    (error,) = check_config(config).errors
    assert error.startswith(f"nats.config_file: {leaf} has a jetstream block of its own")


def test_check_warns_when_the_spool_is_bigger_than_its_disk(tmp_path: Path) -> None:
    text = f"""
[nats]
embedded = true
store_dir = "{tmp_path / "js"}"
max_store = "1000TiB"

[endpoints.to-hub]
kind = "nats"
direction = "publish"
stream = "camera"
mode = "jetstream"
max_bytes = "900TiB"

[endpoints.gen]
kind = "generator"
stream = "camera"
"""
    report = check_config(parse_config(text))
    assert report.errors == ()
    store, endpoint = (w for w in report.warnings if "free on the disk of" in w)
    assert store.startswith("nats.max_store: 1000TiB is more than the ")
    assert endpoint.startswith("endpoints.to-hub.max_bytes: 900TiB is more than the ")
