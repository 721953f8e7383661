// A small SVG line chart of our own (no library): lines against step, linear or log y, dashed series,
// markers at given x (skipped steps). About 200 lines fit what the dashboard draws; a charting library
// would weigh ten times the page and still need this glue.

const NS = "http://www.w3.org/2000/svg";
const COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#be185d", "#4b5563"];
const MARGIN = { top: 12, right: 16, bottom: 28, left: 64 };

function el(name, attrs = {}, parent = null) {
  const node = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (parent) parent.appendChild(node);
  return node;
}

/** Round numbers between lo and hi, about `count` of them. */
export function niceTicks(lo, hi, count = 5) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * magnitude).find((s) => s >= raw) ?? raw;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(Number(t.toPrecision(12)));
  return ticks;
}

/** Powers of ten between lo and hi (both > 0); a few more in between when they are few. */
export function logTicks(lo, hi) {
  const ticks = [];
  for (let e = Math.floor(Math.log10(lo)); e <= Math.ceil(Math.log10(hi)); e++) {
    for (const m of [1, 2, 5]) {
      const t = m * 10 ** e;
      if (t >= lo && t <= hi) ticks.push(Number(t.toPrecision(12)));
    }
  }
  const decades = ticks.filter((t) => Math.abs(Math.log10(t) - Math.round(Math.log10(t))) < 1e-9);
  return decades.length >= 3 ? decades : ticks;
}

export function formatNumber(v) {
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e5 || a < 1e-3) return v.toExponential(1).replace("e+", "e");
  return Number(v.toPrecision(4)).toString();
}

/**
 * Draws `series` into the <svg> `svg` (its previous content is replaced).
 * series: [{ name, points: [[x, y], ...], dashed?: bool }]; options: { log: bool, markers: [x, ...],
 * xLabel, yLabel }. Under log, y <= 0 is left out. The svg gets data-points (points drawn) and data-scale.
 */
export function drawChart(svg, series, options = {}) {
  const width = svg.clientWidth || 640;
  const height = svg.clientHeight || 220;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.replaceChildren();
  const log = Boolean(options.log);
  const shown = series.map((s) => ({
    ...s,
    points: s.points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y) && (!log || y > 0)),
  }));
  const all = shown.flatMap((s) => s.points);
  svg.dataset.points = String(all.length);
  svg.dataset.scale = log ? "log" : "linear";
  if (all.length === 0) {
    el("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "empty" }, svg).textContent =
      log ? "nothing above 0 to show on a log scale" : "no steps yet";
    return;
  }
  let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  if (x0 === x1) [x0, x1] = [x0 - 1, x1 + 1];
  if (y0 === y1) [y0, y1] = log ? [y0 / 2, y1 * 2] : [y0 - Math.abs(y0 || 1) * 0.1, y1 + Math.abs(y1 || 1) * 0.1];
  const ty = log ? (v) => Math.log10(v) : (v) => v;
  const [ly0, ly1] = [ty(y0), ty(y1)];
  const plotW = width - MARGIN.left - MARGIN.right;
  const plotH = height - MARGIN.top - MARGIN.bottom;
  const sx = (x) => MARGIN.left + ((x - x0) / (x1 - x0)) * plotW;
  const sy = (y) => MARGIN.top + plotH - ((ty(y) - ly0) / (ly1 - ly0)) * plotH;

  const axes = el("g", { class: "axes" }, svg);
  for (const t of log ? logTicks(y0, y1) : niceTicks(y0, y1)) {
    const y = sy(t);
    el("line", { x1: MARGIN.left, x2: width - MARGIN.right, y1: y, y2: y, class: "grid" }, axes);
    el("text", { x: MARGIN.left - 6, y: y + 4, "text-anchor": "end" }, axes).textContent = formatNumber(t);
  }
  for (const t of niceTicks(x0, x1, 6).filter((t) => Number.isInteger(t))) {
    const x = sx(t);
    el("line", { x1: x, x2: x, y1: MARGIN.top + plotH, y2: MARGIN.top + plotH + 4, class: "tick" }, axes);
    el("text", { x, y: height - 10, "text-anchor": "middle" }, axes).textContent = String(t);
  }
  el("line", { x1: MARGIN.left, x2: MARGIN.left, y1: MARGIN.top, y2: MARGIN.top + plotH, class: "axis" }, axes);
  el("line", { x1: MARGIN.left, x2: width - MARGIN.right, y1: MARGIN.top + plotH, y2: MARGIN.top + plotH, class: "axis" }, axes);
  if (options.xLabel) {
    el("text", { x: MARGIN.left - 6, y: height - 10, "text-anchor": "end", class: "label" }, axes).textContent =
      options.xLabel;
  }

  for (const x of options.markers ?? []) {
    if (x < x0 || x > x1) continue;
    el("line", { x1: sx(x), x2: sx(x), y1: MARGIN.top, y2: MARGIN.top + plotH, class: "marker" }, svg);
  }
  shown.forEach((s, i) => {
    if (s.points.length === 0) return;
    const color = s.color ?? COLORS[i % COLORS.length];
    const d = s.points.map(([x, y], j) => `${j ? "L" : "M"}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join("");
    el("path", { d, stroke: color, class: s.dashed ? "line dashed" : "line", "data-series": s.name }, svg);
    if (s.points.length === 1) {
      const [x, y] = s.points[0];
      el("circle", { cx: sx(x), cy: sy(y), r: 3, fill: color }, svg);
    }
  });
  const legend = el("g", { class: "legend" }, svg);
  const named = shown.filter((s) => s.points.length);
  named.forEach((s, i) => {
    const x = width - MARGIN.right - (named.length - i) * 190;
    const color = s.color ?? COLORS[shown.indexOf(s) % COLORS.length];
    el("line", { x1: x, x2: x + 16, y1: MARGIN.top + 6, y2: MARGIN.top + 6, stroke: color, class: s.dashed ? "dashed" : "" }, legend);
    el("text", { x: x + 20, y: MARGIN.top + 10 }, legend).textContent = s.name;
  });
}
