"""Zero-shot-head accuracy of CLIP image encoders on labelled images: ``weightweaving evaluate``.

Accuracy is the paper's: the image features (``get_image_features`` on the folder's own image
processor's pixels) normalised, times the frozen head, argmax. One batch of images and one model are
in memory at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import OptionError
from .clip import Clip, is_vision_parameter
from .data import ImageSet, batches, open_images
from .heads import cached_head, pooled, text_side_hash
from .templates import DEFAULT_TEMPLATES, find_paper_dataset, paper_classes, paper_templates, read_lines


@dataclass
class Task:
    """A named classification task: its images (with class names) and its prompt templates."""

    name: str
    data: ImageSet
    templates: list[str]


def resolve_task(
    name: str,
    data: str | Path,
    *,
    classes_file: str | Path | None = None,
    templates_file: str | Path | None = None,
    default_split: str = "test",
) -> Task:
    """A task named like a paper dataset takes its class names and templates unless files are given.

    Otherwise the classes are the folder names (or CSV labels) and the template ``a photo of a {}.``.
    ``data`` without ``:SPLIT`` is ``default_split`` of a layout that has splits.
    """
    builtin = find_paper_dataset(name)
    classes = (
        read_lines(classes_file, "class names")
        if classes_file
        else (paper_classes(builtin) if builtin else None)
    )
    templates = (
        read_lines(templates_file, "templates")
        if templates_file
        else (paper_templates(builtin) if builtin else list(DEFAULT_TEMPLATES))
    )
    return Task(name, open_images(data, classes, dataset=builtin, default_split=default_split), templates)


def parse_tasks(
    specs: Sequence[str],
    classes: Sequence[str] = (),
    templates: Sequence[str] = (),
    *,
    default_split: str = "test",
) -> list[Task]:
    """``NAME=DATA`` task specs, with ``--classes``/``--templates`` given as ``FILE`` (one task) or ``NAME=FILE``."""
    pairs = []
    for spec in specs:
        name, sep, data = spec.partition("=")
        if not sep or not name.strip() or not data.strip():
            raise OptionError(f"--task '{spec}' must look like NAME=DATA")
        pairs.append((name.strip(), data.strip()))
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        raise OptionError("--task: the same task name is given twice")
    class_files, template_files = (
        _per_task(classes, names, "--classes"),
        _per_task(templates, names, "--templates"),
    )
    return [
        resolve_task(
            n,
            d,
            classes_file=class_files.get(n),
            templates_file=template_files.get(n),
            default_split=default_split,
        )
        for n, d in pairs
    ]


def _per_task(values: Sequence[str], names: list[str], option: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values:
        name, sep, file = value.partition("=")
        if sep and name in names:
            out[name] = file
        elif len(names) == 1:
            out[names[0]] = value
        else:
            raise OptionError(f"{option} '{value}': with several tasks, give NAME=FILE")
    return out


def device_of(clip: Clip) -> torch.device:
    return next(clip.model.parameters()).device


@torch.no_grad()
def image_features(
    clip: Clip,
    data: ImageSet,
    *,
    batch_size: int = 128,
    progress: bool = False,
    desc: str = "images",
    workers: int = 0,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Normalised image features (on the CPU, float32) and labels, batch by batch."""
    device = device_of(clip)
    dtype = next(clip.model.parameters()).dtype
    with tqdm(total=len(data), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for pixels, labels in batches(data, clip.processor, batch_size, workers=workers):
            features = pooled(clip.model.get_image_features(pixel_values=pixels.to(device, dtype))).float()
            yield (features / features.norm(dim=-1, keepdim=True)).cpu(), labels
            bar.update(len(labels))


def accuracy(
    clip: Clip,
    head: Tensor,
    data: ImageSet,
    *,
    batch_size: int = 128,
    progress: bool = False,
    desc: str = "",
    workers: int = 0,
) -> float:
    """Percent of ``data`` whose argmax over ``features @ head.T`` is its label."""
    correct = 0
    for features, labels in image_features(
        clip, data, batch_size=batch_size, progress=progress, desc=desc, workers=workers
    ):
        correct += int(((features @ head.T).argmax(dim=1) == labels).sum())
    return 100.0 * correct / len(data)


def task_heads(clip: Clip, tasks: Sequence[Task], cache_dir: str | Path | None) -> dict[str, Tensor]:
    model_hash = text_side_hash(clip) if cache_dir is not None else None
    return {
        t.name: cached_head(
            clip, t.data.classes, t.templates, cache_dir=cache_dir, task=t.name, model_hash=model_hash
        )
        for t in tasks
    }


def vision_side_hash(clip: Clip) -> str:
    """sha256 of every tensor the image features depend on (the vision tower and its projection)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(clip.model.state_dict().items()):
        if is_vision_parameter(name) and not name.endswith("position_ids"):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()


def data_hash(data: ImageSet) -> str:
    """What a task's images are: their places, labels and (files) sizes and times, or the arrays' bytes."""
    digest = hashlib.sha256(json.dumps([data.source, data.classes]).encode())
    if data.rows is not None:
        digest.update(str(getattr(data.rows, "_fingerprint", "")).encode())
    if data.arrays is not None:
        digest.update(data.arrays.contiguous().numpy().tobytes())
    for where, label in data.items:
        stamp = ""
        if data.rows is None and data.arrays is None:
            try:
                info = os.stat(where)
                stamp = f"{info.st_size}:{info.st_mtime_ns}"
            except OSError:
                stamp = "missing"
        digest.update(f"{where}\t{label}\t{stamp}\n".encode())
    return digest.hexdigest()


def cached_features(
    clip: Clip,
    data: ImageSet,
    cache_dir: str | Path,
    *,
    model_hash: str,
    batch_size: int = 128,
    progress: bool = False,
    desc: str = "",
    workers: int = 0,
) -> tuple[Tensor, Tensor]:
    """All of ``data``'s normalised image features and labels, from ``cache_dir/features`` or computed once.

    The key is the image encoder's hash, the data's hash and the image processor's settings; the
    file is written to a staging name and renamed into place.
    """
    processor = json.dumps(clip.processor.to_dict(), sort_keys=True, default=str)
    key = hashlib.sha256(f"{model_hash}|{data_hash(data)}|{processor}".encode()).hexdigest()[:24]
    target = Path(cache_dir) / "features" / f"{key}.safetensors"
    if target.is_file():
        try:
            stored = load_file(str(target))
            if len(stored["labels"]) == len(data):
                return stored["features"], stored["labels"]
        except (OSError, KeyError, RuntimeError, ValueError):
            pass  # an unreadable cache entry is recomputed
    parts = list(
        image_features(clip, data, batch_size=batch_size, progress=progress, desc=desc, workers=workers)
    )
    features = torch.cat([f for f, _ in parts]) if parts else torch.zeros(0)
    labels = torch.cat([y for _, y in parts]) if parts else torch.zeros(0, dtype=torch.long)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{os.getpid()}.partial")
    save_file({"features": features.contiguous(), "labels": labels.contiguous()}, str(staging))
    staging.replace(target)
    return features, labels


def evaluate_clip(
    clip: Clip,
    tasks: Sequence[Task],
    *,
    heads: dict[str, Tensor] | None = None,
    batch_size: int = 128,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    workers: int = 0,
) -> dict[str, float]:
    """Accuracy (percent) per task, with each task's zero-shot head (built, or read from the cache).

    With ``cache_dir``, each task's image features are cached too (keyed by the image encoder's
    hash, the data and the processor): evaluating the same encoder again skips the forward pass.
    """
    heads = heads if heads is not None else task_heads(clip, tasks, cache_dir)
    if cache_dir is not None:
        model_hash = vision_side_hash(clip)
        scores = {}
        for t in tasks:
            features, labels = cached_features(
                clip,
                t.data,
                cache_dir,
                model_hash=model_hash,
                batch_size=batch_size,
                progress=progress,
                desc=t.name,
                workers=workers,
            )
            correct = int(((features @ heads[t.name].T).argmax(dim=1) == labels).sum())
            scores[t.name] = 100.0 * correct / len(t.data)
        return scores
    return {
        t.name: accuracy(
            clip,
            heads[t.name],
            t.data,
            batch_size=batch_size,
            progress=progress,
            desc=t.name,
            workers=workers,
        )
        for t in tasks
    }


def table(scores: dict[str, float]) -> str:
    """A plain-text table: one row per task and the average."""
    width = max(len("average"), *(len(n) for n in scores))
    lines = [f"{'task':<{width}}  accuracy", f"{'-' * width}  --------"]
    lines += [f"{n:<{width}}  {v:8.2f}" for n, v in scores.items()]
    lines.append(f"{'average':<{width}}  {mean(scores.values()):8.2f}")
    return "\n".join(lines)


def write_json(path: str | Path, payload: dict[str, object]) -> Path:
    """Write ``payload`` next to ``path`` and rename it into place (nothing half-written)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.{os.getpid()}.partial")
    staging.write_text(json.dumps(payload, indent=1))
    staging.replace(out)
    return out


