"use strict";
// The labeling page: one key per class, s = skip, u = unsure, z = undo; every label is one POST, kept in the
// project's database with its time (the latest wins, the history stays).
const $ = (id) => document.getElementById(id);
let state = null;       // the last /api/state
let items = [];          // the batch, with each item's current label
let cursor = 0;
let undoStack = [];      // {id, seq} of this tab's writes, newest last
let viewShown = null;   // which set of images the grid shows: a round, or a sub-batch the strategy asks for
let queue = Promise.resolve();  // key actions, in order

async function api(path, body) {
  const opts = body === undefined ? {} : {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const r = await fetch(path, opts);
  if (!r.ok) {
    let msg = r.statusText;
    try { msg = (await r.json()).detail || msg; } catch (e) { /* not JSON */ }
    throw new Error(msg);
  }
  return r.json();
}

function keyOf(i) { return state.keys[i]; }

function renderKeys() {
  const box = $("keys");
  box.innerHTML = "";
  state.classes.forEach((c, i) => {
    const k = document.createElement("kbd"); k.textContent = keyOf(i);
    const n = document.createElement("span"); n.textContent = c;
    box.append(k, n);
  });
}

function stateText(it) {
  if (it.kind === "label") return "\u2713 " + it.label;
  if (it.kind === "skip") return "skipped";
  if (it.kind === "unsure") return "unsure";
  return "";
}

function renderCard(i) {
  const it = items[i];
  const card = document.querySelector(`.card[data-i="${i}"]`);
  if (!card) return;
  card.className = "card" + (it.kind && it.kind !== "clear" ? " " + it.kind : "") + (i === cursor ? " current" : "");
  card.dataset.kind = it.kind || "";
  card.querySelector(".state").textContent = stateText(it);
}

function renderGrid() {
  const grid = $("grid");
  grid.innerHTML = "";
  $("empty").hidden = items.length > 0;
  items.forEach((it, i) => {
    const card = document.createElement("div");
    card.className = "card";
    card.dataset.i = i; card.dataset.id = it.id;
    const img = document.createElement("img");
    img.src = "/api/thumb/" + it.id; img.alt = it.path; img.title = it.path;
    const meta = document.createElement("div"); meta.className = "meta";
    const rank = document.createElement("span"); rank.textContent = "#" + (it.rank + 1);
    const score = document.createElement("span");
    score.textContent = it.score === null ? "" : "score " + it.score.toFixed(3);
    meta.append(rank, score);
    const guess = document.createElement("div"); guess.className = "guess";
    guess.textContent = it.guesses.length ? it.guesses.map((g) => `${g[0]} ${(100 * g[1]).toFixed(0)}%`).join(" \u00b7 ") : "no model yet";
    const st = document.createElement("div"); st.className = "state";
    card.append(img, meta, guess, st);
    card.addEventListener("click", () => { cursor = i; renderAll(); });
    grid.append(card);
  });
  items.forEach((_, i) => renderCard(i));
}

function renderProgress() {
  const done = items.filter((it) => it.kind && it.kind !== "clear").length;
  const pct = items.length ? (100 * done) / items.length : 0;
  $("progress-bar").style.width = pct + "%";
  const s = state.status;
  $("progress-text").textContent = `batch ${done} / ${items.length} \u00b7 ${s.labeled} labeled of ${s.files} images`;
}

function renderCounts() {
  const s = state.status;
  const t = $("counts");
  t.innerHTML = "";
  const rows = Object.entries(s.per_class).concat([["skipped", s.skipped], ["unsure", s.unsure]]);
  for (const [c, n] of rows) {
    const tr = document.createElement("tr");
    tr.innerHTML = "<td></td><td class='n'></td>";
    tr.children[0].textContent = c; tr.children[1].textContent = n;
    t.append(tr);
  }
  $("validation-info").textContent =
    `Held-out set: ${s.validation_size} labeled images, training set ${s.train_size}: ${s.validation_note}.` +
    (s.last_accuracy === null || s.last_accuracy === undefined ? "" : ` Last accuracy ${(100 * s.last_accuracy).toFixed(1)}% on ${s.last_training.val_size}.`);
}

function renderJob() {
  const j = state.job;
  const box = $("job");
  box.className = j.state === "error" ? "error" : "";
  const busy = ["starting", "training", "querying", "asking"].includes(j.state);
  ["train", "query-only", "validation"].forEach((b) => { $(b).disabled = busy; });
  if (j.state === "training") box.textContent = `training: epoch ${j.epoch || 0} / ${j.epochs || "?"}` + (j.loss === undefined ? "" : `, loss ${j.loss.toFixed(3)}`) + " \u2014 keep labeling";
  else if (j.state === "querying" || j.state === "starting") box.textContent = "querying the next batch\u2026";
  else if (j.state === "asking") box.textContent = "the strategy waits for your labels of the images shown";
  else if (j.state === "error") box.textContent = "error: " + j.message;
  else if (j.state === "done" && j.training) box.textContent = `trained on ${j.training.train_size}, held-out accuracy ` + (j.training.val_accuracy === null ? "n/a (no held-out labels yet)" : `${(100 * j.training.val_accuracy).toFixed(1)}% on ${j.training.val_size}`);
  else box.textContent = "";
}

function renderNotes() {
  const box = $("notes");
  box.innerHTML = "";
  const r = state.round;
  if (r && r.info && r.info.fallback) {
    const p = document.createElement("p"); p.className = "warn";
    p.textContent = `Round ${r.round}: ${r.strategy === "random" ? "random picks" : r.strategy + " fell back to " + r.info.fallback} (${r.info.fallback_reason || ""})`;
    box.append(p);
  }
  if (r && r.kind === "validation") {
    const p = document.createElement("p"); p.textContent = r.info.purpose; box.append(p);
  }
}

function renderCurve() {
  const svg = $("curve");
  const pts = state.status.curve.filter((c) => c.accuracy !== null);
  const W = 260, H = 150, L = 30, B = 20, T = 8, R = 8;
  let html = `<line x1="${L}" y1="${H - B}" x2="${W - R}" y2="${H - B}" stroke="#c4cad6"/><line x1="${L}" y1="${T}" x2="${L}" y2="${H - B}" stroke="#c4cad6"/>`;
  html += `<text x="${L - 4}" y="${T + 6}" text-anchor="end">100%</text><text x="${L - 4}" y="${H - B}" text-anchor="end">0</text>`;
  if (pts.length) {
    const maxX = Math.max(...pts.map((p) => p.labels), 1);
    const x = (v) => L + ((W - L - R) * v) / maxX, y = (a) => H - B - (H - B - T) * a;
    const path = pts.map((p, i) => `${i ? "L" : "M"}${x(p.labels).toFixed(1)},${y(p.accuracy).toFixed(1)}`).join(" ");
    html += `<path d="${path}" fill="none" stroke="#2f6fdf" stroke-width="2"/>`;
    html += pts.map((p) => `<circle cx="${x(p.labels).toFixed(1)}" cy="${y(p.accuracy).toFixed(1)}" r="3" fill="#2f6fdf"><title>${p.labels} labels: ${(100 * p.accuracy).toFixed(1)}% on ${p.val_size}</title></circle>`).join("");
    html += `<text x="${W - R}" y="${H - 6}" text-anchor="end">${maxX} labels</text>`;
  } else {
    html += `<text x="${W / 2}" y="${H / 2}" text-anchor="middle">train to draw the curve</text>`;
  }
  svg.innerHTML = html;
}

function renderAll() {
  items.forEach((_, i) => renderCard(i));
  renderProgress();
  const cur = document.querySelector(".card.current");
  if (cur && cur.scrollIntoView) cur.scrollIntoView({block: "nearest"});
}

async function refresh() {
  state = await api("/api/state");
  $("project").textContent = state.project;
  const r = state.round;
  const asking = state.job.state === "asking" && state.asked.length > 0;
  const view = asking ? "ask:" + state.job.asked_round : "round:" + (r ? r.round : "none");
  const fresh = asking ? state.asked : state.batch;
  if (view !== viewShown) {
    viewShown = view;
    items = fresh;
    cursor = Math.max(0, items.findIndex((it) => !it.kind || it.kind === "clear"));
    undoStack = [];
    renderKeys();
    renderGrid();
    const sel = $("strategy");
    if (!sel.options.length) {
      state.strategies.forEach((s) => sel.add(new Option(s, s)));
      sel.value = state.strategies.includes("margin") ? "margin" : state.strategies[0];
    }
  } else {
    // other tabs' labels: take the server's state where it is newer than ours
    const byId = new Map(fresh.map((it) => [it.id, it]));
    const here = items[cursor];
    const wasOpen = here && (!here.kind || here.kind === "clear");
    items.forEach((it) => {
      const s = byId.get(it.id);
      if (s && (s.seq || 0) > (it.seq || 0)) { it.kind = s.kind; it.label = s.label; it.seq = s.seq; }
    });
    if (wasOpen && here.kind && here.kind !== "clear") {
      // another tab labeled the image under our cursor: move on to the next open one
      const next = items.findIndex((x, j) => j > cursor && (!x.kind || x.kind === "clear"));
      if (next >= 0) cursor = next;
    }
  }
  if (asking) {
    $("round-info").textContent = `The strategy asks for ${items.length} labels now (sub-batch ${state.job.asked_round}); it picks the rest of the batch from your answers.`;
  } else
  $("round-info").textContent = r ? `Round ${r.round}: ${r.kind === "validation" ? "label k per class (validation)" : r.strategy}, ${items.length} images` + (r.checkpoint ? "" : " (no model yet: random picks)") : "";
  renderCounts(); renderJob(); renderNotes(); renderCurve(); renderAll();
}

async function mark(kind, label) {
  const it = items[cursor];
  if (!it) return;
  const res = await api("/api/label", {id: it.id, kind, label});
  Object.assign(it, {kind: res.kind, label: res.label, seq: res.seq});
  undoStack.push({i: cursor, id: it.id, seq: res.seq});
  const next = items.findIndex((x, j) => j > cursor && (!x.kind || x.kind === "clear"));
  if (next >= 0) cursor = next; else if (cursor < items.length - 1) cursor += 1;
  renderAll();
  refreshSoon();
}

async function undo() {
  const last = undoStack.pop();
  if (!last) return;
  const res = await api("/api/undo", {id: last.id, seq: last.seq});
  const it = items[last.i];
  Object.assign(it, {kind: res.kind, label: res.label, seq: res.seq});
  cursor = last.i;
  renderAll();
  refreshSoon();
}

let timer = null;
function refreshSoon() { clearTimeout(timer); timer = setTimeout(() => refresh().catch(showError), 300); }
function showError(e) { $("job").className = "error"; $("job").textContent = "error: " + e.message; }

async function startJob(body) {
  await api("/api/train", body);
  await refresh();
}

document.addEventListener("keydown", (ev) => {
  if (!state || ev.ctrlKey || ev.metaKey || ev.altKey) return;
  if (ev.target.tagName === "INPUT" || ev.target.tagName === "SELECT") return;
  const k = ev.key.toLowerCase();
  const ci = state.keys.indexOf(k);
  let action = null;
  if (ci >= 0) action = () => mark("label", state.classes[ci]);
  else if (k === "s") action = () => mark("skip", null);
  else if (k === "u") action = () => mark("unsure", null);
  else if (k === "z" || k === "backspace") action = undo;
  else if (k === "arrowright") action = async () => { cursor = Math.min(items.length - 1, cursor + 1); renderAll(); };
  else if (k === "arrowleft") action = async () => { cursor = Math.max(0, cursor - 1); renderAll(); };
  else return;
  ev.preventDefault();
  // keys are handled one after another: a fast typist's second key waits for the first label's write
  queue = queue.then(action).catch(showError);
});

$("train").addEventListener("click", () => startJob({strategy: $("strategy").value, budget: +$("budget").value, train: true}).catch(showError));
$("query-only").addEventListener("click", () => startJob({strategy: $("strategy").value, budget: +$("budget").value, train: false}).catch(showError));
$("validation").addEventListener("click", () => startJob({strategy: "random", budget: 1, train: false, validation_per_class: +$("per-class").value}).catch(showError));

refresh().catch(showError);
setInterval(() => refresh().catch(showError), 2000);
