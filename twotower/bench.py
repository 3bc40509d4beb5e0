"""`python -m twotower bench`: AR vs diffusion speed in one process, same prompts and seeds.

Three decoders run on the same prompts (batched `--batch` rows at a time), after warm-up:
  ar           our AR baseline (twotower.sampler.ar_generate: the context tower alone)
  diffusion    block diffusion (twotower.sampler.diffusion_generate)
  hf_generate  plain transformers `generate()` on the same context tower, greedy, same length
               (with our repetition penalty or n-gram ban: over the tokens written, not the prompt)
Both our samplers run with stop_at_eos off by default, so every run produces exactly
`--max-new-tokens` tokens per row (equal work); transformers gets min_new_tokens = max_new_tokens.

`--steps-per-block fixed` runs diffusion with threshold 1.0: no confidence ever exceeds it, so
the commit rule's floor ceil(masked / steps_left) commits exactly S/T tokens per step, i.e.
exactly T denoiser passes per block (the schedule for random weights). `adaptive` keeps the
confidence threshold (`--threshold`, default 0.9 as the release).

Also measured: a per-call breakdown (denoiser pass, context extend, sampler work) from one
extra instrumented run; the cost of streaming (plain consumption vs what the app does per
event: record the trace, decode new pieces, JSON-encode the event); peak memory; and the
memory-bandwidth bound of a decode step (weight bytes one pass reads / `--bandwidth`).

JSON (`--json`) keys: machine, commit, command, model, settings, ar, diffusion, hf_generate,
ratio, ratio_vs_hf_generate, breakdown, streaming, peak_memory, bandwidth (see bench/README.md).

Models: `--model SPEC` (see twotower.checkpoints) or random weights from a config:
`--random-weights CONFIG.json` or `--model random:NAME` (bench/configs/NAME.json, '-' = '_'),
built on the meta device and materialised directly on the target device in the target dtype.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .bandwidth import bandwidth_report, default_bandwidth, expected_experts, plan
from .cli import POSITIVE, check_options
from .generate_cmd import tuned
from .guards import RepeatGuard
from .memory import peak_memory_gb, reset_peak
from .random_weights import config_path, read_config
from .sampling import REMASKING, SamplerConfig

ROOT = Path(__file__).resolve().parent.parent
OPEN_PROMPTS = ROOT / "assets" / "eval" / "open_prompts.txt"
FIRST_PROMPT = "Write a short story about a lost dog."      # the prompt of the first GPU figures
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---- timing and memory ----------------------------------------------------------------------
def sync(device) -> None:
    """Wait for queued GPU work on every GPU (a context tower may live on another one) so
    wall-clock timers measure it; no-op on CPU."""
    if torch.device(device).type == "cuda":
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)


@contextmanager
def timed(device, into: dict, key: str = "seconds"):
    """Add the synchronised wall time of the block to into[key]."""
    sync(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        sync(device)
        into[key] = into.get(key, 0.0) + time.perf_counter() - start


# ---- machine and commit -----------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or what platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device) -> dict:
    """What ran the bench: CPU, cores, load, GPU, library versions."""
    import transformers
    info = {"cpu": cpu_model(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "device": str(device)}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(device).total_memory / 1e9, 1)
    return info


def git_commit() -> dict:
    """The short commit hash of the checkout and whether the tree has local changes (read only)."""
    def git(*args):   # read-only git queries
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if head.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


# ---- prompts --------------------------------------------------------------------------------
def bench_prompts(model, count: int, length: int = 32, seed: int = 0) -> list[list[int]]:
    """`count` prompts: the eval set's open prompts (chat template) with a tokenizer, else random ids."""
    if model.tokenizer is not None:
        from .runner import encode_prompt
        texts = [FIRST_PROMPT] + [l.strip() for l in OPEN_PROMPTS.read_text().splitlines() if l.strip()]
        texts = (texts * (count // len(texts) + 1))[:count]
        return [encode_prompt(model, t) for t in texts]
    vocab = model.context_lm.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (count, length), generator=g)
    ids[ids == model.mask_token_id] = 4
    return ids.tolist()


def batches(prompts: list[list[int]], size: int) -> list[list[list[int]]]:
    """The prompts in consecutive groups of `size` rows."""
    return [prompts[i:i + size] for i in range(0, len(prompts), size)]


# ---- the three decoders -------------------------------------------------------------------------
def run_ours(model, prompts, cfg: SamplerConfig, mode: str) -> dict:
    """One batch through our sampler, events consumed plainly. Returns its figures."""
    from .events import Done, Prefill
    from .sampler import ar_generate, diffusion_generate
    from .trace import DraftTally

    source = diffusion_generate(model, prompts, cfg) if mode == "diffusion" else ar_generate(model, prompts, cfg)
    out, tally = {}, DraftTally(len(prompts))                  # the tally counts a draft tree's rows, as traces do
    with timed(model.device, out):
        for event in source:
            tally.update(event)
            if isinstance(event, Prefill):
                out["prefill_seconds"] = event.seconds
            elif isinstance(event, Done):
                done = event
    out.update(tokens=done.tokens, rows=len(prompts), nfe=done.nfe, first_token_seconds=done.first_token_seconds,
               context_passes=getattr(done, "context_passes", None), token_ids=done.token_ids,
               tree_rows=sum(tally.rows), tree_passes=sum(tally.tree_passes))
    return out


class FirstTokenStreamer:
    """A transformers streamer that only notes when the first generated token arrives."""

    def __init__(self):
        self.calls, self.start, self.first = 0, time.perf_counter(), None

    def put(self, value):
        self.calls += 1
        if self.calls == 2 and self.first is None:          # call 1 carries the prompt
            self.first = time.perf_counter() - self.start

    def end(self):
        pass


def left_pad(prompts, pad_id: int, device):
    """(ids, attention mask) of left-padded prompts."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(p)
        mask[b, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def hf_generation_config(model, cfg: SamplerConfig):
    """Greedy, max_new_tokens; with stop_at_eos off, min_new_tokens forces the same length.
    When our decoders run on static caches, generate() does too; when they are compiled,
    generate() compiles its forward with the same backend and mode (on any device)."""
    from transformers import CompileConfig, GenerationConfig

    tok = model.tokenizer
    pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
    eos = sorted(model.eos_token_ids) or None
    fast = {}
    if model.static_cache:
        fast["cache_implementation"] = "static"
        if not model.compiled:
            fast["disable_compile"] = True
        else:
            options = model.compile_options
            compile_config = CompileConfig(backend=options["backend"], mode=options.get("mode", "default"),
                                           dynamic=False)
            compile_config._compile_all_devices = True
            fast["compile_config"] = compile_config
    return GenerationConfig(do_sample=False, max_new_tokens=cfg.max_new_tokens,
                            min_new_tokens=0 if cfg.stop_at_eos else cfg.max_new_tokens,
                            pad_token_id=pad, eos_token_id=eos, use_cache=True, **fast), pad


class WrittenTokensGuard:
    """Our repetition penalty and n-gram ban (twotower.guards.RepeatGuard) as a generate()
    logits processor: over the tokens generated after the (left-padded) prompt, so that
    generate() picks the same tokens as our AR loop; transformers' own count the prompt too."""

    def __init__(self, prompt_width: int, cfg: SamplerConfig):
        self.width, self.cfg = prompt_width, cfg

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return RepeatGuard(self.cfg, input_ids[:, self.width:]).token(scores)


@torch.no_grad()
def run_hf(model, prompts, cfg: SamplerConfig) -> dict:
    """One batch through transformers' generate() on the context tower."""
    from transformers import LogitsProcessorList

    gen_cfg, pad = hf_generation_config(model, cfg)
    lm = model.context_lm
    ids, mask = left_pad(prompts, pad, lm.get_input_embeddings().weight.device)
    guard = [WrittenTokensGuard(ids.shape[1], cfg)] if cfg.guards_repeats else []
    out = {}
    with timed(model.device, out):
        streamer = FirstTokenStreamer()
        seq = lm.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg, streamer=streamer,
                          logits_processor=LogitsProcessorList(guard))
    new = seq[:, ids.shape[1]:].tolist()
    out.update(tokens=sum(len(r) for r in new), rows=len(prompts), nfe=len(new[0]) if new else 0,
               first_token_seconds=streamer.first or out["seconds"], token_ids=new)
    return out


