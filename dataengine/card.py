"""The dataset card of a release: `README.md` (Hugging Face card with YAML front matter) and its plots.

Written by `dataengine.release` from the release's `release.json` data and its manifest. Nothing
in it depends on the clock or on paths, so the same release gives the same bytes: the PNGs are
drawn with matplotlib's object API (no global pyplot state) and saved without the `Software`
tag, the text holds no timestamp.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from matplotlib.figure import Figure

from dataengine.release_format import OTHER_LICENSE, hub_license

CARD_DIR = "card"
TOP_TAGS = 25
# HF split names: the val tars are published as the conventional "validation" split.
HF_SPLIT = {"train": "train", "val": "validation"}


def _save(fig: Figure, path: Path) -> None:
    """Save a PNG with fixed metadata (no Software/version tag), so the bytes are reproducible."""
    fig.savefig(path, format="png", dpi=100, metadata={"Software": None})


def _hist(
    values: np.ndarray, title: str, xlabel: str, path: Path, bins: Any = 30, rng: tuple | None = None
) -> None:
    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.add_subplot()
    ax.hist(values, bins=bins, range=rng, color="#4c72b0", edgecolor="white")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    _save(fig, path)


def write_plots(root: Path, table: pa.Table) -> dict[str, str]:
    """Draw the card's plots from the manifest into `root/card/`.

    Args:
        root: the release folder.
        table: the manifest table (`dataengine.release_format.MANIFEST_SCHEMA`).

    Returns:
        plot name -> path relative to `root`.
    """
    out = root / CARD_DIR
    out.mkdir(exist_ok=True)
    paths = {}

    tags = Counter(table.column("tag").to_pylist()).most_common()
    top = sorted(tags, key=lambda kv: (-kv[1], kv[0]))[:TOP_TAGS]
    fig = Figure(figsize=(6, 0.6 + 0.25 * max(len(top), 1)), layout="constrained")
    ax = fig.add_subplot()
    ax.barh([t for t, _ in reversed(top)], [n for _, n in reversed(top)], color="#4c72b0")
    ax.set_title(f"Top {len(top)} tags (of {len(tags)})")
    ax.set_xlabel("samples")
    _save(fig, out / "tags.png")
    paths["tags"] = f"{CARD_DIR}/tags.png"

    area = np.asarray(table.column("mask_area_frac").to_pylist(), dtype=float)
    _hist(area, "Mask area fraction", "mask area / image area", out / "mask_area.png", rng=(0, 1))
    paths["mask_area"] = f"{CARD_DIR}/mask_area.png"

    words = np.asarray([len(c.split()) for c in table.column("caption").to_pylist()], dtype=float)
    top_len = max(int(words.max()), 1)
    _hist(words, "Caption length", "words", out / "caption_length.png", bins=np.arange(0, top_len + 2) - 0.5)
    paths["caption_length"] = f"{CARD_DIR}/caption_length.png"

    fig = Figure(figsize=(8, 3.5), layout="constrained")
    for i, (col, title) in enumerate(
        (("box_score", "Box score (grounding)"), ("mask_score", "Mask score (segmentation)"))
    ):
        ax = fig.add_subplot(1, 2, i + 1)
        scores = np.asarray(table.column(col).to_pylist(), dtype=float)
        ax.hist(scores, bins=40, range=(0, 1), color="#55a868", edgecolor="white")
        ax.set_title(title)
        ax.set_xlabel("score")
        ax.set_ylabel("samples")
    _save(fig, out / "scores.png")
    paths["scores"] = f"{CARD_DIR}/scores.png"
    return paths


def _size_category(n: int) -> str:
    for limit, name in (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
    ):
        if n < limit:
            return name
    return "1M<n<10M" if n < 10_000_000 else "n>10M"


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def render_card(info: dict[str, Any], plots: dict[str, str]) -> str:
    """The card's Markdown (with Hugging Face YAML front matter) from the release description.

    Args:
        info: the release description (`release.json`).
        plots: plot name -> relative path (from `write_plots`).

    Returns:
        the text of README.md.
    """
    counts = info["counts"]
    splits = list(counts["samples"])
    total = sum(counts["samples"].values())
    inputs = info["inputs"]
    params = info["params"]
    data_files = "\n".join(f"  - split: {HF_SPLIT[s]}\n    path: {s}-*.tar" for s in splits)
    license = params["license"]
    lines = [
        "---",
        f"license: {hub_license(license) if license != OTHER_LICENSE else OTHER_LICENSE}",
        "pretty_name: LAR-Gen quadruplets",
        "task_categories:",
        "- image-to-image",
        "tags:",
        "- inpainting",
        "- webdataset",
        "- lar-gen",
        "size_categories:",
        f"- {_size_category(total)}",
        "configs:",
        "- config_name: default",
        "  data_files:",
        data_files,
        "---",
        "",
        "# LAR-Gen quadruplets",
        "",
        "Training quadruplets for promptable image inpainting (LAR-Gen, Pan et al. 2025): a source image, "
        "the mask of one object instance, the subject image of that instance (RGBA), and a regional "
        "caption, mined by the lar-gen data engine (tag → ground → segment → caption) and packed by "
        "`make shards`.",
        "",
        "## Counts",
        "",
        "| split | samples | source images | shards | payload |",
        "|---|---:|---:|---:|---:|",
    ]
    for s in splits:
        lines.append(
            f"| {s} (HF: `{HF_SPLIT[s]}`) | {counts['samples'][s]:,} | {counts['sources'][s]:,} | "
            f"{counts['shards'][s]:,} | {_mib(counts['bytes'][s])} |"
        )
    lines += [
        f"| **total** | **{total:,}** | **{sum(counts['sources'].values()):,}** | "
        f"**{sum(counts['shards'].values()):,}** | **{_mib(sum(counts['bytes'].values()))}** |",
        "",
        "Splits are by source image: every instance of one source image is in the same split.",
        "",
        "## Format",
        "",
        f"WebDataset tars `{{split}}-{{shard:06d}}.tar`, sample schema version {info['sample_schema_version']} "
        "(`dataengine/schema.py`, docs/data-format.md). One sample = one object instance; key "
        "`{source_id}-{instance:03d}`, where `source_id` is the first 16 hex digits of the SHA-256 of "
        "the source image bytes.",
        "",
        "| field | content |",
        "|---|---|",
        "| `source.jpg` | the source scene, RGB |",
        "| `mask.png` | the instance mask, mode L, 0/255, same size as `source.jpg` |",
        "| `subject.png` | RGBA crop of the instance (box with margin), alpha = mask |",
        "| `txt` | the regional caption, UTF-8 |",
        "| `json` | source_id, instance, uri, size, tag, box_xyxy, box/text/mask scores, mask area fraction, model ids, pipeline, config hash |",
        "",
        "Beside the tars:",
        "",
        "| file | content |",
        "|---|---|",
        "| `manifest.parquet` | one row per sample: key, split, shard, index_in_shard, source_id, instance, tag, caption, box, scores, mask area fraction, image sizes, bytes, uri, provenance |",
    ]
    lines += [f"| `{s}.index.json` | wids shard index of split {s} (`wids-shard-index-v1`) |" for s in splits]
    lines += [
        "| `release.json` | release parameters, counts, dropped and rejected samples, provenance |",
        "| `SHA256SUMS` | `sha256sum -c SHA256SUMS` over every other file |",
        "",
        "## Loading",
        "",
        "```python",
        "import io",
        "import webdataset as wds",
        "from PIL import Image",
        "",
        'def pil_keep_mode(key, data):  # decode("pil") would turn the L mask and the RGBA subject into RGB',
        '    if key.endswith((".jpg", ".png")):',
        "        img = Image.open(io.BytesIO(data))",
        "        img.load()",
        "        return img",
        "",
        f'shards = "{splits[0]}-{{000000..{counts["shards"][splits[0]] - 1:06d}}}.tar"',
        "ds = wds.WebDataset(shards, shardshuffle=100).decode(pil_keep_mode)",
        'for s in ds:  # s["source.jpg"] RGB, s["mask.png"] L, s["subject.png"] RGBA, s["txt"] str, s["json"] dict',
        "    break",
        "",
        "import wids  # random access, from the shard index",
        f'ds = wids.ShardListDataset("{splits[0]}.index.json")',
        "",
        "import datasets",
        'ds = datasets.load_dataset("path/to/this/folder")  # splits train/validation from the front matter',
        '# or: datasets.load_dataset("webdataset", data_files={"train": "train-*.tar"}); images keep their modes',
        "```",
        "",
        "Check a download with `sha256sum -c SHA256SUMS` or `python -m dataengine.validate .`.",
        "",
        "## License",
        "",
        license_text(license),
        "",
        "## Statistics",
        "",
        f"![top tags]({plots['tags']})",
        "",
        f"![mask area fraction]({plots['mask_area']})",
        "",
        f"![caption length]({plots['caption_length']})",
        "",
        f"![box and mask scores]({plots['scores']})",
        "",
        "## Provenance: pipeline and models",
        "",
        "Pipeline name and config hash (`RunConfig.config_hash`, over the whole resolved pipeline "
        "config) as written into every sample's json, with the model ids that produced it:",
        "",
        "| pipeline | config hash | samples | models |",
        "|---|---|---:|---|",
    ]
    for p in info["provenance"]:
        models = ", ".join(f"{role}: `{ref}`" for role, ref in sorted(p["models"].items()))
        lines.append(f"| {p['pipeline']} | `{p['config_hash']}` | {p['samples']:,} | {models} |")
    lines += [
        "",
        "## How this release was built",
        "",
        f"`python -m dataengine.release --input {' '.join(params['inputs'])} --seed {params['seed']} "
        f"--val-fraction {params['val_fraction']} "
        + (
            f"--samples-per-shard {params['samples_per_shard']}"
            if params["samples_per_shard"] is not None
            else f"--shard-bytes {params['shard_bytes']}"
        )
        + f" --license {license}`",
        "",
        f"- inputs: {', '.join(f'`{i}`' for i in params['inputs'])}: {inputs['committed_shards']} committed shard(s); "
        f"{len(inputs['uncommitted_shards_skipped'])} uncommitted shard(s) skipped",
        f"- samples read: {inputs['samples_read']:,}; duplicates dropped (same key, first input wins): "
        f"{inputs['duplicates_dropped']:,}"
        + (
            f", of which {len(inputs['conflicting_duplicates'])} differed in content"
            if inputs["conflicting_duplicates"]
            else ""
        ),
        f"- samples rejected: {inputs['rejected']:,}"
        + (
            " ("
            + ", ".join(f"{k}: {n}" for k, n in inputs["rejected_by_reason"].items())
            + "; listed in `release.json`)"
            if inputs["rejected"]
            else ""
        ),
        "- the shuffle and the split are seeded: the same inputs and options give a byte-identical release",
    ]
    if inputs["input_errors"]:
        lines += ["- input errors:"] + [f"  - {e}" for e in inputs["input_errors"]]
    if inputs["image_status"]:
        status = ", ".join(f"{k}: {n:,}" for k, n in inputs["image_status"].items())
        lines.append(f"- mined source images by status (summed over input shards): {status}")
    if inputs["mining_stats"]:
        lines += [
            "",
            "Mining statistics, summed over the committed input shards (`{shard}_stats.json`):",
            "",
            "| counter | value |",
            "|---|---:|",
        ]
        lines += [f"| `{k}` | {_number(v)} |" for k, v in inputs["mining_stats"].items()]
    return "\n".join(lines) + "\n"


def license_text(license: str) -> str:
    """The card's License section: what `--license` declared, and what `other` means."""
    if license == OTHER_LICENSE:
        return (
            "No license was declared for this release (`--license other`). The samples are derived "
            "from the mined source images (see each sample's `uri`): their terms, and those of the "
            "models that produced the masks and captions, apply."
        )
    return (
        f"Released under [{license}](https://spdx.org/licenses/{license}.html) (SPDX id, declared "
        "with `--license` when the release was built). The samples are derived from the mined "
        "source images (see each sample's `uri`); the builder of the release vouches that their "
        "terms allow this license."
    )


def _number(v: float) -> str:
    return f"{int(v):,}" if float(v).is_integer() else f"{v:,.3f}"


def write_card(root: Path, info: dict[str, Any], table: pa.Table) -> None:
    """Write `README.md` and `card/*.png` into the release folder `root`.

    Args:
        root: the release folder.
        info: the release description (`release.json`).
        table: the manifest table.
    """
    plots = write_plots(root, table)
    (root / "README.md").write_text(render_card(info, plots), encoding="utf-8")
