"""Plotly figures of a trace: unmasking order, confidence over steps, planned vs actual commits.

Each function takes a trace and returns a plotly Figure; none needs the model. Colour scales
are colour-blind safe (cividis), and markers carry shape as well as colour.
"""
from __future__ import annotations

import textwrap

import plotly.graph_objects as go

from twotower.trace import DraftTally

from .pieces import label
from .commits import GIVEN, block_starts, commit_table

SCALE = "Cividis"
ORANGE, BLUE, GREEN = "#E69F00", "#0072B2", "#009E73"   # Okabe-Ito


TITLE_CHARS, SUBTITLE_CHARS = 40, 60   # per line: plotly does not wrap titles, and a plot may be ~300 px wide


def _wrapped(title: str) -> tuple[str, int]:
    """A title broken into short lines (its '<br><sup>' subtitle into smaller ones) and the
    number of lines."""
    main, _, sub = title.partition("<br><sup>")
    lines = textwrap.wrap(main, TITLE_CHARS)
    text = "<br>".join(lines)
    if sub:
        small = textwrap.wrap(sub.removesuffix("</sup>"), SUBTITLE_CHARS)
        text += "".join(f"<br><sup>{line}</sup>" for line in small)
        return text, len(lines) + len(small)
    return text, len(lines)


def _layout(fig: go.Figure, title: str, x: str, y: str, height: int = 360) -> go.Figure:
    text, lines = _wrapped(title)
    fig.update_layout(title=dict(text=text, x=0.01, font=dict(size=15)), height=height + 20 * (lines - 1),
                      margin=dict(l=60, r=20, t=30 + 20 * lines, b=50), xaxis_title=x, yaxis_title=y,
                      template="plotly_white", hoverlabel=dict(font_family="monospace"))
    return fig


def note_figure(text: str, height: int = 220) -> go.Figure:
    """An empty figure that explains why there is nothing to plot."""
    fig = go.Figure()
    fig.add_annotation(text=text, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font=dict(size=14))
    fig.update_layout(height=height, template="plotly_white", xaxis_visible=False, yaxis_visible=False,
                      margin=dict(l=20, r=20, t=20, b=20))
    return fig


AR_NOTE = ("AR runs write exactly one token per forward pass<br>(the status line's tokens/pass "
           "leaves out the end-of-text token, which also took one).")


def _block_lines(fig: go.Figure, trace) -> None:
    for b in trace.blocks()[1:]:
        fig.add_vline(x=b.start - 0.5, line=dict(color="#888", width=1, dash="dot"))


def _end_line(fig: go.Figure, trace, row: int, last_pos: int) -> None:
    """A line after the end-of-text that ended the output, when positions past it are plotted."""
    done = trace.done
    if done is None or done.stopped != "eos" or last_pos <= len(done.token_ids[row]):
        return
    line = dict(color="#c0392b", width=1.5, dash="dash")
    fig.add_vline(x=len(done.token_ids[row]) + 0.5, line=line)
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line=line, hoverinfo="skip",   # its legend entry
                             name="end of text: later positions are not in the output"))
    fig.update_layout(showlegend=True, legend=dict(orientation="h", y=-0.25))


def unmasking_map(trace, row: int = 0) -> go.Figure:
    """Position x step: when each generated position was committed, coloured by confidence."""
    if trace.mode != "diffusion":
        return note_figure("AR runs commit one token per forward pass, left to right:<br>"
                           "there is no unmasking order to show.")
    commits = commit_table(trace, row)
    if not commits:
        return note_figure("No step recorded yet.")
    fig = go.Figure(go.Scatter(
        x=[c.pos for c in commits], y=[c.step for c in commits], mode="markers", showlegend=False,
        marker=dict(symbol="square", size=11, color=[c.confidence for c in commits], colorscale=SCALE,
                    cmin=0, cmax=1, colorbar=dict(title="p at commit", thickness=12),
                    line=dict(width=0.5, color="#333")),
        customdata=[[label(trace, c.token, 20), c.block, c.confidence,
                     "before step 0, from the context tower's pass" if c.step == GIVEN else f"step {c.step}"]
                    for c in commits],
        hovertemplate="position %{x}<br>'%{customdata[0]}'<br>block %{customdata[1]}, %{customdata[3]}"
                      "<br>p=%{customdata[2]:.3f}<extra></extra>"))
    _block_lines(fig, trace)
    _end_line(fig, trace, row, max(c.pos for c in commits))
    last, first = max(c.step for c in commits), min(c.step for c in commits)
    fig.update_yaxes(range=[last + 0.6, first - 0.6], dtick=1 if last < 20 else None)   # step 0 (or GIVEN) on top
    if first == GIVEN:                  # the verify order: each block's first token came from the context pass
        fig.update_yaxes(tickvals=list(range(GIVEN, last + 1)), ticktext=["ctx"] + [str(k) for k in range(last + 1)])
    return _layout(fig, "Unmasking order: the step at which each position was committed",
                   "generated position", "step within block")


