"""The training run's settings (`python -m twotower train --config FILE.toml [--set KEY=VALUE]`):
one flat dataclass, read from TOML (sections are only for reading), each setting checked for its
type and range before any data or model is loaded (`TrainConfig.validate`)."""
from __future__ import annotations

import math
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

from . import checkpoints


@dataclass
class TrainConfig:
    # model
    context: str = "smollm2"          # context tower: 'smollm2' or a transformers model dir
    mask_token_id: int = checkpoints.SMOLLM2_MASK_ID   # SmolLM2 has no mask token: '<empty_output>'
    learned_mask: bool = True         # a trained [MASK] input vector instead of the token's row
    anchor: bool = True               # the denoiser also reads the token before the block, so its
                                      # output i predicts token i as the AR init does (fast to learn)
    clean_as_ar: bool = False         # clean block positions compute the AR model exactly (causal over
                                      # clean keys, no adapter or time conditioning there), so the next
                                      # token is the AR model's and training shapes the masked ones only
    lora_r: int = 32                  # adapter rank: 32 on every linear keeps the file ~20 MB in bf16
    lora_alpha: int = 64
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                              "gate_proj", "up_proj", "down_proj"])
    # data
    corpus: str = "data/corpus/tokens.safetensors"
    seq_len: int = 512                # tokens per training sequence (32 blocks of 16)
    eval_fraction: float = 0.01       # held-out share of the corpus for eval loss
    # objective
    block_size: int = 16              # S: the size the sampler will run at
    min_t: float = 0.02               # t ~ U(min_t, 1): a block with nothing masked teaches nothing
    prefix_share: float = 0.0         # share of blocks masked as the sampler mostly leaves them: the
                                      # first (1 - t) S tokens revealed, the rest masked (0 = the paper)
    distill: float = 0.0              # weight of the AR model's next-token distribution in the target
                                      # (0 = the paper's one-hot targets; see DiffusionObjective)
    distill_temperature: float = 1.0  # that distribution is softmax(AR logits / T); 0 = its argmax
    next_weight: float = 1.0          # loss weight of each block's first masked position (the token a
                                      # left-to-right commit writes next) against 1 for the others (1 = the paper)
    # optimisation
    steps: int = 2000
    batch_size: int = 32              # sequences per step per process
    lr: float = 5e-4                  # LoRA + mask embedding
    time_lr: float = 1e-3             # adaLN-single (starts at identity)
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # bookkeeping
    out: str = "runs/default"
    eval_every: int = 200
    eval_batches: int = 8
    save_every: int = 500
    seed: int = 0
    max_minutes: float = 0.0          # wall-clock budget; 0 = none. Ends early, saving as at the end
    compile: bool = False             # torch.compile the denoiser's training pass (batch shape fixed)
    init: str = ""                    # start from this checkpoint dir's denoiser weights (no optimizer)
    device: str | None = None         # default: cuda if available
    name: str = "smollm2-twotower"

    @classmethod
    def from_toml(cls, path: str | Path) -> "TrainConfig":
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"training config not found: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: invalid TOML: {e}") from None
        flat = {k: v for section in raw.values() for k, v in (section.items() if isinstance(section, dict) else [])}
        flat.update({k: v for k, v in raw.items() if not isinstance(v, dict)})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(flat) - known)
        if unknown:
            raise ValueError(f"unknown training setting(s) in {path}: {', '.join(unknown)}")
        return cls(**flat)

    def validate(self) -> "TrainConfig":
        """ValueError naming the setting and its value for a wrong type or an unusable value,
        before any data or model is loaded. Returns self."""
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            if not _fits(value, hints[f.name]):
                raise ValueError(f"{f.name} must be {_describe(hints[f.name])}, got {value!r} ({type(value).__name__})")
        for name, (ok, what) in RANGES.items():
            if not ok(getattr(self, name)):
                raise ValueError(f"{name} must be {what}, got {getattr(self, name)!r}")
        blocks = 2 if self.anchor else 1      # parts() trains on whole blocks after training_start
        if self.seq_len < blocks * self.block_size:
            what = "2 x block_size" if self.anchor else "block_size"
            why = " with anchor = true (no loss on the first block)" if self.anchor else ""
            raise ValueError(f"seq_len must be at least {what} = {blocks * self.block_size}{why}, got {self.seq_len}")
        if self.device:
            checkpoints.check_device(self.device)
        return self


# ---- config checks ---------------------------------------------------------------------------
def _at_least(low: int) -> tuple:
    return (lambda v: v >= low), f">= {low}"


_POSITIVE = (lambda v: v > 0, "> 0")
_FRACTION = (lambda v: 0 <= v <= 1, "in [0, 1]")
_FINITE_NON_NEGATIVE = (lambda v: 0 <= v < math.inf, "a finite number >= 0")
_NON_EMPTY = (lambda v: bool(v.strip()), "a non-empty string")
RANGES = {   # setting -> (test, what it must be); types are checked first
    "context": _NON_EMPTY, "mask_token_id": _at_least(0), "lora_r": _at_least(1), "lora_alpha": _at_least(1),
    "lora_targets": (bool, "a non-empty list of module names"), "corpus": _NON_EMPTY,
    "seq_len": _at_least(1), "eval_fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "block_size": _at_least(1), "min_t": _FRACTION, "prefix_share": _FRACTION, "distill": _FRACTION,
    "distill_temperature": _FINITE_NON_NEGATIVE, "next_weight": (lambda v: 0 < v < math.inf, "a finite number > 0"),
    "steps": _at_least(0), "batch_size": _at_least(1), "lr": (lambda v: 0 < v < math.inf, "a finite number > 0"),
    "time_lr": _FINITE_NON_NEGATIVE, "warmup": _at_least(0), "weight_decay": _FINITE_NON_NEGATIVE,
    "grad_clip": _POSITIVE, "out": _NON_EMPTY, "eval_every": _at_least(1), "eval_batches": _at_least(1),
    "save_every": _at_least(1), "seed": _at_least(0), "max_minutes": (lambda v: v >= 0, ">= 0 (0 = no budget)"),
    "name": _NON_EMPTY,
}


def _fits(value, hint) -> bool:
    """Whether value is of the dataclass field type `hint` (an int passes as a float, a bool as neither)."""
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return isinstance(value, list) and all(_fits(v, typing.get_args(hint)[0]) for v in value)
    return isinstance(value, hint)


def _describe(hint) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "unset"}
    if isinstance(hint, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"a list of {_describe(typing.get_args(hint)[0]).split(' ', 1)[1]}s"
    return names[hint]


def parse_override(item: str) -> tuple[str, object]:
    """One `--set KEY=VALUE` as (key, value of the setting's type); lists are comma-separated."""
    key, eq, text = item.partition("=")
    if not eq:
        raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
    hints = typing.get_type_hints(TrainConfig)
    if key not in hints:
        raise ValueError(f"unknown setting {key!r} in --set")
    hint = hints[key]
    if hint is bool:
        words = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
        if text.lower() not in words:
            raise ValueError(f"--set {key} expects true or false, got {text!r}")
        return key, words[text.lower()]
    if hint in (int, float):
        try:
            return key, hint(text)
        except ValueError:
            raise ValueError(f"--set {key} expects {_describe(hint)}, got {text!r}") from None
    if typing.get_origin(hint) is list:
        return key, [part.strip() for part in text.split(",") if part.strip()]
    return key, text
