"""The streaming samplers on a tiny random TwoTower: the release's rules, events, stops, batching."""
from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch

from tests.tiny import MASK_ID, VOCAB, tiny_llama, tiny_twotower
from twotower import evaluate
from twotower.events import BlockCommitted, BlockStart, Done, Prefill, Step, Token
from twotower.model import TwoTower
from twotower.runner import encode_prompt, parse_ids, run
from twotower.sampler import ar_generate, diffusion_generate
from twotower.sampling import SamplerConfig

EOS = 2
PROMPT = [5, 17, 42, 8, 30, 61, 7]
SHORT = [11, 70, 23]


@pytest.fixture(scope="module")
def model():
    """Tiny TwoTower with peaked, position-dependent predictions (a wide init: scores of
    different positions are far apart, so float noise never flips an order) and a
    non-trivial time conditioning (t matters, as in a trained model)."""
    m = tiny_twotower(seed=0, initializer_range=0.3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in m.time.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m


def cfg(**kw) -> SamplerConfig:
    base = dict(block_size=4, steps=4, threshold=0.25, max_new_tokens=12, stop_at_eos=False)
    base.update(kw)
    return SamplerConfig(**base)


def events_of(gen):
    return list(gen)


def done_of(events) -> Done:
    assert isinstance(events[-1], Done)
    return events[-1]


def boost(logits, where, token, amount=60.0):
    """Add `amount` to `token`'s logit at positions where `where` (B, S) is True."""
    logits = logits.clone()
    logits[..., token] += amount * where.to(logits.dtype)
    return logits


def force_denoiser(monkeypatch, model, token, at: dict[int, int]):
    """Make the denoiser strongly favour `token` at absolute position at[row] of each row."""
    orig = model.denoise

    def denoise(x, inputs, t=None, capture=None, start=0):
        logits = orig(x, inputs, t, capture, start)                  # (B, S - start, V)
        pos = inputs["positions"][:, -logits.shape[1]:]
        target = torch.tensor([at.get(b, -1) for b in range(x.shape[0])])[:, None]
        return boost(logits, pos == target, token)
    monkeypatch.setattr(model, "denoise", denoise)


def penalised(logits, written, penalty: float):
    """The repetition penalty written out token by token. logits: (..., V)."""
    logits = logits.clone()
    for tok in set(written):
        column = logits[..., tok]
        logits[..., tok] = torch.where(column > 0, column / penalty, column * penalty)
    return logits


def ngram_banned(logits, text: list[int], n: int):
    """The n-gram ban written out: position j of `text` (None = not written) may not take a
    token that followed its n-1 written predecessors anywhere in the written text."""
    logits = logits.clone()
    for j in range(len(text) - logits.shape[0], len(text)):
        before = text[j - n + 1: j] if j >= n - 1 else None
        if not before or None in before:
            continue
        for i in range(len(text) - n + 1):
            gram = text[i: i + n]
            if None not in gram and gram[:-1] == before:
                logits[j - (len(text) - logits.shape[0]), gram[-1]] = float("-inf")
    return logits


def reference_diffusion(model, prompt, c: SamplerConfig) -> list[int]:
    """The release's sampler written out plainly: no cache reuse (fresh prefill every block),
    greedy, confidence remasking, the repetition penalty over the tokens written so far. The
    streaming sampler must produce the same tokens."""
    out = []
    while len(out) < c.max_new_tokens:
        size = min(c.block_size, c.max_new_tokens - len(out))
        ctx, _ = model.prefill([prompt + out])
        inputs = model.block_inputs(ctx, size)
        x = torch.full((1, size), MASK_ID)
        for step in range(c.steps):
            masked = (x == MASK_ID)[0]
            n = int(masked.sum())
            if n == 0:
                break
            with torch.no_grad():
                logits = model.denoise(x, inputs)[0].float()
            logits = penalised(logits, out + [tok for tok in x[0].tolist() if tok != MASK_ID], c.repetition_penalty)
            if c.no_repeat_ngram_size:
                text = out + [None if tok == MASK_ID else tok for tok in x[0].tolist()]
                logits = ngram_banned(logits, text, c.no_repeat_ngram_size)
            logits[:, MASK_ID] = float("-inf")
            probs = logits.softmax(-1)
            conf, pred = probs.max(-1)
            planned = int(((conf > c.threshold) & masked).sum())
            steps_left = c.steps - step
            k = n if steps_left == 1 else min(n, max(planned, 1, math.ceil(n / steps_left)))
            order = [j for j in conf.argsort(descending=True).tolist() if masked[j]]
            for j in order[:k]:
                x[0, j] = pred[j]
        out.extend(x[0].tolist())
    return out


# ---- the release's rules -----------------------------------------------------------------
@pytest.mark.parametrize("threshold,steps", [(0.25, 4), (0.9, 4), (0.0, 3), (0.15, 2)])
def test_diffusion_equals_plain_reference(model, threshold, steps):
    c = cfg(threshold=threshold, steps=steps, max_new_tokens=10)
    done = done_of(events_of(diffusion_generate(model, [PROMPT], c)))
    assert done.token_ids[0] == reference_diffusion(model, PROMPT, c)


@pytest.mark.parametrize("threshold,steps,guard", [
    (0.25, 4, dict(repetition_penalty=3.0)), (0.0, 3, dict(repetition_penalty=3.0)),
    (0.25, 4, dict(no_repeat_ngram_size=2)), (0.0, 2, dict(no_repeat_ngram_size=3, repetition_penalty=1.5))])
def test_repeat_guards_equal_plain_reference(model, threshold, steps, guard):
    c = cfg(threshold=threshold, steps=steps, max_new_tokens=24, **guard)
    done = done_of(events_of(diffusion_generate(model, [PROMPT], c)))
    assert done.token_ids[0] == reference_diffusion(model, PROMPT, c)
    plain = done_of(events_of(diffusion_generate(model, [PROMPT], replace(c, repetition_penalty=1.0,
                                                                          no_repeat_ngram_size=0))))
    assert done.token_ids[0] != plain.token_ids[0]          # the penalty changed something


def test_step_events_follow_the_commit_rule(model):
    c = cfg(threshold=0.2, steps=4, max_new_tokens=12)
    events = events_of(diffusion_generate(model, [PROMPT, SHORT], c))
    prev = None
    for e in events:
        if isinstance(e, BlockStart):
            prev = [[MASK_ID] * e.size for _ in range(2)]
            steps_left = e.steps
        if not isinstance(e, Step):
            continue
        for b in range(2):
            was = [j for j, tok in enumerate(prev[b]) if tok == MASK_ID]
            n = len(was)
            assert e.t[b] == pytest.approx(n / len(prev[b]))
            planned = sum(1 for j in was if e.confidence[b][j] > c.threshold)
            assert e.planned[b] == planned
            k = n if steps_left == 1 else min(n, max(planned, 1, math.ceil(n / steps_left)))
            assert len(e.committed[b]) == k, (e.block, e.step, b)
            assert set(e.committed[b]) <= set(was)
            now_masked = {j for j, tok in enumerate(e.tokens[b]) if tok == MASK_ID}
            assert now_masked == set(was) - set(e.committed[b])
            # confidence remasking: the committed ones are the most confident masked positions
            if e.committed[b] and set(was) - set(e.committed[b]):
                lowest_committed = min(e.confidence[b][j] for j in e.committed[b])
                highest_left = max(e.confidence[b][j] for j in set(was) - set(e.committed[b]))
                assert lowest_committed >= highest_left
            # carry-over: committed tokens never change
            for j, tok in enumerate(prev[b]):
                if tok != MASK_ID:
                    assert e.tokens[b][j] == tok
        prev = e.tokens
        steps_left -= 1


def test_event_sequence_fields_and_nfe(model):
    c = cfg(max_new_tokens=10, top_candidates=3)
    events = events_of(diffusion_generate(model, [PROMPT], c))
    assert isinstance(events[0], Prefill) and events[0].prompt_tokens == [len(PROMPT)]
    starts = [e for e in events if isinstance(e, BlockStart)]
    steps = [e for e in events if isinstance(e, Step)]
    commits = [e for e in events if isinstance(e, BlockCommitted)]
    done = done_of(events)
    assert [(s.block, s.start, s.size, s.steps) for s in starts] == [(0, 0, 4, 4), (1, 4, 4, 4), (2, 8, 2, 4)]
    assert [s.nfe for s in steps] == list(range(1, len(steps) + 1)) and done.nfe == len(steps)
    assert [c_.block for c_ in commits] == [0, 1, 2]
    for blk, commit in enumerate(commits):
        mine = [s for s in steps if s.block == blk]
        assert [s.step for s in mine] == list(range(len(mine)))
        assert commit.steps_used == len(mine) and commit.tokens == mine[-1].tokens
        assert mine[0].t == [1.0] and MASK_ID not in sum(commit.tokens, [])
    for s in steps:
        size = starts[s.block].size
        assert len(s.tokens[0]) == len(s.confidence[0]) == size
        assert len(s.top_ids[0]) == size and all(len(k) == 3 for k in s.top_ids[0])
        for ids, ps, conf in zip(s.top_ids[0], s.top_probs[0], s.confidence[0]):
            assert ps == sorted(ps, reverse=True) and 0 < ps[0] <= 1
            assert conf == pytest.approx(ps[0])            # greedy: p(pred) is the top probability
        for j in s.committed[0]:
            assert s.tokens[0][j] == s.top_ids[0][j][0]
        assert s.attention is None and s.elapsed >= 0
    assert done.token_ids[0] == sum((c_.tokens[0] for c_ in commits), [])
    assert done.texts == [" ".join(map(str, done.token_ids[0]))]
    assert done.stopped == "length" and done.tokens == 10
    assert 0 <= done.first_token_seconds <= done.seconds


def test_one_context_pass_per_block(model, monkeypatch):
    calls = []
    orig = model.extend
    monkeypatch.setattr(model, "extend", lambda ctx, ids, valid=None, last_only=False:
                        (calls.append(ids.tolist()), orig(ctx, ids, valid, last_only))[1])
    done = done_of(events_of(diffusion_generate(model, [PROMPT], cfg(max_new_tokens=12))))
    # the prefill, then the finished blocks except the last (nothing reads it)
    assert calls[0] == [PROMPT] and calls[1:] == [[done.token_ids[0][0:4]], [done.token_ids[0][4:8]]]


@pytest.mark.parametrize("threshold,steps,expected_nfe", [(1.0, 4, 12), (0.0, 4, 3), (0.5, 1, 3)])
def test_threshold_extremes_and_single_step(model, threshold, steps, expected_nfe):
    """gamma=1: nothing passes, the floor commits one per step; gamma=0: all at once; T=1: all."""
    done = done_of(events_of(diffusion_generate(model, [PROMPT], cfg(threshold=threshold, steps=steps))))
    assert done.nfe == expected_nfe and len(done.token_ids[0]) == 12


@pytest.mark.parametrize("n", [1, 5, 10, 17])
def test_max_new_tokens_not_a_multiple_of_the_block(model, n):
    events = events_of(diffusion_generate(model, [PROMPT], cfg(max_new_tokens=n, block_size=4)))
    sizes = [e.size for e in events if isinstance(e, BlockStart)]
    assert sum(sizes) == n and sizes[:-1] == [4] * (len(sizes) - 1)
    assert len(done_of(events).token_ids[0]) == n
    ar = done_of(events_of(ar_generate(model, [PROMPT], cfg(max_new_tokens=n))))
    assert len(ar.token_ids[0]) == n and ar.nfe == n


def test_mask_is_never_predicted(model, monkeypatch):
    orig = model.denoise
    monkeypatch.setattr(model, "denoise",
                        lambda x, inputs, t=None, capture=None, start=0: boost(
                            orig(x, inputs, t, capture, start), torch.ones_like(x[:, start:], dtype=torch.bool), MASK_ID))
    events = events_of(diffusion_generate(model, [PROMPT], cfg(threshold=0.0, max_new_tokens=8)))
    done = done_of(events)
    assert len(done.token_ids[0]) == 8 and MASK_ID not in done.token_ids[0]
    for s in (e for e in events if isinstance(e, Step)):
        assert all(MASK_ID not in cands for cands in s.top_ids[0])
        assert all(math.isfinite(c_) for c_ in s.confidence[0])


# ---- end of text --------------------------------------------------------------------------
def test_diffusion_stops_at_eos(model, monkeypatch):
    force_denoiser(monkeypatch, model, EOS, {0: len(PROMPT) + 6})     # generated index 6, block 1
    events = events_of(diffusion_generate(model, [PROMPT], cfg(stop_at_eos=True, max_new_tokens=16)))
    done = done_of(events)
    assert done.stopped == "eos" and len(done.token_ids[0]) == 6 and EOS not in done.token_ids[0]
    assert len([e for e in events if isinstance(e, BlockStart)]) == 2    # no block after the EOS block
    assert [e for e in events if isinstance(e, BlockCommitted)][-1].tokens[0][2] == EOS


def test_diffusion_eos_in_one_row_of_a_batch(model, monkeypatch):
    force_denoiser(monkeypatch, model, EOS, {1: len(SHORT) + 1})
    done = done_of(events_of(diffusion_generate(model, [PROMPT, SHORT], cfg(stop_at_eos=True, max_new_tokens=8))))
    assert len(done.token_ids[1]) == 1 and len(done.token_ids[0]) == 8
    assert done.stopped == "length"


def test_a_row_is_done_with_its_block_at_end_of_text(model, monkeypatch):
    """End-of-text after a filled prefix: the rest of the block would be cut, so no pass fills it."""
    force_denoiser(monkeypatch, model, EOS, {0: len(PROMPT) + 4})     # block 1, its first position
    c = cfg(stop_at_eos=True, remasking="leftmost", threshold=1.0, max_new_tokens=16)
    events = events_of(diffusion_generate(model, [PROMPT], c))
    last = [e for e in events if isinstance(e, Step) and e.block == 1]
    assert [e.committed for e in last] == [[[0]]] and last[0].active == [True]
    assert [e for e in events if isinstance(e, BlockCommitted)][-1].tokens[0][1:] == [MASK_ID] * 3
    done = done_of(events)
    assert done.nfe == 5 and len(done.token_ids[0]) == 4 and done.stopped == "eos"
    assert done_of(events_of(diffusion_generate(model, [PROMPT], replace(c, stop_at_eos=False)))).nfe == 16


def test_a_settled_row_rides_along_in_its_batch(model, monkeypatch):
    force_denoiser(monkeypatch, model, EOS, {1: len(SHORT) + 1})       # row 1: end-of-text at position 1
    c = cfg(stop_at_eos=True, remasking="leftmost", threshold=1.0, max_new_tokens=8)
    events = events_of(diffusion_generate(model, [PROMPT, SHORT], c))
    first = [e for e in events if isinstance(e, Step) and e.block == 0]
    assert [e.active for e in first] == [[True, True], [True, True], [True, False], [True, False]]
    assert [e.committed[1] for e in first] == [[0], [1], [], []]
    done = done_of(events)
    assert len(done.token_ids[1]) == 1 and len(done.token_ids[0]) == 8
    force_denoiser(monkeypatch, model, EOS, {0: len(SHORT) + 1})       # the same row, alone
    assert done.token_ids[1] == done_of(events_of(diffusion_generate(model, [SHORT], c))).token_ids[0]
    counter = evaluate.RowNFE(2, model.eos_token_ids, True)
    for e in events:
        counter.update(e)
    assert counter.nfe == [8, 2]                                        # as if each were decoded alone
    assert counter.context == [2, 1]         # row 0: prefill + the extend before block 1; row 1 ended in block 0


def test_diffusion_keeps_going_without_stop(model, monkeypatch):
    force_denoiser(monkeypatch, model, EOS, {0: len(PROMPT) + 2})
    done = done_of(events_of(diffusion_generate(model, [PROMPT], cfg(stop_at_eos=False, max_new_tokens=8))))
    assert len(done.token_ids[0]) == 8 and done.token_ids[0][2] == EOS and done.stopped == "length"


def force_context(monkeypatch, model, token, at_position):
    """Make the context tower's logit at `at_position - 1` favour `token` (so AR emits it there)."""
    orig = model.family.context_forward

    def context_forward(ids, ctx, valid_new, keep=0):
        logits = orig(ids, ctx, valid_new, keep)                        # (B, keep or n, V)
        pos = (ctx.lengths[:, None] + torch.arange(ids.shape[1]))[:, -logits.shape[1]:]
        return boost(logits, pos == at_position - 1, token)
    monkeypatch.setattr(model.family, "context_forward", context_forward)


def test_ar_stops_at_eos(model, monkeypatch):
    force_context(monkeypatch, model, EOS, len(PROMPT) + 3)
    events = events_of(ar_generate(model, [PROMPT], cfg(stop_at_eos=True, max_new_tokens=20)))
    done = done_of(events)
    tokens = [e for e in events if isinstance(e, Token)]
    assert done.stopped == "eos" and len(done.token_ids[0]) == 3 and done.nfe == 4
    assert tokens[-1].tokens == [EOS] and tokens[-1].index == 3


# ---- batching, determinism ----------------------------------------------------------------
@pytest.mark.parametrize("remasking,penalty", [("confidence", 1.0), ("margin", 1.0), ("entropy", 1.0),
                                               ("leftmost", 1.0), ("leftmost", 3.0)])
def test_batch_equals_each_prompt_alone(model, remasking, penalty):
    guard = dict(repetition_penalty=penalty, no_repeat_ngram_size=3) if penalty != 1.0 else {}
    c = cfg(max_new_tokens=10, remasking=remasking, **guard)
    batch = done_of(events_of(diffusion_generate(model, [PROMPT, SHORT], c)))
    for b, p in enumerate([PROMPT, SHORT]):
        alone = done_of(events_of(diffusion_generate(model, [p], c)))
        assert batch.token_ids[b] == alone.token_ids[0], (remasking, b)
    ar_batch = done_of(events_of(ar_generate(model, [PROMPT, SHORT], c)))
    for b, p in enumerate([PROMPT, SHORT]):
        assert ar_batch.token_ids[b] == done_of(events_of(ar_generate(model, [p], c))).token_ids[0]


def test_leftmost_with_nothing_over_gamma_decodes_left_to_right(model):
    events = events_of(diffusion_generate(model, [PROMPT], cfg(remasking="leftmost", threshold=1.0, max_new_tokens=8)))
    order = [tuple(e.committed[0]) for e in events if isinstance(e, Step)]
    assert order == [(0,), (1,), (2,), (3,)] * 2          # two blocks of 4, each filled left to right


def test_strategies_give_different_orders(model):
    orders = {}
    for r in ("confidence", "margin", "entropy", "random"):
        events = events_of(diffusion_generate(model, [PROMPT], cfg(remasking=r, threshold=1.0, max_new_tokens=8)))
        orders[r] = tuple(tuple(e.committed[0]) for e in events if isinstance(e, Step))
    assert len(set(orders.values())) >= 2
    for r, order in orders.items():       # with gamma=1 every step commits exactly one position
        assert all(len(o) == 1 for o in order), r


def test_same_seed_same_tokens_different_seed_different(model):
    c = cfg(temperature=1.0, remasking="random", max_new_tokens=16)
    a = done_of(events_of(diffusion_generate(model, [PROMPT], c)))
    b = done_of(events_of(diffusion_generate(model, [PROMPT], c)))
    other = done_of(events_of(diffusion_generate(model, [PROMPT], cfg(temperature=1.0, remasking="random",
                                                                     max_new_tokens=16, seed=1))))
    assert a.token_ids == b.token_ids and a.token_ids != other.token_ids
    ar_a = done_of(events_of(ar_generate(model, [PROMPT], c)))
    ar_b = done_of(events_of(ar_generate(model, [PROMPT], c)))
    ar_other = done_of(events_of(ar_generate(model, [PROMPT], cfg(temperature=1.0, max_new_tokens=16, seed=1))))
    assert ar_a.token_ids == ar_b.token_ids and ar_a.token_ids != ar_other.token_ids


def test_greedy_ignores_the_seed(model):
    a = done_of(events_of(diffusion_generate(model, [PROMPT], cfg(seed=0))))
    b = done_of(events_of(diffusion_generate(model, [PROMPT], cfg(seed=123))))
    assert a.token_ids == b.token_ids


# ---- AR baseline ----------------------------------------------------------------------------
@pytest.mark.parametrize("penalty,n", [(1.0, 0), (3.0, 0), (1.0, 2)])
def test_ar_greedy_equals_uncached_argmax_loop(model, penalty, n):
    ids = list(PROMPT)
    with torch.no_grad():
        for _ in range(9):
            logits = model.context_lm(input_ids=torch.tensor([ids])).logits[0, -1]
            logits = penalised(logits, ids[len(PROMPT):], penalty)
            if n:
                logits = ngram_banned(logits[None], ids[len(PROMPT):] + [None], n)[0]
            ids.append(int(logits.argmax()))
    if (penalty, n) != (1.0, 0):                             # the guard changed something
        assert ids[len(PROMPT):] != done_of(events_of(ar_generate(model, [PROMPT], cfg(max_new_tokens=9)))).token_ids[0]
    events = events_of(ar_generate(model, [PROMPT], cfg(max_new_tokens=9, top_candidates=4,
                                                         repetition_penalty=penalty, no_repeat_ngram_size=n)))
    done = done_of(events)
    assert done.token_ids[0] == ids[len(PROMPT):]
    tokens = [e for e in events if isinstance(e, Token)]
    assert isinstance(events[0], Prefill)
    assert [t.index for t in tokens] == list(range(9)) and [t.nfe for t in tokens] == list(range(1, 10))
    assert done.nfe == 9 and done.stopped == "length"
    for t in tokens:
        assert t.top_ids[0][0] == t.tokens[0] and len(t.top_ids[0]) == 4
        assert t.confidence[0] == pytest.approx(t.top_probs[0][0])
    assert not any(isinstance(e, (Step, BlockStart)) for e in events)


# ---- attention capture ----------------------------------------------------------------------
def test_attention_capture_in_steps(model):
    events = events_of(diffusion_generate(model, [PROMPT], cfg(max_new_tokens=8), capture_layers=(1,)))
    steps = [e for e in events if isinstance(e, Step)]
    for s in steps:
        assert set(s.attention) == {1}
        probs = torch.tensor(s.attention[1])                    # (B, heads, S, L + S)
        assert probs.shape == (1, 4, 4, len(PROMPT) + 4 * s.block + 4)
        assert torch.allclose(probs.sum(-1), torch.ones(1, 4, 4), atol=1e-5)


def test_anchored_model_runs(model):
    ctx_lm = tiny_llama(seed=3)
    m = TwoTower(ctx_lm, copy.deepcopy(ctx_lm), mask_token_id=MASK_ID, anchor=True).eval()
    events = events_of(diffusion_generate(m, [PROMPT, SHORT], cfg(max_new_tokens=6), capture_layers=(0,)))
    done = done_of(events)
    assert [len(r) for r in done.token_ids] == [6, 6] and MASK_ID not in sum(done.token_ids, [])
    alone = done_of(events_of(diffusion_generate(m, [SHORT], cfg(max_new_tokens=6))))
    assert alone.token_ids[0] == done.token_ids[1]


# ---- refusals ---------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", [diffusion_generate, ar_generate])
@pytest.mark.parametrize("prompts,settings,message", [
    ([[]], {}, "the prompt is empty"),
    ([PROMPT, []], {}, "the prompt is empty"),
    ([], {}, "no prompt given"),
    ([list(range(4, 90)) * 3], {}, "exceeds the model's context of 256 tokens"),
    ([PROMPT], dict(max_new_tokens=250), "exceeds the model's context of 256 tokens"),
    ([PROMPT], dict(block_size=0), "block_size must be a positive integer"),
    ([PROMPT], dict(block_size=257), "block_size 257 is larger than the model's context (256)"),
    ([PROMPT], dict(threshold=1.01), "threshold must lie in [0, 1]"),
    ([PROMPT], dict(threshold=-1.0), "threshold must lie in [0, 1]"),
    ([PROMPT], dict(temperature=-1.0), "temperature must be >= 0"),
    ([PROMPT], dict(remasking="low"), "remasking must be one of"),
    ([PROMPT], dict(repetition_penalty=0.5), "repetition_penalty must lie in [1, 10]"),
    ([PROMPT], dict(no_repeat_ngram_size=1), "no_repeat_ngram_size must be 0 (off) or an integer from 2 to"),
    ([PROMPT + [VOCAB]], {}, f"prompt token id {VOCAB} is outside the vocabulary (0..{VOCAB - 1})"),
    ([[5, -1]], {}, "prompt token id -1 is outside the vocabulary"),
])
def test_bad_input_is_refused_before_any_work(model, sampler, prompts, settings, message):
    with pytest.raises(ValueError) as e:
        next(iter(sampler(model, prompts, cfg(**settings))))
    assert message in str(e.value)


# ---- runner ---------------------------------------------------------------------------------
def test_run_fills_a_trace(model):
    trace, events = run(model, [PROMPT], cfg(max_new_tokens=6), "diffusion", ["p"])
    assert trace.events == []                                   # nothing runs before iteration
    seen = list(events)
    assert trace.events == seen and trace.mode == "diffusion" and trace.prompt_ids == [PROMPT]
    assert trace.settings["block_size"] == 4 and trace.model["mask_token_id"] == MASK_ID
    assert trace.model["eos_token_ids"] == [EOS]
    ids = set(PROMPT) | {MASK_ID} | set(trace.done.token_ids[0])
    assert ids <= {int(k) for k in trace.tokens} and trace.tokens[str(MASK_ID)] == f"<{MASK_ID}>"
    stats = trace.stats()
    assert stats["tokens"] == 6 and stats["nfe"] == len(trace.steps())
    assert stats["tokens_per_nfe"] == pytest.approx(6 / stats["nfe"])
    ar_trace, ar_events = run(model, [PROMPT], cfg(max_new_tokens=5), "ar")
    list(ar_events)
    assert ar_trace.stats()["nfe"] == 5 and len(ar_trace.ar_tokens()) == 5 and ar_trace.prompts == [""]


def test_run_refuses_unknown_mode(model):
    with pytest.raises(ValueError, match="mode must be 'diffusion' or 'ar', got 'gibbs'"):
        run(model, [PROMPT], cfg(), "gibbs")


def test_encode_prompt_and_parse_ids(model, tiny_tokenizer):
    with pytest.raises(ValueError, match="ships no tokenizer"):
        encode_prompt(model, "hello")
    with_tok = copy.copy(model)
    with_tok.tokenizer = tiny_tokenizer
    assert encode_prompt(with_tok, "Hello world") == tiny_tokenizer.encode("Hello world", add_special_tokens=False)
    with pytest.raises(ValueError, match="the prompt is empty"):
        encode_prompt(with_tok, "   ")
    with pytest.raises(ValueError, match="the limit is 20000"):
        encode_prompt(with_tok, "x" * 20001)
    assert parse_ids("5, 17,42") == [5, 17, 42] and parse_ids("5,17,") == [5, 17]
    for bad in ("5,a", "-3", "1,,2", "1.5", "²"):
        with pytest.raises(ValueError, match="comma-separated non-negative integers"):
            parse_ids(bad)
    with pytest.raises(ValueError, match="the prompt is empty"):
        parse_ids(",")


def test_token_pieces_keep_leading_spaces(model, tiny_tokenizer):
    from twotower.runner import piece
    fox = tiny_tokenizer.convert_tokens_to_ids("Ġfox")
    assert piece(tiny_tokenizer, fox) == " fox"
    assert piece(tiny_tokenizer, tiny_tokenizer.mask_token_id) == "<mask>"
    assert piece(None, 42) == "<42>"
    with_tok = tiny_twotower(seed=0, vocab_size=len(tiny_tokenizer))
    with_tok.tokenizer = tiny_tokenizer
    trace, events = run(with_tok, [[fox, 5]], cfg(max_new_tokens=4), "ar")
    list(events)
    assert trace.tokens[str(fox)] == " fox"
    assert all(trace.tokens[str(i)] == piece(tiny_tokenizer, i) for i in trace.done.token_ids[0])
