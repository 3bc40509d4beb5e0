"""Per-step tensor maths: commit rule, remasking strategies, top-k/top-p, token choice, settings,
repeat guards."""
from __future__ import annotations

import math

import pytest
import torch

from twotower.guards import RepeatGuard, ban_repeated_ngrams_, history_tensor, penalise_repeats_
from twotower.sampling import (REMASKING, SamplerConfig, choose_tokens, commit_counts, decide_step, filter_logits,
                               remasking_score, select_commits, settled_rows)

T = torch.tensor


# ---- commit rule -------------------------------------------------------------------------
def counts(conf, masked, steps_left, threshold):
    k, planned = commit_counts(T(conf), T(masked), steps_left, threshold)
    return k.tolist(), planned.tolist()


def test_commit_counts_threshold_count():
    conf = [[0.95, 0.5, 0.92, 0.1, 0.91, 0.2]]
    assert counts(conf, [[True] * 6], 6, 0.9) == ([3], [3])


def test_commit_counts_at_least_one():
    conf = [[0.2, 0.3, 0.1, 0.05]]
    # floor ceil(4/8) = 1 and threshold count 0 -> still one commit
    assert counts(conf, [[True] * 4], 8, 0.9) == ([1], [0])


def test_commit_counts_floor_ceil_masked_over_steps_left():
    conf = [[0.95, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]]
    assert counts(conf, [[True] * 7], 3, 0.9) == ([3], [1])      # ceil(7/3) = 3 > 1
    assert counts(conf, [[True] * 7], 7, 0.9) == ([1], [1])
    assert counts(conf, [[True] * 7], 2, 0.9) == ([4], [1])      # ceil(7/2) = 4


def test_commit_counts_only_masked_positions_count():
    conf = [[0.99, 0.99, 0.99, 0.95, 0.2]]
    masked = [[False, False, True, True, True]]
    assert counts(conf, masked, 5, 0.9) == ([2], [2])


def test_commit_counts_cap_and_last_step():
    conf = [[0.99, 0.99, 0.3]]
    masked = [[True, True, True]]
    assert counts(conf, masked, 1, 0.9) == ([3], [2])            # last step commits all
    assert counts(conf, [[True, False, False]], 1, 0.9) == ([1], [1])
    assert counts([[0.99, 0.99, 0.99]], masked, 4, 0.5) == ([3], [3])   # capped at #masked


def test_commit_counts_per_row_and_finished_rows():
    conf = [[0.95, 0.96, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1], [0.99, 0.99, 0.99, 0.99]]
    masked = [[True] * 4, [True] * 4, [False] * 4]
    assert counts(conf, masked, 4, 0.9) == ([2, 1, 0], [2, 0, 0])


def test_commit_counts_threshold_is_strict():
    assert counts([[0.9, 0.9]], [[True, True]], 2, 0.9) == ([1], [0])
    assert counts([[0.9, 0.9]], [[True, True]], 2, 0.0) == ([2], [2])
    assert counts([[1.0, 1.0]], [[True, True]], 2, 1.0) == ([1], [0])


def test_select_commits_highest_scores_among_masked():
    score = T([[0.9, 0.1, 0.8, 0.7, 0.95], [0.2, 0.3, 0.1, 0.4, 0.5]])
    masked = T([[True, True, True, True, False], [True, True, True, True, True]])
    sel = select_commits(score, masked, T([2, 3]))
    assert sel.tolist() == [[True, False, True, False, False], [False, True, False, True, True]]
    assert select_commits(score, masked, T([0, 0])).sum() == 0
    assert select_commits(score, masked, T([5, 5])).tolist() == masked.tolist()   # never an unmasked one


# ---- remasking strategies ----------------------------------------------------------------
def pick(probs, strategy, k=1, masked=None, seed=0):
    probs = T(probs)[None]
    conf = probs.max(-1).values
    masked = torch.ones_like(conf, dtype=torch.bool) if masked is None else T([masked])
    score = remasking_score(probs, conf, strategy, torch.Generator().manual_seed(seed))
    return select_commits(score, masked, T([k]))[0].nonzero().flatten().tolist()


