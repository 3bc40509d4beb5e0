"""Join corpus files (tokens.safetensors of `python -m twotower corpus`) into one, in order.

    python bench/join_corpora.py OUT_DIR c0/tokens.safetensors c1/tokens.safetensors

Writes OUT_DIR/tokens.safetensors: "tokens" concatenated, "starts" (document offsets) shifted
to match. Training holds out the tail of the stream, i.e. the end of the last file.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def join(out: Path, files: list[str]) -> tuple[int, int]:
    parts = [load_file(f) for f in files]
    offsets = torch.tensor([0] + [p["tokens"].numel() for p in parts[:-1]]).cumsum(0)
    tokens = torch.cat([p["tokens"] for p in parts])
    starts = torch.cat([p["starts"] + offset for p, offset in zip(parts, offsets)])
    out.mkdir(parents=True, exist_ok=True)
    save_file({"tokens": tokens, "starts": starts}, str(out / "tokens.safetensors"))
    return tokens.numel(), starts.numel()


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    tokens, documents = join(Path(sys.argv[1]), sys.argv[2:])
    print(f"{tokens} tokens, {documents} documents -> {sys.argv[1]}/tokens.safetensors")
