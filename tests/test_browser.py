"""The drawing page end to end in headless Chromium (Debian's package, driven by Playwright):
draw a stroke, get n variations, and they are exactly what the API answers for that drawing;
drop an image file on the pad, get its variations.

Chromium comes from `scripts/install_browser.sh` (apt). Without it the test skips, unless CI
is set: then a missing browser is a failure, not a silent skip.
"""
from __future__ import annotations

import base64
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
playwright_api = pytest.importorskip("playwright.sync_api")

from test_serve import converter, free_port, live_server, wait_ready  # noqa: E402,F401  (fixtures reused)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "figures" / "serve_page.png"

if not Path(CHROMIUM).exists():
    if os.environ.get("CI"):
        raise RuntimeError(f"CI is set but {CHROMIUM} is missing: run scripts/install_browser.sh first")
    pytest.skip("Debian's chromium is not installed (scripts/install_browser.sh installs it); CI is not set",
                allow_module_level=True)


def glyph_png() -> bytes:
    image = np.full((64, 64), 255, np.uint8)
    image[10:54, 28:36] = 0  # a dark bar on white
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def test_draw_a_stroke_or_drop_an_image_get_n_variations(live_server, tmp_path):
    import httpx

    url = f"http://127.0.0.1:{live_server}/"
    n, seed = 6, 4242
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 640})
            errors = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto(url)
            page.fill("#n", str(n))
            page.fill("#seed", str(seed))
            box = page.locator("#pad").bounding_box()
            page.mouse.move(box["x"] + 90, box["y"] + 50)
            page.mouse.down()
            for step in range(1, 21):  # an "L": down, then right
                page.mouse.move(box["x"] + 90, box["y"] + 50 + 9 * step)
            for step in range(1, 11):
                page.mouse.move(box["x"] + 90 + 10 * step, box["y"] + 230)
            page.mouse.up()  # the end of the stroke sends it
            page.wait_for_function(f"document.querySelectorAll('#results canvas').length === {n}", timeout=30_000)
            status = page.inner_text("#status")
            assert f"seed {seed}" in status and "onnxruntime" in status and " ms" in status, status
            assert not page.inner_text("#error") and not errors, (page.inner_text("#error"), errors)
            # what the page shows is what the API answers for the drawn pad, pixel for pixel
            drawn = base64.b64decode(page.evaluate("document.getElementById('pad').toDataURL('image/png')").split(",")[1])
            shown = np.array(page.evaluate("""() => [...document.querySelectorAll('#results canvas')].map(c =>
                Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data).filter((_, i) => i % 4 === 0))"""),
                np.float32).reshape(n, 28, 28)
            page.screenshot(path=str(tmp_path / "page.png"))
            if os.environ.get("VCE_WRITE_SCREENSHOT"):  # refresh the committed figure (docs/serving.md)
                page.screenshot(path=str(SCREENSHOT))
            # dropping an image file on the pad converts it too
            page.fill("#n", "3")
            dropped = base64.b64encode(glyph_png()).decode()
            page.evaluate("""(data) => {
                const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
                const transfer = new DataTransfer();
                transfer.items.add(new File([bytes], "glyph.png", { type: "image/png" }));
                document.getElementById("pad").dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true }));
            }""", dropped)
            page.wait_for_function("document.querySelectorAll('#results canvas').length === 3", timeout=30_000)
            assert not page.inner_text("#error") and not errors
        finally:
            browser.close()
    answer = httpx.post(f"{url}v1/convert?n={n}&seed={seed}", content=drawn, headers={"Content-Type": "image/png"})
    expected = 255 - np.round(255 * np.array(answer.json()["images"], np.float32)[0])  # (n, 28, 28), as the page draws
    np.testing.assert_array_equal(shown, expected)
    assert shown.std() > 0  # not blank
    assert Image.open(io.BytesIO(drawn)).size == (280, 280)
