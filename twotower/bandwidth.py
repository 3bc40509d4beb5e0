"""The memory-bandwidth bound of decoding: the weight bytes one pass reads, over a GPU's bandwidth.

At batch 1 an AR decode step and a denoiser pass read (nearly) every weight once, so their best
time is weight bytes / bandwidth. MoE layers read only the experts a pass routes to: one
token's top-k, or for a block of tokens the expected distinct experts under uniform routing.
"""
from __future__ import annotations

import torch

from .random_weights import meta_twotower

BANDWIDTH_GBPS = (("H100 PCIe", 2000.0), ("H100 NVL", 3900.0), ("H100", 3350.0), ("H200", 4800.0))


def default_bandwidth(device) -> float | None:
    """Peak HBM bandwidth (GB/s) of a known GPU by name; None on CPU or an unknown GPU."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((gbps for key, gbps in BANDWIDTH_GBPS if key in name), None)


def expected_experts(num_experts: int, top_k: int, tokens: int) -> float:
    """Expected distinct experts a pass over `tokens` tokens touches, routing uniform at random."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def weight_bytes(lm, tokens: int) -> dict:
    """Weight bytes one forward pass of `lm` over `tokens` tokens reads from memory.

    Dense matrices are read once per pass; an untied input embedding only for the rows used;
    routed experts (3-D parameters of an experts module) for the expected distinct experts
    hit (exact at one token; uniform random routing above). Caches and activations excluded.
    """
    emb, out = lm.get_input_embeddings().weight, lm.get_output_embeddings().weight
    top_k = int(getattr(lm.config, "num_experts_per_tok", 0) or 0)
    total = experts = 0.0
    seen = set()
    for module in lm.modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            nbytes = p.numel() * p.element_size()
            if p is emb and emb is not out:
                nbytes = min(tokens, p.shape[0]) * p.shape[1] * p.element_size()
            elif p.dim() == 3 and getattr(module, "num_experts", None) == p.shape[0] and top_k:
                nbytes *= expected_experts(p.shape[0], top_k, tokens) / p.shape[0]
                experts += nbytes
            total += nbytes
    params = sum(p.numel() for p in lm.parameters())
    return {"tokens": tokens, "bytes": total, "routed_expert_bytes": experts, "params": params}


def bandwidth_report(model, batch: int, block: int, gbps: float | None, ar: dict, diffusion: dict) -> dict:
    """The memory-bandwidth bound of an AR decode step and of a denoiser pass, and how close we are."""
    step = weight_bytes(model.context_lm, batch)
    tokens = batch * (block + int(model.anchor))
    denoise = weight_bytes(model.denoiser_lm, tokens)
    out = {"gbps": gbps, "ar_step_weight_bytes": int(step["bytes"]), "ar_step_weight_gb": round(step["bytes"] / 1e9, 4),
           "denoiser_pass_weight_bytes": int(denoise["bytes"]),
           "denoiser_pass_weight_gb": round(denoise["bytes"] / 1e9, 4), "denoiser_pass_tokens": tokens,
           "context_params": step["params"], "denoiser_params": denoise["params"],
           "ar_bound_tokens_per_second": None, "ar_fraction_of_bound": None,
           "denoiser_bound_ms_per_pass": None, "denoiser_fraction_of_bound": None}
    if gbps:
        bound = batch * gbps * 1e9 / step["bytes"]
        out["ar_bound_tokens_per_second"] = round(bound, 1)
        if ar.get("decode_tokens_per_second"):
            out["ar_fraction_of_bound"] = round(ar["decode_tokens_per_second"] / bound, 4)
        bound_ms = denoise["bytes"] / (gbps * 1e9) * 1e3
        out["denoiser_bound_ms_per_pass"] = round(bound_ms, 4)
        if diffusion.get("denoiser_ms_per_pass"):
            out["denoiser_fraction_of_bound"] = round(bound_ms / diffusion["denoiser_ms_per_pass"], 4)
    return out


def plan(config, batch: int, block: int, bandwidth: float | None) -> dict:
    """Parameter counts, weight bytes per pass and bandwidth bounds of a config, built on meta."""
    model = meta_twotower(config)
    dtype = torch.bfloat16
    for _, t in list(model.named_parameters()):
        t.data = t.data.to(dtype)
    out = bandwidth_report(model, batch, block, bandwidth, {}, {})
    out["bytes_per_param"] = 2
    out["both_towers_gb"] = round(sum(p.numel() for p in model.parameters()) * 2 / 1e9, 2)
    return out
