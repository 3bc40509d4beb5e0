"""The public release's checkpoint layout (Nemotron-H TwoTower), read and written locally.

A release directory holds the backbone's config.json (remote-code fields: model_type
nemotron_h, hybrid_override_pattern, architectures [NemotronHTwoTowerForCausalLM]) and
safetensors shards (model.safetensors, or shards listed by model.safetensors.index.json):

  context_tower.<backbone key>     -> context tower   model.<backbone key>
  context_lm_head.weight           -> context tower   lm_head.weight
  denoiser_tower.<backbone key>    -> denoiser        model.<backbone key>
  lm_head.weight                   -> denoiser        lm_head.weight
  t_embedder.mlp.{0,2}.*, t_block.1.*, scale_shift_tables.{i}  -> TwoTower.time

Backbone keys are the remote-code names (embeddings, layers.{i}.norm, layers.{i}.mixer.*,
norm_f), equal to transformers' native NemotronH names except the MoE experts: the release
stores `mixer.experts.{j}.up_proj.weight` / `down_proj.weight` per expert, the native module
one fused (E, out, in) parameter `mixer.experts.up_proj` / `down_proj`; they are stacked
while loading. The mask token id (3) is not in the config.

Loading builds both towers on the meta device and streams every tensor from the shards
straight into its place (cast, moved), so no weight is materialised twice. Never pickle,
never remote code.
"""
from __future__ import annotations

import copy
import json
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import SpecError
from .model import TwoTower

MASK_TOKEN_ID = 3
ARCHITECTURE = "NemotronHTwoTowerForCausalLM"
INDEX = "model.safetensors.index.json"
TOWERS = {"context_tower.": "context", "denoiser_tower.": "denoiser"}
HEADS = {"context_lm_head.weight": "context", "lm_head.weight": "denoiser"}
TIME_PREFIXES = ("t_embedder.", "t_block.", "scale_shift_tables.")
EXPERT = re.compile(r"^(?P<module>.+\.mixer\.experts)\.(?P<j>\d+)\.(?P<proj>up_proj|down_proj)\.weight$")
FUSED = re.compile(r"^(?P<module>.+\.mixer\.experts)\.(?P<proj>up_proj|down_proj)$")
IGNORED = re.compile(r"(^|\.)mtp\.")           # multi-token-prediction heads: not used here
# config.json fields of the remote code with no native counterpart (dropped before building)
REMOTE_ONLY = ("auto_map", "architectures", "torch_dtype", "dtype", "transformers_version")


# ---- reading the layout --------------------------------------------------------------------
def _shards(path: Path) -> list[Path]:
    index = path / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise SpecError(f"{index} is not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise SpecError(f"{path} lacks weight shard(s) named in {INDEX}: {', '.join(missing[:3])}"
                            + (" ..." if len(missing) > 3 else ""))
        return [path / f for f in files]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise SpecError(f"{path} holds no .safetensors weights (pickled weights are never loaded)")
    return files


def _keys(path: Path) -> list[str]:
    """Tensor names of a checkpoint directory, from its index or the shards' headers only."""
    from safetensors import safe_open

    index = path / INDEX
    if index.is_file():
        return list(json.loads(index.read_text())["weight_map"])
    keys = []
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            keys.extend(sf.keys())
    return keys


def is_release_dir(path) -> bool:
    """True when `path` looks like the release's layout (config.json + context/denoiser towers)."""
    path = Path(path)
    try:
        if not (path / "config.json").is_file():
            return False
        config = json.loads((path / "config.json").read_text())
        if any("TwoTower" in str(a) for a in config.get("architectures") or []):
            return True
        keys = _keys(path)
        return any(k.startswith("context_tower.") for k in keys) and any(k.startswith("denoiser_tower.") for k in keys)
    except Exception:   # unreadable config or shard: not recognisably the release
        return False


def release_config(path: Path):
    """The native transformers NemotronHConfig from the release's config.json (no remote code)."""
    from transformers import NemotronHConfig

    file = path / "config.json"
    if not file.is_file():
        raise SpecError(f"{path} has no config.json")
    try:
        raw = json.loads(file.read_text())
    except ValueError as e:
        raise SpecError(f"{file} is not valid JSON ({e})") from None
    model_type = raw.get("model_type")
    if model_type != "nemotron_h":
        raise SpecError(f"{path}: unsupported architecture {model_type!r} for the release layout "
                        f"(expected model_type 'nemotron_h', architectures [{ARCHITECTURE}])")
    fields = {k: v for k, v in raw.items() if k not in REMOTE_ONLY}
    if "layers_block_type" not in fields and "hybrid_override_pattern" not in fields:
        raise SpecError(f"{file} names no layer pattern (hybrid_override_pattern or layers_block_type)")
    try:
        config = NemotronHConfig.from_dict(fields)
    except (TypeError, ValueError, KeyError) as e:
        raise SpecError(f"{file} does not describe a Nemotron-H backbone ({e})") from None
    config.architectures = ["NemotronHForCausalLM"]
    return config


