"""The CPU's linear fast paths: oneDNN-packed layers give nn.Linear's outputs, run the packed op
where they should and F.linear everywhere else, pack equal weights once, follow weight changes,
copy, and go back to plain layers for torch.compile; without packing the head is relaid for MKL."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from tests.tiny import LORA, MASK_ID, random_lora, tiny_llama
from twotower import checkpoints, cpu_linear
from twotower.cpu_linear import PackedLinear, head_for_one_row, pack_linears, packed_layers, unpack_linears
from twotower.memory import part_sizes
from twotower.sampler import ar_generate, diffusion_generate
from twotower.sampling import SamplerConfig

needs_packing = pytest.mark.skipif(not cpu_linear.available(), reason="no oneDNN packing on this build or CPU")


def ran_packed(fn) -> tuple[object, bool]:
    """fn()'s result, and whether oneDNN's packed linear op ran inside it."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, any(e.name == "mkldnn::_linear_pointwise" for e in prof.events())


def packed_layer(out_features=80, in_features=48, bias=True, seed=0):
    torch.manual_seed(seed)
    holder = nn.Sequential(nn.Linear(in_features, out_features, bias=bias))
    assert pack_linears(holder, min_side=0) == 1 and isinstance(holder[0], PackedLinear)
    return holder


@needs_packing
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_packed_op_runs_and_gives_the_linear_output(rows):
    torch.manual_seed(0)
    plain = nn.Linear(48, 80)
    x = torch.randn(2, rows, 48)
    with torch.no_grad():
        expected = plain(x)
        holder = nn.Sequential(copy.deepcopy(plain))
        pack_linears(holder, min_side=0)
        got, packed = ran_packed(lambda: holder(x))
    assert packed and got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)


@needs_packing
def test_outside_the_fast_path_it_is_f_linear():
    holder = packed_layer()
    layer, x = holder[0], torch.randn(3, 48)
    for needs_grad in ("input", "weight", "bias"):                  # each alone needs the graph: F.linear
        for p in layer.parameters():
            p.requires_grad_(False)
            p.grad = None
        xi = x.clone().requires_grad_(needs_grad == "input")
        if needs_grad != "input":
            getattr(layer, needs_grad).requires_grad_(True)
        y, packed = ran_packed(lambda: holder(xi))
        assert not packed, needs_grad
        y.sum().backward()
        grad = xi.grad if needs_grad == "input" else getattr(layer, needs_grad).grad
        assert grad is not None, needs_grad
    with torch.no_grad():
        assert ran_packed(lambda: holder(x))[1]                     # and without autograd, the packed op
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y, packed = ran_packed(lambda: holder(torch.randn(3, 48)))   # autocast: F.linear's bf16 result
    assert not packed and y.dtype == torch.bfloat16
    holder.to(torch.bfloat16)                                        # other dtypes: what nn.Linear gives
    xb = torch.randn(3, 48, dtype=torch.bfloat16)
    with torch.no_grad():
        y, packed = ran_packed(lambda: holder(xb))
        assert not packed and torch.equal(y, nn.functional.linear(xb, holder[0].weight, holder[0].bias))
        with pytest.raises(RuntimeError):                            # float32 in, bf16 weights: refused as by nn.Linear
            holder(torch.randn(3, 48))


@needs_packing
def test_a_changed_weight_is_packed_again():
    holder = packed_layer()
    layer, x = holder[0], torch.randn(4, 48)
    plain = lambda: nn.functional.linear(x, layer.weight, layer.bias)

    def check():
        y, packed = ran_packed(lambda: holder(x))
        assert packed and torch.allclose(y, plain(), atol=1e-5)

    with torch.no_grad():
        check()
        layer.weight.mul_(-2.0)                                      # in place, as load_state_dict writes
        check()
        holder.load_state_dict({"0.weight": torch.randn(80, 48), "0.bias": torch.zeros(80)})
        check()
        sources = [torch.randn(80, 48) for _ in range(3)]
        for i in range(20):                                          # replaced twice between calls: the packed
            layer.weight = nn.Parameter(sources[i % 3].clone())      # weight's storage is held, so the second
            layer.weight = nn.Parameter(sources[(i + 1) % 3].clone())   # cannot land at its address unnoticed
            assert torch.allclose(holder(x), plain(), atol=1e-5), i
        check()
        holder.to(torch.bfloat16).float()                            # moved there and back: other storage
        check()
        layer.weight.data.mul_(3.0)                                  # .data writes move no counter ...
        layer.repack()                                               # ... so they need an explicit repack
        check()


