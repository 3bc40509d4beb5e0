"""Draft trees for the `verify` order (`draft_nodes`): the likeliest paths of drafts, every tree
node a block row of one pass. Greedy, the text must stay the AR model's token for token; with
drafts whose right token is a close second candidate, a tree must need fewer passes than one run."""
from __future__ import annotations

import pytest
import torch

import twotower.draft_tree as draft_tree
from tests.test_llama_family import clean_as_ar_model
from tests.test_verify import lookahead_drafter, wrong_token
from tests.test_verify import model, prompts, run  # noqa: F401 (the same fixtures: a clean_as_ar tiny model, 3 prompts)
from tests.tiny import MASK_ID
from twotower.draft_tree import keep_rows, leaves, likeliest_chain, likeliest_paths, tree_nodes
from twotower.sampler import ar_generate, diffusion_generate
from twotower.sampling import SamplerConfig
from twotower.trace import DraftTally, held_depth, tree_reached


def second_best_drafter(monkeypatch, model, prompts, truth: list[list[int]]):
    """The denoiser's masked predictions made a close second: at every lookahead position the AR
    model's next token gets probability ~0.45 and a wrong one ~0.55, so one run of drafts over 0.5
    always fails there, and a tree of 2 nodes holds both first tokens (0.55 and 0.45 beat the
    wrong token's run, 0.55 x 0.55)."""
    lookahead_drafter(monkeypatch, model, prompts, truth, lambda index, right: {wrong_token(right): 30.2, right: 30.0})


@pytest.mark.parametrize("guards", [{}, {"repetition_penalty": 1.3, "no_repeat_ngram_size": 3}])
@pytest.mark.parametrize("nodes", [1, 4])
def test_a_draft_tree_writes_the_ar_text(model, prompts, guards, nodes):
    c = dict(max_new_tokens=40, block_size=8, steps=8, stop_at_eos=False, **guards)
    _, ar = run(ar_generate(model, prompts, SamplerConfig(**c)))
    steps, done = run(diffusion_generate(model, prompts, SamplerConfig(remasking="verify", threshold=0.0,
                                                                       draft_nodes=nodes, **c)))
    assert done.token_ids == ar.token_ids
    assert all(s.rows is not None and len(s.rows) == len(prompts) for s in steps)
    assert max(max(s.rows) for s in steps) > 1                      # trees were drafted and checked


@pytest.mark.parametrize("guards", [{}, {"repetition_penalty": 1.3, "no_repeat_ngram_size": 3}])
def test_a_tree_keeps_the_second_candidate_that_one_run_loses(model, prompts, monkeypatch, guards):
    c = dict(max_new_tokens=40, block_size=8, steps=8, stop_at_eos=False, remasking="verify", threshold=0.5, **guards)
    _, ar = run(ar_generate(model, prompts, SamplerConfig(**c)))
    second_best_drafter(monkeypatch, model, prompts, ar.token_ids)
    _, chain = run(diffusion_generate(model, prompts, SamplerConfig(**c)))
    steps, tree = run(diffusion_generate(model, prompts, SamplerConfig(draft_nodes=2, **c)))
    assert chain.token_ids == ar.token_ids and tree.token_ids == ar.token_ids
    assert chain.nfe == 40 - 5              # every first draft fails: a token a pass, and the context pass's per block
    assert guards or all(len(t) == 2 for s in steps[1:4] for t in s.tree)   # both first tokens, no runs
    tally = DraftTally(len(prompts))
    for s in steps:
        tally.update(s)
    if not guards:     # passes 2..4 of each block hold their tree's right first token: 3 x 5 blocks
        assert tally.held == [15] * len(prompts) and tally.dropped == [0] * len(prompts)
        assert tally.held_at == tally.reached == [[15]] * len(prompts)   # trees one deep, every check held
    assert [sum(h) for h in tally.held_at] == tally.held
    # the tree keeps the second candidate and the AR token after it: per block of 8, the context
    # pass gives token 0, a first pass (nothing drafted yet) writes token 1, then 3 passes write 2
    # each (with the guards on, the penalty lowers a repeated right token below the floor now and then)
    assert tree.nfe == 5 * (1 + 3) if not guards else tree.nfe < chain.nfe * 0.8
    assert any(len(r) > 1 for s in steps for r in s.committed)