def summarise(runs: list[dict], mode: str) -> dict:
    """Totals over batches -> tokens/s, passes, ms per pass (per decoding pass)."""
    seconds = sum(r["seconds"] for r in runs)
    tokens = sum(r["tokens"] for r in runs)
    per_row = sum(r["tokens"] / r["rows"] for r in runs)
    nfe = sum(r["nfe"] for r in runs)
    prefill = sum(r.get("prefill_seconds", 0.0) for r in runs)
    s = {"tokens": tokens, "seconds": round(seconds, 4), "tokens_per_second": round(tokens / seconds, 3),
         "nfe": nfe, "tokens_per_nfe": round(per_row / nfe, 4) if nfe else None,
         "first_token_seconds": round(statistics.mean(r["first_token_seconds"] for r in runs), 4),
         "batches": len(runs)}
    if mode == "diffusion":
        s["ms_per_nfe"] = round((seconds - prefill) / nfe * 1e3, 3)        # incl. extends + sampler
        s["prefill_seconds"] = round(prefill, 4)
        s["context_passes"] = sum(r.get("context_passes") or 0 for r in runs) or None
        if any(r.get("tree_passes") for r in runs):                         # draft trees: a pass's cost in rows
            s["rows_per_pass"] = round(sum(r["tree_rows"] for r in runs) / sum(r["tree_passes"] for r in runs), 2)
    else:
        s["ms_per_token"] = round(seconds / per_row * 1e3, 3)               # incl. prefill
    if mode == "ar":                                                        # the prefill yields token 1
        decode_tokens = sum((r["nfe"] - 1) * r["rows"] for r in runs)
        decode_seconds = max(seconds - prefill, 1e-9)
        s["prefill_seconds"] = round(prefill, 4)
        s["decode_ms_per_step"] = round(decode_seconds / max(1, nfe - len(runs)) * 1e3, 3)
        s["decode_tokens_per_second"] = round(decode_tokens / decode_seconds, 3)
    return s


