"""The `verify` commit order: the denoiser drafts, its clean_as_ar reading checks the drafts.

Greedy, the text must be the AR model's token for token whatever the drafts are; sampling,
each token must be a draw from the AR model's distribution (speculative sampling).
"""
from __future__ import annotations

import pytest
import torch

import twotower.draft_tree as draft_tree
from tests.test_llama_family import clean_as_ar_model
from tests.tiny import MASK_ID, VOCAB, tiny_twotower
from twotower.events import BlockStart, Done, Step
from twotower.model import TwoTower
from twotower.sampler import ar_generate, diffusion_generate
from twotower.sampling import SamplerConfig, verify_step

PROMPT_LENGTHS = (5, 9, 3)


@pytest.fixture(scope="module")
def model():
    return clean_as_ar_model()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def run(gen) -> tuple[list[Step], Done]:
    events = list(gen)
    return [e for e in events if isinstance(e, Step)], events[-1]


def wrong_token(right: int) -> int:
    """A token that is never `right` and never [MASK]."""
    return 4 + (right - 3) % (VOCAB - 4)


def lookahead_drafter(monkeypatch, model, prompts, truth: list[list[int]], scores):
    """Set the denoiser's predictions at every lookahead position (masked, after a masked one):
    logits -30 except scores(index, right) -> {token: logit}, where index is the generated
    position and right the AR model's token there (`truth`). Clean positions (the verifying reads)
    are left as they are. The rows of a draft tree are mapped to their prompts."""
    real_denoise, real_inputs, real_rows, where = model.denoise, model.block_inputs, draft_tree.build_rows, {}

    def block_inputs(ctx, size, **kw):
        where["start"] = [int(n) - len(p) for n, p in zip(ctx.lengths, prompts)]
        where["owner"] = list(range(len(prompts)))
        return real_inputs(ctx, size, **kw)

    def build_rows(x, trees, mask_id, per_prompt=None):
        rows = real_rows(x, trees, mask_id, per_prompt)
        where["owner"] = rows.owner.tolist()
        return rows

    def denoise(x, inputs, t=None, capture=None, start=0):
        logits = real_denoise(x, inputs, t, capture, start)         # (rows, S - start, V)
        for r, b in enumerate(where["owner"]):                       # the prompt of each row
            for j in range(max(start, 1), x.shape[1]):
                index = where["start"][b] + j
                if x[r, j - 1] == MASK_ID and index < len(truth[b]):   # a lookahead position
                    logits[r, j - start] = -30.0
                    for tok, score in scores(index, truth[b][index]).items():
                        logits[r, j - start, tok] = score
        return logits

    monkeypatch.setattr(model, "block_inputs", block_inputs)
    monkeypatch.setattr(model, "denoise", denoise)
    monkeypatch.setattr(draft_tree, "build_rows", build_rows)


def oracle_drafter(monkeypatch, model, prompts, truth: list[list[int]], wrong_every: int):
    """Make the denoiser's masked predictions confident: the AR model's own next tokens
    (`truth`), except every `wrong_every`-th generated position, which gets a wrong token."""
    lookahead_drafter(monkeypatch, model, prompts, truth,
                      lambda index, right: {right if index % wrong_every else wrong_token(right): 30.0})


@pytest.mark.parametrize("guards", [{}, {"repetition_penalty": 1.3, "no_repeat_ngram_size": 3}])
@pytest.mark.parametrize("threshold", [0.0, 0.9])
def test_greedy_verify_writes_the_ar_text_with_any_drafts(model, prompts, guards, threshold):
    c = dict(max_new_tokens=40, block_size=8, steps=8, stop_at_eos=False, **guards)
    _, ar = run(ar_generate(model, prompts, SamplerConfig(**c)))
    events = list(diffusion_generate(model, prompts, SamplerConfig(remasking="verify", threshold=threshold, **c)))
    steps, done = [e for e in events if isinstance(e, Step)], events[-1]
    assert done.token_ids == ar.token_ids
    # this random denoiser's drafts all fail: one token a pass, and each block's first token comes
    # from the context tower's pass over the text before it (no denoiser pass)
    assert done.nfe == 40 - 5
    assert [e.given for e in events if isinstance(e, BlockStart)] == [[row[j] for row in ar.token_ids] for j in range(0, 40, 8)]
    if threshold == 0.0:
        assert sum(len(r) for e in steps for r in e.rejected) > 0


