"""Failure overlays: moments of a run worth a second look, each with a frame to jump to.

- low-confidence commits: a token committed with p below LOW_CONFIDENCE
- flips: a masked position whose best guess changed at least FLIPS times before it was committed
- repeats: an n-gram of the output that occurs REPEAT_TIMES or more
- end-of-text floods: one denoiser step that commits EOS_FLOOD or more end-of-text tokens

Positions after a run's first end-of-text are not part of its text: `findings` leaves them out.
Each kind lists at most MAX_PER_KIND, the most telling first; `found` also gives the totals.
"""
from __future__ import annotations

from collections import defaultdict

from twotower.sampling import SamplerConfig

from .commits import commit_table
from .pieces import label

LOW_CONFIDENCE = 0.3
FLIPS = 2
NGRAM, REPEAT_TIMES = 3, 3
EOS_FLOOD = 3
MAX_PER_KIND = 12


def _finding(kind: str, frame: int, pos: int, text: str, span: list[int] | None = None) -> dict:
    """frame: the step to jump to; pos: the position to inspect; span: every position to mark."""
    return {"kind": kind, "frame": frame, "pos": pos, "text": text, "span": span or [pos]}


def low_confidence(trace, commits) -> list[dict]:
    """Every commit below LOW_CONFIDENCE, the lowest first."""
    low = sorted((c for c in commits if c.confidence < LOW_CONFIDENCE), key=lambda c: c.confidence)
    return [_finding("low-confidence", c.frame, c.pos, f"'{label(trace, c.token)}' committed with p={c.confidence:.2f}")
            for c in low]


def flips(trace, row: int = 0) -> list[dict]:
    """Masked positions whose top-1 guess kept changing (diffusion only), the busiest first."""
    if trace.mode != "diffusion":
        return []
    mask = trace.model.get("mask_token_id")
    starts = {b.block: b.start for b in trace.blocks()}
    last_guess, count, last_frame = {}, defaultdict(int), {}
    for i, e in enumerate(trace.steps()):
        for j, (tok, cands) in enumerate(zip(e.tokens[row], e.top_ids[row])):
            pos, guess = starts.get(e.block, 0) + j, cands[0]
            was_masked = j in e.committed[row] or tok == mask
            if was_masked and pos in last_guess and last_guess[pos] != guess:
                count[pos] += 1
                last_frame[pos] = i
            last_guess[pos] = guess if tok == mask else None
    busy = sorted((p for p in count if count[p] >= FLIPS), key=lambda p: (-count[p], p))
    return [_finding("flips", last_frame[p], p, f"position {p}: best guess changed {count[p]} times") for p in busy]


def loop_hint(trace) -> str:
    """What to try against a loop, given the run's repeat guards."""
    if SamplerConfig.from_dict(trace.settings or {}).guards_repeats:
        return ""
    return "; the repeat guards were off: " + ("fork here with them on" if trace.mode == "diffusion"
                                               else "run again with them on")


def repeats(trace, commits, row: int = 0) -> list[dict]:
    done = trace.done
    ids = done.token_ids[row] if done else [c.token for c in sorted(commits, key=lambda c: c.pos)]
    frame_of = {c.pos: c.frame for c in commits}
    seen: dict[tuple, list[int]] = defaultdict(list)
    for p in range(len(ids) - NGRAM + 1):
        seen[tuple(ids[p:p + NGRAM])].append(p)
    out, hint = [], loop_hint(trace)
    for gram, places in seen.items():
        if len(places) >= REPEAT_TIMES:
            text = "".join(label(trace, t, 20) for t in gram)
            p = places[1]
            span = sorted({q + i for q in places for i in range(NGRAM)})
            out.append(_finding("repeat", frame_of.get(p, 0), p, f"'{text}' occurs {len(places)} times{hint}", span))
    return out


def eos_floods(trace, row: int = 0) -> list[dict]:
    if trace.mode != "diffusion":
        return []
    eos = set(trace.model.get("eos_token_ids", []))
    starts = {b.block: b.start for b in trace.blocks()}
    out = []
    for i, e in enumerate(trace.steps()):
        hits = [j for j in e.committed[row] if e.tokens[row][j] in eos]
        if len(hits) >= EOS_FLOOD:
            start = starts.get(e.block, 0)
            out.append(_finding("eos-flood", i, start + hits[0],
                                f"block {e.block} step {e.step} commits {len(hits)} end-of-text tokens",
                                [start + j for j in hits]))
    return out


def in_output(trace, found: list[dict], row: int = 0) -> list[dict]:
    """Drop findings at positions after the first end-of-text: they are not part of the text."""
    done = trace.done
    if done is None:
        return found
    end = len(done.token_ids[row])                 # the end-of-text token itself still counts
    return [f for f in found if f["pos"] <= end]


def found(trace, row: int = 0) -> tuple[list[dict], dict[str, int]]:
    """The findings within the output, at most MAX_PER_KIND of each kind (the most telling),
    ordered by frame; and how many of each kind there are in all."""
    commits = commit_table(trace, row)
    kinds = [low_confidence(trace, commits), flips(trace, row), repeats(trace, commits, row), eos_floods(trace, row)]
    shown, totals = [], {}
    for items in kinds:
        items = in_output(trace, items, row)
        if items:
            totals[items[0]["kind"]] = len(items)
        shown += items[:MAX_PER_KIND]
    return sorted(shown, key=lambda f: (f["frame"], f["pos"])), totals


def findings(trace, row: int = 0) -> list[dict]:
    """The findings within the output (at most MAX_PER_KIND of each kind), ordered by frame."""
    return found(trace, row)[0]