def confidence_heatmap(trace, row: int = 0) -> go.Figure:
    """Step x position: p(chosen token) at every position at every step of its block; x = commit."""
    if trace.mode != "diffusion":
        return note_figure("Confidence over denoising steps exists only for diffusion runs.")
    steps = trace.steps()
    if not steps:
        return note_figure("No step recorded yet.")
    starts = block_starts(trace)
    width = max(starts.get(e.block, 0) + len(e.confidence[row]) for e in steps)
    depth = max(e.step for e in steps) + 1
    z = [[None] * width for _ in range(depth)]
    for e in steps:
        for j, c in enumerate(e.confidence[row]):
            z[e.step][starts.get(e.block, 0) + j] = c
    fig = go.Figure(go.Heatmap(z=z, colorscale=SCALE, zmin=0, zmax=1, colorbar=dict(title="p", thickness=12),
                               hovertemplate="position %{x}, step %{y}<br>p=%{z:.3f}<extra></extra>"))
    commits = commit_table(trace, row)
    commits = [c for c in commits if c.step != GIVEN]      # rows are denoiser steps
    fig.add_trace(go.Scatter(x=[c.pos for c in commits], y=[c.step for c in commits], mode="markers",
                             marker=dict(symbol="x-thin", size=8, line=dict(width=2, color=ORANGE)),
                             name="committed here", hoverinfo="skip"))
    _block_lines(fig, trace)
    _end_line(fig, trace, row, width - 1)
    fig.update_yaxes(autorange="reversed", dtick=1 if depth < 20 else None)
    fig.update_layout(legend=dict(orientation="h", y=-0.25))
    return _layout(fig, "Confidence of every position at every step (× = committed)",
                   "generated position", "step within block")


def commits_per_step(trace, row: int = 0) -> go.Figure:
    """Teaching aid: commits the threshold asked for vs commits made, per denoiser pass
    (the verify order: new drafts, commits and dropped drafts)."""
    if trace.mode != "diffusion":
        return note_figure(AR_NOTE)
    steps = trace.steps()
    if not steps:
        return note_figure("No step recorded yet.")
    x = list(range(1, len(steps) + 1))
    text = [f"block {e.block}, step {e.step}" for e in steps]
    if steps[0].drafts is not None:
        fig, title = _verify_passes(trace, steps, row, x, text)
    else:
        fig, title = go.Figure([
            go.Bar(x=x, y=[e.planned[row] for e in steps], hovertext=text, marker_color=BLUE,
                   name="above threshold (planned)"),
            go.Bar(x=x, y=[len(e.committed[row]) for e in steps], hovertext=text, marker_color=ORANGE,
                   name="committed (at least 1, and at least ⌈masked / steps left⌉)", marker_pattern_shape="/"),
        ]), "Planned vs actual commits per denoiser pass (NFE)"
    for b in trace.blocks()[1:]:
        first = next((i for i, e in enumerate(steps) if e.block == b.block), None)
        if first is not None:
            fig.add_vline(x=first + 0.5, line=dict(color="#888", width=1, dash="dot"))
    fig.update_layout(barmode="group", legend=dict(orientation="h", y=-0.25))
    return _layout(fig, title, "denoiser pass", "positions")


