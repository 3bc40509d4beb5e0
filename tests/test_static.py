"""Static caches and torch.compile: the fast paths give the dynamic path's tokens, shapes stay fixed."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import needs_cxx
from tests.tiny import MASK_ID, tiny_llama
from twotower.events import Done
from twotower.model import TwoTower
from twotower.sampler import ar_generate, diffusion_generate
from twotower.sampling import SamplerConfig

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]          # rows of different length: left padding


def two_towers(anchor: bool, learned_mask: bool = False) -> TwoTower:
    """A denoiser unlike its context tower, so that any mix-up of caches changes the tokens."""
    return TwoTower(tiny_llama(0), tiny_llama(1), MASK_ID, anchor=anchor, learned_mask=learned_mask).eval()


def tokens(events) -> tuple[list[list[int]], int]:
    done = next(e for e in events if isinstance(e, Done))
    return done.token_ids, done.nfe


def both_modes(model, prompts, cfg):
    return tokens(diffusion_generate(model, prompts, cfg)), tokens(ar_generate(model, prompts, cfg))


@pytest.mark.parametrize("anchor", [False, True])
@pytest.mark.parametrize("prompts", [PROMPTS, [[4, 5, 6]]])
def test_static_cache_gives_the_dynamic_tokens(anchor, prompts):
    model = two_towers(anchor, learned_mask=True)
    cfg = SamplerConfig(max_new_tokens=40, block_size=8, steps=8, threshold=0.5, stop_at_eos=False)
    dynamic = both_modes(model, prompts, cfg)
    assert dynamic[0][1] > 40 // 8                                      # several steps per block ran
    assert both_modes(model.use_static(), prompts, cfg) == dynamic


def test_static_run_that_fills_the_cache_exactly():
    model = two_towers(anchor=True)
    prompt = [[7] * 40]
    cfg = SamplerConfig(max_new_tokens=256 - 40, block_size=8, steps=2, stop_at_eos=False)
    assert model.cache_capacity(40 + cfg.max_new_tokens) == 256
    dynamic = both_modes(model, prompt, cfg)
    (diff, _), (ar, _) = static = both_modes(model.use_static(), prompt, cfg)
    assert len(diff[0]) == len(ar[0]) == 216 and static == dynamic


def test_static_state_has_fixed_shapes():
    model = two_towers(anchor=True).use_static()
    ctx, _ = model.prefill(PROMPTS, room=20)
    assert ctx.capacity == 256
    first = model.block_inputs(ctx, 8)
    ctx, _ = model.extend(ctx, torch.full((2, 8), 9))
    later = model.block_inputs(ctx, 8)
    assert first["mask"].shape == later["mask"].shape == (2, 1, 9, 256 + 9)
    # the anchored block re-reads the last clean token: its cache slot is hidden, later slots too
    seen = later["mask"][0, 0, 0, :256]
    assert seen[:14].all() and not seen[14:].any()               # 7 + 8 clean tokens, the last hidden


def test_the_growing_cache_stays_the_default():
    model = two_towers(anchor=False).use_static()
    ctx, _ = model.prefill(PROMPTS)                                # no room given: the teacher's use
    assert ctx.capacity is None


@needs_cxx
def test_nemotron_h_static_and_compiled_give_the_dynamic_tokens():
    """The release's architecture (Mamba-2 / attention / MoE) on static caches, then compiled:
    the dynamic path's tokens in both modes (padded rows, trained-like random denoiser)."""
    from tests.test_nemotron_h import PROMPTS as NH_PROMPTS, tiny_twotower as tiny_nemotron
    model = tiny_nemotron(trained=True)
    cfg = SamplerConfig(max_new_tokens=24, block_size=8, steps=8, threshold=0.5, stop_at_eos=False)
    dynamic = both_modes(model, NH_PROMPTS, cfg)
    assert both_modes(model.use_static(), NH_PROMPTS, cfg) == dynamic
    assert both_modes(model.compile(), NH_PROMPTS, cfg) == dynamic


@needs_cxx
def test_compiled_model_matches_eager_without_recompiling():
    """inductor on the CPU: the same tokens as eager; then other prompts of other lengths (same
    cache capacity) and another seed reuse the graphs: a recompile would raise."""
    model = two_towers(anchor=True, learned_mask=True)
    cfg = SamplerConfig(max_new_tokens=24, block_size=8, steps=8, threshold=0.5, stop_at_eos=False)
    eager = both_modes(model, PROMPTS, cfg)
    model.compile()
    assert model.compiled and model.static_cache
    assert model.info()["compiled"] == {"backend": "inductor", "dynamic": False} and model.info()["static_cache"]
    assert both_modes(model, PROMPTS, cfg) == eager
    other = [[20, 21, 22, 23], [30, 31, 32, 33, 34, 35, 36, 37, 38]]
    expected = both_modes(two_towers(anchor=True, learned_mask=True), other, cfg)
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert both_modes(model, other, cfg) == expected


