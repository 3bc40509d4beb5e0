"""Draft trees for the `verify` order (`draft_width`): several first-token candidates, every tree
node a block row of one pass. Greedy, the text must stay the AR model's token for token; with
drafts whose right token is the second candidate, a tree must need fewer passes than one run."""
from __future__ import annotations

import pytest
import torch

import twotower.draft_tree as draft_tree
from tests.test_llama_family import clean_as_ar_model
from tests.test_verify import lookahead_drafter, wrong_token
from tests.test_verify import model, prompts, run  # noqa: F401 (the same fixtures: a clean_as_ar tiny model, 3 prompts)
from tests.tiny import MASK_ID
from twotower.draft_tree import candidate_paths, keep_rows, tree_nodes
from twotower.sampler import ar_generate, diffusion_generate
from twotower.sampling import SamplerConfig


def second_best_drafter(monkeypatch, model, prompts, truth: list[list[int]]):
    """The denoiser's masked predictions made confident and second best: at every lookahead
    position the AR model's next token gets probability ~0.27 and a wrong one ~0.73, so one run of
    drafts always fails there and a tree of width 2 holds the right token."""
    lookahead_drafter(monkeypatch, model, prompts, truth, lambda index, right: {wrong_token(right): 31.0, right: 30.0})


@pytest.mark.parametrize("guards", [{}, {"repetition_penalty": 1.3, "no_repeat_ngram_size": 3}])
@pytest.mark.parametrize("width", [1, 3])
def test_a_draft_tree_writes_the_ar_text(model, prompts, guards, width):
    c = dict(max_new_tokens=40, block_size=8, steps=8, stop_at_eos=False, **guards)
    _, ar = run(ar_generate(model, prompts, SamplerConfig(**c)))
    steps, done = run(diffusion_generate(model, prompts, SamplerConfig(remasking="verify", threshold=0.0,
                                                                       draft_width=width, **c)))
    assert done.token_ids == ar.token_ids
    assert all(s.rows is not None and len(s.rows) == len(prompts) for s in steps)
    assert max(max(s.rows) for s in steps) > 1                      # trees were drafted and checked


@pytest.mark.parametrize("guards", [{}, {"repetition_penalty": 1.3, "no_repeat_ngram_size": 3}])
def test_a_tree_keeps_the_second_candidate_that_one_run_loses(model, prompts, monkeypatch, guards):
    c = dict(max_new_tokens=40, block_size=8, steps=8, stop_at_eos=False, remasking="verify", threshold=0.5, **guards)
    _, ar = run(ar_generate(model, prompts, SamplerConfig(**c)))
    second_best_drafter(monkeypatch, model, prompts, ar.token_ids)
    _, chain = run(diffusion_generate(model, prompts, SamplerConfig(**c)))
    steps, tree = run(diffusion_generate(model, prompts, SamplerConfig(draft_width=2, **c)))
    assert chain.token_ids == ar.token_ids and tree.token_ids == ar.token_ids
    assert chain.nfe == 40                                          # every first draft fails: a token a pass
    # the tree keeps the second candidate and the AR token after it: per block of 8, a first pass
    # (nothing drafted yet) writes 1 token, then 4 passes write 2, 2, 2 and 1 (with the guards on,
    # the penalty lowers a repeated right token below the floor now and then)
    assert tree.nfe == 5 * (1 + 4) if not guards else tree.nfe < chain.nfe * 0.8
    assert any(len(r) > 1 for s in steps for r in s.committed)


def test_tree_passes_from_the_committed_prefix_give_the_same_steps(model, prompts, monkeypatch):
    cfg = SamplerConfig(max_new_tokens=24, block_size=8, steps=8, stop_at_eos=False, remasking="verify",
                        threshold=0.0, draft_width=3, repetition_penalty=1.3)
    reused, _ = run(diffusion_generate(model, prompts, cfg))
    monkeypatch.setattr(model, "can_reuse_prefix", lambda *a, **k: False)
    full, _ = run(diffusion_generate(model, prompts, cfg))
    assert len(reused) == len(full)
    for a, b in zip(reused, full):
        assert (a.tokens, a.committed, a.drafts, a.rows, a.top_ids) == (b.tokens, b.committed, b.drafts, b.rows, b.top_ids)
        assert torch.allclose(torch.tensor(a.confidence), torch.tensor(b.confidence), atol=1e-5)


def test_a_tree_run_stops_at_end_of_text_like_one_run(model, prompts):
    c = dict(max_new_tokens=24, block_size=8, steps=8, remasking="verify", threshold=0.0)
    eos = next(iter(model.eos_token_ids))
    _, plain = run(diffusion_generate(model, prompts, SamplerConfig(**c)))
    _, tree = run(diffusion_generate(model, prompts, SamplerConfig(draft_width=2, **c)))
    assert tree.token_ids == plain.token_ids and tree.stopped == plain.stopped
    assert all(eos not in row for row in tree.token_ids)


def test_the_last_step_of_a_block_commits_every_position(model, prompts):
    cfg = SamplerConfig(max_new_tokens=8, block_size=8, steps=2, stop_at_eos=False, remasking="verify",
                        threshold=0.0, draft_width=2)
    steps, done = run(diffusion_generate(model, prompts, cfg))
    assert len(steps) == 2 and all(len(row) == 8 for row in done.token_ids)
    assert all(MASK_ID not in row for row in steps[-1].tokens)


