// The Tern web console: the fleet, the jobs, one job's timeline, live. It calls the REST API
// of the server that serves it (/api/v1), with the token the operator gives (kept in this
// browser's localStorage), and shows only the actions the token's role may take.
"use strict";

const FINISHED = ["completed", "failed", "cancelled", "resolved"];
const RANK = { viewer: 1, operator: 2, admin: 3 };
let me = { name: "", role: "viewer", authenticated: false };
let leave = () => {}; // stops the current view's timers and streams

// ---- helpers -------------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

// Replaces `node`'s children (absent ones — null, false — left out).
function fill(node, ...children) {
  node.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
}

function badge(status) {
  return el("span", { class: `badge ${status}`, "data-status": status }, status.replace("_", " "));
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "";
}

function took(a, b) {
  if (!a) return "";
  const ms = (b ? new Date(b) : new Date()) - new Date(a);
  if (ms < 1000) return `${ms} ms`;
  const s = Math.round(ms / 100) / 10;
  return s < 120 ? `${s} s` : `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

function toast(text) {
  const t = document.getElementById("toast");
  t.textContent = text;
  t.classList.add("show");
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => t.classList.remove("show"), 5000);
}

function headers() {
  const h = { "content-type": "application/json" };
  const token = localStorage.getItem("tern.token");
  if (token) h.authorization = `Bearer ${token}`;
  return h;
}

class ApiError extends Error {
  constructor(body, status) {
    super(body.error || `HTTP ${status}`);
    this.code = body.error_code || "";
    this.status = status;
  }
}

async function api(path, opts = {}) {
  const resp = await fetch(path, { ...opts, headers: headers() });
  let body;
  try {
    body = await resp.json();
  } catch {
    throw new ApiError({ error: `HTTP ${resp.status}` }, resp.status);
  }
  if (!resp.ok || body.success === false) throw new ApiError(body, resp.status);
  return body;
}

function may(role) {
  return RANK[me.role] >= RANK[role];
}

// A dialog: resolves true when the OK button closes it.
function ask(title, body, ok, danger) {
  const dialog = document.getElementById("dialog");
  document.getElementById("dialog-title").textContent = title;
  const holder = document.getElementById("dialog-body");
  fill(holder, body);
  const okButton = document.getElementById("dialog-ok");
  okButton.textContent = ok;
  okButton.className = danger ? "danger" : "primary";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.showModal();
    const first = holder.querySelector("input, select, textarea");
    (first || okButton).focus();
  });
}

// A job's journal as Server-Sent Events, read with fetch (EventSource cannot send a token).
async function follow(job, after, onEvent, signal) {
  const h = headers();
  h["last-event-id"] = String(after);
  const resp = await fetch(`/api/v1/failover/${job}/events`, { headers: h, signal });
  if (!resp.ok) throw new ApiError(await resp.json(), resp.status);
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const ev = {};
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue;
        const i = line.indexOf(":");
        ev[line.slice(0, i)] = line.slice(i + 1).replace(/^ /, "");
      }
      if (ev.event) onEvent(ev.event, JSON.parse(ev.data));
    }
  }
}

// ---- views ---------------------------------------------------------------------------------

async function allVms() {
  const vms = [];
  let token = "";
  do {
    const page = await api(`/api/v1/vms?page_size=100&page_token=${encodeURIComponent(token)}`);
    vms.push(...page.data);
    token = page.next_page_token;
  } while (token);
  return vms;
}

async function fleet(main) {
  const [vms, jobs] = await Promise.all([allVms(), api("/api/v1/failover/jobs?page_size=100")]);
  const active = new Map();
  const counts = {};
  for (const job of jobs.data) {
    counts[job.status] = (counts[job.status] || 0) + 1;
    if (!FINISHED.includes(job.status) && !active.has(job.vm_id)) active.set(job.vm_id, job);
  }
  const stuck = jobs.data.filter((j) => j.status === "needs_operator");
  const stop = new AbortController();
  leave = () => stop.abort();
  const rows = [...vms].sort((a, b) => {
    const rank = (vm) => (active.get(vm.vm_id)?.status === "needs_operator" ? 0 : active.has(vm.vm_id) ? 1 : 2);
    return rank(a) - rank(b) || a.vm_name.localeCompare(b.vm_name);
  });
  fill(main, 
    el("h1", {}, "Fleet"),
    stuck.length
      ? el("section", { class: "alert", "aria-labelledby": "stuck-title" },
          el("h2", { id: "stuck-title" }, `${stuck.length} job${stuck.length > 1 ? "s" : ""} need an operator`),
          el("ul", {}, stuck.map((j) => el("li", {}, el("a", { href: `#/jobs/${j.job_id}` }, `${j.vm_name}: ${j.error_message || j.job_id}`)))))
      : null,
    el("div", { class: "counts", "aria-label": "Recent jobs by status" },
      Object.keys(counts).length
        ? Object.entries(counts).sort().map(([s, n]) => el("a", { class: "count", href: `#/jobs?status=${s}` }, el("b", {}, n), badge(s)))
        : el("span", { class: "muted" }, "No jobs yet.")),
    el("table", { class: "stack", id: "fleet" },
      el("thead", {}, el("tr", {}, ["VM", "OS", "Size", "Disks", "Readiness", "Active job", ""].map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, rows.map((vm) => {
        const job = active.get(vm.vm_id);
        return el("tr", { "data-vm": vm.vm_id },
          el("td", { "data-label": "VM" }, el("strong", {}, vm.vm_name), el("div", { class: "muted" }, vm.vm_id)),
          el("td", { "data-label": "OS" }, vm.os_type),
          el("td", { "data-label": "Size" }, `${vm.cpu_count} CPU, ${vm.memory_mb} MB`),
          el("td", { "data-label": "Disks" }, `${vm.disks.length} (${Math.round(vm.disks.reduce((s, d) => s + d.size_bytes, 0) / 2 ** 30)} GiB)`),
          el("td", { "data-label": "Readiness", class: "readiness", "data-vm": vm.vm_id }, el("span", { class: "muted" }, "…")),
          el("td", { "data-label": "Active job" }, job ? el("a", { href: `#/jobs/${job.job_id}` }, badge(job.status), ` ${job.job_type}`) : el("span", { class: "muted" }, "none")),
          el("td", {}, may("operator") && !job
            ? el("button", { class: "primary", "data-action": "test-failover", onclick: () => startTest(vm) }, "Test failover")
            : null));
      }))));
  readinessOf(rows, stop.signal);
}

