"""``weightweaving merge`` with a method that uses data, on CLIP folders.

From the command line the methods that use data merge CLIP image encoders: the base is a
``CLIPModel`` folder (as for ``evaluate``), the model whose layers are hooked is its image encoder
(``vision_model`` and ``visual_projection``, features normalised as ``evaluate`` computes them), and
AdaMerging's classifier heads are the zero-shot heads ``evaluate`` builds from each task's class names
and templates. Images go through the folder's own image processor. Any other PyTorch model:
:func:`weightweaving.merge_with_data`.

* ``--exemplars TASK=DIR`` (``exemplar_projection``): a folder of images per fine-tuned model, in
  ``--models`` order, read directly or in sub-folders (labels are not used); ``--exemplars-per-task``
  of them are drawn (default 5, or all when fewer).
* ``--tta-data TASK=DATA`` (``adamerging``, ``cart_adamerging``): a task's unlabeled test images as
  ``evaluate`` reads them (class folders, CSV, MNIST/SVHN files, ``hf:``; a paper dataset's NAME brings
  its class names and templates); ``--exemplars-per-task`` of them are drawn (default all). They are
  read batch by batch while learning, never all at once.

The output's ``weightweaving_config.yaml`` records per task the source, how many images it has and
how many were used, and the SHA-256 of every file used.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import DATA_FIELDS, MergeOptions, option_flag
from ..errors import OptionError, WeightWeavingError
from .api import DEFAULT_EXEMPLARS, METHODS_WITH_DATA, merge_loaded
from .images import choose, image_files, sha256_of

log = logging.getLogger("weightweaving")

# MergeOptions fields a merge that uses data does not take (their defaults are fine)
UNSUPPORTED = ("task_weights", "shard_size", "include", "exclude", "out_lora", "common_only", "dtype")


class ImageEncoder(nn.Module):
    """A CLIP model's image encoder: normalised ``get_image_features``; state dict names as CLIPModel's."""

    def __init__(self, clip_model: Any) -> None:
        super().__init__()
        self.vision_model = clip_model.vision_model
        self.visual_projection = clip_model.visual_projection

    def forward(self, pixel_values: Tensor) -> Tensor:
        from ..models.heads import pooled

        features = self.visual_projection(pooled(self.vision_model(pixel_values=pixel_values)))
        return features / features.norm(dim=-1, keepdim=True)


class Pixels:
    """A task's images, read and preprocessed only when a batch of them is asked for."""

    def __init__(self, data: Any, processor: Any, indices: list[int]) -> None:
        self.data, self.processor, self.indices = data, processor, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: Tensor | slice) -> Tensor:
        from ..models.data import batches

        chosen = self.indices[index] if isinstance(index, slice) else [self.indices[int(i)] for i in index]
        parts = [pixels for pixels, _ in batches(self.data, self.processor, max(1, len(chosen)), chosen)]
        return torch.cat(parts)


def _logits(features: Tensor, head: Tensor) -> Tensor:
    return features @ head.to(features.device, features.dtype).T


def _hashes(data: Any, indices: list[int], pixels: Pixels) -> dict[str, Any]:
    """SHA-256 of every file used, or of the used images' bytes when they are not files."""
    if data.arrays is None and data.rows is None:
        root = Path(data.source)
        files = [Path(data.items[i][0]) for i in indices]
        return {
            "files": [
                {"path": str(p.relative_to(root) if p.is_relative_to(root) else p), "sha256": sha256_of(p)}
                for p in files
            ]
        }
    digest = hashlib.sha256()
    for start in range(0, len(pixels), 64):
        digest.update(pixels[slice(start, start + 64)].contiguous().numpy().tobytes())
    return {"pixels_sha256": digest.hexdigest()}


def exemplar_images(
    clip: Any, task: str, folder: str, limit: int | None, seed: int
) -> tuple[Tensor, dict[str, Any]]:
    """A task's exemplars, preprocessed, (N, 3, H, W), and the record of what was read."""
    from ..models.data import ImageSet

    root = Path(folder)
    files = image_files(root, task)
    picked = choose(len(files), limit, seed, task, root)
    data = ImageSet([], [(files[i], 0) for i in picked], str(root))
    pixels = Pixels(data, clip.processor, list(range(len(picked))))[slice(None)]
    record = {
        "task": task,
        "source": str(root),
        "available": len(files),
        "used": len(picked),
        "files": [{"path": str(files[i].relative_to(root)), "sha256": sha256_of(files[i])} for i in picked],
    }
    return pixels, record


def test_images(
    clip: Any, task: str, source: str, limit: int | None, seed: int
) -> tuple[Pixels, Tensor, dict[str, Any]]:
    """A task's test-time images (read on demand), its zero-shot head and the record of what was read."""
    from ..models.evaluate import resolve_task
    from ..models.heads import build_head

    if not source.startswith(("hf:", "hf-hub:")) and not Path(source).exists():
        raise WeightWeavingError(f"task '{task}': no such image folder or file", path=source)
    resolved = resolve_task(task, source)
    if len(resolved.data) == 0:
        raise WeightWeavingError(f"task '{task}': no images", path=source)
    indices = choose(len(resolved.data), limit, seed, task, source)
    pixels = Pixels(resolved.data, clip.processor, indices)
    record = {
        "task": task,
        "source": source,
        "available": len(resolved.data),
        "used": len(indices),
        "classes": len(resolved.data.classes),
        **_hashes(resolved.data, indices, pixels),
    }
    head = build_head(clip, resolved.data.classes, resolved.templates)
    return pixels, head, record


