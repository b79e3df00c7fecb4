// The dloop dashboard: a page of plain JavaScript (no build step) over dloop's JSON API.
// The session cookie stands for the key the person logged in with; every change sends the
// session's CSRF token. Charts are drawn with plotly.js, served by dloop from the plotly
// package (window.Plotly).

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const who = document.getElementById("who");
const logoutButton = document.getElementById("logout");
let session = null; // {role, loop, csrfToken}
let timer = null; // the current page's refresh
let generation = 0; // counts page changes: a page whose answers arrive after it was left stops
const REFRESH_MS = 10000;

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// Thrown for an answer to a page that was left while it waited: it must not draw over the next.
class Stale extends Error {}

async function api(path, { method = "GET", body } = {}) {
  const asked = generation;
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && session) headers["X-CSRF-Token"] = session.csrfToken;
  const r = await fetch(path, {
    method,
    headers,
    credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (r.status === 204) return null;
  const text = await r.text();
  // Checked after the last wait: the page may have been left while the body arrived.
  if (method === "GET" && asked !== generation) throw new Stale(path);
  const doc = text ? JSON.parse(text) : null;
  if (!r.ok) {
    const err = (doc && doc.error) || {};
    if (r.status === 401 && path !== "/ui/login") showLogin("Your session has ended: log in again.");
    throw new ApiError(r.status, err.code || String(r.status), err.message || r.statusText);
  }
  return doc;
}

// ---- small helpers ---------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const fmt = (x, digits = 3) =>
  x === null || x === undefined || Number.isNaN(x) ? "–" : Number(x).toFixed(digits);
const pct = (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(1)}%`);
const esc = encodeURIComponent;
const base = (loop) => `/loops/${esc(loop)}/personalizer/v1.0`;
const isAdmin = () => session && session.role === "admin";

function age(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  if (seconds < 172800) return `${Math.round(seconds / 3600)} h`;
  return `${Math.round(seconds / 86400)} d`;
}

function tile(label, value, cls) {
  return el("div", { class: "tile" }, el("div", { class: "label" }, label), el("div", { class: `value ${cls || ""}` }, value));
}

function upliftText(u) {
  if (!u) return "not enough data";
  const [lo, hi] = u.alwaysValid95;
  return `${u.estimate >= 0 ? "+" : ""}${fmt(u.estimate)} [${fmt(lo)}, ${fmt(hi)}]`;
}

function upliftClass(u) {
  if (!u) return "muted";
  if (u.alwaysValid95[0] > 0) return "good";
  if (u.alwaysValid95[1] < 0) return "bad";
  return "";
}

function chart(id) {
  return el("div", { class: "chart", id });
}

const LAYOUT = {
  margin: { l: 50, r: 20, t: 10, b: 40 },
  legend: { orientation: "h", y: -0.2 },
  paper_bgcolor: "rgba(0,0,0,0)",
  plot_bgcolor: "rgba(0,0,0,0)",
  xaxis: { type: "date" },
};

function draw(id, traces, layout = {}) {
  const node = document.getElementById(id);
  if (!node || !window.Plotly) return;
  window.Plotly.react(node, traces, { ...LAYOUT, ...layout }, { displaylogo: false, responsive: true });
}

// A line with its 95% band (from [lo, hi] pairs, gaps where there is none).
function band(x, mean, intervals, name, color) {
  const lo = intervals.map((p) => (p ? p[0] : null));
  const hi = intervals.map((p) => (p ? p[1] : null));
  return [
    { x, y: hi, mode: "lines", line: { width: 0 }, showlegend: false, hoverinfo: "skip", name: `${name} hi` },
    {
      x, y: lo, mode: "lines", line: { width: 0 }, fill: "tonexty", fillcolor: `${color}33`,
      showlegend: false, hoverinfo: "skip", name: `${name} lo`,
    },
    { x, y: mean, mode: "lines+markers", name, line: { color, width: 2 }, marker: { size: 4 } },
  ];
}

function setNav(loop, page) {
  nav.replaceChildren();
  const links = [["#/", "Loops", !loop]];
  if (loop) {
    for (const [p, label] of [["", "Is it learning?"], ["/evaluations", "Evaluations"], ["/decisions", "Decisions"], ["/configuration", "Configuration"]]) {
      links.push([`#/loops/${esc(loop)}${p}`, label, page === (p || "/")]);
    }
  }
  for (const [href, label, active] of links) nav.append(el("a", { href, class: active ? "active" : "" }, label));
}