// Each VM's readiness, asked a few at a time once the fleet is on screen.
async function readinessOf(vms, signal) {
  const queue = [...vms];
  const worker = async () => {
    while (queue.length && !signal.aborted) {
      const vm = queue.shift();
      const cell = document.querySelector(`td.readiness[data-vm="${vm.vm_id}"]`);
      try {
        const r = await api(`/api/v1/failover/${vm.vm_id}/readiness`, { signal });
        const failed = r.validation_result.checks.filter((c) => c.status !== "pass").map((c) => c.check_name);
        if (cell) fill(cell, badge(r.is_valid ? "pass" : "fail"), ` ${r.readiness_score}%`, failed.length ? el("div", { class: "muted" }, failed.join(", ")) : null);
      } catch (e) {
        if (cell && e.name !== "AbortError") fill(cell, el("span", { class: "muted" }, e.code || e.message));
      }
    }
  };
  await Promise.all([worker(), worker(), worker(), worker()]);
}

async function startTest(vm) {
  let report;
  try {
    report = await api(`/api/v1/failover/${vm.vm_id}/readiness`);
  } catch (e) {
    toast(`Readiness: ${e.message}`);
    return;
  }
  const checks = report.validation_result.checks;
  const duration = el("input", { id: "duration", value: "1h", required: true, "aria-describedby": "duration-help" });
  const cleanup = el("input", { id: "auto-cleanup", type: "checkbox", checked: true });
  const body = el("div", {},
    el("p", {}, `Readiness of ${vm.vm_name}: `, el("strong", { id: "readiness-score" }, `${report.readiness_score}%`), report.is_valid ? " — ready." : " — not ready."),
    el("table", { id: "readiness" }, el("tbody", {}, checks.map((c) =>
      el("tr", {}, el("td", {}, c.check_name), el("td", {}, badge(c.status)), el("td", {}, c.message))))),
    el("div", { class: "field" }, el("label", { for: "duration" }, "Test duration"), duration,
      el("small", { id: "duration-help", class: "muted" }, "e.g. 30m, 2h; the test VM is torn down after it")),
    el("div", { class: "check-row" }, cleanup, el("label", { for: "auto-cleanup" }, "Tear down by itself after the duration")));
  if (!(await ask(`Test failover of ${vm.vm_name}`, body, "Start test failover"))) return;
  try {
    const started = await api("/api/v1/failover/test", {
      method: "POST",
      body: JSON.stringify({ vm_id: vm.vm_id, test_duration: duration.value.trim(), auto_cleanup: cleanup.checked }),
    });
    location.hash = `#/jobs/${started.job_id}`;
  } catch (e) {
    toast(`${e.code}: ${e.message}`);
  }
}

