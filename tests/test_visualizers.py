"""Visualizers on hand-made traces: compact grid data, plots, attention, race, findings, export."""
from __future__ import annotations

import json

import plotly.graph_objects as go
import pytest

from twotower.events import BlockCommitted, BlockStart, Done, Prefill, Step, Token
from twotower.trace import Trace
from visualizers import attention, compare, export, failures, plots, race, trajectory
from visualizers.pieces import visible

MASK, EOS = 3, 2
PIECES = {"2": "</s>", "3": "<mask>", "10": "The", "11": " cat", "12": " sat", "13": "\n", "14": " on",
          "20": "Hi", "21": " there"}


def step(block, step_, tokens, committed, conf, elapsed, nfe, planned=None, attention_maps=None):
    """A one-row Step; top-1 candidate = the token (or 11 while masked)."""
    top = [[t if t != MASK else 11, 12] for t in tokens]
    return Step(block=block, step=step_, t=[tokens.count(MASK) / len(tokens)], tokens=[tokens],
                committed=[committed], planned=[len(committed) if planned is None else planned],
                confidence=[conf], top_ids=[top], top_probs=[[[c, 1 - c] for c in conf]],
                elapsed=elapsed, nfe=nfe, attention=attention_maps)


def attn(size, context, heads=2):
    """(1, heads, size, context + size): all mass on key 0 (a sink) and key 1, equally."""
    row = [0.5, 0.5] + [0.0] * (context + size - 2)
    return [[[row[:] for _ in range(size)] for _ in range(heads)]]


@pytest.fixture
def diffusion_trace() -> Trace:
    """Two blocks of 4 over a 3-token prompt; block 0 takes 2 steps, block 1 ends at EOS."""
    maps = lambda ctx: {0: attn(4, ctx), 1: attn(4, ctx)}
    events = [
        Prefill(prompt_tokens=[3], seconds=0.01),
        BlockStart(block=0, start=0, size=4, steps=4),
        step(0, 0, [10, MASK, 12, MASK], [0, 2], [0.95, 0.4, 0.91, 0.2], 0.05, 1, attention_maps=maps(3)),
        step(0, 1, [10, 11, 12, 13], [1, 3], [0.95, 0.6, 0.91, 0.1], 0.10, 2, planned=0, attention_maps=maps(3)),
        BlockCommitted(block=0, tokens=[[10, 11, 12, 13]], steps_used=2, elapsed=0.11),
        BlockStart(block=1, start=4, size=4, steps=4),
        step(1, 0, [14, EOS, EOS, EOS], [0, 1, 2, 3], [0.9, 0.99, 0.99, 0.99], 0.15, 3, attention_maps=maps(7)),
        BlockCommitted(block=1, tokens=[[14, EOS, EOS, EOS]], steps_used=1, elapsed=0.16),
        Done(texts=["The cat sat\n on"], token_ids=[[10, 11, 12, 13, 14]], nfe=3, seconds=0.16,
             first_token_seconds=0.05, stopped="eos"),
    ]
    return Trace(mode="diffusion", settings={"threshold": 0.9, "block_size": 4, "steps": 4},
                 model={"mask_token_id": MASK, "eos_token_ids": [EOS]}, prompts=["Hi there"],
                 prompt_ids=[[20, 21, 13]], tokens=dict(PIECES), events=events)


@pytest.fixture
def ar_trace() -> Trace:
    events = [Prefill(prompt_tokens=[3], seconds=0.01)]
    for i, tok in enumerate([10, 11, 12]):
        events.append(Token(index=i, tokens=[tok], confidence=[0.8], top_ids=[[tok, 14]], top_probs=[[0.8, 0.1]],
                            elapsed=0.02 * (i + 1), nfe=i + 1))
    events.append(Done(texts=["The cat sat"], token_ids=[[10, 11, 12]], nfe=3, seconds=0.07,
                       first_token_seconds=0.02, stopped="length"))
    return Trace(mode="ar", settings={}, model={"mask_token_id": MASK, "eos_token_ids": [EOS]},
                 prompts=["Hi there"], prompt_ids=[[20, 21, 13]], tokens=dict(PIECES), events=events)


