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
