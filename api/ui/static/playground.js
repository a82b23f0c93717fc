// Playground: a chat through the queue. Submits POST /v1/jobs, then follows the job's events:
// queue position while waiting, tokens as they stream, TTFT (from the click) and tokens/s.
import { api, errorBox, fmtMs, fmtNum, h, sse } from "./lib.js";

const conversation = []; // {role, content}, kept while the tab lives

export async function playgroundPage({ root, signal }) {
  const { data: models } = await api("/v1/models", { signal });
  const num = (name, value, attrs) => h("label", {}, name, h("input", { name, type: "number", value, ...attrs }));
  const form = h("form", { class: "card", "data-testid": "playground" },
    h("div", { class: "inline" },
      h("label", {}, "model", h("select", { name: "model", "data-testid": "pg-model" },
        models.map((m) => h("option", { value: m.id }, `${m.id}${m.ready ? "" : " (no worker)"}`)))),
      h("label", {}, "priority", h("select", { name: "priority" },
        [...Array(10).keys()].map((p) => h("option", { value: p, selected: p === 5 }, `${p}${p === 0 ? " (first)" : p === 9 ? " (last)" : ""}`)))),
      num("max_tokens", 128, { min: 1, style: "width:6rem" }),
      num("temperature", 0.7, { min: 0, max: 2, step: 0.05, style: "width:5rem" }),
      num("top_p", 1, { min: 0.01, max: 1, step: 0.01, style: "width:5rem" }),
      num("seed", "", { style: "width:6rem", placeholder: "random" })),
    h("label", {}, "system prompt (optional)", h("input", { name: "system", style: "width:100%" })),
    h("label", {}, "message", h("textarea", { name: "message", "data-testid": "pg-message", required: true })),
    h("p", {}, h("button", { type: "submit", "data-testid": "pg-send" }, "Send"), " ",
      h("button", { type: "button", class: "secondary", onclick: () => { conversation.length = 0; transcript.replaceChildren(); } }, "New chat")));
  const transcript = h("div", { "data-testid": "pg-transcript" });
  const stats = h("p", { class: "muted", "data-testid": "pg-stats" });
  root.append(h("h1", {}, "Playground"), form, stats, transcript);
  for (const m of conversation) {
    const b = transcript.appendChild(bubble(m.role, m.content));
    if (m.role === "assistant") Object.assign(b.dataset, { testid: "pg-answer", done: "true" });
  }

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const f = new FormData(form);
    const message = String(f.get("message")).trim();
    if (!message) return;
    const send = form.querySelector("button[type=submit]");
    send.disabled = true;
    conversation.push({ role: "user", content: message });
    transcript.append(bubble("user", message));
    form.elements.message.value = "";
    const answer = bubble("assistant", "");
    answer.dataset.testid = "pg-answer";
    transcript.append(answer);
    const body = {
      model: f.get("model"), priority: Number(f.get("priority")), max_tokens: Number(f.get("max_tokens")),
      temperature: Number(f.get("temperature")), top_p: Number(f.get("top_p")),
      messages: [...(f.get("system") ? [{ role: "system", content: String(f.get("system")) }] : []), ...conversation],
    };
    if (f.get("seed") !== "") body.seed = Number(f.get("seed"));
    try {
      await run(body, answer, stats, signal);
      conversation.push({ role: "assistant", content: answer.textContent });
    } catch (err) {
      conversation.pop();
      if (!signal.aborted) answer.replaceWith(errorBox(err));
    } finally {
      send.disabled = false;
    }
  });
}

const bubble = (role, text) => h("div", { class: `msg ${role}` }, text);

async function run(body, answer, stats, signal) {
  const t0 = performance.now();
  let first = null, tokens = 0;
  const show = (state) => {
    const now = performance.now();
    const tps = first !== null && tokens > 1 && now > first ? (tokens - 1) / ((now - first) / 1000) : null;
    stats.replaceChildren(h("span", { "data-testid": "pg-state" }, state),
      ` · TTFT ${first === null ? "–" : fmtMs(first - t0)}`, " · ", h("span", { "data-testid": "pg-tokens" }, tokens),
      ` tokens · ${tps === null ? "–" : fmtNum(tps)} tokens/s · `, h("a", { href: `#/job/${job.id}` }, job.id));
  };
  const job = await api("/v1/jobs", { method: "POST", body, signal });
  show(job.status === "queued" ? `queued (${job.queue_position ?? "?"} ahead)` : job.status);
  for await (const ev of sse(`/v1/jobs/${job.id}/events`, { signal })) {
    if (ev.event === "position") show(`queued (${ev.data.queue_position} ahead${ev.data.eta_s ? `, ~${fmtNum(ev.data.eta_s)} s` : ""})`);
    else if (ev.event === "started") show("running");
    else if (ev.event === "token") {
      if (first === null) first = performance.now();
      tokens += ev.data.n || 1;
      answer.textContent += ev.data.text;
      show("streaming");
    } else if (ev.event === "retry") show(`retrying (${ev.data.reason})`);
    else if (ev.event === "done") { show(`done (${ev.data.finish_reason})`); answer.dataset.done = "true"; }
    else if (ev.event === "failed") throw new Error(`failed: ${ev.data.code}: ${ev.data.message}`);
    else if (ev.event === "cancelled") show("cancelled");
  }
}