function failure(err) {
  return el("p", { class: "error" }, `${err.code || "Error"}: ${err.message}`);
}

// ---- login -------------------------------------------------------------------------------------

function showLogin(message) {
  clearInterval(timer);
  session = null;
  nav.replaceChildren();
  who.textContent = "";
  logoutButton.hidden = true;
  const error = el("p", { class: "error" }, message || "");
  const input = el("input", { type: "password", id: "key", placeholder: "API key", autocomplete: "current-password" });
  const form = el(
    "form",
    { class: "card login", id: "login" },
    el("h1", {}, "dloop dashboard"),
    el("p", { class: "muted" }, "Log in with an admin key, or a viewer key to look only."),
    input,
    el("button", { type: "submit" }, "Log in"),
    error,
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      session = await api("/ui/login", { method: "POST", body: { key: input.value } });
      input.value = "";
      started();
    } catch (err) {
      error.textContent = err.message;
    }
  });
  main.replaceChildren(form);
  input.focus();
}

logoutButton.addEventListener("click", async () => {
  try {
    await api("/ui/logout", { method: "POST" });
  } finally {
    showLogin("Logged out.");
  }
});

function started() {
  who.textContent = session.loop ? `${session.role} of ${session.loop}` : session.role;
  logoutButton.hidden = false;
  if (session.loop && !location.hash.startsWith(`#/loops/${esc(session.loop)}`)) {
    location.hash = `#/loops/${esc(session.loop)}`;
  }
  route();
}

// ---- pages -------------------------------------------------------------------------------------

async function overviewPage() {
  setNav(null);
  const doc = await api("/overview?top=200");
  const rows = doc.value.map((l) =>
    el(
      "tr",
      { "data-loop": l.name },
      el("td", {}, el("a", { href: `#/loops/${esc(l.name)}` }, l.name)),
      el("td", {}, l.kind),
      el("td", {}, l.learningMode),
      el("td", {}, l.policy || "–"),
      el("td", {}, l.modelId || "–", el("div", { class: "muted" }, l.modelId ? `${age(l.modelAgeSeconds)} old` : "")),
      el("td", { class: "num" }, fmt(l.decisionsPerMinute, 1)),
      el("td", { class: "num" }, fmt(l.rewardRate)),
      el("td", { class: "num" }, pct(l.joinCoverage)),
      el("td", { class: `num ${upliftClass(l.uplift)}` }, l.holdoutPercentage ? upliftText(l.uplift) : "no holdout"),
      el("td", { class: "num" }, l.backlog),
      el("td", { class: `num ${l.deadLetters ? "bad" : ""}` }, l.deadLetters),
    ),
  );
  main.replaceChildren(
    el("h1", {}, `Loops (${doc.count})`),
    el(
      "table",
      { id: "loops" },
      el("thead", {}, el("tr", {}, ...["Loop", "Kind", "Mode", "Policy", "Model", "Decisions/min", "Reward rate (1 h)", "Join coverage", "Holdout uplift", "Backlog", "Dead letters"].map((h) => el("th", {}, h)))),
      el("tbody", {}, rows),
    ),
    el("p", { class: "muted" }, "Uplift: online minus holdout mean reward, with its always-valid 95% interval. Refreshes every 10 s."),
  );
}

