// The API as the page uses it: same origin, JSON, the key (if any) from this tab's sessionStorage in the
// Authorization header, never in a URL. Errors carry the server's problem+json.

const KEY = "optserve.key";

export class ApiError extends Error {
  constructor(status, problem) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }
}

export const key = {
  get: () => sessionStorage.getItem(KEY),
  set: (value) => sessionStorage.setItem(KEY, value),
  clear: () => sessionStorage.removeItem(KEY),
};

function headers(extra = {}) {
  const out = { Accept: "application/json", ...extra };
  const k = key.get();
  if (k) out.Authorization = `Bearer ${k}`;
  return out;
}

async function problemOf(response) {
  const type = response.headers.get("content-type") || "";
  if (type.includes("json")) {
    try {
      return await response.json();
    } catch {
      /* fall through */
    }
  }
  return { title: response.statusText || `HTTP ${response.status}`, detail: (await response.text()).slice(0, 500) };
}

export async function request(method, path, { query, accept } = {}) {
  const url = query ? `${path}?${new URLSearchParams(query)}` : path;
  let response;
  try {
    response = await fetch(url, { method, headers: headers(accept ? { Accept: accept } : {}), cache: "no-store" });
  } catch (error) {
    throw new ApiError(0, { title: "The server cannot be reached", detail: String(error) });
  }
  if (!response.ok) throw new ApiError(response.status, await problemOf(response));
  return response;
}

export const getJson = async (path, query) => (await request("GET", path, { query })).json();

export const api = {
  sessions: () => getJson("/v1/sessions"),
  session: (id) => getJson(`/v1/sessions/${encodeURIComponent(id)}`),
  history: (id, query) => getJson(`/v1/sessions/${encodeURIComponent(id)}/history`, query),
  schedule: (id, steps) => getJson(`/v1/sessions/${encodeURIComponent(id)}/schedule`, { steps }),
  checkpoint: (id) =>
    request("GET", `/v1/sessions/${encodeURIComponent(id)}/checkpoint`, { accept: "application/vnd.safetensors" }),
  remove: (id) => request("DELETE", `/v1/sessions/${encodeURIComponent(id)}`),
};

/** A problem as a few readable lines: title, detail, and each field with its message. */
export function describe(error) {
  const p = error.problem ?? { title: "Error", detail: String(error) };
  const lines = [`${p.title ?? "Error"}${error.status ? ` (${error.status})` : ""}`];
  if (p.detail) lines.push(p.detail);
  for (const f of p.errors ?? []) lines.push(`${f.field}: ${f.message}`);
  return lines;
}
