"""`largen eval build|run|report`: parsed by `inference.cli`, run here (looked up by name at run time).

Every input is checked before any model work or case runs; a bad one raises `CLIError`, which
`largen` prints as one line `largen: error: ...` with exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from evaluation.benchmark import BenchmarkError, build_coco, build_synthetic
from evaluation.harness import EvalError, RunSettings, resolve_refs, run
from evaluation.report import write_report
from evaluation.rows import resolve_rows
from inference.cli import MODEL_ENV, CLIError, check_device

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "pipelines.yaml"


def main(args: argparse.Namespace) -> int:
    """Run `largen eval <action>`; returns the exit status.

    Raises:
        CLIError: bad input (one line, exit status 2).
    """
    try:
        return {"build": _build, "run": _run, "report": _report}[args.eval_command](args)
    except (BenchmarkError, EvalError) as err:
        raise CLIError(str(err)) from err


def _build(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise CLIError(f"--out {args.out!r} exists; pass --overwrite to replace it, or choose another folder")
    if out.exists() and not (out / "cases.parquet").is_file():
        raise CLIError(f"--out {args.out!r} exists and is not a benchmark folder; it is left as is")
    if args.synthetic:
        if args.coco or args.dreambooth:
            raise CLIError("--synthetic builds from bundled images; drop --coco and --dreambooth")
        path = build_synthetic(
            out, seed=args.seed, scenes=args.scenes or 2, subjects=2 * (args.subjects_per_kind or 1),
            prompts_per_subject=args.prompts or 2,
        )
    else:
        if not args.coco or not args.dreambooth:
            raise CLIError("give --coco DIR and --dreambooth DIR (or --synthetic)")
        config = Path(args.config) if args.config else DEFAULT_CONFIG
        if not config.is_file():
            raise CLIError(f"--config {str(config)!r} does not exist")
        path = build_coco(
            args.coco, args.dreambooth, out, seed=args.seed, scenes=args.scenes or 20,
            subjects_per_kind=args.subjects_per_kind or 5, prompts_per_subject=args.prompts or 10,
            subject_names=[s.strip() for s in args.subjects.split(",") if s.strip()] if args.subjects else None,
            masks=args.masks, config=config, pipeline=args.pipeline, profile=args.profile, overrides=args.set,
        )
    import pyarrow.parquet as pq

    print(f"wrote {path} ({pq.read_metadata(path / 'cases.parquet').num_rows} cases)")
    return 0


def _parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        index, count = -1, 0
    if not 0 <= index < count:
        raise CLIError(f"--shard must be I/N with 0 <= I < N, got {text!r}")
    return index, count


def _run(args: argparse.Namespace) -> int:
    try:
        rows = resolve_rows(args.rows)
    except ValueError as err:
        raise CLIError(str(err)) from err
    model = args.model or os.environ.get(MODEL_ENV)
    if any(r.startswith(("largen", "beta")) for r in rows) and not model:
        raise CLIError(f"no model: pass --model DIR|HUBID or set ${MODEL_ENV}")
    shard = _parse_shard(args.shard)
    launched = shard is None and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if shard is None:
        shard = _launcher_shard()
    device = check_device(args.device) if args.device else _default_device()
    if args.dtype != "float32" and device == "cpu":
        raise CLIError(f"--dtype {args.dtype} needs a GPU (--device cuda); on the CPU use float32")
    refs = resolve_refs(args.profile, {
        "clip": args.clip, "dino": args.dino, "sd_inpainting": args.sd_inpainting, "ip_adapter": args.ip_adapter,
        "paint_by_example": args.paint_by_example, "locate_model": args.locate_model, "assign_model": args.assign_model,
    })
    settings = RunSettings(
        bench=str(Path(args.bench).resolve()), out=str(Path(args.out).resolve()), rows=rows,
        model=_absolute(model), refs=refs, steps=args.steps, guidance=args.guidance, device=device,
        dtype=args.dtype, shard=shard, limit=args.limit,
    )
    interactive = sys.stderr.isatty()
    if not interactive:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
    try:
        counts = run(settings, progress=not args.no_progress)
    except KeyboardInterrupt:
        print("largen eval: interrupted; every finished case is kept, rerun the same command to resume", file=sys.stderr)
        return 130
    print(f"process {shard[0]}/{shard[1]}: {counts['done']} case(s) run, {counts['skipped']} already scored (skipped), "
          f"{counts['failed']} failed")
    if launched:
        _wait_for_every_process()
    if shard[0] == 0 and (launched or shard[1] == 1):
        summary = write_report(settings.out)
        print(f"wrote {settings.out}/table.md, summary.json, results.parquet ({summary['cases_failed']} failed case(s))")
    elif shard[0] == 0:
        print(f"shard done; once every shard has finished: largen eval report --out {settings.out}")
    return 0


def _launcher_shard() -> tuple[int, int]:
    """(process index, process count) from the variables `accelerate launch` and `torchrun` set."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if not 0 <= rank < world:
        raise CLIError(f"RANK={rank} and WORLD_SIZE={world} from the launcher do not fit together")
    return rank, world


def _default_device() -> str:
    """This process's GPU (`LOCAL_RANK` under a launcher) when there is one, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return check_device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}")
    return check_device(None)


def _wait_for_every_process() -> None:
    """A barrier over the launched processes (gloo: it needs no GPU), so process 0 reports once all are done."""
    from datetime import timedelta

    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(hours=2))
    dist.barrier()
    dist.destroy_process_group()


def _absolute(model: str | None) -> str | None:
    if model and Path(model).expanduser().exists():
        return str(Path(model).expanduser().resolve())
    return model


def _report(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if not out.is_dir():
        raise CLIError(f"--out {args.out!r} is not a folder")
    summary = write_report(out)
    print(f"wrote {out}/table.md, summary.json, results.parquet ({summary['cases_failed']} failed case(s))")
    return 0
