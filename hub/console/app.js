// The hub's web console: log in with an operator token, watch the fleet and command devices (docs/control.md).
// Plain DOM, no framework. Device data is only ever set as text (textContent, attributes), never parsed as HTML.

import { AuthError, connect, ERR_CANNOT_CONNECT, ERR_CONNECTION_LOST, ERR_REVOKED, HubError } from "./hub-client.js";

const CONFIG_URL = "/console/config.json"; // {"control_url": "ws://HOST:PORT/v1/control"}, served by the hub
const TOKEN_KEY = "hub.operatorToken"; // in sessionStorage: this tab only, never in the URL
const STATUS_EVERY = 5000; // ms between `status` requests
const CHART_POINTS = 120; // points kept per series
const COMMANDS_SHOWN = 50;
const FLEET_SHOWN = 1000; // rows in the fleet table; the filters narrow a larger fleet
const RETRY_LOGIN = 5000; // ms before a saved token is tried again when the hub could not be reached
const COMMAND_NAME = /^[A-Za-z0-9_.-]{1,64}$/; // as the device protocol allows
const MAX_ARGS_BYTES = 16 * 1024; // the hub refuses larger args (bad_command)
const CANCELLABLE = new Set(["queued", "sent"]);
const UNFINISHED = ["queued", "sent", "delivered"];
const SENDERS = new Set(["operator", "admin"]);
const SVG = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);

/** An element with attributes (`dataset`, `class`, others as attributes) and children (strings become text). */
function el(tag, attrs = {}, ...children) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, String(value));
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

// ------------------------------------------------------------------------------------------- formatting

function clock(seconds) {
  return typeof seconds === "number" ? new Date(seconds * 1000).toLocaleTimeString() : "–";
}

function ago(seconds) {
  if (typeof seconds !== "number") return "–";
  const s = Math.max(0, Date.now() / 1000 - seconds);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return new Date(seconds * 1000).toLocaleDateString();
}

function duration(seconds) {
  if (typeof seconds !== "number") return "–";
  if (seconds < 60) return `${Math.floor(seconds)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ${Math.floor((seconds % 3600) / 60)} min`;
  return `${Math.floor(seconds / 86400)} d ${Math.floor((seconds % 86400) / 3600)} h`;
}

function bytes(n) {
  if (typeof n !== "number") return "–";
  for (const [size, unit] of [[1024 ** 3, "GiB"], [1024 ** 2, "MiB"], [1024, "KiB"]]) {
    if (n >= size) return `${(n / size).toFixed(1)} ${unit}`;
  }
  return `${n} B`;
}

function count(n) {
  return typeof n === "number" ? n.toLocaleString() : "–";
}

function compact(value, limit = 120) {
  const text = JSON.stringify(value);
  return text.length > limit ? `${text.slice(0, limit - 1)}…` : text;
}

function number(v) {
  if (Math.abs(v) >= 1000 || Number.isInteger(v)) return v.toLocaleString(undefined, { maximumFractionDigits: 0 });
  return v.toLocaleString(undefined, { maximumSignificantDigits: 4 });
}

function describe(err) {
  if (err instanceof AuthError) return `The hub refused this token: ${err.message}`;
  if (err instanceof HubError && err.code === ERR_CANNOT_CONNECT) {
    return `Cannot open the control channel at ${app.config.control_url}: the hub is not reachable, or this ` +
      `page's origin (${location.origin}) is not in its control.allowed_origins.`;
  }
  if (err instanceof HubError) return `${err.code}: ${err.message}`;
  return String(err);
}

// ------------------------------------------------------------------------------------------- state

const app = {
  config: null,
  hub: null,
  devices: new Map(), // name -> device summary
  page: null, // the open device page
  statusTimer: null,
  renderQueued: false,
};

function canSend() {
  return app.hub !== null && SENDERS.has(app.hub.role);
}

function showBanner(message) {
  $("banner").textContent = message;
  $("banner").hidden = false;
}

