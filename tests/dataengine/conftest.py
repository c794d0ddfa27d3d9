"""Fixtures of the data-engine tests: run configs over the tiny zoo, a malformed-input corpus, Ray, a reference run."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataengine.config import RunConfig, load_run_config
from dataengine.inputs import write_sample_images


def tiny_config(repo_root: Path, pipeline: str = "sample", overrides: tuple[str, ...] = ()) -> RunConfig:
    """The shipped `sample` pipeline (tiny profile), with overrides."""
    return load_run_config(repo_root / "pipelines.yaml", pipeline, profile="tiny", overrides=list(overrides))


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    """A deterministic RGB test image: smooth gradients plus noise, so models see some structure."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // max(1, width - 1), yy * 255 // max(1, height - 1), (xx + yy) % 256], axis=-1)
    noisy = base + rng.integers(-40, 40, size=base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def exif_rotated_jpeg(upright: Image.Image) -> bytes:
    """A JPEG storing `upright` turned 90° counter-clockwise, with EXIF orientation 6 ("turn 90° CW to view")."""
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    return jpeg_bytes(stored, exif=exif.tobytes())


def malformed_corpus(folder: Path) -> dict[str, str]:
    """Write one file per kind of bad or unusual input into `folder`; returns {file name: kind}.

    The pipeline using it sets limits.max_pixels = 40000, so `huge.png` (250x250) trips the guard.
    """
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes] = {}
    files["good_a.png"] = png_bytes(noise_image(96, 64, 1))
    files["good_b.jpg"] = jpeg_bytes(noise_image(80, 80, 2))
    files["zero_byte.jpg"] = b""
    full = jpeg_bytes(noise_image(96, 64, 3))
    files["truncated.jpg"] = full[: len(full) // 2]
    files["not_an_image.png"] = b"this is a text file, not a PNG\n" * 4
    files["cmyk.jpg"] = jpeg_bytes(noise_image(72, 56, 4).convert("CMYK"))
    deep = (np.asarray(noise_image(64, 48, 5).convert("L"), dtype=np.uint16) * 257)
    files["sixteen_bit.png"] = png_bytes(Image.fromarray(deep))  # mode I;16
    pal = noise_image(64, 64, 6).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    files["palette_transparent.png"] = png_bytes(pal, transparency=0)
    files["grayscale.png"] = png_bytes(noise_image(70, 50, 7).convert("L"))
    upright = noise_image(48, 80, 8)  # portrait once the EXIF orientation is applied
    files["exif_rotated.jpg"] = exif_rotated_jpeg(upright)
    files["one_pixel.png"] = png_bytes(Image.new("RGB", (1, 1), (200, 10, 10)))
    files["huge.png"] = png_bytes(noise_image(250, 250, 9))
    frames = [noise_image(64, 48, 10 + i) for i in range(3)]
    files["animated.png"] = png_bytes(frames[0], save_all=True, append_images=frames[1:], duration=50, loop=0)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {name: name.rsplit(".", 1)[0] for name in files}


def stored_orientation(data: bytes) -> int | None:
    """The EXIF orientation tag of JPEG bytes, for a sanity check of the fixture."""
    return Image.open(io.BytesIO(data)).getexif().get(0x0112)


@pytest.fixture(scope="session")
def sample_images(tmp_path_factory) -> Path:
    """The sample pipeline's bundled photos, in a temp folder."""
    folder = tmp_path_factory.mktemp("sample-images")
    write_sample_images(folder)
    return folder


@pytest.fixture(scope="session")
def sample_cfg(repo_root: Path, tiny_zoo: Path, sample_images: Path) -> RunConfig:
    """The `sample` pipeline over the sample photos (tiny profile)."""
    cfg = tiny_config(repo_root, overrides=(f"inputs=[{{kind: images, path: '{sample_images}', images_per_shard: 2}}]",))
    return cfg


@pytest.fixture(scope="session")
def reference_run(sample_cfg: RunConfig, tmp_path_factory) -> Path:
    """The sample pipeline mined by the plain in-process loop: what every other run must equal."""
    from dataengine.engine import mine

    out = tmp_path_factory.mktemp("reference")
    summary = mine(sample_cfg, out, backend="local", progress=False)
    assert summary.samples > 0
    return out


@pytest.fixture()
def ray_local():
    """The embedded Ray of this pytest process for in-process Ray tests (2 CPUs, no dashboard).

    Started by the first test that needs it and kept for the next ones (Ray exits with the
    process); started again if something shut it down in between (tests/test_docs.py does, to free
    Ray's default ports for the docs' own `ray start`).
    """
    ray = pytest.importorskip("ray")
    os.environ.pop("RAY_ADDRESS", None)
    if not ray.is_initialized():
        # "local": a new instance, never a cluster some `ray start` on this machine left recorded.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    return ray
