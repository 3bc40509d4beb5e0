"""`python -m twotower eval`: block diffusion against the AR baseline of the same context tower.

Both modes decode greedily from the same prompts (chat template applied) with the same seed:
  (a) QA accuracy on assets/eval/qa.jsonl, scored by the rule in twotower.metrics (first
      sentence of the reply, normalised, whole-word match of any accepted answer);
      quality retention = diffusion accuracy / AR accuracy, overall and per category, and on
      the items not in the model's training corpus when it lists some (`eval_items_seen`).
  (b) agreement: fraction of the first 32 generated tokens where greedy diffusion equals
      greedy AR, on the open-ended prompts of assets/eval/open_prompts.txt.
  (c) on the same free generations (--max-new-tokens, default 128, stopping at end-of-text):
      NLL per token of the continuation under the context tower (teacher-forced, given the
      prompt) and repetition: distinct-2, distinct-3 (per reply, averaged), longest repeated
      n-gram. Greedy AR text is the context tower's own choice at every step, so its NLL is low
      by construction: a reference point, not a target.
  (d) speed: tokens per NFE counted per reply as if decoded alone (AR: context passes;
      diffusion: denoiser passes), and wall-clock tokens/s at batch size 1 on --speed-prompts
      open prompts after a warm-up, on the named device.
  (e) --sweep: the diffusion metrics over confidence thresholds x steps per block, written as
      sweep.csv, sweep.md, sweep.html (plotly) and sweep.png when kaleido is installed.
Results go to --out (results.json, report.md, per-prompt outputs) and stdout (--json: JSON).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from . import metrics
from .cli import POSITIVE, check_options
from .events import BlockCommitted, BlockStart, Done, Step, Token
from .eval_report import device_name, public, summary_table, sweep_markdown, write_outputs, write_sweep
from .generate_cmd import NO_PACK_HELP, tuned
from .sampler import ar_generate, diffusion_generate
from .sampling import REMASKING, SamplerConfig
from .trace import DraftTally

ROOT = Path(__file__).resolve().parent.parent
QA_PATH = ROOT / "assets" / "eval" / "qa.jsonl"
OPEN_PATH = ROOT / "assets" / "eval" / "open_prompts.txt"
AGREE_TOKENS = 32
SWEEP_THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
SWEEP_STEPS = (4, 8, 16)
MODES = ("ar", "diffusion")


# ---- data ------------------------------------------------------------------------------
def read_lines(path: str | Path) -> list[str]:
    """The lines of a UTF-8 text file; ValueError naming the file and line where it is not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{e.object[e.start]:02x})") from None


def qa_item(path: str | Path, n: int, line: str) -> dict:
    """Line n of a QA file as an item; ValueError naming the file and line when it is not one."""
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not valid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(item, dict):
        raise ValueError(f"{path}:{n}: a QA item must be a JSON object, got {line.strip()[:40]}")
    missing = {"id", "category", "prompt", "answers"} - set(item)
    if missing or not item["answers"]:
        raise ValueError(f"{path}:{n}: QA item lacks {sorted(missing) or ['answers']}")
    answers = item["answers"]
    strings = isinstance(answers, list) and all(isinstance(a, str) for a in answers)
    if not isinstance(item["prompt"], str) or not strings:
        raise ValueError(f"{path}:{n}: a QA item's prompt must be a string and its answers a list of strings")
    return item


def load_qa(path: str | Path = QA_PATH) -> list[dict]:
    """The QA items: one JSON object per line with id, category, prompt and answers."""
    items = [qa_item(path, n, line) for n, line in enumerate(read_lines(path), 1) if line.strip()]
    if not items:
        raise ValueError(f"{path} holds no QA items")
    return items


