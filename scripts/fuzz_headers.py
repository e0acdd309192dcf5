"""Fuzz the safetensors reader far beyond CI's few thousand cases.

    .venv/bin/python scripts/fuzz_headers.py --cases 100000          # a fresh random seed
    .venv/bin/python scripts/fuzz_headers.py --cases 20000 --seed 7  # reproducible

It runs ``tests/reliability/test_fuzz_headers.py`` with ``WEIGHTWEAVING_FUZZ_CASES`` and
``WEIGHTWEAVING_FUZZ_SEED`` set; a failure prints the smallest mutant hypothesis found.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, default=100_000, help="mutants to try (default: 100000)")
    parser.add_argument("--seed", type=int, help="hypothesis seed (default: a random one, printed)")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    print(f"fuzzing {args.cases} mutants with seed {seed}", flush=True)
    env = {
        **os.environ,
        "WEIGHTWEAVING_FUZZ_CASES": str(args.cases),
        "WEIGHTWEAVING_FUZZ_SEED": str(seed),
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH")])
        ),
    }
    test = "tests/reliability/test_fuzz_headers.py::test_fuzzed_headers_are_loaded_or_refused_by_name"
    return subprocess.call(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], cwd=ROOT, env=env
    )


if __name__ == "__main__":
    raise SystemExit(main())
