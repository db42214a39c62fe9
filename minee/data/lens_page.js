// The interactive logit lens (minee/lens_page.py puts this script into minee/data/lens_page.html).
// Every string it shows came from a model or a prompt: it reaches the page only as textContent,
// never as HTML. The numbers come packed as base64 arrays; the JSON's layout is in lens_page.py.
"use strict";

const DATA = JSON.parse(document.getElementById("lens-data").textContent);
const P = DATA.points.length, T = DATA.inputs.length;
const VIRIDIS = ["#440154", "#482475", "#414487", "#355f8d", "#2a788e", "#21918c", "#22a884",
                 "#44bf70", "#7ad151", "#bddf26", "#fde725"].map(hex);   // matplotlib's viridis (CC0)
const PIN_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                     "#7f7f7f", "#bcbd22", "#17becf"];                     // matplotlib's tab10
const LOW_IS_CLOSE = new Set(["entropy", "kl", "final_rank"]);   // reversed: bright = close to the final answer
const UNIT_RANGE = new Set(["final_prob", "agree", "accuracy"]);  // coloured on 0 .. 1, the rest on 0 .. max
const SVG = "http://www.w3.org/2000/svg";

function hex(h) { return [1, 3, 5].map(i => parseInt(h.slice(i, i + 2), 16)); }

async function unpack(b64, Type) {  // a typed array from base64 of zlib-compressed little-endian bytes
  const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Type(await new Response(stream).arrayBuffer());
}

async function unpackLens(L) {
  const metrics = {};
  for (const [name, b64] of Object.entries(L.metrics)) metrics[name] = await unpack(b64, Float32Array);
  return { label: L.label, k: L.k, offsets: L.offsets, tokens: L.tokens, metrics,
           top: await unpack(L.top, Uint16Array), topProbs: await unpack(L.top_probs, Float32Array),
           logp: await unpack(L.logp, Uint16Array), rank: await unpack(L.rank, Uint16Array) };
}

let LENSES = [];

// ------------------------------------------------------------------ reading the data

function curveProb(code) { return Math.exp(-code / DATA.logp_scale); }

function curveRank(code) {
  if (code < DATA.rank_exact) return code;
  return Math.round(DATA.rank_exact * Math.exp((code - DATA.rank_exact) / DATA.rank_scale));
}

function cellTop(lens, p, t) {      // [[token n of the lens, probability], ...] of cell (p, t), best first
  const out = [];
  for (let j = 0; j < lens.k; j++) {
    const i = (p * T + t) * lens.k + j;
    out.push([lens.offsets[t] + lens.top[i], lens.topProbs[i]]);
  }
  return out;
}

function tokenText(lens, n) { return DATA.texts[lens.tokens[n]]; }

function inputText(t) { return DATA.texts[DATA.inputs[t]]; }

function percent(p) { return (100 * p).toPrecision(3) + "%"; }

function metricText(name, v) {
  if (Number.isNaN(v)) return "none";
  if (name === "final_rank") return String(v);
  if (name === "agree" || name === "accuracy") return v ? "yes" : "no";
  if (name === "final_prob") return percent(v);
  return v.toPrecision(3);
}

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

// ------------------------------------------------------------------ colours

function colourScale(metric) {     // value -> position 0 .. 1 on the colour map, shared by every lens
  const f = metric === "final_rank" ? v => Math.log10(1 + v) : v => v;
  let hi = 1;
  if (!UNIT_RANGE.has(metric)) {
    hi = 0;
    for (const lens of LENSES) for (const v of lens.metrics[metric]) if (Number.isFinite(v)) hi = Math.max(hi, f(v));
    hi = hi || 1;
  }
  const reversed = LOW_IS_CLOSE.has(metric);
  return { hi: metric === "final_rank" ? 10 ** hi - 1 : hi, reversed,
           at: v => { const s = Math.min(1, Math.max(0, f(v) / hi)); return reversed ? 1 - s : s; } };
}

function colour(s) {
  const x = s * (VIRIDIS.length - 1), i = Math.min(Math.floor(x), VIRIDIS.length - 2), w = x - i;
  const c = VIRIDIS[i].map((a, j) => Math.round(a + w * (VIRIDIS[i + 1][j] - a)));
  return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
}

// ------------------------------------------------------------------ the grid