# ---- pieces and grid data --------------------------------------------------------------------
def test_visible_whitespace():
    assert visible(" cat\n") == "·cat⏎"
    assert visible("\t") == "⇥"
    assert visible("") == "∅"


def test_frames_are_compact_lists(diffusion_trace):
    frames, tops = trajectory.frames(diffusion_trace, top=True)
    assert len(frames) == 3 and len(tops) == 3
    block, step_, offset, tokens, guess, conf, new, planned, ms, nfe = frames[1]
    assert (block, step_, offset) == (0, 1, 0)
    assert tokens == [10, 11, 12, 13] and new == [1, 3] and planned == 0
    assert frames[0][3] == [10, -1, 12, -1]          # masked positions are -1
    assert frames[0][4] == [10, 11, 12, 11]          # the guesses of masked cells
    assert conf == [95, 60, 91, 10] and ms == 100 and nfe == 2
    assert frames[2][2] == 4                          # block 1 starts at generated index 4
    assert tops[0][0] == [[10, 12], [950, 50]]


def test_a_masked_cell_shows_its_guess_with_the_guess_probability(diffusion_trace):
    """Sampling, the token a pass chose at a masked position (whose p is `confidence`) need not
    be the top-1 guess the cell shows: the cell's p is the guess's."""
    e = diffusion_trace.events[2]
    e.confidence[0][1], e.top_probs[0][1] = 0.01, [0.4, 0.3]       # sampled a 0.01 token; best guess 0.4
    frame = trajectory.frames(diffusion_trace)[0][0]
    assert frame[4][1] == 11 and frame[5][1] == 40                # guess 11 with its own p
    assert frame[5][0] == 95                                      # committed cells keep the chosen token's p


def title_text(fig) -> tuple[str, str]:
    """A figure's title and subtitle as plain text, its line breaks undone; no line is long."""
    lines = fig.layout.title.text.split("<br>")
    main = [line for line in lines if not line.startswith("<sup>")]
    sub = [line.removeprefix("<sup>").removesuffix("</sup>") for line in lines if line.startswith("<sup>")]
    assert all(len(line) <= plots.TITLE_CHARS for line in main) and all(len(line) <= plots.SUBTITLE_CHARS for line in sub)
    return " ".join(main), " ".join(sub)


def test_plots_mark_where_the_output_ended(diffusion_trace):
    """Block 1 commits end-of-text at position 5 and two more after it: a line after position 5."""
    for fig in (plots.unmasking_map(diffusion_trace), plots.confidence_heatmap(diffusion_trace)):
        [end] = [shape for shape in fig.layout.shapes if shape.line.dash == "dash"]
        assert end.x0 == 5.5
    assert title_text(plots.tokens_per_step(diffusion_trace))[1].startswith("blank: no step there")


def test_commit_table_gives_every_position_once(diffusion_trace):
    commits = trajectory.commit_table(diffusion_trace)
    assert sorted(c.pos for c in commits) == list(range(8))
    by_pos = {c.pos: c for c in commits}
    assert (by_pos[1].step, by_pos[1].frame, by_pos[1].token) == (1, 1, 11)
    assert by_pos[3].confidence == pytest.approx(0.1)


def test_full_payload(diffusion_trace):
    data = trajectory.payload(diffusion_trace)
    json.dumps(data)                                   # plain JSON
    assert data["live"] is False and data["base"]["len"] == 0
    assert len(data["frames"]) == 3 and data["top"] is not None
    assert data["n_out"] == 5 and data["blocks"] == [[0, 4, 4], [4, 4, 4]]
    assert data["pieces"]["11"] == "·cat" and data["pieces"]["13"] == "⏎"
    assert EOS in data["special"] and MASK in data["special"]


def test_live_payload_sends_finished_blocks_once(diffusion_trace):
    data = trajectory.payload(diffusion_trace, live=True)
    assert data["live"] is True and data["top"] is None and data["findings"] == []
    assert data["first_frame"] == 2 and len(data["frames"]) == 1      # only the active block's steps
    assert data["base"]["tok"] == [10, 11, 12, 13]
    assert data["base"]["cstep"] == [0, 1, 0, 1]
    assert data["base"]["conf"] == [95, 60, 91, 10]


