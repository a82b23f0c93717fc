// The console's shell: log-in, navigation and a hash router (#/page/arg?query). Each page is
// `async (ctx) => void` drawing into ctx.root; ctx.signal aborts its polls and streams on leave.
import { api, ApiError, errorBox, h, session } from "./lib.js";
import { overviewPage } from "./overview.js";
import { jobPage, jobsPage } from "./jobs.js";
import { playgroundPage } from "./playground.js";
import { batchesPage, tenantsPage, workersPage } from "./admin.js";

const PAGES = {
  overview: { title: "Overview", draw: overviewPage, admin: true },
  jobs: { title: "Jobs", draw: jobsPage },
  job: { title: "Job", draw: jobPage, hidden: true },
  workers: { title: "Workers", draw: workersPage, admin: true },
  playground: { title: "Playground", draw: playgroundPage },
  batches: { title: "Batches", draw: batchesPage },
  tenants: { title: "Tenants & keys", draw: tenantsPage, admin: true },
};

const main = document.getElementById("main");
let current = null; // the AbortController of the page on screen

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, "");
  const [path, qs = ""] = raw.split("?");
  const [name, ...rest] = path.split("/");
  return { name: name || "", arg: rest.map(decodeURIComponent).join("/"), query: new URLSearchParams(qs) };
}

function drawNav(active) {
  const me = session.me;
  const nav = document.getElementById("nav");
  nav.replaceChildren(
    ...Object.entries(PAGES)
      .filter(([, p]) => !p.hidden && (!p.admin || me?.admin))
      .map(([name, p]) => h("a", { href: `#/${name}`, class: name === active ? "active" : "", "data-nav": name }, p.title)),
  );
  const who = document.getElementById("who");
  who.replaceChildren(
    ...(me ? [h("span", { "data-testid": "whoami" }, `${me.tenant}${me.admin ? " (admin)" : ""}`),
      h("button", { class: "secondary", onclick: () => { session.logout(); location.hash = "#/login"; route(); } }, "Log out")] : []),
  );
}

function loginPage(message) {
  drawNav(null);
  const input = h("input", { type: "password", id: "key", autocomplete: "off", placeholder: "gq-…", "aria-label": "API key" });
  const status = h("p", { class: "error", "data-testid": "login-error" }, message || "");
  const form = h("form", { class: "card login", onsubmit: async (e) => {
    e.preventDefault();
    session.login(input.value.trim());
    try {
      session.me = await api("/v1/ui/me");
    } catch (err) {
      session.logout();
      status.textContent = err instanceof ApiError && err.status === 401 ? "That key is not valid." : String(err.message || err);
      return;
    }
    location.hash = session.me.admin ? "#/overview" : "#/jobs";
    route();
  } },
  h("h1", {}, "genq console"),
  h("p", { class: "muted" }, "Log in with an API key (an admin key shows queues, workers and tenants). It is kept in this tab only."),
  h("label", { for: "key" }, "API key"), input, h("button", { type: "submit" }, "Log in"), status);
  main.replaceChildren(form);
  input.focus();
}

async function route() {
  current?.abort();
  current = new AbortController();
  const { name, arg, query } = parseHash();
  if (!session.key || name === "login") return loginPage();
  if (!session.me) {
    try {
      session.me = await api("/v1/ui/me");
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) { session.logout(); return loginPage("That key is no longer valid."); }
      main.replaceChildren(errorBox(e));
      return;
    }
  }
  const pageName = PAGES[name] ? name : (session.me.admin ? "overview" : "jobs");
  const page = PAGES[pageName];
  drawNav(pageName === "job" ? "jobs" : pageName);
  document.title = `${page.title} · genq`;
  const root = h("section", { "data-page": pageName });
  main.replaceChildren(root);
  if (page.admin && !session.me.admin) {
    root.append(h("h1", {}, page.title), h("p", { class: "error", "data-testid": "forbidden" }, "This page needs an admin key."));
    return;
  }
  try {
    await page.draw({ root, arg, query, signal: current.signal, me: session.me });
  } catch (e) {
    if (!current.signal.aborted) root.append(errorBox(e));
  }
}

window.addEventListener("hashchange", route);
route();
