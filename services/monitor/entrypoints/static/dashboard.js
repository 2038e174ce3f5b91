// The Strata dashboard: one snapshot from /api/state, then live snapshots over server-sent events
// from /api/stream. Plain DOM and SVG, no libraries, so it works with no network beyond the monitor.
"use strict";

const $ = (sel) => document.querySelector(sel);
const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs = {}, ...children) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

const bytes = (n) => {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
};
const secs = (s) => (s == null ? "–" : s < 1 ? `${(s * 1000).toFixed(0)} ms` : `${s.toFixed(2)} s`);
const num = (x, digits = 2) => (x == null ? "–" : Number(x).toFixed(digits));
const badge = (text, cls = text) => el("span", { class: `badge ${cls}`, text });
const clock = (t) => new Date(t * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });

// -- charts: a line per series over the snapshot's time buckets ---------------------------------
function chart(title, points, lines, format) {
  const W = 320, H = 130, L = 42, B = 16, T = 6;
  const values = lines.flatMap((l) => points.map((p) => p[l.key])).filter((v) => v != null);
  const max = Math.max(...values, 1e-9) * 1.1;
  const t0 = points.length ? points[0].t : 0, t1 = points.length ? points[points.length - 1].t : 1;
  const x = (t) => L + ((t - t0) / Math.max(t1 - t0, 1e-9)) * (W - L - 4);
  const y = (v) => T + (1 - v / max) * (H - T - B);
  const svg = el("svg:svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img", "aria-label": title });
  for (const frac of [0, 0.5, 1]) {
    const v = max * frac;
    svg.append(el("svg:line", { class: "grid", x1: L, x2: W - 4, y1: y(v), y2: y(v) }),
               el("svg:text", { x: 2, y: y(v) + 3, text: format(v) }));
  }
  // the time axis: clock times at the start, the middle and the end of the history
  for (const [frac, anchor] of [[0, "start"], [0.5, "middle"], [1, "end"]]) {
    const t = t0 + frac * (t1 - t0);
    svg.append(el("svg:text", { class: "tick", x: x(t), y: H - 3, "text-anchor": anchor, text: clock(t) }));
  }
  let drawn = 0;
  for (const line of lines) {
    // consecutive buckets are joined by the line; a run of buckets without a value (no request then)
    // is a gap: a faint dashed bridge, never a drop to zero; a dot marks every bucket that has a value
    let solid = "", bridge = "", last = null, gap = false;
    const dots = [];
    for (const p of points) {
      const v = p[line.key];
      if (v == null) { gap = last != null; continue; }
      const xy = `${x(p.t).toFixed(1)},${y(v).toFixed(1)}`;
      if (gap) bridge += `M${last} L${xy} `;
      solid += `${last == null || gap ? "M" : "L"}${xy} `;
      dots.push(el("svg:circle", { cx: x(p.t).toFixed(1), cy: y(v).toFixed(1), r: 1.6, fill: line.color }));
      last = xy;
      gap = false;
      if (v > 0) drawn++;
    }
    const style = { d: solid.trim(), fill: "none", stroke: line.color, "stroke-width": line.width || 1.8, "data-series": line.key };
    if (line.dash) style["stroke-dasharray"] = line.dash;
    svg.append(el("svg:path", { class: "gap", d: bridge.trim(), fill: "none", stroke: line.color, "stroke-width": 1,
                                "stroke-dasharray": "2 3", opacity: 0.45, "data-gap": line.key }),
               el("svg:path", style), ...dots);
  }
  const legend = el("div", { class: "legend" }, ...lines.map((l) => el("span", {}, el("i", { style: `background:${l.color}` }), l.label)));
  return { node: el("div", { class: "chart", "data-points": drawn }, el("div", { class: "title", text: title }), svg, legend), drawn };
}

// -- sections ------------------------------------------------------------------------------------
function renderAlerts(rules) {
  const list = $("#alerts");
  list.replaceChildren();
  const firing = rules.flatMap((r) => r.firing.map((f) => ({ rule: r, f })));
  for (const { rule, f } of firing) {
    list.append(el("li", { "data-rule": rule.name }, badge(rule.severity), " ", el("b", { text: rule.name }), ` ${f.summary}`,
                   el("span", { class: "empty", text: `  since ${new Date(f.since).toLocaleTimeString()}` })));
  }
  if (!firing.length) list.append(el("li", { class: "quiet", text: `all ${rules.length} rules ok` }));
  $("#alerts-summary").textContent = `${firing.length} firing · ${rules.length} rules`;
  return firing.length;
}

function renderModels(models) {
  const box = $("#models");
  box.replaceChildren();
  let points = 0;
  for (const m of models) {
    const charts = [
      chart("requests / s", m.series, [{ key: "requests_per_s", label: "req/s", color: "#58a6ff" }], (v) => num(v, 1)),
      // p99 first, wide and dashed: with few requests p95 often equals p99 and must still show
      chart("end-to-end latency", m.series, [
        { key: "p99_s", label: "p99", color: "#f85149", width: 3, dash: "5 3" },
        { key: "p95_s", label: "p95", color: "#d29922" }, { key: "p50_s", label: "p50", color: "#3fb950" }], secs),
      chart("tokens / s", m.series, [{ key: "tokens_per_s", label: "generated tok/s", color: "#bc8cff" }], (v) => num(v, 0)),
    ];
    points += charts.reduce((n, c) => n + c.drawn, 0);
    const fig = (value, label) => el("span", {}, el("b", { text: value }), label);
    box.append(el("div", { class: "model", "data-model": m.model_name },
      el("h3", { text: m.model_name }),
      el("div", { class: "figures" }, fig(num(m.requests_per_s), "req/s"), fig(num(m.tokens_per_s, 1), "tok/s"),
         fig(secs(m.p50_s), "p50"), fig(secs(m.p95_s), "p95"), fig(secs(m.p99_s), "p99"), fig(secs(m.ttft_p50_s), "TTFT p50"),
         fig(String(m.requests), "requests"), fig(String(m.failed), "failed")),
      el("div", { class: "charts" }, ...charts.map((c) => c.node))));
  }
  if (!models.length) box.append(el("p", { class: "empty", text: "no traffic yet" }));
  return points;
}