async function loopPage(loop) {
  setNav(loop, "/");
  const [stats, holdout, guards] = await Promise.all([
    api(`/loops/${esc(loop)}/stats`),
    api(`/loops/${esc(loop)}/holdout`),
    api(`/loops/${esc(loop)}/guardrails`),
  ]);
  const b = stats.buckets;
  const x = b.map((r) => r.start);
  const last = b.length ? b[b.length - 1] : null;
  const joined = b.reduce((s, r) => s + (r.joined || 0), 0);
  const rewarded = b.reduce((s, r) => s + (r.rewarded || 0), 0);
  const latestModel = stats.models.length ? stats.models[stats.models.length - 1] : null;
  const cards = [
    el("div", { class: "card" }, el("h2", {}, "Reward over time: online, holdout, and what baseline and random would earn"), chart("reward")),
    el("div", { class: "card" }, el("h2", {}, "Decisions and join coverage"), chart("coverage")),
    el("div", { class: "card" }, el("h2", {}, "Freshness and model history"), chart("freshness")),
    el("div", { class: "card" }, el("h2", {}, "Exploration and action shares"), chart("actions")),
  ];
  const outcomeNames = [...new Set(b.flatMap((r) => Object.keys(r.outcomes || {})))].sort();
  if (outcomeNames.length) cards.push(el("div", { class: "card" }, el("h2", {}, "Outcomes over time (mean per decision)"), chart("outcomes")));
  if (guards.guardrails.length) cards.unshift(guardrailCard(guards));
  if (stats.kind === "rl") cards.push(el("div", { class: "card" }, el("h2", {}, "Episode returns"), chart("episodes")));
  if (stats.kind === "ccb") cards.push(el("div", { class: "card" }, el("h2", {}, "Reward per slot"), chart("slots")));
  main.replaceChildren(
    el("h1", {}, `${loop} `, el("span", { class: "muted" }, `(${stats.kind}) — is it learning, and is it helping?`)),
    el(
      "div",
      { class: "tiles card", id: "tiles" },
      tile("Holdout uplift (always-valid 95%)", upliftText(holdout.uplift), upliftClass(holdout.uplift)),
      tile("Online / holdout decisions", `${holdout.online.decisions} / ${holdout.holdout.decisions}`),
      tile("Holdout", guards.fallback ? `fallback: ${pct(guards.holdoutShare)} ${holdout.holdoutPolicy}` : holdout.holdoutPercentage ? `${holdout.holdoutPercentage}% ${holdout.holdoutPolicy}` : "off", guards.fallback ? "bad" : ""),
      tile("Joined (range)", joined),
      tile("Join coverage", joined ? pct(rewarded / joined) : "–"),
      tile("Model", latestModel ? latestModel.modelId : "none yet"),
      tile("Guardrails", guardText(guards), guardClass(guards)),
      tile("Freshness p50 / p95", stats.freshness.p50 === null ? "–" : `${fmt(stats.freshness.p50, 2)} / ${fmt(stats.freshness.p95, 2)} s`),
      tile("Exploration (last bucket)", last ? pct(last.explorationShare) : "–"),
    ),
    el("p", { class: "muted", id: "holdout-status" }, holdout.status),
    el("p", { class: "muted", id: "reward-definition" }, rewardText(stats.rewardDefinitions || [])),
    el("div", { class: "grid" }, cards),
  );
  const val = (r, f) => (r.meanReward ? r.meanReward[f] : null);
  const cf = (r, f) => (r.counterfactual && r.counterfactual[f] ? r.counterfactual[f] : null);
  // Counterfactuals per bucket are noisy (inverse propensity scores): dashed, without bands,
  // and the axis follows the online and holdout bands.
  const online = b.map((r) => val(r, "online"));
  const heldOut = b.map((r) => val(r, "holdout"));
  const seen = [...online, ...heldOut, ...b.flatMap((r) => [...(r.onlineInterval95 || []), ...(r.holdoutInterval95 || [])])]
    .filter((v) => v !== null && v !== undefined && Number.isFinite(v));
  const low = seen.length ? Math.min(...seen) : 0;
  const high = seen.length ? Math.max(...seen) : 1;
  const pad = Math.max(0.05, 0.1 * (high - low));
  draw("reward", [
    ...band(x, online, b.map((r) => r.onlineInterval95), "online", "#2f6fde"),
    ...band(x, heldOut, b.map((r) => r.holdoutInterval95), "holdout", "#d97706"),
    { x, y: b.map((r) => (cf(r, "baseline") ? cf(r, "baseline").estimate : null)), mode: "lines", name: "baseline (IPS)", line: { color: "#667085", dash: "dash", width: 1.5 } },
    { x, y: b.map((r) => (cf(r, "random") ? cf(r, "random").estimate : null)), mode: "lines", name: "random (IPS)", line: { color: "#9ca3af", dash: "dot", width: 1.5 } },
  ], { yaxis: { title: "mean reward", range: [Math.max(-1.05, low - pad), Math.min(1.05, high + pad)] }, ...changeMarks(stats.rewardDefinitions || []) });
  draw("coverage", [
    { x, y: b.map((r) => r.decisions), type: "bar", name: "decisions", marker: { color: "#cbd5e1" } },
    { x, y: b.map((r) => (r.joined ? r.rewarded / r.joined : null)), mode: "lines+markers", name: "join coverage", yaxis: "y2", line: { color: "#12805c" } },
  ], { yaxis: { title: "decisions" }, yaxis2: { overlaying: "y", side: "right", range: [0, 1.05], tickformat: ".0%" }, margin: { ...LAYOUT.margin, r: 55 } });
  const m = stats.models;
  draw("freshness", [
    { x: m.map((p) => p.time), y: m.map((p) => p.freshnessP50), mode: "markers", name: "freshness p50 (s)", marker: { color: "#2f6fde" } },
    { x: m.map((p) => p.time), y: m.map((p) => p.freshnessP95), mode: "markers", name: "freshness p95 (s)", marker: { color: "#c0362c", symbol: "triangle-up" } },
    { x: m.map((p) => p.time), y: m.map((p) => p.examples), mode: "lines", name: "examples learned", yaxis: "y2", line: { color: "#667085", shape: "hv" } },
  ], { yaxis: { title: "seconds", rangemode: "tozero" }, yaxis2: { overlaying: "y", side: "right", title: "examples", rangemode: "tozero" }, margin: { ...LAYOUT.margin, r: 70 } });
  const actions = [...new Set(b.flatMap((r) => Object.keys(r.actionShares || {})))].sort();
  draw("actions", [
    ...actions.map((a) => ({ x, y: b.map((r) => (r.actionShares || {})[a] || 0), stackgroup: "shares", name: a })),
    { x, y: b.map((r) => r.explorationShare), mode: "lines", name: "exploration", line: { color: "#111", dash: "dot" } },
  ], { yaxis: { tickformat: ".0%", range: [0, 1] } });
  if (outcomeNames.length) {
    // One panel per outcome (their scales differ), sharing the time axis.
    draw("outcomes", outcomeNames.map((name, i) => ({
      x, y: b.map((r) => (r.outcomes && r.outcomes[name] ? r.outcomes[name].mean : null)),
      mode: "lines+markers", name, yaxis: i ? `y${i + 1}` : "y", marker: { size: 4 },
    })), {
      grid: { rows: outcomeNames.length, columns: 1, pattern: "coupled" },
      height: Math.max(300, 150 * outcomeNames.length),
      ...changeMarks(stats.rewardDefinitions || []),
    });
    document.getElementById("outcomes").style.height = `${Math.max(300, 150 * outcomeNames.length)}px`;
  }
  if (stats.kind === "rl") {
    draw("episodes", [{ x, y: b.map((r) => (r.episodes ? r.episodes.meanReturn : null)), mode: "lines+markers", name: "mean return" }], { yaxis: { title: "return" } });
  }
  if (stats.kind === "ccb") {
    const slots = [...new Set(b.flatMap((r) => (r.slots || []).map((s) => s.id)))];
    draw("slots", slots.map((id) => ({
      x, name: id, mode: "lines+markers",
      y: b.map((r) => { const s = (r.slots || []).find((t) => t.id === id); return s ? s.meanReward.all : null; }),
    })), { yaxis: { title: "mean reward" } });
  }
}

