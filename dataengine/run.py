"""Mine a pipeline of pipelines.yaml into quadruplet shards: the `ray job submit` entry point.

    python dataengine/run.py --config pipelines.yaml --pipeline NAME [--profile tiny|full]
        [--input PATH ...] [--output DIR] [--set key=value ...] [--overwrite] [--backend ray|local]

Connects to the Ray cluster at RAY_ADDRESS when it is set (as under `ray job submit`), otherwise
starts an embedded local Ray: the same code path on one machine. Also runs as
`python -m dataengine.run`. Exit status: 0 when the run finished (per-image failures are recorded in
the shards' parquet rows, not fatal), 2 for a configuration or input problem, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (`python dataengine/run.py`): make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataengine.config import InputSpec, RunConfig, load_run_config  # noqa: E402
from dataengine.typed_config import ConfigError  # noqa: E402


def input_spec(path: str, images_per_shard: int) -> InputSpec:
    """An InputSpec for a `--input` path: a .tar / brace pattern is WebDataset, .parquet/.csv/.tsv a table, else a folder."""
    lower = path.lower()
    if lower.endswith((".parquet", ".csv", ".tsv")):
        kind = "table"
    elif lower.endswith(".tar") or ("{" in path and "}" in path):
        kind = "webdataset"
    else:
        kind = "images"
    return InputSpec(kind=kind, path=path, images_per_shard=images_per_shard)


def output_dir(cfg: RunConfig, override: str | None) -> Path:
    """`--output`, else the pipeline's `output.dir` with `{pipeline}` filled in."""
    return Path(override or cfg.pipeline.output.dir.format(pipeline=cfg.pipeline_name))


def non_empty(value: str) -> str:
    """An argparse type: a path or name that is not blank (an empty --input would mean the current folder)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dataengine/run.py", description="Mine inpainting quadruplets into WebDataset shards (lar-gen data engine)."
    )
    parser.add_argument(
        "--config", default="pipelines.yaml", type=non_empty, help="pipelines file (default: pipelines.yaml)"
    )
    parser.add_argument("--pipeline", required=True, type=non_empty, help="pipeline name in the config")
    parser.add_argument(
        "--profile", type=non_empty, help="model profile (default: the pipeline's), e.g. tiny or full"
    )
    parser.add_argument(
        "--input", action="append", default=[], metavar="PATH", type=non_empty,
        help="replace the pipeline's inputs: a folder, a .tar / brace pattern, or a .parquet/.csv table (repeatable)",
    )
    parser.add_argument("--output", type=non_empty, help="output folder (default: the pipeline's output.dir)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    parser.add_argument("--overwrite", action="store_true", help="redo shards that are already committed")
    parser.add_argument("--backend", choices=["ray", "local"], help="override engine.backend")
    parser.add_argument("--no-progress", action="store_true", help="no live progress bar")
    return parser


def one_line(exc: BaseException) -> str:
    """The error's message on one line (a config with several problems lists them joined by `; `)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return "; ".join(lines) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, mine, print the summary table; returns the exit status.

    Every problem a user can fix (config, inputs, output folder, models, RAY_ADDRESS) ends in one
    `error: ...` line on stderr and status 2; images that fail are rows of the output, not errors.
    """
    args = build_parser().parse_args(argv)
    from dataengine.engine import RayConnectError, mine
    from dataengine.inputs import InputError
    from dataengine.models import ModelLoadError
    from dataengine.shards import OutputError, ResumeError
    from dataengine.stages.tag import TagBackendError

    try:
        cfg = load_run_config(args.config, args.pipeline, profile=args.profile, overrides=args.set)
        if args.input:
            per_shard = cfg.pipeline.inputs[0].images_per_shard
            cfg.pipeline.inputs = [input_spec(p, per_shard) for p in args.input]
        out = output_dir(cfg, args.output)
        summary = mine(cfg, out, overwrite=args.overwrite, backend=args.backend, progress=not args.no_progress)
    except (
        ConfigError, InputError, OutputError, ResumeError, ModelLoadError, TagBackendError, RayConnectError
    ) as exc:  # fmt: skip
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    print(summary.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
