// Workers and tenants (admin key), and batches (any key: the caller's own).
import { api, ApiError, authHeaders, badge, bar, BASE, errorBox, every, fmtMs, fmtNum, fmtTime, h, limitText } from "./lib.js";

export async function workersPage({ root, signal }) {
  const body = h("div");
  root.append(h("h1", {}, "Workers"), body);
  every(2000, async () => {
    const { data } = await api("/v1/ui/workers", { signal });
    body.replaceChildren(data.length ? h("table", { "data-testid": "workers" },
      h("tr", {}, ["worker", "host", "model", "state", "capacity", "running", "waiting", "tokens/s", "KV cache", "last heartbeat"].map((c) => h("th", {}, c))),
      data.map((w) => h("tr", { "data-worker": w.id },
        h("td", { class: "mono" }, w.id), h("td", {}, `${w.host ?? "–"}${w.pid ? ` (pid ${w.pid})` : ""}`), h("td", {}, w.model),
        h("td", {}, badge(w.state || "running")), h("td", { class: "num" }, w.capacity ?? "–"),
        h("td", { class: "num" }, w.running ?? w.held ?? "–"), h("td", { class: "num" }, w.waiting ?? "–"),
        h("td", { class: "num" }, fmtNum(w.tokens_per_s)),
        h("td", { class: "num" }, w.kv_cache_usage === undefined ? "–" : `${Math.round(w.kv_cache_usage * 100)} %`),
        h("td", {}, `${fmtMs(w.heartbeat_age_ms)} ago`))))
      : h("p", { class: "muted" }, "No live worker."));
  }, signal, (e) => body.replaceChildren(errorBox(e)));
}

export async function tenantsPage({ root, signal }) {
  const created = h("div", { "data-testid": "new-key" });
  const list = h("div");
  const form = h("form", { class: "inline card", "data-testid": "create-key", onsubmit: async (e) => {
    e.preventDefault();
    const f = new FormData(form);
    try {
      const k = await api("/v1/ui/keys", { method: "POST", signal,
        body: { tenant: f.get("tenant"), name: f.get("name"), admin: f.get("admin") === "on" } });
      created.replaceChildren(h("p", { class: "newkey" }, `New key for ${k.tenant} (shown once): `,
        h("code", { "data-testid": "new-key-value" }, k.key)));
      form.reset();
      await refresh();
    } catch (err) { created.replaceChildren(errorBox(err)); }
  } },
  h("label", {}, "tenant", h("input", { name: "tenant", required: true, pattern: "[A-Za-z0-9._\\-]{1,64}" })),
  h("label", {}, "key name", h("input", { name: "name" })),
  h("label", { class: "check" }, h("input", { type: "checkbox", name: "admin" }), "admin"),
  h("button", { type: "submit" }, "Create key"));
  root.append(h("h1", {}, "Tenants & keys"), form, created, list);
  const refresh = async () => {
    const { data } = await api("/v1/ui/tenants", { signal });
    list.replaceChildren(...data.map((t) => tenantCard(t, refresh, signal)));
  };
  // usage moves on by itself; a redraw would wipe a limits form being edited, so none then
  every(3000, () => (list.querySelector("form:not([hidden])") ? null : refresh()), signal,
    (e) => list.replaceChildren(errorBox(e)));
}

// Every numeric field of PUT /v1/admin/tenants/{t}: a field left out would be reset to its default.
const LIMITS = ["rpm", "rpm_burst", "tpm", "tpm_burst", "max_queued", "weight"];

