"""Training: the objective, a few-step CPU run on a tiny random model, checkpoints and resume."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import needs_cxx
from tests.tiny import MASK_ID, VOCAB, tiny_llama
from twotower import checkpoints
from twotower.cli import build_parser, main
from twotower import corpus as corpus_module
from twotower.corpus import OPENINGS, QUESTIONS, TOPICS, held_out_prompts, make_prompts, public_domain_texts
from twotower.metrics import normalise
from twotower.train import DiffusionObjective, TrainConfig, add_noise, first_masked, lr_factor, soft_cross_entropy


def test_add_noise_masks_whole_blocks_at_their_own_rate():
    clean = torch.randint(4, VOCAB, (64, 32))
    noisy, masked, t = add_noise(clean, 8, MASK_ID, 0.02, torch.Generator().manual_seed(0))
    assert torch.equal(noisy[masked], torch.full_like(noisy[masked], MASK_ID))
    assert torch.equal(noisy[~masked], clean[~masked])
    per_block = masked.view(64, 4, 8).float().mean(-1)               # t = the block's actual masked share
    assert torch.allclose(t.view(64, 4, 8)[..., 0], per_block)
    assert (t.view(64, 4, 8) == t.view(64, 4, 8)[..., :1]).all()   # one t per block
    assert per_block.std() > 0.1                                     # rates differ between blocks


def test_add_noise_prefix_blocks_reveal_a_prefix_and_mask_the_rest():
    clean = torch.randint(4, VOCAB, (256, 32))
    draw = lambda share: add_noise(clean, 8, MASK_ID, 0.02, torch.Generator().manual_seed(0), share)
    is_suffix = lambda masked: ((masked.view(256, 4, 8).int().diff(dim=-1) >= 0).all(-1)).float().mean().item()
    plain = add_noise(clean, 8, MASK_ID, 0.02, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(plain, draw(0.0)))          # share 0: the plain objective
    noisy, masked, t = draw(1.0)
    assert is_suffix(masked) == 1.0 and masked.view(256, 4, 8)[..., -1].all()  # every block: prefix | masked
    assert torch.equal(noisy[masked], torch.full_like(noisy[masked], MASK_ID))
    assert torch.allclose(t.view(256, 4, 8)[..., 0], masked.view(256, 4, 8).float().mean(-1))
    assert masked.float().mean().item() == pytest.approx(plain[1].float().mean().item(), abs=0.05)  # same rates
    by_chance = is_suffix(plain[1])                       # random blocks that happen to look so (t near 1)
    assert by_chance < 0.3 and 0.5 + by_chance / 2 - 0.1 < is_suffix(draw(0.5)[1]) < 0.5 + by_chance / 2 + 0.1


def objective_model(anchor: bool = True):
    """An untrained TwoTower on a tiny random Llama (the objective's tests)."""
    return checkpoints.build(tiny_llama(seed=0), None, MASK_ID, True, "t", anchor=anchor)


def clean_batch() -> torch.Tensor:
    return torch.randint(4, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))


def test_soft_cross_entropy_of_a_one_hot_target_is_cross_entropy():
    logits = torch.randn(5, 7)
    logits[:, 2] = float("-inf")                                     # a forbidden column, as [MASK] is
    targets = torch.tensor([0, 1, 3, 6, 4])
    one_hot = torch.nn.functional.one_hot(targets, 7).float()
    assert soft_cross_entropy(logits.log_softmax(-1), one_hot).tolist() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, targets, reduction="none").tolist())


@pytest.mark.parametrize("anchor", [True, False])
def test_distill_target_is_the_ar_models_distribution_before_each_masked_token(anchor):
    """The objective's terms against a brute-force recomputation: the context tower's logits at
    j - 1 for every masked token j (position 0 has none), the denoiser's at j."""
    parts = check_objective_terms(objective_model(anchor), clean_batch(), 8)
    if anchor:   # at init an anchored denoiser predicts as its AR copy: the agreement check is not vacuous
        assert 0.1 < parts["agree"] < 1


