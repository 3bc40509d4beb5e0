"""Screenshots of the main views with a real model: `python -m tests.make_screenshots [OUT_DIR]`.

Launches the app with the default model (or TWOTOWER_MODEL), drives Chromium through a
diffusion run, the candidates panel, the unmasking map, cross-attention, an AR run and the
race, and writes small PNGs (default: assets/screenshot_*.png). Not collected by pytest.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

from tests.test_browser import ARGS, CHROMIUM, ROOT, free_port, set_slider, shrink

PROMPT = "What is the capital of France?"


def main(out: Path) -> None:
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
        pg.locator("#capture-settings").get_by_text("Cross-attention capture").click()
        pg.locator("#capture input[type=checkbox]").check()
        set_slider(pg, "max-new-tokens", 48)
        pg.locator("#prompt textarea").fill(PROMPT)
        pg.locator("#run").click()
        expect(pg.locator("#status")).to_contain_text("Finished", timeout=300_000)
        pg.locator("#grid input[type=range]").evaluate(          # a step half-way through the run
            "(r) => { r.value = String(Math.floor(r.max / 2));"
            " r.dispatchEvent(new Event('input', {bubbles: true})); }")
        pg.locator("#grid .ttg-cell").nth(2).click()
        shot("grid")
        pg.get_by_role("tab", name="Unmasking map").click()
        expect(pg.locator(".js-plotly-plot").first).to_be_visible(timeout=60_000)
        shot("map")
        pg.get_by_role("tab", name="Cross-attention").click()
        expect(pg.locator("#attention-plot .js-plotly-plot")).to_be_visible(timeout=60_000)
        shot("attention")
        pg.get_by_role("tab", name="Denoising").click()
        pg.locator("#capture input[type=checkbox]").uncheck()
        pg.get_by_label("ar", exact=True).check()
        pg.locator("#run").click()
        expect(pg.locator("#status")).to_contain_text("Finished (ar)", timeout=300_000)
        shot("ar")
        pg.get_by_role("tab", name="Race: AR vs diffusion").click()
        pg.locator("#race-run").click()
        expect(pg.locator("#race .ttr-done")).to_have_count(2, timeout=600_000)
        shot("race")
        browser.close()
    demo.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "assets")
