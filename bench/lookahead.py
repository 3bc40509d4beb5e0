"""Where a denoiser's quality and speed go: its predictions, past a revealed prefix, against greedy AR.

    python bench/lookahead.py [MODEL ...] [--items 40] [--threads 2]

On the first N committed QA prompts, the AR model's greedy answer (16 tokens, no repeat guards)
is the reference. For every prefix length j of that first block, the denoiser sees the prefix
revealed and the rest masked, as `leftmost` commits leave a block, and predicts:

- d = 0, the next token (what greedy `leftmost` decoding writes next; its misses are where the
  quality goes), and d = 1, 2 tokens further on (what lets a pass commit more than one token;
  their confidence is what the threshold is compared with);
- in_top_k: how often the AR model's token is among the denoiser's k likeliest (k = 1..3) at
  d = 0, 1, 2 (what a draft tree that branches k ways there can check in one pass, `twotower.draft_tree`);
- the next token again with the block cut right after it (no masked rest) and with the masked
  fraction t forced to 1/16: do the masked positions or t cause the next-token misses?

Prints one JSON line per model: agreement with AR and mean confidence at d = 0, 1, 2, and the
two next-token checks. A model's misses against its own AR tower are a property of the denoiser,
not of the sampler: this runs no sampler.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from twotower.checkpoints import load  # noqa: E402
from twotower.eval_report import device_name  # noqa: E402
from twotower.evaluate import encode_all, generate, load_qa  # noqa: E402
from twotower.sampling import SamplerConfig  # noqa: E402

BLOCK, AHEAD, TOP = 16, 3, 3


def predict(model, x: torch.Tensor, inputs: dict, t: torch.Tensor | None = None):
    """Argmax and its probability at every block position, and the top TOP candidates (S, TOP);
    x: (1, S). [MASK] is never predicted."""
    logits = model.denoise(x, inputs, t)[0].float()                  # (S, V)
    logits[:, model.mask_token_id] = float("-inf")
    conf, arg = logits.softmax(-1).max(-1)
    return arg, conf, logits.topk(TOP, -1).indices


def measure(spec: str, items: int, device: str) -> dict:
    model = load(spec, device)
    mask = model.mask_token_id
    data = encode_all(model, load_qa()[:items], [])
    answers = generate(model, data.qa_ids, SamplerConfig(max_new_tokens=BLOCK, stop_at_eos=False), "ar", 8, "AR")
    hits, conf, count = torch.zeros(AHEAD), torch.zeros(AHEAD), torch.zeros(AHEAD)
    in_top = torch.zeros(AHEAD, TOP)                                 # [d, k]: AR's token among the top k + 1
    cut_hits = small_t_hits = 0
    with torch.no_grad():
        for prompt, answer in zip(data.qa_ids, answers.ids):
            ctx, _ = model.prefill([prompt])
            inputs = model.block_inputs(ctx, BLOCK)
            ref = torch.tensor(answer[:BLOCK])
            for j in range(len(ref)):
                x = torch.tensor([answer[:j] + [mask] * (BLOCK - j)], device=model.device)
                arg, p, top = predict(model, x, inputs)
                for d in range(min(AHEAD, len(ref) - j)):
                    hits[d] += int(arg[j + d] == ref[j + d])
                    conf[d] += p[j + d].item()
                    in_top[d] += (top[j + d] == ref[j + d]).long().cumsum(0).float()
                    count[d] += 1
                cut, _, _ = predict(model, x[:, :j + 1], model.block_inputs(ctx, j + 1))
                small_t, _, _ = predict(model, x, inputs, torch.tensor([1 / BLOCK], device=model.device))
                cut_hits += int(cut[j] == ref[j])
                small_t_hits += int(small_t[j] == ref[j])
    rnd = lambda v: round(float(v), 3)  # noqa: E731
    return {"model": spec, "qa_items": items, "positions": int(count[0]),
            "agree": {f"d{d}": rnd(hits[d] / count[d]) for d in range(AHEAD)},
            "confidence": {f"d{d}": rnd(conf[d] / count[d]) for d in range(AHEAD)},
            "in_top_k": {f"d{d}": [rnd(in_top[d, k] / count[d]) for k in range(TOP)] for d in range(AHEAD)},
            "next_token_block_cut": rnd(cut_hits / count[0]), "next_token_t_small": rnd(small_t_hits / count[0])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", default=["default"], help="model specs ('default', a checkpoint dir, ...)")
    p.add_argument("--items", type=int, default=40, help="the first N QA prompts")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    args = p.parse_args()
    if args.items < 1:
        p.error("--items must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps({"machine": device_name(args.device)}))
    for spec in args.models:
        print(json.dumps(measure(spec, args.items, args.device)), flush=True)


if __name__ == "__main__":
    main()
