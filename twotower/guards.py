"""Repeat guards: the repetition penalty and the n-gram ban over the tokens a run has written,
for a diffusion block (each position, or each draft as the AR model met it) and for AR steps.

In-place tensor functions and `RepeatGuard`, which the samplers build once per block (diffusion)
or once per run (AR).
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .sampling import SamplerConfig


def history_tensor(rows: list[list[int]], device) -> torch.Tensor:
    """(B, longest row) long: each row's tokens, left-padded with -1 (never a token)."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        if row:
            out[b, width - len(row):] = torch.tensor(row)
    return out.to(device)


def penalise_repeats_(logits: torch.Tensor, written: torch.Tensor, penalty: float,
                      where: torch.Tensor | None = None) -> torch.Tensor:
    """The CTRL repetition penalty (as transformers' `repetition_penalty`) over the tokens a row
    has written: their positive logits are divided by `penalty`, negative ones multiplied.
    In place (returns logits), reading and writing only the written ids' columns.

    logits: (B, S, V); written: (B, L) token ids, -1 = none; where: (B, S) bool, the
    positions to penalise (default: all).
    """
    if penalty == 1.0 or written.shape[1] == 0:
        return logits
    real = written >= 0
    # a -1 reads a real id of its row (and writes back the same value), or column 0 unchanged
    ids = torch.where(real, written, written.amax(1, keepdim=True).clamp_min(0))
    ids = ids[:, None, :].expand(-1, logits.shape[1], -1)                          # (B, S, L)
    score = logits.gather(-1, ids)
    apply = real.any(1)[:, None, None]                                            # rows with a written id
    if where is not None:
        apply = apply & where[..., None]
    penalised = torch.where(score > 0, score / penalty, score * penalty)
    return logits.scatter_(-1, ids, torch.where(apply, penalised, score))


def penalise_prefix_repeats_(logits: torch.Tensor, history: torch.Tensor, x: torch.Tensor, mask_id: int,
                              penalty: float, at: torch.Tensor) -> torch.Tensor:
    """The repetition penalty at written block positions `at`, as the AR model met it when it
    wrote there: over the history and the block's tokens before each position. In place,
    reading and writing only the written ids' columns.

    logits: (B, S, V); history: (B, H) left-padded with -1; x: (B, S), mask_id where not written;
    at: (B, S) bool.
    """
    if penalty == 1.0:
        return logits
    seq = torch.cat([history, x], 1)                                              # (B, L)
    written = (seq >= 0) & (seq != mask_id)
    ids = torch.where(written, seq, mask_id)                      # unwritten entries read [MASK], never penalised
    L, H = seq.shape[1], history.shape[1]
    index = torch.arange(L, device=seq.device)
    same = (ids[:, :, None] == ids[:, None, :]) & written[:, None, :]            # (B, L, L)
    first = torch.where(same, index, L).amin(-1)                  # (B, L) first place each id was written
    before = first[:, None, :] < (H + torch.arange(x.shape[1], device=seq.device))[None, :, None]   # (B, S, L)
    apply = before & written[:, None, :] & at[..., None]          # equal for every copy of an id
    ids = ids[:, None, :].expand(-1, x.shape[1], -1)
    score = logits.gather(-1, ids)
    penalised = torch.where(score > 0, score / penalty, score * penalty)
    return logits.scatter_(-1, ids, torch.where(apply, penalised, score))


def ban_repeated_ngrams_(logits: torch.Tensor, history: torch.Tensor, x: torch.Tensor, mask_id: int,
                         n: int, at: torch.Tensor | None = None) -> torch.Tensor:
    """No repeated n-grams (as transformers' `no_repeat_ngram_size`, over the tokens a row has
    written): at each unwritten block position whose n-1 tokens before it are written, the
    tokens that followed those n-1 tokens anywhere in the written text get -inf, in place.
    at: (B, S) bool, ban at these (written) positions instead, as the AR model did when it
    wrote there: only n-grams that end before the position count.

    logits: (B, S, V); history: (B, H) tokens before the block, left-padded with -1, H >= n-1;
    x: (B, S) the block, mask_id where not yet written.
    """
    if history.shape[1] < n - 1:
        raise ValueError(f"the n-gram ban needs the {n - 1} tokens before the block; history has {history.shape[1]}")
    seq = torch.cat([history, x], 1)                               # (B, H + S)
    written = (seq >= 0) & (seq != mask_id)
    grams, grams_written = seq.unfold(1, n, 1), written.unfold(1, n, 1).all(-1)   # (B, G, n), (B, G)
    start = history.shape[1] - (n - 1)                             # the n-1 tokens before block position 0
    before = seq.unfold(1, n - 1, 1)[:, start: start + x.shape[1]]                # (B, S, n-1)
    before_written = written.unfold(1, n - 1, 1)[:, start: start + x.shape[1]].all(-1)
    before_written &= (x == mask_id) if at is None else at        # the other positions keep their scores
    match = (grams[:, None, :, :-1] == before[:, :, None, :]).all(-1)             # (B, S, G)
    match &= grams_written[:, None, :] & before_written[:, :, None]
    if at is not None:                                             # n-grams that end before the position
        ends = torch.arange(grams.shape[1], device=x.device) + n - 1               # (G,) index in seq
        match &= ends[None, None, :] < (history.shape[1] + torch.arange(x.shape[1], device=x.device))[None, :, None]
    follows = grams[..., -1].clamp_min(0)[:, None, :].expand_as(match)            # (B, S, G)
    ban = torch.full(match.shape, float("inf"), dtype=logits.dtype, device=logits.device).masked_fill(
        match, float("-inf"))                                      # min(score, +inf) keeps it, -inf bans
    return logits.scatter_reduce_(-1, follows, ban, reduce="amin")


