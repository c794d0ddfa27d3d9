"""What a newcomer meets: the license, self-contained docs, README targets that exist, quiet imports."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line]


def test_license_file_matches_pyproject():
    # A regex, not tomllib: the project supports Python 3.10, which has no tomllib.
    declared = re.search(r'^license\s*=\s*(?:\{\s*text\s*=\s*)?"([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    assert declared and declared[1] == "Apache-2.0", declared
    head = (REPO / "LICENSE").read_text().splitlines()[:3]
    assert "Apache License" in head[0] and "Version 2.0" in head[1], head


def test_no_file_cites_a_document_outside_the_repository():
    founding = "DESIGN" + ".md"  # spelled so that this test does not cite it itself
    citing = [p for p in tracked_files()
              if (REPO / p).is_file() and founding in (REPO / p).read_text(encoding="utf-8", errors="replace")]
    assert not citing, f"these files cite {founding}, which is not in the repository: {citing}"


def test_docs_index_lists_every_document():
    index = (REPO / "docs/index.md").read_text()
    missing = [p.name for p in (REPO / "docs").glob("*.md") if p.name != "index.md" and f"({p.name})" not in index]
    assert not missing, f"docs/index.md does not link {missing}"


def test_every_make_target_the_readme_names_exists():
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z0-9_-]+):", makefile, flags=re.M))
    named = set(re.findall(r"`make ([a-z0-9-]+)", (REPO / "README.md").read_text()))
    assert named and named <= targets, f"README names make targets the Makefile lacks: {sorted(named - targets)}"


def test_importing_the_pipeline_prints_nothing():
    """No warning on every command: transformers' torchvision fallback notice is expected and filtered."""
    proc = subprocess.run([sys.executable, "-c", "import inference.pipeline, training.train"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr


def test_an_xdist_group_runs_on_one_worker(tmp_path: Path, repo_root: Path):
    """`make test`'s `--dist loadgroup` keeps an `xdist_group` on one worker (tests/conftest.py)."""
    (tmp_path / "conftest.py").write_text((repo_root / "tests" / "conftest.py").read_text())
    (tmp_path / "test_group.py").write_text(
        "import os, pathlib, pytest\n"
        "def record(kind, i):\n"
        "    pathlib.Path(__file__).with_name(f'{kind}-{i}.worker').write_text(os.environ['PYTEST_XDIST_WORKER'])\n"
        "@pytest.mark.xdist_group('together')\n"
        "@pytest.mark.parametrize('i', range(6))\n"
        "def test_grouped(i):\n"
        "    record('grouped', i)\n"
        "@pytest.mark.parametrize('i', range(6))\n"
        "def test_other(i):\n"
        "    record('other', i)\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup", "-p", "no:cacheprovider",
         str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    grouped = [(tmp_path / f"grouped-{i}.worker").read_text() for i in range(6)]
    other = {(tmp_path / f"other-{i}.worker").read_text() for i in range(6)}
    assert len(set(grouped)) == 1, grouped
    assert len(other | set(grouped)) == 2, (grouped, other)  # both workers were busy: the test can see a split
