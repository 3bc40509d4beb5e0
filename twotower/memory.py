"""Memory: the weight bytes each part of a TwoTower holds, and the peak memory of a run."""
from __future__ import annotations

import resource

import torch

from .cpu_linear import packed_bytes


def tensor_bytes(modules, exclude: set[int] = frozenset()) -> tuple[int, set[int]]:
    """Bytes of the parameters and buffers of `modules`, each tensor once and none in `exclude`
    (ids); returns (bytes, ids counted)."""
    seen, total = set(exclude), 0
    for module in modules:
        for t in (*module.parameters(), *module.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total, seen - set(exclude)


def part_sizes(model) -> dict:
    """Bytes of weights (parameters and buffers) per part: the context tower, and what the
    denoiser adds to it (its backbone unless it shares the context tower's, adapter, time
    conditioning, mask vector); and the oneDNN-packed copies of both (twotower.cpu_linear)."""
    context, counted = tensor_bytes([model.context_lm])
    denoiser, _ = tensor_bytes([model], exclude=counted)
    return {"context_weight_bytes": context, "denoiser_weight_bytes": denoiser,
            "packed_weight_bytes": packed_bytes(model)}


def reset_peak(device) -> None:
    """Start a new CUDA peak-memory window on every GPU (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)


def peak_memory_gb(device) -> dict:
    """CUDA: max_memory_allocated since the last reset, summed over GPUs and per GPU used; CPU: the
    process's peak RSS (ru_maxrss, process-wide, never reset)."""
    if torch.device(device).type == "cuda":
        per = {f"cuda:{i}": torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())}
        return {"kind": "cuda_max_memory_allocated", "gb": round(sum(per.values()) / 1e9, 3),
                "by_device": {k: round(v / 1e9, 3) for k, v in per.items() if v}}
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss      # kilobytes on Linux
    return {"kind": "process_peak_rss", "gb": round(kb * 1024 / 1e9, 3)}
