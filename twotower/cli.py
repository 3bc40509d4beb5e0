"""Command line: `python -m twotower COMMAND ...`.

Each command lives in its own module that exposes `add_parser(subparsers)`; the parser it
adds sets `func(args) -> int`. Commands are imported lazily so `--help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {            # command -> module that defines it
    "generate": "twotower.generate_cmd",
    "info": "twotower.generate_cmd",
    "train": "twotower.train",
    "corpus": "twotower.corpus",
    "eval": "twotower.evaluate",
    "bench": "twotower.bench",
    # rendering commands live in visualizers/ (which reads traces, never the model) and are
    # loaded by name only when asked for, so the library never imports the renderers
    "export": "visualizers.export_cmd",
}


POSITIVE = (lambda v: v >= 1, "a positive integer")     # the commonest rule for check_options


def check_options(args, rules: dict) -> None:
    """Command options checked before any work. rules: option (argparse dest) -> (is the value
    possible?, what it must be); ValueError naming the first option given (not None) that breaks
    its rule, and its value."""
    for name, (possible, wanted) in rules.items():
        value = getattr(args, name)
        if value is not None and not possible(value):
            raise ValueError(f"--{name.replace('_', '-')} must be {wanted}, got {value!r}")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m twotower",
                                     description="Run, train and study TwoTower diffusion LMs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = [a for a in argv if a in COMMANDS][:1] or list(COMMANDS)
    added = set()
    for name in wanted if wanted != list(COMMANDS) else COMMANDS:
        module = COMMANDS[name]
        if module in added:
            continue
        try:
            importlib.import_module(module).add_parser(sub)
            added.add(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, OSError) as e:     # OSError: missing/unreadable files, bad config.json
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:              # Ctrl-C: the loops run in this thread, so they stop here
        print("interrupted", file=sys.stderr)
        return 130
