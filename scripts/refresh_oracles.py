"""Copy reference cases into the repository's own copy (tests/data/oracles) and say what changed.

The tests read only ``tests/data/oracles``; this script is how new or corrected cases, produced by the
methods' reference code elsewhere, come in. Nothing is deleted unless ``--prune`` is given.

Usage:
    python scripts/refresh_oracles.py SOURCE_FOLDER [--dry-run] [--prune]
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
from pathlib import Path

DEST = Path(__file__).resolve().parents[1] / "tests" / "data" / "oracles"


def plan(source: Path, dest: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """Relative paths that are new, changed, and (present only here) stale."""
    theirs = {p.relative_to(source) for p in source.rglob("*") if p.is_file()}
    ours = {p.relative_to(dest) for p in dest.rglob("*") if p.is_file()} if dest.exists() else set()
    new = sorted(theirs - ours)
    changed = sorted(p for p in theirs & ours if not filecmp.cmp(source / p, dest / p, shallow=False))
    stale = sorted(ours - theirs)
    return new, changed, stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "source", type=Path, help="a folder laid out as tests/data/oracles (<method>/caseN.*)"
    )
    parser.add_argument("--dry-run", action="store_true", help="only report what would change")
    parser.add_argument("--prune", action="store_true", help="also delete files the source does not have")
    args = parser.parse_args(argv)
    source: Path = args.source.resolve()
    if not source.is_dir():
        print(f"error: {source}: not a folder", file=sys.stderr)
        return 2
    new, changed, stale = plan(source, DEST)
    for label, paths in (("new", new), ("changed", changed), ("only here", stale)):
        for path in paths:
            print(f"{label:9} {path}")
    if not args.dry_run:
        for path in [*new, *changed]:
            (DEST / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / path, DEST / path)
        if args.prune:
            for path in stale:
                (DEST / path).unlink()
    verb = "would copy" if args.dry_run else "copied"
    print(
        f"{verb} {len(new)} new and {len(changed)} changed files; {len(stale)} only here"
        + (" (deleted)" if args.prune and not args.dry_run else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
