"""Llama-family decoders (Llama, SmolLM2, Qwen2/3, Mistral) as TwoTower backbones.

Each transformers decoder layer is two conditioned sub-layers: attention (modulate, then
the layer's RMSNorm, as the release does for attention/Mamba) and MLP (RMSNorm, then
modulate, as for MoE/MLP). Table 2i conditions layer i's attention, 2i+1 its MLP. Block
positions continue after the context, so RoPE places block token j at position L + j.
"""
from __future__ import annotations

import torch
from ..attention import AttentionCapture
from ..conditioning import modulate
from ..context import ContextState, ContextView, block_mask, pad_mask
from .family import Family

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "olmo2", "granite")


class LlamaFamily(Family):
    name = "llama"
    supports_anchor = True

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
    def context_forward(self, ids: torch.Tensor, ctx: ContextState, valid_new: torch.Tensor, keep: int = 0) -> torch.Tensor:
        """Append ids (B, n) to the context cache in one pass; returns logits (B, n, V), or of the
        last `keep` positions only (B, keep, V): the head skips the others.

        ctx holds the state BEFORE the append; valid_new (B, n) marks real (non-pad) tokens.
        With a static cache the mask spans its whole capacity; AR steps and block extends then
        keep one shape for the whole run.
        """
        mask = torch.cat([ctx.valid, valid_new], 1)
        positions = (mask.long().cumsum(1) - 1).clamp_min(0)[:, -ids.shape[1]:].contiguous()
        if ctx.capacity is None:
            return self.context_lm(input_ids=ids, attention_mask=mask.long(), position_ids=positions,
                                   past_key_values=ctx.cache, use_cache=True, logits_to_keep=keep).logits
        full = pad_mask(mask, ctx.capacity).long()                      # the cache writes at its own count
        return self.context_call(ctx)(input_ids=ids, attention_mask=full, position_ids=positions,
                                      past_key_values=ctx.cache, use_cache=True, logits_to_keep=keep).logits

    def context_kv(self, cache) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Layer index -> (keys, values), each (B, kv_heads, L, d), post-RoPE."""
        return {i: (layer.keys, layer.values) for i, layer in enumerate(cache.layers)}

    # ---- denoiser ----------------------------------------------------------------------
    def block_inputs(self, ctx: ContextState, size: int, inplace: bool = True, causal: bool = False,
                     offset: int = 0, always_mask: bool = False) -> dict:
        """Everything the denoiser needs for one block, built once per block.

        causal=True makes the block causal (for checking the denoiser against the AR model);
        offset=-1 starts the block at the last clean token (an anchored denoiser);
        always_mask gives a mask even when every key may be seen (to restrict it per pass).
        """
        positions = ctx.positions(size, offset)                          # (B, S)
        kv, valid = self.context_kv(ctx.cache), ctx.valid
        if ctx.capacity is not None:   # static: the cache's own buffers, unused slots masked
            return {"view": ContextView(kv, size, inplace=False), "positions": positions, "static": True,
                    "mask": block_mask(ctx.static_valid(hide_last=-offset), size, causal, always=True),
                    "context_slots": (ctx.valid.shape[1] + offset, ctx.capacity)}
        if offset:   # the block re-reads the last `-offset` clean tokens: hide their context copies
            kv = {i: (k[..., :offset, :], v[..., :offset, :]) for i, (k, v) in kv.items()}
            valid = valid[:, :offset]
        return {"view": ContextView(kv, size, inplace=inplace), "positions": positions,
                "mask": block_mask(valid, size, causal, always=always_mask)}

    def denoiser_hidden(self, h: torch.Tensor, inputs: dict, time, base: torch.Tensor,
                        capture: AttentionCapture | None = None) -> torch.Tensor:
        """The denoiser's layer loop. h: (B, S, H) block embeddings -> final hidden (B, S, H)."""
        model = self.denoiser_lm.model
        rope = model.rotary_emb(h, inputs["positions"])                 # cos, sin: (B, S, d)
        active = inputs.get("active")                                   # (B, S, 1) or None
        for i, layer in enumerate(model.layers):
            shift, scale, gate = time.mods(base, 2 * i, active)
            a = layer.input_layernorm(modulate(h, shift, scale))
            a, _ = layer.self_attn(a, position_embeddings=rope, attention_mask=inputs["mask"],
                                   past_key_values=inputs["view"], capture=capture, denoiser=True)
            h = h + gate * a
            shift, scale, gate = time.mods(base, 2 * i + 1, active)
            m = modulate(layer.post_attention_layernorm(h), shift, scale)
            h = h + gate * layer.mlp(m)
        return model.norm(h)

    # ---- training: every block of a clean sequence at once -----------------------------
    def training_inputs(self, clean: torch.Tensor, block_size: int, anchor: bool = False) -> dict:
        """Run the frozen context tower over clean (B, N) and lay out every block at once.

        Queries of block b see the clean keys of earlier blocks and the noisy keys of their
        own block: mask (1, 1, Q, N + Q). Without anchor the queries are the N positions;
        with it, blocks 1.. each get S + 1 inputs, the clean token before the block first.
        "context_hidden" (B, N, H): the context tower's final hidden states (its AR predictions).
        """
        with torch.no_grad():
            cache = self.new_cache()
            out = self.context_lm.model(input_ids=clean, past_key_values=cache, use_cache=True)
        n, dev = clean.shape[1], clean.device
        blocks = n // block_size
        if anchor:
            first = torch.arange(1, blocks, device=dev)
            qpos = (first[:, None] * block_size + torch.arange(-1, block_size, device=dev)).flatten()
            qblock = first.repeat_interleave(block_size + 1)
        else:
            qpos = torch.arange(blocks * block_size, device=dev)
            qblock = qpos // block_size
        # clean keys before the block (before its anchor, which the block itself re-reads)
        first_unseen = qblock * block_size - (1 if anchor else 0)
        sees_clean = torch.arange(n, device=dev)[None, :] < first_unseen[:, None]
        mask = torch.cat([sees_clean, qblock[None, :] == qblock[:, None]], 1)
        return {"view": ContextView(self.context_kv(cache), qpos.numel(), inplace=False),
                "positions": qpos.expand(clean.shape[0], -1), "mask": mask[None, None],
                "query_positions": qpos, "context_hidden": out.last_hidden_state}
