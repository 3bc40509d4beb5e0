"""Nemotron-H backbone (Mamba-2 / attention / MoE / MLP) and the release layout, on CPU.

A tiny random NemotronH with the pattern "M*EM-" (Mamba, attention, MoE, Mamba, MLP).
Weights are spread so logits are O(1) and a wrong seed, mask or key mapping shows.
"""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from transformers import DynamicCache, NemotronHConfig, NemotronHForCausalLM

from twotower import checkpoints, release
from twotower.backbones.nemotron_h import NemotronHFamily, boundary_states, seeded_mamba
from twotower.context import ContextState
from twotower.model import TwoTower
from twotower.sampler import ar_generate, diffusion_generate
from twotower.sampling import SamplerConfig

VOCAB, MASK_ID, S = 96, 3, 8
NATIVE_LIMIT, RELEASE_LIMIT = "native", "release"


def tiny_config(**overrides) -> NemotronHConfig:
    cfg = dict(vocab_size=VOCAB, hidden_size=32, hybrid_override_pattern="M*EM-",
               num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48,
               mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=8, n_groups=2, conv_kernel=4,
               chunk_size=8, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
               moe_shared_expert_intermediate_size=24, routed_scaling_factor=1.5,
               eos_token_id=2, bos_token_id=1, pad_token_id=0, max_position_embeddings=256,
               use_mamba_kernels=False)
    cfg.update(overrides)
    return NemotronHConfig(**cfg)


