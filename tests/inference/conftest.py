"""Inference tests run torch single-threaded: tiny models on a shared 2-core machine are far faster that way."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.threads import torch_threads


@pytest.fixture(autouse=True, scope="package")
def _single_torch_thread():
    with torch_threads(1):
        yield


W, H = 75, 53  # odd, non-square


@pytest.fixture(scope="module")
def scene():
    """An odd-sized noise image, a mask inside it, and two RGBA subjects with a real shape."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
    mask = np.zeros((H, W), np.uint8)
    mask[14:37, 28:51] = 255
    subjects = [Image.fromarray(rng.integers(0, 256, (29, 17, 4), dtype=np.uint8)) for _ in range(2)]
    for s in subjects:  # RGBA with a real shape
        alpha = np.zeros((29, 17), np.uint8)
        alpha[4:25, 3:14] = 255
        s.putalpha(Image.fromarray(alpha))
    return image, Image.fromarray(mask), subjects
