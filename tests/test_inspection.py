"""``weightweaving inspect``: header summaries, and task-vector norms, cosines and sign conflicts."""

from __future__ import annotations

import json

import torch

from tests.helpers import run_cli, save_hf_folder, toy_models
from weightweaving.cli import main


def test_inspect_compares_task_vectors_per_layer_and_whole_model(tmp_path):
    base, tuned = toy_models(3)
    save_hf_folder(tmp_path / "base", base)
    for i, sd in enumerate(tuned):
        save_hf_folder(tmp_path / f"ft{i}", sd)
    models = [tmp_path / f"ft{i}" for i in range(3)]
    plot = tmp_path / "cos.png"
    res = run_cli("inspect", *models, "--base", tmp_path / "base", "--json", "--plot", plot)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    merged = [k for k, v in base.items() if v.is_floating_point()]
    deltas = torch.stack([torch.cat([(sd[k] - base[k]).double().flatten() for k in merged]) for sd in tuned])
    comparison = report["comparison"]
    assert torch.allclose(torch.tensor(comparison["norms"], dtype=torch.float64), deltas.norm(dim=1))
    unit = deltas / deltas.norm(dim=1, keepdim=True)
    assert torch.allclose(torch.tensor(comparison["cosine"], dtype=torch.float64), unit @ unit.T)
    conflicts = ((deltas > 0).any(0) & (deltas < 0).any(0)).double().mean()
    assert abs(comparison["sign_conflict_rate"] - float(conflicts)) < 1e-12
    layers = {row["layer"]: row for row in comparison["layers"]}
    assert set(layers) == {"blocks.0", "ln", "conv1"}  # blocks.0.attn.* pooled into its layer
    attn = torch.stack(
        [
            (sd["blocks.0.attn.in_proj.weight"] - base["blocks.0.attn.in_proj.weight"]).double().flatten()
            for sd in tuned
        ]
    )
    attn = torch.cat(
        [
            attn,
            torch.stack(
                [
                    (sd["blocks.0.attn.in_proj.bias"] - base["blocks.0.attn.in_proj.bias"]).double()
                    for sd in tuned
                ]
            ),
        ],
        1,
    )
    assert torch.allclose(torch.tensor(layers["blocks.0"]["norms"], dtype=torch.float64), attn.norm(dim=1))
    assert comparison["paper_lam_ranges"]["ties"]["multitask"] == [0.1, 1.5]
    summary = report["checkpoints"][0]
    assert summary["parameters"] == sum(v.numel() for v in base.values())
    assert summary["bytes"] == sum(v.numel() * v.element_size() for v in base.values())
    assert summary["dtypes"] == {"float32": sum(base[k].numel() for k in merged), "int64": 5}


def test_inspect_tables_without_base(tmp_path, capsys):
    base, _ = toy_models(1)
    save_hf_folder(tmp_path / "base", base)
    assert main(["inspect", str(tmp_path / "base"), "--shapes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(
        f"{tmp_path / 'base' / 'model.safetensors'}: 5 tensors, 169 parameters, 696 bytes "
    )
    assert "  conv1.weight  (4, 3, 2, 2)  float32" in lines
    assert main(["inspect", str(tmp_path / "base"), "--plot", str(tmp_path / "x.png")]) == 2
    assert (
        capsys.readouterr().err == "error: --plot draws the task vectors' cosine matrix, so it needs --base\n"
    )