// Guardrails (GET /loops/{loop}/guardrails): the worst state first.
function guardText(g) {
  if (!g.guardrails.length) return "none";
  const breached = g.guardrails.filter((r) => r.state === "breached");
  if (!breached.length) return `${g.guardrails.length} ok`;
  return `${breached.map((r) => `${r.outcome} ${r.mustNot === "increase" ? "↑" : "↓"}`).join(", ")} breached${g.fallback ? " (fallback)" : ""}`;
}

function guardClass(g) {
  if (!g.guardrails.length) return "muted";
  return g.guardrails.some((r) => r.state === "breached") ? "bad" : "good";
}

function guardrailCard(g) {
  const rows = g.guardrails.map((r) => {
    const ci = r.alwaysValid95 || [null, null];
    return el("tr", { "data-guardrail": `${r.outcome}:${r.mustNot}` },
      el("td", {}, `${r.outcome} must not ${r.mustNot} by more than ${fmt(100 * r.tolerance, 0)}%`),
      el("td", { class: r.state === "breached" ? "bad" : "good" }, r.state === "breached" ? `breached since ${(r.since || "").replace("T", " ").slice(0, 19)}` : "ok"),
      el("td", { class: "num" }, r.policyMean === undefined ? "–" : fmt(r.policyMean)),
      el("td", {}, r.comparator ? `${r.comparator} ${fmt(r.comparatorMean)}` : "–"),
      el("td", { class: "num" }, r.excess === undefined ? "–" : `${fmt(r.excess)} [${fmt(ci[0])}, ${fmt(ci[1])}]`),
      el("td", { class: "num" }, r.decisions === undefined ? "–" : r.decisions),
      el("td", {}, r.action),
    );
  });
  return el("div", { class: "card wide", id: "guardrails" },
    el("h2", {}, "Guardrails", g.fallback ? el("span", { class: "bad" }, " — fallback: the holdout policy serves") : ""),
    el("table", {}, el("thead", {}, el("tr", {}, ...["Guardrail", "State", "Policy", "Comparator", "Excess (always-valid 95%)", "Decisions", "Action"].map((h) => el("th", {}, h)))), el("tbody", {}, rows)),
  );
}

