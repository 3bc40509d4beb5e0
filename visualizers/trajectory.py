"""A trace as compact JSON for the browser's token grid (assets/grid.js).

One frame per observable step: a denoiser pass (diffusion) or a generated token (AR).
Frames are lists, not objects, to keep the payload small:

    [block, step, offset, tokens, guess, conf, new, planned, elapsed_ms, nfe(, drafts, rejected(, tree))]

- tokens: the block's tokens after the step, -1 where still masked (AR: the one token)
- guess:  the top-1 candidate at every position (what a masked cell is "thinking")
- conf:   p(chosen token) per position, as integers 0..100; at a masked position with no
          draft, p of its guess (sampling, the token a pass chose there need not be the guess)
- new:    block positions committed at this step; offset + j is the generated index
- planned: commits the threshold rule asked for, before the floor raised it (verify: new drafts)
- drafts, rejected (the verify order only): the draft id per position after the step (-1
  where none), and the positions whose drafts the step dropped
- tree (draft trees only): the leaf paths of the tree the step checked, ids from the block
  position of the step's first commit

`given` lists, per block, the first token that the context tower's pass wrote before the
block's first step (the verify order) as [token, p 0..100], else null; no frame commits it.

The grid state at frame i is: every position committed in frames 0..i, plus the masked
guesses of frame i's block. A live payload sends the finished blocks once as `base`
(per-position final token, confidence and commit step) and only the active block's frames.
"""
from __future__ import annotations

from .commits import AR_ROW, block_starts, commit_table
from .failures import found
from .pieces import piece_table, special_ids



def _pct(p: float) -> int:
    return int(round(100 * p))


def frames(trace, row: int = 0, top: bool = False) -> tuple[list[list], list | None]:
    """(frames, top candidates per frame or None). See the module docstring for the layout."""
    out, tops = [], ([] if top else None)
    if trace.mode == "ar":
        for e in trace.ar_tokens():
            ids, probs = e.top_ids[row], e.top_probs[row]
            out.append([e.index // AR_ROW, e.index, e.index, [e.tokens[row]], [ids[0]],
                        [_pct(e.confidence[row])], [0], 1, int(e.elapsed * 1000), e.nfe])
            if top:
                tops.append([[ids, [int(round(1000 * p)) for p in probs]]])
        return out, tops
    mask, starts = trace.model.get("mask_token_id"), block_starts(trace)
    for e in trace.steps():
        tokens = [-1 if t == mask else t for t in e.tokens[row]]
        guess = [cands[0] for cands in e.top_ids[row]]
        drafts = e.drafts[row] if e.drafts is not None else [-1] * len(tokens)
        conf = [_pct(top[0] if tok < 0 and d < 0 else c)             # a masked cell shows its guess's p
                for tok, d, top, c in zip(tokens, drafts, e.top_probs[row], e.confidence[row])]
        frame = [e.block, e.step, starts.get(e.block, 0), tokens, guess, conf, e.committed[row], e.planned[row],
                 int(e.elapsed * 1000), e.nfe]
        if e.drafts is not None:
            frame += [e.drafts[row], e.rejected[row]]
        if e.tree is not None:
            frame.append(e.tree[row])
        out.append(frame)
        if top:
            tops.append([[ids, [int(round(1000 * p)) for p in probs]]
                         for ids, probs in zip(e.top_ids[row], e.top_probs[row])])
    return out, tops


def given_tokens(trace, row: int = 0) -> list[list[int] | None]:
    """Per block: [token, p as 0..100] of its first token when the context tower's pass wrote it
    before the block's first denoiser step (the verify order, `BlockStart.given`), else None."""
    return [[g[0], _pct(g[1])] if (g := b.given_at(row)) else None for b in trace.blocks()]


def layout_blocks(trace, n_frames: int) -> list[list[int]]:
    """[[start, size, steps]] per block; AR runs get layout rows of AR_ROW tokens."""
    if trace.mode == "ar":
        return [[s, min(AR_ROW, n_frames - s), 1] for s in range(0, n_frames, AR_ROW)]
    return [[b.start, b.size, b.steps] for b in trace.blocks()]