def agreement(a: list[list[list[int]]], b: list[list[list[int]]]) -> float:
    """Fraction of generated positions where two decoders chose the same token."""
    same = total = 0
    for rows_a, rows_b in zip(a, b):
        for ra, rb in zip(rows_a, rows_b):
            n = min(len(ra), len(rb))
            same += sum(x == y for x, y in zip(ra[:n], rb[:n]))
            total += max(len(ra), len(rb))
    return round(same / total, 4) if total else 1.0


# ---- per-call breakdown (one instrumented run) -----------------------------------------------------
@contextmanager
def instrumented(model, calls: dict):
    """Time the model's outermost prefill / extend / block_inputs / denoise calls (synchronised)
    while the block runs; calls[name] = [count, seconds]. A call inside another (prefill runs
    extend) counts for the outer one only."""
    depth = [0]

    def wrap(name):
        original = getattr(model, name)

        def timed_call(*args, **kwargs):
            if depth[0]:
                return original(*args, **kwargs)
            depth[0] += 1
            sync(model.device)
            start = time.perf_counter()
            try:
                result = original(*args, **kwargs)
                sync(model.device)
            finally:
                depth[0] -= 1
            entry = calls.setdefault(name, [0, 0.0])
            entry[0] += 1
            entry[1] += time.perf_counter() - start
            return result
        return timed_call
    names = ("prefill", "extend", "block_inputs", "denoise")
    for name in names:
        object.__setattr__(model, name, wrap(name))
    try:
        yield calls
    finally:
        for name in names:
            model.__dict__.pop(name, None)


@contextmanager
def routed_experts(lm, into: list):
    """Keep the expert ids (tokens, top_k) that every MoE router of `lm` picks while the block
    runs (no host sync: the tensors are only kept)."""
    hooks = [m.register_forward_hook(lambda module, args, out: into.append(out[-1].detach()))
             for m in lm.modules() if type(m).__name__.endswith("TopkRouter")]
    try:
        yield into
    finally:
        for hook in hooks:
            hook.remove()


def expert_stats(picks: list, tokens: int | None, config) -> dict | None:
    """Mean distinct experts per MoE layer per pass (passes over `tokens` tokens, or all), and the
    uniform-routing expectation for the same token count."""
    picks = [p for p in picks if tokens is None or p.shape[0] == tokens]
    if not picks:
        return None
    n = picks[0].shape[0]
    experts = int(getattr(config, "n_routed_experts", 0) or 0)
    top_k = picks[0].shape[-1]
    return {"tokens_per_pass": n, "distinct_per_layer": round(statistics.mean(p.unique().numel() for p in picks), 2),
            "uniform_expectation": round(expected_experts(experts, top_k, n), 2) if experts else None,
            "num_experts": experts, "top_k": top_k}


def breakdown(model, prompts, cfg: SamplerConfig, mode: str) -> dict:
    """Where one run's time goes: ms per denoiser pass / context extend / prefill, and the rest;
    for MoE models also how many distinct experts a pass touches (it sets the bytes read)."""
    calls: dict = {}
    picks: list = []
    lm = model.denoiser_lm if mode == "diffusion" else model.context_lm
    with instrumented(model, calls), routed_experts(lm, picks):
        run = run_ours(model, prompts, cfg, mode)
    ms = lambda name: round(calls[name][1] / calls[name][0] * 1e3, 3) if name in calls else None
    spent = sum(v[1] for v in calls.values())
    steps = max(1, run["nfe"])
    out = {"prefill_ms": ms("prefill"), "extend_ms_per_call": ms("extend"),
           "extend_calls": calls.get("extend", [0])[0], "block_inputs_ms_per_block": ms("block_inputs"),
           "sampler_ms_per_step": round((run["seconds"] - spent) / steps * 1e3, 3),
           "sampler_fraction": round((run["seconds"] - spent) / run["seconds"], 4),
           "experts": expert_stats(picks, len(prompts) if mode == "ar" else None, lm.config)}
    if mode == "diffusion":
        out["denoiser_ms_per_pass"] = ms("denoise")
    return out


