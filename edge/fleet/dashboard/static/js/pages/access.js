// Access: this session, users with passwords, and API tokens (admins manage both).

import { api } from "../api.js";
import { h, mount, card, empty, errorBox, loading, badge, ago, kv, table, toast, modal, confirmDialog, fmtTime } from "../dom.js";

export default function accessPage(ctx, root) {
  ctx.setTitle("Access");
  const s = ctx.session;
  const mine = card("This session", kv([
    ["Logged in as", s.name], ["Role", badge(s.role === "admin" ? "admin" : "read", s.role === "admin" ? "admin" : "read-only")],
    ["With", s.kind === "token" ? "an API token" : "a password"],
    ["Expires", `${fmtTime(s.expires_at)} (or after ${Math.round(s.idle_s / 60)} min without activity)`],
  ]));
  if (!ctx.admin) {
    mount(root, mine, card("Users and tokens", empty("Only admins manage access", "Ask an admin for an account or a token.")));
    return;
  }
  const usersBox = h("div", {}, loading());
  const tokensBox = h("div", {}, loading());
  let alive = true;
  ctx.cleanup(() => { alive = false; });

  const loadUsers = async () => {
    try {
      const data = await api("/dashboard/users");
      if (!alive) return;
      mount(usersBox, card("Users", [
        data.items.length ? table([
          { title: "Name", render: (u) => h("strong", {}, u.name) },
          { title: "Role", render: (u) => badge(u.role, u.role === "admin" ? "admin" : "read-only") },
          { title: "Added", render: (u) => [ago(u.created_at), u.created_by ? h("span", { class: "muted small" }, ` by ${u.created_by}`) : ""] },
          { title: "", className: "actions", render: (u) => [
            h("button", { class: "btn btn-small", onClick: () => passwordDialog(u.name) }, "Set password"),
            h("button", { class: "btn btn-small btn-danger-outline", onClick: async () => {
              const ok = await confirmDialog({ title: `Delete user ${u.name}?`, text: "Their sessions end at once.", confirmLabel: "Delete", danger: true });
              if (!ok.ok) return;
              try { await api(`/dashboard/users/${encodeURIComponent(u.name)}`, { method: "DELETE" }); loadUsers(); } catch (exc) { toast(exc.message, "bad"); }
            } }, "Delete")] },
        ], data.items) : empty("No users yet", "Until you add one, log in with an API token."),
        userForm(loadUsers),
      ], { subtitle: "People who log in with a password" }));
    } catch (exc) {
      if (alive) mount(usersBox, errorBox(exc, loadUsers));
    }
  };

  const loadTokens = async () => {
    try {
      const data = await api("/api/v1/tokens");
      if (!alive) return;
      mount(tokensBox, card("API tokens", [
        table([
          { title: "Name", render: (t) => h("strong", {}, t.name) },
          { title: "Id", render: (t) => h("code", {}, t.id) },
          { title: "Role", render: (t) => badge(t.role, t.role === "admin" ? "admin" : "read-only") },
          { title: "Created", render: (t) => ago(t.created_at) },
          { title: "", className: "actions", render: (t) => (t.revoked ? badge("revoked", "revoked") : h("button", { class: "btn btn-small btn-danger-outline", onClick: async () => {
            const ok = await confirmDialog({ title: `Revoke token ${t.name}?`, text: "Scripts and sessions using it stop working at once.", confirmLabel: "Revoke", danger: true });
            if (!ok.ok) return;
            try { await api(`/api/v1/tokens/${t.id}`, { method: "DELETE" }); loadTokens(); } catch (exc) { toast(exc.message, "bad"); }
          } }, "Revoke")) },
        ], data.items),
        tokenForm(loadTokens),
      ], { subtitle: "For scripts, the CLI (EDGE_FLEET_TOKEN) and logging in" }));
    } catch (exc) {
      if (alive) mount(tokensBox, errorBox(exc, loadTokens));
    }
  };

  mount(root, mine, h("div", { class: "grid-2" }, usersBox, tokensBox));
  loadUsers();
  loadTokens();
}

function roleSelect(id) {
  return h("select", { id }, h("option", { value: "read" }, "read-only"), h("option", { value: "admin" }, "admin"));
}

function userForm(done) {
  const name = h("input", { id: "user-name", placeholder: "name", required: true, autocomplete: "off" });
  const password = h("input", { id: "user-password", type: "password", placeholder: "password (12+ characters)", required: true, autocomplete: "new-password", minlength: 12 });
  const role = roleSelect("user-role");
  const error = h("p", { class: "form-error", hidden: true });
  return h("form", { class: "inline-form", onSubmit: async (e) => {
    e.preventDefault();
    error.hidden = true;
    try {
      await api("/dashboard/users", { method: "POST", json: { name: name.value.trim(), password: password.value, role: role.value } });
      toast(`User ${name.value.trim()} added`, "ok");
      done();
    } catch (exc) {
      error.textContent = exc.message + (exc.hint ? ` (${exc.hint})` : "");
      error.hidden = false;
    }
  } }, h("h3", { class: "subhead" }, "Add a user"), h("div", { class: "input-group" }, name, password, role,
    h("button", { class: "btn btn-primary", type: "submit", id: "user-add" }, "Add")), error);
}

function tokenForm(done) {
  const name = h("input", { id: "token-name", placeholder: "name, e.g. ci", required: true, autocomplete: "off" });
  const role = roleSelect("token-role");
  const error = h("p", { class: "form-error", hidden: true });
  return h("form", { class: "inline-form", onSubmit: async (e) => {
    e.preventDefault();
    error.hidden = true;
    try {
      const t = await api("/api/v1/tokens", { method: "POST", json: { name: name.value.trim(), role: role.value } });
      const value = h("input", { class: "token-value", readonly: true, value: t.token, id: "new-token" });
      modal("Copy the new token now", h("div", {}, h("p", {}, "It is shown once; the controller keeps only its hash."), value,
        h("p", { class: "muted small" }, "Use it as EDGE_FLEET_TOKEN, in an Authorization: Bearer header, or to log in here.")),
      [h("button", { class: "btn btn-primary", onClick: () => { value.select(); navigator.clipboard && navigator.clipboard.writeText(t.token); toast("Copied", "ok"); } }, "Copy")]);
      done();
    } catch (exc) {
      error.textContent = exc.message + (exc.hint ? ` (${exc.hint})` : "");
      error.hidden = false;
    }
  } }, h("h3", { class: "subhead" }, "Create a token"), h("div", { class: "input-group" }, name, role,
    h("button", { class: "btn btn-primary", type: "submit", id: "token-add" }, "Create")), error);
}

function passwordDialog(name) {
  const password = h("input", { type: "password", minlength: 12, autocomplete: "new-password", placeholder: "new password (12+ characters)" });
  const error = h("p", { class: "form-error", hidden: true });
  const dialog = modal(`New password for ${name}`, h("div", { class: "form-grid" }, password,
    h("small", { class: "muted" }, "Their open sessions end."), error), [
    h("button", { class: "btn btn-primary", onClick: async () => {
      try {
        await api(`/dashboard/users/${encodeURIComponent(name)}/password`, { method: "POST", json: { password: password.value } });
        dialog.close();
        toast(`Password of ${name} changed`, "ok");
      } catch (exc) {
        error.textContent = exc.message;
        error.hidden = false;
      }
    } }, "Save")]);
}
