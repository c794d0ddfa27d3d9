"""RAM++ as a tagger: a batch of images → for each, the tags over their thresholds, best first.

Pre-processing is upstream's: RGB, resize to the model's square size (bilinear), scale to [0, 1],
ImageNet mean/std. A tag is recognised when its sigmoid probability is above its threshold (the
bundled per-tag thresholds, 0.68 for a tag without one), or above one `threshold` for every tag
when the caller gives it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from dataengine.ram.checkpoint import LoadedRamPlus, load_ram_plus
from dataengine.ram.model import IMAGENET_MEAN, IMAGENET_STD


class RamPlusTagger:
    """Images → [(tag, probability)] above threshold, sorted by probability (ties: tag-list order)."""

    def __init__(self, loaded: LoadedRamPlus, device: str | torch.device = "cpu", threshold: float | None = None,
                 dtype: torch.dtype | None = None):
        """Wrap a loaded RAM++.

        Args:
            loaded: the model with its tag list and per-tag thresholds.
            device: where the model runs.
            threshold: one threshold for every tag instead of the per-tag ones (None: per tag).
            dtype: the weights' dtype (None: as loaded); the inputs follow it.
        """
        self.model = loaded.model.to(device=device, dtype=dtype).eval()
        self.tags = loaded.tags
        self.device = torch.device(device)
        per_tag = [threshold] * len(self.tags) if threshold is not None else loaded.thresholds
        self.thresholds = torch.tensor(per_tag, dtype=torch.float32)
        self.size = self.model.config.image_size
        self.mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
        self.std = np.asarray(IMAGENET_STD, dtype=np.float32)

    @classmethod
    def load(cls, ref: str | os.PathLike, device: str | torch.device = "cpu", threshold: float | None = None,
             dtype: torch.dtype | None = None):
        """Load RAM++ from a tagger ref (file, folder or hub id; `checkpoint.resolve`) and wrap it."""
        return cls(load_ram_plus(ref), device=device, threshold=threshold, dtype=dtype)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(B, 3, S, S) float32 pixels, normalised as the model was trained."""
        arrays = []
        for image in images:
            resized = image.convert("RGB").resize((self.size, self.size), Image.Resampling.BILINEAR)
            arrays.append((np.asarray(resized, dtype=np.float32) / 255.0 - self.mean) / self.std)
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    @torch.inference_mode()
    def probabilities(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(B, num_tags) sigmoid probabilities, float32 on the CPU."""
        pixels = self.preprocess(images).to(self.device, dtype=next(self.model.parameters()).dtype)
        return torch.sigmoid(self.model(pixels).float()).cpu()

    def __call__(self, images: Sequence[Image.Image]) -> list[list[tuple[str, float]]]:
        """Each image's recognised tags with their probabilities, best first."""
        if not images:
            return []
        probs = self.probabilities(images)
        out = []
        for row in probs:
            kept = torch.nonzero(row > self.thresholds).flatten()
            order = kept[torch.argsort(row[kept], descending=True, stable=True)].tolist()
            out.append([(self.tags[i], float(row[i])) for i in order])
        return out
