// Create a rollout: version, target, waves, soak, gates, maintenance window.

import { api } from "../api.js";
import { h, link, mount, card, empty, errorBox, loading, chip, fmtInt, debounce } from "../dom.js";

const WAVE_RE = /^(?:([1-9]\d{0,6})|(100|[1-9]\d?(?:\.\d+)?|0\.\d*[1-9]\d*)%)$/; // edge/fleet/plan.py WAVE_PATTERN
const UNITS = [["s", 1], ["min", 60], ["h", 3600]];

function durationInput(id, seconds) {
  const [unit, factor] = seconds % 3600 === 0 && seconds >= 3600 ? UNITS[2] : seconds % 60 === 0 && seconds >= 60 ? UNITS[1] : UNITS[0];
  const value = h("input", { id, type: "number", min: 0, step: "any", value: seconds / factor, required: true });
  const select = h("select", { id: `${id}-unit`, "aria-label": "unit" }, UNITS.map(([u]) => h("option", { value: u, selected: u === unit }, u)));
  return { el: h("div", { class: "input-group" }, value, select),
    seconds: () => Number(value.value) * UNITS.find(([u]) => u === select.value)[1], value, select };
}

function field(label, input, help) {
  return h("label", { class: "field" }, h("span", {}, label), input, help ? h("small", { class: "muted" }, help) : null);
}

export function waveSizes(waves, total) {
  return waves.map((w) => {
    const m = w.match(WAVE_RE);
    if (!m) return null;
    return m[1] ? Math.min(Number(m[1]), total) : Math.min(total, Math.ceil((Number(m[2]) / 100) * total - 1e-9));
  });
}