// What the loop is trained for: its reward definition's current version.
function rewardText(defs) {
  if (!defs.length) return "Training reward: Personalizer's reward (no reward definition).";
  const d = defs[defs.length - 1];
  return `Training reward (definition v${d.version}, since ${d.time.replace("T", " ").slice(0, 19)}): ${d.definition}`;
}

// A dotted line and a label where each reward definition version was set.
function changeMarks(defs) {
  return {
    shapes: defs.map((d) => ({ type: "line", xref: "x", yref: "paper", x0: d.time, x1: d.time, y0: 0, y1: 1, line: { color: "#7c3aed", dash: "dot", width: 1.5 } })),
    annotations: defs.map((d) => ({ x: d.time, y: 1, xref: "x", yref: "paper", text: `reward v${d.version}`, showarrow: false, xanchor: "left", yanchor: "top", font: { size: 10, color: "#7c3aed" } })),
  };
}

async function evaluationsPage(loop) {
  setNav(loop, "/evaluations");
  const [evals, imps] = await Promise.all([
    api(`${base(loop)}/evaluations`),
    api(`${base(loop)}/featureImportances`),
  ]);
  const list = Array.isArray(evals) ? evals : evals.value || [];
  const detail = el("div", { id: "evaluation" });
  const rows = list.map((e) =>
    el("tr", {},
      el("td", {}, el("a", { href: "#", onclick: (ev) => { ev.preventDefault(); showEvaluation(loop, e.id, detail); } }, e.name || e.id)),
      el("td", {}, e.status), el("td", {}, e.startTime), el("td", {}, e.endTime)),
  );
  const impList = (imps.value || []).filter((j) => j.status === "Succeeded");
  main.replaceChildren(
    el("h1", {}, `${loop}: evaluations`),
    el("div", { class: "card" },
      list.length
        ? el("table", { id: "evaluations" }, el("thead", {}, el("tr", {}, ...["Evaluation", "Status", "From", "To"].map((h) => el("th", {}, h)))), el("tbody", {}, rows))
        : el("p", { class: "muted" }, "No evaluations yet (PUT /evaluations/{id}, or dloop evaluate).")),
    detail,
    el("div", { class: "card" }, el("h2", {}, "Feature importance"),
      impList.length ? chart("importance") : el("p", { class: "muted" }, "No feature importance job has run yet.")),
  );
  if (list.length) await showEvaluation(loop, list[list.length - 1].id, detail);
  if (impList.length) {
    const job = await api(`${base(loop)}/featureImportances/${esc(impList[impList.length - 1].id)}`);
    const scores = (job.featureScores || []).slice().sort((a, b2) => a.score - b2.score).slice(-25);
    draw("importance", [{
      type: "bar", orientation: "h", x: scores.map((s) => s.score),
      y: scores.map((s) => (s.namespace ? `${s.namespace}.${s.featureName}` : s.featureName)), marker: { color: "#2f6fde" },
    }], { xaxis: { title: "score" }, margin: { l: 180, r: 20, t: 10, b: 40 } });
  }
}

