"""The evaluation: metric functions on hand-made inputs, the eval assets, and `eval` end to end."""
from __future__ import annotations

import json
import math

import pytest
import torch

from twotower import cli, eval_report, evaluate, metrics
from twotower.events import BlockCommitted, Step, Token


# ---- answer matching ------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("The Capital of France is PARIS!", "capital of france is paris"),
    ("An apple a day", "apple day"),
    ("twenty-one", "21"),
    ("one hundred and five", "105"),
    ("two thousand and twenty four", "2024"),
    ("one two three", "1 2 3"),
    ("It costs 1,000 dollars.", "it costs 1000 dollars"),
    ("Pi is 3.14", "pi is 3.14"),
    ("Seven and eight", "7 and 8"),
    ("“Hello,” she said—loudly…", "hello she said loudly"),
    ("", ""),
])
def test_normalise(text, expected):
    assert metrics.normalise(text) == expected


def test_words_to_digits_leaves_other_words():
    assert metrics.words_to_digits(["no", "one", "and", "only"]) == ["no", "1", "and", "only"]
    assert metrics.words_to_digits(["ninety", "nine", "bottles"]) == ["99", "bottles"]
    assert metrics.words_to_digits(["zero", "one"]) == ["0", "1"]


@pytest.mark.parametrize("text, span", [
    ("The capital of France is Paris. It is big.", "The capital of France is Paris"),
    ("\n\n1. Red\n2. Blue", "Red"),
    ("Sure! Paris is the answer.", "Sure"),
    ("It is 3.5 metres long. Yes.", "It is 3.5 metres long"),
    ("It was written by J.K. Rowling. She is British.", "It was written by J.K. Rowling"),   # initials
    ("Dr. Watson. Yes.", "Dr. Watson"),
    ("no sentence end", "no sentence end"),
    ("", ""),
])
def test_answer_span(text, span):
    assert metrics.answer_span(text) == span


@pytest.mark.parametrize("output, answers, ok", [
    ("The capital of France is Paris.", ["paris"], True),
    ("Parisian food is great.", ["paris"], False),                  # whole words only
    ("7 + 5 = twelve", ["12"], True),                              # number words -> digits
    ("The answer is 12.", ["12"], True),
    ("The answer is 120.", ["12"], False),
    ("Paris is lovely. The capital of France is Lyon.", ["lyon"], False),  # first sentence only
    ("Lyon.\nThe capital is Paris.", ["paris"], False),            # first line only
    ("It is New Delhi.", ["new delhi"], True),                     # multi-word answers
    ("It is Delhi.", ["new delhi"], False),
    ("An apple a day keeps the doctor away.", ["doctor away"], True),
    ("Yes, the sun is hot.", ["no"], False),
])
def test_is_correct(output, answers, ok):
    assert metrics.is_correct(output, answers) is ok


def test_contains_words_needs_a_needle():
    assert not metrics.contains_words("anything", "")
    assert metrics.contains_words("a b c", "b c")
    assert not metrics.contains_words("a bc", "b")


def test_retention():
    assert metrics.retention(0.3, 0.6) == pytest.approx(0.5)
    assert math.isnan(metrics.retention(0.3, 0.0))


# ---- agreement and repetition ---------------------------------------------------------------
def test_agreement():
    assert metrics.agreement([1, 2, 3, 4], [1, 2, 3, 4], n=4) == 1.0
    assert metrics.agreement([1, 2, 3, 4], [1, 9, 3, 9], n=4) == 0.5
    assert metrics.agreement([1, 2], [1, 2, 3, 4], n=4) == 0.5      # early stop disagrees
    assert metrics.agreement([1, 2], [1, 2], n=4) == 1.0            # both ended: agree
    assert metrics.agreement(list(range(40)), list(range(32)) + [0] * 8, n=32) == 1.0


def test_distinct_n():
    assert metrics.distinct_n([1, 2, 3, 4], 2) == 1.0
    assert metrics.distinct_n([1, 1, 1, 1], 2) == pytest.approx(1 / 3)
    assert metrics.distinct_n([5, 6, 5, 6, 5], 2) == pytest.approx(2 / 4)
    assert math.isnan(metrics.distinct_n([1], 2))


