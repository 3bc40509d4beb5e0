"""The CPU's linear fast paths: oneDNN-packed layers give nn.Linear's outputs, run the packed op
where they should and F.linear everywhere else, pack equal weights once, follow weight changes,
copy, and go back to plain layers for torch.compile; without packing the head is relaid for MKL."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from tests.tiny import MASK_ID, tiny_llama
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
    assert pack_linears(holder, min_weight=0) == 1 and isinstance(holder[0], PackedLinear)
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
        pack_linears(holder, min_weight=0)
        got, packed = ran_packed(lambda: holder(x))
    assert packed and got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)


@needs_packing
def test_outside_the_fast_path_it_is_f_linear():
    holder = packed_layer()
    x = torch.randn(3, 48, requires_grad=True)
    y, packed = ran_packed(lambda: holder(x))                       # autograd: F.linear, with a graph
    assert not packed
    y.sum().backward()
    assert x.grad is not None and holder[0].weight.grad is not None
    holder[0].weight.requires_grad_(False)                          # a trainable bias alone also needs the graph
    x.grad = None
    y, packed = ran_packed(lambda: holder(x))
    assert not packed
    y.sum().backward()
    assert x.grad is not None and holder[0].bias.grad is not None
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
    x = torch.randn(4, 48)
    with torch.no_grad():
        holder[0].weight.mul_(-2.0)                                  # in place, as load_state_dict writes
        assert torch.allclose(holder(x), nn.functional.linear(x, holder[0].weight, holder[0].bias), atol=1e-5)
        holder.to(torch.bfloat16).float()                            # moved there and back: other storage
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
    assert pack_linears(model) == 0                                  # the tiny layers are under MIN_WEIGHT
    assert pack_linears(model, min_weight=0) == n and len(packed_layers(model)) == n
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
        n = pack_linears(lm, min_weight=0)
        packed, ran = ran_packed(lambda: lm(ids).logits)
        assert ran and unpack_linears(lm) == n and not packed_layers(lm)
        after = lm(ids).logits
    assert torch.allclose(packed, before, atol=1e-5) and torch.equal(after, before)


@pytest.fixture(scope="module")
def wide_ar_dir(tmp_path_factory):
    """A tiny Llama whose attention and MLP layers reach MIN_WEIGHT (the head, 96 x 256, does not)."""
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
    assert type(head) is nn.Linear and head.weight.is_contiguous()   # under MIN_WEIGHT, not relaid either
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
