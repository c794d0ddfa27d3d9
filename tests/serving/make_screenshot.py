"""Regenerate docs/serving-editor.png: the editor after one generation on the tiny zoo (random weights).

    .venv/bin/python tests/serving/make_screenshot.py        # starts `largen serve`, drives Chromium
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright
from skimage import data

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "docs" / "serving-editor.png"


def main() -> None:
    zoo = Path(os.environ.get("LARGEN_TINY_MODELS", REPO / ".cache/tiny-models"))
    server = subprocess.Popen(
        [sys.executable, "-m", "serving.cli", "--model", str(zoo / "largen-pipeline"), "--port", "0",
         "--profile", "tiny", "--steps", "4"],
        cwd=REPO, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        url = None
        for line in server.stderr:
            found = re.search(r"(http://\S+?)/ ", line)
            if found:
                url = found[1]
                break
        if url is None:
            raise SystemExit(f"largen serve exited with status {server.wait()}")
        with tempfile.TemporaryDirectory() as tmp:
            source = Path(tmp, "astronaut.png")
            Image.fromarray(data.astronaut()).resize((256, 256)).save(source)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=os.environ.get("LARGEN_CHROMIUM", "/usr/bin/chromium"),
                                            args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1240, "height": 575})
                page.goto(url + "/")
                page.set_input_files("#source", str(source))
                page.wait_for_function("document.getElementById('status').textContent.startsWith('source')")
                box = page.locator("#maskCanvas").bounding_box()
                page.mouse.move(box["x"] + 150, box["y"] + 40)
                page.mouse.down()
                page.mouse.move(box["x"] + 200, box["y"] + 90, steps=10)
                page.mouse.move(box["x"] + 160, box["y"] + 120, steps=10)
                page.mouse.up()
                page.fill("#prompt", "a red party hat")
                page.fill("#steps", "4")
                page.click("#generate")
                page.wait_for_function("document.getElementById('status').textContent.startsWith('generated')")
                page.screenshot(path=str(OUT))
                browser.close()
        image = Image.open(OUT)
        image.convert("P", palette=Image.Palette.ADAPTIVE, colors=128).save(OUT, optimize=True)
        print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes)")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
