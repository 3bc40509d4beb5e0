"""Quick side-by-side of trained denoisers (model specs) on the same prompts: what a short
training experiment needs before the full `python -m twotower eval`.

    python bench/compare_denoisers.py default runs/a/final runs/b/final [--every 3] [--open 20]

Per model: QA accuracy on every k-th item of the committed QA set (greedy diffusion, answers
up to 24 tokens), and tokens per NFE of fixed-length free generations (32 tokens, end-of-text
ignored, so that where an answer ends does not move the figure). Every model runs the same
sampler, the release's or --threshold / --remasking / --repetition-penalty /
--no-repeat-ngram-size: a checkpoint's recommended settings are not used, so that models are
compared like for like. Prints one JSON line per model and the
machine.
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
from twotower.evaluate import encode_all, generate, load_prompts, load_qa, score_qa, speed_of  # noqa: E402
from twotower.sampling import REMASKING, SamplerConfig  # noqa: E402


def measure(spec: str, args) -> dict:
    model = load(spec, args.device)
    qa = load_qa()[::args.every]
    data = encode_all(model, qa, load_prompts()[:args.open])
    sampler = dict(threshold=args.threshold, remasking=args.remasking, repetition_penalty=args.repetition_penalty,
                   no_repeat_ngram_size=args.no_repeat_ngram_size)
    answers = generate(model, data.qa_ids, SamplerConfig(max_new_tokens=24, **sampler), "diffusion", args.batch, "qa")
    free = generate(model, data.open_ids, SamplerConfig(max_new_tokens=32, stop_at_eos=False, **sampler), "diffusion",
                    args.batch, "open")
    scored = score_qa(qa, answers, data.seen)
    return {"model": spec, **sampler, "qa_items": len(qa), "qa_accuracy": round(scored["accuracy"], 4),
            "qa_accuracy_unseen": round(scored.get("accuracy_unseen", scored["accuracy"]), 4),
            "by_category": {k: round(v, 3) for k, v in scored["by_category"].items()},
            "qa_tokens_per_nfe": round(speed_of(answers)["tokens_per_nfe"], 3),
            "open_prompts": args.open, "open_tokens_per_nfe": round(speed_of(free)["tokens_per_nfe"], 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="model specs ('default', a checkpoint dir, ...)")
    p.add_argument("--every", type=int, default=3, help="take every k-th QA item")
    p.add_argument("--open", type=int, default=20, help="open prompts for tokens per NFE")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threshold", type=float, default=SamplerConfig.threshold, help="confidence threshold gamma")
    p.add_argument("--remasking", choices=REMASKING, default=SamplerConfig.remasking, help="commit order")
    p.add_argument("--repetition-penalty", type=float, default=SamplerConfig.repetition_penalty, help="1 = off")
    p.add_argument("--no-repeat-ngram-size", type=int, default=SamplerConfig.no_repeat_ngram_size, help="0 = off")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps({"machine": device_name(args.device)}))
    for spec in args.models:
        print(json.dumps(measure(spec, args)), flush=True)


if __name__ == "__main__":
    main()