def load_prompts(path: str | Path = OPEN_PATH) -> list[str]:
    """One prompt per non-empty line."""
    prompts = [line.strip() for line in read_lines(path) if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def take(items: list[dict], n: int | None) -> list[dict]:
    """The first n items, taken round-robin over categories so a small n covers all of them."""
    if n is None or n >= len(items):
        return items
    queues: dict[str, list[dict]] = {}
    for item in items:
        queues.setdefault(item["category"], []).append(item)
    picked: list[dict] = []
    while len(picked) < n:
        for queue in queues.values():
            if queue and len(picked) < n:
                picked.append(queue.pop(0))
    return picked


# ---- generation ------------------------------------------------------------------------
@dataclass
class Generation:
    """Outputs of one mode on a list of prompts, in prompt order."""
    texts: list[str] = field(default_factory=list)
    ids: list[list[int]] = field(default_factory=list)
    nfe: list[int] = field(default_factory=list)      # per reply, as if decoded alone
    seconds: float = 0.0                                # wall time of the batched runs
    drafts_held: int = 0                                # verify order: drafts the AR model's reading kept
    drafts_dropped: int = 0                             # ... and dropped
    tree_rows: int = 0                                  # draft trees: block rows the passes ran (as if alone)
    reached: list[int] = field(default_factory=list)    # verify order, by draft depth - 1: drafts the check reached
    held_at: list[int] = field(default_factory=list)    # ... and drafts that held
    context: list[int] = field(default_factory=list)    # diffusion: context-tower passes per reply, as if alone

    @property
    def tokens(self) -> int:
        return sum(map(len, self.ids))


class RowNFE:
    """Counts the network passes each row of a batch needs, as if it were decoded alone.

    A batch keeps stepping while any row is unfinished; a row is charged only for the steps
    that were for it (diffusion: `Step.active`; traces without it: while it had masked
    positions) or where it still produced tokens (AR), and never after it ended at end-of-text.
    `context` counts a diffusion row's context-tower passes the same way: the one before each
    block it started (the prefill, then an extend per block after the first).
    """

    def __init__(self, batch: int, eos: set[int], stop_at_eos: bool):
        self.nfe, self.context, self.ended = [0] * batch, [0] * batch, [False] * batch
        self.eos, self.stop = eos, stop_at_eos

    def update(self, event) -> None:
        if isinstance(event, BlockStart):
            self.context = [n + (not ended) for n, ended in zip(self.context, self.ended)]
        elif isinstance(event, Step):
            active = event.active or [t > 0 for t in event.t]
            for b, is_active in enumerate(active):
                self.nfe[b] += int(is_active and not self.ended[b])
        elif isinstance(event, BlockCommitted) and self.stop:
            for b, row in enumerate(event.tokens):
                self.ended[b] = self.ended[b] or any(tok in self.eos for tok in row)
        elif isinstance(event, Token):
            for b, tok in enumerate(event.tokens):
                if not self.ended[b]:
                    self.nfe[b] += 1
                    self.ended[b] = self.stop and tok in self.eos


def sampler_for(mode: str):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return ar_generate if mode == "ar" else diffusion_generate


def run_batch(model, prompt_ids: list[list[int]], cfg: SamplerConfig, mode: str,
              drafts: DraftTally | None = None) -> tuple[Done, RowNFE]:
    """Decode one batch; returns the Done event and the per-row counts (drafts: counted into)."""
    counter = RowNFE(len(prompt_ids), model.eos_token_ids, cfg.stop_at_eos)
    done = None
    for event in sampler_for(mode)(model, prompt_ids, cfg):
        counter.update(event)
        if drafts is not None:
            drafts.update(event)
        done = event if isinstance(event, Done) else done
    return done, counter


def generate(model, prompt_ids: list[list[int]], cfg: SamplerConfig, mode: str, batch_size: int,
             desc: str = "") -> Generation:
    """Decode every prompt in batches of similar length (left-padded); results in prompt order."""
    from tqdm.auto import tqdm

    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    rows: dict[int, tuple[str, list[int], int, int]] = {}
    seconds, held, dropped, tree_rows, reached, held_at = 0.0, 0, 0, 0, [], []
    starts = range(0, len(order), batch_size)
    for s in tqdm(starts, desc=desc or mode, unit="batch", leave=False, file=sys.stderr):
        idx = order[s: s + batch_size]
        drafts = DraftTally(len(idx))
        done, counts = run_batch(model, [prompt_ids[i] for i in idx], cfg, mode, drafts)
        seconds, held, dropped = seconds + done.seconds, held + sum(drafts.held), dropped + sum(drafts.dropped)
        tree_rows += sum(drafts.rows)
        for row_reached, row_held in zip(drafts.reached, drafts.held_at):
            reached, held_at = add_lists(reached, row_reached), add_lists(held_at, row_held)
        for j, i in enumerate(idx):
            rows[i] = (done.texts[j], done.token_ids[j], counts.nfe[j], counts.context[j])
    texts, ids, nfes, context = zip(*(rows[i] for i in range(len(prompt_ids)))) if rows else ((), (), (), ())
    context = list(context) if mode == "diffusion" else []     # AR counts all its passes as NFE
    return Generation(list(texts), list(ids), list(nfes), seconds, held, dropped, tree_rows, context=context,
                      reached=reached, held_at=held_at)


def add_lists(a: list[int], b: list[int]) -> list[int]:
    """Element-wise sum of two count lists of any lengths."""
    return [x + y for x, y in zip(a + [0] * (len(b) - len(a)), b + [0] * (len(a) - len(b)))]


def measure_speed(model, prompt_ids: list[list[int]], cfg: SamplerConfig, mode: str) -> dict:
    """Wall-clock tokens/s and tokens per NFE at batch size 1, after one short warm-up run."""
    run_batch(model, prompt_ids[:1], replace(cfg, max_new_tokens=min(cfg.max_new_tokens, cfg.block_size)), mode)
    tokens = nfe = 0
    seconds = 0.0
    for ids in prompt_ids:       # the samplers read results back every step, so timings are synced
        done, _ = run_batch(model, [ids], cfg, mode)
        tokens, nfe, seconds = tokens + done.tokens, nfe + done.nfe, seconds + done.seconds
    return {"prompts": len(prompt_ids), "tokens": tokens, "nfe": nfe, "seconds": round(seconds, 4),
            "tokens_per_nfe": tokens / nfe if nfe else math.nan,
            "tokens_per_second": tokens / seconds if seconds > 0 else math.nan}


# ---- scoring ---------------------------------------------------------------------------
@torch.no_grad()
def continuation_nll(model, prompt_ids: list[list[int]], continuations: list[list[int]],
                     batch_size: int) -> list[tuple[float, int]]:
    """(summed NLL, token count) of each continuation given its prompt, under the context tower.

    Teacher-forced in right-padded batches; empty continuations give (0.0, 0).
    """
    lm, out = model.context_lm, []
    for s in range(0, len(prompt_ids), batch_size):
        seqs = [p + c for p, c in zip(prompt_ids[s: s + batch_size], continuations[s: s + batch_size])]
        width = max(map(len, seqs))
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        attn = torch.zeros(len(seqs), width, dtype=torch.long)
        scored = torch.zeros(len(seqs), width - 1, dtype=torch.bool)
        for b, (seq, prompt) in enumerate(zip(seqs, prompt_ids[s: s + batch_size])):
            ids[b, : len(seq)] = torch.tensor(seq)
            attn[b, : len(seq)] = 1
            scored[b, len(prompt) - 1: len(seq) - 1] = True     # predictions of the continuation
        ids, attn, scored = ids.to(model.device), attn.to(model.device), scored.to(model.device)
        logits = lm(input_ids=ids, attention_mask=attn).logits[:, :-1]
        sums, counts = metrics.token_nll(logits, ids[:, 1:], scored)
        out.extend(zip(sums, map(int, counts)))
    return out


def score_qa(items: list[dict], gen: Generation, seen: frozenset[str] = frozenset()) -> dict:
    """Accuracy overall and per category, plus the per-item verdicts; with `seen` (ids of items
    the model was trained on) also the accuracy on the other items, "accuracy_unseen"."""
    correct = [metrics.is_correct(text, item["answers"]) for item, text in zip(items, gen.texts)]
    by_cat: dict[str, list[bool]] = {}
    for item, ok in zip(items, correct):
        by_cat.setdefault(item["category"], []).append(ok)
    out = {"accuracy": metrics.mean(correct), "by_category": {c: metrics.mean(v) for c, v in sorted(by_cat.items())},
           "correct": correct}
    if seen:
        out["accuracy_unseen"] = metrics.mean(ok for item, ok in zip(items, correct) if item["id"] not in seen)
    return out


def score_open(model, prompt_ids: list[list[int]], gen: Generation, batch_size: int) -> dict:
    """NLL per token under the context tower and repetition metrics of free generations."""
    nll = continuation_nll(model, prompt_ids, gen.ids, batch_size)
    total, count = sum(s for s, _ in nll), sum(c for _, c in nll)
    return {"nll_per_token": total / count if count else math.nan,
            "perplexity": math.exp(total / count) if count else math.nan,
            "distinct_2": metrics.mean(metrics.distinct_n(ids, 2) for ids in gen.ids),
            "distinct_3": metrics.mean(metrics.distinct_n(ids, 3) for ids in gen.ids),
            "longest_repeat": metrics.mean(metrics.longest_repeat(ids) for ids in gen.ids),
            "mean_tokens": gen.tokens / len(gen.ids) if gen.ids else math.nan,
            "per_prompt_nll": [s / c if c else None for s, c in nll]}


def speed_of(gen: Generation) -> dict:
    """Tokens per NFE (per-reply accounting) and batched throughput of a generation."""
    nfe = sum(gen.nfe)
    out = {"tokens_per_nfe": gen.tokens / nfe if nfe else math.nan,
           "batched_tokens_per_second": gen.tokens / gen.seconds if gen.seconds > 0 else math.nan}
    checked = gen.drafts_held + gen.drafts_dropped
    if checked:                                        # the verify order: how its drafts fared
        out.update(drafts_checked=checked, draft_acceptance=gen.drafts_held / checked,
                   drafts_reached_by_depth=gen.reached,
                   acceptance_by_depth=[h / r for h, r in zip(gen.held_at, gen.reached)])
    if gen.tree_rows:                                  # draft trees: what a pass costs, in block rows
        out["rows_per_pass"] = gen.tree_rows / nfe
    if gen.context:                                    # diffusion: counting the context tower's passes too
        out["tokens_per_pass_both_towers"] = gen.tokens / (nfe + sum(gen.context))
    return out


def mean_agreement(a: Generation, b: Generation, n: int) -> float:
    return metrics.mean(metrics.agreement(x, y, n) for x, y in zip(a.ids, b.ids))


# ---- one evaluation ----------------------------------------------------------------------
@dataclass
class EvalData:
    """Prompts of one evaluation, already encoded with the model's tokenizer."""
    qa: list[dict]
    qa_ids: list[list[int]]
    open_prompts: list[str]
    open_ids: list[list[int]]
    seen: frozenset[str] = frozenset()   # ids of QA items whose prompts the model was trained on


def encode_all(model, qa: list[dict], open_prompts: list[str], chat: bool = True) -> EvalData:
    from .runner import encode_prompt
    seen = frozenset(item["id"] for item in qa) & getattr(model, "eval_items_seen", frozenset())
    return EvalData(qa, [encode_prompt(model, item["prompt"], chat) for item in qa],
                    open_prompts, [encode_prompt(model, p, chat) for p in open_prompts], seen)


def evaluate_mode(model, data: EvalData, mode: str, qa_cfg: SamplerConfig, open_cfg: SamplerConfig,
                  batch_size: int) -> dict:
    """QA and open-prompt generations of one mode with their scores (generations kept under '_gen')."""
    qa_gen = generate(model, data.qa_ids, qa_cfg, mode, batch_size, f"{mode} qa")
    open_gen = generate(model, data.open_ids, open_cfg, mode, batch_size, f"{mode} open")
    return {"qa": score_qa(data.qa, qa_gen, data.seen), "open": score_open(model, data.open_ids, open_gen, batch_size),
            "speed": {"qa": speed_of(qa_gen), "open": speed_of(open_gen)},
            "_gen": {"qa": qa_gen, "open": open_gen}}


def compare(ar: dict, diff: dict, agree_n: int) -> dict:
    """The diffusion-vs-AR figures: retention, agreement, speedups."""
    cats = ar["qa"]["by_category"]
    out = {"qa_retention": metrics.retention(diff["qa"]["accuracy"], ar["qa"]["accuracy"]),
           "qa_retention_by_category": {c: metrics.retention(diff["qa"]["by_category"][c], cats[c]) for c in cats},
           "agreement": mean_agreement(diff["_gen"]["open"], ar["_gen"]["open"], agree_n),
           "nll_gap": diff["open"]["nll_per_token"] - ar["open"]["nll_per_token"]}
    if "accuracy_unseen" in ar["qa"]:
        out["qa_retention_unseen"] = metrics.retention(diff["qa"]["accuracy_unseen"], ar["qa"]["accuracy_unseen"])
    if "wallclock" in ar and "wallclock" in diff:
        out["speedup_tokens_per_second"] = (diff["wallclock"]["tokens_per_second"]
                                            / ar["wallclock"]["tokens_per_second"])
    return out


def sweep(model, data: EvalData, ar: dict, qa_cfg: SamplerConfig, open_cfg: SamplerConfig, batch_size: int,
          thresholds, steps_list, agree_n: int) -> list[dict]:
    """Diffusion quality and speed at every (steps, threshold) point of the grid."""
    from tqdm.auto import tqdm

    rows = []
    grid = [(steps, threshold) for steps in steps_list for threshold in thresholds]
    for steps, threshold in tqdm(grid, desc="sweep", unit="config", file=sys.stderr):
        qa_c, open_c = (replace(c, steps=steps, threshold=threshold) for c in (qa_cfg, open_cfg))
        res = evaluate_mode(model, data, "diffusion", qa_c, open_c, batch_size)
        cmp = compare(ar, res, agree_n)
        rows.append({"steps": steps, "threshold": threshold, "qa_accuracy": res["qa"]["accuracy"],
                     "qa_retention": cmp["qa_retention"], "agreement": cmp["agreement"],
                     "nll_per_token": res["open"]["nll_per_token"], "distinct_2": res["open"]["distinct_2"],
                     "tokens_per_nfe": res["speed"]["open"]["tokens_per_nfe"],
                     "qa_tokens_per_nfe": res["speed"]["qa"]["tokens_per_nfe"],
                     "batched_tokens_per_second": res["speed"]["open"]["batched_tokens_per_second"]})
        if "qa_retention_unseen" in cmp:
            rows[-1]["qa_retention_unseen"] = cmp["qa_retention_unseen"]
    return rows


# ---- command -----------------------------------------------------------------------------
def configs(args, model_defaults: dict | None = None) -> tuple[SamplerConfig, SamplerConfig]:
    """Sampler settings for QA answers and for free generations (greedy, same seed in both
    modes): those given, over the model's recommended ones."""
    base = SamplerConfig.recommended(model_defaults, block_size=args.block_size, steps=args.steps,
                                     threshold=args.threshold, remasking=args.remasking, seed=args.seed,
                                     repetition_penalty=args.repetition_penalty,
                                     no_repeat_ngram_size=args.no_repeat_ngram_size,
                                     draft_nodes=args.draft_nodes)
    base = replace(base, temperature=0.0, top_k=0, top_p=1.0)
    return (replace(base, max_new_tokens=args.answer_tokens).validate(),
            replace(base, max_new_tokens=args.max_new_tokens).validate())


def run_eval(model, args, qa: list[dict], open_prompts: list[str]) -> dict:
    """Everything the command computes, as one dict (raw generations under '_gen' keys)."""
    data = encode_all(model, qa, open_prompts, chat=not args.no_chat)
    qa_cfg, open_cfg = configs(args, model.sampler_defaults)
    agree_n = min(AGREE_TOKENS, args.max_new_tokens)
    res = {"model": model.info(), "device": device_name(model.device),
           "settings": {**{k: v for k, v in open_cfg.to_dict().items() if k != "max_new_tokens"},
                        "answer_tokens": args.answer_tokens, "max_new_tokens": args.max_new_tokens,
                        "agree_tokens": agree_n, "qa_items": len(qa), "open_prompts": len(open_prompts),
                        "qa_items_seen_in_training": sorted(data.seen),
                        "batch_size": args.batch_size, "speed_prompts": min(args.speed_prompts, len(open_prompts))}}
    for mode in MODES:
        res[mode] = evaluate_mode(model, data, mode, qa_cfg, open_cfg, args.batch_size)
        if args.speed_prompts > 0:
            res[mode]["wallclock"] = measure_speed(model, data.open_ids[: args.speed_prompts], open_cfg, mode)
    res["comparison"] = compare(res["ar"], res["diffusion"], agree_n)
    if args.sweep:
        res["sweep"] = sweep(model, data, res["ar"], qa_cfg, open_cfg, args.batch_size,
                             args.sweep_thresholds, args.sweep_steps, agree_n)
    res["_data"] = data
    return res


# ---- checking the options (before the model loads) ----------------------------------------
EVAL_OPTIONS = {   # option -> (is the value possible?, what it must be): cli.check_options
    "limit": POSITIVE, "max_new_tokens": POSITIVE, "answer_tokens": POSITIVE, "batch_size": POSITIVE,
    "speed_prompts": (lambda v: v >= 0, ">= 0 (0 = skip)"),
}


def check_sweep(thresholds: list[float], steps: list[int]) -> None:
    """The sweep's grid: at least one threshold in [0, 1] and one step count >= 1."""
    if not thresholds or not steps:
        raise ValueError("--sweep-thresholds and --sweep-steps must each list at least one value")
    for t in thresholds:
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"--sweep-thresholds must lie in [0, 1], got {t}")
    for n in steps:
        if n < 1:
            raise ValueError(f"--sweep-steps must be positive integers, got {n}")


