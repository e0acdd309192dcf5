"""Re-make the suite's shipped pre-trained encoder from its recipe (about 40 minutes of one CPU core).

    .venv/bin/python scripts/pretrain_encoder.py            # write it to ./encoder-e72-seed0.safetensors
    .venv/bin/python scripts/pretrain_encoder.py --install  # overwrite the packaged copy

It prints the new file's SHA-256 beside the packaged one's; on the same PyTorch build they match.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import torch

from weightweaving.suite.encoder import asset_path, pretrain_encoder, save_encoder
from weightweaving.suite.profiles import SHIPPED_ENCODER


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path(SHIPPED_ENCODER.file), help="where to write it")
    parser.add_argument("--install", action="store_true", help="write over the packaged copy instead")
    args = parser.parse_args(argv)
    spec = SHIPPED_ENCODER
    packaged = asset_path(spec)
    out = packaged if args.install else args.out
    torch.set_num_threads(1)  # the packaged copy was made with one thread
    started = time.perf_counter()
    state = pretrain_encoder(spec, progress=sys.stderr.isatty())
    digest = save_encoder(state, spec, out)
    print(f"{out}: sha256 {digest} ({time.perf_counter() - started:.0f} s)")
    if packaged.exists() and not args.install:
        shipped = hashlib.sha256(packaged.read_bytes()).hexdigest()
        print(f"{packaged}: sha256 {shipped} ({'same' if shipped == digest else 'DIFFERENT'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