async function jobs(main, params) {
  const filters = { status: params.get("status") || "", type: params.get("type") || "", vm_id: params.get("vm_id") || "" };
  const token = params.get("page_token") || "";
  const query = new URLSearchParams({ ...filters, page_size: "20", page_token: token });
  const page = await api(`/api/v1/failover/jobs?${query}`);
  const statuses = ["", "pending", "validating", "snapshotting", "executing", "creating_vm", "switching_volume", "powering_on",
    "testing", "cleanup", "reverting", "completed", "failed", "cancelled", "needs_operator", "resolved"];
  const status = el("select", { id: "f-status" }, statuses.map((s) => el("option", { value: s, selected: s === filters.status }, s || "any")));
  const type = el("select", { id: "f-type" }, ["", "test", "live"].map((s) => el("option", { value: s, selected: s === filters.type }, s || "any")));
  const vm = el("input", { id: "f-vm", value: filters.vm_id, placeholder: "VM id" });
  const apply = (e) => {
    e.preventDefault();
    const q = new URLSearchParams({ status: status.value, type: type.value, vm_id: vm.value.trim() });
    location.hash = `#/jobs?${q}`;
  };
  fill(main, 
    el("h1", {}, "Jobs"),
    el("form", { class: "filters", onsubmit: apply },
      el("label", { for: "f-status" }, "Status", status),
      el("label", { for: "f-type" }, "Type", type),
      el("label", { for: "f-vm" }, "VM", vm),
      el("button", { type: "submit" }, "Filter")),
    page.data.length
      ? el("table", { class: "stack", id: "jobs" },
          el("thead", {}, el("tr", {}, ["Job", "VM", "Type", "Status", "Progress", "Started"].map((h) => el("th", { scope: "col" }, h)))),
          el("tbody", {}, page.data.map((j) => el("tr", { "data-job": j.job_id },
            el("td", { "data-label": "Job" }, el("a", { href: `#/jobs/${j.job_id}` }, j.job_id.slice(0, 8))),
            el("td", { "data-label": "VM" }, j.vm_name),
            el("td", { "data-label": "Type" }, j.job_type),
            el("td", { "data-label": "Status" }, badge(j.status)),
            el("td", { "data-label": "Progress" }, `${j.progress}%`),
            el("td", { "data-label": "Started" }, when(j.started_at))))))
      : el("p", { class: "muted" }, "No job matches."),
    el("div", { class: "actions" },
      token ? el("a", { href: `#/jobs?${new URLSearchParams(filters)}` }, "First page") : null,
      page.next_page_token ? el("a", { href: `#/jobs?${new URLSearchParams({ ...filters, page_token: page.next_page_token })}`, id: "next-page" }, "Next page") : null));
}

// A progress bar (its width set through the CSSOM: the page's policy allows no inline styles).
function progress(percent) {
  const fill = el("span", {});
  fill.style.width = `${percent}%`;
  return el("div", { class: "progress", role: "progressbar", "aria-label": "Progress", "aria-valuenow": percent, "aria-valuemin": 0, "aria-valuemax": 100 }, fill);
}

