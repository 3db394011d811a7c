"""The dashboard page in a real headless Chromium, driven over the DevTools protocol.

Skipped, with the reason shown, where no Chromium is installed (CI installs Debian's
``chromium`` first: see .ci/run).
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from framewire import Frame, FrameKind

from .helpers import connect, endpoint_port, running_daemon, wait_until
from .nats_helpers import NatsServer
from .test_systemd import free_port

CHROMIUM = next(
    (path for name in ("chromium", "chromium-browser") if (path := shutil.which(name))), None
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium on PATH: the dashboard's browser test needs Debian's chromium package "
    "(apt-get install chromium; .ci/run installs it)",
)

HOSTILE = "<img src=x onerror=alert(1)>"
TOKEN = "page-token"

CONFIG = f"""
[status]
listen = "127.0.0.1:0"
interval = "100ms"
token = "{TOKEN}"

[endpoints.source]
kind = "generator"
stream = "demo"
rate = 50.0
size = "1KiB"

[endpoints.demo-out]
kind = "server"
listen = "tcp://127.0.0.1:0"
stream = "demo"
max_clients = 300

[endpoints.in]
kind = "receiver"
listen = "tcp://127.0.0.1:0"
stream = "hostile"
"""


class DevTools:
    """One page of a browser, over the Chrome DevTools protocol (flat sessions)."""

    def __init__(self, connection: WebSocketConnection) -> None:
        self._connection = connection
        self._ids = itertools.count(1)
        self.session: str | None = None

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command; its result. Events arriving meanwhile are skipped."""
        number = next(self._ids)
        message: dict[str, Any] = {"id": number, "method": method, "params": params}
        if self.session is not None and not method.startswith("Target."):
            message["sessionId"] = self.session
        await self._connection.send_message(json.dumps(message))
        with trio.fail_after(20):
            while True:
                reply = json.loads(await self._connection.get_message())
                if reply.get("id") == number:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    result: dict[str, Any] = reply["result"]
                    return result

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")


