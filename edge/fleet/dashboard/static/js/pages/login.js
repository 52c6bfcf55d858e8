// The login page: a user name and password, or an API token (how the first admin gets in).

import { api } from "../api.js";
import { h } from "../dom.js";

export default function loginPage({ message, onLoggedIn }) {
  let mode = "password";
  const error = h("div", { class: "form-error", role: "alert", hidden: true });
  const username = h("input", { name: "username", id: "username", autocomplete: "username", required: true, autofocus: true });
  const password = h("input", { name: "password", id: "password", type: "password", autocomplete: "current-password", required: true });
  const token = h("input", { name: "token", id: "token", type: "password", autocomplete: "off", spellcheck: "false",
    placeholder: "edge_…" });
  const submit = h("button", { class: "btn btn-primary btn-block", type: "submit", id: "login-submit" }, "Log in");
  const passwordFields = h("div", { class: "login-fields" },
    h("label", { class: "field" }, h("span", {}, "User name"), username),
    h("label", { class: "field" }, h("span", {}, "Password"), password));
  const tokenFields = h("div", { class: "login-fields", hidden: true },
    h("label", { class: "field" }, h("span", {}, "API token"), token),
    h("p", { class: "muted small" }, "An admin or read-only API token; the first admin token is the one ",
      h("code", {}, "edge fleet serve"), " printed once, or EDGE_FLEET_ADMIN_TOKEN."));
  const tabs = h("div", { class: "tabs", role: "tablist" });
  const setMode = (m) => {
    mode = m;
    passwordFields.hidden = m !== "password";
    tokenFields.hidden = m !== "token";
    username.required = password.required = m === "password";
    token.required = m === "token";
    for (const b of tabs.children) b.setAttribute("aria-selected", String(b.dataset.mode === m));
    (m === "password" ? username : token).focus();
  };
  tabs.append(
    h("button", { type: "button", role: "tab", "data-mode": "password", "aria-selected": "true", onClick: () => setMode("password") }, "Password"),
    h("button", { type: "button", role: "tab", "data-mode": "token", "aria-selected": "false", id: "tab-token", onClick: () => setMode("token") }, "API token"));

  const form = h("form", { class: "login-form", novalidate: false, onSubmit: async (e) => {
    e.preventDefault();
    error.hidden = true;
    submit.disabled = true;
    submit.textContent = "Logging in…";
    try {
      const json = mode === "token" ? { token: token.value.trim() } : { username: username.value.trim(), password: password.value };
      const session = await api("/dashboard/login", { method: "POST", json });
      onLoggedIn(session);
    } catch (exc) {
      error.textContent = exc.status === 429 ? `Too many failed logins. ${exc.hint || ""}` : exc.message;
      error.hidden = false;
      submit.disabled = false;
      submit.textContent = "Log in";
      password.value = "";
    }
  } }, tabs, passwordFields, tokenFields, error, submit);

  return h("div", { class: "login-page" },
    h("div", { class: "login-card" },
      h("div", { class: "brand brand-login" }, h("span", { class: "brand-mark" }, "E"), h("span", {}, "Edge ", h("b", {}, "fleet"))),
      h("p", { class: "muted" }, "Sign in to watch and steer your devices."),
      message ? h("div", { class: "notice" }, message) : null,
      form,
      h("p", { class: "muted login-hint" }, "First start? Choose ", h("b", {}, "API token"), " and paste the admin token ",
        h("code", {}, "edge fleet serve"), " printed once. Admins add users with passwords under Access.")));
}
