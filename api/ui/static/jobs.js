// Jobs: a filterable list, and a job's page (timeline, attempts, usage, error, live output, cancel).
import { api, badge, errorBox, every, fmtMs, fmtNum, fmtTime, h, sse, STATUSES, TERMINAL } from "./lib.js";

const LIST_LIMIT = 100;

export async function jobsPage({ root, query, signal, me }) {
  const field = (name, el) => { el.name = name; el.value = query.get(name) || ""; return h("label", {}, name, el); };
  const opts = (values) => [h("option", { value: "" }, "any"), ...values.map((v) => h("option", { value: v }, v))];
  const form = h("form", { class: "inline", "data-testid": "job-filters", onsubmit: (e) => {
    e.preventDefault();
    const q = new URLSearchParams([...new FormData(form)].filter(([, v]) => v !== ""));
    location.hash = `#/jobs?${q}`;
  } },
  me.admin ? field("tenant", h("input", { size: 12, placeholder: "all" })) : null,
  field("status", h("select", {}, opts(STATUSES))),
  field("model", h("input", { size: 14, placeholder: "any" })),
  field("priority", h("select", {}, opts([...Array(10).keys()].map(String)))),
  h("button", { type: "submit" }, "Filter"));
  const table = h("div");
  root.append(h("h1", {}, me.admin ? "Jobs (all tenants)" : `Jobs of ${me.tenant}`), form, table);
  const qs = new URLSearchParams([...query].filter(([k, v]) => v && ["tenant", "status", "model", "priority"].includes(k)));
  every(3000, async () => {
    const { data } = await api(`/v1/ui/jobs?${qs}&limit=${LIST_LIMIT}`, { signal });
    table.replaceChildren(jobsTable(data, me.admin),
      data.length === LIST_LIMIT ? h("p", { class: "muted", "data-testid": "jobs-truncated" }, `The newest ${LIST_LIMIT} shown: narrow them with the filters.`) : null);
  }, signal, (e) => table.replaceChildren(errorBox(e)));
}

function jobsTable(jobs, admin) {
  if (!jobs.length) return h("p", { class: "muted", "data-testid": "no-jobs" }, "No jobs.");
  return h("table", { "data-testid": "jobs" },
    h("tr", {}, ["job", admin ? "tenant" : null, "model", "priority", "status", "created", "wait", "tokens", "finish"].filter(Boolean).map((c) => h("th", {}, c))),
    jobs.map((j) => h("tr", { "data-job": j.id },
      h("td", { class: "mono" }, h("a", { href: `#/job/${j.id}` }, j.id)), admin ? h("td", {}, j.tenant) : null,
      h("td", {}, j.model), h("td", { class: "num" }, j.priority), h("td", {}, badge(j.status)),
      h("td", {}, fmtTime(j.timings.created_ms)), h("td", { class: "num" }, fmtMs(j.timings.queue_wait_ms)),
      h("td", { class: "num" }, `${j.usage.prompt_tokens} + ${j.usage.completion_tokens}`),
      h("td", {}, j.error ? h("span", { class: "error" }, j.error.code) : (j.finish_reason || "")))));
}

export async function jobPage({ root, arg: id, signal }) {
  const head = h("div");
  const details = h("div", { class: "grid2" });
  const output = h("pre", { class: "output", "data-testid": "job-output" });
  const live = h("span", { class: "muted", "data-testid": "stream-state" }, "");
  root.append(h("h1", {}, "Job ", h("span", { class: "mono" }, id)), head, details,
    h("h2", {}, "Output ", live), output);
  let job = await api(`/v1/ui/jobs/${encodeURIComponent(id)}`, { signal });
  let tokens = 0;
  const draw = () => {
    head.replaceChildren(jobHead(job, tokens, async (btn) => {
      btn.disabled = true;
      try { await api(`/v1/ui/jobs/${id}/cancel`, { method: "POST", signal }); } catch (e) { head.append(errorBox(e)); }
      job = await api(`/v1/ui/jobs/${id}`, { signal });
      draw();
    }));
    details.replaceChildren(timeline(job), attempts(job));
  };
  draw();
  // Follow the events from the first: the text shown is the text streamed, token by token.
  live.textContent = "streaming…";
  try {
    for await (const ev of sse(`/v1/ui/jobs/${encodeURIComponent(id)}/events`, { signal })) {
      if (ev.event === "token") {
        output.textContent += ev.data.text;
        tokens += ev.data.n || 1;
        if (tokens === (ev.data.n || 1) || job.status !== "running") { job = await api(`/v1/ui/jobs/${id}`, { signal }); }
        draw();
      } else if (ev.event === "position") { // every few tenths of a second while it waits (no id)
        Object.assign(job, { warning: null }, ev.data);
        draw();
      } else {
        job = await api(`/v1/ui/jobs/${id}`, { signal });
        draw();
      }
    }
    job = await api(`/v1/ui/jobs/${id}`, { signal });
    draw();
    live.textContent = "";
    output.dataset.complete = "true";
  } catch (e) {
    if (!signal.aborted) { live.textContent = ""; root.append(errorBox(e)); }
  }
}