def brute_force(model, clean: torch.Tensor, block: int):
    """The masks DiffusionObjective.parts draws with seed 1, the denoiser's logits q (B, N - start, V),
    the context tower's p (B, N, V: row j predicts token j + 1), both with [MASK] barred, and the
    (row, position) of every masked token that has an AR prediction (position 0 has none)."""
    noisy, masked, t = add_noise(clean, block, model.mask_token_id, 0.02, torch.Generator().manual_seed(1))
    start, (batch, n) = model.training_start(block), clean.shape
    with torch.no_grad():
        q = model.training_logits(clean, noisy, t, block).float()
        p = model.context_lm(clean).logits.float()
    q[..., model.mask_token_id] = p[..., model.mask_token_id] = float("-inf")
    rows = [(b, j) for b in range(batch) for j in range(max(start, 1), n) if masked[b, j]]
    return masked, start, q, p, rows


def check_objective_terms(model, clean: torch.Tensor, block: int) -> dict:
    """DiffusionObjective.parts on clean (B, N) == the terms recomputed position by position."""
    parts = DiffusionObjective(model, block, 0.02, distill=1.0).parts(clean, torch.Generator().manual_seed(1))
    masked, start, q, p, rows = brute_force(model, clean, block)      # the same masks
    logq = torch.stack([q[b, j - start] for b, j in rows]).log_softmax(-1)
    prob = torch.stack([p[b, j - 1] for b, j in rows]).softmax(-1)
    assert parts["distill"].item() == pytest.approx(soft_cross_entropy(logq, prob).mean().item(), rel=1e-5)
    same = logq.argmax(-1) == prob.argmax(-1)
    assert parts["agree"].item() == pytest.approx(same.float().mean().item())
    first = [not masked[b, j - j % block:j].any() for b, j in rows]    # nothing masked before it in its block
    assert parts["agree_next"].item() == pytest.approx(same[torch.tensor(first)].float().mean().item())
    second = [masked[b, j - j % block:j].sum() == 1 for b, j in rows]   # one masked before it in its block
    assert parts["agree_ahead"].item() == pytest.approx(same[torch.tensor(second)].float().mean().item())
    batch, n = clean.shape
    hard = torch.stack([q[b, j - start] for b in range(batch) for j in range(start, n) if masked[b, j]])
    expected = torch.nn.functional.cross_entropy(hard, clean[:, start:][masked[:, start:]])
    assert parts["ce"].item() == pytest.approx(expected.item(), rel=1e-5)
    return parts