def test_ar_payload_lays_tokens_out_in_rows(ar_trace):
    data = trajectory.payload(ar_trace)
    assert [f[2] for f in data["frames"]] == [0, 1, 2]
    assert data["blocks"] == [[0, 3, 1]]
    assert all(f[6] == [0] for f in data["frames"])


# ---- plots ---------------------------------------------------------------------------------------
def test_unmasking_map_and_confidence(diffusion_trace):
    fig = plots.unmasking_map(diffusion_trace)
    assert isinstance(fig, go.Figure)
    assert list(fig.data[0].x) == [0, 2, 1, 3, 4, 5, 6, 7] and list(fig.data[0].y) == [0, 0, 1, 1, 0, 0, 0, 0]
    heat = plots.confidence_heatmap(diffusion_trace)
    z = heat.data[0].z
    assert z[1][1] == pytest.approx(0.6) and z[1][4] is None     # block 1 had one step only
    bars = plots.commits_per_step(diffusion_trace)
    assert list(bars.data[0].y) == [2, 0, 4] and list(bars.data[1].y) == [2, 2, 4]


def test_ar_traces_get_an_explanation_not_a_map(ar_trace):
    fig = plots.unmasking_map(ar_trace)
    assert not fig.data and "AR" in fig.layout.annotations[0].text


# ---- attention -------------------------------------------------------------------------------------
def test_attention_options_and_context(diffusion_trace):
    assert attention.options(diffusion_trace) == {"blocks": [0, 1], "layers": [0, 1], "heads": 2}
    assert attention.context_ids(diffusion_trace, 1) == [20, 21, 13, 10, 11, 12, 13]


def test_attention_sink_removal_renormalises(diffusion_trace):
    s = diffusion_trace.steps()[0]
    raw = attention.matrix(s, 0, "mean", sink=0, renormalise=False)
    assert raw.shape == (4, 3) and raw[0, 0] == pytest.approx(0.5)
    dropped = attention.matrix(s, 0, 1, sink=1, renormalise=True)
    assert dropped.shape == (4, 2)
    assert dropped.sum(1) == pytest.approx([1.0] * 4) and dropped[0, 0] == pytest.approx(1.0)
    with_block = attention.matrix(s, 0, 0, sink=0, renormalise=False, include_block=True)
    assert with_block.shape == (4, 7)


def test_attention_figure_has_a_step_slider(diffusion_trace):
    fig = attention.figure(diffusion_trace, block=0, layer=1, head="mean", sink=1)
    assert len(fig.data) == 2 and fig.data[0].visible and not fig.data[1].visible
    assert [s.label for s in fig.layout.sliders[0].steps] == ["0", "1"]
    assert list(fig.data[0].x) == ["1:·there", "2:⏎"]


def test_attention_labels_never_written_positions_as_masked(diffusion_trace):
    """A row that ended before its block did leaves positions masked: they read as masked,
    not as the mask token's own piece."""
    events = diffusion_trace.events
    events[6] = step(1, 0, [14, EOS, MASK, MASK], [0, 1], [0.9, 0.99, 0.1, 0.1], 0.15, 3,
                     attention_maps={0: attn(4, 7), 1: attn(4, 7)})
    fig = attention.figure(diffusion_trace, block=1, layer=0, include_block=True)
    assert list(fig.data[0].y)[2:] == ["2:▢ masked", "3:▢ masked"]
    assert list(fig.data[0].x)[-2:] == ["B2:▢ masked", "B3:▢ masked"]


def test_attention_survives_a_json_round_trip(diffusion_trace):
    loaded = Trace.from_dict(json.loads(json.dumps(diffusion_trace.to_dict())))   # layer keys become strings
    assert attention.options(loaded)["layers"] == [0, 1]
    assert attention.matrix(loaded.steps()[0], 1, 0).shape == (4, 3)


def test_attention_figure_without_capture_explains(ar_trace):
    fig = attention.figure(ar_trace, block=0, layer=0)
    assert "Capture" in fig.layout.annotations[0].text


