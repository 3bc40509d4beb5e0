"""A recorded run: settings, model info, prompt, every event and summary stats, as JSON.

Visualizers and the app read only traces, so a run can be replayed and rendered without
the model. `Trace.record(events)` passes events through while recording them.
"""
from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field, fields
from functools import cache
from pathlib import Path
from types import NoneType, UnionType
from typing import Iterable, Iterator, get_args, get_origin, get_type_hints

from .events import EVENT_TYPES, BlockStart, Done, Event, Step, Token, event_from_dict

TRACE_VERSION = 1
MODES = ("diffusion", "ar")
LIST = (list, tuple)                 # JSON lists; a dict from to_dict() may hold tuples
FIELD_TYPES = {"settings": (dict,), "model": (dict,), "prompts": LIST, "prompt_ids": LIST, "tokens": (dict,),
               "events": LIST}       # top-level fields of a trace (all optional but mode and events)


def held_depth(tree: list[list[int]], tokens: list[int], start: int) -> int:
    """How far into a draft tree (its leaf paths from block position start) the committed
    tokens follow one of its paths: the drafts of a tree pass that held."""
    def agree(path):
        return next((i for i, tok in enumerate(path) if start + i >= len(tokens) or tokens[start + i] != tok), len(path))
    return max((agree(path) for path in tree), default=0)


def tree_reached(tree: list[list[int]], tokens: list[int], start: int, held: int) -> int:
    """How deep the check of a draft tree reached: the `held` drafts of the kept path, and one
    more where a path goes on past them (that draft was checked and failed)."""
    goes_on = any(len(path) > held and path[:held] == tokens[start:start + held] for path in tree)
    return held + goes_on


class DraftTally:
    """The verify order's drafts, per row: how many the next pass kept (committed as drafted)
    and dropped. A draft tree counts as deep as its longest path: the positions it drafted,
    of which the held path kept some. By depth (1 = the first draft after the written text):
    how often the check reached a draft (every draft before it held) and how often it held,
    so held / reached at depth d is the acceptance of a d-th draft. Feed it a run's events in order."""

    def __init__(self, batch: int):
        self.held, self.dropped = [0] * batch, [0] * batch
        self.rows = [0] * batch                   # draft trees: block rows the passes for each row ran
        self.tree_passes = [0] * batch            # ... and those passes
        self.pending: list[dict[int, int]] = [{} for _ in range(batch)]   # the last pass's drafts: position -> id
        self.step_held: list[list[int]] = []      # per Step event (all of them, in order), per row: the drafts it kept
        self.reached: list[list[int]] = [[] for _ in range(batch)]   # per row, by depth - 1: drafts the check reached
        self.held_at: list[list[int]] = [[] for _ in range(batch)]   # ... and drafts that held

    def update(self, event: Event) -> None:
        if isinstance(event, BlockStart):
            self.forget_drafts()
        elif isinstance(event, Step) and event.drafts is None:
            self.step_held.append([0] * len(event.tokens))    # a pass that checked no drafts (a fork to another order)
        elif isinstance(event, Step):
            self.step_held.append([0] * len(event.drafts))
            for b, drafts in enumerate(event.drafts):
                tokens = event.tokens[b]
                if event.tree is not None:
                    tree, committed = event.tree[b], event.committed[b]
                    held = dropped = reached = 0
                    if tree and committed:               # a pass that checked a tree for this row
                        held = held_depth(tree, tokens, min(committed))
                        dropped = max(len(path) for path in tree) - held
                        reached = tree_reached(tree, tokens, min(committed), held)
                else:                                    # a dropped draft may be refilled with its token unchecked
                    rejected = set(event.rejected[b])    # (a block's last step): it did not hold
                    held = sum(self.pending[b].get(j) == tokens[j] and j not in rejected for j in event.committed[b])
                    dropped = len(rejected)
                    depth = len(self.pending[b]) if event.committed[b] else 0   # a settled row checks nothing
                    reached = min(depth, held + 1)       # the drafts are one run: the check stops at a failure
                self._count_depths(b, reached, held)
                self.held[b] += held
                self.dropped[b] += dropped
                self.step_held[-1][b] = held
                self.pending[b] = {j: d for j, d in enumerate(drafts) if d >= 0}
                if event.rows is not None and (event.active is None or event.active[b]):
                    self.rows[b] += event.rows[b]
                    self.tree_passes[b] += 1

    def forget_drafts(self) -> None:
        """The next pass checks no drafts (a new block; a fork that resumed without its parent's)."""
        self.pending = [{} for _ in self.pending]

    def _count_depths(self, row: int, reached: int, held: int) -> None:
        """One row's check: it reached the first `reached` drafts and the first `held` held."""
        counts, kept = self.reached[row], self.held_at[row]
        if reached > len(counts):
            counts += [0] * (reached - len(counts))
            kept += [0] * (reached - len(kept))
        for d in range(reached):
            counts[d] += 1
            kept[d] += d < held


