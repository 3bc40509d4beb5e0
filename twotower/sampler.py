"""Streaming samplers: block diffusion with the denoiser, and the AR baseline.

Both are generators of typed events (twotower.events) and take token ids, so they serve a
CLI, a trace, a benchmark and a UI alike. The loop runs in the caller's thread: stopping
iteration (or closing the generator) stops the computation.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import torch

from .attention import AttentionCapture
from .events import BlockCommitted, BlockStart, Done, Event, Prefill, Step, Token
from .fork import ForkPoint, first_written
from .model import TwoTower
from .prefix_reuse import PrefixReuse
from .draft_tree import DraftTrees, first_open, tree_nodes
from .guards import RepeatGuard, history_tensor
from .sampling import Decision, SamplerConfig, choose_tokens, decide_pass, settled_rows


def check_request(model: TwoTower, prompts: list[list[int]], cfg: SamplerConfig) -> None:
    """Raise ValueError naming the first problem of a run request (settings, prompt sizes, ids)."""
    cfg.validate(model.max_context)
    if cfg.remasking == "verify" and not model.clean_as_ar:
        raise ValueError(f"the verify order checks drafts with the AR model's reading of them, which needs a "
                         f"clean_as_ar denoiser; {model.name} is not one: choose another commit order")
    if not prompts:
        raise ValueError("no prompt given")
    for p in prompts:
        if len(p) == 0:
            raise ValueError("the prompt is empty: give at least one token")
        if len(p) + cfg.max_new_tokens > model.max_context:
            raise ValueError(f"prompt ({len(p)} tokens) + max_new_tokens ({cfg.max_new_tokens}) exceeds "
                             f"the model's context of {model.max_context} tokens")
        check_ids(model, p, "prompt")


def check_ids(model: TwoTower, ids: list[int], what: str) -> None:
    """Raise ValueError for the first id outside the model's vocabulary."""
    vocab = model.context_lm.config.vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise ValueError(f"{what} token id {bad} is outside the vocabulary (0..{vocab - 1})")


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


