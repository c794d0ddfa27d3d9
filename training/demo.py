"""`make demo`: the whole chain offline on the tiny zoo: mine the `sample` pipeline -> train stage 1 and 2 -> inpaint.

Every step runs the user-facing command (the engine's `dataengine/run.py`, `accelerate launch -m
training.train` as `make train` does, the `largen inpaint` CLI) as a subprocess, so the demo
exercises exactly what users run. Everything goes under `--output` (default demo-output/), and
`index.html` there explains it: the mined samples (source, mask, subject, caption), each stage's
losses, the validation grids, and the final inpainting with its region drawn on the source. The
last line printed is that page's path.

The tiny zoo has random weights: the mechanics are real, the pictures are noise. Its random SAM
also gives masks that are scattered noise over most of the photo, so the demo inpaints a mined
sample's box (the grounding box, enlarged to be visible) unless a mined mask is a real region.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dataengine.schema import Quadruplet
from training.data import read_quadruplets

REPO = Path(__file__).resolve().parent.parent
SAMPLE_IMAGES = REPO / ".cache" / "sample-images"
REPORT = "index.html"
SHOWN_SAMPLES = 6
THUMB = 160
# A mined mask is used as the demo region only when it is one region of the photo, not noise over
# most of it (what the tiny zoo's random SAM returns).
MASK_MIN_FRACTION, MASK_MAX_FRACTION, MASK_MAX_BOX_FRACTION = 0.01, 0.5, 0.8
MIN_BOX_SIDE = 0.25  # the inpainted box is at least this fraction of the photo's shorter side
RANDOM_WEIGHTS_NOTE = (
    "The tiny model zoo has random weights: every step here is real (mining, both training stages, "
    "checkpoints, export, inpainting), but the pictures it produces are noise."
)


class DemoError(RuntimeError):
    """A step of the demo failed; the message names the step and its command."""


def run_step(name: str, cmd: list[str], env: dict[str, str]) -> float:
    """Run one step, streaming its output; return its wall time.

    Raises:
        DemoError: the command exited with a non-zero status.
    """
    print(f"\n==> {name}\n    {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    status = subprocess.run(cmd, cwd=REPO, env=env).returncode
    if status != 0:
        raise DemoError(f"step {name!r} failed with status {status}: {' '.join(cmd)}")
    return time.perf_counter() - t0


def tiny_zoo() -> Path:
    """The tiny zoo folder: `$LARGEN_TINY_MODELS`, else `.cache/tiny-models`."""
    env = os.environ.get("LARGEN_TINY_MODELS")
    return Path(env).expanduser().resolve() if env else REPO / ".cache" / "tiny-models"


def train_cmd(stage: int, shards: list[str], out: Path, model_sets: list[str], steps: int) -> list[str]:
    """The `make train` command of one stage, with demo-sized settings."""
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    return [
        accelerate, "launch", "--quiet", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "-m", "training.train", "--config", f"training/configs/stage{stage}.yaml",
        "--set", f"data.shards={json.dumps(shards)}", "--set", f"output.dir={out}",
        "--set", "data.resolution=64", "--set", "data.batch_size=2", "--set", "data.num_workers=1",
        "--set", "data.shuffle_buffer=16", "--set", f"optim.max_steps={steps}", "--set", "optim.lr_warmup_steps=0",
        "--set", "optim.learning_rate=1e-4", "--set", "optim.mixed_precision=no",
        "--set", "optim.gradient_checkpointing=false", "--set", "optim.gradient_accumulation_steps=1",
        "--set", f"checkpoint.every={steps}", "--set", f"validation.every={steps}",
        "--set", "validation.samples=1", "--set", "validation.num_inference_steps=4",
        *[arg for s in model_sets for arg in ("--set", s)],
        "--resume_from_checkpoint", "latest",
    ]


@dataclass
class DemoRegion:
    """What the demo inpaints: a mined sample and the region of its source (a mask, white = inpaint)."""

    quad: Quadruplet
    mask: Image.Image
    kind: str  # "mask": the sample's mined mask; "box": its grounding box, enlarged
    box: tuple[int, int, int, int]

    def describe(self) -> str:
        """One sentence for the page: which region and why."""
        x0, y0, x1, y1 = self.box
        if self.kind == "mask":
            return f"the mined mask of sample {self.quad.key} (box {x0},{y0}-{x1},{y1})"
        return (f"the grounding box of sample {self.quad.key}, enlarged to {x1 - x0}x{y1 - y0} px "
                f"(its mined mask covers {mask_fraction(self.quad.mask):.0%} of the photo as scattered noise: "
                f"the tiny zoo's SAM is random)")


def mask_fraction(mask: Image.Image) -> float:
    """Fraction of the pixels that are white (>= 128)."""
    return float((np.asarray(mask.convert("L")) >= 128).mean())


def _is_region(mask: Image.Image) -> bool:
    """A mask that marks one part of the photo (neither almost nothing nor noise over its whole frame)."""
    frac = mask_fraction(mask)
    box = mask.getbbox()
    if box is None or not MASK_MIN_FRACTION <= frac <= MASK_MAX_FRACTION:
        return False
    w, h = mask.size
    return (box[2] - box[0]) * (box[3] - box[1]) <= MASK_MAX_BOX_FRACTION * w * h


def enlarged_box(box: tuple[float, float, float, float], size: tuple[int, int],
                 min_side: float = MIN_BOX_SIDE) -> tuple[int, int, int, int]:
    """`box` grown around its centre to at least `min_side` x the shorter image side, kept inside the image."""
    w, h = size
    side = max(1, round(min_side * min(w, h)))
    x0, y0, x1, y1 = box
    bw, bh = max(side, round(x1 - x0)), max(side, round(y1 - y0))
    bw, bh = min(bw, w), min(bh, h)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    nx0 = int(min(max(0, round(cx - bw / 2)), w - bw))
    ny0 = int(min(max(0, round(cy - bh / 2)), h - bh))
    return nx0, ny0, nx0 + bw, ny0 + bh


def pick_region(quads: list[Quadruplet]) -> DemoRegion:
    """The region to inpaint: the first mined mask that is a real region, else the first sample's box, enlarged.

    Never the whole photo: a mask over the whole frame makes the output all generated content (with
    random weights, full-frame noise) and shows nothing of what inpainting a region does.

    Raises:
        ValueError: no quadruplet given.
    """
    if not quads:
        raise ValueError("no quadruplet to inpaint")
    for q in quads:
        if _is_region(q.mask):
            mask = q.mask.convert("L").point(lambda v: 255 if v >= 128 else 0)
            return DemoRegion(q, mask, "mask", mask.getbbox())
    q = quads[0]
    box = enlarged_box(tuple(q.meta.box_xyxy), q.source.size)
    mask = Image.new("L", q.source.size, 0)
    ImageDraw.Draw(mask).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=255)
    return DemoRegion(q, mask, "box", box)


def overlay(source: Image.Image, mask: Image.Image, colour=(255, 0, 80)) -> Image.Image:
    """The source with the mask tinted and its bounding box outlined: where the inpainting happens."""
    base = source.convert("RGB")
    tint = Image.new("RGB", base.size, colour)
    alpha = mask.convert("L").point(lambda v: 110 if v >= 128 else 0)
    out = Image.composite(tint, base, alpha)
    box = mask.getbbox()
    if box is not None:
        ImageDraw.Draw(out).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], outline=colour, width=2)
    return out


def _on_white(image: Image.Image) -> Image.Image:
    """RGBA subjects composited on white, so their cut-out shape shows in the page."""
    if image.mode in ("RGBA", "LA"):
        flat = Image.new("RGB", image.size, (255, 255, 255))
        flat.paste(image.convert("RGBA"), (0, 0), image.convert("RGBA").getchannel("A"))
        return flat
    return image.convert("RGB")


def _loss_svg(losses: list[float], width: int = 320, height: int = 120) -> str:
    """A small inline SVG line plot of per-step losses (no plotting library: the page stays self-contained)."""
    if not losses:
        return "<p>(no step in this run)</p>"
    lo, hi = min(losses), max(losses)
    span = (hi - lo) or 1.0
    pad = 8
    n = max(1, len(losses) - 1)
    points = " ".join(f"{pad + i * (width - 2 * pad) / n:.1f},{pad + (hi - v) * (height - 2 * pad) / span:.1f}"
                      for i, v in enumerate(losses))
    return (f'<svg width="{width}" height="{height}" role="img" aria-label="loss per step">'
            f'<rect width="{width}" height="{height}" fill="#f6f6f6"/>'
            f'<polyline points="{points}" fill="none" stroke="#c03" stroke-width="2"/>'
            f'<text x="{pad}" y="{height - 2}" font-size="10">min {lo:.4f}</text>'
            f'<text x="{pad}" y="12" font-size="10">max {hi:.4f}</text></svg>')


def _img(rel: str, alt: str, width: int = THUMB) -> str:
    return f'<img src="{html.escape(rel)}" alt="{html.escape(alt)}" width="{width}">'


def write_report(out: Path, quads: list[Quadruplet], region: DemoRegion, final: Path,
                 times: dict[str, float] | None = None) -> Path:
    """Write `out/index.html` (images as PNG files in `out/report/`, next to it) explaining a demo run.

    Reads each stage's `train_summary.json` and validation grids from `out/stage{1,2}`.

    Returns:
        The page's path.
    """
    assets = out / "report"
    assets.mkdir(parents=True, exist_ok=True)

    def save(image: Image.Image, name: str) -> str:
        image.save(assets / name)
        return f"report/{name}"

    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>lar-gen demo</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}td{vertical-align:top;padding:4px}"
        "img{image-rendering:pixelated;border:1px solid #ccc}.note{background:#fff3cd;padding:.6em}</style>",
        "</head><body><h1>lar-gen demo: mine, train two stages, inpaint</h1>",
        f"<p class='note'><b>Note.</b> {html.escape(RANDOM_WEIGHTS_NOTE)}</p>",
    ]
    # 1. The mined samples.
    parts.append(f"<h2>1. Mined samples ({len(quads)} shown)</h2><table><tr><th>source</th><th>mask</th>"
                 "<th>subject</th><th>caption</th></tr>")
    for i, q in enumerate(quads):
        parts.append(
            "<tr>"
            f"<td>{_img(save(q.source.convert('RGB'), f'sample-{i}-source.png'), 'source')}</td>"
            f"<td>{_img(save(q.mask.convert('L'), f'sample-{i}-mask.png'), 'mask')}"
            f"<br><small>{mask_fraction(q.mask):.0%} of the photo</small></td>"
            f"<td>{_img(save(_on_white(q.subject), f'sample-{i}-subject.png'), 'subject', THUMB // 2)}</td>"
            f"<td><q>{html.escape(q.text)}</q><br><small>{html.escape(q.key)}</small></td></tr>"
        )
    parts.append("</table>")
    # 2. Training: losses per stage, validation grids.
    parts.append("<h2>2. Training</h2>")
    for stage in (1, 2):
        summary_path = out / f"stage{stage}" / "train_summary.json"
        parts.append(f"<h3>Stage {stage}</h3>")
        if not summary_path.is_file():
            parts.append("<p>(this stage did not finish: no train_summary.json)</p>")
            continue
        summary = json.loads(summary_path.read_text())
        losses = [float(v) for v in summary.get("losses", [])]
        final_loss = summary.get("final_loss")
        parts.append(
            f"<p>{summary['step']} steps, final loss {final_loss:.4f} (mean of the last "
            f"{summary['final_loss_steps']}), {summary['samples_per_second']:.2f} samples/s, "
            f"wall time {summary['wall_seconds']:.1f} s; skipped samples: {summary['skipped'] or 'none'}; "
            f"export: <code>{html.escape(str(summary['export']))}</code></p>"
            if final_loss is not None else f"<p>{summary['step']} steps (none in the last run)</p>"
        )
        parts.append(_loss_svg(losses))
        parts.append("<table><tr><th>step</th><th>loss</th></tr>" + "".join(
            f"<tr><td>{summary['step'] - len(losses) + i + 1}</td><td>{v:.4f}</td></tr>"
            for i, v in enumerate(losses)) + "</table>")
        for grid in sorted((out / f"stage{stage}" / "validation").glob("step-*.png")):
            rel = grid.relative_to(out).as_posix()
            parts.append(f"<p>Validation grid {html.escape(grid.stem)} (rows: text, subject, text+subject; "
                         f"columns: source, mask, subject, output)<br>{_img(rel, 'validation grid', 512)}</p>")
    # 3. The final inpainting.
    q = region.quad
    parts.append("<h2>3. Inpainting with the trained weights</h2>")
    parts.append(f"<p>Region: {html.escape(region.describe())}. Prompt: <q>{html.escape(q.text)}</q>, "
                 "subject: the sample's subject image.</p><table><tr><th>source, region drawn</th>"
                 "<th>mask</th><th>subject</th><th>output</th></tr><tr>")
    parts.append(f"<td>{_img(save(overlay(q.source, region.mask), 'final-region.png'), 'region on source', 256)}</td>")
    parts.append(f"<td>{_img(save(region.mask, 'final-mask.png'), 'mask', 256)}</td>")
    parts.append(f"<td>{_img(save(_on_white(q.subject), 'final-subject.png'), 'subject', THUMB // 2)}</td>")
    output_cell = _img(final.relative_to(out).as_posix(), "inpainted output", 256) if final.is_file() \
        else "(no output: the inpaint step did not run)"
    parts.append(f"<td>{output_cell}</td></tr></table>")
    parts.append(f"<p>{html.escape(RANDOM_WEIGHTS_NOTE)} Outside the region the output keeps the source; "
                 "inside it, what a random model generates.</p>")
    if times:
        parts.append("<h2>Timings</h2><p>" + ", ".join(f"{html.escape(k)} {v:.0f} s" for k, v in times.items())
                     + "</p>")
    parts.append("</body></html>")
    page = out / REPORT
    tmp = out / f".{REPORT}.tmp"
    tmp.write_text("\n".join(parts), encoding="utf-8")
    os.replace(tmp, page)
    return page


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit status (1 when a step fails)."""
    parser = argparse.ArgumentParser(prog="training.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="demo-output", help="everything is written here (default demo-output)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per stage (default 4)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    out = (REPO / args.output).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    zoo = tiny_zoo()
    env = {**os.environ, "LARGEN_TINY_MODELS": str(zoo), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    py = sys.executable
    times: dict[str, float] = {}
    try:
        # 1. Mine quadruplets from the bundled sample photos with the tiny zoo.
        if not SAMPLE_IMAGES.is_dir() or not any(SAMPLE_IMAGES.iterdir()):
            raise DemoError(f"no sample photos in {SAMPLE_IMAGES}: run `make sample-images` (or `make demo`)")
        mined = out / "mined"
        times["mine"] = run_step("mine (pipeline `sample`, profile tiny)", [
            py, "dataengine/run.py", "--config", "pipelines.yaml", "--pipeline", "sample", "--profile", "tiny",
            "--output", str(mined), "--no-progress"], env)
        shards = sorted(str(p) for p in mined.glob("*.tar"))
        quads = read_quadruplets(shards, SHOWN_SAMPLES) if shards else []
        if not quads:
            raise DemoError(f"mining wrote no quadruplet under {mined}")
        # 2. Stage 1 from the tiny bases, 3. stage 2 from the stage-1 export.
        times["stage 1"] = run_step("train stage 1", train_cmd(1, shards, out / "stage1", [
            f"model.base.inpaint={zoo / 'sd-inpainting'}", f"model.base.image_prompt={zoo / 'ip-adapter'}"],
            args.steps), env)
        times["stage 2"] = run_step("train stage 2", train_cmd(2, shards, out / "stage2", [
            f"model.pretrained={out / 'stage1' / 'final'}"], args.steps), env)
        # 4. Inpaint a region of a mined sample with the trained weights (text + subject).
        region = pick_region(quads)
        q = region.quad
        inputs = out / "inputs"
        inputs.mkdir()
        q.source.save(inputs / "source.png")
        region.mask.save(inputs / "mask.png")
        q.subject.save(inputs / "subject.png")
        final = out / "inpainted.png"
        times["inpaint"] = run_step("inpaint with the trained weights", [
            py, "-m", "inference.cli", "inpaint", "--model", str(out / "stage2" / "final"),
            "--image", str(inputs / "source.png"), "--mask", str(inputs / "mask.png"),
            "--subject", str(inputs / "subject.png"), "--prompt", q.text, "--steps", "10",
            "--device", "cpu", "--out", str(final)], env)
    except DemoError as exn:
        print(f"demo: error: {exn}", file=sys.stderr)
        return 1
    page = write_report(out, quads, region, final, times)
    print("\n" + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))
    print(RANDOM_WEIGHTS_NOTE)
    print(f"inpainted {region.describe()}: {final}")
    print(f"open the report: {page}")
    print(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