# ---- reading a trace's JSON ----------------------------------------------------------------------
def not_a_trace(what: str) -> ValueError:
    return ValueError(f"not a TwoTower trace: {what}")


KIND_WORDS = {dict: "an object", list: "a list", tuple: "a list", str: "a string", bool: "true/false",
              int: "a number", float: "a number", NoneType: "null"}


def json_kind(value) -> str:
    """What a JSON value is, in words: 'an object', 'a list', 'a string', 'null', ..."""
    return KIND_WORDS.get(type(value), type(value).__name__)


def kinds_text(types: tuple[type, ...]) -> str:
    """'a list or null', 'a number': the JSON kinds of some Python types, in words."""
    return " or ".join(dict.fromkeys(KIND_WORDS.get(t, t.__name__) for t in types))


@cache
def field_types(event_class) -> dict[str, tuple[type, ...]]:
    """The outer Python types each field of an event class accepts, from its annotations
    (list[int] | None -> (list, NoneType); float -> (int, float): JSON writes 1.0 as 1)."""
    def outer(hint) -> tuple[type, ...]:
        if isinstance(hint, UnionType):
            return sum(map(outer, get_args(hint)), ())
        base = get_origin(hint) or hint
        return (int, float) if base is float else LIST if base is list else (base,)
    return {name: outer(hint) for name, hint in get_type_hints(event_class).items()}


def check_fields(d) -> None:
    """ValueError naming the first top-level field of a trace dict that is missing or of the wrong kind."""
    if not isinstance(d, dict) or "events" not in d or "mode" not in d:
        raise not_a_trace("expected a JSON object with 'mode' and 'events'")
    if d["mode"] not in MODES:
        raise not_a_trace(f"'mode' must be 'diffusion' or 'ar', got {d['mode']!r}")
    for name, types in FIELD_TYPES.items():
        if name in d and not isinstance(d[name], types):
            raise not_a_trace(f"{name!r} must be {kinds_text(types)}, got {json_kind(d[name])}")
    if not all(isinstance(p, str) for p in d.get("prompts", [])):
        raise not_a_trace("'prompts' must be a list of strings")
    if not all(isinstance(ids, LIST) and all(isinstance(i, int) for i in ids) for ids in d.get("prompt_ids", [])):
        raise not_a_trace("'prompt_ids' must be a list of lists of token ids")
    if not all(isinstance(piece, str) for piece in d.get("tokens", {}).values()):
        raise not_a_trace("'tokens' must map token ids to strings")
    if type(d.get("version", TRACE_VERSION)) is not int:
        raise not_a_trace(f"'version' must be an integer, got {json_kind(d['version'])}")
    if not isinstance(d.get("fork"), (dict, NoneType)):
        raise not_a_trace(f"'fork' must be an object or null, got {json_kind(d['fork'])}")


def read_event(n: int, d) -> Event:
    """Event number n (from 0) of a trace's 'events'; ValueError saying what is wrong with it."""
    if not isinstance(d, dict):
        raise not_a_trace(f"event {n} must be an object, got {json_kind(d)}")
    kind = d.get("type")
    if not isinstance(kind, str) or kind not in EVENT_TYPES:
        raise not_a_trace(f"event {n} has unknown event type {kind!r}")
    missing = [f.name for f in fields(EVENT_TYPES[kind])
               if f.default is MISSING and f.default_factory is MISSING and f.name not in d]
    if missing:
        raise not_a_trace(f"event {n} ({kind}) lacks {', '.join(missing)}")
    for name, types in field_types(EVENT_TYPES[kind]).items():
        if name in d and not isinstance(d[name], types):
            raise not_a_trace(f"event {n} ({kind}): {name!r} must be {kinds_text(types)}, got {json_kind(d[name])}")
    try:
        return event_from_dict(d)
    except (TypeError, ValueError) as e:
        raise not_a_trace(f"event {n} ({kind}): {e}") from None


