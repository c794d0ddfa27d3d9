"""`python -m dataengine.ram convert CKPT OUT`: a published RAM++ `.pth` → safetensors + config folder.

The published checkpoint is a pickle; unpickling (even restricted to tensors) is slower and more
exposed than reading safetensors. Converting once means the data engine's workers never unpickle:
point `profiles.<name>.tagger` at OUT. Every problem ends in one `prog: error: ...` line, exit 2;
OUT appears whole or not at all.
"""

from __future__ import annotations

import sys

from dataengine.ram.checkpoint import CheckpointError, load_ram_plus, save_converted
from dataengine.ram.files import HUB_REPO, PUBLISHED_FILENAME
from dataengine.release_cli import OneLineErrorParser, fail

PROG = "python -m dataengine.ram"


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(prog=PROG, description="RAM++ checkpoint tools.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrorParser)
    convert = commands.add_parser(
        "convert",
        help="convert a published-layout .pth into a safetensors + config folder",
        description="Load CKPT strictly (every key mapped, none left over) and write OUT/model.safetensors, "
        "OUT/config.json, OUT/tag_list.txt and OUT/tag_thresholds.txt.",
    )
    convert.add_argument(
        "checkpoint", metavar="CKPT",
        help=f"a .pth file ({PUBLISHED_FILENAME}), a folder holding one, or a hub repo id ({HUB_REPO})",
    )  # fmt: skip
    convert.add_argument("out", metavar="OUT", help="output folder; must not exist or be empty")
    convert.add_argument(
        "--trust-pickle", action="store_true",
        help="unpickle CKPT without torch's weights_only guard (it may then run code): only for a file you "
        "trust whose restricted read fails; the published checkpoint should not need it",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, or 2 after one error line)."""
    args = build_parser().parse_args(argv)
    try:
        loaded = load_ram_plus(args.checkpoint, trust_pickle=args.trust_pickle)
    except CheckpointError as exc:
        return fail(PROG, f"CKPT: {exc}")
    try:
        out = save_converted(loaded, args.out)
    except (OSError, FileExistsError) as exc:
        return fail(PROG, f"OUT: {exc}")
    print(f"wrote {out} ({len(loaded.tags)} tags) from {loaded.source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
