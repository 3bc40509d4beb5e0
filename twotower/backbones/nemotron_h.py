"""Nemotron-H (hybrid Mamba-2 / attention / MoE / MLP) as a TwoTower backbone.

The context tower is transformers' own NemotronHForCausalLM with its own cache (attention
K/V; Mamba conv + SSM state). The denoiser's layer loop is ours and reuses each layer's
norm and mixer modules; one conditioning table per layer (table i conditions layer i):

- Mamba-2 and attention layers: modulate (x * (1 + scale) + shift), THEN the layer's RMSNorm.
- MoE and MLP layers: RMSNorm, THEN modulate.
- The gate multiplies the mixer output before the residual add.

Attention layers attend over [context K/V | block K/V] (no RoPE in Nemotron-H) through a
`ContextView` and the registered "twotower" attention function, not causal. Mamba-2 layers
run a forward scan over the block seeded with the context tower's conv state and SSM state
after the last clean token: exact (the SSD quadratic form within the block, plus the decayed
seed), in fp32, pure PyTorch, and it never writes into the context cache.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from ..attention import AttentionCapture
from ..conditioning import modulate
from ..context import ContextState, ContextView, block_mask, pad_mask
from .family import Family

MODEL_TYPES = ("nemotron_h",)
MAMBA, ATTENTION = "linear_attention", "full_attention"


class NemotronHFamily(Family):
    name = "nemotron_h"
    supports_anchor = False     # the release's denoiser reads the block alone

    # ---- sizes -------------------------------------------------------------------------
    @property
    def layer_types(self) -> list[str]:
        return list(self.config.layers_block_type)

    @property
    def num_tables(self) -> int:
        return self.config.num_hidden_layers

    @property
    def attention_layers(self) -> list[int]:
        return [i for i, kind in enumerate(self.layer_types) if kind == ATTENTION]

    @property
    def mamba_layers(self) -> list[int]:
        return [i for i, kind in enumerate(self.layer_types) if kind == MAMBA]

    @property
    def max_context(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 4096))

    def _context_device(self) -> torch.device:
        return self.context_lm.get_input_embeddings().weight.device

    def _denoiser_device(self) -> torch.device:
        return self.denoiser_lm.get_input_embeddings().weight.device

    # ---- context tower -----------------------------------------------------------------
    def context_forward(self, ids: torch.Tensor, ctx: ContextState, valid_new: torch.Tensor, keep: int = 0) -> torch.Tensor:
        """Append ids (B, n) to the context cache in one pass; returns logits (B, n, V), or of the
        last `keep` positions only (B, keep, V).

        ctx holds the state BEFORE the append; valid_new (B, n) marks real (non-pad) tokens.
        Nemotron-H has no position embedding: the 2D mask alone handles left padding
        (masked keys in attention, zeroed inputs in the Mamba layers). On a static cache the
        masks are ours (`static_masks`), so AR steps and block extends keep one shape.
        """
        device = self._context_device()
        mask = torch.cat([ctx.valid, valid_new], 1).to(device)
        if ctx.capacity is None:
            out = self.context_lm(input_ids=ids.to(device), attention_mask=mask.long(),
                                  past_key_values=ctx.cache, use_cache=True, logits_to_keep=keep)
            return out.logits.to(ids.device)
        prefill = ctx.valid.shape[1] == 0
        masks = static_masks(mask, ids.shape[1], ctx.capacity, valid_new.to(device) if prefill else None)
        out = self.context_call(ctx)(input_ids=ids.to(device), attention_mask=masks,
                                     past_key_values=ctx.cache, use_cache=True, logits_to_keep=keep)
        return out.logits.to(ids.device)

    def context_kv(self, cache) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Attention layer index -> (keys, values), each (B, kv_heads, L, d)."""
        out = {}
        for i in self.attention_layers:
            layer = cache.layers[i] if i < len(cache.layers) else None
            if layer is not None and getattr(layer, "keys", None) is not None and layer.keys.numel() > 0:
                out[i] = (layer.keys, layer.values)
        return out

    def context_mamba(self, cache) -> dict[int, tuple[torch.Tensor | None, torch.Tensor | None]]:
        """Mamba layer index -> (conv state (B, conv_dim, K), SSM state (B, heads, head_dim, N)) or Nones."""
        out = {}
        for i in self.mamba_layers:
            layer = cache.layers[i] if i < len(cache.layers) else None
            conv = ssm = None
            if layer is not None and getattr(layer, "conv_states", None) is not None:
                conv, ssm = layer.conv_states.get(0), layer.recurrent_states.get(0)
            out[i] = (conv, ssm)
        return out

    # ---- denoiser ----------------------------------------------------------------------
    def block_inputs(self, ctx: ContextState, size: int, inplace: bool = True, causal: bool = False,
                     offset: int = 0) -> dict:
        """Everything the denoiser needs for one block, built once per block.

        A snapshot: the context K/V are copied into the view's buffers (inplace) and the
        Mamba seeds are fp32 copies on the denoiser's device, so extending the context cache
        later never changes a block's inputs and denoising never changes the cache. On a
        static cache the view reads the cache's own K/V buffers instead (no copy): a later
        extend writes only slots this block's mask hides.
        causal=True makes the block's attention causal (a Mamba scan is causal by nature).
        """
        if offset:
            raise NotImplementedError("an anchored denoiser (offset) is not supported for Nemotron-H")
        device = self._denoiser_device()
        batch = ctx.valid.shape[0]
        kv = self._full_kv(self.context_kv(ctx.cache), batch, device)
        static = ctx.capacity is not None       # the static cache's own buffers, unused slots masked
        mask = block_mask(ctx.static_valid(), size, causal, always=True) if static else block_mask(ctx.valid, size, causal)
        seeds = {}
        for i, (conv, ssm) in self.context_mamba(ctx.cache).items():
            mixer = self.denoiser_lm.model.layers[i].mixer
            conv, ssm = self._zero_seed(mixer, batch, device) if conv is None or ssm is None else (conv, ssm)
            seeds[i] = (conv.to(device=device, dtype=torch.float32, copy=True),
                        ssm.to(device=device, dtype=torch.float32, copy=True))
        return {"view": ContextView(kv, size, inplace=inplace and not static), "static": static,
                "context_slots": (ctx.valid.shape[1], ctx.capacity),
                "mask": None if mask is None else mask.to(device), "mamba": seeds, "scan_length": size}

    def _full_kv(self, kv: dict, batch: int, device) -> dict:
        """Every attention layer's context K/V on `device`; an empty context gives length-0 tensors."""
        out = {}
        for i in self.attention_layers:
            if i in kv:
                out[i] = (kv[i][0].to(device), kv[i][1].to(device))
            else:
                attn = self.denoiser_lm.model.layers[i].mixer
                heads = self.denoiser_lm.config.num_key_value_heads
                empty = torch.zeros(batch, heads, 0, attn.head_dim, device=device, dtype=self._dtype())
                out[i] = (empty, empty.clone())
        return out

    def _dtype(self) -> torch.dtype:
        return self.denoiser_lm.get_input_embeddings().weight.dtype

    @staticmethod
    def _zero_seed(mixer, batch: int, device):
        """The state before any token: zero conv window and zero SSM state."""
        conv = torch.zeros(batch, mixer.conv_dim, mixer.conv_kernel_size, device=device)
        ssm = torch.zeros(batch, mixer.num_heads, mixer.head_dim, mixer.ssm_state_size, device=device)
        return conv, ssm

    def denoiser_hidden(self, h: torch.Tensor, inputs: dict, time, base: torch.Tensor,
                        capture: AttentionCapture | None = None) -> torch.Tensor:
        """The denoiser's layer loop. h: (B, S, H) block embeddings (or (B, N, H) in training)."""
        model = self.denoiser_lm.model
        for i, layer in enumerate(model.layers):
            shift, scale, gate = time.mods(base, i)
            kind = layer.block_type
            if kind == MAMBA:
                a = layer.norm(modulate(h, shift, scale).to(layer.norm.weight.dtype))
                conv, ssm = inputs["mamba"][i]
                a = seeded_mamba_blocks(layer.mixer, a, conv, ssm, inputs["scan_length"])
            elif kind == ATTENTION:
                a = layer.norm(modulate(h, shift, scale).to(layer.norm.weight.dtype))
                a, _ = layer.mixer(a, attention_mask=inputs["mask"], past_key_values=inputs["view"],
                                   capture=capture, denoiser=True)
            else:   # moe / mlp: per token
                a = modulate(layer.norm(h.to(layer.norm.weight.dtype)), shift, scale)
                a = layer.mixer(a)
            h = h + gate * a
        return model.norm_f(h)

    # ---- training: every block of a clean sequence at once -----------------------------
    def training_inputs(self, clean: torch.Tensor, block_size: int, anchor: bool = False) -> dict:
        """Run the frozen context tower over clean (B, N) once and build every block's inputs.

        Attention: the clean K/V of all positions and the all-blocks mask (1, 1, N, 2N) (query
        in block b sees clean keys of earlier blocks and noisy keys of its own block), as in
        LlamaFamily. Mamba: the conv + SSM state after token b*S - 1 for every block b (zero
        for block 0), laid out (B * nblocks, ...) so each block's scan is seeded by its clean
        prefix; the denoiser scans the blocks independently. A last partial block is allowed.
        Rows are not padded (training batches are full sequences). "context_hidden" (B, N, H):
        the context tower's final hidden states (its AR predictions), on the context device.
        """
        if anchor:
            raise NotImplementedError("an anchored denoiser is not supported for Nemotron-H")
        inputs_of = {}
        hooks = []
        ctx_layers = self.context_lm.model.layers
        for i in self.mamba_layers:
            def grab(module, args, kwargs, i=i):
                inputs_of[i] = args[0] if args else kwargs["hidden_states"]
            hooks.append(ctx_layers[i].mixer.register_forward_pre_hook(grab, with_kwargs=True))
        try:
            with torch.no_grad():
                cache = self.new_cache()
                out = self.context_lm.model(input_ids=clean.to(self._context_device()), past_key_values=cache,
                                            use_cache=True)
                device = self._denoiser_device()
                seeds = {}
                for i in self.mamba_layers:
                    conv, ssm = boundary_states(ctx_layers[i].mixer, inputs_of[i], block_size)
                    seeds[i] = (conv.flatten(0, 1).to(device), ssm.flatten(0, 1).to(device))
        finally:
            for hook in hooks:
                hook.remove()
        n = clean.shape[1]
        device = self._denoiser_device()
        block = torch.arange(n, device=device) // block_size
        sees_clean = block[None, :] < block[:, None]
        sees_noisy = block[None, :] == block[:, None]
        mask = torch.cat([sees_clean, sees_noisy], 1)[None, None]
        kv = self._full_kv(self.context_kv(cache), clean.shape[0], device)
        return {"view": ContextView(kv, n, inplace=False), "mask": mask, "mamba": seeds,
                "scan_length": block_size, "context_hidden": out.last_hidden_state}


