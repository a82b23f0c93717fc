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
  every(10_000, () => (list.querySelector("form:not([hidden])") ? null : refresh()), signal,
    (e) => list.replaceChildren(errorBox(e)));
}

function tenantCard(t, refresh, signal) {
  const l = t.limits, u = t.usage;
  const usage = (label, used, limit) => h("tr", {}, h("td", {}, label), h("td", { class: "num" }, `${used} / ${limitText(limit)}`), h("td", {}, bar(used, limit)));
  const edit = h("form", { class: "inline", hidden: true, onsubmit: async (e) => {
    e.preventDefault();
    const f = new FormData(edit);
    const body = Object.fromEntries(["rpm", "tpm", "max_queued"].map((k) => [k, Number(f.get(k))]));
    body.weight = Number(f.get("weight"));
    body.priorities = String(f.get("priorities")).split(/[ ,]+/).filter(Boolean).map(Number);
    body.webhook_url = l.webhook_url || "";  // not edited here: kept as it is
    try { await api(`/v1/admin/tenants/${encodeURIComponent(t.tenant)}`, { method: "PUT", body, signal }); await refresh(); } catch (err) { edit.append(errorBox(err)); }
  } },
  ["rpm", "tpm", "max_queued", "weight"].map((k) => h("label", {}, k, h("input", { name: k, type: "number", value: l[k], min: 0, step: k === "weight" ? "any" : 1, style: "width:7rem" }))),
  h("label", {}, "priorities", h("input", { name: "priorities", value: l.priorities.join(","), style: "width:10rem" })),
  h("button", { type: "submit" }, "Save limits"));
  return h("div", { class: "card", "data-tenant": t.tenant },
    h("h2", {}, t.tenant, " ", h("span", { class: "muted" }, t.source === "defaults" ? "(default limits)" : "(own limits)"), " ",
      h("button", { class: "secondary", onclick: () => { edit.hidden = !edit.hidden; } }, "Edit limits")),
    edit,
    h("div", { class: "grid2" },
      h("table", {}, h("tr", {}, h("th", {}, "usage"), h("th", { class: "num" }, "now / limit"), h("th", {}, "")),
        usage("requests, last min", u.requests_last_min, l.rpm), usage("tokens, last min", u.tokens_last_min, l.tpm),
        usage("queued", u.queued, l.max_queued), h("tr", {}, h("td", {}, "running"), h("td", { class: "num" }, u.running), h("td", {})),
        h("tr", {}, h("td", {}, "weight · priorities"), h("td", { class: "num" }, `${l.weight} · ${l.priorities.join("")}`), h("td", {}))),
      h("table", {}, h("tr", {}, ["key id", "name", "admin", "created", ""].map((c) => h("th", {}, c))),
        t.keys.map((k) => h("tr", { "data-key": k.id }, h("td", { class: "mono" }, k.id), h("td", {}, k.name), h("td", {}, k.admin ? "yes" : ""),
          h("td", {}, fmtTime(k.created_ms)),
          h("td", {}, h("button", { class: "danger", "data-testid": "revoke", onclick: async () => {
            if (!confirm(`Revoke key ${k.id}?`)) return;
            await api(`/v1/ui/keys/${k.id}`, { method: "DELETE", signal });
            await refresh();
          } }, "Revoke")))))));
}

const ACTIVE_BATCH = new Set(["validating", "in_progress", "finalizing"]);

export async function batchesPage({ root, signal }) {
  const body = h("div");
  root.append(h("h1", {}, "Batches"), body);
  every(3000, async () => {
    let page;
    try {
      page = await api("/v1/batches?limit=100", { signal });
    } catch (e) {
      if (e instanceof ApiError && (e.status === 404 || e.status === 405)) {
        body.replaceChildren(h("p", { class: "muted", "data-testid": "no-batches-api" }, "This server has no batch API yet."));
        return;
      }
      throw e;
    }
    const rows = page.data || [];
    body.replaceChildren(rows.length ? h("table", { "data-testid": "batches" },
      h("tr", {}, ["batch", "status", "created", "progress", "completed", "failed", "total", "files", ""].map((c) => h("th", {}, c))),
      rows.map((b) => {
        const c = b.request_counts || { total: 0, completed: 0, failed: 0 };
        return h("tr", { "data-batch": b.id }, h("td", { class: "mono" }, b.id), h("td", {}, badge(b.status)),
          h("td", {}, fmtTime((b.created_at || 0) * 1000)), h("td", {}, bar(c.completed + c.failed, c.total)),
          h("td", { class: "num" }, c.completed), h("td", { class: "num" }, c.failed), h("td", { class: "num" }, c.total),
          h("td", {}, download(b.output_file_id, "output", signal), " ", download(b.error_file_id, "errors", signal)),
          h("td", {}, ACTIVE_BATCH.has(b.status) ? h("button", { class: "danger", onclick: async (e) => {
            e.currentTarget.disabled = true;
            await api(`/v1/batches/${b.id}/cancel`, { method: "POST", signal });
          } }, "Cancel") : null));
      }))
      : h("p", { class: "muted" }, "No batches."));
  }, signal, (e) => body.replaceChildren(errorBox(e)));
}

function download(fileId, label, signal) {
  if (!fileId) return null;
  // The key must travel in a header, so the file is fetched here and handed over as a blob.
  return h("button", { class: "secondary", onclick: async () => {
    const res = await fetch(`${BASE}/v1/files/${fileId}/content`, { headers: authHeaders(), signal });
    if (!res.ok) return;
    const url = URL.createObjectURL(await res.blob());
    h("a", { href: url, download: `${fileId}.jsonl` }).click();
    setTimeout(() => URL.revokeObjectURL(url), 10_000);
  } }, label);
}