def _route(key: str):
    """Release key -> (part, native name, expert index or None); part: context|denoiser|time|None."""
    for prefix, part in TOWERS.items():
        if key.startswith(prefix):
            name = "model." + key[len(prefix):]
            m = EXPERT.match(name)
            if m:
                return part, f"{m['module']}.{m['proj']}", int(m["j"])
            return part, name, None
    if key in HEADS:
        return HEADS[key], "lm_head.weight", None
    if key.startswith(TIME_PREFIXES):
        return "time", key, None
    return None, key, None


def _slot(root: nn.Module, name: str):
    """(owning module, leaf, current tensor, is_parameter) for a dotted name, or None."""
    path, _, leaf = name.rpartition(".")
    try:
        module = root.get_submodule(path) if path else root
    except AttributeError:
        return None
    if leaf in module._parameters and module._parameters[leaf] is not None:
        return module, leaf, module._parameters[leaf], True
    if leaf in module._buffers and module._buffers[leaf] is not None:
        return module, leaf, module._buffers[leaf], False
    return None


def _put(module: nn.Module, leaf: str, tensor: torch.Tensor, is_param: bool, trainable: bool = False) -> None:
    if is_param:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=trainable)
    else:
        module._buffers[leaf] = tensor


def load_release(path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 context_device: str | None = None) -> TwoTower:
    """A TwoTower from a release directory. The denoiser (and time conditioning) go to
    `device`; the context tower to `context_device` (default: the same device), e.g. one GPU
    each for the two 59 GB towers. Weights are cast to `dtype`, except the router's
    e_score_correction_bias, kept in fp32 as transformers does."""
    from safetensors import safe_open
    from transformers import NemotronHForCausalLM

    path = Path(path)
    if not path.is_dir():
        raise SpecError(f"release directory not found: {path}")
    config = release_config(path)
    shards = _shards(path)
    devices = {"context": torch.device(context_device or device), "denoiser": torch.device(device),
               "time": torch.device(device)}

    with torch.device("meta"):
        context_lm = NemotronHForCausalLM(config).eval()        # one config object per tower:
        denoiser_lm = NemotronHForCausalLM(copy.deepcopy(config)).eval()   # the denoiser's attention differs
        model = TwoTower(context_lm, denoiser_lm, MASK_TOKEN_ID, name=path.name)
    roots = {"context": model.context_lm, "denoiser": model.denoiser_lm, "time": model.time}
    keep_fp32 = tuple(getattr(context_lm, "_keep_in_fp32_modules_strict", None) or ())
    fused: dict[tuple[str, str], torch.Tensor] = {}     # (part, name) -> expert-filled flags
    unexpected, ignored = [], []

    def convert(part, name, tensor):
        target = torch.float32 if any(k in name for k in keep_fp32) else dtype
        if tensor.is_floating_point():
            return tensor.to(device=devices[part], dtype=target)
        return tensor.to(device=devices[part])

    for shard in shards:
        try:
            handle = safe_open(str(shard), framework="pt", device="cpu")
        except Exception as e:
            raise SpecError(f"{shard} is not a readable safetensors file ({e})") from None
        with handle as sf:
            for key in sf.keys():
                part, name, expert = _route(key)
                if part is None or IGNORED.search(name):
                    ignored.append(key)
                    continue
                slot = _slot(roots[part], name)
                if slot is None:
                    unexpected.append(key)
                    continue
                module, leaf, current, is_param = slot
                tensor = sf.get_tensor(key)
                if expert is None:
                    if tuple(tensor.shape) != tuple(current.shape):
                        raise SpecError(f"shape mismatch for {key}: checkpoint {tuple(tensor.shape)}, "
                                        f"model {tuple(current.shape)} (config.json does not fit the weights)")
                    _put(module, leaf, convert(part, name, tensor), is_param, trainable=part == "time")
                    continue
                experts = current.shape[0]
                if not 0 <= expert < experts or tuple(tensor.shape) != tuple(current.shape[1:]):
                    raise SpecError(f"shape mismatch for {key}: expert {expert} of {experts}, checkpoint "
                                    f"{tuple(tensor.shape)}, model per expert {tuple(current.shape[1:])}")
                if (part, name) not in fused:
                    target = torch.float32 if any(k in name for k in keep_fp32) else dtype
                    _put(module, leaf, torch.empty(current.shape, device=devices[part], dtype=target), is_param)
                    current = module._parameters[leaf] if is_param else module._buffers[leaf]
                    fused[(part, name)] = torch.zeros(experts, dtype=torch.bool)
                with torch.no_grad():
                    current[expert].copy_(tensor)
                fused[(part, name)][expert] = True

    if unexpected:
        raise SpecError(f"{path}: {len(unexpected)} tensor(s) do not fit the model built from config.json, "
                        f"e.g. {', '.join(unexpected[:3])}")
    if ignored:
        warnings.warn(f"{path}: ignored {len(ignored)} tensor(s) outside the release layout, "
                      f"e.g. {', '.join(ignored[:3])}", stacklevel=2)
    missing = [f"{part}:{name}[{int((~flags).nonzero()[0])}]" for (part, name), flags in fused.items()
               if not bool(flags.all())]
    for part, root in roots.items():
        for name, tensor in list(root.named_parameters()) + list(root.named_buffers()):
            if tensor.is_meta:
                missing.append(f"{part}:{name}")
    if missing:
        raise SpecError(f"{path}: the checkpoint lacks {len(missing)} weight(s) of the model, "
                        f"e.g. {', '.join(missing[:4])}")

    # The release's Mamba layers clamp dt to config.time_step_limit (remote code / Megatron;
    # (0, inf) = no clamp); transformers' native mixer uses (time_step_min, inf) in its
    # multi-token path. Use the release's limit in both towers.
    limit = tuple(float(v) for v in config.time_step_limit)
    for lm in (model.context_lm, model.denoiser_lm):
        for layer in lm.model.layers:
            if hasattr(layer.mixer, "time_step_limit"):
                layer.mixer.time_step_limit = limit
    model.tokenizer = _tokenizer(path)
    _generation_config(model.context_lm, path)
    return model.eval()


