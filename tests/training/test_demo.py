"""`make demo`'s report page: the region it inpaints and what `index.html` shows (built from a real tiny run)."""

from __future__ import annotations

import html
import re

import numpy as np
import torch
from PIL import Image

from inference.pipeline import LARGenPipeline
from tests.training.test_train import stage_config  # noqa: I001 - the trainer tests' config helper
from training.data import read_quadruplets
from training.demo import RANDOM_WEIGHTS_NOTE, mask_fraction, pick_region, write_report
from training.synthetic import synthetic_quadruplet
from training.train import train


def noisy_quadruplet(index: int):
    """What the tiny zoo mines: a mask of scattered noise over most of the photo, a small grounding box."""
    q = synthetic_quadruplet(index, size=64)
    noise = np.random.default_rng(index).random((64, 64)) < 0.6
    q.mask = Image.fromarray((noise * 255).astype(np.uint8), mode="L")
    q.meta.box_xyxy = [40.0, 10.0, 46.0, 16.0]
    return q


def test_the_demo_region_is_never_the_whole_photo():
    # Full-frame noise masks (random SAM): the grounding box, enlarged to a visible region, inside the photo.
    region = pick_region([noisy_quadruplet(0), noisy_quadruplet(1)])
    assert region.kind == "box" and region.quad.key == noisy_quadruplet(0).key
    x0, y0, x1, y1 = region.box
    assert x1 - x0 == y1 - y0 == 16  # a quarter of the 64-px side
    assert 0 <= x0 <= 40 and x1 >= 46 and 0 <= y0 <= 10 and y1 >= 16 and x1 <= 64 and y1 <= 64
    assert mask_fraction(region.mask) == 16 * 16 / 64**2
    assert "scattered noise" in region.describe()
    # A mined mask that is one region of the photo is used as it is.
    real = synthetic_quadruplet(7, size=64)
    region = pick_region([noisy_quadruplet(0), real])
    assert region.kind == "mask" and region.quad.key == real.key
    assert np.array_equal(np.asarray(region.mask) >= 128, np.asarray(real.mask) >= 128)


def test_the_report_page_explains_the_run(tiny_zoo, synthetic_shards, tmp_path):
    out = tmp_path / "demo-output"
    quads = [noisy_quadruplet(0), *read_quadruplets(synthetic_shards, 2)]
    # Both stages for real, tiny: stage 1 (with a validation grid), stage 2 from its export.
    cfg1 = stage_config(1, tiny_zoo, synthetic_shards, out / "stage1", 2, "validation.every=2",
                        "validation.samples=1", "validation.num_inference_steps=2",
                        pretrained=str(tiny_zoo / "largen-pipeline"))
    result1 = train(cfg1)
    train(stage_config(2, tiny_zoo, synthetic_shards, out / "stage2", 1, pretrained=result1.export_dir))
    region = pick_region(quads)
    pipe = LARGenPipeline.from_pretrained(out / "stage2" / "final")
    final = out / "inpainted.png"
    q = region.quad
    pipe(image=q.source, mask_image=region.mask, prompt=q.text, subject_image=q.subject, num_inference_steps=2,
         generator=torch.Generator().manual_seed(0)).images[0].save(final)

    page = write_report(out, quads, region, final, {"stage 1": 1.0})
    text = page.read_text()
    assert page == out / "index.html"
    assert RANDOM_WEIGHTS_NOTE in text
    for sample in quads:  # every mined sample: its caption and key, and its pictures
        assert sample.text in text and sample.key in text
    for i in range(len(quads)):
        for part in ("source", "mask", "subject"):
            assert f'src="report/sample-{i}-{part}.png"' in text
    # Losses per stage: the values from each run's summary, a plot and a table.
    assert "<h3>Stage 1</h3>" in text and "<h3>Stage 2</h3>" in text
    assert text.count("<polyline") == 2
    for loss in result1.losses:
        assert f"<td>{loss:.4f}</td>" in text
    assert 'src="stage1/validation/step-000002.png"' in text
    # The final inpainting: the region drawn on the source, the mask, the output.
    assert 'src="report/final-region.png"' in text and 'src="inpainted.png"' in text
    assert region.kind == "mask" and html.escape(region.describe()) in text  # the first real mined region
    # Self-contained: every picture the page shows is a file next to it.
    sources = re.findall(r'src="([^"]+)"', text)
    assert len(sources) >= 3 * len(quads) + 4
    assert all((out / s).is_file() for s in sources), [s for s in sources if not (out / s).is_file()]
    drawn = np.asarray(Image.open(out / "report" / "final-region.png").convert("RGB")).astype(int)
    source = np.asarray(region.quad.source.convert("RGB")).astype(int)
    changed = np.any(drawn != source, axis=-1)
    assert 0 < changed.mean() < 0.5  # the region is marked, the rest of the photo is untouched
    assert mask_fraction(Image.open(out / "report" / "final-mask.png")) < 0.5
