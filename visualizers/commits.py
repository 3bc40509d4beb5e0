"""When each generated position was committed, read off a trace (grid, overlays, race, compare)."""
from __future__ import annotations

from dataclasses import dataclass

from twotower.events import BlockStart, Step

AR_ROW = 16                  # AR runs: tokens per grid row (layout only, no blocks)
GIVEN = -1                   # the step of a block's first token written before its first denoiser step
                             # (verify order: the context tower's pass predicted it, `BlockStart.given`)


@dataclass
class Commit:
    """When and how one generated position was committed."""
    pos: int                 # index among generated tokens
    block: int
    step: int                # denoiser step within the block (AR: 0; GIVEN: before the block's first step)
    frame: int               # index of the frame (step event) that committed it (GIVEN: the block's first)
    token: int
    confidence: float


def block_starts(trace) -> dict[int, int]:
    return {b.block: b.start for b in trace.blocks()}


def commit_table(trace, row: int = 0) -> list[Commit]:
    """Every committed position in generation order of commits."""
    if trace.mode == "ar":
        return [Commit(e.index, e.index // AR_ROW, 0, i, e.tokens[row], e.confidence[row])
                for i, e in enumerate(trace.ar_tokens())]
    starts, out, frame = block_starts(trace), [], 0
    stepped = {e.block for e in trace.steps()}   # a block whose given token ended every row ran no step
    for e in trace.events:
        if isinstance(e, BlockStart) and e.block in stepped and (given := e.given_at(row)):
            out.append(Commit(e.start, e.block, GIVEN, frame, *given))
        elif isinstance(e, Step):
            start = starts.get(e.block, 0)
            for j in e.committed[row]:
                out.append(Commit(start + j, e.block, e.step, frame, e.tokens[row][j], e.confidence[row][j]))
            frame += 1
    return out
