"""The denoiser's head: padding the rows for MKL's fast path changes nothing but the speed."""
import pytest
import torch
from torch import nn

from twotower.model import vocab_logits


@pytest.mark.parametrize("batch, rows", [(1, 1), (1, 3), (1, 7), (2, 5), (3, 4), (1, 11), (1, 17)])
def test_vocab_logits_equal_the_head(batch, rows):
    head = nn.Linear(24, 300, bias=False)
    h = torch.randn(batch, rows, 24)
    got = vocab_logits(head, h)
    assert got.shape == (batch, rows, 300)
    assert torch.allclose(got, head(h), atol=1e-5)


def test_vocab_logits_of_a_strided_slice():
    head = nn.Linear(24, 300, bias=False)
    h = torch.randn(2, 6, 24)[:, :-1]                 # the denoiser drops the anchor's last input
    assert torch.allclose(vocab_logits(head, h), head(h), atol=1e-5)