def static_masks(valid: torch.Tensor, n: int, capacity: int, padding: torch.Tensor | None) -> dict:
    """The masks of a context pass over the last n of `valid` (B, L) on a static cache:
    attention (B, 1, n, capacity) bool, causal over the filled slots; Mamba: the new tokens'
    padding mask (B, n) for a prefill, None after it (appended tokens are never padding)."""
    width = valid.shape[1]
    slots = torch.arange(capacity, device=valid.device)
    causal = slots[None, :] <= torch.arange(width - n, width, device=valid.device)[:, None]   # (n, capacity)
    return {"full_attention": pad_mask(valid, capacity)[:, None, None, :] & causal[None, None],
            "linear_attention": None if padding is None else padding.long()}


# ---- Mamba-2 -----------------------------------------------------------------------------
def _split_projection(mixer, u: torch.Tensor):
    """in_proj(u) -> gate (B, n, I), xBC (B, n, conv_dim), dt (B, n, heads)."""
    return mixer.in_proj(u).split([mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], dim=-1)


def _dt(mixer, dt: torch.Tensor) -> torch.Tensor:
    """Raw dt (B, n, heads) -> softplus(dt + dt_bias) clamped to the mixer's limits, fp32."""
    dt = F.softplus(dt.float() + mixer.dt_bias.float())
    low, high = mixer.time_step_limit
    return dt.clamp(min=low, max=high) if (low > 0.0 or high != float("inf")) else dt


