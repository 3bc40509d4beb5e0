"""Forks: rewind a recorded diffusion run to one step of one block, continue with other settings.

A ForkPoint is what the sampler needs to pick a run up again: the tokens of the earlier
blocks (the context tower re-reads them after the prompt), the forked block's tokens after
the chosen step and, under the verify order, the drafts (and draft tree) that step left for
the next pass to check, so a fork with unchanged settings takes the parent's passes.
`fork_point(trace, block, step)` reads one from a trace;
`diffusion_generate(..., resume=point)` continues from it, and its events make a trace of
their own. `splice(parent, child)` joins the parent's steps up to the fork and the child's
steps after it into one trace, so the views can play the fork from the start.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .events import BlockCommitted, BlockStart, Done, Prefill, Step
from .trace import Trace


@dataclass
class ForkPoint:
    block: int                      # the block to continue
    step: int                       # its last step taken from the parent: the fork goes on at step + 1
    prefix: list[list[int]]         # (B, start) tokens of blocks 0..block-1, as the context tower read them
    tokens: list[list[int]]         # (B, S) the block after `step`; mask id where still masked
    drafts: list[list[int]] | None = None       # verify order: (B, S) the drafts `step` left, -1 where none
    tree: list[list[list[int]]] | None = None   # draft trees: per row, the tree the parent's next pass
                                                # checked (leaf paths), None where it took none

    @property
    def start(self) -> int:
        """Index of the forked block's first token among generated tokens."""
        return len(self.prefix[0]) if self.prefix else 0

    def to_dict(self, verify: bool = True) -> dict:
        """What the fork's trace records about where it starts; `carried_drafts` (a fork in the
        verify order): the drafts the parent's step left, which its first pass checked."""
        carried = verify and self.drafts is not None
        return {"block": self.block, "step": self.step, **({"carried_drafts": self.drafts} if carried else {})}


def fork_point(trace: Trace, block: int, step: int) -> ForkPoint:
    """The state of a diffusion trace after step `step` of block `block` (both 0-based)."""
    if trace.mode != "diffusion":
        raise ValueError(f"only diffusion runs can be forked; this trace is {trace.mode!r}")
    steps = [e for e in trace.steps() if e.block == block]
    if not steps:
        blocks = sorted({e.block for e in trace.steps()})
        if not blocks:
            raise ValueError("this trace records no denoiser step")
        raise ValueError(f"block {block} has no recorded step; this run has blocks {blocks[0]}..{blocks[-1]}")
    at = next((e for e in steps if e.step == step), None)
    if at is None:
        raise ValueError(f"block {block} has no step {step}; its steps are {steps[0].step}..{steps[-1].step}")
    start = next(e.start for e in trace.blocks() if e.block == block)
    prefix = [[] for _ in at.tokens]
    for e in trace.events:
        if isinstance(e, BlockCommitted) and e.block < block:
            for row, toks in zip(prefix, e.tokens):
                row.extend(toks)
    if len(prefix[0]) != start:
        raise ValueError(f"the trace holds {len(prefix[0])} tokens before block {block}, "
                         f"which starts at {start}: an earlier block was not committed")
    after = next((e for e in steps if e.step == step + 1), None)
    return ForkPoint(block=block, step=step, prefix=prefix, tokens=[list(r) for r in at.tokens],
                     drafts=[list(r) for r in at.drafts] if at.drafts is not None else None,
                     tree=after.tree if after is not None else None)


def first_written(rows: list[list[int]], mask_id: int) -> bool:
    """Whether every row of a block has its first position written."""
    return all(row[0] != mask_id for row in rows)


def _first_readable(events, mask_id) -> float | None:
    """Elapsed time from which every row's first generated token is committed: block 0's start
    when it was given (the verify order), else the first step after which it is."""
    for e in events:
        if isinstance(e, BlockStart) and e.block == 0 and e.given and e.elapsed is not None and min(e.given) >= 0:
            return e.elapsed
        if isinstance(e, Step) and e.block == 0 and first_written(e.tokens, mask_id):
            return e.elapsed
    return None


def splice(parent: Trace, child: Trace) -> Trace:
    """One trace of a fork: the parent's events up to the fork point, then the child's.

    The child's steps keep counting from the parent's NFE and clock at the fork point (minus
    the child's own prefill, which only re-read what the parent had already read), so its
    figures read as if the run had changed settings at that step. `fork` in the result says
    where the inherited part ends.
    """
    if not child.fork:
        raise ValueError("the second trace is not a fork (it has no fork point)")
    block, step = child.fork["block"], child.fork["step"]
    cut = next((i for i, e in enumerate(parent.events)
                if isinstance(e, Step) and (e.block, e.step) == (block, step)), None)
    if cut is None:
        raise ValueError(f"the parent run has no step {step} in block {block}")
    at = parent.events[cut]
    child_start = next(e for e in child.events if isinstance(e, BlockStart) and e.block == block)
    old_start = next(e for e in parent.events if isinstance(e, BlockStart) and e.block == block)
    # the forked block starts as the child ran it (its step budget), with the token the parent's
    # context pass gave it (the verify order), which the child resumed rather than chose
    merged = replace(child_start, given=old_start.given, given_confidence=old_start.given_confidence,
                     elapsed=old_start.elapsed)
    head = [merged if e is old_start else e for e in parent.events[:cut + 1]]
    prefill = next((e.seconds for e in child.events if isinstance(e, Prefill)), 0.0)
    shift = at.elapsed - prefill
    tail = []
    for e in child.events[child.events.index(child_start) + 1:]:
        if isinstance(e, Step):
            e = replace(e, nfe=e.nfe + at.nfe, elapsed=e.elapsed + shift)
        elif isinstance(e, BlockCommitted) or isinstance(e, BlockStart) and e.elapsed is not None:
            e = replace(e, elapsed=e.elapsed + shift)
        elif isinstance(e, Done):
            first = _first_readable(head + tail, parent.model.get("mask_token_id"))
            e = replace(e, nfe=e.nfe + at.nfe, seconds=e.seconds + shift,
                        first_token_seconds=first if first is not None else e.first_token_seconds + shift,
                        context_passes=e.context_passes + block)
        tail.append(e)
    inherited = sum(isinstance(e, Step) for e in head)
    return Trace(mode="diffusion", settings=child.settings, model=child.model, prompts=parent.prompts,
                 prompt_ids=parent.prompt_ids, tokens={**parent.tokens, **child.tokens}, events=head + tail,
                 fork={**child.fork, "inherited": inherited, "nfe": at.nfe,
                       "parent_steps": old_start.steps, "parent_settings": parent.settings})
