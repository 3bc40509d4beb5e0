"""oneDNN-packed linear layers: same outputs as nn.Linear, one packed copy per distinct weight,
plain F.linear wherever packing does not apply, and a way back for torch.compile."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.tiny import MASK_ID, tiny_llama
from twotower import checkpoints, packed_linear
from twotower.packed_linear import PackedLinear, pack_linears, packed_count, unpack_linears
from twotower.sampler import ar_generate, diffusion_generate
from twotower.sampling import SamplerConfig

pytestmark = pytest.mark.skipif(not packed_linear.available(), reason="this PyTorch build has no oneDNN packing")


def linears(model):
    return [m for m in model.modules() if type(m) is nn.Linear]


@pytest.mark.parametrize("rows", [1, 3, 16])
def test_packed_output_equals_linear(rows):
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(48, 80, bias=True))
    x = torch.randn(2, rows, 48)
    expected = layer(x)
    assert pack_linears(layer) == 1 and isinstance(layer[0], PackedLinear)
    got = layer(x)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_every_linear_packed_equal_weights_packed_once_and_ties_kept():
    lm = tiny_llama(seed=0)
    copy_lm = tiny_llama(seed=0)                                   # same values, other tensors
    model = nn.ModuleDict({"a": lm, "b": copy_lm})
    n = len(linears(model))
    params = sum(p.numel() for p in model.parameters())
    assert pack_linears(model) == n and packed_count(model) == n and not linears(model)
    assert sum(p.numel() for p in model.parameters()) == params     # the originals stay parameters
    packed = [m.packed for m in model.modules() if isinstance(m, PackedLinear)]
    assert len({id(p) for p in packed}) == n // 2                   # the copy reuses every packed weight
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight   # still tied


def test_outside_the_fast_path_it_is_plain_linear():
    torch.manual_seed(1)
    layer = nn.Sequential(nn.Linear(16, 8))
    pack_linears(layer)
    x = torch.randn(3, 16, requires_grad=True)
    y = layer(x)                                                    # autograd: F.linear, with a graph
    y.sum().backward()
    assert x.grad is not None and layer[0].weight.grad is not None
    bf = torch.randn(3, 16, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError):                               # other dtypes go to F.linear, which
        layer(bf)                                                   # refuses the mix as nn.Linear does


def test_unpack_restores_plain_linears():
    lm = tiny_llama(seed=2)
    ids = torch.tensor([[5, 9, 14, 3]])
    with torch.no_grad():
        before = lm(ids).logits
        pack_linears(lm)
        packed = lm(ids).logits
        assert unpack_linears(lm) == len([m for m in lm.modules() if type(m) is nn.Linear]) and packed_count(lm) == 0
        after = lm(ids).logits
    assert torch.allclose(packed, before, atol=1e-5) and torch.equal(after, before)


def test_load_packs_on_the_cpu_in_float32(ar_dir):
    packed = checkpoints.load(str(ar_dir), device="cpu", dtype=torch.float32)
    plain = checkpoints.load(str(ar_dir), device="cpu", dtype=torch.float32, pack=False)
    assert packed_count(packed) > 0 and packed_count(plain) == 0
    assert packed_count(checkpoints.load(str(ar_dir), device="cpu", dtype=torch.bfloat16)) == 0
    cfg = SamplerConfig(max_new_tokens=8, block_size=4, steps=4, seed=0)
    prompt = [[5, 17, 42, 8, 30]]
    for run in (ar_generate, diffusion_generate):
        texts = [[e for e in run(m, prompt, cfg)][-1].token_ids for m in (packed, plain)]
        assert texts[0] == texts[1], run.__name__
    ctx_p, last_p = packed.prefill(prompt)
    ctx_q, last_q = plain.prefill(prompt)
    assert torch.allclose(last_p, last_q, atol=1e-5)
    x = torch.tensor([[MASK_ID] * 4])
    with torch.no_grad():
        assert torch.allclose(packed.denoise(x, packed.block_inputs(ctx_p, 4)),
                              plain.denoise(x, plain.block_inputs(ctx_q, 4)), atol=1e-5)