# ---- streaming cost -----------------------------------------------------------------------------
def app_work(model, prompts, cfg: SamplerConfig, events) -> int:
    """What the app does with a diffusion run's events beyond consuming them: record the trace,
    decode every new token piece, JSON-encode each event with its new pieces. Returns bytes sent."""
    from .runner import add_pieces, event_ids, new_trace

    trace = new_trace(model, [""] * len(prompts), prompts, cfg, "diffusion")
    add_pieces(trace, model.tokenizer, {i for p in prompts for i in p} | {model.mask_token_id})
    known, sent = set(trace.tokens), 0
    for event in trace.record(events):
        add_pieces(trace, model.tokenizer, event_ids(event))
        fresh = {k: v for k, v in trace.tokens.items() if k not in known}
        known.update(fresh)
        sent += len(json.dumps({"event": event.to_dict(), "pieces": fresh}, separators=(",", ":")))
    return sent


def recorded(model, prompts, cfg: SamplerConfig) -> tuple[list, float]:
    """(events, synchronised seconds) of one plain diffusion run."""
    from .sampler import diffusion_generate

    out = {}
    with timed(model.device, out):
        events = list(diffusion_generate(model, prompts, cfg))
    return events, out["seconds"]


def streaming_cost(model, prompts, cfg: SamplerConfig, repeats: int) -> dict:
    """The cost of streaming every step to a client, two ways.

    replay: the app's per-event work timed alone on a recorded run's events, as a share of
    that run's time (precise; the samplers are synchronous, so this work adds to wall time).
    end_to_end: best-of-`repeats` tokens/s of plain runs vs runs consumed with that work,
    interleaved (noisy on a loaded machine).
    """
    from tqdm import tqdm

    from .events import Step
    from .sampler import diffusion_generate

    plain, app, shares, work = [], [], [], []
    tokens = len(prompts) * cfg.max_new_tokens
    for _ in tqdm(range(repeats), desc="bench: streaming", file=sys.stderr, disable=None):
        events, seconds = recorded(model, prompts, cfg)
        plain.append(seconds)
        start = time.perf_counter()
        sent = app_work(model, prompts, cfg, events)
        work.append(time.perf_counter() - start)
        shares.append(work[-1] / seconds)
        steps = sum(isinstance(e, Step) for e in events)
        t = {}
        with timed(model.device, t):
            app_work(model, prompts, cfg, diffusion_generate(model, prompts, cfg))
        app.append(t["seconds"])
    p, a = tokens / min(plain), tokens / min(app)
    return {"overhead_percent": round(min(shares) * 100, 3), "bytes_per_run": sent,
            "app_ms_per_step": round(min(work) / max(1, steps) * 1e3, 4), "steps_per_run": steps,
            "plain_tokens_per_second": round(p, 3), "app_tokens_per_second": round(a, 3),
            "end_to_end_overhead_percent": round((p - a) / p * 100, 2), "repeats": repeats,
            "consumer": "trace record + token pieces + json.dumps of every event (runner.run's work + one message)"}


# ---- the sampler's own per-step work ------------------------------------------------------------
@torch.no_grad()
def step_work(model, cfg: SamplerConfig, batch: int, iters: int = 20) -> dict:
    """ms per diffusion step of the sampler's tensor work on logits of the real shape (batch, S, V):
    the decision (token choice, commit rule) and the event payload (top candidates + host copies).
    Timed alone, synchronised, so it shows what per-step work and host syncs cost on this device."""
    from .sampler import _top
    from .sampling import decide_pass

    device, vocab, size = model.device, model.denoiser_lm.config.vocab_size, cfg.block_size
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(batch, size, vocab, device=device, generator=gen, dtype=model.dtype) * 4
    masked = torch.ones(batch, size, dtype=torch.bool, device=device)
    x = torch.full((batch, size), model.mask_token_id, device=device)

    def decide():                          # a block's first pass: nothing committed or drafted yet
        d = decide_pass(logits, x, x, None, masked, cfg.steps, cfg, gen, model.mask_token_id)
        return d.pred, d.probs, d.confidence, d.planned, d.commit

    def payload(pred, probs, conf, planned, commit):
        top_ids, top_probs = _top(probs, cfg.top_candidates)
        y = torch.where(commit, pred, x)
        return (masked.float().mean(-1).tolist(), y.tolist(), [r.nonzero().flatten().tolist() for r in commit.cpu()],
                planned.tolist(), conf.tolist(), top_ids.tolist(), top_probs.tolist(), bool((y == 0).any()))

    out = {}
    decided = decide()
    payload(*decided)                                              # warm-up
    with timed(device, out, "decide"):
        for _ in range(iters):
            decided = decide()
    with timed(device, out, "payload"):
        for _ in range(iters):
            payload(*decided)
    return {"decision_ms_per_step": round(out["decide"] / iters * 1e3, 3),
            "event_payload_ms_per_step": round(out["payload"] / iters * 1e3, 3)}


