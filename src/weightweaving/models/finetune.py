"""Fine-tune a CLIP image encoder on one task with a frozen zero-shot head: ``weightweaving finetune``.

The recipe of task_vectors' ``src/finetune.py`` (Ilharco et al., ICLR 2023), which the paper-line
checkpoints follow: only the image encoder trains (text tower, projection of the text, logit scale
and the head are frozen); logits are ``normalise(image features) @ head.T``; cross-entropy; AdamW,
lr 1e-5, weight decay 0.1; linear warm-up (500 steps) then cosine decay to 0; batch 128; gradients
clipped to norm 1; epochs per paper dataset as task_vectors sets them. Preprocessing is the model
folder's image processor (task_vectors' training transform is open_clip's, without augmentation
for ViT-B/32 as well). The output is a ``CLIPModel`` folder the merge command reads.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..api import versions
from ..errors import OptionError, WeightWeavingError
from .clip import Clip, is_vision_parameter, load_clip
from .data import batches
from .evaluate import Task, check_device, parse_tasks, task_heads
from .heads import pooled
from .templates import find_paper_dataset

log = logging.getLogger("weightweaving")

#: task_vectors' epochs per dataset (``src/finetune.py``)
PAPER_EPOCHS = {
    "Cars": 35,
    "DTD": 76,
    "EuroSAT": 12,
    "GTSRB": 11,
    "MNIST": 5,
    "RESISC45": 15,
    "SUN397": 14,
    "SVHN": 4,
}


@dataclass
class Recipe:
    """Fine-tuning hyperparameters; every field is a flag of ``weightweaving finetune``."""

    lr: float = 1e-5
    weight_decay: float = 0.1
    batch_size: int = 128
    warmup: int = 500
    steps: int | None = None  # default: epochs x batches per epoch
    epochs: int | None = None  # default: task_vectors' epochs for a paper dataset, else 1
    clip_grad: float = 1.0
    seed: int = 0

    def total_steps(self, task: Task) -> int:
        if self.steps is not None:
            return self.steps
        paper = find_paper_dataset(task.name)
        epochs = self.epochs or (PAPER_EPOCHS.get(paper, 1) if paper else 1)
        return epochs * math.ceil(len(task.data) / self.batch_size)


def cosine_lr(step: int, base_lr: float, warmup: int, steps: int) -> float:
    """task_vectors' schedule: linear warm-up over ``warmup`` steps, then half a cosine to 0.

    Example:
        >>> [round(cosine_lr(s, 1.0, 2, 6), 3) for s in range(6)]
        [0.5, 1.0, 1.0, 0.854, 0.5, 0.146]
    """
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))) * base_lr


def finetune_clip(
    clip: Clip, task: Task, head: torch.Tensor, recipe: Recipe, *, progress: bool = False, workers: int = 0
) -> list[float]:
    """Train ``clip``'s image encoder in place; returns the loss of each step."""
    steps = recipe.total_steps(task)
    if steps < 1:
        raise OptionError("--steps must be at least 1")
    model = clip.model
    device = next(model.parameters()).device
    trained = []
    for name, param in model.named_parameters():
        param.requires_grad_(is_vision_parameter(name))
        if param.requires_grad:
            trained.append(param)
    optimizer = torch.optim.AdamW(trained, lr=recipe.lr, weight_decay=recipe.weight_decay)
    head = head.to(device)
    gen = torch.Generator().manual_seed(recipe.seed)
    losses: list[float] = []
    model.train()
    with tqdm(total=steps, desc=f"fine-tune {task.name}", disable=not progress, leave=False) as bar:
        while len(losses) < steps:
            order = torch.randperm(len(task.data), generator=gen).tolist()
            for pixels, labels in batches(
                task.data, clip.processor, recipe.batch_size, order, workers=workers
            ):
                if len(losses) == steps:
                    break
                for group in optimizer.param_groups:
                    group["lr"] = cosine_lr(len(losses), recipe.lr, recipe.warmup, steps)
                features = pooled(model.get_image_features(pixel_values=pixels.to(device)))
                logits = (features / features.norm(dim=-1, keepdim=True)) @ head.T
                loss = torch.nn.functional.cross_entropy(logits, labels.to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trained, recipe.clip_grad)
                optimizer.step()
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    for param in model.parameters():
        param.requires_grad_(True)
    return losses


def save_clip(clip: Clip, out: str | Path, record: dict[str, object], *, overwrite: bool = False) -> Path:
    """Write ``clip`` as a CLIPModel folder (weights, config, processor, tokenizer, the record), atomically."""
    target = Path(out)
    if target.exists() and not overwrite:
        raise WeightWeavingError("the output folder exists; pass --overwrite to replace it", path=target)
    staging = target.with_name(f".{target.name}.partial")
    if staging.exists():
        shutil.rmtree(staging)
    clip.model.save_pretrained(str(staging))
    clip.processor.save_pretrained(str(staging))
    if clip.tokenizer is not None:
        clip.tokenizer.save_pretrained(str(staging))
    (staging / "weightweaving_finetune.json").write_text(json.dumps(record, indent=1))
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return target


def run_finetune(
    *,
    model: str,
    task: str,
    out: str,
    base: str | None = None,
    classes: tuple[str, ...] | list[str] = (),
    templates: tuple[str, ...] | list[str] = (),
    device: str = "cpu",
    cache_dir: str | None = None,
    recipe: Recipe | None = None,
    overwrite: bool = False,
    workers: int = 0,
    progress: bool | None = None,
) -> Path:
    """``weightweaving finetune``: one task's fine-tune of ``model``'s image encoder, written to ``out``."""
    recipe = recipe or Recipe()
    show = sys.stderr.isatty() if progress is None else progress
    (parsed,) = parse_tasks([task], classes, templates, default_split="train")
    if Path(out).exists() and not overwrite:
        raise WeightWeavingError("the output folder exists; pass --overwrite to replace it", path=out)
    torch.manual_seed(recipe.seed)
    clip = load_clip(model, base=base, device=check_device(device))
    head = task_heads(clip, [parsed], cache_dir)[parsed.name]
    losses = finetune_clip(clip, parsed, head, recipe, progress=show, workers=workers)
    record: dict[str, object] = {
        "operation": "finetune",
        "model": str(model),
        "base": base,
        "task": parsed.name,
        "data": parsed.data.source,
        "classes": parsed.data.classes,
        "templates": parsed.templates,
        "recipe": {**asdict(recipe), "steps": len(losses)},
        "loss_first_last": [losses[0], losses[-1]],
        "versions": versions(),
    }
    folder = save_clip(clip, out, record, overwrite=overwrite)
    print(
        f"fine-tuned {parsed.name} for {len(losses)} steps (loss {losses[0]:.3f} -> {losses[-1]:.3f}); wrote {folder}"
    )
    return folder