function renderNodes(nodes) {
  const box = $("#nodes");
  box.replaceChildren();
  for (const n of nodes) {
    const devices = n.devices.map((d) => {
      const used = d.memory_total ? (d.memory_total - d.memory_free) / d.memory_total : 0;
      const util = d.utilisation == null ? "" : ` · ${(d.utilisation * 100).toFixed(0)}% busy`;
      return el("div", { class: "device", "data-device": d.id },
        el("span", { text: `${d.id} ${d.name}` }),
        el("div", { class: "bar", title: `${(used * 100).toFixed(0)}% used` },
           el("div", { class: used > 0.85 ? "hot" : "", style: `width:${(used * 100).toFixed(1)}%` })),
        el("span", { class: "dim", text: `${bytes(d.memory_total - d.memory_free)} / ${bytes(d.memory_total)}${util}` }));
    });
    box.append(el("div", { class: "node", "data-node": n.node_id },
      el("div", { class: "head" }, el("span", {}, el("b", { text: n.node_id }), el("span", { class: "dim", text: ` ${n.hostname}` })),
         el("span", {}, badge(n.status), el("span", { class: "dim", text: n.last_seen_s == null ? "" : ` ${n.last_seen_s.toFixed(0)}s ago` }))),
      ...devices,
      n.loaded_models.length ? el("div", { class: "dim", text: `loaded: ${n.loaded_models.join(", ")}` }) : null));
  }
  if (!nodes.length) box.append(el("p", { class: "empty", text: "no node has joined" }));
}

function renderTable(selector, rows, empty) {
  const body = $(`${selector} tbody`);
  body.replaceChildren(...rows.map((cells) => el("tr", {}, ...cells.map((c) => el("td", {}, c)))));
  if (!rows.length) {
    const width = $(`${selector} thead tr`).children.length;
    body.append(el("tr", { class: "empty-row" }, el("td", { colspan: width, class: "empty", text: empty })));
  }
}

function renderLedger(l) {
  const rows = [
    ["tree size", l.tree_size ?? "–"], ["root hash", l.root_hash ?? "–"], ["key", l.key_id ?? "–"],
    ["signed at", l.signed_at ? new Date(l.signed_at).toLocaleString() : "–"], ["lag", l.lag ?? "unknown"],
    ["tamper", l.tamper_detected ? badge(`${l.tamper_detected} detected`, "critical") : badge("none", "ok")],
  ];
  $("#ledger").replaceChildren(...rows.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", {}, typeof v === "object" ? v : String(v))]));
}

function render(s) {
  const firing = renderAlerts(s.alerts);
  const points = renderModels(s.models);
  renderNodes(s.nodes);
  renderTable("#deployments", s.deployments.map((d) => [
    d.model, d.version == null ? "–" : `v${d.version}`, badge(d.state), d.node_id ?? "–", d.device ?? "–",
    d.runtime ?? "–", d.loaded == null ? "–" : (d.loaded ? "loaded" : "unloaded")]), "no deployments");
  renderTable("#dead-letters", Object.entries(s.dead_letters).map(([svc, n]) => [svc, String(n)]), "no dead letters");
  renderLedger(s.ledger);
  const history = s.models.length ? s.models[0].series : [];
  $("#history").textContent = history.length > 1 ? `${Math.round(history[history.length - 1].t - history[0].t)} s` : "–";
  // what a test (or a curious user) can read from the DOM
  Object.assign(document.body.dataset, {
    nodes: s.nodes.length, deployments: s.deployments.length, models: s.models.length, alertsFiring: firing,
    chartPoints: points, events: s.events_seen, ready: "1",
  });
}

function status(text, live) {
  const box = $("#status");
  box.textContent = text;
  box.classList.toggle("live", live);
}

async function start() {
  try {
    const response = await fetch("/api/state");
    render(await response.json());
    status(`updated ${new Date().toLocaleTimeString()}`, false);
  } catch (err) {
    status(`monitor unreachable: ${err}`, false);
  }
  // ?max_s=N on the page's URL bounds each stream (headless tests: a stream that never ends holds
  // Chromium's virtual time still)
  const maxS = new URLSearchParams(location.search).get("max_s");
  const source = new EventSource(maxS ? `/api/stream?max_s=${encodeURIComponent(maxS)}` : "/api/stream");
  source.addEventListener("snapshot", (e) => {
    const s = JSON.parse(e.data);
    render(s);
    status(`live · ${s.events_seen} events · ${new Date(s.time).toLocaleTimeString()}`, true);
  });
  source.onerror = () => status("reconnecting…", false);  // EventSource retries by itself
}

start();