# ---- optional fast paths ----------------------------------------------------------------------
def apply_fast_paths(model, static: bool, compile_backend: str | None, compile_mode: str | None) -> None:
    """Static caches, and optionally torch.compile, for AR and diffusion alike (TwoTower.compile:
    AR step, block extend, denoiser pass); generate() then gets a static cache and transformers'
    own compile of the same backend and mode (see `hf_generation_config`)."""
    if compile_backend:
        model.compile(mode=compile_mode, backend=compile_backend)
    elif static:
        model.use_static()


# ---- the whole bench ---------------------------------------------------------------------------
def sampler_settings(args, random_weights: bool, model_defaults: dict | None = None) -> tuple[SamplerConfig, str]:
    """The SamplerConfig of the bench (those given over the model's recommended settings) and
    the schedule name (fixed: threshold 1.0)."""
    schedule = args.steps_per_block or ("fixed" if random_weights else "adaptive")
    cfg = SamplerConfig.recommended(model_defaults, block_size=args.block_size, steps=args.steps,
                                    threshold=1.0 if schedule == "fixed" else args.threshold,
                                    remasking=args.remasking, repetition_penalty=args.repetition_penalty,
                                    no_repeat_ngram_size=args.no_repeat_ngram_size,
                                    draft_nodes=args.draft_nodes, max_new_tokens=args.max_new_tokens,
                                    stop_at_eos=args.stop_at_eos, seed=args.seed)
    return cfg.validate(), schedule


def model_facts(model) -> dict:
    """model.info() plus the MoE and attention implementations transformers dispatches to."""
    info = model.info()
    cfg = model.context_lm.config
    info["experts_implementation"] = getattr(cfg, "_experts_implementation", None)
    info["context_attn_implementation"] = getattr(cfg, "_attn_implementation", None)
    return info


def timed_runs(call: dict, groups: list, warmup: int, repeats: int, device, progress: bool = True):
    """Warm every decoder up, then time each over all prompt groups `repeats` times, decoders
    interleaved; each keeps its fastest repeat. Returns ({mode: [run per group]}, {mode: peak GB})."""
    from tqdm import tqdm

    quiet = None if progress else True                    # None: a bar on a terminal only
    for _ in tqdm(range(warmup), desc="bench: warm-up", file=sys.stderr, disable=quiet):
        for run in call.values():
            run(groups[0])
    runs, peaks = {m: None for m in call}, {m: 0.0 for m in call}
    for rep in range(repeats):
        for mode, run in call.items():
            reset_peak(device)
            label = f"bench: {mode}" + (f" ({rep + 1}/{repeats})" if repeats > 1 else "")
            done = [run(g) for g in tqdm(groups, desc=label, file=sys.stderr, disable=quiet)]
            peaks[mode] = max(peaks[mode], peak_memory_gb(device)["gb"])
            if runs[mode] is None or sum(r["seconds"] for r in done) < sum(r["seconds"] for r in runs[mode]):
                runs[mode] = done
    return runs, peaks


def run_bench(model, prompts, cfg: SamplerConfig, batch: int = 1, warmup: int = 1, hf: bool = True,
              stream_repeats: int = 2, bandwidth: float | None = None, progress: bool = True,
              repeats: int = 1) -> dict:
    """Time AR, diffusion and transformers generate() on the same prompts; see the module doc."""
    device = model.device
    groups = batches(prompts, batch)
    call = {"ar": lambda p: run_ours(model, p, cfg, "ar"),
            "diffusion": lambda p: run_ours(model, p, cfg, "diffusion")}
    if hf:
        call["hf_generate"] = lambda p: run_hf(model, p, cfg)
    runs, peaks = timed_runs(call, groups, warmup, repeats, device, progress)
    result = {m: summarise(runs[m], m) | {"peak_memory_gb": peaks[m]} for m in call}
    result["ratio"] = round(result["diffusion"]["tokens_per_second"] / result["ar"]["tokens_per_second"], 3)
    if hf:
        result["ratio_vs_hf_generate"] = round(result["diffusion"]["tokens_per_second"]
                                               / result["hf_generate"]["tokens_per_second"], 3)
        result["hf_generate"]["token_agreement_with_ar"] = agreement(
            [r["token_ids"] for r in runs["ar"]], [r["token_ids"] for r in runs["hf_generate"]])
    result["breakdown"] = {"ar": breakdown(model, groups[0], cfg, "ar"),
                           "diffusion": breakdown(model, groups[0], cfg, "diffusion")}
    result["diffusion"]["denoiser_ms_per_pass"] = result["breakdown"]["diffusion"]["denoiser_ms_per_pass"]
    result["breakdown"]["diffusion"].update(step_work(model, cfg, len(groups[0])))
    if stream_repeats:
        result["streaming"] = streaming_cost(model, groups[0], cfg, stream_repeats)
    overall = peak_memory_gb(device)
    overall.pop("by_device", None)                      # (the last window's only: not comparable to gb below)
    if torch.device(device).type == "cuda":             # windows were reset per decoder: the max of all
        overall["gb"] = max([overall["gb"], *peaks.values()])
    else:
        overall["note"] = "process-wide, all phases"
    result["peak_memory"] = overall
    result["bandwidth"] = bandwidth_report(model, len(groups[0]), cfg.block_size, bandwidth,
                                           result["ar"], result["diffusion"])
    return result


