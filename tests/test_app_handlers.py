"""App handlers called directly (no server): settings parsing, stop/settle, export and import."""
from __future__ import annotations

import json

import gradio as gr
import pytest

from app import handlers, settings
from app.state import OPTIONS, Session, set_model
from tests.conftest import needs_cxx
from tests.tiny_app import tiny_app_model

SETTINGS = (24, 8, 4, 0.5, 0.0, 0, 1.0, 1.0, 0, "confidence", 0, False)   # sampler_config's order


@pytest.fixture(scope="module", autouse=True)
def model():
    m = tiny_app_model()
    set_model(m)
    interval, OPTIONS.stream_interval = OPTIONS.stream_interval, 0.0     # yield at every step
    yield m
    OPTIONS.stream_interval = interval


def run_to_end(session: Session, capture=False, mode="diffusion"):
    outputs = list(handlers.generate("Hello", mode, *SETTINGS, capture, "first, last", 0, session))
    return outputs[-1]


def test_sampler_config_accepts_ui_floats_and_names_bad_values():
    cfg = settings.sampler_config(16.0, 16.0, 4.0, 0.9, 0.0, 0.0, 1.0, 1.2, 3.0, "margin", 3.0, True)
    assert (cfg.max_new_tokens, cfg.block_size, cfg.remasking, cfg.seed) == (16, 16, "margin", 3)
    assert (cfg.repetition_penalty, cfg.no_repeat_ngram_size) == (1.2, 3)
    with pytest.raises(ValueError, match="block size must be a whole number"):
        settings.sampler_config(16, 2.5, 4, 0.9, 0, 0, 1, 1, 0, "confidence", 0, True)
    with pytest.raises(ValueError, match="threshold"):
        settings.sampler_config(16, 16, 4, 1.5, 0, 0, 1, 1, 0, "confidence", 0, True)
    with pytest.raises(ValueError, match="at most"):
        settings.sampler_config(10**6, 16, 4, 0.9, 0, 0, 1, 1, 0, "confidence", 0, True)
    with pytest.raises(ValueError, match="repetition_penalty must lie in"):
        settings.sampler_config(16, 16, 4, 0.9, 0, 0, 1, 0.5, 0, "confidence", 0, True)
    with pytest.raises(ValueError, match="repetition penalty must be a number"):
        settings.sampler_config(16, 16, 4, 0.9, 0, 0, 1, None, 0, "confidence", 0, True)
    with pytest.raises(ValueError, match="no repeated n-grams must be a whole number"):
        settings.sampler_config(16, 16, 4, 0.9, 0, 0, 1, 1, 2.5, "confidence", 0, True)


def test_the_ui_starts_from_the_models_recommended_settings(model, monkeypatch):
    from app import layout, state
    assert state.recommended_config().remasking == "confidence"       # the tiny model recommends nothing
    assert layout.recommends(state.recommended_config(), "no_repeat_ngram_size") == ""
    monkeypatch.setattr(model, "sampler_defaults", {"remasking": "leftmost", "threshold": 0.8,
                                                    "no_repeat_ngram_size": 4})
    d = state.recommended_config()
    assert (d.remasking, d.threshold, d.steps, d.no_repeat_ngram_size) == ("leftmost", 0.8, 16, 4)
    assert "This model's checkpoint recommends leftmost" in layout.remasking_info(d)
    assert layout.recommends(d, "no_repeat_ngram_size") == " This model's checkpoint recommends 4."
    set_model(None)                                                    # not loaded yet: read from its twotower.json
    try:
        monkeypatch.delenv(state.MODEL_ENV, raising=False)
        assert state.recommended_config().remasking == "verify"      # the shipped default model's
    finally:
        set_model(model)


