// One device: identity, capabilities, models, charts over time, event log, commands, actions.

import { api } from "../api.js";
import {
  h, link, mount, card, empty, errorBox, loading, badge, ago, chip, kv, table, toast, modal, confirmDialog,
  fmtNum, fmtMb, fmtTime, fmtDuration, throttle,
} from "../dom.js";
import { COLORS, timeChart } from "../charts.js";

const RANGES = [["15m", 900], ["1h", 3600], ["6h", 21600], ["24h", 86400], ["7d", 604800]];
const FAILURE_KINDS = ["failed", "health_failed", "rolled_back"];
const CHARTS = [
  { key: "latency", title: "Latency", unit: "ms", series: [["p50", "p50", COLORS.teal], ["p95", "p95", COLORS.blue]],
    none: "No latency yet: the agent reports it once its models serve requests." },
  { key: "traffic", title: "Requests and errors", unit: "/s", series: [["rps", "requests/s", COLORS.blue, true], ["eps", "errors/s", COLORS.red]],
    none: "No requests served in this range." },
  { key: "tps", title: "Tokens per second", unit: "tok/s", series: [["tps", "tokens/s", COLORS.violet, true]],
    none: "No generation in this range (tokens/s comes from LLMs)." },
  { key: "cpu", title: "CPU", unit: "%", yMax: 100, series: [["cpu", "CPU", COLORS.orange, true]],
    none: "No CPU figures in this range." },
  { key: "ram", title: "Memory", unit: "MB", series: [["ram", "used", COLORS.cyan, true], ["ram_total", "total", COLORS.gray, false, [4, 4]]],
    none: "No memory figures in this range." },
  { key: "temp", title: "Temperature", unit: "°C", series: [["temp", "°C", COLORS.red]],
    none: "This device reports no temperature (no thermal sensor exposed)." },
];