def test_tree_passes_from_the_committed_prefix_give_the_same_steps(model, prompts, monkeypatch):
    cfg = SamplerConfig(max_new_tokens=24, block_size=8, steps=8, stop_at_eos=False, remasking="verify",
                        threshold=0.0, draft_nodes=3, repetition_penalty=1.3)
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
    _, tree = run(diffusion_generate(model, prompts, SamplerConfig(draft_nodes=2, **c)))
    assert tree.token_ids == plain.token_ids and tree.stopped == plain.stopped
    assert all(eos not in row for row in tree.token_ids)


def test_the_last_step_of_a_block_commits_every_position(model, prompts):
    cfg = SamplerConfig(max_new_tokens=8, block_size=8, steps=2, stop_at_eos=False, remasking="verify",
                        threshold=0.0, draft_nodes=2)
    steps, done = run(diffusion_generate(model, prompts, cfg))
    assert len(steps) == 2 and all(len(row) == 8 for row in done.token_ids)
    assert all(MASK_ID not in row for row in steps[-1].tokens)


@pytest.mark.parametrize("settings,message", [
    ({"draft_nodes": 2, "remasking": "prefix"}, "verify order only"),
    ({"draft_nodes": 65, "remasking": "verify"}, r"from 0 \(off\) to 64"),
    ({"draft_nodes": -1, "remasking": "verify"}, r"from 0 \(off\) to 64"),
])
def test_impossible_tree_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        SamplerConfig(**settings).validate()


@pytest.mark.parametrize("batch", [1, 3])
def test_a_static_cache_runs_a_fixed_number_of_rows_and_the_same_steps(model, prompts, batch):
    """On a static cache (what torch.compile and CUDA graphs need) every pass runs nodes + 1 rows
    per prompt, the missing nodes padded with the empty path; the steps equal the growing cache's."""
    cfg = SamplerConfig(max_new_tokens=24, block_size=8, steps=8, stop_at_eos=False, remasking="verify",
                        threshold=0.0, draft_nodes=3, repetition_penalty=1.3)
    dynamic, _ = run(diffusion_generate(model, prompts[:batch], cfg))
    try:
        static, _ = run(diffusion_generate(model.use_static(), prompts[:batch], cfg))
    finally:
        model.use_static(False)
    assert {r for s in static for r in s.rows} == {4}
    assert len(static) == len(dynamic)
    for a, b in zip(static, dynamic):
        assert (a.tokens, a.committed, a.drafts, a.tree, a.top_ids) == (b.tokens, b.committed, b.drafts, b.tree, b.top_ids)


def test_the_likeliest_paths_are_chosen_best_first():
    ids = [[5, 6, 7]] * 2 + [[8, 9, 10], [11, 12, 13], [14, 15, 16]]      # S = 5 positions, top 3 each
    probs = [[0.9, 0.05, 0.05]] * 2 + [[0.5, 0.3, 0.04], [0.6, 0.2, 0.1], [0.1, 0.05, 0.01]]
    # [8] 0.5, [9] 0.3, [8, 11] 0.3, [9, 11] 0.18, [8, 12] 0.1, [8, 13] 0.05, ...; 10 is under the floor
    assert likeliest_paths(ids, probs, 2, nodes=4, floor=0.05) == [[8], [9], [8, 11], [9, 11]]
    assert likeliest_paths(ids, probs, 2, nodes=1, floor=0.05) == [[8]]
    assert likeliest_paths(ids, probs, 2, nodes=9, floor=0.05)[-1] == [8, 11, 14]   # 0.03: deeper, less likely
    assert likeliest_paths(ids, probs, 4, nodes=3, floor=0.2) == []      # nothing over the floor
    assert likeliest_paths(ids, probs, 5, nodes=3, floor=0.05) == []     # past the block


def test_a_tree_shows_its_top_1_chain_and_draws_with_its_leaves():
    ids = [[8, 9], [11, 12], [14, 15]]
    paths = [[8], [9], [8, 11], [9, 11], [8, 12]]
    assert likeliest_chain(paths, ids, 0) == [8, 11]
    assert likeliest_chain([[9]], ids, 0) == []                            # the top-1 token is not in the tree
    assert leaves(paths) == [[8, 11], [9, 11], [8, 12]]


