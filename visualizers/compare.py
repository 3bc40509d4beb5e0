"""Two runs side by side: their final tokens block by block, the positions where they differ,
and their figures (tokens, NFE, tokens per NFE, tokens/s, steps per block).

`html(a, b)` is a static HTML fragment (no script: a gr.HTML value styled by
assets/compare.css). A fork (twotower.fork.splice) beside its parent also shows which
positions it inherited and how many passes each run needed after the fork point.
"""
from __future__ import annotations

import html as _html

from twotower.sampling import SamplerConfig

from .pieces import raw_piece, special_ids, visible
from .commits import GIVEN, commit_table
from .trajectory import frames, layout_blocks, output_length, setting_changes

END = -2                     # a position after the run's end-of-text (not part of its text)


def final_tokens(trace, row: int = 0) -> list[int]:
    """Per generated position: its final token, -1 where never committed, END after end-of-text."""
    commits = commit_table(trace, row)
    tokens = [-1] * (max((c.pos for c in commits), default=-1) + 1)
    for c in commits:
        tokens[c.pos] = c.token
    n_out = output_length(trace, row)
    return tokens if n_out is None else [t if p < n_out else END for p, t in enumerate(tokens)]


def differences(a, b, row: int = 0) -> list[int]:
    """Positions whose text differs between the two runs (after both ended, nothing differs)."""
    ta, tb = final_tokens(a, row), final_tokens(b, row)
    pad = lambda t, p: t[p] if p < len(t) else (END if t and t[-1] == END else -1)
    return [p for p in range(max(len(ta), len(tb))) if pad(ta, p) != pad(tb, p)]


def is_fork_of(child, parent) -> bool:
    """True when `child` is a spliced fork of `parent` (same prompt, parent's settings)."""
    fork = getattr(child, "fork", None) or {}
    return ("inherited" in fork and child.prompt_ids == parent.prompt_ids
            and fork.get("parent_settings") == parent.settings)


def steps_per_block(trace) -> list[int]:
    return [e.steps_used for e in trace.events if type(e).__name__ == "BlockCommitted"]


def summary(trace) -> dict:
    """The figures the comparison table shows."""
    s, per_block = trace.stats(), steps_per_block(trace)
    return {"tokens": s.get("tokens"), "nfe": s.get("nfe"), "tokens_per_nfe": s.get("tokens_per_nfe"),
            "tokens_per_second": s.get("tokens_per_second"), "seconds": s.get("seconds"),
            "steps_per_block": per_block,
            "mean_steps": sum(per_block) / len(per_block) if per_block else None,
            "stopped": s.get("stopped", "unfinished")}


def name(trace) -> str:
    """A short label: mode and the settings that matter most for the comparison."""
    if trace.mode == "ar":
        return "AR (context tower alone)"
    s = trace.settings or {}
    fork = getattr(trace, "fork", None)
    head = f"fork at block {fork['block']}, step {fork['step']}" if fork else "diffusion"
    temperature = [f"temperature {s['temperature']}"] if s.get("temperature") else []
    return " · ".join([head, f"γ {s.get('threshold')}", f"T {s.get('steps')}", str(s.get("remasking")),
                       *temperature, *SamplerConfig.from_dict(s).guard_phrases()])


# ---- HTML ------------------------------------------------------------------------------------
def _fmt(value, spec: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, list):
        return "·".join(map(str, value[:24])) + (" …" if len(value) > 24 else "")
    return format(value, spec)


def stats_table(a, b, fork_of: bool) -> str:
    sa, sb = summary(a), summary(b)
    rows = [("tokens", "tokens", "d"), ("forward passes (NFE)", "nfe", "d"),
            ("tokens per pass", "tokens_per_nfe", ".2f"), ("tokens / second", "tokens_per_second", ".1f"),
            ("seconds", "seconds", ".2f"), ("steps per block", "steps_per_block", ""),
            ("mean steps per block", "mean_steps", ".2f"), ("ended by", "stopped", "")]
    out = []
    for label, key, spec in rows:
        va, vb = _fmt(sa[key], spec), _fmt(sb[key], spec)
        cls = ' class="ttc-differs"' if va != vb else ""
        out.append(f"<tr{cls}><th>{label}</th><td>{_html.escape(va)}</td><td>{_html.escape(vb)}</td></tr>")
    if fork_of:
        at = b.fork["nfe"]
        out.append(f'<tr class="ttc-differs"><th>passes after the fork point</th>'
                   f"<td>{_fmt(sa['nfe'] - at if sa['nfe'] is not None else None, 'd')}</td>"
                   f"<td>{_fmt(sb['nfe'] - at if sb['nfe'] is not None else None, 'd')}</td></tr>")
    for key, (va, vb) in setting_changes(a.settings or {}, b.settings or {}).items():
        out.append(f'<tr class="ttc-differs"><th>setting: {_html.escape(key)}</th>'
                   f"<td>{_html.escape(str(va))}</td><td>{_html.escape(str(vb))}</td></tr>")
    return ('<table class="ttc-stats"><tr><th></th><th>A</th><th>B</th></tr>' + "".join(out) + "</table>")


