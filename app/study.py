"""Handlers for studying a run after it ended: the inspector's AR view, forks and comparisons.

- ar_view: the inspector's "what would the AR model put here?" (one context-tower pass over
  the prompt and the run's text, cached per trace), sent to the grid as its `ar` prop
- pick_fork / run_fork: the grid's "fork from this step" fills the Fork tab; the fork runs
  from that step with the changed settings and is compared with the original run
- open_fork / compare_files: show the fork in the grid; compare two saved traces
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import gradio as gr

from twotower.events import Step
from twotower.fork import fork_point, splice
from twotower.runner import add_pieces
from twotower.sampling import SamplerConfig
from twotower.teacher import ar_predictions
from twotower.trace import Trace
from visualizers import compare, export
from visualizers.pieces import piece_table
from visualizers.commits import commit_table

from .gpu import gpu
from .handlers import Throttle, compute, grid_key, grid_value, partial_text, record, status_line, uploaded_trace
from .settings import ngram_size, number, user_errors, whole
from .state import OPTIONS, Session, get_model

AR_CANDIDATES = 5


def check_model(trace: Trace, model) -> None:
    """A trace made by another model cannot be continued or explained by this one."""
    name = trace.model.get("name")
    if name and name != model.name:
        raise ValueError(f"this trace was made by the model {name!r}; the loaded model is {model.name!r}")
    vocab = trace.model.get("vocab")
    if vocab and vocab != model.context_lm.config.vocab_size:
        raise ValueError(f"this trace's vocabulary ({vocab}) is not the loaded model's "
                         f"({model.context_lm.config.vocab_size})")


# ---- the inspector's AR view ------------------------------------------------------------------
def committed_text(trace: Trace, row: int = 0) -> list[int]:
    """The run's tokens from position 0 up to the first position never committed."""
    tokens = {c.pos: c.token for c in commit_table(trace, row)}
    out = []
    while len(out) in tokens:
        out.append(tokens[len(out)])
    return out


@gpu(duration=60)
def ar_compute(prompt: list[int], generated: list[int]) -> dict:
    return ar_predictions(get_model(), prompt, generated, AR_CANDIDATES)


def ar_table(trace: Trace) -> dict:
    """{"top": [[ids, probs ×1000]] per position, "chosen": [p ×1000], "pieces": {...}}."""
    model = get_model()
    check_model(trace, model)
    got = ar_compute(trace.prompt_ids[0], committed_text(trace))
    ids = {i for row in got["top_ids"] for i in row}
    add_pieces(trace, model.tokenizer, ids)
    return {"top": [[row, [round(1000 * p) for p in probs]] for row, probs in zip(got["top_ids"], got["top_probs"])],
            "chosen": [round(1000 * p) for p in got["chosen"]], "pieces": piece_table(trace, ids)}


def ar_view(session: Session, evt: gr.EventData):
    """The grid asked for the AR model's view (evt.pos: the inspected position): all positions at once."""
    trace = session.trace
    if trace is None:
        return gr.skip()
    if session.ar is None or session.ar[0] is not trace:
        try:
            session.ar = (trace, ar_table(trace))
        except ValueError as e:                   # sent, not kept: asking again tries again
            return gr.HTML(ar=json.dumps({"error": str(e), "key": grid_key(trace), "sent": time.time()}))
    return gr.HTML(ar=json.dumps({**session.ar[1], "key": grid_key(trace), "sent": time.time()},
                                 separators=(",", ":")))


# ---- forks ------------------------------------------------------------------------------------
def fork_note(trace: Trace, block: int, step: int) -> str:
    point = fork_point(trace, block, step)
    mask = trace.model.get("mask_token_id")
    size = len(point.tokens[0])
    done = sum(t != mask for t in point.tokens[0])
    return (f"**Fork point:** block {block}, after step {step}: {done} of its {size} positions committed, "
            f"{point.start} tokens in earlier blocks. Change the settings and press **Continue from here**.")


def pick_fork(session: Session, evt: gr.EventData):
    """The grid's fork button: the point, the run's own settings to start from, and the Fork tab."""
    trace = session.trace
    with user_errors():
        if trace is None:
            raise ValueError("run a prompt (or open a trace) first")
        block, step = int(evt.block), int(evt.step)
        note = fork_note(trace, block, step)
    session.fork_tab_for = trace
    return (block, step, *fork_settings_of(trace), note, gr.Tabs(selected="fork"))


def fork_settings_of(trace: Trace) -> tuple:
    """The run's own values of the settings a fork may change (the Fork tab's, in run_fork's order)."""
    s = SamplerConfig.from_dict(trace.settings or {})
    return s.threshold, s.remasking, s.temperature, s.steps, s.repetition_penalty, s.no_repeat_ngram_size


