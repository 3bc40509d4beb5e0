"""The denoiser's attention function, registered with transformers' AttentionInterface.

Block queries attend over [context K/V | block K/V] with NO causal mask. The fast path is
transformers' own SDPA function; for layers whose probabilities were asked for
(`AttentionCapture`), a plain eager softmax computes and keeps them.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

NAME = "twotower"


class AttentionCapture:
    """Collects attention probabilities of chosen layers during one denoiser pass."""

    def __init__(self, layers):
        self.layers = set(layers)
        self.probs: dict[int, torch.Tensor] = {}   # layer -> (B, heads, S, L + S)
        self.static_slots: tuple[int, int] | None = None   # (L, capacity) on a static cache

    def keep(self, layer: int, probs: torch.Tensor) -> None:
        """Store a layer's probabilities over [context | block]; on a static cache the
        context's unused slots (L..capacity) are dropped, so the shape is the dynamic path's."""
        if self.static_slots is not None:
            used, capacity = self.static_slots
            probs = torch.cat([probs[..., :used], probs[..., capacity:]], -1)
        self.probs[layer] = probs.detach()


def twotower_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                       capture: AttentionCapture | None = None, denoiser: bool = False, **kwargs):
    """query: (B, heads, S, d); key/value: (B, kv_heads, L + S, d); mask: (B, 1, S, L + S) bool or None.

    Only calls marked `denoiser=True` are the denoiser's; any other call (the context tower
    running through a backbone shared with the denoiser) is plain causal SDPA.
    """
    if not denoiser:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    kwargs.pop("is_causal", None)
    if capture is None or module.layer_idx not in capture.layers:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=False, **kwargs)
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    probs = scores.softmax(-1)
    capture.keep(module.layer_idx, probs)
    out = torch.matmul(probs.to(value.dtype), value)
    return out.transpose(1, 2).contiguous(), probs


AttentionInterface.register(NAME, twotower_attention)
# the masks transformers builds for a model set to this implementation (the context tower,
# when it shares its modules with the denoiser) are SDPA's
AttentionMaskInterface.register(NAME, sdpa_mask)
