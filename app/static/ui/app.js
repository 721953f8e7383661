// optserve's dashboard: the key's sessions, and one session's curves growing while it trains. Plain ES
// modules served by the service itself; every request goes to this origin (its CSP allows nothing else).

import { api, ApiError, describe, key } from "./api.js";
import { drawChart, formatNumber } from "./chart.js";

const $ = (selector) => document.querySelector(selector);
const LIST_EVERY_MS = 5000;
const LIVE_EVERY_MS = 1000;
const SCHEDULE_EVERY_MS = 5000;
const MAX_ROWS = 100_000;

let view = null; // the view shown now: { stop() }

function showError(error) {
  const box = $("#error");
  if (!error) {
    box.hidden = true;
    box.replaceChildren();
    return;
  }
  const lines = error instanceof ApiError ? describe(error) : ["Error", String(error)];
  box.replaceChildren(...lines.map((line) => Object.assign(document.createElement("p"), { textContent: line })));
  box.hidden = false;
}

function show(section) {
  for (const id of ["key-view", "list-view", "session-view"]) $(`#${id}`).hidden = id !== section;
  $("#forget-key").hidden = !key.get();
}

/** Runs `tick` now and every `ms` while the view lives and the tab is visible. */
function every(ms, tick) {
  let timer = null;
  let stopped = false;
  const run = async () => {
    timer = null;
    if (stopped) return;
    if (!document.hidden) await tick();
    if (!stopped) timer = setTimeout(run, ms);
  };
  run();
  return () => {
    stopped = true;
    if (timer) clearTimeout(timer);
  };
}

/** The call's answer; a 401 asks for a key (and answers null), any other error is shown. */
async function guarded(call) {
  try {
    const answer = await call();
    showError(null);
    return answer;
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      const refused = key.get() !== null; // a key was given and refused: say why; none yet: just ask
      key.clear();
      askForKey(refused ? error : null);
      return null;
    }
    showError(error);
    return null;
  }
}

// -- the key ----------------------------------------------------------------------------------------

function askForKey(error) {
  stopView();
  show("key-view");
  $("#where").textContent = "";
  if (error) showError(error);
  $("#key-input").focus();
}

$("#key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  key.set($("#key-input").value.trim());
  $("#key-input").value = "";
  route();
});

$("#forget-key").addEventListener("click", () => {
  key.clear();
  route();
});

// -- the list of sessions ---------------------------------------------------------------------------

const table = { rows: [], sort: "updated_at", descending: true };

function cellValue(row, column) {
  if (column === "lr") return row.lr[0] ?? null;
  return row[column];
}

function renderList() {
  const filter = $("#filter").value.trim().toLowerCase();
  const rows = table.rows.filter((r) =>
    !filter ||
    [r.id, r.optimizer, r.scheduler ?? "", JSON.stringify(r.metadata)].some((v) => v.toLowerCase().includes(filter)),
  );
  const sign = table.descending ? -1 : 1;
  rows.sort((a, b) => {
    const [x, y] = [cellValue(a, table.sort), cellValue(b, table.sort)];
    if (x === y) return 0;
    if (x === null || x === undefined) return 1;
    if (y === null || y === undefined) return -1;
    return (x < y ? -1 : 1) * sign;
  });
  for (const th of document.querySelectorAll("#sessions th")) {
    th.setAttribute("aria-sort", th.dataset.key === table.sort ? (table.descending ? "descending" : "ascending") : "none");
  }
  const body = $("#sessions tbody");
  body.replaceChildren(
    ...rows.map((r) => {
      const tr = document.createElement("tr");
      tr.dataset.id = r.id;
      const cells = [
        r.id,
        r.optimizer,
        r.scheduler ?? "—",
        String(r.step),
        r.lr.map(formatNumber).join(", "),
        r.loss === null ? "—" : formatNumber(r.loss),
        new Date(r.updated_at * 1000).toLocaleString(),
      ];
      cells.forEach((text, i) => {
        const td = document.createElement("td");
        if (i === 0) {
          const a = Object.assign(document.createElement("a"), { href: `#/s/${encodeURIComponent(r.id)}`, textContent: text });
          td.appendChild(a);
        } else {
          td.textContent = text;
        }
        if ([3, 4, 5].includes(i)) td.className = "num";
        tr.appendChild(td);
      });
      tr.addEventListener("click", () => {
        location.hash = `#/s/${encodeURIComponent(r.id)}`;
      });
      return tr;
    }),
  );
  $("#count").textContent = `${rows.length} of ${table.rows.length}`;
}

