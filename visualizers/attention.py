"""Cross-attention of a denoiser block over its context, from steps that captured attention.

A Step's `attention` is {layer: (B, heads, Q, K)}: the denoiser's queries over the context
tower's cached keys followed by the denoiser's own inputs. Plain denoisers have Q = S (the
block) and K = L + S. An anchored denoiser also re-reads the last `a` clean tokens with the
block: Q = a + S and those tokens' keys sit with the block's, K = (L - a) + (a + S).
Either way the block's queries are the last S rows and its own keys the last S columns; every
other key is a context token (prompt and earlier blocks), so the cross-attention map is
rows [-S:] x columns [:-S]. Attention sinks (the first tokens, which soak up attention
whatever the query) can be dropped and the rest renormalised.
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from .pieces import label
from .plots import SCALE, note_figure

MEAN = "mean"


def _probs(step, layer: int, row: int = 0) -> np.ndarray | None:
    """(heads, S, L + S) block-query rows of one layer of one step, or None if not captured."""
    att = step.attention or {}
    data = att.get(layer, att.get(str(layer)))
    if data is None:
        return None
    probs = np.asarray(data[row], dtype=np.float32)        # (heads, Q, K)
    return probs[:, -len(step.tokens[row]):, :]             # drop anchor queries, if any


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
    if head != MEAN and not 0 <= int(head) < probs.shape[0]:
        raise ValueError(f"head {head} does not exist: this layer has heads 0..{probs.shape[0] - 1}")
    a = probs.mean(0) if head == MEAN else probs[int(head)]
    keep = list(range(min(sink, context), context))
    if include_block:
        keep += list(range(context, context + size))
    a = a[:, keep]
    if renormalise:
        a = a / np.clip(a.sum(1, keepdims=True), 1e-12, None)
    return a


MASKED = "▢ masked"


def block_label(trace, token_id: int) -> str:
    """A block token's label; a position never written (after end-of-text) reads as masked."""
    return MASKED if token_id == trace.model.get("mask_token_id") else label(trace, token_id)


def key_labels(trace, block: int, context: int, sink: int, include_block: bool,
               final_block: list[int], row: int = 0) -> list[str]:
    """'i:piece' per context key kept (and 'Bj:piece' per block key); unique, for category axes."""
    ids = context_ids(trace, block, row)
    if len(ids) != context:                     # left padding or an unknown layout: index only
        ids = [None] * context
    names = [f"{i}:{label(trace, t) if t is not None else '?'}" for i, t in enumerate(ids)][sink:]
    if include_block:
        names += [f"B{j}:{block_label(trace, t)}" for j, t in enumerate(final_block)]
    return names


def _title(block: int, layer: int, head, sink: int, renormalise: bool) -> str:
    parts = [f"Block {block}", f"layer {layer}", "mean of heads" if head == MEAN else f"head {head}"]
    if sink:
        parts.append(f"first {sink} keys dropped")
    if renormalise:
        parts.append("renormalised")
    return ", ".join(parts)


KEY_LABEL_ROOM = 140     # px below the plot for the slanted key labels and the axis title


def _step_slider(steps) -> dict:
    """A plotly slider that shows one heatmap trace per denoiser step (no frames needed)."""
    return dict(active=0, currentvalue=dict(prefix="step "), pad=dict(t=KEY_LABEL_ROOM),   # under the key labels
                steps=[dict(label=str(s.step), method="update",
                            args=[{"visible": [i == k for i in range(len(steps))]}])
                       for k, s in enumerate(steps)])


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
    keys = key_labels(trace, block, context, sink, include_block, final, row)
    if not keys:
        return note_figure("Every context key was dropped: lower 'drop first k keys'.")
    queries = [f"{j}:{block_label(trace, t)}" for j, t in enumerate(final)]
    zmax = max(float(m.max()) for m in mats) or 1.0
    fig = go.Figure()
    for k, (s, m) in enumerate(zip(steps, mats)):
        now = [block_label(trace, t) for t in s.tokens[row]]
        fig.add_trace(go.Heatmap(
            z=m, x=keys, y=queries, colorscale=SCALE, zmin=0, zmax=zmax, visible=(k == 0),
            customdata=[[now[j]] * m.shape[1] for j in range(m.shape[0])],
            colorbar=dict(title="attention", thickness=12),
            hovertemplate="query %{y} (now '%{customdata}')<br>key %{x}<br>%{z:.3f}<extra></extra>"))
    fig.update_layout(
        title=dict(text=_title(block, layer, head, sink, renormalise), x=0.01, font=dict(size=15)),
        sliders=[_step_slider(steps)], height=max(380, 22 * size + 200) + KEY_LABEL_ROOM, template="plotly_white",
        margin=dict(l=110, r=20, t=50, b=KEY_LABEL_ROOM + 70),
        xaxis=dict(title="context keys", tickangle=-60, type="category"),
        yaxis=dict(title="block queries (final token)", autorange="reversed", type="category"))
    return fig
