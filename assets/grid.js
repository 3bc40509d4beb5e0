// Token grid with playback: the body of a gr.HTML `js_on_load` (element, props, watch).
// props.value is a JSON string made by visualizers/trajectory.py:payload(). Frames are
// [block, step, offset, tokens, guess, conf, new, planned, elapsed_ms, nfe(, drafts, rejected(, tree))];
// tokens are -1 where masked; the grid at frame i = every commit of frames 0..i + frame i's
// masked guesses and (verify order) its drafts.
// Everything here runs in the browser: scrubbing never calls the server. In the app
// (data.actions) two buttons do: "fork here" triggers `select` {block, step}, and the
// inspector's "ask the AR model" triggers `submit` {pos}; the answer arrives as props.ar.

let data = null;        // parsed payload
let frame = 0;          // index into data.frames
let picked = null;      // generated position whose candidates are shown
let timer = null;       // play interval
let speed = 4;          // frames per second
let ar = null;          // the AR model's predictions per position (props.ar), for this payload
let asking = false;     // an AR request is on its way
let marks = true;       // show failure findings on the grid's cells
let flags = {};         // position -> findings that mark it
let listOpen = false;   // the findings list is unfolded (kept across re-renders)

const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const host = () => {
  let root = element.querySelector(".ttg");
  if (!root) { root = document.createElement("div"); root.className = "ttg"; element.appendChild(root); }
  return root;
};
const piece = (id) => (data.pieces[String(id)] ?? (ar && ar.pieces && ar.pieces[String(id)]) ?? `<${id}>`);
const isSpecial = (id) => data.special.includes(id);

function parse(value) {
  if (!value) return null;
  try { return typeof value === "string" ? JSON.parse(value) : value; } catch (e) { return null; }
}

// ---- state at a frame --------------------------------------------------------------------
function stateAt(i) {
  const b = data.base;
  const s = {tok: b.tok.slice(), conf: b.conf.slice(), cstep: b.cstep.slice(), cframe: b.tok.map(() => -1),
             status: b.tok.map((t) => (t >= 0 ? "c" : undefined)), guess: [], gconf: []};
  let f = null;
  for (let k = 0; k <= i && k < data.frames.length; k++) {
    f = data.frames[k];
    const [block, step, off, toks, , conf, fresh] = f;
    const g = givenOf(block);
    if (g && !(s.tok[off] >= 0)) {                         // written before the block's first step
      s.tok[off] = g[0]; s.conf[off] = g[1]; s.cstep[off] = -1; s.cframe[off] = k; s.status[off] = "c";
    }
    for (const j of fresh) {
      const p = off + j;
      s.tok[p] = toks[j]; s.conf[p] = conf[j]; s.cstep[p] = step; s.cframe[p] = k;
      s.status[p] = k === i ? "n" : "c";
    }
  }
  if (f && data.mode === "diffusion") {
    const [, , off, toks, guess, conf, , , , , drafts] = f;
    toks.forEach((t, j) => {
      if (t >= 0) return;
      const draft = drafts && drafts[j] >= 0;
      s.status[off + j] = draft ? "d" : "m"; s.guess[off + j] = draft ? drafts[j] : guess[j]; s.gconf[off + j] = conf[j];
    });
  }
  s.frame = f;
  return s;
}

// [token, p in %] of a block's first token when the context tower's pass wrote it (verify order), else null.
const givenOf = (block) => (data.given && data.given[block]) || null;
const isGiven = (p, s) => s.cstep[p] === -1 && s.tok[p] >= 0 && data.mode === "diffusion";
const GIVEN_NOTE = "written before step 0 by the context tower: its pass over the text before this block " +
  "predicted it as the AR model's next token, so no denoiser pass was spent on it";