@pytest.mark.parametrize("guards", [{}, {"repetition_penalty": 1.3, "no_repeat_ngram_size": 3}])
def test_good_drafts_are_committed_and_bad_ones_corrected(model, prompts, monkeypatch, guards):
    c = dict(max_new_tokens=40, block_size=8, steps=8, stop_at_eos=False, **guards)
    _, ar = run(ar_generate(model, prompts, SamplerConfig(**c)))
    oracle_drafter(monkeypatch, model, prompts, ar.token_ids, wrong_every=5)
    steps, done = run(diffusion_generate(model, prompts, SamplerConfig(remasking="verify", threshold=0.9, **c)))
    assert done.token_ids == ar.token_ids
    assert done.nfe < 30                        # several tokens a pass where the drafts hold
    rejected = sum(len(r) for e in steps for r in e.rejected)
    assert rejected > 0
    for e in steps:                             # drafts sit right after the committed text
        for row, drafts in zip(e.tokens, e.drafts):
            d = [j for j, tok in enumerate(drafts) if tok >= 0]
            if d:
                assert d == list(range(d[0], d[-1] + 1)) and all(t != MASK_ID for t in row[:d[0]])
                assert all(t == MASK_ID for t in row[d[0]:])


def test_the_same_drafts_unchecked_change_the_text(model, prompts, monkeypatch):
    """The exactness above is the check's doing: the leftmost order commits the same drafts
    unchecked, and the wrong ones stay in the text."""
    c = dict(max_new_tokens=24, block_size=8, steps=8, stop_at_eos=False)
    _, ar = run(ar_generate(model, prompts, SamplerConfig(**c)))
    oracle_drafter(monkeypatch, model, prompts, ar.token_ids, wrong_every=5)
    checked = run(diffusion_generate(model, prompts, SamplerConfig(remasking="verify", threshold=0.9, **c)))[1]
    unchecked = run(diffusion_generate(model, prompts, SamplerConfig(remasking="leftmost", threshold=0.9, **c)))[1]
    assert checked.token_ids == ar.token_ids != unchecked.token_ids


def test_verify_needs_a_clean_as_ar_denoiser(prompts):
    with pytest.raises(ValueError, match="verify order .* needs a clean_as_ar denoiser"):
        next(diffusion_generate(tiny_twotower(), prompts, SamplerConfig(remasking="verify")))


def test_verify_with_one_step_left_commits_everything(model, prompts):
    steps, done = run(diffusion_generate(model, prompts, SamplerConfig(
        remasking="verify", threshold=0.0, max_new_tokens=8, block_size=8, steps=2, stop_at_eos=False)))
    assert len(steps) == 2 and all(len(r) == 8 for r in done.token_ids)
    assert all(d == -1 for row in steps[-1].drafts for d in row)


def test_speculative_acceptance_draws_from_the_target_distribution():
    """One draft per row, drawn from q; the committed token must follow p, not q."""
    rows, V = 40000, 5                                              # id 3 is [MASK]: never drawn
    p = torch.tensor([0.5, 0.3, 0.15, 0.0, 0.05])
    q = torch.tensor([0.1, 0.6, 0.1, 0.0, 0.2])
    g = torch.Generator().manual_seed(3)
    drafts = torch.full((rows, 2), MASK_ID)
    drafts[:, 1] = torch.multinomial(q, rows, replacement=True, generator=g)
    x = torch.full((rows, 2), MASK_ID)
    x[:, 0] = 0                                                     # position 0 committed
    logits = p.log().expand(rows, 2, V).clone()
    draft_probs = q.expand(rows, 2, V).clone()
    open_ = x == MASK_ID
    cfg = SamplerConfig(remasking="verify", temperature=1.0)
    v = verify_step(logits, x, drafts, draft_probs, open_, 4, cfg, g, MASK_ID)
    assert v.commit[:, 1].all()
    freq = torch.bincount(v.x[:, 1], minlength=V).float() / rows
    assert (freq - p).abs().max() < 0.01, freq
    accepted = (v.x[:, 1] == drafts[:, 1]).float().mean()
    assert abs(accepted - torch.minimum(p, q).sum()) < 0.01       # the acceptance rate of speculative sampling


def test_sampled_verify_is_reproducible_and_differs_by_seed(model, prompts):
    c = dict(remasking="verify", threshold=0.0, temperature=1.0, max_new_tokens=16, block_size=8, steps=8)
    a = run(diffusion_generate(model, prompts, SamplerConfig(seed=1, **c)))[1]
    b = run(diffusion_generate(model, prompts, SamplerConfig(seed=1, **c)))[1]
    other = run(diffusion_generate(model, prompts, SamplerConfig(seed=2, **c)))[1]
    assert a.token_ids == b.token_ids != other.token_ids