@torch.no_grad()
def spread(lm, seed: int, scale: float = 1.0):
    """Weights of unit-ish gain, random norms, router and expert biases (A_log, D, dt_bias kept)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in lm.named_parameters():
        if name.endswith(("A_log", "dt_bias", ".D")):
            continue
        noise = torch.randn(p.shape, generator=g)
        if p.dim() == 1:
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.2 * noise)   # norms ~1, biases ~0
        elif "embeddings" in name:
            p.copy_(noise)
        else:
            p.copy_(noise * scale / math.sqrt(p.shape[-1]))
    for name, b in lm.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return lm


def set_limit(lm, limit: str):
    for layer in lm.model.layers:
        if hasattr(layer.mixer, "time_step_limit"):
            layer.mixer.time_step_limit = ((0.0, float("inf")) if limit == RELEASE_LIMIT
                                           else (lm.config.time_step_min, float("inf")))
    return lm


def tiny_lm(seed: int = 0, limit: str = RELEASE_LIMIT) -> NemotronHForCausalLM:
    torch.manual_seed(seed)
    return set_limit(spread(NemotronHForCausalLM(tiny_config()).eval(), seed), limit)


def tiny_twotower(seed: int = 0, limit: str = RELEASE_LIMIT, trained: bool = False) -> TwoTower:
    """Denoiser = copy of the context tower, time conditioning at identity (unless trained)."""
    ctx = tiny_lm(seed, limit)
    model = TwoTower(ctx, copy.deepcopy(ctx), mask_token_id=MASK_ID).eval()
    if trained:   # a denoiser that differs from its context tower, time conditioning not identity
        spread(model.denoiser_lm, seed + 100, scale=0.8)
        g = torch.Generator().manual_seed(seed + 7)
        with torch.no_grad():
            for p in model.time.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def ids(seed: int, *shape) -> torch.Tensor:
    return torch.randint(4, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


PROMPTS = [ids(1, 11).tolist(), ids(2, 5).tolist()]   # different lengths: left padding


def ar_logits(lm, row: list[int]) -> torch.Tensor:
    return lm(input_ids=torch.tensor([row])).logits[0]


def assert_close(a, b, tol=1e-5):
    err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    assert err <= tol * max(1.0, scale), f"max error {err:.3g} (scale {scale:.3g})"


# ---- (a) causal block + identity conditioning = the AR model ---------------------------
@pytest.mark.parametrize("limit", [RELEASE_LIMIT, NATIVE_LIMIT])
@torch.no_grad()
def test_causal_denoiser_reproduces_ar_logits(limit):
    model = tiny_twotower(limit=limit)
    assert isinstance(model.family, NemotronHFamily)
    assert model.family.num_tables == 5 and model.family.attention_layers == [1]
    block = ids(3, 2, S)
    ctx, _ = model.prefill(PROMPTS)
    before = {i: (c.clone(), s.clone()) for i, (c, s) in model.family.context_mamba(ctx.cache).items()}
    inputs = model.block_inputs(ctx, S, causal=True)
    logits = model.denoise(block, inputs)
    again = model.denoise(block, inputs)                       # a block is re-denoised: same inputs
    assert torch.equal(logits, again)
    for i, (c, s) in model.family.context_mamba(ctx.cache).items():   # the seeds were only read
        assert torch.equal(c, before[i][0]) and torch.equal(s, before[i][1])
    for b, prompt in enumerate(PROMPTS):
        ref = ar_logits(model.context_lm, prompt + block[b].tolist())[-S:]
        assert_close(logits[b], ref)
    # and non-causal it is a different function (the block sees its future)
    assert not torch.allclose(model.denoise(block, model.block_inputs(ctx, S)), logits, atol=1e-3)


# ---- (b) the seeded block scan = token-by-token Mamba decoding -------------------------
@torch.no_grad()
def test_seeded_scan_equals_token_by_token_decoding():
    lm = tiny_lm(limit=RELEASE_LIMIT)       # decoding never clamps dt: compare without a clamp
    cache = DynamicCache(config=lm.config)
    lm(input_ids=ids(4, 2, 9), past_key_values=cache, use_cache=True)
    u = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(5))
    for i in (0, 3):
        mixer = lm.model.layers[i].mixer
        conv, ssm = cache.layers[i].conv_states[0], cache.layers[i].recurrent_states[0]
        conv0, ssm0 = conv.clone(), ssm.clone()
        ours = seeded_mamba(mixer, u, conv, ssm)
        assert torch.equal(conv, conv0) and torch.equal(ssm, ssm0)        # the cache is untouched
        step_cache = copy.deepcopy(cache)
        ref = torch.cat([mixer(u[:, t:t + 1], cache_params=step_cache) for t in range(u.shape[1])], 1)
        assert_close(ours, ref)
        # transformers' multi-token continuation (chunked scan from the cached state), with
        # its own dt clamp, agrees as well
        set_limit(lm, NATIVE_LIMIT)
        chunk_cache = copy.deepcopy(cache)
        assert_close(seeded_mamba(mixer, u, conv, ssm), mixer(u, cache_params=chunk_cache))
        set_limit(lm, RELEASE_LIMIT)


@torch.no_grad()
def test_boundary_states_equal_the_cache_after_each_prefix():
    lm = tiny_lm()
    seq = ids(6, 2, 3 * S + 3)
    grabbed = {}
    hook = lm.model.layers[3].mixer.register_forward_pre_hook(lambda m, a: grabbed.setdefault("u", a[0]))
    lm(input_ids=seq)
    hook.remove()
    conv, ssm = boundary_states(lm.model.layers[3].mixer, grabbed["u"], S)
    assert conv.shape[1] == ssm.shape[1] == 4
    assert not conv[:, 0].any() and not ssm[:, 0].any()
    for b in range(1, 4):
        cache = DynamicCache(config=lm.config)
        lm(input_ids=seq[:, :b * S], past_key_values=cache, use_cache=True)
        assert_close(conv[:, b], cache.layers[3].conv_states[0])
        assert_close(ssm[:, b], cache.layers[3].recurrent_states[0])


# ---- (c) the context cache, extended block by block = one full forward -----------------
@torch.no_grad()
def test_extending_the_context_equals_a_full_forward():
    model = tiny_twotower()
    blocks = [ids(10 + k, 2, S) for k in range(3)] + [ids(20, 2, 1), ids(21, 2, 1)]
    ctx, last = model.prefill(PROMPTS)
    pieces = [last[:, None]]
    for blk in blocks:
        ctx, logits = model.extend(ctx, blk)
        pieces.append(logits)
    got = torch.cat(pieces, 1)[:, :-1]                 # logits at the last prompt token and after
    assert ctx.lengths.tolist() == [len(p) + 3 * S + 2 for p in PROMPTS]
    for b, prompt in enumerate(PROMPTS):
        row = prompt + torch.cat(blocks, 1)[b].tolist()
        assert_close(got[b], ar_logits(model.context_lm, row)[len(prompt) - 1:-1])


# ---- (d) the release layout: write, load, same logits ----------------------------------
def _logits(model, seed=30):
    with torch.no_grad():
        ctx, last = model.prefill(PROMPTS)
        x = ids(seed, 2, S)
        x[:, ::2] = MASK_ID
        return last, model.denoise(x, model.block_inputs(ctx, S))


@pytest.mark.parametrize("shard", [None, 6000])
def test_release_roundtrip(tmp_path, shard):
    model = tiny_twotower(seed=1, trained=True)
    release.write_release(model, tmp_path, max_shard_bytes=shard)
    if shard:
        weight_map = json.loads((tmp_path / release.INDEX).read_text())["weight_map"]
        assert len(set(weight_map.values())) > 1
        keys = set(weight_map)
    else:
        keys = set(release._keys(tmp_path))
    assert "denoiser_tower.layers.2.mixer.experts.3.down_proj.weight" in keys
    assert "context_tower.layers.2.mixer.experts.up_proj" not in keys
    assert {"context_lm_head.weight", "lm_head.weight", "t_block.1.weight", "scale_shift_tables.4",
            "context_tower.norm_f.weight", "denoiser_tower.embeddings.weight"} <= keys
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["hybrid_override_pattern"] == "M*EM-" and "layers_block_type" not in config
    assert release.is_release_dir(tmp_path)

    expected = _logits(model)
    for loaded in (release.load_release(tmp_path, "cpu", torch.float32),
                   checkpoints.load(str(tmp_path), "cpu", torch.float32)):
        assert loaded.mask_token_id == MASK_ID and not any(p.is_meta for p in loaded.parameters())
        mixer = loaded.denoiser_lm.model.layers[0].mixer
        assert mixer.time_step_limit == (0.0, float("inf"))
        e_bias = loaded.context_lm.model.layers[2].mixer.gate.e_score_correction_bias
        assert e_bias.dtype == torch.float32
        for got, want in zip(_logits(loaded), expected):
            assert_close(got, want)

    half = release.load_release(tmp_path, "cpu", torch.bfloat16)     # the release runs in BF16
    assert half.dtype == torch.bfloat16
    assert half.context_lm.model.layers[2].mixer.gate.e_score_correction_bias.dtype == torch.float32
    for got, want in zip(_logits(half), expected):
        assert torch.isfinite(got).all() and (got.float() - want).abs().max() < 0.1 * want.abs().max()


def test_release_errors(tmp_path):
    model = tiny_twotower(seed=2)
    good = release.write_release(model, tmp_path / "good", max_shard_bytes=6000)
    assert not release.is_release_dir(tmp_path)                 # no config.json

    # a shard named by the index is missing
    missing = tmp_path / "missing"
    missing.mkdir()
    for f in good.iterdir():
        (missing / f.name).write_bytes(f.read_bytes())
    next(missing.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(checkpoints.SpecError, match="lacks weight shard"):
        release.load_release(missing)

    # config.json that does not fit the weights
    for field, value, match in (("moe_intermediate_size", 20, "shape mismatch"),
                                ("model_type", "mamba2", "unsupported architecture"),
                                ("hybrid_override_pattern", "M*EM-M", "lacks")):
        bad = tmp_path / f"bad_{field}"
        bad.mkdir()
        for f in good.iterdir():
            (bad / f.name).write_bytes(f.read_bytes())
        cfg = json.loads((bad / "config.json").read_text())
        cfg[field] = value
        if field == "hybrid_override_pattern":
            cfg["num_hidden_layers"] = 6
        (bad / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(checkpoints.SpecError, match=match):
            release.load_release(bad)

    # one expert tensor missing
    from safetensors.torch import save_file
    state = release.release_state(model)
    del state["denoiser_tower.layers.2.mixer.experts.1.up_proj.weight"]
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((good / "config.json").read_text())
    save_file({k: v.clone().contiguous() for k, v in state.items()}, str(partial / "model.safetensors"))
    with pytest.raises(checkpoints.SpecError, match=r"lacks 1 weight.*experts\.up_proj\[1\]"):
        release.load_release(partial)


# ---- (e) training: all blocks at once = each block on its clean prefix -----------------
def test_training_objective_terms_with_the_ar_distribution():
    from tests.test_train import check_objective_terms
    check_objective_terms(tiny_twotower(seed=3, trained=True), ids(42, 2, 3 * S), S)


def test_training_inputs_equal_per_block_denoising():
    model = tiny_twotower(seed=3, trained=True)
    n = 3 * S + 3                                             # a short last block too
    clean = ids(40, 2, n)
    g = torch.Generator().manual_seed(41)
    nblocks = math.ceil(n / S)
    t_block = torch.rand(2, nblocks, generator=g)
    t = t_block.repeat_interleave(S, 1)[:, :n]
    noisy = torch.where(torch.rand(2, n, generator=g) < t, torch.full_like(clean, MASK_ID), clean)

    for p in model.denoiser_lm.parameters():
        p.requires_grad_(True)
    train = model.training_logits(clean, noisy, t, S)
    train.logsumexp(-1).mean().backward()                      # gradients reach the seeded scan
    grad = model.denoiser_lm.model.layers[3].mixer.in_proj.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0

    with torch.no_grad():
        for b in range(nblocks):
            lo, hi = b * S, min(n, (b + 1) * S)
            if b == 0:   # no clean context yet: an empty cache (zero Mamba seeds, no K/V)
                ctx = ContextState(model.family.new_cache(), torch.zeros(2, 0, dtype=torch.bool),
                                   torch.zeros(2, dtype=torch.long))
            else:
                ctx, _ = model.prefill(clean[:, :lo].tolist())
            one = model.denoise(noisy[:, lo:hi], model.block_inputs(ctx, hi - lo), t_block[:, b])
            assert_close(train[:, lo:hi].detach(), one)


# ---- (f) the samplers run on it --------------------------------------------------------
@torch.no_grad()
def test_samplers_run():
    model = tiny_twotower(seed=4, trained=True)
    cfg = SamplerConfig(block_size=S, steps=4, max_new_tokens=2 * S + 3, stop_at_eos=False, threshold=0.5)
    events = list(diffusion_generate(model, PROMPTS, cfg, capture_layers=(1,)))
    done = events[-1]
    assert [len(r) for r in done.token_ids] == [2 * S + 3] * 2
    assert all(MASK_ID not in r for r in done.token_ids)
    step = next(e for e in events if type(e).__name__ == "Step")
    probs = torch.tensor(step.attention[1])                    # (B, heads, S, L + S)
    assert probs.shape == (2, 4, S, len(PROMPTS[0]) + S)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 4, S), atol=1e-5)
    assert float(probs[1, :, :, :len(PROMPTS[0]) - len(PROMPTS[1])].abs().max()) == 0.0   # pads unseen

    ar_done = list(ar_generate(model, PROMPTS, SamplerConfig(max_new_tokens=6, stop_at_eos=False)))[-1]
    for b, prompt in enumerate(PROMPTS):                       # greedy AR = full-forward argmax
        row = list(prompt)
        for _ in range(6):
            row.append(int(ar_logits(model.context_lm, row)[-1].argmax()))
        assert ar_done.token_ids[b] == row[len(prompt):]
    assert model.info()["architecture"] == "nemotron_h"