const state = { lens: 0, metric: DATA.metric, locked: null, pins: [], nextColour: 0 };
const gridBox = document.querySelector(".grid-box"), tip = document.querySelector(".tip");
const grids = [];                    // each lens's grid, built when first shown

function buildGrid(li) {
  const lens = LENSES[li], grid = el("div", "grid");
  grid.dataset.lens = li;
  grid.style.setProperty("--P", P);
  grid.style.setProperty("--T", T);
  for (let p = P - 1; p >= 0; p--) {        // the deepest point on top, as in the PNG
    grid.append(el("div", "point-label", DATA.points[p]));
    for (let t = 0; t < T; t++) {
      const cell = el("div", "cell", tokenText(lens, cellTop(lens, p, t)[0][0]));
      cell.dataset.p = p;
      cell.dataset.t = t;
      grid.append(cell);
    }
  }
  grid.append(el("div", "corner", "input token"));
  for (let t = 0; t < T; t++) grid.append(el("div", "input", inputText(t)));
  return grid;
}

function paint() {
  const scale = colourScale(state.metric), values = LENSES[state.lens].metrics[state.metric];
  for (const cell of grids[state.lens].querySelectorAll(".cell")) {
    const v = values[cell.dataset.p * T + +cell.dataset.t];
    const s = scale.at(v);
    cell.style.background = Number.isNaN(v) ? "#ddd" : colour(s);
    cell.style.color = Number.isNaN(v) || s > 0.55 ? "#000" : "#fff";
  }
  const stops = Array.from({ length: 11 }, (_, i) => colour(scale.reversed ? 1 - i / 10 : i / 10));
  document.querySelector(".legend .bar").style.background = `linear-gradient(to right, ${stops.join(", ")})`;
  document.querySelector(".legend-lo").textContent = "0";
  document.querySelector(".legend-hi").textContent = state.metric === "final_rank" ? String(Math.round(scale.hi))
    : UNIT_RANGE.has(state.metric) ? "1" : scale.hi.toPrecision(3);
  const title = DATA.metrics.find(m => m[0] === state.metric)[1];
  document.querySelector(".legend-title").textContent = title + (state.metric === "final_rank" ? " (log scale)" : "");
}

function showLens(li) {
  state.lens = li;
  unlock();
  if (!grids[li]) grids[li] = buildGrid(li);
  gridBox.replaceChildren(grids[li]);
  paint();
}

// ------------------------------------------------------------------ the tooltip

function fillTip(p, t) {
  const lens = LENSES[state.lens];
  const head = el("div", "tip-head", `${DATA.points[p]}, position ${t}: after `);
  head.append(el("span", "tip-token", inputText(t)));
  const parts = DATA.metrics.map(([name]) => `${name} ${metricText(name, lens.metrics[name][p * T + t])}`);
  const list = el("ol", "tip-list");
  for (const [n, prob] of cellTop(lens, p, t)) {
    const row = el("button", "tip-row");
    row.type = "button";
    row.dataset.n = n;
    row.append(el("span", "tip-token", tokenText(lens, n)), el("span", "tip-prob", percent(prob)));
    const bar = el("span", "tip-bar");
    bar.style.width = `${100 * prob}%`;
    row.append(bar);
    const item = el("li");
    item.append(row);
    list.append(item);
  }
  const next = t + 1 < T ? `next input token: ${inputText(t + 1)}` : "the last position: no next input token";
  const hint = state.locked ? "click a token to pin its curve below; Esc or a click elsewhere lets go"
                            : "click the cell to hold this list, then click a token to pin it";
  tip.replaceChildren(head, el("div", "tip-metrics", parts.join(" \u00b7 ")),
                      el("div", "tip-metrics", next), list, el("div", "tip-hint", hint));
}

function placeTip(cell) {
  tip.hidden = false;
  const r = cell.getBoundingClientRect(), w = tip.offsetWidth, h = tip.offsetHeight;
  let x = r.right + 8, y = r.bottom + 4;
  if (x + w > window.innerWidth - 4) x = Math.max(4, r.left - w - 8);
  if (y + h > window.innerHeight - 4) y = Math.max(4, r.top - h - 4);
  tip.style.left = `${x}px`;
  tip.style.top = `${y}px`;
}

function showTip(cell) {
  fillTip(+cell.dataset.p, +cell.dataset.t);
  placeTip(cell);
}

function lock(cell) {
  unlock();
  state.locked = cell;
  cell.classList.add("locked");
  tip.classList.add("locked");
  showTip(cell);
}

