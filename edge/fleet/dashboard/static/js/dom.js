// DOM building and formatting helpers. Text always goes in as text nodes (never innerHTML),
// so device ids, event details and error messages cannot inject markup.

const SVG_NS = "http://www.w3.org/2000/svg";

function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function apply(node, props) {
  for (const [key, value] of Object.entries(props || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.setAttribute("class", Array.isArray(value) ? value.filter(Boolean).join(" ") : value);
    else if (key === "style" && typeof value === "object") Object.assign(node.style, value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on") && typeof value === "function") node.addEventListener(key.slice(2).toLowerCase(), value);
    else if (key === "value" || key === "checked" || key === "disabled" || key === "selected") node[key] = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  return node;
}

/** Create an HTML element: h("a", {href, class, onClick}, "text", child, [more]). */
export function h(tag, props, ...children) {
  return append(apply(document.createElement(tag), props), children);
}

/** Create an SVG element. */
export function s(tag, props, ...children) {
  return append(apply(document.createElementNS(SVG_NS, tag), props), children);
}

/** Replace the children of a node. */
export function mount(node, ...children) {
  node.replaceChildren();
  return append(node, children);
}

export function link(href, ...children) {
  return h("a", { href, "data-link": "" }, ...children);
}

// ------------------------------------------------------------------ formatting

const numberFormat = new Intl.NumberFormat();

export function fmtInt(n) {
  return n === null || n === undefined ? "–" : numberFormat.format(n);
}

export function fmtNum(n, digits = 1) {
  if (n === null || n === undefined || Number.isNaN(n)) return "–";
  return Number(n).toLocaleString(undefined, { maximumFractionDigits: digits, minimumFractionDigits: 0 });
}

export function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${fmtNum(n, i ? 1 : 0)} ${units[i]}`;
}

export function fmtMb(mb) {
  return mb === null || mb === undefined ? "–" : fmtBytes(mb * 1024 * 1024);
}

export function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  seconds = Math.max(0, Math.round(seconds));
  if (seconds < 60) return `${seconds} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min${seconds % 60 ? ` ${seconds % 60} s` : ""}`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h${seconds % 3600 >= 60 ? ` ${Math.floor((seconds % 3600) / 60)} min` : ""}`;
  return `${Math.floor(seconds / 86400)} d ${Math.floor((seconds % 86400) / 3600)} h`;
}

export function fmtTime(ts) {
  if (!ts) return "–";
  return new Date(ts * 1000).toLocaleString(undefined, {
    year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit",
  });
}

export function fmtAgo(ts) {
  if (!ts) return "never";
  const d = Date.now() / 1000 - ts;
  if (d < 5) return "just now";
  if (d < 0) return "in " + fmtDuration(-d);
  return fmtDuration(d).replace(/ \d+ s$/, "") + " ago";
}

/** A relative time that keeps its absolute time in a tooltip (and refreshes itself). */
export function ago(ts) {
  return h("time", { datetime: ts ? new Date(ts * 1000).toISOString() : "", title: fmtTime(ts), "data-ago": ts || "" }, fmtAgo(ts));
}

export function refreshAgos(root = document) {
  for (const el of root.querySelectorAll("time[data-ago]")) {
    const ts = Number(el.dataset.ago);
    if (ts) el.textContent = fmtAgo(ts);
  }
}

export function shortSha(sha) {
  return sha ? sha.slice(0, 12) : "–";
}

// ------------------------------------------------------------------ building blocks

const STATE_TONE = {
  online: "ok", healthy: "ok", committed: "ok", completed: "ok", active: "ok", answered: "ok", passed: "ok",
  degraded: "warn", paused: "warn", halted: "warn", soaking: "info", waiting: "info", pending: "muted",
  offline: "off", queued: "muted", skipped: "muted", refused: "muted", expired: "muted", sent: "info",
  deploying: "info", notified: "info", downloading: "info", downloaded: "info", activated: "info",
  installed: "info", verified: "info", download_started: "info", health_ok: "ok",
  failed: "bad", health_failed: "bad", rolled_back: "bad", aborted: "bad", reverting: "purple",
  reverted: "purple", removed: "muted", read: "muted", admin: "info",
};

export function tone(state) {
  return STATE_TONE[state] || "muted";
}

export function label(state) {
  const text = String(state).replaceAll("_", " ");
  return text.charAt(0).toUpperCase() + text.slice(1);
}

export function badge(state, text) {
  return h("span", { class: `badge tone-${tone(state)}`, "data-state": state }, text || label(state));
}

export function dot(state) {
  return h("span", { class: `dot tone-${tone(state)}`, "aria-hidden": "true" });
}

export function chip(text, props = {}) {
  return h("span", { class: "chip", ...props }, text);
}

export function card(title, body, { actions, className, subtitle } = {}) {
  return h("section", { class: ["card", className] },
    title ? h("header", { class: "card-head" },
      h("div", {}, h("h2", {}, title), subtitle ? h("p", { class: "muted small" }, subtitle) : null),
      actions ? h("div", { class: "card-actions" }, actions) : null) : null,
    h("div", { class: "card-body" }, body));
}

export function empty(title, text, action) {
  return h("div", { class: "empty" },
    h("div", { class: "empty-icon", "aria-hidden": "true" }, "○"),
    h("p", { class: "empty-title" }, title),
    text ? h("p", { class: "muted" }, text) : null,
    action || null);
}

const ERROR_TITLES = { 0: "Cannot reach the controller", 401: "Not logged in", 403: "Not allowed", 404: "Not found",
  409: "Conflict", 413: "Too large", 422: "Refused" };

export function errorBox(err, retry, title) {
  const message = err && err.message ? err.message : String(err);
  return h("div", { class: "error-box", role: "alert" },
    h("strong", {}, title || (err && ERROR_TITLES[err.status]) || "Something went wrong"),
    h("p", {}, message),
    err && err.hint ? h("p", { class: "muted" }, err.hint) : null,
    retry ? h("button", { class: "btn", onClick: retry }, "Try again") : null);
}

export function loading(text = "Loading…") {
  return h("div", { class: "loading" }, h("span", { class: "spinner", "aria-hidden": "true" }), text);
}

export function kv(rows) {
  return h("dl", { class: "kv" }, rows.filter(Boolean).map(([k, v]) => [h("dt", {}, k), h("dd", {}, v ?? "–")]));
}

export function table(columns, rows, { empty: emptyNode, className } = {}) {
  if (!rows.length && emptyNode) return emptyNode;
  return h("div", { class: "table-wrap" }, h("table", { class: ["table", className] },
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", { class: c.className }, c.title)))),
    h("tbody", {}, rows.map((row) => h("tr", { dataset: row.__data || {} },
      columns.map((c) => h("td", { class: c.className }, c.render(row))))))));
}

export function toast(message, kind = "info", timeout = 5000) {
  const box = document.getElementById("toasts");
  if (!box) return;
  const el = h("div", { class: `toast tone-${kind}` }, message);
  box.append(el);
  setTimeout(() => el.classList.add("leaving"), timeout);
  setTimeout(() => el.remove(), timeout + 400);
  while (box.children.length > 5) box.firstChild.remove();
}

/** Ask before doing something; resolves to {ok, reason}. */
export function confirmDialog({ title, text, confirmLabel = "Confirm", danger = false, askReason = false }) {
  return new Promise((resolve) => {
    const reason = h("textarea", { rows: 2, maxlength: 500, placeholder: "Reason (optional, kept in the audit trail)" });
    const dialog = h("dialog", { class: "dialog" },
      h("form", { method: "dialog" },
        h("h2", {}, title),
        text ? h("p", {}, text) : null,
        askReason ? h("label", { class: "field" }, h("span", {}, "Reason"), reason) : null,
        h("div", { class: "dialog-actions" },
          h("button", { class: "btn", value: "cancel" }, "Cancel"),
          h("button", { class: ["btn", danger ? "btn-danger" : "btn-primary"], value: "ok" }, confirmLabel))));
    dialog.addEventListener("close", () => {
      resolve({ ok: dialog.returnValue === "ok", reason: reason.value.trim() });
      dialog.remove();
    });
    document.body.append(dialog);
    dialog.showModal();
  });
}

/** Show arbitrary content in a modal; returns the dialog (close() it). */
export function modal(title, body, actions = []) {
  const dialog = h("dialog", { class: "dialog" },
    h("h2", {}, title), body,
    h("div", { class: "dialog-actions" }, actions,
      h("button", { class: "btn", onClick: () => dialog.close() }, "Close")));
  dialog.addEventListener("close", () => dialog.remove());
  document.body.append(dialog);
  dialog.showModal();
  return dialog;
}

export function debounce(fn, ms) {
  let timer = null;
  const wrapped = (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
  wrapped.cancel = () => clearTimeout(timer);
  return wrapped;
}

/** Run fn at most once per ms, trailing call included. */
export function throttle(fn, ms) {
  let last = 0, timer = null;
  const wrapped = () => {
    const wait = last + ms - Date.now();
    if (wait <= 0) { last = Date.now(); fn(); return; }
    if (!timer) timer = setTimeout(() => { timer = null; last = Date.now(); fn(); }, wait);
  };
  wrapped.cancel = () => { clearTimeout(timer); timer = null; };
  return wrapped;
}