function hideBanner() {
  $("banner").hidden = true;
}

function setConnection(text, kind) {
  const conn = $("conn");
  conn.textContent = text;
  conn.className = `conn conn-${kind}`;
  conn.hidden = false;
}

function showView(name) {
  for (const view of ["login-view", "fleet-view", "device-view"]) $(view).hidden = view !== name;
}

// ------------------------------------------------------------------------------------------- login

async function loadConfig() {
  const response = await fetch(CONFIG_URL, { cache: "no-store" });
  if (!response.ok) throw new Error(`${CONFIG_URL}: HTTP ${response.status}`);
  const config = await response.json();
  if (typeof config.control_url !== "string") throw new Error(`${CONFIG_URL} has no control_url`);
  return config;
}

function showLogin(message = "") {
  showView("login-view");
  $("login-error").textContent = message;
  $("login-button").disabled = false;
  $("token").focus();
}

async function login(token, saved = false) {
  $("login-button").disabled = true;
  $("login-error").textContent = "";
  let hub;
  try {
    hub = await connect(app.config.control_url, token);
  } catch (err) {
    if (saved && !(err instanceof AuthError) && sessionStorage.getItem(TOKEN_KEY) === token) {
      // The hub is away (restarting, say): keep this tab's token and try again, unless the user logs in anew.
      showLogin(`${describe(err)} Trying again…`);
      setTimeout(() => {
        if (!app.hub && sessionStorage.getItem(TOKEN_KEY) === token) login(token, true);
      }, RETRY_LOGIN);
      return;
    }
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin(describe(err));
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  $("token").value = "";
  app.hub = hub;
  hub.addEventListener("disconnected", () => setConnection("reconnecting…", "warn"));
  hub.addEventListener("reconnecting", (e) => setConnection(`reconnecting in ${Math.ceil(e.detail.delay / 1000)} s…`,
    "warn"));
  hub.addEventListener("ready", () => {
    setConnection("live", "ok");
    refreshAll();
  });
  hub.addEventListener("subscription-failed", (e) => showBanner(`A live view stopped: ${describe(e.detail.error)}`));
  hub.addEventListener("closed", (e) => {
    if (app.hub !== hub) return;
    const error = e.detail.error;
    if (error instanceof AuthError) logout(`The hub no longer accepts this token: ${error.message}`);
    else if (error && error.code === ERR_REVOKED) logout("This operator's token was revoked.");
    else if (error) logout(`Disconnected: ${describe(error)}`);
  });
  setConnection("live", "ok");
  $("who").textContent = `${hub.operator} · ${hub.role}`;
  $("who").hidden = false;
  $("logout").hidden = false;
  try {
    await hub.subscribe("presence", onPresence);
  } catch (err) {
    showBanner(describe(err));
  }
  app.statusTimer = setInterval(refreshStatus, STATUS_EVERY);
  route();
  refreshDevices();
  refreshStatus();
}

function logout(message = "") {
  const hub = app.hub;
  app.hub = null;
  clearInterval(app.statusTimer);
  closeDevice();
  app.devices.clear();
  sessionStorage.removeItem(TOKEN_KEY);
  if (hub) hub.close();
  for (const id of ["conn", "who", "logout", "banner"]) $(id).hidden = true;
  $("fleet").tBodies[0].replaceChildren();
  showLogin(message);
}

// ------------------------------------------------------------------------------------------- fleet and status

async function refreshAll() {
  const page = app.page;
  // A device page opened while the connection was down has no live views yet: open it again.
  const reopen = page !== null && page.subs.length < 2;
  if (reopen) openDevice(page.name);
  await Promise.all([refreshDevices(), refreshStatus(), page && !reopen ? loadDevice(page) : null]);
}

async function refreshDevices() {
  if (!app.hub) return;
  try {
    const list = await app.hub.request("devices");
    // A presence event may have come in while the list was on its way: keep the newer summary of each device.
    const fresh = new Map(list.map((d) => [d.name, d]));
    for (const [name, known] of app.devices) {
      const listed = fresh.get(name);
      if (listed && known.since > listed.since) fresh.set(name, known);
    }
    app.devices = fresh;
    scheduleFleet();
  } catch (err) {
    showBanner(`Cannot list devices: ${describe(err)}`);
  }
}

function labelsText(labels) {
  return labels && typeof labels === "object" ? Object.entries(labels).map(([k, v]) => `${k}=${v}`).join(", ") : "";
}

function onPresence(summary) {
  // A presence event relayed from another hub of a cluster carries no labels: keep those the list gave.
  const known = app.devices.get(summary.name);
  if (known && known.labels && !(summary.labels && Object.keys(summary.labels).length)) {
    summary = { ...summary, labels: known.labels };
  }
  app.devices.set(summary.name, summary);
  scheduleFleet();
  if (app.page && app.page.name === summary.name) showSummary(summary);
}

function scheduleFleet() {
  if (app.renderQueued) return;
  app.renderQueued = true;
  requestAnimationFrame(() => {
    app.renderQueued = false;
    renderFleet();
  });
}

function renderFleet() {
  const state = $("filter-state").value;
  const needle = $("filter-name").value.trim().toLowerCase();
  const shown = [...app.devices.values()]
    .filter((d) => (!state || d.state === state) && (!needle || d.name.toLowerCase().includes(needle)))
    .sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  const rows = shown.slice(0, FLEET_SHOWN).map((d) => {
    const href = `#/device/${encodeURIComponent(d.name)}`;
    return el("tr", { dataset: { device: d.name, state: d.state } },
      el("td", {}, el("a", { href }, d.name)),
      el("td", {}, el("span", { class: `state state-${d.state}` }, d.state),
        d.revoked ? el("span", { class: "state state-revoked" }, "revoked") : null),
      el("td", { title: clock(d.since) }, ago(d.since)),
      el("td", { class: "wide" }, ago(d.last_seen)),
      el("td", { class: "wide" }, d.model || "–"),
      el("td", { class: "wide" }, d.firmware || "–"),
      el("td", { class: "wide labels" }, labelsText(d.labels) || "–"));
  });
  $("fleet").tBodies[0].replaceChildren(...rows);
  $("fleet-empty").hidden = rows.length > 0 || app.devices.size === 0;
  $("fleet-more").hidden = shown.length <= FLEET_SHOWN;
  $("fleet-more").textContent = `The first ${FLEET_SHOWN} of ${shown.length} are shown: filter to find the others.`;
  $("fleet-count").textContent = shown.length === app.devices.size ? `(${app.devices.size})`
    : `(${shown.length} of ${app.devices.size})`;
}

async function refreshStatus() {
  if (!app.hub || !app.hub.connected) return;
  let s;
  try {
    s = await app.hub.request("status");
  } catch (err) {
    showBanner(`Cannot read the hub's status: ${describe(err)}`);
    return;
  }
  const d = s.devices;
  const ingest = s.ingest;
  $("st-connections").textContent = count(s.connections);
  $("st-online").textContent = count(d.online);
  $("st-devices").textContent = `${count(d.late)} late · ${count(d.offline)} offline · ${count(d.registered)} registered`;
  $("st-points").textContent = `${count(ingest.points_in)} / ${count(ingest.points_written)}`;
  $("st-dropped").textContent = `${count(ingest.points_dropped)} dropped`;
  $("st-spool").textContent = bytes(ingest.spool_bytes);
  $("st-spooled").textContent = `${count(ingest.points_spooled)} spooled · ${count(ingest.points_replayed)} replayed`;
  const commands = s.commands || {};
  $("st-commands").textContent = count(UNFINISHED.reduce((sum, state) => sum + (commands[state] || 0), 0));
  $("st-command-states").textContent = Object.entries(commands).map(([state, n]) => `${count(n)} ${state}`)
    .join(" · ") || "none yet";
  $("st-sink").textContent = ingest.sink_up ? "up" : "down";
  $("st-sink").className = `value ${ingest.sink_up ? "good" : "bad"}`;
  $("st-version").textContent = `hub ${s.version} · up ${duration(s.uptime)}` +
    ` · ${count(s.control_sessions)} operator sessions`;
  renderFleet(); // the "since" columns age
}

// ------------------------------------------------------------------------------------------- device page

function closeDevice() {
  const page = app.page;
  if (!page) return;
  app.page = null;
  page.closed = true;
  for (const sub of page.subs) sub.unsubscribe().catch(() => {});
}

async function openDevice(name) {
  closeDevice();
  const page = { name, subs: [], charts: new Map(), commands: new Map(), twin: null, closed: false };
  app.page = page;
  $("device-name").textContent = name;
  $("device-state").textContent = "";
  $("device-summary").replaceChildren();
  $("charts").replaceChildren();
  $("commands").tBodies[0].replaceChildren();
  $("charts-empty").hidden = true;
  $("commands-empty").hidden = true;
  $("send-slot").replaceChildren(canSend() ? sendForm(page) : "");
  $("twin-slot").replaceChildren(canSend() ? twinForm(page) : "");
  for (const id of ["twin-desired", "twin-reported", "twin-desired-version", "twin-reported-version", "twin-sync"]) {
    $(id).textContent = "";
  }
  showView("device-view");
  try {
    // Subscribe before reading the snapshot, so that no change falls between the two.
    const telemetry = await app.hub.subscribe("telemetry", (e) => onTelemetry(page, e), { devices: [name] });
    page.subs.push(telemetry);
    const commands = await app.hub.subscribe("commands", (r) => onCommand(page, r), { devices: [name] });
    page.subs.push(commands);
    const twin = await app.hub.subscribe("twin", (t) => onTwin(page, t), { devices: [name] });
    page.subs.push(twin);
  } catch (err) {
    showBanner(describe(err));
  }
  if (page.closed) {
    for (const sub of page.subs) sub.unsubscribe().catch(() => {});
    return;
  }
  await loadDevice(page);
}

async function loadDevice(page) {
  let detail;
  try {
    detail = await app.hub.request("device", { name: page.name });
  } catch (err) {
    if (err instanceof HubError && err.code === "not_found") showBanner(`No device ${JSON.stringify(page.name)}.`);
    else showBanner(describe(err));
    return;
  }
  if (page.closed) return;
  showSummary(detail);
  for (const [measurement, point] of Object.entries(detail.latest || {})) {
    onTelemetry(page, { measurement, ...point });
  }
  for (const record of detail.commands || []) onCommand(page, record);
  $("charts-empty").hidden = page.charts.size > 0;
  $("commands-empty").hidden = page.commands.size > 0;
  await loadTwin(page);
}

// ------------------------------------------------------------------------------------------- twin

async function loadTwin(page) {
  try {
    onTwin(page, await app.hub.request("twin", { device: page.name }));
  } catch (err) {
    if (!page.closed) showBanner(describe(err));
  }
}

/** Show a twin unless the page already shows a newer one (a snapshot may arrive after an event). */
function onTwin(page, twin) {
  if (page.closed) return;
  const known = page.twin;
  const older = known && (twin.desired.version < known.desired.version ||
    twin.reported.version < known.reported.version);
  if (older) return;
  page.twin = twin;
  $("twin-desired-version").textContent = `v${twin.desired.version}`;
  $("twin-reported-version").textContent = `v${twin.reported.version}`;
  $("twin-desired").textContent = JSON.stringify(twin.desired.state, null, 2);
  $("twin-reported").textContent = JSON.stringify(twin.reported.state, null, 2);
  const pending = Object.keys(twin.delta || {}).length > 0;
  $("twin-sync").textContent = pending
    ? `Not applied yet: ${compact(twin.delta)} (the device applied v${twin.applied_version})`
    : `In sync (the device applied v${twin.applied_version}).`;
  $("twin-sync").dataset.sync = pending ? "pending" : "in-sync";
}

function twinForm(page) {
  const form = $("twin-template").content.firstElementChild.cloneNode(true);
  const patchBox = form.querySelector("#twin-patch");
  const error = form.querySelector("#twin-error");
  const button = form.querySelector("#twin-button");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const parsed = parseArgs(patchBox.value, "The change");
    if (parsed.error || !patchBox.value.trim()) {
      error.textContent = parsed.error || "Give a JSON object, like {\"interval\": 5}";
      return;
    }
    error.textContent = "";
    button.disabled = true;
    try {
      // Only on top of the document shown: a change made meanwhile by someone else is not overwritten unseen.
      const args = { device: page.name, patch: parsed.args };
      if (page.twin) args.if_version = page.twin.desired.version;
      onTwin(page, await app.hub.request("twin_set", args));
      patchBox.value = "";
    } catch (err) {
      if (err instanceof HubError && err.code === "version_conflict") {
        error.textContent = "The desired state changed meanwhile: it is shown now; check it and set again.";
        await loadTwin(page);
      } else {
        error.textContent = describe(err);
      }
    } finally {
      button.disabled = false;
    }
  });
  return form;
}

