"""``python -m weightweaving.suite [--quick] [--seed N] [--out DIR]``: the same as ``weightweaving suite``."""

from __future__ import annotations

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["suite", *sys.argv[1:]]))
