"""What the AR model would have put at each generated position, given the same text before it.

Teacher forcing with the context tower (the original pretrained AR model): it reads the
prompt and then the generated tokens, and its prediction after token j-1 is what it would
have written at position j. One prefill of the prompt plus one pass over the generated
tokens gives every position's prediction at once.
"""
from __future__ import annotations

import torch

from .model import TwoTower


@torch.no_grad()
def ar_predictions(model: TwoTower, prompt: list[int], generated: list[int], k: int = 5) -> dict:
    """The AR model's top-k at every generated position, teacher-forced on `generated`.

    Returns {"top_ids": (n, k), "top_probs": (n, k), "chosen": (n,)}: chosen[j] is the AR
    model's probability of the token the run actually has at position j.
    """
    if not prompt:
        raise ValueError("the prompt is empty: the AR model needs at least one token to predict from")
    if not generated:
        return {"top_ids": [], "top_probs": [], "chosen": []}
    if len(prompt) + len(generated) > model.max_context:
        raise ValueError(f"prompt + generated tokens ({len(prompt) + len(generated)}) exceed the model's "
                         f"context of {model.max_context} tokens")
    ctx, first = model.prefill([prompt])                              # first: (1, V) predicts position 0
    ids = torch.tensor([generated], dtype=torch.long, device=model.device)
    logits = first.unsqueeze(1)
    if len(generated) > 1:
        _, rest = model.extend(ctx, ids[:, :-1])                      # (1, n-1, V): predicts 1..n-1
        logits = torch.cat([logits, rest], 1)
    probs = logits[0].float().softmax(-1)                             # (n, V)
    top = probs.topk(k, dim=-1)
    chosen = probs.gather(-1, ids[0].unsqueeze(-1)).squeeze(-1)
    return {"top_ids": top.indices.tolist(), "top_probs": top.values.tolist(), "chosen": chosen.tolist()}
