"""Event handlers of the live run and of the views that read its trace.

The sampling loop runs inside the `generate` generator itself (no background thread), so
Stop (`cancels=[...]`) ends the computation after the step in flight. Live updates are
throttled and compact: the grid gets the finished blocks once plus the active block's steps.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import gradio as gr

from twotower.runner import encode_prompt, run
from twotower.trace import Trace
from visualizers import attention, export, plots, trajectory

from .gpu import gpu
from .settings import capture_layers, sampler_config, user_errors
from .state import OPTIONS, Session, get_model


class Throttle:
    """ready() is True at most once per `interval` seconds."""

    def __init__(self, interval: float):
        self.interval, self.last = interval, float("-inf")

    def ready(self) -> bool:
        now = time.perf_counter()
        if now - self.last >= self.interval:
            self.last = now
            return True
        return False


# ---- status lines -----------------------------------------------------------------------
def model_info() -> str:
    """One line about the model; loads it on first call."""
    with user_errors():
        info = get_model().info()
    note = ""
    if "untrained" in str(info.get("name", "")):
        note = ("  \n⚠️ *The denoiser is untrained (initialised from the AR model): diffusion output is "
                "poor until trained weights are placed in `assets/default_model`. AR mode reads well.*")
    return (f"**Model** `{info['name']}` · {info['architecture']} · {info['layers']} layers · "
            f"{info['context_params'] / 1e6:.0f}M + {info['denoiser_params'] / 1e6:.0f}M parameters · "
            f"mask id {info['mask_token_id']} · {info['denoiser_device']} {info['dtype']}{note}")


def status_line(trace: Trace, stopped: bool = False) -> str:
    s = trace.stats()
    if s:
        end = {"eos": "ended at end-of-text", "length": "reached max new tokens"}.get(s["stopped"], s["stopped"])
        return (f"**Finished** ({trace.mode}) · {s['tokens']} tokens · {s['nfe']} forward passes · "
                f"{s['tokens_per_nfe']:.2f} tokens/pass · {s['seconds']:.2f} s · {s['tokens_per_second']:.1f} tokens/s · "
                f"first token {s['first_token_seconds']:.2f} s · {end}")
    p = trajectory.progress(trace)
    head = "**Stopped**" if stopped else "**Running…**"
    return (f"{head} ({trace.mode}) · {p['committed']} tokens committed · {p['nfe']} forward passes · "
            f"{p['seconds']:.2f} s")


def partial_text(trace: Trace) -> str:
    """The committed text so far (live), or the final text."""
    if trace.done:
        return trace.done.texts[0]
    commits = sorted(trajectory.commit_table(trace), key=lambda c: c.pos)
    eos = set(trace.model.get("eos_token_ids", []))
    pieces = []
    for c in commits:
        if c.token in eos:
            break
        pieces.append(trace.tokens.get(str(c.token), ""))
    return "".join(pieces)


def grid_value(trace: Trace, live: bool) -> str:
    return json.dumps(trajectory.payload(trace, live=live), separators=(",", ":"))


# ---- the live run ---------------------------------------------------------------------------
def start(prompt, mode, settings, capture, layers):
    """(trace, events) of a new run; raises gr.Error for bad input."""
    with user_errors():
        cfg = sampler_config(*settings)
        model = get_model()
        cfg.validate(model.max_context)
        if mode not in ("diffusion", "ar"):
            raise ValueError(f"mode must be 'diffusion' or 'ar', got {mode!r}")
        ids = encode_prompt(model, prompt)
        chosen = capture_layers(layers, model.family.attention_layers) if capture and mode == "diffusion" else ()
        return run(model, [ids], cfg, mode, [prompt], capture_layers=chosen)


@gpu(duration=120)
def generate(prompt, mode, max_new_tokens, block_size, steps, threshold, temperature, top_k, top_p,
             remasking, seed, stop_at_eos, capture, layers, session: Session):
    """Stream a run: (grid payload JSON, text, status) a few times per second, then the full trace."""
    settings = (max_new_tokens, block_size, steps, threshold, temperature, top_k, top_p, remasking, seed, stop_at_eos)
    trace, events = start(prompt, mode, settings, capture, layers)
    session.trace = trace
    throttle = Throttle(OPTIONS.stream_interval)
    with user_errors():
        for _ in events:
            if throttle.ready():
                yield grid_value(trace, live=True), partial_text(trace), status_line(trace)
    yield grid_value(trace, live=False), partial_text(trace), status_line(trace)


def stopped(session: Session):
    """After Stop: show the steps computed so far as a full, scrubbable trajectory."""
    trace = session.trace
    if trace is None:
        return gr.skip(), gr.skip(), "Nothing is running."
    return grid_value(trace, live=False), partial_text(trace), status_line(trace, stopped=True)


# ---- views of the last trace -------------------------------------------------------------------
def _choices(values) -> list:
    return [(str(v), v) for v in values]


def views(session: Session, block, layer, head, sink, renorm, include_block):
    """Plots and attention controls for the session's trace."""
    trace = session.trace
    if trace is None:
        return (gr.skip(),) * 7
    opts = attention.options(trace)
    block = block if block in opts["blocks"] else (opts["blocks"][0] if opts["blocks"] else None)
    layer = layer if layer in opts["layers"] else (opts["layers"][0] if opts["layers"] else None)
    heads = ["mean"] + list(range(opts["heads"]))
    head = head if head in heads else "mean"
    return (plots.unmasking_map(trace), plots.confidence_heatmap(trace), plots.commits_per_step(trace),
            gr.Dropdown(choices=_choices(opts["blocks"]), value=block),
            gr.Dropdown(choices=_choices(opts["layers"]), value=layer),
            gr.Dropdown(choices=_choices(heads), value=head),
            attention_view(session, block, layer, head, sink, renorm, include_block))


def attention_view(session: Session, block, layer, head, sink, renorm, include_block):
    trace = session.trace
    if trace is None or block is None or layer is None:
        return plots.note_figure("No cross-attention recorded.<br>Tick 'Capture cross-attention' "
                                 "(in the settings) and run a diffusion prompt.")
    return attention.figure(trace, int(block), int(layer), head if head == "mean" else int(head),
                            int(sink or 0), bool(renorm), bool(include_block))


# ---- trace files --------------------------------------------------------------------------------
def export_files(session: Session):
    trace = session.trace
    if trace is None:
        raise gr.Error("Run a prompt (or open a trace) first.")
    folder = Path(tempfile.mkdtemp(prefix="twotower-"))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = folder / f"twotower-{trace.mode}-{stamp}.json"
    html_path = folder / f"twotower-{trace.mode}-{stamp}.html"
    json_path.write_text(export.trace_json(trace))
    html_path.write_text(export.static_html(trace, title=f"TwoTower {trace.mode} run"))
    return [str(json_path), str(html_path)]


def import_trace(path, session: Session):
    """Open a saved trace: the views work without the model."""
    if not path:
        return gr.skip(), gr.skip(), gr.skip()
    try:
        trace = Trace.load(path)
    except (ValueError, FileNotFoundError, TypeError, KeyError) as e:
        raise gr.Error(f"Cannot open this trace: {e}") from None
    session.trace = trace
    return grid_value(trace, live=False), partial_text(trace), "**Opened a saved trace** · " + status_line(trace)
