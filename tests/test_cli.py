"""`python -m twotower generate|info`: output, traces, and exit code 2 with 'error: ...' on bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, needs_cxx
from twotower.cli import main
from twotower.trace import Trace

SMALL = ["--max-new-tokens", "10", "--block-size", "4", "--steps", "4", "--no-stop", "--device", "cpu"]


def cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("mode,nfe", [("diffusion", None), ("ar", 10)])
def test_generate_prompt_ids_prints_ids_summary_and_trace(capsys, tmp_path, ar_dir, mode, nfe):
    trace_path = tmp_path / "t.json"
    rc, out, err = cli(capsys, "generate", "--model", str(ar_dir), "--prompt-ids", "5,17,42", "--mode", mode,
                       "--trace", str(trace_path), *SMALL)
    assert rc == 0, err
    ids = [int(x) for x in out.split()]
    assert len(ids) == 10 and all(0 <= i < 96 for i in ids)
    assert f"[{mode}] tokens=10 nfe=" in err and "tokens/nfe=" in err and "tokens/s=" in err
    assert f"trace written to {trace_path}" in err
    trace = Trace.load(trace_path)
    assert trace.mode == mode and trace.prompt_ids == [[5, 17, 42]] and trace.prompts == ["5,17,42"]
    assert trace.done.token_ids == [ids] and trace.settings["block_size"] == 4
    if nfe is not None:
        assert trace.stats()["nfe"] == nfe and f"nfe={nfe} " in err
    else:
        assert trace.stats()["nfe"] == len(trace.steps()) >= 3


def test_generate_starts_from_the_checkpoints_recommended_settings(capsys, tmp_path, ar_dir):
    from twotower.checkpoints import build, load_ar, save
    ctx, tok = load_ar(ar_dir, "cpu", torch.float32)
    model = build(ctx, tok, 3, learned_mask=True, name="rec")
    model.sampler_defaults = {"remasking": "leftmost", "threshold": 0.7}
    ck = save(model, tmp_path / "ck", context=str(ar_dir))
    runs = {"recommended": [], "given": ["--remasking", "margin", "--threshold", "0.9"]}
    for name, extra in runs.items():
        rc, _, err = cli(capsys, "generate", "--model", str(ck), "--prompt-ids", "5,17,42",
                         "--trace", str(tmp_path / f"{name}.json"), *SMALL, *extra)
        assert rc == 0, err
    recommended, given = (Trace.load(tmp_path / f"{name}.json").settings for name in runs)
    assert (recommended["remasking"], recommended["threshold"]) == ("leftmost", 0.7)
    assert (given["remasking"], given["threshold"]) == ("margin", 0.9)
    assert recommended["steps"] == given["steps"] == 4          # given on both command lines


def test_the_early_settings_check_reads_the_checkpoints_recommended_order(capsys, tmp_path, ar_dir):
    """--draft-nodes needs the verify order; a checkpoint that recommends it passes the check
    made before loading (this model then fails later, for a reason of its own)."""
    from twotower.checkpoints import build, load_ar, save
    ctx, tok = load_ar(ar_dir, "cpu", torch.float32)
    model = build(ctx, tok, 3, learned_mask=True, name="rec")
    model.sampler_defaults = {"remasking": "verify", "threshold": 0.2}
    ck = save(model, tmp_path / "ck", context=str(ar_dir))
    rc, _, err = cli(capsys, "generate", "--model", str(ck), "--prompt-ids", "5,17,42", "--draft-nodes", "2", *SMALL)
    assert rc == 2 and "needs a clean_as_ar denoiser" in err
    rc, _, err = cli(capsys, "generate", "--model", str(ar_dir), "--prompt-ids", "5,17,42", "--draft-nodes", "2", *SMALL)
    assert rc == 2 and "verify order only" in err


def test_generate_is_deterministic(capsys, ar_dir):
    args = ["generate", "--model", str(ar_dir), "--prompt-ids", "9,8,7", "--temperature", "1.0",
            "--seed", "4", *SMALL]
    first = cli(capsys, *args)[1]
    assert cli(capsys, *args)[1] == first


def test_generate_with_an_unknown_compile_mode_exits_2(capsys, ar_dir):
    rc, out, err = cli(capsys, "generate", "--model", str(ar_dir), "--prompt-ids", "9,8,7", *SMALL,
                       "--compile", "--compile-mode", "fastest")
    assert rc == 2 and "cannot compile" in err and "Unrecognized mode=fastest" in err


@needs_cxx
def test_generate_compiled_prints_the_eager_text(capsys, ar_dir):
    args = ["generate", "--model", str(ar_dir), "--prompt-ids", "9,8,7", *SMALL]
    eager = cli(capsys, *args)[1]
    rc, out, err = cli(capsys, *args, "--compile")
    assert rc == 0, err
    assert out == eager


def test_generate_text_prompt_with_a_tokenizer(capsys, ar_dir_tok):
    rc, out, err = cli(capsys, "generate", "Hello world", "--model", str(ar_dir_tok), *SMALL)
    assert rc == 0, err
    assert out.endswith("\n") and out.strip() and "[diffusion] tokens=10 " in err


def test_generate_prompts_file_prints_json_lines(capsys, tmp_path, ar_dir_tok):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is the capital of France?\n\nHello world\n")
    rc, out, err = cli(capsys, "generate", "--prompts", str(prompts), "--model", str(ar_dir_tok), "--mode", "ar", *SMALL)
    assert rc == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in rows] == ["What is the capital of France?", "Hello world"]
    for r in rows:
        assert r["tokens"] == 10 and r["nfe"] == 10 and isinstance(r["text"], str) and r["seconds"] >= 0


def test_info(capsys, ar_dir):
    rc, out, err = cli(capsys, "info", str(ar_dir), "--json", "--device", "cpu")
    assert rc == 0, err
    info = json.loads(out)
    assert info["architecture"] == "llama" and info["layers"] == 2 and info["vocab"] == 96
    assert info["max_context"] == 256 and info["dtype"] == "float32" and info["name"] == ar_dir.name
    assert info["static_cache"] is False and info["compiled"] is False
    assert info["context_weight_bytes"] >= info["context_params"] * 4              # float32 (+ buffers)
    assert info["denoiser_weight_bytes"] >= info["context_weight_bytes"]          # its own backbone copy, and more
    assert info["peak_memory_kind"] == "process_peak_rss" and info["peak_memory_gb"] > 0
    rc, out, _ = cli(capsys, "info", str(ar_dir), "--device", "cpu")
    assert rc == 0 and "architecture" in out and "llama" in out and "context_params" in out


def test_info_of_random_weights_says_where_each_part_lives(capsys):
    """random:NAME specs load anywhere a spec is read; a context device needs random weights or a
    release directory."""
    rc, out, err = cli(capsys, "info", "random:nemotron-h-small", "--json", "--device", "cpu", "--context-device", "cpu")
    assert rc == 0, err
    info = json.loads(out)
    assert info["architecture"] == "nemotron_h" and info["context_device"] == info["denoiser_device"] == "cpu"
    assert info["context_weight_bytes"] > 0 and info["denoiser_weight_bytes"] >= info["context_weight_bytes"]
    rc, _, err = cli(capsys, "info", "default", "--device", "cpu", "--context-device", "cpu")
    assert rc != 0 and "random weights or a release directory only" in err
    rc, _, err = cli(capsys, "info", "random:no-such-config", "--device", "cpu")
    assert rc != 0 and "no config named 'no-such-config'" in err


@pytest.mark.parametrize("args,message", [
    (["--threshold", "1.5"], "error: threshold must lie in [0, 1], got 1.5"),
    (["--threshold", "-0.2"], "error: threshold must lie in [0, 1]"),
    (["--block-size", "0"], "error: block_size must be a positive integer, got 0"),
    (["--block-size", "300"], "error: block_size 300 is larger than the model's context (256)"),
    (["--temperature", "-1"], "error: temperature must be >= 0, got -1.0"),
    (["--steps", "0"], "error: steps must be a positive integer"),
    (["--max-new-tokens", "0"], "error: max_new_tokens must be a positive integer"),
    (["--max-new-tokens", "500"], "error: prompt (3 tokens) + max_new_tokens (500) exceeds the model's context"),
    (["--top-p", "0"], "error: top_p must lie in (0, 1]"),
    (["--mask-token-id", "999"], "error: --mask-token-id 999 is outside the vocabulary (0..95)"),
])
def test_bad_sampler_arguments_exit_2(capsys, ar_dir, args, message):
    rc, out, err = cli(capsys, "generate", "--model", str(ar_dir), "--prompt-ids", "5,17,42", "--device", "cpu", *args)
    assert rc == 2 and message in err and out == ""


@pytest.mark.parametrize("args,message", [
    ([], "error: give exactly one of PROMPT, --prompt-ids or --prompts FILE"),
    (["hello", "--prompt-ids", "1,2"], "error: give exactly one of PROMPT, --prompt-ids or --prompts FILE"),
    (["--prompt-ids", "5,x"], "error: prompt ids must be comma-separated non-negative integers, got '5,x'"),
    (["--prompt-ids", "-3"], "error: prompt ids must be comma-separated non-negative integers, got '-3'"),
    (["   "], "error: the prompt is empty"),
    (["--prompt-ids", "5", "--trace", "/nonexistent/dir/t.json"], "error: --trace /nonexistent/dir/t.json: its folder"),
    (["--prompt-ids", "5", "--no-repeat-ngram-size", "100000"], "error: no_repeat_ngram_size must be 0 (off) or an"),
    (["--prompt-ids", "5", "--seed", str(2 ** 70)], "error: seed must be an integer from 0 to 2**63 - 1"),
    (["--prompt-ids", "5", "--compile-mode", "reduce-overhead"], "error: --compile-mode needs --compile"),
    (["--prompt-ids", ","], "error: the prompt is empty"),
    (["--prompt-ids", "5,96"], "error: prompt token id 96 is outside the vocabulary (0..95)"),
    (["hello"], "error: this model ships no tokenizer: give the prompt as token ids"),
    (["--prompts", "/nonexistent/prompts.txt"], "error:"),
])
def test_bad_prompts_exit_2(capsys, ar_dir, args, message):
    rc, out, err = cli(capsys, "generate", "--model", str(ar_dir), "--device", "cpu", *args)
    assert rc == 2 and message in err


def test_empty_prompts_file_and_long_prompt(capsys, tmp_path, ar_dir, ar_dir_tok):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    rc, _, err = cli(capsys, "generate", "--prompts", str(empty), "--model", str(ar_dir_tok), "--device", "cpu")
    assert rc == 2 and "holds no prompt lines" in err
    ids = ",".join(["5"] * 300)
    rc, _, err = cli(capsys, "generate", "--prompt-ids", ids, "--model", str(ar_dir), "--device", "cpu")
    assert rc == 2 and "error: prompt (300 tokens) + max_new_tokens (128) exceeds the model's context of 256" in err


def test_prompts_file_lines_are_all_checked_before_any_runs(capsys, tmp_path, ar_dir_tok):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello world\n" + "word " * 400 + "\n")
    rc, out, err = cli(capsys, "generate", "--prompts", str(prompts), "--model", str(ar_dir_tok), *SMALL)
    assert rc == 2 and f"error: {prompts} line 2: prompt" in err and out == ""        # line 1 did not run
    prompts.write_bytes(b"\xff\xfe bad")
    rc, _, err = cli(capsys, "generate", "--prompts", str(prompts), "--model", str(ar_dir_tok), *SMALL)
    assert rc == 2 and f"error: {prompts} is not UTF-8 text" in err


def test_ctrl_c_stops_with_one_line_and_exit_130(capsys, ar_dir, monkeypatch):
    from twotower import runner
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(runner, "run", interrupted)
    rc, out, err = cli(capsys, "generate", "--model", str(ar_dir), "--prompt-ids", "5,17", *SMALL)
    assert rc == 130 and err.strip().endswith("interrupted") and "Traceback" not in err


@pytest.mark.parametrize("spec,message", [
    ("no-such-model", "error: unknown model spec 'no-such-model'"),
    ("/nonexistent/dir/x", "error: unknown model spec"),
])
def test_bad_model_exit_2(capsys, spec, message):
    rc, _, err = cli(capsys, "generate", "--model", spec, "--prompt-ids", "1,2", "--device", "cpu")
    assert rc == 2 and message in err
    rc, _, err = cli(capsys, "info", spec, "--device", "cpu")
    assert rc == 2 and message in err


@pytest.mark.parametrize("args,message", [
    (["--device", "tpu", "--prompt-ids", "1,2"], "error: unknown device 'tpu'"),
    (["--device", "mps", "--prompt-ids", "1,2"], "error: device 'mps' is not supported: expected cpu, cuda or cuda:N"),
    (["--prompts", "."], "error: [Errno 21] Is a directory"),
])
def test_bad_device_or_file_exit_2(capsys, ar_dir, args, message):
    rc, _, err = cli(capsys, "generate", "--model", str(ar_dir), *args)
    assert rc == 2 and message in err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_exit_2(capsys, ar_dir):
    rc, _, err = cli(capsys, "info", str(ar_dir), "--device", "cuda")
    assert rc == 2 and "error: device 'cuda' asked for, but no CUDA device is available" in err


def test_broken_config_json_exit_2(capsys, tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "model.safetensors").write_bytes(b"")
    rc, _, err = cli(capsys, "info", str(tmp_path), "--device", "cpu")
    assert rc == 2 and "error:" in err and "config.json" in err


def test_unsupported_architecture_exit_2(capsys, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32)).save_pretrained(tmp_path)
    rc, _, err = cli(capsys, "info", str(tmp_path), "--device", "cpu")
    assert rc == 2 and "error: unsupported architecture 'gpt2'" in err


@pytest.mark.parametrize("argv,message", [
    (["generate", "--mode", "gibbs", "--prompt-ids", "1"], "invalid choice: 'gibbs'"),
    (["generate", "--block-size", "four", "--prompt-ids", "1"], "invalid int value: 'four'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "the following arguments are required: COMMAND"),
])
def test_argparse_errors_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def run_module(*argv, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "twotower", *argv], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def test_python_dash_m_entry_point(tmp_path, ar_dir):
    """The real entry point, end to end in a fresh interpreter."""
    trace = tmp_path / "t.json"
    p = run_module("generate", "--model", str(ar_dir), "--prompt-ids", "5,17,42", "--mode", "ar",
                   "--trace", str(trace), "--max-new-tokens", "4", "--device", "cpu", "--no-stop")
    assert p.returncode == 0, p.stderr
    assert len(p.stdout.split()) == 4 and "[ar] tokens=4 nfe=4" in p.stderr and trace.is_file()
