"""`make demo`: the whole chain offline on the tiny zoo: mine the `sample` pipeline -> train stage 1 and 2 -> inpaint.

Every step runs the user-facing command (the engine's `dataengine/run.py`, `accelerate launch -m
training.train` as `make train` does, the `largen inpaint` CLI) as a subprocess, so the demo
exercises exactly what users run. Everything goes under `--output` (default demo-output/); the
last line printed is the path of the inpainted image. The tiny models are random: the picture is
meaningless, the mechanics are real.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from training.data import read_quadruplets

REPO = Path(__file__).resolve().parent.parent
SAMPLE_IMAGES = REPO / ".cache" / "sample-images"


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
    env = os.environ.get("LARGEN_TINY_MODELS")
    return Path(env).expanduser().resolve() if env else REPO / ".cache" / "tiny-models"


def train_cmd(stage: int, shards: list[str], out: Path, model_sets: list[str], steps: int) -> list[str]:
    """The `make train` command of one stage, with demo-sized settings."""
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    return [
        accelerate, "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="demo-output", help="everything is written here (default demo-output)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per stage (default 4)")
    args = parser.parse_args(argv)
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
        quads = read_quadruplets(shards, 1) if shards else []
        if not quads:
            raise DemoError(f"mining wrote no quadruplet under {mined}")
        # 2. Stage 1 from the tiny bases, 3. stage 2 from the stage-1 export.
        times["stage 1"] = run_step("train stage 1", train_cmd(1, shards, out / "stage1", [
            f"model.base.inpaint={zoo / 'sd-inpainting'}", f"model.base.image_prompt={zoo / 'ip-adapter'}"],
            args.steps), env)
        times["stage 2"] = run_step("train stage 2", train_cmd(2, shards, out / "stage2", [
            f"model.pretrained={out / 'stage1' / 'final'}"], args.steps), env)
        # 4. Inpaint the first mined sample with the trained weights (text + subject).
        q = quads[0]
        inputs = out / "inputs"
        inputs.mkdir()
        q.source.save(inputs / "source.png")
        q.mask.save(inputs / "mask.png")
        q.subject.save(inputs / "subject.png")
        final = out / "inpainted.png"
        times["inpaint"] = run_step("inpaint with the trained weights", [
            py, "-m", "inference.cli", "inpaint", "--model", str(out / "stage2" / "final"),
            "--image", str(inputs / "source.png"), "--mask", str(inputs / "mask.png"),
            "--subject", str(inputs / "subject.png"), "--prompt", q.text, "--steps", "10",
            "--device", "cpu", "--out", str(final)], env)
    except DemoError as exn:
        print(f"demo: {exn}", file=sys.stderr)
        return 1
    print("\n" + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))
    print(f"validation grids: {out / 'stage2' / 'validation'}")
    print(final)
    return 0


if __name__ == "__main__":
    sys.exit(main())
