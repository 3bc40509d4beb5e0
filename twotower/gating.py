"""A per-token gate on a LoRA adapter: its update acts only where the gate is 1.

With it, a denoiser built as base + adapter computes the base model exactly at the positions
the gate closes (the clean tokens of a `clean_as_ar` denoiser) and the adapted model elsewhere,
in one pass. It hooks the output of every `lora_B` layer of peft's LoRA layers; with no gate set the
adapter runs as usual.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


class AdapterGate:
    def __init__(self, model: nn.Module):
        self.gate: torch.Tensor | None = None                      # (B, S, 1) while set
        from peft.tuners.lora import LoraLayer
        self.layers = [b for m in model.modules() if isinstance(m, LoraLayer) for b in m.lora_B.values()]
        if not self.layers:
            raise ValueError("no LoRA adapter layers to gate (a clean_as_ar denoiser needs an unmerged adapter)")
        for layer in self.layers:
            layer.register_forward_hook(self._scale)

    def _scale(self, module, args, out: torch.Tensor) -> torch.Tensor:
        return out if self.gate is None else out * self.gate.to(out.dtype)

    @contextlib.contextmanager
    def __call__(self, gate: torch.Tensor):
        """Gate the adapter's update per token (gate: (B, S, 1), 1 = adapted) inside the block."""
        self.gate = gate
        try:
            yield
        finally:
            self.gate = None
