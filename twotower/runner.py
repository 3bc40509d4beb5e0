"""From prompt text to a recorded trace: tokenise (chat template), sample, record.

`run(model, prompts, cfg, mode)` returns a generator of events while filling a Trace that
holds everything a renderer needs, token pieces included, so views never need the model.
"""
from __future__ import annotations

from typing import Iterator

from .events import BlockStart, Done, Event, Step, Token
from .fork import ForkPoint
from .model import TwoTower
from .sampler import ar_generate, diffusion_generate
from .sampling import SamplerConfig
from .trace import Trace

MAX_PROMPT_CHARS = 20_000


def encode_prompt(model: TwoTower, text: str, chat: bool = True) -> list[int]:
    """Token ids for a prompt; instruct models get their chat template with a generation prompt."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the prompt is empty: type some text")
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(f"the prompt is {len(text)} characters long; the limit is {MAX_PROMPT_CHARS}")
    tok = model.tokenizer
    if tok is None:
        raise ValueError("this model ships no tokenizer: give the prompt as token ids")
    if chat and getattr(tok, "chat_template", None):
        return list(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False))
    return tok.encode(text, add_special_tokens=False)


def parse_ids(text: str) -> list[int]:
    """'5,17,42' -> [5, 17, 42] with a clear error for anything else (empty entries, negatives)."""
    parts = text.replace(" ", "").removesuffix(",").split(",")     # a trailing comma is fine
    if not any(parts):
        raise ValueError("the prompt is empty: give at least one token id")
    if not all(p.isascii() and p.isdigit() for p in parts):
        raise ValueError(f"prompt ids must be comma-separated non-negative integers, got {text!r}")
    return [int(p) for p in parts]


def piece(tokenizer, token_id: int) -> str:
    """How a token reads on its own, with leading spaces kept (subword-correct)."""
    if tokenizer is None:
        return f"<{token_id}>"
    # decode after a fixed anchor so a leading space of the token is not dropped
    anchor = tokenizer.encode("a", add_special_tokens=False)
    text = tokenizer.decode(anchor + [token_id], skip_special_tokens=False)
    return text[len(tokenizer.decode(anchor, skip_special_tokens=False)):]


def new_trace(model: TwoTower, prompts: list[str], prompt_ids: list[list[int]], cfg: SamplerConfig,
              mode: str) -> Trace:
    info = model.info()
    info["eos_token_ids"] = sorted(model.eos_token_ids)
    return Trace(mode=mode, settings=cfg.to_dict(), model=info, prompts=prompts, prompt_ids=prompt_ids)


def add_pieces(trace: Trace, tokenizer, ids) -> None:
    """Record the text piece of every id not yet in the trace."""
    for i in ids:
        key = str(i)
        if key not in trace.tokens:
            trace.tokens[key] = piece(tokenizer, int(i))


def event_ids(event: Event):
    """Every token id an event mentions (tokens and candidates), for `add_pieces`."""
    if isinstance(event, Step):
        for row, tops in zip(event.tokens, event.top_ids):
            yield from row
            for cands in tops:
                yield from cands
        for tree in event.tree or ():                               # draft trees: candidates past the top ones
            for path in tree:
                yield from path
    elif isinstance(event, BlockStart):
        yield from (tok for tok in event.given or () if tok >= 0)   # the verify order's given first tokens
    elif isinstance(event, Token):
        yield from event.tokens
        for cands in event.top_ids:
            yield from cands
    elif isinstance(event, Done):
        for row in event.token_ids:
            yield from row


def run(model: TwoTower, prompt_ids: list[list[int]], cfg: SamplerConfig, mode: str = "diffusion",
        prompts: list[str] | None = None, capture_layers: tuple[int, ...] = (),
        resume: ForkPoint | None = None) -> tuple[Trace, Iterator[Event]]:
    """Start a run. Returns (trace, events): iterating events runs the model and fills the trace.

    resume: continue a diffusion run from a fork point (twotower.fork); the trace records it.
    """
    if mode not in ("diffusion", "ar"):
        raise ValueError(f"mode must be 'diffusion' or 'ar', got {mode!r}")
    if resume is not None and mode != "diffusion":
        raise ValueError("only diffusion runs can continue from a fork point")
    trace = new_trace(model, prompts or [""] * len(prompt_ids), prompt_ids, cfg, mode)
    trace.fork = resume.to_dict(verify=cfg.remasking == "verify") if resume else None
    add_pieces(trace, model.tokenizer, {i for p in prompt_ids for i in p} | {model.mask_token_id})
    source = (diffusion_generate(model, prompt_ids, cfg, capture_layers, resume) if mode == "diffusion"
              else ar_generate(model, prompt_ids, cfg))

    def events():
        for event in trace.record(source):
            add_pieces(trace, model.tokenizer, event_ids(event))
            yield event
    return trace, events()
