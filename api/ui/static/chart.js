// A small SVG line chart of time series, each series on its own scale (left or right axis).

const NS = "http://www.w3.org/2000/svg";
const W = 800, H = 220, PAD = { l: 48, r: 48, t: 12, b: 22 };

function el(tag, attrs, text) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function niceMax(v) {
  if (v <= 0) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  return [1, 2, 5, 10].map((m) => m * p).find((m) => m >= v);
}

// series: [{name, color, side: "left"|"right", points: [[time_ms, value], ...]}]
export function lineChart(series, windowMs, nowMs) {
  const svg = el("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img" });
  const x0 = nowMs - windowMs;
  const sx = (t) => PAD.l + ((t - x0) / windowMs) * (W - PAD.l - PAD.r);
  const iw = H - PAD.t - PAD.b;
  for (let i = 0; i <= 4; i++) {
    const y = PAD.t + (iw * i) / 4;
    svg.append(el("line", { x1: PAD.l, x2: W - PAD.r, y1: y, y2: y, stroke: "#e2e5ec" }));
  }
  for (let m = 0; m <= windowMs / 60_000; m++) {
    svg.append(el("text", { x: sx(nowMs - m * 60_000), y: H - 6, "text-anchor": "middle" }, m ? `-${m}m` : "now"));
  }
  for (const s of series) {
    const max = niceMax(Math.max(0, ...s.points.map((p) => p[1])));
    const sy = (v) => PAD.t + iw - (v / max) * iw;
    const left = s.side !== "right";
    svg.append(el("text", { x: left ? PAD.l - 6 : W - PAD.r + 6, y: PAD.t + 8, "text-anchor": left ? "end" : "start", fill: s.color }, String(max)));
    svg.append(el("text", { x: left ? PAD.l - 6 : W - PAD.r + 6, y: PAD.t + iw, "text-anchor": left ? "end" : "start", fill: s.color }, "0"));
    const pts = s.points.filter((p) => p[0] >= x0).map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`);
    if (pts.length) svg.append(el("polyline", { points: pts.join(" "), fill: "none", stroke: s.color, "stroke-width": 2, "vector-effect": "non-scaling-stroke", "data-series": s.name }));
  }
  return svg;
}