@asynccontextmanager
async def browser(profile: Path) -> AsyncIterator[DevTools]:
    """A headless Chromium with a fresh profile; its DevTools connection."""
    assert CHROMIUM is not None
    process = await trio.lowlevel.open_process(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",  # tests run as root in CI containers
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            f"--user-data-dir={profile}",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    try:
        said = b""
        with trio.fail_after(60):
            while (found := re.search(rb"DevTools listening on (ws://\S+)", said)) is None:
                chunk = await process.stderr.receive_some(4096)
                assert chunk, f"chromium exited: {said.decode(errors='replace')}"
                said += chunk
        async with trio.open_nursery() as nursery:
            # Keep reading its stderr so that chromium never blocks on a full pipe.
            nursery.start_soon(_drain, process.stderr)
            async with open_websocket_url(
                found.group(1).decode(), connect_timeout=20, max_message_size=16 << 20
            ) as connection:
                yield DevTools(connection)
            nursery.cancel_scope.cancel()
    finally:
        process.kill()
        with trio.move_on_after(20):
            await process.wait()
        await process.stderr.aclose()


async def _drain(stream: trio.abc.ReceiveStream) -> None:
    while await stream.receive_some(65536):
        pass


async def open_page(tools: DevTools, url: str) -> None:
    target = await tools.call("Target.createTarget", url=url)
    attached = await tools.call("Target.attachToTarget", targetId=target["targetId"], flatten=True)
    tools.session = attached["sessionId"]
    await tools.call("Runtime.enable")


async def page_where(tools: DevTools, expression: str, accept: Any) -> Any:
    """Evaluate ``expression`` until ``accept(value)`` holds; that value."""
    with trio.fail_after(30):
        while True:
            value = await tools.evaluate(expression)
            if accept(value):
                return value
            await trio.sleep(0.1)


ENDPOINT_ROWS = """JSON.stringify(Object.fromEntries([...document.querySelectorAll(
  "tbody[data-endpoint]")].map((body) => [body.dataset.endpoint, {
    frames_out: body.querySelector(".frames_out").textContent,
    error: body.querySelector(".error").textContent,
    state: body.querySelector(".state").textContent}])))"""


async def test_the_page_shows_every_endpoint_live_and_hostile_text_as_text(
    tmp_path: Path,
) -> None:
    async with running_daemon(CONFIG) as daemon:
        assert daemon.status_server is not None
        port = daemon.status_server.port
        # A frame type and an error message that would be markup, were they treated as HTML.
        producer = await connect(endpoint_port(daemon, "in"))
        await producer.send([Frame(FrameKind.METADATA, HOSTILE, b"{}")])
        await wait_until(lambda: daemon.endpoints["in"].status.frames_in == 1)
        daemon.endpoints["in"].status.record_error(f"bad bytes: {HOSTILE}")
        async with browser(tmp_path / "profile") as tools:
            await open_page(tools, f"http://127.0.0.1:{port}/?token={TOKEN}")

            def every_endpoint(text: str | None) -> bool:
                return text is not None and set(json.loads(text)) == {"source", "demo-out", "in"}

            first = json.loads(await page_where(tools, ENDPOINT_ROWS, every_endpoint))
            counted = int(first["source"]["frames_out"].replace(",", ""))

            def counted_more(text: str) -> bool:
                frames = json.loads(text)["source"]["frames_out"]
                return int(frames.replace(",", "")) > counted

            # The generator runs: the page's frame counter goes up by itself (the websocket).
            later = json.loads(await page_where(tools, ENDPOINT_ROWS, counted_more))
            assert later["source"]["state"] == "running"
            assert HOSTILE in later["in"]["error"]
            assert await tools.evaluate("document.querySelectorAll('img').length") == 0
            types = await tools.evaluate("document.querySelector('#streams tbody').textContent")
            assert HOSTILE in types
            assert await tools.evaluate("document.getElementById('connection').textContent") == (
                "live"
            )

            # Many clients fold away under their endpoint; unfolded, the page draws at most
            # 200 of them and counts the rest.
            clients = [await connect(endpoint_port(daemon, "demo-out")) for _ in range(205)]
            summary = "document.querySelector('tbody[data-endpoint=\"demo-out\"] summary')"
            await page_where(tools, f"{summary}?.textContent", lambda text: text == "205 clients")
            assert await tools.evaluate("document.querySelectorAll('table.clients').length") == 0
            await tools.evaluate(f"{summary}.click()")
            rows = "document.querySelectorAll('table.clients tbody tr')"
            shown = await page_where(tools, f"{rows}.length", lambda count: count == 201)
            assert shown == 201
            more = await tools.evaluate(f"[...{rows}].pop().textContent")
            assert more.startswith("5 more clients not shown")
            for client in clients:
                await client.stream.aclose()
        await producer.stream.aclose()


async def test_a_jetstream_spool_is_shown_under_its_endpoint(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    """A JetStream endpoint's spool (the stream's bytes against its bound, its fill) is a
    line under the endpoint, amber once it passes 80 % of a bound."""
    config = f"""
[status]
listen = "127.0.0.1:0"
token = "{TOKEN}"

[endpoints.source]
kind = "generator"
stream = "s"
rate = 200
size = "1KiB"

[endpoints.to-nats]
kind = "nats"
direction = "publish"
servers = ["{nats_server.url}"]
pack_frames = 0
stream = "s"
mode = "jetstream"
max_bytes = "64KiB"
"""
    async with running_daemon(config) as daemon:
        assert daemon.status_server is not None
        port = daemon.status_server.port
        async with browser(tmp_path / "profile") as tools:
            await open_page(tools, f"http://127.0.0.1:{port}/?token={TOKEN}")
            line = "document.querySelector('tbody[data-endpoint=\"to-nats\"] tr.spool')"
            text = await page_where(
                tools,
                f"{line}?.className + ' | ' + {line}?.textContent",
                lambda text: bool(text) and "% full" in text and "warn" in text,
            )
    assert "JetStream ok" in text
    assert " of 65.5 kB" in text  # max_bytes = "64KiB", in the page's units


HELD = """document.getElementById("held") && JSON.stringify({
  hidden: document.getElementById("held").hidden,
  streams: [...document.querySelectorAll("#held-streams tbody tr")].map((row) => ({
    stream: row.dataset.stream,
    text: row.textContent,
    holders: [...row.querySelectorAll(".holder")].map((line) => line.dataset.endpoint),
    colour: getComputedStyle(row.querySelector("td")).color})),
  first: document.querySelector("tbody[data-endpoint]")?.dataset.endpoint,
  holding: [...document.querySelectorAll("tbody.holding")].map((body) => body.dataset.endpoint),
  line: document.querySelector("tbody.holding tr.holding-line")?.textContent,
  streamRows: [...document.querySelectorAll("#streams tbody tr")].map(
    (row) => [row.dataset.stream, row.className])})"""

#: The amber of dashboard.css (--warn: #d29922), as the browser computes it.
AMBER = "rgb(210, 153, 34)"


async def test_a_held_stream_and_its_holder_are_at_the_top_in_amber(tmp_path: Path) -> None:
    """A sender whose reader is down holds its stream: the page shows the held stream and
    its holder (queue against its bounds) at the top, in amber, puts the holder first among
    the endpoints and the stream first among the streams; once the reader is there, the
    section goes away."""
    port = free_port()
    config = f"""
[status]
listen = "127.0.0.1:0"
interval = "100ms"
token = "{TOKEN}"

[endpoints.monitor]
kind = "server"
listen = "tcp://127.0.0.1:0"
stream = "other"

[endpoints.source]
kind = "generator"
stream = "camera"
rate = 50.0
size = "1KiB"

[endpoints.to-reader]
kind = "sender"
connect = "tcp://127.0.0.1:{port}"
stream = "camera"
max_queue_frames = 4
reconnect = {{ initial = "100ms", maximum = "200ms" }}
"""
    async with running_daemon(config) as daemon:
        assert daemon.status_server is not None
        daemon.streams.get("other")  # a stream that flows, listed first by the daemon
        async with browser(tmp_path / "profile") as tools:
            await open_page(tools, f"http://127.0.0.1:{daemon.status_server.port}/?token={TOKEN}")
            shown = json.loads(
                await page_where(
                    tools, HELD, lambda text: bool(text) and not json.loads(text)["hidden"]
                )
            )
            (row,) = shown["streams"]
            assert row["stream"] == "camera"
            assert row["holders"] == ["to-reader"]
            assert "4 of 4 frames" in row["text"]
            assert f"to-reader -> tcp://127.0.0.1:{port}" in row["text"]
            assert row["colour"] == AMBER
            assert shown["first"] == "to-reader"
            assert shown["holding"] == ["to-reader"]
            assert shown["line"].startswith("holds stream camera back for")
            assert shown["streamRows"][0] == ["camera", "held"]
            assert "(1 held)" in await tools.evaluate("document.title")

            # The reader comes: the stream flows, the section goes.
            listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
            async with listeners[0], trio.open_nursery() as nursery:
                nursery.start_soon(_read_everything, listeners[0])
                flowing = json.loads(
                    await page_where(tools, HELD, lambda text: json.loads(text)["hidden"])
                )
                nursery.cancel_scope.cancel()
            assert flowing["holding"] == []
            assert ["camera", ""] in flowing["streamRows"]


async def _read_everything(listener: trio.SocketListener) -> None:
    async with await listener.accept() as connection:
        while await connection.receive_some(1 << 16):
            pass


async def test_the_embedded_nats_server_is_shown_with_the_daemon(tmp_path: Path) -> None:
    config = f"""
[status]
listen = "127.0.0.1:0"
token = "{TOKEN}"

[nats]
embedded = true
listen = "127.0.0.1:0"
store_dir = "{tmp_path / "js"}"

[endpoints.source]
kind = "generator"
stream = "s"

[endpoints.to-nats]
kind = "nats"
direction = "publish"
stream = "s"
"""
    async with running_daemon(config) as daemon:
        assert daemon.status_server is not None
        assert daemon.nats_server is not None
        pid = daemon.nats_server.pid
        port = daemon.status_server.port
        async with browser(tmp_path / "profile") as tools:
            await open_page(tools, f"http://127.0.0.1:{port}/?token={TOKEN}")
            text = await page_where(
                tools,
                "document.getElementById('daemon')?.textContent",
                lambda text: bool(text) and "nats-server" in text,
            )
    assert f"running (pid {pid}), 0 restarts" in text


#: Counts the snapshots the page has been handed (its socket's onmessage calls), without
#: touching the page: a page whose sparkline has more points than that drew history.
COUNT_SNAPSHOTS = """
window.__snapshots = 0;
window.WebSocket = class extends window.WebSocket {
  set onmessage(handler) {
    super.onmessage = (event) => { handler(event); window.__snapshots += 1; };
  }
  get onmessage() { return super.onmessage; }
};
"""

FIRST_LOOK = """document.querySelector('tbody[data-endpoint="source"] svg.spark')
  && JSON.stringify({
  snapshots: window.__snapshots,
  points: document.querySelector('tbody[data-endpoint="source"] svg.spark polyline.out')
    .getAttribute("points").trim().split(" ").length,
  order: [...document.querySelectorAll("tbody[data-endpoint]")].map((b) => b.dataset.endpoint),
  failing: [...document.querySelectorAll("tbody.failing")].map((b) => b.dataset.endpoint),
  summary: Object.fromEntries([...document.querySelectorAll("#summary [data-what]")].map(
    (part) => [part.dataset.what, part.textContent])),
  streams: [...document.querySelectorAll("#streams tbody tr")].map((row) => row.dataset.stream),
  rate: document.querySelector('tbody[data-endpoint="source"] .bytes_out_rate').textContent,
  heads: [...document.querySelectorAll("#endpoints th")].map((th) => th.textContent)})"""

SUMMARY = """JSON.stringify(Object.fromEntries(
  [...document.querySelectorAll("#summary [data-what]")].map(
    (part) => [part.dataset.what, part.textContent])))"""

GREYED = """JSON.stringify({
  badge: document.getElementById("connection").textContent,
  disconnected: document.body.classList.contains("disconnected"),
  main: getComputedStyle(document.querySelector("main")).filter,
  opacity: getComputedStyle(document.querySelector("main")).opacity,
  title: document.title})"""


async def test_the_page_draws_history_at_once_failing_rows_first_and_greys_when_the_daemon_goes(
    tmp_path: Path,
) -> None:
    """Opened after a few seconds of traffic, the page draws the daemon's rate history at
    once (more points than snapshots it got); a summary line counts endpoints down, streams
    held and clients dropping; a failing endpoint's row comes first; a stream with no
    traffic is listed; rates have units that fit (a 10 KiB/s stream is not "0.00"); when
    the daemon goes, everything is greyed and the badge says since when."""
    nothing_there = free_port()
    config = f"""
[status]
listen = "127.0.0.1:0"
interval = "100ms"
token = "{TOKEN}"

[endpoints.source]
kind = "generator"
stream = "demo"
rate = 10.0
size = "1KiB"

[endpoints.demo-out]
kind = "server"
listen = "tcp://127.0.0.1:0"
stream = "demo"
max_queue_frames = 4

[endpoints.upstream]
kind = "receiver"
connect = "tcp://127.0.0.1:{nothing_there}"
stream = "quiet"
reconnect = {{ initial = "100ms", maximum = "200ms" }}
"""
    async with browser(tmp_path / "profile") as tools:
        async with running_daemon(config) as daemon:
            assert daemon.status_server is not None
            port = daemon.status_server.port

            def source_points() -> int:
                series = daemon.rates.history()["endpoints"].get("source", {})
                return len(series.get("frames_out", []))

            await wait_until(lambda: source_points() >= 10)  # a second of traffic
            target = await tools.call("Target.createTarget", url="about:blank")
            attached = await tools.call(
                "Target.attachToTarget", targetId=target["targetId"], flatten=True
            )
            tools.session = attached["sessionId"]
            await tools.call("Page.enable")
            await tools.call("Runtime.enable")
            await tools.call("Page.addScriptToEvaluateOnNewDocument", source=COUNT_SNAPSHOTS)
            await tools.call("Page.navigate", url=f"http://127.0.0.1:{port}/?token={TOKEN}")
            first = json.loads(await page_where(tools, FIRST_LOOK, bool))
            # History drawn on first load: more points than snapshots the page was handed.
            assert first["points"] >= 10
            assert first["points"] > first["snapshots"]
            assert first["order"][0] == "upstream"  # last in the file, first on the page
            assert first["failing"] == ["upstream"]
            assert first["summary"] == {
                "down": "1 of 3 endpoints down: upstream",
                "held": "no stream held",
                "dropping": "no client dropping",
            }
            assert "quiet" in first["streams"]  # no producer ever came
            assert "out bytes/s" in first["heads"]

            # 10 frames/s of 1 KiB: about 10 kB/s, never "0.00" (a window with no frame
            # reads "0 B/s").
            rate = await page_where(
                tools,
                "document.querySelector('tbody[data-endpoint=\"source\"] .bytes_out_rate')"
                ".textContent",
                lambda text: text.endswith(" kB/s"),
            )
            assert re.fullmatch(r"\d+(\.\d+)? kB/s", rate)

            # A client that does not read, and a burst far beyond its queue and its socket
            # buffers: it drops, and the summary says so.
            stalled = await connect(endpoint_port(daemon, "demo-out"))
            summary = "document.querySelector('tbody[data-endpoint=\"demo-out\"] summary')"
            await page_where(tools, f"{summary}?.textContent", lambda text: text == "1 client")
            stream = daemon.streams.get("demo")
            for i in range(400):  # 25 MiB
                await stream.publish([Frame(FrameKind.DATA, "d", bytes(64 * 1024), timestamp=i)])
            dropping = json.loads(
                await page_where(
                    tools,
                    SUMMARY,
                    lambda text: json.loads(text)["dropping"] != "no client dropping",
                )
            )
            assert dropping["dropping"] == "1 client dropping (last 10 s)"
            await stalled.stream.aclose()
        # The daemon is gone: the page says so, greyed.
        greyed = json.loads(
            await page_where(tools, GREYED, lambda text: json.loads(text)["disconnected"])
        )
    assert re.fullmatch(r"disconnected \(since \d\d:\d\d:\d\d\), reconnecting", greyed["badge"]), (
        greyed
    )
    assert "grayscale(1)" in greyed["main"]
    assert float(greyed["opacity"]) < 1
    assert greyed["title"] == "framewire disconnected"


FORMATS = """JSON.stringify([0, 999, 1000, 10240, 51200, 999499, 1e6, 2.5e6, 12.34e6, 3e9, 7.5e12]
  .map((x) => window.framewireUnits.bytesPerSecond(x)))"""


async def test_rates_and_sizes_have_units_that_fit(tmp_path: Path) -> None:
    """The page's one formatter for every rate and size: B, kB, MB, GB, TB (powers of
    1000), about three significant figures."""
    async with running_daemon(
        f'[status]\nlisten = "127.0.0.1:0"\ntoken = "{TOKEN}"\n'
        '[endpoints.source]\nkind = "generator"\nstream = "s"\n'
    ) as daemon:
        assert daemon.status_server is not None
        port = daemon.status_server.port
        async with browser(tmp_path / "profile") as tools:
            await open_page(tools, f"http://127.0.0.1:{port}/?token={TOKEN}")
            shown = json.loads(await page_where(tools, "window.framewireUnits && " + FORMATS, bool))
            size = await tools.evaluate("window.framewireUnits.bytes(65536)")
    assert shown == [
        "0 B/s",
        "999 B/s",
        "1.00 kB/s",
        "10.2 kB/s",
        "51.2 kB/s",
        "999 kB/s",
        "1.00 MB/s",
        "2.50 MB/s",
        "12.3 MB/s",
        "3.00 GB/s",
        "7.50 TB/s",
    ]
    assert size == "65.5 kB"