for (const th of document.querySelectorAll("#sessions th")) {
  th.addEventListener("click", () => {
    if (table.sort === th.dataset.key) table.descending = !table.descending;
    else [table.sort, table.descending] = [th.dataset.key, false];
    renderList();
  });
}
$("#filter").addEventListener("input", renderList);

function listView() {
  show("list-view");
  $("#where").textContent = "sessions";
  const stop = every(LIST_EVERY_MS, async () => {
    const answer = await guarded(api.sessions);
    if (answer) {
      table.rows = answer.sessions;
      renderList();
    }
  });
  return { stop };
}

// -- one session ------------------------------------------------------------------------------------

const scales = { loss: false, lr: false, grad_norm: false };
const identity = (r) => `${r.step}|${r.time}|${r.skipped}`;

function sessionView(id) {
  show("session-view");
  $("#where").textContent = id;
  $("#session-title").textContent = id;
  $("#session-state").textContent = "";
  $("#spec").textContent = "";
  const state = { rows: [], last: null, schedule: null, scheduleAt: -1, info: null, stopped: false };

  const redraw = () => {
    const rows = state.rows;
    const taken = rows.filter((r) => !r.skipped);
    const skipped = rows.filter((r) => r.skipped).map((r) => r.step + 0.5);
    drawChart(
      $("#chart-loss"),
      [{ name: "loss", points: taken.filter((r) => r.loss !== null).map((r) => [r.step, r.loss]) }],
      { log: scales.loss, markers: skipped, xLabel: "step" },
    );
    const groups = rows.length ? rows[rows.length - 1].lr.length : (state.info?.lr.length ?? 1);
    const lrSeries = [];
    for (let g = 0; g < groups; g++) {
      // a record's lr is the lr after its step: the lr step + 1 is taken with
      lrSeries.push({ name: groups > 1 ? `group ${g}` : "lr", points: taken.map((r) => [r.step + 1, r.lr[g]]) });
    }
    if (state.schedule) {
      state.schedule.lr.forEach((values, g) => {
        lrSeries.push({
          name: `${groups > 1 ? `group ${g}, ` : ""}schedule ahead${state.schedule.depends_on_loss ? " (reads the loss: held)" : ""}`,
          points: values.map((v, i) => [state.schedule.steps[i], v]),
          dashed: true,
        });
      });
    }
    drawChart($("#chart-lr"), lrSeries, { log: scales.lr, xLabel: "step" });
    $("#chart-lr").dataset.aheadFrom = state.schedule ? String(state.schedule.steps[0] ?? "") : "";
    drawChart(
      $("#chart-grad_norm"),
      [{ name: "grad norm", points: taken.filter((r) => r.grad_norm !== null).map((r) => [r.step, r.grad_norm]) }],
      { log: scales.grad_norm, markers: skipped, xLabel: "step" },
    );
    const info = state.info;
    if (info) {
      const step = rows.length ? Math.max(info.step, rows[rows.length - 1].step) : info.step;
      const lr = rows.length ? rows[rows.length - 1].lr : info.lr;
      $("#session-state").textContent = `step ${step} · lr ${lr.map(formatNumber).join(", ")}`;
    }
  };

  const load = async () => {
    const info = await guarded(() => api.session(id));
    if (!info || state.stopped) return false;
    state.info = info;
    $("#spec").textContent = JSON.stringify(info, null, 2);
    const first = await guarded(() => api.history(id, { limit: 10000 }));
    if (!first || state.stopped) return false;
    state.rows = first.steps;
    return true;
  };

  const poll = async () => {
    // from the step before the newest seen: a skipped step's record repeats the step count, and may come
    // after the record of that step was seen; records already here are recognised and left out
    const newest = state.rows.length ? state.rows[state.rows.length - 1].step : 0;
    const answer = await guarded(() => api.history(id, { since: Math.max(0, newest - 1), limit: 10000 }));
    if (!answer || state.stopped) return;
    const seen = new Set(state.rows.filter((r) => r.step >= newest - 1).map(identity));
    const more = { steps: answer.steps.filter((r) => !seen.has(identity(r))) };
    if (more.steps.length) {
      state.rows = state.rows.concat(more.steps).slice(-MAX_ROWS);
    }
    const step = state.rows.length ? state.rows[state.rows.length - 1].step : state.info.step;
    const ahead = Math.max(1, Math.min(10000, Number($("#ahead").value) || 100));
    // the schedule ahead and the session's state: again when the step moved or K changed; while steps
    // keep coming, at most every SCHEDULE_EVERY_MS, and at once when they stop
    const stale = !state.schedule || state.scheduleAt !== step || state.schedule.steps.length !== ahead;
    const quiet = more.steps.length === 0;
    if (stale && (quiet || Date.now() - (state.scheduleFetched ?? 0) > SCHEDULE_EVERY_MS)) {
      state.scheduleFetched = Date.now();
      const [schedule, info] = await Promise.all([guarded(() => api.schedule(id, ahead)), guarded(() => api.session(id))]);
      if (state.stopped) return;
      if (schedule) [state.schedule, state.scheduleAt] = [schedule, schedule.step];
      if (info) {
        state.info = info;
        $("#spec").textContent = JSON.stringify(info, null, 2);
      }
    }
    redraw();
  };

  let stopPolling = () => {};
  load().then((ok) => {
    if (!ok || state.stopped) return;
    redraw();
    stopPolling = every(LIVE_EVERY_MS, poll);
  });
  view_session = { id, state, redraw };
  return {
    stop() {
      state.stopped = true;
      stopPolling();
      view_session = null;
    },
  };
}

