// The dashboard: polls /api/dashboard, draws its charts as inline SVG, and lists the
// corrections waiting for review with Approve / Reject buttons (POST /api/corrections/ID/review).
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const POLL_MS = 2000;
const LOAD_POINTS = 90; // three minutes of live engine load
const load = [];

function el(name, attrs, text) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function frame(svg) {
  svg.replaceChildren();
  const w = svg.clientWidth || 400;
  const h = svg.clientHeight || 200;
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  return { w, h, left: 36, right: 8, top: 10, bottom: 22 };
}

function empty(svg, f, message) {
  svg.append(el("text", { x: f.w / 2, y: f.h / 2, "text-anchor": "middle" }, message));
}

function axis(svg, f, max, format) {
  for (const frac of [0, 0.5, 1]) {
    const y = f.h - f.bottom - frac * (f.h - f.top - f.bottom);
    svg.append(el("line", { x1: f.left, x2: f.w - f.right, y1: y, y2: y, stroke: "#dde1e8" }));
    svg.append(el("text", { x: f.left - 4, y: y + 3, "text-anchor": "end" }, format(max * frac)));
  }
}

// Bars with a label under each; values[i] may be null (drawn as nothing).
function bars(svg, labels, values, opts) {
  const f = frame(svg);
  if (!values.length) return empty(svg, f, opts.empty || "no data yet");
  const max = opts.max || Math.max(1, ...values.map((v) => v || 0));
  axis(svg, f, max, opts.format || ((v) => String(Math.round(v))));
  const slot = (f.w - f.left - f.right) / values.length;
  const every = Math.ceil(values.length / 8);
  values.forEach((v, i) => {
    const width = Math.max(1, Math.min(slot * 0.7, 48));
    const x = f.left + i * slot + (slot - width) / 2;
    const hgt = v === null ? 0 : (v / max) * (f.h - f.top - f.bottom);
    const bar = el("rect", { x, y: f.h - f.bottom - hgt, width, height: hgt,
                             fill: opts.color || "#3b6ef5", rx: 2 });
    bar.append(el("title", {}, `${labels[i]}: ${v === null ? "no ratings" : (opts.format || String)(v)}`
                              + (opts.notes ? ` (${opts.notes[i]})` : "")));
    svg.append(bar);
    if (opts.notes) {
      svg.append(el("text", { x: x + width / 2, y: f.h - f.bottom - hgt - 3, "text-anchor": "middle" },
                    opts.notes[i]));
    }
    if (i % every === 0) {
      svg.append(el("text", { x: x + width / 2, y: f.h - 6, "text-anchor": "middle" }, labels[i]));
    }
  });
}

// Lines over a shared x axis: series = [{values, color}], each scaled to its own max.
function lines(svg, labels, series, opts) {
  const f = frame(svg);
  if (labels.length < 2) return empty(svg, f, opts.empty || "collecting…");
  const max = opts.max || Math.max(1, ...series.flatMap((s) => s.values.map((v) => v || 0)));
  axis(svg, f, max, opts.format || ((v) => String(Math.round(v))));
  const xs = (i) => f.left + (i / (labels.length - 1)) * (f.w - f.left - f.right);
  const ys = (v) => f.h - f.bottom - (v / max) * (f.h - f.top - f.bottom);
  for (const s of series) {
    let d = "";
    s.values.forEach((v, i) => {
      if (v === null || v === undefined) return;
      d += (d ? " L" : "M") + xs(i).toFixed(1) + " " + ys(v).toFixed(1);
    });
    if (d) svg.append(el("path", { d, fill: "none", stroke: s.color, "stroke-width": 2 }));
  }
  const every = Math.ceil(labels.length / 6);
  labels.forEach((label, i) => {
    if (i % every === 0) svg.append(el("text", { x: xs(i), y: f.h - 6, "text-anchor": "middle" }, label));
  });
}

const pct = (v) => (v === null || v === undefined ? "–" : Math.round(v * 100) + "%");

// One clock for the whole page: the browser's local time, hours included, so the
// load chart's axis and "updated ..." read alike (minutes:seconds alone looked like another clock's hours:minutes).
const clockTime = (d) => d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });

function timeLabel(t, bucket) {
  const d = new Date(t * 1000);
  if (bucket >= 86400) return d.toLocaleDateString([], { month: "short", day: "numeric" });
  return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function figures(node, items) {
  node.replaceChildren(...items.map(([label, value]) => {
    const div = document.createElement("div");
    div.className = "figure";
    const b = document.createElement("b");
    b.textContent = value;
    const span = document.createElement("span");
    span.textContent = label;
    div.append(b, span);
    return div;
  }));
}

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text;
  return td;
}

