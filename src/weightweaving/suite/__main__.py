"""``python -m weightweaving.suite [--quick] [--seed N] [--out DIR]``."""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import WeightWeavingError
from .run import run_suite


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m weightweaving.suite",
        description="Run the paper's three setups (multi-task, continual, domain generalisation) on a CPU.",
        epilog="example: python -m weightweaving.suite --quick --seed 1 --out runs/suite",
    )
    parser.add_argument("--quick", action="store_true", help="the CI profile (under 2 minutes)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of data, training and random pools (default 0)"
    )
    parser.add_argument(
        "--out", default="runs/suite", help="parent folder of the run folder (default runs/suite)"
    )
    parser.add_argument(
        "--cache-dir", default=None, help="checkpoint cache (default ~/.cache/weightweaving/suite)"
    )
    parser.add_argument("--profile", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--verbose", action="store_true", help="log details")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        run_suite(
            quick=args.quick, seed=args.seed, out=args.out, cache_dir=args.cache_dir, profile=args.profile
        )
    except WeightWeavingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
