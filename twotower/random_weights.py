"""TwoTower models with random weights, built from a backbone config: for benchmarks and for
proving the full-size path where the release's weights cannot be had.

`random_model("nemotron-h-release", "cuda", torch.bfloat16)` builds both towers on the meta
device and materialises them once, directly on the target device in the target dtype.
A bare name is a file of bench/configs/ ('-' read as '_').
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).resolve().parent.parent / "bench" / "configs"
RANDOM_MASK_ID = 3                                         # the release's mask id


def config_path(name_or_path: str) -> Path:
    """A config file path, or bench/configs/NAME.json for a bare name ('-' read as '_')."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise ValueError(f"random-weights config not found: {path}")
        return path
    named = CONFIG_DIR / f"{name_or_path.replace('-', '_')}.json"
    if not named.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
        raise ValueError(f"no config named {name_or_path!r} in {CONFIG_DIR} (known: {known})")
    return named


def read_config(path: Path):
    """A transformers config from a JSON file (remote-code and comment fields dropped)."""
    from transformers import CONFIG_MAPPING

    try:
        raw = json.loads(Path(path).read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    model_type = raw.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"{path}: unknown model_type {model_type!r}")
    fields = {k: v for k, v in raw.items()
              if not k.startswith("_") and k not in ("architectures", "auto_map", "torch_dtype", "dtype")}
    return CONFIG_MAPPING[model_type].from_dict(fields)


def meta_twotower(config, name: str = "random"):
    """Both towers and the time conditioning on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    from .model import TwoTower

    with torch.device("meta"):
        context_lm = AutoModelForCausalLM.from_config(config).eval()
        denoiser_lm = AutoModelForCausalLM.from_config(copy.deepcopy(config)).eval()
        return TwoTower(context_lm, denoiser_lm, RANDOM_MASK_ID, name=name).eval()


def _keep_fp32(lm) -> tuple[str, ...]:
    """Names transformers keeps in fp32 whatever the dtype (Nemotron-H: the router's score bias)."""
    return tuple(getattr(lm, "_keep_in_fp32_modules_strict", None) or ())


@torch.no_grad()
def materialise(model, device, dtype: torch.dtype, context_device=None, seed: int = 0):
    """Allocate a meta TwoTower on its devices in `dtype` (once, no copy) and fill random weights.

    The context tower goes to `context_device` (default `device`), the rest to `device`.
    Parameters take `dtype`, except those transformers keeps in fp32; buffers keep their dtype.
    """
    keep = _keep_fp32(model.context_lm)
    for name, param in model.named_parameters():
        if param.is_floating_point() and not any(k in name for k in keep):
            param.data = param.data.to(dtype)                     # meta: free
    model.context_lm.to_empty(device=context_device or device)
    model.denoiser_lm.to_empty(device=device)
    model.time.to_empty(device=device)
    init_random_(model.context_lm, seed)
    init_random_(model.denoiser_lm, seed + 1)
    init_random_(model.time, seed + 2)
    model.time.reset_to_identity()
    return model.eval()


@torch.no_grad()
def init_random_(module, seed: int, std: float | None = None) -> None:
    """Random weights in place: matrices N(0, std), norms 1, biases and buffers 0, Mamba A/D/dt
    as the backbone initialises them, rotary frequencies recomputed from the config."""
    config = getattr(module, "config", None)
    std = std or float(getattr(config, "initializer_range", 0.02) or 0.02)
    gens = {}
    for name, p in module.named_parameters():
        gen = gens.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("A_log", "D", "dt_bias"):
            continue                                              # set by the mixer's own init below
        if p.dim() >= 2:
            p.normal_(0.0, std, generator=gen)
        elif "norm" in name or "layernorm" in name:
            p.fill_(1.0)
        else:
            p.zero_()
    for _, b in module.named_buffers():
        if b.is_floating_point():
            b.zero_()
    for m in module.modules():
        if hasattr(m, "init_nemotron_h_mamba2_weights"):
            m.init_nemotron_h_mamba2_weights()
        if hasattr(m, "inv_freq") and hasattr(m, "config"):      # RoPE: a fresh module's buffers
            fresh = type(m)(m.config)
            for key, value in fresh.named_buffers():
                setattr(m, key, value.to(m.inv_freq.device))
            m.attention_scaling = getattr(fresh, "attention_scaling", 1.0)


def random_model(name_or_path: str, device: str, dtype: torch.dtype, context_device=None, seed: int = 0):
    """A TwoTower with random weights built from a config file (see `config_path`)."""
    path = config_path(name_or_path)
    model = meta_twotower(read_config(path), name=f"random:{path.stem}")
    return materialise(model, device, dtype, context_device, seed)