def test_the_guards_at_drafts_are_the_ar_models_guards_there():
    """RepeatGuard.prefix at block position j = the AR guard after history + block[:j]."""
    from twotower.guards import RepeatGuard, history_tensor
    g = torch.Generator().manual_seed(4)
    cfg = SamplerConfig(repetition_penalty=1.4, no_repeat_ngram_size=3)
    history = [[5, 6, 7, 5, 6, 9], [8, 8, 4]]
    x = torch.tensor([[10, 6, 11, 10, 11, MASK_ID], [4, 11, 11, 4, MASK_ID, MASK_ID]])
    logits = torch.randn(2, 6, 12, generator=g)
    at = x != MASK_ID
    got = RepeatGuard(cfg, history_tensor(history, "cpu")).prefix(logits.clone(), x, MASK_ID, at)
    for b in range(2):
        for j in range(6):
            if not at[b, j]:
                assert torch.equal(got[b, j], logits[b, j])
                continue
            ar = RepeatGuard(cfg, history_tensor([history[b] + x[b, :j].tolist()], "cpu"))
            assert torch.equal(got[b, j], ar.token(logits[b, j][None].clone())[0]), (b, j)


def test_a_verify_run_forked_mid_block_takes_the_parents_passes(model, prompts, monkeypatch):
    """A fork carries the drafts its step left: with unchanged settings its first pass checks
    them as the parent's next pass did, so it writes the AR text in the parent's passes, and the
    spliced run counts the same drafts as the parent."""
    from twotower.fork import fork_point, splice
    from twotower.runner import run as record
    c = dict(max_new_tokens=24, block_size=8, steps=8, stop_at_eos=False)
    _, ar = run(ar_generate(model, prompts, SamplerConfig(**c)))
    oracle_drafter(monkeypatch, model, prompts, ar.token_ids, wrong_every=5)
    for nodes in (0, 3):
        cfg = SamplerConfig(remasking="verify", threshold=0.9, draft_nodes=nodes, **c)
        trace, events = record(model, prompts, cfg, "diffusion")
        list(events)
        drafted = [e for e in trace.steps() if any(d >= 0 for row in e.drafts for d in row)]
        assert len(drafted) > 2
        for e in drafted:
            point = fork_point(trace, e.block, e.step)
            assert point.drafts == e.drafts
            child, events = record(model, prompts, cfg, "diffusion", resume=point)
            list(events)
            assert child.done.token_ids == ar.token_ids, (nodes, e.block, e.step)
            whole = splice(trace, child)
            assert whole.done.nfe == trace.done.nfe, (nodes, e.block, e.step)
            mine, theirs = whole.draft_tally(), trace.draft_tally()
            assert (mine.held, mine.dropped, mine.reached) == (theirs.held, theirs.dropped, theirs.reached)
            own = child.draft_tally()                  # the fork's own trace counts its first pass the same
            assert own.step_held[0] == mine.step_held[whole.fork["inherited"]], (nodes, e.block, e.step)


def test_a_sampled_fork_checks_the_carried_drafts_as_point_masses(model, prompts, monkeypatch):
    """Sampling, a carried draft counts as drawn from a point mass on it: a right one holds
    with the AR model's probability of it (here near 1), a wrong one is dropped."""
    from twotower.fork import fork_point
    from twotower.runner import run as record
    c = dict(max_new_tokens=16, block_size=8, steps=8, stop_at_eos=False)
    _, ar = run(ar_generate(model, prompts, SamplerConfig(**c)))
    oracle_drafter(monkeypatch, model, prompts, ar.token_ids, wrong_every=5)
    greedy = SamplerConfig(remasking="verify", threshold=0.9, **c)
    trace, events = record(model, prompts, greedy, "diffusion")
    list(events)
    e = next(e for e in trace.steps() if sum(d >= 0 for row in e.drafts for d in row) > 2)
    sharp = SamplerConfig(remasking="verify", threshold=0.9, temperature=0.01, **c)   # ~ greedy draws
    child, events = record(model, prompts, sharp, "diffusion", resume=fork_point(trace, e.block, e.step))
    list(events)
    first, after = child.steps()[0], trace.steps()[trace.steps().index(e) + 1]
    assert first.tokens == after.tokens and first.rejected == after.rejected
    assert child.done.token_ids == ar.token_ids


