"""Command-line plumbing shared by `python -m dataengine.release` and `python -m dataengine.validate`.

Every bad option ends in one line on stderr, `prog: error: <argument>: <what is wrong>`, and exit
status 2: argparse's own `error()` prints the whole usage first, which buries the one line that
matters when the command runs inside `make`.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from typing import NoReturn

EXIT_USAGE = 2


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are a single `prog: error: ...` line (exit 2)."""

    def error(self, message: str) -> NoReturn:
        """Print one line naming the argument and the problem, then exit 2."""
        self.exit(EXIT_USAGE, f"{self.prog}: error: {' '.join(message.split())}\n")


def fail(prog: str, message: str) -> int:
    """Print `prog: error: message` as one line on stderr and return the usage exit status (2)."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return EXIT_USAGE


def _int_at_least(minimum: int):
    """An argparse type: an integer >= `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


def fraction(text: str) -> float:
    """argparse type: a finite number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}")
    return value


SIZE_UNITS = {
    "": 1,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "KI": 2**10,
    "MI": 2**20,
    "GI": 2**30,
    "TI": 2**40,
}


def byte_size(text: str, minimum: int = 1) -> int:
    """A byte count such as `500000000`, `512MB`, `1GiB` (decimal K/M/G/T, binary Ki/Mi/Gi/Ti).

    Raises:
        argparse.ArgumentTypeError: not a size, or under `minimum` bytes.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?)B?\s*", text, flags=re.IGNORECASE)
    unit = match.group(2).upper() if match else ""
    if not match or unit not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500000000, 512MB, 1GiB)")
    value = int(float(match.group(1)) * SIZE_UNITS[unit])
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum} bytes, got {text!r}")
    return value
