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
from twotower.sampler import check_request
from twotower.trace import Trace
from visualizers import attention, commits, export, plots, trajectory

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
ENDINGS = {"eos": "ended at end-of-text", "length": "reached max new tokens"}


def model_info() -> str:
    """One line about the model; loads it on first call."""
    with user_errors():
        info = get_model().info()
    note = ""
    if "untrained" in str(info.get("name", "")):
        note = ("  \n⚠️ *The denoiser is untrained (initialised from the AR model): diffusion output is "
                "poor until trained weights are placed in `assets/default_model`. AR mode reads well.*")
    if info.get("compiled"):     # TWOTOWER_COMPILE: the first run of each shape compiles
        note += ("  \nCompiled (torch.compile, static caches): the first run of a new length compiles "
                 "for a while; later runs are faster.")
    return (f"**Model** `{info['name']}` · {info['architecture']} · {info['layers']} layers · "
            f"{info['context_params'] / 1e6:.0f}M + {info['denoiser_params'] / 1e6:.0f}M parameters · "
            f"mask id {info['mask_token_id']} · {info['denoiser_device']} {info['dtype']}"
            f"{' (oneDNN-packed linear layers)' if info.get('packed_linears') else ''}{note}")


def status_line(trace: Trace, stopped: bool = False) -> str:
    """One line of figures: final ones when the run finished, counters so far otherwise."""
    s = trace.stats()
    if s:
        end = ENDINGS.get(s["stopped"], s["stopped"])
        drafts = f" · {export.drafts_text(s)}" if "drafts_checked" in s else ""
        if "rows_per_pass" in s:
            drafts += f" · draft trees: {s['rows_per_pass']:.1f} block rows per pass"
        return (f"**Finished** ({trace.mode}) · {s['tokens']} tokens · {export.passes_text(trace, s)} · "
                f"{s['tokens_per_nfe']:.2f} tokens/pass{drafts} · {s['seconds']:.2f} s · "
                f"{s['tokens_per_second']:.1f} tokens/s · first token {s['first_token_seconds']:.2f} s · {end}")
    p = trajectory.progress(trace)
    head = "**Stopped**" if stopped else "**Running…**"
    passes = export.counted(p["nfe"], "forward pass" if trace.mode == "ar" else "denoiser pass")
    return (f"{head} ({trace.mode}) · {p['committed']} tokens committed · {passes} · "
            f"{p['seconds']:.2f} s")


STILL_MASKED = "▢"     # a position the text so far has not written yet (commit orders that leave gaps)


def partial_text(trace: Trace) -> str:
    """The committed text so far (live, or a stopped run), with a ▢ for each position still
    masked before the last committed one; or the final text."""
    if trace.done:
        return trace.done.texts[0]
    eos = set(trace.model.get("eos_token_ids", []))
    written = {c.pos: c.token for c in commits.commit_table(trace)}
    pieces = []
    for pos in range(max(written, default=-1) + 1):
        token = written.get(pos)
        if token in eos:
            break
        pieces.append(STILL_MASKED if token is None else trace.tokens.get(str(token), ""))
    return "".join(pieces)


def grid_key(trace: Trace) -> str:
    """Names the trace the grid shows, so answers about an older one (the AR view) are ignored."""
    return f"{id(trace):x}"


def grid_value(trace: Trace, live: bool) -> str:
    """The token grid's value: compact JSON (see visualizers/trajectory.py), with the app's
    buttons (fork, ask the AR model) switched on."""
    data = {**trajectory.payload(trace, live=live), "actions": True, "key": grid_key(trace)}
    return json.dumps(data, separators=(",", ":"))


# ---- the live run ---------------------------------------------------------------------------
TRAINED_BLOCK = 16        # the block size the release (and our default denoiser) trains at
LARGE_CAPTURE = 128       # tokens beyond which captured attention makes a heavy trace


def prepare(prompt, mode, settings, capture, layers):
    """(prompt ids, SamplerConfig, capture layers) of a new run; raises gr.Error for bad input,
    warns (without stopping) about settings that mislead."""
    ids, cfg, chosen = checked(prompt, mode, settings, capture, layers)
    warn_about(cfg, mode, capture)
    return ids, cfg, chosen