// ---- rendering ---------------------------------------------------------------------------
function cell(s, p, block) {
  const st = s.status[p];
  if (st === undefined) return "";
  const after = data.n_out !== null && p >= data.n_out;
  const masked = st === "m" || st === "d";
  const id = masked ? s.guess[p] : s.tok[p];
  const conf = masked ? s.gconf[p] : s.conf[p];
  const flagged = marks && !masked && flags[p];
  const inherited = !masked && data.fork && s.cframe[p] >= 0 && s.cframe[p] < data.fork.frame;
  const given = !masked && isGiven(p, s);
  const cls = ["ttg-cell", "st-" + st, given ? "given" : "", isSpecial(id) ? "special" : "", after ? "after" : "",
               picked === p ? "picked" : "", flagged ? "flag kind-" + flagged[0].kind : "",
               inherited ? "inh" : ""].join(" ");
  const where = data.mode === "diffusion" ? `block ${block}` : `token ${p}`;
  const title = (st === "d"
    ? `position ${p} · ${where} · draft '${piece(id)}' p=${conf / 100}: the next pass reads it as written text, ` +
      "and the AR model's prediction there decides whether it stays"
    : masked
    ? `position ${p} · ${where} · masked; best guess '${piece(id)}' p=${conf / 100}` +
      (after ? " · after end-of-text: left masked, the output ends before it" : "")
    : `position ${p} · ${where}${given ? ` · ${GIVEN_NOTE}` : data.mode === "diffusion" ? ` · committed at step ${s.cstep[p]}` : ""} · p=${conf / 100}${endNote(p, id)}`)
    + (inherited ? " · inherited from the original run" : "")
    + (flagged ? flagged.map((f) => `\n⚑ ${f.kind}: ${f.text}`).join("") : "");
  return `<span class="${cls}" data-pos="${p}" title="${esc(title)}"><span class="ttg-t">${esc(piece(id))}</span>` +
         `<span class="ttg-bar" style="width:${conf}%"></span></span>`;
}

// Where a committed position stands to the output's end: the end-of-text that ends it
// (its findings count, as the end is part of what happened), or past it.
const endNote = (p, id) => data.n_out === null || p < data.n_out ? ""
  : p === data.n_out && isSpecial(id) ? " · the end-of-text that ends the output (not in the text)"
  : " · after end-of-text";

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
  const nb = data.blocks.length, steps = budget(block, frame);
  const fork = !data.fork ? "" : frame < data.fork.frame
    ? ` · <span class="ttg-inh-note">inherited from the original run</span>`
    : ` · <span class="ttg-fork-note">fork: ${esc(changes())}</span>`;
  // blocks and steps count from 0 everywhere (row labels B0.., the inspector, the Fork tab)
  return `Block <b>B${block}</b> (${nb} ${data.live ? "so far" : "in all"}) · step <b>${step}</b> (${steps} allowed, counted from 0) · NFE ${nfe} · ${t} s · committed <b>${fresh.length}</b> this step${fork}` +
    `<div class="ttg-rule">${rule(s.frame, steps, gammaAt(frame))}</div>`;
}

// The step budget of a block; a fork's inherited steps of the forked block ran under the parent's.
function budget(block, k) {
  if (data.fork && block === data.fork.block && k < data.fork.frame && data.fork.parent_steps) return data.fork.parent_steps;
  return data.blocks[block] ? data.blocks[block][2] : "?";
}

// The threshold a frame ran under: a fork's inherited frames ran under the parent's.
function gammaAt(k) {
  const was = data.fork && data.fork.changes && data.fork.changes.threshold;
  return was && k < data.fork.frame ? was[0] : data.threshold;
}

function changes() {
  const c = Object.entries(data.fork.changes || {});
  return c.length ? c.map(([k, [a, b]]) => `${k} ${a} → ${b}`).join(", ") : "same settings";
}

// Teaching aid: the commit rule of this step, with its numbers.
function rule(f, steps, threshold) {
  const [, step, , toks, , , fresh, planned] = f;
  if (f.length > 10) return verifyRule(f, steps, threshold);
  const masked = toks.filter((t) => t < 0).length + fresh.length;
  const left = typeof steps === "number" ? steps - step : null;
  if (left === null || masked === 0) return "";
  const floor = Math.ceil(masked / left);
  const gamma = threshold !== null && threshold !== undefined ? `γ = ${threshold}` : "the threshold";
  const why = left === 1 ? "last step of the block: every masked position is committed"
    : fresh.length > Math.max(planned, 1) ? `the floor ⌈${masked} masked / ${left} steps left⌉ = ${floor} raised it`
    : planned === 0 ? "none passed, so one is committed anyway: the first in the commit order"
    : "the threshold decided";
  const counted = data.remasking === "prefix"      // prefix counts only the run right after the written text
    ? `masked positions in a row right after the written text (of ${masked} masked) had` : `of ${masked} masked positions had`;
  return `Commit rule: <b>${planned}</b> ${counted} p &gt; ${gamma} → committed <b>${fresh.length}</b> (${why}).`;
}

