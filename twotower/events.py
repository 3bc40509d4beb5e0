"""Typed events that the samplers yield, one per observable moment of a run.

Every event is a plain dataclass of Python scalars and lists (never tensors), so that a
trace can record it, JSON can hold it and a UI can stream it. Per-row fields are lists over
the batch: `tokens[b][j]` is row b, block position j.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class Event:
    """Base class: `type` names the event in JSON."""

    def to_dict(self) -> dict:
        return {"type": type(self).__name__, **asdict(self)}


@dataclass
class Prefill(Event):
    """The prompt went through the context tower."""
    prompt_tokens: list[int]        # per row
    seconds: float                  # wall time of the prefill
    nfe: int = 1                    # context-tower passes so far


@dataclass
class BlockStart(Event):
    """A new block of `size` tokens begins at generated offset `start`, all masked but `given`."""
    block: int
    start: int                      # index of the block's first token among generated tokens
    size: int
    steps: int                      # step budget T of this block
    given: list[int] | None = None  # verify order: per row, the block's first token, -1 where none: the
                                    # AR model's next token, which the context tower's pass over the text
                                    # so far (prefill or the last block's extend) predicted; no denoiser pass
    given_confidence: list[float] | None = None   # per row: its probability under the AR model
    elapsed: float | None = None    # seconds since the run started, when the block began (its given token
                                    # is readable from then on)

    def given_at(self, row: int) -> tuple[int, float] | None:
        """(token, its AR probability) where the context tower's pass gave this row the block's
        first token, else None."""
        if self.given and self.given[row] >= 0:
            return self.given[row], self.given_confidence[row]
        return None


@dataclass
class Step(Event):
    """One denoiser pass (one NFE) over the active block."""
    block: int
    step: int
    t: list[float]                  # per row: masked fraction the pass read (verify: drafts count as written)
    tokens: list[list[int]]         # (B, S) block tokens after this step; mask id where masked
    committed: list[list[int]]      # per row: block positions committed at this step
    planned: list[int]              # per row: commits the threshold rule asked for (before the floor);
                                    # verify order: the new drafts
    confidence: list[list[float]]   # (B, S) p(argmax) at every position, this step
    top_ids: list[list[list[int]]]  # (B, S, k) top-k candidate ids
    top_probs: list[list[list[float]]]  # (B, S, k) their probabilities
    elapsed: float                  # seconds since the run started
    nfe: int                        # denoiser passes so far
    attention: dict | None = None   # {layer: (B, heads, A+S, L-A + A+S) probs} when captured:
                                    # queries = [A anchor tokens | block], keys = [context | queries]
    anchor: int = 0                 # A: clean tokens the denoiser re-reads before the block (0 or 1)
    active: list[bool] | None = None  # per row: this pass was for it (it still had positions to fill);
                                    # False once it settled (ended, or end-of-text after a filled prefix)
    drafts: list[list[int]] | None = None   # verify order: (B, S) draft ids the next pass checks, -1 where none
    rejected: list[list[int]] | None = None  # verify order: per row, positions whose drafts this pass dropped
    rows: list[int] | None = None   # verify with draft trees: per row, the block rows this pass ran (one per
                                    # tree node: its cost in positions is rows x S); None without a tree
    tree: list[list[list[int]]] | None = None   # draft trees: per row, the tree this pass checked as its leaf
                                    # paths (ids from the row's first open position before the pass)


@dataclass
class BlockCommitted(Event):
    """The finished block was appended to the context tower's cache (one forward pass)."""
    block: int
    tokens: list[list[int]]         # (B, S) final tokens of the block
    steps_used: int
    elapsed: float


@dataclass
class Token(Event):
    """The AR baseline produced one token per row (one context-tower pass)."""
    index: int                      # position among generated tokens
    tokens: list[int]               # per row
    confidence: list[float]         # per row: p(token) under the unscaled distribution
    top_ids: list[list[int]]        # (B, k)
    top_probs: list[list[float]]    # (B, k)
    elapsed: float
    nfe: int


@dataclass
class Done(Event):
    """The run ended: final text and figures per row."""
    texts: list[str]
    token_ids: list[list[int]]      # generated ids per row (up to and excluding end-of-text)
    nfe: int                        # passes of the network that decodes: denoiser (diffusion) or
                                    # context tower incl. the prefill that yields token 1 (AR)
    seconds: float
    first_token_seconds: float      # latency until the text's first token is committed (readable)
    stopped: str = "length"         # "eos" | "length"
    context_passes: int = 0         # context-tower passes: the prefill and one per block after the first (diffusion)

    @property
    def tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)


EVENT_TYPES = {cls.__name__: cls for cls in (Prefill, BlockStart, Step, BlockCommitted, Token, Done)}


def event_from_dict(d: dict) -> Event:
    """Inverse of `Event.to_dict`; raises ValueError on an unknown type."""
    kind = d.get("type")
    cls = EVENT_TYPES.get(kind)
    if cls is None:
        raise ValueError(f"unknown event type {kind!r}; expected one of {sorted(EVENT_TYPES)}")
    names = {f.name for f in fields(cls)}
    kwargs = {k: v for k, v in d.items() if k in names}
    if isinstance(kwargs.get("attention"), dict):   # JSON object keys are strings; layers are ints
        kwargs["attention"] = {int(k): v for k, v in kwargs["attention"].items()}
    return cls(**kwargs)
