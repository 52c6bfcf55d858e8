// Overview: device health, which model versions run where, rollouts in flight, recent failures.

import { api } from "../api.js";
import { h, link, mount, card, empty, errorBox, loading, badge, ago, fmtInt, throttle, table, chip } from "../dom.js";
import { COLORS, donut, stackedBar, paletteColor, toneColor } from "../charts.js";
import { rolloutProgress, waveSteps } from "./rollout_parts.js";

export default function overviewPage(ctx, root) {
  ctx.setTitle("Overview");
  mount(root, loading());
  let alive = true;

  const render = (data) => {
    const d = data.devices;
    const healthParts = [
      { label: "Online", value: d.online, color: COLORS.green, always: true },
      { label: "Degraded", value: d.degraded, color: COLORS.amber, always: true },
      { label: "Offline", value: d.offline, color: COLORS.gray, always: true },
    ];
    const kpi = (label, value, state, href, note) => h("a", { class: `kpi kpi-${state}`, href, "data-link": "", "data-kpi": state },
      h("span", { class: "kpi-label" }, label), h("span", { class: "kpi-value" }, fmtInt(value)),
      note ? h("span", { class: "kpi-note" }, note) : null,
      h("span", { class: "kpi-bar" }, stackedBar(state === "total" ? healthParts
        : [{ label, value, color: healthParts.find((p) => p.label.toLowerCase() === state).color }], { legend: false, total: d.total, height: 6 })));
    const share = (n) => (d.total ? `${Math.round((100 * n) / d.total)}% of the fleet` : "");

    const health = h("div", { class: "overview-top" },
      h("div", { class: "kpis" },
        kpi("Devices", d.total, "total", "/ui/devices", `${data.profiles.length} profile${data.profiles.length === 1 ? "" : "s"}`),
        kpi("Online", d.online, "online", "/ui/devices?status=online", share(d.online)),
        kpi("Degraded", d.degraded, "degraded", "/ui/devices?status=online", d.degraded ? "failed model or silent" : "none"),
        kpi("Offline", d.offline, "offline", "/ui/devices?status=offline", share(d.offline))),
      card("Fleet health", h("div", { class: "health-card" },
        donut(healthParts, { label: fmtInt(d.total), sublabel: "devices", size: 132 }),
        h("div", { class: "health-legend" }, stackedBar(healthParts, { height: 10 }),
          h("p", { class: "muted small" }, `Degraded: online, but a model failed or rolled back, or silent for over ${Math.round(data.silent_s / 60)} min.`)))));

    mount(root, health,
      h("div", { class: "grid-2" }, versionsCard(data), rolloutsCard(data, ctx)),
      h("div", { class: "grid-2" }, failuresCard(data), profilesCard(data)));
  };

  const load = async () => {
    try {
      const data = await api("/dashboard/overview");
      if (alive) render(data);
    } catch (exc) {
      if (alive) mount(root, errorBox(exc, load));
    }
  };
  const refresh = throttle(load, 1500);
  for (const name of ["stats", "status", "resync", "rollout", "failure"]) ctx.on(name, refresh);
  ctx.cleanup(() => { alive = false; refresh.cancel(); });
  load();
}

function versionsCard(data) {
  if (!data.versions.length) {
    return card("Model versions", empty("No models running yet",
      "Devices report what they run once a rollout reaches them.", link("/ui/rollouts/new", "Start a rollout")));
  }
  const byModel = new Map();
  for (const v of data.versions) {
    if (!byModel.has(v.model)) byModel.set(v.model, []);
    byModel.get(v.model).push(v);
  }
  const blocks = [];
  for (const [model, rows] of byModel) {
    const versions = [...new Set(rows.map((r) => r.version))];
    const color = (v) => paletteColor(versions.indexOf(v));
    const profiles = [...new Set(rows.map((r) => r.profile))];
    const total = rows.reduce((a, r) => a + r.devices, 0);
    blocks.push(h("div", { class: "model-block", "data-model": model },
      h("div", { class: "model-head" }, h("strong", {}, model), h("span", { class: "muted" }, `${fmtInt(total)} devices`)),
      stackedBar(versions.map((v) => ({ label: v, color: color(v), value: rows.filter((r) => r.version === v).reduce((a, r) => a + r.devices, 0) })), { height: 12 }),
      h("div", { class: "profile-rows" }, profiles.map((p) => {
        const parts = versions.map((v) => ({ label: v, color: color(v),
          value: rows.filter((r) => r.profile === p && r.version === v).reduce((a, r) => a + r.devices, 0) }));
        return h("div", { class: "profile-row" },
          h("span", { class: "profile-name" }, p || "(no profile)"),
          stackedBar(parts, { height: 8, legend: false }),
          h("span", { class: "profile-count" }, parts.filter((x) => x.value).map((x) =>
            link(`/ui/devices?model=${encodeURIComponent(model)}&version=${encodeURIComponent(x.label)}&profile=${encodeURIComponent(p)}`,
              chip(`${x.label} × ${fmtInt(x.value)}`)))));
      }))));
  }
  return card("Model versions", blocks, { subtitle: "Active versions per device profile" });
}