export default function rolloutNewPage(ctx, root) {
  ctx.setTitle("New rollout");
  if (!ctx.admin) {
    mount(root, errorBox({ status: 403, message: "Only admins start rollouts.", hint: "Log in with an admin account or token." }));
    return;
  }
  mount(root, loading());
  let alive = true;
  ctx.cleanup(() => { alive = false; });

  Promise.all([api("/api/v1/bundles"), api("/dashboard/facets")]).then(([bundles, facets]) => {
    if (alive) render(bundles.items, facets);
  }).catch((exc) => alive && mount(root, errorBox(exc)));

  const render = (bundles, facets) => {
    if (!bundles.length) {
      mount(root, card("New rollout", empty("No bundle to roll out", "Upload a signed bundle first.",
        link("/ui/bundles", h("span", { class: "btn btn-primary" }, "Go to Bundles")))));
      return;
    }
    const versions = new Map();
    for (const b of bundles) {
      const key = `${b.name}@${b.version}`;
      if (!versions.has(key)) versions.set(key, []);
      versions.get(key).push(b.profile);
    }
    const wanted = ctx.query.get("model") ? `${ctx.query.get("model")}@${ctx.query.get("version")}` : null;
    const version = h("select", { id: "rollout-version", required: true },
      [...versions].map(([key, profiles]) => h("option", { value: key, selected: key === wanted }, `${key}  (${profiles.join(", ")})`)));
    const kind = h("select", { id: "target-kind" },
      [["all", "All devices"], ["tag", "Devices with tag"], ["group", "Devices in group"], ["profile", "Devices of profile"]].map(([v, t]) => h("option", { value: v }, t)));
    const valueList = h("datalist", { id: "target-values" });
    const value = h("input", { id: "target-value", list: "target-values", placeholder: "value", disabled: true });
    const waves = h("input", { id: "rollout-waves", value: "1, 10%, 50%, 100%", required: true });
    const wavePreview = h("div", { class: "wave-preview", id: "wave-preview" });
    const soak = durationInput("rollout-soak", 600);
    const timeout = durationInput("rollout-timeout", 1800);
    const ratio = h("input", { id: "rollout-ratio", type: "number", min: 0, max: 100, step: "any", value: 10 });
    const minFinished = h("input", { id: "rollout-min-finished", type: "number", min: 1, step: 1, value: 1 });
    const autoRevert = h("input", { id: "rollout-auto-revert", type: "checkbox", checked: true });
    const requireTraffic = h("input", { id: "rollout-require-traffic", type: "checkbox" });
    const useWindow = h("input", { id: "rollout-use-window", type: "checkbox" });
    const winFrom = h("input", { id: "rollout-window-from", type: "time", value: "02:00", disabled: true });
    const winTo = h("input", { id: "rollout-window-to", type: "time", value: "05:00", disabled: true });
    const activateAfter = h("input", { id: "rollout-activate-after", type: "datetime-local" });
    const gate = (id, v, step = "any") => h("input", { id, type: "number", min: 0, step, value: v });
    const gates = {
      max_error_rate: gate("gate-max-error-rate", 5), max_error_rate_increase: gate("gate-error-increase", 2),
      max_latency_increase: gate("gate-latency-increase", 25), max_tokens_per_s_drop: gate("gate-tps-drop", 15),
      min_requests: gate("gate-min-requests", 20, 1),
    };
    const error = h("div", { class: "form-error", role: "alert", hidden: true, id: "rollout-error" });
    const submit = h("button", { class: "btn btn-primary", type: "submit", id: "rollout-submit" }, "Start rollout");

    const targetQuery = () => (kind.value === "all" ? {} : { [kind.value]: value.value.trim() });
    const updatePreview = debounce(async () => {
      const list = waves.value.split(",").map((w) => w.trim()).filter(Boolean);
      const bad = list.filter((w) => !WAVE_RE.test(w));
      if (bad.length) {
        mount(wavePreview, h("span", { class: "text-bad" }, `Not a wave: ${bad.join(", ")} (use a count like 5 or a share like 10%)`));
        return;
      }
      if (list[list.length - 1] !== "100%") list.push("100%");
      let total = null;
      if (kind.value === "all" || value.value.trim()) {
        try { total = (await api("/api/v1/devices", { query: { ...targetQuery(), limit: 1 } })).total; } catch { total = null; }
      }
      const sizes = total === null ? list.map(() => null) : waveSizes(list, total);
      mount(wavePreview, list.map((w, i) => chip(sizes[i] === null ? w : `${w} → ${fmtInt(sizes[i])}`)),
        total === null ? "" : h("span", { class: "muted small" }, ` of ${fmtInt(total)} devices in the target today; devices joining later get it too.`));
    }, 300);

    kind.addEventListener("change", () => {
      value.disabled = kind.value === "all";
      const options = { tag: facets.tags, group: facets.groups, profile: facets.profiles }[kind.value] || [];
      mount(valueList, options.map((v) => h("option", { value: v })));
      value.value = "";
      value.required = kind.value !== "all";
      updatePreview();
    });
    value.addEventListener("input", updatePreview);
    waves.addEventListener("input", updatePreview);
    useWindow.addEventListener("change", () => { winFrom.disabled = winTo.disabled = !useWindow.checked; });

    const form = h("form", { class: "rollout-form", onSubmit: async (e) => {
      e.preventDefault();
      error.hidden = true;
      const [model, ver] = version.value.split("@");
      const plan = {
        waves: waves.value.split(",").map((w) => w.trim()).filter(Boolean),
        soak_s: soak.seconds(), device_timeout_s: timeout.seconds(),
        max_failure_ratio: Number(ratio.value) / 100, min_finished_for_ratio: Number(minFinished.value),
        auto_revert: autoRevert.checked, require_traffic: requireTraffic.checked,
        gates: {
          max_error_rate: Number(gates.max_error_rate.value) / 100, max_error_rate_increase: Number(gates.max_error_rate_increase.value) / 100,
          max_latency_increase: Number(gates.max_latency_increase.value) / 100, max_tokens_per_s_drop: Number(gates.max_tokens_per_s_drop.value) / 100,
          min_requests: Number(gates.min_requests.value),
        },
      };
      if (useWindow.checked) plan.maintenance_window = `${winFrom.value}-${winTo.value}`;
      if (activateAfter.value) plan.activate_after = new Date(activateAfter.value).getTime() / 1000;
      const target = kind.value === "all" ? { kind: "all" } : { kind: kind.value, value: value.value.trim() };
      submit.disabled = true;
      try {
        const r = await api("/api/v1/rollouts", { method: "POST", json: { model, version: ver, target, plan } });
        ctx.navigate(`/ui/rollouts/${r.id}`);
      } catch (exc) {
        error.textContent = exc.message + (exc.hint ? ` — ${exc.hint}` : "");
        error.hidden = false;
        submit.disabled = false;
      }
    } },
    h("div", { class: "grid-2" },
      card("What and where", h("div", { class: "form-grid" },
        field("Version", version, "Variants per profile are picked per device; devices of other profiles take a portable one or are refused."),
        field("Target", h("div", { class: "input-group" }, kind, value, valueList)),
        field("Waves", waves, "Cumulative: a device count or a share of the target. The last wave is always 100%."),
        wavePreview)),
      card("Pace and safety", h("div", { class: "form-grid" },
        field("Soak per wave", soak.el, "How long each wave is watched before the next starts."),
        field("Device timeout", timeout.el, "A device not done by then counts as failed."),
        field("Halt above this failure share (%)", ratio),
        field("Judge the share after this many finished", minFinished),
        h("label", { class: "check" }, autoRevert, " Revert the whole rollout when a gate fails (else halt and wait)"),
        h("label", { class: "check" }, requireTraffic, " Hold each soak until the gates saw enough requests")))),
    h("div", { class: "grid-2" },
      card("Health gates", h("div", { class: "form-grid form-grid-2" },
        field("Max error rate (%)", gates.max_error_rate),
        field("Max error-rate increase (points)", gates.max_error_rate_increase),
        field("Max p95 latency increase (%)", gates.max_latency_increase),
        field("Max tokens/s drop (%)", gates.max_tokens_per_s_drop),
        field("Min requests to judge", gates.min_requests)), { subtitle: "The new version against the one each device ran before" }),
      card("When to switch", h("div", { class: "form-grid" },
        h("label", { class: "check" }, useWindow, " Activate only inside a maintenance window (UTC)"),
        h("div", { class: "input-group" }, winFrom, h("span", { class: "muted" }, "to"), winTo),
        field("Activate after (your local time)", activateAfter, "Devices download at once and switch from then on. Empty: as soon as installed.")))),
    error,
    h("div", { class: "form-actions" }, link("/ui/rollouts", h("span", { class: "btn" }, "Cancel")), submit));

    mount(root, form);
    updatePreview();
  };
}
