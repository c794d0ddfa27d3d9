"""`python -m dataengine.preview`: a valid self-contained HTML contact sheet of committed samples, one-line errors."""

from __future__ import annotations

import base64
import io
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataengine import preview
from dataengine.shards import check_output_dir
from tests.release.mined_data import expected_keys, mined_shard


class Page(HTMLParser):
    """The tags of a page, checked to nest properly, and its images."""

    VOID = {"img", "meta", "br", "hr", "link", "input"}

    def __init__(self, text: str):
        super().__init__()
        self.open: list[str] = []
        self.images: list[dict] = []
        self.cards: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        elif tag == "div" and attrs.get("class") == "card":
            self.cards.append(attrs["id"])
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes <{self.open[-1] if self.open else None}>"
        self.open.pop()


def decoded(uri: str) -> Image.Image:
    header, payload = uri.split(",", 1)
    assert header in ("data:image/jpeg;base64", "data:image/png;base64")
    return Image.open(io.BytesIO(base64.b64decode(payload)))


@pytest.fixture(scope="module")
def mined(tmp_path_factory) -> Path:
    """Two committed shards and one being written (no stats: must not be shown)."""
    folder = tmp_path_factory.mktemp("mined")
    mined_shard(folder, 0, [0, 1])
    mined_shard(folder, 1, [2])
    mined_shard(folder, 2, [3], commit=False)
    return folder


def test_preview_writes_a_valid_page_with_every_committed_sample(mined, capsys):
    assert preview.main([str(mined)]) == 0
    out = mined / "preview.html"
    assert f"wrote {out}" in capsys.readouterr().out
    page = Page(out.read_text(encoding="utf-8"))
    assert page.open == []  # every tag closed
    assert sorted(page.cards) == sorted(expected_keys([0, 1, 2]))  # shard 2 is not committed
    assert len(page.images) == 2 * len(page.cards)
    sources = [decoded(i["src"]) for i in page.images if i["alt"].startswith("source")]
    subjects = [decoded(i["src"]) for i in page.images if i["alt"] == "subject"]
    assert all(s.mode == "RGB" for s in sources) and all(s.mode == "RGBA" for s in subjects)
    # The box is drawn (its yellow outline) and the mask is tinted on the source thumbnail.
    first = np.asarray(sources[0]).astype(int)
    assert ((first[..., 0] > 200) & (first[..., 1] > 180) & (first[..., 2] < 80)).any()
    # The mined folder stays a valid output folder: the next run resumes into it.
    check_output_dir(mined)


def test_limit_and_out(mined, tmp_path):
    target = tmp_path / "sheet.html"
    assert preview.main([str(mined), "--limit", "2", "--out", str(target)]) == 0
    assert len(Page(target.read_text()).cards) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{missing}"], "error: OUT '{missing}' does not exist"),
        (["{empty}"], "error: {empty}: holds no committed shard (no *_stats.json); mine into it first"),
        (["{mined}", "--out", "{empty}"], "error: --out '{empty}' is a folder; give a file name"),
        (["{mined}", "--out", "{missing}/x.html"], "error: --out '{missing}/x.html': the folder '{missing}' does not exist"),
        (["{mined}", "--limit", "0"], "error: argument --limit: must be at least 1, got 0"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_2(mined, tmp_path, capsys, args, message):
    names = {"missing": str(tmp_path / "missing"), "empty": str(tmp_path / "empty"), "mined": str(mined)}
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) if "--limit" in args else _no_exit() as code:
        result = preview.main([a.format(**names) for a in args])
    status = code.value.code if "--limit" in args else result
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err[-1].endswith(message.format(**names)), err
    assert not list((tmp_path / "empty").iterdir())


class _no_exit:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
