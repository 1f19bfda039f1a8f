// The comparison chart: two panels of horizontal bars, one bar per column, drawn as inline SVG.
// Left: KV kept as a percentage of a full cache; right: time to first token in milliseconds.

const SVG = "http://www.w3.org/2000/svg";
const ROW = 22;
const TOP = 26;
const LABEL = 140;
const PANEL = 330;
const GAP = 40;

function node(tag, attrs = {}, text) {
  const el = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) el.setAttribute(name, String(value));
  if (text !== undefined) el.textContent = text;
  return el;
}

function panel(x, title, rows, value, format, scale) {
  const group = node("g", { transform: `translate(${x},0)` });
  group.append(node("text", { x: 0, y: 14, class: "chart-title" }, title));
  const width = PANEL - LABEL - 70; // room for the value after the longest bar
  rows.forEach((row, i) => {
    const y = TOP + i * ROW;
    const v = value(row);
    const short = row.label.length > 20 ? `${row.label.slice(0, 19)}…` : row.label;
    const label = node("text", { x: LABEL - 6, y: y + 13, "text-anchor": "end", class: "chart-label" }, short);
    label.append(node("title", {}, row.label));
    group.append(label);
    const length = v === null || !scale ? 0 : Math.max(1, (width * v) / scale);
    group.append(node("rect", { x: LABEL, y: y + 2, width: length, height: ROW - 8, class: `chart-bar bar-${i}` }));
    const text = v === null ? "n/a" : format(v);
    group.append(node("text", { x: LABEL + length + 4, y: y + 13, class: "chart-value" }, text));
  });
  return group;
}

function formatMs(ms) {
  return ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${Math.round(ms)} ms`;
}

/** Draw `rows` = [{label, kvPercent, ttftMs}] (null where a column has no figure) into `svg`. */
export function renderChart(svg, rows) {
  const height = TOP + rows.length * ROW + 4;
  svg.setAttribute("viewBox", `0 0 ${2 * PANEL + GAP} ${height}`);
  const maxTtft = Math.max(0, ...rows.map((r) => r.ttftMs ?? 0));
  svg.replaceChildren(
    panel(0, "KV kept (% of full)", rows, (r) => r.kvPercent, (v) => `${v.toFixed(1)}%`, 100),
    panel(PANEL + GAP, "Time to first token", rows, (r) => r.ttftMs, formatMs, maxTtft),
  );
  const described = rows
    .map((r) => `${r.label}: KV ${r.kvPercent === null ? "n/a" : r.kvPercent.toFixed(1) + "%"}, ` +
      `TTFT ${r.ttftMs === null ? "n/a" : formatMs(r.ttftMs)}`)
    .join("; ");
  svg.setAttribute("aria-label", `KV kept and time to first token. ${described}`);
}