def test_confidence_commits_the_most_likely_argmax():
    probs = [[0.5, 0.48, 0.02, 0.0], [0.45, 0.1833, 0.1833, 0.1834], [0.3, 0.3, 0.2, 0.2]]
    assert pick(probs, "confidence") == [0]
    assert pick(probs, "confidence", k=2) == [0, 1]


def test_margin_commits_the_largest_top1_top2_gap():
    probs = [[0.5, 0.48, 0.02, 0.0], [0.45, 0.1833, 0.1833, 0.1834], [0.3, 0.3, 0.2, 0.2]]
    assert pick(probs, "margin") == [1]                   # gap 0.27 beats 0.02 and 0.0
    score = remasking_score(T(probs)[None], T([[0.5, 0.45, 0.3]]), "margin", None)
    assert torch.allclose(score, T([[0.02, 0.45 - 0.1834, 0.0]]), atol=1e-6)


def test_entropy_commits_the_lowest_entropy_position():
    probs = [[0.7, 0.1, 0.1, 0.1], [0.6, 0.4, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]]
    assert pick(probs, "confidence") == [0]
    assert pick(probs, "entropy") == [1]                  # H = 0.67 < 0.94 < 1.39
    score = remasking_score(T(probs)[None], None, "entropy", None)
    assert math.isclose(float(score[0, 2]), -math.log(4), rel_tol=1e-5)


def test_random_commits_masked_positions_reproducibly():
    probs = [[0.9, 0.1]] * 8
    masked = [True, False, True, True, False, True, True, True]
    a = pick(probs, "random", k=3, masked=masked, seed=1)
    assert a == pick(probs, "random", k=3, masked=masked, seed=1)
    assert len(a) == 3 and all(masked[i] for i in a)
    seen = {tuple(pick(probs, "random", k=3, masked=masked, seed=s)) for s in range(20)}
    assert len(seen) > 3                                  # not a fixed order


def test_leftmost_commits_confident_positions_then_the_leftmost_masked():
    probs = T([[0.3, 0.3, 0.4], [0.95, 0.05, 0.0], [0.5, 0.5, 0.0], [0.92, 0.08, 0.0]])[None]
    conf = probs.max(-1).values                          # 0.4, 0.95, 0.5, 0.92
    score = remasking_score(probs, conf, "leftmost", None, threshold=0.9)
    masked = torch.ones_like(conf, dtype=torch.bool)
    assert select_commits(score, masked, T([2]))[0].nonzero().flatten().tolist() == [1, 3]   # over 0.9
    assert select_commits(score, masked, T([3]))[0].nonzero().flatten().tolist() == [0, 1, 3]
    masked[0, 0] = False                                 # committed already: the next masked one
    strict = remasking_score(probs, conf, "leftmost", None, threshold=0.93)
    assert select_commits(strict, masked, T([2]))[0].nonzero().flatten().tolist() == [1, 2]  # 2, not the 0.92
    none_over = remasking_score(probs, conf, "leftmost", None, threshold=0.99)
    assert select_commits(none_over, masked, T([1]))[0].nonzero().flatten().tolist() == [1]  # not the 0.95


def test_prefix_commits_the_run_over_the_threshold_from_the_leftmost_masked_and_no_island():
    cfg = SamplerConfig(remasking="prefix", threshold=0.9)
    #          committed, masked over γ, masked over γ, masked under γ, masked over γ (an island)
    conf = T([[0.2, 0.95, 0.97, 0.5, 0.99]])
    masked = T([[False, True, True, True, True]])
    logits = torch.log(torch.stack([conf, 1 - conf], -1).clamp_min(1e-9))   # argmax 0 with p = conf
    *_, planned, commit = decide_step(logits, masked, steps_left=8, cfg=cfg, generator=None)
    assert planned.tolist() == [2] and commit[0].nonzero().flatten().tolist() == [1, 2]
    leftmost = decide_step(logits, masked, 8, SamplerConfig(remasking="leftmost", threshold=0.9), None)[-1]
    assert leftmost[0].nonzero().flatten().tolist() == [1, 2, 4]     # leftmost commits the island too
    none_over = decide_step(logits, masked, 8, SamplerConfig(remasking="prefix", threshold=0.98), None)
    assert none_over[-2].tolist() == [0] and none_over[-1][0].nonzero().flatten().tolist() == [1]
    # the step budget's floor still holds: 4 masked, 2 steps left -> at least 2, leftmost first
    floor = decide_step(logits, masked, 2, SamplerConfig(remasking="prefix", threshold=0.98), None)[-1]
    assert floor[0].nonzero().flatten().tolist() == [1, 2]


