// One bundle: manifest, signature, the exporter's fidelity and latency, and who runs it.

import { api } from "../api.js";
import { h, link, mount, card, empty, errorBox, loading, badge, ago, chip, kv, table, fmtBytes, fmtInt, fmtNum, fmtTime } from "../dom.js";
import { COLORS, barList } from "../charts.js";

export default function bundlePage(ctx, root) {
  const sha = ctx.params[0];
  ctx.setTitle("Bundle");
  mount(root, loading());
  let alive = true;

  const load = async () => {
    try {
      const b = await api(`/dashboard/bundles/${sha}`);
      if (alive) render(b);
    } catch (exc) {
      if (alive) mount(root, errorBox(exc, load));
    }
  };

  const render = (b) => {
    ctx.setTitle(`${b.name}@${b.version}`);
    const fid = b.fidelity || {};
    const metrics = Object.entries(fid.metrics || {});
    const latency = Object.entries(b.latency_ms || {});
    mount(root,
      h("div", { class: "page-head" },
        h("div", { class: "page-head-main" },
          h("div", { class: "crumbs" }, link("/ui/bundles", "Bundles"), " / ", `${b.name}@${b.version}`),
          h("div", { class: "page-head-title" }, h("h2", {}, `${b.name}@${b.version}`), chip(b.profile), badge(fid.passed ? "passed" : "failed", fid.passed ? "fidelity passed" : "fidelity failed")),
          h("code", { class: "muted small" }, b.sha256)),
        h("div", { class: "page-actions" },
          h("a", { class: "btn", href: `/api/v1/bundles/${b.sha256}/download`, download: "" }, "Download"),
          h("a", { class: "btn", href: `/api/v1/bundles/${b.sha256}/manifest`, target: "_blank", rel: "noopener" }, "Raw manifest"),
          ctx.admin ? link(`/ui/rollouts/new?model=${encodeURIComponent(b.name)}&version=${encodeURIComponent(b.version)}`, h("span", { class: "btn btn-primary" }, "Roll out this version")) : null)),
      h("div", { class: "grid-3" },
        card("Signature", kv([
          ["Status", b.signature.key_trusted_now ? badge("passed", "verified") : badge("degraded", "key no longer trusted")],
          ["Signed by key", h("code", {}, b.signature.key_id)],
          ["Checked", "signature and every payload byte, on upload"],
          ["Created", fmtTime(Date.parse(b.created_at) / 1000)],
          ["Expires", b.expires_at ? fmtTime(Date.parse(b.expires_at) / 1000) : "never"],
        ])),
        card("Build", kv([
          ["Task", b.task], ["Precision", b.precision], ["Architecture", b.architecture],
          ["Providers", b.required_providers.map((p) => chip(p.replace("ExecutionProvider", "")))],
          ["Min RAM", b.min_ram_mb !== null && b.min_ram_mb !== undefined ? `${fmtInt(b.min_ram_mb)} MB` : "–"],
          ["Size", fmtBytes(b.size)],
          ["Source", b.provenance ? h("span", { class: "wrap" }, b.provenance.source) : "–"],
          ["Exporter", b.provenance ? b.provenance.exporter_version : "–"],
        ])),
        card("Devices", kv([
          ["Told this bundle", fmtInt(b.devices.desired)], ["Running it", fmtInt(b.devices.running)],
          ["Uploaded", ago(b.uploaded_at)],
        ]), { actions: link(`/ui/devices?model=${encodeURIComponent(b.name)}&version=${encodeURIComponent(b.version)}`, "All devices on this version →") })),
      h("div", { class: "grid-2" },
        card("Fidelity", metrics.length ? [
          barList(metrics.map(([k, v]) => ({ label: k, value: v, threshold: (fid.thresholds || {})[k], color: fid.passed ? COLORS.green : COLORS.red }))),
          h("p", { class: "muted small" }, `Measured by the exporter on ${fmtInt(fid.samples)} sample${fid.samples === 1 ? "" : "s"} against the source model; the mark is the threshold.`),
          (fid.attempts || []).length ? h("details", {}, h("summary", {}, `${fid.attempts.length} attempt(s) before this one`),
            h("pre", { class: "code" }, JSON.stringify(fid.attempts, null, 2))) : null,
        ] : empty("No fidelity figures", "The manifest carries none.")),
        card("Latency (exporter)", latency.length ? barList(latency.map(([k, v]) => ({ label: k, value: v, color: COLORS.blue })), { unit: "ms" })
          : empty("No latency measured", "The exporter adds latency figures when it benchmarks the model on the build machine."))),
      h("div", { class: "grid-2" },
        card("Inputs and outputs", table([
          { title: "", render: (t) => t.io },
          { title: "Name", render: (t) => h("code", {}, t.name) },
          { title: "Type", render: (t) => t.dtype },
          { title: "Shape", render: (t) => `[${t.shape.join(", ")}]` },
        ], [...b.inputs.map((t) => ({ ...t, io: "in" })), ...b.outputs.map((t) => ({ ...t, io: "out" }))])),
        card("Files", table([
          { title: "Path", render: (f) => h("code", {}, f.path) },
          { title: "Role", render: (f) => f.role },
          { title: "Size", className: "num", render: (f) => fmtBytes(f.size) },
        ], b.files))),
      h("div", { class: "grid-2" },
        card("Devices running it", b.devices.items.length ? table([
          { title: "Device", render: (d) => link(`/ui/devices/${encodeURIComponent(d.id)}`, d.id) },
          { title: "Status", render: (d) => badge(d.online ? "online" : "offline") },
          { title: "Profile", render: (d) => d.profile },
          { title: "State", render: (d) => badge(d.state) },
        ], b.devices.items) : empty("No device runs it yet", "Start a rollout of this version.")),
        card("Rollouts of this version", b.rollouts.length ? table([
          { title: "Rollout", render: (r) => link(`/ui/rollouts/${r.id}`, r.id) },
          { title: "Target", render: (r) => (r.target_kind === "all" ? "all devices" : `${r.target_kind} ${r.target_value}`) },
          { title: "State", render: (r) => badge(r.state) },
          { title: "Created", render: (r) => ago(r.created_at) },
        ], b.rollouts) : empty("Never rolled out", ""))));
  };

  ctx.cleanup(() => { alive = false; });
  load();
}