function tenantCard(t, refresh, signal) {
  const l = t.limits, u = t.usage;
  // used / limit, a bar, and what the limiter's bucket lets through now (bursts can exceed the limit)
  const usage = (label, testid, used, limit, left) => h("tr", {}, h("td", {}, label),
    h("td", { class: "num", "data-testid": testid }, `${used} / ${limitText(limit)}`), h("td", {}, bar(used, limit)),
    h("td", { class: "num muted" }, left === null || left === undefined ? "" : `${left} left now`));
  const edit = h("form", { class: "inline", hidden: true, onsubmit: async (e) => {
    e.preventDefault();
    const f = new FormData(edit);
    const body = Object.fromEntries(LIMITS.map((k) => [k, Number(f.get(k))]));
    body.priorities = String(f.get("priorities")).split(/[ ,]+/).filter(Boolean).map(Number);
    body.webhook_url = l.webhook_url || "";  // not edited here: kept as it is
    try { await api(`/v1/admin/tenants/${encodeURIComponent(t.tenant)}`, { method: "PUT", body, signal }); edit.hidden = true; await refresh(); } catch (err) { edit.append(errorBox(err)); }
  } },
  LIMITS.map((k) => h("label", {}, k, h("input", { name: k, type: "number", value: l[k], min: 0, step: k === "weight" ? "any" : 1, style: "width:7rem" }))),
  h("label", {}, "priorities", h("input", { name: "priorities", value: l.priorities.join(","), style: "width:10rem" })),
  h("button", { type: "submit", "data-testid": "save-limits" }, "Save limits"));
  return h("div", { class: "card", "data-tenant": t.tenant },
    h("h2", {}, t.tenant, " ", h("span", { class: "muted" }, t.source === "defaults" ? "(default limits)" : "(own limits)"), " ",
      h("button", { class: "secondary", "data-testid": "edit-limits", onclick: () => { edit.hidden = !edit.hidden; } }, "Edit limits")),
    edit,
    h("div", { class: "grid2" },
      h("table", { "data-testid": "usage" }, h("tr", {}, h("th", {}, "usage"), h("th", { class: "num" }, "used / limit"), h("th", {}, ""), h("th", {}, "")),
        usage("requests, last min", "use-requests", u.requests, l.rpm, u.rpm_left),
        usage(`tokens, last min${u.tokens_exact ? "" : " (newest jobs only)"}`, "use-tokens", u.tokens, l.tpm, u.tpm_left),
        usage("queued now", "use-queued", u.queued, l.max_queued),
        h("tr", {}, h("td", {}, "running now"), h("td", { class: "num", "data-testid": "use-running" }, u.running), h("td", {}), h("td", {})),
        h("tr", {}, h("td", {}, "weight · priorities"), h("td", { class: "num" }, `${l.weight} · ${l.priorities.join("")}`), h("td", {}), h("td", {}))),
      h("table", {}, h("tr", {}, ["key id", "name", "admin", "created", ""].map((c) => h("th", {}, c))),
        t.keys.map((k) => h("tr", { "data-key": k.id }, h("td", { class: "mono" }, k.id), h("td", {}, k.name), h("td", {}, k.admin ? "yes" : ""),
          h("td", {}, fmtTime(k.created_ms)),
          h("td", {}, h("button", { class: "danger", "data-testid": "revoke", onclick: async () => {
            if (!confirm(`Revoke key ${k.id}?`)) return;
            await api(`/v1/ui/keys/${k.id}`, { method: "DELETE", signal });
            await refresh();
          } }, "Revoke")))))));
}

// The statuses a cancel is accepted in (POST /v1/batches/{id}/cancel answers 409 in the others).
const CANCELLABLE = new Set(["validating", "in_progress"]);
const FINAL_BATCH = new Set(["completed", "failed", "expired", "cancelled"]);