function timeline(steps) {
  return el("ol", { class: "timeline", id: "timeline" }, steps.map((s) => el("li", { "data-step": s.step_name, "data-phase": s.phase, "data-status": s.status },
    el("span", { class: "phase" }, s.phase),
    el("span", {}, el("strong", {}, s.step_name), s.attempt > 1 ? ` (attempt ${s.attempt})` : "", " ", el("span", { class: "muted" }, took(s.started_at, s.completed_at))),
    badge(s.status),
    s.error ? el("span", { class: "err" }, `${s.error.code}: ${s.error.message}`) : null)));
}

async function job(main, id) {
  const stop = new AbortController();
  let timer = null;
  leave = () => { stop.abort(); clearInterval(timer); };
  const journal = el("div", { class: "journal", id: "journal", "aria-label": "Journal", tabindex: "0" });
  const view = el("div", { id: "job-view" });
  fill(main, view, el("h2", {}, "Journal"), journal);
  let last = 0;
  let pending = null;
  const render = async () => {
    const j = (await api(`/api/v1/failover/jobs/${id}`)).data;
    const running = !FINISHED.includes(j.status) && j.status !== "needs_operator";
    const countdown = el("span", { id: "countdown" });
    const tick = () => {
      if (!j.cleanup_at) return;
      const left = Math.max(0, new Date(j.cleanup_at) - new Date());
      countdown.textContent = `auto-cleanup in ${Math.floor(left / 60000)} min ${Math.floor((left % 60000) / 1000)} s`;
    };
    clearInterval(timer);
    if (j.cleanup_at && j.status === "testing") { tick(); timer = setInterval(tick, 1000); }
    const actions = el("div", { class: "actions" },
      may("operator") && j.job_type === "test" && j.status === "testing"
        ? el("button", { class: "primary", "data-action": "end-test", onclick: () => act("DELETE", `/api/v1/failover/test/${id}`, "Teardown started") }, "End test") : null,
      may("operator") && running
        ? el("button", { class: "danger", "data-action": "cancel", onclick: () => cancel(id) }, "Cancel") : null,
      may("operator") && j.status === "needs_operator"
        ? el("button", { class: "primary", "data-action": "resolve", onclick: () => resolve(id) }, "Resolve") : null);
    fill(view, 
      el("h1", {}, `${j.job_type === "test" ? "Test" : "Live"} failover of ${j.vm_name} `, badge(j.status)),
      j.status === "needs_operator"
        ? el("section", { class: "alert", id: "recovery" },
            el("h2", {}, "Needs an operator"),
            el("p", {}, j.error ? `${j.error.code}: ${j.error.message}` : ""),
            el("p", {}, "The VM stays locked. On a machine with the database: ", el("code", {}, `tern admin recover ${id}`),
              " lists what to put back; once the cloud is back at its starting point, resolve the job."))
        : null,
      el("div", { class: "card" },
        progress(j.progress),
        el("dl", { class: "facts" },
          el("dt", {}, "Job"), el("dd", {}, j.job_id),
          el("dt", {}, "VM"), el("dd", {}, `${j.vm_name} (${j.vm_id})`),
          el("dt", {}, "Step"), el("dd", { id: "current-step" }, j.current_step || (j.status === "testing" ? "holding while people test" : "—")),
          el("dt", {}, "Started"), el("dd", {}, when(j.started_at)),
          j.completed_at ? [el("dt", {}, "Ended"), el("dd", {}, `${when(j.completed_at)} (${took(j.started_at, j.completed_at)})`)] : null,
          j.destination_vm_id ? [el("dt", {}, "New VM"), el("dd", {}, j.destination_vm_id)] : null,
          j.cleanup_at && j.status === "testing" ? [el("dt", {}, "Hold"), el("dd", {}, countdown)] : null,
          j.error && j.status !== "needs_operator" ? [el("dt", {}, "Error"), el("dd", {}, `${j.error.code}: ${j.error.message}`)] : null,
          j.resolution ? [el("dt", {}, "Resolved"), el("dd", {}, `by ${j.resolution.resolved_by}: ${j.resolution.reason}`)] : null),
        actions),
      el("h2", {}, "Steps"),
      timeline(j.steps));
  };
  const later = () => {
    if (pending) return;
    pending = setTimeout(async () => { pending = null; try { await render(); } catch (e) { toast(e.message); } }, 150);
  };
  await render();
  follow(id, last, (kind, data) => {
    if (kind === "entry") {
      last = data.sequence;
      journal.append(el("div", { "data-seq": data.sequence },
        `${data.sequence}  ${new Date(data.at).toLocaleTimeString()}  ${data.kind}${data.step ? `  ${data.phase} ${data.step}` : ""}`));
      journal.scrollTop = journal.scrollHeight;
    } else if (kind === "terminal") {
      journal.append(el("div", {}, `— ${data.status}`));
    }
    later();
  }, stop.signal).catch((e) => { if (e.name !== "AbortError") toast(`Live updates stopped: ${e.message}`); });
}

