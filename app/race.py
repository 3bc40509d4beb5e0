"""The race: AR and diffusion on the same prompt, seed and model, each timed on its own.

The two runs go one after the other in this thread and nothing is yielded while a run is
timed, so neither timer includes the other run or the UI. The browser replays both on one
clock (assets/race.js).
"""
from __future__ import annotations

import json
from dataclasses import replace

import gradio as gr

from twotower.runner import encode_prompt, run
from visualizers import race as race_view

from .gpu import gpu
from .settings import sampler_config, user_errors
from .state import Session, get_model


def timed_run(model, ids, cfg, mode, prompt):
    """Run to the end without yielding; the trace's `elapsed` values are the run's own."""
    trace, events = run(model, [ids], cfg, mode, [prompt])
    for _ in events:
        pass
    return trace


def warm_up(model, ids, cfg) -> None:
    """A short untimed pass of both modes, so first-call costs do not land on one runner."""
    small = replace(cfg, max_new_tokens=min(2, cfg.max_new_tokens), steps=1)
    for mode in ("ar", "diffusion"):
        timed_run(model, ids, small, mode, "")


@gpu(duration=180)
def race(prompt, max_new_tokens, block_size, steps, threshold, temperature, top_k, top_p, remasking,
         seed, stop_at_eos, session: Session):
    """Yield progress, then (race payload JSON, table, tokens-over-time plot, status)."""
    with user_errors():
        cfg = sampler_config(max_new_tokens, block_size, steps, threshold, temperature, top_k, top_p,
                             remasking, seed, stop_at_eos)
        model = get_model()
        cfg.validate(model.max_context)
        ids = encode_prompt(model, prompt)
        yield gr.skip(), gr.skip(), gr.skip(), "Warming up (untimed)…"
        warm_up(model, ids, cfg)
        yield gr.skip(), gr.skip(), gr.skip(), "Running AR (timed on its own)…"
        ar = timed_run(model, ids, cfg, "ar", prompt)
        yield gr.skip(), gr.skip(), gr.skip(), "Running diffusion (timed on its own)…"
        diffusion = timed_run(model, ids, cfg, "diffusion", prompt)
    session.race = (ar, diffusion)
    payload = json.dumps(race_view.payload(ar, diffusion), separators=(",", ":"))
    yield (payload, race_view.table(ar, diffusion), race_view.tokens_over_time(ar, diffusion),
           "**Replaying both runs on one clock.** Slow the replay down to study it.")
