"""Draft trees for the `verify` order: several drafts for the next positions, all checked in
one pass (`SamplerConfig.draft_nodes`).

The plain `verify` order drafts one run (the denoiser's likeliest token at each position over
gamma) and one pass checks it. Its weak spot is the first drafted token: the denoiser guesses it
without the token before it, which the AR model writes in the same pass. On the default model's
QA answers its top guess there is the AR model's token 49% of the time, one of its top 3 86%
of the time. And a failed draft costs the next pass its drafts (they were read after it).

A draft tree fixes both. Its nodes are the `nodes` likeliest paths of drafts after the AR model's
next token, the likelihood of a path being the product of the denoiser's probabilities of its
tokens (each over FLOOR, or over gamma when it is lower), chosen best first. Every node, and the
empty path, becomes one row of the next pass: the block as it would stand with that path written
after the committed text. Each row is an ordinary verify pass over that block: it reads its path
as the AR model does (so it checks it) and predicts past it as the denoiser does. The longest
path the AR model agrees with is kept, the AR model's token after it is committed, and that
path's row drafts the next tree. The text is the AR model's greedy text, token for token, as
with one row, or (sampling) a draw from the AR model: `decide_tree`. A pass costs `rows` times
the positions.
"""
from __future__ import annotations

import heapq
from typing import NamedTuple

import torch

from .prefix_reuse import MIN_INPUTS
from .sampling import Decision, SamplerConfig, gumbel_noise, sampling_logits

FLOOR = 0.05   # a drafted token in a tree needs this probability (or gamma, when lower)
BRANCHES = 8   # candidates per position a tree may branch into


class Rows(NamedTuple):
    """One pass's rows: a block per tree node of every prompt."""
    ids: torch.Tensor            # (N, S) block ids with the node's path written, mask id elsewhere
    owner: torch.Tensor          # (N,) the prompt of each row
    paths: list[list[int]]       # per row: the path it writes at its prompt's first open position


def likeliest_paths(ids: list[list[int]], probs: list[list[float]], start: int, nodes: int,
                    floor: float) -> list[list[int]]:
    """The `nodes` likeliest paths of drafts for positions start.. of one prompt's block, best
    first, from one pass's top candidates there (ids, probs: per position, the best first). A
    path's likelihood is the product of its tokens' probabilities (the denoiser guesses the
    positions independently); a token needs probability over `floor`. A path is never likelier
    than its prefixes, so the paths form a tree."""
    heap, paths, pushed = [(-1.0, 0, [])], [], 0
    while heap and len(paths) < nodes:
        minus_p, _, path = heapq.heappop(heap)
        if path:
            paths.append(path)
        q = start + len(path)
        for tok, p in zip(ids[q], probs[q]) if q < len(ids) else ():
            if p <= floor:
                break
            pushed += 1                                        # ties keep the order they came in
            heapq.heappush(heap, (minus_p * p, pushed, path + [tok]))
    return paths


def likeliest_chain(paths: list[list[int]], ids: list[list[int]], start: int) -> list[int]:
    """The tree's path of top-1 tokens, as deep as the tree goes (what a view shows as drafts)."""
    chain, nodes = [], {tuple(p) for p in paths}
    while start + len(chain) < len(ids) and tuple(chain + [ids[start + len(chain)][0]]) in nodes:
        chain.append(ids[start + len(chain)][0])
    return chain


def leaves(paths: list[list[int]]) -> list[list[int]]:
    """The paths of a tree that no other path extends (they draw the whole tree)."""
    inner = {tuple(p[:end]) for p in paths for end in range(len(p))}
    return [p for p in paths if tuple(p) not in inner]


def tree_nodes(paths: list[list[int]]) -> list[list[int]]:
    """Every prefix of the paths, the empty one first, each once, shorter first."""
    nodes = {(): []}
    for path in paths:
        for end in range(1, len(path) + 1):
            nodes.setdefault(tuple(path[:end]), path[:end])
    return sorted(nodes.values(), key=len)


def first_open(row: list[int], mask_id: int) -> int:
    """The first position of a block row still masked (its length when none)."""
    return next((j for j, tok in enumerate(row) if tok == mask_id), len(row))