def load_bench_model(args):
    """The model of `--model` / `--random-weights`, on `--device` in `--dtype` (the context tower
    on `--context-device` when given); returns (model, whether its weights are random)."""
    from . import checkpoints

    device = checkpoints.check_device(args.device or checkpoints.default_device())
    dtype = DTYPES[args.dtype] if args.dtype else checkpoints.default_dtype(device)
    spec = checkpoints.RANDOM + args.random_weights if args.random_weights else args.model
    model = checkpoints.load(spec, device=device, dtype=dtype, context_device=args.context_device, seed=args.seed,
                             pack=not args.no_pack)
    return model, bool(spec and spec.startswith(checkpoints.RANDOM))


def count(n: int) -> str:
    """135M, 31.6B, 0.05M: parameter counts for people."""
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e7 else f"{n / 1e6:.2f}M"


def table_lines(r: dict) -> list[str]:
    """Header and one row per decoder of a result dict."""
    s, m = r["settings"], r["model"]
    lines = [f"bench: {m['name']} ({m['architecture']}, {count(m['context_params'])} + "
             f"{count(m['denoiser_params'])} params) on {r['machine']['device']} {m['dtype']}"
             f"{' (oneDNN-packed linears)' if m.get('packed_linears') else ''}, "
             f"commit {r['commit']['commit']}{' (dirty)' if r['commit']['dirty'] else ''}",
             f"       {s['prompts']} prompts x {s['max_new_tokens']} new tokens, batch {s['batch']}, block "
             f"{s['block_size']}, steps {s['steps']}, {s['schedule']} (threshold {s['threshold']}), "
             f"warm-up {s['warmup']}, load {r['machine']['load_average']}",
             f"{'':22}{'tokens/s':>10}{'passes':>8}{'tok/pass':>9}{'ms/pass':>9}{'1st tok s':>10}{'peak GB':>9}"]
    for key, label, per in (("ar", "AR (ours)", "ms_per_token"), ("diffusion", "diffusion", "ms_per_nfe"),
                            ("hf_generate", "transformers generate", "ms_per_token")):
        if key in r:
            x = r[key]
            lines.append(f"{label:22}{x['tokens_per_second']:>10.1f}{x['nfe']:>8}{x['tokens_per_nfe']:>9.2f}"
                         f"{x[per]:>9.1f}{x['first_token_seconds']:>10.3f}{x['peak_memory_gb']:>9.2f}"
                         + (f"   draft trees: {x['rows_per_pass']} block rows a pass" if "rows_per_pass" in x else ""))
    ratio = f"diffusion / AR = {r['ratio']:.2f}x"
    if "ratio_vs_hf_generate" in r:
        ratio += (f"   diffusion / generate() = {r['ratio_vs_hf_generate']:.2f}x   generate() = AR tokens: "
                  f"{r['hf_generate']['token_agreement_with_ar']:.0%}")
    return lines + [ratio]


def ms_text(ms: float | None, unit: str, why_none: str) -> str:
    """A per-call time for the report: '1.2 ms/block', or 'n/a (why)' for a call the run never made."""
    return f"{ms} {unit}" if ms is not None else f"n/a ({why_none})"


