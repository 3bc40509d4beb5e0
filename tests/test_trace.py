"""Traces: JSON round trip of real runs, and clear errors for files that are not traces."""
from __future__ import annotations

import json

import pytest

from tests.tiny import tiny_twotower
from twotower.events import EVENT_TYPES, Done, Prefill, Step, Token, event_from_dict
from twotower.runner import run
from twotower.sampling import SamplerConfig
from twotower.trace import TRACE_VERSION, Trace


@pytest.fixture(scope="module")
def model():
    return tiny_twotower(seed=0, initializer_range=0.3)


def finished(trace_and_events):
    trace, events = trace_and_events
    for _ in events:
        pass
    return trace


@pytest.fixture(scope="module")
def diffusion_trace(model):
    cfg = SamplerConfig(block_size=4, steps=3, threshold=0.2, max_new_tokens=7, stop_at_eos=False)
    return finished(run(model, [[5, 17, 42], [9, 9]], cfg, "diffusion", ["a", "b"], capture_layers=(0, 1)))


@pytest.fixture(scope="module")
def ar_trace(model):
    cfg = SamplerConfig(max_new_tokens=5, temperature=0.8, top_k=10, stop_at_eos=False, seed=3)
    return finished(run(model, [[5, 17, 42]], cfg, "ar", ["a"]))


@pytest.mark.parametrize("which", ["diffusion_trace", "ar_trace"])
def test_save_load_round_trip(which, request, tmp_path):
    trace = request.getfixturevalue(which)
    path = tmp_path / "t.json"
    trace.save(path)
    loaded = Trace.load(path)
    assert loaded.to_dict() == trace.to_dict()
    assert [type(e) for e in loaded.events] == [type(e) for e in trace.events]
    assert loaded.stats() == trace.stats() and loaded.stats()["tokens"] > 0
    # and the file is plain JSON whose round trip is stable too
    assert json.loads(path.read_text()) == json.loads(json.dumps(loaded.to_dict()))


def test_round_trip_keeps_attention_layer_keys(diffusion_trace, tmp_path):
    path = tmp_path / "t.json"
    diffusion_trace.save(path)
    step = Trace.load(path).steps()[0]
    assert set(step.attention) == {0, 1} == set(diffusion_trace.steps()[0].attention)
    assert step.attention[1] == diffusion_trace.steps()[0].attention[1]


def test_views(diffusion_trace, ar_trace):
    assert diffusion_trace.mode == "diffusion" and ar_trace.mode == "ar"
    assert len(diffusion_trace.blocks()) == 2 and [b.size for b in diffusion_trace.blocks()] == [4, 3]
    assert diffusion_trace.done.nfe == len(diffusion_trace.steps()) and not diffusion_trace.ar_tokens()
    assert len(ar_trace.ar_tokens()) == 5 and not ar_trace.steps()
    assert diffusion_trace.to_dict()["version"] == TRACE_VERSION
    assert diffusion_trace.settings["threshold"] == 0.2 and ar_trace.settings["top_k"] == 10


def test_stats_of_an_unfinished_trace_are_empty():
    t = Trace(mode="ar", settings={}, model={}, prompts=["x"], prompt_ids=[[1]])
    recorded = list(t.record([Prefill(prompt_tokens=[1], seconds=0.1)]))
    assert len(recorded) == 1 and t.events == recorded
    assert t.stats() == {} and t.done is None and t.to_dict()["stats"] == {}


def test_stats_figures():
    t = Trace(mode="ar", settings={}, model={}, prompts=["x"], prompt_ids=[[1]],
              events=[Done(texts=["a b"], token_ids=[[4, 5, 6, 7]], nfe=2, seconds=0.5, first_token_seconds=0.1,
                           stopped="eos", context_passes=2)])
    assert t.stats() == {"tokens": 4, "nfe": 2, "tokens_per_nfe": 2.0, "context_passes": 2, "seconds": 0.5,
                         "tokens_per_second": 8.0, "first_token_seconds": 0.1, "stopped": "eos"}


def test_stats_tokens_per_nfe_is_per_sequence_in_a_batch():
    t = Trace(mode="diffusion", settings={}, model={}, prompts=["x", "y"], prompt_ids=[[1], [2]],
              events=[Done(texts=["a", "b"], token_ids=[[4, 5, 6, 7], [4, 5]], nfe=2, seconds=1.0,
                           first_token_seconds=0.1)])
    assert t.stats()["tokens_per_nfe"] == 1.5 and t.stats()["tokens"] == 6


