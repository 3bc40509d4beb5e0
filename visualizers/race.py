"""AR vs diffusion race: two traces of the same prompt, seed and model, timed apart.

The browser (assets/race.js) replays both on one shared clock at true speed using each
step's `elapsed`; this module packs the lanes, the summary table and a tokens-vs-time plot.
"""
from __future__ import annotations

import plotly.graph_objects as go

from .pieces import piece_table, special_ids
from .plots import BLUE, ORANGE, _layout
from .commits import GIVEN, commit_table
from .trajectory import frames, given_tokens, layout_blocks, output_length

NAMES = {"ar": "AR (context tower alone)", "diffusion": "Diffusion (TwoTower)"}


def summary(trace) -> dict:
    """tokens, seconds, tokens/s, forward passes, tokens per pass, time to first token."""
    s = trace.stats()
    if not s:
        return {}
    return {"mode": trace.mode, "tokens": s["tokens"], "seconds": round(s["seconds"], 4),
            "tokens_per_second": round(s["tokens_per_second"], 2), "nfe": s["nfe"],
            "tokens_per_nfe": round(s["tokens_per_nfe"], 3),
            "first_token_seconds": round(s["first_token_seconds"], 4), "stopped": s["stopped"],
            "context_passes": s["context_passes"],
            "text": trace.done.texts[0]}


def lane(trace, row: int = 0) -> dict:
    """One run for the race player: its replay frames (`replay_frames`), plus stats."""
    fr, _ = frames(trace, row)
    ids = {t for f in fr for t in f[3] if t >= 0} | {g[0] for g in given_tokens(trace, row) if g}
    prefill = next((e.seconds for e in trace.events if type(e).__name__ == "Prefill"), 0.0)
    return {"mode": trace.mode, "name": NAMES.get(trace.mode, trace.mode),
            "pieces": piece_table(trace, ids),
            "special": sorted(i for i in special_ids(trace) if str(i) in trace.tokens),
            "blocks": layout_blocks(trace, len(fr)),
            "frames": replay_frames(trace, fr, row),
            "prefill_ms": int(prefill * 1000),
            "n_out": output_length(trace, row), "stats": summary(trace)}


def replay_frames(trace, fr: list, row: int = 0) -> list[list]:
    """[offset, tokens, elapsed_ms(, 1)] per pass; before a block's first pass, a frame with its
    given token (the verify order), timed when the block began and flagged 1: not a pass."""
    out, given = [], given_tokens(trace, row)
    began = {b.block: (b.start, b.size, b.elapsed) for b in trace.blocks()}
    seen = set()
    for f in fr:
        block = f[0]
        if trace.mode == "diffusion" and block not in seen and block < len(given) and given[block]:
            start, size, at = began[block]
            if at is not None:
                out.append([start, [given[block][0]] + [-1] * (size - 1), int(at * 1000), 1])
        seen.add(block)
        out.append([f[2], f[3], f[8]])
    return out


def payload(ar, diffusion, row: int = 0) -> dict:
    return {"kind": "race", "prompt": (ar.prompts[row] if ar.prompts else "")[:500],
            "runs": [lane(ar, row), lane(diffusion, row)]}


def curve(trace, row: int = 0) -> tuple[list[float], list[int]]:
    """(seconds, output tokens so far): only positions kept in the output count."""
    n_out = output_length(trace, row)
    steps = trace.ar_tokens() if trace.mode == "ar" else trace.steps()
    began = {b.block: b.elapsed for b in trace.blocks()}
    times: dict[float, int] = {}
    for c in commit_table(trace, row):
        if n_out is None or c.pos < n_out:
            given_at = began.get(c.block) if c.step == GIVEN else None     # readable when its block began
            at = given_at if given_at is not None else steps[c.frame].elapsed
            times[at] = times.get(at, 0) + 1
    xs, ys, total = [0.0], [0], 0
    for at in sorted(times):
        total += times[at]
        xs.append(at)
        ys.append(total)
    if trace.done:
        xs.append(trace.done.seconds)
        ys.append(total)
    return xs, ys