def build_rows(x: torch.Tensor, trees: list[list[list[int]]], mask_id: int, per_prompt: int | None = None) -> Rows:
    """x: (B, S) committed ids; trees: per prompt, its candidate paths (starting at its first
    open position). Returns the rows of the next pass: one per node of each tree; with
    `per_prompt`, every prompt gets that many, the rest copies of the empty path (fixed shapes)."""
    ids, owner, paths = [], [], []
    for b, (row, tree) in enumerate(zip(x.tolist(), trees)):
        start, nodes = first_open(row, mask_id), tree_nodes(tree)
        assert per_prompt is None or len(nodes) <= per_prompt, "a tree has more nodes than its rows"
        for node in nodes + [[]] * ((per_prompt or 0) - len(nodes)):
            ids.append(row[:start] + node + row[start + len(node):])
            owner.append(b)
            paths.append(node)
    return Rows(torch.tensor(ids, device=x.device), torch.tensor(owner, device=x.device), paths)


def row_inputs(inputs: dict, owner: torch.Tensor) -> dict:
    """A block's inputs (`TwoTower.block_inputs`) with every prompt's row repeated for its tree nodes."""
    out = dict(inputs, view=inputs["view"].rows(owner), positions=inputs["positions"][owner])
    if inputs.get("mask") is not None and inputs["mask"].shape[0] > 1:
        out["mask"] = inputs["mask"][owner]
    if "anchor" in inputs:
        out["anchor"] = inputs["anchor"][owner]
    return out


def keep_rows(pred: list[list[int]], rows: Rows, starts: list[int]) -> list[int]:
    """Per prompt, the row whose whole path the AR model agrees with, the longest. A row's
    prediction at each position of its path is the AR model's token after the committed text
    and the path before it; the empty path always agrees. pred: (N, S) as lists; starts: per
    prompt, its first open position."""
    best: list[int] = [-1] * len(starts)
    for r, (path, b) in enumerate(zip(rows.paths, rows.owner.tolist())):
        start = starts[b]
        if pred[r][start:start + len(path)] == path and (best[b] < 0 or len(path) > len(rows.paths[best[b]])):
            best[b] = r
    return best


def shared_draw(scores: torch.Tensor, owner: torch.Tensor, batch: int, generator: torch.Generator | None) -> torch.Tensor:
    """A draw from softmax(scores) (N, S, V) at every row and position (Gumbel-max), with one
    noise per prompt and position shared by the prompt's rows: rows that read the same text
    before a position (the same distribution there) draw the same token."""
    noise = gumbel_noise((batch, *scores.shape[1:]), generator, scores.device)     # (B, S, V)
    return (scores + noise[owner]).argmax(-1)


def decide_tree(logits: torch.Tensor, rows: Rows, x: torch.Tensor, shown: torch.Tensor, open_: torch.Tensor,
                steps_left: int, cfg: SamplerConfig, mask_id: int, generator: torch.Generator | None = None
                ) -> tuple[Decision, list[list[list[int]]], list[int]]:
    """One tree pass's decision. logits: (N, S, V) of the rows, guarded, [MASK] forbidden;
    x: (B, S) committed ids; shown: (B, S) the drafts the last Step event showed (the likeliest
    path), mask id where none; open_: (B, S) unwritten positions of prompts that go on.

    Each row's token at each position is the AR model's choice there (greedy: its argmax;
    sampling: a draw whose noise the prompt's rows share, `shared_draw`). Per prompt, the row
    kept is the longest path that agrees with its own choices: its path and the choice after it
    are committed (with one step left, every open position, unchecked), and its predictions
    after that token make the next tree. Sampling, this walks the tree with one draw per
    position from the AR model's distribution given the text before it: the committed text is a
    draw from the AR model, whatever the tree. Returns the Decision (what each prompt's kept row
    predicted), the next trees and the kept row of each prompt. The tree is decided on the host,
    from a few small copies per pass (ids and top candidates, no logits)."""
    logits = logits.float()
    if cfg.temperature > 0:
        pred = shared_draw(sampling_logits(logits, cfg), rows.owner, x.shape[0], generator)
    else:
        pred = logits.argmax(-1)                                          # (N, S)
    x_rows, open_rows = x.tolist(), open_.tolist()
    starts = [first_open(row, mask_id) for row in x_rows]
    kept = keep_rows(pred.tolist(), rows, starts)
    logits, pred = logits[kept], pred[kept]                               # the kept rows: (B, S, V), (B, S)
    probs = logits.softmax(-1)
    conf = probs.gather(-1, pred[..., None])[..., 0]
    drafting = probs if cfg.temperature == 0 else sampling_logits(logits, cfg).softmax(-1)
    top = drafting.topk(min(cfg.draft_nodes, BRANCHES), dim=-1)           # the next tree's candidates
    top_ids, top_probs = top.indices.tolist(), top.values.tolist()
    commit = [[False] * len(row) for row in x_rows]
    drafts = [[mask_id] * len(row) for row in x_rows]                    # what the views show: the likeliest path
    trees: list[list[list[int]]] = []
    for b, row in enumerate(x_rows):
        end = starts[b] + len(rows.paths[kept[b]])                       # the AR model's token goes here
        span = range(len(row)) if steps_left == 1 else range(starts[b], min(end + 1, len(row)))
        for j in span:
            commit[b][j] = open_rows[b][j]
        more = steps_left > 1 and any(open_rows[b]) and end + 1 < len(row)
        # a path stays within the open run after the AR token (a forked block may hold later commits)
        stop = next((q for q in range(end + 1, len(row)) if not open_rows[b][q]), len(row))
        tree = likeliest_paths(top_ids[b][:stop], top_probs[b][:stop], end + 1, cfg.draft_nodes,
                               min(cfg.threshold, FLOOR)) if more else []
        chain = likeliest_chain(tree, top_ids[b], end + 1)
        drafts[b][end + 1:end + 1 + len(chain)] = chain
        trees.append(tree)
    commit, drafts = torch.tensor(commit, device=x.device), torch.tensor(drafts, device=x.device)
    new_x = torch.where(commit, pred, x)
    rejected = (shown != mask_id) & ~(commit & (pred == shown)) & open_
    planned = (drafts != mask_id).sum(-1)
    return Decision(new_x, drafts, None, pred, probs, conf, planned, commit, rejected), trees, kept