// The verify order: the drafts the pass checked, what held, what it proposes next.
function verifyRule(f, steps, threshold) {
  const [block, step, , , , , fresh, planned, , , , rejected] = f;
  const prev = frame > 0 ? data.frames[frame - 1] : null;
  const checked = prev && prev[0] === block && prev[10] ? prev[10].filter((d) => d >= 0).length : 0;
  const held = checked - rejected.length;
  const last = typeof steps === "number" && steps - step === 1;
  const gamma = threshold !== null && threshold !== undefined ? `γ = ${threshold}` : "the threshold";
  const check = checked === 0 ? "no drafts to check"
    : rejected.length === 0 ? (checked === 1 ? "its one draft held (the AR model's own next token)"
      : `all <b>${checked}</b> drafts held (each was the AR model's own next token)`)
    : `<b>${held}</b> of ${checked} drafts held; the next one was not the AR model's token, so ` +
      (rejected.length === 1 ? "it was dropped" : `it and the ${rejected.length - 1} after it were dropped`);
  const next = last ? "last step of the block: every position left is committed"
    : rejected.length ? "no new drafts: this pass read a wrong one, so its guesses past it are not trusted"
    : `<b>${planned}</b> masked position${planned === 1 ? "" : "s"} in a row with p &gt; ${gamma} became the next drafts`;
  const what = last ? "" : held > 0 ? " (the held drafts and the AR model's next token)" : " (the AR model's next token)";
  const given = step === 0 && givenOf(block)
    ? ` <span class="ttg-given-note">Before it, the context tower's pass over the text so far gave the block its first token, ` +
      `<b>${esc(piece(givenOf(block)[0]))}</b> (the AR model's next token): no denoiser pass is spent on it.</span>` : "";
  if (data.draft_nodes > 0 || data.draft_width > 0) return treeRule(f, last, gamma) + given;
  return `Verify: ${check} → committed <b>${fresh.length}</b>${what} · ${next}.${given}`;
}

// The verify order with draft trees: every path of the tree was a block row of this pass.
function treeRule(f, last, gamma) {
  const [, , , toks, , , fresh, planned, , , , , tree] = f;
  const paths = tree || [];
  const kept = last ? "last step of the block: every position left is committed"
    : !tree ? "the longest path of the draft tree that the AR model agrees with was kept"   // a trace from before trees were recorded
    : !paths.length ? "no tree to check yet: the AR model's next token was kept"
    : `of the <b>${paths.length}</b> path${paths.length === 1 ? "" : "s"} of the draft tree (a block row per node), ` +
      "the longest the AR model agrees with was kept";
  const next = last ? "" : planned
    ? ` · the next tree: ${data.draft_nodes ? `the ${data.draft_nodes} likeliest paths of drafts` : "drafted"} ` +
      `(its likeliest path, <b>${planned}</b> deep, is shown dashed)`
    : " · no new drafts (none likely enough, or the block is full)";
  return `Verify, draft tree: ${kept} → committed <b>${fresh.length}</b>${last || (tree && !paths.length) ? "" : " (that path and the AR model's next token)"}${next}.` +
    treeView(paths, toks, fresh.length ? Math.min(...fresh) : 0);
}

// The tree a pass checked, one line per leaf path: the tokens the AR model agreed with (✓),
// the first it did not (✗) and the untried rest; the path that went furthest is marked kept.
const TREE_LINES = 12;
function treeView(paths, toks, start) {
  if (!paths.length) return "";
  const agreed = paths.map((p) => { const i = p.findIndex((t, k) => toks[start + k] !== t); return i < 0 ? p.length : i; });
  const best = Math.max(...agreed);
  const order = paths.map((p, i) => i).sort((a, b) => agreed[b] - agreed[a]);
  const line = (i) => {       // "kept" once: paths that share the kept node agree as deep
    const tok = (t, k) => `<span class="ttg-tree-tok ${k < agreed[i] ? "ok" : k === agreed[i] ? "no" : "rest"}">${esc(piece(t))}</span>`;
    const mark = i === order[0] && best > 0 ? `<span class="ttg-tree-kept">kept</span>` : "";
    return `<div class="ttg-tree-path">${paths[i].map(tok).join("")}${mark}</div>`;
  };
  const more = paths.length > TREE_LINES ? `<div class="ttg-tree-more">… ${paths.length - TREE_LINES} more paths</div>` : "";
  return `<div class="ttg-tree" title="the draft tree this pass checked, one line per path (✓ the AR model's token, ✗ not, grey: not reached)">` +
    `<div class="ttg-tree-head">the tree this pass checked, from position ${start} of the block:</div>` +
    order.slice(0, TREE_LINES).map(line).join("") + more + "</div>";
}