function showSummary(d) {
  $("device-state").textContent = d.state;
  $("device-state").className = `state state-${d.state}`;
  const items = [
    ["since", `${clock(d.since)} (${ago(d.since)})`],
    ["reason", d.reason || "–"],
    ["last seen", ago(d.last_seen)],
    ["model", d.model || "–"],
    ["firmware", d.firmware || "–"],
    ["interval", typeof d.interval === "number" ? `${d.interval} s` : "–"],
    ["session epoch", d.epoch ?? "–"],
    ["labels", labelsText(d.labels) || "–"],
  ];
  if (d.revoked) items.push(["token", "revoked"]);
  $("device-summary").replaceChildren(...items.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, String(v))]));
}

// ------------------------------------------------------------------------------------------- charts

function onTelemetry(page, event) {
  if (page.closed || !event.fields) return;
  for (const [field, value] of Object.entries(event.fields)) {
    const key = `${event.measurement}.${field}`;
    let chart = page.charts.get(key);
    if (!chart) {
      chart = newChart(key, typeof value === "number");
      page.charts.set(key, chart);
      // Charts first, then fields that are not numbers (text, booleans) as small cards; each group by name.
      const order = (c) => `${c.svg ? 0 : 1}${c.key}`;
      const cards = [...page.charts.values()].sort((a, b) => (order(a) < order(b) ? -1 : 1)).map((c) => c.card);
      $("charts").replaceChildren(...cards);
      $("charts-empty").hidden = true;
    }
    addPoint(chart, event.ts, value);
  }
}

