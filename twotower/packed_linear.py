"""Linear layers whose weights oneDNN has packed once: the CPU's fast path in float32.

PyTorch multiplies float32 matrices on the CPU with MKL, which runs the few-row products of
decoding (1 row per AR step, up to ~17 per denoiser pass) far below memory speed. oneDNN, given
the weight reordered once into its own blocked layout, runs the same products about twice as
fast: SmolLM2's 211 linear layers at 2 threads (AVX-512), cold caches, 14.7 against 30.6 ms for
one row and 20.0 against 56.2 ms for 16 (bench/RESULTS.md, "oneDNN-packed linear layers"). The
results equal F.linear's to float32 rounding (summation order differs).

`pack_linears` swaps every nn.Linear of a model for a `PackedLinear` that keeps the original
weight and bias (what parameter counts, tied embeddings and saving read) and runs the packed
copy for inference on the CPU in float32; anything else (autograd, another device or dtype)
takes F.linear. Equal weights (a denoiser copied from its context tower) share one packed copy.
The packing ops are PyTorch's own (`torch.ops.mkldnn`, what torch.compile's CPU backend uses).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def available() -> bool:
    """Whether this PyTorch build packs linear weights for oneDNN."""
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))


class PackedLinear(nn.Module):
    """An nn.Linear that runs a oneDNN-packed copy of its weight on the CPU in float32."""

    def __init__(self, linear: nn.Linear, packed: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias       # the originals, still parameters
        self.packed = packed                                      # opaque oneDNN tensor, not a buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type != "cpu" or x.dtype != torch.float32 or self.weight.device.type != "cpu"
                or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed for oneDNN"


def _packable(module: nn.Module) -> bool:
    return (type(module) is nn.Linear and module.weight.device.type == "cpu"
            and module.weight.dtype == torch.float32)


def pack_linears(model: nn.Module) -> int:
    """Swap every float32 CPU nn.Linear in `model` for a PackedLinear; returns how many. Does
    nothing where `available()` is False. For inference: the model's weights must not change
    afterwards (the packed copies would not follow)."""
    if not available():
        return 0
    packed: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}   # fingerprint -> (weight, packed)
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _packable(child):
                setattr(parent, name, PackedLinear(child, _packed_weight(child.weight.detach(), packed)))
                count += 1
    return count


def _packed_weight(w: torch.Tensor, seen: dict) -> torch.Tensor:
    """w reordered for oneDNN, or the packed copy of an equal weight packed before."""
    sample = w.reshape(-1)[:: max(1, w.numel() // 16)]
    key = (tuple(w.shape), tuple(sample.tolist()))
    for other, packed in seen.get(key, ()):
        if other is w or torch.equal(other, w):
            return packed
    packed = torch.ops.mkldnn._reorder_linear_weight(w)
    seen.setdefault(key, []).append((w, packed))
    return packed


def unpack_linears(model: nn.Module) -> int:
    """Put plain nn.Linear layers back (with the same weights); returns how many. torch.compile
    wants them: its CPU backend lays out weights its own way and rejects packed ones."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, PackedLinear):
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                   device="meta")
                linear.weight, linear.bias = child.weight, child.bias
                setattr(parent, name, linear)
                count += 1
    return count


def packed_count(model: nn.Module) -> int:
    """How many of the model's linear layers run packed."""
    return sum(isinstance(m, PackedLinear) for m in model.modules())
