"""A tiny TwoTower with a character-level tokenizer, for app tests (builds in well under 1 s)."""
from __future__ import annotations

import string

from tests.tiny import MASK_ID, VOCAB, tiny_twotower

SPECIALS = ["<pad>", "<s>", "</s>", "<mask>"]          # ids 0..3: pad, bos, eos (2), mask (3)
CHARS = " \n" + string.ascii_lowercase + string.ascii_uppercase + string.digits + ".,!?'-:;()"


def char_tokenizer():
    """One token per character; unknown characters map to <pad>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(CHARS))}
    assert len(vocab) <= VOCAB and vocab["<mask>"] == MASK_ID
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", mask_token="<mask>")


def tiny_app_model(seed: int = 0):
    """tiny_twotower with a tokenizer and room for long test runs."""
    model = tiny_twotower(seed, max_position_embeddings=4096, initializer_range=0.3)
    model.tokenizer = char_tokenizer()
    model.name = "tiny-test"
    return model
