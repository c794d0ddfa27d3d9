"""`largen eval run`: every requested row over every case of a benchmark, scored, resumable, sharded.

Work is (row, case) pairs. A pair's result is one JSON part file, `OUT/parts/<row>/<case>.json`,
written after its image (`OUT/images/<row>/<case>.png`), each to a temporary file renamed into
place: a killed run leaves only whole files, and a rerun skips every pair whose part says "ok"
(failed pairs are tried again). Each case has its own seed, so a pair's output does not depend on
batching, order, or how many processes ran. Cases are split over processes by index
(case i goes to process i mod N): `accelerate launch --num_processes N` (or `torchrun`) sets N and
the index (`WORLD_SIZE`, `RANK`), or `--shard I/N` does, e.g. on separate machines; `largen eval
report` merges the parts afterwards.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image

from evaluation.benchmark import BenchmarkError, load_cases
from evaluation.metrics import Scorer, seam_margin
from evaluation.rows import ROWS, SDIIPA_SCALE, Generate, Row, Runner, load_paint_by_example, models_needed

# Model references of the two presets. "full": the public checkpoints (CLIP: see docs/evaluation.md).
PRESETS: dict[str, dict[str, str]] = {
    "full": {
        "clip": "openai/clip-vit-base-patch32",
        "dino": "facebook/dino-vits16",
        "sd_inpainting": "stable-diffusion-v1-5/stable-diffusion-inpainting",
        "ip_adapter": "h94/IP-Adapter",
        "paint_by_example": "Fantasy-Studio/Paint-by-Example",
    },
    "tiny": {
        "clip": "{tiny_models}/clip-tagger",
        "dino": "{tiny_models}/dino-vits16",
        "sd_inpainting": "{tiny_models}/sd-inpainting",
        "ip_adapter": "{tiny_models}/ip-adapter",
        "paint_by_example": "{tiny_models}/paint-by-example",
    },
}
# Settings that change a result: a resumed run must use the same ones.
RESULT_SETTINGS = ("bench", "model", "steps", "guidance", "refs", "bench_cases", "dtype")
DTYPES = ("float32", "float16", "bfloat16")


class EvalError(ValueError):
    """A user error before any case runs; the message is one line naming the path or option."""


@dataclass
class RunSettings:
    """What a run evaluates and how."""

    bench: str
    out: str
    rows: list[str]
    model: str | None
    refs: dict[str, str]
    steps: int
    guidance: float
    device: str
    dtype: str = "float32"  # of the pipelines (the metrics' models stay float32)
    shard: tuple[int, int] = (0, 1)
    limit: int | None = None
    bench_cases: int = 0
    extra: dict = field(default_factory=dict)


def resolve_refs(profile: str, overrides: dict[str, str | None]) -> dict[str, str]:
    """The model references of `profile` (full / tiny) with `{tiny_models}` expanded, overridden per key."""
    from dataengine.config import expand_ref

    refs = {k: expand_ref(v) for k, v in PRESETS[profile].items()}
    for key, value in overrides.items():
        if value:
            refs[key] = expand_ref(value)
    return refs


def _check_ref(ref: str, option: str, *required: str) -> None:
    """A local folder must exist and hold `required`; a hub id is left to from_pretrained."""
    from dataengine.config import is_local_ref

    if not is_local_ref(ref):
        return
    path = Path(ref)
    if not path.is_dir():
        raise EvalError(f"{option} {ref!r} is not a folder")
    for rel in required:
        if not (path / rel).exists():
            raise EvalError(f"{option} {ref!r} has no {rel} (is it the right checkpoint?)")


def _load(option: str, ref: str, fn: Callable):
    try:
        return fn()
    except EvalError:
        raise
    except Exception as err:  # noqa: BLE001 - any load failure is the user's path, reported in one line
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EvalError(f"{option} {ref!r} cannot be loaded: {text}") from err


def load_models(settings: RunSettings) -> tuple[dict, Scorer]:
    """Load every model the rows need and the scorer, or fail with one line naming the path.

    Raises:
        EvalError: a reference that is missing or does not load.
    """
    import torch

    from inference.cli import CLIError, check_model, load_pipeline
    from inference.loading import load_image_prompt, load_inpaint_base

    refs, device = settings.refs, settings.device
    dtype = getattr(torch, settings.dtype)
    # The metric models first: they are small, and a typo in --clip should not wait for the big loads.
    _check_ref(refs["clip"], "--clip", "config.json")
    _check_ref(refs["dino"], "--dino", "config.json")
    scorer = _load("--clip/--dino", f"{refs['clip']}, {refs['dino']}", lambda: Scorer(refs["clip"], refs["dino"], device))
    models = {}
    for family in models_needed(settings.rows):
        if family in ("largen", "assign"):
            option = "--model" if family == "largen" else "--assign-model"
            ref = settings.model if family == "largen" else refs.get("assign_model")
            if not ref:
                raise EvalError(f"row(s) {_rows_of(settings.rows, family)} need {option}")
            try:
                models[family] = load_pipeline(check_model(ref), ref).to(device, dtype)
            except CLIError as err:
                raise EvalError(str(err).replace("--model", option, 1)) from err
        elif family in ("sd", "sdiipa", "locate"):
            option, ref = (
                ("--locate-model", refs.get("locate_model")) if family == "locate" else ("--sd-inpainting", refs["sd_inpainting"])
            )
            if not ref:
                raise EvalError(f"row(s) {_rows_of(settings.rows, family)} need {option}")
            _check_ref(ref, option, "model_index.json", "unet")
            pipe = _load(option, ref, lambda r=ref: load_inpaint_base(r))
            if family == "sdiipa":
                ip = refs["ip_adapter"]
                _check_ref(ip, "--ip-adapter", "models")
                _load("--ip-adapter", ip, lambda p=pipe, r=ip: load_image_prompt(p, r))
                pipe.set_ip_adapter_scale(SDIIPA_SCALE)
            models[family] = pipe.to(device, dtype)
        elif family == "pbe":
            ref = refs["paint_by_example"]
            _check_ref(ref, "--paint-by-example", "unet", "vae", "image_encoder")
            models[family] = _load("--paint-by-example", ref, lambda r=ref: load_paint_by_example(r)).to(device, dtype)
    return models, scorer


def _rows_of(rows: Sequence[str], family: str) -> str:
    return ", ".join(r for r in rows if ROWS[r].model == family)


# ---------------------------------------------------------------------- files
def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_image_atomic(image: Image.Image, path: Path) -> None:
    """PNG `image` at `path`, never half-written."""
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    write_atomic(path, buf.getvalue())


def part_path(out: Path, row: str, case_id: str) -> Path:
    return out / "parts" / row / f"{case_id}.json"


def image_path(out: Path, row: str, case_id: str) -> Path:
    return out / "images" / row / f"{case_id}.png"


def read_part(path: Path) -> dict | None:
    """A part file's record, or None when it is missing or unreadable (then the pair runs again)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def check_out(out: Path, settings: RunSettings) -> None:
    """Check that OUT can hold this run: a folder (or nothing yet) whose earlier run, if any, used the
    same result settings, so resuming is sound. Writes nothing.

    Raises:
        EvalError: OUT is a file, is not writable, or holds a run with other settings.
    """
    if out.exists() and not out.is_dir():
        raise EvalError(f"--out {str(out)!r} is a file; give a folder")
    existing = next((p for p in [out, *out.parents] if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK):
        raise EvalError(f"--out {str(out)!r} is not writable ({str(existing)!r} is read-only)")
    record = out / "run.json"
    if not record.exists():
        return
    try:
        theirs = json.loads(record.read_text()).get("settings", {})
    except (OSError, ValueError, AttributeError) as err:
        raise EvalError(f"{str(record)!r} is not a run record ({err}); remove it or use another --out") from err
    mine = asdict(settings)
    for key in RESULT_SETTINGS:
        if theirs.get(key) != mine[key]:
            raise EvalError(
                f"--out {str(out)!r} holds a run with another {key} ({theirs.get(key)!r}, now {mine[key]!r}); "
                "resume with the same settings or use another --out"
            )


def record_run(out: Path, settings: RunSettings) -> None:
    """Create OUT and write `run.json` (the result settings and every row run into OUT so far).

    Raises:
        EvalError: OUT cannot be created.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise EvalError(f"--out {str(out)!r} cannot be created ({err.strerror or err})") from err
    record = out / "run.json"
    rows = list(settings.rows)
    if record.exists():
        rows = sorted(set(json.loads(record.read_text()).get("rows", [])) | set(rows))
    mine = {k: v for k, v in asdict(settings).items() if k in RESULT_SETTINGS}
    write_atomic(record, (json.dumps({"settings": mine, "rows": rows}, indent=2) + "\n").encode())


# ---------------------------------------------------------------------- the run
def shard_cases(cases: Sequence[dict], index: int, count: int) -> list[dict]:
    """The cases of process `index` of `count`: case i goes to process i mod count."""
    return [c for i, c in enumerate(cases) if i % count == index]


def run_pairs(
    out: Path,
    bench: Path,
    rows: Sequence[Row],
    cases: Sequence[dict],
    generate: Generate,
    scorer: Scorer,
    progress: bool = True,
    process: int = 0,
) -> dict[str, int]:
    """Run and score every (row, case) pair not yet scored; returns counts (done, skipped, failed).

    A pair that raises is recorded as failed with its reason (`Type: message (at file:line)`) and
    the run goes on.
    """
    from tqdm.auto import tqdm

    todo = [
        (row, case)
        for row in rows
        for case in cases
        if (read_part(part_path(out, row.name, case["case_id"])) or {}).get("status") != "ok"
    ]
    counts = {"done": 0, "skipped": len(rows) * len(cases) - len(todo), "failed": 0}
    scenes: dict[str, Image.Image] = {}
    subjects: dict[str, Image.Image] = {}
    bar = tqdm(total=len(todo), desc=f"eval [{process}]", unit="case", disable=not progress, dynamic_ncols=True)
    for row, case in todo:
        record = {
            "case_id": case["case_id"], "row": row.name, "scene_id": case["scene_id"], "subject": case["subject"],
            "kind": case["kind"], "prompt_index": case["prompt_index"], "prompt": case["prompt"], "seed": case["seed"],
            "process": process,
        }
        start = time.perf_counter()
        try:
            if case["scene_path"] not in scenes:
                with Image.open(bench / case["scene_path"]) as img:
                    scenes[case["scene_path"]] = img.convert("RGB")
            if case["subject_path"] not in subjects:
                with Image.open(bench / case["subject_path"]) as img:
                    subjects[case["subject_path"]] = img.convert("RGBA")
            scene, subject = scenes[case["scene_path"]], subjects[case["subject_path"]]
            margin = seam_margin(scene.size)
            output = generate(row, case, scene, subject, margin)
            seconds = time.perf_counter() - start
            if output.size != scene.size:
                raise ValueError(f"the row returned {output.size[0]}x{output.size[1]} for a {scene.width}x{scene.height} scene")
            path = image_path(out, row.name, case["case_id"])
            save_image_atomic(output, path)
            score = scorer.score([output], [scene], [case["box"]], [subject], [case["prompt"]], margin)[0]
            record.update(status="ok", error="", seconds=round(seconds, 4), image=str(path.relative_to(out)),
                          margin=margin, **asdict(score))
            counts["done"] += 1
        except Exception as err:  # noqa: BLE001 - a failing case is recorded and the run goes on
            tb = traceback.extract_tb(err.__traceback__)
            where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
            record.update(status="failed", error=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}{where}",
                          seconds=round(time.perf_counter() - start, 4), image="")
            counts["failed"] += 1
        write_atomic(part_path(out, row.name, case["case_id"]), (json.dumps(record) + "\n").encode())
        bar.update(1)
    bar.close()
    return counts


def prepare(settings: RunSettings) -> tuple[list[dict], list[Row]]:
    """Check the benchmark, the rows and OUT (no model work); returns (this process's cases, rows).

    Raises:
        EvalError: a bad benchmark, row set or output folder.
    """
    try:
        cases = load_cases(settings.bench)
    except BenchmarkError as err:
        raise EvalError(str(err)) from err
    settings.bench_cases = len(cases)
    if settings.limit:
        cases = cases[: settings.limit]
    check_out(Path(settings.out), settings)
    index, count = settings.shard
    return shard_cases(cases, index, count), [ROWS[r] for r in settings.rows]


def run(settings: RunSettings, progress: bool = True) -> dict[str, int]:
    """Check everything, load the models, run this process's pairs; returns the counts."""
    cases, rows = prepare(settings)
    models, scorer = load_models(settings)
    record_run(Path(settings.out), settings)
    runner = Runner(models, settings.device, settings.steps, settings.guidance)
    return run_pairs(
        Path(settings.out), Path(settings.bench), rows, cases, runner.generate, scorer,
        progress=progress, process=settings.shard[0],
    )
