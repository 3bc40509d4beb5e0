"""Forks (rewind a run to a step, continue with other settings) and the AR model's view of a run."""
from __future__ import annotations

import json

import pytest
import torch

from tests.tiny import MASK_ID, tiny_twotower
from twotower.events import BlockStart
from twotower.fork import fork_point, splice
from twotower.runner import run
from twotower.sampling import SamplerConfig
from twotower.teacher import ar_predictions
from twotower.trace import Trace

PROMPT, SHORT = [5, 17, 42, 8, 30, 61, 7], [11, 70, 23]


@pytest.fixture(scope="module")
def model():
    return tiny_twotower(seed=0, initializer_range=0.3)


def cfg(**kw) -> SamplerConfig:
    return SamplerConfig(**{**dict(block_size=4, steps=4, threshold=0.25, max_new_tokens=12, stop_at_eos=False), **kw})


def finished(model, prompts, c, resume=None) -> Trace:
    trace, events = run(model, prompts, c, "diffusion", resume=resume)
    for _ in events:
        pass
    return trace


@pytest.fixture(scope="module")
def parent(model):
    return finished(model, [PROMPT, SHORT], cfg())


def test_fork_point_reads_the_state_after_a_step(parent):
    second = [e for e in parent.steps() if e.block == 1][0]
    point = fork_point(parent, 1, second.step)
    assert point.start == 4 and point.tokens == second.tokens
    assert point.prefix == parent.events[[type(e).__name__ for e in parent.events].index("BlockCommitted")].tokens
    with pytest.raises(ValueError, match="block 1 has no step 9"):
        fork_point(parent, 1, 9)
    with pytest.raises(ValueError, match="block 7 has no recorded step"):
        fork_point(parent, 7, 0)


def test_fork_at_the_final_step_with_the_same_settings_reproduces_the_run(model, parent):
    last = parent.steps()[-1]
    child = finished(model, [PROMPT, SHORT], cfg(), fork_point(parent, last.block, last.step))
    assert child.done.token_ids == parent.done.token_ids
    assert child.steps() == [] and child.done.nfe == 0            # nothing was left to denoise
    assert child.fork == {"block": last.block, "step": last.step}


def test_fork_at_every_step_reproduces_a_greedy_run_and_splices_back(model, parent):
    for e in parent.steps():
        child = finished(model, [PROMPT, SHORT], cfg(), fork_point(parent, e.block, e.step))
        assert child.done.token_ids == parent.done.token_ids, (e.block, e.step)
        whole = splice(parent, child)
        assert [(s.block, s.step, s.tokens) for s in whole.steps()] == \
               [(s.block, s.step, s.tokens) for s in parent.steps()]
        assert whole.done.nfe == parent.done.nfe and whole.done.context_passes == parent.done.context_passes
        assert whole.fork["inherited"] == parent.steps().index(e) + 1


def test_a_fork_with_repeat_guards_reproduces_its_guarded_parent(model):
    """The guards read the text before the block from the fork point as from the run itself."""
    guarded = cfg(repetition_penalty=3.0, no_repeat_ngram_size=2)
    run_ = finished(model, [PROMPT, SHORT], guarded)
    assert run_.done.token_ids != finished(model, [PROMPT, SHORT], cfg()).done.token_ids
    for e in run_.steps():
        child = finished(model, [PROMPT, SHORT], guarded, fork_point(run_, e.block, e.step))
        assert child.done.token_ids == run_.done.token_ids, (e.block, e.step)


def test_fork_mid_block_with_threshold_zero_fills_the_block_in_one_step(model, parent):
    point = fork_point(parent, 1, 0)
    child = finished(model, [PROMPT, SHORT], cfg(threshold=0.0), point)
    steps = child.steps()
    assert (steps[0].block, steps[0].step) == (1, 1)              # goes on right after the fork point
    assert MASK_ID not in sum(steps[0].tokens, [])                # gamma 0: every masked token passes
    # what one denoiser pass over the fork state predicts, taken directly from the model
    ctx, _ = model.prefill([p + q for p, q in zip([PROMPT, SHORT], point.prefix)])
    x = torch.tensor(point.tokens)
    logits = model.denoise(x, model.block_inputs(ctx, 4))
    logits[..., MASK_ID] = float("-inf")
    expected = torch.where(x == MASK_ID, logits.argmax(-1), x).tolist()
    assert steps[0].tokens == expected
    for row, out in enumerate(child.done.token_ids):             # earlier blocks are inherited as they were
        assert out[:4] == parent.done.token_ids[row][:4]
    used = {e.block: e.steps_used for e in child.events if type(e).__name__ == "BlockCommitted"}
    parent_used = {e.block: e.steps_used for e in parent.events if type(e).__name__ == "BlockCommitted"}
    assert used[1] == 2 < parent_used[1]


def test_fewer_steps_than_taken_still_leaves_one(model, parent):
    point = fork_point(parent, 1, 1)
    child = finished(model, [PROMPT, SHORT], cfg(steps=1, threshold=1.0), point)
    start = next(e for e in child.events if isinstance(e, BlockStart) and e.block == 1)
    assert start.steps == 3                                       # max(1, 1 + 2): one step left
    assert [(e.block, e.step) for e in child.steps() if e.block == 1] == [(1, 2)]


