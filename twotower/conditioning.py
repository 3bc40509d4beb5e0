"""adaLN-single time conditioning (PixArt-style), as the release uses it.

t (masked fraction of the block) -> sinusoidal(t * 1000, 256) -> Linear(256, H) -> SiLU ->
Linear(H, H) -> SiLU -> Linear(H, 3H); each conditioned sub-layer adds its own learned
(3, H) table and splits the sum into shift, scale, gate. Parameter names follow the
release's checkpoint: `t_embedder.mlp.{0,2}`, `t_block.1`, `scale_shift_tables.{i}`.
"""
from __future__ import annotations

import math

import torch
from torch import nn

FREQ_DIM = 256


def sinusoidal(t: torch.Tensor, dim: int = FREQ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """t: (...,) in [0, 1] -> (..., dim) embedding of t * 1000 (cos half, sin half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000.0).unsqueeze(-1) * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = FREQ_DIM):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class TimeConditioning(nn.Module):
    """Maps t to per-sub-layer (shift, scale, gate)."""

    def __init__(self, hidden: int, num_tables: int):
        super().__init__()
        self.hidden = hidden
        self.t_embedder = TimestepEmbedder(hidden)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 3 * hidden))
        self.scale_shift_tables = nn.ParameterList(
            [nn.Parameter(torch.zeros(3, hidden)) for _ in range(num_tables)])
        self.reset_to_identity()

    @torch.no_grad()
    def reset_to_identity(self) -> None:
        """Start as the unconditioned backbone: shift 0, scale 0, gate 1 for every t.

        The embedder MLP keeps a small random init so gradients reach it once t_block moves.
        """
        nn.init.zeros_(self.t_block[1].weight)
        nn.init.zeros_(self.t_block[1].bias)
        for table in self.scale_shift_tables:
            table.zero_()
            table[2].fill_(1.0)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t: (B,) or (B, N) -> base modulation (B, [N,] 3, H); add a table with `mods`."""
        emb = self.t_block(self.t_embedder(t))
        return emb.unflatten(-1, (3, self.hidden))

    def mods(self, base: torch.Tensor, index: int, active: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(shift, scale, gate) for sub-layer `index`, each broadcastable to hidden states (B, S, H).

        active: (B, S, 1), 1 where the conditioning acts; elsewhere it is the identity (shift 0,
        scale 0, gate 1), as at initialisation (the clean tokens of a `clean_as_ar` denoiser)."""
        m = base + self.scale_shift_tables[index].to(base.dtype)
        if m.dim() == 3:            # one t per row: (B, 3, H) -> (B, 1, H) each
            m = m.unsqueeze(1)
        shift, scale, gate = m[..., 0, :], m[..., 1, :], m[..., 2, :]
        if active is None:
            return shift, scale, gate
        a = active.to(m.dtype)
        return shift * a, scale * a, 1 + (gate - 1) * a


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift
