"""Backbone families: how a transformers model family runs as context tower and denoiser."""
from __future__ import annotations

from .llama import MODEL_TYPES as LLAMA_TYPES, LlamaFamily


def family_for(config):
    """The family class for a transformers config; ValueError for an unsupported architecture."""
    model_type = getattr(config, "model_type", None)
    if model_type in LLAMA_TYPES:
        return LlamaFamily
    if model_type == "nemotron_h":
        from .nemotron_h import NemotronHFamily
        return NemotronHFamily
    raise ValueError(
        f"unsupported architecture {model_type!r}: TwoTower runs Llama-family decoders "
        f"({', '.join(LLAMA_TYPES)}) and Nemotron-H (nemotron_h)")
