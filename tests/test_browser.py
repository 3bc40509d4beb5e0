"""The app in a real browser (Playwright + Debian's Chromium), with a tiny model.

Types a prompt, runs it, watches the grid fill, scrubs the playback, opens the map,
attention and race views, and presses Stop during a run. Screenshots go to a temp dir, and
to SAVE_SCREENSHOTS (e.g. `SAVE_SCREENSHOTS=assets`) as screenshot_tiny_*.png when it is set
(tests/make_screenshots.py takes the real-model screenshot_*.png).
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from tests.tiny_app import launch, tiny_app_model

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
ROOT = Path(__file__).resolve().parent.parent

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:
    sync_playwright = None

pytestmark = [
    pytest.mark.skipif(sync_playwright is None, reason="playwright (python) is not installed"),
    pytest.mark.skipif(not Path(CHROMIUM).exists(),
                       reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]


@pytest.fixture(scope="module")
def server():
    import app
    from tests.test_app_api import Counting
    model = tiny_app_model()
    counter = Counting(model)
    demo, url = launch(model, 0.1, **app.launch_options())
    yield url, counter
    demo.close()


@pytest.fixture(scope="module")
def page(server):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        pg = browser.new_page(viewport={"width": 1280, "height": 900})
        pg.errors = []
        pg.on("pageerror", lambda e: pg.errors.append(str(e)))
        pg.goto(server[0])
        expect(pg.locator("#model-info")).to_contain_text("tiny-test", timeout=30_000)
        yield pg
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    """save(page, name): a screenshot in a temp dir (and in $SAVE_SCREENSHOTS, downscaled)."""
    folder = tmp_path_factory.mktemp("screens")
    keep = os.environ.get("SAVE_SCREENSHOTS")

    def save(pg, name: str, full: bool = False) -> Path:
        path = folder / f"screenshot_tiny_{name}.png"
        pg.screenshot(path=str(path), full_page=full)
        if keep:
            target = (ROOT / keep) if not os.path.isabs(keep) else Path(keep)
            target.mkdir(parents=True, exist_ok=True)
            shrink(path, target / path.name)
        return path
    return save


def shrink(src: Path, dst: Path, width: int = 1000) -> None:
    try:
        from PIL import Image
    except ImportError:
        shutil.copy(src, dst)
        return
    img = Image.open(src)
    if img.width > width:
        img = img.resize((width, round(img.height * width / img.width)), Image.LANCZOS)
    img.convert("P", palette=Image.ADAPTIVE, colors=256).save(dst, optimize=True)


def set_slider(pg, elem_id: str, value) -> None:
    box = pg.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def run_prompt(pg, prompt: str) -> None:
    pg.locator("#prompt textarea").fill(prompt)
    pg.locator("#run").click()


def wait_finished(pg, timeout=60_000) -> None:
    expect(pg.locator("#status")).to_contain_text("Finished", timeout=timeout)


def position(pg) -> str:
    return pg.locator("#grid .ttg-pos").inner_text()


def test_run_fills_the_grid_and_playback_scrubs(page, shots):
    set_slider(page, "max-new-tokens", 48)
    run_prompt(page, "Hello there, how are you?")
    expect(page.locator("#grid .ttg-cell").first).to_be_visible(timeout=30_000)
    wait_finished(page)
    expect(page.locator("#grid .ttg-live")).to_be_hidden()
    assert page.locator("#grid .ttg-row").count() == 3             # 48 tokens = 3 blocks of 16
    total = position(page).split("/")[1]
    assert position(page) == f"{total}/{total}"
    shots(page, "grid")
    page.get_by_role("button", name="◀ back").click()
    assert position(page) == f"{int(total) - 1}/{total}"
    page.locator("#grid input[type=range]").evaluate(
        "(r) => { r.value = '0'; r.dispatchEvent(new Event('input', {bubbles: true})); }")
    assert position(page) == f"1/{total}"
    assert page.locator("#grid .ttg-cell.st-m").count() > 0          # step 1: most cells still masked
    page.get_by_role("button", name="▶ play").click()
    page.wait_for_function("() => document.querySelector('#grid .ttg-pos').innerText.split('/')[0] > '1'")
    page.get_by_role("button", name="❚❚ pause").click()
    page.locator("#grid .ttg-cell").first.click()
    expect(page.locator("#grid .ttg-cands table tr")).not_to_have_count(0)
    assert page.locator("#output-text textarea").input_value() != ""


def test_unmasking_map_tab(page, shots):
    page.get_by_role("tab", name="Unmasking map").click()
    expect(page.locator(".js-plotly-plot").first).to_be_visible(timeout=20_000)
    shots(page, "map")


def test_attention_view(page, shots):
    page.get_by_role("tab", name="Denoising").click()
    page.locator("#capture-settings").get_by_text("Cross-attention capture").click()
    page.locator("#capture input[type=checkbox]").check()
    set_slider(page, "max-new-tokens", 32)
    run_prompt(page, "What is the capital of France?")
    wait_finished(page)
    page.get_by_role("tab", name="Cross-attention").click()
    plot = page.locator("#attention-plot .js-plotly-plot")
    expect(plot).to_be_visible(timeout=20_000)
    expect(plot.locator(".slider-container, g.slider-container")).not_to_have_count(0)
    assert "Block 0" in plot.inner_text()
    shots(page, "attention")
    page.locator("#capture input[type=checkbox]").uncheck()


def test_race_view(page, shots):
    page.get_by_role("tab", name="Race: AR vs diffusion").click()
    page.locator("#race-run").click()
    expect(page.locator("#race .ttr-lane")).to_have_count(2, timeout=60_000)
    expect(page.locator("#race .ttr-done")).to_have_count(2, timeout=30_000)
    shots(page, "race")


def test_stop_ends_a_running_generation(page, server, shots):
    _, counter = server
    page.get_by_role("tab", name="Denoising").click()
    set_slider(page, "max-new-tokens", 1024)
    set_slider(page, "threshold", 1)
    counter.delay = 0.03
    try:
        run_prompt(page, "A long story, please.")
        expect(page.locator("#grid .ttg-live")).to_be_visible(timeout=30_000)
        page.wait_for_function("() => document.querySelectorAll('#grid .ttg-cell').length > 20")
        page.locator("#stop").click()
        expect(page.locator("#status")).to_contain_text("Stopped", timeout=15_000)
        time.sleep(0.5)
        calls = counter.calls
        time.sleep(1.0)
        assert counter.calls - calls <= 1, "the denoiser kept running after Stop"
        expect(page.locator("#grid .ttg-live")).to_be_hidden()
        assert not page.locator("#grid input[type=range]").is_disabled()   # the partial run scrubs
        shots(page, "stopped")
    finally:
        counter.delay = 0.0
    set_slider(page, "max-new-tokens", 16)
    set_slider(page, "threshold", 0.9)
    run_prompt(page, "Still usable?")
    wait_finished(page)


def test_stop_ends_a_race(page, server):
    _, counter = server
    page.get_by_role("tab", name="Race: AR vs diffusion").click()
    set_slider(page, "max-new-tokens", 256)
    set_slider(page, "threshold", 1)
    counter.delay = 0.03
    try:
        page.locator("#race-run").click()
        expect(page.get_by_text("Running diffusion (timed on its own)…")).to_be_visible(timeout=60_000)
        page.locator("#race-stop").click()
        expect(page.get_by_text("Race stopped.")).to_be_visible(timeout=15_000)
        calls = counter.calls
        time.sleep(1.0)
        assert counter.calls - calls <= 1, "the race kept running after Stop"
    finally:
        counter.delay = 0.0
    set_slider(page, "max-new-tokens", 16)
    set_slider(page, "threshold", 0.9)


def finished_trace(mode="diffusion"):
    from app.state import get_model
    from twotower.runner import encode_prompt, run
    from twotower.sampling import SamplerConfig
    model = get_model()
    cfg = SamplerConfig(max_new_tokens=24, steps=4)
    trace, events = run(model, [encode_prompt(model, "Saved run")], cfg, mode)
    for _ in events:
        pass
    return trace


def test_import_a_saved_trace(page, tmp_path):
    trace = finished_trace()
    path = tmp_path / "saved.json"
    trace.save(path)
    page.get_by_role("tab", name="Trace file").click()
    page.locator("#import-file input[type=file]").set_input_files(str(path))
    expect(page.locator("#status")).to_contain_text("Opened a saved trace", timeout=20_000)
    page.get_by_role("tab", name="Denoising").click()
    expect(page.locator("#grid .ttg-pos")).to_have_text(f"{trace.done.nfe}/{trace.done.nfe}")


def test_a_draft_tree_trace_shows_the_tree_each_pass_checked(page, tmp_path):
    """A verify run with draft trees (a clean_as_ar tiny model, random drafts), imported: the step
    line draws the tree's paths, the tokens the AR model agreed with and the first it did not."""
    from tests.test_llama_family import clean_as_ar_model
    from twotower.runner import run
    from twotower.sampling import SamplerConfig
    cfg = SamplerConfig(max_new_tokens=16, block_size=8, steps=8, stop_at_eos=False, remasking="verify",
                        threshold=0.0, draft_nodes=4)
    trace, events = run(clean_as_ar_model(), [[5, 17, 42, 9]], cfg, "diffusion")
    steps = [e for e in events if type(e).__name__ == "Step"]
    frame = next(i for i, e in enumerate(steps) if len(e.tree[0]) >= 2)
    trace.save(tmp_path / "tree.json")
    page.get_by_role("tab", name="Trace file").click()
    clear = page.locator("#import-file button[aria-label='Clear']")     # a file imported before
    if clear.count():
        clear.first.click()
    page.locator("#import-file input[type=file]").set_input_files(str(tmp_path / "tree.json"))
    expect(page.locator("#status")).to_contain_text("Opened a saved trace", timeout=20_000)
    page.get_by_role("tab", name="Denoising").click()
    page.locator("#grid input[type=range]").evaluate(
        f"(r) => {{ r.value = '{frame}'; r.dispatchEvent(new Event('input', {{bubbles: true}})); }}")
    expect(page.locator("#grid .ttg-rule")).to_contain_text("draft tree")
    assert page.locator("#grid .ttg-tree-path").count() == len(steps[frame].tree[0])
    held = max(next((k for k, t in enumerate(p) if steps[frame].tokens[0][min(steps[frame].committed[0]) + k] != t),
                    len(p)) for p in steps[frame].tree[0])
    assert page.locator("#grid .ttg-tree-kept").count() == (1 if held else 0)      # marked once, if any held
    # each block's first token came from the context tower's pass: filled and marked, with its note
    page.locator("#grid input[type=range]").evaluate(
        f"(r) => {{ r.value = '{len(steps) - 1}'; r.dispatchEvent(new Event('input', {{bubbles: true}})); }}")
    expect(page.locator("#grid .ttg-cells .ttg-cell.given")).to_have_count(2)
    assert page.locator("#grid .ttg-cells").first.locator(".ttg-cell").count() == 8
    page.locator("#grid .ttg-cells .ttg-cell.given").nth(1).click()
    expect(page.locator("#grid .ttg-cands .ttg-h")).to_contain_text("first token (p=")


