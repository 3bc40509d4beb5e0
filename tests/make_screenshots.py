"""Screenshots of the main views with a real model: `python -m tests.make_screenshots [OUT_DIR] [--only a,b]`.

Launches the app with the default model (or TWOTOWER_MODEL), drives Chromium through a
diffusion run, the candidates panel, the position inspector with the AR model's view, a fork
compared with its run, the unmasking map, cross-attention, an AR run, the race and a run with
draft trees, and writes small PNGs (default: assets/screenshot_*.png). --only names the shots to
take (grid, inspect, fork, map, attention, ar, race, tree); the diffusion run always happens. Not
collected by pytest.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

from tests.test_browser import ARGS, CHROMIUM, ROOT, set_slider, shrink
from tests.tiny_app import free_port

PROMPT = "What is the capital of France?"
STUDY_PROMPT = "Write a poem about the ocean."       # inspector and fork: a longer answer
TREE_PROMPT = "Give me two tips for staying healthy."
TREE_NODES = 8
FORK_THRESHOLD = 0.3


def inspect_and_fork(pg, shot, only) -> None:
    """A longer run: a finding followed to its step, the inspector with the AR model's answer;
    then a fork from the middle of the run at a lower threshold, compared with the run."""
    set_slider(pg, "max-new-tokens", 48)
    pg.locator("#prompt textarea").fill(STUDY_PROMPT)
    pg.locator("#run").click()
    expect(pg.locator("#status")).to_contain_text("Finished", timeout=600_000)
    findings = pg.locator("#grid .ttg-find")
    if findings.count():
        pg.locator("#grid .ttg-findings summary").click()
        findings.first.click()                                    # jumps to its step, inspects its position
    else:
        pg.locator("#grid .ttg-cell").nth(6).click()
    pg.get_by_role("button", name="What would the AR model put here?").click()
    expect(pg.locator("#grid .ttg-ar")).to_contain_text("AR model here", timeout=300_000)
    if "inspect" in only:
        pg.locator("#grid .ttg-controls").scroll_into_view_if_needed()
        pg.evaluate("window.scrollBy(0, -40)")
        shot("inspect")
    if "fork" in only:
        pg.locator("#grid input[type=range]").evaluate(          # a step in the middle of the run
            "(r) => { r.value = String(Math.floor(r.max / 2));"
            " r.dispatchEvent(new Event('input', {bubbles: true})); }")
        pg.locator("#grid .ttg-forkbtn").click()
        expect(pg.locator("#fork-status")).to_contain_text("Fork point", timeout=60_000)
        set_slider(pg, "fork-threshold", FORK_THRESHOLD)
        pg.locator("#fork-run").click()
        expect(pg.locator("#fork-status")).to_contain_text("Fork finished", timeout=600_000)
        pg.locator("#fork-status").evaluate("(e) => e.scrollIntoView({block: 'start'})")
        pg.evaluate("window.scrollBy(0, -330)")                # the fork's settings, then the comparison
        shot("fork")
    pg.get_by_role("tab", name="Denoising").click()


def main_views(pg, shot, only) -> None:
    """A short diffusion run (attention captured if wanted): the grid half-way, then the other views."""
    if "attention" in only:
        pg.locator("#capture-settings").get_by_text("Cross-attention capture").click()
        pg.locator("#capture input[type=checkbox]").check()
    set_slider(pg, "max-new-tokens", 48)
    pg.locator("#prompt textarea").fill(PROMPT)
    pg.locator("#run").click()
    expect(pg.locator("#status")).to_contain_text("Running", timeout=60_000)   # not the last run's "Finished"
    expect(pg.locator("#status")).to_contain_text("Finished", timeout=600_000)
    show_drafts_or_half_way(pg)
    pg.locator("#grid .ttg-cell").nth(2).click()
    if "grid" in only:
        shot("grid")
    other_views(pg, shot, only)


def show_drafts_or_half_way(pg) -> None:
    """Move the grid to the first step that shows drafts (the verify order), else half-way."""
    steps = int(pg.locator("#grid input[type=range]").get_attribute("max") or 0)
    for value in [*range(steps + 1), steps // 2]:
        pg.locator("#grid input[type=range]").evaluate(
            f"(r) => {{ r.value = '{value}'; r.dispatchEvent(new Event('input', {{bubbles: true}})); }}")
        if pg.locator("#grid .ttg-cell.st-d").count():
            return


def other_views(pg, shot, only) -> None:
    """The unmasking map and cross-attention of the same run, then an AR run and the race."""
    if "map" in only:
        pg.get_by_role("tab", name="Unmasking map").click()
        expect(pg.locator(".js-plotly-plot").first).to_be_visible(timeout=60_000)
        shot("map")
    if "attention" in only:
        pg.get_by_role("tab", name="Cross-attention").click()
        expect(pg.locator("#attention-plot .js-plotly-plot")).to_be_visible(timeout=60_000)
        shot("attention")
    pg.get_by_role("tab", name="Denoising").click()
    if "attention" in only:
        pg.locator("#capture input[type=checkbox]").uncheck()
    if "ar" in only:
        pg.get_by_label("ar", exact=True).check()
        pg.locator("#run").click()
        expect(pg.locator("#status")).to_contain_text("Finished (ar)", timeout=300_000)
        shot("ar")
    if "race" in only:
        pg.get_by_role("tab", name="Race: AR vs diffusion").click()
        pg.locator("#race-run").click()
        expect(pg.locator("#race .ttr-done")).to_have_count(2, timeout=600_000)
        shot("race")


def draft_tree(pg, shot) -> None:
    """A run with draft trees, shown at the first step whose tree had three paths or more and
    whose kept path held two drafts (else one)."""
    pg.get_by_role("tab", name="Denoising").click()
    pg.get_by_label("diffusion", exact=True).check()
    set_slider(pg, "draft-nodes", TREE_NODES)
    set_slider(pg, "max-new-tokens", 48)
    pg.locator("#prompt textarea").fill(TREE_PROMPT)
    pg.locator("#run").click()
    expect(pg.locator("#status")).to_contain_text("Running", timeout=60_000)
    expect(pg.locator("#status")).to_contain_text("Finished", timeout=600_000)
    steps = int(pg.locator("#grid input[type=range]").get_attribute("max") or 0)
    for held in (2, 1):
        for value in range(steps + 1):
            pg.locator("#grid input[type=range]").evaluate(
                f"(r) => {{ r.value = '{value}'; r.dispatchEvent(new Event('input', {{bubbles: true}})); }}")
            kept = pg.locator("#grid .ttg-tree-path:has(.ttg-tree-kept) .ttg-tree-tok.ok").count()
            if pg.locator("#grid .ttg-tree-path").count() >= 3 and kept >= held:
                break
        else:
            continue
        break
    pg.locator("#grid .ttg-info").scroll_into_view_if_needed()
    pg.evaluate("window.scrollBy(0, -120)")
    shot("tree")
    set_slider(pg, "draft-nodes", 0)


def main(out: Path, only: set[str]) -> None:
    import app
    demo = app.build_demo()
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, server_name="127.0.0.1",
                            server_port=free_port(), **app.launch_options())
    raw = Path(tempfile.mkdtemp())
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})

        def shot(name):
            time.sleep(0.8)
            pg.screenshot(path=str(raw / f"{name}.png"))
            shrink(raw / f"{name}.png", out / f"screenshot_{name}.png", width=1100)
            print("wrote", out / f"screenshot_{name}.png")

        pg.goto(url)
        expect(pg.locator("#model-info")).to_contain_text("Model", timeout=300_000)
        if only & {"inspect", "fork"}:
            inspect_and_fork(pg, shot, only)
        if only - {"inspect", "fork", "tree"}:
            main_views(pg, shot, only)
        if "tree" in only:
            draft_tree(pg, shot)
        browser.close()
    demo.close()


SHOTS = {"grid", "inspect", "fork", "map", "attention", "ar", "race", "tree"}

if __name__ == "__main__":
    args = sys.argv[1:]
    only = SHOTS
    if "--only" in args:
        i = args.index("--only")
        only = set(args[i + 1].split(","))
        del args[i:i + 2]
        if only - SHOTS:
            sys.exit(f"unknown shots {sorted(only - SHOTS)}; choose from {sorted(SHOTS)}")
    main(Path(args[0]) if args else ROOT / "assets", only)
