"""A run as a standalone HTML page (the token grid with playback, no server), and as JSON.

The page inlines assets/grid.css, assets/grid.js and the grid's payload, so it opens from a
file or an e-mail attachment and needs no network.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

from .trajectory import payload

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def asset(name: str) -> str:
    return (ASSETS / name).read_text()


def _script_json(obj) -> str:
    """JSON safe to inline in a <script> element."""
    return json.dumps(obj).replace("</", "<\\/")


def counted(n: int, noun: str) -> str:
    """'1 pass', '2 passes': a count with its noun (nouns here add -es after s, else -s)."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}{'es' if noun.endswith('s') else 's'}"


def passes_text(trace, s: dict) -> str:
    """The passes a finished run took: AR forward passes, or denoiser passes and the context tower's."""
    if trace.mode == "ar":
        return counted(s["nfe"], "forward pass")
    return f"{counted(s['nfe'], 'denoiser pass')} (+ {s['context_passes']} of the context tower)"


def drafts_text(s: dict) -> str:
    """The verify order's drafts: how many of those drafted the next pass kept ('' for other orders)."""
    return f"drafts kept {s['drafts_kept']} of {s['drafts_checked']} drafted" if "drafts_checked" in s else ""


def stats_line(trace) -> str:
    """One line of the run's figures (empty for an unfinished run)."""
    s = trace.stats()
    if not s:
        return "An unfinished run."
    drafts = f"{drafts_text(s)} · " if "drafts_checked" in s else ""
    return (f"{trace.mode} · {s['tokens']} tokens · {passes_text(trace, s)} · {s['tokens_per_nfe']:.2f} tokens/pass · "
            f"{drafts}{s['seconds']:.2f} s · {s['tokens_per_second']:.1f} tokens/s · ended by {s['stopped']}")


def static_html(trace, title: str = "TwoTower run") -> str:
    data = json.dumps(payload(trace))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}}
.stats{{opacity:.8;font-size:.9em}}
{asset("grid.css")}</style></head>
<body><h2>{html.escape(title)}</h2>
<p>Prompt: <em>{html.escape((trace.prompts or [""])[0][:500])}</em></p>
<p class="stats">{html.escape(stats_line(trace))}</p>
<div id="grid" class="ttg-host"></div>
<script>
const code = {_script_json(asset("grid.js"))};
const props = {{value: {_script_json(data)}}};
new Function("element", "trigger", "props", "server", "upload", "watch", code)(
  document.getElementById("grid"), () => {{}}, props, {{}}, null, () => {{}});
</script></body></html>
"""


def _round(obj, digits: int):
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, list):
        return [_round(x, digits) for x in obj]
    if isinstance(obj, dict):
        return {k: _round(v, digits) for k, v in obj.items()}
    return obj


def trace_json(trace, digits: int = 5) -> str:
    """Trace.to_dict() with floats rounded (attention maps shrink about 3x); Trace.from_dict reads it."""
    return json.dumps(_round(trace.to_dict(), digits), separators=(",", ":"))