export async function batchesPage({ root, signal, me }) {
  const body = h("div");
  const note = h("div");
  // the batch API is per tenant, an admin key's too: these are the key's tenant's batches
  root.append(h("h1", {}, `Batches of ${me.tenant}`), note, body);
  const rows = new Map(); // batch id -> its row, redrawn in place (a cancel's answer shows at once)
  const draw = (b) => {
    const row = batchRow(b, signal, async (btn) => {
      btn.disabled = true;
      try { draw(await api(`/v1/batches/${b.id}/cancel`, { method: "POST", signal })); } catch (e) { note.replaceChildren(errorBox(e)); }
    }, (e) => note.replaceChildren(errorBox(e)));
    rows.get(b.id)?.replaceWith(row);
    rows.set(b.id, row);
    return row;
  };
  // every second while a batch moves, so its progress shows as it happens
  every(1000, async () => {
    const { data } = await api("/v1/batches?limit=100", { signal });
    rows.clear();
    body.replaceChildren(data.length ? h("table", { "data-testid": "batches" },
      h("tr", {}, ["batch", "status", "created", "progress", "completed", "failed", "total", "files", ""].map((c) => h("th", {}, c))),
      data.map(draw))
      : h("p", { class: "muted", "data-testid": "no-batches" }, "No batches. Create one with POST /v1/files (purpose=batch), then POST /v1/batches."));
  }, signal, (e) => body.replaceChildren(errorBox(e)));
}

function batchRow(b, signal, onCancel, onError) {
  const c = b.request_counts || { total: 0, completed: 0, failed: 0 };
  const why = (b.errors?.data || []).map((e) => `${e.code}${e.line ? ` (line ${e.line})` : ""}: ${e.message}`).join("; ");
  return h("tr", { "data-batch": b.id },
    h("td", { class: "mono" }, b.id, b.metadata ? h("div", { class: "muted" }, JSON.stringify(b.metadata)) : null),
    h("td", { "data-testid": "batch-status" }, badge(b.status), why ? h("div", { class: "error", "data-testid": "batch-errors" }, why) : null),
    h("td", {}, fmtTime((b.created_at || 0) * 1000)),
    h("td", { "data-testid": "batch-progress" }, progress(c),
      FINAL_BATCH.has(b.status) ? null : h("div", { class: "muted" }, `window ends in ${fmtMs(b.expires_at * 1000 - Date.now())}`)),
    h("td", { class: "num", "data-testid": "batch-completed" }, c.completed),
    h("td", { class: "num", "data-testid": "batch-failed" }, c.failed),
    h("td", { class: "num", "data-testid": "batch-total" }, c.total),
    h("td", {}, download(b.input_file_id, "input", signal, onError), " ", download(b.output_file_id, "output", signal, onError), " ",
      download(b.error_file_id, "errors", signal, onError)),
    h("td", {}, CANCELLABLE.has(b.status)
      ? h("button", { class: "danger", "data-testid": "batch-cancel", onclick: (e) => onCancel(e.currentTarget) }, "Cancel") : null));
}

// Lines done and lines failed of the total, side by side (a limit's bar turns red near the limit: not this one).
function progress({ completed, failed, total }) {
  const pct = (n) => `width:${(total ? (100 * n) / total : 0).toFixed(1)}%`;
  return h("div", { class: "bar progress", title: `${completed} completed, ${failed} failed of ${total}` },
    h("div", { style: pct(completed), "data-testid": "bar-completed" }), h("div", { class: "bad", style: pct(failed), "data-testid": "bar-failed" }));
}

function download(fileId, label, signal, onError) {
  if (!fileId) return null;
  // The key must travel in a header, so the file is fetched here and handed over as a blob.
  return h("button", { class: "secondary", "data-testid": `download-${label}`, onclick: async () => {
    try {
      const res = await fetch(`${BASE}/v1/files/${encodeURIComponent(fileId)}/content`, { headers: authHeaders(), signal });
      if (!res.ok) throw new ApiError(res.status, await res.json().catch(() => null));
      const url = URL.createObjectURL(await res.blob());
      h("a", { href: url, download: `${fileId}.jsonl` }).click();
      setTimeout(() => URL.revokeObjectURL(url), 10_000);
    } catch (e) { if (!signal.aborted) onError(e); }
  } }, label);
}