def _to_host(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """A step's outputs in ONE device-to-host copy (float64 holds every id and float exactly)."""
    flat = torch.cat([t.reshape(-1).double() for t in tensors]).cpu()
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def _next_tokens(logits: torch.Tensor, guard: RepeatGuard, ended: list[bool], cfg: SamplerConfig,
                 generator: torch.Generator, mask_id: int) -> tuple[list[int], list[float]]:
    """The verify order's first token of a block: the AR model's next token after the text so far,
    chosen as the AR baseline chooses it (the run's guards, greedy or a draw) from the logits (B, V)
    of the context tower's pass that read that text (prefill or the last block's extend), so no
    denoiser pass is spent on it. Returns (ids, -1 for rows that ended; their probabilities)."""
    scores = guard.token(logits.float().clone())
    scores[:, mask_id] = float("-inf")                             # as in a denoiser pass: [MASK] is no token
    pred, _, conf = choose_tokens(scores, cfg, generator)
    h_pred, h_conf = _to_host(pred, conf)                          # once per block
    return [-1 if done else tok for tok, done in zip(h_pred.long().tolist(), ended)], h_conf.tolist()


def _positions(flags: torch.Tensor) -> list[list[int]]:
    """Per row, the indices where flags (B, S) is set."""
    return [row.nonzero().flatten().tolist() for row in flags.bool()]


def _guard(model: TwoTower, rows: list[list[int]], cfg: SamplerConfig) -> RepeatGuard:
    """The repetition penalty and n-gram ban over the tokens the rows have written."""
    return RepeatGuard(cfg, history_tensor(rows if cfg.guards_repeats else [[] for _ in rows], model.device))


def _top(probs: torch.Tensor, k: int):
    top = probs.topk(k, dim=-1)
    return top.indices, top.values


def _decode(model: TwoTower, rows: list[list[int]]) -> list[str]:
    if model.tokenizer is None:
        return [" ".join(map(str, r)) for r in rows]
    return [model.tokenizer.decode(r, skip_special_tokens=True) for r in rows]


def check_resume(model: TwoTower, prompts: list[list[int]], cfg: SamplerConfig, point: ForkPoint) -> None:
    """Raise ValueError naming the first way a fork point does not fit this request."""
    if len(point.prefix) != len(prompts) or len(point.tokens) != len(prompts):
        raise ValueError(f"the fork point has {len(point.tokens)} rows; the request has {len(prompts)} prompts")
    if point.step < 0 or point.block < 0:
        raise ValueError(f"fork block and step must be >= 0, got block {point.block}, step {point.step}")
    if len({len(r) for r in point.prefix}) > 1 or len({len(r) for r in point.tokens}) != 1:
        raise ValueError("the fork point's rows differ in length")
    size = len(point.tokens[0])
    if size == 0 or point.start + size > cfg.max_new_tokens:
        raise ValueError(f"the forked block ends at token {point.start + size}, beyond max_new_tokens "
                         f"({cfg.max_new_tokens})")
    check_ids(model, [t for r in point.prefix + point.tokens for t in r], "fork")
    if point.drafts is not None:
        if [len(r) for r in point.drafts] != [len(r) for r in point.tokens]:
            raise ValueError("the fork point's drafts do not match its block's shape")
        mask_id = model.mask_token_id
        if any(d >= 0 and tok != mask_id for dr, tr in zip(point.drafts, point.tokens) for d, tok in zip(dr, tr)):
            raise ValueError("the fork point drafts a position that is already committed")
        check_ids(model, [d for r in point.drafts for d in r if d >= 0], "fork draft")
    if point.tree is not None:
        if len(point.tree) != len(point.tokens):
            raise ValueError(f"the fork point's draft tree has {len(point.tree)} rows; its block has {len(point.tokens)}")
        check_ids(model, [t for tree in point.tree for path in tree for t in path], "fork draft tree")


class _BlockPlan(NamedTuple):
    """How a block begins: its tokens, the step it starts at and its step budget, its given tokens."""
    rows: list[list[int]]              # (B, S) mask id where masked
    x: torch.Tensor                    # (B, S) the same on the model's device
    first: int
    budget: int
    given: list[int] | None            # verify: per row the AR model's next token (-1 where the row ended)
    given_conf: list[float] | None
    resumed: ForkPoint | None = None   # the forked block: the point whose drafts its first pass checks


def _plan_block(model: TwoTower, cfg: SamplerConfig, resume: ForkPoint | None, block: int, produced: int,
                 last: torch.Tensor, guard: RepeatGuard, ended: list[bool], gen: torch.Generator) -> _BlockPlan:
    """How the next block begins. The forked block (resume) goes on from its recorded state. Any
    other block starts all masked; under verify, one of two or more positions starts with its
    first token written: the AR model's next token, chosen from `last` (B, V), the context
    tower's logits after the text so far (this draws from `gen` when sampling, and syncs once)."""
    if resume and block == resume.block:
        rows, first, budget = [list(row) for row in resume.tokens], resume.step + 1, max(cfg.steps, resume.step + 2)
        return _BlockPlan(rows, _on_device(model, rows), first, budget, None, None, resume)
    mask_id = model.mask_token_id
    rows = [[mask_id] * min(cfg.block_size, cfg.max_new_tokens - produced) for _ in range(len(ended))]
    given = given_conf = None
    if cfg.remasking == "verify" and len(rows[0]) > 1:             # a one-position block is left to its pass,
        given, given_conf = _next_tokens(last, guard, ended, cfg, gen, mask_id)   # so every block has a step
        rows = [[tok] + row[1:] if tok >= 0 else row for tok, row in zip(given, rows)]
    return _BlockPlan(rows, _on_device(model, rows), 0, cfg.steps, given, given_conf)


def _on_device(model: TwoTower, rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=model.device)


@dataclass(eq=False)
class _Block:
    """A block's state across its denoiser passes."""
    x: torch.Tensor                    # (B, S) committed tokens, mask id where masked
    inputs: dict                       # the context view, built once per block
    guard: RepeatGuard                 # the repeat guards over the text before the block
    settled: torch.Tensor              # (B,) rows that need no more passes
    reuse: PrefixReuse                 # what earlier passes computed for the unchanged prefix
    trees: DraftTrees | None           # the verify order's draft trees
    drafts: torch.Tensor               # (B, S) the verify order's proposals, mask id where none
    draft_probs: torch.Tensor | None = None   # (B, S, V) what each draft was drawn from (temperature > 0)

    def advance(self, d: Decision, mask_id: int, eos_ids: torch.Tensor | None) -> None:
        """The block as a pass's decision leaves it."""
        self.x, self.drafts, self.draft_probs = d.x, d.drafts, d.draft_probs
        self.settled = self.settled | settled_rows(d.x, mask_id, eos_ids)


def _open_block(model: TwoTower, cfg: SamplerConfig, ctx: dict, plan: _BlockPlan, guard: RepeatGuard,
                ended: list[bool], eos_ids: torch.Tensor | None, capturing: bool) -> _Block:
    """A block's state before its first pass; its context view is built here, once."""
    mask_id, x = model.mask_token_id, plan.x
    inputs = model.block_inputs(ctx, x.shape[1])
    settled = torch.tensor(ended, device=model.device) | settled_rows(x, mask_id, eos_ids)   # (B,)
    reusable = model.can_reuse_prefix(inputs, capturing=capturing)
    trees = (DraftTrees(len(ended), reusable, cfg.draft_nodes + 1 if inputs.get("static") else None)
             if cfg.draft_nodes else None)                         # static caches: fixed rows per pass
    blk = _Block(x, inputs, guard, settled, PrefixReuse(reusable and trees is None, plan.rows, mask_id), trees,
                 torch.full_like(x, mask_id))
    if plan.resumed is not None and plan.resumed.drafts is not None and cfg.remasking == "verify":
        _resume_drafts(blk, plan.resumed, cfg, mask_id, model.context_lm.config.vocab_size)
    return blk


def _resume_drafts(blk: _Block, point: ForkPoint, cfg: SamplerConfig, mask_id: int, vocab: int) -> None:
    """The drafts a forked step left, for the fork's first pass to check as the parent's did.
    Sampling, a carried draft counts as drawn from a point mass on it (its check is then
    still exact: the committed text is a draw from the AR model). A tree fork takes the tree
    the parent's next pass checked when it fits its node budget, else the drafted run."""
    drafts = torch.tensor(point.drafts, device=blk.x.device)
    blk.drafts = torch.where(drafts >= 0, drafts, mask_id)
    if cfg.temperature > 0:
        blk.draft_probs = torch.nn.functional.one_hot(blk.drafts, vocab).float()
    if blk.trees is None:
        return
    for b, (row, draft_row) in enumerate(zip(point.tokens, point.drafts)):
        tree = point.tree[b] if point.tree is not None else None
        if tree is None or len(tree_nodes(tree)) - 1 > cfg.draft_nodes:
            start = first_open(row, mask_id)
            run = next((k for k, d in enumerate(draft_row[start:]) if d < 0), len(row) - start)
            tree = [draft_row[start:start + min(run, cfg.draft_nodes)]] if run else []
        blk.trees.trees[b] = tree


class _Pass(NamedTuple):
    """One denoiser pass over a block and the commit decision on it."""
    decision: Decision
    t: torch.Tensor                    # (B,) masked fraction the pass was told
    open_: torch.Tensor                # (B, S) positions it could commit
    begin: int                         # plain passes: the first block input computed (PrefixReuse kept
                                       # the earlier ones); 0 with trees, which reuse on their own
    rows: list[int] | None = None      # draft trees: block rows run per prompt
    tree: list | None = None           # draft trees: the paths checked per prompt


def _denoiser_pass(model: TwoTower, blk: _Block, capture: AttentionCapture | None, steps_left: int,
                   cfg: SamplerConfig, gen: torch.Generator, eos_ids: torch.Tensor | None) -> _Pass:
    """Run the denoiser over the block (its drafts read as written text; with trees a row per
    node), decide what the pass commits, and advance the block to that decision."""
    mask_id = model.mask_token_id
    open_ = (blk.x == mask_id) & ~blk.settled[:, None]             # settled rows commit nothing more
    if blk.trees is not None:                                      # a row per node of each draft tree
        d, t, rows, tree = blk.trees.step(model, blk.x, blk.drafts, blk.inputs, blk.guard, capture, open_,
                                          steps_left, cfg, gen)
        p = _Pass(d, t, open_, 0, rows, tree)
    else:
        drafted = blk.drafts != mask_id                            # (B, S) the verify order's drafts
        seen = torch.where(drafted, blk.drafts, blk.x)             # (B, S) what the pass reads
        t = (seen == mask_id).float().mean(-1)
        begin = blk.reuse.start()                                  # inputs before it: kept from earlier passes
        logits = blk.reuse.logits_of_pass(model.denoise(seen, blk.inputs, t, capture, begin), begin)   # (B, S, V)
        logits = blk.guard.denoiser_pass(logits.float(), seen, mask_id, drafted if cfg.remasking == "verify" else None)
        p = _Pass(decide_pass(logits, blk.x, blk.drafts, blk.draft_probs, open_, steps_left, cfg, gen, mask_id),
                  t, open_, begin)
    blk.advance(p.decision, mask_id, eos_ids)
    return p


def _step_event(model: TwoTower, blk: _Block, p: _Pass, capture: AttentionCapture | None, cfg: SamplerConfig,
                block: int, step: int, nfe: int, start: float) -> tuple[Step, bool]:
    """The pass `p` as a Step event, read off the block it advanced in one device-to-host copy
    (attention capture and trees copy their own); and whether every row is now settled."""
    d, mask_id, verify = p.decision, model.mask_token_id, cfg.remasking == "verify"
    top_ids, top_probs = _top(d.probs, cfg.top_candidates)
    h_t, h_x, h_commit, h_planned, h_conf, h_ids, h_probs, h_active, h_settled, h_drafts, h_rejected = _to_host(
        p.t, blk.x, d.commit, d.planned, d.confidence, top_ids, top_probs, p.open_.any(-1), blk.settled,
        blk.drafts, d.rejected)
    event = Step(block=block, step=step, t=h_t.tolist(), tokens=h_x.long().tolist(),
                 committed=_positions(h_commit), planned=h_planned.long().tolist(), confidence=h_conf.tolist(),
                 top_ids=h_ids.long().tolist(), top_probs=h_probs.tolist(),
                 elapsed=time.perf_counter() - start, nfe=nfe,
                 attention={i: a.tolist() for i, a in capture.probs.items()} if capture else None,
                 anchor=int(model.anchor), active=h_active.bool().tolist(),
                 drafts=[[-1 if tok == mask_id else tok for tok in row] for row in h_drafts.long().tolist()]
                 if verify else None,
                 rejected=_positions(h_rejected) if verify else None, rows=p.rows, tree=p.tree)
    return event, bool(h_settled.all())


def _append_block(out: list[list[int]], ended: list[bool], tokens: list[list[int]], cfg: SamplerConfig,
                  eos: set[int]) -> None:
    """Add a finished block to each row still going; with stop_at_eos cut at end-of-text and end the row."""
    for b, row in enumerate(tokens):
        if ended[b]:
            continue
        if cfg.stop_at_eos:
            kept, [ended[b]] = _end_of_text([row], eos)
            out[b].extend(kept[0])
        else:
            out[b].extend(row)


@torch.no_grad()
def diffusion_generate(model: TwoTower, prompts: list[list[int]], cfg: SamplerConfig,
                       capture_layers: tuple[int, ...] = (), resume: ForkPoint | None = None) -> Iterator[Event]:
    """Block-wise diffusion decoding, yielding every denoiser step.

    Per block: start all-masked; each step predicts every position, commits the positions
    the commit rule picks and leaves the rest masked; then the finished block enters the
    context tower's cache in one pass. Under the verify order, where the AR model writes every
    token, a block of two or more positions starts with its first token written
    (`BlockStart.given`): the context tower's pass over the text so far (the prefill, or the
    last block's extend) has predicted it already, so no denoiser pass is spent on it. With
    stop_at_eos a row is done with its block once it has committed end-of-text after a fully
    committed prefix (`settled_rows`): its positions after that stay masked, and the block
    ends when every row is done (a block whose given token ended every row runs no step).

    resume: continue a recorded run (twotower.fork) instead: the prefill reads the prompt
    and the earlier blocks, the forked block goes on from its recorded state at step
    `resume.step + 1` (with max(cfg.steps, resume.step + 2) steps in all, so at least one is
    left), then the run goes on as usual. `Done` holds the whole text, earlier blocks included.
    With temperature > 0 the fork draws from a fresh `cfg.seed` stream, not the parent's.
    """
    check_request(model, prompts, cfg)
    if resume is not None:
        check_resume(model, prompts, cfg, resume)
    gen, eos, mask_id = _generator(model, cfg.seed), model.eos_token_ids, model.mask_token_id
    eos_ids = torch.tensor(sorted(eos), device=model.device) if cfg.stop_at_eos and eos else None
    start = time.perf_counter()
    prefix = resume.prefix if resume else [[] for _ in prompts]
    ctx, last = model.prefill([p + q for p, q in zip(prompts, prefix)], room=cfg.max_new_tokens)   # last: (B, V)
    yield Prefill(prompt_tokens=[len(p) for p in prompts], seconds=time.perf_counter() - start)

    if cfg.stop_at_eos:                                            # rows that ended before a fork stay ended
        out, ended = _end_of_text([list(r) for r in prefix], eos)
    else:
        out, ended = [list(r) for r in prefix], [False] * len(prompts)
    nfe, passes, first_token = 0, 1, None
    block, produced = (resume.block, resume.start) if resume else (0, 0)
    if resume and (produced > 0 or first_written(resume.tokens, mask_id)):
        first_token = time.perf_counter() - start                  # the text's first token is already there
    while produced < cfg.max_new_tokens and not all(ended):
        guard = _guard(model, out, cfg)                            # over the text so far: once per block
        plan = _plan_block(model, cfg, resume, block, produced, last, guard, ended, gen)
        size, now = len(plan.rows[0]), time.perf_counter() - start   # (after the block's ids reached the device)
        yield BlockStart(block=block, start=produced, size=size, steps=plan.budget, given=plan.given,
                         given_confidence=plan.given_conf, elapsed=now)
        if first_token is None and first_written(plan.rows, mask_id):
            first_token = now                                      # the text's first token is readable
        blk = _open_block(model, cfg, ctx, plan, guard, ended, eos_ids, capturing=bool(capture_layers))
        used, all_settled = plan.first, bool(blk.settled.all())
        for step in range(plan.first, plan.budget):
            if all_settled:
                break
            capture = AttentionCapture(capture_layers) if capture_layers else None
            p = _denoiser_pass(model, blk, capture, plan.budget - step, cfg, gen, eos_ids)
            nfe, used = nfe + 1, step + 1
            event, all_settled = _step_event(model, blk, p, capture, cfg, block, step, nfe, start)   # the step's one sync
            blk.reuse.record(p.begin, event.tokens, event.drafts)
            if first_token is None and first_written(event.tokens, mask_id):
                first_token = event.elapsed                        # the text's first token is readable
            yield event
        tokens = blk.x.tolist()
        _append_block(out, ended, tokens, cfg, eos)
        produced += size
        if not all(ended) and produced < cfg.max_new_tokens:
            ctx, logits = model.extend(ctx, blk.x, last_only=True)   # one context pass per block
            last = logits[:, -1]                                   # (B, V) the AR model's next token after it
            passes += 1
        yield BlockCommitted(block=block, tokens=tokens, steps_used=used, elapsed=time.perf_counter() - start)
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
    ctx, logits = model.prefill(prompts, room=cfg.max_new_tokens)
    batch = len(prompts)
    yield Prefill(prompt_tokens=[len(p) for p in prompts], seconds=time.perf_counter() - start)
    out: list[list[int]] = [[] for _ in range(batch)]
    ended = [False] * batch
    nfe, first_token = 1, None
    guard = _guard(model, out, cfg)
    for index in range(cfg.max_new_tokens):
        pred, probs, conf = choose_tokens(guard.token(logits.float()), cfg, gen)   # (B,)
        top_ids, top_probs = _top(probs, cfg.top_candidates)
        h_pred, h_conf, h_ids, h_probs = _to_host(pred, conf, top_ids, top_probs)   # the token's one sync
        tokens = h_pred.long().tolist()
        event = Token(index=index, tokens=tokens, confidence=h_conf.tolist(), top_ids=h_ids.long().tolist(),
                      top_probs=h_probs.tolist(), elapsed=time.perf_counter() - start, nfe=nfe)
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
        guard.add(pred)
        ctx, step_logits = model.extend(ctx, pred.unsqueeze(1))
        logits = step_logits[:, -1]
        nfe += 1
    seconds = time.perf_counter() - start
    yield Done(texts=_decode(model, out), token_ids=out, nfe=nfe, seconds=seconds,
               first_token_seconds=first_token or seconds, stopped="eos" if all(ended) else "length",
               context_passes=nfe)
