"""The editor in a real browser: the system's headless Chromium, driven by Playwright, against a live server.

These tests never skip: without Chromium they fail and say to run `make install`.
"""

from __future__ import annotations

import os
import shutil

import pytest

from tests.serving.conftest import noise_image

pytestmark = pytest.mark.browser
CHROMIUM = os.environ.get("LARGEN_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def server(live_server):
    return live_server[0]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    path = shutil.which(CHROMIUM) or (CHROMIUM if os.access(CHROMIUM, os.X_OK) else None)
    if path is None:
        pytest.fail(f"no Chromium at {CHROMIUM}: run `make install` (it installs Debian's chromium package) "
                    "or point LARGEN_CHROMIUM at a Chromium binary", pytrace=False)
    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        b = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page(viewport={"width": 1200, "height": 800})
    page.set_default_timeout(30_000)
    page.goto(server + "/")
    yield page
    page.close()


def _status_starts(page, prefix: str) -> str:
    page.wait_for_function(
        f"(s => s.textContent.startsWith({prefix!r}) || s.className === 'error')(document.getElementById('status'))"
    )
    return page.text_content("#status")


def test_paint_prompt_generate_gives_an_image_of_the_source_size(page, tmp_path):
    source = tmp_path / "source.png"
    noise_image(96, 64, seed=1).save(source)
    page.set_input_files("#source", str(source))
    assert _status_starts(page, "source").startswith("source 96x64")
    box = page.locator("#maskCanvas").bounding_box()
    page.mouse.move(box["x"] + 20, box["y"] + 15)
    page.mouse.down()
    page.mouse.move(box["x"] + 60, box["y"] + 40, steps=8)
    page.mouse.up()
    page.fill("#prompt", "a red armchair")
    page.fill("#steps", "2")
    page.click("#generate")
    assert _status_starts(page, "generated").startswith("generated")
    size = page.evaluate("(i => [i.naturalWidth, i.naturalHeight])(document.getElementById('result'))")
    assert size == [96, 64]
    assert page.locator("#history li").count() == 1
    assert "a red armchair" in page.text_content("#history li")
    page.click("#undo")
    assert _status_starts(page, "undone") == "undone"
    assert page.locator("#history li").count() == 0


def test_one_click_makes_a_mask(page):
    page.select_option("#pick", "chelsea")  # a bundled photo, 451x300
    assert _status_starts(page, "source").startswith("source 451x300")
    page.check("input[name=tool][value=click]")
    box = page.locator("#maskCanvas").bounding_box()
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    status = _status_starts(page, "mask from the click")
    assert status.startswith("mask from the click: "), status
    painted = page.evaluate(
        "(c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        " let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return [c.width, c.height, n]; })"
        "(document.getElementById('maskCanvas'))"
    )
    assert painted[:2] == [451, 300]
    assert painted[2] == int(status.split(": ")[1].split()[0])  # the overlay shows what SAM returned


def test_words_make_a_mask_and_a_refusal_shows_its_reason(page):
    page.select_option("#pick", "chelsea")
    assert _status_starts(page, "source").startswith("source 451x300")
    page.fill("#words", "cat")
    page.fill("#boxThreshold", "1")
    page.fill("#textThreshold", "1")
    page.click("#findWords")
    # the tiny zoo's random Grounding DINO never scores 1: the server's one-line 422 is shown as is
    assert _status_starts(page, "422") == "422: no box for 'cat' scores >= box_threshold 1 and text_threshold 1"
    page.fill("#boxThreshold", "0")
    page.fill("#textThreshold", "0")
    page.click("#findWords")
    assert _status_starts(page, "mask from the words").startswith("mask from the words: ")