// One legend entry: a sample cell and its meaning, kept together when the legend wraps.
const entry = (cell, text, only = "") => `<span class="ttg-leg${only ? " " + only : ""}">${cell}<span>${text}</span></span>`;
const sample = (cls, text, bar) => `<span class="ttg-cell ${cls}"><span class="ttg-t">${text}</span>` +
  (bar ? `<span class="ttg-bar" style="width:${bar}%"></span>` : "") + "</span>";
const LEGEND = `<div class="ttg-legend">` +
  entry(sample("st-c", "word", 80), "committed earlier") +
  entry(sample("st-n", "word", 60), "committed this step") +
  entry(sample("st-m", "guess", 30), "masked (faint: current best guess)", "ttg-diffusion-only") +
  entry(sample("st-c given", "word", 90), "a block's first token, from the context tower's pass (no denoiser step)", "ttg-verify-only") +
  entry(sample("st-d", "draft", 95), "draft, checked by the next pass (verify order)", "ttg-verify-only") +
  entry(sample("st-c special", "&lt;eos&gt;"), "special / end-of-text") +
  entry(sample("st-c after", "word"), "after end-of-text (not in the output)") +
  entry(sample("st-c flag kind-low-confidence", "word"), 'flagged (see "worth a look")') +
  entry(sample("st-c inh", "word"), "inherited by a fork", "ttg-fork-only") +
  `<span class="ttg-key">bar under a token = its probability p · · = space · ⏎ = newline · click a token for its candidates</span></div>`;

function entropyBound(probs) {
  const rest = Math.max(0, 1 - probs.reduce((a, b) => a + b, 0));
  return [...probs, rest].filter((p) => p > 0).reduce((h, p) => h - p * Math.log(p), 0);
}

// ---- position inspector --------------------------------------------------------------------
// Every frame of the picked position's block: its candidates, margin, entropy, whether the
// best guess flipped, and (on request) what the AR model would have put there.
function inspector() {
  if (picked === null) return `<div class="ttg-cands muted">Click a token to inspect it: its top candidates at every step, when it was committed, whether its best guess flipped${data.actions ? ", and what the AR model would have put there" : ""}.</div>`;
  if (!data.top) return `<div class="ttg-cands muted">Candidates for position ${picked} arrive when the run ends.</div>`;
  let out = "", prev = null, flips = [], commit = null;
  const gb = data.blocks.findIndex(([start]) => start === picked);
  if (data.mode === "diffusion" && givenOf(gb)) commit = {block: gb, step: null, given: true, tok: givenOf(gb)[0], p: givenOf(gb)[1] / 100};
  data.frames.forEach((f, k) => {
    const [block, step, off, toks, guess, conf, fresh] = f;
    const j = picked - off;
    if (j < 0 || j >= toks.length) return;
    const [ids, probs1000] = data.top[k][j];
    const probs = probs1000.map((p) => p / 1000);
    const wasMasked = toks[j] < 0 || fresh.includes(j);
    const flip = wasMasked && prev !== null && prev !== guess[j];
    if (flip) flips.push(data.mode === "ar" ? k : step);
    // a sampled token outside the top candidates: its p from the frame (two decimals)
    if (fresh.includes(j)) commit = {block, step, k, tok: toks[j], p: ids.includes(toks[j]) ? probs[ids.indexOf(toks[j])] : conf[j] / 100,
                                     rounded: !ids.includes(toks[j])};
    prev = wasMasked ? guess[j] : null;
    const drafted = f[10] && f[10][j] >= 0;
    const state = fresh.includes(j) ? "<b>committed</b>" : drafted ? "draft" : toks[j] < 0 ? "masked" : "kept";
    const cands = ids.map((id, r) => cand(id, probs[r], r === 0)).join(" ");
    const margin = probs.length > 1 ? (probs[0] - probs[1]).toFixed(3) : "–";
    const inh = data.fork && k < data.fork.frame ? " inh" : "";
    out += `<tr class="${k === frame ? "now" : ""}${inh}" data-frame="${k}"><td>${data.mode === "ar" ? "" : step}</td><td>${state}</td>` +
           `<td>${flip ? '<span class="ttg-flip" title="the best guess changed at this step">↻</span>' : ""}</td>` +
           `<td class="ttg-cs">${cands}</td><td>${margin}</td><td>${entropyBound(probs).toFixed(2)}</td></tr>`;
  });
  return `<div class="ttg-cands"><div class="ttg-h">Position ${picked}${summary(commit, flips)}</div>
    ${arSection(commit)}
    <table><tr><th>step</th><th>state</th><th title="best guess changed">flip</th><th>candidates (p)</th><th>margin p1−p2</th><th>entropy ≥ (nats)</th></tr>${out}</table>
    <div class="ttg-note">Click a row to jump to that step. Rows after the commit ("kept") show what the denoiser predicts there now, from the text around it (a clean_as_ar denoiser, once the text before is written: the AR model's own prediction), which may no longer include the committed token. Entropy is a lower bound from the top candidates (the rest of the mass counted as one).</div></div>`;
}

