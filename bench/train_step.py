"""Time the denoiser's training step, eager and with `compile = true`, on one machine.

    python bench/train_step.py [--context smollm2] [--device cpu|cuda] [--batch 2] [--seq-len 256]

Builds the model as `python -m twotower train` does (frozen context tower, LoRA denoiser,
anchored), then times forward + backward of the masked-diffusion loss on one fixed random batch
with the same noise: first eager, then with the training pass compiled (the first compiled step
is reported apart: it compiles). Prints one JSON object: machine, seconds per step, losses.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from twotower.train import DiffusionObjective, TrainConfig, autocast, build_model  # noqa: E402


def timed_steps(objective, clean, device: str, steps: int) -> tuple[list[float], float]:
    """Seconds of `steps` forward + backward passes (synchronised) and the last loss."""
    times, loss = [], None
    for _ in range(steps):
        gen = torch.Generator(device=device).manual_seed(0)         # the same masks every step
        start = time.perf_counter()
        with autocast(device):
            loss = objective(clean, gen)
        loss.backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times, loss.item()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", default="smollm2")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one untimed)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = TrainConfig(context=args.context, anchor=True)
    model, _ = build_model(cfg, args.device)
    objective = DiffusionObjective(model, cfg.block_size, cfg.min_t)
    vocab = model.context_lm.config.vocab_size
    clean = torch.randint(100, vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(1))
    clean = clean.to(args.device)
    result = {"machine": {"device": args.device, "cpu": platform.processor() or platform.machine(),
                          "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                          "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
                          "torch": torch.__version__, "load_average": os.getloadavg()},
              "context": args.context, "batch": args.batch, "seq_len": args.seq_len}
    timed_steps(objective, clean, args.device, 1)                                   # warm-up
    eager, eager_loss = timed_steps(objective, clean, args.device, args.steps)
    model.training_hidden = torch.compile(model.training_hidden, dynamic=False)
    first, _ = timed_steps(objective, clean, args.device, 1)
    compiled, compiled_loss = timed_steps(objective, clean, args.device, args.steps)
    tokens = args.batch * args.seq_len
    result |= {"eager_s_per_step": [round(t, 3) for t in eager], "compiled_s_per_step": [round(t, 3) for t in compiled],
               "first_compiled_step_s": round(first[0], 1),
               "eager_tokens_per_s": round(tokens / statistics.median(eager)),
               "compiled_tokens_per_s": round(tokens / statistics.median(compiled)),
               "speedup": round(statistics.median(eager) / statistics.median(compiled), 3),
               "loss": {"eager": eager_loss, "compiled": compiled_loss}}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
