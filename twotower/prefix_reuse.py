"""Passes over a block that skip its committed prefix (clean_as_ar denoisers).

A clean_as_ar denoiser reads the committed tokens at the start of a block causally, as the
AR model does: their keys/values and the predictions made at them depend only on the tokens
up to them, so they stay the same from one pass to the next. A pass then needs to compute
only the inputs from the first one whose reading may have changed; it reuses the keys/values
that earlier passes left in the block's context view and the logits they gave.

Denoiser input i reads block token i - 1 (input 0: the anchor, the last clean token before
the block) and predicts block token i. Everything here is decided from the host copies that
each pass's Step event already brings back, so it adds no device sync.
"""
from __future__ import annotations

import torch

# A pass computes at least this many inputs: on CPU, MKL runs a product with fewer than 4 rows
# as one matrix-vector product per row, each reading the weights again (measured on the 2-core
# CPU: the 49152-row head takes 10 ms for 1 row, 25 ms for 2, 41 ms for 3, 17 ms for 4).
MIN_INPUTS = 4


class PrefixReuse:
    """Per block: which denoiser inputs still hold valid keys/values, and the latest logits.

    Input i + 1 stays valid while every block token up to i is committed and was read, when
    it was last computed, as it is now. A row whose reading has not changed at all since the
    last pass (a settled row) keeps every input. The pass starts at the first input that some
    row needs: never past a row's first uncommitted token, whose prediction is always wanted.
    """

    def __init__(self, enabled: bool, block: list[list[int]], mask_id: int):
        self.enabled, self.mask_id = enabled, mask_id
        self.committed = block                         # per row: committed ids, mask_id elsewhere
        self.seen = block                              # per row: what the next pass reads
        self.read: list[list[int]] | None = None       # per row: what the view's block K/V were computed from
        self.logits: torch.Tensor | None = None        # (B, S, V) the latest logits of every block token

    def start(self) -> int:
        """The first denoiser input the next pass computes (0: the whole block)."""
        if not self.enabled or self.read is None:
            return 0
        first = min(self._row_start(*row) for row in zip(self.committed, self.seen, self.read))
        return max(0, min(first, len(self.seen[0]) + 1 - MIN_INPUTS))   # inputs: the anchor + S tokens

    def _row_start(self, committed: list[int], seen: list[int], read: list[int]) -> int:
        if seen == read:
            return len(seen)                           # nothing this row reads has changed
        written = valid = 0
        for tok, before in zip(committed, read):
            if tok == self.mask_id:
                break
            if valid == written and tok == before:
                valid += 1
            written += 1
        return min(1 + valid, written)

    def logits_of_pass(self, fresh: torch.Tensor, start: int) -> torch.Tensor:
        """Full (B, S, V) logits of a pass that computed block tokens start.. (fresh: (B, S - start, V));
        a new tensor, which the caller may change in place."""
        if not self.enabled:
            return fresh
        if self.logits is None:
            self.logits = fresh.clone()
        else:
            self.logits[:, start:] = fresh
        return self.logits.clone()

    def record(self, start: int, committed: list[list[int]], drafts: list[list[int]] | None) -> None:
        """After a pass from `start`: what its inputs read, and the block it left (the Step
        event's host lists: committed ids, and the verify order's drafts, -1 where none)."""
        keep = max(start - 1, 0)                       # input `start` read block token start - 1
        old = self.read or self.seen
        self.read = [r[:keep] + s[keep:] for r, s in zip(old, self.seen)]
        self.committed = committed
        self.seen = committed if drafts is None else [
            [d if d >= 0 else tok for tok, d in zip(row, row_drafts)] for row, row_drafts in zip(committed, drafts)]