def test_eval_counts_the_drafts_kept_and_dropped(model, prompts, monkeypatch):
    from twotower import evaluate
    c = dict(max_new_tokens=24, block_size=8, steps=8, stop_at_eos=False)
    prompts = sorted(prompts, key=len)                 # the order eval batches them in: one batch
    _, ar = run(ar_generate(model, prompts, SamplerConfig(**c)))
    oracle_drafter(monkeypatch, model, prompts, ar.token_ids, wrong_every=5)
    gen = evaluate.generate(model, prompts, SamplerConfig(remasking="verify", threshold=0.9, **c), "diffusion", 3)
    assert gen.ids == ar.token_ids and gen.drafts_held > 0 and gen.drafts_dropped > 0
    # a pass commits its kept drafts and, unless they reach the block's end, one AR token; each
    # block's first token comes from the context tower's pass (3 blocks of 8 per prompt)
    assert gen.tokens <= gen.drafts_held + sum(gen.nfe) + 3 * len(prompts) and gen.drafts_held < gen.tokens
    speed = evaluate.speed_of(gen)
    assert speed["drafts_checked"] == gen.drafts_held + gen.drafts_dropped
    assert 0 < speed["draft_acceptance"] < 1
    assert sum(gen.held_at) == gen.drafts_held and gen.reached[0] >= gen.reached[-1] > 0   # by depth, the same drafts
    assert speed["acceptance_by_depth"] == [h / n for h, n in zip(gen.held_at, gen.reached)]
    assert 0 < speed["acceptance_by_depth"][0] < 1        # every fifth draft is wrong
    assert "draft_acceptance" not in evaluate.speed_of(evaluate.generate(
        model, prompts, SamplerConfig(remasking="prefix", **c), "diffusion", 3))


def test_a_verify_trace_counts_its_drafts(model, prompts, monkeypatch):
    from app.handlers import status_line
    from twotower.runner import run as record
    c = dict(max_new_tokens=24, block_size=8, steps=8, stop_at_eos=False)
    _, ar = run(ar_generate(model, prompts, SamplerConfig(**c)))
    oracle_drafter(monkeypatch, model, prompts, ar.token_ids, wrong_every=5)
    trace, events = record(model, prompts, SamplerConfig(remasking="verify", threshold=0.9, **c), "diffusion")
    list(events)
    s = trace.stats()
    assert 0 < s["drafts_kept"] < s["drafts_checked"]
    # kept = committed with the drafted token (a dropped draft's position may be committed too, corrected)
    kept = dropped = 0
    for before, after in zip(trace.steps(), trace.steps()[1:]):
        if before.block == after.block:
            for b in range(len(prompts)):
                kept += sum(before.drafts[b][j] == after.tokens[b][j] for j in after.committed[b])
                dropped += len(after.rejected[b])
    assert (s["drafts_kept"], s["drafts_checked"]) == (kept, kept + dropped)
    assert f"drafts kept {s['drafts_kept']} of {s['drafts_checked']}" in status_line(trace)
    from visualizers.export import stats_line
    assert f"drafts kept {s['drafts_kept']} of {s['drafts_checked']}" in stats_line(trace)
    from twotower.generate_cmd import summary
    assert f"drafts_kept={s['drafts_kept']}/{s['drafts_checked']} " in summary(s, "diffusion")
    plain, events = record(model, prompts, SamplerConfig(remasking="prefix", **c), "diffusion")
    list(events)
    assert "drafts_checked" not in plain.stats() and "drafts kept" not in status_line(plain)


def test_a_block_starts_with_the_token_the_context_pass_predicted(model, prompts, monkeypatch):
    """Each block's first token is the AR model's next token, which the context tower's pass over
    the text before the block (prefill, then each extend) predicted: no denoiser pass is spent on
    it. A block whose first token ends the text runs no pass at all."""
    c = dict(max_new_tokens=24, block_size=8, steps=8, repetition_penalty=1.3, no_repeat_ngram_size=3)
    prompt = prompts[2:]
    _, ar = run(ar_generate(model, prompt, SamplerConfig(stop_at_eos=False, **c)))
    ending = ar.token_ids[0][8]                          # block 1's first token, not written before it
    assert ending not in ar.token_ids[0][:8]
    monkeypatch.setattr(TwoTower, "eos_token_ids", property(lambda self: {ending}))
    _, ar = run(ar_generate(model, prompt, SamplerConfig(**c)))
    events = list(diffusion_generate(model, prompt, SamplerConfig(remasking="verify", threshold=0.9, **c)))
    done, starts = events[-1], [e for e in events if isinstance(e, BlockStart)]
    assert done.token_ids == ar.token_ids and len(done.token_ids[0]) == 8 and done.stopped == "eos"
    assert [s.given for s in starts] == [[ar.token_ids[0][0]], [ending]]
    assert not [e for e in events if isinstance(e, Step) and e.block == 1]      # ended before any pass
    assert all(0 < p <= 1 for s in starts for p in s.given_confidence)
    first = next(e for e in events if isinstance(e, Step))
    assert first.tokens[0][0] == ar.token_ids[0][0] and 0 not in first.committed[0]