def test_a_fork_is_a_complete_trace_on_its_own(model, parent, tmp_path):
    child = finished(model, [PROMPT, SHORT], cfg(threshold=0.9), fork_point(parent, 1, 0))
    path = tmp_path / "fork.json"
    child.save(path)
    loaded = Trace.load(path)
    assert loaded.fork == {"block": 1, "step": 0} and loaded.stats()["tokens"] == 24
    assert isinstance(loaded.events[1], BlockStart) and loaded.events[1].block == 1
    whole = splice(parent, loaded)
    json.dumps(whole.to_dict())
    assert Trace.from_dict(whole.to_dict()).fork["inherited"] == whole.fork["inherited"]
    elapsed = [e.elapsed for e in whole.steps()]
    assert elapsed == sorted(elapsed) and whole.done.seconds >= elapsed[-1]
    with pytest.raises(ValueError, match="not a fork"):
        splice(parent, parent)


def test_bad_fork_points_are_refused(model, parent):
    point = fork_point(parent, 2, 0)
    with pytest.raises(ValueError, match="beyond max_new_tokens"):
        next(run(model, [PROMPT, SHORT], cfg(max_new_tokens=10), resume=point)[1])
    with pytest.raises(ValueError, match="2 rows"):
        next(run(model, [PROMPT], cfg(), resume=point)[1])
    with pytest.raises(ValueError, match="only diffusion"):
        run(model, [PROMPT, SHORT], cfg(), "ar", resume=point)


def test_ar_predictions_are_the_ar_models_greedy_choices(model):
    trace, events = run(model, [PROMPT], cfg(max_new_tokens=6), "ar")
    for _ in events:
        pass
    got = ar_predictions(model, PROMPT, trace.done.token_ids[0], k=3)
    assert [ids[0] for ids in got["top_ids"]] == trace.done.token_ids[0]   # teacher forcing = greedy AR
    assert got["chosen"] == pytest.approx([p[0] for p in got["top_probs"]], abs=1e-5)
    assert got["top_probs"][0] == pytest.approx(trace.ar_tokens()[0].top_probs[0][:3], abs=1e-5)
    assert ar_predictions(model, PROMPT, []) == {"top_ids": [], "top_probs": [], "chosen": []}


def test_a_spliced_verify_fork_keeps_the_blocks_given_tokens_and_clock():
    """The verify order: a block's first token comes from the context pass (BlockStart.given).
    A fork splices back with the parent's given token and block start time, the commit table
    holds every position once, and the first token counts from block 0's start."""
    from tests.test_llama_family import clean_as_ar_model
    from visualizers.commits import commit_table
    model = clean_as_ar_model()
    c = cfg(remasking="verify", threshold=0.0, max_new_tokens=12)
    parent = finished(model, [PROMPT], c)
    child = finished(model, [PROMPT], cfg(remasking="verify", threshold=0.9, max_new_tokens=12),
                     resume=fork_point(parent, 1, 0))
    joined = splice(parent, child)
    starts = {b.block: b for b in parent.blocks()}
    spliced = {b.block: b for b in joined.blocks()}
    assert (spliced[1].given, spliced[1].elapsed) == (starts[1].given, starts[1].elapsed)
    assert joined.done.token_ids == parent.done.token_ids                 # verify writes the AR text either way
    assert sorted(c.pos for c in commit_table(joined)) == list(range(12))
    assert joined.done.first_token_seconds == starts[0].elapsed
    assert all(b.elapsed >= starts[1].elapsed for b in joined.blocks()[2:])
    # the drafts: the parent's up to the fork point, then the child's, whose first pass in the
    # forked block checked the drafts the parent's step left (the fork carried them)
    carried_drafts = parent.events[next(i for i, e in enumerate(parent.events) if getattr(e, "block", None) == 1
                                        and getattr(e, "step", None) == 0)].drafts
    assert child.fork == {"block": 1, "step": 0, "carried_drafts": carried_drafts}
    assert joined.fork["carried_drafts"] == carried_drafts
    cut = next(i for i, e in enumerate(parent.events) if getattr(e, "block", None) == 1 and getattr(e, "step", None) == 0)
    carried = sum(d >= 0 for d in parent.events[cut].drafts[0])
    assert carried > 0
    first = child.steps()[0]
    assert len(first.rejected[0]) + sum(first.tokens[0][j] == d for j, d in enumerate(parent.events[cut].drafts[0])
                                        if d >= 0) == carried            # each carried draft held or was dropped
    from twotower.trace import DraftTally
    head = DraftTally(1)
    for e in parent.events[:cut + 1]:
        head.update(e)
    whole = joined.draft_tally()
    assert whole.reached[0][0] > head.reached[0][0] if head.reached[0] else whole.reached[0][0] > 0


def test_a_verify_run_forked_to_another_order_draws_its_commits_plot():
    """The Fork tab can change the commit order: a spliced trace whose first steps checked drafts
    (verify) and whose later ones did not (confidence) still draws the per-pass plots."""
    from tests.test_llama_family import clean_as_ar_model
    from visualizers import plots
    model = clean_as_ar_model()
    parent = finished(model, [PROMPT], cfg(remasking="verify", threshold=0.0, repetition_penalty=8.0))
    child = finished(model, [PROMPT], cfg(remasking="confidence", threshold=0.0, repetition_penalty=8.0),
                     resume=fork_point(parent, 1, 0))
    joined = splice(parent, child)
    fig = plots.commits_per_step(joined)
    held, own = list(fig.data[1].y), list(fig.data[2].y)
    assert len(held) == len(own) == len(joined.steps())
    later = [i for i, e in enumerate(joined.steps()) if e.drafts is None]
    assert later and all(held[i] == 0 for i in later)
    assert plots.tokens_per_step(joined).data
