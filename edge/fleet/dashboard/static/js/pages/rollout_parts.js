// Pieces of rollout views shared by the overview, the list and the detail page.

import { h, fmtInt, fmtDuration } from "../dom.js";
import { COLORS, stackedBar } from "../charts.js";

// Device states of a rollout, grouped as people read progress (edge/fleet/states.py DeviceState).
export const DEVICE_GROUPS = [
  { label: "Committed", states: ["committed"], color: COLORS.green },
  { label: "In progress", states: ["notified", "downloading", "downloaded", "activated"], color: COLORS.blue },
  { label: "Queued", states: ["queued"], color: "#cbd2dc" },
  { label: "Failed", states: ["failed"], color: COLORS.red },
  { label: "Reverted", states: ["reverted"], color: COLORS.violet },
  { label: "Skipped / refused", states: ["skipped", "refused"], color: "#e4e7ec" },
];

// Which user actions each rollout state allows (edge/fleet/states.py TRANSITIONS).
export const ACTIONS = {
  pending: ["pause", "abort", "rollback"],
  deploying: ["pause", "abort", "rollback"],
  soaking: ["pause", "abort", "rollback"],
  paused: ["resume", "abort", "rollback"],
  halted: ["abort", "rollback"],
  completed: ["rollback"],
  aborted: ["rollback"],
  reverting: [],
  reverted: [],
};

export function rolloutProgress(counts, opts = {}) {
  return stackedBar(DEVICE_GROUPS.map((g) => ({
    label: g.label, color: g.color, value: g.states.reduce((a, st) => a + (counts[st] || 0), 0),
  })), { height: 10, ...opts });
}

/** The waves as steps: done, current (with its phase), to come. */
export function waveSteps(r) {
  const waves = r.waves || (r.plan && r.plan.waves) || [];
  const finished = ["completed"].includes(r.state);
  return h("ol", { class: "waves", "aria-label": "Waves" }, waves.map((w, i) => {
    let state = "todo";
    if (finished || i < r.wave) state = "done";
    else if (i === r.wave) state = r.state === "soaking" ? "soaking" : ["deploying", "pending"].includes(r.state) ? "current" : r.state;
    const soakLeft = state === "soaking" && r.soak_until ? Math.max(0, r.soak_until - Date.now() / 1000) : null;
    return h("li", { class: `wave wave-${state}`, "data-wave": i, title: `wave ${i + 1}: ${w}` },
      h("span", { class: "wave-num" }, state === "done" ? "✓" : String(i + 1)),
      h("span", { class: "wave-label" }, w),
      soakLeft !== null ? h("span", { class: "wave-note" }, `soak ${fmtDuration(soakLeft)}`) : null);
  }));
}

export function targetText(t) {
  return t.kind === "all" ? "all devices" : `${t.kind} ${t.value}`;
}

export function deviceTotal(counts) {
  return fmtInt(Object.values(counts || {}).reduce((a, b) => a + b, 0));
}

export const FINAL_STATES = ["completed", "aborted", "reverted"];
