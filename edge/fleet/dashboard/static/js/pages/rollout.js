// One rollout, live: waves, gate, device progress per wave and per device, actions, audit trail.

import { api } from "../api.js";
import { h, link, mount, card, empty, errorBox, loading, badge, ago, kv, table, chip, toast, confirmDialog, fmtInt, fmtNum, fmtDuration, fmtTime, throttle, label } from "../dom.js";
import { ACTIONS, DEVICE_GROUPS, rolloutProgress, waveSteps, targetText, deviceTotal } from "./rollout_parts.js";
import { gateText } from "./overview.js";

const ACTION_TEXT = {
  pause: { label: "Pause", title: "Pause this rollout?", text: "No new devices are told the new version; devices already told keep going." },
  resume: { label: "Resume", title: "Resume this rollout?", text: "Waves continue where they stopped; deadlines move by the time it was paused." },
  abort: { label: "Abort", title: "Abort this rollout?", text: "It stops for good. Devices keep what they have (use Revert to undo).", danger: true },
  rollback: { label: "Revert", title: "Revert every device?", text: "Every device this rollout changed is told the version it ran before.", danger: true },
};
const PAGE = 25;

export default function rolloutPage(ctx, root) {
  const id = ctx.params[0];
  ctx.setTitle(id);
  mount(root, loading());
  let alive = true;
  let r = null;
  let stateFilter = "";
  let after = [null];
  let pageIndex = 0;

  const head = h("div", { class: "page-head" });
  const top = h("div", { class: "grid-2 grid-wide-left" });
  const devicesBox = h("div");
  const trail = h("div");

  const load = async () => {
    try {
      r = await api(`/api/v1/rollouts/${encodeURIComponent(id)}`);
      if (!alive) return false;
      render();
      loadDevices();
      return true;
    } catch (exc) {
      if (alive) mount(root, errorBox(exc, load));
      return false;
    }
  };

  const act = async (action) => {
    const t = ACTION_TEXT[action];
    const answer = await confirmDialog({ title: t.title, text: t.text, confirmLabel: t.label, danger: t.danger, askReason: true });
    if (!answer.ok) return;
    try {
      r = await api(`/api/v1/rollouts/${encodeURIComponent(id)}/${action}`, { method: "POST", json: { reason: answer.reason } });
      toast(`Rollout ${id}: ${t.label.toLowerCase()} done (${r.state})`, "ok");
      render();
      loadDevices();
    } catch (exc) {
      toast(`${t.label} failed: ${exc.message}${exc.hint ? ` (${exc.hint})` : ""}`, "bad", 8000);
    }
  };

  const render = () => {
    ctx.setTitle(`Rollout ${r.id}`);
    const allowed = ACTIONS[r.state] || [];
    const total = Object.values(r.devices).reduce((a, b) => a + b, 0);
    mount(head,
      h("div", { class: "page-head-main" },
        h("div", { class: "crumbs" }, link("/ui/rollouts", "Rollouts"), " / ", r.id),
        h("div", { class: "page-head-title" },
          h("h2", {}, `${r.model}@${r.version}`), h("span", { class: "muted" }, "→ ", targetText(r.target)),
          h("span", { id: "rollout-state" }, badge(r.state))),
        h("p", { class: "muted", id: "rollout-reason" }, r.reason || "")),
      h("div", { class: "page-actions" }, ["pause", "resume", "abort", "rollback"].map((a) =>
        h("button", { class: ["btn", ACTION_TEXT[a].danger ? "btn-danger-outline" : ""], id: `rollout-${a}`,
          disabled: !ctx.admin || !allowed.includes(a), title: !ctx.admin ? "Admins only" : !allowed.includes(a) ? `Not possible while ${r.state}` : undefined,
          onClick: () => act(a) }, ACTION_TEXT[a].label))));

    const waves = r.waves.map((w, i) => ({ wave: i, label: w, counts: r.waves_progress[String(i)] || {} }));
    mount(top,
      card("Progress", [
        h("div", { class: "waves-big" }, waveSteps(r)),
        h("div", { class: "progress-big" }, rolloutProgress(r.devices, { height: 16 })),
        h("p", { class: "muted small" }, `${fmtInt(total)} devices in the target; wave ${r.wave + 1} of ${r.waves.length}`,
          r.state === "soaking" && r.soak_until ? ` · soaking, ${fmtDuration(Math.max(0, r.soak_until - Date.now() / 1000))} left` : ""),
        table([
          { title: "Wave", render: (w) => [h("strong", {}, `${w.wave + 1}`), h("span", { class: "muted" }, ` (${w.label})`)] },
          { title: "Devices", className: "progress-cell", render: (w) => rolloutProgress(w.counts, { legend: false }) },
          { title: "States", className: "wrap", render: (w) => h("span", { class: "badges" }, Object.entries(w.counts).map(([s, n]) => badge(s, `${label(s)} ${n}`))) },
        ], waves.filter((w) => Object.keys(w.counts).length), { className: "waves-table" }),
      ], { subtitle: "Each wave soaks and passes the health gates before the next one starts" }),
      card("Plan and gate", [
        kv([
          ["Waves", r.waves.join(" → ")],
          ["Soak per wave", fmtDuration(r.plan.soak_s)],
          ["Device timeout", fmtDuration(r.plan.device_timeout_s)],
          ["Halt above", `${fmtNum(r.plan.max_failure_ratio * 100, 1)} % failed`],
          ["On a failed gate", r.plan.auto_revert ? "revert everything" : "halt and wait"],
          ["Window", r.plan.maintenance_window ? `${r.plan.maintenance_window} UTC` : "any time"],
          r.plan.activate_after ? ["Activate after", fmtTime(r.plan.activate_after)] : null,
          ["Created", fmtTime(r.created_at)],
          r.finished_at ? ["Finished", fmtTime(r.finished_at)] : null,
        ]),
        h("div", { class: ["gate", r.gate ? (r.gate.passed ? "gate-ok" : "gate-bad") : "gate-none"], id: "rollout-gate" },
          h("strong", {}, gateText(r)),
          r.gate && r.gate.notes && r.gate.notes.length ? h("ul", {}, r.gate.notes.map((n) => h("li", { class: "muted small" }, n))) : null),
      ]));

    mount(trail, h("div", { class: "grid-2 grid-wide-left" },
      card("Audit trail", table([
        { title: "When", render: (t) => h("span", { title: fmtTime(t.ts) }, ago(t.ts)) },
        { title: "Transition", render: (t) => [t.from ? badge(t.from) : "", " → ", badge(t.to)] },
        { title: "Event", render: (t) => h("code", {}, t.event) },
        { title: "Why", className: "wrap", render: (t) => t.reason },
      ], [...r.transitions].reverse())),
      card("Failed and refused devices", [...r.failed, ...r.refused].length ? table([
        { title: "Device", render: (d) => link(`/ui/devices/${encodeURIComponent(d.device_id)}`, d.device_id) },
        { title: "", render: (d) => badge(d.profile !== undefined ? "refused" : "failed") },
        { title: "Why", className: "wrap", render: (d) => d.detail },
      ], [...r.failed, ...r.refused]) : empty("None", "Devices that fail, or for which no variant fits, show here."))));
  };

  const loadDevices = async () => {
    try {
      const data = await api(`/api/v1/rollouts/${encodeURIComponent(id)}/devices`, { query: { state: stateFilter, limit: PAGE + 1, after: after[pageIndex] } });
      if (!alive) return;
      const items = data.items.slice(0, PAGE);
      const more = data.items.length > PAGE;
      const filter = h("select", { id: "rollout-device-state", "aria-label": "Device state", onChange: (e) => { stateFilter = e.target.value; after = [null]; pageIndex = 0; loadDevices(); } },
        h("option", { value: "" }, "All states"),
        DEVICE_GROUPS.flatMap((g) => g.states).map((s) => h("option", { value: s, selected: s === stateFilter }, s.replaceAll("_", " "))));
      const pager = h("div", { class: "pager-buttons" },
        h("button", { class: "btn btn-small", disabled: pageIndex === 0, onClick: () => { pageIndex--; loadDevices(); } }, "←"),
        h("button", { class: "btn btn-small", disabled: !more, onClick: () => { after[pageIndex + 1] = items[items.length - 1].device_id; pageIndex++; loadDevices(); } }, "→"));
      mount(devicesBox, card("Devices", items.length ? table([
        { title: "Device", render: (d) => link(`/ui/devices/${encodeURIComponent(d.device_id)}`, d.device_id) },
        { title: "Wave", render: (d) => (d.wave === null || d.wave === undefined ? "–" : String(d.wave + 1)) },
        { title: "State", render: (d) => badge(d.state) },
        { title: "Profile", render: (d) => d.profile || "–" },
        { title: "Was running", render: (d) => d.previous_version || "–" },
        { title: "Detail", className: "wrap", render: (d) => h("span", { class: "clamp", title: d.detail || "" }, d.detail || "") },
        { title: "Updated", render: (d) => ago(d.updated_at) },
      ], items.map((d) => ({ ...d, __data: { device: d.device_id, state: d.state } })), { className: "rollout-devices" })
        : empty(stateFilter ? `No device is ${stateFilter}` : "No devices yet", stateFilter ? "" : "Devices join when they are in the target and online."),
      { actions: [filter, pager], subtitle: `${deviceTotal(r.devices)} devices` }));
    } catch (exc) {
      if (alive) mount(devicesBox, errorBox(exc, loadDevices));
    }
  };

  (async () => {
    if (await load()) mount(root, head, top, devicesBox, trail);
  })();
  const refresh = throttle(load, 700);
  ctx.on("rollout", (d) => { if (d.id === id) refresh(); });
  ctx.on("hello", refresh);
  const tick = setInterval(() => { if (r && r.state === "soaking") render(); }, 5000);
  ctx.cleanup(() => { alive = false; refresh.cancel(); clearInterval(tick); });
}