def test_capture_layers_parses_names_and_indices():
    assert settings.capture_layers("first, middle, last", list(range(30))) == (0, 15, 29)
    assert settings.capture_layers("3; 3, last", [0, 3, 7]) == (3, 7)
    with pytest.raises(ValueError, match="'99'"):
        settings.capture_layers("99", [0, 1])
    with pytest.raises(ValueError, match="at least one"):
        settings.capture_layers(" , ", [0, 1])


def test_bad_input_is_a_ui_error():
    with pytest.raises(gr.Error, match="empty"):
        next(handlers.generate("  ", "diffusion", *SETTINGS, False, "", 0, Session()))


def test_a_finished_run_settles_into_views():
    session = Session()
    grid, text, status = run_to_end(session, capture=True)
    assert status.startswith("**Finished**") and session.state == "done"
    passes = session.trace.stats()
    assert f"{passes['nfe']} denoiser passes (+ {passes['context_passes']} of the context tower)" in status
    out = handlers.settle(session, None, None, "mean", 1, True, False)
    assert out[0] is not None and len(out) == 11
    unmask, confidence, commits = out[3:6]
    assert unmask.data and confidence.data and commits.data
    assert out[6].choices and out[9].layout.sliders             # attention blocks and a step slider
    assert out[10].data                                         # tokens per step per block
    assert handlers.settle(session, None, None, "mean", 1, True, False) == (gr.skip(),) * 11


def test_a_cancelled_run_settles_as_stopped():
    session = Session()
    stream = handlers.generate("Hello", "diffusion", *SETTINGS, False, "", 0, session)
    next(stream)
    next(stream)
    stream.close()                                             # what Stop's cancel does
    grid, text, status = handlers.settle(session, None, None, "mean", 0, True, False)[:3]
    assert status.startswith("**Stopped**")
    data = json.loads(grid)
    assert not data["live"] and data["n_out"] is None


def test_the_text_of_an_unfinished_run_marks_the_positions_still_masked():
    """A commit order that leaves gaps: the text so far shows each masked position before the
    last committed one as ▢ instead of joining the tokens around it."""
    from twotower.events import BlockStart, Prefill, Step
    from twotower.trace import Trace
    mask = 3
    events = [Prefill(prompt_tokens=[2], seconds=0.0), BlockStart(block=0, start=0, size=4, steps=4),
              Step(block=0, step=0, t=[0.5], tokens=[[10, mask, 12, mask]], committed=[[0, 2]], planned=[2],
                   confidence=[[0.9, 0.1, 0.8, 0.1]], top_ids=[[[10], [11], [12], [11]]],
                   top_probs=[[[0.9], [0.1], [0.8], [0.1]]], elapsed=0.1, nfe=1)]
    trace = Trace(mode="diffusion", settings={}, model={"mask_token_id": mask, "eos_token_ids": [2]},
                  prompts=["Hi"], prompt_ids=[[5, 6]], tokens={"10": "The", "12": " sat"}, events=events)
    assert handlers.partial_text(trace) == "The▢ sat"


def test_export_then_import_without_the_model(tmp_path):
    session = Session()
    run_to_end(session)
    json_path, html_path = handlers.export_files(session)
    assert "<html>" in open(html_path).read()
    fresh = Session()
    handlers.import_trace(json_path, fresh)
    grid, text, status = handlers.show_imported(json_path, fresh)
    assert "Opened a saved trace" in status and text == session.trace.done.texts[0]
    assert len(json.loads(grid)["frames"]) == session.trace.done.nfe
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(gr.Error, match="not a TwoTower trace") as e:
        handlers.import_trace(str(bad), fresh)
    assert "Cannot open bad.json: " in e.value.message and str(tmp_path) not in e.value.message
    assert fresh.trace.done is not None                            # the refused file left the open trace as it was
    misshapen = json.loads(open(json_path).read())                 # a Step's tokens as [5] instead of [[5]]
    step = next(e for e in misshapen["events"] if e["type"] == "Step")
    step["tokens"] = step["tokens"][0]
    bad.write_text(json.dumps(misshapen))
    with pytest.raises(gr.Error, match="Cannot open bad.json: not a TwoTower trace: its events do not fit together"):
        handlers.import_trace(str(bad), fresh)