// One candidate: its piece in a chip (so punctuation and spaces stay readable), then p.
const cand = (id, p, top) => `<span class="ttg-c${top ? " top1" : ""}"><span class="ttg-p">${esc(piece(id))}</span> ${p.toFixed(3)}</span>`;

function summary(commit, flips) {
  if (!commit) return ": not committed yet";
  if (commit.given) return `: <b>${esc(piece(commit.tok))}</b>, block ${commit.block}'s first token (p=${commit.p.toFixed(3)}), ${GIVEN_NOTE}`;
  const where = data.mode === "ar" ? `token ${commit.k + 1}` : `block ${commit.block}, step ${commit.step}`;
  const after = endNote(picked, commit.tok);
  const flipped = data.mode === "ar" ? "" : flips.length
    ? ` · best guess flipped <b>${flips.length}</b>× (step${flips.length > 1 ? "s" : ""} ${flips.join(", ")})`
    : " · best guess never flipped";
  const p = commit.p === undefined ? "" : commit.rounded
    ? ` with p≈${commit.p.toFixed(2)} (not among the top candidates)` : ` with p=${commit.p.toFixed(3)}`;
  return `: <b>${esc(piece(commit.tok))}</b>, committed at ${where}${p}${flipped}${after}`;
}

function arSection(commit) {
  if (!data.actions && !ar) return "";
  if (ar && ar.error) return `<div class="ttg-ar muted">The AR model's view is not available: ${esc(ar.error)}</div>`;
  if (ar && picked < ar.top.length) {
    const [ids, probs] = ar.top[picked];
    const cands = ids.map((id, r) => cand(id, probs[r] / 1000, r === 0)).join(" ");
    const mine = commit ? commit.tok : null;
    const verdict = mine === null ? "" : ids[0] === mine
      ? `<span class="ttg-agree">agrees</span> with this run's token`
      : `<span class="ttg-disagree">differs</span>: it gives this run's <b>${esc(piece(mine))}</b> p=${(ar.chosen[picked] / 1000).toFixed(3)}`;
    return `<div class="ttg-ar"><b>AR model here</b> (the context tower reading the prompt and this run's text before position ${picked}): ${cands} · ${verdict}</div>`;
  }
  if (ar) return `<div class="ttg-ar muted">The AR model's view covers positions 0..${ar.top.length - 1} (the text before the others is not complete).</div>`;
  return `<div class="ttg-ar"><button class="ttg-ask" ${asking ? "disabled" : ""}>${asking ? "asking the AR model…" : "What would the AR model put here?"}</button>
    <span class="ttg-note">one pass of the context tower over the prompt and this run's text</span></div>`;
}

