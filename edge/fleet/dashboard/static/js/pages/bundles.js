// Bundles: upload a signed bundle, and every stored one with its signature and use.

import { api, upload } from "../api.js";
import { h, link, mount, card, empty, errorBox, loading, badge, ago, chip, fmtBytes, fmtInt, shortSha, table, toast, throttle } from "../dom.js";

export default function bundlesPage(ctx, root) {
  ctx.setTitle("Bundles");
  let alive = true;
  const list = h("div", { class: "stack-list" }, loading());

  const load = async () => {
    try {
      const data = await api("/dashboard/bundles");
      if (alive) render(data.items);
    } catch (exc) {
      if (alive) mount(list, errorBox(exc, load));
    }
  };

  const render = (items) => {
    if (!items.length) {
      mount(list, card("Stored bundles", empty("No bundles yet",
        "Export a model with `edge export`, then upload the signed .edgebundle here or with `edge fleet publish`.")));
      return;
    }
    const groups = new Map();
    for (const b of items) {
      const key = `${b.name}@${b.version}`;
      if (!groups.has(key)) groups.set(key, []);
      groups.get(key).push(b);
    }
    mount(list, [...groups].map(([key, variants]) => card(key, table([
      { title: "Profile", render: (b) => link(`/ui/bundles/${b.sha256}`, h("strong", {}, b.profile)) },
      { title: "Precision", render: (b) => b.precision },
      { title: "Task", render: (b) => b.task },
      { title: "Size", className: "num", render: (b) => fmtBytes(b.size) },
      { title: "Signature", render: (b) => h("span", { title: `key ${b.key_id}` },
        badge(b.key_trusted_now ? "passed" : "degraded", b.key_trusted_now ? "verified" : "key no longer trusted"), " ", h("code", { class: "small" }, b.key_id.slice(0, 12))) },
      { title: "Devices", className: "num", render: (b) => `${fmtInt(b.usage.running)} running / ${fmtInt(b.usage.desired)} told` },
      { title: "SHA-256", render: (b) => h("code", { class: "small", title: b.sha256 }, shortSha(b.sha256)) },
      { title: "Uploaded", render: (b) => ago(b.uploaded_at) },
    ], variants), {
      subtitle: `${variants.length} variant${variants.length === 1 ? "" : "s"}: ${variants.map((v) => v.profile).join(", ")}`,
      actions: ctx.admin ? link(`/ui/rollouts/new?model=${encodeURIComponent(variants[0].name)}&version=${encodeURIComponent(variants[0].version)}`,
        h("span", { class: "btn btn-small" }, "Roll out")) : null,
    })));
  };

  mount(root, ctx.admin ? uploadCard(load) : null, list);
  const refresh = throttle(load, 2000);
  ctx.on("bundles", refresh);
  ctx.on("rollout", refresh);
  ctx.cleanup(() => { alive = false; refresh.cancel(); });
  load();
}

function uploadCard(onDone) {
  const file = h("input", { type: "file", id: "bundle-file", accept: ".edgebundle,application/x-tar" });
  const bar = h("progress", { max: 1, value: 0, hidden: true });
  const result = h("div", { class: "upload-result", role: "status" });
  const button = h("button", { class: "btn btn-primary", id: "bundle-upload", disabled: true }, "Upload");
  file.addEventListener("change", () => { button.disabled = !file.files.length; mount(result); });
  button.addEventListener("click", async () => {
    const f = file.files[0];
    if (!f) return;
    button.disabled = true;
    bar.hidden = false;
    bar.value = 0;
    mount(result, h("span", { class: "muted" }, `Uploading ${f.name}…`));
    try {
      const out = await upload("/api/v1/bundles", f, (p) => { bar.value = p; });
      mount(result, h("div", { class: "notice notice-ok" },
        out.new ? "Stored " : "Already stored: ", link(`/ui/bundles/${out.sha256}`, `${out.name}@${out.version} for ${out.profile}`),
        ` (${fmtBytes(out.size)}), signature verified with key ${out.key_id.slice(0, 12)}.`));
      toast(`Bundle ${out.name}@${out.version} (${out.profile}) stored`, "ok");
      file.value = "";
      onDone();
    } catch (exc) {
      mount(result, errorBox(exc, null, "Upload refused"));
      button.disabled = false;
    } finally {
      bar.hidden = true;
    }
  });
  return card("Upload a bundle", h("div", { class: "upload" }, file, button, bar, result),
    { subtitle: "The controller verifies its signature with its trusted keys and every payload byte before storing it." });
}