def fork_defaults(session: Session):
    """After a run or an opened trace: the Fork tab starts from that run's own settings at its
    first step, without the last comparison, so a fork changes only what is edited there."""
    trace = session.trace
    if trace is None or trace is session.fork_tab_for:
        return (gr.skip(),) * 10
    session.fork_tab_for = trace
    return (0, 0, *fork_settings_of(trace), "", "")


def fork_config(parent: Trace, threshold, remasking, temperature, steps, repetition_penalty,
                no_repeat_ngram_size) -> SamplerConfig:
    changed = dict(threshold=number("threshold", threshold), remasking=str(remasking),
                   temperature=number("temperature", temperature), steps=whole("steps", steps),
                   repetition_penalty=number("repetition penalty", repetition_penalty),
                   no_repeat_ngram_size=ngram_size(no_repeat_ngram_size))
    if changed["remasking"] != "verify":
        changed["draft_nodes"] = 0                 # a draft tree is for the verify order only
    return SamplerConfig.from_dict({**(parent.settings or {}), **changed}).validate()


def fork_status(parent: Trace, fork: Trace) -> str:
    n = len(compare.differences(parent, fork))
    s, at = fork.stats(), fork.fork["nfe"]
    return (f"**Fork finished** from block {fork.fork['block']}, step {fork.fork['step']} · "
            f"{s['nfe'] - at} passes after the fork point (the original took {parent.stats().get('nfe', at) - at}) · "
            f"**{n}** position{'s' if n != 1 else ''} differ{'s' if n == 1 else ''}. "
            "Press **Open the fork in the Denoising tab** to replay it step by step.")


def run_fork(block, step, threshold, remasking, temperature, steps, repetition_penalty, no_repeat_ngram_size,
             session: Session):
    """Continue the shown run from (block, step) with the changed settings; yield (compare view, status)."""
    parent = session.trace
    with user_errors():
        if parent is None:
            raise ValueError("run a prompt (or open a trace) first, then fork it")
        model = get_model()
        check_model(parent, model)
        point = fork_point(parent, whole("block", block), whole("step", step))
        cfg = fork_config(parent, threshold, remasking, temperature, steps, repetition_penalty,
                          no_repeat_ngram_size)
        cfg.validate(model.max_context)
    session.fork_state, session.fork_running = "running", None
    yield gr.skip(), "**Running the fork…**"
    stream = compute((parent.prompts or [""])[0], parent.prompt_ids[0], cfg, "diffusion", (), point)
    child = next(stream)
    session.fork_running = (parent, child)
    throttle = Throttle(OPTIONS.stream_interval)
    try:
        with user_errors():
            for event in record(stream, child):
                if throttle.ready() and hasattr(event, "nfe"):
                    yield gr.skip(), f"**Running the fork…** {event.nfe} passes so far"
    except Exception:
        session.fork_state, session.fork_running = "failed", None
        raise
    fork = splice(parent, child)
    session.fork, session.fork_parent, session.fork_state, session.fork_running = fork, parent, "done", None
    yield compare.html(parent, fork, ("original run", "fork")), fork_status(parent, fork)


def fork_settle(session: Session):
    """After the fork event ended: if Stop cancelled it, show what it computed so far beside
    the original (compare view, status)."""
    if session.fork_state != "running":
        return gr.skip(), gr.skip()
    parent, child = session.fork_running or (None, None)
    session.fork_state, session.fork_running = "stopped", None
    again = "Press **Continue from here** to run it again."
    if child is None or not any(isinstance(e, Step) for e in child.events):
        return gr.skip(), f"**Fork stopped** before its first pass. {again}"
    fork = splice(parent, child)
    session.fork, session.fork_parent = fork, parent
    passes = export.counted(sum(isinstance(e, Step) for e in child.events), "pass")
    return (compare.html(parent, fork, ("original run", "fork (stopped)")),
            f"**Fork stopped** after {passes}: what it wrote so far is shown "
            f"beside the original (**?** = not written yet). **Open the fork in the Denoising tab** replays it; {again}")


def open_fork(session: Session):
    """Show the fork in the Denoising tab: its inherited steps first, then its own."""
    if session.fork is None:
        raise gr.Error("Run a fork first.")
    session.begin(session.fork, state="done")
    status = ("**Showing the fork** (grey-dotted cells were inherited from the original run) · "
              + status_line(session.fork, stopped=session.fork.done is None))
    return grid_value(session.fork, live=False), partial_text(session.fork), status, gr.Tabs(selected="grid")


# ---- comparing saved traces ----------------------------------------------------------------------
def load_trace(path, which: str) -> Trace:
    if not path:
        raise gr.Error(f"Choose trace file {which} first.")
    return uploaded_trace(path)


def compare_files(path_a, path_b):
    """Two saved traces side by side."""
    a, b = load_trace(path_a, "A"), load_trace(path_b, "B")
    n = len(compare.differences(a, b))
    return (compare.html(a, b, (Path(path_a).name, Path(path_b).name)),
            f"**Comparing two saved traces** · {n} position{'s' if n != 1 else ''} differ{'s' if n == 1 else ''}.")