function jobHead(job, tokens, onCancel) {
  const cancel = h("button", { class: "danger", "data-testid": "cancel", disabled: TERMINAL.has(job.status) || job.cancel_requested,
    onclick: (e) => onCancel(e.currentTarget) }, job.cancel_requested && !TERMINAL.has(job.status) ? "Cancel requested" : "Cancel");
  return h("div", { class: "card" }, h("dl", { class: "kv" },
    h("dt", {}, "status"), h("dd", { "data-testid": "job-status" }, badge(job.status)),
    h("dt", {}, "tenant"), h("dd", {}, job.tenant),
    h("dt", {}, "model"), h("dd", {}, job.model),
    h("dt", {}, "priority"), h("dd", {}, job.priority),
    job.status === "queued" && job.queue_position !== null ? [h("dt", {}, "queue position"), h("dd", { "data-testid": "job-position" },
      `${job.queue_position} ahead (${job.queue_position_kind})${job.eta_s ? `, starts in ~${fmtNum(job.eta_s)} s` : ""}`)] : null,
    h("dt", {}, "usage"), h("dd", { "data-testid": "job-usage" },
      `${job.usage.prompt_tokens} prompt + ${Math.max(tokens, job.usage.completion_tokens)} completion tokens (max ${job.max_tokens})`),
    job.finish_reason ? [h("dt", {}, "finish reason"), h("dd", {}, job.finish_reason)] : null,
    job.error ? [h("dt", {}, "error"), h("dd", { class: "error", "data-testid": "job-error" }, `${job.error.code}: ${job.error.message}`)] : null,
    job.warning ? [h("dt", {}, "warning"), h("dd", { class: "error" }, job.warning.message)] : null,
  ), h("p", {}, cancel));
}

function timeline(job) {
  const t = job.timings;
  const step = (label, ms) => h("tr", {}, h("td", {}, label), h("td", {}, fmtTime(ms)),
    h("td", { class: "num" }, ms ? `+${fmtMs(ms - t.created_ms)}` : "–"));
  const events = job.events.map((e) => h("tr", { class: "muted" }, h("td", {}, `event: ${e.type}`), h("td", {}, fmtTime(e.time_ms)),
    h("td", { class: "num" }, `+${fmtMs(e.time_ms - t.created_ms)}`)));
  return h("div", { class: "card" }, h("h2", {}, "Timeline"), h("table", { "data-testid": "timeline" },
    step("created", t.created_ms), step("started", t.started_ms), step("first token", t.first_token_ms), step("finished", t.finished_ms),
    events));
}

function attempts(job) {
  // Each `started` event opens an attempt (with its worker); a `retry` closes one with a reason.
  const rows = [];
  for (const e of job.events) {
    if (e.type === "started") rows.push({ n: e.data.attempt, worker: e.data.worker, start: e.time_ms, end: null, outcome: "" });
    else if (rows.length && !rows.at(-1).end && ["retry", "done", "failed", "cancelled"].includes(e.type)) {
      Object.assign(rows.at(-1), { end: e.time_ms, outcome: e.type === "retry" ? `retry: ${e.data.reason}${e.data.message ? ` (${e.data.message})` : ""}` : e.type });
    }
  }
  return h("div", { class: "card" }, h("h2", {}, `Attempts (${job.attempts} of ${job.max_attempts})`),
    rows.length ? h("table", { "data-testid": "attempts" }, h("tr", {}, ["#", "worker", "started", "ran", "outcome"].map((c) => h("th", {}, c))),
      rows.map((r) => h("tr", {}, h("td", {}, r.n), h("td", { class: "mono" }, r.worker), h("td", {}, fmtTime(r.start)),
        h("td", {}, r.end ? fmtMs(r.end - r.start) : "running"), h("td", {}, r.outcome))))
      : h("p", { class: "muted" }, "Not started."));
}
