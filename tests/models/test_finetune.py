"""``finetune``: the recipe's schedule, a frozen text side and head, and a folder ``merge`` and ``evaluate`` read."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from tests.models.tiny_clip import image_folder
from weightweaving.cli import main
from weightweaving.models.finetune import cosine_lr


def test_cosine_schedule_matches_task_vectors():
    # task_vectors' cosine_lr: (step + 1) / warmup during warm-up, then 0.5 (1 + cos(pi e / es)) lr
    lrs = [cosine_lr(s, 1e-5, 500, 2000) for s in (0, 499, 500, 1250, 1999)]
    assert lrs[0] == 1e-5 / 500 and lrs[1] == 1e-5 and lrs[2] == 1e-5
    assert abs(lrs[3] - 0.5e-5) < 1e-18 and 0 < lrs[4] < 1e-10


def test_finetune_trains_the_image_encoder_only(clip_dir, tmp_path, capsys):
    train = image_folder(tmp_path / "train", per_class=4, seed=3, kind="colour")
    test = image_folder(tmp_path / "test", per_class=4, seed=4, kind="colour")
    out = tmp_path / "ft"
    args = [
        "--task",
        f"colour={train}",
        "--steps",
        "16",
        "--warmup",
        "2",
        "--lr",
        "2e-3",
        "--batch-size",
        "8",
    ]
    assert main(["finetune", "--model", str(clip_dir), *args, "--out", str(out)]) == 0
    before, after = load_file(str(clip_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("vision_model.", "visual_projection.")) for k in changed)
    assert "visual_projection.weight" in changed
    record = json.loads((out / "weightweaving_finetune.json").read_text())
    assert record["recipe"]["steps"] == 16 and record["recipe"]["weight_decay"] == 0.1
    capsys.readouterr()
    for model, name in ((clip_dir, "zero"), (out, "tuned")):
        assert (
            main(
                [
                    "evaluate",
                    "--model",
                    str(model),
                    "--task",
                    f"colour={test}",
                    "--json",
                    str(tmp_path / f"{name}.json"),
                ]
            )
            == 0
        )
    zero = json.loads((tmp_path / "zero.json").read_text())["average"]
    tuned = json.loads((tmp_path / "tuned.json").read_text())["average"]
    assert tuned > zero and tuned >= 75.0, (zero, tuned)
    # an existing output is refused, and nothing is written
    assert main(["finetune", "--model", str(clip_dir), *args, "--out", str(out)]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"error: {out}: the output folder exists; pass --overwrite to replace it"
    )