def check_options(options: MergeOptions) -> tuple[str, dict[str, str]]:
    """The flag that gives the data and its TASK -> source mapping, or one error."""
    method = options.method
    if method not in METHODS_WITH_DATA:
        given = next(f for f in DATA_FIELDS if getattr(options, f))
        raise OptionError(
            f"{option_flag(given)} is for the methods that use data ({', '.join(METHODS_WITH_DATA)}); "
            f"method '{method}' is data-free"
        )
    field, other = ("exemplars", "tta_data") if method == "exemplar_projection" else ("tta_data", "exemplars")
    sources: dict[str, str] = getattr(options, field)
    if getattr(options, other):
        raise OptionError(
            f"{option_flag(other)} is not used by method '{method}' (it takes {option_flag(field)} TASK=DIR)"
        )
    if not sources:
        raise OptionError(
            f"method '{method}' uses data: give {option_flag(field)} TASK=DIR once per fine-tuned model"
        )
    if len(sources) != len(options.models):
        raise OptionError(
            f"{option_flag(field)}: {len(sources)} task(s) for {len(options.models)} fine-tuned models "
            "(one per model, in --models order)"
        )
    for name in UNSUPPORTED:
        value = getattr(options, name)
        if value not in (None, False, [], {}):
            raise OptionError(f"{option_flag(name)} is not supported by method '{method}' (it uses data)")
    if options.weave is not None and method != "exemplar_projection":
        raise OptionError(
            f"--weave: method '{method}' learns its coefficients; only exemplar_projection weaves"
        )
    if options.lam is not None and (method != "exemplar_projection" or isinstance(options.lam, str)):
        raise OptionError(f"--lambda: method '{method}' takes no λ" if method != "exemplar_projection" else
                          "--lambda: exemplar_projection takes a number")  # fmt: skip
    return field, sources


def run_with_data(options: MergeOptions, *, progress: bool | None = None) -> Path:
    """``weightweaving merge`` for ``exemplar_projection``, ``adamerging`` and ``cart_adamerging``."""
    from ..api import check_output
    from ..models.clip import folder_model_type, load_clip
    from ..models.evaluate import check_device

    field, sources = check_options(options)
    base = Path(options.base)
    if not base.is_dir() or folder_model_type(base) != "clip":
        raise WeightWeavingError(
            "is not a CLIPModel folder: from the command line the methods that use data merge CLIP image "
            "encoders (any other PyTorch model: weightweaving.merge_with_data)",
            path=base,
        )
    check_output(options.out, [options.base, *options.models], options.overwrite)
    limit = options.exemplars_per_task
    if field == "exemplars" and limit is None:
        limit = -DEFAULT_EXEMPLARS  # 5, or all when a task has fewer
    clip = load_clip(base, device=check_device(options.device))
    encoder = ImageEncoder(clip.model)
    inputs: list[Any] = []
    heads: list[Any] = []
    records = []
    for task, source in sources.items():
        if field == "exemplars":
            exemplars, record = exemplar_images(clip, task, source, limit, options.seed)
            inputs.append(exemplars)
        else:
            pixels, head, record = test_images(clip, task, source, limit, options.seed)
            heads.append(partial(_logits, head=head))
            inputs.append(pixels)
        records.append(record)
    log.info("uses data: %s", ", ".join(f"{r['task']} {r['used']}/{r['available']}" for r in records))
    hyperparameters: dict[str, Any] = dict(options.hyperparameters)
    kinds = {"steps": int, "lr": float, "batch_size": int}
    learning = {k: kinds[k](hyperparameters.pop(k)) for k in kinds if k in hyperparameters}
    lam = options.lam if isinstance(options.lam, float | int) else None
    result = merge_loaded(
        str(base),
        options.models,
        options.method,
        model=encoder,
        inputs=inputs,
        records=records,
        heads=heads or None,
        lam=lam,
        out=options.out,
        overwrite=options.overwrite,
        seed=options.seed,
        device=options.device,
        weave=options.weave.model_dump() if options.weave is not None else None,
        progress=progress,
        provenance={
            field: dict(sources),
            "exemplars_per_task": options.exemplars_per_task,
            "model": "CLIP image encoder (normalised image features; zero-shot heads for AdaMerging)",
        },
        **learning,
        **hyperparameters,
    )
    assert isinstance(result, Path)
    return result


def data_paths(values: Mapping[str, Any], base_dir: Path) -> dict[str, Any]:
    """A config's TASK -> path mapping with relative paths made relative to the config's folder."""
    out: dict[str, Any] = {}
    for task, value in values.items():
        text = str(value)
        keep = text.startswith(("hf:", "hf-hub:")) or Path(text).is_absolute()
        out[str(task)] = text if keep else str(base_dir / text)
    return out