# ---- race ----------------------------------------------------------------------------------------
def test_race_payload_table_and_curve(ar_trace, diffusion_trace):
    data = race.payload(ar_trace, diffusion_trace)
    json.dumps(data)
    assert [r["mode"] for r in data["runs"]] == ["ar", "diffusion"]
    assert data["runs"][1]["frames"][0] == [0, [10, -1, 12, -1], 50]
    assert data["runs"][0]["stats"]["tokens_per_nfe"] == 1.0
    xs, ys = race.curve(diffusion_trace)
    assert ys[-1] == 5 and xs == sorted(xs)            # after-EOS positions do not count
    table = race.table(ar_trace, diffusion_trace)
    assert "tokens per pass" in table and "ms per pass" in table and "took" in table
    ar_passes, diffusion_passes = ar_trace.done.context_passes, diffusion_trace.done.context_passes
    assert f"| context-tower passes | {ar_passes} | {diffusion_passes} |" in table
    assert len(race.tokens_over_time(ar_trace, diffusion_trace).data) == 2


def test_race_explains_its_ratio_as_tokens_per_pass_over_pass_cost():
    ar = {"tokens_per_second": 10.0, "tokens_per_nfe": 1.0, "seconds": 2.0, "nfe": 20}        # 100 ms a pass
    diffusion = {"tokens_per_second": 5.0, "tokens_per_nfe": 1.25, "seconds": 4.0, "nfe": 16}  # 250 ms a pass
    text = race.why(ar, diffusion)
    assert "**0.50×**" in text and "1.25× the tokens" in text and "2.50× its time" in text
    assert "more than 2.5 tokens each" in text          # 2.5x the cost needs 2.5 tokens a pass
    ahead = race.why(ar, {**diffusion, "tokens_per_second": 20.0, "tokens_per_nfe": 4.0, "nfe": 10, "seconds": 2.0})
    assert "**2.00×**" in ahead and "would get ahead" not in ahead
    assert "draft tree" not in text
    assert "ran 5.7 block rows" in race.why(ar, {**diffusion, "rows_per_pass": 5.7})


# ---- failures --------------------------------------------------------------------------------------
def test_findings(diffusion_trace):
    found = failures.findings(diffusion_trace)
    kinds = {f["kind"] for f in found}
    assert {"low-confidence", "eos-flood"} <= kinds
    low = [f for f in found if f["kind"] == "low-confidence"]
    assert low[0]["pos"] == 3 and low[0]["frame"] == 1
    assert [f["frame"] for f in found] == sorted(f["frame"] for f in found)


def test_repeats_are_found():
    trace = Trace(mode="ar", settings={}, model={}, prompts=[""], prompt_ids=[[1]], tokens=dict(PIECES),
                  events=[Done(texts=[""], token_ids=[[10, 11, 12] * 3], nfe=9, seconds=1.0,
                               first_token_seconds=0.1)])
    found = failures.findings(trace)
    assert found and found[0]["kind"] == "repeat" and "3 times" in found[0]["text"]
    assert "the repeat guards were off" in found[0]["text"]
    trace.settings = {"no_repeat_ngram_size": 4}
    assert failures.findings(trace)[0]["text"].endswith("3 times")


# ---- export --------------------------------------------------------------------------------------
def test_static_html_is_self_contained(diffusion_trace):
    diffusion_trace.prompts = ["</script><b>hi"]
    diffusion_trace.tokens["11"] = "</script>"
    page = export.static_html(diffusion_trace)
    assert page.count("</script>") == 1                 # data cannot close the script early
    assert "ttg-cell" in page and "new Function" in page


def test_trace_json_round_trips(diffusion_trace):
    loaded = Trace.from_dict(json.loads(export.trace_json(diffusion_trace, digits=3)))
    assert loaded.done.token_ids == diffusion_trace.done.token_ids
    assert len(loaded.steps()) == 3


def test_anchored_attention_keeps_block_rows_and_context_columns():
    """An anchored denoiser re-reads the last clean token: Q = 1 + S rows, K = L + S columns."""
    size, context = 4, 3
    rows = [[0.0] * (context + size) for _ in range(size + 1)]
    for r in rows:
        r[2] = 1.0                                    # everything on the anchor's key (context index 2)
    s = step(0, 0, [10, MASK, 12, MASK], [0, 2], [0.9, 0.1, 0.9, 0.1], 0.1, 1,
             attention_maps={0: [[rows]]})
    m = attention.matrix(s, 0, "mean", renormalise=False)
    assert m.shape == (size, context) and m[:, 2] == pytest.approx([1.0] * size)
    with pytest.raises(ValueError, match="head 3"):
        attention.matrix(s, 0, 3)