def test_first_masked_marks_each_blocks_first_masked_position():
    masked = torch.tensor([[0, 1, 1, 0, 0, 0, 0, 1], [1, 0, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    expected = torch.tensor([[0, 1, 0, 0, 0, 0, 0, 1], [1, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(first_masked(masked, 4), expected)
    second = torch.tensor([[0, 0, 1, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(first_masked(masked, 4, nth=2), second)


def test_first_draft_pools_second_positions_and_is_none_without_any():
    """evaluate() pools first-draft agreement over every batch's second masked positions; with
    blocks of one position there are none: NaN in the figures, None in the history row."""
    from twotower.train import TokenWindows, eval_row, evaluate
    model = objective_model()
    data = TokenWindows(torch.randint(4, VOCAB, (400,), generator=torch.Generator().manual_seed(2)), 32, 0)
    for block, expect_none in ((8, False), (1, True)):
        cfg = TrainConfig(block_size=block, batch_size=2, seq_len=32, eval_batches=2, device="cpu")
        objective = DiffusionObjective(model, block, 0.02, distill=1.0, temperature=0.0)
        ev = evaluate(objective, data, cfg, "cpu")
        row = eval_row(objective, data, cfg, "cpu", 0, None, 0.0)
        assert math.isnan(ev["agree_ahead"]) is expect_none
        assert (row["eval_agree_ahead"] is None) is expect_none
        assert expect_none or 0 <= row["eval_agree_ahead"] <= 1


@pytest.mark.parametrize("anchor", [True, False])
def test_next_weight_weights_each_blocks_first_masked_position(anchor):
    """next_weight = w: the losses are means over masked positions with each block's first
    masked one counted w times; 1 is the plain mean."""
    model, clean = objective_model(anchor), clean_batch()
    objective = DiffusionObjective(model, 8, 0.02, distill=1.0, temperature=0.0)
    masked, start, q, p, rows = brute_force(model, clean, 8)
    first = first_masked(masked, 8)
    ce = torch.stack([torch.nn.functional.cross_entropy(q[b, j - start], clean[b, j]) for b, j in rows])
    hard = torch.stack([torch.nn.functional.cross_entropy(q[b, j - start], p[b, j - 1].argmax()) for b, j in rows])
    weight = torch.tensor([3.0 if first[b, j] else 1.0 for b, j in rows])
    plain = objective.parts(clean, torch.Generator().manual_seed(1))
    heavy = objective.parts(clean, torch.Generator().manual_seed(1), next_weight=3.0)
    assert heavy["distill"].item() == pytest.approx(((hard * weight).sum() / weight.sum()).item(), rel=1e-5)
    assert plain["distill"].item() == pytest.approx(hard.mean().item(), rel=1e-5)
    if start > 0:   # the clean-token terms cover position 0 too when the denoiser has no anchor
        assert heavy["ce"].item() == pytest.approx(((ce * weight).sum() / weight.sum()).item(), rel=1e-5)
    assert heavy["agree_next"] == plain["agree_next"]
    with pytest.raises(ValueError, match="next_weight must be"):
        DiffusionObjective(model, 8, 0.02, next_weight=0.0)


def test_distill_weight_mixes_the_two_targets_and_is_checked():
    model, clean = objective_model(), clean_batch()
    parts = DiffusionObjective(model, 8, 0.02).parts(clean, torch.Generator().manual_seed(1))
    loss = DiffusionObjective(model, 8, 0.02, distill=0.25)(clean, torch.Generator().manual_seed(1))
    assert loss.item() == pytest.approx(0.75 * parts["ce"].item() + 0.25 * parts["distill"].item(), rel=1e-5)
    plain = DiffusionObjective(model, 8, 0.02)(clean, torch.Generator().manual_seed(1))
    assert plain.item() == pytest.approx(parts["ce"].item(), rel=1e-6)
    with pytest.raises(ValueError, match="distill must lie in"):
        DiffusionObjective(model, 8, 0.02, distill=1.5)
    with pytest.raises(ValueError, match="prefix_share must lie in"):
        DiffusionObjective(model, 8, 0.02, prefix_share=-0.1)
    for bad in (-1.0, float("inf")):
        with pytest.raises(ValueError, match="distill_temperature must be a finite number >= 0"):
            DiffusionObjective(model, 8, 0.02, distill=1.0, temperature=bad)


def test_distill_temperature_zero_targets_the_ar_models_greedy_choice():
    """At temperature 0 the AR term is cross-entropy against the AR argmax; a small temperature
    approaches it and temperature 1 differs."""
    model, clean = objective_model(), clean_batch()
    term = lambda temp: DiffusionObjective(model, 8, 0.02, 1.0, temp).parts(clean, torch.Generator().manual_seed(1))["distill"].item()
    assert term(1e-4) == pytest.approx(term(0.0), rel=1e-4)
    assert abs(term(1.0) - term(0.0)) > 1e-3


def test_every_evaluation_sees_the_same_held_out_windows_and_masks(corpus):
    from twotower.train import evaluate, load_corpus
    model = objective_model()
    _, held_out = load_corpus(str(corpus), 32, 0.2, 0)
    cfg = TrainConfig(batch_size=2, eval_batches=2, block_size=8)
    objective = DiffusionObjective(model, 8, 0.02)
    first, again = evaluate(objective, held_out, cfg, "cpu"), evaluate(objective, held_out, cfg, "cpu")
    assert first == again and first["ce"] > 0
    prefixed = DiffusionObjective(model, 8, 0.02, prefix_share=1.0)     # trains on other masks,
    assert evaluate(prefixed, held_out, cfg, "cpu") == first              # is measured on the same ones
    batch = held_out.batch(2, torch.Generator().manual_seed(0))
    ce = lambda **kw: prefixed.parts(batch, torch.Generator().manual_seed(1), **kw)["ce"].item()
    assert ce() != ce(prefix_share=0.0)                                   # (the training masks do differ)


def test_lr_schedule_warms_up_then_decays_by_steps_or_time():
    cfg = TrainConfig(steps=100, warmup=10)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(100, cfg) == pytest.approx(0.1)
    assert lr_factor(20, cfg, time_fraction=1.0) == pytest.approx(0.1)   # a spent time budget ends the decay


def test_config_rejects_unknown_settings(tmp_path):
    (tmp_path / "c.toml").write_text("[optim]\nsteps = 3\nlearning_rate = 1\n")
    with pytest.raises(ValueError, match="unknown training setting.*learning_rate"):
        TrainConfig.from_toml(tmp_path / "c.toml")


@pytest.mark.parametrize("name", ["default", "greedy_distill"])
def test_shipped_training_configs_parse(name):
    from tests.conftest import ROOT
    cfg = TrainConfig.from_toml(ROOT / "configs" / f"{name}.toml")
    assert cfg.block_size == 16 and cfg.context == "smollm2" and 0 <= cfg.distill <= 1


def test_prompts_are_reproducible_and_varied():
    assert make_prompts(50, seed=1) == make_prompts(50, seed=1)
    assert make_prompts(50, seed=1) != make_prompts(50, seed=2)
    assert len(set(make_prompts(200, seed=0))) > 150


def test_opening_share_adds_bare_openings_and_leaves_other_draws_alone():
    is_opening = lambda p: any(p == o.format(t=t) for o in OPENINGS for t in TOPICS)
    assert not any(map(is_opening, make_prompts(300, seed=3, question_share=0.3)))
    assert make_prompts(300, seed=3, question_share=0.3) == make_prompts(300, 3, 0.3, opening_share=0.0)
    assert make_prompts(5, seed=3, question_share=0.3)[:2] == [      # the documented corpora's draws
        "Calculate 80 - 27.", "Write a letter to a friend about theatre."]
    mixed = make_prompts(1000, seed=3, question_share=0.3, opening_share=0.2)
    assert 150 < sum(map(is_opening, mixed)) < 250
    assert all(map(is_opening, make_prompts(50, seed=3, question_share=0.0, opening_share=1.0)))
    with pytest.raises(ValueError, match="opening share must be between 0 and 1"):
        make_prompts(3, seed=0, opening_share=-0.1)
    with pytest.raises(ValueError, match="add up to more than 1"):
        make_prompts(3, seed=0, question_share=0.9, opening_share=0.2)


def test_no_corpus_prompt_is_an_evaluation_prompt(monkeypatch):
    held_out = held_out_prompts()
    assert normalise("What is the capital of France?") in held_out                 # a QA item
    assert normalise("Write a poem about the ocean.") in held_out                  # an open prompt
    assert not {normalise(q) for q in QUESTIONS} & held_out
    prompts = make_prompts(300, seed=0, question_share=1.0)
    assert sum(p in QUESTIONS for p in prompts) > 150                              # questions drawn
    monkeypatch.setattr(corpus_module, "held_out_prompts", lambda: {normalise(QUESTIONS[0])})
    assert QUESTIONS[0] not in make_prompts(300, seed=0, question_share=1.0)       # and filtered
    with pytest.raises(ValueError, match="question share must be between 0 and 1"):
        make_prompts(3, seed=0, question_share=1.5)


def test_public_domain_texts_from_a_folder(tmp_path):
    (tmp_path / "a.txt").write_text("short\n\n" + "A long paragraph of old text. " * 20)
    texts = public_domain_texts(str(tmp_path))
    assert any(t.startswith("A long paragraph") for t in texts) and "short" not in texts


@pytest.fixture()
def corpus(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "tokens.safetensors"
    save_file({"tokens": torch.randint(4, VOCAB, (4000,), dtype=torch.int32),
               "starts": torch.tensor([0])}, str(path))
    return path


def write_config(tmp_path, ar_dir, corpus, **extra) -> str:
    settings = dict(context=str(ar_dir), mask_token_id=MASK_ID, learned_mask=True, anchor=True, lora_r=4,
                    lora_alpha=8, corpus=str(corpus), seq_len=32, block_size=8, steps=4, batch_size=2,
                    warmup=1, out=str(tmp_path / "run"), eval_every=2, eval_batches=1, save_every=2,
                    device="cpu", name="tiny")
    settings.update(extra)
    lines = [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    (tmp_path / "train.toml").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "train.toml")


@pytest.mark.parametrize("anchor,distill,clean_as_ar", [(True, 0.0, False), (False, 0.0, False), (True, 0.5, False),
                                                        (True, 1.0, True)])
def test_a_few_steps_train_save_and_load(tmp_path, ar_dir, corpus, anchor, distill, clean_as_ar):
    config = write_config(tmp_path, ar_dir, corpus, anchor=anchor, distill=distill, clean_as_ar=clean_as_ar,
                          distill_temperature=0.0 if clean_as_ar else 1.0)
    assert main(["train", "--config", config]) == 0
    final = tmp_path / "run" / "final"
    meta = json.loads((final / "twotower.json").read_text())
    assert meta["denoiser"] == "lora" and meta["anchor"] is anchor and meta["train_step"] == 4
    assert meta["clean_as_ar"] is clean_as_ar
    if clean_as_ar:   # the token after the revealed prefix is the AR model's own greedy choice
        assert all(h["eval_agree_next"] == 1 for h in meta["history"])
    assert [h["step"] for h in meta["history"]] == [0, 2, 4]       # step 0: where it starts from
    assert meta["history"][0]["train_loss"] is None
    assert all(0 < h["eval_loss"] < 20 for h in meta["history"])
    assert all(0 <= h[k] <= 1 for h in meta["history"] for k in ("eval_agree", "eval_agree_next", "eval_agree_ahead"))
    model = checkpoints.load(str(final), device="cpu")
    base = checkpoints.build(*checkpoints.load_ar(ar_dir, "cpu", torch.float32), MASK_ID, True, "b", anchor=anchor)
    assert model.anchor is anchor and model.clean_as_ar is clean_as_ar
    assert not torch.equal(model.time.t_block[1].weight, base.time.t_block[1].weight)   # it learned something
    ids = [[5, 9, 11, 20]]
    ctx, _ = model.prefill(ids)
    x = torch.full((1, 8), MASK_ID)
    assert torch.isfinite(model.denoise(x, model.block_inputs(ctx, 8))).all()


def test_resume_continues_from_the_last_checkpoint(tmp_path, ar_dir, corpus):
    config = write_config(tmp_path, ar_dir, corpus, steps=2)
    assert main(["train", "--config", config]) == 0
    state = json.loads((tmp_path / "run" / "last" / "train_state.json").read_text())
    assert state["step"] == 2
    assert main(["train", "--config", config, "--resume", "--set", "steps=4"]) == 0
    state = json.loads((tmp_path / "run" / "last" / "train_state.json").read_text())
    assert state["step"] == 4 and [h["step"] for h in state["history"]] == [0, 2, 4]


def test_a_run_from_init_keeps_the_eval_items_its_start_was_trained_on(tmp_path, ar_dir, corpus):
    assert main(["train", "--config", write_config(tmp_path, ar_dir, corpus, steps=2)]) == 0
    start = tmp_path / "run" / "final"
    meta = json.loads((start / "twotower.json").read_text())
    (start / "twotower.json").write_text(json.dumps({**meta, "eval_items_seen": ["facts-001"]}))
    config = write_config(tmp_path, ar_dir, corpus, steps=2, init=str(start), out=str(tmp_path / "next"))
    assert main(["train", "--config", config]) == 0
    for ck in ("final", "last"):
        assert checkpoints.load(str(tmp_path / "next" / ck), device="cpu").eval_items_seen == {"facts-001"}


@needs_cxx
def test_compiled_training_pass_gives_the_eager_losses(tmp_path, ar_dir, corpus):
    """compile = true (inductor on the CPU): same seeds, same losses as the eager run."""
    def losses(name, **extra):
        config = write_config(tmp_path / name, ar_dir, corpus, steps=2, **extra)
        assert main(["train", "--config", config]) == 0
        state = json.loads((tmp_path / name / "run" / "last" / "train_state.json").read_text())
        return [loss for h in state["history"] for loss in (h["train_loss"] or 0.0, h["eval_loss"])]   # flat: approx takes no nesting

    (tmp_path / "eager").mkdir(), (tmp_path / "compiled").mkdir()
    eager, compiled = losses("eager"), losses("compiled", compile=True)
    assert len(eager) == 4 and eager[1] > 0 and eager[2] > 0      # step 0 (eval only), step 2
    assert compiled == pytest.approx(eager, abs=2e-3)


@pytest.mark.parametrize("budget", [False, True])
def test_two_processes_train_through_torchrun(tmp_path, ar_dir, corpus, budget):
    """DDP as on several GPUs, here two CPU processes (gloo): the same config trains through
    torchrun, both ranks step together and rank 0 evaluates and saves a loadable checkpoint.
    With a time budget spent after the first step, both ranks stop there (no hang)."""
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import ROOT
    limits = dict(steps=50, max_minutes=0.0005) if budget else dict(steps=3)   # 0.03 s: one step
    config = write_config(tmp_path, ar_dir, corpus, eval_every=3, save_every=3, **limits)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "twotower", "train", "--config", config]
    run = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)          # its own process group: a hang kills both ranks too
    try:
        _, stderr = run.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        pytest.fail(f"torchrun hung: {run.communicate()[1][-3000:]}")
    assert run.returncode == 0, stderr[-3000:]
    assert "x2;" in stderr                                   # "[train] ... on cpu x2; ..."
    meta = json.loads((tmp_path / "run" / "final" / "twotower.json").read_text())
    stopped = meta["train_step"]
    assert (stopped < 50 if budget else stopped == 3) and meta["history"][-1]["step"] == stopped
    assert (f"time budget of 0.0005 min reached at step {stopped}" in stderr) is budget
    model = checkpoints.load(str(tmp_path / "run" / "final"), device="cpu")
    assert model.anchor


@pytest.mark.parametrize("greedy_only", [False, True])
def test_corpus_greedy_only_keeps_just_the_models_greedy_trajectories(tmp_path, ar_dir_tok, greedy_only):
    from safetensors.torch import load_file
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "old.txt").write_text("\n\n".join(f"Paragraph {i} of an old book. " * 12 for i in range(8)))
    argv = ["corpus", "--out", str(tmp_path / "c"), "--model", str(ar_dir_tok), "--device", "cpu", "--prompts", "6",
            "--max-new-tokens", "5", "--batch", "4", "--temperature", "1.0", "--question-share", "0.3",
            "--public-domain-share", "0.5", "--text-dir", str(texts), "--seed", "0"] + ["--greedy-only"] * greedy_only
    meta = corpus_module.build(build_parser(argv).parse_args(argv))     # the CLI's own options and defaults
    data = load_file(str(tmp_path / "c" / "tokens.safetensors"))
    assert meta["greedy_only"] is greedy_only and data["starts"].numel() == meta["documents"]
    n_pd = meta["public_domain_docs"]
    # chat prompts answered once (greedy) or twice (greedy, then sampled); raw text only without the flag
    assert meta["documents"] - n_pd == (6 if greedy_only else 12)
    assert (n_pd == 1) if greedy_only else (n_pd > 1)


# ---- input checks: bad settings fail with the setting's name before any data or model loads ----
@pytest.mark.parametrize("settings,message", [
    ({"block_size": 0}, "block_size must be >= 1, got 0"),
    ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
    ({"steps": -1}, "steps must be >= 0, got -1"),
    ({"lr": -1.0}, r"lr must be a finite number > 0, got -1.0"),
    ({"lr": math.nan}, "lr must be a finite number > 0, got nan"),
    ({"eval_fraction": 1.0}, r"eval_fraction must be in \[0, 1\), got 1.0"),
    ({"min_t": 1.5}, r"min_t must be in \[0, 1\], got 1.5"),
    ({"distill": -0.1}, r"distill must be in \[0, 1\]"),
    ({"eval_every": 0}, "eval_every must be >= 1, got 0"),
    ({"seq_len": 1}, "seq_len must be at least 2 x block_size = 32 with anchor = true"),
    ({"seq_len": 31}, "seq_len must be at least 2 x block_size = 32"),
    ({"seq_len": 8, "anchor": False}, "seq_len must be at least block_size = 16, got 8"),
    ({"steps": "many"}, "steps must be an integer, got 'many' \\(str\\)"),
    ({"block_size": 8.5}, r"block_size must be an integer, got 8.5 \(float\)"),
    ({"anchor": 1}, "anchor must be true or false, got 1"),
    ({"lora_targets": "q_proj"}, "lora_targets must be a list of strings"),
    ({"lora_targets": []}, "lora_targets must be a non-empty list"),
    ({"device": "gpu"}, "unknown device 'gpu'"),
])
def test_config_validation_names_the_bad_setting(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings).validate()


def test_config_validation_accepts_the_edges_that_mean_something():
    TrainConfig(steps=0, warmup=0, eval_fraction=0.0, lr=1, seq_len=16, block_size=16, anchor=False).validate()
    TrainConfig(seq_len=32, block_size=16, anchor=True, device="cpu", time_lr=0.0).validate()


def test_config_validation_refuses_cuda_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device 'cuda' asked for, but no CUDA device is available"):
        TrainConfig(device="cuda").validate()


def test_set_overrides_are_parsed_by_the_settings_type():
    from twotower.train import parse_override
    assert parse_override("lr=1") == ("lr", 1.0) and isinstance(parse_override("lr=1")[1], float)
    assert parse_override("anchor=no") == ("anchor", False)
    assert parse_override("lora_targets=q_proj, v_proj") == ("lora_targets", ["q_proj", "v_proj"])
    for item, message in (("steps", "--set expects KEY=VALUE, got 'steps'"),
                          ("steps=many", "--set steps expects an integer, got 'many'"),
                          ("block_size=8.5", "--set block_size expects an integer, got '8.5'"),
                          ("lr=fast", "--set lr expects a number, got 'fast'"),
                          ("anchor=ture", "--set anchor expects true or false, got 'ture'"),
                          ("speed=1", "unknown setting 'speed' in --set")):
        with pytest.raises(ValueError, match=message):
            parse_override(item)


def test_a_toml_syntax_error_names_the_config_file(tmp_path):
    (tmp_path / "c.toml").write_text("steps = [\n")
    with pytest.raises(ValueError, match=f"{tmp_path / 'c.toml'}: invalid TOML"):
        TrainConfig.from_toml(tmp_path / "c.toml")


def test_a_missing_or_too_small_corpus_says_so(tmp_path, corpus):
    from twotower.train import load_corpus
    with pytest.raises(FileNotFoundError, match="corpus file not found \\(config key 'corpus'\\): .*nocorpus"):
        load_corpus(str(tmp_path / "nocorpus.safetensors"), 32, 0.01, 0)
    with pytest.raises(ValueError, match="corpus .* has 4000 tokens, fewer than the 200002 needed for one training "
                                         "window of seq_len \\+ 1 = 100001 tokens plus the held-out split"):
        load_corpus(str(corpus), 100000, 0.01, 0)
    with pytest.raises(ValueError, match="has 4000 tokens, fewer than the 4002 needed"):
        load_corpus(str(corpus), 2000, 0.0, 0)
    train, held_out = load_corpus(str(corpus), 1999, 0.0, 0)      # 4000 = 2 x (1999 + 1): just enough
    assert train.tokens.numel() == held_out.tokens.numel() == 2000
    save_file({"ids": torch.zeros(10, dtype=torch.int32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="has no 'tokens' tensor"):
        load_corpus(str(tmp_path / "other.safetensors"), 4, 0.01, 0)


def test_the_train_command_refuses_bad_settings_before_loading_anything(tmp_path, ar_dir, corpus, capsys, monkeypatch):
    from twotower import train as train_module
    monkeypatch.setattr(train_module, "build_model", lambda *a: pytest.fail("the model was loaded"))
    config = write_config(tmp_path, ar_dir, corpus)
    for override, message in (("lr=-1", "error: lr must be a finite number > 0, got -1.0"),
                              ("steps", "error: --set expects KEY=VALUE, got 'steps'"),
                              ("seq_len=100000", "has 4000 tokens, fewer than the 200002 needed"),
                              ("corpus=" + str(tmp_path / "nocorpus.safetensors"), "error: corpus file not found")):
        assert main(["train", "--config", config, "--set", override]) == 2
        assert message in capsys.readouterr().err