function findings() {
  if (!data.findings || !data.findings.length) return "";
  const items = data.findings.map((f, k) =>
    `<button class="ttg-find kind-${esc(f.kind)}" data-k="${k}" title="jump to this step">${esc(f.kind)}: ${esc(f.text)}</button>`).join("");
  const kinds = {}, totals = data.finding_totals || {};
  data.findings.forEach((f) => { kinds[f.kind] = (kinds[f.kind] || 0) + 1; });
  const counts = Object.entries(kinds).map(([k, n]) =>
    (totals[k] || n) > n ? `${totals[k]} ${k} (the ${n} most telling listed)` : `${n} ${k}`).join(", ");
  return `<details class="ttg-findings" ${listOpen ? "open" : ""}><summary>Worth a look: ${esc(counts)} (click one to jump to its step)</summary>
    <label class="ttg-marks"><input type="checkbox" data-act="marks" ${marks ? "checked" : ""}> mark them on the grid (⚑ corner)</label>
    <div class="ttg-find-list">${items}</div></details>`;
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
    <span class="ttg-pos"></span><span class="ttg-live">● live</span>
    ${data.actions && data.mode === "diffusion" ? `<button data-act="fork" class="ttg-forkbtn" title="continue this run from the shown step with other settings">⋔ fork from this step</button>` : ""}</div>`;
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
  root.querySelector(".ttg-cands-host").innerHTML = inspector();
  const range = root.querySelector("input[type=range]");
  range.max = String(Math.max(0, n - 1));
  range.value = String(frame);
  root.querySelector(".ttg-pos").textContent = `${n ? data.first_frame + frame + 1 : 0}/${data.first_frame + n}`;
  root.querySelector("button[data-act=play]").textContent = timer ? "❚❚ pause" : "▶ play";
  root.querySelectorAll(".ttg-controls button, .ttg-controls input, .ttg-controls select").forEach((c) => { c.disabled = data.live; });
  root.querySelector(".ttg-live").style.display = data.live ? "" : "none";
  root.querySelectorAll(".ttg-fork-only").forEach((e) => { e.style.display = data.fork ? "" : "none"; });
  const diffusion = data.mode === "diffusion";
  root.querySelectorAll(".ttg-diffusion-only").forEach((e) => { e.style.display = diffusion ? "" : "none"; });
  root.querySelectorAll(".ttg-verify-only").forEach((e) => { e.style.display = diffusion && data.remasking === "verify" ? "" : "none"; });
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
                last: () => go(data.frames.length - 1), play: play, fork: forkHere};
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
    if (e.key === "ArrowUp" || e.key === "ArrowDown") { pickNext(e.key === "ArrowDown" ? 1 : -1); e.preventDefault(); }
  });
  root.querySelector(".ttg-cands-host").addEventListener("click", (e) => {
    if (e.target.closest(".ttg-ask")) { askAR(); return; }
    const r = e.target.closest("tr[data-frame]");
    if (r) { stop(); go(parseInt(r.dataset.frame, 10)); }
  });
  const list = root.querySelector(".ttg-findings");
  if (list) list.addEventListener("toggle", () => { listOpen = list.open; });
  const box = root.querySelector("input[data-act=marks]");
  if (box) box.addEventListener("change", () => { marks = box.checked; update(); });
  root.querySelectorAll(".ttg-find").forEach((b) => b.addEventListener("click", () => {
    const f = data.findings[parseInt(b.dataset.k, 10)];
    stop(); picked = f.pos; go(f.frame - data.first_frame);
  }));
}

// ↑ / ↓ with the grid focused: the previous / next position into the inspector (no mouse needed).
function pickNext(step) {
  const lastBlock = data.blocks[data.blocks.length - 1];
  if (!lastBlock) return;
  const last = lastBlock[0] + lastBlock[1] - 1;
  picked = picked === null ? 0 : Math.max(0, Math.min(last, picked + step));
  update();
}

function forkHere() {
  const f = data.frames[frame];
  if (f) trigger("select", {block: f[0], step: f[1]});
}

function askAR() {
  asking = true;
  trigger("submit", {pos: picked});
  update();
}

function loadAR() {
  const next = parse(props.ar);
  asking = false;
  if (next && data && next.key === data.key) ar = next;
  build();
}

function indexFlags() {
  flags = {};
  (data && data.findings || []).forEach((f) => (f.span || [f.pos]).forEach((p) => { (flags[p] = flags[p] || []).push(f); }));
}

function load() {
  const next = parse(props.value);
  const wasLive = data && data.live;
  const atEnd = !data || frame >= data.frames.length - 1;
  const other = !data || !next || next.key !== data.key;
  data = next;
  if (data) {
    stop();
    if (data.live || wasLive || atEnd || other) frame = Math.max(0, data.frames.length - 1);
    if (other && data.fork && !data.live) frame = data.fork.frame;   // a fork opens where it leaves its run
    frame = Math.min(frame, Math.max(0, data.frames.length - 1));
    if (!wasLive) picked = null;                  // a new run or an imported trace
  }
  ar = null;
  asking = false;
  indexFlags();
  build();
}

load();
watch("value", load);
watch("ar", loadAR);