def test_a_tree_pass_holds_as_deep_as_the_committed_text_follows_a_path():
    tokens = [1, 2, 7, 8, 3, 16]                                          # committed 7, 8 and the AR token 3
    assert held_depth([[7, 9], [7, 8, 5], [4]], tokens, 2) == 2
    assert held_depth([[4], [5, 8]], tokens, 2) == 0
    assert held_depth([], tokens, 2) == 0


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
                                                                       draft_nodes=3, **c), resume=point))
    for row, committed in zip(done.token_ids, kept):
        assert all(row[8 + j] == t for j, t in committed)
    assert all(MASK_ID not in row for row in done.token_ids)


def test_a_tree_fork_checks_the_tree_its_parent_checked_next(model, prompts, monkeypatch):
    """A fork of a tree run carries the tree the parent's next pass checked: with the same
    settings it takes the parent's passes, although the likeliest run alone (what the step
    shows as drafts) would fail. With fewer nodes than that tree has, it checks that run."""
    from twotower.fork import fork_point, splice
    from twotower.runner import run as record
    c = dict(max_new_tokens=24, block_size=8, steps=8, stop_at_eos=False, remasking="verify", threshold=0.5)
    _, ar = run(ar_generate(model, prompts, SamplerConfig(**c)))
    second_best_drafter(monkeypatch, model, prompts, ar.token_ids)
    cfg = SamplerConfig(draft_nodes=2, **c)
    trace, events = record(model, prompts, cfg, "diffusion")
    list(events)
    forked = [e for e in trace.steps() if e.step > 0 and any(d >= 0 for row in e.drafts for d in row)]
    assert forked
    for e in forked:
        point = fork_point(trace, e.block, e.step)
        child, events = record(model, prompts, cfg, "diffusion", resume=point)
        list(events)
        assert child.done.token_ids == ar.token_ids
        assert splice(trace, child).done.nfe == trace.done.nfe, (e.block, e.step)
        one, events = record(model, prompts, SamplerConfig(draft_nodes=1, **c), "diffusion", resume=point)
        list(events)
        assert one.steps()[0].tree == [[[d for d in row if d >= 0]] for row in e.drafts]   # the shown run


def test_a_tree_trace_reports_rows_per_pass(model, prompts):
    from twotower.generate_cmd import summary
    from twotower.runner import run as record
    c = dict(max_new_tokens=16, block_size=8, steps=8, stop_at_eos=False, remasking="verify", threshold=0.0)
    trace, events = record(model, prompts[:1], SamplerConfig(draft_nodes=2, **c), "diffusion")
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
    for nodes in (0, 2):
        trace, events = record(model, prompts[:1], SamplerConfig(draft_nodes=nodes, **c), "diffusion")
        list(events)
        data = payload(trace)
        assert data["draft_nodes"] == nodes
        trees = [f[12] for f in data["frames"] if len(f) > 12]
        assert (len(trees) == len(data["frames"]) and any(trees)) if nodes else not trees
        assert all(str(t) in data["pieces"] for tree in trees for path in tree for t in path)


