"""`python -m twotower generate ...` and `python -m twotower info SPEC`."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .sampling import REMASKING, SamplerConfig


# Sampler options whose default comes from the model's checkpoint when it recommends one
# (twotower.json "sampler"), else from SamplerConfig; the CLI leaves them None when not given.
MODEL_TUNED = ("block_size", "steps", "threshold", "temperature", "top_k", "top_p", "repetition_penalty",
               "no_repeat_ngram_size", "remasking", "draft_nodes")


def tuned(default) -> str:
    """Help text of an option in MODEL_TUNED."""
    return f"(default: the model's recommended setting, else {default})"


MODEL_HELP = ("model spec: default (the shipped model), a checkpoint directory, a release directory, a "
              "transformers AR model directory or smollm2 (untrained denoiser), ctx=DIR,denoiser=FILE, a hub id "
              "in the local cache, or random:NAME (random weights from bench/configs/NAME.json); README 'Model specs'")
NO_PACK_HELP = "CPU float32: keep PyTorch's own linear layers (MKL) instead of oneDNN-packed ones (same text, slower)"


def add_sampler_args(p: argparse.ArgumentParser) -> None:
    d = SamplerConfig()
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--mode", choices=("diffusion", "ar"), default="diffusion",
                   help="diffusion: TwoTower decoding; ar: the context tower alone, one token per pass")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                   help=f"most tokens to write (the reply may end earlier at end-of-text; default {d.max_new_tokens})")
    p.add_argument("--block-size", type=int, default=None, help=tuned(d.block_size))
    p.add_argument("--steps", type=int, default=None, help=f"denoiser steps per block {tuned(d.steps)}")
    p.add_argument("--threshold", type=float, default=None, help=f"confidence threshold gamma {tuned(d.threshold)}")
    p.add_argument("--temperature", type=float, default=None, help=tuned(d.temperature))
    p.add_argument("--top-k", type=int, default=None, help=tuned(d.top_k))
    p.add_argument("--top-p", type=float, default=None, help=tuned(d.top_p))
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help=f"> 1 lowers the scores of tokens already written (1 = off) {tuned(d.repetition_penalty)}")
    p.add_argument("--no-repeat-ngram-size", type=int, default=None, metavar="N",
                   help=f"do not write an N-gram already written (0 = off; diffusion: checked where the N-1 "
                        f"tokens before a position are written) {tuned(d.no_repeat_ngram_size)}")
    p.add_argument("--remasking", choices=REMASKING, default=None, help=f"commit order {tuned(d.remasking)}")
    p.add_argument("--draft-nodes", type=int, default=None, metavar="N",
                   help=f"verify order: a draft tree of the N likeliest paths of drafts, all checked in "
                        f"one pass over a block row per node (0 = off) {tuned(d.draft_nodes)}")
    p.add_argument("--mask-token-id", type=int, default=None, help="override the model's mask token id")
    p.add_argument("--seed", type=int, default=d.seed, help="same seed, settings and prompt: same text (default 0)")
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--no-stop", action="store_true", help="do not stop at end-of-text")
    p.add_argument("--share-base", action="store_true",
                   help="LoRA checkpoints: one backbone in memory, adapter unmerged (less memory, a bit slower)")
    p.add_argument("--no-pack", action="store_true", help=NO_PACK_HELP)


def sampler_config(args, model_defaults: dict | None = None) -> SamplerConfig:
    """The settings given on the command line over the model's recommended ones (validated)."""
    given = {k: getattr(args, k) for k in MODEL_TUNED}
    return SamplerConfig.recommended(model_defaults, **given, max_new_tokens=args.max_new_tokens,
                                     stop_at_eos=not args.no_stop, seed=args.seed).validate()


def load_model(args):
    from . import checkpoints
    model = checkpoints.load(args.model, device=args.device, share_base=getattr(args, "share_base", False),
                             context_device=getattr(args, "context_device", None),
                             pack=not getattr(args, "no_pack", False))
    if getattr(args, "mask_token_id", None) is not None:
        vocab = model.context_lm.config.vocab_size
        if not 0 <= args.mask_token_id < vocab:
            raise ValueError(f"--mask-token-id {args.mask_token_id} is outside the vocabulary (0..{vocab - 1})")
        model.mask_token_id = args.mask_token_id
    if getattr(args, "compile", False):
        model.compile(mode=args.compile_mode)
    return model


def summary(stats: dict, mode: str) -> str:
    drafts = f"drafts_kept={stats['drafts_kept']}/{stats['drafts_checked']} " if "drafts_checked" in stats else ""
    if "rows_per_pass" in stats:                     # draft trees: block rows per pass
        drafts += f"rows/pass={stats['rows_per_pass']:.1f} "
    return (f"[{mode}] tokens={stats['tokens']} nfe={stats['nfe']} tokens/nfe={stats['tokens_per_nfe']:.2f} "
            f"{drafts}seconds={stats['seconds']:.2f} tokens/s={stats['tokens_per_second']:.1f}")