function unlock() {
  if (state.locked) state.locked.classList.remove("locked");
  state.locked = null;
  tip.classList.remove("locked");
  tip.hidden = true;
}

gridBox.addEventListener("mouseover", e => {
  const cell = e.target.closest(".cell");
  if (cell && !state.locked) showTip(cell);
});
gridBox.addEventListener("mouseleave", () => { if (!state.locked) tip.hidden = true; });
gridBox.addEventListener("click", e => {
  const cell = e.target.closest(".cell");
  if (cell) cell === state.locked ? unlock() : lock(cell);
});
for (const box of [gridBox, window]) {
  box.addEventListener("scroll", () => { if (state.locked) placeTip(state.locked); });
}
tip.addEventListener("click", e => {
  const row = e.target.closest(".tip-row");
  if (row && state.locked) pin(state.lens, +state.locked.dataset.t, +row.dataset.n);
});
document.addEventListener("click", e => { if (!gridBox.contains(e.target) && !tip.contains(e.target)) unlock(); });
document.addEventListener("keydown", e => { if (e.key === "Escape") unlock(); });

// ------------------------------------------------------------------ pinned curves

function pin(li, t, n) {
  if (state.pins.some(q => q.li === li && q.t === t && q.n === n)) return;
  state.pins.push({ li, t, n, colour: PIN_COLOURS[state.nextColour++ % PIN_COLOURS.length] });
  drawCurves();
}

function curve(q) {                 // {prob: [P], rank: [P]} of a pin
  const lens = LENSES[q.li], start = q.n * P;
  const prob = [], rank = [];
  for (let p = 0; p < P; p++) {
    prob.push(curveProb(lens.logp[start + p]));
    rank.push(curveRank(lens.rank[start + p]));
  }
  return { prob, rank };
}

const CHART = { w: 480, h: 230, left: 48, right: 10, top: 22, bottom: 34 };

function chart(title, ticks, y, curves, key) {     // y: value -> 0 (bottom) .. 1 (top)
  const { w, h, left, right, top, bottom } = CHART, iw = w - left - right, ih = h - top - bottom;
  const X = p => left + (P > 1 ? p / (P - 1) : 0.5) * iw, Y = v => top + (1 - y(v)) * ih;
  const s = svg("svg", { class: "chart", width: w, height: h, viewBox: `0 0 ${w} ${h}` });
  s.append(svg("text", { x: left, y: 14 }, title));
  for (const [v, label] of ticks) {
    s.append(svg("line", { class: "gridline", x1: left, x2: left + iw, y1: Y(v), y2: Y(v) }));
    s.append(svg("text", { x: left - 4, y: Y(v) + 3, "text-anchor": "end" }, label));
  }
  const every = Math.max(1, Math.ceil(P / 8 / 2) * 2);   // at most ~8 labels, on attention points
  for (let p = 0; p < P; p += every) {
    s.append(svg("line", { class: "axis", x1: X(p), x2: X(p), y1: top + ih, y2: top + ih + 4 }));
    s.append(svg("text", { x: X(p), y: top + ih + 15, "text-anchor": "middle" }, DATA.points[p]));
  }
  s.append(svg("text", { x: left + iw / 2, y: h - 3, "text-anchor": "middle" }, "exit point"));
  s.append(svg("rect", { x: left, y: top, width: iw, height: ih, fill: "none", class: "axis" }));
  for (const [q, c] of curves) {
    const points = c[key].map((v, p) => `${X(p).toFixed(1)},${Y(v).toFixed(1)}`).join(" ");
    s.append(svg("polyline", { class: "curve", points, fill: "none", stroke: q.colour, "stroke-width": 1.8 }));
  }
  const guide = svg("line", { class: "guide", y1: top, y2: top + ih, x1: -10, x2: -10 });
  s.append(guide);
  s.addEventListener("mousemove", e => {
    const box = s.getBoundingClientRect();
    const p = Math.round(Math.min(1, Math.max(0, (e.clientX - box.left - left) / iw)) * (P - 1));
    for (const g of document.querySelectorAll(".chart .guide")) {
      g.setAttribute("x1", X(p));
      g.setAttribute("x2", X(p));
    }
    readout(p, curves);
  });
  return s;
}