def test_a_sampled_tree_commits_draws_from_the_ar_model():
    """Sampling: whatever the tree, the committed tokens are draws from the AR model's
    distribution at each position given the text before it. Rows [], [0], [1], [0, 2]: the
    rows that read the same path before a position hold the same distribution there."""
    V, S, mask = 6, 4, 5
    g = torch.Generator().manual_seed(0)
    dist = lambda: torch.randn(V, generator=g).index_fill(0, torch.tensor([mask]), float("-inf"))  # noqa: E731
    p0, p1a, p1b, p2 = dist(), dist(), dist(), dist()                  # after (), (0,), (1,), (0, 2)
    noise = lambda: torch.randn(V, generator=g)                        # noqa: E731 (the denoiser's guesses)
    rows_logits = torch.stack([torch.stack([p0, noise(), noise(), noise()]),      # row []
                               torch.stack([p0, p1a, noise(), noise()]),          # row [0]
                               torch.stack([p0, p1b, noise(), noise()]),          # row [1]
                               torch.stack([p0, p1a, p2, noise()])])              # row [0, 2]
    rows_logits[..., mask] = float("-inf")                           # [MASK] forbidden, as the caller does
    paths = [[], [0], [1], [0, 2]]
    ids = torch.tensor([[mask] * S] + [p + [mask] * (S - len(p)) for p in paths[1:]])
    rows = draft_tree.Rows(ids, torch.zeros(4, dtype=torch.long), paths)
    x, shown, open_ = torch.full((1, S), mask), torch.full((1, S), mask), torch.ones(1, S, dtype=torch.bool)
    cfg = SamplerConfig(remasking="verify", temperature=1.0, threshold=0.2, draft_nodes=3)
    n, counts = 6000, {}
    for _ in range(n):
        d, _, _ = draft_tree.decide_tree(rows_logits, rows, x, shown, open_, 8, cfg, mask, g)
        committed = tuple(t for t in d.x[0].tolist() if t != mask)
        counts[committed] = counts.get(committed, 0) + 1

    def freq(prefix):                  # the next token's frequencies after a committed prefix
        hits = torch.zeros(V)
        for c, k in counts.items():
            if len(c) > len(prefix) and c[:len(prefix)] == prefix:
                hits[c[len(prefix)]] += k
        return hits / hits.sum()
    assert torch.allclose(freq(()), p0.softmax(-1), atol=0.02)
    assert torch.allclose(freq((0,)), p1a.softmax(-1), atol=0.03)
    assert torch.allclose(freq((1,)), p1b.softmax(-1), atol=0.04)
    assert torch.allclose(freq((0, 2)), p2.softmax(-1), atol=0.08)
    assert all(len(c) == 1 for c in counts if c[0] not in (0, 1))    # off the tree: the AR token alone
    assert max(len(c) for c in counts) == 3                         # [0, 2] and the token after it


def test_a_sampled_tree_run_repeats_with_its_seed(model, prompts):
    c = dict(max_new_tokens=32, block_size=8, steps=8, stop_at_eos=False, remasking="verify", threshold=0.0,
             temperature=0.8, seed=3)
    steps, first = run(diffusion_generate(model, prompts, SamplerConfig(draft_nodes=4, **c)))
    _, again = run(diffusion_generate(model, prompts, SamplerConfig(draft_nodes=4, **c)))
    assert first.token_ids == again.token_ids and all(len(row) == 32 for row in first.token_ids)
    assert max(max(s.rows) for s in steps) > 1


def test_a_prompt_that_ended_checks_no_more_trees(model, prompts, monkeypatch):
    """A prompt that wrote end-of-text mid-block drafts no tree after it, runs one row, and its
    tally stops: its last pass's tree is not checked or counted."""
    c = dict(max_new_tokens=24, block_size=8, steps=8, remasking="verify", threshold=0.0, draft_nodes=3)
    _, ar = run(ar_generate(model, prompts, SamplerConfig(max_new_tokens=24, stop_at_eos=False)))
    eos = ar.token_ids[0][3]                                   # prompt 0's fourth token ends its text
    monkeypatch.setattr(type(model), "eos_token_ids", property(lambda self: {eos}))
    steps, done = run(diffusion_generate(model, prompts, SamplerConfig(**c)))
    assert done.token_ids[0] == ar.token_ids[0][:ar.token_ids[0].index(eos)]
    ended = [s for s in steps if s.block == 0 and not s.active[0]]
    assert ended and all(s.tree[0] == [] and s.committed[0] == [] and s.rows[0] == 1 for s in ended)
    tally = DraftTally(len(prompts))
    for s in steps:
        tally.update(s)
    before = DraftTally(len(prompts))
    for s in steps[:steps.index(ended[0])]:
        before.update(s)
    assert (tally.held[0], tally.dropped[0]) == (before.held[0], before.dropped[0])


def test_a_trees_check_reaches_one_draft_past_the_kept_path_only_where_a_path_goes_on():
    """Leaf paths [8, 9] and [5]; the text follows 5: the kept path is one deep and no path goes
    on past it, so the check reached depth 1 only. Following 8 then 7: depth 2 was reached and failed."""
    tree = [[8, 9], [5]]
    assert held_depth(tree, [0, 5, 6], 1) == 1 and tree_reached(tree, [0, 5, 6], 1, 1) == 1
    assert held_depth(tree, [0, 8, 7], 1) == 1 and tree_reached(tree, [0, 8, 7], 1, 1) == 2
    assert held_depth(tree, [0, 8, 9], 1) == 2 and tree_reached(tree, [0, 8, 9], 1, 2) == 2
    assert held_depth(tree, [0, 4, 9], 1) == 0 and tree_reached(tree, [0, 4, 9], 1, 0) == 1