# ---- failure detectors on hand-made traces -----------------------------------------------------------
def one_block(steps, done_ids, eos=(EOS,)) -> Trace:
    """A diffusion trace of one block of 4 from (tokens, committed, conf, top-1 guesses) per step."""
    events = [Prefill(prompt_tokens=[1], seconds=0.01), BlockStart(block=0, start=0, size=4, steps=len(steps))]
    for i, (tokens, committed, conf, guesses) in enumerate(steps):
        events.append(Step(block=0, step=i, t=[tokens.count(MASK) / 4], tokens=[tokens], committed=[committed],
                           planned=[len(committed)], confidence=[conf], top_ids=[[[g, 14] for g in guesses]],
                           top_probs=[[[c, 1 - c] for c in conf]], elapsed=0.01 * (i + 1), nfe=i + 1))
    events.append(BlockCommitted(block=0, tokens=[steps[-1][0]], steps_used=len(steps), elapsed=0.1))
    events.append(Done(texts=[""], token_ids=[done_ids], nfe=len(steps), seconds=0.1, first_token_seconds=0.01))
    return Trace(mode="diffusion", settings={"threshold": 0.9}, model={"mask_token_id": MASK, "eos_token_ids": list(eos)},
                 prompts=["Hi"], prompt_ids=[[20]], tokens=dict(PIECES), events=events)


def test_flips_count_changes_of_the_best_guess_while_masked():
    trace = one_block([
        ([10, MASK, MASK, MASK], [0], [0.9, 0.3, 0.5, 0.5], [10, 11, 12, 13]),
        ([10, MASK, 12, MASK], [2], [0.9, 0.3, 0.9, 0.5], [10, 12, 12, 13]),     # pos 1: 11 -> 12
        ([10, 11, 12, 13], [1, 3], [0.9, 0.6, 0.9, 0.8], [10, 11, 12, 13]),      # pos 1: 12 -> 11, committed
    ], [10, 11, 12, 13])
    found = failures.flips(trace)
    assert [(f["pos"], f["frame"]) for f in found] == [(1, 2)] and "2 times" in found[0]["text"]
    assert found[0]["span"] == [1]


def test_a_committed_position_never_flips_again():
    trace = one_block([
        ([10, MASK, MASK, MASK], [0], [0.9, 0.3, 0.5, 0.5], [10, 11, 12, 13]),
        ([10, 11, 12, 13], [1, 2, 3], [0.9, 0.6, 0.9, 0.8], [14, 11, 12, 13]),   # pos 0's guess moves after its commit
    ], [10, 11, 12, 13])
    assert failures.flips(trace) == []


def test_low_confidence_keeps_the_worst_and_orders_by_frame(monkeypatch):
    monkeypatch.setattr(failures, "MAX_PER_KIND", 2)
    trace = one_block([
        ([10, 11, MASK, MASK], [0, 1], [0.05, 0.2, 0.5, 0.5], [10, 11, 12, 13]),
        ([10, 11, 12, 13], [2, 3], [0.05, 0.2, 0.1, 0.9], [10, 11, 12, 13]),
    ], [10, 11, 12, 13])
    shown, totals = failures.found(trace)
    found = [f for f in shown if f["kind"] == "low-confidence"]
    assert [(f["pos"], f["frame"]) for f in found] == [(0, 0), (2, 1)]     # p 0.05 and 0.1; 0.2 is cut
    assert totals["low-confidence"] == 3                                   # ... but counted


def test_eos_flood_marks_every_end_of_text_it_commits():
    trace = one_block([([10, EOS, EOS, EOS], [0, 1, 2, 3], [0.9, 0.99, 0.99, 0.99], [10, EOS, EOS, EOS])], [10])
    [flood] = failures.eos_floods(trace)
    assert flood["pos"] == 1 and flood["span"] == [1, 2, 3] and flood["frame"] == 0
    assert failures.eos_floods(one_block([([10, EOS, EOS, 12], [0, 1, 2, 3], [0.9] * 4, [10, EOS, EOS, 12])],
                                         [10])) == []                       # two are not a flood


