"""`python -m twotower bench` on tiny random models (CPU): it runs, its JSON has the documented
keys and sane values, the fixed schedule gives exactly S/T tokens per pass, and the random-weights
path builds a Nemotron-H from a config on the meta device and materialises it in place."""
from __future__ import annotations

import json

import pytest
import torch

from twotower import bandwidth, bench, random_weights
from twotower.cli import main

TINY_NEMOTRON_H = {   # the pattern and sizes of tests/test_nemotron_h.py's tiny model
    "model_type": "nemotron_h", "vocab_size": 96, "hidden_size": 32, "hybrid_override_pattern": "M*EM-",
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 48,
    "mamba_num_heads": 4, "mamba_head_dim": 16, "ssm_state_size": 8, "n_groups": 2, "conv_kernel": 4,
    "chunk_size": 8, "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
    "moe_shared_expert_intermediate_size": 24, "eos_token_id": 2, "bos_token_id": 1, "pad_token_id": 0,
    "max_position_embeddings": 256, "tie_word_embeddings": False}
TOP_KEYS = {"machine", "commit", "command", "model", "settings", "ar", "diffusion", "hf_generate", "ratio",
            "ratio_vs_hf_generate", "breakdown", "streaming", "peak_memory", "bandwidth"}
SMALL = ["--device", "cpu", "--prompts", "2", "--max-new-tokens", "8", "--block-size", "4", "--steps", "2",
         "--warmup", "1", "--stream-repeats", "1"]


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench_cfg") / "tiny_nemotron_h.json"
    path.write_text(json.dumps(TINY_NEMOTRON_H))
    return path