def test_race_runs_both_and_stops_on_request():
    from app import race
    session = Session()
    *progress, final = race.race("Hello", *SETTINGS, 0, session)
    assert [p[3] for p in progress][-1].startswith("Running diffusion")
    runs = json.loads(final[0])["runs"]
    assert [r["mode"] for r in runs] == ["ar", "diffusion"] and session.race_state == "done"
    assert race.race_settle(session) == gr.skip()
    stream = race.race("Hello", *SETTINGS, 0, session)
    assert next(stream) == ("", "", None, "**Starting the race…**")   # the last race's results go first
    assert "Warming up" in next(stream)[3]
    handlers.request_stop(session)                   # Stop pressed during the untimed warm-up
    assert list(stream) == []
    assert "stopped" in race.race_settle(session)


# ---- studying a run: the inspector's AR view, forks, comparisons ---------------------------------
class Event:
    """What gr.EventData carries from the grid's trigger(...)."""
    def __init__(self, **data):
        self.__dict__.update(data)


def test_ar_view_answers_for_every_position_and_caches(model):
    from app import study
    session = Session()
    run_to_end(session)
    update = study.ar_view(session, Event(pos=3))
    data = json.loads(update.props["ar"])
    n = len(study.committed_text(session.trace))
    assert len(data["top"]) == len(data["chosen"]) == n == 24
    ids, probs = data["top"][3]
    assert len(ids) == study.AR_CANDIDATES and probs == sorted(probs, reverse=True)
    assert data["key"] == handlers.grid_key(session.trace)
    assert all(str(i) in data["pieces"] for i in ids)
    cached = session.ar
    study.ar_view(session, Event(pos=0))
    assert session.ar is cached                                   # one pass per trace


def test_ar_view_refuses_a_trace_of_another_model(tmp_path):
    from app import study
    session = Session()
    run_to_end(session)
    session.trace.model["name"] = "someone-else"
    update = study.ar_view(session, Event(pos=0))
    data = json.loads(update.props["ar"])
    assert "someone-else" in data["error"]


def test_fork_from_the_grid_runs_compares_and_opens():
    from app import study
    session = Session()
    run_to_end(session)                                           # 24 tokens: blocks of 8, 4 steps, γ 0.5
    block, step, threshold, remasking, temperature, steps, penalty, ngram, note, tabs = study.pick_fork(
        session, Event(block=1, step=0))
    assert (block, step, threshold, steps, penalty, ngram) == (1, 0, 0.5, 4, 1.0, 0) and "Fork point" in note
    *progress, (view, status) = study.run_fork(block, step, 0.0, remasking, temperature, steps, penalty, ngram,
                                               session)
    assert status.startswith("**Fork finished**") and "ttc-cols" in view
    fork = session.fork
    assert fork.fork["block"] == 1 and session.fork_parent is session.trace
    assert fork.done.token_ids[0][:8] == session.trace.done.token_ids[0][:8]      # block 0 is inherited
    assert study.fork_settle(session) == (gr.skip(), gr.skip())
    grid, text, status, tabs = study.open_fork(session)
    data = json.loads(grid)
    assert data["fork"]["frame"] == fork.fork["inherited"] and data["fork"]["changes"] == {"threshold": [0.5, 0.0]}
    assert session.trace is fork and "Showing the fork" in status
    with pytest.raises(gr.Error, match="no step 9"):
        list(study.run_fork(1, 9, 0.5, "confidence", 0.0, 4, 1.0, 0, session))
    with pytest.raises(gr.Error, match="no repeated n-grams must be a whole number"):
        list(study.run_fork(1, 0, 0.5, "confidence", 0.0, 4, 1.0, 2.5, session))


