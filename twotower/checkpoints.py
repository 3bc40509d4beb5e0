"""Model specs and checkpoints (safetensors only, never pickle, never remote code).

A model SPEC names what to load:
  default | None          the shipped default: assets/default_model (SmolLM2 + trained denoiser)
  smollm2                 SmolLM2-135M-Instruct as context tower, denoiser initialised from it
  DIR with twotower.json  our own format (see `save`)
  DIR with the release's layout  config.json + safetensors with context_tower.* / denoiser_tower.*
  DIR of a plain AR model  (config.json + safetensors) as context tower, denoiser initialised from it
  ctx=DIR,denoiser=FILE   a plain AR checkpoint plus a denoiser file saved by `save`
  ORG/NAME                a hub id, read from the local hub cache only (never downloaded here)
  random:NAME             random weights from bench/configs/NAME.json (or random:PATH.json), built
                          on the meta device and materialised once on the target device

Our format, a directory:
  twotower.json        {"format": "twotower", "context": ..., "mask_token_id", "learned_mask",
                        "anchor", "clean_as_ar" (see TwoTower.reading_clean_as_ar),
                        "denoiser": "lora" | "full", "lora": {...},
                        "sampler": {...} optional: SamplerConfig settings this denoiser is
                        best run with (e.g. {"remasking": "leftmost"}); the CLI, the app and
                        the benchmarks start from them, and any setting given overrides them}
  denoiser.safetensors time.* (adaLN-single), mask_embedding, and lora.* (peft adapter
                        weights) or denoiser.* (a full denoiser state dict)
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import SpecError
from .model import TwoTower
from .cpu_linear import prepare as prepare_cpu_linears
from .sampling import SamplerConfig

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = ROOT / "assets" / "default_model"
FORMAT = "twotower"
SMOLLM2_MASK_ID = 16   # "<empty_output>": a special token that never occurs in text
RANDOM = "random:"     # spec prefix of random weights from a config (twotower.random_weights)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str) -> str:
    """The device string, or SpecError when torch cannot place a model there."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise SpecError(f"unknown device {device!r}: expected cpu, cuda or cuda:N") from None
    if kind not in ("cpu", "cuda"):
        raise SpecError(f"device {device!r} is not supported: expected cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise SpecError(f"device {device!r} asked for, but no CUDA device is available")
    return device


def default_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """load_file with clear errors for a missing or corrupt file."""
    if not Path(path).is_file():
        raise SpecError(f"weights file not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise SpecError(f"{path} is not a readable safetensors file ({e})") from None


# ---- plain AR models -------------------------------------------------------------------
def load_ar(source: str | Path, device: str, dtype: torch.dtype):
    """(model, tokenizer or None) of a plain transformers CausalLM from a local dir or 'smollm2'."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if str(source) == "smollm2":
        from . import smollm2
        source = smollm2.local_dir()
    path = Path(source)
    if not (path / "config.json").is_file():
        raise SpecError(f"{path} has no config.json: not a transformers model directory")
    if not list(path.glob("*.safetensors")):
        raise SpecError(f"{path} holds no .safetensors weights (pickled weights are never loaded)")
    config = AutoConfig.from_pretrained(path)
    from .backbones import family_for
    family_for(config)                                   # unsupported architecture -> clear error
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True).to(device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tokenizer = None
    if _bpe(tokenizer):
        tokenizer.clean_up_tokenization_spaces = False   # transformers ignores it for BPE, with a warning per decode
    return model, tokenizer


def _bpe(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and type(backend.model).__name__ == "BPE"


# ---- our format --------------------------------------------------------------------------
META_TYPES = {"format": str, "context": str, "name": str, "mask_token_id": int, "learned_mask": bool,
              "anchor": bool, "clean_as_ar": bool, "denoiser": str, "lora": dict,   # "sampler": sampler_defaults
              "eval_items_seen": list}
LORA_TYPES = {"r": int, "alpha": (int, float), "target_modules": list}


def read_meta(path: Path) -> dict:
    """A checkpoint's twotower.json, parsed and checked field by field (SpecError names the
    file and the first field that is wrong)."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise SpecError(f"{path} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise SpecError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise SpecError(f"{path} must hold a JSON object, got {type(meta).__name__}")
    for key, kind in META_TYPES.items():
        _check_field(path, key, meta.get(key), kind)
    if meta.get("denoiser", "lora") not in ("lora", "full"):
        raise SpecError(f"{path}: unknown denoiser kind {meta['denoiser']!r} (expected 'lora' or 'full')")
    if meta.get("denoiser", "lora") == "lora" and "lora" in meta:
        for key, kind in LORA_TYPES.items():
            if key not in meta["lora"]:
                raise SpecError(f"{path}: 'lora' lacks {key!r}")
            _check_field(path, f"lora.{key}", meta["lora"][key], kind)
        if meta["lora"]["r"] < 1:
            raise SpecError(f"{path}: 'lora.r' must be >= 1, got {meta['lora']['r']}")
    return meta


def _check_field(path: Path, key: str, value, kind) -> None:
    """SpecError unless the field is absent (None) or of its type (a bool is not an int here)."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if value is None or (isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)):
        return
    names = " or ".join(k.__name__ for k in kinds)
    raise SpecError(f"{path}: {key!r} must be {names}, got {value!r}")


def lora_config(meta: dict):
    from peft import LoraConfig
    return LoraConfig(r=meta["r"], lora_alpha=meta["alpha"], target_modules=meta["target_modules"],
                      lora_dropout=0.0, bias="none")


def build(context_lm, tokenizer, mask_token_id: int, learned_mask: bool, name: str,
          anchor: bool = False, share_base: bool = False, clean_as_ar: bool = False) -> TwoTower:
    """A TwoTower whose denoiser is an untrained copy of the context tower (the paper's init).

    share_base: the denoiser IS the context tower's module (no copy), for an adapter that is
    then kept unmerged and switched off whenever the context tower runs (half the memory).
    """
    denoiser = context_lm if share_base else copy.deepcopy(context_lm).requires_grad_(False)
    model = TwoTower(context_lm, denoiser, mask_token_id, tokenizer, name=name, learned_mask=learned_mask,
                     anchor=anchor, clean_as_ar=clean_as_ar)
    return model.to(device=context_lm.device, dtype=context_lm.dtype)


def sampler_defaults(meta: dict) -> dict:
    """A checkpoint's recommended sampler settings (twotower.json "sampler"), checked."""
    settings = meta.get("sampler", {})
    if not isinstance(settings, dict):
        raise SpecError(f"twotower.json 'sampler' must be an object of sampler settings, got {settings!r}")
    unknown = sorted(set(settings) - set(SamplerConfig.__dataclass_fields__))
    if unknown:
        raise SpecError(f"twotower.json 'sampler' has unknown settings {unknown}; "
                        f"known: {', '.join(SamplerConfig.__dataclass_fields__)}")
    try:
        SamplerConfig.from_dict(settings).validate()
    except (TypeError, ValueError) as e:
        raise SpecError(f"twotower.json 'sampler': {e}") from None
    return dict(settings)


def apply_meta(model: TwoTower, meta: dict) -> None:
    """What a checkpoint says about its denoiser beyond weights: the evaluation items its
    training saw ("eval_items_seen") and the sampler settings it is best run with ("sampler")."""
    model.eval_items_seen = frozenset(meta.get("eval_items_seen", ()))
    model.sampler_defaults = sampler_defaults(meta)


def _ctx_parts(spec: str) -> dict[str, str]:
    """'ctx=DIR,denoiser=FILE[,mask=ID]' as {'ctx': DIR, 'denoiser': FILE, ...}."""
    return dict(p.split("=", 1) for p in spec.split(",") if "=" in p)


def _meta_path(spec: str | None) -> Path:
    """Where a spec's twotower.json would be (for ctx=DIR,denoiser=FILE: beside the denoiser file)."""
    if spec in (None, "", "default"):
        return DEFAULT_DIR / "twotower.json"
    if spec.startswith("ctx="):
        return Path(_ctx_parts(spec).get("denoiser", "")).with_name("twotower.json")
    return Path(spec) / "twotower.json"


def recommended_settings(spec: str | None) -> dict:
    """The "sampler" settings of the checkpoint a spec names, read from its twotower.json alone
    (no weights loaded); {} for specs without one. Loading the model reports a broken file."""
    try:
        return sampler_defaults(read_meta(_meta_path(spec)))
    except (OSError, ValueError, SpecError):
        return {}


def settings_before_loading(spec: str | None) -> dict | None:
    """recommended_settings where a spec's files tell them without loading the model; None where
    only loading can (a hub id resolves to its cached files then): checks of the settings the
    run will use wait for the model there."""
    local = (spec in (None, "", "default", "smollm2") or spec.startswith((RANDOM, "ctx="))
             or Path(spec).is_dir())
    return recommended_settings(spec) if local else None


def apply_denoiser_file(model: TwoTower, meta: dict, weights: dict[str, torch.Tensor]) -> TwoTower:
    """Put saved denoiser weights into a freshly built model (LoRA merged into the copy), with
    what its twotower.json says beyond weights (`apply_meta`)."""
    def part(prefix):
        return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}

    apply_meta(model, meta)
    missing, unexpected = model.time.load_state_dict(part("time."), strict=False)
    if missing:
        raise SpecError(f"denoiser file lacks time-conditioning weights: {missing[:3]}...")
    if model.mask_embedding is not None:
        if "mask_embedding" not in weights:
            raise SpecError("denoiser file lacks 'mask_embedding' although learned_mask is set")
        model.mask_embedding.data.copy_(weights["mask_embedding"])
    kind = meta.get("denoiser", "lora")
    if kind == "lora":
        from peft import get_peft_model, set_peft_model_state_dict
        if "lora" not in meta:
            raise SpecError("twotower.json says the denoiser is a LoRA adapter but has no 'lora' settings")
        peft_model = get_peft_model(model.denoiser_lm, lora_config(meta["lora"]))
        result = set_peft_model_state_dict(peft_model, part("lora."))
        if getattr(result, "unexpected_keys", None):
            raise SpecError(f"LoRA weights do not fit this backbone: {result.unexpected_keys[:3]}...")
        if model.shares_base:
            model.adapter = peft_model              # kept unmerged; off while the context tower runs
        if model.clean_as_ar:
            model.gate_adapter()                    # kept unmerged: it acts on masked positions only
        elif not model.shares_base:
            model.denoiser_lm = peft_model.merge_and_unload()
            model.family.denoiser_lm = model.denoiser_lm
    elif model.shares_base:
        raise SpecError("share_base needs a LoRA denoiser; this checkpoint holds a full denoiser")
    elif model.clean_as_ar:
        raise SpecError("clean_as_ar needs a LoRA denoiser (its update is gated per token); "
                        "this checkpoint holds a full denoiser")
    else:                                           # "full": read_meta refuses any other kind
        sd = part("denoiser.")
        try:
            model.denoiser_lm.load_state_dict(sd, strict=False)
        except RuntimeError as e:
            raise SpecError(f"denoiser weights do not fit the context tower's shapes: {e}") from None
    return model.to(dtype=model.context_lm.dtype)


def load_own(path: Path, device: str, dtype: torch.dtype, share_base: bool = False) -> TwoTower:
    meta = read_meta(path / "twotower.json")
    if meta.get("format") != FORMAT:
        raise SpecError(f"{path}/twotower.json is not a TwoTower checkpoint (format={meta.get('format')!r})")
    missing = [key for key in ("context", "mask_token_id") if key not in meta]
    if missing:
        raise SpecError(f"{path}/twotower.json lacks {', '.join(map(repr, missing))}")
    context_src = meta["context"]
    if context_src not in ("smollm2",) and not os.path.isabs(context_src):
        context_src = str((path / context_src).resolve())
    ctx, tok = load_ar(context_src, device, dtype)
    model = build(ctx, tok, meta["mask_token_id"], meta.get("learned_mask", False), meta.get("name", path.name),
                  anchor=meta.get("anchor", False), share_base=share_base, clean_as_ar=meta.get("clean_as_ar", False))
    return apply_denoiser_file(model, meta, read_safetensors(path / "denoiser.safetensors")).eval()


def denoiser_state(model: TwoTower, lora_model=None) -> dict[str, torch.Tensor]:
    """The weights that make a denoiser out of its context tower: time.*, mask, lora.* or denoiser.*."""
    out = {f"time.{k}": v for k, v in model.time.state_dict().items()}
    if model.mask_embedding is not None:
        out["mask_embedding"] = model.mask_embedding.data
    if lora_model is not None:
        from peft import get_peft_model_state_dict
        out.update({f"lora.{k}": v for k, v in get_peft_model_state_dict(lora_model).items()})
    else:
        out.update({f"denoiser.{k}": v for k, v in model.denoiser_lm.state_dict().items()})
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def save(model: TwoTower, path: str | Path, context: str, lora_model=None, lora: dict | None = None,
         dtype: torch.dtype = torch.bfloat16, extra: dict | None = None) -> Path:
    """Write our format. context: 'smollm2' or a path to the AR model directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in denoiser_state(model, lora_model).items()}
    seen = set()        # tied weights (embeddings = lm_head) share storage, which save_file refuses
    for k, v in tensors.items():
        if v.untyped_storage().data_ptr() in seen:
            tensors[k] = v.clone()
        seen.add(tensors[k].untyped_storage().data_ptr())
    meta = {"format": FORMAT, "version": 1, "name": model.name, "context": context,
            "mask_token_id": model.mask_token_id, "learned_mask": model.mask_embedding is not None,
            "anchor": model.anchor, "clean_as_ar": model.clean_as_ar,
            "denoiser": "lora" if lora_model is not None else "full", **(extra or {})}
    if model.eval_items_seen:
        meta["eval_items_seen"] = sorted(model.eval_items_seen)
    if model.sampler_defaults:
        meta["sampler"] = dict(model.sampler_defaults)
    if lora_model is not None:
        meta["lora"] = lora
    save_file(tensors, str(path / "denoiser.safetensors"))
    (path / "twotower.json").write_text(json.dumps(meta, indent=2))
    return path


# ---- specs --------------------------------------------------------------------------------
def load(spec: str | None = None, device: str | None = None, dtype: torch.dtype | None = None,
         share_base: bool = False, context_device: str | None = None, seed: int = 0,
         pack: bool = True) -> TwoTower:
    """Resolve a model spec (see the module docstring) into a ready TwoTower in eval mode.

    share_base: for a LoRA checkpoint in our format, keep ONE backbone in memory and run the
    adapter unmerged (less memory, a little slower); by default the adapter is merged into a
    copy of the backbone. context_device: put the context tower there (e.g. a second GPU), for
    random weights and release directories. seed: the random weights' seed. pack: on the CPU in
    float32, run the linear layers on oneDNN-packed weights (twotower.cpu_linear; outputs equal
    to float32 rounding, 1.5-1.9x faster decoding on the 2-core CPU, and memory for the packed
    copies: +0.5 GB for the default model, whose denoiser shares its context tower's; a full
    second copy of every large linear weight otherwise); False keeps PyTorch's own layers.
    """
    if spec and spec.startswith(RANDOM):
        model = _load_random(spec[len(RANDOM):], device, dtype, share_base, context_device, seed)
    elif context_device is not None:
        model = _load_release_split(spec, device, dtype, context_device)
    else:
        model = _load(spec, device, dtype, share_base)
    prepare_cpu_linears(model, pack)
    return model


def _load_random(source: str, device: str | None, dtype: torch.dtype | None, share_base: bool,
                 context_device: str | None, seed: int) -> TwoTower:
    """Random weights from a config (twotower.random_weights), the context tower on context_device."""
    from .random_weights import random_model
    if not source:
        raise SpecError("random: needs a config: random:NAME (bench/configs/NAME.json) or random:PATH.json")
    if share_base:
        raise SpecError("share_base works for LoRA checkpoints in our format; random weights are not one")
    device = check_device(device or default_device())
    context_device = check_device(context_device) if context_device else None
    try:
        return random_model(source, device, dtype or default_dtype(device), context_device, seed).eval()
    except ValueError as e:
        raise SpecError(str(e)) from None


def _load_release_split(spec: str | None, device: str | None, dtype: torch.dtype | None,
                        context_device: str) -> TwoTower:
    """A release directory with its context tower on another device (two GPUs)."""
    from . import release
    if not (spec and release.is_release_dir(spec)):
        raise SpecError("a separate context device (--context-device) works with random weights or a release "
                        "directory only")
    device = check_device(device or default_device())
    return release.load_release(spec, device, dtype or default_dtype(device),
                                context_device=check_device(context_device)).eval()


def _load(spec: str | None, device: str | None, dtype: torch.dtype | None, share_base: bool) -> TwoTower:
    device = check_device(device or default_device())
    dtype = dtype or default_dtype(device)
    if spec in (None, "", "default"):
        if not (DEFAULT_DIR / "twotower.json").is_file():
            return _load("smollm2", device, dtype, False)
        spec = str(DEFAULT_DIR)
    if share_base and not (Path(spec) / "twotower.json").is_file():
        raise SpecError(f"share_base works for LoRA checkpoints in our format; {spec!r} is not one")
    if spec == "smollm2":
        ctx, tok = load_ar("smollm2", device, dtype)
        return build(ctx, tok, SMOLLM2_MASK_ID, learned_mask=True, name="smollm2-untrained-denoiser",
                     anchor=True).eval()
    if spec.startswith("ctx="):
        parts = _ctx_parts(spec)
        if "denoiser" not in parts:
            raise SpecError("spec 'ctx=DIR,denoiser=FILE' needs both parts")
        weights = read_safetensors(Path(parts["denoiser"]))
        meta_path = _meta_path(spec)
        meta = read_meta(meta_path) if meta_path.is_file() else {"denoiser": "full"}
        ctx, tok = load_ar(parts["ctx"], device, dtype)
        mask_id = int(parts.get("mask", meta.get("mask_token_id", SMOLLM2_MASK_ID)))
        model = build(ctx, tok, mask_id, "mask_embedding" in weights, Path(parts["ctx"]).name,
                      anchor=meta.get("anchor", False), clean_as_ar=meta.get("clean_as_ar", False))
        return apply_denoiser_file(model, meta, weights).eval()
    path = Path(spec)
    if path.is_dir():
        if (path / "twotower.json").is_file():
            return load_own(path, device, dtype, share_base)
        from . import release
        if release.is_release_dir(path):
            return release.load_release(path, device, dtype)
        ctx, tok = load_ar(path, device, dtype)
        return build(ctx, tok, SMOLLM2_MASK_ID if tok is None else _pick_mask(tok), False, path.name).eval()
    if path.exists():
        raise SpecError(f"model spec {spec!r} is a file; give its directory (or ctx=DIR,denoiser=FILE)")
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return _load_hub(spec, device, dtype, share_base)
    raise SpecError(f"unknown model spec {spec!r}: not 'default', 'smollm2', a directory, a hub id or random:NAME")


def _pick_mask(tokenizer) -> int:
    """A mask id for a plain AR model: its mask token if it has one, else an unused special."""
    if tokenizer.mask_token_id is not None:
        return tokenizer.mask_token_id
    specials = [i for i in tokenizer.all_special_ids if i not in (tokenizer.eos_token_id, tokenizer.bos_token_id)]
    return specials[-1] if specials else 0


def _load_hub(repo_id: str, device: str, dtype: torch.dtype, share_base: bool) -> TwoTower:
    """A hub id resolved from the local hub cache only; nothing is downloaded."""
    from huggingface_hub import snapshot_download
    try:
        local = snapshot_download(repo_id, local_files_only=True,
                                  allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    except Exception as e:  # huggingface_hub raises several types for "not cached"
        raise SpecError(f"hub model {repo_id!r} is not in the local hub cache ({type(e).__name__}); "
                        "download it on a connected machine first") from None
    return _load(local, device, dtype, share_base)
