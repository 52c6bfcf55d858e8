// Charts: time series with the vendored uPlot (a global from its IIFE build), and small SVG
// bars for counts, drawn here (a stacked bar needs no library).

import { h, s, fmtNum, fmtInt, tone } from "./dom.js";

export const COLORS = {
  blue: "#2f6fed", teal: "#0f9d8a", violet: "#7c4dff", orange: "#e8710a", red: "#d92d20",
  green: "#12a150", gray: "#98a2b3", amber: "#e0a100", pink: "#c2185b", cyan: "#0891b2",
};
const PALETTE = [COLORS.blue, COLORS.teal, COLORS.violet, COLORS.orange, COLORS.pink, COLORS.cyan, COLORS.amber, COLORS.green];

export function paletteColor(i) {
  return PALETTE[i % PALETTE.length];
}

const TONE_COLOR = { ok: COLORS.green, warn: COLORS.amber, bad: COLORS.red, info: COLORS.blue, off: COLORS.gray,
  muted: "#cbd2dc", purple: COLORS.violet };

export function toneColor(state) {
  return TONE_COLOR[tone(state)];
}

/**
 * A time-series chart that sizes itself to its box.
 * series: [{label, color, values, dash, fill}] over the shared `times` (unix seconds).
 */
export function timeChart({ times, series, unit = "", height = 180, yMin = null, yMax = null }) {
  const box = h("div", { class: "chart" });
  if (typeof window.uPlot !== "function") {
    box.append(h("p", { class: "muted" }, "Charts are unavailable (uPlot did not load)."));
    return { el: box, destroy() {} };
  }
  const fmt = (v) => (v === null || v === undefined ? "–" : `${fmtNum(v, v < 10 ? 2 : 1)}${unit ? " " + unit : ""}`);
  const opts = {
    width: 400,
    height,
    legend: { live: true },
    cursor: { drag: { x: true, y: false }, points: { size: 6 } },
    scales: { x: { time: true }, y: { range: (u, min, max) => [yMin ?? Math.min(0, min ?? 0), yMax ?? (max > 0 ? max * 1.15 : 1)] } },
    axes: [
      { stroke: "#667085", grid: { stroke: "#eef0f3" }, ticks: { stroke: "#e3e6ea" } },
      { stroke: "#667085", grid: { stroke: "#eef0f3" }, ticks: { stroke: "#e3e6ea" }, size: 56,
        values: (u, vals) => vals.map((v) => fmtNum(v, 2)) },
    ],
    series: [
      { label: "time" },
      ...series.map((sr) => ({
        label: sr.label, stroke: sr.color, width: 2, dash: sr.dash, spanGaps: false,
        fill: sr.fill ? sr.color + "1f" : undefined, points: { show: times.length < 40 }, value: (u, v) => fmt(v),
      })),
    ],
  };
  const chart = new window.uPlot(opts, [times, ...series.map((sr) => sr.values)], box);
  const resize = () => {
    const width = Math.max(240, Math.floor(box.clientWidth));
    if (width && width !== chart.width) chart.setSize({ width, height });
  };
  const observer = new ResizeObserver(resize);
  observer.observe(box);
  requestAnimationFrame(resize);
  return {
    el: box,
    chart,
    update(newTimes, newSeries) { chart.setData([newTimes, ...newSeries]); },
    destroy() { observer.disconnect(); chart.destroy(); },
  };
}

/** A horizontal stacked bar: parts [{label, value, color}]; the legend shows counts. */
export function stackedBar(parts, { height = 14, legend = true, total: givenTotal, className } = {}) {
  const total = givenTotal ?? parts.reduce((a, p) => a + p.value, 0);
  const bar = h("div", { class: ["stack", className], role: "img",
    "aria-label": parts.map((p) => `${p.label}: ${p.value}`).join(", "), style: { height: `${height}px` } });
  if (total > 0) {
    for (const p of parts) {
      if (!p.value) continue;
      bar.append(h("span", { class: "stack-part", title: `${p.label}: ${fmtInt(p.value)}`,
        style: { width: `${(100 * p.value) / total}%`, background: p.color } }));
    }
  }
  if (!legend) return bar;
  return h("div", { class: "stack-wrap" }, bar,
    h("div", { class: "legend" }, parts.filter((p) => p.value || p.always).map((p) =>
      h("span", { class: "legend-item" }, h("i", { style: { background: p.color } }), `${p.label} `, h("b", {}, fmtInt(p.value))))));
}

/** A ring showing shares (online/degraded/offline). */
export function donut(parts, { size = 120, label, sublabel } = {}) {
  const total = parts.reduce((a, p) => a + p.value, 0);
  const r = 15.915; // circumference 100
  const svg = s("svg", { viewBox: "0 0 42 42", width: size, height: size, class: "donut", role: "img",
    "aria-label": parts.map((p) => `${p.label}: ${p.value}`).join(", ") });
  svg.append(s("circle", { cx: 21, cy: 21, r, fill: "none", stroke: "#eef0f3", "stroke-width": 5 }));
  let offset = 25;
  for (const p of parts) {
    if (!total || !p.value) continue;
    const share = (100 * p.value) / total;
    svg.append(s("circle", { cx: 21, cy: 21, r, fill: "none", stroke: p.color, "stroke-width": 5,
      "stroke-dasharray": `${share} ${100 - share}`, "stroke-dashoffset": offset },
      s("title", {}, `${p.label}: ${p.value}`)));
    offset -= share;
  }
  svg.append(s("text", { x: 21, y: sublabel ? 21 : 23, "text-anchor": "middle", class: "donut-label" }, label ?? String(total)));
  if (sublabel) svg.append(s("text", { x: 21, y: 27, "text-anchor": "middle", class: "donut-sublabel" }, sublabel));
  return svg;
}

/** Horizontal bars of named values, optionally with a threshold marker each. */
export function barList(items, { unit = "", max } = {}) {
  const top = max ?? Math.max(...items.map((i) => Math.max(i.value ?? 0, i.threshold ?? 0)), 1e-9);
  return h("div", { class: "barlist" }, items.map((i) =>
    h("div", { class: "barlist-row" },
      h("span", { class: "barlist-label", title: i.label }, i.label),
      h("span", { class: "barlist-track" },
        h("span", { class: "barlist-fill", style: { width: `${Math.min(100, (100 * (i.value ?? 0)) / top)}%`,
          background: i.color || COLORS.blue } }),
        i.threshold !== undefined && i.threshold !== null
          ? h("span", { class: "barlist-mark", title: `threshold ${fmtNum(i.threshold, 4)}`,
            style: { left: `${Math.min(100, (100 * i.threshold) / top)}%` } }) : null),
      h("span", { class: "barlist-value" }, `${fmtNum(i.value, 4)}${unit ? " " + unit : ""}`,
        i.threshold !== undefined && i.threshold !== null ? h("span", { class: "muted small" }, ` (threshold ${fmtNum(i.threshold, 4)})`) : null))));
}