def bench_json(capsys, *argv) -> dict:
    rc = main(["bench", *argv, "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out)


def test_fixed_schedule_json_keys_and_values(capsys, ar_dir):
    r = bench_json(capsys, "--model", str(ar_dir), "--steps-per-block", "fixed", *SMALL)
    assert TOP_KEYS <= set(r)
    s = r["settings"]
    assert s["schedule"] == "fixed" and s["threshold"] == 1.0 and s["prompts"] == 2 and s["batch"] == 1
    d, ar, hf = r["diffusion"], r["ar"], r["hf_generate"]
    # 2 prompts x 8 tokens, block 4 / steps 2: exactly 2 tokens per pass, 2 blocks x 2 passes per prompt
    assert d["tokens"] == ar["tokens"] == hf["tokens"] == 16
    assert d["nfe"] == 8 and d["tokens_per_nfe"] == 2.0
    assert ar["nfe"] == 16 and ar["tokens_per_nfe"] == 1.0 and hf["tokens_per_nfe"] == 1.0
    for x in (d, ar, hf):
        assert x["tokens_per_second"] > 0 and x["seconds"] > 0 and 0 < x["first_token_seconds"] <= x["seconds"]
        assert x["peak_memory_gb"] > 0
    assert d["ms_per_nfe"] > 0 and d["denoiser_ms_per_pass"] > 0 and ar["ms_per_token"] > 0
    assert ar["decode_tokens_per_second"] > 0 and d["context_passes"] == 4    # prefill + 1 extend, per prompt
    assert r["ratio"] == pytest.approx(d["tokens_per_second"] / ar["tokens_per_second"], rel=1e-2)
    assert hf["token_agreement_with_ar"] == 1.0        # same greedy decode of the same tower, fp32
    b = r["breakdown"]
    assert b["diffusion"]["denoiser_ms_per_pass"] > 0 and b["diffusion"]["extend_calls"] == 1
    assert b["ar"]["extend_calls"] == 7 and b["diffusion"]["decision_ms_per_step"] > 0
    assert 0 <= b["diffusion"]["sampler_fraction"] < 1 and b["ar"]["experts"] is None   # no MoE in Llama
    st = r["streaming"]
    assert st["overhead_percent"] >= 0 and st["bytes_per_run"] > 0 and st["plain_tokens_per_second"] > 0
    assert r["peak_memory"]["kind"] == "process_peak_rss" and r["peak_memory"]["gb"] > 0
    assert r["bandwidth"]["gbps"] is None and r["bandwidth"]["ar_bound_tokens_per_second"] is None
    assert r["machine"]["device"] == "cpu" and r["machine"]["cpu_cores"] >= 1
    assert "commit" in r["commit"] and r["command"].startswith("python -m twotower")
    assert r["model"]["architecture"] == "llama"


def test_adaptive_schedule_and_text_report(capsys, ar_dir):
    rc = main(["bench", "--model", str(ar_dir), *SMALL, "--no-hf", "--stream-repeats", "0", "--batch", "2"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "adaptive (threshold 0.9)" in out and "diffusion / AR =" in out and "AR (ours)" in out
    assert "transformers generate" not in out and "streaming" not in out and "peak memory:" in out


@pytest.mark.parametrize("guard", [["--repetition-penalty", "3"], ["--no-repeat-ngram-size", "2"]])
def test_generate_gets_the_same_repeat_guards(capsys, ar_dir, guard):
    r = bench_json(capsys, "--model", str(ar_dir), *SMALL, "--stream-repeats", "0", *guard)
    assert (r["settings"]["repetition_penalty"], r["settings"]["no_repeat_ngram_size"]) in ((3.0, 0), (1.0, 2))
    assert r["hf_generate"]["token_agreement_with_ar"] == 1.0       # its logits processor is our guard


def test_bench_settings_start_from_the_models_recommended_ones():
    from argparse import Namespace
    args = Namespace(steps_per_block=None, block_size=None, steps=None, threshold=None, remasking=None,
                     repetition_penalty=None, no_repeat_ngram_size=None, draft_nodes=None, max_new_tokens=64, stop_at_eos=False, seed=0)
    cfg, schedule = bench.sampler_settings(args, False, {"remasking": "leftmost", "threshold": 0.8,
                                                         "repetition_penalty": 1.2})
    assert (schedule, cfg.remasking, cfg.threshold, cfg.block_size) == ("adaptive", "leftmost", 0.8, 16)
    assert cfg.repetition_penalty == 1.2
    cfg, schedule = bench.sampler_settings(args, True, {"remasking": "leftmost", "threshold": 0.8})
    assert (schedule, cfg.threshold) == ("fixed", 1.0)              # fixed T passes, whatever the model says
    args.remasking = "confidence"
    assert bench.sampler_settings(args, False, {"remasking": "leftmost"})[0].remasking == "confidence"


def test_random_weights_tiny_nemotron_h(capsys, tiny_config):
    r = bench_json(capsys, "--random-weights", str(tiny_config), "--bandwidth", "100", "--context-device", "cpu",
                   *SMALL)
    assert r["settings"]["schedule"] == "fixed" and r["settings"]["random_weights"] is True
    assert r["model"]["architecture"] == "nemotron_h" and r["model"]["name"] == "random:tiny_nemotron_h"
    assert r["model"]["context_device"] == r["model"]["denoiser_device"] == "cpu"
    assert r["model"]["experts_implementation"] == "grouped_mm"       # not the Python loop over experts
    assert r["diffusion"]["tokens_per_nfe"] == 2.0 and r["diffusion"]["nfe"] == 8
    ea, ed = r["breakdown"]["ar"]["experts"], r["breakdown"]["diffusion"]["experts"]
    assert ea["tokens_per_pass"] == 1 and ea["distinct_per_layer"] == 2 == ea["top_k"] and ea["num_experts"] == 4
    assert ed["tokens_per_pass"] == 4 and 2 <= ed["distinct_per_layer"] <= 4
    bw = r["bandwidth"]
    assert bw["gbps"] == 100 and bw["ar_bound_tokens_per_second"] > 0 and 0 < bw["ar_fraction_of_bound"]
    assert bw["denoiser_bound_ms_per_pass"] > 0 and bw["denoiser_pass_weight_bytes"] > bw["ar_step_weight_bytes"]


def test_random_spec_names_and_errors(capsys, tmp_path):
    assert random_weights.config_path("nemotron-h-small") == random_weights.CONFIG_DIR / "nemotron_h_small.json"
    assert random_weights.config_path("nemotron_h_release").is_file()
    for argv, message in ((["--model", "random:no-such-config"], "no config named 'no-such-config'"),
                          (["--random-weights", str(tmp_path / "x.json")], "config not found"),
                          (["--batch", "0", "--random-weights", "nemotron_h_small"], "--batch")):
        rc = main(["bench", "--device", "cpu", *argv])
        _, err = capsys.readouterr()
        assert rc == 2 and message in err


def test_materialise_bfloat16_in_place(tiny_config):
    model = random_weights.random_model(str(tiny_config), "cpu", torch.bfloat16, seed=3)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert not any(t.is_meta for t in tensors.values())
    for name, t in tensors.items():
        if t.is_floating_point():
            assert t.dtype == (torch.float32 if "e_score_correction_bias" in name else torch.bfloat16), name
    mixer = model.context_lm.model.layers[0].mixer                     # Mamba init as the backbone's
    assert torch.equal(mixer.A_log.float(), torch.log(torch.arange(1, 5).float()).to(torch.bfloat16).float())
    ctx, logits = model.prefill([[5, 6, 7, 8]])
    assert torch.isfinite(logits.float()).all()
    inputs = model.block_inputs(ctx, 4)
    out = model.denoise(torch.full((1, 4), 3), inputs)
    assert out.shape == (1, 4, 96) and torch.isfinite(out.float()).all()
    again = random_weights.random_model(str(tiny_config), "cpu", torch.bfloat16, seed=3)   # seeded: reproducible
    assert torch.equal(again.denoiser_lm.lm_head.weight, model.denoiser_lm.lm_head.weight)


def test_random_llama_keeps_rotary_frequencies(tmp_path):
    """A RoPE backbone from random weights gets real rotary frequencies (fp32), not zeros."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    path = tmp_path / "tiny_llama.json"
    path.write_text(json.dumps({"model_type": "llama", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 64,
                                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}))
    model = random_weights.random_model(str(path), "cpu", torch.bfloat16)
    rotary = model.context_lm.model.rotary_emb
    expected = LlamaRotaryEmbedding(LlamaConfig(**json.loads(path.read_text()))).inv_freq
    assert rotary.inv_freq.dtype == torch.float32 and torch.equal(rotary.inv_freq, expected)
    assert model.context_lm.lm_head.weight.dtype == torch.bfloat16
    ctx, logits = model.prefill([[5, 6, 7]])
    assert torch.isfinite(logits.float()).all()


def test_weight_bytes_counts_active_experts(tiny_config):
    model = random_weights.meta_twotower(random_weights.read_config(tiny_config))
    lm = model.context_lm
    experts = sum(p.numel() * 4 for n, p in lm.named_parameters() if ".experts." in n)
    emb = lm.get_input_embeddings().weight
    one = bandwidth.weight_bytes(lm, 1)
    assert one["routed_expert_bytes"] == pytest.approx(experts * 2 / 4)            # top-2 of 4 experts
    dense = sum(p.numel() * 4 for p in lm.parameters()) - experts - emb.numel() * 4
    assert one["bytes"] == pytest.approx(dense + experts / 2 + emb.shape[1] * 4)    # one embedding row
    many = bandwidth.weight_bytes(lm, 10_000)
    assert many["routed_expert_bytes"] == pytest.approx(experts)                   # every expert hit
    assert bandwidth.expected_experts(128, 6, 1) == pytest.approx(6)
    assert 6 < bandwidth.expected_experts(128, 6, 16) < 96


def test_release_config_plan_matches_design():
    """The release's backbone: 52 layers (23 Mamba-2, 23 MoE, 6 attention), ~31.6B params per
    tower, ~3.6B active per token (DESIGN.md) of which the 0.35B input embedding is only read
    one row at a time; built on the meta device, no memory used."""
    config = random_weights.read_config(random_weights.config_path("nemotron_h_release"))
    kinds = list(config.layers_block_type)
    assert len(kinds) == 52 and kinds.count("moe") == 23 and kinds.count("full_attention") == 6
    plan = bandwidth.plan(config, batch=1, block=16, bandwidth=4800)
    assert plan["context_params"] == pytest.approx(31.6e9, rel=0.01)
    assert plan["ar_step_weight_gb"] == pytest.approx(2 * (3.58 - 0.35), rel=0.01)   # bf16, embedding excluded
    assert plan["both_towers_gb"] == pytest.approx(126, rel=0.01)
    assert plan["denoiser_pass_weight_gb"] > 5 * plan["ar_step_weight_gb"]  # 16 tokens hit ~69 of 128 experts
    assert plan["ar_bound_tokens_per_second"] == pytest.approx(4800 / plan["ar_step_weight_gb"], rel=1e-3)


def test_grouped_experts_match_the_expert_loop(tiny_config):
    """transformers' default MoE path (grouped_mm) equals its per-expert Python loop ('eager')."""
    torch.manual_seed(0)
    model = random_weights.random_model(str(tiny_config), "cpu", torch.float32, seed=1)
    moe = next(l.mixer for l in model.context_lm.model.layers if l.block_type == "moe")
    with torch.no_grad():
        moe.experts.up_proj.normal_(0, 0.3)
        moe.experts.down_proj.normal_(0, 0.3)
        moe.gate.weight.normal_(0, 1.0)
    x = torch.randn(3, 7, 32)
    config = moe.experts.config
    assert config._experts_implementation == "grouped_mm"
    grouped = moe(x)
    config._experts_implementation = "eager"
    try:
        loop = moe(x)
    finally:
        config._experts_implementation = "grouped_mm"
    assert grouped.abs().max() > 0.1
    torch.testing.assert_close(grouped, loop, rtol=1e-5, atol=1e-5)


def test_compile_flag_runs(capsys, ar_dir):
    """--compile puts all three decoders on static caches and compiles them (ours through
    TwoTower.compile, generate() through its CompileConfig); the eager backend checks the
    plumbing quickly (inductor itself is tested in test_static.py)."""
    r = bench_json(capsys, "--model", str(ar_dir), "--device", "cpu", "--prompts", "1", "--max-new-tokens", "4",
                   "--block-size", "4", "--steps", "2", "--warmup", "0", "--stream-repeats", "0",
                   "--compile", "--compile-backend", "eager")
    assert r["settings"]["compile"] == {"backend": "eager", "mode": None} and r["settings"]["static_cache"]
    assert r["diffusion"]["tokens"] == 4 and r["ar"]["tokens"] == 4
    assert r["hf_generate"]["token_agreement_with_ar"] == 1.0


def test_lookahead_script_scores_every_position_of_the_first_block(ar_dir_tok):
    """bench/lookahead.py on a tiny model: one next-token prediction per answer position, the
    lookahead ones where the block has room, every figure a share."""
    import importlib.util

    from tests.conftest import ROOT
    spec = importlib.util.spec_from_file_location("lookahead", ROOT / "bench" / "lookahead.py")
    lookahead = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lookahead)
    res = lookahead.measure(str(ar_dir_tok), 2, "cpu")
    assert res["positions"] == 2 * lookahead.BLOCK
    shares = [*res["agree"].values(), *res["confidence"].values(), res["next_token_block_cut"], res["next_token_t_small"]]
    assert len(shares) == 8 and all(0.0 <= v <= 1.0 for v in shares)


def test_a_draft_tree_run_reports_its_rows_per_pass():
    """bench's diffusion figures say what a tree pass cost in block rows (absent without a tree)."""
    from tests.test_llama_family import clean_as_ar_model
    from twotower.bench import run_ours, summarise
    from twotower.sampling import SamplerConfig
    model, prompts = clean_as_ar_model(), [[5, 17, 42, 9], [7, 8, 9]]
    c = dict(max_new_tokens=16, block_size=8, steps=8, stop_at_eos=False, remasking="verify", threshold=0.0)
    tree = summarise([run_ours(model, prompts, SamplerConfig(draft_nodes=3, **c), "diffusion")], "diffusion")
    plain = summarise([run_ours(model, prompts, SamplerConfig(**c), "diffusion")], "diffusion")
    assert 1 < tree["rows_per_pass"] <= 4 and "rows_per_pass" not in plain


def test_part_sizes_count_a_shared_backbone_once():
    """memory.part_sizes: a denoiser copy weighs a backbone more; a shared one only what it adds."""
    from twotower.checkpoints import build
    from twotower.memory import part_sizes, tensor_bytes
    from tests.tiny import MASK_ID, tiny_llama
    lm = tiny_llama()
    backbone = tensor_bytes([lm])[0]
    copied, shared = (part_sizes(build(tiny_llama(), None, MASK_ID, True, "t", share_base=s)) for s in (False, True))
    assert copied["context_weight_bytes"] == shared["context_weight_bytes"] == backbone
    assert copied["denoiser_weight_bytes"] - shared["denoiser_weight_bytes"] == backbone
    assert shared["denoiser_weight_bytes"] > 0                     # time conditioning and mask vector


@pytest.mark.parametrize("argv, message", [
    (["--threads", "-2"], "--threads must be a positive integer, got -2"),
    (["--threads", "0"], "--threads must be a positive integer, got 0"),
    (["--bandwidth", "-5"], "--bandwidth must be a positive number of GB/s, got -5.0"),
    (["--bandwidth", "nan"], "--bandwidth must be a positive number of GB/s, got nan"),
    (["--repeats", "0"], "--repeats must be a positive integer, got 0"),
    (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
    (["--prompts", "0"], "--prompts must be a positive integer, got 0"),
    (["--batch", "0"], "--batch must be a positive integer, got 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be a positive integer, got 0"),
    (["--stream-repeats", "-1"], r"--stream-repeats must be >= 0 \(0 = skip\), got -1"),
    (["--prompt-length", "0"], "--prompt-length must be a positive integer, got 0"),
    (["--block-size", "0"], "block_size must be a positive integer, got 0"),
    (["--threshold", "2"], r"threshold must lie in \[0, 1\], got 2.0"),
    (["--plan", "--random-weights", "nemotron_h_small", "--bandwidth", "0"], "--bandwidth must be a positive"),
])
def test_bench_refuses_impossible_options_before_loading(monkeypatch, argv, message):
    from twotower.cli import build_parser

    def load(args):
        raise AssertionError("the model was loaded before the options were checked")
    monkeypatch.setattr(bench, "load_bench_model", load)
    args = build_parser(["bench", *argv]).parse_args(["bench", "--device", "cpu", *argv])
    with pytest.raises(ValueError, match=message):
        args.func(args)


def test_text_report_says_why_a_call_has_no_time():
    """A run of one block never extends the context (extend time None): 'n/a', not 'None ms'."""
    diffusion = {"denoiser_ms_per_pass": 1.5, "extend_ms_per_call": None, "block_inputs_ms_per_block": 0.1,
                 "sampler_ms_per_step": 0.2, "sampler_fraction": 0.1, "decision_ms_per_step": 0.1,
                 "event_payload_ms_per_step": 0.05}
    ar = {"extend_ms_per_call": None, "sampler_ms_per_step": 0.1, "sampler_fraction": 0.2}
    r = {"breakdown": {"diffusion": diffusion, "ar": ar}, "peak_memory": {"gb": 0.5, "kind": "process_peak_rss"},
         "bandwidth": {"gbps": None, "ar_step_weight_gb": 0.1, "denoiser_pass_weight_gb": 0.2}}
    line = bench.detail_lines(r)[0]
    assert "None" not in line
    assert "context extend n/a (the run had one block, nothing to extend)" in line
    assert "AR step n/a (the prefill gave the only token)" in line
    diffusion["extend_ms_per_call"] = 2.5
    assert "context extend 2.5 ms/block" in bench.detail_lines(r)[0]