def test_a_stopped_fork_shows_what_it_wrote_so_far():
    """Stop during a fork: the part it computed is spliced and shown beside the original, and
    opens in the Denoising tab as a stopped run."""
    from app import study
    session = Session()
    run_to_end(session)
    stream = study.run_fork(0, 0, 0.0, "confidence", 0.0, 4, 1.0, 0, session)
    progress = [next(stream) for _ in range(3)]                   # the fork has taken some passes
    assert "passes so far" in progress[-1][1]
    stream.close()                                                # what Stop's cancel does
    view, status = study.fork_settle(session)
    assert status.startswith("**Fork stopped** after") and "ttc-cols" in view
    fork = session.fork
    assert fork.done is None and fork.fork["block"] == 0 and session.fork_parent is session.trace
    grid, text, status, tabs = study.open_fork(session)
    assert "**Stopped**" in status and json.loads(grid)["fork"]["frame"] == fork.fork["inherited"]


def test_a_fork_can_switch_the_repeat_guards_on():
    from app import study
    session = Session()
    run_to_end(session)
    *progress, (view, status) = study.run_fork(1, 0, 0.5, "confidence", 0.0, 4, 3.0, 2, session)
    fork = session.fork
    assert (fork.settings["repetition_penalty"], fork.settings["no_repeat_ngram_size"]) == (3.0, 2)
    grid, text, status, tabs = study.open_fork(session)
    assert json.loads(grid)["fork"]["changes"] == {"repetition_penalty": [1.0, 3.0], "no_repeat_ngram_size": [0, 2]}


def test_compare_two_saved_traces(tmp_path):
    from app import study
    paths = []
    for threshold in (0.5, 0.9):
        session = Session()
        outputs = list(handlers.generate("Hello", "diffusion", 24, 8, 4, threshold, 0.0, 0, 1.0, 1.0, 0, "confidence",
                                         0, False, False, "", 0, session))
        path = tmp_path / f"run-{threshold}.json"
        session.trace.save(path)
        paths.append(str(path))
    view, status = study.compare_files(*paths)
    assert "run-0.5.json" in view and "threshold" in view and "Comparing" in status
    with pytest.raises(gr.Error, match="trace file B"):
        study.compare_files(paths[0], None)


def test_twotower_compile_setting_of_the_app():
    from app.state import compiled
    plain = tiny_app_model()
    assert compiled(plain, "") is plain and not plain.compiled and compiled(plain, "0") is plain
    assert compiled(tiny_app_model(), "1").compiled
    graphs = compiled(tiny_app_model(), "reduce-overhead")
    assert graphs.static_cache and graphs.compile_options["mode"] == "reduce-overhead"
    with pytest.raises(ValueError, match="TWOTOWER_COMPILE='fastest': cannot compile.*Unrecognized mode"):
        compiled(tiny_app_model(), "fastest")


@needs_cxx
def test_a_compiled_model_serves_the_app(model):
    """TWOTOWER_COMPILE's model in the handlers: the eager model's text, with and without
    captured attention (captured passes run eager on the static cache)."""
    from app.state import compiled
    expected = [run_to_end(Session(), capture=c)[1] for c in (False, True)]
    assert "Compiled" not in handlers.model_info()
    set_model(compiled(tiny_app_model(), "1"))
    try:
        assert "Compiled (torch.compile, static caches)" in handlers.model_info()
        assert [run_to_end(Session(), capture=c)[1] for c in (False, True)] == expected
    finally:
        set_model(model)


# ---- fixes from the session-13 review ---------------------------------------------------------------
def test_the_fork_tab_follows_each_new_run_and_forgets_the_old_fork():
    from app import study
    session = Session()
    run_to_end(session)
    filled = study.fork_defaults(session)                          # after the run: its own settings
    assert filled[:8] == (0, 0, 0.5, "confidence", 0.0, 4, 1.0, 0) and filled[8:] == ("", "")
    assert study.fork_defaults(session) == (gr.skip(),) * 10      # same run: the user's edits stay
    list(study.run_fork(1, 0, 0.0, "confidence", 0.0, 4, 1.0, 0, session))
    assert session.fork is not None
    run_to_end(session)                                            # a new run: the old fork is gone
    assert session.fork is None and session.fork_parent is None
    with pytest.raises(gr.Error, match="Run a fork first"):
        study.open_fork(session)
    assert study.fork_defaults(session)[0] == 0


