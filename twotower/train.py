"""Train a TwoTower denoiser: `python -m twotower train --config FILE.toml`.

Masked-diffusion objective of the paper on blocks: each block of a clean sequence gets its
own t ~ U(0, 1); each of its tokens is masked with probability t; cross-entropy on the masked
positions only, averaged (the 1/t ELBO weight dropped); optionally (`distill`) against the
AR model's own next-token distribution instead of the one-hot token. The frozen context tower
reads the clean sequence once; the denoiser sees every noisy block at once, each block
attending to the clean tokens before it and to itself (no loop over blocks). Evaluation
reports the held-out cross-entropy and how often the denoiser's argmax at a masked position
is the AR model's (what quality retention needs). The denoiser is the context
tower's weights plus a LoRA adapter (peft), the adaLN-single time conditioning and a learned
[MASK] embedding: small enough to ship.

Runs on CPU or GPU (bf16 autocast on CUDA) and on several GPUs with
`torchrun --nproc-per-node N -m twotower train --config FILE` (DDP, same config).
Checkpoints every `save_every` steps into OUT/last (resumable with --resume) and the
final model into OUT/final (our checkpoint format, loadable as a model spec).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from . import checkpoints
from .model import TwoTower
from .train_config import TrainConfig, parse_override  # noqa: F401 (parse_override: the --set parser, imported from here too)


# ---- data ----------------------------------------------------------------------------------
class TokenWindows:
    """Random fixed-length windows over a token stream (documents packed back to back)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, seed: int):
        if tokens.numel() <= seq_len:
            raise ValueError(f"corpus has {tokens.numel()} tokens; need more than seq_len={seq_len}")
        self.tokens, self.seq_len = tokens.long(), seq_len
        self.gen = torch.Generator().manual_seed(seed)

    def batch(self, size: int, gen: torch.Generator | None = None) -> torch.Tensor:
        """`size` windows (size, seq_len), drawn with `gen` or the stream's own generator."""
        starts = torch.randint(0, self.tokens.numel() - self.seq_len, (size,), generator=gen or self.gen)
        return torch.stack([self.tokens[s: s + self.seq_len] for s in starts.tolist()])