def test_unknown_remasking_strategy():
    with pytest.raises(ValueError, match="unknown remasking strategy 'oldest'"):
        remasking_score(torch.ones(1, 2, 3), torch.ones(1, 2), "oldest", None)


# ---- filtering ---------------------------------------------------------------------------
def kept(logits, top_k=0, top_p=1.0):
    out = filter_logits(T(logits), top_k, top_p)
    return torch.isfinite(out).nonzero().flatten().tolist()


def test_top_k_keeps_exactly_k():
    logits = [0.1, 3.0, -1.0, 2.0, 0.5]
    assert kept(logits, top_k=2) == [1, 3]
    assert kept(logits, top_k=1) == [1]
    assert kept(logits, top_k=0) == [0, 1, 2, 3, 4]
    assert kept(logits, top_k=99) == [0, 1, 2, 3, 4]
    out = filter_logits(T(logits), 2, 1.0)
    assert out[1] == 3.0 and out[3] == 2.0              # kept logits unchanged


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = T([0.05, 0.5, 0.15, 0.3])                   # unsorted on purpose
    logits = probs.log().tolist()
    assert kept(logits, top_p=0.7) == [1, 3]            # 0.5 + 0.3 reaches 0.7
    assert kept(logits, top_p=0.5) == [1]               # 0.5 alone reaches it
    assert kept(logits, top_p=0.51) == [1, 3]
    assert kept(logits, top_p=0.96) == [0, 1, 2, 3]
    assert kept(logits, top_p=0.01) == [1]              # never empty
    assert kept(logits, top_k=3, top_p=0.9) == [1, 2, 3]