async function showEvaluation(loop, id, target) {
  const ev = await api(`${base(loop)}/evaluations/${esc(id)}`);
  const policies = (ev.content && ev.content.value) || [];
  const message = el("p", { class: "error", id: "apply-message" });
  const rows = policies.map((p) => {
    const s = p.summary || {};
    const ci = s.confidenceInterval || [null, null];
    const applicable = !["Baseline", "Random"].includes(p.policySource);
    return el("tr", { "data-policy": p.name },
      el("td", {}, p.name, p.name === ev.optimalPolicy ? el("strong", { class: "good" }, "  optimal") : null),
      el("td", {}, p.policySource), el("td", { class: "num" }, fmt(s.expectedReward)),
      el("td", { class: "num" }, `[${fmt(ci[0])}, ${fmt(ci[1])}]`),
      el("td", { class: "num" }, s.effectiveSampleSize === undefined ? "–" : fmt(s.effectiveSampleSize, 0)),
      el("td", {}, applicable && isAdmin()
        ? el("button", { type: "button", class: "apply", onclick: async (e2) => {
            e2.target.disabled = true;
            try {
              await api(`${base(loop)}/configurations/applyFromEvaluation`, { method: "POST", body: { evaluationId: id, policyName: p.name } });
              message.className = "good";
              message.textContent = `Applied ${p.name}: the model retrains on the loop's history.`;
            } catch (err) {
              message.className = "error";
              message.textContent = err.message;
            }
          } }, "Apply")
        : ""),
    );
  });
  const series = policies.map((p) => ({
    x: ((p.timeseries && p.timeseries.data) || []).map((d) => d.timeStamp),
    y: ((p.timeseries && p.timeseries.data) || []).map((d) => d.expectedReward),
    mode: "lines", name: p.name,
  }));
  // Every named outcome per policy (IPS, 95% interval): the trade-offs between objectives.
  const outcomeNames = [...new Set(policies.flatMap((p) => Object.keys((p.summary || {}).outcomes || {})))].sort();
  const outcomeTable = outcomeNames.length
    ? el("table", { id: "outcomes-table" },
      el("thead", {}, el("tr", {}, el("th", {}, "Policy"), ...outcomeNames.map((n) => el("th", { class: "num" }, n)))),
      el("tbody", {}, policies.map((p) => el("tr", {}, el("td", {}, p.name), ...outcomeNames.map((n) => {
        const o = p.summary.outcomes[n];
        return el("td", { class: "num" }, o ? `${fmt(o.expected)} [${fmt(o.confidenceInterval[0])}, ${fmt(o.confidenceInterval[1])}]` : "–");
      })))))
    : null;
  target.replaceChildren(el("div", { class: "card" },
    el("h2", {}, `${ev.name || ev.id} (${ev.status})`),
    ev.rewardDefinition ? el("p", { class: "muted" }, `Evaluated under the reward ${ev.rewardDefinition}`) : null,
    policies.length
      ? el("table", { id: "policies" }, el("thead", {}, el("tr", {}, ...["Policy", "Source", "Estimate (DR)", "95% interval", "Effective sample size", ""].map((h) => el("th", {}, h)))), el("tbody", {}, rows))
      : el("p", { class: "muted" }, "No results yet."),
    outcomeTable ? el("h2", { style: "margin-top: 1rem" }, "Outcomes per policy (IPS, 95% interval)") : null,
    outcomeTable,
    message,
    policies.length ? chart("evaluation-series") : null,
  ));
  if (policies.length) draw("evaluation-series", series, { yaxis: { title: "expected reward (expanding)" } });
}