class DraftTrees:
    """The draft trees of one block's prompts, passed from pass to pass.

    With `reuse` (a clean_as_ar denoiser on a growing cache, as `TwoTower.can_reuse_prefix`), a
    pass starts at the first open position of its prompts, as a plain verify pass does: every
    row of a prompt shares its committed text, whose keys/values the kept rows write back into
    the block's view after each pass, and whose logits they keep.

    With `rows` (a static cache, whose passes keep one shape: what torch.compile and CUDA graphs
    need), every prompt runs that many rows each pass, padded with copies of its empty path.
    """

    def __init__(self, batch: int, reuse: bool, rows: int | None = None):
        self.trees: list[list[list[int]]] = [[] for _ in range(batch)]
        self.reuse, self.rows = reuse, rows
        self.logits: torch.Tensor | None = None          # (B, S, V) the kept rows' latest logits, unguarded

    def start(self, x: torch.Tensor, mask_id: int) -> int:
        """The first block position the next pass computes (0: all)."""
        if not self.reuse or self.logits is None:
            return 0
        first = min(first_open(row, mask_id) for row in x.tolist())
        return min(first, x.shape[1] + 1 - MIN_INPUTS)  # inputs: the anchor + S tokens

    def step(self, model, x: torch.Tensor, shown: torch.Tensor, inputs: dict, guard, capture,
             open_: torch.Tensor, steps_left: int, cfg: SamplerConfig, generator: torch.Generator | None = None):
        """One denoiser pass over the rows of every prompt's tree (`build_rows`), decided by
        `decide_tree`. guard: the block's RepeatGuard; capture: an AttentionCapture or None (it
        keeps the kept rows). Returns (Decision, t (B,) of the kept rows, rows per prompt, the tree
        each prompt's rows checked as its leaf paths)."""
        mask_id = model.mask_token_id
        going = open_.any(-1).tolist()                                  # a prompt that settled checks no tree
        self.trees = [tree if on else [] for tree, on in zip(self.trees, going)]
        checked = [leaves(tree) for tree in self.trees]
        rows, start = build_rows(x, self.trees, mask_id, self.rows), self.start(x, mask_id)
        view = row_inputs(inputs, rows.owner)
        t = (rows.ids == mask_id).float().mean(-1)                      # (N,) as a plain pass over each row
        raw = model.denoise(rows.ids, view, t, capture, start).float()   # (N, S - start, V)
        if start:
            raw = torch.cat([self.logits[rows.owner, :start], raw], 1)  # (N, S, V)
        paths = (rows.ids != mask_id) & (x[rows.owner] == mask_id)      # (N, S) the written paths
        logits = guard.rows(rows.owner).denoiser_pass(raw.clone(), rows.ids, mask_id, paths)
        decision, self.trees, kept = decide_tree(logits, rows, x, shown, open_, steps_left, cfg, mask_id, generator)
        kept = torch.tensor(kept, device=x.device)
        self.logits = raw[kept]
        if self.reuse:
            inputs["view"].keep(view["view"], kept)
        if capture is not None:
            capture.probs = {layer: p[kept] for layer, p in capture.probs.items()}
        return decision, t[kept], rows.owner.bincount(minlength=x.shape[0]).tolist(), checked
