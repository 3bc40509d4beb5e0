// AR vs diffusion race on a shared clock: the body of a gr.HTML `js_on_load`.
// props.value is JSON from visualizers/race.py:payload(): two lanes, each with frames
// [offset, tokens (-1 = masked), elapsed_ms(, 1: not a pass, a block's given first token)]
// measured while that run ran on its own.
// The replay advances one clock for both lanes at true speed (or slower, to study it).

let data = null, clock = 0, speed = 1, raf = null, last = null;

const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const host = () => {
  let root = element.querySelector(".ttr");
  if (!root) { root = document.createElement("div"); root.className = "ttr"; element.appendChild(root); }
  return root;
};
const endMs = (run) => Math.max(run.stats.seconds ? run.stats.seconds * 1000 : 0, run.frames.length ? run.frames[run.frames.length - 1][2] : 0);
const total = () => Math.max(1, ...data.runs.map(endMs));

function parse(value) {
  if (!value) return null;
  try { return typeof value === "string" ? JSON.parse(value) : value; } catch (e) { return null; }
}

function laneAt(run, t) {
  const tok = [];
  let passes = 0;
  for (const [off, toks, ms, given] of run.frames) {
    if (ms > t) break;
    if (!given) passes++;
    toks.forEach((id, j) => { tok[off + j] = id; });
  }
  const keep = run.n_out === null ? tok.length : run.n_out;
  const made = tok.filter((id, p) => id >= 0 && p < keep).length;
  return {tok, passes, made};
}

function lane(run, t) {
  const s = laneAt(run, t), end = endMs(run), done = t >= end;
  const cells = s.tok.map((id, p) => {
    if (id === undefined) return "";
    if (id < 0 && run.n_out !== null && p > run.n_out) return "";   // past end-of-text: never written
    if (id < 0) return `<span class="ttr-cell masked">▢</span>`;
    const after = run.n_out !== null && p >= run.n_out;
    const special = run.special.includes(id);
    return `<span class="ttr-cell${after ? " after" : ""}${special ? " special" : ""}">${esc(run.pieces[String(id)] ?? `<${id}>`)}</span>`;
  }).join("");
  const rate = t > 0 ? (s.made / (Math.min(t, end) / 1000)).toFixed(1) : "0.0";
  const flag = done ? `<span class="ttr-done">finished in ${(end / 1000).toFixed(2)} s</span>` : "";
  return `<div class="ttr-lane ${run.mode}"><div class="ttr-head"><b>${esc(run.name)}</b>
    <span>${s.made} tokens · ${s.passes} passes · ${rate} tok/s</span>${flag}</div>
    <div class="ttr-progress"><div style="width:${Math.min(100, 100 * Math.min(t, end) / total())}%"></div></div>
    <div class="ttr-text">${cells || '<span class="ttr-wait">prefilling…</span>'}</div></div>`;
}

function build() {
  const root = host();
  if (!data) {
    root.innerHTML = `<div class="ttr-empty">Press <b>Race</b>: the same prompt, seed and model run once as AR and once as diffusion, each timed on its own, then replay here side by side on one clock.</div>`;
    return;
  }
  root.innerHTML = `<div class="ttr-controls">
      <button data-act="play"></button>
      <input type="range" min="0" max="${Math.ceil(total())}" value="0" step="1" aria-label="time">
      <span class="ttr-clock"></span>
      <select title="replay speed">${[0.1, 0.25, 0.5, 1, 2].map((v) => `<option value="${v}" ${v === speed ? "selected" : ""}>${v}×${v === 1 ? " (true speed)" : ""}</option>`).join("")}</select>
    </div><div class="ttr-lanes"></div>`;
  root.querySelector("button[data-act=play]").addEventListener("click", () => (raf ? pause() : play()));
  const range = root.querySelector("input[type=range]");
  range.addEventListener("input", () => { pause(); clock = parseFloat(range.value); update(); });
  const sel = root.querySelector("select");
  sel.addEventListener("change", () => { speed = parseFloat(sel.value); });
  update();
}

function update() {
  const root = host();
  if (!data || !root.querySelector(".ttr-lanes")) return;
  root.querySelector(".ttr-lanes").innerHTML = data.runs.map((run) => lane(run, clock)).join("");
  root.querySelector(".ttr-clock").textContent = `${(clock / 1000).toFixed(2)} s / ${(total() / 1000).toFixed(2)} s`;
  root.querySelector("input[type=range]").value = String(Math.floor(clock));
  root.querySelector("button[data-act=play]").textContent = raf ? "❚❚ Pause" : "▶ Replay";
}

function tick(now) {
  if (last !== null) clock += (now - last) * speed;
  last = now;
  if (clock >= total()) { clock = total(); raf = null; last = null; update(); return; }
  update();
  raf = requestAnimationFrame(tick);
}

function play() {
  if (!data) return;
  if (clock >= total()) clock = 0;
  last = null;
  raf = requestAnimationFrame(tick);
  update();
}

function pause() { if (raf) cancelAnimationFrame(raf); raf = null; last = null; update(); }

function load() {
  pause();
  data = parse(props.value);
  clock = 0;
  build();
  if (data) play();
}

load();
watch("value", load);
