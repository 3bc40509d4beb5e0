"""Cross-attention of a denoiser block over its context, from steps that captured attention.

A Step's `attention` is {layer: (B, heads, S, L + S)}: block queries over the L context keys
(the prompt and every earlier block, as the context tower cached them) followed by the S
block keys. The cross-attention map is the first L columns. Attention sinks (the first
tokens, which soak up attention whatever the query) can be dropped and the rest renormalised.
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from .pieces import label
from .plots import SCALE, note_figure

MEAN = "mean"


def _probs(step, layer: int, row: int = 0) -> np.ndarray | None:
    """(heads, S, L + S) for one layer of one step, or None if it was not captured."""
    att = step.attention or {}
    data = att.get(layer, att.get(str(layer)))
    return None if data is None else np.asarray(data[row], dtype=np.float32)


def captured_steps(trace, block: int | None = None) -> list:
    return [s for s in trace.steps() if s.attention and (block is None or s.block == block)]


def options(trace) -> dict:
    """What can be shown: {"blocks": [...], "layers": [...], "heads": n}; empty lists if nothing."""
    steps = captured_steps(trace)
    if not steps:
        return {"blocks": [], "layers": [], "heads": 0}
    layers = sorted(int(k) for k in steps[0].attention)
    heads = _probs(steps[0], layers[0]).shape[0]
    return {"blocks": sorted({s.block for s in steps}), "layers": layers, "heads": heads}


def context_ids(trace, block: int, row: int = 0) -> list[int]:
    """The ids the context tower held while `block` was denoised: prompt + earlier blocks."""
    ids = list(trace.prompt_ids[row]) if trace.prompt_ids else []
    for e in trace.events:
        if type(e).__name__ == "BlockCommitted" and e.block < block:
            ids.extend(e.tokens[row])
    return ids


def matrix(step, layer: int, head, sink: int = 0, renormalise: bool = True,
           include_block: bool = False, row: int = 0) -> np.ndarray:
    """(S, keys) attention of the block's queries; head = index or 'mean'.

    The first `sink` context keys are dropped; renormalise rescales each row to sum to 1 over
    the keys that remain.
    """
    probs = _probs(step, layer, row)
    if probs is None:
        raise ValueError(f"layer {layer} was not captured at block {step.block}, step {step.step}")
    size = probs.shape[1]
    context = probs.shape[2] - size
    a = probs.mean(0) if head == MEAN else probs[int(head)]
    keep = list(range(min(sink, context), context)) + (list(range(context, context + size)) if include_block else [])
    a = a[:, keep]
    if renormalise:
        a = a / np.clip(a.sum(1, keepdims=True), 1e-12, None)
    return a


def key_labels(trace, block: int, context: int, sink: int, include_block: bool, size: int,
               final_block: list[int] | None, row: int = 0) -> list[str]:
    ids = context_ids(trace, block, row)
    if len(ids) != context:                     # left padding or an unknown layout: index only
        ids = [None] * context
    names = [f"{i}:{label(trace, t) if t is not None else '?'}" for i, t in enumerate(ids)][sink:]
    if include_block:
        names += [f"B{j}:{label(trace, t) if t is not None else '▢'}" for j, t in enumerate(final_block or [None] * size)]
    return names


def figure(trace, block: int, layer: int, head=MEAN, sink: int = 0, renormalise: bool = True,
           include_block: bool = False, row: int = 0) -> go.Figure:
    """Heatmap of block queries x context keys, one frame per denoiser step, with a step slider."""
    steps = captured_steps(trace, block)
    if not steps:
        return note_figure("No cross-attention recorded for this block.<br>"
                           "Tick 'Capture cross-attention' and run again.")
    mats = [matrix(s, layer, head, sink, renormalise, include_block, row) for s in steps]
    size = len(steps[0].tokens[row])
    context = _probs(steps[0], layer, row).shape[2] - size
    final = steps[-1].tokens[row]
    keys = key_labels(trace, block, context, sink, include_block, size, final, row)
    if not keys:
        return note_figure("Every context key was dropped: lower 'drop first k keys'.")
    queries = [f"{j}:{label(trace, t)}" for j, t in enumerate(final)]
    zmax = max(float(m.max()) for m in mats) or 1.0
    mask = trace.model.get("mask_token_id")
    fig = go.Figure()
    for k, (s, m) in enumerate(zip(steps, mats)):
        now = [label(trace, t) if t != mask else "▢ masked" for t in s.tokens[row]]
        fig.add_trace(go.Heatmap(
            z=m, x=keys, y=queries, colorscale=SCALE, zmin=0, zmax=zmax, visible=(k == 0),
            customdata=[[now[j]] * m.shape[1] for j in range(m.shape[0])],
            colorbar=dict(title="attention", thickness=12),
            hovertemplate="query %{y} (now '%{customdata}')<br>key %{x}<br>%{z:.3f}<extra></extra>"))
    head_name = "mean of heads" if head == MEAN else f"head {head}"
    sliders = [dict(active=0, currentvalue=dict(prefix="step "), pad=dict(t=40),
                    steps=[dict(label=str(s.step), method="update",
                                args=[{"visible": [i == k for i in range(len(steps))]}])
                           for k, s in enumerate(steps)])]
    fig.update_layout(
        title=dict(text=f"Block {block}, layer {layer}, {head_name}"
                        f"{f', first {sink} keys dropped' if sink else ''}{', renormalised' if renormalise else ''}",
                   x=0.01, font=dict(size=15)),
        sliders=sliders, height=max(380, 22 * size + 200), template="plotly_white",
        margin=dict(l=110, r=20, t=50, b=60), xaxis=dict(title="context keys", tickangle=-60, type="category"),
        yaxis=dict(title="block queries (final token)", autorange="reversed", type="category"))
    return fig
