// Rollouts: the ones in flight (live), then the history.

import { api } from "../api.js";
import { h, link, mount, card, empty, errorBox, loading, badge, ago, table, throttle } from "../dom.js";
import { FINAL_STATES, rolloutProgress, waveSteps, targetText, deviceTotal } from "./rollout_parts.js";

export default function rolloutsPage(ctx, root) {
  ctx.setTitle("Rollouts");
  let alive = true;
  const body = h("div", {}, loading());

  const load = async () => {
    try {
      const data = await api("/api/v1/rollouts", { query: { limit: 200 } });
      if (alive) render(data.items);
    } catch (exc) {
      if (alive) mount(body, errorBox(exc, load));
    }
  };

  const render = (items) => {
    const active = items.filter((r) => !FINAL_STATES.includes(r.state));
    const done = items.filter((r) => FINAL_STATES.includes(r.state));
    const columns = [
      { title: "Rollout", render: (r) => link(`/ui/rollouts/${r.id}`, h("strong", {}, r.id)) },
      { title: "Version", render: (r) => `${r.model}@${r.version}` },
      { title: "Target", render: (r) => targetText(r.target) },
      { title: "State", render: (r) => badge(r.state) },
      { title: "Waves", render: (r) => waveSteps(r) },
      { title: "Devices", className: "progress-cell", render: (r) => [rolloutProgress(r.devices, { legend: false }), h("span", { class: "muted small" }, `${deviceTotal(r.devices)} devices`)] },
      { title: "Started", render: (r) => ago(r.created_at) },
    ];
    mount(body,
      card("In flight", active.length ? table(columns, active.map((r) => ({ ...r, __data: { rollout: r.id, state: r.state } })))
        : empty("No rollout in flight", ctx.admin ? "Start one to ship a model version to your devices." : "",
          ctx.admin ? link("/ui/rollouts/new", h("span", { class: "btn btn-primary" }, "New rollout")) : null)),
      card("History", done.length ? table(columns, done.map((r) => ({ ...r, __data: { rollout: r.id, state: r.state } })))
        : empty("No finished rollouts yet", "")));
  };

  mount(root, h("div", { class: "page-head" }, h("div", { class: "page-head-main" },
    h("p", { class: "muted" }, "Ship a model version in waves; each wave soaks and passes health gates before the next.")),
  h("div", { class: "page-actions" }, ctx.admin ? link("/ui/rollouts/new", h("span", { class: "btn btn-primary", id: "new-rollout" }, "New rollout")) : null)), body);
  const refresh = throttle(load, 1000);
  ctx.on("rollout", refresh);
  ctx.cleanup(() => { alive = false; refresh.cancel(); });
  load();
}