function render(data) {
  const t = data.totals;
  const e = data.engine || {};
  document.getElementById("version").textContent = "serving " + (e.model_version || "?");
  figures(document.getElementById("totals"), [
    ["exchanges", t.exchanges], ["👍", t.ratings.up], ["👎", t.ratings.down],
    ["approval", pct(t.approval_rate)], ["corrections", t.corrections], ["waiting for review", t.review ?? 0],
    ...(data.memory ? [["memory items", data.memory.items], ["memory hits", data.memory.hits],
                       ["consolidated", pct(data.memory.consolidated_share)]] : []),
    ...Object.entries(data.by_platform).map(([p, s]) => [p + " exchanges", s.exchanges]),
  ]);
  figures(document.getElementById("engine"), [
    ["queued", e.queued ?? 0], ["active", e.active ?? 0], ["tokens/s", e.tokens_per_s ?? 0],
    ["requests", e.total_requests ?? "–"], ["backend", e.backend || "?"],
    ...(e.decode_step ? [["decode step", e.decode_step + (e.c_step ? " (in C)" : "")]] : []),
    ...(e.prefix_cache ? [["shared beginnings reused", e.prefix_cache.hits],
                          ["prompt tokens not recomputed", e.prefix_cache.tokens_reused]] : []),
  ]);

  const bucket = data.bucket_s;
  document.getElementById("bucket").textContent = `(per ${bucket >= 3600 ? bucket / 3600 + " h" : bucket / 60 + " min"})`;
  const labels = data.timeline.map((p) => timeLabel(p.t, bucket));
  bars(document.getElementById("chart-exchanges"), labels, data.timeline.map((p) => p.exchanges),
       { empty: "no exchanges yet" });
  bars(document.getElementById("chart-approval"), labels, data.timeline.map((p) => p.approval_rate),
       { max: 1, format: pct, color: "#1f9d55", empty: "no ratings yet" });
  bars(document.getElementById("chart-versions"), data.versions.map((v) => v.version.split("/").pop()),
       data.versions.map((v) => v.approval_rate),
       { max: 1, format: pct, notes: data.versions.map((v) => v.exchanges + " ex"), empty: "no exchanges yet" });

  const now = new Date();
  load.push({ t: now, tps: e.tokens_per_s || 0, active: e.active || 0, queued: e.queued || 0 });
  while (load.length > LOAD_POINTS) load.shift();
  lines(document.getElementById("chart-load"),
        load.map((p) => clockTime(p.t)),
        [{ values: load.map((p) => p.tps), color: "#3b6ef5" },
         { values: load.map((p) => p.active), color: "#1f9d55" },
         { values: load.map((p) => p.queued), color: "#d64545" }], {});

  const rows = data.corrections.map((c) => {
    const tr = document.createElement("tr");
    tr.append(cell(c.exchange_id), cell(new Date(c.created_at * 1000).toLocaleString()), cell(c.user),
              cell(c.prompt), cell(c.reply),
              cell(c.status && c.status !== "live" ? `${c.correction} (${c.status})` : c.correction),
              cell(c.model_version.split("/").pop()));
    return tr;
  });
  const body = document.getElementById("corrections");
  if (rows.length) body.replaceChildren(...rows);
  else body.replaceChildren(Object.assign(document.createElement("tr"), { innerHTML: '<td colspan="7" class="muted">no corrections yet</td>' }));
  renderQueue(data.review_queue || [], t.review ?? 0);
  document.getElementById("updated").textContent = "updated " + clockTime(now);
}

// The queue is redrawn only when its rows change: a poll must not replace a row
// under the admin's pointer, nor wipe the error shown beside a refused decision.
let shownQueue = null;

function renderQueue(queue, waiting) {
  const key = JSON.stringify(queue.map((c) => [c.id, c.agreeing]));
  if (key === shownQueue) return;
  shownQueue = key;
  const body = document.getElementById("review-queue");
  const more = waiting > queue.length ? ` (${waiting} waiting, the oldest ${queue.length} shown)` : "";
  document.getElementById("review-more").textContent = more;
  if (!queue.length) {
    body.replaceChildren(Object.assign(document.createElement("tr"),
      { innerHTML: '<td colspan="9" class="muted">nothing waits for review</td>' }));
    return;
  }
  body.replaceChildren(...queue.map((c) => {
    const tr = document.createElement("tr");
    tr.dataset.correctionId = c.id;
    const buttons = document.createElement("td");
    buttons.className = "review-buttons";
    for (const [decision, label] of [["approve", "Approve"], ["reject", "Reject"]]) {
      const b = document.createElement("button");
      b.className = decision;
      b.textContent = label;
      b.addEventListener("click", () => decide(tr, c.id, decision));
      buttons.append(b);
    }
    tr.append(cell(c.id), cell(new Date(c.created_at * 1000).toLocaleString()), cell(c.community), cell(c.user),
              cell(c.prompt), cell(c.reply), cell(c.correction), cell(c.agreeing), buttons);
    return tr;
  }));
}

async function decide(tr, id, decision) {
  for (const b of tr.querySelectorAll("button")) b.disabled = true;
  const status = document.getElementById("review-status");
  try {
    const resp = await fetch(`/api/corrections/${id}/review`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ decision }),
    });
    const data = await resp.json();
    if (!resp.ok) throw new Error(data.error ? data.error.message : resp.statusText);
    tr.remove();
    status.textContent = `correction ${id} ${data.correction.status === "live" ? "approved: live" : "rejected"}`;
  } catch (err) {
    // The row stays, with why, until the next change of the queue.
    const why = tr.querySelector("td.error") || tr.appendChild(Object.assign(document.createElement("td"),
                                                                              { className: "error" }));
    why.textContent = "⚠ " + err.message;
    for (const b of tr.querySelectorAll("button")) b.disabled = false;
  }
}

async function poll() {
  try {
    const resp = await fetch("/api/dashboard");
    const data = await resp.json();
    if (!resp.ok) throw new Error(data.error ? data.error.message : resp.statusText);
    render(data);
  } catch (err) {
    document.getElementById("updated").textContent = "⚠ " + err.message;
  }
  setTimeout(poll, POLL_MS);
}

poll();