def test_longest_repeat():
    assert metrics.longest_repeat([]) == 0
    assert metrics.longest_repeat([1, 2, 3]) == 0
    assert metrics.longest_repeat([1, 2, 3, 1, 2, 4]) == 2
    assert metrics.longest_repeat([7, 7, 7, 7]) == 3                # overlapping occurrences count
    assert metrics.longest_repeat(list("abcXabcYabc")) == 3


def test_token_nll_counts_only_masked_targets():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))
    targets = torch.tensor([[0, 1]])
    sums, counts = metrics.token_nll(logits, targets, torch.tensor([[True, True]]))
    assert sums[0] == pytest.approx(-math.log(0.5) - math.log(0.8), rel=1e-5) and counts == [2]
    sums, counts = metrics.token_nll(logits, targets, torch.tensor([[False, True]]))
    assert sums[0] == pytest.approx(-math.log(0.8), rel=1e-5) and counts == [1]


def test_mean_skips_nan():
    assert metrics.mean([1.0, math.nan, 3.0]) == 2.0
    assert math.isnan(metrics.mean([]))


# ---- evaluation helpers ----------------------------------------------------------------------
def test_row_nfe_counts_each_row_as_if_alone():
    counter = evaluate.RowNFE(2, eos={2}, stop_at_eos=True)
    for t in ([1.0, 1.0], [0.5, 0.0], [0.25, 0.0]):               # row 1 finished its block early
        counter.update(Step(block=0, step=0, t=t, tokens=[], committed=[], planned=[], confidence=[],
                            top_ids=[], top_probs=[], elapsed=0.0, nfe=0))
    counter.update(BlockCommitted(block=0, tokens=[[5, 6], [2, 6]], steps_used=3, elapsed=0.0))
    counter.update(Step(block=1, step=0, t=[1.0, 1.0], tokens=[], committed=[], planned=[], confidence=[],
                        top_ids=[], top_probs=[], elapsed=0.0, nfe=0))
    assert counter.nfe == [4, 1]                                    # row 1 ended in block 0

    ar = evaluate.RowNFE(2, eos={2}, stop_at_eos=True)
    for tokens in ([5, 2], [6, 7], [2, 7]):
        ar.update(Token(index=0, tokens=tokens, confidence=[], top_ids=[], top_probs=[], elapsed=0.0, nfe=0))
    assert ar.nfe == [3, 1]


def test_take_covers_every_category():
    items = [{"category": c, "id": f"{c}{i}"} for c in "abc" for i in range(5)]
    picked = evaluate.take(items, 4)
    assert [x["id"] for x in picked] == ["a0", "b0", "c0", "a1"]
    assert evaluate.take(items, None) == items


# ---- the shipped eval sets -------------------------------------------------------------------
def test_qa_set_is_well_formed():
    items = evaluate.load_qa()
    assert len(items) >= 220
    assert len({x["id"] for x in items}) == len(items)
    assert {x["category"] for x in items} == {"facts", "arithmetic", "word", "completion", "instruction"}
    for item in items:
        assert item["answers"] and all(metrics.normalise(a) == a for a in item["answers"]), item["id"]


def test_open_prompts():
    prompts = evaluate.load_prompts()
    assert 30 <= len(prompts) <= 60 and len(set(prompts)) == len(prompts)