def test_a_saved_trace_without_its_end_opens_as_stopped(tmp_path):
    from twotower.trace import Trace
    session = Session()
    run_to_end(session)
    cut = Trace.from_dict({**session.trace.to_dict(), "events": session.trace.to_dict()["events"][:4]})
    path = tmp_path / "stopped.json"
    cut.save(path)
    opened = Session()
    handlers.import_trace(str(path), opened)
    status = handlers.show_imported(str(path), opened)[2]
    assert "**Stopped**" in status and "Running" not in status


def test_one_as_no_repeated_ngrams_is_refused_in_the_uis_words():
    with pytest.raises(ValueError, match="No repeated n-grams: 1 would forbid"):
        settings.sampler_config(16, 16, 4, 0.9, 0, 0, 1, 1, 1, "confidence", 0, True)


def test_a_race_that_fails_says_so_instead_of_stopped(monkeypatch):
    from app import race

    def broken(*args, **kwargs):
        yield "Warming up (untimed)…"
        raise ValueError("the model broke")
    monkeypatch.setattr(race, "compute", broken)
    session = Session()
    with pytest.raises(gr.Error, match="the model broke"):
        list(race.race("Hello", *SETTINGS, 0, session))
    assert "failed" in race.race_settle(session)


def test_ar_view_errors_are_not_kept(monkeypatch):
    from app import study
    session = Session()
    run_to_end(session)
    session.trace.model["name"] = "someone-else"
    assert "error" in json.loads(study.ar_view(session, Event(pos=0)).props["ar"])
    session.trace.model["name"] = handlers.get_model().name        # the cause is gone: asking again works
    assert "top" in json.loads(study.ar_view(session, Event(pos=0)).props["ar"])


def test_misleading_block_sizes_are_warned_about(monkeypatch):
    from twotower.sampling import SamplerConfig
    said = []
    monkeypatch.setattr(handlers.gr, "Warning", said.append)
    for size in (1, 16, 32):
        handlers.warn_about(SamplerConfig(block_size=size), "diffusion", False)
    assert len(said) == 2 and "Block size 1" in said[0] and "above the trained 16" in said[1]


def test_a_draft_tree_run_writes_the_ar_text_and_counts_its_rows(model):
    from tests.test_llama_family import clean_as_ar_model
    from tests.tiny_app import char_tokenizer
    verifier = clean_as_ar_model()
    verifier.tokenizer = char_tokenizer()
    set_model(verifier)
    try:
        greedy = (24, 8, 8, 0.0, 0.0, 0, 1.0, 1.0, 0, "verify", 0, False, False, "")
        tree = list(handlers.generate("Hello", "diffusion", *greedy, 3, Session()))[-1]
        ar = list(handlers.generate("Hello", "ar", *greedy, 0, Session()))[-1]
        assert tree[1] == ar[1]
        assert "block rows per pass" in tree[2] and "block rows per pass" not in ar[2]
    finally:
        set_model(model)


def test_a_fork_to_another_order_drops_the_draft_tree():
    from types import SimpleNamespace

    from app import study
    parent = SimpleNamespace(settings={"remasking": "verify", "threshold": 0.2, "draft_nodes": 3})
    assert study.fork_config(parent, 0.2, "verify", 0.0, 16, 1.0, 0).draft_nodes == 3
    assert study.fork_config(parent, 0.9, "leftmost", 0.0, 16, 1.0, 0).draft_nodes == 0
    assert study.fork_config(parent, 0.2, "verify", 0.8, 16, 1.0, 0).draft_nodes == 3   # sampling keeps it
