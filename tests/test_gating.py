"""The per-token adapter gate: adapted rows equal peft's own LoRA forward, closed rows the base."""
import pytest
import torch

from twotower.gating import AdapterGate

from .tiny import random_lora, tiny_llama


def gated_layer():
    """One peft LoRA linear layer (random A and B) of a tiny Llama, with a gate installed."""
    from peft.tuners.lora import Linear
    lm = tiny_llama(seed=3)
    random_lora(lm, seed=4, std=0.5)
    gate = AdapterGate(lm)
    layer = next(m for m in lm.modules() if isinstance(m, Linear))
    return gate, layer


@pytest.mark.parametrize("grad", [False, True])
def test_gated_rows_are_peft_adapted_and_closed_rows_the_base(grad):
    gate, layer = gated_layer()
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
    open_rows = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 0, 1]], dtype=torch.bool).unsqueeze(-1)   # (B, S, 1)
    with torch.no_grad():
        adapted, base = layer(x), layer.base_layer(x)          # no gate: peft's own forward
    assert (adapted - base).abs().max() > 1e-2                 # the random adapter changes the output
    with torch.set_grad_enabled(grad), gate(open_rows):
        got = layer(x)
    want = torch.where(open_rows, adapted, base)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.equal(got[~open_rows.squeeze(-1)], base[~open_rows.squeeze(-1)])   # exactly the base


def test_gated_adapter_trains_through_the_gate():
    gate, layer = gated_layer()
    name = layer.active_adapters[0]
    x = torch.randn(1, 4, layer.in_features)
    with gate(torch.tensor([[1, 0, 1, 0]], dtype=torch.bool).unsqueeze(-1)):
        layer(x).square().sum().backward()
    assert layer.lora_A[name].weight.grad.abs().sum() > 0
    assert layer.lora_B[name].weight.grad.abs().sum() > 0


def test_a_model_without_lora_layers_is_refused():
    with pytest.raises(ValueError, match="no LoRA adapter layers"):
        AdapterGate(tiny_llama())