def _conv_weights(mixer):
    w = mixer.conv1d.weight.float()                         # (C, 1, K)
    b = mixer.conv1d.bias.float() if mixer.conv1d.bias is not None else None
    return w, b


def _split_xbc(mixer, xbc: torch.Tensor):
    """Post-conv xBC (B, n, conv_dim) -> x (B, n, heads, P), B, C (B, n, groups, N)."""
    gn = mixer.n_groups * mixer.ssm_state_size
    x, b, c = xbc.split([mixer.intermediate_size, gn, gn], dim=-1)
    shape = xbc.shape[:-1]
    return (x.reshape(*shape, mixer.num_heads, mixer.head_dim),
            b.reshape(*shape, mixer.n_groups, mixer.ssm_state_size),
            c.reshape(*shape, mixer.n_groups, mixer.ssm_state_size))


def seeded_scan(x, dt, A, B, C, D, state0):
    """Exact Mamba-2 (SSD) scan of a short sequence from an initial state, fp32.

    x: (b, s, h, p); dt: (b, s, h) (after softplus / clamp); A: (h,) negative; B, C:
    (b, s, g, n); D: (h,); state0: (b, h, p, n). Returns y (b, s, h, p) with
      state_t = exp(dt_t A) state_{t-1} + dt_t x_t B_t^T,  y_t = state_t C_t + D x_t,
    computed in closed form: y_t = sum_{s<=t} exp(cum_t - cum_s) dt_s (C_t.B_s) x_s
    + exp(cum_t) C_t.state0 + D x_t, where cum is the running sum of dt A.
    """
    heads, groups = x.shape[2], B.shape[2]
    B = B.repeat_interleave(heads // groups, dim=2)
    C = C.repeat_interleave(heads // groups, dim=2)
    cum = (dt * A).cumsum(1)                                   # (b, s, h), non-increasing
    s = x.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
    seg = (cum[:, :, None, :] - cum[:, None, :, :]).masked_fill(~causal[None, :, :, None], float("-inf"))
    weights = torch.einsum("bthn,bshn->btsh", C, B) * seg.exp() * dt[:, None, :, :]
    y = torch.einsum("btsh,bshp->bthp", weights, x)
    y = y + torch.einsum("bthn,bhpn->bthp", C, state0) * cum.exp()[..., None]
    return y + D[None, None, :, None] * x


def seeded_mamba(mixer, u: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor:
    """One Mamba-2 mixer over a block u (b, s, H) (already normed), seeded with the state
    after the last clean token: conv_state (b, conv_dim, K), ssm_state (b, heads, P, N).
    The seeds are only read. Returns the mixer output (b, s, H) in u's dtype."""
    gate, xbc, dt = _split_projection(mixer, u)
    w, bias = _conv_weights(mixer)
    k = w.shape[-1]
    window = conv_state[..., conv_state.shape[-1] - (k - 1):].float() if k > 1 else conv_state[..., :0].float()
    seq = torch.cat([window, xbc.float().transpose(1, 2)], dim=-1)      # (b, C, K - 1 + s)
    xbc = F.conv1d(seq, w, bias, groups=w.shape[0])                     # (b, C, s)
    xbc = mixer.act(xbc).transpose(1, 2)
    x, B, C = _split_xbc(mixer, xbc)
    A = -torch.exp(mixer.A_log.float())
    y = seeded_scan(x, _dt(mixer, dt), A, B, C, mixer.D.float(), ssm_state.float())
    y = mixer.norm(y.flatten(2), gate)
    return mixer.out_proj(y.to(u.dtype))


def seeded_mamba_blocks(mixer, u: torch.Tensor, conv: torch.Tensor, ssm: torch.Tensor, length: int) -> torch.Tensor:
    """u (B, n, H) split into ceil(n / length) blocks scanned independently, block j of row b
    seeded by conv[b * nblocks + j], ssm[b * nblocks + j]. One block when n <= length."""
    batch, n, hidden = u.shape
    blocks = max(1, math.ceil(n / length))
    if blocks == 1:
        return seeded_mamba(mixer, u, conv, ssm)
    pad = blocks * length - n
    if pad:   # the scan is causal: trailing pad never reaches earlier outputs
        u = F.pad(u, (0, 0, 0, pad))
    out = seeded_mamba(mixer, u.reshape(batch * blocks, length, hidden), conv, ssm)
    return out.reshape(batch, blocks * length, hidden)[:, :n]


@torch.no_grad()
def boundary_states(mixer, u: torch.Tensor, length: int):
    """States of a Mamba-2 mixer BEFORE every block of `length` tokens of a clean sequence.

    u: (B, N, H), the mixer's (normed) input in the context tower. Returns conv (B, nblocks,
    conv_dim, K) in u's dtype (the pre-conv inputs of tokens b*S-K .. b*S-1, zero before the
    start, exactly what the cache holds) and ssm (B, nblocks, heads, P, N) fp32 (zero for
    block 0). Exact: each block's own contribution in closed form, then a sequential
    recurrence over the blocks.
    """
    batch, n, _ = u.shape
    blocks = max(1, math.ceil(n / length))
    _, xbc_in, dt = _split_projection(mixer, u)
    w, bias = _conv_weights(mixer)
    k = w.shape[-1]
    xbc_t = xbc_in.transpose(1, 2)                                      # (B, C, N)
    conv = F.pad(xbc_t, (k, 0)).unfold(-1, k, length)[:, :, :blocks]   # (B, C, nblocks, K)
    conv = conv.permute(0, 2, 1, 3).contiguous()
    xbc = F.conv1d(F.pad(xbc_t.float(), (k - 1, 0)), w, bias, groups=w.shape[0])
    x, B, C = _split_xbc(mixer, mixer.act(xbc).transpose(1, 2))
    dt = _dt(mixer, dt)
    pad = blocks * length - n
    if pad:
        x, B, dt = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, B, dt))
    heads = x.shape[2]
    B = B.repeat_interleave(heads // B.shape[2], dim=2)
    A = -torch.exp(mixer.A_log.float())
    x = x.reshape(batch, blocks, length, heads, -1)
    B = B.reshape(batch, blocks, length, heads, -1)
    a = (dt * A).reshape(batch, blocks, length, heads)
    cum = a.cumsum(2)
    total = cum[:, :, -1]                                               # (B, nblocks, h)
    decay_to_end = (total[:, :, None] - cum).exp() * dt.reshape(batch, blocks, length, heads)
    local = torch.einsum("bcsh,bcshn,bcshp->bchpn", decay_to_end, B, x)
    states = [torch.zeros_like(local[:, 0])]
    for c in range(blocks - 1):
        states.append(states[-1] * total[:, c].exp()[..., None, None] + local[:, c])
    return conv, torch.stack(states, 1)