def _tokenizer(path: Path):
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    try:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception:   # a tokenizer that needs remote code or is broken: run on ids
        return None


def _generation_config(lm, path: Path) -> None:
    if (path / "generation_config.json").is_file():
        try:
            from transformers import GenerationConfig
            lm.generation_config = GenerationConfig.from_pretrained(path)
        except Exception:
            pass


# ---- writing the layout (tests, exports) ---------------------------------------------------
def release_state(model: TwoTower) -> dict[str, torch.Tensor]:
    """Every tensor of a Nemotron-H TwoTower under its release name (experts split per expert)."""
    out: dict[str, torch.Tensor] = {}
    for part, lm, prefix, head in (("context", model.context_lm, "context_tower.", "context_lm_head.weight"),
                                   ("denoiser", model.denoiser_lm, "denoiser_tower.", "lm_head.weight")):
        for name, tensor in lm.state_dict().items():
            if name == "lm_head.weight":
                out[head] = tensor
                continue
            if not name.startswith("model."):
                raise ValueError(f"unexpected {part} tensor {name!r}")
            name = name[len("model."):]
            m = FUSED.match(name)
            if m:
                for j in range(tensor.shape[0]):
                    out[f"{prefix}{m['module']}.{j}.{m['proj']}.weight"] = tensor[j]
            else:
                out[prefix + name] = tensor
    for name, tensor in model.time.state_dict().items():
        out[name] = tensor
    return out


def _remote_config(config) -> dict:
    """The backbone config in the remote code's field names (hybrid_override_pattern)."""
    d = config.to_dict()
    pattern = config.hybrid_override_pattern
    for k in ("layers_block_type", "mtp_layers_block_type", "_attn_implementation", "_experts_implementation",
              "dtype", "torch_dtype", "architectures"):
        d.pop(k, None)
    d.update(model_type="nemotron_h", hybrid_override_pattern=pattern, num_hidden_layers=len(pattern),
             architectures=[ARCHITECTURE])
    return d


def write_release(model: TwoTower, path, max_shard_bytes: int | None = None,
                  dtype: torch.dtype | None = None) -> Path:
    """Write a Nemotron-H TwoTower in the release's layout. With max_shard_bytes the weights
    are split into shards listed by model.safetensors.index.json."""
    from safetensors.torch import save_file

    if model.context_lm.config.model_type != "nemotron_h":
        raise ValueError("write_release writes Nemotron-H TwoTowers only")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for k, v in release_state(model).items():
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.clone().contiguous()      # own storage: slices of fused experts share it
    (path / "config.json").write_text(json.dumps(_remote_config(model.context_lm.config), indent=2))
    meta = {"format": "pt"}
    if not max_shard_bytes:
        save_file(tensors, str(path / "model.safetensors"), metadata=meta)
        return path
    shards, current, size = [], {}, 0
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = v
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / name), metadata=meta)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    (path / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return path
