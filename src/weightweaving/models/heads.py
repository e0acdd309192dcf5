"""Zero-shot classification heads from CLIP's text encoder (Radford et al., 2021; task_vectors' recipe).

For each class, every template filled with the class name goes through the text encoder; the
embeddings are normalised, averaged and normalised again; the rows are scaled by the model's
``logit_scale.exp()``. The head is frozen: logits are ``normalise(image features) @ head.T``.
Heads are cached as safetensors keyed by the text side's hash, the classes and the templates.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..errors import WeightWeavingError
from .clip import Clip, is_vision_parameter
from .templates import fill

log = logging.getLogger("weightweaving")


def pooled(output: object) -> Tensor:
    """Features from ``get_text_features``/``get_image_features`` (a tensor, or an output's pooler)."""
    return output if isinstance(output, Tensor) else output.pooler_output  # type: ignore[attr-defined]


@torch.no_grad()
def build_head(clip: Clip, classes: Sequence[str], templates: Sequence[str]) -> Tensor:
    """The (classes, embed) zero-shot head, on the CPU in float32 (``tests/models/test_evaluate.py``
    checks it against a computation with transformers alone)."""
    if clip.tokenizer is None:
        raise WeightWeavingError(
            "has no tokenizer to build zero-shot heads with", path=clip.base or clip.source
        )
    model = clip.model
    device = next(model.parameters()).device
    rows = []
    for name in classes:
        texts = [fill(t, name) for t in templates]
        tokens = clip.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(device)
        embeddings = pooled(model.get_text_features(**tokens)).float()  # (templates, embed)
        embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
        mean = embeddings.mean(0)
        rows.append(mean / mean.norm())
    return (torch.stack(rows) * model.logit_scale.exp().float()).cpu()


def text_side_hash(clip: Clip) -> str:
    """sha256 of every tensor a head depends on (the text tower, its projection, the logit scale)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(clip.model.state_dict().items()):
        if is_vision_parameter(name) or name.endswith("position_ids"):
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()


def head_key(model_hash: str, classes: Sequence[str], templates: Sequence[str]) -> str:
    payload = json.dumps({"model": model_hash, "classes": list(classes), "templates": list(templates)})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cached_head(
    clip: Clip,
    classes: Sequence[str],
    templates: Sequence[str],
    *,
    cache_dir: str | Path | None,
    task: str,
    model_hash: str | None = None,
) -> Tensor:
    """The head from ``cache_dir`` when cached for this model, classes and templates; built and cached otherwise."""
    if cache_dir is None:
        return build_head(clip, classes, templates)
    model_hash = model_hash or text_side_hash(clip)
    safe_task = "".join(c if c.isalnum() or c in "-_" else "_" for c in task)
    path = Path(cache_dir) / f"head-{safe_task}-{head_key(model_hash, classes, templates)}.safetensors"
    if path.is_file():
        return load_head(path, classes, templates, model_hash)
    head = build_head(clip, classes, templates)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".partial")
    meta = {
        "classes": json.dumps(list(classes)),
        "templates": json.dumps(list(templates)),
        "model": model_hash,
    }
    save_file({"head": head.contiguous()}, str(staging), metadata=meta)
    staging.replace(path)
    log.info("cached the head of %s in %s", task, path)
    return head


def load_head(path: Path, classes: Sequence[str], templates: Sequence[str], model_hash: str) -> Tensor:
    """A cached head, refused when it was made for other classes, templates or another text encoder."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            head = fh.get_tensor("head")
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise WeightWeavingError(f"unreadable cached head: {exc}", path=path) from None
    if json.loads(meta.get("classes", "null")) != list(classes):
        raise WeightWeavingError("is a head cached for other classes; delete it to rebuild it", path=path)
    if json.loads(meta.get("templates", "null")) != list(templates):
        raise WeightWeavingError("is a head cached for other templates; delete it to rebuild it", path=path)
    if meta.get("model") != model_hash:
        raise WeightWeavingError(
            "is a head cached for another text encoder; delete it to rebuild it", path=path
        )
    return head