class RepeatGuard:
    """A run's repetition penalty and n-gram ban over the tokens each row has written so far
    (not the prompt): built at each block start from the text so far (diffusion), or once and
    fed every token (AR). Either guard is skipped when off.

    In AR the ban is exact. In a diffusion block it bans at positions whose n-1 tokens before
    them are written when they are committed: neighbours committed in the same pass, or a
    position filled left of written tokens, can still form a repeat (rare with `leftmost`).

    history: (B, H) the tokens each row has written, left-padded with -1 (`history_tensor`).
    """

    def __init__(self, cfg: SamplerConfig, history: torch.Tensor):
        self.on, self.penalty, self.n = cfg.guards_repeats, cfg.repetition_penalty, cfg.no_repeat_ngram_size
        short = max(self.n - 1 - history.shape[1], 0)                 # the ban reads n-1 tokens back
        self.history = torch.nn.functional.pad(history, (short, 0), value=-1)
        self.blank = torch.full((history.shape[0], 1), -1, dtype=torch.long, device=history.device)   # AR's next

    def rows(self, index: torch.Tensor) -> "RepeatGuard":
        """The same guard for rows index (N,) of this one's (a draft tree's rows)."""
        guard = copy.copy(self)
        guard.history, guard.blank = self.history[index], self.blank[index]
        return guard

    def block(self, logits: torch.Tensor, x: torch.Tensor, mask_id: int) -> torch.Tensor:
        """logits: (B, S, V) of block x: (B, S), changed in place; the block's written tokens
        count too, and the scores of its written positions stay as they are (views show them)."""
        if not self.on:
            return logits
        open_ = x == mask_id
        if self.penalty != 1.0:
            written = torch.cat([self.history, x.masked_fill(open_, -1)], 1)
            logits = penalise_repeats_(logits, written, self.penalty, where=open_)
        if self.n:
            logits = ban_repeated_ngrams_(logits, self.history, x, mask_id, self.n)
        return logits

    def denoiser_pass(self, logits: torch.Tensor, x: torch.Tensor, mask_id: int,
                      drafted: torch.Tensor | None = None) -> torch.Tensor:
        """A denoiser pass's logits (B, S, V) over block x (B, S), as the sampler decides from
        them, changed in place: the guards over the block, the AR model's guards at the written
        drafts `drafted` (B, S) (the verify order), and [MASK] never predicted."""
        logits = self.block(logits, x, mask_id)                        # repetition penalty, n-gram ban
        if drafted is not None:
            logits = self.prefix(logits, x, mask_id, drafted)          # AR's guards at the drafts
        logits[..., mask_id] = float("-inf")
        return logits

    def prefix(self, logits: torch.Tensor, x: torch.Tensor, mask_id: int, at: torch.Tensor) -> torch.Tensor:
        """The AR model's guards at written block positions `at` (B, S) (the `verify` order's
        drafts): over the text before each position only. logits: (B, S, V), changed in place."""
        if not self.on:
            return logits
        logits = penalise_prefix_repeats_(logits, self.history, x, mask_id, self.penalty, at)
        if self.n:
            logits = ban_repeated_ngrams_(logits, self.history, x, mask_id, self.n, at=at)
        return logits

    def token(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: (B, V) of the next token (AR), changed in place."""
        if not self.on:
            return logits
        return self.block(logits[:, None], self.blank, -1)[:, 0]

    def add(self, tokens: torch.Tensor) -> None:
        """Record the token each row just wrote (AR). tokens: (B,)."""
        if self.on:
            self.history = torch.cat([self.history, tokens[:, None]], 1)
