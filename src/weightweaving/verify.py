"""``weightweaving verify OUT``: recompute an output folder's manifest and name what differs."""

from __future__ import annotations

import argparse
from typing import Any

from .checkpoints.manifest import MANIFEST, verify


def add_verify_parser(sub: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        "verify",
        help="check an output folder against its manifest (SHA-256 of every file)",
        description=f"Recompute the SHA-256 of every file of an output folder and compare it with {MANIFEST}. "
        "Exit 0 when all match, 1 with one line per file that differs, is missing or was added, "
        "2 when the folder has no readable manifest.",
    )
    parser.add_argument("folder", help="an output folder written by weightweaving")
    return parser


def run_verify(args: argparse.Namespace) -> int:
    problems = verify(args.folder)
    for line in problems:
        print(line)
    if not problems:
        print(f"ok: {args.folder}: every file matches its manifest")
    return 1 if problems else 0
