"""The CPU's fast paths for linear layers in float32: oneDNN-packed weights, else MKL's head layout.

PyTorch multiplies float32 matrices on the CPU with MKL, which runs the few-row products of
decoding (1 row per AR step, about 17 per denoiser pass) far below memory speed. oneDNN, given
each weight reordered once into its blocked layout, runs them two to three times as fast:
SmolLM2's 211 linear layers in a row at 2 threads (AVX-512, cold caches) take 13.0 against 33.7
ms for one row and 21.7 against 66.4 ms for 16 (`bench/linear_layers.py`; bench/RESULTS.md,
"oneDNN-packed linear layers"). Outputs equal F.linear's to float32 rounding (the summation
order differs).

`prepare` (run by checkpoints.load) swaps every float32 CPU nn.Linear with at least MIN_SIDE
inputs and outputs for a `PackedLinear`, which keeps the original weight and bias as
parameters (what parameter counts, tied embeddings, state dicts and saving read) and runs
PyTorch's oneDNN ops (`torch.ops.mkldnn`) on the packed copy; autograd, autocast, other dtypes
and devices take F.linear. Narrower layers (a LoRA adapter's rank-32 A and B) stay plain: a
packed call carries ~11 us of overhead, more than such products cost on MKL. Equal weights (a
denoiser copied from its context tower) share one packed copy; a weight written in place or
replaced is packed again on its next call (see PackedLinear). Where packing is off or
unavailable (not x86 AVX2/AVX-512), the AR head gets MKL's faster one-row layout instead
(`head_for_one_row`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MIN_SIDE = 128                # layers with fewer inputs or outputs (a LoRA adapter's A and B) stay plain


def available() -> bool:
    """Whether this PyTorch build and CPU pack linear weights for oneDNN (measured on x86 only)."""
    mkldnn, ops = torch.backends.mkldnn, torch.ops.mkldnn
    return (mkldnn.is_available() and mkldnn.enabled and torch.backends.cpu.get_cpu_capability().startswith("AVX")
            and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise"))


def _reorder(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w.detach())    # opaque oneDNN tensor


def _version(w: torch.Tensor) -> int:
    return 0 if w.is_inference() else w._version                # inference tensors keep no counter


def _fast_path_weight(w: torch.Tensor) -> bool:
    return w.device.type == "cpu" and w.dtype == torch.float32


class PackedLinear(nn.Module):
    """An nn.Linear that runs a oneDNN-packed copy of its weight on the CPU in float32.

    The copy follows the weight: the next call packs it again after the weight was written in
    place (load_state_dict, optimiser steps, in-place ops: its version counter moves) or
    replaced by another tensor (assignment, .to() round trips). Writes through `weight.data`
    move no counter: call `repack()` after them."""

    def __init__(self, linear: nn.Linear, packed: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias       # the originals, still parameters
        self._keep(packed)

    def _keep(self, packed: torch.Tensor | None) -> None:
        """Hold a packed copy of the current weight; `_source` keeps the weight's storage alive,
        so a replacement can never land at the address the copy was made from."""
        w = self.weight
        self.packed, self._source, self._packed_version = packed, w.detach(), _version(w)

    def repack(self) -> None:
        self._keep(_reorder(self.weight))

    def _stale(self) -> bool:
        w = self.weight
        return self.packed is None or w.data_ptr() != self._source.data_ptr() or _version(w) != self._packed_version

    def _fast(self, x: torch.Tensor) -> bool:
        w, b = self.weight, self.bias
        if x.device.type != "cpu" or x.dtype != torch.float32 or not _fast_path_weight(w):
            return False
        if torch.is_autocast_enabled("cpu"):
            return False
        return not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad
                                                 or (b is not None and b.requires_grad)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fast(x):
            return F.linear(x, self.weight, self.bias)
        if self._stale():
            self.repack()
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def _apply(self, fn, recurse=True):
        """.to(), .half(), .cuda() ...: a weight moved off the fast path frees its packed copy."""
        out = super()._apply(fn, recurse)
        if not _fast_path_weight(self.weight):
            self.packed = self._source = None
        return out

    def __getstate__(self) -> dict:
        """deepcopy and pickle: the opaque packed copy cannot be copied; it is made again on first
        use (one per layer: a copy's equal weights no longer share one)."""
        return {**self.__dict__, "packed": None, "_source": None}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed for oneDNN"


def _packable(module: nn.Module, min_side: int) -> bool:
    return (type(module) is nn.Linear and _fast_path_weight(module.weight)
            and min(module.in_features, module.out_features) >= min_side)


def pack_linears(model: nn.Module, min_side: int = MIN_SIDE) -> int:
    """Swap every float32 CPU nn.Linear with at least `min_side` inputs and outputs for a
    PackedLinear; returns how many (0 where `available()` is False)."""
    if not available():
        return 0
    packed: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}   # fingerprint -> [(weight, packed)]
    return _swap_children(model, lambda m: PackedLinear(m, _packed_weight(m.weight, packed))
                          if _packable(m, min_side) else None)


