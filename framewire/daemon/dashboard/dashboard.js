// The framewire dashboard: draws each status snapshot from the status websocket.
// Everything in a snapshot came from the network (peer names, frame types, error messages):
// it is only ever put in the page as text (textContent, attribute properties), never as HTML.
"use strict";
(function () {
  // Points kept per endpoint for its sparkline: the daemon's bound (history.points in the
  // first snapshot), 900 until it says.
  let historyPoints = 900;
  const DROPPING_WINDOW = 10; // seconds: a client whose drops grew within it is "dropping"
  const MAX_CLIENT_ROWS = 200; // per endpoint; the rest are counted, not drawn
  const HEALTHY = new Set(["running", "listening", "connected", "up", "recording", "finished"]);
  const SVG = "http://www.w3.org/2000/svg";
  const token = new URLSearchParams(location.search).get("token");
  const history = new Map(); // endpoint name -> [{in, out}] frames/s, oldest first
  const dropsSeen = new Map(); // client key -> [frames_dropped, when it last grew]
  const unfolded = new Set(); // endpoints whose clients are shown
  const table = document.getElementById("endpoints");
  const badge = document.getElementById("connection");

  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }
  function num(x) {
    return typeof x === "number" && isFinite(x) ? x : 0;
  }
  function count(x) {
    return num(x).toLocaleString("en-US");
  }
  function rate(x) {
    const v = num(x);
    return v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2);
  }
  // Bytes with a unit that fits (B, kB, MB, GB, TB: powers of 1000), three figures or so.
  function bytes(x) {
    let v = num(x);
    const units = ["B", "kB", "MB", "GB", "TB"];
    let i = 0;
    while (Math.abs(v) >= 999.5 && i < units.length - 1) {
      v /= 1000;
      i++;
    }
    const digits = i === 0 || Math.abs(v) >= 99.95 ? 0 : Math.abs(v) >= 9.995 ? 1 : 2;
    return v.toFixed(digits) + " " + units[i];
  }
  function bytesPerSecond(x) {
    return bytes(x) + "/s";
  }
  // The formatters, for the page's tests (read-only).
  window.framewireUnits = Object.freeze({ bytes, bytesPerSecond, rate });
  function age(seconds) {
    let s = Math.max(0, Math.floor(num(seconds)));
    const d = Math.floor(s / 86400); s -= d * 86400;
    const h = Math.floor(s / 3600); s -= h * 3600;
    const m = Math.floor(s / 60); s -= m * 60;
    if (d) return d + "d" + String(h).padStart(2, "0") + "h";
    if (h) return h + "h" + String(m).padStart(2, "0") + "m";
    return m ? m + "m" + String(s).padStart(2, "0") + "s" : s + "s";
  }
  function clock(unix) {
    return new Date(num(unix) * 1000).toLocaleTimeString();
  }
  function cell(row, text, cls) {
    const td = el("td", text, cls);
    row.appendChild(td);
    return td;
  }
  function stateBadge(state) {
    const cls = HEALTHY.has(state) ? "ok" : state === "restarting" || state === "failed" ? "bad" : "warn";
    return el("span", state, "badge " + cls);
  }

  function sparkline(points) {
    const width = 120, height = 24;
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("class", "spark");
    svg.setAttribute("width", String(width));
    svg.setAttribute("height", String(height));
    const top = Math.max(1, ...points.map((p) => Math.max(p.in, p.out)));
    for (const key of ["in", "out"]) {
      const line = document.createElementNS(SVG, "polyline");
      line.setAttribute("class", key);
      // A page opened a moment ago spreads its few points over the width; from 60 on they
      // close up, until the history bound (historyPoints) fills it.
      const step = width / (Math.max(points.length, 60, 2) - 1);
      const x0 = width - step * (points.length - 1);
      line.setAttribute("points", points.map((p, i) =>
        (x0 + i * step).toFixed(1) + "," + (height - 1 - (p[key] / top) * (height - 2)).toFixed(1)
      ).join(" "));
      svg.appendChild(line);
    }
    const title = document.createElementNS(SVG, "title");
    title.textContent = "frames/s in (blue) and out (violet), last " + points.length + " points";
    svg.appendChild(title);
    return svg;
  }

  function renderDaemon(snap) {
    const daemon = snap.daemon || {};
    const list = document.getElementById("daemon");
    const items = [
      ["version", daemon.version],
      ["state", daemon.state],
      ["pid", daemon.pid],
      ["up", age(daemon.uptime)],
      ["config", daemon.config],
    ];
    const reload = daemon.last_reload;
    if (reload) {
      const outcome = reload.ok
        ? "ok" + (reload.changes && reload.changes.length ? ": " + reload.changes.join("; ") : "")
        : "FAILED: " + String(reload.error || "").trim().split("\n").pop().trim();
      items.push(["last reload", clock(reload.time) + " " + outcome]);
    } else {
      items.push(["last reload", "none"]);
    }
    const nats = daemon.nats_server;
    if (nats) {
      // The embedded nats-server's true state: "suspended" when the kernel holds it stopped.
      items.push(["nats-server", String(nats.state) + (nats.pid ? " (pid " + nats.pid + ")" : "") +
        ", " + count(nats.restarts) + " restarts" + (nats.last_error ? ", last: " + nats.last_error : "")]);
    }
    items.push(["snapshot", clock(snap.time)]);
    list.replaceChildren(...items.map(([name, value]) => {
      const pair = el("div");
      pair.append(el("dt", name), el("dd", value));
      return pair;
    }));
    document.title = "framewire " + (daemon.state || "");
  }

  // A queue's depth against its bounds (the fuller of frames and bytes): [bar, fill]. A
  // holder's queue is full by definition: its bar is amber, as everything about a hold.
  function queueBar(client, holder) {
    const frames = num(client.queue_frames) / Math.max(1, num(client.queue_max_frames));
    const byteFill = num(client.queue_bytes) / Math.max(1, num(client.queue_max_bytes));
    const fill = Math.min(1, Math.max(frames, byteFill));
    const bar = el("span", null, "bar");
    const inner = el("span", null, holder ? "warn" : fill > 0.9 ? "bad" : fill > 0.5 ? "warn" : "");
    inner.style.width = (fill * 100).toFixed(1) + "%";
    bar.appendChild(inner);
    bar.title = count(client.queue_frames) + " of " + count(client.queue_max_frames) + " frames, " +
      bytes(client.queue_bytes) + " of " + bytes(client.queue_max_bytes);
    return [bar, fill];
  }

  function renderClients(endpoint, now) {
    const clients = (endpoint.clients || []).slice();
    const served = clients.some((c) => "queue_frames" in c);
    const list = el("table", null, "clients");
    const head = el("tr");
    const names = served
      ? ["peer", "connected", "queue", "", "sent", "frames/s", "bytes/s", "dropped"]
      : ["peer", "connected", "received", "frames/s", "bytes/s"];
    for (const name of names) head.appendChild(el("th", name));
    list.appendChild(el("thead")).appendChild(head);
    const body = list.appendChild(el("tbody"));
    const rows = clients.map((c) => ({ c, bar: served ? queueBar(c) : null }));
    if (served) rows.sort((a, b) => b.bar[1] - a.bar[1]); // the ones falling behind first
    for (const { c, bar } of rows.slice(0, MAX_CLIENT_ROWS)) {
      const row = body.appendChild(el("tr"));
      cell(row, c.peer, "peer");
      cell(row, age(now - num(c.connected_since)) + " (since " + clock(c.connected_since) + ")");
      const r = c.rates || {};
      if (served) {
        cell(row).appendChild(bar[0]);
        cell(row, count(c.queue_frames) + " frames, " + bytes(c.queue_bytes), "num");
        cell(row, count(c.frames_sent), "num");
        cell(row, rate(r.frames_sent), "num");
        cell(row, bytesPerSecond(r.bytes_sent), "num");
        cell(row, count(c.frames_dropped), num(c.frames_dropped) ? "num dropped" : "num");
      } else {
        cell(row, count(c.frames_received), "num");
        cell(row, rate(r.frames_received), "num");
        cell(row, bytesPerSecond(r.bytes_received), "num");
      }
    }
    if (rows.length > MAX_CLIENT_ROWS) {
      const more = body.appendChild(el("tr"));
      const note = cell(more, (rows.length - MAX_CLIENT_ROWS) + " more clients not shown " +
        "(shown: the " + MAX_CLIENT_ROWS + " with the fullest queues)", "more");
      note.colSpan = names.length;
    }
    return list;
  }

  // A NATS endpoint's JetStream spool, one line: [text, whether it needs a look].
  function spoolText(d) {
    if (d.stream_state === undefined) return null;
    const parts = [];
    let warn = d.stream_state !== "ok";
    parts.push("JetStream " + String(d.stream_state).replace("_", " "));
    const max = num(d.stream_max_bytes);
    parts.push(bytes(d.stream_bytes) + (max ? " of " + bytes(max) : "") +
      ", " + count(d.stream_messages) + " messages");
    if (num(d.stream_fill) >= 0.8) warn = true;
    if (num(d.stream_fill) > 0) parts.push(Math.round(100 * num(d.stream_fill)) + "% full");
    if (d.stream_leader) parts.push("leader " + d.stream_leader);
    if (d.consumer_pending !== undefined) parts.push(count(d.consumer_pending) + " pending");
    if (num(d.acks_pending)) parts.push(count(d.acks_pending) + " awaiting acks");
    if (num(d.frames_lost_upstream)) {
      warn = true;
      parts.push(count(d.frames_lost_upstream) + " frames lost upstream");
    }
    if (num(d.duplicates_dropped)) parts.push(count(d.duplicates_dropped) + " duplicates dropped");
    if (d.source_active !== undefined && d.source_active !== null) {
      parts.push("source heard " + num(d.source_active).toFixed(1) + " s ago");
    }
    return [parts.join(" · "), warn];
  }

  // The streams held now, each [name, stream], and what each endpoint holds back:
  // endpoint name -> [[stream name, stream, holder], ...].
  function holds(snap) {
    const held = Object.entries(snap.streams || {}).filter(([, s]) => (s.held_by || []).length);
    const byEndpoint = new Map();
    for (const [name, stream] of held) {
      for (const holder of stream.holders || []) {
        const list = byEndpoint.get(holder.endpoint) || [];
        list.push([name, stream, holder]);
        byEndpoint.set(holder.endpoint, list);
      }
    }
    return [held, byEndpoint];
  }

  function holderLine(holder) {
    const line = el("div", null, "holder");
    line.dataset.endpoint = String(holder.endpoint);
    line.append(el("span", holder.endpoint, "name"), queueBar(holder, true)[0],
      el("span", count(holder.queue_frames) + " of " + count(holder.queue_max_frames) +
        " frames, " + bytes(holder.queue_bytes) + " of " + bytes(holder.queue_max_bytes)));
    if (holder.subscription && holder.subscription !== holder.endpoint) {
      line.appendChild(el("span", holder.subscription, "address"));
    }
    return line;
  }

  function renderHeld(held) {
    const section = document.getElementById("held");
    const rows = held.map(([name, stream]) => {
      const row = el("tr", null, "held");
      row.dataset.stream = name;
      cell(row, name, "name");
      cell(row, "for " + age(stream.held_for) + " (since " + clock(stream.held_since) + ")");
      const holders = cell(row, null, "holders");
      for (const holder of stream.holders || []) holders.appendChild(holderLine(holder));
      cell(row, age(stream.held_seconds), "num");
      return row;
    });
    document.querySelector("#held-streams tbody").replaceChildren(...rows);
    section.hidden = rows.length === 0;
    if (rows.length) document.title += " (" + rows.length + " held)";
  }

  function renderEndpoint(name, endpoint, now, holding) {
    const failing = !HEALTHY.has(endpoint.state);
    const body = el("tbody", null, (holding ? "holding" : "") + (failing ? " failing" : ""));
    body.dataset.endpoint = name;
    const row = body.appendChild(el("tr", null, "endpoint"));
    const rates = endpoint.rates || {};
    const points = history.get(name) || [];
    cell(row, name, "name");
    cell(row, endpoint.kind, "kind");
    cell(row, null, "state").appendChild(stateBadge(String(endpoint.state)));
    cell(row, (endpoint.address || []).join(", "), "address");
    cell(row, rate(rates.frames_in), "num frames_in_rate");
    cell(row, bytesPerSecond(rates.bytes_in), "num bytes_in_rate");
    cell(row, rate(rates.frames_out), "num frames_out_rate");
    cell(row, bytesPerSecond(rates.bytes_out), "num bytes_out_rate");
    cell(row, null, "spark").appendChild(sparkline(points));
    cell(row, count(endpoint.frames_in), "num frames_in");
    cell(row, count(endpoint.frames_out), "num frames_out");
    cell(row, count(endpoint.frames_dropped), num(endpoint.frames_dropped) ? "num dropped" : "num");
    cell(row, count(endpoint.restarts), "num restarts");
    const error = cell(row, null, "error");
    if (endpoint.last_error) {
      const healthy = HEALTHY.has(endpoint.state);
      const when = endpoint.last_error_at
        ? age(now - num(endpoint.last_error_at)) + " ago (" + clock(endpoint.last_error_at) + ")"
        : "";
      error.textContent = (healthy ? "past, " : "") + when + ": " + String(endpoint.last_error);
      error.title = healthy ? "healthy since; kept as history" : "current";
      if (healthy) error.classList.add("past");
    }
    for (const [stream, , holder] of holding || []) {
      const line = body.appendChild(el("tr", null, "holding-line"));
      const text = cell(line, "holds stream " + stream + " back for " + age(holder.held_for) +
        ": its queue is full (" + count(holder.queue_frames) + " of " +
        count(holder.queue_max_frames) + " frames, " + bytes(holder.queue_bytes) + " of " +
        bytes(holder.queue_max_bytes) + ")");
      text.colSpan = 14;
    }
    const spool = spoolText(endpoint.detail || {});
    if (spool) {
      const line = body.appendChild(el("tr", null, "spool" + (spool[1] ? " warn" : "")));
      const text = cell(line, spool[0]);
      text.colSpan = 14;
    }
    const clients = endpoint.clients || [];
    if (clients.length) {
      const fold = body.appendChild(el("tr", null, "clients"));
      const holder = cell(fold);
      holder.colSpan = 14;
      const details = holder.appendChild(el("details"));
      details.open = unfolded.has(name);
      const behind = clients.filter((c) => num(c.frames_dropped) > 0).length;
      details.appendChild(el("summary", clients.length + (clients.length === 1 ? " client" : " clients") +
        (behind ? ", " + behind + " dropping" : "")));
      if (details.open) details.appendChild(renderClients(endpoint, now));
      details.addEventListener("toggle", () => {
        if (details.open) {
          unfolded.add(name);
          if (details.childElementCount === 1) details.appendChild(renderClients(endpoint, now));
        } else {
          unfolded.delete(name);
        }
      });
    }
    return body;
  }

  function renderStreams(snap) {
    const body = document.querySelector("#streams tbody");
    const rows = [];
    for (const [name, stream] of Object.entries(snap.streams || {})) {
      const held = (stream.held_by || []).length > 0;
      const row = el("tr", null, held ? "held" : "");
      row.dataset.stream = name;
      cell(row, name, "name");
      cell(row, count(stream.frames_in), "num");
      cell(row, bytes(stream.bytes_in), "num bytes_in");
      cell(row, count(stream.subscribers), "num");
      cell(row, count(stream.metadata_cached), "num");
      cell(row, (stream.metadata_types || []).join(", "), "types");
      if (held) {
        cell(row, "held for " + age(stream.held_for) + " by " + stream.held_by.join(", "), "held");
      } else {
        cell(row, num(stream.held_seconds) ? age(stream.held_seconds) + " in all" : "", "held-past");
      }
      rows.push([held, row]);
    }
    // Held streams first (a stable sort: the rest keep their order).
    rows.sort((a, b) => Number(b[0]) - Number(a[0]));
    body.replaceChildren(...rows.map(([, row]) => row));
  }

  // The daemon's rate history (the first snapshot of a connection): the sparklines start
  // from it, not from nothing. Its newest point is the snapshot's own rates.
  function loadHistory(kept) {
    historyPoints = Math.max(2, num(kept.points) || historyPoints);
    history.clear();
    for (const [name, series] of Object.entries(kept.endpoints || {})) {
      const frames_in = series.frames_in || [];
      const frames_out = series.frames_out || [];
      history.set(name, frames_in.slice(-historyPoints).map((value, i, kept_in) => ({
        in: num(value), out: num(frames_out[frames_out.length - kept_in.length + i]),
      })));
    }
  }

  // Clients whose drops grew within DROPPING_WINDOW seconds (by this page's snapshots).
  function droppingClients(endpoints, now) {
    const seen = new Map();
    let dropping = 0;
    for (const [name, endpoint] of Object.entries(endpoints)) {
      for (const client of endpoint.clients || []) {
        if (!("frames_dropped" in client)) continue;
        const key = name + " " + client.peer + " " + client.connected_since;
        const dropped = num(client.frames_dropped);
        const before = dropsSeen.get(key);
        let grew = before ? before[1] : null;
        if (before && dropped > before[0]) grew = now;
        seen.set(key, [dropped, grew]);
        if (grew !== null && now - grew <= DROPPING_WINDOW) dropping++;
      }
    }
    dropsSeen.clear();
    for (const [key, value] of seen) dropsSeen.set(key, value);
    return dropping;
  }

  // One line at the top: endpoints down, streams held, clients dropping.
  function renderSummary(endpoints, held, now) {
    const names = Object.keys(endpoints);
    const down = names.filter((name) => !HEALTHY.has(endpoints[name].state));
    const dropping = droppingClients(endpoints, now);
    const parts = [];
    const part = (what, text, cls) => {
      const span = el("span", text, "badge " + cls);
      span.dataset.what = what;
      parts.push(span);
    };
    if (down.length) {
      const shown = down.slice(0, 5).join(", ") + (down.length > 5 ? ", …" : "");
      part("down", down.length + " of " + names.length + (names.length === 1 ? " endpoint" : " endpoints") +
        " down: " + shown, "bad");
    } else {
      part("down", names.length === 1 ? "the endpoint is up" : "all " + names.length + " endpoints up", "ok");
    }
    part("held", held.length ? held.length + (held.length === 1 ? " stream held" : " streams held")
      : "no stream held", held.length ? "warn" : "ok");
    part("dropping", dropping ? dropping + (dropping === 1 ? " client" : " clients") +
      " dropping (last " + DROPPING_WINDOW + " s)" : "no client dropping", dropping ? "warn" : "ok");
    document.getElementById("summary").replaceChildren(...parts);
  }

  function render(snap) {
    const now = num(snap.time);
    const endpoints = snap.endpoints || {};
    renderDaemon(snap);
    const [held, holding] = holds(snap);
    renderHeld(held);
    renderSummary(endpoints, held, now);
    if (snap.history) loadHistory(snap.history);
    const bodies = [];
    for (const [name, endpoint] of Object.entries(endpoints)) {
      const points = history.get(name) || [];
      if (!snap.history) {
        const rates = endpoint.rates || {};
        points.push({ in: num(rates.frames_in), out: num(rates.frames_out) });
        while (points.length > historyPoints) points.shift();
      }
      history.set(name, points);
      bodies.push(renderEndpoint(name, endpoint, now, holding.get(name)));
    }
    // The endpoints that hold a stream back first, then those not healthy (a stable sort:
    // the rest keep their order).
    const rank = (body) => body.classList.contains("holding") ? 0 : body.classList.contains("failing") ? 1 : 2;
    bodies.sort((a, b) => rank(a) - rank(b));
    for (const name of history.keys()) if (!(name in endpoints)) history.delete(name);
    table.querySelectorAll("tbody").forEach((body) => body.remove());
    table.append(...bodies);
    document.getElementById("empty").hidden = bodies.length > 0;
    renderStreams(snap);
  }

  function hms(date) {
    return [date.getHours(), date.getMinutes(), date.getSeconds()]
      .map((n) => String(n).padStart(2, "0")).join(":");
  }

  const decoder = new TextDecoder();
  let delay = 500;
  let disconnectedSince = null; // when the daemon went away (the first close of an outage)
  function connect() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    // history=1: the first snapshot carries the daemon's recent rates, for the sparklines.
    const url = scheme + "//" + location.host + "/?history=1" +
      (token ? "&token=" + encodeURIComponent(token) : "");
    const socket = new WebSocket(url);
    socket.binaryType = "arraybuffer"; // the daemon sends each snapshot as UTF-8 bytes
    socket.onopen = () => {
      delay = 500;
      disconnectedSince = null;
      document.body.classList.remove("disconnected");
      badge.textContent = "live";
      badge.className = "badge ok";
    };
    socket.onmessage = (event) => {
      let snap;
      try {
        const text = typeof event.data === "string" ? event.data : decoder.decode(event.data);
        snap = JSON.parse(text);
      } catch (error) {
        return;
      }
      render(snap);
    };
    socket.onclose = () => {
      // Everything shown is now the past: greyed, and the badge says since when.
      if (disconnectedSince === null) disconnectedSince = new Date();
      document.body.classList.add("disconnected");
      badge.textContent = "disconnected (since " + hms(disconnectedSince) + "), reconnecting";
      badge.className = "badge bad";
      document.title = "framewire disconnected";
      setTimeout(connect, delay * (0.5 + Math.random() / 2)); // backoff with jitter
      delay = Math.min(delay * 2, 10000);
    };
  }
  connect();
})();
