"""Loading the reference cases in ``tests/data/oracles`` and comparing with their stated tolerance.

The cases were produced by each method's own reference code (see ``tests/data/oracles/README.md``);
``scripts/refresh_oracles.py`` copies new ones in. ``WEIGHTWEAVING_ORACLES`` points at another copy.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

ROOT = Path(os.environ.get("WEIGHTWEAVING_ORACLES", Path(__file__).resolve().parent / "data" / "oracles"))


@dataclass
class OracleCase:
    name: str
    meta: dict[str, Any]
    pretrained: dict[str, torch.Tensor]
    tasks: list[dict[str, torch.Tensor]]
    expected: dict[str, torch.Tensor]
    members: list[dict[str, torch.Tensor]]
    path: Path

    @property
    def hyperparameters(self) -> dict[str, Any]:
        return dict(self.meta.get("hyperparameters") or {})


def case_paths(method: str) -> list[Path]:
    folder = ROOT / method
    if not folder.is_dir():
        raise FileNotFoundError(
            f"oracle folder {folder} is missing (scripts/refresh_oracles.py copies cases in)"
        )
    return sorted(folder.glob("case*.json"), key=lambda p: int(p.stem[4:]))


def load_case(path: Path) -> OracleCase:
    meta = json.loads(path.read_text())
    tensors = load_file(str(path.with_suffix(".safetensors")))
    pretrained: dict[str, torch.Tensor] = {}
    tasks: dict[int, dict[str, torch.Tensor]] = {}
    expected: dict[str, torch.Tensor] = {}
    members: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        head, _, param = key.partition(".")
        if head == "pretrained":
            pretrained[param] = value
        elif head == "expected":
            expected[param] = value
        elif head.startswith("task"):
            tasks.setdefault(int(head[4:]), {})[param] = value
        elif head.startswith("member"):
            members.setdefault(int(head[6:]), {})[param] = value
    # keep the parameter order of the JSON (the model's order)
    order = list(meta.get("parameters") or pretrained)
    pretrained = {k: pretrained[k] for k in order}
    return OracleCase(
        name=meta.get("case", path.stem),
        meta=meta,
        pretrained=pretrained,
        tasks=[tasks[i] for i in sorted(tasks)],
        expected=expected,
        members=[members[i] for i in sorted(members)],
        path=path,
    )


def assert_matches(case: OracleCase, got: dict[str, torch.Tensor]) -> None:
    """The oracle's rule: |(got − pre) − (expected − pre)| ≤ atol[param] + rtol·|expected − pre|, float64."""
    tol = case.meta["tolerance"]
    assert set(got) == set(case.expected), f"{case.name}: keys differ"
    for name, expected in case.expected.items():
        pre = case.pretrained[name].double()
        want = expected.double() - pre
        have = got[name].double() - pre
        bound = tol["atol"][name] + tol["rtol"] * want.abs()
        err = (have - want).abs()
        bad = err > bound
        assert not bool(bad.any()), (
            f"{case.name}: {name}: {int(bad.sum())} of {bad.numel()} entries off; "
            f"max error {float(err.max()):.3e}, atol {tol['atol'][name]:.2e}"
        )
