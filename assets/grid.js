// Token grid with playback: the body of a gr.HTML `js_on_load` (element, props, watch).
// props.value is a JSON string made by visualizers/trajectory.py:payload(). Frames are
// [block, step, offset, tokens, guess, conf, new, planned, elapsed_ms, nfe]; tokens are -1
// where masked; the grid at frame i = every commit of frames 0..i + frame i's masked guesses.
// Everything here runs in the browser: scrubbing never calls the server.

let data = null;        // parsed payload
let frame = 0;          // index into data.frames
let picked = null;      // generated position whose candidates are shown
let timer = null;       // play interval
let speed = 4;          // frames per second

const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const host = () => {
  let root = element.querySelector(".ttg");
  if (!root) { root = document.createElement("div"); root.className = "ttg"; element.appendChild(root); }
  return root;
};
const piece = (id) => (data.pieces[String(id)] ?? `<${id}>`);
const isSpecial = (id) => data.special.includes(id);

function parse(value) {
  if (!value) return null;
  try { return typeof value === "string" ? JSON.parse(value) : value; } catch (e) { return null; }
}

// ---- state at a frame --------------------------------------------------------------------
function stateAt(i) {
  const b = data.base;
  const s = {tok: b.tok.slice(), conf: b.conf.slice(), cstep: b.cstep.slice(),
             status: b.tok.map((t) => (t >= 0 ? "c" : undefined)), guess: [], gconf: []};
  let f = null;
  for (let k = 0; k <= i && k < data.frames.length; k++) {
    f = data.frames[k];
    const [, step, off, toks, , conf, fresh] = f;
    for (const j of fresh) {
      const p = off + j;
      s.tok[p] = toks[j]; s.conf[p] = conf[j]; s.cstep[p] = step; s.status[p] = k === i ? "n" : "c";
    }
  }
  if (f && data.mode === "diffusion") {
    const [, , off, toks, guess, conf] = f;
    toks.forEach((t, j) => {
      if (t < 0) { s.status[off + j] = "m"; s.guess[off + j] = guess[j]; s.gconf[off + j] = conf[j]; }
    });
  }
  s.frame = f;
  return s;
}

// ---- rendering ---------------------------------------------------------------------------
function cell(s, p, block) {
  const st = s.status[p];
  if (st === undefined) return "";
  const after = data.n_out !== null && p >= data.n_out;
  const masked = st === "m";
  const id = masked ? s.guess[p] : s.tok[p];
  const conf = masked ? s.gconf[p] : s.conf[p];
  const cls = ["ttg-cell", "st-" + st, isSpecial(id) ? "special" : "", after ? "after" : "",
               picked === p ? "picked" : ""].join(" ");
  const where = data.mode === "diffusion" ? `block ${block}` : `token ${p}`;
  const title = masked
    ? `position ${p} · ${where} · masked; best guess '${piece(id)}' p=${conf / 100}`
    : `position ${p} · ${where}${data.mode === "diffusion" ? ` · committed at step ${s.cstep[p]}` : ""} · p=${conf / 100}${after ? " · after end-of-text" : ""}`;
  return `<span class="${cls}" data-pos="${p}" title="${esc(title)}"><span class="ttg-t">${esc(piece(id))}</span>` +
         `<span class="ttg-bar" style="width:${conf}%"></span></span>`;
}

function rows(s) {
  const active = s.frame ? s.frame[0] : -1;
  return data.blocks.map(([start, size], k) => {
    let cells = "";
    for (let p = start; p < start + size; p++) cells += cell(s, p, k);
    if (!cells) return "";
    const isActive = data.mode === "diffusion" && k === active;
    const name = data.mode === "diffusion" ? `B${k}` : `${start}`;
    return `<div class="ttg-row${isActive ? " active" : ""}"><span class="ttg-bl" title="${data.mode === "diffusion" ? "block" : "first token of the row"}">${name}</span><span class="ttg-cells">${cells}</span></div>`;
  }).join("");
}

function info(s) {
  const f = s.frame;
  if (!f) return data.live ? "Prefilling the prompt…" : "No steps recorded.";
  const [block, step, , , , , fresh, planned, ms, nfe] = f;
  const t = (ms / 1000).toFixed(2);
  if (data.mode === "ar") return `Token <b>${step + 1}</b> · forward pass ${nfe} · ${t} s`;
  const nb = data.blocks.length, steps = data.blocks[block] ? data.blocks[block][2] : "?";
  const floor = fresh.length > planned ? ` — the threshold${data.threshold !== null ? ` (${data.threshold})` : ""} passed ${planned}, the step floor raised it` : "";
  return `Block <b>${block + 1}</b>/${nb} · step <b>${step + 1}</b>/${steps} · NFE ${nfe} · ${t} s · committed <b>${fresh.length}</b> this step${floor}`;
}