async function decisionsPage(loop) {
  setNav(loop, "/decisions");
  const input = el("input", { id: "event-id", placeholder: "eventId", size: 40 });
  const out = el("div", { id: "event" });
  const find = async (ev) => {
    ev.preventDefault();
    out.replaceChildren(el("p", { class: "muted" }, "Looking…"));
    try {
      const e = await api(`${base(loop)}/events/${esc(input.value.trim())}`);
      out.replaceChildren(eventView(e));
    } catch (err) {
      out.replaceChildren(failure(err));
    }
  };
  main.replaceChildren(
    el("h1", {}, `${loop}: a decision`),
    el("form", { class: "card row", onsubmit: find }, input, el("button", { type: "submit" }, "Find")),
    out,
  );
}

function eventView(e) {
  const ranking = e.ranking || [];
  const tables = [];
  if (ranking.length) {
    tables.push(el("table", { id: "ranking" },
      el("thead", {}, el("tr", {}, el("th", {}, "Action"), el("th", { class: "num" }, "Probability"), el("th", {}, ""))),
      el("tbody", {}, ranking.map((a) => el("tr", {}, el("td", {}, a.id), el("td", { class: "num" }, fmt(a.probability)),
        el("td", {}, a.id === e.rewardActionId ? "served" : a.id === e.baselineActionId ? "baseline" : ""))))));
  }
  for (const s of e.slots || []) {
    tables.push(el("h2", {}, `Slot ${s.id}: ${s.rewardActionId} (baseline ${s.baselineActionId})`));
    tables.push(el("table", {}, el("tbody", {}, s.ranking.map((a) => el("tr", {}, el("td", {}, a.id), el("td", { class: "num" }, fmt(a.probability)))))));
  }
  return el("div", { class: "card" },
    el("h2", {}, `Event ${e.eventId}`),
    el("div", { class: "tiles" },
      tile("Time", e.timestamp), tile("Mode", e.mode), tile("Model", e.modelId),
      tile("Holdout", e.holdout ? "yes" : "no"), tile("Joined", e.joined ? "yes" : "not yet"),
      tile("Reward", e.joined ? fmt(e.reward) : "–")),
    ...tables,
    el("h2", {}, "Context"),
    el("pre", { id: "context" }, JSON.stringify(e.contextFeatures, null, 2)),
    el("h2", {}, "Actions"),
    el("pre", {}, JSON.stringify(e.actions, null, 2)),
    e.inferenceExplanation ? el("div", {}, el("h2", {}, "Explanation"), el("pre", {}, JSON.stringify(e.inferenceExplanation, null, 2))) : null,
    el("h2", {}, "Observations"),
    e.observations.length ? el("pre", {}, JSON.stringify(e.observations, null, 2)) : el("p", { class: "muted" }, "none"),
  );
}