def check_run(prompt, mode, max_new_tokens, block_size, steps, threshold, temperature, top_k, top_p,
              repetition_penalty, no_repeat_ngram_size, remasking, seed, stop_at_eos, capture, layers, draft_nodes):
    """Run's first event (generate's inputs, no session): refuse bad input with a message before
    the streaming event starts, whose outputs would each keep an error badge."""
    checked(prompt, mode, (max_new_tokens, block_size, steps, threshold, temperature, top_k, top_p, repetition_penalty,
                           no_repeat_ngram_size, remasking, seed, stop_at_eos, draft_nodes), capture, layers)


def checked(prompt, mode, settings, capture, layers):
    """prepare() without the warnings."""
    with user_errors():
        cfg = sampler_config(*settings)
        model = get_model()
        cfg.validate(model.max_context)
        if mode not in ("diffusion", "ar"):
            raise ValueError(f"mode must be 'diffusion' or 'ar', got {mode!r}")
        ids = encode_prompt(model, prompt)
        check_request(model, [ids], cfg)
        chosen = ()
        if capture and mode == "diffusion":
            chosen = capture_layers(layers, model.family.attention_layers)
    return ids, cfg, chosen


def warn_about(cfg, mode: str, capture: bool) -> None:
    """Settings that run but mislead: say so without stopping the run."""
    if mode == "diffusion" and cfg.block_size > TRAINED_BLOCK:
        gr.Warning(f"Block size {cfg.block_size} is above the trained {TRAINED_BLOCK}: "
                   "quality usually collapses.")
    if mode == "diffusion" and cfg.block_size == 1:
        gr.Warning("Block size 1 writes one token per block: each pass denoises a single position, "
                   "so there is nothing to write in parallel.")
    if capture and mode == "ar":
        gr.Warning("Cross-attention exists only in diffusion mode; this AR run captures none.")
    if capture and mode == "diffusion" and cfg.max_new_tokens > LARGE_CAPTURE:
        gr.Warning(f"Capturing attention for {cfg.max_new_tokens} tokens makes a large trace; "
                   "the run will be slower.")


@gpu(duration=120)
def compute(prompt, ids, cfg, mode, layers, resume=None):
    """The model's side of a run: yield the empty trace, then (event, new token pieces) per event.

    Only plain data leaves this generator, so on a ZeroGPU Space (where it runs in a GPU
    worker) the UI process rebuilds the same trace. Closing it stops the computation.
    resume: a twotower.fork.ForkPoint to continue from (the Fork tab).
    """
    trace, events = run(get_model(), [ids], cfg, mode, [prompt], capture_layers=layers, resume=resume)
    yield Trace(mode=trace.mode, settings=trace.settings, model=trace.model, prompts=trace.prompts,
                prompt_ids=trace.prompt_ids, tokens=dict(trace.tokens), fork=trace.fork)
    known = set(trace.tokens)
    for event in events:
        fresh = {k: v for k, v in trace.tokens.items() if k not in known}
        known.update(fresh)
        yield event, fresh


def record(stream, trace: Trace):
    """Add each (event, new token pieces) of a `compute` stream to the UI's trace; yield the event."""
    for event, pieces in stream:
        trace.tokens.update(pieces)
        trace.events.append(event)
        yield event


def generate(prompt, mode, max_new_tokens, block_size, steps, threshold, temperature, top_k, top_p,
             repetition_penalty, no_repeat_ngram_size, remasking, seed, stop_at_eos, capture, layers,
             draft_nodes, session: Session):
    """Stream a run: (grid payload JSON, text, status) a few times per second, then the full trace.

    The sampling loop runs inside this generator (no thread): Stop cancels the event, which
    closes the generator and with it the computation, after the step in flight.
    """
    settings = (max_new_tokens, block_size, steps, threshold, temperature, top_k, top_p, repetition_penalty,
                no_repeat_ngram_size, remasking, seed, stop_at_eos, draft_nodes)
    ids, cfg, layers = prepare(prompt, mode, settings, capture, layers)
    stream = compute(prompt, ids, cfg, mode, layers)
    trace = next(stream)
    session.begin_new(trace)
    throttle = Throttle(OPTIONS.stream_interval)
    try:
        with user_errors():
            for _ in record(stream, trace):
                if throttle.ready():
                    yield grid_value(trace, live=True), partial_text(trace), status_line(trace)
    except Exception:
        session.state = "failed"
        raise
    session.state = "done"
    yield grid_value(trace, live=False), partial_text(trace), status_line(trace)


def request_stop(session: Session) -> None:
    """Stop button: flag loops that cannot be cancelled at a yield (the button also cancels)."""
    session.stop.requested = True


# ---- views of the last trace -------------------------------------------------------------------
def _choices(values) -> list:
    return [(str(v), v) for v in values]