def detail_lines(r: dict) -> list[str]:
    """Per-call breakdown, MoE routing, streaming, memory and bandwidth lines of a result dict."""
    lines, b = [], r["breakdown"]
    extend = ms_text(b["diffusion"]["extend_ms_per_call"], "ms/block", "the run had one block, nothing to extend")
    ar_step = ms_text(b["ar"]["extend_ms_per_call"], "ms", "the prefill gave the only token")
    lines.append(f"per call: denoiser pass {b['diffusion']['denoiser_ms_per_pass']} ms, context extend "
                 f"{extend}, context view "
                 f"{b['diffusion']['block_inputs_ms_per_block']} ms/block, diffusion sampler "
                 f"{b['diffusion']['sampler_ms_per_step']} ms/step ({b['diffusion']['sampler_fraction']:.0%}); "
                 f"AR step {ar_step}, AR sampler {b['ar']['sampler_ms_per_step']} ms/token "
                 f"({b['ar']['sampler_fraction']:.0%})")
    lines.append(f"diffusion step work alone: decision {b['diffusion']['decision_ms_per_step']} ms, event payload "
                 f"(top candidates + host copies) {b['diffusion']['event_payload_ms_per_step']} ms")
    ea, ed = b["ar"].get("experts"), b["diffusion"].get("experts")
    if ea and ed:
        lines.append(f"MoE: distinct experts per layer: AR step {ea['distinct_per_layer']} of {ea['num_experts']}, "
                     f"denoiser pass ({ed['tokens_per_pass']} tokens) {ed['distinct_per_layer']} "
                     f"(uniform routing: {ed['uniform_expectation']})")
    if "streaming" in r:
        st = r["streaming"]
        lines.append(f"streaming: app's per-event work = {st['overhead_percent']:.2f}% of a run (replayed); "
                     f"end to end: plain {st['plain_tokens_per_second']:.1f} tok/s, app consumer "
                     f"{st['app_tokens_per_second']:.1f} tok/s ({st['end_to_end_overhead_percent']:.1f}%)")
    pm = r["peak_memory"]
    lines.append(f"peak memory: {pm['gb']:.2f} GB ({pm['kind']})")
    bw = r["bandwidth"]
    if bw["gbps"]:
        lines.append(f"bandwidth bound ({bw['gbps']:.0f} GB/s): AR {bw['ar_bound_tokens_per_second']} tok/s "
                     f"({bw['ar_step_weight_gb']} GB/step), achieved {bw['ar_fraction_of_bound']}; denoiser pass "
                     f">= {bw['denoiser_bound_ms_per_pass']} ms ({bw['denoiser_pass_weight_gb']} GB), achieved "
                     f"{bw['denoiser_fraction_of_bound']}")
    else:
        lines.append(f"bandwidth bound: none (no --bandwidth); weights read per AR step {bw['ar_step_weight_gb']} GB, "
                     f"per denoiser pass {bw['denoiser_pass_weight_gb']} GB")
    return lines


def text_report(r: dict) -> str:
    """The human-readable summary of a result dict."""
    return "\n".join(table_lines(r) + detail_lines(r))


def cmd_plan(args) -> int:
    """`bench --plan`: counts and bounds of a random-weights config, on the meta device."""
    from .checkpoints import RANDOM
    source = args.random_weights or (args.model or "")[len(RANDOM):]
    if not (args.random_weights or (args.model or "").startswith(RANDOM)) or not source:
        raise ValueError("--plan needs --random-weights CONFIG or --model random:NAME")
    config = read_config(config_path(source))
    block_size = args.block_size or SamplerConfig().block_size
    print(json.dumps(plan(config, args.batch, block_size, args.bandwidth), indent=2))
    return 0


BENCH_OPTIONS = {   # option -> (is the value possible?, what it must be): cli.check_options
    "batch": POSITIVE, "prompts": POSITIVE, "prompt_length": POSITIVE, "max_new_tokens": POSITIVE,
    "repeats": POSITIVE, "threads": POSITIVE,
    "warmup": (lambda v: v >= 0, ">= 0"),
    "stream_repeats": (lambda v: v >= 0, ">= 0 (0 = skip)"),
    "bandwidth": (lambda v: 0 < v < math.inf, "a positive number of GB/s"),
}


