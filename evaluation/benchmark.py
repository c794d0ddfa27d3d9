"""The evaluation benchmark (paper section 6.1): scenes with one box each x subjects x prompts.

A benchmark folder holds everything a run needs, so it can be copied to GPU nodes as is:

    BENCH/benchmark.json        how it was built (rule, seed, scenes, subjects, prompts)
    BENCH/cases.parquet         one row per case (CASE_COLUMNS)
    BENCH/scenes/               the scene images, as read from COCO (bytes unchanged)
    BENCH/subjects/             each subject background-free (RGBA PNG, alpha = mask), cropped
    BENCH/subject_masks/        the full-size mask of each subject photo (L PNG), for inspection
    BENCH/subject_sources/      the subject photos the cuts come from

`build_coco` follows the paper: 20 COCO val2017 images with one box each (the seeded rule of
`select_scenes`), 5 live and 5 non-live DreamBooth subjects (`select_subjects`), and the ten
prompts of Fig. 9 for the subject's kind with S* replaced by its class noun: 2,000 cases. Each
subject is cut out with the data engine's own ground (Grounding DINO, the class noun as the text)
and segment (SAM) stages; a hand-made mask overrides the cut. `build_synthetic` writes the same
layout from scikit-image's bundled photos and drawn subjects, offline and without models.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

FORMAT = "lar-gen-eval-benchmark/1"

# Fig. 9 of the paper, verbatim ("S*" is replaced by the subject's class noun).
PROMPTS = {
    "non-live": [
        "a S* on top of a white fabric",
        "a S* on top of a purple rug",
        "a S* nearby some books",
        "a S* on top of a wooden box",
        "a red S*",
        "a green S*",
        "a S*, and some sunflowers at around",
        "a S*, and some autumn leaves at around",
        "a S* nearby a ball",
        "a S* in front of a cube-shaped metal",
    ],
    "live": [
        "a S* running",
        "a S* on top of a purple rug",
        "a S* nearby some books",
        "a S* wearing a bowtie",
        "a S* wearing a top hat",
        "a S* plays with a ball",
        "a S*, and some sunflowers at around",
        "a S*, and some autumn leaves at around",
        "a S* wearing sunglasses",
        "a S* wearing a rainbow scarf",
    ],
}
KINDS = ("live", "non-live")
# DreamBooth's README marks its cats and dogs (9 of the 30 subjects) as the live subjects.
LIVE_CLASSES = frozenset({"cat", "dog"})

# The scene rule (select_scenes): COCO boxes big enough to hold a subject, small enough to leave a scene.
MIN_BOX_FRACTION = 0.05
MAX_BOX_FRACTION = 0.35
MIN_BOX_SIDE = 64

CASE_COLUMNS = [
    "case_id", "scene_id", "scene_path", "box", "subject", "subject_class", "kind", "subject_path",
    "prompt_index", "prompt", "seed",
]  # fmt: skip
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class BenchmarkError(ValueError):
    """Bad benchmark input; the message is one line that names the path or value at fault."""


@dataclass(frozen=True)
class Scene:
    """A scene image and the box to inpaint (x0, y0, x1, y1 pixels, x1/y1 exclusive)."""

    scene_id: str
    path: Path
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class Cut:
    """A background-free subject: RGBA crop (alpha = mask), the photo's full mask, how it was made, the crop box."""

    image: Image.Image
    mask: Image.Image
    how: str  # "ground+segment" or "hand-made"
    crop: tuple[int, int, int, int]


@dataclass(frozen=True)
class Subject:
    """A subject: its name, class noun, kind (live / non-live) and photo."""

    name: str
    class_noun: str
    kind: str
    photo: Path


