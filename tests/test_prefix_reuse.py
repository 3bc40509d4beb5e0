"""Passes that skip a block's committed prefix (twotower.prefix_reuse) change nothing but speed.

A clean_as_ar denoiser reads the committed prefix causally, so a pass may start after it,
reusing the keys/values earlier passes left in the block's view and the logits they gave.
Every Step event must equal the one a full pass gives.
"""
from __future__ import annotations

import pytest
import torch

from tests.test_llama_family import clean_as_ar_model
from tests.tiny import MASK_ID, VOCAB, tiny_twotower
from twotower.events import Step
from twotower.prefix_reuse import MIN_INPUTS, PrefixReuse
from twotower.sampler import diffusion_generate
from twotower.sampling import SamplerConfig

ATOL = 1e-5


@pytest.fixture(scope="module")
def model():
    return clean_as_ar_model()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(4)
    return [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in (6, 11, 3)]


def steps_of(model, prompts, cfg, monkeypatch, reuse: bool) -> tuple[list[Step], list[int]]:
    """The run's Step events, and the first input of each denoiser pass."""
    starts, real = [], model.denoise

    def denoise(x, inputs, t=None, capture=None, start=0):
        starts.append(start)
        return real(x, inputs, t, capture, start)

    with monkeypatch.context() as m:
        m.setattr(model, "denoise", denoise)
        if not reuse:
            m.setattr(model, "can_reuse_prefix", lambda *a, **k: False)
        events = list(diffusion_generate(model, prompts, cfg))
    return [e for e in events if isinstance(e, Step)], starts


@pytest.mark.parametrize("order,temperature", [("verify", 0.0), ("verify", 1.0), ("prefix", 0.0),
                                               ("leftmost", 0.0), ("confidence", 0.0)])
def test_passes_from_the_committed_prefix_give_the_same_steps(model, prompts, monkeypatch, order, temperature):
    verify = order == "verify"                                      # others: 3 commits a pass, read as [MASK]
    cfg = SamplerConfig(remasking=order, temperature=temperature, threshold=0.0 if verify else 0.3,
                        max_new_tokens=24, block_size=12, steps=12 if verify else 4, stop_at_eos=True, seed=7)
    fast, starts = steps_of(model, prompts, cfg, monkeypatch, reuse=True)
    full, full_starts = steps_of(model, prompts, cfg, monkeypatch, reuse=False)
    assert set(full_starts) == {0}
    if order in ("verify", "prefix", "leftmost"):                  # orders that grow a committed prefix
        assert max(starts) > 0
    assert len(fast) == len(full)
    for a, b in zip(fast, full):
        assert (a.tokens, a.committed, a.drafts, a.rejected, a.top_ids) == (b.tokens, b.committed, b.drafts,
                                                                            b.rejected, b.top_ids)
        assert torch.allclose(torch.tensor(a.top_probs), torch.tensor(b.top_probs), atol=ATOL)
        assert torch.allclose(torch.tensor(a.confidence), torch.tensor(b.confidence), atol=ATOL)
    if order == "verify" and temperature > 0:                       # kept drafts' K/V were reused too
        kept = [j for a, b in zip(fast, fast[1:]) if a.block == b.block
                for r, row in enumerate(a.drafts) for j, d in enumerate(row)
                if d >= 0 and j in b.committed[r] and b.tokens[r][j] == d]
        assert kept


def committed_block(model, prompt, size, written):
    ctx, _ = model.prefill([prompt])
    inputs = model.block_inputs(ctx, size)
    g = torch.Generator().manual_seed(9)
    x = torch.full((1, size), MASK_ID)
    x[0, :written] = torch.randint(4, VOCAB, (written,), generator=g)
    return inputs, x


def test_a_pass_from_start_reuses_the_view_and_matches_the_full_pass(model, prompts):
    inputs, x = committed_block(model, prompts[1], 8, written=5)
    full = model.denoise(x, inputs)                                 # fills the view's block slots
    part = model.denoise(x, inputs, start=4)
    assert part.shape == (1, 4, VOCAB)
    assert torch.allclose(part, full[:, 4:], atol=ATOL)
    other = x.clone()
    other[0, :3] = (x[0, :3] + 1 - 4) % (VOCAB - 4) + 4             # a different prefix, same masks
    model.denoise(other, inputs)                                    # the view now holds ITS prefix
    stale = model.denoise(x, inputs, start=4)
    assert not torch.allclose(stale, full[:, 4:], atol=1e-3)        # so the view is what a pass reads


def test_only_a_clean_as_ar_denoiser_without_capture_skips_its_prefix(model, prompts):
    plain = tiny_twotower()
    ctx, _ = plain.prefill([prompts[0]])
    with pytest.raises(ValueError, match="committed prefix"):
        plain.denoise(torch.full((1, 4), MASK_ID), plain.block_inputs(ctx, 4), start=1)
    from twotower.attention import AttentionCapture
    inputs, x = committed_block(model, prompts[0], 8, written=3)
    with pytest.raises(ValueError, match="committed prefix"):
        model.denoise(x, inputs, capture=AttentionCapture([0]), start=1)


def test_the_first_input_to_compute():
    M = MASK_ID
    reuse = PrefixReuse(True, [[M] * 8], M)
    assert reuse.start() == 0                                       # nothing computed yet
    reuse.record(0, [[10, 11, M, M, M, M, M, M]], None)            # the pass read all masks
    assert reuse.start() == 1                                       # the anchor stays; 10, 11 were read as [MASK]
    reuse.record(1, [[10, 11, 12, M, M, M, M, M]], None)           # read 10, 11 as they are now
    assert reuse.start() == 3                                       # inputs 0..2 valid; 12 not yet read
    reuse.record(3, [[10, 11, 12, 13, 14, M, M, M]], [[-1] * 5 + [20, 21, -1]])
    assert reuse.start() == 4                                       # the drafts are read, not kept yet
    reuse.record(4, [[10, 11, 12, 13, 14, 20, 22, M]], None)       # 20 held, 21 replaced by 22
    assert reuse.start() == min(7, 8 + 1 - MIN_INPUTS)              # input 6 read 20; 22 was read as 21
    settled = PrefixReuse(True, [[M] * 8, [M] * 8], M)
    settled.record(0, [[10, M, M, M, M, M, M, M], [M] * 8], None)
    settled.record(0, [[10, 11, M, M, M, M, M, M], [M] * 8], None)
    assert settled.start() == 2                                     # row 1 read the same: keeps all
    assert PrefixReuse(False, [[10, 11, M, M]], M).start() == 0