async function act(method, path, done, body) {
  try {
    await api(path, { method, body: body ? JSON.stringify(body) : undefined });
    toast(done);
  } catch (e) {
    toast(`${e.code}: ${e.message}`);
  }
}

async function cancel(id) {
  const reason = el("input", { id: "cancel-reason", placeholder: "why (journaled)" });
  const body = el("div", {}, el("p", {}, "Cancel stops the failover and rolls back everything it did."),
    el("div", { class: "field" }, el("label", { for: "cancel-reason" }, "Reason"), reason));
  if (await ask("Cancel this failover?", body, "Cancel and roll back", true)) {
    await act("POST", `/api/v1/failover/${id}/cancel`, "Cancelled: rolling back", { reason: reason.value });
  }
}

async function resolve(id) {
  const reason = el("input", { id: "resolve-reason", required: true, placeholder: "what was checked or done" });
  const by = el("input", { id: "resolve-by", placeholder: me.authenticated ? "(your principal)" : "your name" });
  const force = el("input", { id: "resolve-force", type: "checkbox" });
  const body = el("div", {},
    el("div", { class: "field" }, el("label", { for: "resolve-reason" }, "Reason"), reason),
    el("div", { class: "field" }, el("label", { for: "resolve-by" }, "Resolved by"), by),
    el("div", { class: "check-row" }, force, el("label", { for: "resolve-force" }, "Resolve although the cloud still differs")));
  if (await ask("Resolve this job?", body, "Resolve")) {
    await act("POST", `/api/v1/failover/${id}/resolve`, "Resolved", { reason: reason.value, resolved_by: by.value, force: force.checked });
  }
}

// ---- routing -------------------------------------------------------------------------------

async function route() {
  leave();
  leave = () => {};
  const main = document.getElementById("main");
  const [path, query] = (location.hash.slice(1) || "/").split("?");
  const params = new URLSearchParams(query || "");
  for (const a of document.querySelectorAll("header nav a")) a.removeAttribute("aria-current");
  try {
    if (path.startsWith("/jobs/")) {
      document.getElementById("nav-jobs").setAttribute("aria-current", "page");
      await job(main, decodeURIComponent(path.slice(6)));
    } else if (path === "/jobs") {
      document.getElementById("nav-jobs").setAttribute("aria-current", "page");
      await jobs(main, params);
    } else {
      document.getElementById("nav-fleet").setAttribute("aria-current", "page");
      await fleet(main);
    }
  } catch (e) {
    fill(main, el("h1", {}, "Cannot show this"), el("p", { class: "alert", id: "error" }, e.code ? `${e.code}: ${e.message}` : e.message),
      e.status === 401 ? el("p", {}, "This server asks for a token: enter one above.") : null);
  }
  main.focus();
}

async function whoami() {
  try {
    me = (await api("/api/v1/whoami")).data;
  } catch (e) {
    me = { name: "", role: "viewer", authenticated: true };
  }
  document.getElementById("who").textContent = me.authenticated ? (me.name ? `${me.name} (${me.role})` : "not signed in") : "no authentication";
}

document.addEventListener("DOMContentLoaded", async () => {
  document.getElementById("signin").addEventListener("submit", async (e) => {
    e.preventDefault();
    const input = document.getElementById("token");
    if (input.value.trim()) localStorage.setItem("tern.token", input.value.trim());
    else localStorage.removeItem("tern.token");
    input.value = "";
    await whoami();
    await route();
  });
  window.addEventListener("hashchange", route);
  await whoami();
  await route();
});
