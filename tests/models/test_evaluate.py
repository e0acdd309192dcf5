"""``evaluate`` against an independent computation with transformers, and its bad-input errors."""

from __future__ import annotations

import json

import pytest
import torch

from tests.models.tiny_clip import transformers
from weightweaving.cli import main

Image = __import__("PIL.Image", fromlist=["Image"])


def _reference_accuracy(folder, data_root, classes, templates) -> float:
    """transformers only: text features per class (normalise, mean, normalise), image features, argmax."""
    model = transformers.CLIPModel.from_pretrained(str(folder)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    processor = transformers.CLIPImageProcessor.from_pretrained(str(folder))
    with torch.no_grad():
        rows = []
        for name in classes:
            tokens = tokenizer([t.replace("{}", name) for t in templates], padding=True, return_tensors="pt")
            out = model.get_text_features(**tokens)
            text = out if isinstance(out, torch.Tensor) else out.pooler_output
            text = text / text.norm(dim=-1, keepdim=True)
            rows.append(text.mean(0) / text.mean(0).norm())
        weights = torch.stack(rows)
        correct = total = 0
        for label, name in enumerate(sorted(p.name for p in data_root.iterdir())):
            for file in sorted((data_root / name).iterdir()):
                pixels = processor(images=[Image.open(file).convert("RGB")], return_tensors="pt")[
                    "pixel_values"
                ]
                out = model.get_image_features(pixel_values=pixels)
                image = out if isinstance(out, torch.Tensor) else out.pooler_output
                logits = (image / image.norm(dim=-1, keepdim=True)) @ weights.T
                correct += int(logits.argmax(1).item() == label)
                total += 1
    return 100.0 * correct / total


def test_accuracy_equals_transformers(clip_dir, images, tmp_path, capsys):
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\na {} square.\n")
    out = tmp_path / "acc.json"
    code = main(
        [
            "evaluate",
            "--model",
            str(clip_dir),
            "--task",
            f"colours={images}",
            "--templates",
            str(templates),
            "--batch-size",
            "4",
            "--json",
            str(out),
            "--cache-dir",
            str(tmp_path / "heads"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    got = json.loads(out.read_text())
    want = _reference_accuracy(
        clip_dir, images, ["blue", "green", "red"], ["a photo of a {}.", "a {} square."]
    )
    assert got["per_task"]["colours"] == want
    assert got["average"] == want
    printed = capsys.readouterr().out
    assert "colours" in printed and "average" in printed
    # the cached head is reused, and refused when renamed to stand for other classes
    cached = sorted((tmp_path / "heads").glob("*.safetensors"))  # heads (features: under features/)
    assert len(cached) == 1
    code = main(
        [
            "evaluate",
            "--model",
            str(clip_dir),
            "--task",
            f"colours={images}",
            "--templates",
            str(templates),
            "--cache-dir",
            str(tmp_path / "heads"),
        ]
    )
    assert code == 0


def test_head_cached_for_other_classes_is_refused(clip_dir, images, tmp_path, capsys):
    from weightweaving.models.clip import load_clip
    from weightweaving.models.heads import cached_head, head_key, text_side_hash

    clip = load_clip(clip_dir)
    cached_head(clip, ["a", "b", "c"], ["{}"], cache_dir=tmp_path, task="t")
    made = next(tmp_path.iterdir())
    wanted = tmp_path / f"head-t-{head_key(text_side_hash(clip), ['x', 'y', 'z'], ['{}'])}.safetensors"
    made.rename(wanted)
    try:
        cached_head(clip, ["x", "y", "z"], ["{}"], cache_dir=tmp_path, task="t")
    except Exception as exc:  # noqa: BLE001 - the message is what is tested
        assert str(exc) == f"{wanted}: is a head cached for other classes; delete it to rebuild it"
    else:
        raise AssertionError("a head for other classes was used")


def _error(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


def test_bad_inputs_are_one_line_errors(clip_dir, images, tmp_path, capsys):
    empty = tmp_path / "data"
    (empty / "cat").mkdir(parents=True)
    (empty / "dog").mkdir()
    Image.new("RGB", (8, 8)).save(empty / "cat" / "0.png")
    line = _error(capsys, "evaluate", "--model", str(clip_dir), "--task", f"pets={empty}")
    assert line == f"error: {empty / 'dog'}: is a class folder with no images"

    (empty / "dog" / "0.png").write_bytes(b"not a png")
    line = _error(capsys, "evaluate", "--model", str(clip_dir), "--task", f"pets={empty}")
    assert line == f"error: {empty / 'dog' / '0.png'}: unreadable image: UnidentifiedImageError"

    table = tmp_path / "labels.csv"
    table.write_text(f"path,label\n{images / 'red' / '0.png'},red\n{images / 'blue' / '0.png'},purple\n")
    classes = tmp_path / "classes.txt"
    classes.write_text("red\nblue\n")
    line = _error(
        capsys, "evaluate", "--model", str(clip_dir), "--task", f"c={table}", "--classes", str(classes)
    )
    assert line == f"error: {table}: row 2: label 'purple' is not one of the classes"

    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "bert"}')
    line = _error(capsys, "evaluate", "--model", str(other), "--task", f"colours={images}")
    assert line == f"error: {other / 'config.json'}: is not a CLIP model folder (model_type 'bert')"


def test_feature_cache_skips_the_forward_pass_for_the_same_encoder(clip_dir, images, tmp_path, monkeypatch):
    """--cache-dir keeps each task's image features keyed by encoder, data and processor."""
    from weightweaving.models.clip import load_clip

    cache, task = str(tmp_path / "cache"), ["--task", f"colours={images}"]
    first, second = tmp_path / "1.json", tmp_path / "2.json"
    assert (
        main(["evaluate", "--model", str(clip_dir), *task, "--cache-dir", cache, "--json", str(first)]) == 0
    )
    assert len(list((tmp_path / "cache" / "features").glob("*.safetensors"))) == 1
    plain = tmp_path / "plain.json"
    assert main(["evaluate", "--model", str(clip_dir), *task, "--json", str(plain)]) == 0
    assert json.loads(first.read_text())["per_task"] == json.loads(plain.read_text())["per_task"]

    def refuse(*args, **kwargs):
        raise AssertionError("the image encoder ran although its features are cached")

    monkeypatch.setattr(transformers.CLIPModel, "get_image_features", refuse)
    assert (
        main(["evaluate", "--model", str(clip_dir), *task, "--cache-dir", cache, "--json", str(second)]) == 0
    )
    assert json.loads(second.read_text())["per_task"] == json.loads(first.read_text())["per_task"]
    # another image encoder (one weight changed) is not answered from the cache
    clip = load_clip(str(clip_dir))
    with torch.no_grad():
        clip.model.visual_projection.weight[0, 0] += 1.0
    clip.model.save_pretrained(str(tmp_path / "changed"))
    for name in (
        "tokenizer.json",
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "preprocessor_config.json",
    ):
        if (clip_dir / name).is_file():
            (tmp_path / "changed" / name).write_bytes((clip_dir / name).read_bytes())
    with pytest.raises(AssertionError, match="the image encoder ran"):
        main(["evaluate", "--model", str(tmp_path / "changed"), *task, "--cache-dir", cache])


def test_cuda_asked_for_without_cuda_is_one_line_error(clip_dir, images, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    task = ["--task", f"colours={images}"]
    line = _error(capsys, "evaluate", "--model", str(clip_dir), *task, "--device", "cuda")
    assert line == "error: --device cuda: CUDA is not available on this machine"
    out = tmp_path / "ft"
    line = _error(
        capsys, "finetune", "--model", str(clip_dir), *task, "--out", str(out), "--device", "cuda:1"
    )
    assert line == "error: --device cuda:1: CUDA is not available on this machine" and not out.exists()
    config = tmp_path / "r.yaml"
    config.write_text(
        f"base: {clip_dir}\nout: {tmp_path / 'run'}\ntasks:\n  a: {{data: {images}, checkpoint: {clip_dir}}}\n"
        f"  b: {{data: {images}, checkpoint: {clip_dir}}}\n"
    )
    line = _error(capsys, "reproduce", str(config), "--device", "cuda")
    assert line == "error: --device cuda: CUDA is not available on this machine"
    assert not (tmp_path / "run").exists()
