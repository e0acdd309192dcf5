"""The built-in experiment suite: the paper's three setups on a laptop CPU, with tables and plots.

``run_suite()`` starts from a small CLIP-shaped ViT pre-trained offline and shipped with the package
(``encoder.py``; the test profile pre-trains its own), fine-tunes it on eight visibly different tasks
and on class-incremental splits, merges through :func:`weightweaving.merge` / ``weave`` and writes a
run folder (``report.md``, ``results.json``, PNG plots). Checkpoints are cached by recipe hash.
"""

from __future__ import annotations

from .profiles import METHODS, PROFILES, Recipe
from .run import run_suite

__all__ = ["METHODS", "PROFILES", "Recipe", "run_suite"]