def test_a_one_position_block_is_left_to_its_pass(model, prompts):
    """max_new_tokens 17 in blocks of 8: the last block has one position, which its own pass writes
    (so every block that writes a token has a step for the views to show it at)."""
    c = dict(max_new_tokens=17, block_size=8, steps=8, stop_at_eos=False)
    _, ar = run(ar_generate(model, prompts, SamplerConfig(**c)))
    events = list(diffusion_generate(model, prompts, SamplerConfig(remasking="verify", threshold=0.9, **c)))
    assert [s.given is not None for s in events if isinstance(s, BlockStart)] == [True, True, False]
    assert events[-1].token_ids == ar.token_ids
    assert [e.committed for e in events if isinstance(e, Step) and e.block == 2] == [[[0]] * len(prompts)]


@pytest.mark.parametrize("end", [3, 8, None])
def test_eval_counts_the_context_passes_of_a_reply(model, prompts, monkeypatch, end):
    """eval's tokens per pass with both towers counted: a reply's context passes, counted from the
    events as its NFE is, are what the run made (prefill + one extend per block before its last)."""
    from twotower import evaluate
    c = dict(max_new_tokens=20, block_size=8, steps=8, repetition_penalty=1.3, no_repeat_ngram_size=3)
    prompt = prompts[2:]
    _, ar = run(ar_generate(model, prompt, SamplerConfig(stop_at_eos=False, **c)))
    if end is not None:
        ending = ar.token_ids[0][end]
        assert ending not in ar.token_ids[0][:end]
        monkeypatch.setattr(TwoTower, "eos_token_ids", property(lambda self: {ending}))
    cfg = SamplerConfig(remasking="verify", threshold=0.9, **c)
    done, counts = evaluate.run_batch(model, prompt, cfg, "diffusion")
    assert len(done.token_ids[0]) == (end if end is not None else 20)
    assert counts.context == [done.context_passes] == [{3: 1, 8: 2, None: 3}[end]]


def test_a_dropped_draft_refilled_unchecked_does_not_count_as_held():
    """At a block's last step every open position is committed unchecked: a dropped draft whose
    position gets the same token there counts as dropped only."""
    from twotower.trace import DraftTally
    first = Step(block=0, step=0, t=[1.0], tokens=[[7, MASK_ID, MASK_ID]], committed=[[0]], planned=[2],
                 confidence=[[0.9] * 3], top_ids=[[[7]] * 3], top_probs=[[[0.9]] * 3], elapsed=0.1, nfe=1,
                 drafts=[[-1, 8, 9]], rejected=[[]])
    last = Step(block=0, step=1, t=[0.0], tokens=[[7, 5, 9]], committed=[[1, 2]], planned=[0],
                confidence=[[0.9] * 3], top_ids=[[[7]] * 3], top_probs=[[[0.9]] * 3], elapsed=0.2, nfe=2,
                drafts=[[-1, -1, -1]], rejected=[[1, 2]])           # 8 failed; 9 came after it, unchecked
    tally = DraftTally(1)
    for e in (BlockStart(block=0, start=0, size=3, steps=2), first, last):
        tally.update(e)
    assert tally.held == [0] and tally.dropped == [2] and tally.step_held == [[0], [0]]
    assert tally.reached == [[1]] and tally.held_at == [[0]]     # the check reached the first draft only


def test_draft_acceptance_by_depth_counts_the_drafts_the_check_reached():
    """Three drafts, the first holds and the second fails: depth 1 reached and held, depth 2
    reached and dropped, depth 3 never checked (dropped after the failure)."""
    from twotower.trace import DraftTally
    def step(n, tokens, committed, drafts, rejected):
        return Step(block=0, step=n, t=[0.5], tokens=[tokens], committed=[committed], planned=[0],
                    confidence=[[0.9] * 5], top_ids=[[[7]] * 5], top_probs=[[[0.9]] * 5], elapsed=0.1, nfe=n + 1,
                    drafts=[drafts], rejected=[rejected])
    m = MASK_ID
    tally = DraftTally(1)
    for e in (BlockStart(block=0, start=0, size=5, steps=5),
              step(0, [7, m, m, m, m], [0], [-1, 8, 9, 4, -1], []),
              step(1, [7, 8, 5, m, m], [1, 2], [-1, -1, -1, -1, -1], [2, 3])):
        tally.update(e)
    assert tally.held == [1] and tally.dropped == [2]
    assert tally.reached == [[1, 1]] and tally.held_at == [[1, 0]]