def test_event_dicts_round_trip():
    for e in (Prefill(prompt_tokens=[3], seconds=0.0),
              Token(index=0, tokens=[4], confidence=[0.5], top_ids=[[4, 5]], top_probs=[[0.5, 0.2]], elapsed=0.1, nfe=1),
              Step(block=0, step=1, t=[0.5], tokens=[[3, 8]], committed=[[1]], planned=[0], confidence=[[0.1, 0.9]],
                   top_ids=[[[1], [8]]], top_probs=[[[0.1], [0.9]]], elapsed=0.2, nfe=2)):
        d = e.to_dict()
        assert d["type"] == type(e).__name__ and event_from_dict(d) == e
    assert set(EVENT_TYPES) == {"Prefill", "BlockStart", "Step", "BlockCommitted", "Token", "Done"}


def test_unknown_event_type_is_an_error():
    with pytest.raises(ValueError, match="unknown event type 'Teleport'"):
        event_from_dict({"type": "Teleport", "block": 0})
    with pytest.raises(ValueError, match="unknown event type None"):
        event_from_dict({"block": 0})
    with pytest.raises(ValueError, match="unknown event type"):
        Trace.from_dict({"mode": "ar", "events": [{"type": "Nope"}]})


@pytest.mark.parametrize("content", ["[1, 2, 3]", '{"mode": "ar"}', '{"events": []}', '"trace"', "{}"])
def test_not_a_trace(tmp_path, content):
    path = tmp_path / "x.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="not a TwoTower trace"):
        Trace.load(path)


def test_bad_trace_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="trace file not found"):
        Trace.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        Trace.load(tmp_path / "bad.json")
    (tmp_path / "new.json").write_text(json.dumps({"version": TRACE_VERSION + 1, "mode": "ar", "events": []}))
    with pytest.raises(ValueError, match="is newer than this tool's"):
        Trace.load(tmp_path / "new.json")


STEP = {"type": "Step", "block": 0, "step": 0, "t": [1.0], "tokens": [[3]], "committed": [[0]], "planned": [1],
        "confidence": [[0.5]], "top_ids": [[[3]]], "top_probs": [[[0.5]]], "elapsed": 0.1, "nfe": 1}


@pytest.mark.parametrize("change, message", [
    ({"events": "x"}, "'events' must be a list, got a string"),
    ({"tokens": None}, "'tokens' must be an object, got null"),
    ({"settings": [1]}, "'settings' must be an object, got a list"),
    ({"prompts": "hi"}, "'prompts' must be a list, got a string"),
    ({"prompts": [1]}, "'prompts' must be a list of strings"),
    ({"prompt_ids": [[1, "a"]]}, "'prompt_ids' must be a list of lists of token ids"),
    ({"tokens": {"5": 7}}, "'tokens' must map token ids to strings"),
    ({"mode": "race"}, "'mode' must be 'diffusion' or 'ar', got 'race'"),
    ({"version": "1"}, "'version' must be an integer, got a string"),
    ({"fork": 3}, "'fork' must be an object or null, got a number"),
    ({"events": [STEP, "x"]}, "event 1 must be an object, got a string"),
    ({"events": [{"type": ["Step"]}]}, r"event 0 has unknown event type \['Step'\]"),
    ({"events": [{"type": "Step", "block": 0}]}, r"event 0 \(Step\) lacks step, t, tokens"),
    ({"events": [{**STEP, "t": "x"}]}, r"event 0 \(Step\): 't' must be a list, got a string"),
    ({"events": [{**STEP, "elapsed": None}]}, r"event 0 \(Step\): 'elapsed' must be a number, got null"),
    ({"events": [{**STEP, "attention": {"x": []}}]}, r"event 0 \(Step\): invalid literal"),
])
def test_malformed_trace_content(change, message):
    good = {"mode": "diffusion", "prompts": ["a"], "prompt_ids": [[5]], "tokens": {"3": "x"}, "events": [STEP]}
    assert Trace.from_dict(good).steps()[0].t == [1.0]
    with pytest.raises(ValueError, match="^not a TwoTower trace: " + message):
        Trace.from_dict({**good, **change})


def test_loading_a_malformed_trace_names_the_file(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"mode": "ar", "events": "x"}))
    with pytest.raises(ValueError, match=r"trace file .*run.json: not a TwoTower trace: 'events' must be a list"):
        Trace.load(path)
    path.write_bytes(b'{"mode": "ar", "events": []}\xff')
    with pytest.raises(ValueError, match=r"trace file .*run.json: not a TwoTower trace: not UTF-8 text"):
        Trace.load(path)


def test_export_refuses_a_malformed_trace(tmp_path, capsys):
    from twotower.cli import main
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"mode": "ar", "events": [], "tokens": None}))
    assert main(["export", str(path), "--html", str(tmp_path / "run.html")]) == 2
    assert "not a TwoTower trace: 'tokens' must be an object, got null" in capsys.readouterr().err
    assert not (tmp_path / "run.html").exists()