const LEGEND = `<div class="ttg-legend">
  <span class="ttg-cell st-c"><span class="ttg-t">word</span><span class="ttg-bar" style="width:80%"></span></span> committed earlier
  <span class="ttg-cell st-n"><span class="ttg-t">word</span><span class="ttg-bar" style="width:60%"></span></span> committed this step
  <span class="ttg-cell st-m"><span class="ttg-t">guess</span><span class="ttg-bar" style="width:30%"></span></span> masked (faint: current best guess)
  <span class="ttg-cell st-c special"><span class="ttg-t">&lt;eos&gt;</span></span> special / end-of-text
  <span class="ttg-cell st-c after"><span class="ttg-t">word</span></span> after end-of-text (not in the output)
  <span class="ttg-key">bar under a token = its probability p · · = space · ⏎ = newline · click a token for its candidates</span></div>`;

function entropyBound(probs) {
  const rest = Math.max(0, 1 - probs.reduce((a, b) => a + b, 0));
  return [...probs, rest].filter((p) => p > 0).reduce((h, p) => h - p * Math.log(p), 0);
}

function candidates() {
  if (picked === null) return `<div class="ttg-cands muted">Click a token to see its top candidates at every step.</div>`;
  if (!data.top) return `<div class="ttg-cands muted">Candidates for position ${picked} arrive when the run ends.</div>`;
  let out = "";
  data.frames.forEach((f, k) => {
    const [, step, off, toks, , , fresh] = f;
    const j = picked - off;
    if (j < 0 || j >= toks.length) return;
    const [ids, probs1000] = data.top[k][j];
    const probs = probs1000.map((p) => p / 1000);
    const state = fresh.includes(j) ? "<b>committed</b>" : toks[j] < 0 ? "masked" : "kept";
    const cands = ids.map((id, r) => `<span class="${r === 0 ? "top1" : ""}">${esc(piece(id))} ${probs[r].toFixed(3)}</span>`).join(" ");
    const margin = probs.length > 1 ? (probs[0] - probs[1]).toFixed(3) : "–";
    out += `<tr class="${k === frame ? "now" : ""}" data-frame="${k}"><td>${data.mode === "ar" ? "" : step}</td><td>${state}</td><td>${cands}</td><td>${margin}</td><td>${entropyBound(probs).toFixed(2)}</td></tr>`;
  });
  return `<div class="ttg-cands"><div class="ttg-h">Position ${picked}: top candidates per step (click a row to jump)</div>
    <table><tr><th>step</th><th>state</th><th>candidates (p)</th><th>margin p1−p2</th><th>entropy ≥ (nats)</th></tr>${out}</table></div>`;
}

function findings() {
  if (!data.findings || !data.findings.length) return "";
  const items = data.findings.map((f, k) =>
    `<button class="ttg-find kind-${esc(f.kind)}" data-k="${k}" title="jump to this step">${esc(f.kind)}: ${esc(f.text)}</button>`).join("");
  const kinds = {};
  data.findings.forEach((f) => { kinds[f.kind] = (kinds[f.kind] || 0) + 1; });
  const counts = Object.entries(kinds).map(([k, n]) => `${n} ${k}`).join(", ");
  return `<details class="ttg-findings"><summary>Worth a look: ${esc(counts)} (click one to jump to its step)</summary><div class="ttg-find-list">${items}</div></details>`;
}

function controls() {
  return `<div class="ttg-controls">
    <button data-act="first" title="first step">⇤</button>
    <button data-act="back" title="step back (←)">◀ back</button>
    <button data-act="play" title="play / pause (space)">▶ play</button>
    <button data-act="fwd" title="step forward (→)">step ▶</button>
    <button data-act="last" title="last step">⇥</button>
    <input type="range" min="0" max="0" value="0" aria-label="step">
    <select data-act="speed" title="playback speed">${[1, 2, 4, 8, 16].map((v) => `<option value="${v}" ${v === speed ? "selected" : ""}>${v} steps/s</option>`).join("")}</select>
    <span class="ttg-pos"></span><span class="ttg-live">● live</span></div>`;
}

