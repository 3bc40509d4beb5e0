"""What the denoiser sees of the context tower: its cache plus the clean-token bookkeeping."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch


@dataclass
class ContextState:
    """The context tower's cache over all clean tokens of a batch (left-padded rows).

    cache:   the backbone's transformers cache (attention K/V; Mamba conv + SSM state)
    valid:   (B, L) bool, True at real tokens, False at left padding
    lengths: (B,) long, real tokens per row (the next position id of each row)
    last:    (B,) long, the last clean token of each row (the anchor of an anchored denoiser)
    capacity: None for a growing cache; else the fixed length of a static cache, whose tensors
             keep one shape for the whole run (what torch.compile and CUDA graphs need)
    """
    cache: object
    valid: torch.Tensor
    lengths: torch.Tensor
    last: torch.Tensor | None = None
    capacity: int | None = None

    @property
    def padded(self) -> bool:
        return not bool(self.valid.all())

    def static_valid(self, hide_last: int = 0) -> torch.Tensor:
        """(B, capacity) bool: `valid` padded with False to the static cache's length; with
        `hide_last`, the last clean tokens are hidden too (an anchored block re-reads them)."""
        width = self.valid.shape[1]
        return pad_mask(self.valid[:, :width - hide_last], self.capacity)

    def positions(self, size: int, offset: int = 0) -> torch.Tensor:
        """(B, size) position ids of the next `size` tokens of each row, shifted by `offset`."""
        return self.lengths.unsqueeze(1) + offset + torch.arange(size, device=self.lengths.device)


class ContextView:
    """Per-block view of the context K/V for the denoiser's attention layers.

    Built once per block: for each attention layer it holds [context K/V | room for S block
    K/V]. The attention module calls `update(k, v, layer_idx)` with the block's own K/V and
    gets the concatenation back. With `inplace` (inference) the block K/V is written into a
    preallocated buffer, so the context part is never copied per step; without it (training)
    torch.cat keeps autograd intact.

    `start` (inplace only): the pass computes block slots start.. and reuses the K/V that
    earlier passes of the block left in slots ..start-1 (a clean_as_ar denoiser's committed
    prefix, `TwoTower.denoise(start=...)`).
    """

    def __init__(self, layer_kv: dict[int, tuple[torch.Tensor, torch.Tensor]], block_size: int,
                 inplace: bool = True):
        self.inplace = inplace
        self.start = 0
        self.context_len = next(iter(layer_kv.values()))[0].shape[-2] if layer_kv else 0
        self.kv = {}
        for i, (k, v) in layer_kv.items():
            if inplace:   # (B, kv_heads, L + S, d)
                kb = k.new_empty(*k.shape[:-2], k.shape[-2] + block_size, k.shape[-1])
                vb = v.new_empty(*v.shape[:-2], v.shape[-2] + block_size, v.shape[-1])
                kb[..., : k.shape[-2], :] = k
                vb[..., : v.shape[-2], :] = v
                self.kv[i] = (kb, vb)
            else:
                self.kv[i] = (k, v)

    def rows(self, index: torch.Tensor) -> "ContextView":
        """A copy whose row r is row index[r] of this view (a draft tree's rows, `twotower.draft_tree`).
        A view that is not written in place (a static cache's) and holds one row is expanded, not copied."""
        view = copy.copy(self)
        share = not self.inplace and all(k.shape[0] == 1 for k, _ in self.kv.values())

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t.expand(len(index), *t.shape[1:]) if share else t[index]
        view.kv = {i: (pick(k), pick(v)) for i, (k, v) in self.kv.items()}
        return view

    def keep(self, rows: "ContextView", index: torch.Tensor) -> None:
        """Take the block K/V of rows index (B,) of `rows` (a copy made by `rows()`) as this view's own."""
        for i, (k, v) in self.kv.items():
            rk, rv = rows.kv[i]
            k[..., self.context_len:, :] = rk[index, ..., self.context_len:, :]
            v[..., self.context_len:, :] = rv[index, ..., self.context_len:, :]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        k, v = self.kv[layer_idx]
        if not self.inplace:
            return torch.cat([k, key], dim=-2), torch.cat([v, value], dim=-2)
        first, end = self.context_len + self.start, self.context_len + self.start + key.shape[-2]
        k[..., first:end, :] = key
        v[..., first:end, :] = value
        return k[..., :end, :], v[..., :end, :]


def pad_mask(mask: torch.Tensor, capacity: int) -> torch.Tensor:
    """(B, L) mask -> (B, capacity), the slots after L False (a static cache's unused slots)."""
    out = mask.new_zeros(mask.shape[0], capacity)
    out[:, :mask.shape[1]] = mask
    return out


def block_mask(valid: torch.Tensor, size: int, causal: bool = False, always: bool = False) -> torch.Tensor | None:
    """(B, 1, S, L + S) bool attention mask of block queries, or None when all may be seen.

    valid: (B, L) real context tokens; pads are never attended. With `causal`, block query
    j sees block keys <= j. `always` returns a mask even when all may be seen (static shapes).
    """
    if not (always or causal) and bool(valid.all()):
        return None
    batch = valid.shape[0]
    block = torch.ones(size, size, dtype=torch.bool, device=valid.device)
    if causal:
        block = block.tril()
    context = valid[:, None, None, :].expand(batch, 1, size, -1)
    return torch.cat([context, block.expand(batch, 1, size, size)], -1)


def clean_reads_as_ar(mask: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Restrict a block mask so that clean (committed) queries read as the AR model does.

    mask: (B or 1, 1, S, L + S) bool, the block's S queries over [context | block];
    masked: (B, S) queries that are [MASK]. A clean query then sees, within the block, only
    clean keys at or before its own position; masked queries keep their view. Returns (B, 1, S, L + S).
    """
    s = masked.shape[1]
    order = torch.arange(s, device=masked.device)
    clean_before = (order[None, :] <= order[:, None]) & ~masked[:, None, :]     # (B, S, S) query x key
    allowed = masked[:, :, None] | clean_before
    context = mask[..., :-s].expand(masked.shape[0], -1, -1, -1)
    return torch.cat([context, mask[..., -s:] & allowed[:, None]], -1)