@needs_packing
def test_moving_off_the_fast_path_frees_the_copy_and_inference_mode_works():
    holder = packed_layer()
    holder.to(torch.bfloat16)
    assert holder[0].packed is None and cpu_linear.packed_bytes(holder) == 0
    with torch.inference_mode():                                     # inference tensors keep no version counter
        holder = packed_layer()
        x = torch.randn(2, 48)
        y, packed = ran_packed(lambda: holder(x))
    assert packed and torch.allclose(y, nn.functional.linear(x, holder[0].weight, holder[0].bias), atol=1e-5)


@needs_packing
def test_a_packed_model_deep_copies():
    holder = packed_layer()
    twin = copy.deepcopy(holder)
    x = torch.randn(2, 48)
    with torch.no_grad():
        y, packed = ran_packed(lambda: twin(x))
        assert packed and torch.allclose(y, holder(x), atol=1e-6)
    assert twin[0].weight is not holder[0].weight


@needs_packing
def test_equal_weights_packed_once_small_layers_left_plain_ties_kept():
    model = nn.ModuleDict({"a": tiny_llama(seed=0), "b": tiny_llama(seed=0)})   # same values, other tensors
    n = sum(type(m) is nn.Linear for m in model.modules())
    params = sum(p.numel() for p in model.parameters())
    assert pack_linears(model) == 0                                  # the tiny layers are narrower than MIN_SIDE
    assert pack_linears(model, min_side=0) == n and len(packed_layers(model)) == n
    assert sum(p.numel() for p in model.parameters()) == params      # the originals stay parameters
    assert len({id(m.packed) for m in packed_layers(model)}) == n // 2   # the copy reuses every packed weight
    lm = model["a"]
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    assert set(lm.state_dict()) == set(tiny_llama(seed=0).state_dict())


@needs_packing
def test_unpack_restores_plain_linears():
    lm = tiny_llama(seed=2)
    ids = torch.tensor([[5, 9, 14, 3]])
    with torch.no_grad():
        before = lm(ids).logits
        n = pack_linears(lm, min_side=0)
        packed, ran = ran_packed(lambda: lm(ids).logits)
        assert ran and unpack_linears(lm) == n and not packed_layers(lm)
        after = lm(ids).logits
    assert torch.allclose(packed, before, atol=1e-5) and torch.equal(after, before)


@pytest.fixture(scope="module")
def wide_ar_dir(tmp_path_factory):
    """A tiny Llama whose attention and MLP layers reach MIN_SIDE (the head, 96 x 256, does not)."""
    path = tmp_path_factory.mktemp("wide_ar")
    tiny_llama(seed=3, hidden_size=256, intermediate_size=512).save_pretrained(path)
    return path


@needs_packing
def test_load_packs_on_the_cpu_in_float32(wide_ar_dir):
    packed = checkpoints.load(str(wide_ar_dir), device="cpu", dtype=torch.float32)
    plain = checkpoints.load(str(wide_ar_dir), device="cpu", dtype=torch.float32, pack=False)
    assert packed.info()["packed_linears"] > 0 and plain.info()["packed_linears"] == 0
    assert part_sizes(packed)["packed_weight_bytes"] > 0 and part_sizes(plain)["packed_weight_bytes"] == 0
    assert not packed_layers(checkpoints.load(str(wide_ar_dir), device="cpu", dtype=torch.bfloat16))
    head = packed.context_lm.get_output_embeddings()
    assert type(head) is nn.Linear and head.weight.is_contiguous()   # narrower than MIN_SIDE, not relaid either
    assert plain.context_lm.get_output_embeddings().weight.stride(0) == 1   # no packing: relaid for MKL
    cfg = SamplerConfig(max_new_tokens=8, block_size=4, steps=4, seed=0)
    prompt = [[5, 17, 42, 8, 30]]
    for run in (ar_generate, diffusion_generate):
        (done_p, ran), done_q = ran_packed(lambda: list(run(packed, prompt, cfg))[-1]), list(run(plain, prompt, cfg))[-1]
        assert ran and done_p.token_ids == done_q.token_ids, run.__name__
    ctx_p, last_p = packed.prefill(prompt)
    ctx_q, last_q = plain.prefill(prompt)
    assert torch.allclose(last_p, last_q, atol=1e-5)
    x = torch.tensor([[MASK_ID] * 4])
    with torch.no_grad():
        assert torch.allclose(packed.denoise(x, packed.block_inputs(ctx_p, 4)),
                              plain.denoise(x, plain.block_inputs(ctx_q, 4)), atol=1e-5)