export default function devicePage(ctx, root) {
  const id = ctx.params[0];
  ctx.setTitle(id);
  mount(root, loading());
  let alive = true;
  let range = Number(ctx.query.get("range")) || 3600;
  let device = null;
  let eventFilter = "all";
  const charts = new Map();

  const header = h("div", { class: "page-head" });
  const top = h("div", { class: "grid-3" });
  const modelsBox = h("div");
  const chartGrid = h("div", { class: "chart-grid" });
  const rangeBar = h("div", { class: "segmented", role: "group", "aria-label": "Chart range" });
  const eventsBox = h("div");
  const commandsBox = h("div");

  const renderRange = () => mount(rangeBar, RANGES.map(([label, seconds]) =>
    h("button", { class: seconds === range ? "active" : "", "aria-pressed": String(seconds === range),
      onClick: () => { range = seconds; renderRange(); loadSeries(); } }, label)));
  renderRange();

  const load = async () => {
    try {
      device = await api(`/api/v1/devices/${encodeURIComponent(id)}`, { query: { telemetry: 1, events: 200 } });
      if (!alive) return;
      renderDevice();
    } catch (exc) {
      if (alive) mount(root, errorBox(exc, load));
      return false;
    }
    return true;
  };

  const loadSeries = async () => {
    try {
      const until = Date.now() / 1000;
      const data = await api(`/dashboard/devices/${encodeURIComponent(id)}/series`, { query: { since: until - range, until } });
      if (alive) renderCharts(data);
    } catch (exc) {
      if (alive) mount(chartGrid, errorBox(exc, loadSeries));
    }
  };

  const renderCharts = (data) => {
    for (const spec of CHARTS) {
      const has = spec.series.some(([key]) => (data[key] || []).some((v) => v !== null));
      let entry = charts.get(spec.key);
      if (!entry) {
        const body = h("div", { class: "chart-body" });
        const latest = h("span", { class: "chart-latest" });
        const box = h("section", { class: "card chart-card", "data-chart": spec.key },
          h("header", { class: "card-head" }, h("h2", {}, spec.title), latest), body);
        chartGrid.append(box);
        entry = { box, body, latest, chart: null, has: null };
        charts.set(spec.key, entry);
      }
      const lastValue = (key) => {
        const values = data[key] || [];
        for (let i = values.length - 1; i >= 0; i--) if (values[i] !== null) return values[i];
        return null;
      };
      const first = lastValue(spec.series[0][0]);
      entry.latest.textContent = first === null ? "" : `${fmtNum(first, first < 10 ? 2 : first < 100 ? 1 : 0)} ${spec.unit}`;
      if (!has) {
        if (entry.chart) { entry.chart.destroy(); entry.chart = null; }
        if (entry.has !== false) mount(entry.body, h("div", { class: "chart-empty" }, spec.none));
        entry.has = false;
        continue;
      }
      const values = spec.series.map(([key]) => data[key]);
      if (entry.chart) entry.chart.update(data.t, values);
      else {
        entry.chart = timeChart({ times: data.t, unit: spec.unit, yMax: spec.yMax,
          series: spec.series.map(([key, label, color, fill, dash]) => ({ label, color, fill, dash, values: data[key] })) });
        mount(entry.body, entry.chart.el);
      }
      entry.has = true;
    }
    chartGrid.dataset.samples = data.samples;
  };

  const renderDevice = () => {
    const d = device;
    const health = d.status === "online" ? (d.models.some((m) => ["failed", "rolled_back"].includes(m.state) || m.error) ? "degraded" : "online") : "offline";
    ctx.setTitle(d.id);
    mount(header,
      h("div", { class: "page-head-main" },
        h("div", { class: "crumbs" }, link("/ui/devices", "Devices"), " / ", d.id),
        h("div", { class: "page-head-title" }, h("h2", { class: "device-title" }, d.id), badge(health),
          h("span", { class: "muted" }, d.status === "online" ? ["online, last heard ", ago(d.last_seen)] : ["offline", d.offline_reason ? ` (${d.offline_reason})` : "", ", last seen ", ago(d.last_seen)]))),
      h("div", { class: "page-actions" }, actionButtons()));

    const caps = d.capabilities || {};
    mount(top,
      card("Identity", kv([
        ["Profile", d.profile || "–"], ["Architecture", d.architecture || caps.architecture || "–"],
        ["Agent", d.agent_version || "–"], ["Session", String(d.session)],
        ["Inference API", d.http_url ? h("code", {}, d.http_url) : "–"],
        ["First seen", fmtTime(d.first_seen)], ["Last seen", fmtTime(d.last_seen)],
      ])),
      card("Capabilities", d.capabilities ? kv([
        ["Providers", (caps.providers || []).map((p) => chip(p.replace("ExecutionProvider", "")))],
        ["CPUs", String(caps.cpu_count)], ["RAM", fmtMb(caps.ram_mb)], ["Disk", fmtMb(caps.disk_mb)],
        ["Uptime", d.telemetry.uptime_s !== undefined ? fmtDuration(d.telemetry.uptime_s) : "–"],
      ]) : empty("No capabilities reported", "The agent sends them with its online status.")),
      card("Tags and groups", h("div", { class: "labels" },
        h("div", {}, h("span", { class: "label-kind" }, "Tags"), d.tags.length ? d.tags.map((t) => chip(t, { class: "chip chip-tag" })) : h("span", { class: "muted" }, "none")),
        h("div", {}, h("span", { class: "label-kind" }, "Groups"), d.groups.length ? d.groups.map((g) => chip(g, { class: "chip chip-group" })) : h("span", { class: "muted" }, "none"))),
      { actions: ctx.admin ? h("button", { class: "btn btn-small", id: "edit-labels", onClick: editLabels }, "Edit") : null }));

    const desired = (d.desired && d.desired.models) || {};
    const names = [...new Set([...d.models.map((m) => m.model), ...Object.keys(desired)])].sort();
    mount(modelsBox, card("Models", names.length ? table([
      { title: "Model", render: (r) => h("strong", {}, r.name) },
      { title: "Running", render: (r) => (r.m ? `${r.m.version}` : h("span", { class: "muted" }, "–")) },
      { title: "State", render: (r) => (r.m ? badge(r.m.state) : badge("pending", "not installed")) },
      { title: "Provider", render: (r) => (r.m && r.m.provider ? r.m.provider.replace("ExecutionProvider", "") : "–") },
      { title: "Previous", render: (r) => (r.m && r.m.previous) || "–" },
      { title: "Desired", render: (r) => (r.want ? h("span", { class: r.m && r.m.version === r.want.version ? "" : "pending-text" },
        r.want.version, r.want.deployment_id ? [" ", link(`/ui/rollouts/${encodeURIComponent(r.want.deployment_id)}`, h("span", { class: "muted small" }, r.want.deployment_id))] : "") : "–") },
      { title: "Problem", className: "wrap", render: (r) => (r.m && r.m.error ? h("span", { class: "text-bad" }, r.m.error) : "") },
    ], names.map((name) => ({ name, m: d.models.find((m) => m.model === name), want: desired[name] })))
      : empty("No models on this device", "A rollout that targets this device installs one.")));

    renderEvents();
    renderCommands();
  };

  const renderEvents = () => {
    const events = device.events.filter((e) => eventFilter === "all" || (eventFilter === "failures" ? FAILURE_KINDS.includes(e.kind) : !FAILURE_KINDS.includes(e.kind)));
    const filter = h("div", { class: "segmented", role: "group", "aria-label": "Event filter" },
      [["all", "All"], ["deploy", "Deployments"], ["failures", "Failures"]].map(([key, label]) =>
        h("button", { class: key === eventFilter ? "active" : "", onClick: () => { eventFilter = key; renderEvents(); } }, label)));
    mount(eventsBox, card("Event log", events.length ? table([
      { title: "When", render: (e) => ago(e.ts) },
      { title: "Event", render: (e) => badge(e.kind) },
      { title: "Model", render: (e) => (e.model ? `${e.model}@${e.version}` : "–") },
      { title: "Deployment", render: (e) => (e.deployment_id ? link(`/ui/rollouts/${encodeURIComponent(e.deployment_id)}`, e.deployment_id) : "–") },
      { title: "Detail", className: "wrap", render: (e) => h("span", { class: "clamp", title: e.detail || "" },
        e.error_code ? h("code", { class: "text-bad" }, e.error_code) : null, e.error_code ? " " : "", e.detail || "") },
    ], events, { className: "events-table" }) : empty("No events", "Every install, activation and rollback the device reports shows here, with its reason."),
    { actions: filter, subtitle: "Every install, activation and rollback, with its reason" }));
  };

  const renderCommands = () => {
    mount(commandsBox, card("Commands", device.commands.length ? table([
      { title: "Sent", render: (c) => ago(c.created_at) },
      { title: "Command", render: (c) => [h("strong", {}, c.command), c.args && Object.keys(c.args).length ? h("span", { class: "muted small" }, " " + JSON.stringify(c.args)) : ""] },
      { title: "State", render: (c) => (c.state === "answered" ? badge(c.ok ? "answered" : "failed", c.ok ? "ok" : "failed") : badge(c.state)) },
      { title: "Answer", className: "wrap", render: (c) => (c.state === "answered" ? (c.ok ? answerText(c) : h("span", { class: "text-bad" }, c.error || "failed")) : c.note || "") },
    ], device.commands) : empty("No commands sent", "Ping, restart the agent or roll a model back with the buttons above.")));
  };

  const answerText = (c) => {
    if (c.command === "ping" && c.result) return `pong · session ${c.result.session} · up ${fmtDuration(c.result.uptime_s)} · ${fmtNum((c.answered_at - (c.sent_at || c.created_at)) * 1000, 0)} ms`;
    return JSON.stringify(c.result || {});
  };

  const command = async (name, args = {}) => {
    try {
      const out = await api(`/api/v1/devices/${encodeURIComponent(id)}/commands`, { method: "POST", json: { command: name, args } });
      toast(`${name} sent to ${id}${out.note ? ` — ${out.note}` : ""}`, "info");
      load();
    } catch (exc) {
      toast(`${name} failed: ${exc.message}${exc.hint ? ` (${exc.hint})` : ""}`, "bad", 8000);
    }
  };

  const actionButtons = () => {
    const disabled = !ctx.admin;
    const title = disabled ? "Admins only" : undefined;
    return [
      h("button", { class: "btn", id: "action-ping", disabled, title, onClick: () => command("ping") }, "Ping"),
      h("button", { class: "btn", id: "action-restart", disabled, title, onClick: async () => {
        const ok = await confirmDialog({ title: `Restart the agent of ${id}?`, text: "Inference stops for a few seconds while the agent restarts.", confirmLabel: "Restart agent" });
        if (ok.ok) command("restart");
      } }, "Restart agent"),
      h("button", { class: "btn btn-danger-outline", id: "action-rollback", disabled: disabled || !device.models.length, title, onClick: rollbackDialog }, "Roll back a model"),
    ];
  };

  const rollbackDialog = () => {
    const model = h("select", { id: "rollback-model" }, device.models.map((m) => h("option", { value: m.model }, `${m.model} (running ${m.version}${m.previous ? `, previous ${m.previous}` : ""})`)));
    const version = h("input", { id: "rollback-version", placeholder: "the previous version" });
    const go = h("button", { class: "btn btn-danger", onClick: () => {
      dialog.close();
      const args = { model: model.value };
      if (version.value.trim()) args.version = version.value.trim();
      command("rollback", args);
    } }, "Roll back");
    const dialog = modal("Roll back a model", h("div", { class: "form-grid" },
      h("label", { class: "field" }, h("span", {}, "Model"), model),
      h("label", { class: "field" }, h("span", {}, "To version"), version,
        h("small", { class: "muted" }, "Empty: the version the device ran before. Its desired state changes too, so it stays there."))), [go]);
  };

  const editLabels = () => {
    const tags = h("input", { id: "labels-tags", value: device.tags.join(", "), placeholder: "e.g. canary, eu-west" });
    const groups = h("input", { id: "labels-groups", value: device.groups.join(", "), placeholder: "e.g. store-42" });
    const error = h("p", { class: "form-error", hidden: true });
    const split = (v) => v.split(/[\s,]+/).map((x) => x.trim()).filter(Boolean);
    const save = h("button", { class: "btn btn-primary", id: "labels-save", onClick: async () => {
      try {
        await api(`/api/v1/devices/${encodeURIComponent(id)}/tags`, { method: "PUT", json: { tags: split(tags.value) } });
        await api(`/api/v1/devices/${encodeURIComponent(id)}/groups`, { method: "PUT", json: { groups: split(groups.value) } });
        dialog.close();
        toast(`Labels of ${id} saved`, "ok");
        load();
      } catch (exc) {
        error.textContent = exc.message + (exc.hint ? ` (${exc.hint})` : "");
        error.hidden = false;
      }
    } }, "Save");
    const dialog = modal(`Tags and groups of ${id}`, h("div", { class: "form-grid" },
      h("label", { class: "field" }, h("span", {}, "Tags"), tags),
      h("label", { class: "field" }, h("span", {}, "Groups"), groups),
      h("small", { class: "muted" }, "Comma-separated. Rollouts target devices by tag or group; a device joining a target gets its rollout."),
      error), [save]);
  };

  (async () => {
    if (!(await load())) return;
    mount(root, header, top, modelsBox,
      h("div", { class: "section-head" }, h("h2", {}, "Over time"), rangeBar), chartGrid,
      h("div", { class: "grid-2 grid-wide-left" }, eventsBox, commandsBox));
    loadSeries();
  })();

  const refreshDevice = throttle(load, 1000);
  const refreshSeries = throttle(loadSeries, 3000);
  ctx.on("device", (d) => {
    if (d.id !== id) return;
    if (d.telemetry) refreshSeries();
    refreshDevice();
  });
  ctx.on("status", (d) => { if (d.id === id) refreshDevice(); });
  ctx.on("hello", () => { if (device) { refreshDevice(); refreshSeries(); } });
  ctx.cleanup(() => {
    alive = false;
    refreshDevice.cancel();
    refreshSeries.cancel();
    for (const c of charts.values()) if (c.chart) c.chart.destroy();
  });
}
