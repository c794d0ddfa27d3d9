"""The documents' code blocks run as written: every ```python and ```bash block of docs/*.md.

Each document's runnable blocks run in file order in one scratch folder of their own, which holds
symlinks to the repository's top-level entries (so `make ...` and paths such as
`training/configs/stage1.yaml` work, while outputs such as `mined/` or `out.png` land in the
scratch folder). The environment is what docs/index.md tells a reader to set up: the venv's
`bin/` first on PATH, the tiny zoo in `LARGEN_TINY_MODELS`, its complete pipeline in
`LARGEN_MODEL`, no CUDA.

A block that cannot run here is preceded by `<!-- docs-test: skip: REASON -->`, where REASON is
one of `SKIP_REASONS`, and the text beside it tells the reader the same.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = sorted((REPO / "docs").glob("*.md"))
RUNNABLE = {"python": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
NOT_RUN = {"text", "json", "yaml", "toml", "html", "csv"}
# What a skipped block needs, and the word the prose beside it must use to say so.
SKIP_REASONS = {"needs a GPU": "GPU", "needs real weights": "weights", "needs real data": "data"}
SKIP_MARK = re.compile(r"^<!--\s*docs-test:\s*skip:\s*(?P<reason>.*?)\s*-->\s*$")
FENCE = re.compile(r"^```(?P<lang>[A-Za-z0-9_+-]*)\s*$")
BLOCK_TIMEOUT_S = 300


@dataclass
class Block:
    doc: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip: str | None  # the skip reason, or None
    context: str  # the prose lines just above the block (and its marker)

    def where(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}"


def code_blocks(doc: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, with their language and any skip marker above them."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start = i
        end = start + 1
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        if end == len(lines):
            raise AssertionError(f"{doc.relative_to(REPO)}:{start + 1}: a code fence that is never closed")
        above = start - 1
        while above >= 0 and not lines[above].strip():
            above -= 1
        marker = SKIP_MARK.match(lines[above]) if above >= 0 else None
        context_end = above if marker else above + 1
        blocks.append(Block(
            doc=doc, line=start + 1, lang=m["lang"].lower(), code="\n".join(lines[start + 1:end]) + "\n",
            skip=marker["reason"] if marker else None,
            context="\n".join(lines[max(0, context_end - 8):context_end]),
        ))
        i = end + 1
    return blocks


ALL_BLOCKS = [b for doc in DOCS for b in code_blocks(doc)]


def test_every_block_names_its_language():
    """A bare fence would hide a command from this test: every block says what it is."""
    unnamed = [b.where() for b in ALL_BLOCKS if b.lang not in RUNNABLE and b.lang not in NOT_RUN]
    assert not unnamed, f"code blocks without a known language (use python/bash, or text/json/yaml): {unnamed}"


def test_skipped_blocks_say_why_beside_them():
    for block in ALL_BLOCKS:
        if block.skip is None:
            continue
        assert block.lang in RUNNABLE, f"{block.where()}: a skip marker on a block that would not run anyway"
        assert block.skip in SKIP_REASONS, (
            f"{block.where()}: skip reason {block.skip!r}; allowed: {sorted(SKIP_REASONS)}")
        word = SKIP_REASONS[block.skip]
        assert word.lower() in (block.context + block.code).lower(), (
            f"{block.where()}: skipped ({block.skip}) but the text beside it does not tell the reader "
            f"(no {word!r} in the lines above it or in its comments)")


def scratch_checkout(dest: Path) -> Path:
    """A folder whose entries link to the repository's, so the docs' relative paths resolve."""
    dest.mkdir(parents=True, exist_ok=True)
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    # The tracked top-level entries plus the venv and the cache (tiny zoo, sample photos); never
    # the outputs of earlier runs (mined/, release/, runs/, demo-output/), which would mix in.
    names = {line.split("/", 1)[0] for line in tracked.splitlines() if line} | {".venv", ".cache"}
    for name in sorted(names - {".git"}):
        entry = REPO / name
        if entry.exists():
            (dest / name).symlink_to(entry, target_is_directory=entry.is_dir())
    return dest


def docs_environment(tiny_zoo: Path) -> dict[str, str]:
    venv_bin = Path(sys.executable).parent
    env = dict(os.environ)
    env.update({
        "PATH": f"{venv_bin}{os.pathsep}{env.get('PATH', '')}",
        "VIRTUAL_ENV": str(venv_bin.parent),
        "LARGEN_TINY_MODELS": str(tiny_zoo),
        "LARGEN_MODEL": str(tiny_zoo / "largen-pipeline"),
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        # Tiny tensors: one thread per process is as fast, and it does not spin against other jobs.
        "OMP_NUM_THREADS": "1",
    })
    env.pop("PYTHONPATH", None)
    return env


def run_block(block: Block, cwd: Path, env: dict[str, str], index: int) -> None:
    if RUNNABLE[block.lang] == "python":
        script = cwd / f".docs-block-{index}.py"
        script.write_text(block.code, encoding="utf-8")
        cmd = [sys.executable, script.name]
    else:
        script = cwd / f".docs-block-{index}.sh"
        script.write_text(block.code, encoding="utf-8")
        cmd = ["bash", "-euo", "pipefail", script.name]
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{block.where()}: the {block.lang} block ran past {BLOCK_TIMEOUT_S} s:\n{block.code}")
    if proc.returncode != 0:
        pytest.fail(
            f"{block.where()}: the {block.lang} block exited {proc.returncode}:\n{block.code}\n"
            f"--- stdout (tail)\n{proc.stdout[-3000:]}\n--- stderr (tail)\n{proc.stderr[-3000:]}")


@pytest.fixture()
def no_ray_in_this_process():
    """No embedded Ray left running in this pytest process by an earlier test: the docs' Ray head
    takes Ray's default ports (6379, 8265). (Its dashboard agent has a port of its own, so the
    embedded Rays of tests running beside it in other processes do not stop its job submission.)"""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


DOCS_WITH_CODE = [d for d in DOCS if any(b.lang in RUNNABLE and b.skip is None for b in code_blocks(d))]


# data-engine.md starts Ray (embedded, and a `ray start` head) while other tests run their own
# Rays beside it: its head's dashboard agent has a port of its own (the docs say why).
@pytest.mark.slow
@pytest.mark.parametrize("doc", DOCS_WITH_CODE, ids=[d.name for d in DOCS_WITH_CODE])
def test_the_docs_code_runs_as_written(doc, tiny_zoo, tmp_path, no_ray_in_this_process):
    cwd = scratch_checkout(tmp_path / "checkout")
    env = docs_environment(tiny_zoo)
    for index, block in enumerate(code_blocks(doc)):
        if block.lang in RUNNABLE and block.skip is None:
            run_block(block, cwd, env, index)
