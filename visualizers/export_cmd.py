"""`python -m twotower export TRACE.json --html OUT.html [--json OUT.json]`.

Writes a saved run as one self-contained HTML page that plays the token grid back offline
(visualizers/export.py), and/or as compact trace JSON. Registered by name in twotower/cli.py,
so the library never imports the renderers unless this command runs.
"""
from __future__ import annotations

import sys
from pathlib import Path

from .export import static_html, trace_json


def cmd_export(args) -> int:
    from twotower.trace import Trace
    if not args.html and not args.json:
        raise ValueError("name an output: --html OUT.html and/or --json OUT.json")
    trace = Trace.load(args.trace)
    title = args.title or f"TwoTower {trace.mode} run: {Path(args.trace).stem}"
    if args.html:
        Path(args.html).write_text(static_html(trace, title=title))
        print(f"page written to {args.html}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(trace_json(trace))
        print(f"trace written to {args.json}", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a saved trace as a standalone HTML page (and/or compact JSON)")
    p.add_argument("trace", help="trace JSON (from `generate --trace` or the app's export)")
    p.add_argument("--html", default=None, help="write a self-contained page that plays the run back")
    p.add_argument("--json", default=None, help="write the trace again as compact JSON (floats rounded)")
    p.add_argument("--title", default=None, help="page title")
    p.set_defaults(func=cmd_export)