def test_filter_is_per_row():
    logits = T([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    out = filter_logits(logits, 1, 1.0)
    assert torch.isfinite(out).tolist() == [[False, False, True], [True, False, False]]


# ---- token choice ------------------------------------------------------------------------
def test_greedy_is_argmax_with_unscaled_confidence():
    logits = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(0))
    pred, probs, conf = choose_tokens(logits, SamplerConfig(temperature=0.0), None)
    assert torch.equal(pred, logits.argmax(-1))
    assert torch.allclose(probs, logits.softmax(-1))
    assert torch.allclose(conf, logits.softmax(-1).max(-1).values)


def test_gumbel_sampling_is_seeded_and_confidence_unscaled():
    logits = torch.randn(4, 16, 50, generator=torch.Generator().manual_seed(0))
    cfg = SamplerConfig(temperature=2.0)
    a = choose_tokens(logits, cfg, torch.Generator().manual_seed(3))
    b = choose_tokens(logits, cfg, torch.Generator().manual_seed(3))
    c = choose_tokens(logits, cfg, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    assert not torch.equal(a[0], logits.argmax(-1))
    expected = logits.softmax(-1).gather(-1, a[0].unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(a[2], expected)              # p(pred) under the UNSCALED distribution


def test_gumbel_samples_follow_the_tempered_distribution():
    logits = T([2.0, 1.0, 0.0, -1.0])
    n, temp = 20000, 0.7
    cfg = SamplerConfig(temperature=temp)
    pred, _, _ = choose_tokens(logits.expand(n, -1), cfg, torch.Generator().manual_seed(0))
    freq = torch.bincount(pred, minlength=4).float() / n
    assert torch.allclose(freq, (logits / temp).softmax(-1), atol=0.015), freq


def test_sampling_respects_top_k_and_top_p():
    logits = T([2.0, 1.9, 1.8, 1.7, 1.6, 1.5]).expand(5000, -1)
    g = torch.Generator().manual_seed(0)
    pred, _, _ = choose_tokens(logits, SamplerConfig(temperature=1.0, top_k=3), g)
    assert set(pred.tolist()) == {0, 1, 2}
    p = logits[0].softmax(-1)
    top_p = float(p[:2].sum()) - 1e-4                   # the first two tokens reach it
    pred, _, _ = choose_tokens(logits, SamplerConfig(temperature=1.0, top_p=top_p), g)
    assert set(pred.tolist()) == {0, 1}


def test_tiny_temperature_is_greedy():
    logits = torch.randn(8, 30, generator=torch.Generator().manual_seed(1))
    pred, _, _ = choose_tokens(logits, SamplerConfig(temperature=1e-4), torch.Generator().manual_seed(0))
    assert torch.equal(pred, logits.argmax(-1))


def test_forbidden_token_is_never_sampled():
    logits = torch.randn(2000, 10, generator=torch.Generator().manual_seed(2))
    logits[:, 3] = float("-inf")
    for temp in (0.0, 1.0, 5.0):
        pred, _, conf = choose_tokens(logits, SamplerConfig(temperature=temp), torch.Generator().manual_seed(0))
        assert not (pred == 3).any() and torch.isfinite(conf).all()


# ---- settings ----------------------------------------------------------------------------
def test_release_defaults():
    d = SamplerConfig()
    assert (d.block_size, d.steps, d.threshold, d.temperature, d.remasking) == (16, 16, 0.9, 0.0, "confidence")
    assert set(REMASKING) == {"confidence", "margin", "entropy", "random", "leftmost", "prefix", "verify"}


@pytest.mark.parametrize("change,message", [
    (dict(block_size=0), "block_size must be a positive integer, got 0"),
    (dict(block_size=-4), "block_size must be a positive integer"),
    (dict(block_size=300), "block_size 300 is larger than the model's context (256)"),
    (dict(steps=0), "steps must be a positive integer"),
    (dict(threshold=1.5), "threshold must lie in [0, 1], got 1.5"),
    (dict(threshold=-0.1), "threshold must lie in [0, 1]"),
    (dict(threshold=float("nan")), "threshold must lie in [0, 1]"),
    (dict(temperature=-0.5), "temperature must be >= 0, got -0.5"),
    (dict(temperature=float("inf")), "temperature must be >= 0"),
    (dict(top_k=-1), "top_k must be >= 0"),
    (dict(top_p=0.0), "top_p must lie in (0, 1]"),
    (dict(top_p=1.2), "top_p must lie in (0, 1]"),
    (dict(remasking="lowest"), "remasking must be one of confidence, margin, entropy, random"),
    (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
    (dict(top_candidates=0), "top_candidates must be >= 1"),
    (dict(no_repeat_ngram_size=100000), "no_repeat_ngram_size must be 0 (off) or an integer from 2 to 64"),
    (dict(seed=-1), "seed must be an integer from 0 to 2**63 - 1"),
    (dict(seed=2 ** 70), "seed must be an integer from 0 to 2**63 - 1"),
])
def test_validate_names_the_bad_setting(change, message):
    with pytest.raises(ValueError) as e:
        SamplerConfig(**change).validate(max_context=256)
    assert message in str(e.value)


def test_validate_accepts_edges_and_round_trips():
    cfg = SamplerConfig(block_size=256, threshold=0.0, top_p=1.0, temperature=0.0).validate(256)
    assert SamplerConfig(threshold=1.0).validate() is not None
    assert SamplerConfig.from_dict({**cfg.to_dict(), "unknown": 1}) == cfg


def test_settled_rows_end_at_end_of_text_after_a_filled_prefix():
    M, E = 9, 2
    x = torch.tensor([[5, 6, 7, 8],      # filled
                      [5, E, M, M],      # end-of-text after a filled prefix
                      [5, M, E, M],      # end-of-text, but position 1 still open
                      [E, 6, M, M],      # end-of-text first
                      [5, 6, M, M]])     # nothing to stop at
    eos = torch.tensor([E, 3])
    assert settled_rows(x, M, eos).tolist() == [True, True, False, True, False]
    assert settled_rows(x, M, None).tolist() == [True, False, False, False, False]   # no stop at EOS


# ---- repeat guards --------------------------------------------------------------------------
def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = T([[[2.0, -2.0, 2.0, -2.0]], [[2.0, -2.0, 2.0, -2.0]], [[2.0, -2.0, 2.0, 2.0]]])   # (3, 1, 4)
    written = T([[-1, 0, 1, 1], [-1, -1, -1, -1], [3, -1, 3, -1]])     # -1: padding, ids may repeat
    assert penalise_repeats_(logits.clone(), written, 2.0).tolist() == [
        [[1.0, -4.0, 2.0, -2.0]], [[2.0, -2.0, 2.0, -2.0]], [[2.0, -2.0, 2.0, 1.0]]]
    assert penalise_repeats_(logits, written, 1.0) is logits
    where = T([[False], [True], [True]])                                # row 0's position is not open
    assert penalise_repeats_(logits.clone(), written, 2.0, where)[0].tolist() == [[2.0, -2.0, 2.0, -2.0]]


def test_ngram_ban_uses_only_written_text_and_pads_short_rows():
    m = 9                                                    # the mask id
    history = history_tensor([[5, 6, 7, 5], [4]], "cpu")  # (2, 4): row 1 left-padded with -1
    assert history.tolist() == [[5, 6, 7, 5], [-1, -1, -1, 4]]
    x = T([[6, m, m], [4, 4, m]])                            # texts "5 6 7 5 6 _ _" and "4 4 4 _"
    banned = ban_repeated_ngrams_(torch.zeros(2, 3, 10), history, x, m, 3).isinf()
    # row 0: position 1 follows "5 6", and "5 6 7" was written -> no 7 there; position 2 follows
    # a masked position, position 0 is written: nothing banned
    assert banned[0].nonzero().tolist() == [[1, 7]]
    assert banned[1].nonzero().tolist() == [[2, 4]]          # "4 4 4" was written: no 4 after "4 4"
    banned = ban_repeated_ngrams_(torch.zeros(2, 3, 10), history, x, m, 2).isinf()    # bigrams
    assert banned[0].nonzero().tolist() == [[1, 7]]          # "6 7" was written: no 7 after a 6
    assert banned[1].nonzero().tolist() == [[2, 4]]
    x = T([[6, m, m], [m, 4, m]])                            # "4 _ 4 _": no written bigram "4 4"
    assert not ban_repeated_ngrams_(torch.zeros(2, 3, 10), history, x, m, 2)[1].isinf().any()


def test_repeat_guard_leaves_written_positions_of_a_block_alone():
    m = 9
    guard = RepeatGuard(SamplerConfig(repetition_penalty=2.0, no_repeat_ngram_size=2), history_tensor([[5, 6]], "cpu"))
    logits = torch.full((1, 3, 10), 4.0)
    x = T([[5, m, m]])                                       # position 0 written: "5 6 5 _ _"
    out = guard.block(logits.clone(), x, m)
    assert out[0, 0].tolist() == [4.0] * 10                 # written: as the denoiser scored it
    assert out[0, 1, 6] == float("-inf")                    # "5 6" was written: no 6 after a 5
    assert out[0, 1, 5] == 2.0 and out[0, 2, 5] == 2.0      # 5 was written: penalised at open positions
    assert out[0, 2, 6] == 2.0 and out[0, 1, 7] == 4.0      # position 2 follows a mask: penalty only
    with pytest.raises(ValueError, match="needs the 2 tokens before the block"):
        ban_repeated_ngrams_(logits, history_tensor([[5]], "cpu"), x, m, 3)
