"""Model specs and our checkpoint format: save/load round trips and clear refusals."""
from __future__ import annotations

import json
import os

import pytest
import torch

from tests.tiny import LORA, MASK_ID, VOCAB, random_lora, tiny_llama
from twotower import checkpoints
from twotower.checkpoints import SpecError, build, load, load_ar, read_safetensors, save

F32 = torch.float32


def perturb(model, seed=0, std=0.05):
    """Make the denoiser differ from its context tower everywhere a checkpoint must restore."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.denoiser_lm.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
        for p in model.time.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
        if model.mask_embedding is not None:
            model.mask_embedding.add_(torch.randn(model.mask_embedding.shape, generator=g))
    return model


def probe(model):
    """Denoiser logits of a half-masked block after a prompt, plus the context tower's logits."""
    ctx, last = model.prefill([[5, 17, 42, 8, 30], [9, 40]])
    x = torch.tensor([[MASK_ID, 12, MASK_ID, 60], [MASK_ID, MASK_ID, MASK_ID, 7]])
    with torch.no_grad():
        return model.denoise(x, model.block_inputs(ctx, 4)), last


def fresh(ar_dir, learned_mask=True, anchor=False):
    ctx, tok = load_ar(ar_dir, "cpu", F32)
    return build(ctx, tok, MASK_ID, learned_mask=learned_mask, name="probe", anchor=anchor).eval()


def assert_same(a, b, atol=1e-6):
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=atol), float((x - y).abs().max())


# ---- round trips ------------------------------------------------------------------------
@pytest.mark.parametrize("anchor", [False, True])
def test_full_denoiser_round_trip(ar_dir, tmp_path, anchor):
    model = perturb(fresh(ar_dir, anchor=anchor))
    expected = probe(model)
    out = save(model, tmp_path / "ck", context=str(ar_dir), dtype=F32)
    meta = json.loads((out / "twotower.json").read_text())
    assert meta["format"] == "twotower" and meta["denoiser"] == "full" and meta["mask_token_id"] == MASK_ID
    assert meta["learned_mask"] is True and meta.get("anchor", False) is anchor
    loaded = load(str(out), device="cpu", dtype=F32, pack=False)   # compared to 1e-6: PyTorch's own layers
    assert loaded.mask_token_id == MASK_ID and loaded.mask_embedding is not None and not loaded.training
    assert getattr(loaded, "anchor", False) is anchor
    assert_same(probe(loaded), expected)
    # and the run differs from an untouched model: the check is not vacuous
    assert (probe(fresh(ar_dir, anchor=anchor))[0] - expected[0]).abs().max() > 1e-3


def test_eval_items_seen_in_training_travel_with_the_checkpoint(ar_dir, tmp_path):
    model = fresh(ar_dir)
    assert model.eval_items_seen == frozenset()
    assert "eval_items_seen" not in json.loads((save(model, tmp_path / "a", context=str(ar_dir)) / "twotower.json").read_text())
    model.eval_items_seen = frozenset({"facts-001", "word-001"})
    loaded = load(str(save(model, tmp_path / "b", context=str(ar_dir))), device="cpu")
    assert loaded.eval_items_seen == {"facts-001", "word-001"}
    assert loaded.info()["eval_items_seen"] == ["facts-001", "word-001"]


def test_recommended_sampler_settings_travel_with_the_checkpoint(ar_dir, tmp_path):
    model = fresh(ar_dir)
    assert model.sampler_defaults == {}
    assert "sampler" not in json.loads((save(model, tmp_path / "a", context=str(ar_dir)) / "twotower.json").read_text())
    model.sampler_defaults = {"remasking": "leftmost", "threshold": 0.8}
    path = save(model, tmp_path / "b", context=str(ar_dir))
    loaded = load(str(path), device="cpu")
    assert loaded.sampler_defaults == {"remasking": "leftmost", "threshold": 0.8}
    assert loaded.info()["sampler_defaults"] == {"remasking": "leftmost", "threshold": 0.8}
    assert checkpoints.recommended_settings(str(path)) == {"remasking": "leftmost", "threshold": 0.8}
    assert checkpoints.recommended_settings(str(ar_dir)) == {}          # a plain AR model recommends nothing


def test_the_shipped_default_recommends_verify_and_repeat_guards_and_reads_clean_as_ar():
    """Read from assets/default_model/twotower.json alone (README 'Commit order verify',
    'Repeat guards', 'Clean positions read as the AR model')."""
    assert checkpoints.recommended_settings(None) == {"remasking": "verify", "threshold": 0.2,
                                                      "repetition_penalty": 1.05, "no_repeat_ngram_size": 4}
    assert json.loads((checkpoints.DEFAULT_DIR / "twotower.json").read_text())["clean_as_ar"] is True


