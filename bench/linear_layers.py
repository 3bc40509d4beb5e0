"""The CPU's linear layers alone: PyTorch's float32 (MKL) against oneDNN-packed, bf16 for scale.

    python bench/linear_layers.py [--rows 1,4,16] [--threads 2] [--repeats 10]

Builds SmolLM2-135M's 211 linear layers (30 x q, k, v, o, gate, up, down, plus the head) with
random weights, each its own matrix as in the model, so a sweep reads 538 MB from memory the
way a decoding step does (cold caches), and times one sweep over all of them at each row count
(1 row = an AR step, ~17 = a denoiser pass). Prints one JSON line per row count: ms per sweep
for MKL (`F.linear`), packed (`twotower.cpu_linear.PackedLinear`) and bf16 `F.linear` (not
exact; for scale), with the machine. bench/RESULTS.md, "oneDNN-packed linear layers", quotes it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from twotower import cpu_linear  # noqa: E402
from twotower.bench import cpu_model  # noqa: E402

HIDDEN, KV, MLP, VOCAB, LAYERS = 576, 192, 1536, 49152, 30      # SmolLM2-135M
SHAPES = [(HIDDEN, HIDDEN), (HIDDEN, KV), (HIDDEN, KV), (HIDDEN, HIDDEN), (HIDDEN, MLP), (HIDDEN, MLP), (MLP, HIDDEN)]


def layers(dtype=torch.float32) -> list[nn.Linear]:
    """The model's linear layers in order, each (in, out) with its own random weight."""
    out = [nn.Linear(i, o, bias=False) for _ in range(LAYERS) for i, o in SHAPES] + [nn.Linear(HIDDEN, VOCAB, bias=False)]
    return [layer.to(dtype).eval() for layer in out]


def sweep_ms(mods: list[nn.Module], rows: int, dtype, repeats: int) -> float:
    """Best of `repeats` sweeps: every layer once on `rows` random rows (after two warm-up sweeps)."""
    inputs = {n: torch.randn(rows, n, dtype=dtype) for n in (HIDDEN, MLP)}
    best = float("inf")
    with torch.no_grad():
        for k in range(repeats + 2):
            start = time.perf_counter()
            for m in mods:
                m(inputs[m.in_features])
            if k >= 2:
                best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="1,4,16", help="comma-separated row counts")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not cpu_linear.available():
        print("oneDNN packing is not available on this build or CPU", file=sys.stderr)
        return 1
    plain, bf16 = layers(), layers(torch.bfloat16)
    packed = nn.Sequential(*layers())
    cpu_linear.pack_linears(packed)
    machine = {"cpu": cpu_model(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    for rows in tqdm([int(r) for r in args.rows.split(",")], desc="rows", file=sys.stderr):
        print(json.dumps({"rows": rows, "layers": len(plain),
                          "mkl_ms": round(sweep_ms(plain, rows, torch.float32, args.repeats), 2),
                          "packed_ms": round(sweep_ms(list(packed), rows, torch.float32, args.repeats), 2),
                          "bf16_ms": round(sweep_ms(bf16, rows, torch.bfloat16, args.repeats), 2),
                          "machine": machine}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
