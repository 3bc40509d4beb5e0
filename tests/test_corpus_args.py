"""The corpus command checks every option before it loads a model or samples a token."""
from __future__ import annotations

import pytest

from twotower import checkpoints
from twotower import corpus as corpus_module
from twotower.cli import build_parser


def args_of(tmp_path, *extra: str):
    argv = ["corpus", "--out", str(tmp_path / "c"), "--device", "cpu", *extra]
    return build_parser(argv).parse_args(argv)


@pytest.mark.parametrize("extra,message", [
    (["--prompts", "-1"], "--prompts must be >= 1, got -1"),
    (["--prompts", "0"], "--prompts must be >= 1, got 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["--batch", "0"], "--batch must be >= 1, got 0"),
    (["--temperature", "-1"], r"--temperature must be a finite number >= 0 \(0 = greedy\), got -1.0"),
    (["--temperature", "nan"], "--temperature must be a finite number >= 0"),
    (["--question-share", "1.5"], r"--question-share must be in \[0, 1\], got 1.5"),
    (["--opening-share", "-0.1"], r"--opening-share must be in \[0, 1\], got -0.1"),
    (["--public-domain-share", "-0.5"], "--public-domain-share must be a finite number >= 0, got -0.5"),
    (["--public-domain-share", "inf"], "--public-domain-share must be a finite number >= 0, got inf"),
    (["--max-seconds", "0"], r"--max-seconds must be > 0 \(default: no limit\), got 0.0"),
    (["--max-seconds", "nan"], "--max-seconds must be > 0"),
    (["--text-dir", "/nonexistent/texts"], "--text-dir must be an existing directory, got '/nonexistent/texts'"),
])
def test_bad_options_fail_before_any_model_loads(tmp_path, monkeypatch, extra, message):
    monkeypatch.setattr(checkpoints, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match=message):
        corpus_module.build(args_of(tmp_path, *extra))


def test_text_dir_must_be_a_directory_and_out_not_a_file(tmp_path):
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(ValueError, match="--text-dir must be an existing directory"):
        corpus_module.check_args(args_of(tmp_path, "--text-dir", str(tmp_path / "a.txt")))
    argv = ["corpus", "--out", str(tmp_path / "a.txt")]
    with pytest.raises(ValueError, match="--out must be a directory, got the file"):
        corpus_module.check_args(build_parser(argv).parse_args(argv))


def test_defaults_and_meaningful_edges_pass(tmp_path):
    corpus_module.check_args(args_of(tmp_path))
    corpus_module.check_args(args_of(tmp_path, "--prompts", "1", "--temperature", "0", "--public-domain-share", "2",
                                     "--question-share", "0", "--opening-share", "1", "--text-dir", str(tmp_path),
                                     "--max-seconds", "0.5"))