function newChart(key, numeric) {
  const value = el("span", { class: "chart-value" });
  const svg = numeric ? el("svg:svg", { viewBox: "0 0 320 120", role: "img", "aria-label": key }) : null;
  const card = el("figure", { class: `card chart${numeric ? "" : " field"}`, dataset: { series: key, points: "0" } },
    el("figcaption", {}, el("span", { class: "chart-name" }, key), value), svg);
  return { key, card, svg, value, points: [] };
}

function addPoint(chart, ts, value) {
  const last = chart.points[chart.points.length - 1];
  if (last && last.t === ts) return; // the snapshot's latest point, seen again as an event
  chart.value.textContent = typeof value === "number" ? number(value) : String(value);
  chart.card.title = `at ${new Date(ts).toLocaleTimeString()}`;
  if (!chart.svg || typeof value !== "number") return;
  chart.points.push({ t: ts, v: value });
  if (last && last.t > ts) chart.points.sort((a, b) => a.t - b.t); // a device clock stepped back
  if (chart.points.length > CHART_POINTS) chart.points.splice(0, chart.points.length - CHART_POINTS);
  chart.card.dataset.points = String(chart.points.length);
  drawChart(chart);
}

/** A line of the series in a 320×120 box: value labels left, time labels under it. */
function drawChart(chart) {
  const pts = chart.points;
  let lo = Math.min(...pts.map((p) => p.v));
  let hi = Math.max(...pts.map((p) => p.v));
  if (lo === hi) {
    const pad = Math.abs(lo) * 0.05 || 1; // a flat series sits in the middle
    lo -= pad;
    hi += pad;
  }
  // The value labels sit left of the plot: make room for the longer one (about 6 units a character).
  const left = 10 + 6 * Math.max(number(hi).length, number(lo).length, 3);
  const right = 312, top = 8, bottom = 98;
  const first = pts[0];
  const last = pts[pts.length - 1];
  const span = last.t - first.t;
  const x = (t) => (span > 0 ? left + ((t - first.t) / span) * (right - left) : right); // one point: at the right
  const y = (v) => bottom - ((v - lo) / (hi - lo)) * (bottom - top);
  const time = (t) => new Date(t).toLocaleTimeString();
  const parts = [
    el("svg:line", { x1: left, y1: top, x2: right, y2: top, class: "grid" }),
    el("svg:line", { x1: left, y1: (top + bottom) / 2, x2: right, y2: (top + bottom) / 2, class: "grid" }),
    el("svg:line", { x1: left, y1: bottom, x2: right, y2: bottom, class: "axis" }),
    el("svg:text", { x: left - 4, y: top + 4, class: "tick", "text-anchor": "end" }, number(hi)),
    el("svg:text", { x: left - 4, y: bottom, class: "tick", "text-anchor": "end" }, number(lo)),
    span > 0 ? el("svg:text", { x: left, y: 114, class: "tick" }, time(first.t)) : null,
    el("svg:text", { x: right, y: 114, class: "tick", "text-anchor": "end" }, time(last.t)),
    el("svg:polyline", { points: pts.map((p) => `${x(p.t).toFixed(1)},${y(p.v).toFixed(1)}`).join(" "), class: "line" }),
    el("svg:circle", { cx: x(last.t), cy: y(last.v), r: 3, class: "dot" }),
  ];
  chart.svg.replaceChildren(...parts.filter((part) => part !== null));
}

