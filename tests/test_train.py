"""Training: the objective, a few-step CPU run on a tiny random model, checkpoints and resume."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import needs_cxx
from tests.tiny import MASK_ID, VOCAB
from twotower import checkpoints
from twotower.cli import main
from twotower.corpus import make_prompts, public_domain_texts
from twotower.train import TrainConfig, add_noise, lr_factor


def test_add_noise_masks_whole_blocks_at_their_own_rate():
    clean = torch.randint(4, VOCAB, (64, 32))
    noisy, masked, t = add_noise(clean, 8, MASK_ID, 0.02, torch.Generator().manual_seed(0))
    assert torch.equal(noisy[masked], torch.full_like(noisy[masked], MASK_ID))
    assert torch.equal(noisy[~masked], clean[~masked])
    per_block = masked.view(64, 4, 8).float().mean(-1)               # t = the block's actual masked share
    assert torch.allclose(t.view(64, 4, 8)[..., 0], per_block)
    assert (t.view(64, 4, 8) == t.view(64, 4, 8)[..., :1]).all()   # one t per block
    assert per_block.std() > 0.1                                     # rates differ between blocks


def test_lr_schedule_warms_up_then_decays_by_steps_or_time():
    cfg = TrainConfig(steps=100, warmup=10)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(100, cfg) == pytest.approx(0.1)
    assert lr_factor(20, cfg, time_fraction=1.0) == pytest.approx(0.1)   # a spent time budget ends the decay


def test_config_rejects_unknown_settings(tmp_path):
    (tmp_path / "c.toml").write_text("[optim]\nsteps = 3\nlearning_rate = 1\n")
    with pytest.raises(ValueError, match="unknown training setting.*learning_rate"):
        TrainConfig.from_toml(tmp_path / "c.toml")


def test_prompts_are_reproducible_and_varied():
    assert make_prompts(50, seed=1) == make_prompts(50, seed=1)
    assert make_prompts(50, seed=1) != make_prompts(50, seed=2)
    assert len(set(make_prompts(200, seed=0))) > 150


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


@pytest.mark.parametrize("anchor", [True, False])
def test_a_few_steps_train_save_and_load(tmp_path, ar_dir, corpus, anchor):
    config = write_config(tmp_path, ar_dir, corpus, anchor=anchor)
    assert main(["train", "--config", config]) == 0
    final = tmp_path / "run" / "final"
    meta = json.loads((final / "twotower.json").read_text())
    assert meta["denoiser"] == "lora" and meta["anchor"] is anchor and meta["train_step"] == 4
    losses = [h["eval_loss"] for h in meta["history"]]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)
    model = checkpoints.load(str(final), device="cpu")
    base = checkpoints.build(*checkpoints.load_ar(ar_dir, "cpu", torch.float32), MASK_ID, True, "b", anchor=anchor)
    assert model.anchor is anchor
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
    assert state["step"] == 4 and [h["step"] for h in state["history"]] == [2, 4]


@needs_cxx
def test_compiled_training_pass_gives_the_eager_losses(tmp_path, ar_dir, corpus):
    """compile = true (inductor on the CPU): same seeds, same losses as the eager run."""
    def losses(name, **extra):
        config = write_config(tmp_path / name, ar_dir, corpus, steps=2, **extra)
        assert main(["train", "--config", config]) == 0
        state = json.loads((tmp_path / name / "run" / "last" / "train_state.json").read_text())
        return [(h["train_loss"], h["eval_loss"]) for h in state["history"]]

    (tmp_path / "eager").mkdir(), (tmp_path / "compiled").mkdir()
    eager, compiled = losses("eager"), losses("compiled", compile=True)
    assert len(eager) == 1 and eager[0][0] > 0
    assert compiled == pytest.approx(eager, abs=2e-3)


def test_two_processes_train_through_torchrun(tmp_path, ar_dir, corpus):
    """DDP as on several GPUs, here two CPU processes (gloo): the same config trains through
    torchrun, both ranks step together and rank 0 evaluates and saves a loadable checkpoint."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT
    config = write_config(tmp_path, ar_dir, corpus, steps=3, eval_every=3, save_every=3)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "twotower", "train", "--config", config]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "x2;" in done.stderr                                   # "[train] ... on cpu x2; ..."
    meta = json.loads((tmp_path / "run" / "final" / "twotower.json").read_text())
    assert meta["train_step"] == 3 and len(meta["history"]) == 1
    model = checkpoints.load(str(tmp_path / "run" / "final"), device="cpu")
    assert model.anchor