// The skeleton is built once per payload; `update` refreshes only what a frame changes,
// so the controls keep focus and stay usable during playback.
function build() {
  const root = host();
  if (!data) {
    root.innerHTML = `<div class="ttg-empty">Run a prompt (or import a trace) to watch the denoiser unmask tokens, step by step.</div>`;
    return;
  }
  root.innerHTML = controls() + `<div class="ttg-info"></div><div class="ttg-grid" tabindex="0"></div>` +
    LEGEND + findings() + `<div class="ttg-cands-host"></div>`;
  wire(root);
  update();
}

function update() {
  const root = host();
  if (!data || !root.querySelector(".ttg-grid")) return;
  const s = stateAt(frame), n = data.frames.length;
  root.querySelector(".ttg-info").innerHTML = info(s);
  root.querySelector(".ttg-grid").innerHTML = rows(s);
  root.querySelector(".ttg-cands-host").innerHTML = candidates();
  const range = root.querySelector("input[type=range]");
  range.max = String(Math.max(0, n - 1));
  range.value = String(frame);
  root.querySelector(".ttg-pos").textContent = `${n ? data.first_frame + frame + 1 : 0}/${data.first_frame + n}`;
  root.querySelector("button[data-act=play]").textContent = timer ? "❚❚ pause" : "▶ play";
  root.querySelectorAll(".ttg-controls button, .ttg-controls input, .ttg-controls select").forEach((c) => { c.disabled = data.live; });
  root.querySelector(".ttg-live").style.display = data.live ? "" : "none";
}

// ---- interaction -------------------------------------------------------------------------
function go(i) {
  frame = Math.max(0, Math.min(data.frames.length - 1, i));
  update();
}

function stop() { if (timer) { clearInterval(timer); timer = null; } }

function play() {
  if (timer) { stop(); update(); return; }
  if (frame >= data.frames.length - 1) frame = 0;
  timer = setInterval(() => {
    if (!data || frame >= data.frames.length - 1) { stop(); update(); return; }
    go(frame + 1);
  }, 1000 / speed);
  update();
}

function wire(root) {
  const acts = {first: () => go(0), back: () => go(frame - 1), fwd: () => go(frame + 1),
                last: () => go(data.frames.length - 1), play: play};
  root.querySelectorAll("button[data-act]").forEach((b) => b.addEventListener("click", () => {
    if (b.dataset.act !== "play") stop();
    acts[b.dataset.act]();
  }));
  const range = root.querySelector("input[type=range]");
  range.addEventListener("input", () => { stop(); go(parseInt(range.value, 10)); });
  const sel = root.querySelector("select[data-act=speed]");
  sel.addEventListener("change", () => { speed = parseInt(sel.value, 10); if (timer) { stop(); play(); } });
  const grid = root.querySelector(".ttg-grid");
  grid.addEventListener("click", (e) => {          // delegated: cells are re-rendered each frame
    const c = e.target.closest(".ttg-cell");
    if (c) { picked = parseInt(c.dataset.pos, 10); update(); }
  });
  grid.addEventListener("keydown", (e) => {
    if (data.live) return;
    if (e.key === "ArrowLeft") { stop(); go(frame - 1); e.preventDefault(); }
    if (e.key === "ArrowRight") { stop(); go(frame + 1); e.preventDefault(); }
    if (e.key === " ") { play(); e.preventDefault(); }
  });
  root.querySelector(".ttg-cands-host").addEventListener("click", (e) => {
    const r = e.target.closest("tr[data-frame]");
    if (r) { stop(); go(parseInt(r.dataset.frame, 10)); }
  });
  root.querySelectorAll(".ttg-find").forEach((b) => b.addEventListener("click", () => {
    const f = data.findings[parseInt(b.dataset.k, 10)];
    stop(); picked = f.pos; go(f.frame - data.first_frame);
  }));
}

function load() {
  const next = parse(props.value);
  const wasLive = data && data.live;
  const atEnd = !data || frame >= data.frames.length - 1;
  data = next;
  if (data) {
    stop();
    if (data.live || wasLive || atEnd) frame = Math.max(0, data.frames.length - 1);
    frame = Math.min(frame, Math.max(0, data.frames.length - 1));
    if (!wasLive) picked = null;                  // a new run or an imported trace
  }
  build();
}

load();
watch("value", load);