def nemotron_h():
    from tests.test_nemotron_h import tiny_twotower as tiny_nemotron
    return tiny_nemotron(trained=True)


@pytest.mark.parametrize("build", [lambda: two_towers(False), lambda: two_towers(True), nemotron_h],
                         ids=["llama", "llama-anchored", "nemotron-h"])
def test_captured_attention_on_a_static_cache_matches_the_dynamic_path(build):
    """The app's cross-attention view: probabilities over [context | block], whatever the cache."""
    model = build()
    layers = tuple(model.family.attention_layers)
    cfg = SamplerConfig(max_new_tokens=16, block_size=8, steps=4, threshold=0.5, stop_at_eos=False)

    def attention(m):
        steps = [e for e in diffusion_generate(m, PROMPTS, cfg, capture_layers=layers) if hasattr(e, "attention")]
        return [e.attention for e in steps]

    dynamic = attention(model)
    static = attention(model.use_static())
    assert len(static) == len(dynamic) > 2
    for a, b in zip(dynamic, static):
        assert a and a.keys() == b.keys()
        for layer in a:
            torch.testing.assert_close(torch.tensor(b[layer]), torch.tensor(a[layer]), atol=1e-6, rtol=1e-5)


@needs_cxx
def test_shared_backbone_adapter_static_and_compiled(ar_dir, tmp_path):
    """share_base: one backbone whose LoRA adapter is switched off for the context tower; the
    compiled passes must keep the two apart (the merged copy's tokens)."""
    from tests.tiny import LORA, random_lora
    from twotower.checkpoints import build, load, load_ar, save
    model = build(*load_ar(ar_dir, "cpu", torch.float32), MASK_ID, learned_mask=True, name="s", anchor=True).eval()
    adapter = random_lora(model.denoiser_lm, seed=0, std=0.3)
    out = save(model, tmp_path / "ck", context=str(ar_dir), lora_model=adapter, lora=LORA, dtype=torch.float32)
    cfg = SamplerConfig(max_new_tokens=24, block_size=8, steps=8, threshold=0.5, stop_at_eos=False)
    merged = both_modes(load(str(out), device="cpu", dtype=torch.float32), PROMPTS, cfg)
    shared = load(str(out), device="cpu", dtype=torch.float32, share_base=True)
    assert shared.shares_base
    assert both_modes(shared.use_static(), PROMPTS, cfg) == merged
    assert both_modes(shared.compile(), PROMPTS, cfg) == merged


@needs_cxx
def test_clean_as_ar_static_and_compiled_without_recompiling():
    """clean_as_ar: the block mask and the adapter's per-token gate change every pass; the
    static and compiled paths must give the dynamic tokens and reuse their graphs."""
    from tests.tiny import random_lora
    model = TwoTower(tiny_llama(0), tiny_llama(1), MASK_ID, anchor=True, learned_mask=True, clean_as_ar=True)
    random_lora(model.denoiser_lm, seed=0, std=0.3)
    model.gate_adapter().eval()
    cfg = SamplerConfig(max_new_tokens=24, block_size=8, steps=8, threshold=0.5, stop_at_eos=False)
    dynamic = both_modes(model, PROMPTS, cfg)
    other = [[20, 21, 22, 23], [30, 31, 32, 33, 34, 35, 36, 37, 38]]
    expected = both_modes(model, other, cfg)
    assert both_modes(model.use_static(), PROMPTS, cfg) == dynamic
    assert both_modes(model.compile(), PROMPTS, cfg) == dynamic
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert both_modes(model, other, cfg) == expected


@needs_cxx
def test_draft_trees_compiled_without_recompiling():
    """Draft trees on a static cache run nodes + 1 rows per prompt every pass, so the compiled
    denoiser keeps one shape: the AR text, the eager tokens, and no recompile for other prompts."""
    from tests.tiny import random_lora
    model = TwoTower(tiny_llama(0), tiny_llama(1), MASK_ID, anchor=True, learned_mask=True, clean_as_ar=True)
    random_lora(model.denoiser_lm, seed=0, std=0.3)
    model.gate_adapter().eval()
    cfg = SamplerConfig(max_new_tokens=24, block_size=8, steps=8, remasking="verify", threshold=0.0,
                        draft_nodes=3, stop_at_eos=False)
    other = [[20, 21, 22, 23], [30, 31, 32, 33, 34, 35, 36, 37, 38]]
    dynamic, expected = tokens(diffusion_generate(model, PROMPTS, cfg)), tokens(diffusion_generate(model, other, cfg))
    assert dynamic[0] == tokens(ar_generate(model, PROMPTS, cfg))[0]
    assert tokens(diffusion_generate(model.compile(), PROMPTS, cfg)) == dynamic
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert tokens(diffusion_generate(model, other, cfg)) == expected