def tokens_over_time(ar, diffusion, row: int = 0) -> go.Figure:
    fig = go.Figure()
    for trace, colour, dash in ((ar, BLUE, "solid"), (diffusion, ORANGE, "dash")):
        xs, ys = curve(trace, row)
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line=dict(shape="hv", color=colour, width=3, dash=dash),
                                 name=NAMES[trace.mode],
                                 hovertemplate="%{x:.3f} s: %{y} tokens<extra></extra>"))
    fig.update_layout(legend=dict(orientation="h", y=-0.25))
    return _layout(fig, "Output tokens over wall-clock time (each run timed on its own)",
                   "seconds since the run started", "tokens")


def table(ar, diffusion) -> str:
    """Markdown table of both runs and the speed ratio."""
    a, d = summary(ar), summary(diffusion)
    if not a or not d:
        return "The race did not finish."
    a["ms_per_pass"], d["ms_per_pass"] = ms_per_pass(a), ms_per_pass(d)
    rows = [("tokens", "tokens", "{}"), ("wall-clock seconds", "seconds", "{:.3f}"),
            ("tokens / second", "tokens_per_second", "{:.1f}"), ("forward passes (NFE)", "nfe", "{}"),
            ("context-tower passes", "context_passes", "{}"),
            ("tokens per pass", "tokens_per_nfe", "{:.2f}"), ("ms per pass (all time / NFE)", "ms_per_pass", "{:.0f}"),
            ("time to first token (s)", "first_token_seconds", "{:.3f}"), ("ended by", "stopped", "{}")]
    lines = ["| | AR | Diffusion |", "|---|---:|---:|"]
    lines += [f"| {name} | {fmt.format(a[key])} | {fmt.format(d[key])} |" for name, key, fmt in rows]
    if a["tokens_per_second"] > 0 and d["tokens_per_second"] > 0:
        lines.append(why(ar.stats(), diffusion.stats()))
    return "\n".join(lines)


def ms_per_pass(s: dict) -> float:
    """Everything a run took (prompt, context-tower passes, sampling) per forward pass."""
    return s["seconds"] * 1000 / s["nfe"] if s["nfe"] else 0.0


def why(a: dict, d: dict) -> str:
    """The speed ratio and its two factors, from the runs' stats: tokens/s ratio = (tokens per
    pass ratio) / (time per pass ratio), an identity."""
    ratio = d["tokens_per_second"] / a["tokens_per_second"]
    more, cost = d["tokens_per_nfe"] / a["tokens_per_nfe"], ms_per_pass(d) / ms_per_pass(a)
    verdict = ("" if ratio >= 1 else
               f" It would get ahead where its passes wrote more than {cost * a['tokens_per_nfe']:.1f} tokens each.")
    return (f"\nDiffusion throughput is **{ratio:.2f}×** the AR baseline's on this prompt: each diffusion "
            f"pass wrote {more:.2f}× the tokens of an AR pass and took {cost:.2f}× its time "
            f"({more:.2f} / {cost:.2f} = {ratio:.2f}).{verdict} A pass reads the weights once, as an AR step "
            "does, but also computes every position of the block and its scores over the whole "
            "vocabulary; where that work is not free (a small CPU, large batches) a pass costs more "
            "than an AR step." + tree_note(d))


def tree_note(d: dict) -> str:
    """A draft-tree run's passes ran several block rows each: what that buys and costs."""
    if "rows_per_pass" not in d:
        return ""
    return (f" With the draft tree a pass ran {d['rows_per_pass']:.1f} block rows (one per node of the "
            "tree, the empty path included): "
            "more tokens per pass, for rows × the work of a plain pass, which a GPU at batch 1 does "
            "nearly free and a CPU does not.")