def output_length(trace, row: int = 0) -> int | None:
    """Tokens kept in the output (positions after end-of-text are not), None while running."""
    done = trace.done
    return len(done.token_ids[row]) if done else None


def progress(trace) -> dict:
    """Counters of a run so far (for live status lines)."""
    last = next((e for e in reversed(trace.events) if hasattr(e, "nfe") and hasattr(e, "elapsed")), None)
    steps = trace.ar_tokens() if trace.mode == "ar" else trace.steps()
    return {"frames": len(steps), "nfe": last.nfe if last else 0,
            "seconds": round(last.elapsed, 3) if last else 0.0,
            "committed": len(commit_table(trace)), "blocks": len(trace.blocks())}


def setting_changes(before: dict, after: dict) -> dict[str, list]:
    """{name: [before, after]} for every sampler setting that differs (top_candidates aside)."""
    return {k: [before.get(k), v] for k, v in after.items()
            if k != "top_candidates" and k in before and before.get(k) != v}


def fork_info(trace) -> dict | None:
    """Where a spliced fork (twotower.fork.splice) leaves its parent, for the grid: frames before
    `frame` are inherited from the parent run; `changes` lists the settings the fork changed."""
    fork = getattr(trace, "fork", None) or {}
    if "inherited" not in fork:
        return None
    return {"frame": fork["inherited"], "block": fork["block"], "step": fork["step"],
            "parent_steps": fork.get("parent_steps"),
            "changes": setting_changes(fork.get("parent_settings", {}), trace.settings or {})}


def _ids_in(frame_list, tops) -> set[int]:
    ids = set()
    for f in frame_list:
        ids.update(f[3])
        ids.update(f[4])
        for path in f[12] if len(f) > 12 else ():             # a draft tree's paths
            ids.update(path)
    for per_frame in tops or []:
        for cand_ids, _ in per_frame:
            ids.update(cand_ids)
    return ids


def _base(commits: list[Commit], cut: int) -> dict:
    """Per-position final state of everything committed before frame `cut`."""
    done = sorted((c for c in commits if c.frame < cut), key=lambda c: c.pos)
    n = done[-1].pos + 1 if done else 0
    tok, conf, cstep = [-1] * n, [0] * n, [-1] * n
    for c in done:
        tok[c.pos], conf[c.pos], cstep[c.pos] = c.token, _pct(c.confidence), c.step
    return {"len": n, "tok": tok, "conf": conf, "cstep": cstep}


def payload(trace, live: bool = False, row: int = 0) -> dict:
    """The grid's data. live=True: compact (finished blocks as `base`, no candidates)."""
    all_frames, tops = frames(trace, row, top=not live)
    cut = 0
    if live and all_frames:
        last_block = all_frames[-1][0]
        cut = next(i for i, f in enumerate(all_frames) if f[0] == last_block)
    base = _base(commit_table(trace, row), cut) if cut else {"len": 0, "tok": [], "conf": [], "cstep": []}
    shown = all_frames[cut:]
    given = given_tokens(trace, row)
    ids = _ids_in(shown, tops) | {t for t in base["tok"] if t >= 0} | {g[0] for g in given if g}
    settings = trace.settings or {}
    listed, totals = ([], {}) if live else found(trace, row)
    return {
        "kind": "trajectory",
        "mode": trace.mode,
        "live": live,
        "prompt": (trace.prompts[row] if trace.prompts else "")[:500],
        "pieces": piece_table(trace, ids),
        "special": sorted(i for i in special_ids(trace) if str(i) in trace.tokens),
        "eos": sorted(trace.model.get("eos_token_ids", [])),
        "blocks": layout_blocks(trace, len(all_frames)),
        "base": base,
        "given": given,
        "first_frame": cut,
        "frames": shown,
        "top": tops,
        "n_out": output_length(trace, row),
        "threshold": settings.get("threshold"),
        "remasking": settings.get("remasking"),
        "draft_nodes": settings.get("draft_nodes", 0),
        "draft_width": settings.get("draft_width", 0),      # traces from session 15's width-K trees
        "progress": progress(trace),
        "stats": trace.stats(),
        "findings": listed,                                  # at most failures.MAX_PER_KIND of each kind
        "finding_totals": totals,                            # kind -> how many in all
        "fork": fork_info(trace),
    }
