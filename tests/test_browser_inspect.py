"""Studying a run in a real browser (Playwright + Chromium, tiny model): the position inspector
and its AR view, a failure finding followed to its step, a fork compared with its run, an
exported trace imported back, and exported HTML pages that play back offline.
"""
from __future__ import annotations

import json

import pytest

from tests.test_browser import ARGS, CHROMIUM, position, pytestmark, run_prompt, set_slider, wait_finished  # noqa: F401
from tests.tiny_app import launch, tiny_app_model

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:
    pass

PROMPT = "Tell me about the sea."
TOKENS = 32                    # two blocks of 16


@pytest.fixture(scope="module")
def server():
    import app
    model = tiny_app_model()
    demo, url = launch(model, 0.1, **app.launch_options())
    yield url, model
    demo.close()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def page(server, browser):
    pg = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    pg.errors = []
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.goto(server[0])
    expect(pg.locator("#model-info")).to_contain_text("tiny-test", timeout=30_000)
    set_slider(pg, "max-new-tokens", TOKENS)
    set_slider(pg, "steps", 4)
    run_prompt(pg, PROMPT)
    wait_finished(pg)
    yield pg
    pg.close()


def same_run(model):
    """The run the page made, recomputed with the library (greedy: the same trace)."""
    from twotower.runner import encode_prompt, run
    from twotower.sampling import SamplerConfig
    trace, events = run(model, [encode_prompt(model, PROMPT)], SamplerConfig(max_new_tokens=TOKENS, steps=4))
    for _ in events:
        pass
    return trace


def scrub(pg, frame: int) -> None:
    pg.locator("#grid input[type=range]").evaluate(
        f"(r) => {{ r.value = '{frame}'; r.dispatchEvent(new Event('input', {{bubbles: true}})); }}")


def test_inspector_shows_a_position_and_asks_the_ar_model(page):
    page.locator("#grid .ttg-cell[data-pos='5']").click()
    head = page.locator("#grid .ttg-cands .ttg-h")
    expect(head).to_contain_text("Position 5")
    expect(head).to_contain_text("committed at block 0, step")
    expect(head).to_contain_text("flipped")
    assert page.locator("#grid .ttg-cands table tr[data-frame]").count() >= 1
    expect(page.locator("#grid .ttg-rule")).to_contain_text("Commit rule")
    page.get_by_role("button", name="What would the AR model put here?").click()
    expect(page.locator("#grid .ttg-ar")).to_contain_text("AR model here", timeout=20_000)
    expect(page.locator("#grid .ttg-ar")).to_contain_text("this run's")
    page.locator("#grid .ttg-cell[data-pos='20']").click()             # the answer covers every position
    expect(page.locator("#grid .ttg-ar")).to_contain_text("before position 20")


def test_the_keyboard_picks_positions_for_the_inspector(page):
    """With the grid focused, ↓ / ↑ move the inspected position (no mouse needed)."""
    page.locator("#grid .ttg-cell[data-pos='3']").click()
    page.locator("#grid .ttg-grid").focus()
    page.keyboard.press("ArrowDown")
    page.keyboard.press("ArrowDown")
    expect(page.locator("#grid .ttg-cands .ttg-h")).to_contain_text("Position 5")
    page.keyboard.press("ArrowUp")
    expect(page.locator("#grid .ttg-cands .ttg-h")).to_contain_text("Position 4")
    expect(page.locator("#grid .ttg-cell.picked[data-pos='4']")).to_have_count(1)


def test_a_finding_jumps_to_its_step(page, server):
    from visualizers.failures import findings
    expected = findings(same_run(server[1]))
    assert expected, "the tiny model's run should give at least one finding"
    page.locator("#grid .ttg-findings summary").click()
    total = position(page).split("/")[1]
    page.locator("#grid .ttg-find").first.click()
    assert position(page) == f"{expected[0]['frame'] + 1}/{total}"
    expect(page.locator(f"#grid .ttg-cell.picked[data-pos='{expected[0]['pos']}']")).to_have_count(1)
    assert page.locator("#grid .ttg-cell.flag").count() >= 1           # findings are marked on the cells


