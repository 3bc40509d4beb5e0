"""From UI values to sampler settings, with errors a user can act on."""
from __future__ import annotations

import math
from contextlib import contextmanager

import gradio as gr

from twotower.sampling import SamplerConfig

from .state import OPTIONS

MAX_CAPTURED_LAYERS = 4


@contextmanager
def user_errors():
    """Turn the library's ValueErrors (bad settings, empty prompt, ...) into UI errors."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        raise gr.Error(str(e), title="Cannot run") from None


def number(name: str, value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


def whole(name: str, value) -> int:
    """UI numbers arrive as floats; accept 16.0 but not 16.5."""
    value = number(name, value)
    if value != int(value):
        raise ValueError(f"{name} must be a whole number, got {value}")
    return int(value)


def ngram_size(value) -> int:
    """The "No repeated n-grams" setting: 0 (off) or n >= 2 (n = 1 would ban every written token)."""
    n = whole("no repeated n-grams", value)
    if n == 1:
        raise ValueError("No repeated n-grams: 1 would forbid every token already written; "
                         "use 0 (off) or 2 and above")
    return n


def sampler_config(max_new_tokens, block_size, steps, threshold, temperature, top_k, top_p,
                   repetition_penalty, no_repeat_ngram_size, remasking, seed, stop_at_eos,
                   draft_nodes=0) -> SamplerConfig:
    """A validated SamplerConfig (the model's context limit is checked when the run starts)."""
    cfg = SamplerConfig(
        block_size=whole("block size", block_size), steps=whole("steps", steps),
        threshold=number("threshold", threshold), temperature=number("temperature", temperature),
        top_k=whole("top-k", top_k), top_p=number("top-p", top_p),
        repetition_penalty=number("repetition penalty", repetition_penalty),
        no_repeat_ngram_size=ngram_size(no_repeat_ngram_size), remasking=str(remasking),
        max_new_tokens=whole("max new tokens", max_new_tokens), stop_at_eos=bool(stop_at_eos),
        seed=whole("seed", seed), draft_nodes=whole("draft tree size", draft_nodes))
    if cfg.max_new_tokens > OPTIONS.max_new_tokens:
        raise ValueError(f"max new tokens is {cfg.max_new_tokens}; "
                         f"this app allows at most {OPTIONS.max_new_tokens}")
    return cfg.validate()


def capture_layers(text: str, available: list[int]) -> tuple[int, ...]:
    """'first, middle, last' or layer indices -> sorted unique attention layer indices."""
    if not available:
        raise ValueError("this model has no attention layers to capture")
    names = {"first": available[0], "middle": available[len(available) // 2], "last": available[-1]}
    chosen = set()
    for part in str(text or "").replace(";", ",").split(","):
        part = part.strip().lower()
        if not part:
            continue
        if part in names:
            chosen.add(names[part])
        elif part.lstrip("-").isdigit() and int(part) in available:
            chosen.add(int(part))
        else:
            raise ValueError(f"attention layer {part!r} is not 'first', 'middle', 'last' or one of "
                             f"{available[0]}..{available[-1]}")
    if not chosen:
        raise ValueError("name at least one attention layer to capture (e.g. 'first, middle, last')")
    if len(chosen) > MAX_CAPTURED_LAYERS:
        raise ValueError(f"capture at most {MAX_CAPTURED_LAYERS} layers (maps are large); got {len(chosen)}")
    return tuple(sorted(chosen))