def read_prompt_lines(path: str) -> list[str]:
    """The non-blank lines of a prompts file (ValueError naming the file when it has none or is not text)."""
    try:
        lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    if not lines:
        raise ValueError(f"{path} holds no prompt lines")
    return lines


def check_request_args(args) -> list[str] | None:
    """What can be checked before the model loads: the settings, one prompt source, its file,
    where the trace goes. Returns the prompts file's lines, if one was given."""
    from .checkpoints import settings_before_loading
    from .runner import parse_ids
    defaults = settings_before_loading(args.model)
    if defaults is not None:                                   # else checked once the model is loaded
        sampler_config(args, defaults)
    if args.compile_mode and not args.compile:
        raise ValueError("--compile-mode needs --compile")
    if sum(x is not None for x in (args.prompt, args.prompt_ids, args.prompts)) != 1:
        raise ValueError("give exactly one of PROMPT, --prompt-ids or --prompts FILE")
    if args.prompt is not None and not args.prompt.strip():
        raise ValueError("the prompt is empty: type some text")
    if args.prompt_ids is not None:
        parse_ids(args.prompt_ids)
    if args.trace and not Path(args.trace).resolve().parent.is_dir():
        raise ValueError(f"--trace {args.trace}: its folder does not exist")
    return read_prompt_lines(args.prompts) if args.prompts else None


def cmd_generate(args) -> int:
    from .runner import encode_prompt, parse_ids, run
    from .sampler import check_request
    lines = check_request_args(args)                           # bad input fails before the model loads
    model = load_model(args)
    cfg = sampler_config(args, model.sampler_defaults)
    if lines:
        encoded = []
        for k, line in enumerate(lines, 1):                      # every line is checked before any runs
            try:
                encoded.append(encode_prompt(model, line, chat=not args.no_chat))
                check_request(model, encoded[-1:], cfg)
            except ValueError as e:
                raise ValueError(f"{args.prompts} line {k}: {e}") from None
        for line, ids in zip(lines, encoded):
            trace, events = run(model, [ids], cfg, args.mode, [line])
            for _ in events:
                pass
            s, done = trace.stats(), trace.done
            print(json.dumps({"prompt": line, "text": done.texts[0], "tokens": s["tokens"], "nfe": s["nfe"],
                              "seconds": round(s["seconds"], 4)}), flush=True)
        return 0
    if args.prompt_ids:
        ids, text = parse_ids(args.prompt_ids), args.prompt_ids
    else:
        ids, text = encode_prompt(model, args.prompt, chat=not args.no_chat), args.prompt
    trace, events = run(model, [ids], cfg, args.mode, [text])
    for _ in events:
        pass
    done = trace.done
    print(done.texts[0] if model.tokenizer is not None else " ".join(map(str, done.token_ids[0])))
    print(summary(trace.stats(), args.mode), file=sys.stderr)
    if args.trace:
        trace.save(args.trace)
        print(f"trace written to {args.trace}", file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    import torch

    from .memory import part_sizes, peak_memory_gb
    model = load_model(args)
    devices = {model.device, next(model.context_lm.parameters()).device}
    gpu = next((d for d in devices if torch.device(d).type == "cuda"), None)
    peak = peak_memory_gb(gpu or "cpu")              # loading's peak: weights plus what loading held
    info = model.info() | part_sizes(model) | {"peak_memory_gb": peak["gb"], "peak_memory_kind": peak["kind"]}
    if "by_device" in peak:
        info["peak_memory_by_device_gb"] = peak["by_device"]
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for k, v in info.items():
            number = isinstance(v, int) and not isinstance(v, bool)
            print(f"{k:<{width}}  {v:,}" if number else f"{k:<{width}}  {v}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text (diffusion or AR) and print it")
    p.add_argument("prompt", nargs="?", default=None, help="prompt text")
    p.add_argument("--prompt-ids", default=None, help="prompt as comma-separated token ids")
    p.add_argument("--prompts", default=None, help="file with one prompt per line (JSON lines out)")
    p.add_argument("--trace", default=None, help="write the run's trace to this JSON file")
    p.add_argument("--compile", action="store_true",
                   help="static caches + torch.compile of the model's passes: the first run compiles "
                        "(minutes on a CPU), later runs of a --prompts file are faster")
    p.add_argument("--compile-mode", default=None, help="e.g. reduce-overhead (CUDA graphs on a GPU)")
    add_sampler_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("info", help="describe a model (architecture, params, where each part lives, memory)")
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--context-device", default=None,
                   help="put the context tower on another device (random weights or a release directory)")
    p.add_argument("--no-pack", action="store_true", help=NO_PACK_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info)