def settle(session: Session, block, layer, head, sink, renorm, include_block):
    """After a run ended (finished, failed or stopped): its plots, and the stopped state if so.

    Runs as `.then` of the run, so it comes after the run's last update even when Stop
    cancelled it.
    """
    if session.trace is None or session.settled:
        return (gr.skip(),) * 11
    session.settled = True
    trace = session.trace
    if session.state == "running":               # cancelled by Stop: show what was computed
        head_out = grid_value(trace, live=False), partial_text(trace), status_line(trace, stopped=True)
    else:
        head_out = gr.skip(), gr.skip(), gr.skip()
    return (*head_out, *views(trace, block, layer, head, sink, renorm, include_block))


def views(trace: Trace, block, layer, head, sink, renorm, include_block):
    """Plots and attention controls for a trace."""
    opts = attention.options(trace)
    block = block if block in opts["blocks"] else (opts["blocks"][0] if opts["blocks"] else None)
    layer = layer if layer in opts["layers"] else (opts["layers"][0] if opts["layers"] else None)
    heads = ["mean"] + list(range(opts["heads"]))
    head = head if head in heads else "mean"
    return (plots.unmasking_map(trace), plots.confidence_heatmap(trace), plots.commits_per_step(trace),
            gr.Dropdown(choices=_choices(opts["blocks"]), value=block),
            gr.Dropdown(choices=_choices(opts["layers"]), value=layer),
            gr.Dropdown(choices=_choices(heads), value=head),
            attention_figure(trace, block, layer, head, sink, renorm, include_block),
            plots.tokens_per_step(trace))


def attention_view(session: Session, block, layer, head, sink, renorm, include_block):
    """The attention map after a control changed."""
    return attention_figure(session.trace, block, layer, head, sink, renorm, include_block)


def attention_figure(trace, block, layer, head, sink, renorm, include_block):
    if trace is None or block is None or layer is None:
        return plots.note_figure("No cross-attention recorded.<br>Tick 'Capture cross-attention' "
                                 "(in the settings) and run a diffusion prompt.")
    with user_errors():
        return attention.figure(trace, int(block), int(layer), head if head == "mean" else int(head),
                                int(sink or 0), bool(renorm), bool(include_block))


# ---- trace files --------------------------------------------------------------------------------
def export_files(session: Session):
    """The last run as trace JSON and as a standalone HTML page."""
    trace = session.trace
    if trace is None:
        raise gr.Error("Run a prompt (or open a trace) first.")
    folder = Path(tempfile.mkdtemp(prefix="twotower-"))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = folder / f"twotower-{trace.mode}-{stamp}.json"
    html_path = folder / f"twotower-{trace.mode}-{stamp}.html"
    json_path.write_text(export.trace_json(trace))
    kind = "fork of a run" if trace.fork else "run"              # the grid may show a fork (Fork tab)
    html_path.write_text(export.static_html(trace, title=f"TwoTower {trace.mode} {kind}"))
    return [str(json_path), str(html_path)]


def uploaded_trace(path) -> Trace:
    """The trace in an uploaded file; gr.Error naming the file as the user named it (not the
    server's temporary copy) when it is not one, or when its events do not draw (the loader
    checks each field's outer kind only: a Step's tokens as [5] instead of [[5]] passes it)."""
    name = Path(path).name
    try:
        trace = Trace.load(path)
    except (ValueError, FileNotFoundError) as e:
        message = str(e).replace(f"trace file {path}: ", "").replace(str(path), name)
        raise gr.Error(f"Cannot open {name}: {message}") from None
    try:
        trajectory.payload(trace)
    except (TypeError, ValueError, IndexError, KeyError, AttributeError) as e:
        raise gr.Error(f"Cannot open {name}: not a TwoTower trace: its events do not fit together ({e})") from None
    return trace


def import_trace(path, session: Session):
    """The import's first event, with no outputs: read the uploaded trace into the session. A
    file that is not a trace is refused with a message before the views are touched (their
    outputs would keep an error badge)."""
    if path:
        session.begin_new(uploaded_trace(path), state="done")


def show_imported(path, session: Session):
    """The import's second event: the trace just read, in the views (they work without the model)."""
    if not path:
        return gr.skip(), gr.skip(), gr.skip()
    trace = session.trace
    return (grid_value(trace, live=False), partial_text(trace),
            "**Opened a saved trace** · " + status_line(trace, stopped=trace.done is None))
