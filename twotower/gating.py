"""A per-token gate on a LoRA adapter: its update acts only where the gate is 1.

With it, a denoiser built as base + adapter computes the base model exactly at the positions
the gate closes (the clean tokens of a `clean_as_ar` denoiser) and the adapted model elsewhere,
in one pass. While a gate is set, every peft LoRA linear layer computes

    y = base(x) + B(A(x) * gate * scaling)

with the gate and the scaling folded into the rank-r activations once per layer, and without
autograd the product with B added in place (one fused multiply-add), so the gated adapter costs
two small products and one multiply per layer. With no gate set, peft's own forward runs.
"""
from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class _Adapter(NamedTuple):
    """A LoRA layer's active adapter, looked up once: peft's per-call lookups (active adapter,
    module dicts, the identity dropout) cost about 2 of a denoiser pass's 50 ms on the 2-core CPU."""
    lora_a: nn.Linear                # (in -> r)
    lora_b: nn.Linear                # (r -> out)
    scaling: float
    dropout: nn.Module | None        # None where it is the identity (dropout 0)


def _adapter(layer) -> _Adapter:
    (name,) = layer.active_adapters
    dropout = layer.lora_dropout[name]
    return _Adapter(layer.lora_A[name], layer.lora_B[name], layer.scaling[name],
                    None if isinstance(dropout, nn.Identity) else dropout)


class AdapterGate:
    """Made once the adapter is in place (`TwoTower.gate_adapter`): each layer's active adapter
    is looked up here, so a gate made before another adapter is activated acts with the old one.
    The base layer is read at every call (oneDNN packing swaps it after the gate is made)."""

    def __init__(self, model: nn.Module):
        self.gate: torch.Tensor | None = None                      # (B, S, 1) while set
        self._scaled: dict = {}                                     # (scaling, dtype) -> gate * scaling
        from peft.tuners.lora import Linear
        layers = [m for m in model.modules() if isinstance(m, Linear)]
        if not layers:
            raise ValueError("no LoRA adapter layers to gate (a clean_as_ar denoiser needs an unmerged adapter)")
        for layer in layers:
            layer.forward = functools.partial(self._forward, layer, _adapter(layer), layer.forward)

    def _forward(self, layer, adapter: _Adapter, peft_forward, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """One LoRA linear layer under the gate (x: (B, S, in) -> (B, S, out))."""
        if self.gate is None or args or kwargs or layer.disable_adapters or layer.merged:
            return peft_forward(x, *args, **kwargs)
        y = layer.base_layer(x)                                                   # (B, S, out)
        h = F.linear(x if adapter.dropout is None else adapter.dropout(x), adapter.lora_a.weight)   # (B, S, r)
        h = h * self._gate(adapter.scaling, h.dtype)
        if torch.is_grad_enabled():
            return y + adapter.lora_b(h)
        flat = y.view(-1, y.shape[-1])
        flat.addmm_(h.reshape(-1, h.shape[-1]), adapter.lora_b.weight.t())        # y += h B^T in place
        return y

    def _gate(self, scaling: float, dtype: torch.dtype) -> torch.Tensor:
        """gate * scaling in dtype, made once per pass."""
        key = (scaling, dtype)
        if key not in self._scaled:
            self._scaled[key] = self.gate.to(dtype) * scaling
        return self._scaled[key]

    @contextlib.contextmanager
    def __call__(self, gate: torch.Tensor):
        """Gate the adapter's update per token (gate: (B, S, 1), 1 = adapted) inside the block."""
        self.gate, self._scaled = gate, {}
        try:
            yield
        finally:
            self.gate, self._scaled = None, {}