def test_fork_from_a_step_and_compare(page):
    scrub(page, 1)                                                     # block 0, step 1
    page.get_by_role("button", name="⋔ fork from this step").click()
    expect(page.locator("#fork-status")).to_contain_text("Fork point", timeout=20_000)
    assert page.locator("#fork-block input").input_value() == "0"
    assert page.locator("#fork-step input").input_value() == "1"
    set_slider(page, "fork-threshold", 0)
    page.locator("#fork-run").click()
    expect(page.locator("#fork-status")).to_contain_text("Fork finished", timeout=30_000)
    expect(page.locator("#compare .ttc-col")).to_have_count(2)
    differ = int(page.locator("#compare .ttc-summary b").first.inner_text())
    assert page.locator("#compare .ttc-col .ttc-cell.diff").count() == 2 * differ
    assert page.locator("#compare .ttc-col .ttc-cell.inh").count() > 0  # committed before the fork point
    expect(page.locator("#compare .ttc-stats")).to_contain_text("passes after the fork point")
    page.locator("#fork-open").click()
    expect(page.locator("#status")).to_contain_text("Showing the fork", timeout=20_000)
    expect(page.locator("#grid .ttg-info")).to_contain_text("fork: threshold")
    scrub(page, 0)
    expect(page.locator("#grid .ttg-info")).to_contain_text("inherited from the original run")


def test_export_then_import_round_trips(page, tmp_path):
    page.get_by_role("tab", name="Trace file").click()
    page.get_by_role("button", name="Export the last run").click()
    link = page.locator("a[download$='.json']")
    expect(link).to_have_count(1, timeout=20_000)
    with page.expect_download() as got:
        link.click()
    saved = tmp_path / "exported.json"
    got.value.save_as(saved)
    exported = json.loads(saved.read_text())
    assert exported["fork"]["inherited"] >= 1                         # the fork was the last run shown
    page.locator("#import-file input[type=file]").set_input_files(str(saved))
    expect(page.locator("#status")).to_contain_text("Opened a saved trace", timeout=20_000)
    page.get_by_role("tab", name="Denoising").click()
    frames, inherited = sum(e["type"] == "Step" for e in exported["events"]), exported["fork"]["inherited"]
    expect(page.locator("#grid .ttg-pos")).to_have_text(f"{inherited + 1}/{frames}")   # opens at the fork point
    expect(page.locator("#grid .ttg-cell.inh").first).to_be_visible()


def test_exported_page_plays_back_offline(browser, server, tmp_path):
    from twotower.cli import main
    src, out = tmp_path / "run.json", tmp_path / "run.html"
    same_run(server[1]).save(src)
    assert main(["export", str(src), "--html", str(out)]) == 0
    context = browser.new_context()                                   # no server behind this page
    pg = context.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(out.as_uri())
    expect(pg.locator(".ttg-cell").first).to_be_visible()
    pg.get_by_role("button", name="⇤").click()
    expect(pg.locator(".ttg-pos")).to_contain_text("1/")
    masked = pg.locator(".ttg-cell.st-m").count()
    pg.get_by_role("button", name="▶ play").click()
    pg.wait_for_function("() => parseInt(document.querySelector('.ttg-pos').innerText) > 2")
    assert pg.locator(".ttg-cell.st-m").count() != masked              # the grid changed as it played
    assert pg.locator("button.ttg-forkbtn").count() == 0 and pg.locator(".ttg-ask").count() == 0
    context.close()
    assert errors == []


def test_no_javascript_errors(page):
    assert page.errors == []


def test_an_exported_verify_run_shows_its_drafts(browser, tmp_path, monkeypatch):
    """The verify order in the grid: drafts as their own cells, the step line naming what held."""
    from tests.test_verify import oracle_drafter
    from tests.test_llama_family import clean_as_ar_model
    from twotower.cli import main
    from twotower.runner import run
    from twotower.sampler import ar_generate
    from twotower.sampling import SamplerConfig
    model, prompt = clean_as_ar_model(), [[7, 30, 12, 55, 9]]
    c = dict(max_new_tokens=16, block_size=8, steps=8, stop_at_eos=False)
    truth = list(ar_generate(model, prompt, SamplerConfig(**c)))[-1].token_ids
    oracle_drafter(monkeypatch, model, prompt, truth, wrong_every=5)
    trace, events = run(model, prompt, SamplerConfig(remasking="verify", threshold=0.9, **c), "diffusion")
    list(events)
    src, out = tmp_path / "verify.json", tmp_path / "verify.html"
    trace.save(src)
    assert main(["export", str(src), "--html", str(out)]) == 0
    context = browser.new_context()
    pg = context.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(out.as_uri())
    pg.get_by_role("button", name="⇤").click()
    expect(pg.locator(".ttg-rule")).to_contain_text("Verify: no drafts to check")
    assert pg.locator(".ttg-cell.st-d").count() > 0                   # the first pass drafted
    seen = set()
    for _ in range(len(trace.steps())):
        seen.add(pg.locator(".ttg-rule").inner_text())
        pg.get_by_role("button", name="step ▶").click()
    assert any("drafts held (each was the AR model's own next token)" in s
               or "its one draft held (the AR model's own next token)" in s for s in seen)
    assert any("were dropped" in s for s in seen)
    context.close()
    assert errors == []
