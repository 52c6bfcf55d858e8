// The dashboard's entry point: session check, login, the page frame, the router and live status.

import { api, setCsrf } from "./js/api.js";
import { h, s, mount, refreshAgos, toast, errorBox } from "./js/dom.js";
import { live } from "./js/live.js";
import loginPage from "./js/pages/login.js";
import overviewPage from "./js/pages/overview.js";
import devicesPage from "./js/pages/devices.js";
import devicePage from "./js/pages/device.js";
import bundlesPage from "./js/pages/bundles.js";
import bundlePage from "./js/pages/bundle.js";
import rolloutsPage from "./js/pages/rollouts.js";
import rolloutNewPage from "./js/pages/rollout_new.js";
import rolloutPage from "./js/pages/rollout.js";
import accessPage from "./js/pages/access.js";

const ROUTES = [
  [/^\/ui\/?$/, overviewPage, "overview"],
  [/^\/ui\/devices\/?$/, devicesPage, "devices"],
  [/^\/ui\/devices\/([^/]+)$/, devicePage, "devices"],
  [/^\/ui\/bundles\/?$/, bundlesPage, "bundles"],
  [/^\/ui\/bundles\/([0-9a-f]{64})$/, bundlePage, "bundles"],
  [/^\/ui\/rollouts\/?$/, rolloutsPage, "rollouts"],
  [/^\/ui\/rollouts\/new$/, rolloutNewPage, "rollouts"],
  [/^\/ui\/rollouts\/([^/]+)$/, rolloutPage, "rollouts"],
  [/^\/ui\/access\/?$/, accessPage, "access"],
];

const ICONS = {
  overview: "M3 3h7v7H3zM14 3h7v4h-7zM14 11h7v10h-7zM3 14h7v7H3z",
  devices: "M7 4h10a2 2 0 0 1 2 2v12a2 2 0 0 1-2 2H7a2 2 0 0 1-2-2V6a2 2 0 0 1 2-2zM9 8h6v8H9zM2 9h3M2 15h3M19 9h3M19 15h3",
  bundles: "M12 3l8 4.5v9L12 21l-8-4.5v-9zM12 12l8-4.5M12 12v9M12 12L4 7.5",
  rollouts: "M3 17c3 0 3-4 6-4s3 4 6 4 3-4 6-4M3 11c3 0 3-4 6-4s3 4 6 4 3-4 6-4",
  access: "M15 7a4 4 0 1 1-3.9 4.9L3 20v-3h3v-3h3l2.1-2.1A4 4 0 0 1 15 7z",
};

function icon(name) {
  return s("svg", { viewBox: "0 0 24 24", width: 18, height: 18, class: "icon", "aria-hidden": "true" },
    s("path", { d: ICONS[name], fill: "none", stroke: "currentColor", "stroke-width": 1.8, "stroke-linejoin": "round",
      "stroke-linecap": "round" }));
}

const app = {
  session: null,
  page: null,
  cleanups: [],
  frame: null,
};

function navigate(path, { replace = false } = {}) {
  if (replace) history.replaceState(null, "", path);
  else history.pushState(null, "", path);
  route();
}

function liveBadge() {
  const el = h("span", { class: "live-badge", title: "Live updates" });
  live.onState((state) => {
    el.dataset.state = state;
    el.textContent = state === "live" ? "Live" : state === "connecting" ? "Reconnecting…" : "Offline";
  });
  return el;
}

function buildFrame() {
  const nav = h("nav", { class: "nav", "aria-label": "Main" },
    [["overview", "/ui/", "Overview"], ["devices", "/ui/devices", "Devices"], ["bundles", "/ui/bundles", "Bundles"],
      ["rollouts", "/ui/rollouts", "Rollouts"], ["access", "/ui/access", "Access"]].map(([key, href, label]) =>
      h("a", { href, "data-link": "", "data-nav": key, class: "nav-link" }, icon(key), h("span", {}, label))));
  const content = h("main", { class: "content", id: "page", tabindex: "-1" });
  const title = h("h1", { class: "page-title" });
  const session = app.session;
  const frame = h("div", { class: "layout" },
    h("aside", { class: "sidebar" },
      h("a", { class: "brand", href: "/ui/", "data-link": "" },
        h("span", { class: "brand-mark" }, "E"), h("span", {}, "Edge ", h("b", {}, "fleet"))),
      nav,
      h("div", { class: "sidebar-foot" }, liveBadge())),
    h("div", { class: "main" },
      h("header", { class: "topbar" }, title,
        h("div", { class: "user" },
          h("span", { class: "user-name", title: session.kind === "token" ? "Logged in with an API token" : "Logged in with a password" },
            session.name),
          h("span", { class: `badge tone-${session.role === "admin" ? "info" : "muted"}`, "data-role": session.role },
            session.role === "admin" ? "admin" : "read-only"),
          h("button", { class: "btn btn-ghost", id: "logout", onClick: logout }, "Log out"))),
      content));
  return { frame, nav, content, title };
}

