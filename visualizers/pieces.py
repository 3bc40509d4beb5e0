"""Token pieces as the views show them: subword text with visible whitespace.

A trace maps every id it uses to the piece the tokenizer decodes for it on its own
(leading spaces kept). Views show spaces as '·', newlines as '⏎' and tabs as '⇥' so that
subword boundaries and whitespace tokens stay visible.
"""
from __future__ import annotations

import re

VISIBLE = {" ": "·", "\n": "⏎", "\t": "⇥", "\r": "␍"}
SPECIAL = re.compile(r"^<\|?[A-Za-z0-9_\-:./ ]+\|?>$")   # <|im_end|>, <s>, <empty_output>, ...


def visible(piece: str) -> str:
    """'␣Paris\\n' -> '·Paris⏎'; an empty piece shows as '∅'."""
    if piece == "":
        return "∅"
    return "".join(VISIBLE.get(c, c) for c in piece)


def raw_piece(trace, token_id: int) -> str:
    """The text piece of an id, or '<id>' when the trace does not know it."""
    return trace.tokens.get(str(token_id), f"<{token_id}>")


def special_ids(trace) -> set[int]:
    """Ids shown as special tokens: end-of-text ids, the mask id and <...>-shaped pieces."""
    ids = set(trace.model.get("eos_token_ids", []))
    if "mask_token_id" in trace.model:
        ids.add(trace.model["mask_token_id"])
    ids.update(int(k) for k, v in trace.tokens.items() if SPECIAL.match(v))
    return ids


def piece_table(trace, ids) -> dict[str, str]:
    """{id: visible piece} for the given ids (JSON keys are strings)."""
    return {str(i): visible(raw_piece(trace, i)) for i in sorted(set(ids)) if i >= 0}


def label(trace, token_id: int, limit: int = 12) -> str:
    """A short visible label for axis ticks and tooltips."""
    text = visible(raw_piece(trace, token_id))
    return text if len(text) <= limit else text[: limit - 1] + "…"