def check_args(args) -> None:
    """Refuse impossible option values before any work, naming the option and the value; the
    sampler settings as the run will use them (over the checkpoint's recommended ones, read
    from its twotower.json without loading weights)."""
    from .checkpoints import settings_before_loading
    check_options(args, EVAL_OPTIONS)
    check_sweep(args.sweep_thresholds, args.sweep_steps)
    defaults = settings_before_loading(args.model)
    if defaults is not None:                                   # else checked once the model is loaded
        configs(args, defaults)


def cmd_eval(args) -> int:
    from .generate_cmd import load_model

    check_args(args)
    qa = take(load_qa(args.qa), args.limit)
    open_prompts = load_prompts(args.open_prompts)[: args.limit]
    start = time.perf_counter()
    model = load_model(args)
    res = run_eval(model, args, qa, open_prompts)
    res["seconds"] = round(time.perf_counter() - start, 2)
    out = Path(args.out) if args.out else (Path("eval_out") if args.sweep else None)
    if out is not None:
        write_outputs(out, res, res["_data"].qa, res["_data"].open_prompts)
        if res.get("sweep"):
            res["sweep_files"] = write_sweep(out, res["sweep"], res["ar"])
        print(f"[eval] results written to {out}", file=sys.stderr)
    if args.json:
        print(json.dumps(public(res), indent=2))
    else:
        print(f"{res['model']['name']} on {res['device']}\n")
        print(summary_table(res))
        if res.get("sweep"):
            print("\n" + sweep_markdown(res["sweep"]))
    return 0