async function logout() {
  try {
    await api("/dashboard/logout", { method: "POST" });
  } catch { /* the session may be gone already */ }
  showLogin("You are logged out.");
}

function cleanup() {
  for (const fn of app.cleanups.splice(0)) {
    try { fn(); } catch (exc) { console.error(exc); }
  }
  if (app.page && app.page.destroy) app.page.destroy();
  app.page = null;
}

function route() {
  if (!app.session) return;
  cleanup();
  const path = location.pathname;
  let match = null, page = null, section = null;
  for (const [pattern, fn, key] of ROUTES) {
    match = path.match(pattern);
    if (match) { page = fn; section = key; break; }
  }
  const { content, title, nav } = app.frame;
  for (const a of nav.querySelectorAll("[data-nav]")) a.classList.toggle("active", a.dataset.nav === section);
  if (!page) {
    title.textContent = "Not found";
    mount(content, errorBox({ message: `There is no page at ${path}.`, hint: "Use the menu on the left." }));
    return;
  }
  const ctx = {
    session: app.session,
    admin: app.session.role === "admin",
    params: match.slice(1).map(decodeURIComponent),
    query: new URLSearchParams(location.search),
    navigate,
    setTitle(text) { title.textContent = text; document.title = `${text} · Edge fleet`; },
    on(name, fn) { app.cleanups.push(live.on(name, fn)); },
    cleanup(fn) { app.cleanups.push(fn); },
  };
  live.watch(section === "devices" && ctx.params[0] ? ctx.params[0] : null);
  mount(content);
  try {
    app.page = page(ctx, content) || null;
  } catch (exc) {
    console.error(exc);
    mount(content, errorBox(exc));
  }
  content.focus({ preventScroll: true });
  window.scrollTo(0, 0);
}

function showLogin(message) {
  cleanup();
  live.close();
  app.session = null;
  app.frame = null;
  setCsrf(null);
  const root = document.getElementById("app");
  mount(root, loginPage({ message, onLoggedIn: start }));
  document.title = "Log in · Edge fleet";
}

function start(session) {
  app.session = session;
  setCsrf(session.csrf);
  app.frame = buildFrame();
  mount(document.getElementById("app"), app.frame.frame);
  if (!location.pathname.startsWith("/ui")) history.replaceState(null, "", "/ui/");
  route();
}

async function boot() {
  document.addEventListener("click", (e) => {
    const a = e.target.closest("a[data-link]");
    if (!a || e.defaultPrevented || e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey || e.altKey) return;
    const url = new URL(a.href, location.href);
    if (url.origin !== location.origin) return;
    e.preventDefault();
    if (url.pathname + url.search !== location.pathname + location.search) navigate(url.pathname + url.search);
  });
  window.addEventListener("popstate", route);
  window.addEventListener("edge:unauthorized", () => {
    if (app.session) showLogin("Your session ended. Please log in again.");
  });
  live.on("logout", () => showLogin("Your session ended. Please log in again."));
  live.on("status", (d) => {
    if (d.status === "offline") toast(`${d.id} went offline${d.reason ? ` (${d.reason})` : ""}`, "off");
    else toast(`${d.id} is online`, "ok");
  });
  live.on("failure", (d) => toast(`${d.device_id}: ${String(d.kind).replaceAll("_", " ")} ${d.model ?? ""}@${d.version ?? ""}`, "bad", 8000));
  live.onState(async (state) => {
    // A stream refused outright (401) closes for good: find out whether the session is gone.
    if (state !== "failed" || !app.session) return;
    try {
      await api("/dashboard/session");
      setTimeout(() => app.session && live.watch(live.device), 3000);
    } catch { /* edge:unauthorized shows the login */ }
  });
  setInterval(() => refreshAgos(), 15000);
  try {
    start(await api("/dashboard/session"));
  } catch (exc) {
    if (exc.status === 401) showLogin();
    else mount(document.getElementById("app"), errorBox(exc, () => location.reload()));
  }
}

boot();