def _verify_passes(trace, steps, row: int, x: list[int], text: list[str]) -> tuple[go.Figure, str]:
    """The verify order, per pass: the new drafts; the committed tokens split into the drafts
    that held and the AR model's own token (stacked); the drafts dropped; and a star at each
    block's first pass for the token the context tower's pass gave the block before it."""
    tally = trace.draft_tally()
    held = [h[row] for h in tally.step_held]
    own = [len(e.committed[row]) - h for e, h in zip(steps, held)]
    fig = go.Figure([
        go.Bar(x=x, y=[e.planned[row] for e in steps], hovertext=text, marker_color=BLUE, offsetgroup="drafts",
               name="new drafts over γ (checked by the next pass)"),
        go.Bar(x=x, y=held, hovertext=text, marker_color=ORANGE, offsetgroup="commits", name="committed: drafts that held"),
        go.Bar(x=x, y=own, base=held, hovertext=text, marker_color=ORANGE, marker_pattern_shape="/",
               offsetgroup="commits", name="committed: the AR model's token (a block's last step: all left)"),
        go.Bar(x=x, y=[len(e.rejected[row]) if e.rejected else 0 for e in steps], name="drafts dropped", marker_color="#999",
               offsetgroup="dropped", hovertext=text),
    ])
    given = [c for c in commit_table(trace, row) if c.step == GIVEN]   # c.frame: its block's first pass
    if given:
        fig.add_trace(go.Scatter(x=[c.frame + 0.6 for c in given], y=[1] * len(given), mode="markers",
                                 marker=dict(symbol="star", size=12, color=GREEN, line=dict(width=1, color="#333")),
                                 name="a block's first token, from the context pass before it",
                                 hovertext=[f"block {c.block}: {label(trace, c.token, 20)!r}" for c in given],
                                 hoverinfo="text"))
    n_held, n_own = sum(held), sum(own)
    return fig, (f"Where the {n_held + n_own + len(given)} committed tokens came from: {n_own} the AR model's own in the "
                 f"{len(steps)} denoiser passes, {n_held} held draft{'' if n_held == 1 else 's'}"
                 + (f", {len(given)} from the context pass" if given else "") + _by_depth(tally, row))


def _by_depth(tally: DraftTally, row: int) -> str:
    """A subtitle: per draft depth, how many drafts the check reached and how many held."""
    reached, held = tally.reached[row], tally.held_at[row]
    if not reached:
        return ""
    parts = [f"depth {d}: {h} of {n}" for d, (h, n) in enumerate(zip(held, reached), 1)][:6]
    parts += ["…"] if len(reached) > 6 else []
    return "<br><sup>drafts that held, of those the check reached (depth 1 = the first draft after the written text): " \
           + " · ".join(parts) + "</sup>"


def tokens_per_step(trace, row: int = 0) -> go.Figure:
    """Teaching aid: how many tokens each denoiser step committed, block by block."""
    if trace.mode != "diffusion":
        return note_figure(AR_NOTE)
    steps = trace.steps()
    if not steps:
        return note_figure("No step recorded yet.")
    blocks = sorted({e.block for e in steps})
    depth = max(e.step for e in steps) + 1
    z = [[None] * depth for _ in blocks]
    hover = [[""] * depth for _ in blocks]
    for e in steps:
        k = blocks.index(e.block)
        z[k][e.step] = len(e.committed[row])
        hover[k][e.step] = f"{len(e.committed[row])} committed ({e.planned[row]} " + (
            "new drafts)" if e.drafts is not None else "above the threshold)")
    most = max(b.size for b in trace.blocks()) if trace.blocks() else None
    fig = go.Figure(go.Heatmap(z=z, x=list(range(depth)), y=[f"block {b}" for b in blocks], colorscale=SCALE,
                               zmin=0, zmax=most, text=[["" if v is None else str(v) for v in r] for r in z],
                               texttemplate="%{text}", customdata=hover, xgap=2, ygap=2,
                               colorbar=dict(title="tokens", thickness=12),
                               hovertemplate="%{y}, step %{x}: %{customdata}<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(dtick=1 if depth < 20 else None)
    return _layout(fig, "Tokens committed per step, block by block<br><sup>blank: no step there "
                   "(the block was full, or its text had ended)</sup>",
                   "step within block", "", height=min(700, 140 + 26 * len(blocks)))
