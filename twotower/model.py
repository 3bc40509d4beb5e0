"""TwoTower: a frozen AR context tower plus a denoiser tower of the same architecture.

The context tower is a transformers CausalLM that reads clean tokens and keeps one cache,
extended once per committed block. The denoiser is a second CausalLM of the same family
(a copy of the backbone, possibly fine-tuned) whose layer loop is ours: its attention
layers attend over [context K/V | block K/V], its Mamba layers start from the context's
state, every sub-layer is modulated by the masked fraction t (adaLN-single).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from . import attention
from .backbones import family_for
from .conditioning import TimeConditioning
from .context import ContextState, clean_reads_as_ar
from .gating import AdapterGate
from .cpu_linear import PackedLinear, packed_layers, unprepare as unprepare_cpu_linears


def vocab_logits(head: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """head(h): (B, S, H) -> (B, S, V). On the CPU in float32 without oneDNN packing
    (twotower.cpu_linear), MKL runs the vocabulary-wide product of a few rows on a slow path
    unless their count is a multiple of 4 (SmolLM2's head, 2 threads: 34 ms for 3 rows, 32 ms for
    7 and 11, 17 / 16 / 16 ms for 4 / 8 / 12, 10 ms for 1), so there 2 to 11 rows are padded with
    zero rows to the next multiple of 4 (a packed head needs no padding: 1.5 ms for 3 rows, 1.7
    for 4). The rows go in as one contiguous matrix: a strided slice (B > 1) takes a slower
    batched product."""
    rows = h.shape[0] * h.shape[1]
    flat = h.reshape(rows, h.shape[-1])                                  # (rows, H), contiguous
    pad = -rows % 4
    if (pad and 2 <= rows <= 11 and h.device.type == "cpu" and h.dtype == torch.float32
            and not isinstance(head, PackedLinear)):
        flat = torch.cat([flat, flat.new_zeros(pad, flat.shape[-1])])
    return head(flat)[:rows].view(*h.shape[:-1], -1)


class TwoTower(nn.Module):
    def __init__(self, context_lm, denoiser_lm, mask_token_id: int, tokenizer=None,
                 name: str = "twotower", learned_mask: bool = False, anchor: bool = False,
                 clean_as_ar: bool = False):
        super().__init__()
        if context_lm.config.model_type != denoiser_lm.config.model_type:
            raise ValueError(f"context tower ({context_lm.config.model_type}) and denoiser "
                             f"({denoiser_lm.config.model_type}) must share an architecture")
        vocab = context_lm.config.vocab_size
        if not 0 <= mask_token_id < vocab:
            raise ValueError(f"mask token id {mask_token_id} is outside the vocabulary (0..{vocab - 1})")
        self.context_lm = context_lm.eval().requires_grad_(False)
        self.denoiser_lm = denoiser_lm
        denoiser_lm.set_attn_implementation(attention.NAME)
        self.family = family_for(context_lm.config)(context_lm, denoiser_lm)
        hidden = denoiser_lm.config.hidden_size
        self.time = TimeConditioning(hidden, self.family.num_tables)
        self.mask_embedding = None
        if learned_mask:   # a dedicated input vector for [MASK], initialised from its token row
            row = denoiser_lm.get_input_embeddings().weight[mask_token_id].detach().clone()
            self.mask_embedding = nn.Parameter(row)
        if anchor and not getattr(self.family, "supports_anchor", False):
            raise ValueError(f"an anchored denoiser is not supported for {context_lm.config.model_type}")
        self.anchor = anchor
        if clean_as_ar and not anchor:
            raise ValueError("clean_as_ar needs an anchored denoiser (anchor=True)")
        self.clean_as_ar = clean_as_ar   # clean block positions compute the AR model exactly (`_denoise`)
        self.adapter_gate: AdapterGate | None = None   # gates the LoRA update per token (`gate_adapter`)
        self.adapter = None            # a peft model when the denoiser is an adapter on the shared base
        self.static_cache = False      # fixed-shape caches (see `use_static` / `compile`)
        self._compiled_denoise = None
        self.compile_options: dict = {}
        self.mask_token_id = mask_token_id
        self.tokenizer = tokenizer
        self.name = name
        self.eval_items_seen: frozenset[str] = frozenset()   # eval QA ids its training corpus held
        self.sampler_defaults: dict = {}   # its checkpoint's recommended SamplerConfig settings

    # ---- facts -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.denoiser_lm.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser_lm.get_input_embeddings().weight.dtype

    @property
    def shares_base(self) -> bool:
        """True when the denoiser runs on the context tower's own modules (adapter unmerged)."""
        return self.denoiser_lm is self.context_lm

    def gate_adapter(self) -> "TwoTower":
        """For a clean_as_ar denoiser: let its (unmerged) LoRA update act on masked positions only."""
        self.adapter_gate = AdapterGate(self.denoiser_lm)
        return self

    @property
    def compiled(self) -> bool:
        return self._compiled_denoise is not None

    @property
    def max_context(self) -> int:
        return self.family.max_context

    @property
    def eos_token_ids(self) -> set[int]:
        """Every id that ends a reply: the config's and the tokenizer's end tokens."""
        ids = set()
        for src in (self.context_lm.config, getattr(self.context_lm, "generation_config", None)):
            eos = getattr(src, "eos_token_id", None)
            ids.update([eos] if isinstance(eos, int) else (eos or []))
        tok = self.tokenizer
        if tok is not None:
            for name in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
                tid = tok.convert_tokens_to_ids(name)
                # a missing name maps to unk; but unk may BE <|endoftext|> (SmolLM2): compare names
                if isinstance(tid, int) and tok.convert_ids_to_tokens(tid) == name:
                    ids.add(tid)
            if tok.eos_token_id is not None:
                ids.add(tok.eos_token_id)
        ids.discard(self.mask_token_id)
        return ids

    # ---- fast paths --------------------------------------------------------------------
    def use_static(self, on: bool = True) -> "TwoTower":
        """Run on static caches: every AR step, block extend and denoiser pass of a run keeps
        one tensor shape (the prerequisite of torch.compile without recompiles and of CUDA
        graphs). Tokens equal the dynamic path's; attention spans the cache's capacity."""
        if on and not getattr(self.family, "supports_static", False):
            raise ValueError(f"static caches are not supported for {self.context_lm.config.model_type} yet")
        self.static_cache = on
        return self

    def compile(self, mode: str | None = None, backend: str = "inductor") -> "TwoTower":
        """torch.compile the fixed-shape passes on static caches, the same way for both modes
        (this replaces nn.Module.compile: a TwoTower has no single forward to compile):
        the context tower's AR step / block extend and the whole denoiser pass (embedding,
        time conditioning, layers, head). mode="reduce-overhead" adds CUDA graphs on a GPU.
        Prefills and passes that capture attention stay eager. oneDNN-packed linear layers
        (twotower.cpu_linear) go back to plain ones: the compiler lays out weights its own way."""
        options = {"backend": backend, "dynamic": False, **({"mode": mode} if mode else {})}
        try:
            fixed_step, denoise = torch.compile(self.context_lm, **options), torch.compile(self._denoise, **options)
        except (RuntimeError, ValueError) as e:     # an unknown mode or backend
            raise ValueError(f"cannot compile with {options}: {e}") from None
        unprepare_cpu_linears(self)
        self.use_static()
        self.compile_options, self.family.fixed_step, self._compiled_denoise = options, fixed_step, denoise
        return self

    def cache_capacity(self, needed: int) -> int:
        """Static cache length for `needed` positions: a multiple of 256, so that runs of
        similar length share compiled graphs."""
        return -(-needed // 256) * 256

    # ---- context tower -----------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], pad_id: int = 0, room: int | None = None):
        """Read left-padded prompts into a fresh cache. Returns (ContextState, last logits (B, V)).

        room: how many tokens the run will append; with `static_cache` on, the cache is then
        static with room for them (without `room` it grows as needed)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        valid = torch.zeros(len(prompts), width, dtype=torch.bool)
        for b, p in enumerate(prompts):
            ids[b, width - len(p):] = torch.tensor(p)
            valid[b, width - len(p):] = True
        ids, valid = ids.to(self.device), valid.to(self.device)
        capacity = self.cache_capacity(width + room) if self.static_cache and room is not None else None
        cache = self.family.new_cache(capacity) if capacity else self.family.new_cache()
        empty = ContextState(cache, valid[:, :0], torch.zeros(len(prompts), dtype=torch.long, device=self.device),
                             capacity=capacity)
        ctx, logits = self.extend(empty, ids, valid, last_only=True)
        return ctx, logits[:, -1]

    @torch.no_grad()
    def extend(self, ctx: ContextState, ids: torch.Tensor, valid: torch.Tensor | None = None, last_only: bool = False):
        """Append clean ids (B, n) to the context cache in ONE pass. Returns (new state, logits
        (B, n, V)); with last_only, (B, 1, V): the next token's only (the head skips the rest)."""
        if valid is None:
            valid = torch.ones_like(ids, dtype=torch.bool)
        with self.adapter.disable_adapter() if self.adapter is not None else contextlib.nullcontext():
            logits = self.family.context_forward(ids, ctx, valid, keep=1 if last_only else 0)
        new = ContextState(ctx.cache, torch.cat([ctx.valid, valid], 1), ctx.lengths + valid.sum(1), ids[:, -1].contiguous(),
                           ctx.capacity)
        return new, logits

    # ---- denoiser ----------------------------------------------------------------------
    def embed_block(self, x: torch.Tensor) -> torch.Tensor:
        h = self.denoiser_lm.get_input_embeddings()(x)
        if self.mask_embedding is not None:
            h = torch.where((x == self.mask_token_id).unsqueeze(-1), self.mask_embedding.to(h.dtype), h)
        return h

    def denoise(self, x: torch.Tensor, inputs: dict, t: torch.Tensor | None = None, capture=None,
                start: int = 0) -> torch.Tensor:
        """One denoiser pass. x: (B, S) block ids with mask ids -> logits (B, S - start, V).

        t defaults to the masked fraction of each row. An anchored denoiser (our small
        default model) also reads the last clean token before the block, and its output at
        input i predicts block token i, as the AR model it starts from does; the release's
        denoiser reads the block alone and predicts token j at position j.

        start: compute block positions start.. only, reusing what earlier passes of this block
        left in `inputs`' view for the positions before (`can_reuse_prefix`); the logits are
        those of block tokens start..S-1. The caller keeps track of which inputs are still valid
        (twotower.prefix_reuse.PrefixReuse).
        """
        if t is None:
            t = (x == self.mask_token_id).float().mean(-1)
        static = inputs.get("static", False)
        if start and not self.can_reuse_prefix(inputs, capturing=capture is not None):
            raise ValueError("only a clean_as_ar denoiser on a growing cache, capturing no attention, "
                             "can reuse a block's committed prefix (start > 0)")
        if capture is not None and static:
            capture.static_slots = inputs["context_slots"]
        fast = self.compiled and capture is None and static
        if fast:
            return self._compiled_denoise(x, inputs, t.to(self.device), capture)
        return self._denoise(x, inputs, t.to(self.device), capture, start)

    def can_reuse_prefix(self, inputs: dict, capturing: bool = False) -> bool:
        """Whether passes over this block may start past its committed prefix. A clean_as_ar
        denoiser reads that prefix causally, as the AR model does, so its K/V and predictions
        do not change between passes; the growing cache's view keeps them in place (a static
        cache's passes keep one shape instead, and captured attention covers every position)."""
        return self.clean_as_ar and not inputs.get("static", False) and not capturing

    def _denoise(self, x: torch.Tensor, inputs: dict, t: torch.Tensor, capture=None, start: int = 0) -> torch.Tensor:
        ids = torch.cat([inputs["anchor"], x], 1) if self.anchor else x
        with self.reading_clean_as_ar(ids, inputs, start) as inputs:
            h = self.family.denoiser_hidden(self.embed_block(ids[:, start:]), inputs, self.time, self.time(t), capture)
        if self.anchor:
            h = h[:, :-1]                                       # the last input predicts past the block
        return vocab_logits(self.denoiser_lm.get_output_embeddings(), h)

    @contextlib.contextmanager
    def reading_clean_as_ar(self, ids: torch.Tensor, inputs: dict, start: int = 0):
        """Yields the inputs of one denoiser pass over ids (B, S); for a clean_as_ar denoiser,
        clean positions attend causally to clean keys only, and the adapter and the time
        conditioning leave them alone. A clean prefix of the block then computes exactly what the
        AR model computes for it, so the prediction after it (the token `leftmost` and `prefix`
        commit next) is the AR model's; only the masked positions are the denoiser's own. (A clean
        token committed past a gap reads the clean text around the gap, not the AR model's.)
        With `start`, the pass's queries are inputs start.. of ids (`denoise`)."""
        if not self.clean_as_ar:
            yield inputs
            return
        masked = ids == self.mask_token_id                              # (B, S)
        active = masked[:, start:].unsqueeze(-1)                        # (B, S - start, 1)
        mask = clean_reads_as_ar(inputs["mask"], masked)[:, :, start:]  # (B, 1, S - start, L + S)
        inputs["view"].start = start                                    # K/V of inputs ..start-1 stay
        gate = self.adapter_gate(active) if self.adapter_gate is not None else contextlib.nullcontext()
        with gate:
            yield dict(inputs, mask=mask, active=active, positions=inputs["positions"][:, start:])

    def block_inputs(self, ctx: ContextState, size: int, causal: bool = False) -> dict:
        """The denoiser's view of the context for one block (built once per block)."""
        if not self.anchor:
            return self.family.block_inputs(ctx, size, causal=causal)
        inputs = self.family.block_inputs(ctx, size + 1, causal=causal, offset=-1, always_mask=self.clean_as_ar)
        inputs["anchor"] = ctx.last.unsqueeze(1)                       # (B, 1)
        return inputs

    def training_inputs(self, clean: torch.Tensor, block_size: int) -> dict:
        """The frozen context tower's one pass over clean (B, N), laid out for `training_hidden`."""
        return self.family.training_inputs(clean, block_size, anchor=self.anchor)

    def training_hidden(self, clean: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor, block_size: int,
                        inputs: dict | None = None):
        """Denoise every block of (B, N) sequences at once; t: (B, N) per-token masked fraction.

        Returns final hidden states (B, N - start, H) for positions start..N-1, where start =
        `training_start(block_size)`: 0, or block_size for an anchored denoiser (the first
        block has no clean token before it). inputs: `training_inputs(clean, block_size)` when
        the caller has run them already.
        """
        if inputs is None:
            inputs = self.training_inputs(clean, block_size)
        if not self.anchor:
            return self.family.denoiser_hidden(self.embed_block(noisy), inputs, self.time, self.time(t))
        qpos = inputs["query_positions"]                                # (Q,) input positions
        slot = torch.arange(qpos.numel(), device=qpos.device) % (block_size + 1)
        ids = torch.where(slot == 0, clean[:, qpos], noisy[:, qpos])    # anchor slots stay clean
        tq = t[:, qpos + (slot == 0).long()]                            # an anchor carries its block's t
        with self.reading_clean_as_ar(ids, inputs) as inputs:
            h = self.family.denoiser_hidden(self.embed_block(ids), inputs, self.time, self.time(tq))
        keep = torch.arange(qpos.numel(), device=qpos.device).view(-1, block_size + 1)[:, :block_size]
        return h[:, keep.flatten()]                                     # the last slot predicts past its block

    def training_logits(self, clean: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor, block_size: int):
        """Logits (B, N - start, V) of `training_hidden` (training itself heads masked positions only)."""
        return self.denoiser_lm.get_output_embeddings()(self.training_hidden(clean, noisy, t, block_size))

    def training_start(self, block_size: int) -> int:
        return block_size if self.anchor else 0

    @torch.no_grad()
    def context_logits(self, context_hidden: torch.Tensor) -> torch.Tensor:
        """The AR model's next-token logits (..., V) from its final hidden states (..., H),
        on the denoiser's device."""
        head = self.context_lm.get_output_embeddings()
        return head(context_hidden.to(head.weight.device)).to(self.device)

    # ---- text --------------------------------------------------------------------------
    def info(self) -> dict:
        cfg = self.context_lm.config
        count = lambda m: sum(p.numel() for p in m.parameters())
        backbone = 0 if self.shares_base else count(self.denoiser_lm)
        return {
            "name": self.name,
            "architecture": cfg.model_type,
            "layers": cfg.num_hidden_layers,
            "hidden": cfg.hidden_size,
            "vocab": cfg.vocab_size,
            "context_params": count(self.context_lm),
            "denoiser_params": backbone + count(self.time) + (self.adapter is not None and sum(
                                   p.numel() for n, p in self.adapter.named_parameters() if "lora_" in n))
                               + (self.mask_embedding.numel() if self.mask_embedding is not None else 0),
            "mask_token_id": self.mask_token_id,
            "anchor": self.anchor,
            "clean_as_ar": self.clean_as_ar,
            "shares_base": self.shares_base,
            "context_device": str(next(self.context_lm.parameters()).device),
            "denoiser_device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "packed_linears": len(packed_layers(self)),   # oneDNN-packed linear layers (CPU, float32)
            "static_cache": self.static_cache,
            "compiled": self.compile_options or False,
            "max_context": self.max_context,
            "eval_items_seen": sorted(self.eval_items_seen),
            "sampler_defaults": dict(self.sampler_defaults),
        }