function rolloutsCard(data, ctx) {
  const rows = data.rollouts;
  const actions = ctx.admin ? link("/ui/rollouts/new", h("span", { class: "btn btn-small" }, "New rollout")) : null;
  if (!rows.length) {
    return card("Rollouts", empty("No rollout in flight", "Rollouts in progress, and those finished in the last hour, show here.", null), { actions });
  }
  return card("Rollouts", h("div", { class: "rollout-list" }, rows.map((r) =>
    h("a", { class: "rollout-item", href: `/ui/rollouts/${r.id}`, "data-link": "", "data-rollout": r.id },
      h("div", { class: "rollout-item-head" },
        h("strong", {}, `${r.model}@${r.version}`),
        h("span", { class: "muted" }, r.target.kind === "all" ? "all devices" : `${r.target.kind} ${r.target.value}`),
        badge(r.state)),
      waveSteps(r),
      rolloutProgress(r.devices),
      h("div", { class: "rollout-item-foot muted small" }, gateText(r), " · ", r.reason || "")))),
  { actions, subtitle: "In flight, and finished in the last hour" });
}

export function gateText(r) {
  if (!r.gate) return r.state === "soaking" ? "gate: judging" : "gate: not judged yet";
  if (r.gate.passed) return r.gate.judged === false ? "gate: passed (too little traffic to judge)" : "gate: passed";
  return `gate: failed (${(r.gate.failures || []).join("; ")})`;
}

function failuresCard(data) {
  const body = [];
  if (!data.failures.length && !data.went_offline.length) {
    return card("Recent failures", empty("Nothing failed lately", "Failed installs, health checks and rollbacks show here."));
  }
  if (data.failures.length) {
    body.push(table([
      { title: "Device", render: (f) => link(`/ui/devices/${encodeURIComponent(f.device_id)}`, f.device_id) },
      { title: "What", render: (f) => badge(f.kind) },
      { title: "Model", render: (f) => (f.model ? `${f.model}@${f.version}` : "–") },
      { title: "Detail", className: "wrap", render: (f) => h("span", { title: f.detail }, f.error_code ? `${f.error_code}: ` : "", f.detail || "") },
      { title: "When", render: (f) => ago(f.ts) },
    ], data.failures));
  }
  if (data.went_offline.length) {
    body.push(h("h3", { class: "subhead" }, "Recently offline"),
      h("ul", { class: "plain-list" }, data.went_offline.map((d) => h("li", {},
        link(`/ui/devices/${encodeURIComponent(d.id)}`, d.id), " ",
        h("span", { class: "muted" }, `${d.offline_reason || "offline"} · last seen `), ago(d.last_seen)))));
  }
  return card("Recent failures", body);
}

function profilesCard(data) {
  if (!data.profiles.length) {
    return card("Devices per profile", empty("No devices yet",
      "Devices appear here as soon as their agent connects to the broker."));
  }
  const max = Math.max(...data.profiles.map((p) => p.total));
  return card("Devices per profile", h("div", { class: "barlist" }, data.profiles.map((p) =>
    h("div", { class: "barlist-row" },
      h("span", { class: "barlist-label" }, link(`/ui/devices?profile=${encodeURIComponent(p.profile)}`, p.profile || "(none)")),
      h("span", { class: "barlist-track" },
        h("span", { class: "barlist-fill", style: { width: `${(100 * p.online) / max}%`, background: toneColor("online") } }),
        h("span", { class: "barlist-fill", style: { width: `${(100 * (p.total - p.online)) / max}%`, background: toneColor("offline") } })),
      h("span", { class: "barlist-value" }, `${fmtInt(p.online)} / ${fmtInt(p.total)} online`)))));
}
