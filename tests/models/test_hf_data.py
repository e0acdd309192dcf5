"""Hugging Face ``datasets`` folders (``hf:``): read locally with ``load_from_disk``, same accuracy as an image folder."""

from __future__ import annotations

import json
from pathlib import Path

import datasets  # the hf extra (the test extra installs it)
import pytest
from PIL import Image

from weightweaving.cli import main
from weightweaving.errors import WeightWeavingError
from weightweaving.models.data import open_images


def _as_dataset(folder: Path, image: str = "img", label: str = "label") -> tuple[object, list[str]]:
    """The image folder's images (PNG bytes, shuffled order) with ClassLabel labels."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    files = sorted((p, classes.index(p.parent.name)) for p in folder.rglob("*.png"))[::-1]
    pictures = []
    for path, _ in files:
        with Image.open(path) as img:
            pictures.append(img.copy())
    features = datasets.Features({image: datasets.Image(), label: datasets.ClassLabel(names=classes)})
    table = datasets.Dataset.from_dict({image: pictures, label: [t for _, t in files]}, features=features)
    return table, classes


def test_hf_folder_scores_like_the_image_folder(clip_dir, images, tmp_path, capsys):
    table, classes = _as_dataset(images)
    datasets.DatasetDict({"train": table, "test": table}).save_to_disk(str(tmp_path / "hf"))
    data = open_images(f"hf:{tmp_path / 'hf'}")  # split "test" chosen, columns found by type
    assert data.classes == classes and len(data) == len(table)
    assert data.image(0).tobytes() == table[0]["img"].convert("RGB").tobytes()
    runs = {}
    for name, spec in (("folder", str(images)), ("hf", f"hf:{tmp_path / 'hf'}:test")):
        out = tmp_path / f"{name}.json"
        assert main(["evaluate", "--model", str(clip_dir), "--task", f"t={spec}", "--json", str(out)]) == 0
        runs[name] = json.loads(out.read_text())
    assert runs["hf"]["per_task"] == runs["folder"]["per_task"]
    assert runs["hf"]["images"] == runs["folder"]["images"]
    datasets.DatasetDict({"train": table.select([0, 1]), "test": table}).save_to_disk(str(tmp_path / "two"))
    assert len(open_images(f"hf:{tmp_path / 'two'}", default_split="train")) == 2  # finetune's default


def test_hf_columns_given_and_errors(images, tmp_path):
    table, classes = _as_dataset(images, image="picture", label="target")
    table = table.cast_column("target", datasets.Value("int64"))  # plain integers: no class names
    table.save_to_disk(str(tmp_path / "plain"))
    data = open_images(f"hf:{tmp_path / 'plain'}::picture:target", classes)
    assert data.classes == classes and sorted({t for _, t in data.items}) == list(range(len(classes)))
    with pytest.raises(WeightWeavingError, match="no label column found"):
        open_images(f"hf:{tmp_path / 'plain'}")
    with pytest.raises(WeightWeavingError, match="has no column 'nope'"):
        open_images(f"hf:{tmp_path / 'plain'}::picture:nope")
    with pytest.raises(WeightWeavingError, match="no such folder"):
        open_images(f"hf:{tmp_path / 'missing'}")
    with pytest.raises(WeightWeavingError, match="is not a datasets save_to_disk folder"):
        open_images(f"hf:{images}")


def test_finetune_reads_an_hf_folder(clip_dir, images, tmp_path):
    table, _ = _as_dataset(images)
    table.save_to_disk(str(tmp_path / "hf"))
    args = ["--steps", "2", "--warmup", "1", "--batch-size", "4", "--out", str(tmp_path / "ft")]
    assert main(["finetune", "--model", str(clip_dir), "--task", f"t=hf:{tmp_path / 'hf'}", *args]) == 0
    assert (tmp_path / "ft" / "config.json").is_file()
