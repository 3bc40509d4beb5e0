"""The race: AR and diffusion on the same prompt, seed and model, each timed on its own.

The two runs go one after the other in one generator and nothing is yielded while a run is
timed, so neither timer includes the other run or the UI. The browser replays both on one
clock (assets/race.js).
"""
from __future__ import annotations

import json
from dataclasses import replace

import gradio as gr

from twotower.runner import run
from visualizers import race as race_view

from .gpu import gpu
from .handlers import checked, prepare
from .settings import user_errors
from .state import Session, StopFlag, get_model


class Stopped(Exception):
    """The Stop button was pressed during a timed run."""


def timed_run(model, ids, cfg, mode, prompt, stop: StopFlag):
    """Run to the end without yielding; the trace's `elapsed` values are the run's own.

    A Gradio cancel only takes effect at a yield, so the loop checks the Stop flag instead.
    """
    trace, events = run(model, [ids], cfg, mode, [prompt])
    for _ in events:
        if stop.requested:
            raise Stopped
    return trace


def warm_up(model, ids, cfg, stop: StopFlag) -> None:
    """A short untimed pass of both modes, so first-call costs do not land on one runner."""
    small = replace(cfg, max_new_tokens=min(2, cfg.max_new_tokens), steps=1)
    for mode in ("ar", "diffusion"):
        timed_run(model, ids, small, mode, "", stop)


@gpu(duration=180)
def compute(prompt, ids, cfg, stop: StopFlag):
    """The model's side: yield progress lines, then (AR trace, diffusion trace)."""
    model = get_model()
    yield "Warming up (untimed)…"
    warm_up(model, ids, cfg, stop)
    yield "Running AR (timed on its own)…"
    ar = timed_run(model, ids, cfg, "ar", prompt, stop)
    yield "Running diffusion (timed on its own)…"
    yield ar, timed_run(model, ids, cfg, "diffusion", prompt, stop)


def check_race(prompt, max_new_tokens, block_size, steps, threshold, temperature, top_k, top_p,
               repetition_penalty, no_repeat_ngram_size, remasking, seed, stop_at_eos, draft_nodes):
    """The Race's first event (race's inputs, no session): bad input is refused with a message
    before the race starts, whose outputs would each keep an error badge."""
    checked(prompt, "diffusion", (max_new_tokens, block_size, steps, threshold, temperature, top_k, top_p,
                                  repetition_penalty, no_repeat_ngram_size, remasking, seed, stop_at_eos,
                                  draft_nodes), False, "")


def race(prompt, max_new_tokens, block_size, steps, threshold, temperature, top_k, top_p,
         repetition_penalty, no_repeat_ngram_size, remasking, seed, stop_at_eos, draft_nodes,
         session: Session):
    """Yield progress, then (race payload JSON, table, tokens-over-time plot, status)."""
    settings = (max_new_tokens, block_size, steps, threshold, temperature, top_k, top_p, repetition_penalty,
                no_repeat_ngram_size, remasking, seed, stop_at_eos, draft_nodes)
    ids, cfg, _ = prepare(prompt, "diffusion", settings, False, "")
    session.race_state, session.stop = "running", StopFlag()
    yield "", "", None, "**Starting the race…**"    # the last race's replay, table and plot go
    try:
        with user_errors():
            for item in compute(prompt, ids, cfg, session.stop):
                if isinstance(item, str):
                    yield gr.skip(), gr.skip(), gr.skip(), item
    except Stopped:
        return                                    # race_settle reports it
    except Exception:
        session.race_state = "failed"             # not a stop: the error itself is shown
        raise
    ar, diffusion = item
    session.race, session.race_state = (ar, diffusion), "done"
    payload = json.dumps(race_view.payload(ar, diffusion), separators=(",", ":"))
    yield (payload, race_view.table(ar, diffusion), race_view.tokens_over_time(ar, diffusion),
           "**Replaying both runs on one clock.** Slow the replay down to study it.")


def race_settle(session: Session):
    """After the race event ended: say so if Stop cancelled it."""
    if session.race_state == "running":
        session.race_state = "stopped"
        return "**Race stopped.** Nothing was timed to the end; press Race to run it again."
    if session.race_state == "failed":
        return "**The race failed** (see the error message). Nothing was timed to the end."
    return gr.skip()
