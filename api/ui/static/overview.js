// Overview: per model, queued jobs and tokens by priority, oldest wait, drain rate, running,
// workers; a live chart of queue depth and tokens/s (polled every second); rejections by reason.
import { api, errorBox, every, fmtMs, fmtNum, h } from "./lib.js";
import { lineChart } from "./chart.js";

const WINDOW_MS = 5 * 60_000;
const POLL_MS = 1000;
const history = []; // [{t, queued, tps}], kept while the tab lives so the chart survives navigation

export async function overviewPage({ root, signal }) {
  const body = h("div");
  root.append(h("h1", {}, "Overview"), body);
  every(POLL_MS, async () => {
    const ov = await api("/v1/ui/overview", { signal });
    const queued = ov.models.reduce((a, m) => a + m.queued, 0);
    const running = ov.models.reduce((a, m) => a + m.running, 0);
    const workers = ov.models.reduce((a, m) => a + m.workers, 0);
    const tps = ov.models.reduce((a, m) => a + Math.max(m.tokens_per_s, m.drain_tokens_per_s), 0);
    history.push({ t: ov.time_ms, queued, tps });
    while (history.length && history[0].t < ov.time_ms - WINDOW_MS) history.shift();
    body.replaceChildren(
      h("div", { class: "tiles" },
        tile("queued", queued, "queued-total"), tile("running", running, "running-total"),
        tile("workers", workers, "workers-total"), tile("tokens/s", fmtNum(tps), "tps-total")),
      h("div", { class: "card" },
        h("div", { class: "legend" }, h("span", {}, h("i", { style: "background:#2f5bd3" }), "queued jobs (left)"),
          h("span", {}, h("i", { style: "background:#17804a" }), "tokens/s (right)")),
        lineChart([
          { name: "queued", color: "#2f5bd3", side: "left", points: history.map((p) => [p.t, p.queued]) },
          { name: "tps", color: "#17804a", side: "right", points: history.map((p) => [p.t, p.tps]) },
        ], WINDOW_MS, ov.time_ms)),
      h("h2", {}, "Queues"), modelsTable(ov.models),
      h("h2", {}, "Queued by priority"), priorityTable(ov.models),
      h("h2", {}, "Rejections by reason (this API process)"), rejections(ov.rejections),
    );
    body.dataset.samples = String(history.length);
  }, signal, (e) => body.replaceChildren(errorBox(e)));
}

const tile = (label, value, testid) => h("div", { class: "tile" }, h("b", { "data-testid": testid }, value), h("span", {}, label));

function modelsTable(models) {
  return h("table", { "data-testid": "models" },
    h("tr", {}, ["model", "queued", "running", "workers", "oldest wait", "drain jobs/s", "tokens/s"].map((c, i) => h("th", { class: i ? "num" : "" }, c))),
    models.map((m) => h("tr", { "data-model": m.model },
      h("td", {}, h("a", { href: `#/jobs?model=${encodeURIComponent(m.model)}` }, m.model)),
      h("td", { class: "num", "data-testid": "queued" }, m.queued), h("td", { class: "num" }, m.running),
      h("td", { class: "num" }, m.workers), h("td", { class: "num" }, m.queued ? fmtMs(m.oldest_wait_ms) : "–"),
      h("td", { class: "num" }, fmtNum(m.drain_jobs_per_s)), h("td", { class: "num" }, fmtNum(Math.max(m.tokens_per_s, m.drain_tokens_per_s))))));
}

function priorityTable(models) {
  const prios = [...Array(10).keys()];
  return h("table", {},
    h("tr", {}, h("th", {}, "model"), prios.map((p) => h("th", { class: "num" }, `p${p}`))),
    models.map((m) => h("tr", {}, h("td", {}, m.model), prios.map((p) => {
      const n = m.queued_by_priority[p] || 0;
      const tk = m.queued_tokens_by_priority[p] || 0;
      return h("td", { class: "num", title: `${n} jobs, ${tk} tokens reserved` }, n ? `${n} · ${tk} tk` : h("span", { class: "muted" }, "0"));
    }))));
}

function rejections(byReason) {
  const rows = Object.entries(byReason || {}).filter(([, n]) => n > 0);
  if (!rows.length) return h("p", { class: "muted" }, "None.");
  return h("table", {}, h("tr", {}, h("th", {}, "reason"), h("th", { class: "num" }, "count")),
    rows.map(([r, n]) => h("tr", { "data-reason": r }, h("td", {}, r), h("td", { class: "num" }, n))));
}