def test_no_javascript_errors(page):
    assert page.errors == []


def test_an_empty_prompt_is_refused_without_error_badges(page):
    """Bad input is refused by a first event with no outputs: a message, and no output keeps
    an error badge (the streaming event, whose outputs would, never starts). From a fresh page:
    a race stopped by an earlier test once left a badge of its own on the race view (under load)."""
    page.reload()
    expect(page.locator("#model-info")).to_contain_text("tiny-test", timeout=30_000)
    run_prompt(page, "   ")
    expect(page.locator(".toast-body").last).to_contain_text("the prompt is empty", timeout=20_000)
    page.wait_for_timeout(500)
    for elem in ("status", "grid", "output-text"):
        assert page.locator(f"#{elem} .error").count() == 0, elem
    page.get_by_role("tab", name="Race: AR vs diffusion").click()
    page.locator("#race-run").click()
    expect(page.locator(".toast-body").last).to_contain_text("the prompt is empty", timeout=20_000)
    page.wait_for_timeout(500)
    assert page.locator("#race .error").count() == 0 and page.locator("#race-status .error").count() == 0
    page.get_by_role("tab", name="Denoising").click()


def test_a_file_that_is_not_a_trace_is_refused_without_error_badges(page, tmp_path):
    """The import's first event checks the file and has no outputs: a message naming the file
    as uploaded, and the views keep no error badge."""
    bad = tmp_path / "not_a_trace.json"
    bad.write_text('{"hello": "world"}')
    page.get_by_role("tab", name="Trace file").click()
    clear = page.locator("#import-file button[aria-label='Clear']")     # a file imported before
    if clear.count():
        clear.first.click()
    page.locator("#import-file input[type=file]").set_input_files(str(bad))
    expect(page.locator(".toast-body").last).to_contain_text("Cannot open not_a_trace.json: not a TwoTower trace",
                                                             timeout=20_000)
    page.wait_for_timeout(500)
    for elem in ("status", "grid", "output-text"):
        assert page.locator(f"#{elem} .error").count() == 0, elem
    page.get_by_role("tab", name="Denoising").click()