# ---- end to end --------------------------------------------------------------------------------
def test_eval_end_to_end(ar_dir_tok, tmp_path, capsys):
    """The command on a tiny random model + tiny BPE tokenizer (conftest's ar_dir_tok), sweep included."""
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(ar_dir_tok), "--device", "cpu", "--limit", "4", "--max-new-tokens", "24",
            "--answer-tokens", "8", "--speed-prompts", "2", "--batch-size", "3", "--sweep",
            "--sweep-thresholds", "0.5,0.9", "--sweep-steps", "2,4", "--out", str(out), "--json"]
    assert cli.main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["settings"]["qa_items"] == 4 and res["settings"]["open_prompts"] == 4
    assert res["device"].startswith("CPU")
    for mode in ("ar", "diffusion"):
        assert 0.0 <= res[mode]["qa"]["accuracy"] <= 1.0
        assert res[mode]["wallclock"]["tokens_per_second"] > 0
        assert res[mode]["speed"]["open"]["tokens_per_nfe"] > 0
    assert 0.0 <= res["comparison"]["agreement"] <= 1.0
    assert len(res["sweep"]) == 4
    assert {"results.json", "report.md", "qa_outputs.jsonl", "open_outputs.jsonl", "sweep.csv", "sweep.md",
            "sweep.html"} <= {p.name for p in out.iterdir()}
    rows = [json.loads(line) for line in (out / "qa_outputs.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {"ar", "diffusion", "ar_correct", "diffusion_correct"} <= set(rows[0])


def test_eval_settings_start_from_the_models_recommended_ones_and_stay_greedy():
    from argparse import Namespace
    args = Namespace(block_size=None, steps=None, threshold=None, remasking=None, seed=0,
                     repetition_penalty=None, no_repeat_ngram_size=None, draft_nodes=None, answer_tokens=24, max_new_tokens=32)
    recommended = {"remasking": "leftmost", "temperature": 0.7, "threshold": 0.8, "no_repeat_ngram_size": 4}
    qa, free = evaluate.configs(args, recommended)
    assert (free.remasking, free.threshold, free.temperature, free.steps) == ("leftmost", 0.8, 0.0, 16)
    assert (qa.no_repeat_ngram_size, free.no_repeat_ngram_size, free.repetition_penalty) == (4, 4, 1.0)
    assert (qa.max_new_tokens, free.max_new_tokens) == (24, 32)
    args.remasking, args.threshold = "margin", 0.5
    assert (evaluate.configs(args, recommended)[1].remasking, evaluate.configs(args, recommended)[1].threshold) == \
        ("margin", 0.5)
    assert evaluate.configs(args)[1].remasking == "margin"


def test_accuracy_on_items_the_model_was_not_trained_on():
    items = [{"id": f"q{i}", "category": "facts", "answers": ["paris"]} for i in range(4)]
    gen = evaluate.Generation(texts=["Paris.", "Paris.", "Rome.", "Rome."])
    assert "accuracy_unseen" not in evaluate.score_qa(items, gen)
    scored = evaluate.score_qa(items, gen, seen=frozenset({"q0", "q1"}))
    assert scored["accuracy"] == 0.5 and scored["accuracy_unseen"] == 0.0
    assert evaluate.score_qa(items, gen, seen=frozenset({"q2"}))["accuracy_unseen"] == pytest.approx(2 / 3)


def test_eval_reports_retention_without_the_items_seen_in_training(ar_dir_tok, tmp_path, capsys):
    from twotower import checkpoints
    model = checkpoints.load(str(ar_dir_tok), device="cpu")
    first = evaluate.take(evaluate.load_qa(), 3)[0]["id"]
    model.eval_items_seen = frozenset({first, "not-an-item"})
    ck = checkpoints.save(model, tmp_path / "ck", context=str(ar_dir_tok))
    argv = ["eval", "--model", str(ck), "--device", "cpu", "--limit", "3", "--max-new-tokens", "8",
            "--answer-tokens", "6", "--speed-prompts", "0", "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["settings"]["qa_items_seen_in_training"] == [first]
    for mode in ("ar", "diffusion"):
        correct = [r[f"{mode}_correct"] for r in map(json.loads, (tmp_path / "out" / "qa_outputs.jsonl").open())]
        assert res[mode]["qa"]["accuracy_unseen"] == pytest.approx(sum(correct[1:]) / 2)
    assert "qa_retention_unseen" in res["comparison"]
    assert "the 2 items not in its training" in capsys.readouterr().out


def test_generate_keeps_prompt_order_across_batches(ar_dir_tok):
    """Batching (length-sorted, left-padded) gives the same greedy AR tokens as one by one."""
    from twotower import checkpoints
    model = checkpoints.load(str(ar_dir_tok), device="cpu")
    data = evaluate.encode_all(model, evaluate.take(evaluate.load_qa(), 3), evaluate.load_prompts()[:2])
    cfg = evaluate.SamplerConfig(max_new_tokens=12)
    a = evaluate.generate(model, data.open_ids, cfg, "ar", batch_size=2)
    b = evaluate.generate(model, data.open_ids, cfg, "ar", batch_size=1)
    assert evaluate.mean_agreement(a, b, 12) == 1.0
    assert all(n >= len(ids) for n, ids in zip(a.nfe, a.ids))


def test_the_report_names_the_repeat_guards():
    assert eval_report.guards_text({"repetition_penalty": 1.1, "no_repeat_ngram_size": 4}) == \
        "repetition penalty 1.1, no repeated 4-grams"
    assert eval_report.guards_text({"repetition_penalty": 1.0, "no_repeat_ngram_size": 0}) == "no repeat guards"
    assert eval_report.guards_text({}) == "no repeat guards"                  # results from before the guards


# ---- bad input: refused before the model loads, naming the option or file ------------------------
@pytest.fixture
def no_model(monkeypatch):
    """Fail loudly if a command gets as far as loading a model."""
    from twotower import generate_cmd

    def load_model(args):
        raise AssertionError("the model was loaded before the options were checked")
    monkeypatch.setattr(generate_cmd, "load_model", load_model)


def eval_args(*argv):
    argv = ["eval", "--device", "cpu", *argv]
    return cli.build_parser(argv).parse_args(argv)


@pytest.mark.parametrize("argv, message", [
    (["--answer-tokens", "0"], "--answer-tokens must be a positive integer, got 0"),
    (["--max-new-tokens", "-1"], "--max-new-tokens must be a positive integer, got -1"),
    (["--limit", "0"], "--limit must be a positive integer, got 0"),
    (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    (["--speed-prompts", "-1"], r"--speed-prompts must be >= 0 \(0 = skip\), got -1"),
    (["--steps", "0"], "steps must be a positive integer, got 0"),
    (["--threshold", "1.5"], r"threshold must lie in \[0, 1\], got 1.5"),
    (["--draft-nodes", "-1"], "draft_nodes must be an integer from 0 .*, got -1"),
    (["--sweep", "--sweep-steps", "4,0"], "--sweep-steps must be positive integers, got 0"),
    (["--sweep", "--sweep-thresholds", "0.5,1.2"], r"--sweep-thresholds must lie in \[0, 1\], got 1.2"),
    (["--sweep", "--sweep-thresholds", ","], "must each list at least one value"),
])
def test_eval_refuses_impossible_options_before_loading(no_model, argv, message):
    args = eval_args(*argv)
    with pytest.raises(ValueError, match=message):
        args.func(args)


def test_eval_reads_its_files_before_loading(no_model, tmp_path):
    bad = tmp_path / "qa.jsonl"
    bad.write_text('{"id": 1,\n')
    args = eval_args("--qa", str(bad))
    with pytest.raises(ValueError, match=r"qa.jsonl:1: not valid JSON"):
        args.func(args)


def test_load_qa_names_the_file_and_line(tmp_path):
    path = tmp_path / "qa.jsonl"
    good = json.dumps({"id": "a", "category": "facts", "prompt": "p?", "answers": ["x"]})
    for text, message in ((f'{good}\n\n{{"id": 1,\n', r"qa.jsonl:3: not valid JSON: Expecting property name"),
                          (f"{good}\n[1, 2]\n", r"qa.jsonl:2: a QA item must be a JSON object, got \[1, 2\]"),
                          (good.replace('["x"]', '"x"'), r"qa.jsonl:1: .*answers a list of strings")):
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            evaluate.load_qa(path)
    path.write_bytes(good.encode() + b"\n\xff\n")
    with pytest.raises(ValueError, match=r"qa.jsonl:2: not UTF-8 text \(byte 0xff\)"):
        evaluate.load_qa(path)


def test_load_prompts_names_a_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"Tell me a story.\nCaf\xe9\n")
    with pytest.raises(ValueError, match=r"prompts.txt:2: not UTF-8 text \(byte 0xe9\)"):
        evaluate.load_prompts(path)