def test_repeats_mark_every_occurrence():
    trace = one_block([([10, 11, 10, 11], [0, 1, 2, 3], [0.9] * 4, [10, 11, 10, 11])], [10, 11, 10, 11, 10, 11, 10])
    [rep] = [f for f in failures.findings(trace) if f["kind"] == "repeat" and "·cat" in f["text"]]
    assert rep["span"] == [0, 1, 2, 3, 4, 5, 6] and rep["pos"] == 2


def test_ar_traces_have_no_flips_or_floods(ar_trace):
    assert failures.flips(ar_trace) == [] and failures.eos_floods(ar_trace) == []


# ---- teaching aids, forks and comparisons --------------------------------------------------------
def test_tokens_per_step_per_block(diffusion_trace, ar_trace):
    fig = plots.tokens_per_step(diffusion_trace)
    assert [list(r) for r in fig.data[0].z] == [[2, 2], [4, None]]   # block 1 was full after one step
    assert [list(r) for r in fig.data[0].text] == [["2", "2"], ["4", ""]]   # blank, not "null"
    assert list(fig.data[0].y) == ["block 0", "block 1"]
    assert "AR" in plots.tokens_per_step(ar_trace).layout.annotations[0].text


def test_fork_info_marks_inherited_frames(diffusion_trace):
    assert trajectory.payload(diffusion_trace)["fork"] is None
    diffusion_trace.fork = {"block": 0, "step": 0, "inherited": 1, "parent_steps": 4,
                            "parent_settings": {"threshold": 0.5, "block_size": 4, "steps": 4}}
    info = trajectory.payload(diffusion_trace)["fork"]
    assert info["frame"] == 1 and info["changes"] == {"threshold": [0.5, 0.9]}


def test_compare_marks_differing_positions_and_lists_figures(diffusion_trace):
    other = Trace.from_dict(json.loads(json.dumps(diffusion_trace.to_dict())))
    other.events[2].tokens = [[10, MASK, 14, MASK]]                # position 2 committed as ' on', not ' sat'
    other.events[3].tokens = [[10, 11, 14, 13]]
    other.events[-1].token_ids = [[10, 11, 14, 13, 14]]
    assert compare.final_tokens(diffusion_trace) == [10, 11, 12, 13, 14, compare.END, compare.END, compare.END]
    assert compare.differences(diffusion_trace, other) == [2]
    page = compare.html(diffusion_trace, other, ("γ 0.9", "copy"))
    assert page.count('class="ttc-cell diff" data-pos="2"') == 2    # one per side
    assert "steps per block" in page and "2·1" in page and "<b>1</b> position differs" in page
    assert compare.differences(diffusion_trace, diffusion_trace) == []


def test_compare_a_fork_shows_what_it_inherited(diffusion_trace):
    fork = Trace.from_dict(json.loads(json.dumps(diffusion_trace.to_dict())))
    fork.fork = {"block": 1, "step": 0, "inherited": 2, "nfe": 2, "parent_steps": 4,
                 "parent_settings": diffusion_trace.settings}
    fork.settings = {**diffusion_trace.settings, "threshold": 0.5}
    page = compare.html(diffusion_trace, fork)
    assert compare.is_fork_of(fork, diffusion_trace) and "passes after the fork point" in page
    assert page.count("ttc-cell inh\" data-pos") == 2 * 4 and "setting: threshold" in page   # block 0, both sides


# ---- the export command -------------------------------------------------------------------------------
def test_export_command_writes_html_and_json(diffusion_trace, tmp_path, capsys):
    from twotower.cli import main
    src, page, data = tmp_path / "run.json", tmp_path / "run.html", tmp_path / "small.json"
    diffusion_trace.save(src)
    assert main(["export", str(src), "--html", str(page), "--json", str(data)]) == 0
    assert "ttg-cell" in page.read_text() and "<title>TwoTower diffusion run: run</title>" in page.read_text()
    assert Trace.load(data).done.token_ids == diffusion_trace.done.token_ids
    assert main(["export", str(src)]) == 2 and "--html" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing.json"), "--html", str(page)]) == 2


