"""Pure metric functions of the evaluation: answer matching, agreement, repetition, NLL.

Answer matching rule (used by `python -m twotower eval` on assets/eval/qa.jsonl):
  1. The answer span is the first non-empty line of the output, without a leading list
     marker ("1.", "-", "*"), cut at its first sentence end: '.', '!' or '?' followed by a
     space or the end of the line, not after an initial ("J. K.") or a title ("Dr.").
  2. Span and accepted answers are normalised alike (`normalise`): lowercase; commas inside
     numbers dropped ("1,000" -> "1000"); punctuation becomes a space; the articles a, an,
     the are dropped; runs of number words become digits ("twenty-one" -> "21").
  3. The output is correct if any accepted answer, as a whole-word sequence, occurs in the
     normalised span ("paris" matches "the capital of france is paris" but not "parisian").
"""
from __future__ import annotations

import math
import re
import string

ARTICLES = {"a", "an", "the"}
VALUES = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen".split())}
VALUES.update({w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), 2)})
# which kind of number word may follow which (None = start of a number)
FOLLOWS = {None: {"zero", "unit", "teen", "tens", "hundred", "thousand"}, "zero": set(),
           "unit": {"hundred", "thousand"}, "teen": {"hundred", "thousand"}, "tens": {"unit", "thousand"},
           "hundred": {"unit", "teen", "tens", "thousand", "and"}, "thousand": {"unit", "teen", "tens", "and"},
           "and": {"unit", "teen", "tens"}}
_LIST_MARKER = re.compile(r"^\s*(?:\d+[.)]|[-*•])\s+")
# a sentence ends at . ! ? before a space or the end, except after an initial ("J. K.") or a
# title (Mr. Mrs. Ms. Dr. St.)
_SENTENCE_END = re.compile(r"(?<!\b[A-Z])(?<!\bMr)(?<!\bMrs)(?<!\bMs)(?<!\bDr)(?<!\bSt)[.!?](?=\s|$)")
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}“”‘’«»…–—]")


# ---- answers --------------------------------------------------------------------------
def answer_span(text: str) -> str:
    """The first non-empty line of `text` without a leading list marker, cut after its first sentence."""
    line = next((l for l in text.splitlines() if l.strip()), "")
    line = _LIST_MARKER.sub("", line)
    end = _SENTENCE_END.search(line)
    return line[: end.start()] if end else line


def _kind(word: str) -> str | None:
    """The kind of a number word (zero, unit, teen, tens, hundred, thousand), 'and', or None."""
    if word in ("hundred", "thousand", "and"):
        return word
    value = VALUES.get(word)
    if value is None:
        return None
    return "zero" if value == 0 else "unit" if value < 10 else "teen" if value < 20 else "tens"


def _read_number(words: list[str], i: int) -> tuple[int, int]:
    """Parse the number that starts at words[i]; returns (value, index just after it)."""
    total, group, last = 0, 0, None
    while i < len(words):
        kind = _kind(words[i])
        if kind == "and" and not (i + 1 < len(words) and _kind(words[i + 1]) in FOLLOWS["and"]):
            break
        if kind not in FOLLOWS[last] or (kind == "hundred" and group >= 100):
            break
        if kind == "hundred":
            group = max(group, 1) * 100
        elif kind == "thousand":
            total, group = max(group, 1) * 1000, 0
        elif kind != "and":
            group += VALUES[words[i]]
        last, i = kind, i + 1
    return total + group, i


def words_to_digits(words: list[str]) -> list[str]:
    """Replace each run of English number words by its digits: ['twenty', 'one'] -> ['21'].

    Covers 0..999,999 ("one hundred and five" -> '105'). A word that cannot continue the
    number starts a new one, so "one two three" stays three numbers.
    """
    out, i = [], 0
    while i < len(words):
        if _kind(words[i]) in (None, "and"):
            out.append(words[i])
            i += 1
        else:
            value, i = _read_number(words, i)
            out.append(str(value))
    return out


def normalise(text: str) -> str:
    """Lowercase, drop punctuation and articles, number words -> digits; words joined by spaces."""
    text = text.lower()
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text)              # 1,000 -> 1000
    text = re.sub(r"(?<=\d)\.(?=\d)", "<dot>", text)           # keep decimal points
    text = _PUNCT.sub(" ", text.replace("<dot>", "\0")).replace("\0", ".")
    words = [w for w in text.split() if w not in ARTICLES]
    return " ".join(words_to_digits(words))


def contains_words(haystack: str, needle: str) -> bool:
    """Whole-word match of the word sequence `needle` inside `haystack` (both normalised)."""
    if not needle:
        return False
    return f" {needle} " in f" {haystack} "


def is_correct(output: str, answers: list[str]) -> bool:
    """The QA rule of the module docstring: any accepted answer in the normalised answer span."""
    span = normalise(answer_span(output))
    return any(contains_words(span, normalise(a)) for a in answers)


def retention(value: float, baseline: float) -> float:
    """Quality retained relative to the baseline (value / baseline); nan when the baseline is 0."""
    return value / baseline if baseline else math.nan


# ---- agreement and repetition -------------------------------------------------------------
def agreement(a: list[int], b: list[int], n: int = 32) -> float:
    """Fraction of the first n positions where two token sequences hold the same token.

    A sequence that ended earlier is padded with an end marker, so two sequences that both
    ended at a position agree there and an early stop disagrees with a token.
    """
    pad = lambda s: list(s[:n]) + [None] * (n - len(s[:n]))
    return sum(x == y for x, y in zip(pad(a), pad(b))) / n


def ngrams(tokens: list, n: int) -> list[tuple]:
    return [tuple(tokens[i: i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(tokens: list, n: int) -> float:
    """Distinct n-grams / all n-grams of one sequence (1.0 = no repeats; nan if too short)."""
    grams = ngrams(tokens, n)
    return len(set(grams)) / len(grams) if grams else math.nan


def longest_repeat(tokens: list) -> int:
    """Length of the longest n-gram that occurs at least twice (occurrences may overlap)."""
    n = 0
    while True:
        grams = ngrams(tokens, n + 1)
        if len(set(grams)) == len(grams):
            return n
        n += 1


# ---- likelihood --------------------------------------------------------------------------
def token_nll(logits, targets, mask):
    """Summed negative log-likelihood and token count of `targets` under next-token logits.

    logits: (B, L, V) predicting position j+1 from position j; targets: (B, L) ids where
    targets[:, j] is the token at j+1; mask: (B, L) bool, True where a target counts.
    Returns (sum of NLL, number of counted tokens) per row, as two lists of floats/ints.
    """
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask
    return nll.sum(-1).tolist(), mask.sum(-1).tolist()


def mean(values) -> float:
    """Mean of the finite values (nan if none)."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan
