"""build_demo(): layout, then event wiring, then the queue. app.py at the repo root launches it."""
from __future__ import annotations

import gradio as gr

from . import handlers, race, state, study
from .layout import UI, asset, build_layout

COMPUTE = "model"        # every event that runs the model shares this queue slot


def wire(ui: UI, demo: gr.Blocks) -> None:
    """Connect the components to the handlers."""
    sampler = ui.settings
    run_outputs = [ui.grid, ui.text, ui.status]
    views_out = [ui.unmask_plot, ui.confidence_plot, ui.commits_plot, ui.att_block, ui.att_layer,
                 ui.att_head, ui.att_plot, ui.tokens_plot]
    views_in = [ui.session, *ui.attention_controls]

    demo.load(handlers.model_info, outputs=ui.model_info, api_visibility="private")

    run_inputs = [ui.prompt, ui.mode, *sampler, ui.capture, ui.layers, ui.draft_nodes]
    # bad input is refused by a first event with no outputs, so no output keeps an error badge
    gen = gr.on([ui.run.click, ui.prompt.submit], handlers.check_run, inputs=run_inputs,
                api_visibility="private").success(
        handlers.generate, inputs=run_inputs + [ui.session], outputs=run_outputs, api_name="generate",
        concurrency_id=COMPUTE, show_progress="minimal")
    gen.then(handlers.settle, views_in, run_outputs + views_out, api_visibility="private")
    fork_tab = [ui.fork_block, ui.fork_step, *ui.fork_settings, ui.fork_status, ui.compare_view]
    gen.then(study.fork_defaults, ui.session, fork_tab, api_visibility="private")

    race_inputs = [ui.prompt, *sampler, ui.draft_nodes]
    racing = ui.race_run.click(race.check_race, inputs=race_inputs, api_visibility="private").success(
        race.race, inputs=race_inputs + [ui.session], outputs=[ui.race_view, ui.race_table, ui.race_plot, ui.race_status],
        api_name="race", concurrency_id=COMPUTE, show_progress="minimal")
    racing.then(race.race_settle, ui.session, ui.race_status, api_visibility="private")

    forking = ui.fork_run.click(study.run_fork, inputs=[ui.fork_block, ui.fork_step, *ui.fork_settings, ui.session],
                                outputs=[ui.compare_view, ui.fork_status], concurrency_id=COMPUTE,
                                show_progress="minimal", api_visibility="private")
    forking.then(study.fork_settle, ui.session, [ui.compare_view, ui.fork_status], api_visibility="private")

    # the grid's own buttons: "fork from this step" (select) and the inspector's AR view (submit)
    ui.grid.select(study.pick_fork, ui.session, [ui.fork_block, ui.fork_step, *ui.fork_settings, ui.fork_status,
                                                 ui.tabs], api_visibility="private")
    asking = ui.grid.submit(study.ar_view, ui.session, ui.grid, concurrency_id=COMPUTE, api_visibility="private")
    ui.fork_open.click(study.open_fork, ui.session, run_outputs + [ui.tabs], api_visibility="private").success(
        handlers.settle, views_in, run_outputs + views_out, api_visibility="private")
    ui.compare_run.click(study.compare_files, [ui.compare_a, ui.compare_b], [ui.compare_view, ui.fork_status],
                         api_visibility="private")

    for button in (ui.stop, ui.race_stop, ui.fork_stop):   # cancelling ends the generator: compute stops
        button.click(handlers.request_stop, ui.session, None, cancels=[gen, racing, forking, asking], queue=False,
                     api_visibility="private")

    for control in ui.attention_controls:
        control.input(handlers.attention_view, views_in, ui.att_plot, api_visibility="private")

    ui.export.click(handlers.export_files, ui.session, ui.export_files, api_visibility="private")
    ui.import_file.upload(handlers.import_trace, [ui.import_file, ui.session], None, api_visibility="private").success(
        handlers.show_imported, [ui.import_file, ui.session], run_outputs, api_visibility="private").success(
        handlers.settle, views_in,
                                                            run_outputs + views_out, api_visibility="private"
                                                            ).then(study.fork_defaults, ui.session, fork_tab,
                                                                   api_visibility="private")


def build_demo(model=None, stream_interval: float | None = None) -> gr.Blocks:
    """The app. model: use this TwoTower instead of loading TWOTOWER_MODEL / the default."""
    if model is not None:
        state.set_model(model)
    if stream_interval is not None:
        state.OPTIONS.stream_interval = stream_interval
    with gr.Blocks(title="TwoTower diffusion LM explorer") as demo:
        ui = build_layout()
        wire(ui, demo)
    demo.queue(default_concurrency_limit=1, max_size=state.OPTIONS.queue_size)
    return demo


def launch_options() -> dict:
    """Keyword arguments for demo.launch() (Gradio 6 takes css and theme there)."""
    return {"css": asset("app.css"), "theme": gr.themes.Default(primary_hue="blue")}