def _inherited(trace, row: int) -> set[int]:
    fork = getattr(trace, "fork", None) or {}
    if "inherited" not in fork:
        return set()
    return {c.pos for c in commit_table(trace, row) if c.frame < fork["inherited"]}


def _grid(trace, differ: set[int], inherited: set[int], row: int) -> str:
    commits = {c.pos: c for c in commit_table(trace, row)}
    n_out, special = output_length(trace, row), special_ids(trace)
    rows = []
    for k, (start, size, _) in enumerate(layout_blocks(trace, len(frames(trace, row)[0]))):
        cells = []
        for p in range(start, start + size):
            c = commits.get(p)
            if c is None:
                cells.append(f'<span class="ttc-cell missing" title="position {p}: never committed">?</span>')
                continue
            after = n_out is not None and p >= n_out
            cls = ["ttc-cell", "diff" if p in differ else "", "inh" if p in inherited else "",
                   "after" if after else "", "special" if c.token in special else ""]
            where = (f"token {p}" if trace.mode != "diffusion" else f"block {c.block}, step {c.step}" if c.step != GIVEN
                     else f"block {c.block}, its first token, from the context tower's pass before step 0")
            title = (f"position {p} · {where} · p={c.confidence:.2f}" + (" · differs" if p in differ else "")
                     + (" · inherited from before the fork" if p in inherited else "")
                     + (" · after end-of-text" if after else ""))
            cells.append(f'<span class="{" ".join(x for x in cls if x)}" data-pos="{p}" title="{_html.escape(title)}">'
                         f"{_html.escape(visible(raw_piece(trace, c.token)))}</span>")
        label = f"B{k}" if trace.mode == "diffusion" else str(start)
        rows.append(f'<div class="ttc-row"><span class="ttc-bl">{label}</span><span class="ttc-cells">'
                    f'{"".join(cells)}</span></div>')
    return "".join(rows)


def html(a, b, titles: tuple[str, str] = ("A", "B"), row: int = 0) -> str:
    """Both runs' grids side by side with differing positions marked, and the figures table."""
    differ = set(differences(a, b, row))
    fork_of = is_fork_of(b, a)
    inherited = _inherited(b, row) if fork_of else set()
    first = f" (first at position {min(differ)})" if differ else ""
    same_prompt = a.prompt_ids == b.prompt_ids
    note = "" if same_prompt else '<p class="ttc-warn">The two runs have different prompts.</p>'
    cols = []
    for tag, title, trace in (("A", titles[0], a), ("B", titles[1], b)):
        text = trace.done.texts[row] if trace.done else "(unfinished run)"
        cols.append(f'<div class="ttc-col"><div class="ttc-h"><b>{tag}: {_html.escape(title)}</b><br>'
                    f'<span class="ttc-sub">{_html.escape(name(trace))}</span></div>'
                    f"{_grid(trace, differ, inherited, row)}"
                    f'<div class="ttc-text">{_html.escape(text)}</div></div>')
    legend = ('<span class="ttc-cell diff">word</span> differs between the runs '
              + ('<span class="ttc-cell inh">word</span> committed before the fork point (shared) '
                 if inherited else "")
              + '<span class="ttc-cell after">word</span> after end-of-text')
    return (f'<div class="ttc">{note}<div class="ttc-summary"><b>{len(differ)}</b> position'
            f'{"" if len(differ) == 1 else "s"} differ{"s" if len(differ) == 1 else ""}{first}. '
            f'<span class="ttc-legend">{legend}</span></div>'
            f'<div class="ttc-main"><div class="ttc-cols">{"".join(cols)}</div>'
            f'<div class="ttc-side">{stats_table(a, b, fork_of)}</div></div></div>')