// ------------------------------------------------------------------------------------------- commands

function onCommand(page, record) {
  if (page.closed) return;
  const known = page.commands.get(record.command_id);
  // A snapshot may arrive after a newer event of the same command: keep the record that went further.
  if (known && (known.history || []).length > (record.history || []).length) return;
  page.commands.set(record.command_id, record);
  renderCommands(page);
}

function renderCommands(page) {
  const records = [...page.commands.values()].sort((a, b) => b.created - a.created).slice(0, COMMANDS_SHOWN);
  const rows = records.map((r) => {
    const trail = (r.history || []).map((h) => h.state).join(" → ");
    let outcome = "";
    if (r.error) outcome = r.error;
    else if (r.result !== null && r.result !== undefined) outcome = compact(r.result);
    const cancel = canSend() && CANCELLABLE.has(r.state)
      ? el("button", { type: "button", class: "quiet small", dataset: { cancel: r.command_id } }, "Cancel") : null;
    if (cancel) cancel.addEventListener("click", () => cancelCommand(page, r.command_id, cancel));
    return el("tr", { dataset: { command: r.command_id, state: r.state } },
      el("td", { title: r.command_id, class: "nowrap" }, clock(r.created)),
      el("td", {}, el("code", {}, r.name), " ", el("span", { class: "args" }, compact(r.args ?? {}, 60))),
      el("td", {}, el("span", { class: `state state-${r.state}` }, r.state), el("div", { class: "trail" }, trail),
        outcome ? el("div", { class: "outcome narrow-only" }, outcome) : null), // the Result column's, on a phone
      el("td", { class: "wide outcome" }, outcome),
      el("td", {}, cancel));
  });
  $("commands").tBodies[0].replaceChildren(...rows);
  $("commands-empty").hidden = rows.length > 0;
}

