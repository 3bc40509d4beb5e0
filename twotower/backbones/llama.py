"""Llama-family decoders (Llama, SmolLM2, Qwen2/3, Mistral) as TwoTower backbones.

Each transformers decoder layer is two conditioned sub-layers: attention (modulate, then
the layer's RMSNorm, as the release does for attention/Mamba) and MLP (RMSNorm, then
modulate, as for MoE/MLP). Table 2i conditions layer i's attention, 2i+1 its MLP. Block
positions continue after the context, so RoPE places block token j at position L + j.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

from ..attention import AttentionCapture
from ..conditioning import modulate
from ..context import ContextState, ContextView

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "olmo2", "granite")


class LlamaFamily:
    name = "llama"

    def __init__(self, context_lm, denoiser_lm):
        self.context_lm = context_lm
        self.denoiser_lm = denoiser_lm
        self.config = context_lm.config

    # ---- sizes -------------------------------------------------------------------------
    @property
    def num_tables(self) -> int:
        return 2 * self.config.num_hidden_layers

    @property
    def attention_layers(self) -> list[int]:
        return list(range(self.config.num_hidden_layers))

    @property
    def max_context(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 2048))

    # ---- context tower -----------------------------------------------------------------
    def new_cache(self):
        return DynamicCache(config=self.config)

    def context_forward(self, ids: torch.Tensor, ctx: ContextState, valid_new: torch.Tensor) -> torch.Tensor:
        """Append ids (B, n) to the context cache in one pass; returns logits (B, n, V).

        ctx holds the state BEFORE the append; valid_new (B, n) marks real (non-pad) tokens.
        """
        mask = torch.cat([ctx.valid, valid_new], 1).long()
        positions = (mask.cumsum(1) - 1).clamp_min(0)[:, -ids.shape[1]:]
        out = self.context_lm(input_ids=ids, attention_mask=mask, position_ids=positions,
                              past_key_values=ctx.cache, use_cache=True)
        return out.logits

    def context_kv(self, cache) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Layer index -> (keys, values), each (B, kv_heads, L, d), post-RoPE."""
        return {i: (layer.keys, layer.values) for i, layer in enumerate(cache.layers)}

    # ---- denoiser ----------------------------------------------------------------------
    def block_inputs(self, ctx: ContextState, size: int, inplace: bool = True, causal: bool = False) -> dict:
        """Everything the denoiser needs for one block, built once per block.

        causal=True makes the block causal (for checking the denoiser against the AR model).
        """
        positions = ctx.positions(size)                                  # (B, S)
        return {"view": ContextView(self.context_kv(ctx.cache), size, inplace=inplace),
                "positions": positions, "mask": block_mask(ctx, size, causal)}

    def denoiser_hidden(self, h: torch.Tensor, inputs: dict, time, base: torch.Tensor,
                        capture: AttentionCapture | None = None) -> torch.Tensor:
        """The denoiser's layer loop. h: (B, S, H) block embeddings -> final hidden (B, S, H)."""
        model = self.denoiser_lm.model
        rope = model.rotary_emb(h, inputs["positions"])                 # cos, sin: (B, S, d)
        for i, layer in enumerate(model.layers):
            shift, scale, gate = time.mods(base, 2 * i)
            a = layer.input_layernorm(modulate(h, shift, scale))
            a, _ = layer.self_attn(a, position_embeddings=rope, attention_mask=inputs["mask"],
                                   past_key_values=inputs["view"], capture=capture)
            h = h + gate * a
            shift, scale, gate = time.mods(base, 2 * i + 1)
            m = modulate(layer.post_attention_layernorm(h), shift, scale)
            h = h + gate * layer.mlp(m)
        return model.norm(h)

    # ---- training: every block of a clean sequence at once -----------------------------
    def training_inputs(self, clean: torch.Tensor, block_size: int) -> dict:
        """Run the frozen context tower over clean (B, N) and build the all-blocks mask.

        Query at position q (block q // S) sees clean keys of earlier blocks and noisy keys
        of its own block: mask (1, 1, N, 2N).
        """
        with torch.no_grad():
            cache = self.new_cache()
            self.context_lm.model(input_ids=clean, past_key_values=cache, use_cache=True)
        n = clean.shape[1]
        block = torch.arange(n, device=clean.device) // block_size
        sees_clean = block[None, :] < block[:, None]
        sees_noisy = block[None, :] == block[:, None]
        mask = torch.cat([sees_clean, sees_noisy], 1)[None, None]
        positions = torch.arange(n, device=clean.device).expand(clean.shape[0], -1)
        return {"view": ContextView(self.context_kv(cache), n, inplace=False),
                "positions": positions, "mask": mask}


def block_mask(ctx: ContextState, size: int, causal: bool = False) -> torch.Tensor | None:
    """(B, 1, S, L + S) bool attention mask of block queries, or None when all may be seen.

    Context pads are never attended; with `causal`, block query j sees block keys <= j.
    """
    if not ctx.padded and not causal:
        return None
    batch = ctx.valid.shape[0]
    block = torch.ones(size, size, dtype=torch.bool, device=ctx.valid.device)
    if causal:
        block = block.tril()
    context = ctx.valid[:, None, None, :].expand(batch, 1, size, -1)
    return torch.cat([context, block.expand(batch, 1, size, size)], -1)
