"""Sampler settings and the per-step tensor maths: token choice, confidence, commit rule,
the verify order's check (the repeat guards are in twotower.guards).

Pure functions over tensors, shared by the diffusion sampler and the AR baseline.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch

MAX_DRAFT_NODES = 64
MAX_NGRAM = 64       # no_repeat_ngram_size: the ban pads the history to n - 1 tokens per row
REMASKING = ("confidence", "margin", "entropy", "random", "leftmost", "prefix", "verify")


@dataclass
class SamplerConfig:
    block_size: int = 16          # S: tokens per block (the release trains and runs at 16)
    steps: int = 16               # T: denoiser passes allowed per block (the last one commits all)
    threshold: float = 0.9        # gamma: commit every masked position with p(argmax) > gamma
    temperature: float = 0.0      # 0 = greedy; otherwise Gumbel-max on logits / temperature
    top_k: int = 0                # keep the k most likely tokens when sampling (0 = off)
    top_p: float = 1.0            # nucleus sampling mass (1 = off)
    repetition_penalty: float = 1.0  # > 1 lowers the logits of tokens the run has written (1 = off)
    no_repeat_ngram_size: int = 0  # n >= 2: do not write an n-gram the run has written (0 = off; see guards.RepeatGuard)
    remasking: str = "confidence"  # which positions to commit first: confidence|margin|entropy|random|leftmost|prefix,
                                   # or verify: drafts over gamma, checked by the AR model's reading (`verify_step`)
    max_new_tokens: int = 128     # any number; the last block is cut to fit
    stop_at_eos: bool = True      # end a row at its first end-of-text token
    seed: int = 0                 # same seed + settings + prompt -> same tokens
    top_candidates: int = 5       # candidates per position recorded in each step event
    draft_nodes: int = 0          # verify order: a draft tree of the N likeliest paths of drafts, all
                                  # checked in one pass over a row per node (twotower.draft_tree); 0 = off

    def validate(self, max_context: int | None = None) -> "SamplerConfig":
        """Raise ValueError naming the first impossible setting."""
        def bad(msg):
            raise ValueError(msg)
        if not isinstance(self.block_size, int) or self.block_size < 1:
            bad(f"block_size must be a positive integer, got {self.block_size!r}")
        if max_context is not None and self.block_size > max_context:
            bad(f"block_size {self.block_size} is larger than the model's context ({max_context})")
        if not isinstance(self.steps, int) or self.steps < 1:
            bad(f"steps must be a positive integer, got {self.steps!r}")
        if not 0.0 <= self.threshold <= 1.0:
            bad(f"threshold must lie in [0, 1], got {self.threshold!r}")
        if not (self.temperature >= 0.0 and math.isfinite(self.temperature)):
            bad(f"temperature must be >= 0, got {self.temperature!r}")
        if self.top_k < 0:
            bad(f"top_k must be >= 0 (0 = off), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            bad(f"top_p must lie in (0, 1], got {self.top_p!r}")
        if not (1.0 <= self.repetition_penalty <= 10.0):
            bad(f"repetition_penalty must lie in [1, 10] (1 = off), got {self.repetition_penalty!r}")
        n = self.no_repeat_ngram_size
        if not isinstance(n, int) or n < 0 or n == 1 or n > MAX_NGRAM:
            bad(f"no_repeat_ngram_size must be 0 (off) or an integer from 2 to {MAX_NGRAM}, "
                f"got {self.no_repeat_ngram_size!r}")
        if self.remasking not in REMASKING:
            bad(f"remasking must be one of {', '.join(REMASKING)}; got {self.remasking!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        n = self.draft_nodes
        if not isinstance(n, int) or not 0 <= n <= MAX_DRAFT_NODES:
            bad(f"draft_nodes must be an integer from 0 (off) to {MAX_DRAFT_NODES}, got {n!r}")
        if n and self.remasking != "verify":
            bad(f"draft_nodes (a draft tree) works with the verify order only; remasking is {self.remasking!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 63:
            bad(f"seed must be an integer from 0 to 2**63 - 1, got {self.seed!r}")
        if self.top_candidates < 1:
            bad(f"top_candidates must be >= 1, got {self.top_candidates!r}")
        return self

    @property
    def guards_repeats(self) -> bool:
        """Whether the repetition penalty or the n-gram ban is on."""
        return self.repetition_penalty != 1.0 or self.no_repeat_ngram_size > 0

    def guard_phrases(self) -> list[str]:
        """The repeat guards that are on, in words: ['repetition penalty 1.05', 'no repeated 4-grams']."""
        phrases = []
        if self.repetition_penalty != 1.0:
            phrases.append(f"repetition penalty {self.repetition_penalty}")
        if self.no_repeat_ngram_size:
            phrases.append(f"no repeated {self.no_repeat_ngram_size}-grams")
        return phrases

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SamplerConfig":
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def recommended(cls, model_defaults: dict | None = None, **given) -> "SamplerConfig":
        """The release's defaults, overridden by a checkpoint's recommended settings
        (`TwoTower.sampler_defaults`), overridden by the settings `given` (None = not given)."""
        chosen = {k: v for k, v in given.items() if v is not None}
        return cls.from_dict({**(model_defaults or {}), **chosen})


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k / nucleus to -inf. logits: (..., V)."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= top_p   # keep the first token that crosses p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def choose_tokens(logits: torch.Tensor, cfg: SamplerConfig, generator: torch.Generator | None,
                  scaled: torch.Tensor | None = None):
    """Pick a token per position and score it.

    logits: (..., V), float. Returns pred (...,), probs (..., V) of the UNSCALED distribution
    (the release's confidence), confidence p(pred) (...,). At temperature > 0 the token is drawn
    from `sampling_logits(logits, cfg)`, which a caller that needs them too passes as `scaled`.
    """
    logits = logits.float()
    probs = logits.softmax(-1)
    if cfg.temperature == 0.0:
        pred = logits.argmax(-1)
    else:
        pred = gumbel_argmax(sampling_logits(logits, cfg) if scaled is None else scaled, generator)
    confidence = probs.gather(-1, pred.unsqueeze(-1)).squeeze(-1)
    return pred, probs, confidence


def sampling_logits(logits: torch.Tensor, cfg: SamplerConfig) -> torch.Tensor:
    """(..., V): the logits `choose_tokens` draws from at temperature > 0 (tempered, then
    top-k / top-p filtered); their softmax is the sampling distribution."""
    return filter_logits(logits.float() / cfg.temperature, cfg.top_k, cfg.top_p)


def gumbel_argmax(scores: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """A draw from softmax(scores) (..., V) per row, by the Gumbel-max trick."""
    return (scores + gumbel_noise(scores.shape, generator, scores.device)).argmax(-1)


def gumbel_noise(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """Standard Gumbel noise: argmax(scores + noise) is a draw from softmax(scores)."""
    u = torch.rand(shape, generator=generator, device=device)
    return -torch.log((-torch.log(u.clamp_min(1e-20))).clamp_min(1e-20))


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of probs (..., V)."""
    return gumbel_argmax(probs.log(), generator)


def remasking_score(probs: torch.Tensor, confidence: torch.Tensor, strategy: str,
                    generator: torch.Generator | None, threshold: float = 1.0) -> torch.Tensor:
    """Higher score = commit first. probs: (B, S, V); confidence: (B, S).
    `threshold` (gamma) is read by "leftmost" only: positions over it outrank all others.
    "prefix" commits left to right (its count, `commit_counts(contiguous=True)`, does the rest)."""
    if strategy == "confidence":
        return confidence
    if strategy == "margin":
        top2 = probs.topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    if strategy == "entropy":
        return (probs * probs.clamp_min(1e-12).log()).sum(-1)   # = -entropy
    if strategy == "random":
        return torch.rand(confidence.shape, generator=generator, device=confidence.device)
    if strategy in ("leftmost", "prefix"):
        position = torch.arange(confidence.shape[-1], device=confidence.device, dtype=confidence.dtype)
        if strategy == "prefix":    # left to right
            return -position.expand_as(confidence)
        return torch.where(confidence > threshold, 1.0 + confidence, -position)   # over the threshold first
    if strategy == "verify":
        raise ValueError("the verify order has no score: its passes are decided by verify_step")
    raise ValueError(f"unknown remasking strategy {strategy!r}; expected one of {REMASKING}")


def commit_counts(confidence: torch.Tensor, masked: torch.Tensor, steps_left: int, threshold: float,
                  contiguous: bool = False):
    """The release's commit rule, per row.

    k = #masked positions with confidence > threshold (at least 1), raised to at least
    ceil(masked / steps_left), capped at #masked; with one step left, everything.
    contiguous (the "prefix" order): only the masked positions over the threshold before the
    first masked one under it count, so a pass never commits past a gap.
    confidence, masked: (B, S). Returns (k, planned), both (B,) long; planned is the
    threshold count before the floor and cap (for teaching views).
    """
    n_masked = masked.sum(-1)
    over = (confidence > threshold) & masked
    if contiguous:
        over &= (over | ~masked).long().cumprod(-1).bool()
    planned = over.sum(-1)
    floor = torch.div(n_masked + steps_left - 1, steps_left, rounding_mode="floor")
    k = torch.maximum(planned.clamp_min(1), floor).minimum(n_masked)
    return k, planned


def select_commits(score: torch.Tensor, masked: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Boolean (B, S): the k highest-scoring masked positions of each row."""
    score = score.masked_fill(~masked, float("-inf"))
    order = score.argsort(dim=-1, descending=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return (rank < k.unsqueeze(-1)) & masked


def settled_rows(x: torch.Tensor, mask_id: int, eos_ids: torch.Tensor | None) -> torch.Tensor:
    """(B,) bool: rows of a block that need no more passes. x: (B, S) block tokens.

    A row is settled when nothing is masked, or (eos_ids given: the run stops at end-of-text)
    when it holds a committed end-of-text token with every position before it committed:
    what follows would be cut from the output anyway.
    """
    filled = x != mask_id                                           # (B, S)
    if eos_ids is None:
        return filled.all(-1)
    before = torch.cat([torch.ones_like(filled[:, :1]), filled[:, :-1]], -1).cumprod(-1).bool()
    return filled.all(-1) | (torch.isin(x, eos_ids) & before).any(-1)


def decide_step(logits: torch.Tensor, masked: torch.Tensor, steps_left: int, cfg: SamplerConfig,
                generator: torch.Generator | None):
    """One denoiser pass's decision: a token per position, the commit rule, the commit order.

    logits: (B, S, V); masked: (B, S). Returns pred, probs, confidence, planned (B,) and
    commit (B, S) bool.
    """
    pred, probs, conf = choose_tokens(logits, cfg, generator)
    k, planned = commit_counts(conf, masked, steps_left, cfg.threshold, contiguous=cfg.remasking == "prefix")
    score = remasking_score(probs, conf, cfg.remasking, generator, cfg.threshold)
    return pred, probs, conf, planned, select_commits(score, masked, k)


class Decision(NamedTuple):
    """One pass's decision: the block after it and what the views show of it."""
    x: torch.Tensor            # (B, S) committed ids, mask id elsewhere
    drafts: torch.Tensor       # (B, S) the next pass's drafts, mask id where none
    draft_probs: torch.Tensor | None   # (B, S, V) what each draft was drawn from (temperature > 0)
    pred: torch.Tensor         # (B, S) the pass's token per position
    probs: torch.Tensor        # (B, S, V) unscaled distribution per position
    confidence: torch.Tensor   # (B, S) p(pred)
    planned: torch.Tensor      # (B,) commits the threshold asked for (verify: new drafts)
    commit: torch.Tensor       # (B, S) bool, committed at this pass
    rejected: torch.Tensor     # (B, S) bool, drafts this pass dropped


def verify_step(logits: torch.Tensor, x: torch.Tensor, drafts: torch.Tensor, draft_probs: torch.Tensor | None,
                open_: torch.Tensor, steps_left: int, cfg: SamplerConfig, generator: torch.Generator | None,
                mask_id: int) -> Decision:
    """The `verify` order: the denoiser drafts, its clean_as_ar reading of the drafts checks them
    (speculative decoding, the denoiser as its own drafter).

    The block holds committed tokens, then drafts, then masked positions. The pass read the
    drafts as clean text, so its prediction p at each draft and at the position after the
    drafts is the AR model's, given the text before it. Left to right, a draft d drawn from q
    holds with probability min(1, p(d) / q(d)) (greedy: when d is the AR model's argmax); the
    first that fails is replaced by a draw from norm(max(p - q, 0)) (greedy: the argmax) and
    the drafts after it are dropped. When all hold, the first masked position takes the AR
    model's token and the masked run right after it with confidence over gamma becomes the
    next drafts. Every pass commits at least one token, and while steps are left the text is
    the AR model's (greedy) or a draw from it. With one step left, everything is committed,
    unchecked (the release's floor is not applied before: spreading unchecked guesses over the
    passes measured worse, README "Commit order verify").

    logits: (B, S, V) guarded, [MASK] forbidden; x: (B, S) committed ids, mask_id elsewhere;
    drafts: (B, S) draft ids, mask_id where none; draft_probs: (B, S, V) or None (greedy);
    open_: (B, S) bool, unwritten positions of rows that still go on.
    """
    greedy = cfg.temperature == 0.0
    scaled = None if greedy else sampling_logits(logits, cfg)     # one filter pass for the draw and p
    pred, probs, conf = choose_tokens(logits, cfg, generator, scaled)
    p = None if greedy else scaled.softmax(-1)
    committed, drafted = x != mask_id, drafts != mask_id
    if greedy:
        holds = pred == drafts
    else:                                                          # u < p(d) / q(d)
        draft_probs = p if draft_probs is None else draft_probs   # None: no drafts yet
        p_d, q_d = p.gather(-1, drafts[..., None])[..., 0], draft_probs.gather(-1, drafts[..., None])[..., 0]
        holds = torch.rand(p_d.shape, generator=generator, device=p_d.device) * q_d < p_d
    done = (committed | (drafted & holds)).long().cumprod(-1).bool()      # the checked prefix
    accepted = done & drafted
    after_done = torch.cat([torch.ones_like(done[:, :1]), done[:, :-1]], -1)
    first = ~done & after_done                                      # (B, S) the first unchecked position
    failed = first & drafted
    token = torch.where(accepted, drafts, pred)
    if not greedy:                                                  # a failed draft: draw from max(p - q, 0)
        token = torch.where(failed, draw((p - draft_probs).clamp_min(0), generator), token)
    commit = open_ & ((accepted | first) if steps_left > 1 else torch.ones_like(done))
    x = torch.where(commit, token, x)
    # next drafts: only after a prefix that held up, over gamma, right after the first position
    over = (conf > cfg.threshold) & ~committed & ~drafted & open_
    run = (over | done | first).long().cumprod(-1).bool() & over & ~first & ~failed.any(-1, keepdim=True)
    if steps_left == 1:
        run = torch.zeros_like(run)
    new = torch.where(run, pred, torch.full_like(pred, mask_id))
    return Decision(x, new, None if greedy else p, token, probs, conf, run.sum(-1), commit,
                    drafted & ~accepted & open_)                    # a settled row's drafts are not checked


def decide_pass(logits: torch.Tensor, x: torch.Tensor, drafts: torch.Tensor, draft_probs: torch.Tensor | None,
                open_: torch.Tensor, steps_left: int, cfg: SamplerConfig, generator: torch.Generator | None,
                mask_id: int) -> Decision:
    """One denoiser pass's decision under any commit order (arguments as `verify_step`; outside
    the verify order there are no drafts)."""
    if cfg.remasking == "verify":
        return verify_step(logits, x, drafts, draft_probs, open_, steps_left, cfg, generator, mask_id)
    pred, probs, conf, planned, commit = decide_step(logits, open_, steps_left, cfg, generator)
    return Decision(torch.where(commit, pred, x), drafts, None, pred, probs, conf, planned, commit,
                    torch.zeros_like(commit))                       # carry-over: committed stay
