// Devices: server-side paged (keyset), searched and filtered; rows refresh as devices report.

import { api } from "../api.js";
import { h, link, mount, card, empty, errorBox, loading, badge, ago, chip, fmtInt, fmtNum, debounce, throttle, table } from "../dom.js";

const PAGE_SIZES = [25, 50, 100, 200];
const FILTERS = ["search", "status", "profile", "tag", "group", "model", "version"];

export default function devicesPage(ctx, root) {
  ctx.setTitle("Devices");
  const q = ctx.query;
  const state = Object.fromEntries(FILTERS.map((k) => [k, q.get(k) || ""]));
  state.limit = PAGE_SIZES.includes(Number(q.get("limit"))) ? Number(q.get("limit")) : 50;
  let cursors = [null]; // the `after` of each page seen, for going back
  let page = 0;
  let current = null;
  let alive = true;

  const search = h("input", { type: "search", id: "device-search", placeholder: "Search device ids…", value: state.search,
    "aria-label": "Search device ids" });
  const selects = {
    status: h("select", { id: "filter-status", "aria-label": "Status" }),
    profile: h("select", { id: "filter-profile", "aria-label": "Profile" }),
    tag: h("select", { id: "filter-tag", "aria-label": "Tag" }),
    group: h("select", { id: "filter-group", "aria-label": "Group" }),
    model: h("select", { id: "filter-model", "aria-label": "Model version" }),
  };
  const pageSize = h("select", { id: "page-size", "aria-label": "Devices per page" },
    PAGE_SIZES.map((n) => h("option", { value: n, selected: n === state.limit }, `${n} per page`)));
  const summary = h("span", { class: "muted", id: "device-summary" });
  const prev = h("button", { class: "btn", id: "page-prev", disabled: true }, "← Previous");
  const next = h("button", { class: "btn", id: "page-next", disabled: true }, "Next →");
  const body = h("div", { class: "devices-body" }, loading());
  const clear = h("button", { class: "btn btn-ghost", id: "filters-clear", hidden: true }, "Clear filters");

  const options = (select, label, values, current) => {
    mount(select, h("option", { value: "" }, label),
      values.map((v) => (typeof v === "string" ? { value: v, text: v } : v)).map((v) =>
        h("option", { value: v.value, selected: v.value === current }, v.text)));
  };
  options(selects.status, "Any status", [{ value: "online", text: "Online" }, { value: "offline", text: "Offline" }], state.status);
  options(selects.profile, "Any profile", state.profile ? [state.profile] : [], state.profile);
  options(selects.tag, "Any tag", state.tag ? [state.tag] : [], state.tag);
  options(selects.group, "Any group", state.group ? [state.group] : [], state.group);
  const modelValue = () => (state.model ? `${state.model}@${state.version}` : "");
  options(selects.model, "Any model version", modelValue() ? [modelValue()] : [], modelValue());

  api("/dashboard/facets").then((f) => {
    if (!alive) return;
    options(selects.profile, "Any profile", f.profiles, state.profile);
    options(selects.tag, f.tags.length ? "Any tag" : "No tags yet", f.tags, state.tag);
    options(selects.group, f.groups.length ? "Any group" : "No groups yet", f.groups, state.group);
    options(selects.model, "Any model version", f.models.map((m) => ({ value: `${m.model}@${m.version}`,
      text: `${m.model}@${m.version} (${fmtInt(m.devices)})` })), modelValue());
  }).catch(() => { /* the filters still work with typed values */ });

  const syncUrl = () => {
    const params = new URLSearchParams();
    for (const k of FILTERS) if (state[k]) params.set(k, state[k]);
    if (state.limit !== 50) params.set("limit", state.limit);
    const url = "/ui/devices" + (params.toString() ? `?${params}` : "");
    if (url !== location.pathname + location.search) history.replaceState(null, "", url);
    clear.hidden = !FILTERS.some((k) => state[k]);
  };

  const load = async ({ quiet = false } = {}) => {
    if (!quiet) body.classList.add("is-loading");
    try {
      const query = { limit: state.limit, after: cursors[page] };
      for (const k of FILTERS) query[k] = state[k];
      const data = await api("/dashboard/devices", { query });
      if (!alive) return;
      current = data;
      render(data);
    } catch (exc) {
      if (alive) mount(body, errorBox(exc, () => load()));
    } finally {
      body.classList.remove("is-loading");
    }
  };

  const restart = () => {
    cursors = [null];
    page = 0;
    syncUrl();
    load();
  };

  const render = (data) => {
    const first = page * state.limit + 1;
    summary.textContent = data.total
      ? `${fmtInt(first)}–${fmtInt(first + data.items.length - 1)} of ${fmtInt(data.total)} device${data.total === 1 ? "" : "s"}`
      : "";
    prev.disabled = page === 0;
    next.disabled = !data.next;
    if (!data.items.length) {
      const filtered = FILTERS.some((k) => state[k]);
      mount(body, filtered
        ? empty("No device matches these filters", "Change the search or the filters.", h("button", { class: "btn", onClick: clearFilters }, "Clear filters"))
        : empty("No devices yet", "Devices register themselves when their agent first connects to the broker. "
          + "Start one with `edge agent run` pointed at this controller's broker."));
      return;
    }
    mount(body, table([
      { title: "Device", render: (d) => link(`/ui/devices/${encodeURIComponent(d.id)}`, h("strong", {}, d.id)) },
      { title: "Status", render: (d) => h("span", { title: d.health.reasons.join("; ") }, badge(d.health.state)) },
      { title: "Profile", render: (d) => d.profile || h("span", { class: "muted" }, "–") },
      { title: "Models", render: (d) => d.models.length ? d.models.map((m) => chip(`${m.model}@${m.version}`,
        { class: `chip chip-${m.state === "active" ? "ok" : ["failed", "rolled_back"].includes(m.state) ? "bad" : "info"}`, title: m.state })) : h("span", { class: "muted" }, "none") },
      { title: "Tags / groups", className: "wrap", render: (d) => [...d.tags.map((t) => chip(t, { class: "chip chip-tag" })),
        ...d.groups.map((g) => chip(g, { class: "chip chip-group" }))] },
      { title: "CPU", className: "num", render: (d) => (d.telemetry.cpu_percent !== undefined ? `${fmtNum(d.telemetry.cpu_percent, 0)} %` : "–") },
      { title: "p95", className: "num", render: (d) => (d.telemetry.latency_p95_ms !== undefined ? `${fmtNum(d.telemetry.latency_p95_ms, 1)} ms` : "–") },
      { title: "Last seen", render: (d) => ago(d.last_seen) },
    ], data.items.map((d) => ({ ...d, __data: { device: d.id, status: d.health.state } })), { className: "devices-table" }));
  };

  const clearFilters = () => {
    for (const k of FILTERS) state[k] = "";
    search.value = "";
    for (const sel of Object.values(selects)) sel.value = "";
    restart();
  };

  search.addEventListener("input", debounce(() => { state.search = search.value.trim(); restart(); }, 250));
  for (const [key, sel] of Object.entries(selects)) {
    sel.addEventListener("change", () => {
      if (key === "model") {
        const [m, v] = sel.value ? sel.value.split("@") : ["", ""];
        state.model = m; state.version = v;
      } else state[key] = sel.value;
      restart();
    });
  }
  pageSize.addEventListener("change", () => { state.limit = Number(pageSize.value); restart(); });
  prev.addEventListener("click", () => { if (page > 0) { page--; load(); } });
  next.addEventListener("click", () => {
    if (current && current.next) { cursors[page + 1] = current.next; page++; load(); }
  });
  clear.addEventListener("click", clearFilters);

  // Live: re-read the page when one of its devices changed, or when a device appeared.
  const refresh = throttle(() => load({ quiet: true }), 2000);
  const visible = () => new Set((current && current.items || []).map((d) => d.id));
  ctx.on("status", refresh); // a device came, went, or is new: counts and rows change
  ctx.on("seen", (d) => { const v = visible(); if (d.more || d.ids.some((id) => v.has(id))) refresh(); });
  ctx.on("resync", refresh);
  ctx.on("stats", refresh);
  ctx.cleanup(() => { alive = false; refresh.cancel(); });

  mount(root, card(null, [
    h("div", { class: "filters" }, search, Object.values(selects), clear),
    body,
    h("div", { class: "pager" }, summary, h("div", { class: "pager-buttons" }, pageSize, prev, next)),
  ], { className: "devices-card" }));
  syncUrl();
  load();
}
