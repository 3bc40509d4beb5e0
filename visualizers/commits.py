"""When each generated position was committed, read off a trace (grid, overlays, race, compare)."""
from __future__ import annotations

from dataclasses import dataclass

AR_ROW = 16                  # AR runs: tokens per grid row (layout only, no blocks)


@dataclass
class Commit:
    """When and how one generated position was committed."""
    pos: int                 # index among generated tokens
    block: int
    step: int                # denoiser step within the block (AR: 0)
    frame: int               # index of the frame (step event) that committed it
    token: int
    confidence: float


def block_starts(trace) -> dict[int, int]:
    return {b.block: b.start for b in trace.blocks()}


def commit_table(trace, row: int = 0) -> list[Commit]:
    """Every committed position in generation order of commits."""
    if trace.mode == "ar":
        return [Commit(e.index, e.index // AR_ROW, 0, i, e.tokens[row], e.confidence[row])
                for i, e in enumerate(trace.ar_tokens())]
    starts, out = block_starts(trace), []
    for i, e in enumerate(trace.steps()):
        start = starts.get(e.block, 0)
        for j in e.committed[row]:
            out.append(Commit(start + j, e.block, e.step, i, e.tokens[row][j], e.confidence[row][j]))
    return out