def float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def add_parser(sub) -> None:
    d = SamplerConfig()
    p = sub.add_parser("eval", help="compare diffusion with the AR baseline: accuracy, agreement, NLL, speed",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model spec (default: the shipped default model)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--limit", type=int, default=None, help="use at most N QA items and N open prompts")
    p.add_argument("--max-new-tokens", type=int, default=128, help="length of the free generations")
    p.add_argument("--answer-tokens", type=int, default=24, help="length of the QA answers")
    p.add_argument("--threshold", type=float, default=None, help=f"confidence threshold gamma {tuned(d.threshold)}")
    p.add_argument("--steps", type=int, default=None, help=f"denoiser steps per block {tuned(d.steps)}")
    p.add_argument("--block-size", type=int, default=None, help=tuned(d.block_size))
    p.add_argument("--remasking", choices=REMASKING, default=None, help=f"commit order within a block {tuned(d.remasking)}")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help=f"> 1 lowers the scores of tokens already written, in both modes {tuned(d.repetition_penalty)}")
    p.add_argument("--no-repeat-ngram-size", type=int, default=None, metavar="N",
                   help=f"do not write an N-gram already written, in both modes {tuned(d.no_repeat_ngram_size)}")
    p.add_argument("--draft-nodes", type=int, default=None, metavar="N",
                   help=f"verify order: a draft tree of the N likeliest paths of drafts, checked in one "
                        f"pass over a block row per node (0 = off) {tuned(d.draft_nodes)}")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--batch-size", type=int, default=16, help="prompts decoded together")
    p.add_argument("--speed-prompts", type=int, default=8,
                   help="open prompts timed one by one for wall-clock tokens/s (0 = skip)")
    p.add_argument("--sweep", action="store_true", help="also sweep thresholds x steps (quality vs speed)")
    p.add_argument("--sweep-thresholds", type=float_list, default=list(SWEEP_THRESHOLDS), metavar="LIST")
    p.add_argument("--sweep-steps", type=int_list, default=list(SWEEP_STEPS), metavar="LIST")
    p.add_argument("--qa", default=str(QA_PATH), help="QA file (JSON lines)")
    p.add_argument("--open-prompts", default=str(OPEN_PATH), help="open-ended prompts, one per line")
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--no-pack", action="store_true", help=NO_PACK_HELP)
    p.add_argument("--out", default=None, help="directory for results (default with --sweep: eval_out)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=cmd_eval)