@pytest.mark.parametrize("settings,message", [
    ({"draft_width": 2, "remasking": "prefix"}, "verify order only"),
    ({"draft_width": 2, "remasking": "verify", "temperature": 0.7}, "greedy"),
    ({"draft_width": 9, "remasking": "verify"}, r"from 0 \(off\) to 8"),
    ({"draft_width": -1, "remasking": "verify"}, r"from 0 \(off\) to 8"),
])
def test_impossible_tree_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        SamplerConfig(**settings).validate()


def test_a_static_model_refuses_draft_trees(prompts):
    static = clean_as_ar_model().use_static()
    with pytest.raises(ValueError, match="one shape"):
        next(diffusion_generate(static, prompts, SamplerConfig(remasking="verify", draft_width=2)))


def test_candidate_paths_branch_on_the_first_token_only():
    ids = [[5, 6, 7]] * 2 + [[8, 9, 10], [11, 12, 13], [14, 15, 16]]      # S = 5 positions, top 3 each
    probs = [[0.9, 0.05, 0.05]] * 2 + [[0.5, 0.3, 0.04], [0.6, 0.2, 0.1], [0.1, 0.05, 0.01]]
    assert candidate_paths(ids, probs, 2, gamma=0.2, width=3) == [[8, 11], [9, 11]]   # 10 is under the floor
    assert candidate_paths(ids, probs, 2, gamma=0.2, width=1) == [[8, 11]]
    assert candidate_paths(ids, probs, 4, gamma=0.2, width=1) == []       # the likeliest is under gamma
    assert candidate_paths(ids, probs, 4, gamma=0.2, width=2) == [[14]]
    assert candidate_paths(ids, probs, 5, gamma=0.2, width=2) == []       # past the block


def test_tree_nodes_are_every_prefix_once():
    assert tree_nodes([[1, 2, 3], [4, 2, 3], [1, 5]]) == [[], [1], [4], [1, 2], [4, 2], [1, 5], [1, 2, 3], [4, 2, 3]]


def test_the_longest_path_the_ar_model_agrees_with_is_kept():
    rows = draft_tree.Rows(torch.zeros(4, 6), torch.tensor([0, 0, 0, 1]), [[], [7], [7, 8], []])
    pred = [[1, 2, 7, 9, 0, 0],                  # row 0: the AR model writes 7 at position 2
            [1, 2, 7, 8, 0, 0],                  # row 1 read 7 there: the AR model goes on with 8
            [1, 2, 7, 3, 0, 0],                  # row 2 read 7, 8: its 8 is not the AR model's (3)
            [4, 0, 0, 0, 0, 0]]
    assert keep_rows(pred, rows, [2, 0]) == [1, 3]


def test_a_tree_run_forked_from_a_block_with_gaps_keeps_its_commits(model, prompts):
    """A fork of a `confidence` run into the tree order: the block holds commits after masked
    positions; trees must stay within the open runs and leave those commits as they are."""
    from twotower.fork import fork_point
    from twotower.runner import run as record
    c = dict(max_new_tokens=16, block_size=8, steps=8, stop_at_eos=False)
    trace, events = record(model, prompts, SamplerConfig(remasking="random", threshold=1.0, **c), "diffusion")
    list(events)
    point = fork_point(trace, 1, 2)
    kept = [[(j, t) for j, t in enumerate(row) if t != MASK_ID] for row in point.tokens]
    assert any(row and row[-1][0] > len(row) - 1 for row in kept)            # a commit after a gap
    steps, done = run(diffusion_generate(model, prompts, SamplerConfig(remasking="verify", threshold=0.0,
                                                                       draft_width=3, **c), resume=point))
    for row, committed in zip(done.token_ids, kept):
        assert all(row[8 + j] == t for j, t in committed)
    assert all(MASK_ID not in row for row in done.token_ids)


def test_a_tree_trace_reports_rows_per_pass(model, prompts):
    from twotower.generate_cmd import summary
    from twotower.runner import run as record
    c = dict(max_new_tokens=16, block_size=8, steps=8, stop_at_eos=False, remasking="verify", threshold=0.0)
    trace, events = record(model, prompts[:1], SamplerConfig(draft_width=2, **c), "diffusion")
    list(events)
    rows = [s.rows[0] for s in trace.steps()]
    assert trace.stats()["rows_per_pass"] == pytest.approx(sum(rows) / len(rows)) and max(rows) > 1
    assert "rows/pass=" in summary(trace.stats(), "diffusion")
    plain, events = record(model, prompts[:1], SamplerConfig(**c), "diffusion")
    list(events)
    assert "rows_per_pass" not in plain.stats() and "rows/pass" not in summary(plain.stats(), "diffusion")


def test_the_grid_payload_says_a_run_used_draft_trees(model, prompts):
    from twotower.runner import run as record
    from visualizers.trajectory import payload
    c = dict(max_new_tokens=8, block_size=8, steps=8, stop_at_eos=False, remasking="verify", threshold=0.0)
    for width in (0, 2):
        trace, events = record(model, prompts[:1], SamplerConfig(draft_width=width, **c), "diffusion")
        list(events)
        assert payload(trace)["draft_width"] == width
