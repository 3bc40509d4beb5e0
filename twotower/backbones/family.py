"""What every backbone family shares: its two models, its caches, the context pass to call."""
from __future__ import annotations

from transformers import DynamicCache, StaticCache

from ..context import ContextState


class Family:
    """Base of the per-family layer loops (LlamaFamily, NemotronHFamily)."""

    supports_anchor = False
    supports_static = True

    def __init__(self, context_lm, denoiser_lm):
        self.context_lm = context_lm
        self.denoiser_lm = denoiser_lm
        self.config = context_lm.config
        self.fixed_step = context_lm     # runs fixed-shape context passes; TwoTower.compile swaps it

    def new_cache(self, capacity: int | None = None):
        """A growing cache, or with `capacity` a static one (attention K/V of that many positions;
        Mamba states are fixed-size either way)."""
        if capacity is None:
            return DynamicCache(config=self.config)
        return StaticCache(config=self.config, max_cache_len=capacity)

    def context_call(self, ctx: ContextState):
        """The context tower to run on `ctx`: the compiled fixed-shape pass for AR steps and block
        extends on a static cache, the eager model for a prefill (its length varies) or a growing cache."""
        return self.fixed_step if ctx.capacity is not None and ctx.valid.shape[1] > 0 else self.context_lm
