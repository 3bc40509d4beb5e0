"""The Llama-family backbone: context cache, the denoiser's layer loop, training inputs.

The key check: with the block made causal and the time conditioning at identity, a denoiser
that holds the context tower's weights IS the AR model, so its logits must equal the AR
model's. That pins the layer loop, the cached K/V, RoPE positions and padding masks.
"""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPT2Config

from tests.tiny import MASK_ID, VOCAB, random_lora, tiny_llama, tiny_twotower
from twotower.attention import AttentionCapture
from twotower.backbones import family_for
from twotower.backbones.llama import LlamaFamily
from twotower.context import ContextState, ContextView, clean_reads_as_ar
from twotower.model import TwoTower

ATOL = 1e-5


@pytest.fixture(scope="module")
def model():
    return tiny_twotower(seed=0)


@pytest.fixture(scope="module")
def seq():
    g = torch.Generator().manual_seed(7)
    return torch.randint(4, VOCAB, (40,), generator=g)


def ar_logits(model, ids) -> torch.Tensor:
    """Plain full forward of the context tower over one unpadded row: (n, V)."""
    with torch.no_grad():
        return model.context_lm(input_ids=torch.as_tensor(ids)[None]).logits[0]


def randomise_time(model, seed=3, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.time.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


# ---- context tower -----------------------------------------------------------------------
def test_prefill_last_logits_match_full_forward(model, seq):
    ctx, last = model.prefill([seq[:13].tolist()])
    assert torch.allclose(last[0], ar_logits(model, seq[:13])[-1], atol=ATOL)
    assert ctx.lengths.tolist() == [13] and ctx.valid.shape == (1, 13) and not ctx.padded


def test_prefill_rejects_empty_prompt(model):
    with pytest.raises(ValueError, match="at least one token"):
        model.prefill([[5, 6], []])
    with pytest.raises(ValueError, match="at least one token"):
        model.prefill([])


def test_extend_last_only_gives_the_next_token_logits(model, seq):
    """last_only: the head runs on the block's last position only (what the sampler reads)."""
    ctx, _ = model.prefill([seq[:6].tolist()])
    _, full = model.extend(ctx, seq[6:14][None])
    ctx, _ = model.prefill([seq[:6].tolist()])
    _, last = model.extend(ctx, seq[6:14][None], last_only=True)
    assert last.shape == (1, 1, full.shape[-1]) and torch.allclose(last[0, 0], full[0, -1], atol=ATOL)


def test_extend_block_by_block_equals_full_forward(model, seq):
    full = ar_logits(model, seq[:30])
    ctx, last = model.prefill([seq[:6].tolist()])
    got = [last[0]]
    for start in range(6, 30, 8):                       # three blocks of 8 after a 6-token prompt
        ids = seq[start:start + 8][None]
        ctx, logits = model.extend(ctx, ids)
        got.extend(logits[0])
    assert ctx.lengths.tolist() == [30]
    assert torch.allclose(torch.stack(got), full[5:30], atol=ATOL)
    # the cache holds exactly what one pass over the whole sequence would hold
    ref = model.family.new_cache()
    with torch.no_grad():
        model.context_lm(input_ids=seq[:30][None], past_key_values=ref, use_cache=True)
    for (k, v), (rk, rv) in zip(model.family.context_kv(ctx.cache).values(),
                                model.family.context_kv(ref).values()):
        assert torch.allclose(k, rk, atol=ATOL) and torch.allclose(v, rv, atol=ATOL)


def test_extend_left_padded_batch_rows_equal_their_own_runs(model, seq):
    rows = [seq[:11].tolist(), seq[20:24].tolist(), seq[5:12].tolist()]
    ctx, last = model.prefill(rows)
    assert ctx.padded and ctx.lengths.tolist() == [11, 4, 7]
    block = torch.stack([seq[30:36], seq[24:30], seq[12:18]])
    ctx2, logits = model.extend(ctx, block)
    assert ctx2.lengths.tolist() == [17, 10, 13]
    for b, row in enumerate(rows):
        ref = ar_logits(model, row + block[b].tolist())
        assert torch.allclose(last[b], ref[len(row) - 1], atol=ATOL), b
        assert torch.allclose(logits[b], ref[len(row):], atol=ATOL), b


# ---- denoiser == AR model when causal and unconditioned ----------------------------------
@pytest.mark.parametrize("split,size", [(1, 5), (9, 8), (17, 16), (25, 1)])
def test_causal_denoiser_reproduces_ar_logits(model, seq, split, size):
    full = ar_logits(model, seq[:split + size])
    ctx, _ = model.prefill([seq[:split].tolist()])
    inputs = model.block_inputs(ctx, size, causal=True)
    with torch.no_grad():
        for t in (torch.ones(1), torch.tensor([0.37])):         # identity conditioning: t is irrelevant
            got = model.denoise(seq[split:split + size][None], inputs, t)[0]
            assert torch.allclose(got, full[split:split + size], atol=ATOL), float((got - full[split:split + size]).abs().max())


def test_causal_denoiser_after_extends_uses_the_right_positions(model, seq):
    """Context built by prefill + two extends: block positions continue after all of it."""
    ctx, _ = model.prefill([seq[:5].tolist()])
    ctx, _ = model.extend(ctx, seq[5:13][None])
    ctx, _ = model.extend(ctx, seq[13:21][None])
    assert ctx.positions(4).tolist() == [[21, 22, 23, 24]]
    with torch.no_grad():
        got = model.denoise(seq[21:29][None], model.block_inputs(ctx, 8, causal=True))[0]
    assert torch.allclose(got, ar_logits(model, seq[:29])[21:29], atol=ATOL)


def test_causal_denoiser_left_padded_batch(model, seq):
    rows = [seq[:14].tolist(), seq[3:6].tolist(), seq[10:19].tolist()]
    blocks = torch.stack([seq[14:20], seq[6:12], seq[19:25]])
    ctx, _ = model.prefill(rows)
    with torch.no_grad():
        batched = model.denoise(blocks, model.block_inputs(ctx, 6, causal=True))
    for b, row in enumerate(rows):
        ref = ar_logits(model, row + blocks[b].tolist())[len(row):]
        assert torch.allclose(batched[b], ref, atol=ATOL), b
        alone_ctx, _ = model.prefill([row])
        with torch.no_grad():
            alone = model.denoise(blocks[b:b + 1], model.block_inputs(alone_ctx, 6, causal=True))[0]
        assert torch.allclose(batched[b], alone, atol=ATOL), b


def test_full_attention_block_differs_from_causal_except_last_position(seq):
    """Non-causal (the real denoiser): in a one-layer model the last position sees what the
    causal one sees; the others see more of the block."""
    model = tiny_twotower(seed=0, num_hidden_layers=1)
    ctx, _ = model.prefill([seq[:10].tolist()])
    x = seq[10:16][None]
    with torch.no_grad():
        causal = model.denoise(x, model.block_inputs(ctx, 6, causal=True))[0]
        full = model.denoise(x, model.block_inputs(ctx, 6))[0]
    assert torch.allclose(full[-1], causal[-1], atol=ATOL)
    assert (full[:-1] - causal[:-1]).abs().amax(-1).min() > 1e-4


def test_padded_noncausal_batch_rows_equal_their_own_runs(model, seq):
    """The real (non-causal) denoiser over a padded batch: pads are never attended."""
    rows = [seq[:9].tolist(), seq[30:32].tolist()]
    x = torch.tensor([[MASK_ID, 7, MASK_ID, MASK_ID], [MASK_ID, MASK_ID, 50, MASK_ID]])
    m = copy.deepcopy(model)
    randomise_time(m)
    ctx, _ = m.prefill(rows)
    with torch.no_grad():
        batched = m.denoise(x, m.block_inputs(ctx, 4))
        for b, row in enumerate(rows):
            c, _ = m.prefill([row])
            alone = m.denoise(x[b:b + 1], m.block_inputs(c, 4))[0]
            assert torch.allclose(batched[b], alone, atol=ATOL), b


def test_time_conditioning_changes_the_denoiser(model, seq):
    """Guard against a vacuous equivalence test: a non-identity conditioning must matter, per t."""
    m = copy.deepcopy(model)
    randomise_time(m)
    ctx, _ = m.prefill([seq[:10].tolist()])
    inputs = m.block_inputs(ctx, 6, causal=True)
    x = seq[10:16][None]
    with torch.no_grad():
        a = m.denoise(x, inputs, torch.tensor([1.0]))[0]
        b = m.denoise(x, inputs, torch.tensor([0.5]))[0]
    ref = ar_logits(model, seq[:16])[10:16]
    assert (a - ref).abs().max() > 1e-3 and (a - b).abs().max() > 1e-3


def test_default_t_is_the_masked_fraction(model, seq):
    m = copy.deepcopy(model)
    randomise_time(m)
    ctx, _ = m.prefill([seq[:10].tolist()])
    inputs = m.block_inputs(ctx, 4)
    x = torch.tensor([[MASK_ID, 9, MASK_ID, 11]])
    with torch.no_grad():
        assert torch.allclose(m.denoise(x, inputs), m.denoise(x, inputs, torch.tensor([0.5])), atol=ATOL)


# ---- training: all blocks at once ------------------------------------------------------
def noisy_blocks(seed: int, S: int, N: int, B: int):
    """Clean ids (B, N), the same with about half masked, and one t per block (B, N // S)."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(4, VOCAB, (B, N), generator=g)
    noisy = clean.masked_fill(torch.rand(B, N, generator=g) < 0.5, MASK_ID)
    return clean, noisy, torch.rand(B, N // S, generator=g)


def test_training_logits_equal_per_block_denoise(model):
    m = copy.deepcopy(model)
    randomise_time(m, seed=11)
    S, N, B = 4, 16, 2
    clean, noisy, t_block = noisy_blocks(seed=5, S=S, N=N, B=B)
    with torch.no_grad():
        together = m.training_logits(clean, noisy, t_block.repeat_interleave(S, 1), S)
        assert together.shape == (B, N, VOCAB) and m.training_start(S) == 0
        for blk in range(N // S):
            sl = slice(blk * S, (blk + 1) * S)
            if blk == 0:   # no clean context: the block sees only itself, positions 0..S-1
                kv = {i: (torch.zeros(B, 2, 0, 8), torch.zeros(B, 2, 0, 8)) for i in m.family.attention_layers}
                inputs = {"view": ContextView(kv, S), "positions": torch.arange(S).expand(B, -1), "mask": None}
            else:
                ctx, _ = m.prefill(clean[:, :blk * S].tolist())
                inputs = m.block_inputs(ctx, S)
            alone = m.denoise(noisy[:, sl], inputs, t_block[:, blk])
            assert torch.allclose(together[:, sl], alone, atol=1e-5), blk


def test_anchored_training_logits_equal_per_block_denoise():
    """Anchored denoiser: blocks 1.. read the clean token before them; input i predicts token i."""
    ctx_lm = tiny_llama(seed=2)
    m = TwoTower(ctx_lm, copy.deepcopy(ctx_lm), mask_token_id=MASK_ID, anchor=True).eval()
    randomise_time(m, seed=12)
    S, N, B = 4, 16, 2
    clean, noisy, t_block = noisy_blocks(seed=6, S=S, N=N, B=B)
    with torch.no_grad():
        together = m.training_logits(clean, noisy, t_block.repeat_interleave(S, 1), S)
        assert m.training_start(S) == S and together.shape == (B, N - S, VOCAB)
        for blk in range(1, N // S):
            ctx, _ = m.prefill(clean[:, :blk * S].tolist())
            assert ctx.last.tolist() == clean[:, blk * S - 1].tolist()
            alone = m.denoise(noisy[:, blk * S:(blk + 1) * S], m.block_inputs(ctx, S), t_block[:, blk])
            assert alone.shape == (B, S, VOCAB)
            assert torch.allclose(together[:, (blk - 1) * S:blk * S], alone, atol=1e-5), blk


def test_training_logits_carry_gradients_to_the_denoiser_only(model):
    m = copy.deepcopy(model)
    m.denoiser_lm.requires_grad_(True)
    clean = torch.randint(4, VOCAB, (1, 8))
    noisy = clean.clone()
    noisy[0, ::2] = MASK_ID
    loss = m.training_logits(clean, noisy, torch.full((1, 8), 0.5), 4).logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is None for p in m.context_lm.parameters())
    assert m.denoiser_lm.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert m.time.t_block[1].weight.grad.abs().sum() > 0


# ---- anchored denoiser (reads the last clean token; input i predicts block token i) ------
@pytest.fixture(scope="module")
def anchored():
    ctx_lm = tiny_llama(seed=2)
    return TwoTower(ctx_lm, copy.deepcopy(ctx_lm), mask_token_id=MASK_ID, anchor=True).eval()


def test_anchored_causal_denoiser_reproduces_ar_next_token_logits(anchored, seq):
    full = ar_logits(anchored, seq[:20])
    rows = [seq[:12].tolist(), seq[:7].tolist()]
    blocks = torch.stack([seq[12:18], seq[7:13]])
    ctx, _ = anchored.prefill(rows)
    assert ctx.last.tolist() == [rows[0][-1], rows[1][-1]]
    with torch.no_grad():
        got = anchored.denoise(blocks, anchored.block_inputs(ctx, 6, causal=True))
    assert got.shape == (2, 6, VOCAB)
    # output i reads block tokens < i after the anchor: it is the AR logit that predicts token i
    assert torch.allclose(got[0], full[11:17], atol=ATOL)
    assert torch.allclose(got[1], full[6:12], atol=ATOL)


def test_anchored_model_refuses_a_family_without_anchor_support(monkeypatch):
    monkeypatch.setattr(LlamaFamily, "supports_anchor", False)
    ctx_lm = tiny_llama()
    with pytest.raises(ValueError, match="anchored denoiser is not supported"):
        TwoTower(ctx_lm, copy.deepcopy(ctx_lm), mask_token_id=MASK_ID, anchor=True)


# ---- clean_as_ar (clean block positions compute the AR model; the adapter acts on masks) --
def clean_as_ar_model(gated: bool = True):
    """An anchored clean_as_ar denoiser with a random LoRA, random time conditioning and mask
    vector, so that any leak of them into clean positions shows."""
    ctx_lm = tiny_llama(seed=2)
    m = TwoTower(ctx_lm, copy.deepcopy(ctx_lm), mask_token_id=MASK_ID, learned_mask=True, anchor=True,
                 clean_as_ar=True)
    random_lora(m.denoiser_lm, seed=5, std=0.3)
    if gated:
        m.gate_adapter()
    randomise_time(m, seed=13)
    with torch.no_grad():
        m.mask_embedding.add_(torch.randn(m.mask_embedding.shape, generator=torch.Generator().manual_seed(1)))
    return m.eval()


def test_clean_reads_as_ar_mask():
    base = torch.ones(1, 1, 3, 2 + 3, dtype=torch.bool)            # 2 context keys, 3 block queries
    got = clean_reads_as_ar(base, torch.tensor([[False, True, False]]))[0, 0].int()
    assert got.tolist() == [[1, 1, 1, 0, 0],     # clean query 0: itself only in the block
                            [1, 1, 1, 1, 1],     # the masked query sees everything
                            [1, 1, 1, 0, 1]]     # clean query 2: clean keys at or before it


def test_clean_as_ar_denoiser_predicts_the_ar_next_token_after_a_revealed_prefix(seq):
    m = clean_as_ar_model()
    full = ar_logits(m, seq[:30])
    rows, revealed = [seq[:12].tolist(), seq[:7].tolist()], [3, 0]
    ctx, _ = m.prefill(rows)
    x = torch.full((2, 6), MASK_ID)
    for b, (row, j) in enumerate(zip(rows, revealed)):
        x[b, :j] = seq[len(row):len(row) + j]
    with torch.no_grad():
        got = m.denoise(x, m.block_inputs(ctx, 6))
        ungated = clean_as_ar_model(gated=False).denoise(x, m.block_inputs(ctx, 6))
    # output i reads the anchor and block tokens < i: while those are clean it is the AR logit
    assert torch.allclose(got[0, :4], full[11:15], atol=ATOL)
    assert torch.allclose(got[1, :1], full[6:7], atol=ATOL)
    # past the first mask the denoiser is its own (the adapter and the mask vector act there)
    assert (got[0, 4:] - full[15:17]).abs().max() > 1e-2
    assert (ungated[0, :4] - full[11:15]).abs().max() > 1e-3   # without the gate the adapter leaks in


def test_clean_as_ar_training_logits_equal_per_block_denoise():
    m = clean_as_ar_model()
    S, N, B = 4, 16, 2
    clean, noisy, t_block = noisy_blocks(seed=6, S=S, N=N, B=B)
    with torch.no_grad():
        together = m.training_logits(clean, noisy, t_block.repeat_interleave(S, 1), S)
        for blk in range(1, N // S):
            ctx, _ = m.prefill(clean[:, :blk * S].tolist())
            alone = m.denoise(noisy[:, blk * S:(blk + 1) * S], m.block_inputs(ctx, S), t_block[:, blk])
            assert torch.allclose(together[:, (blk - 1) * S:blk * S], alone, atol=1e-5), blk


def test_clean_as_ar_needs_an_anchor():
    ctx_lm = tiny_llama()
    with pytest.raises(ValueError, match="clean_as_ar needs an anchored denoiser"):
        TwoTower(ctx_lm, copy.deepcopy(ctx_lm), mask_token_id=MASK_ID, clean_as_ar=True)


# ---- attention capture -----------------------------------------------------------------
def test_attention_capture_matches_sdpa_and_hides_pads(model, seq):
    ctx, _ = model.prefill([seq[:7].tolist(), seq[:3].tolist()])      # row 1 has 4 pads
    x = torch.full((2, 5), MASK_ID)
    inputs = model.block_inputs(ctx, 5)
    capture = AttentionCapture([0, 1])
    with torch.no_grad():
        plain = model.denoise(x, inputs)
        captured = model.denoise(x, inputs, capture=capture)
    assert torch.allclose(plain, captured, atol=ATOL)
    probs = capture.probs[1]
    assert probs.shape == (2, 4, 5, 7 + 5)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 4, 5), atol=1e-5)
    assert probs[1, :, :, :4].abs().max() == 0          # left pads of row 1 get no attention
    assert probs[0].min() > 0


# ---- masks, facts, refusals --------------------------------------------------------------
def test_block_mask_shapes():
    from twotower.context import block_mask
    valid = torch.tensor([[True, True, True], [False, True, True]])
    mask = block_mask(valid, 2, causal=True)
    assert mask.shape == (2, 1, 2, 5)
    assert mask[1, 0].tolist() == [[False, True, True, True, False], [False, True, True, True, True]]
    assert block_mask(valid[:1], 2) is None
    assert block_mask(valid, 2)[1, 0].tolist() == [[False, True, True, True, True]] * 2


def test_learned_mask_embedding_is_used_only_at_masked_positions(seq):
    m = tiny_twotower(seed=0, learned_mask=True)
    ctx, _ = m.prefill([seq[:6].tolist()])
    inputs = m.block_inputs(ctx, 3)
    clean, masked = seq[6:9][None], torch.full((1, 3), MASK_ID)
    with torch.no_grad():
        before = m.denoise(masked, inputs), m.denoise(clean, inputs)
        m.mask_embedding.add_(1.0)
        after = m.denoise(masked, inputs), m.denoise(clean, inputs)
    assert (before[0] - after[0]).abs().max() > 1e-3
    assert torch.allclose(before[1], after[1], atol=ATOL)


def test_family_and_model_refusals():
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        family_for(GPT2Config())
    assert family_for(tiny_llama().config) is LlamaFamily
    ctx = tiny_llama()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        TwoTower(ctx, copy.deepcopy(ctx), mask_token_id=VOCAB)
    with pytest.raises(ValueError, match="must share an architecture"):
        from transformers import MistralConfig, MistralForCausalLM
        other = MistralForCausalLM(MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4,
                                                 num_key_value_heads=2))
        TwoTower(ctx, other, mask_token_id=MASK_ID)


def test_model_facts(model):
    info = model.info()
    assert info["architecture"] == "llama" and info["layers"] == 2 and info["vocab"] == VOCAB
    assert info["mask_token_id"] == MASK_ID and info["max_context"] == 256
    assert info["denoiser_params"] > info["context_params"]            # + time conditioning
    assert model.eos_token_ids == {2}
    assert model.family.num_tables == 4 and model.time.scale_shift_tables[0].shape == (3, 32)


def test_eos_ids_from_config_and_tokenizer(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.add_special_tokens({"unk_token": "<|endoftext|>", "additional_special_tokens": ["<|im_end|>"]})
    m = tiny_twotower(seed=0, vocab_size=len(tok))
    m.tokenizer = tok
    end, im_end = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>")
    assert end == tok.unk_token_id and tok.convert_tokens_to_ids("<|eot_id|>") == end   # absent -> unk
    assert m.eos_token_ids == {2, end, im_end}          # config/tokenizer eos, <|endoftext|>, <|im_end|>
    m.mask_token_id = im_end
    assert m.eos_token_ids == {2, end}                  # the mask id never ends a reply


# ---- the release's conditioning, written out from DESIGN.md -------------------------------
def test_time_embedding_follows_the_release():
    """t -> sinusoidal(t * 1000, 256) (cos half, sin half) -> Linear, SiLU, Linear -> SiLU -> Linear(H, 3H)."""
    from twotower.conditioning import TimeConditioning, sinusoidal
    t = torch.tensor([1.0, 0.25, 0.0])
    half = torch.arange(128, dtype=torch.float32)
    args = (t * 1000)[:, None] * torch.exp(-torch.log(torch.tensor(10000.0)) * half / 128)
    assert torch.allclose(sinusoidal(t), torch.cat([args.cos(), args.sin()], -1), atol=1e-5)
    tc = TimeConditioning(8, num_tables=2)
    assert torch.equal(tc.mods(tc(t), 1)[2], torch.ones(3, 1, 8))                  # identity: gate 1
    assert torch.equal(tc.mods(tc(t), 0)[0], torch.zeros(3, 1, 8))
    torch.manual_seed(0)
    for p in tc.parameters():
        p.data.normal_()
    mlp, lin = tc.t_embedder.mlp, tc.t_block[1]
    emb = lin(torch.nn.functional.silu(mlp[2](torch.nn.functional.silu(mlp[0](sinusoidal(t))))))
    shift, scale, gate = tc.mods(tc(t), 1)
    want = emb.view(3, 3, 8) + tc.scale_shift_tables[1]
    assert torch.allclose(shift[:, 0], want[:, 0], atol=1e-5)
    assert torch.allclose(scale[:, 0], want[:, 1], atol=1e-5)
    assert torch.allclose(gate[:, 0], want[:, 2], atol=1e-5)


def test_denoiser_layer_loop_follows_the_release(model, seq):
    """A from-scratch denoiser: attention = modulate THEN RMSNorm; MLP = RMSNorm THEN modulate;
    the gate scales each mixer output before the residual add; block queries attend over
    [context K/V | block K/V] with no mask; RoPE positions continue after the context."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv
    m = copy.deepcopy(model)
    randomise_time(m, seed=21, std=0.5)
    with torch.no_grad():                       # make the denoiser differ from the context tower
        for p in m.denoiser_lm.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    L, S = 9, 5
    x = torch.tensor([[MASK_ID, int(seq[L + 1]), MASK_ID, MASK_ID, int(seq[L + 4])]])
    t = torch.tensor([0.6])
    ctx, _ = m.prefill([seq[:L].tolist()])
    with torch.no_grad():
        got = m.denoise(x, m.block_inputs(ctx, S), t)
        cache = m.family.new_cache()
        m.context_lm(input_ids=seq[:L][None], past_key_values=cache, use_cache=True)
        dm = m.denoiser_lm.model
        h = dm.embed_tokens(x)
        cos, sin = dm.rotary_emb(h, torch.arange(L, L + S)[None])
        base = m.time(t)                                               # (1, 3, H)
        for i, layer in enumerate(dm.layers):
            shift, scale, gate = (base + m.time.scale_shift_tables[2 * i])[:, :, None, :].unbind(1)
            a = layer.input_layernorm(h * (1 + scale) + shift)
            att = layer.self_attn
            q = att.q_proj(a).view(1, S, 4, 8).transpose(1, 2)
            k = att.k_proj(a).view(1, S, 2, 8).transpose(1, 2)
            v = att.v_proj(a).view(1, S, 2, 8).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            keys = repeat_kv(torch.cat([cache.layers[i].keys, k], 2), 2)
            vals = repeat_kv(torch.cat([cache.layers[i].values, v], 2), 2)
            probs = (q @ keys.transpose(-1, -2) / 8 ** 0.5).softmax(-1)
            h = h + gate * att.o_proj((probs @ vals).transpose(1, 2).reshape(1, S, 32))
            shift, scale, gate = (base + m.time.scale_shift_tables[2 * i + 1])[:, :, None, :].unbind(1)
            h = h + gate * layer.mlp(layer.post_attention_layernorm(h) * (1 + scale) + shift)
        want = m.denoiser_lm.lm_head(dm.norm(h))
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