function readout(p, curves) {
  const box = document.querySelector(".readout");
  box.replaceChildren(el("span", "", `${DATA.points[p]}:`));
  for (const [q, c] of curves) {
    const rank = `${c.rank[p] >= DATA.rank_exact ? "\u2248" : ""}${c.rank[p]}`;      // far ranks are rounded
    const item = el("span", "", `${tokenText(LENSES[q.li], q.n)} ${percent(c.prob[p])}, rank ${rank}`);
    item.style.color = q.colour;
    box.append(item);
  }
}

function drawCurves() {
  const curves = state.pins.map(q => [q, curve(q)]);
  document.querySelector(".empty").hidden = curves.length > 0;
  const charts = document.querySelector(".charts");
  document.querySelector(".readout").replaceChildren();
  if (!curves.length) {
    charts.replaceChildren();
    document.querySelector(".pins").replaceChildren();
    return;
  }
  const worst = Math.max(...curves.map(([, c]) => Math.max(...c.rank)));
  const decades = Math.max(1, Math.ceil(Math.log10(worst + 1))), deepest = Math.log10(10 ** decades + 1);
  const rankTicks = [[0, "0 (top)"]];
  for (let d = 1; d <= decades; d++) rankTicks.push([10 ** d, d < 3 ? String(10 ** d) : `${10 ** (d - 3)}k`]);
  charts.replaceChildren(
    chart("probability", [0, 0.25, 0.5, 0.75, 1].map(v => [v, `${100 * v}%`]), v => v, curves, "prob"),
    chart("rank (0 = top; log scale)", rankTicks, v => 1 - Math.log10(v + 1) / deepest, curves, "rank"));
  const list = document.querySelector(".pins");
  list.replaceChildren(...state.pins.map((q, i) => {
    const item = el("li", "pin"), swatch = el("span", "swatch"), remove = el("button", "", "remove");
    swatch.style.background = q.colour;
    remove.type = "button";
    remove.addEventListener("click", () => { state.pins.splice(i, 1); drawCurves(); });
    item.append(swatch, el("span", "token", tokenText(LENSES[q.li], q.n)), ` at position ${q.t}, after `,
                el("span", "token", inputText(q.t)), LENSES.length > 1 ? ` (${LENSES[q.li].label})` : "", remove);
    return item;
  }));
  const clear = el("button", "clear", "remove all");
  clear.type = "button";
  clear.addEventListener("click", () => { state.pins = []; drawCurves(); });
  list.append(clear);
}

// ------------------------------------------------------------------ controls

function setup() {
  document.title = DATA.title;
  document.querySelector(".title").textContent = DATA.title;
  document.querySelector(".summary").textContent =
    `${P} exit points \u00d7 ${T} positions, top-${LENSES[0].k} tokens per cell; the deepest point on top. ` +
    "Hover a cell for its top tokens; each column predicts the token after its input token.";
  const select = document.querySelector(".metric");
  for (const [name, title] of DATA.metrics) {
    const option = el("option", "", `${name}: ${title}`);
    option.value = name;
    select.append(option);
  }
  select.value = state.metric;
  select.addEventListener("change", () => { state.metric = select.value; paint(); });
  const choice = document.querySelector(".lens-choice");
  if (LENSES.length === 1) {
    choice.textContent = LENSES[0].label;
  } else {
    choice.append("show: ");
    LENSES.forEach((lens, li) => {
      const label = el("label"), radio = el("input");
      radio.type = "radio";
      radio.name = "lens";
      radio.value = li;
      radio.checked = li === 0;
      radio.addEventListener("change", () => showLens(li));
      label.append(radio, ` ${lens.label} `);
      choice.append(label);
    });
  }
  const zoom = document.querySelector(".zoom");
  zoom.value = T > 96 ? 26 : 44;
  zoom.addEventListener("input", resize);
  resize();                                 // before the first grid: laying out a large grid twice takes seconds
  showLens(0);
}

function resize() {
  const width = +document.querySelector(".zoom").value;
  gridBox.style.setProperty("--cell-w", `${width}px`);
  gridBox.classList.toggle("no-text", width < 20);
  if (state.locked) placeTip(state.locked);
}

Promise.all(DATA.lenses.map(unpackLens)).then(lenses => { LENSES = lenses; setup(); }, error => {
  document.querySelector(".summary").textContent =
    `This page could not unpack its data (${error}); it needs a browser from 2023 or later.`;
  throw error;
});
