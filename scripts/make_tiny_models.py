"""Generate the tiny offline model zoo (`make tiny-models`): every model role of the project, tiny.

The roles are those of pipelines.yaml's profiles (tagger, grounding, segmenter, captioner,
inpaint, image prompt) plus a complete `LARGenPipeline`; docs/architecture.md "Models".

Each package owns the recipes for its own roles (`dataengine.tiny_models.BUILDERS`,
`inference.tiny_models.BUILDERS`); this script only orchestrates: it builds each missing
checkpoint into a temporary folder, marks it complete, and renames it into place, so a killed
run never leaves a half-written checkpoint under its final name and a second run changes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

DEFAULT_ZOO = ".cache/tiny-models"
MARKER = ".complete.json"


def zoo_dir() -> Path:
    """The zoo folder: `$LARGEN_TINY_MODELS`, else `.cache/tiny-models` under the repo root."""
    env = os.environ.get("LARGEN_TINY_MODELS")
    if env:
        return Path(env).expanduser().resolve()
    return (Path(__file__).resolve().parent.parent / DEFAULT_ZOO).resolve()


def all_builders() -> dict[str, tuple[str, Callable[[Path], None]]]:
    """name -> (recipe version, builder) over every package that ships tiny recipes."""
    from dataengine import tiny_models as de_tiny
    from evaluation import tiny_models as eval_tiny
    from inference import tiny_models as inf_tiny

    builders: dict[str, tuple[str, Callable[[Path], None]]] = {}
    for module in (de_tiny, inf_tiny, eval_tiny):
        for name, fn in module.BUILDERS.items():
            if name in builders:
                raise RuntimeError(f"tiny model {name!r} is defined twice")
            builders[name] = (module.RECIPE_VERSION, fn)
    return builders


def is_complete(path: Path, version: str) -> bool:
    marker = path / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("recipe_version") == version
    except (OSError, ValueError):
        return False


def build_zoo(root: Path | None = None, only: list[str] | None = None, quiet: bool = False) -> Path:
    """Build every missing tiny checkpoint under `root`; return `root`.

    Raises:
        KeyError: `only` names a model that no package defines.
    """
    root = root or zoo_dir()
    root.mkdir(parents=True, exist_ok=True)
    builders = all_builders()
    names = only or list(builders)
    for name in names:
        if name not in builders:
            raise KeyError(f"unknown tiny model {name!r}; known: {', '.join(sorted(builders))}")
    for name in names:
        version, fn = builders[name]
        final = root / name
        if is_complete(final, version):
            if not quiet:
                print(f"  {name:<20} up to date")
            continue
        tmp = root / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        t0 = time.perf_counter()
        fn(tmp)
        (tmp / MARKER).write_text(json.dumps({"name": name, "recipe_version": version}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if not quiet:
            print(f"  {name:<20} built in {time.perf_counter() - t0:.1f}s")
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help=f"zoo folder (default $LARGEN_TINY_MODELS or {DEFAULT_ZOO})")
    parser.add_argument("--only", nargs="*", default=None, help="build only these models")
    args = parser.parse_args(argv)
    root = args.out.resolve() if args.out else zoo_dir()
    print(f"tiny model zoo: {root}")
    build_zoo(root, args.only)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