@needs_packing
def test_a_gated_lora_denoiser_packs_its_base_shares_it_and_keeps_its_text(wide_ar_dir, tmp_path):
    """The default model's shape: a clean_as_ar denoiser, its LoRA adapter unmerged and gated."""
    ctx, tok = checkpoints.load_ar(wide_ar_dir, "cpu", torch.float32)
    model = checkpoints.build(ctx, tok, MASK_ID, learned_mask=True, name="gated", anchor=True, clean_as_ar=True)
    peft_model = random_lora(model.denoiser_lm, seed=9, std=0.2)
    out = checkpoints.save(model, tmp_path / "ck", context=str(wide_ar_dir), lora_model=peft_model, lora=dict(LORA),
                           dtype=torch.float32)
    cfg = SamplerConfig(max_new_tokens=8, block_size=4, steps=4, seed=0, remasking="verify", threshold=0.2)
    for share_base in (False, True):
        packed, plain = (checkpoints.load(str(out), device="cpu", dtype=torch.float32, share_base=share_base, pack=p)
                         for p in (True, False))
        layers = packed_layers(packed)
        assert layers and not any("lora_" in n for n, m in packed.named_modules() if isinstance(m, PackedLinear))
        shared = {id(m.packed) for m in packed_layers(packed.context_lm)}
        assert all(id(m.packed) in shared for m in packed_layers(packed.denoiser_lm))   # the towers share them
        prompt = [[5, 17, 42, 8, 30]]
        for run in (ar_generate, diffusion_generate):
            (done_p, ran), done_q = ran_packed(lambda: list(run(packed, prompt, cfg))[-1]), list(run(plain, prompt, cfg))[-1]
            assert ran and done_p.token_ids == done_q.token_ids, (share_base, run.__name__)
        ctx, _ = packed.prefill(prompt)                              # the gated pass runs its base layers packed
        with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            packed.denoise(torch.tensor([[MASK_ID] * 4]), packed.block_inputs(ctx, 4))
        calls = sum(e.name == "mkldnn::_linear_pointwise" for e in prof.events())
        assert calls >= len(packed_layers(packed.denoiser_lm)) > 0, share_base


@needs_packing
def test_compile_puts_plain_layers_back(wide_ar_dir):
    model = checkpoints.load(str(wide_ar_dir), device="cpu", dtype=torch.float32).compile()   # lazy: nothing compiles yet
    assert not packed_layers(model) and model.info()["packed_linears"] == 0
    assert model.context_lm.get_output_embeddings().weight.stride(0) == 1


@needs_packing
def test_no_pack_flags(wide_ar_dir, capsys):
    from twotower.cli import main
    for flags, expected in (([], True), (["--no-pack"], False)):
        assert main(["info", str(wide_ar_dir), "--device", "cpu", "--json", *flags]) == 0
        info = json.loads(capsys.readouterr().out)
        assert (info["packed_linears"] > 0) is expected and (info["packed_weight_bytes"] > 0) is expected
    from twotower import bench, evaluate, generate_cmd
    import argparse
    for module, name in ((generate_cmd, "generate"), (evaluate, "eval"), (bench, "bench")):
        parser = argparse.ArgumentParser()
        module.add_parser(parser.add_subparsers())
        assert parser.parse_args([name, "--no-pack"]).no_pack is True


def test_head_for_one_row_keeps_the_logits_and_the_tie():
    lm = tiny_llama(seed=7)                                      # tied input embedding and head
    ids = torch.tensor([[5, 9, 2, 40]])
    with torch.no_grad():
        before = lm(ids).logits
    head_for_one_row(lm)
    w = lm.get_output_embeddings().weight
    assert w.stride() == (1, w.shape[0])                         # (V, H) read from a contiguous (H, V)
    assert lm.get_input_embeddings().weight is w                 # still one matrix
    with torch.no_grad():
        assert torch.allclose(lm(ids).logits, before, atol=1e-5)
    head_for_one_row(lm)                                         # a second call changes nothing
    assert lm.get_output_embeddings().weight is w


def test_head_for_one_row_leaves_an_untied_embedding_alone():
    lm = tiny_llama(seed=7, tie_word_embeddings=False)
    embedding = lm.get_input_embeddings().weight
    head_for_one_row(lm)
    assert lm.get_input_embeddings().weight is embedding and embedding.is_contiguous()
    assert lm.get_output_embeddings().weight.stride(0) == 1