def _swap_children(model: nn.Module, swap) -> int:
    """Put swap(m) in place of every submodule m for which it returns a module; returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = swap(child)
            if new is not None:
                setattr(parent, name, new)
                count += 1
    return count


def _packed_weight(w: torch.Tensor, seen: dict) -> torch.Tensor:
    """w reordered for oneDNN, or the packed copy of an equal weight packed before."""
    sample = w.detach().reshape(-1)[:: max(1, w.numel() // 16)]
    key = (tuple(w.shape), tuple(sample.tolist()))
    for other, packed in seen.get(key, ()):
        if torch.equal(other, w):
            return packed
    packed = _reorder(w)
    seen.setdefault(key, []).append((w, packed))
    return packed


def unpack_linears(model: nn.Module) -> int:
    """Put plain nn.Linear layers back (the same parameters); returns how many. torch.compile
    wants them: its CPU backend lays weights out its own way and rejects packed ones."""
    return _swap_children(model, lambda m: _plain(m) if isinstance(m, PackedLinear) else None)


def _plain(layer: PackedLinear) -> nn.Linear:
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    linear.weight, linear.bias = layer.weight, layer.bias
    return linear


def packed_layers(model: nn.Module) -> list[PackedLinear]:
    return [m for m in model.modules() if isinstance(m, PackedLinear)]


def packed_bytes(model: nn.Module) -> int:
    """Memory the packed copies hold, each once."""
    unique = {id(m.packed): m.packed for m in packed_layers(model) if m.packed is not None}
    return sum(p.numel() * p.element_size() for p in unique.values())


def head_for_one_row(lm) -> None:
    """Without packing, on the CPU in float32, keep the AR head's weight (V, H) as the transpose
    of a contiguous (H, V) matrix: MKL multiplies one row by it in half the time (SmolLM2's head,
    2 threads: 5.8 against 10.1 ms; 58.5 against 63.4 ms per AR step), and from 4 rows on both
    layouts cost the same. A tied input embedding stays tied to it: its rows are then strided,
    which costs a few microseconds per token looked up (1 ms for a 500-token prompt)."""
    head, embedding = lm.get_output_embeddings(), lm.get_input_embeddings()
    w = head.weight
    if type(head) is not nn.Linear or not _fast_path_weight(w) or w.stride(0) == 1:
        return
    relaid = nn.Parameter(w.detach().t().contiguous().t(), requires_grad=w.requires_grad)
    if embedding is not None and embedding.weight is w:
        embedding.weight = relaid
    head.weight = relaid


def prepare(model, pack: bool = True) -> None:
    """A loaded TwoTower's linear layers for the CPU in float32 (elsewhere nothing changes):
    oneDNN-packed where `pack` and `available()`, else the AR head in MKL's one-row layout."""
    if not (pack and pack_linears(model)):
        head_for_one_row(model.context_lm)


def unprepare(model) -> None:
    """Plain layers again (for torch.compile), with the head in MKL's one-row layout."""
    unpack_linears(model)
    head_for_one_row(model.context_lm)