let view_session = null;

for (const button of document.querySelectorAll("button.scale")) {
  button.setAttribute("aria-pressed", "false");
  button.addEventListener("click", () => {
    const chart = button.dataset.chart;
    scales[chart] = !scales[chart];
    button.setAttribute("aria-pressed", String(scales[chart]));
    view_session?.redraw();
  });
}

$("#ahead").addEventListener("change", () => {
  if (view_session) view_session.state.scheduleFetched = 0; // fetch it at the next poll
});

$("#download").addEventListener("click", async () => {
  if (!view_session) return;
  const { id } = view_session;
  const response = await guarded(() => api.checkpoint(id));
  if (!response) return;
  const blob = await response.blob();
  const rows = view_session.state.rows;
  const step = rows.length ? rows[rows.length - 1].step : (view_session.state.info?.step ?? "");
  const link = Object.assign(document.createElement("a"), {
    href: URL.createObjectURL(blob),
    download: `${id}${step !== "" ? `-step${step}` : ""}.safetensors`,
  });
  document.body.appendChild(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
});

$("#delete").addEventListener("click", async () => {
  if (!view_session) return;
  const { id } = view_session;
  if (!confirm(`Delete session ${id}? Its parameters, optimizer state and history go for good.`)) return;
  const done = await guarded(() => api.remove(id));
  if (done) location.hash = "#/";
});

// -- routing ----------------------------------------------------------------------------------------

function stopView() {
  view?.stop();
  view = null;
}

function route() {
  stopView();
  showError(null);
  const match = location.hash.match(/^#\/s\/(.+)$/);
  view = match ? sessionView(decodeURIComponent(match[1])) : listView();
}

window.addEventListener("hashchange", route);
document.addEventListener("visibilitychange", () => {
  if (!document.hidden && view_session) view_session.redraw();
});
window.addEventListener("resize", () => view_session?.redraw());
route();
