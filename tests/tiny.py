"""Tiny random models and a tiny tokenizer for CPU tests."""
from __future__ import annotations

import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from twotower.model import TwoTower

VOCAB = 96
MASK_ID = 3


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               eos_token_id=2, bos_token_id=1, pad_token_id=0, tie_word_embeddings=True)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_twotower(seed: int = 0, learned_mask: bool = False, **overrides) -> TwoTower:
    """Denoiser = exact copy of the context tower, time conditioning at identity."""
    ctx = tiny_llama(seed, **overrides)
    return TwoTower(ctx, copy.deepcopy(ctx), mask_token_id=MASK_ID, learned_mask=learned_mask).eval()


LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def random_lora(lm, seed: int, std: float, lora: dict = LORA):
    """A peft LoRA adapter on `lm` whose B matrices are random (peft starts them at zero), so
    the adapted model differs from its base. Returns the peft model."""
    from peft import get_peft_model
    from twotower.checkpoints import lora_config
    adapter = get_peft_model(lm, lora_config(lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return adapter
