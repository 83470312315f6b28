// vacfactory status page: polls /status.json and /history.json on this listener and draws
// them. Every value from the factory is put into the page as text (textContent) or as an SVG
// coordinate, never as markup: machinetype names and shutdown messages come from VMs and peers.
"use strict";
(function () {
  const STATUS_MS = 3000, HISTORY_MS = 60000, DAY = 86400;
  const SVGNS = "http://www.w3.org/2000/svg";
  const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                  "#7f7f7f", "#bcbd22", "#17becf"];

  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }
  function svg(tag, attrs) {
    const node = document.createElementNS(SVGNS, tag);
    for (const key in attrs) node.setAttribute(key, String(attrs[key]));
    return node;
  }
  function byId(id) { return document.getElementById(id); }
  function pct(x) { return (x === null || x === undefined) ? "-" : (100 * x).toFixed(0) + "%"; }
  function dur(s) {
    if (s === null || s === undefined) return "-";
    if (s < 120) return s.toFixed(0) + " s";
    if (s < 7200) return (s / 60).toFixed(0) + " min";
    return (s / 3600).toFixed(1) + " h";
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }
  function row(cells) {
    const tr = el("tr");
    for (const c of cells) {
      if (c instanceof Node) { const td = el("td"); td.appendChild(c); tr.appendChild(td); }
      else tr.appendChild(el("td", c));
    }
    return tr;
  }

  function drawSummary(doc) {
    byId("factory").textContent = doc.factory;
    document.title = "vacfactory " + doc.factory;
    const p = doc.processors;
    byId("summary").textContent = p.busy + " of " + p.total + " processors busy, " + p.free + " free";
    byId("summary").dataset.busy = p.busy;
    byId("summary").dataset.free = p.free;
    byId("updated").textContent = "updated " + new Date(doc.time * 1000).toLocaleTimeString() +
      " (vacfactory " + doc.vacfactory + ")";
  }

  function drawEngine(doc) {
    const e = doc.engine;
    byId("decision").textContent = "Last decision: " + (e.decision || "none yet");
    const list = byId("reasons");
    clear(list);
    const add = (text, warn) => list.appendChild(el("li", text, warn ? "warn" : ""));
    if (e.blind) add("blind: libvirt cannot be reached; nothing is created or finished", true);
    if (e.creation_paused) add("creation paused: " + e.creation_paused, true);
    if (e.draining) add("draining: no VMs are started", true);
    if (e.shutdown_time) add("shutdown time: " + new Date(e.shutdown_time * 1000).toLocaleString(), true);
    for (const name of Object.keys(e.backoffs || {}).sort())
      add("backing off: " + name + " until " + new Date(e.backoffs[name].until * 1000).toLocaleTimeString(), true);
    for (const name of Object.keys(e.creation_failures || {}).sort()) {
      const f = e.creation_failures[name];
      add("creation failed: " + name + ": " + (f && f.reason), true);
    }
    for (const name of e.waiting_for_images || []) add("waiting for the image of " + name, false);
    if (e.config && e.config.rejected) add("configuration edit rejected: " + e.config.rejected.join(" "), true);
  }

  function drawSlots(doc) {
    const box = byId("slots");
    clear(box);
    for (const s of doc.slots) {
      const div = el("div", null, "slot " + (s.name ? s.state.replace(/[^A-Za-z]/g, "") : "empty"));
      div.dataset.slot = s.slot;
      div.dataset.state = s.state;
      if (s.name) {
        div.dataset.name = s.name;
        div.dataset.machinetype = s.machinetype;
        div.appendChild(el("div", s.machinetype, "mt"));
        div.appendChild(el("div", s.name.split(".")[0] + " " + s.state));
        div.appendChild(el("div", "age " + dur(s.age) + ", CPU " + pct(s.cpu_efficiency)));
        if (s.state === "Running" || s.state === "Starting")
          div.appendChild(el("div", "heartbeat " + (s.heartbeat_age === null ? "none" : dur(s.heartbeat_age) + " ago")));
        else div.appendChild(el("div", s.shutdown_message || s.failure || s.outcome || ""));
      } else {
        div.appendChild(el("div", "slot " + s.slot, "mt"));
        div.appendChild(el("div", "free"));
      }
      box.appendChild(div);
    }
  }

  function codes(map) {
    return Object.keys(map || {}).sort().map(k => k + ": " + map[k]).join(", ");
  }

  function drawMachinetypes(doc) {
    const body = byId("machinetypes").tBodies[0];
    clear(body);
    for (const m of doc.machinetypes) {
      const tr = row([m.name, pct(m.target_share), pct(m.share), pct(m.space_share), m.running_vms,
                      m.running_processors, m.backoff_remaining_seconds > 0 ? dur(m.backoff_remaining_seconds) : "-",
                      pct(m.cpu_efficiency), m.created_since_start, codes(m.outcomes_since_start)]);
      tr.dataset.machinetype = m.name;
      body.appendChild(tr);
    }
  }

  function drawSpace(doc) {
    const body = byId("space").tBodies[0];
    clear(body);
    if (!doc.space.length) body.appendChild(row(["(no other factories configured)", "", ""]));
    for (const f of doc.space) {
      const answer = f.state === "answered" ? "answered" :
        f.state === "held" ? "no answer; last one " + dur(f.age) + " old (counted)" : "NO ANSWER";
      const tr = row([f.name, answer, codes(f.processors)]);
      tr.dataset.factory = f.name;
      tr.dataset.state = f.state;
      body.appendChild(tr);
    }
  }

  function drawRecent(doc) {
    const body = byId("recent").tBodies[0];
    clear(body);
    for (const r of doc.recent) {
      const link = el("a", r.name.split(".")[0]);
      link.href = r.link;
      link.title = r.uuid;
      const ended = r.state === "Failed" ? "creation failed: " + (r.failure || "") :
        r.finished ? (r.outcome || "") + (r.shutdown_message ? ": " + r.shutdown_message : "") : "";
      const tr = row([link, r.machinetype, r.state, dur(r.age), pct(r.cpu_efficiency), ended]);
      tr.dataset.uuid = r.uuid;
      body.appendChild(tr);
    }
  }

  // one small chart: series = [{name, color, values}] over times; optional shaded backoff
  // x: the last 24 h, or from the first point (at least the last 15 minutes) on a young factory
  function chart(title, times, series, maxY, shade) {
    const W = 330, H = 90, now = Math.max(Date.now() / 1000, times.length ? times[times.length - 1] + 60 : 0);
    const x0 = Math.min(now - 900, Math.max(now - DAY, times.length ? times[0] : now));
    const span = now - x0;
    const X = t => ((t - x0) / span * W).toFixed(1), Y = v => (H - 12 - v / maxY * (H - 14)).toFixed(1);
    const box = el("div", null, "chart");
    box.appendChild(el("h3", title));
    const s = svg("svg", {width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "img"});
    s.dataset.chart = title;
    s.appendChild(svg("rect", {x: 0, y: 0, width: W, height: H, fill: "#fff", stroke: "#ccc"}));
    if (shade) times.forEach((t, i) => {
      if (shade[i]) s.appendChild(svg("rect", {x: X(t), y: 0, width: Math.max(1, W * 60 / span), height: H - 10,
                                              fill: "#fbd", "data-series": "backoff"}));
    });
    const label = (x, anchor, text) => {
      const node = svg("text", {x: x, y: H - 2, "font-size": 9, fill: "#888", "text-anchor": anchor});
      node.textContent = text;
      s.appendChild(node);
    };
    label(2, "start", new Date(x0 * 1000).toLocaleTimeString([], {hour: "2-digit", minute: "2-digit"}));
    label(W - 2, "end", "now");
    const legend = el("div", null, "legend");
    for (const one of series) {
      let points = [];
      const flush = () => {
        if (points.length === 1) points.push(points[0].replace(/^[0-9.]+/, m => (+m + 1).toFixed(1)));
        if (points.length) s.appendChild(svg("polyline", {points: points.join(" "), fill: "none", stroke: one.color,
                                                          "stroke-width": 1.5, "stroke-dasharray": one.dash || "none",
                                                          "data-series": one.name}));
        points = [];
      };
      times.forEach((t, i) => {
        const v = one.values[i];
        if (i > 0 && t - times[i - 1] > 120) flush();  // the daemon was not running: no line across
        if (v === null || v === undefined) flush(); else points.push(X(t) + "," + Y(Math.min(v, maxY)));
      });
      flush();
      const key = el("span", "\u25A0 " + one.name);
      key.style.color = one.color;
      legend.appendChild(key);
    }
    box.appendChild(s);
    box.appendChild(legend);
    return box;
  }

  function drawHistory(hist) {
    const box = byId("charts");
    clear(box);
    const names = Object.keys(hist.machinetypes).sort();
    if (!names.length) box.appendChild(el("p", "no points yet (one a minute)", "muted"));
    for (const name of names) {
      const h = hist.machinetypes[name];
      box.appendChild(chart(name + ": shares", h.time, [
        {name: "target", color: COLORS[0], values: h.target_share},
        {name: "here", color: COLORS[1], values: h.share},
        {name: "space", color: COLORS[2], values: h.space_share, dash: "4 3"}], 1, h.backoff));
      const allCodes = {};
      h.outcomes.forEach(o => Object.keys(o).forEach(c => { allCodes[c] = true; }));
      const perCode = Object.keys(allCodes).sort().map((c, i) => ({
        name: "ended " + c, color: COLORS[(i + 3) % COLORS.length], values: h.outcomes.map(o => o[c] || 0)}));
      const series = [{name: "started", color: COLORS[0], values: h.started}].concat(perCode);
      let top = 1;
      series.forEach(one => one.values.forEach(v => { if (v > top) top = v; }));
      box.appendChild(chart(name + ": VMs per minute (max " + top + ")", h.time, series, top, h.backoff));
      box.appendChild(chart(name + ": CPU efficiency (1 day)", h.time, [
        {name: "CPU efficiency", color: COLORS[4], values: h.cpu_efficiency}], 1, null));
    }
    box.dataset.points = names.length ? hist.machinetypes[names[0]].time.length : 0;
  }

  async function get(path) {
    const response = await fetch(path, {cache: "no-store", credentials: "same-origin"});
    if (!response.ok) throw new Error(path + ": HTTP " + response.status);
    return response.json();
  }

  async function refreshStatus() {
    try {
      const doc = await get("/status.json");
      drawSummary(doc); drawEngine(doc); drawSlots(doc); drawMachinetypes(doc); drawSpace(doc); drawRecent(doc);
      document.body.dataset.round = doc.round_time;
    } catch (error) {
      byId("updated").textContent = "cannot reach the factory: " + error.message;
    }
    setTimeout(refreshStatus, STATUS_MS);
  }
  async function refreshHistory() {
    try { drawHistory(await get("/history.json")); } catch (error) { /* kept: the next poll retries */ }
    setTimeout(refreshHistory, HISTORY_MS);
  }
  refreshStatus();
  refreshHistory();
})();