def read_corpus(path: str) -> torch.Tensor:
    """The token stream of a corpus file (`python -m twotower corpus`)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"corpus file not found (config key 'corpus'): {path}")
    data = checkpoints.read_safetensors(Path(path))
    if "tokens" not in data:
        raise ValueError(f"corpus {path} has no 'tokens' tensor (config key 'corpus'; "
                         f"build one with `python -m twotower corpus`)")
    return data["tokens"]


def load_corpus(path: str, seq_len: int, eval_fraction: float, seed: int) -> tuple[TokenWindows, TokenWindows]:
    """(training, held-out) windows: the last eval_fraction of the stream, at least seq_len + 1 tokens, is held out."""
    tokens = read_corpus(path)
    total = tokens.numel()
    cut = min(int(total * (1 - eval_fraction)), total - seq_len - 1)
    if cut <= seq_len:
        need = max(2 * seq_len + 2, math.ceil((seq_len + 1) / (1 - eval_fraction)))
        raise ValueError(f"corpus {path} has {total} tokens, fewer than the {need} needed for one training window "
                         f"of seq_len + 1 = {seq_len + 1} tokens plus the held-out split (eval_fraction="
                         f"{eval_fraction}, at least one window): lower seq_len or build a larger corpus")
    return TokenWindows(tokens[:cut], seq_len, seed), TokenWindows(tokens[cut:], seq_len, seed + 1)


# ---- objective -----------------------------------------------------------------------------
def add_noise(clean: torch.Tensor, block_size: int, mask_id: int, min_t: float, gen: torch.Generator,
              prefix_share: float = 0.0):
    """Mask each block with its own rate t ~ U(min_t, 1): each token independently, or, for a
    `prefix_share` of the blocks, its last round(t S) tokens, at least one (a revealed prefix, as
    left-to-right commits leave a block).

    clean (B, N) -> noisy (B, N), masked (B, N) bool, t (B, N): each token's block's actual
    masked fraction (what the sampler feeds the denoiser).
    """
    b, n = clean.shape
    blocks = n // block_size
    rate = min_t + (1 - min_t) * torch.rand(b, blocks, 1, generator=gen, device=clean.device)
    masked = torch.rand(b, blocks, block_size, generator=gen, device=clean.device) < rate
    if prefix_share > 0:   # drawn only then: the random stream of the plain objective is unchanged
        revealed = ((1 - rate) * block_size).round().clamp(max=block_size - 1)      # (B, blocks, 1)
        suffix = torch.arange(block_size, device=clean.device) >= revealed         # (B, blocks, S)
        use = torch.rand(b, blocks, 1, generator=gen, device=clean.device) < prefix_share
        masked = torch.where(use, suffix, masked)
    t = masked.float().mean(-1, keepdim=True).expand(-1, -1, block_size)
    masked, t = masked.reshape(b, n), t.reshape(b, n)
    return torch.where(masked, torch.full_like(clean, mask_id), clean), masked, t


def first_masked(masked: torch.Tensor, block_size: int, nth: int = 1) -> torch.Tensor:
    """(B, N) bool: each block's first (nth) masked position. masked: (B, N), N a multiple of block_size."""
    b, n = masked.shape
    blocks = masked.reshape(b, n // block_size, block_size)
    return (blocks & (blocks.cumsum(-1) == nth)).reshape(b, n)


def soft_cross_entropy(log_probs: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """-sum(p * log q) per row: (M, V) each -> (M,). Entries with p = 0 add nothing (even at log q = -inf)."""
    return -torch.where(target_probs > 0, target_probs * log_probs, 0.0).sum(-1)


def weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return values.mean() if weights is None else (values * weights).sum() / weights.sum()


class DiffusionObjective(torch.nn.Module):
    """forward(clean) -> the training loss over masked positions (a module so DDP can wrap it).

    distill = 0 is the paper's objective: cross-entropy against the clean token. distill = w
    mixes in the context tower's own next-token distribution at each masked position, given
    the clean tokens before it: target = (1 - w) one-hot + w p_AR(. | x_<j), with p_AR =
    softmax(AR logits / temperature). At temperature 1, for text the AR model sampled at
    temperature 1, p_AR is the expectation of the one-hot target (same mean gradient, less
    variance). At temperature 0 the target is the AR model's greedy choice after the true
    prefix: what greedy decoding, and so the QA retention, compares against. The context
    tower computes those distributions in the pass training runs anyway.
    """

    def __init__(self, model: TwoTower, block_size: int, min_t: float, distill: float = 0.0,
                 temperature: float = 1.0, prefix_share: float = 0.0, next_weight: float = 1.0):
        super().__init__()
        if not 0.0 <= distill <= 1.0:
            raise ValueError(f"distill must lie in [0, 1], got {distill!r}")
        if not 0.0 <= prefix_share <= 1.0:
            raise ValueError(f"prefix_share must lie in [0, 1], got {prefix_share!r}")
        if not (temperature >= 0.0 and math.isfinite(temperature)):
            raise ValueError(f"distill_temperature must be a finite number >= 0, got {temperature!r}")
        if not (next_weight > 0.0 and math.isfinite(next_weight)):
            raise ValueError(f"next_weight must be a finite number > 0, got {next_weight!r}")
        self.next_weight = next_weight
        self.model, self.block_size, self.min_t = model, block_size, min_t
        self.distill, self.temperature, self.prefix_share = distill, temperature, prefix_share

    def forward(self, clean: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        parts = self.parts(clean, gen, teacher=self.distill > 0, next_weight=self.next_weight)
        if self.distill == 0:
            return parts["ce"]
        return (1 - self.distill) * parts["ce"] + self.distill * parts["distill"]

    def parts(self, clean: torch.Tensor, gen: torch.Generator, teacher: bool = True,
              prefix_share: float | None = None, next_weight: float = 1.0, inputs: dict | None = None) -> dict:
        """Loss terms on one batch: "ce" (against the clean tokens) and, with teacher, "distill"
        (against the AR distribution), "agree" (share of masked positions whose argmax is
        the AR model's argmax, no grad), "agree_next" (the same at each block's first masked
        position, the token a left-to-right commit writes next) and "agree_ahead" (at its second:
        under revealed-prefix masks the verify order's first draft). The losses are means over
        masked positions, each block's first masked one weighted `next_weight`. `inputs`: the
        context tower's pass over `clean` (`training_inputs`) when the caller already has it."""
        m, n = self.model, clean.shape[1] // self.block_size * self.block_size
        clean = clean[:, :n]
        share = self.prefix_share if prefix_share is None else prefix_share
        noisy, masked, t = add_noise(clean, self.block_size, m.mask_token_id, self.min_t, gen, share)
        first, second = first_masked(masked, self.block_size), first_masked(masked, self.block_size, 2)
        inputs = m.training_inputs(clean, self.block_size) if inputs is None else inputs
        hidden = m.training_hidden(clean, noisy, t, self.block_size, inputs)   # (B, N - start, H)
        start = m.training_start(self.block_size)
        masked, targets, first, second = masked[:, start:], clean[:, start:], first[:, start:], second[:, start:]
        picked = m.denoiser_lm.get_output_embeddings()(hidden[masked]).float()   # (M, V): masked only
        picked[:, m.mask_token_id] = float("-inf")                          # as in sampling
        first, second = first[masked], second[masked]                       # (M,)
        weights = None if next_weight == 1 else 1 + (next_weight - 1) * first.float()
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.distill < 1):   # no graph at weight 0
            out = {"ce": weighted_mean(F.cross_entropy(picked, targets[masked], reduction="none"), weights)}
        if teacher:   # the AR distribution of token j is the context tower's output at j - 1
            cols = torch.arange(start, n, device=clean.device)                 # positions of masked's columns
            has_ar = (cols > 0).expand_as(masked)[masked]                      # (M,): position 0 has none
            before = inputs["context_hidden"].to(clean.device)[:, (cols - 1).clamp_min(0)]   # (B, N - start, H)
            ar = m.context_logits(before[masked][has_ar])                      # (M', V)
            ar[:, m.mask_token_id] = float("-inf")
            if start == 0:                                                      # (M',) rows from here
                picked, first, second = picked[has_ar], first[has_ar], second[has_ar]
                weights = None if weights is None else weights[has_ar]
            rows = (F.cross_entropy(picked, ar.argmax(-1), reduction="none") if self.temperature == 0 else
                    soft_cross_entropy(picked.log_softmax(-1), (ar.float() / self.temperature).softmax(-1)))
            out["distill"] = weighted_mean(rows, weights)
            same = (picked.argmax(-1) == ar.argmax(-1)).float().detach()   # (M',)
            out["agree"], out["agree_next"], out["agree_ahead"] = same.mean(), same[first].mean(), same[second].mean()
            out["ahead_count"] = second.sum()                                 # (agree_ahead is NaN at 0)
        return out


# ---- setup ----------------------------------------------------------------------------------
def build_model(cfg: TrainConfig, device: str):
    """Frozen context tower + denoiser copy with a LoRA adapter. Returns (model, peft wrapper)."""
    from peft import get_peft_model
    ctx, tok = checkpoints.load_ar(cfg.context, device, torch.bfloat16 if device.startswith("cuda") else torch.float32)
    model = checkpoints.build(ctx, tok, cfg.mask_token_id, cfg.learned_mask, cfg.name, anchor=cfg.anchor,
                              clean_as_ar=cfg.clean_as_ar)
    peft_model = get_peft_model(model.denoiser_lm, checkpoints.lora_config(lora_meta(cfg)))
    if cfg.clean_as_ar:
        model.gate_adapter()
    for p in peft_model.parameters():       # LoRA weights train in fp32 under autocast
        if p.requires_grad:
            p.data = p.data.float()
    model.time.float()
    if model.mask_embedding is not None:
        model.mask_embedding.data = model.mask_embedding.data.float()
    return model, peft_model


def lora_meta(cfg: TrainConfig) -> dict:
    return {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "target_modules": list(cfg.lora_targets)}


def param_groups(model: TwoTower, cfg: TrainConfig) -> list[dict]:
    adapter = [p for p in model.denoiser_lm.parameters() if p.requires_grad]
    if model.mask_embedding is not None:
        adapter.append(model.mask_embedding)
    return [{"params": adapter, "lr": cfg.lr}, {"params": list(model.time.parameters()), "lr": cfg.time_lr}]


def lr_factor(step: int, cfg: TrainConfig, time_fraction: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to 10% over the steps or the time budget, whichever ends first."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = max((step - cfg.warmup) / max(1, cfg.steps - cfg.warmup), time_fraction)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ---- checkpoints (safetensors + JSON, never pickle) --------------------------------------------
def save_state(path: Path, model, peft_model, opt, step: int, cfg: TrainConfig, history: list) -> None:
    checkpoints.save(model, path, context=cfg.context, lora_model=peft_model, lora=lora_meta(cfg),
                     dtype=torch.float32, extra={"train_step": step})
    flat = {}
    for gi, group in enumerate(opt.param_groups):
        for pi, p in enumerate(group["params"]):
            for key, value in opt.state.get(p, {}).items():
                flat[f"{gi}.{pi}.{key}"] = value.detach().float().cpu().contiguous().reshape(value.shape)
    save_file(flat, str(path / "optimizer.safetensors"))
    (path / "train_state.json").write_text(json.dumps({"step": step, "config": asdict(cfg), "history": history}))


def load_weights(path: Path, model, peft_model) -> None:
    """Denoiser weights (time conditioning, mask embedding, LoRA) from a checkpoint dir."""
    from peft import set_peft_model_state_dict
    weights = checkpoints.read_safetensors(path / "denoiser.safetensors")
    model.time.load_state_dict({k[5:]: v for k, v in weights.items() if k.startswith("time.")})
    if model.mask_embedding is not None:
        model.mask_embedding.data.copy_(weights["mask_embedding"])
    set_peft_model_state_dict(peft_model, {k[5:]: v for k, v in weights.items() if k.startswith("lora.")})
    meta_path = path / "twotower.json"
    checkpoints.apply_meta(model, json.loads(meta_path.read_text()) if meta_path.is_file() else {})   # kept on save


def load_state(path: Path, model, peft_model, opt) -> tuple[int, list]:
    load_weights(path, model, peft_model)
    flat = load_file(str(path / "optimizer.safetensors"))
    for gi, group in enumerate(opt.param_groups):
        for pi, p in enumerate(group["params"]):
            state = {k.split(".", 2)[2]: v.to(p.device) for k, v in flat.items() if k.startswith(f"{gi}.{pi}.")}
            if state:
                opt.state[p] = state
    meta = json.loads((path / "train_state.json").read_text())
    return meta["step"], meta.get("history", [])


# ---- loop ------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(objective, data: TokenWindows, cfg: TrainConfig, device: str) -> dict:
    """Held-out means, on the same windows and masks at every evaluation, whatever prefix_share
    trains on: under the paper's masks, the clean-token cross-entropy ("ce", comparable whatever
    `distill` is) and the agreement with the AR model's argmax at masked positions ("agree");
    with every block a revealed prefix and a masked rest (what left-to-right commits feed the
    denoiser), the agreement at the first masked position ("agree_next"): how often the token
    that greedy `leftmost` decoding writes next is the AR model's (1 under clean_as_ar, where the
    AR model's reading writes it), and at the second ("agree_ahead"): how often the verify
    order's first draft, one token past the AR model's next, is the AR model's token, the figure
    its tokens per pass hang on, pooled over the batches' second positions (a block with one masked
    position has none; NaN, and None in the history, if no block had one)."""
    gen = torch.Generator(device=device).manual_seed(1234)
    prefix_gen = torch.Generator(device=device).manual_seed(4321)   # its own: the paper masks stay as before
    windows = torch.Generator().manual_seed(cfg.seed + 4321)
    sums, ahead, ahead_count = {"ce": 0.0, "agree": 0.0, "agree_next": 0.0}, 0.0, 0
    for _ in range(cfg.eval_batches):
        clean = data.batch(cfg.batch_size, windows)[:, :cfg.seq_len // cfg.block_size * cfg.block_size].to(device)
        with autocast(device):
            inputs = objective.model.training_inputs(clean, cfg.block_size)   # one context pass for both masks
            paper = objective.parts(clean, gen, prefix_share=0.0, inputs=inputs)
            prefix = objective.parts(clean, prefix_gen, prefix_share=1.0, inputs=inputs)
        for key, value in (("ce", paper["ce"]), ("agree", paper["agree"]), ("agree_next", prefix["agree_next"])):
            sums[key] += value.item() / cfg.eval_batches
        count = int(prefix["ahead_count"])
        if count:
            ahead, ahead_count = ahead + prefix["agree_ahead"].item() * count, ahead_count + count
    return {**sums, "agree_ahead": ahead / ahead_count if ahead_count else math.nan}


def eval_row(objective, data: TokenWindows, cfg: TrainConfig, device: str, step: int,
             train_loss: float | None, seconds: float) -> dict:
    """Evaluate (see `evaluate`), print one line, return the history row (no train loss at step 0)."""
    from tqdm import tqdm
    objective.model.eval()
    ev = evaluate(objective, data, cfg, device)
    objective.model.train()
    train = "" if train_loss is None else f" train {train_loss:.3f}"
    tqdm.write(f"[train] step {step}{train} eval {ev['ce']:.3f} agree-with-AR {ev['agree']:.3f} "
               f"next-token {ev['agree_next']:.3f} first-draft {ev['agree_ahead']:.3f}", file=sys.stderr)
    return {"step": step, "train_loss": None if train_loss is None else round(train_loss, 4),
            "eval_loss": round(ev["ce"], 4), "eval_agree": round(ev["agree"], 4),
            "eval_agree_next": round(ev["agree_next"], 4), "eval_agree_ahead": None if math.isnan(ev["agree_ahead"]) else round(ev["agree_ahead"], 4),
            "seconds": round(seconds, 1)}


def elapsed_seconds(t0: float, world: int, device: str, sync: bool) -> float:
    """Seconds since t0. With several processes and `sync`, the largest over them (one tiny
    all-reduce), so that every rank sets the same learning rate and stops after the same step."""
    seconds = time.time() - t0
    if world > 1 and sync:
        value = torch.tensor([seconds], device=device, dtype=torch.float64)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        seconds = value.item()
    return seconds


def autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast("cpu", enabled=False)


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    from tqdm import tqdm
    cfg.validate()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and world > 1:
        device = f"cuda:{torch.cuda.current_device()}"
    torch.manual_seed(cfg.seed + rank)
    train_data, eval_data = load_corpus(cfg.corpus, cfg.seq_len, cfg.eval_fraction, cfg.seed + rank)
    model, peft_model = build_model(cfg, device)
    if cfg.compile:   # the denoiser over all blocks; the context tower's no-grad pass and the heads stay eager
        model.training_hidden = torch.compile(model.training_hidden, dynamic=False)
    objective = DiffusionObjective(model, cfg.block_size, cfg.min_t, cfg.distill, cfg.distill_temperature,
                                   cfg.prefix_share, cfg.next_weight)
    runner = objective
    if world > 1:
        runner = torch.nn.parallel.DistributedDataParallel(objective, find_unused_parameters=False)
    opt = torch.optim.AdamW(param_groups(model, cfg), weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    out = Path(cfg.out)
    step, history = 0, []
    if resume and (out / "last" / "train_state.json").is_file():
        step, history = load_state(out / "last", model, peft_model, opt)
    elif cfg.init:
        load_weights(Path(cfg.init), model, peft_model)
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank + step)
    trainable = sum(p.numel() for g in opt.param_groups for p in g["params"])
    bar = tqdm(total=cfg.steps, initial=step, desc="train", disable=rank != 0, file=sys.stderr)
    if rank == 0:
        print(f"[train] {trainable / 1e6:.2f}M trainable params on {device} x{world}; "
              f"{train_data.tokens.numel() / 1e6:.2f}M corpus tokens", file=sys.stderr)
    base_lrs = [g["lr"] for g in opt.param_groups]
    if rank == 0 and step == 0:      # where the run starts from, on the windows every evaluation uses
        history.append(eval_row(objective, eval_data, cfg, device, 0, None, 0.0))
    t0, seen, elapsed = time.time(), 0, 0.0
    budget = cfg.max_minutes * 60          # seconds; 0 = none
    while step < cfg.steps:
        if budget and elapsed > budget:
            if rank == 0:
                tqdm.write(f"[train] time budget of {cfg.max_minutes} min reached at step {step}", file=sys.stderr)
            break
        spent = elapsed / budget if budget else 0.0
        for g, base in zip(opt.param_groups, base_lrs):
            g["lr"] = base * lr_factor(step, cfg, spent)
        clean = train_data.batch(cfg.batch_size).to(device)
        with autocast(device):
            loss = runner(clean, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.grad_clip)
        opt.step()
        step += 1
        seen += clean.numel() * world
        if rank == 0:
            bar.update(1)
            if step % 10 == 0 or step == cfg.steps:
                bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{seen / (time.time() - t0):.0f}")
        elapsed = elapsed_seconds(t0, world, device, sync=budget > 0)
        last = step == cfg.steps or bool(budget and elapsed > budget)
        if rank == 0 and (step % cfg.eval_every == 0 or last):
            history.append(eval_row(objective, eval_data, cfg, device, step, loss.item(), time.time() - t0))
        if rank == 0 and (step % cfg.save_every == 0 or last):
            save_state(out / "last", model, peft_model, opt, step, cfg, history)
    bar.close()
    final = out / "final"
    if rank == 0:
        checkpoints.save(model, final, context=cfg.context, lora_model=peft_model, lora=lora_meta(cfg),
                         dtype=torch.bfloat16, extra={"train_step": step, "history": history})
        print(f"[train] done: {final}", file=sys.stderr)
    if world > 1:
        # DDP's reducer holds the process group: freed only after destroy_process_group (when this
        # frame ends), its gloo threads once waited forever on a rank that had left. Free it first.
        del runner
        torch.distributed.barrier()          # leave together: rank 0 was saving while the others waited
        torch.distributed.destroy_process_group()
    return final


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a denoiser (masked diffusion on blocks)")
    p.add_argument("--config", required=True, help="TOML file of TrainConfig settings")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last if present")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config settings")
    p.set_defaults(func=_cmd)


def _cmd(args) -> int:
    cfg = TrainConfig.from_toml(args.config)
    for item in args.set:
        setattr(cfg, *parse_override(item))
    train(cfg, resume=args.resume)       # validates the settings first
    return 0
