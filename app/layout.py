"""The page: prompt and settings on top, then one tab per view. Components only, no logic."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from twotower.sampling import MAX_DRAFT_NODES, REMASKING, SamplerConfig

from .state import OPTIONS, Session, recommended_config

ASSETS = Path(__file__).resolve().parent.parent / "assets"

INTRO = """# TwoTower: watch a diffusion language model write
A frozen AR **context tower** reads the prompt and every finished block; a **denoiser tower** fills
each new block of masked tokens over a few passes; the commit order (sampler settings) decides which
tokens a pass writes. **Try it:** pick an example prompt, press **Run**, watch the blocks fill, then
scrub the steps and click a token; the **Race** tab times the same prompt as plain AR decoding."""

GRID_HELP = """Each row is a block (AR runs: 16 tokens a row). Masked cells show the denoiser's current
best guess (faint), the bar under every cell its probability; orange = committed at this step; blue dashed
= a draft (the *verify* order: the next pass keeps it only if it is the AR model's own token). The line
under the step counter spells out the commit rule for that step. Scrub with the slider, ◀ / ▶ or the
← / → keys; click a token (or press ↑ / ↓ in the grid) to inspect it (candidates per step, flips, the
AR model's choice);
**⋔ fork from this step** continues the run from there with other settings."""

MAP_HELP = """Four views of when tokens were committed. Hover any mark for its numbers."""

MAP_VIEWS = (   # (component name, explanation shown beside the plot)
    ("unmask_plot", """**Unmasking order.** Each square is one generated position, placed at the step of its
block when it was committed; colour = its probability then. Under the *confidence* order easy words go
first and hard ones wait for more context; under *leftmost* the block fills mostly left to right, and
only tokens over γ jump ahead; under *prefix* and *verify* it fills strictly left to right."""),
    ("confidence_plot", """**Confidence over steps.** The probability of every position at every step of its
block (× = committed). Watch confidence rise as neighbours get committed: the denoiser reads the block
as a whole, not left to right."""),
    ("commits_plot", """**Planned vs actual.** Per denoiser pass: positions above the threshold γ (planned) and
positions committed. When fewer pass γ than the step budget needs, the floor `ceil(masked / steps left)`
commits more (the gap); at least one token is committed per pass: the most confident ones, or under
the *leftmost* commit order the leftmost masked ones. Under *verify* the plot says where the tokens
came from: per pass its new drafts, its commits (the drafts that held, stacked under the AR model's
own next token) and the drafts it dropped; a star marks each block's first token, which the context
tower's pass over the text before the block gave it (no denoiser pass). The subtitle counts the
drafts by depth: how many the check reached (every draft before them held) and how many held."""),
    ("tokens_plot", """**Tokens per step, per block.** How many tokens each step committed. Every cell above 1
is a pass that beat one-token-per-pass AR decoding; a block that fills in few passes is where
diffusion gains speed. Under *verify* a pass commits the drafts that held plus one token, so with
a small denoiser most cells read 1 or 2; the paper's orders commit more per pass at lower γ or
fewer steps, and lose quality doing it."""),
)

ATTENTION_HELP = """Attention of the block's queries (rows) over the context tower's keys (columns: prompt and
earlier blocks) in one denoiser layer. Tick **Capture cross-attention** before running (it costs speed
and memory). The first tokens often act as *attention sinks*: drop them and renormalise to see the rest.
Move the slider under the map to animate the steps."""

FORK_HELP = """**Fork** a run: in the *Denoising* tab scrub to any step and press **⋔ fork from this step**
(or type a block and step here). The fork keeps everything committed up to that step, then continues
with the settings below: the remaining steps of that block and every later block are new. Both runs
appear side by side, with the positions where their text differs marked. Compare two saved traces
below (e.g. γ 0.5 vs 0.9 on the same prompt). To study a loop, fork at the step where it began and
raise the repetition penalty or set no repeated n-grams."""

RACE_HELP = """The same prompt, seed, settings and context tower, run once as plain AR (one token per forward
pass) and once as TwoTower diffusion (a block per few passes). A short untimed warm-up runs first;
then each run is timed on its own, never interleaved, and both are replayed here on one clock at true
speed. NFE counts passes of the decoding network (AR: the context tower's; diffusion: the denoiser's);
diffusion also makes context-tower passes, the prefill and one per block after the first (the table
counts them), and under *verify* each of them writes the next block's first token.
Under the *verify* commit order diffusion writes exactly the AR model's text, so the race compares
speed alone; how far diffusion gets ahead depends on how many drafts hold (tokens per pass)."""


@dataclass
class UI:
    """Every component the handlers read or write."""
    session: gr.State
    model_info: gr.Markdown
    prompt: gr.Textbox
    mode: gr.Radio
    run: gr.Button
    stop: gr.Button
    settings: list                 # sampler inputs, in sampler_config's order
    draft_nodes: gr.Slider         # verify order: draft-tree size (after the capture inputs in the API)
    capture: gr.Checkbox
    layers: gr.Textbox
    status: gr.Markdown
    grid: gr.HTML
    text: gr.Textbox
    unmask_plot: gr.Plot
    confidence_plot: gr.Plot
    commits_plot: gr.Plot
    tokens_plot: gr.Plot
    att_block: gr.Dropdown
    att_layer: gr.Dropdown
    att_head: gr.Dropdown
    att_sink: gr.Slider
    att_renorm: gr.Checkbox
    att_self: gr.Checkbox
    att_plot: gr.Plot
    race_run: gr.Button
    race_stop: gr.Button
    race_status: gr.Markdown
    race_view: gr.HTML
    race_table: gr.Markdown
    race_plot: gr.Plot
    export: gr.Button
    export_files: gr.File
    import_file: gr.File
    tabs: gr.Tabs
    fork_block: gr.Number
    fork_step: gr.Number
    fork_threshold: gr.Slider
    fork_remasking: gr.Dropdown
    fork_temperature: gr.Slider
    fork_steps: gr.Slider
    fork_penalty: gr.Slider
    fork_ngram: gr.Slider
    fork_run: gr.Button
    fork_stop: gr.Button
    fork_open: gr.Button
    fork_status: gr.Markdown
    compare_view: gr.HTML
    compare_a: gr.File
    compare_b: gr.File
    compare_run: gr.Button

    @property
    def attention_controls(self) -> list:
        return [self.att_block, self.att_layer, self.att_head, self.att_sink, self.att_renorm, self.att_self]

    @property
    def fork_settings(self) -> list:
        """The settings a fork may change, in study.run_fork's order."""
        return [self.fork_threshold, self.fork_remasking, self.fork_temperature, self.fork_steps,
                self.fork_penalty, self.fork_ngram]


def examples() -> list[str]:
    path = ASSETS / "examples.json"
    return json.loads(path.read_text()) if path.is_file() else []


def asset(name: str) -> str:
    return (ASSETS / name).read_text()


def recommends(d: SamplerConfig, name: str) -> str:
    """' This model's checkpoint recommends X.' when a setting differs from the release's."""
    value = getattr(d, name)
    return "" if value == getattr(SamplerConfig(), name) else f" This model's checkpoint recommends {value}."


def remasking_info(d: SamplerConfig) -> str:
    """The commit-order dropdown's explanation, naming the model's recommended order."""
    return ("Which masked tokens a pass writes. confidence: every one with p > γ, else the surest (the paper's "
            "order; margin, entropy, random score the choice differently). leftmost: the same, but the "
            "leftmost first. prefix: left to right, only the unbroken run with p > γ. verify: that run is "
            "only a draft; the next pass keeps a draft only where the AR model would write the same token, so "
            "the text equals AR's and the denoiser decides only the speed (needs a denoiser trained for it). "
            "Every order but verify commits the denoiser's guesses unchecked: expect more errors the more a "
            "pass writes (lower γ, fewer steps), most of all with a small denoiser." + recommends(d, "remasking"))


def sampler_inputs() -> list:
    """Sampler settings, starting from the model's recommended ones (else the release's)."""
    d = recommended_config()
    max_new = gr.Slider(1, OPTIONS.max_new_tokens, value=64, step=1, label="Max new tokens",
                        info="the reply stops here, or earlier at end-of-text", elem_id="max-new-tokens")
    with gr.Row():
        block = gr.Slider(1, 64, value=d.block_size, step=1, label="Block size S", elem_id="block-size",
                          info="tokens written together (trained at 16)", min_width=140)
        steps = gr.Slider(1, 64, value=d.steps, step=1, label="Steps per block T", elem_id="steps",
                          info="most passes a block may take", min_width=140)
    threshold = gr.Slider(0.0, 1.0, value=d.threshold, step=0.01, label="Confidence threshold γ",
                          elem_id="threshold", info="a pass writes every masked token with p > γ (verify: drafts it)")
    remasking = gr.Dropdown(list(REMASKING), value=d.remasking, label="Commit order",
                            info=remasking_info(d), elem_id="remasking")
    draft = gr.Slider(0, MAX_DRAFT_NODES, value=d.draft_nodes, step=1, label="Draft tree size (verify)",
                      elem_id="draft-nodes",
                      info="verify only: the N likeliest paths of drafts (not just the likeliest run) "
                           "are all checked in the next pass, one block row per path (0 = off: one run). "
                           "More tokens per pass; a pass does rows × the work (nearly free on a GPU at batch 1, "
                           "not on a CPU)." + recommends(d, "draft_nodes"))
    with gr.Row():
        penalty = gr.Slider(1.0, 2.0, value=d.repetition_penalty, step=0.05, label="Repetition penalty",
                            info="1 = off; above 1, tokens already written score lower."
                                 + recommends(d, "repetition_penalty"), elem_id="repetition-penalty", min_width=140)
        ngram = gr.Slider(0, 8, value=d.no_repeat_ngram_size, step=1, label="No repeated n-grams",
                          info="n ≥ 2: do not write the same n tokens twice (0 = off); breaks loops."
                               + recommends(d, "no_repeat_ngram_size"), elem_id="no-repeat-ngram", min_width=140)
    with gr.Row():
        temperature = gr.Slider(0.0, 2.0, value=d.temperature, step=0.05, label="Temperature",
                                info="0 = always the likeliest token; higher = more random", min_width=140,
                                elem_id="temperature")
        top_p = gr.Slider(0.01, 1.0, value=d.top_p, step=0.01, label="Top-p",
                          info="sample only from the likeliest tokens holding this much probability (1 = off)",
                          min_width=140, elem_id="top-p")
    with gr.Row():
        top_k = gr.Number(value=d.top_k, precision=0, label="Top-k (0 = off)", minimum=0, min_width=90,
                          info="sample only from the k likeliest tokens", elem_id="top-k")
        seed = gr.Number(value=d.seed, precision=0, label="Seed", min_width=90,
                         info="same seed, same text (matters when temperature > 0)", elem_id="seed")
    stop_eos = gr.Checkbox(value=d.stop_at_eos, label="Stop at end-of-text", elem_id="stop-at-eos")
    return [max_new, block, steps, threshold, temperature, top_k, top_p, penalty, ngram, remasking, seed,
            stop_eos], draft


def build_controls() -> dict:
    """Left column: prompt, Run / Stop, example prompts, mode, sampler settings, attention capture."""
    prompt = gr.Textbox(label="Prompt", lines=3, max_lines=12, placeholder="Ask something…", elem_id="prompt")
    with gr.Row():
        run = gr.Button("Run", variant="primary", elem_id="run", min_width=80)
        stop = gr.Button("Stop", variant="stop", elem_id="stop", min_width=80)
    gr.Examples(examples(), inputs=[prompt], label="Example prompts: click one, then Run")
    mode = gr.Radio(["diffusion", "ar"], value="diffusion", label="Mode",
                    info="diffusion = TwoTower; ar = the context tower alone")
    with gr.Accordion("Sampler settings", open=True):
        settings, draft_nodes = sampler_inputs()
    with gr.Accordion("Cross-attention capture", open=False, elem_id="capture-settings"):
        capture = gr.Checkbox(value=False, label="Capture cross-attention", info="slower; traces get large",
                              elem_id="capture")
        layers = gr.Textbox(value="first, middle, last", label="Layers",
                            info="first / middle / last or indices, at most 4")
    return dict(prompt=prompt, run=run, stop=stop, mode=mode, settings=settings, draft_nodes=draft_nodes,
                capture=capture, layers=layers)


def grid_tab() -> dict:
    gr.Markdown(GRID_HELP, elem_classes=["help"])
    grid = gr.HTML(value="", html_template='<div class="ttg"></div>', css_template=asset("grid.css"),
                   js_on_load=asset("grid.js"), elem_id="grid", padding=False, apply_default_css=False,
                   ar=None)          # prop: the AR model's view for the inspector (app/study.py)
    text = gr.Textbox(label="Output text", lines=3, max_lines=20, buttons=["copy"], elem_id="output-text",
                      info="▢ = a position not written yet (while a run goes on, or after Stop)")
    return dict(grid=grid, text=text)


def map_tab() -> dict:
    gr.Markdown(MAP_HELP, elem_classes=["help"])
    parts = {}
    for name, text in MAP_VIEWS:
        with gr.Row(equal_height=False):
            with gr.Column(scale=4):
                parts[name] = gr.Plot(show_label=False, elem_id=name.replace("_", "-"))
            with gr.Column(scale=1, min_width=200):
                gr.Markdown(text, elem_classes=["help", "beside"])
    return parts


def attention_tab() -> dict:
    gr.Markdown(ATTENTION_HELP, elem_classes=["help"])
    with gr.Row():
        att_block = gr.Dropdown([], label="Block", interactive=True, min_width=90)
        att_layer = gr.Dropdown([], label="Layer", interactive=True, min_width=90)
        att_head = gr.Dropdown(["mean"], value="mean", label="Head", interactive=True, min_width=90)
        att_sink = gr.Slider(0, 16, value=1, step=1, label="Drop first k context keys (sinks)", min_width=200)
        with gr.Column(min_width=200):
            att_renorm = gr.Checkbox(value=True, label="Renormalise rows")
            att_self = gr.Checkbox(value=False, label="Show the block's own keys too")
    att_plot = gr.Plot(show_label=False, elem_id="attention-plot")
    return dict(att_block=att_block, att_layer=att_layer, att_head=att_head, att_sink=att_sink,
                att_renorm=att_renorm, att_self=att_self, att_plot=att_plot)


def race_tab() -> dict:
    gr.Markdown(RACE_HELP, elem_classes=["help"])
    with gr.Row():
        race_run = gr.Button("Race", variant="primary", elem_id="race-run")
        race_stop = gr.Button("Stop", variant="stop", elem_id="race-stop")
    race_status = gr.Markdown("")
    race_view = gr.HTML(value="", html_template='<div class="ttr"></div>', css_template=asset("race.css"),
                        js_on_load=asset("race.js"), elem_id="race", padding=False, apply_default_css=False)
    with gr.Row():                                   # side by side; stacked on a narrow screen
        with gr.Column(min_width=320):
            race_table = gr.Markdown("")
        with gr.Column(min_width=320):
            race_plot = gr.Plot(show_label=False)
    return dict(race_run=race_run, race_stop=race_stop, race_status=race_status, race_view=race_view,
                race_table=race_table, race_plot=race_plot)


def trace_tab() -> dict:
    gr.Markdown("Save the last run (settings + every step) as JSON, or as a standalone HTML page with the "
                "playable grid. Open a saved JSON trace to study it without running the model.")
    with gr.Row():
        with gr.Column():
            export = gr.Button("Export the last run")
            export_files = gr.File(label="Downloads", file_count="multiple", interactive=False)
        with gr.Column():
            import_file = gr.File(label="Open a trace (.json)", file_types=[".json"], type="filepath",
                                  elem_id="import-file")
    return dict(export=export, export_files=export_files, import_file=import_file)


def fork_tab() -> dict:
    gr.Markdown(FORK_HELP, elem_classes=["help"])
    d = recommended_config()
    with gr.Row():
        fork_block = gr.Number(value=0, precision=0, minimum=0, label="Block", elem_id="fork-block", min_width=90,
                               info="from 0, as B0, B1… in the grid")
        fork_step = gr.Number(value=0, precision=0, minimum=0, label="After step", elem_id="fork-step", min_width=90,
                              info="from 0; kept: that step and the ones before")
        fork_threshold = gr.Slider(0.0, 1.0, value=d.threshold, step=0.01, label="Confidence threshold γ",
                                   elem_id="fork-threshold", min_width=180)
        fork_remasking = gr.Dropdown(list(REMASKING), value=d.remasking, label="Commit order", min_width=140)
        fork_temperature = gr.Slider(0.0, 2.0, value=d.temperature, step=0.05, label="Temperature", min_width=140)
        fork_steps = gr.Slider(1, 64, value=d.steps, step=1, label="Steps per block T", elem_id="fork-steps",
                               min_width=140)
        fork_penalty = gr.Slider(1.0, 2.0, value=d.repetition_penalty, step=0.05, label="Repetition penalty",
                                 elem_id="fork-penalty", min_width=140)
        fork_ngram = gr.Slider(0, 8, value=d.no_repeat_ngram_size, step=1, label="No repeated n-grams",
                               elem_id="fork-ngram", min_width=140)
    with gr.Row():
        fork_run = gr.Button("Continue from here", variant="primary", elem_id="fork-run")
        fork_stop = gr.Button("Stop", variant="stop", elem_id="fork-stop")
        fork_open = gr.Button("Open the fork in the Denoising tab", elem_id="fork-open")
    fork_status = gr.Markdown("", elem_id="fork-status")
    compare_view = gr.HTML("", css_template=asset("compare.css"), elem_id="compare", padding=False,
                           apply_default_css=False)
    with gr.Accordion("Compare two saved traces", open=False, elem_id="compare-files"):
        with gr.Row():
            compare_a = gr.File(label="Trace A (.json)", file_types=[".json"], type="filepath", elem_id="compare-a")
            compare_b = gr.File(label="Trace B (.json)", file_types=[".json"], type="filepath", elem_id="compare-b")
        compare_run = gr.Button("Compare A and B", elem_id="compare-run")
    return dict(fork_block=fork_block, fork_step=fork_step, fork_threshold=fork_threshold,
                fork_remasking=fork_remasking, fork_temperature=fork_temperature, fork_steps=fork_steps,
                fork_penalty=fork_penalty, fork_ngram=fork_ngram,
                fork_run=fork_run, fork_stop=fork_stop, fork_open=fork_open, fork_status=fork_status,
                compare_view=compare_view, compare_a=compare_a, compare_b=compare_b, compare_run=compare_run)


def build_views() -> dict:
    """Right column: the status line and one tab per view."""
    status = gr.Markdown("", elem_id="status")
    tabs = (("Denoising", "grid", grid_tab), ("Unmasking map", "map", map_tab),
            ("Cross-attention", "attention", attention_tab), ("Race: AR vs diffusion", "race", race_tab),
            ("Fork & compare", "fork", fork_tab), ("Trace file", "trace", trace_tab))
    parts = {}
    with gr.Tabs() as tab_set:
        for title, tab_id, make in tabs:
            with gr.Tab(title, id=tab_id):
                parts.update(make())
    return dict(status=status, tabs=tab_set, **parts)


def build_layout() -> UI:
    """Create the page's components inside the current gr.Blocks context."""
    session = gr.State(Session())
    gr.Markdown(INTRO)
    model_info = gr.Markdown("*Loading the model…*", elem_id="model-info")
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=320):
            controls = build_controls()
        with gr.Column(scale=3):
            views = build_views()
    return UI(session=session, model_info=model_info, **controls, **views)
