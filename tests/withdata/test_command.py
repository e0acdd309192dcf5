"""``weightweaving merge`` with the methods that use data, on tiny CLIP folders built here."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import load_folder
from tests.models.tiny_clip import image_folder, tiny_clip_folder
from weightweaving.cli import main

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A tiny CLIPModel base and two fine-tunes whose image encoders moved (text side unchanged)."""
    root = tmp_path_factory.mktemp("clips")
    base = tiny_clip_folder(root / "base", seed=0)
    tuned = []
    for i in (1, 2):
        model = transformers.CLIPModel.from_pretrained(str(base))
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.startswith(("vision_model.", "visual_projection.")):
                    p.add_(0.05 * torch.randn(p.shape, generator=gen))
        folder = root / f"ft{i}"
        model.save_pretrained(str(folder))
        tuned.append(folder)
    return base, tuned


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("data")
    return [
        image_folder(root / "colours", per_class=2, seed=1),
        image_folder(root / "places", per_class=3, seed=2, kind="place"),
    ]


def merge(clips: tuple[Path, list[Path]], out: Path, *extra: str) -> int:
    base, tuned = clips
    return main(["merge", "--base", str(base), "--models", *map(str, tuned), "--out", str(out), *extra])


def test_cat_from_the_cli_records_its_data_and_c_zero_is_task_arithmetic(clips, folders, tmp_path, capsys):
    a, b = folders
    data = ["--exemplars", f"colours={a}", "--exemplars", f"places={b}"]
    assert merge(clips, tmp_path / "ta", "--method", "task_arithmetic", "--lambda", "0.7") == 0
    assert merge(clips, tmp_path / "c0", "--method", "exemplar_projection", *data, "--set", "c=0",
                 "--lambda", "0.7", "--exemplars-per-task", "2", "--seed", "3") == 0  # fmt: skip
    assert merge(clips, tmp_path / "c2", "--method", "exemplar_projection", *data, "--set", "c=2",
                 "--lambda", "0.7", "--exemplars-per-task", "2", "--seed", "3") == 0  # fmt: skip
    ta, c0, c2 = (load_folder(tmp_path / n) for n in ("ta", "c0", "c2"))
    assert all(torch.equal(c0[k], ta[k]) for k in ta)
    base = load_folder(clips[0])
    moved = [k for k in ta if k.startswith("vision_model.encoder") and not torch.equal(c2[k], ta[k])]
    assert "vision_model.encoder.layers.0.mlp.fc1.weight" in moved  # the projection changed hooked layers
    assert all(torch.equal(c2[k], base[k]) for k in base if k.startswith("text_model."))
    record = yaml.safe_load((tmp_path / "c2" / "weightweaving_config.yaml").read_text())
    assert record["method"] == "exemplar_projection" and record["uses_data"] is True
    assert record["exemplars"] == {"colours": str(a), "places": str(b)} and record["exemplars_per_task"] == 2
    assert [(d["task"], d["available"], d["used"]) for d in record["data"]] == [
        ("colours", 6, 2),
        ("places", 6, 2),
    ]
    for d, folder in zip(record["data"], folders, strict=True):
        for f in d["files"]:
            assert f["sha256"] == hashlib.sha256((folder / f["path"]).read_bytes()).hexdigest()
    again = merge(clips, tmp_path / "again", "--method", "exemplar_projection", *data, "--set", "c=2",
                  "--lambda", "0.7", "--exemplars-per-task", "2", "--seed", "3")  # fmt: skip
    assert again == 0
    first = (tmp_path / "c2" / "model.safetensors").read_bytes()
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == first


def test_adamerging_from_the_cli_with_zero_shot_heads(clips, folders, tmp_path):
    a, b = folders
    data = ["--tta-data", f"colours={a}", "--tta-data", f"places={b}"]
    # no step: the coefficients stay at their start, 0.3, which is Task Arithmetic at λ = 0.3
    assert merge(clips, tmp_path / "ta", "--method", "task_arithmetic", "--lambda", "0.3") == 0
    assert merge(clips, tmp_path / "s0", "--method", "adamerging", *data, "--set", "steps=0") == 0
    ta, s0 = load_folder(tmp_path / "ta"), load_folder(tmp_path / "s0")
    for k in ta:
        torch.testing.assert_close(s0[k], ta[k], rtol=0, atol=1e-6)
    runs = []
    for name in ("x", "y"):
        args = ("--set", "steps=2", "--set", "lr=0.05", "--set", "batch_size=4", "--seed", "1")
        assert merge(clips, tmp_path / name, "--method", "adamerging", *data, *args) == 0
        runs.append((tmp_path / name / "model.safetensors").read_bytes())
    assert runs[0] == runs[1]
    record = yaml.safe_load((tmp_path / "x" / "weightweaving_config.yaml").read_text())
    assert record["tta_data"] == {"colours": str(a), "places": str(b)} and record["steps"] == 2
    assert [(d["available"], d["used"], d["classes"]) for d in record["data"]] == [(6, 6, 3), (6, 6, 2)]
    learned = record["coefficients"]["vision_model.encoder.layers.0.mlp.fc1.weight"]
    assert len(learned) == 2 and all(0.0 <= v <= 1.0 for v in learned) and learned != [0.3, 0.3]
    assert merge(clips, tmp_path / "pp", "--method", "cart_adamerging", *data, "--set", "steps=1") == 0


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "task 'places': no such image folder"),
        ("empty", "task 'places': the folder holds no images"),
        ("too_many", "task 'colours': 7 exemplars asked, only 6 exist"),
        ("one_folder", "--exemplars: 1 task(s) for 2 fine-tuned models"),
        ("data_free", "--exemplars is for the methods that use data"),
        ("no_data", "method 'exemplar_projection' uses data: give --exemplars"),
        ("wrong_flag", "--tta-data is not used by method 'exemplar_projection'"),
        ("tta_missing", "task 'places': no such image folder or file"),
        ("not_clip", "is not a CLIPModel folder"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(clips, folders, tmp_path, capsys, case, message):
    a, b = folders
    places = {
        "missing": tmp_path / "nowhere",
        "tta_missing": tmp_path / "nowhere",
        "empty": tmp_path / "empty",
    }.get(case, b)
    (tmp_path / "empty").mkdir()
    method = {"data_free": "ties", "tta_missing": "adamerging"}.get(case, "exemplar_projection")
    flag = "--tta-data" if case == "tta_missing" else "--exemplars"
    data = [flag, f"colours={a}", flag, f"places={places}"]
    if case == "one_folder":
        data = data[:2]
    elif case == "no_data":
        data = []
    elif case == "wrong_flag":
        data += ["--tta-data", f"x={a}"]
    extra = ["--exemplars-per-task", "7"] if case == "too_many" else []
    base, tuned = clips
    if case == "not_clip":
        base = tmp_path / "plain"
        base.mkdir()
        (base / "config.json").write_text('{"model_type": "bert"}')
    out = tmp_path / "out"
    code = main(["merge", "--base", str(base), "--models", *map(str, tuned), "--method", method, *data, *extra,
                 "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not out.exists()