def run_evaluate(
    *,
    model: str,
    tasks: Sequence[str],
    base: str | None = None,
    classes: Sequence[str] = (),
    templates: Sequence[str] = (),
    device: str = "cpu",
    batch_size: int = 128,
    cache_dir: str | None = None,
    json_out: str | None = None,
    workers: int = 0,
    progress: bool | None = None,
) -> dict[str, object]:
    """``weightweaving evaluate``: load, build heads, score every task, print the table, write the JSON."""
    from .clip import load_clip

    if batch_size < 1:
        raise OptionError("--batch-size must be at least 1")
    show = sys.stderr.isatty() if progress is None else progress
    parsed = parse_tasks(tasks, classes, templates)
    clip = load_clip(model, base=base, device=check_device(device))
    scores = evaluate_clip(
        clip, parsed, batch_size=batch_size, cache_dir=cache_dir, progress=show, workers=workers
    )
    result: dict[str, object] = {
        "model": str(model),
        "base": base,
        "per_task": scores,
        "average": mean(scores.values()),
        "images": {t.name: len(t.data) for t in parsed},
    }
    print(table(scores))
    if json_out is not None:
        print(f"wrote {write_json(json_out, result)}")
    return result


def check_device(name: str) -> str:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError(f"--device {name}: CUDA is not available on this machine")
    try:
        torch.device(name)
    except RuntimeError:
        raise OptionError(f"--device '{name}' is not a device (cpu, cuda, cuda:1)") from None
    return name
