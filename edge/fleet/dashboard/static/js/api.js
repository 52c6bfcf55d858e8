// The one place that talks HTTP: JSON in and out, the session's CSRF token on every mutation,
// our error shape ({error: {code, message, hint}}) turned into ApiError.

let csrfToken = null;

export function setCsrf(token) {
  csrfToken = token;
}

export class ApiError extends Error {
  constructor(status, error) {
    super(error && error.message ? error.message : `HTTP ${status}`);
    this.status = status;
    this.code = error && error.code;
    this.hint = error && error.hint;
  }
}

const MUTATING = new Set(["POST", "PUT", "PATCH", "DELETE"]);

function url(path, query) {
  const u = new URL(path, location.origin);
  for (const [k, v] of Object.entries(query || {})) {
    if (v !== null && v !== undefined && v !== "") u.searchParams.set(k, v);
  }
  return u.pathname + u.search;
}

async function failure(response) {
  let error = null;
  try {
    error = (await response.json()).error;
  } catch {
    error = { message: `${response.status} ${response.statusText}` };
  }
  const err = new ApiError(response.status, error);
  if (response.status === 401) window.dispatchEvent(new CustomEvent("edge:unauthorized", { detail: err }));
  return err;
}

/** Call the controller: api("/api/v1/devices", {query: {limit: 50}}) or api(path, {method: "POST", json}). */
export async function api(path, { method = "GET", json, body, query, headers = {} } = {}) {
  const h = { accept: "application/json", ...headers };
  if (MUTATING.has(method) && csrfToken) h["x-csrf-token"] = csrfToken;
  if (json !== undefined) {
    h["content-type"] = "application/json";
    body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(url(path, query), { method, body, headers: h, credentials: "same-origin" });
  } catch (exc) {
    throw new ApiError(0, { message: "The controller cannot be reached", hint: "check that `edge fleet serve` runs" });
  }
  if (!response.ok) throw await failure(response);
  if (response.status === 204) return null;
  const type = response.headers.get("content-type") || "";
  return type.includes("json") ? response.json() : response.text();
}

/** Upload a file as the request body, reporting progress (fetch cannot report upload progress). */
export function upload(path, file, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    xhr.setRequestHeader("content-type", "application/octet-stream");
    if (csrfToken) xhr.setRequestHeader("x-csrf-token", csrfToken);
    xhr.upload.onprogress = (e) => e.lengthComputable && onProgress && onProgress(e.loaded / e.total);
    xhr.onerror = () => reject(new ApiError(0, { message: "The upload failed: the controller cannot be reached" }));
    xhr.onload = () => {
      let data = null;
      try { data = JSON.parse(xhr.responseText); } catch { data = null; }
      if (xhr.status >= 200 && xhr.status < 300) resolve(data);
      else reject(new ApiError(xhr.status, data && data.error ? data.error : { message: `HTTP ${xhr.status}` }));
    };
    xhr.send(file);
  });
}