def cmd_bench(args) -> int:
    """`python -m twotower bench`: load, time, print the table or one JSON object."""
    from .checkpoints import RANDOM, settings_before_loading
    check_options(args, BENCH_OPTIONS)
    spec = RANDOM + args.random_weights if args.random_weights else args.model
    defaults = settings_before_loading(spec)
    if defaults is not None:                                   # as the run will use them (else after loading)
        sampler_settings(args, bool(spec and spec.startswith(RANDOM)), defaults)
    if args.plan:
        return cmd_plan(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, random_weights = load_bench_model(args)
    cfg, schedule = sampler_settings(args, random_weights, model.sampler_defaults)
    apply_fast_paths(model, args.static, args.compile_backend if args.compile else None, args.compile_mode)
    prompts = bench_prompts(model, args.prompts, args.prompt_length, args.seed)
    at_start = machine(model.device)
    bandwidth = args.bandwidth if args.bandwidth is not None else default_bandwidth(model.device)
    timings = run_bench(model, prompts, cfg, args.batch, args.warmup, hf=not args.no_hf,
                        stream_repeats=args.stream_repeats, bandwidth=bandwidth, repeats=args.repeats)
    settings = {"prompts": len(prompts), "batch": args.batch, "max_new_tokens": cfg.max_new_tokens,
                "block_size": cfg.block_size, "steps": cfg.steps, "threshold": cfg.threshold,
                "remasking": cfg.remasking, "repetition_penalty": cfg.repetition_penalty,
                "no_repeat_ngram_size": cfg.no_repeat_ngram_size, "draft_nodes": cfg.draft_nodes,
                "schedule": schedule, "warmup": args.warmup,
                "repeats": args.repeats,
                "stop_at_eos": cfg.stop_at_eos, "seed": cfg.seed,
                "static_cache": model.static_cache,
                "compile": ({"backend": args.compile_backend, "mode": args.compile_mode} if args.compile else None),
                "random_weights": random_weights}
    result = {"machine": at_start | {"load_average_end": [round(x, 2) for x in os.getloadavg()]},
              "commit": git_commit(), "command": "python -m twotower " + " ".join(sys.argv[1:]),
              "model": model_facts(model), "settings": settings, **timings}
    print(json.dumps(result, indent=2) if args.json else text_report(result))
    return 0


def add_parser(sub) -> None:
    d = SamplerConfig()
    p = sub.add_parser("bench", help="time AR vs diffusion (and transformers generate) on the same prompts")
    p.add_argument("--model", default=None, help="model spec, or random:NAME (bench/configs/NAME.json)")
    p.add_argument("--random-weights", default=None, metavar="CONFIG",
                   help="build both towers with random weights from this config (JSON file or bench/configs name)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--context-device", default=None, help="put the context tower on another device (two GPUs)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--batch", type=int, default=1, help="rows decoded together")
    p.add_argument("--prompts", type=int, default=4, help="number of prompts (run in batches of --batch)")
    p.add_argument("--prompt-length", type=int, default=32, help="tokens per random prompt (models without a tokenizer)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--block-size", type=int, default=None, help=tuned(d.block_size))
    p.add_argument("--steps", type=int, default=None, help=f"denoiser steps per block (T) {tuned(d.steps)}")
    p.add_argument("--steps-per-block", choices=("fixed", "adaptive"), default=None,
                   help="fixed: exactly T passes per block (threshold 1.0); adaptive: confidence threshold "
                        "(default: fixed for random weights, adaptive otherwise)")
    p.add_argument("--threshold", type=float, default=None, help=f"gamma of the adaptive schedule {tuned(d.threshold)}")
    p.add_argument("--remasking", choices=REMASKING, default=None, help=f"commit order {tuned(d.remasking)}")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help=f"> 1 lowers the scores of tokens already written, in every decoder "
                        f"{tuned(d.repetition_penalty)}")
    p.add_argument("--no-repeat-ngram-size", type=int, default=None, metavar="N",
                   help=f"do not write an N-gram already written, in every decoder {tuned(d.no_repeat_ngram_size)}")
    p.add_argument("--draft-nodes", type=int, default=None, metavar="N",
                   help=f"verify order: a draft tree of the N likeliest paths of drafts, checked in one "
                        f"pass over a block row per node (0 = off) {tuned(d.draft_nodes)}")
    p.add_argument("--stop-at-eos", action="store_true", help="end rows at end-of-text (default: fixed length)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each decoder first")
    p.add_argument("--repeats", type=int, default=1, help="timed passes over the prompts; each decoder keeps its fastest")
    p.add_argument("--no-hf", action="store_true", help="skip transformers generate()")
    p.add_argument("--stream-repeats", type=int, default=2, help="runs per variant of the streaming check (0 = skip)")
    p.add_argument("--bandwidth", type=float, default=None, metavar="GBPS",
                   help="memory bandwidth for the bound (default: 3350 on H100, 4800 on H200, none on CPU)")
    p.add_argument("--static", action="store_true",
                   help="static caches: fixed shapes per run for AR, diffusion and generate() alike")
    p.add_argument("--compile", action="store_true",
                   help="static caches + torch.compile of the AR step, block extend and denoiser pass "
                        "(and of generate()'s forward)")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--compile-mode", default=None, help="e.g. reduce-overhead (CUDA graphs)")
    p.add_argument("--plan", action="store_true",
                   help="with random weights: print params, weight bytes per pass and bounds (meta device, no run)")
    p.add_argument("--no-pack", action="store_true",
                   help="CPU float32: PyTorch's own linear layers (MKL) instead of oneDNN-packed ones")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU; default: torch's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench)