async function configurationPage(loop) {
  setNav(loop, "/configuration");
  const [cfg, policy] = await Promise.all([api(`${base(loop)}/configurations/service`), api(`${base(loop)}/configurations/policy`)]);
  const message = el("p", { id: "config-message" });
  const fields = Object.entries(cfg).filter(([, v]) => v === null || typeof v !== "object");
  const inputs = {};
  const form = el("form", { class: "card config", id: "config" },
    el("h2", {}, "Service configuration"),
    ...fields.map(([k, v]) => {
      const input = typeof v === "boolean"
        ? el("select", { name: k }, el("option", { value: "true", selected: v === true }, "true"), el("option", { value: "false", selected: v === false }, "false"))
        : el("input", { name: k, value: v === null ? "" : String(v), disabled: !isAdmin() || k === "lastConfigurationEditDate" });
      if (typeof v === "boolean" && !isAdmin()) input.disabled = true;
      inputs[k] = [input, v];
      return el("label", {}, k, input);
    }),
    isAdmin() ? el("button", { type: "submit" }, "Save") : el("p", { class: "muted" }, "Viewer keys may only look."),
    message,
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const doc = { ...cfg };
    for (const [k, [input, v]] of Object.entries(inputs)) {
      const raw = input.value;
      if (typeof v === "number") doc[k] = raw === "" ? null : Number(raw);
      else if (typeof v === "boolean") doc[k] = raw === "true";
      else doc[k] = raw === "" ? null : raw;
    }
    try {
      await api(`${base(loop)}/configurations/service`, { method: "PUT", body: doc });
      message.className = "good";
      message.textContent = "Saved.";
    } catch (err) {
      message.className = "error";
      message.textContent = err.message;
    }
  });
  main.replaceChildren(
    el("h1", {}, `${loop}: configuration`),
    form,
    el("div", { class: "card" }, el("h2", {}, "Policy"), el("p", {}, el("strong", {}, policy.name)), el("pre", {}, policy.arguments)),
  );
}

// ---- routing -----------------------------------------------------------------------------------

async function route() {
  clearInterval(timer);
  const mine = ++generation;
  if (!session) return;
  const hash = location.hash || "#/";
  const m = hash.match(/^#\/loops\/([^/]+)(\/[a-z]+)?$/);
  let page;
  if (m) {
    const loop = decodeURIComponent(m[1]);
    page = { "": () => loopPage(loop), "/evaluations": () => evaluationsPage(loop), "/decisions": () => decisionsPage(loop), "/configuration": () => configurationPage(loop) }[m[2] || ""];
  } else {
    page = overviewPage;
  }
  if (!page) page = overviewPage;
  const run = async () => {
    try {
      await page();
      if (mine === generation) document.body.dataset.ready = hash;
    } catch (err) {
      if (!(err instanceof Stale) && err.status !== 401 && mine === generation) main.replaceChildren(failure(err));
    }
  };
  await run();
  if (mine !== generation) return; // left while it loaded: the new page is in charge
  // Pages that only show figures refresh themselves; forms do not (an edit would be lost).
  if (page === overviewPage || (m && !m[2])) timer = setInterval(run, REFRESH_MS);
}

window.addEventListener("hashchange", route);

(async () => {
  const current = await api("/ui/session");
  if (current.role) {
    session = current;
    started();
  } else {
    showLogin("");
  }
})();