def case_seed(bench_seed: int, case_id: str) -> int:
    """The case's own seed: a hash of the benchmark seed and the case id, so it never depends on order."""
    digest = hashlib.sha256(f"{bench_seed}/{case_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def prompt_for(kind: str, index: int, class_noun: str) -> str:
    """Prompt `index` of Fig. 9 for `kind` with S* replaced by `class_noun`."""
    return PROMPTS[kind][index].replace("S*", class_noun)


# ---------------------------------------------------------------------- COCO scenes
def select_scenes(annotation_file: str | os.PathLike, count: int, seed: int) -> list[tuple[dict, dict]]:
    """The paper's 20 scenes, by a seeded rule: (COCO image record, chosen annotation) pairs.

    Rule: an annotation qualifies when it is not a crowd, its box covers MIN_BOX_FRACTION to
    MAX_BOX_FRACTION of the image and both box sides are >= MIN_BOX_SIDE pixels. Each image with a
    qualifying annotation is a candidate with its largest qualifying box (ties: lowest annotation id);
    `count` candidates are drawn without replacement by `numpy.random.default_rng(seed)` from the
    candidates sorted by image id, and returned in image-id order.

    Raises:
        BenchmarkError: the file is missing or not COCO instances JSON, or too few images qualify.
    """
    path = Path(annotation_file)
    if not path.is_file():
        raise BenchmarkError(f"annotation file {str(path)!r} does not exist (expected COCO instances_val2017.json)")
    from pycocotools.coco import COCO

    try:
        with _quiet_stdout():
            coco = COCO(str(path))
    except (ValueError, KeyError, TypeError, AssertionError, UnicodeDecodeError) as err:
        raise BenchmarkError(f"annotation file {str(path)!r} is not COCO instances JSON ({type(err).__name__}: {err})") from err
    if not coco.dataset.get("annotations") or not coco.dataset.get("images"):
        raise BenchmarkError(f"annotation file {str(path)!r} has no images or no annotations")
    candidates = []
    for image_id in sorted(coco.getImgIds()):
        info = coco.imgs[image_id]
        area = float(info["width"]) * float(info["height"])
        best = None
        for ann in sorted(coco.imgToAnns.get(image_id, []), key=lambda a: a["id"]):
            _, _, w, h = ann["bbox"]
            if ann.get("iscrowd", 0) or min(w, h) < MIN_BOX_SIDE:
                continue
            if not MIN_BOX_FRACTION <= (w * h) / area <= MAX_BOX_FRACTION:
                continue
            if best is None or w * h > best["bbox"][2] * best["bbox"][3]:
                best = ann
        if best is not None:
            candidates.append((info, best))
    if len(candidates) < count:
        raise BenchmarkError(
            f"annotation file {str(path)!r}: only {len(candidates)} image(s) have a non-crowd box covering "
            f"{MIN_BOX_FRACTION:g}-{MAX_BOX_FRACTION:g} of the image with sides >= {MIN_BOX_SIDE} px; need {count}"
        )
    picked = np.random.default_rng(seed).choice(len(candidates), size=count, replace=False)
    return [candidates[i] for i in sorted(int(i) for i in picked)]


class _quiet_stdout:
    """pycocotools prints its loading progress; a benchmark build reports through its own lines."""

    def __enter__(self):
        import contextlib
        import io

        self._redirect = contextlib.redirect_stdout(io.StringIO())
        return self._redirect.__enter__()

    def __exit__(self, *exc):
        return self._redirect.__exit__(*exc)


# ---------------------------------------------------------------------- DreamBooth subjects
def dreambooth_root(folder: str | os.PathLike) -> Path:
    """The folder holding `prompts_and_classes.txt` and one folder per subject (the repo's `dataset/`).

    Raises:
        BenchmarkError: neither `folder` nor `folder/dataset` holds `prompts_and_classes.txt`.
    """
    path = Path(folder)
    if not path.is_dir():
        raise BenchmarkError(f"--dreambooth {str(path)!r} is not a folder")
    for root in (path, path / "dataset"):
        if (root / "prompts_and_classes.txt").is_file():
            return root
    raise BenchmarkError(
        f"--dreambooth {str(path)!r} has no prompts_and_classes.txt (give the DreamBooth repository or its dataset/ folder)"
    )


def read_dreambooth_classes(root: Path) -> dict[str, str]:
    """subject name -> class noun, from the `subject_name,class` table of `prompts_and_classes.txt`.

    Raises:
        BenchmarkError: the file holds no such table.
    """
    path = root / "prompts_and_classes.txt"
    classes: dict[str, str] = {}
    in_table = False
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        text = line.strip()
        if text == "subject_name,class":
            in_table = True
        elif in_table and "," in text:
            name, noun = (part.strip() for part in text.split(",", 1))
            classes[name] = noun
        elif in_table and classes:
            break  # the blank line (or "Prompts") after the table
    if not classes:
        raise BenchmarkError(f"{str(path)!r} has no 'subject_name,class' table")
    return classes


def select_subjects(
    root: Path, per_kind: int, seed: int, names: Sequence[str] | None = None
) -> list[Subject]:
    """5 live + 5 non-live subjects by a seeded rule, or the subjects `names`; each with its first photo.

    Rule: live = class noun in LIVE_CLASSES (DreamBooth's cats and dogs). From each kind's subjects
    sorted by name, `per_kind` are drawn by `numpy.random.default_rng(seed)` (live first, then
    non-live from the same generator). A subject's photo is its first image file in name order
    (DreamBooth's `00.jpg`).

    Raises:
        BenchmarkError: a chosen subject's folder is missing or holds no image, or a kind has too few subjects.
    """
    classes = read_dreambooth_classes(root)
    if names:
        unknown = [n for n in names if n not in classes]
        if unknown:
            raise BenchmarkError(f"--subjects {','.join(unknown)!r}: not in {str(root / 'prompts_and_classes.txt')!r}")
        chosen = list(names)
    else:
        rng = np.random.default_rng(seed)
        chosen = []
        for kind in KINDS:
            pool = sorted(n for n, c in classes.items() if (c in LIVE_CLASSES) == (kind == "live"))
            if len(pool) < per_kind:
                raise BenchmarkError(f"{str(root)!r} lists {len(pool)} {kind} subject(s); need {per_kind}")
            chosen += [pool[i] for i in sorted(int(i) for i in rng.choice(len(pool), size=per_kind, replace=False))]
    subjects = []
    for name in chosen:
        folder = root / name
        if not folder.is_dir():
            raise BenchmarkError(f"DreamBooth subject folder {str(folder)!r} does not exist")
        photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not photos:
            raise BenchmarkError(f"DreamBooth subject folder {str(folder)!r} holds no image")
        noun = classes[name]
        subjects.append(Subject(name, noun, "live" if noun in LIVE_CLASSES else "non-live", photos[0]))
    return subjects


def read_rgb(path: Path, what: str) -> Image.Image:
    """The image at `path` as RGB.

    Raises:
        BenchmarkError: naming `what` and the path, when it is missing or not a readable image.
    """
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except FileNotFoundError as err:
        raise BenchmarkError(f"{what} {str(path)!r} does not exist") from err
    except (OSError, ValueError, SyntaxError) as err:
        raise BenchmarkError(f"{what} {str(path)!r} is not a readable image ({err})") from err


# ---------------------------------------------------------------------- cut-outs
def cut_subjects(
    subjects: Sequence[Subject],
    masks_dir: Path | None,
    config: str | os.PathLike,
    pipeline: str,
    profile: str | None,
    overrides: Sequence[str] = (),
) -> dict[str, Cut]:
    """name -> the subject's background-free `Cut`.

    A mask `masks_dir/<name>.png` (white = subject, the photo's size) is used as is; the others go
    through the data engine's ground stage with the class noun as the only tag (the best box after
    NMS is kept), its segment stage (SAM on that box) and its subject stage (the box grown by
    `subject.margin`, alpha = mask), configured by `pipeline` / `profile` of `config`.

    Raises:
        BenchmarkError: a hand-made mask is unreadable or of the wrong size, or no box is found.
    """
    photos = {s.name: read_rgb(s.photo, "subject photo") for s in subjects}
    out: dict[str, Cut] = {}
    todo = []
    for subject in subjects:
        hand = masks_dir / f"{subject.name}.png" if masks_dir else None
        if hand is not None and hand.exists():
            try:
                with Image.open(hand) as img:
                    mask = img.convert("L")
            except (OSError, ValueError) as err:
                raise BenchmarkError(f"hand-made mask {str(hand)!r} is not a readable image ({err})") from err
            if mask.size != photos[subject.name].size:
                raise BenchmarkError(
                    f"hand-made mask {str(hand)!r} is {mask.width}x{mask.height} but {str(subject.photo)!r} is "
                    f"{photos[subject.name].width}x{photos[subject.name].height}"
                )
            binary = np.asarray(mask) >= 128
            if not binary.any():
                raise BenchmarkError(f"hand-made mask {str(hand)!r} is empty (no pixel >= 128)")
            out[subject.name] = _cut(photos[subject.name], binary, margin=0.05)
        else:
            todo.append(subject)
    if todo:
        out.update(_engine_cuts(todo, photos, config, pipeline, profile, overrides))
    return out


def _engine_cuts(subjects, photos, config, pipeline, profile, overrides):
    from dataengine.config import load_run_config
    from dataengine.inputs import InputItem
    from dataengine.stages.base import PENDING, ImageRecord
    from dataengine.stages.ground import GroundStage
    from dataengine.stages.segment import SegmentStage
    from dataengine.stages.subject import SubjectStage, crop_box
    from dataengine.typed_config import ConfigError

    try:
        cfg = load_run_config(config, pipeline, profile, overrides)
    except ConfigError as err:
        raise BenchmarkError(str(err).splitlines()[0]) from err
    records = []
    for i, subject in enumerate(subjects):
        record = ImageRecord(shard=0, index=i, item=InputItem(uri=str(subject.photo), path=str(subject.photo)))
        record.image = np.asarray(photos[subject.name])
        record.size = record.image.shape[:2]
        record.tags = [subject.class_noun]
        records.append(record)
    for stage_cls in (GroundStage, SegmentStage, SubjectStage):
        stage_cls(cfg).run(records)
    out = {}
    for subject, record in zip(subjects, records):
        if record.status != PENDING or not record.instances:
            raise BenchmarkError(
                f"subject photo {str(subject.photo)!r}: no {subject.class_noun!r} found ({record.error or 'no box'}); "
                f"draw its mask as <masks>/{subject.name}.png and pass --masks"
            )
        best = record.instances[0]  # the ground stage keeps boxes best score first
        h, w = record.image.shape[:2]
        crop = crop_box(best.box, cfg.pipeline.subject.margin, w, h)  # where the subject stage cut it
        out[subject.name] = Cut(Image.fromarray(best.subject, "RGBA"), _mask_image(best.mask), "ground+segment", crop)
    return out


def _mask_image(binary: np.ndarray) -> Image.Image:
    return Image.fromarray(binary.astype(np.uint8) * 255, "L")


def _cut(photo: Image.Image, binary: np.ndarray, margin: float) -> Cut:
    """A hand-made cut: the mask's bounding box grown by `margin` per side (as the subject stage grows a box)."""
    from dataengine.stages.subject import crop_box

    ys, xs = np.nonzero(binary)
    x0, y0, x1, y1 = crop_box((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), margin, photo.width, photo.height)
    rgb = np.asarray(photo)[y0:y1, x0:x1]
    image = Image.fromarray(np.dstack([rgb, binary[y0:y1, x0:x1].astype(np.uint8) * 255]), "RGBA")
    return Cut(image, _mask_image(binary), "hand-made", (x0, y0, x1, y1))


# ---------------------------------------------------------------------- writing a benchmark
def write_benchmark(
    out: Path,
    scenes: Sequence[tuple[Scene, bytes, str]],
    subjects: Sequence[Subject],
    cuts: dict[str, Cut],
    seed: int,
    prompts_per_subject: int,
    meta: dict,
) -> Path:
    """Write the benchmark folder into a temporary sibling, then rename it to `out` (never half-written).

    `scenes` holds (scene, its file bytes, file suffix).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for sub in ("scenes", "subjects", "subject_masks", "subject_sources"):
            (tmp / sub).mkdir()
        rows = {c: [] for c in CASE_COLUMNS}
        for scene, data, suffix in scenes:
            (tmp / "scenes" / f"{scene.scene_id}{suffix}").write_bytes(data)
        for subject in subjects:
            cuts[subject.name].image.save(tmp / "subjects" / f"{subject.name}.png")
            cuts[subject.name].mask.save(tmp / "subject_masks" / f"{subject.name}.png")
            shutil.copyfile(subject.photo, tmp / "subject_sources" / f"{subject.name}{subject.photo.suffix.lower()}")
        for scene, _, suffix in scenes:
            for subject in subjects:
                for k in range(prompts_per_subject):
                    case_id = f"{scene.scene_id}__{subject.name}__{k:02d}"
                    values = {
                        "case_id": case_id,
                        "scene_id": scene.scene_id,
                        "scene_path": f"scenes/{scene.scene_id}{suffix}",
                        "box": [float(v) for v in scene.box],
                        "subject": subject.name,
                        "subject_class": subject.class_noun,
                        "kind": subject.kind,
                        "subject_path": f"subjects/{subject.name}.png",
                        "prompt_index": k,
                        "prompt": prompt_for(subject.kind, k, subject.class_noun),
                        "seed": case_seed(seed, case_id),
                    }
                    for key, value in values.items():
                        rows[key].append(value)
        pq.write_table(pa.table(rows), tmp / "cases.parquet")
        meta = {
            "format": FORMAT,
            "seed": seed,
            "cases": len(rows["case_id"]),
            "scenes": [{"id": s.scene_id, "box": list(s.box)} for s, _, _ in scenes],
            "subjects": [
                {"name": s.name, "class": s.class_noun, "kind": s.kind, "photo": s.photo.name,
                 "cut": cuts[s.name].how, "crop": list(cuts[s.name].crop)}
                for s in subjects
            ],
            "prompts_per_subject": prompts_per_subject,
            **meta,
        }
        (tmp / "benchmark.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def build_coco(
    coco: str | os.PathLike,
    dreambooth: str | os.PathLike,
    out: str | os.PathLike,
    *,
    seed: int = 0,
    scenes: int = 20,
    subjects_per_kind: int = 5,
    prompts_per_subject: int = 10,
    subject_names: Sequence[str] | None = None,
    masks: str | os.PathLike | None = None,
    config: str | os.PathLike = "pipelines.yaml",
    pipeline: str = "default",
    profile: str | None = None,
    overrides: Sequence[str] = (),
) -> Path:
    """Build the paper's benchmark from COCO val2017 (`coco`: images + annotations) and DreamBooth.

    `coco` holds `annotations/instances_val2017.json` (or `instances_val2017.json`) and the images in
    `val2017/` (or beside the annotations). Every input is checked before any model is loaded.

    Raises:
        BenchmarkError: a missing or bad input, named by its path.
    """
    coco_dir = Path(coco)
    if not coco_dir.is_dir():
        raise BenchmarkError(f"--coco {str(coco_dir)!r} is not a folder")
    ann = next((p for p in (coco_dir / "annotations" / "instances_val2017.json", coco_dir / "instances_val2017.json") if p.is_file()),
               coco_dir / "annotations" / "instances_val2017.json")
    image_dir = coco_dir / "val2017" if (coco_dir / "val2017").is_dir() else coco_dir
    masks_dir = Path(masks) if masks else None
    if masks_dir is not None and not masks_dir.is_dir():
        raise BenchmarkError(f"--masks {str(masks_dir)!r} is not a folder")
    root = dreambooth_root(dreambooth)
    chosen = select_subjects(root, subjects_per_kind, seed, subject_names)
    picked = select_scenes(ann, scenes, seed)
    scene_list = []
    for info, annotation in picked:
        path = image_dir / info["file_name"]
        image = read_rgb(path, "COCO image")
        if image.size != (info["width"], info["height"]):
            raise BenchmarkError(
                f"COCO image {str(path)!r} is {image.width}x{image.height} but {str(ann)!r} says {info['width']}x{info['height']}"
            )
        x, y, w, h = annotation["bbox"]
        box = (round(x, 2), round(y, 2), round(x + w, 2), round(y + h, 2))
        scene_list.append((Scene(f"coco{info['id']:012d}", path, box), path.read_bytes(), path.suffix.lower()))
    cuts = cut_subjects(chosen, masks_dir, config, pipeline, profile, overrides)
    rule = {
        "source": "coco-val2017+dreambooth",
        "scene_rule": {
            "min_box_fraction": MIN_BOX_FRACTION, "max_box_fraction": MAX_BOX_FRACTION,
            "min_box_side": MIN_BOX_SIDE, "iscrowd": False, "one_box_per_image": "largest qualifying",
        },
        "subject_rule": {"per_kind": subjects_per_kind, "live_classes": sorted(LIVE_CLASSES), "photo": "first by name"},
        "cut": {"config": str(config), "pipeline": pipeline, "profile": profile, "overrides": list(overrides)},
    }
    return write_benchmark(Path(out), scene_list, chosen, cuts, seed, prompts_per_subject, rule)


# ---------------------------------------------------------------------- the synthetic benchmark
SYNTHETIC_SCENES = ("astronaut", "coffee", "chelsea", "rocket")
SYNTHETIC_SUBJECTS = (("red_ball", "ball", "non-live"), ("blue_cat", "cat", "live"))


def _drawn_subject(name: str, size: int = 96) -> tuple[Image.Image, np.ndarray]:
    """A drawn subject photo (shape on a textured background) and its exact mask."""
    rng = np.random.default_rng(len(name))
    background = (rng.random((size, size, 3)) * 60 + 150).astype(np.uint8)
    photo = Image.fromarray(background)
    mask = Image.new("L", (size, size), 0)
    pad = size // 6
    for target, fill in ((ImageDraw.Draw(photo), None), (ImageDraw.Draw(mask), 255)):
        if name == "red_ball":
            target.ellipse((pad, pad, size - pad, size - pad), fill=fill or (200, 30, 30))
        else:
            target.polygon([(pad, size - pad), (size // 2, pad), (size - pad, size - pad)], fill=fill or (30, 60, 200))
    return photo, np.asarray(mask) >= 128


def build_synthetic(
    out: str | os.PathLike, *, seed: int = 0, scenes: int = 2, subjects: int = 2, prompts_per_subject: int = 2,
    size: int = 96,
) -> Path:
    """A small benchmark with the real layout, from scikit-image photos and drawn subjects (no models).

    Scenes are scikit-image's bundled photos resized to `size` px on the longer side, each with a
    box over its centre; subjects are drawn shapes whose masks are known exactly (recorded as
    hand-made cuts); prompts are the first `prompts_per_subject` of Fig. 9 for the subject's kind.
    """
    import io

    from skimage import data as skdata

    if not 1 <= scenes <= len(SYNTHETIC_SCENES) or not 1 <= subjects <= len(SYNTHETIC_SUBJECTS):
        raise BenchmarkError(
            f"--synthetic holds 1-{len(SYNTHETIC_SCENES)} scenes and 1-{len(SYNTHETIC_SUBJECTS)} subjects"
        )
    if not 1 <= prompts_per_subject <= 10:
        raise BenchmarkError("--prompts must be 1-10 (Fig. 9 lists ten per kind)")
    scene_list = []
    for name in SYNTHETIC_SCENES[:scenes]:
        image = Image.fromarray(np.asarray(getattr(skdata, name)())).convert("RGB")
        image.thumbnail((size, size), Image.Resampling.LANCZOS)
        w, h = image.size
        box = (float(w // 4), float(h // 4), float(w - w // 4), float(h - h // 4))
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        scene_list.append((Scene(name, Path(f"{name}.png"), box), buf.getvalue(), ".png"))
    chosen, cuts = [], {}
    with tempfile.TemporaryDirectory(prefix="largen-synthetic-") as scratch:
        for name, noun, kind in SYNTHETIC_SUBJECTS[:subjects]:
            photo, binary = _drawn_subject(name)
            path = Path(scratch, f"{name}.png")
            photo.save(path)
            chosen.append(Subject(name, noun, kind, path))
            cuts[name] = _cut(photo, binary, margin=0.05)
        return write_benchmark(
            Path(out), scene_list, chosen, cuts, seed, prompts_per_subject, {"source": "synthetic"}
        )


# ---------------------------------------------------------------------- reading a benchmark
def load_cases(bench: str | os.PathLike) -> list[dict]:
    """The cases of a benchmark folder, once every file they need is known to be there and readable.

    Raises:
        BenchmarkError: no such folder, no (or a bad) cases.parquet, or a missing / unreadable image.
    """
    root = Path(bench)
    if not root.is_dir():
        raise BenchmarkError(f"--bench {str(root)!r} is not a folder (build one with `largen eval build`)")
    table_path = root / "cases.parquet"
    if not table_path.is_file():
        raise BenchmarkError(f"--bench {str(root)!r} has no cases.parquet (build one with `largen eval build`)")
    try:
        table = pq.read_table(table_path)
    except (OSError, pa.ArrowException) as err:
        raise BenchmarkError(f"{str(table_path)!r} is not a readable parquet file ({err})") from err
    missing = [c for c in CASE_COLUMNS if c not in table.column_names]
    if missing:
        raise BenchmarkError(f"{str(table_path)!r} lacks the column(s) {', '.join(missing)}")
    cases = table.select(CASE_COLUMNS).to_pylist()
    if not cases:
        raise BenchmarkError(f"{str(table_path)!r} holds no case")
    checked: set[str] = set()
    for case in cases:
        for key, what in (("scene_path", "scene image"), ("subject_path", "subject image")):
            rel = case[key]
            if rel in checked:
                continue
            path = root / rel
            try:
                with Image.open(path) as img:
                    img.load()
                    size = img.size
            except FileNotFoundError as err:
                raise BenchmarkError(f"{what} {str(path)!r} does not exist") from err
            except (OSError, ValueError, SyntaxError) as err:
                raise BenchmarkError(f"{what} {str(path)!r} is not a readable image ({err})") from err
            if key == "scene_path":
                x0, y0, x1, y1 = case["box"]
                if not (0 <= x0 < x1 <= size[0] and 0 <= y0 < y1 <= size[1]):
                    raise BenchmarkError(f"case {case['case_id']}: box {case['box']} is outside {str(path)!r}")
            checked.add(rel)
    return cases
