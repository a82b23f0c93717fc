// What every page shares: the key, JSON calls, SSE over fetch, DOM building, formatting.

const KEY = "genq.key";
// Where the API is mounted (empty unless a proxy serves genq under a path prefix).
export const BASE = location.pathname.replace(/\/ui(\/.*)?$/, "");

export const session = {
  me: null, // GET /v1/ui/me, once per login
  get key() { return sessionStorage.getItem(KEY); },
  login(key) { sessionStorage.setItem(KEY, key); this.me = null; },
  logout() { sessionStorage.removeItem(KEY); this.me = null; },
};

export class ApiError extends Error {
  constructor(status, body) {
    super(body?.error?.message || `HTTP ${status}`);
    this.status = status;
    this.code = body?.error?.code;
  }
}

export function authHeaders(extra = {}) {
  return { Authorization: `Bearer ${session.key}`, ...extra };
}

export async function api(path, { method = "GET", body, signal, headers = {} } = {}) {
  const init = { method, signal, headers: authHeaders(headers) };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await fetch(BASE + path, init);
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = { error: { message: text } }; }
  if (!res.ok) throw new ApiError(res.status, data);
  return data;
}

// Server-sent events read with fetch, so the key goes in a header (EventSource can't send one).
// Yields {event, data, id}; resumes after a dropped connection with Last-Event-ID.
export async function* sse(path, { signal, retries = 5 } = {}) {
  let lastId = null;
  for (let attempt = 0; ; attempt++) {
    const headers = authHeaders({ Accept: "text/event-stream" });
    if (lastId) headers["Last-Event-ID"] = lastId;
    let res;
    try {
      res = await fetch(BASE + path, { headers, signal });
    } catch (e) {
      if (signal?.aborted || attempt >= retries) throw e;
      continue;
    }
    if (!res.ok) {
      let body = null;
      try { body = await res.json(); } catch { /* not JSON */ }
      throw new ApiError(res.status, body);
    }
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    let ended = false;
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) { ended = true; break; }
        buf += value;
        let m;
        while ((m = /\r\n\r\n|\n\n|\r\r/.exec(buf))) {
          const block = buf.slice(0, m.index);
          buf = buf.slice(m.index + m[0].length);
          const ev = { event: "message", data: "", id: null };
          const data = [];
          for (const line of block.split(/\r\n|\n|\r/)) {
            if (!line || line.startsWith(":")) continue;
            const i = line.indexOf(":");
            const field = i < 0 ? line : line.slice(0, i);
            const val = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
            if (field === "event") ev.event = val;
            else if (field === "data") data.push(val);
            else if (field === "id") ev.id = val;
          }
          if (!data.length && ev.event === "message") continue; // a comment-only block
          ev.data = data.length ? JSON.parse(data.join("\n")) : null;
          if (ev.id) lastId = ev.id;
          yield ev;
        }
      }
    } catch (e) {
      if (signal?.aborted || attempt >= retries) throw e;
    }
    if (ended) return; // the server closed the stream after the terminal event
  }
}

// h("td", {class: "num", onclick: fn, "data-testid": "x"}, child, "text", ...): children are nodes or text.
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "value") el.value = v;
    else if (k === "style") el.style.cssText = v; // CSSOM: allowed by the page's CSP, a style attribute is not
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export const badge = (status) => h("span", { class: `badge s-${status}`, "data-testid": "status" }, status);

export function fmtMs(ms) {
  if (ms === null || ms === undefined) return "–";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60_000) return `${(ms / 1000).toFixed(1)} s`;
  if (ms < 3_600_000) return `${Math.floor(ms / 60_000)} min ${Math.round((ms % 60_000) / 1000)} s`;
  return `${(ms / 3_600_000).toFixed(1)} h`;
}

export const fmtTime = (ms) => (ms ? new Date(ms).toLocaleTimeString() : "–");
export const fmtNum = (x, digits = 1) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits).replace(/\.0+$/, ""));
export const limitText = (n) => (n ? String(n) : "∞");

export function bar(used, limit) {
  const frac = limit ? Math.min(1, used / limit) : 0;
  return h("div", { class: frac >= 0.9 ? "bar hot" : "bar", title: `${used} / ${limitText(limit)}` },
    h("div", { style: `width:${(frac * 100).toFixed(1)}%` }));
}

// Run fn now and every periodMs until the page's signal aborts; errors are shown, not fatal.
export function every(periodMs, fn, signal, onError) {
  let timer = null;
  const tick = async () => {
    try { await fn(); } catch (e) { if (!signal.aborted) onError?.(e); }
    if (!signal.aborted) timer = setTimeout(tick, periodMs);
  };
  signal.addEventListener("abort", () => clearTimeout(timer));
  tick();
}

export function errorBox(e) {
  return h("p", { class: "error", "data-testid": "error" }, e instanceof ApiError ? `${e.status}: ${e.message}` : String(e));
}

export const TERMINAL = new Set(["succeeded", "failed", "cancelled", "expired"]);
export const STATUSES = ["queued", "running", "succeeded", "failed", "cancelled", "expired"];