def test_findings_after_end_of_text_are_left_out():
    trace = one_block([([10, EOS, 12, 13], [0, 1, 2, 3], [0.9, 0.9, 0.1, 0.1], [10, EOS, 12, 13])], [10])
    assert [f["pos"] for f in failures.low_confidence(trace, trajectory.commit_table(trace))] == [2, 3]
    assert failures.findings(trace) == []                      # positions 2 and 3 are not in the text


def test_compare_names_a_run_by_its_settings(diffusion_trace):
    assert compare.name(diffusion_trace).startswith("diffusion · γ 0.9 · T 4 · ")
    assert "repetition" not in compare.name(diffusion_trace)
    guarded = Trace.from_dict(json.loads(json.dumps(diffusion_trace.to_dict())))
    guarded.settings = {**diffusion_trace.settings, "repetition_penalty": 1.2, "no_repeat_ngram_size": 3}
    assert compare.name(guarded).endswith(" · repetition penalty 1.2 · no repeated 3-grams")


def test_verify_frames_carry_drafts_and_the_plot_counts_dropped_ones():
    """The verify order: step 0 commits 'The' and drafts two; step 1 keeps one, drops the other
    and commits the AR model's token in its place."""
    first = step(0, 0, [10, MASK, MASK, MASK], [0], [0.95, 0.6, 0.5, 0.1], 0.05, 1, planned=2)
    first.drafts, first.rejected = [[-1, 11, 14, -1]], [[]]
    second = step(0, 1, [10, 11, 12, MASK], [1, 2], [0.95, 0.9, 0.8, 0.1], 0.10, 2, planned=0)
    second.drafts, second.rejected = [[-1, -1, -1, -1]], [[2]]
    events = [Prefill(prompt_tokens=[3], seconds=0.01), BlockStart(block=0, start=0, size=4, steps=4), first, second]
    trace = Trace(mode="diffusion", settings={"threshold": 0.2, "remasking": "verify"},
                  model={"mask_token_id": MASK, "eos_token_ids": [EOS]}, prompts=["Hi there"],
                  prompt_ids=[[20, 21, 13]], tokens=dict(PIECES), events=events)
    frames, _ = trajectory.frames(trace)
    assert frames[0][10:] == [[-1, 11, 14, -1], []] and frames[1][10:] == [[-1, -1, -1, -1], [2]]
    assert trajectory.payload(trace)["remasking"] == "verify"
    fig = plots.commits_per_step(trace)
    assert [t.name for t in fig.data] == ["new drafts over γ (checked by the next pass)", "committed: drafts that held",
                                          "committed: the AR model's token (a block's last step: all left)",
                                          "drafts dropped"]
    held, own, dropped = (list(fig.data[k].y) for k in (1, 2, 3))
    assert held == [0, 1] and own == [1, 1] and list(fig.data[2].base) == held and dropped == [0, 1]
    title, depths = title_text(fig)
    assert title == "Where the 3 committed tokens came from: 2 the AR model's own in the 2 denoiser passes, 1 held draft"
    assert depths.endswith("depth 1: 1 of 1 · depth 2: 0 of 1")   # the first draft held, the second did not
    # a block whose first token came from the context pass gets a star before its first pass
    trace.events[1] = BlockStart(block=0, start=0, size=4, steps=4, given=[10], given_confidence=[0.9], elapsed=0.02)
    fig = plots.commits_per_step(trace)
    assert fig.data[-1].name == "a block's first token, from the context pass before it" and list(fig.data[-1].x) == [0.6]
    assert title_text(fig)[0].endswith("1 held draft, 1 from the context pass")