/** The args of the send form as an object, or an error message. */
function parseArgs(text, what = "Arguments") {
  if (!text.trim()) return { args: {} };
  let args;
  try {
    args = JSON.parse(text);
  } catch (err) {
    return { error: `${what} ${what.endsWith("s") ? "are" : "is"} not valid JSON: ${err.message}` };
  }
  if (args === null || typeof args !== "object" || Array.isArray(args)) {
    return { error: `${what} must be a JSON object, like {"interval": 5}.` };
  }
  if (new TextEncoder().encode(JSON.stringify(args)).length > MAX_ARGS_BYTES) {
    return { error: `${what} must be at most ${MAX_ARGS_BYTES} bytes of JSON.` };
  }
  return { args };
}

function idempotencyKey() {
  const random = crypto.getRandomValues(new Uint8Array(16)); // randomUUID needs a secure context; this does not
  return `console-${Array.from(random, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}

function sendForm(page) {
  const form = $("send-template").content.firstElementChild.cloneNode(true);
  const name = form.querySelector("#send-name");
  const argsBox = form.querySelector("#send-args");
  const error = form.querySelector("#send-error");
  const button = form.querySelector("#send-button");
  let unanswered = null; // { what, key } of a send whose answer was lost with the connection
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const command = name.value.trim();
    if (!COMMAND_NAME.test(command)) {
      error.textContent = "A command name is 1 to 64 of A-Z a-z 0-9 _ . -";
      return;
    }
    const parsed = parseArgs(argsBox.value);
    if (parsed.error) {
      error.textContent = parsed.error;
      return;
    }
    error.textContent = "";
    button.disabled = true;
    // The same command sent again after a lost answer carries the same key: the hub runs it once.
    const what = JSON.stringify([command, parsed.args]);
    const key = unanswered && unanswered.what === what ? unanswered.key : idempotencyKey();
    try {
      const record = await app.hub.request("send_command",
        { device: page.name, name: command, args: parsed.args, idempotency_key: key });
      unanswered = null;
      onCommand(page, record);
    } catch (err) {
      if (err instanceof HubError && err.code === ERR_CONNECTION_LOST) {
        unanswered = { what, key };
        error.textContent = "The connection dropped before the hub answered. Sending it again is safe: " +
          "the hub will not run it twice.";
      } else {
        unanswered = null;
        error.textContent = describe(err);
      }
    } finally {
      button.disabled = false;
    }
  });
  return form;
}

async function cancelCommand(page, commandId, button) {
  button.disabled = true;
  try {
    onCommand(page, await app.hub.request("cancel_command", { command_id: commandId }));
  } catch (err) {
    showBanner(`Cannot cancel: ${describe(err)}`);
    button.disabled = false;
  }
}

// ------------------------------------------------------------------------------------------- routes

function route() {
  if (!app.hub) return;
  hideBanner();
  const match = /^#\/device\/(.+)$/.exec(location.hash);
  let name = null;
  try {
    name = match ? decodeURIComponent(match[1]) : null;
  } catch {
    name = null; // a malformed address: the fleet
  }
  if (name !== null) {
    if (!app.page || app.page.name !== name) openDevice(name);
  } else {
    closeDevice();
    showView("fleet-view");
    renderFleet();
  }
}

async function main() {
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("token").value.trim();
    if (token) login(token);
  });
  $("logout").addEventListener("click", () => logout());
  $("filter-state").addEventListener("change", renderFleet);
  $("filter-name").addEventListener("input", renderFleet);
  window.addEventListener("hashchange", route);
  try {
    app.config = await loadConfig();
  } catch (err) {
    showLogin(`Cannot find the control channel: ${err.message}`);
    $("login-button").disabled = true;
    return;
  }
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) await login(token, true);
  else showLogin();
}

main();
