"""Streaming samplers: block diffusion with the denoiser, and the AR baseline.

Both are generators of typed events (twotower.events) and take token ids, so they serve a
CLI, a trace, a benchmark and a UI alike. The loop runs in the caller's thread: stopping
iteration (or closing the generator) stops the computation.
"""
from __future__ import annotations

import time
from typing import Iterator

import torch

from .attention import AttentionCapture
from .events import BlockCommitted, BlockStart, Done, Event, Prefill, Step, Token
from .model import TwoTower
from .sampling import SamplerConfig, choose_tokens, commit_counts, remasking_score, select_commits


def check_request(model: TwoTower, prompts: list[list[int]], cfg: SamplerConfig) -> None:
    """Raise ValueError naming the first problem of a run request (settings, prompt sizes, ids)."""
    cfg.validate(model.max_context)
    if not prompts:
        raise ValueError("no prompt given")
    for p in prompts:
        if len(p) == 0:
            raise ValueError("the prompt is empty: give at least one token")
        if len(p) + cfg.max_new_tokens > model.max_context:
            raise ValueError(f"prompt ({len(p)} tokens) + max_new_tokens ({cfg.max_new_tokens}) exceeds "
                             f"the model's context of {model.max_context} tokens")
        vocab = model.context_lm.config.vocab_size
        bad = next((t for t in p if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary (0..{vocab - 1})")


def _generator(model: TwoTower, seed: int) -> torch.Generator:
    return torch.Generator(device=model.device).manual_seed(int(seed))


def _end_of_text(tokens: list[list[int]], eos: set[int]) -> tuple[list[list[int]], list[bool]]:
    """Cut each row at its first end-of-text id; returns (kept ids, ended?)."""
    kept, ended = [], []
    for row in tokens:
        cut = next((j for j, tok in enumerate(row) if tok in eos), None)
        kept.append(row if cut is None else row[:cut])
        ended.append(cut is not None)
    return kept, ended


def _top(probs: torch.Tensor, k: int):
    top = probs.topk(k, dim=-1)
    return top.indices, top.values


def _decode(model: TwoTower, rows: list[list[int]]) -> list[str]:
    if model.tokenizer is None:
        return [" ".join(map(str, r)) for r in rows]
    return [model.tokenizer.decode(r, skip_special_tokens=True) for r in rows]


@torch.no_grad()
def diffusion_generate(model: TwoTower, prompts: list[list[int]], cfg: SamplerConfig,
                       capture_layers: tuple[int, ...] = ()) -> Iterator[Event]:
    """Block-wise diffusion decoding, yielding every denoiser step.

    Per block: start all-masked; each step predicts every position, commits the positions
    the commit rule picks and leaves the rest masked; then the finished block enters the
    context tower's cache in one pass.
    """
    check_request(model, prompts, cfg)
    gen, eos, mask_id = _generator(model, cfg.seed), model.eos_token_ids, model.mask_token_id
    start = time.perf_counter()
    ctx, _ = model.prefill(prompts)
    batch = len(prompts)
    yield Prefill(prompt_tokens=[len(p) for p in prompts], seconds=time.perf_counter() - start)

    out: list[list[int]] = [[] for _ in range(batch)]
    ended = [False] * batch
    nfe, passes, first_token, block, produced = 0, 1, None, 0, 0
    while produced < cfg.max_new_tokens and not all(ended):
        size = min(cfg.block_size, cfg.max_new_tokens - produced)
        yield BlockStart(block=block, start=produced, size=size, steps=cfg.steps)
        x = torch.full((batch, size), mask_id, dtype=torch.long, device=model.device)
        inputs = model.block_inputs(ctx, size)                     # context view: once per block
        for step in range(cfg.steps):
            masked = x == mask_id                                  # (B, S)
            t = masked.float().mean(-1)
            capture = AttentionCapture(capture_layers) if capture_layers else None
            logits = model.denoise(x, inputs, t, capture)          # (B, S, V)
            logits[..., mask_id] = float("-inf")                   # never predict [MASK]
            pred, probs, conf = choose_tokens(logits, cfg, gen)
            k, planned = commit_counts(conf, masked, cfg.steps - step, cfg.threshold)
            score = remasking_score(probs, conf, cfg.remasking, gen)
            commit = select_commits(score, masked, k)              # (B, S) bool
            x = torch.where(commit, pred, x)                       # carry-over: committed stay
            nfe += 1
            top_ids, top_probs = _top(probs, cfg.top_candidates)
            event = Step(block=block, step=step, t=t.tolist(), tokens=x.tolist(),
                         committed=[row.nonzero().flatten().tolist() for row in commit.cpu()],
                         planned=planned.tolist(), confidence=conf.tolist(),
                         top_ids=top_ids.tolist(), top_probs=top_probs.tolist(),
                         elapsed=time.perf_counter() - start, nfe=nfe,
                         attention={i: p.tolist() for i, p in capture.probs.items()} if capture else None,
                         anchor=int(model.anchor))
            if first_token is None and all(row[0] != mask_id for row in event.tokens):
                first_token = event.elapsed                        # the text's first token is readable
            yield event
            if not bool((x == mask_id).any()):
                break
        tokens = x.tolist()
        for b in range(batch):
            if ended[b]:
                continue
            if cfg.stop_at_eos:
                kept, [ended[b]] = _end_of_text([tokens[b]], eos)
                out[b].extend(kept[0])
            else:
                out[b].extend(tokens[b])
        produced += size
        if not all(ended) and produced < cfg.max_new_tokens:
            ctx, _ = model.extend(ctx, x)                          # one context pass per block
            passes += 1
        yield BlockCommitted(block=block, tokens=tokens, steps_used=step + 1,
                             elapsed=time.perf_counter() - start)
        block += 1
    seconds = time.perf_counter() - start
    yield Done(texts=_decode(model, out), token_ids=out, nfe=nfe, seconds=seconds,
               first_token_seconds=first_token or seconds, stopped="eos" if all(ended) else "length",
               context_passes=passes)


@torch.no_grad()
def ar_generate(model: TwoTower, prompts: list[list[int]], cfg: SamplerConfig) -> Iterator[Event]:
    """The AR baseline: the context tower alone, one cached forward pass per token."""
    check_request(model, prompts, cfg)
    gen, eos = _generator(model, cfg.seed), model.eos_token_ids
    start = time.perf_counter()
    ctx, logits = model.prefill(prompts)
    batch = len(prompts)
    yield Prefill(prompt_tokens=[len(p) for p in prompts], seconds=time.perf_counter() - start)
    out: list[list[int]] = [[] for _ in range(batch)]
    ended = [False] * batch
    nfe, first_token = 1, None
    for index in range(cfg.max_new_tokens):
        pred, probs, conf = choose_tokens(logits, cfg, gen)       # (B,)
        top_ids, top_probs = _top(probs, cfg.top_candidates)
        tokens = pred.tolist()
        event = Token(index=index, tokens=tokens, confidence=conf.tolist(), top_ids=top_ids.tolist(),
                      top_probs=top_probs.tolist(), elapsed=time.perf_counter() - start, nfe=nfe)
        first_token = first_token or event.elapsed
        yield event
        for b, tok in enumerate(tokens):
            if ended[b]:
                continue
            if tok in eos and cfg.stop_at_eos:
                ended[b] = True
            else:
                out[b].append(tok)
        if all(ended) or index == cfg.max_new_tokens - 1:
            break
        ctx, step_logits = model.extend(ctx, pred.unsqueeze(1))
        logits = step_logits[:, -1]
        nfe += 1
    seconds = time.perf_counter() - start
    yield Done(texts=_decode(model, out), token_ids=out, nfe=nfe, seconds=seconds,
               first_token_seconds=first_token or seconds, stopped="eos" if all(ended) else "length",
               context_passes=nfe)
