"""Shared fixtures: the repo on sys.path, a tiny tokenizer, tiny model directories on disk."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:          # `pytest tests` as well as `python -m pytest tests`
    sys.path.insert(0, str(ROOT))

# The tests run tiny models: intra-op threads only add overhead there (and thrash badly on a
# busy 2-core machine). Tests of real-sized models raise it locally (see test_smollm2.py).
torch.set_num_threads(int(os.environ.get("TWOTOWER_TEST_THREADS", "1")))

TOKENIZER_TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "What is the capital of France? Paris is the capital of France.",
    "Hello world, hello diffusion. A block of tokens is denoised step by step.",
]


# torch.compile's inductor backend builds C++ on a CPU: tests that compile need a compiler
needs_cxx = pytest.mark.skipif(not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")),
                               reason="torch.compile (inductor) needs a C++ compiler on the CPU")


def make_tokenizer(vocab_size: int = 300):
    """A byte-level BPE trained in well under a second; specials at ids 0..3 (pad, bos, eos, mask)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<mask>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TOKENIZER_TEXT, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", mask_token="<mask>")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def ar_dir(tmp_path_factory):
    """A saved tiny random Llama (vocab 96, no tokenizer): a plain AR model directory."""
    from tests.tiny import tiny_llama
    path = tmp_path_factory.mktemp("tiny_ar")
    tiny_llama(seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def ar_dir_tok(tmp_path_factory, tiny_tokenizer):
    """A saved tiny random Llama sized to the tiny tokenizer, tokenizer files included."""
    from tests.tiny import tiny_llama
    path = tmp_path_factory.mktemp("tiny_ar_tok")
    tiny_llama(seed=1, vocab_size=len(tiny_tokenizer)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path