@dataclass
class Trace:
    mode: str                                   # "diffusion" | "ar"
    settings: dict                              # SamplerConfig as a dict
    model: dict                                 # model info (name, architecture, mask id, ...)
    prompts: list[str]                          # per row, as given (before any chat template)
    prompt_ids: list[list[int]]                 # per row, the ids the context tower read
    tokens: dict[str, str] = field(default_factory=dict)  # id -> text piece, for rendering
    events: list[Event] = field(default_factory=list)
    version: int = TRACE_VERSION
    fork: dict | None = None                    # a fork: {"block", "step", ...} it continues from
                                                # (twotower.fork: a spliced fork also says how many
                                                # steps it inherited and the parent's settings)

    def record(self, events: Iterable[Event]) -> Iterator[Event]:
        """Yield each event unchanged, keeping a copy."""
        for event in events:
            self.events.append(event)
            yield event

    # ---- views used by renderers -------------------------------------------------------
    @property
    def done(self) -> Done | None:
        return next((e for e in reversed(self.events) if isinstance(e, Done)), None)

    def steps(self) -> list[Step]:
        return [e for e in self.events if isinstance(e, Step)]

    def blocks(self) -> list[BlockStart]:
        return [e for e in self.events if isinstance(e, BlockStart)]

    def ar_tokens(self) -> list[Token]:
        return [e for e in self.events if isinstance(e, Token)]

    def stats(self) -> dict:
        """Summary figures of the finished run (empty if it did not finish)."""
        done = self.done
        if done is None:
            return {}
        n, rows = done.tokens, max(1, len(done.token_ids))
        return {
            "tokens": n,
            "nfe": done.nfe,
            "tokens_per_nfe": n / rows / done.nfe if done.nfe else 0.0,   # per sequence
            "context_passes": done.context_passes,
            "seconds": done.seconds,
            "tokens_per_second": n / done.seconds if done.seconds > 0 else 0.0,
            "first_token_seconds": done.first_token_seconds,
            "stopped": done.stopped,
            **self.draft_stats(),
        }

    def draft_stats(self) -> dict:
        """Verify-order runs: drafts checked and kept, over all rows ({} for other runs)."""
        tally = self.draft_tally()
        if tally is None:
            return {}
        stats = {"drafts_checked": sum(tally.held) + sum(tally.dropped), "drafts_kept": sum(tally.held)}
        if sum(tally.tree_passes):                # draft trees: rows per pass, the cost of a pass in rows
            stats["rows_per_pass"] = sum(tally.rows) / sum(tally.tree_passes)
        return stats

    def draft_tally(self) -> DraftTally | None:
        """The verify order's drafts of this run (None for other runs). A fork's first pass
        checked the drafts its parent's step left (`fork["carried_drafts"]`): a spliced fork
        holds them in the parent's step; a fork's own trace takes them from `fork`. A spliced
        fork made before forks carried them checked none after the fork point."""
        steps = self.steps()
        if not steps or steps[0].drafts is None:
            return None
        fork = self.fork or {}
        carried = fork.get("carried_drafts")
        spliced = "inherited" in fork
        tally, seen = DraftTally(len(steps[0].drafts)), 0
        for event in self.events:
            tally.update(event)
            if carried and not spliced and isinstance(event, BlockStart) and event.block == fork["block"]:
                tally.pending = [{j: d for j, d in enumerate(row) if d >= 0} for row in carried]
            if isinstance(event, Step):
                seen += 1
                if spliced and carried is None and seen == fork["inherited"]:
                    tally.forget_drafts()
        return tally

    # ---- JSON --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "mode": self.mode,
            "settings": self.settings,
            "model": self.model,
            "prompts": self.prompts,
            "prompt_ids": self.prompt_ids,
            "tokens": self.tokens,
            "stats": self.stats(),
            "events": [e.to_dict() for e in self.events],
            **({"fork": self.fork} if self.fork else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Trace":
        """The trace of a dict from `to_dict`; ValueError("not a TwoTower trace: ...") for anything else."""
        check_fields(d)
        if d.get("version", 0) > TRACE_VERSION:
            raise ValueError(f"trace version {d['version']} is newer than this tool's {TRACE_VERSION}")
        return cls(
            mode=d["mode"],
            settings=d.get("settings", {}),
            model=d.get("model", {}),
            prompts=d.get("prompts", []),
            prompt_ids=d.get("prompt_ids", []),
            tokens={str(k): v for k, v in d.get("tokens", {}).items()},
            events=[read_event(n, e) for n, e in enumerate(d["events"])],
            version=d.get("version", TRACE_VERSION),
            fork=d.get("fork"),
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> "Trace":
        """The trace saved at path; errors name the file."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"trace file not found: {path}") from None
        except UnicodeDecodeError:
            raise ValueError(f"trace file {path}: not a TwoTower trace: not UTF-8 text") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"trace file {path} is not valid JSON: {e}") from None
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"trace file {path}: {e}") from None
