"""Fake COCO val2017 and DreamBooth folders with the real layouts, written by the tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

# (image id, [(bbox x, y, w, h), iscrowd], ...) on 200x150 images. Qualifying (the rule of
# evaluation.benchmark.select_scenes): not crowd, 5-35 % of the image, sides >= 64 px.
COCO_IMAGES = {
    1: [((10, 10, 70, 70), 0)],  # qualifies
    2: [((10, 10, 70, 70), 1)],  # crowd only
    3: [((10, 10, 30, 30), 0)],  # too small
    4: [((5, 5, 180, 140), 0)],  # too big
    5: [((0, 0, 64, 64), 0), ((90, 40, 100, 80), 0)],  # two qualify: the larger is taken
    6: [((50, 30, 80, 64), 0)],
    7: [((20, 60, 90, 80), 0)],
    8: [((100, 20, 66, 100), 0)],
}
COCO_CANDIDATES = {1: (10, 10, 80, 80), 5: (90, 40, 190, 120), 6: (50, 30, 130, 94), 7: (20, 60, 110, 140),
                   8: (100, 20, 166, 120)}  # fmt: skip

DREAMBOOTH_CLASSES = {"backpack": "backpack", "cat": "cat", "dog": "dog", "dog2": "dog", "teapot": "teapot", "vase": "vase"}


def _noise(size, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8))


def write_coco(root: Path) -> Path:
    """`root/annotations/instances_val2017.json` + `root/val2017/<id>.jpg`."""
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    images, annotations = [], []
    ann_id = 100
    for image_id, boxes in COCO_IMAGES.items():
        name = f"{image_id:012d}.jpg"
        _noise((200, 150), image_id).save(root / "val2017" / name, quality=90)
        images.append({"id": image_id, "file_name": name, "width": 200, "height": 150})
        for (x, y, w, h), crowd in boxes:
            annotations.append({"id": ann_id, "image_id": image_id, "bbox": [x, y, w, h], "area": w * h,
                                "iscrowd": crowd, "category_id": 1, "segmentation": []})
            ann_id += 1
    data = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    return root


def write_dreambooth(root: Path) -> Path:
    """The google/dreambooth layout: `root/dataset/prompts_and_classes.txt` + `dataset/<subject>/NN.jpg`."""
    dataset = root / "dataset"
    dataset.mkdir(parents=True)
    lines = ["Classes", "", "subject_name,class", *(f"{n},{c}" for n, c in DREAMBOOTH_CLASSES.items()), "",
             "Prompts", "", "Object Prompts", "", "prompt_list = [", "'a {0} {1} in the jungle'", "]"]
    (dataset / "prompts_and_classes.txt").write_text("\n".join(lines) + "\n")
    for k, name in enumerate(DREAMBOOTH_CLASSES):
        (dataset / name).mkdir()
        for i in range(2):
            _noise((72, 64), 1000 + 10 * k + i).save(dataset / name / f"{i:02d}.jpg", quality=90)
    return dataset
