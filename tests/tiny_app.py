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


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(model, stream_interval: float, **options):
    """Serve the app with `model` on a free local port. Returns (demo, url); demo.close() ends it."""
    import app
    demo = app.build_demo(model=model, stream_interval=stream_interval)
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, server_name="127.0.0.1",
                            server_port=free_port(), **options)
    return demo, url