@pytest.mark.parametrize("sampler,message", [
    ("leftmost", "'sampler' must be an object of sampler settings"),
    ({"order": "leftmost"}, "'sampler' has unknown settings ['order']"),
    ({"remasking": "best"}, "'sampler': remasking must be one of"),
    ({"threshold": 2}, "'sampler': threshold must lie in [0, 1]"),
])
def test_a_bad_sampler_entry_is_refused_by_name(ar_dir, tmp_path, sampler, message):
    path = save(fresh(ar_dir), tmp_path / "ck", context=str(ar_dir))
    meta = json.loads((path / "twotower.json").read_text())
    (path / "twotower.json").write_text(json.dumps({**meta, "sampler": sampler}))
    with pytest.raises(SpecError) as e:
        load(str(path), device="cpu")
    assert message in str(e.value)
    assert checkpoints.recommended_settings(str(path)) == {}          # the UI starts from the release's


def test_bf16_checkpoint_holds_rounded_weights(ar_dir, tmp_path):
    model = perturb(fresh(ar_dir), seed=1)
    save(model, tmp_path / "ck", context=str(ar_dir))                       # default dtype bf16
    weights = read_safetensors(tmp_path / "ck" / "denoiser.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}
    loaded = load(str(tmp_path / "ck"), device="cpu", dtype=F32)
    want = {k: v.to(torch.bfloat16).float() for k, v in model.denoiser_lm.state_dict().items()}
    for k, v in loaded.denoiser_lm.state_dict().items():
        assert torch.equal(v, want[k]), k
    assert torch.equal(loaded.time.t_block[1].weight, model.time.t_block[1].weight.to(torch.bfloat16).float())
    assert_same(probe(loaded), probe(model), atol=0.05)


def test_relative_context_path(ar_dir, tmp_path):
    model = perturb(fresh(ar_dir), seed=2)
    ck = tmp_path / "runs" / "ck"
    save(model, ck, context=os.path.relpath(ar_dir, ck), dtype=F32)
    assert_same(probe(load(str(ck), device="cpu", dtype=F32, pack=False)), probe(model))


def test_lora_round_trip_merges(ar_dir, tmp_path):
    model = perturb(fresh(ar_dir), seed=3, std=0.0)          # time + mask perturbed, backbone copy as is
    lora = dict(LORA)
    peft_model = random_lora(model.denoiser_lm, seed=9, std=0.2)
    expected = probe(model)                                   # the denoiser runs through the adapters
    assert (expected[0] - probe(fresh(ar_dir))[0]).abs().max() > 1e-3
    out = save(model, tmp_path / "ck", context=str(ar_dir), lora_model=peft_model, lora=lora, dtype=F32)
    meta = json.loads((out / "twotower.json").read_text())
    assert meta["denoiser"] == "lora" and meta["lora"] == lora
    keys = read_safetensors(out / "denoiser.safetensors").keys()
    assert any(k.startswith("lora.") for k in keys) and not any(k.startswith("denoiser.") for k in keys)
    loaded = load(str(out), device="cpu", dtype=F32)
    assert not any("lora" in n for n, _ in loaded.denoiser_lm.named_modules())      # merged
    assert_same(probe(loaded), expected, atol=1e-5)

    shared = load(str(out), device="cpu", dtype=F32, share_base=True)   # one backbone, adapter unmerged
    assert shared.shares_base and shared.adapter is not None
    assert shared.info()["denoiser_params"] < loaded.info()["denoiser_params"]   # no backbone copy
    assert_same(probe(shared), expected, atol=1e-5)    # the context tower still runs without the adapter


def test_clean_as_ar_lora_round_trip_keeps_the_adapter_gated(ar_dir, tmp_path):
    ctx, tok = load_ar(ar_dir, "cpu", F32)
    model = perturb(build(ctx, tok, MASK_ID, learned_mask=True, name="probe", anchor=True, clean_as_ar=True),
                    seed=3, std=0.0)
    peft_model = random_lora(model.denoiser_lm, seed=9, std=0.2)
    model.gate_adapter()
    expected = probe(model)
    out = save(model, tmp_path / "ck", context=str(ar_dir), lora_model=peft_model, lora=dict(LORA), dtype=F32)
    assert json.loads((out / "twotower.json").read_text())["clean_as_ar"] is True
    for share_base in (False, True):
        loaded = load(str(out), device="cpu", dtype=F32, share_base=share_base)
        assert loaded.clean_as_ar and loaded.adapter_gate is not None     # unmerged, gated per token
        assert any("lora" in n for n, _ in loaded.denoiser_lm.named_modules())
        assert_same(probe(loaded), expected, atol=1e-5)


def test_clean_as_ar_needs_a_lora_checkpoint(ar_dir, tmp_path):
    out = save(perturb(fresh(ar_dir, anchor=True), seed=5), tmp_path / "full", context=str(ar_dir), dtype=F32)
    meta = json.loads((out / "twotower.json").read_text())
    (out / "twotower.json").write_text(json.dumps({**meta, "clean_as_ar": True}))
    with pytest.raises(SpecError, match="clean_as_ar needs a LoRA denoiser"):
        load(str(out), device="cpu", dtype=F32)


def test_share_base_needs_a_lora_checkpoint(ar_dir, tmp_path):
    save(perturb(fresh(ar_dir), seed=5), tmp_path / "full", context=str(ar_dir), dtype=F32)
    with pytest.raises(SpecError, match="share_base needs a LoRA denoiser"):
        load(str(tmp_path / "full"), device="cpu", dtype=F32, share_base=True)
    with pytest.raises(SpecError, match="share_base works for LoRA checkpoints"):
        load("smollm2", device="cpu", dtype=F32, share_base=True)


def test_ctx_denoiser_spec(ar_dir, tmp_path):
    model = perturb(fresh(ar_dir), seed=4)
    save(model, tmp_path / "ck", context=str(ar_dir), dtype=F32)
    loaded = load(f"ctx={ar_dir},denoiser={tmp_path / 'ck' / 'denoiser.safetensors'}", device="cpu", dtype=F32)
    assert_same(probe(loaded), probe(model))
    with pytest.raises(SpecError, match="needs both parts"):
        load(f"ctx={ar_dir}", device="cpu")


def test_tied_embeddings_survive_a_same_dtype_save(ar_dir, tmp_path):
    """A full save in the model's own dtype holds tied tensors that share memory."""
    model = perturb(fresh(ar_dir), seed=5)
    assert model.denoiser_lm.lm_head.weight.data_ptr() == model.denoiser_lm.model.embed_tokens.weight.data_ptr()
    save(model, tmp_path / "ck", context=str(ar_dir), dtype=F32)
    loaded = load(str(tmp_path / "ck"), device="cpu", dtype=F32)
    assert torch.equal(loaded.denoiser_lm.lm_head.weight, model.denoiser_lm.lm_head.weight)


def test_plain_ar_directory(ar_dir_tok, tiny_tokenizer):
    model = load(str(ar_dir_tok), device="cpu", dtype=F32)
    assert model.tokenizer is not None and model.mask_token_id == tiny_tokenizer.mask_token_id == 3
    assert model.name == ar_dir_tok.name and model.mask_embedding is None
    for (n, a), (_, b) in zip(model.context_lm.state_dict().items(), model.denoiser_lm.state_dict().items()):
        assert torch.equal(a, b), n                     # the paper's init: a copy of the AR model
    assert model.eos_token_ids == {tiny_tokenizer.eos_token_id}
    assert load(str(ar_dir_tok), device="cpu", dtype=torch.bfloat16).dtype == torch.bfloat16


# ---- refusals ---------------------------------------------------------------------------
def test_corrupt_and_missing_safetensors(tmp_path):
    bad = tmp_path / "bad.safetensors"
    for content in (b"", b"garbage" * 20, b"\x08\x00\x00\x00\x00\x00\x00\x00{}"):
        bad.write_bytes(content)
        with pytest.raises(SpecError, match="is not a readable safetensors file"):
            read_safetensors(bad)
    with pytest.raises(SpecError, match="weights file not found"):
        read_safetensors(tmp_path / "nope.safetensors")


def own_dir(tmp_path, ar_dir, **meta):
    path = tmp_path / "ck"
    path.mkdir(exist_ok=True)
    data = {"format": "twotower", "context": str(ar_dir), "mask_token_id": MASK_ID, "denoiser": "full", **meta}
    (path / "twotower.json").write_text(json.dumps(data))
    return path


def test_checkpoint_with_garbage_denoiser_file(ar_dir, tmp_path):
    path = own_dir(tmp_path, ar_dir)
    (path / "denoiser.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(SpecError, match="denoiser.safetensors is not a readable safetensors file"):
        load(str(path), device="cpu")


def test_checkpoint_without_denoiser_file(ar_dir, tmp_path):
    with pytest.raises(SpecError, match="weights file not found: .*denoiser.safetensors"):
        load(str(own_dir(tmp_path, ar_dir)), device="cpu")


def test_checkpoint_metadata_refusals(ar_dir, tmp_path):
    model = fresh(ar_dir, learned_mask=False)
    save(model, tmp_path / "good", context=str(ar_dir), dtype=F32)
    weights = (tmp_path / "good" / "denoiser.safetensors").read_bytes()

    path = own_dir(tmp_path, ar_dir, format="something-else")
    (path / "denoiser.safetensors").write_bytes(weights)
    with pytest.raises(SpecError, match="is not a TwoTower checkpoint"):
        load(str(path), device="cpu")
    own_dir(tmp_path, ar_dir, denoiser="diff")
    with pytest.raises(SpecError, match="unknown denoiser kind 'diff'"):
        load(str(path), device="cpu")
    own_dir(tmp_path, ar_dir, learned_mask=True)
    with pytest.raises(SpecError, match="lacks 'mask_embedding'"):
        load(str(path), device="cpu")
    from safetensors.torch import save_file
    save_file({"denoiser.lm_head.weight": torch.zeros(2, 2)}, str(path / "denoiser.safetensors"))
    own_dir(tmp_path, ar_dir)
    with pytest.raises(SpecError, match="lacks time-conditioning weights"):
        load(str(path), device="cpu")
    time_part = {k: v for k, v in read_safetensors(tmp_path / "good" / "denoiser.safetensors").items()
                 if k.startswith("time.")}
    save_file({**time_part, "denoiser.lm_head.weight": torch.zeros(VOCAB + 5, 32)}, str(path / "denoiser.safetensors"))
    with pytest.raises(SpecError, match="do not fit the context tower's shapes"):
        load(str(path), device="cpu")


@pytest.mark.parametrize("text,message", [
    ("{'bad json", "is not valid JSON"),
    ("[1, 2, 3]", "must hold a JSON object, got list"),
    ('{"format": "twotower", "context": 42}', "'context' must be str, got 42"),
    ('{"format": "twotower", "context": "x", "mask_token_id": "abc"}', "'mask_token_id' must be int, got 'abc'"),
    ('{"format": "twotower", "context": "x", "mask_token_id": true}', "'mask_token_id' must be int, got True"),
    ('{"format": "twotower", "context": "x", "mask_token_id": 3, "learned_mask": "no"}', "'learned_mask' must be bool"),
    ('{"format": "twotower", "context": "x", "mask_token_id": 3, "lora": {"r": 4}}', "'lora' lacks 'alpha'"),
    ('{"format": "twotower", "context": "x", "mask_token_id": 3, "denoiser": "weird"}', "unknown denoiser kind 'weird'"),
    ('{"format": "twotower", "mask_token_id": 3}', "lacks 'context'"),
])
def test_a_malformed_twotower_json_is_refused_by_file_and_field(tmp_path, text, message):
    path = tmp_path / "ck"
    path.mkdir()
    (path / "twotower.json").write_text(text)
    (path / "denoiser.safetensors").write_bytes(b"")
    with pytest.raises(SpecError) as e:
        load(str(path), device="cpu")
    assert message in str(e.value) and "twotower.json" in str(e.value)


def test_settings_known_before_loading(tmp_path):
    """The commands check settings before loading where a spec's files tell the recommended ones:
    a ctx=DIR,denoiser=FILE spec reads the twotower.json beside the file; a hub id waits."""
    (tmp_path / "twotower.json").write_text('{"sampler": {"remasking": "verify"}}')
    spec = f"ctx={tmp_path},denoiser={tmp_path / 'denoiser.safetensors'}"
    assert checkpoints.settings_before_loading(spec) == {"remasking": "verify"}
    assert checkpoints.settings_before_loading("random:nemotron-h-small") == {}
    assert checkpoints.settings_before_loading(None)["remasking"] == "verify"            # the shipped model
    assert checkpoints.settings_before_loading("someone/some-model") is None              # a hub id


def test_devices_other_than_cpu_and_cuda_are_refused():
    for device in ("mps", "meta", "bogus"):
        with pytest.raises(SpecError, match="expected cpu, cuda or cuda:N"):
            checkpoints.check_device(device)


def test_unknown_specs(tmp_path, monkeypatch):
    with pytest.raises(SpecError, match="unknown model spec 'no-such-model'"):
        load("no-such-model", device="cpu")
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    with pytest.raises(SpecError, match="is a file; give its directory"):
        load(str(tmp_path / "weights.safetensors"), device="cpu")
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SpecError, match="'nobody-here/no-model' is not in the local hub cache"):
        load("nobody-here/no-model", device="cpu")


def test_not_a_model_directory(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SpecError, match="has no config.json: not a transformers model directory"):
        load(str(empty), device="cpu")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(SpecError, match="holds no .safetensors weights"):
        load(str(pickled), device="cpu")


def test_unsupported_architecture(tmp_path, ar_dir):
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32)).save_pretrained(gpt2)
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        load(str(gpt2), device="cpu")
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        load(f"ctx={gpt2},denoiser={gpt2 / 'model.safetensors'}", device="cpu")


def test_devices_and_dtypes():
    assert checkpoints.default_dtype("cpu") == torch.float32
    assert checkpoints.default_dtype("cuda:0") == torch.bfloat16
    assert checkpoints.default_device() in ("cpu", "cuda")