def test_a_block_first_token_from_the_context_pass_is_drawn_and_counted():
    """The verify order: each block starts with the token the context tower's pass gave it
    (BlockStart.given). The commit table holds it once, before the block's first step; the grid
    payload carries it; the unmasking map puts it on a 'ctx' row above step 0."""
    from visualizers.commits import GIVEN, commit_table
    events = [Prefill(prompt_tokens=[2], seconds=0.01),
              BlockStart(block=0, start=0, size=3, steps=3, given=[10], given_confidence=[0.9], elapsed=0.02),
              step(0, 0, [10, 11, MASK], [1], [0.9, 0.8, 0.3], 0.1, 1),
              step(0, 1, [10, 11, 12], [2], [0.9, 0.8, 0.7], 0.2, 2),
              BlockCommitted(block=0, tokens=[[10, 11, 12]], steps_used=2, elapsed=0.25),
              BlockStart(block=1, start=3, size=2, steps=2, given=[14], given_confidence=[0.6], elapsed=0.27),
              step(1, 0, [14, 11], [1], [0.6, 0.5], 0.3, 3),
              BlockCommitted(block=1, tokens=[[14, 11]], steps_used=1, elapsed=0.35),
              Done(texts=["The cat sat on cat"], token_ids=[[10, 11, 12, 14, 11]], nfe=3, seconds=0.4,
                   first_token_seconds=0.02)]
    trace = Trace(mode="diffusion", settings={"remasking": "verify"}, model={"mask_token_id": MASK},
                  prompts=["x"], prompt_ids=[[20, 21]], tokens=PIECES, events=events)
    commits = commit_table(trace)
    assert sorted(c.pos for c in commits) == [0, 1, 2, 3, 4]                 # every position once
    assert [(c.pos, c.step, c.frame, c.token) for c in commits if c.step == GIVEN] == [(0, GIVEN, 0, 10), (3, GIVEN, 2, 14)]
    data = trajectory.payload(trace)
    assert data["given"] == [[10, 90], [14, 60]] and "14" in data["pieces"]
    live = trajectory.payload(trace, live=True)                              # block 0 finished: in the base
    assert live["base"]["tok"][:3] == [10, 11, 12] and live["base"]["cstep"][0] == GIVEN
    fig = plots.unmasking_map(trace)
    assert list(fig.data[0].y).count(GIVEN) == 2 and fig.layout.yaxis.ticktext[0] == "ctx"
    assert trace.stats()["tokens_per_nfe"] == 5 / 3
    # the race: a given token counts from its block's start, and its replay frame is not a pass
    assert race.curve(trace) == ([0.0, 0.02, 0.1, 0.2, 0.27, 0.3, 0.4], [0, 1, 2, 3, 4, 5, 5])
    lane = race.lane(trace)
    assert lane["frames"][0] == [0, [10, -1, -1], 20, 1] and lane["frames"][3] == [3, [14, -1], 270, 1]
    assert sum(len(f) == 3 for f in lane["frames"]) == 3 and "14" in lane["pieces"]


def test_a_block_whose_given_token_ended_the_text_has_no_commit():
    """With end-of-text stopping, a block whose given token ended every row runs no step: its token
    (after the output) gets no commit, which would point at a frame that does not exist."""
    from visualizers.commits import commit_table
    events = [Prefill(prompt_tokens=[2], seconds=0.01),
              BlockStart(block=0, start=0, size=2, steps=2, given=[10], given_confidence=[0.9], elapsed=0.02),
              step(0, 0, [10, 11], [1], [0.9, 0.8], 0.1, 1),
              BlockCommitted(block=0, tokens=[[10, 11]], steps_used=1, elapsed=0.15),
              BlockStart(block=1, start=2, size=2, steps=2, given=[EOS], given_confidence=[0.7], elapsed=0.2),
              BlockCommitted(block=1, tokens=[[EOS, MASK]], steps_used=0, elapsed=0.2),
              Done(texts=["The cat"], token_ids=[[10, 11]], nfe=1, seconds=0.25, first_token_seconds=0.02,
                   stopped="eos")]
    trace = Trace(mode="diffusion", settings={"remasking": "verify"}, model={"mask_token_id": MASK, "eos_token_ids": [EOS]},
                  prompts=["x"], prompt_ids=[[20, 21]], tokens=PIECES, events=events)
    assert [(c.pos, c.frame) for c in commit_table(trace)] == [(0, 0), (1, 0)]
    assert race.curve(trace) == ([0.0, 0.02, 0.1, 0.25], [0, 1, 2, 2])
    assert failures.findings(trace) is not None and compare.final_tokens(trace) == [10, 11]
