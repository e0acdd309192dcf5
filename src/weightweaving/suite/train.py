"""Pre-training, frozen heads, fine-tuning and evaluation of the suite's encoder."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import Split
from .model import VisionTransformer, ViTConfig, build_model, encode, functional_forward, state_dict_of

# images per forward pass in evaluation: small batches keep a block's activations in cache (on one
# core, 64 images a pass took 0.65x the time of 1024 a pass; with both cores busy, 32 a pass took
# 0.86x the time of 64: median of 4, 2,400 images)
EVAL_BATCH = 32
_flush_depth = 0  # open flush_denormals() blocks in this process


@contextmanager
def flush_denormals() -> Iterator[None]:
    """Treat subnormal floats as zero inside the block (restored after).

    With CLIP's logit scale a fitted softmax leaves gradients so small that AdamW's second moments
    fall below 1e-38; arithmetic on such subnormals is slow on CPUs (some 60-step fine-tunes took
    15x longer: 44 s instead of 3 s). Flushing them to zero changes nothing measurable otherwise.
    """
    global _flush_depth
    torch.set_flush_denormal(True)
    _flush_depth += 1
    try:
        yield
    finally:
        _flush_depth -= 1
        if _flush_depth == 0:  # nested blocks leave it on for the enclosing one
            torch.set_flush_denormal(False)


def _encoder(config: ViTConfig, state: dict[str, Tensor]) -> VisionTransformer:
    model = VisionTransformer(config)
    model.load_state_dict(state)
    return model


def _cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pretrain(
    config: ViTConfig,
    pools: dict[str, Tensor],
    *,
    epochs: int,
    lr: float,
    batch: int,
    seed: int,
    contrastive: float = 0.0,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Pre-train on unlabelled images of every domain: predict (domain, rotation by k * 90 degrees).

    With ``contrastive > 0`` an InfoNCE term (SimCLR; two jittered views of each image) is added
    with that weight. No target is a task label; the objective makes the encoder span every
    domain's inputs, the role web-scale (contrastive) pre-training plays for CLIP.
    """
    from tqdm.auto import tqdm

    model = build_model(config, seed)
    images = torch.cat(list(pools.values()))
    domains = torch.cat([torch.full((len(v),), i) for i, v in enumerate(pools.values())])
    n_targets = 4 * len(pools)
    classifier = nn.Linear(config.embed_dim, n_targets)
    params = [*model.parameters(), *classifier.parameters()]
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = max(1, len(images) // batch)
    total = epochs * steps_per_epoch
    bar = tqdm(total=total, desc="pre-train", disable=not progress, leave=False)
    step = 0
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        for b in range(steps_per_epoch):
            index = order[b * batch : (b + 1) * batch]
            rot = torch.randint(0, 4, (len(index),), generator=gen)
            x = images[index].clone()
            for k in range(1, 4):
                x[rot == k] = torch.rot90(x[rot == k], k, dims=(2, 3))
            target = domains[index] * 4 + rot
            for group in optimiser.param_groups:
                group["lr"] = lr * _cosine_lr(step, total, max(1, total // 20))
            if contrastive > 0:
                z = model(torch.cat([_jitter(x, gen), _jitter(x, gen)]))
                z1, z2 = z.chunk(2)
                loss = F.cross_entropy(classifier(z1), target) + contrastive * _info_nce(z1, z2)
            else:
                loss = F.cross_entropy(classifier(model(x)), target)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            optimiser.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return state_dict_of(model)


def _jitter(images: Tensor, gen: torch.Generator) -> Tensor:
    """A random view: shift by up to 3 pixels, brightness x0.8-1.2, Gaussian noise (sigma 0.05)."""
    shifts = torch.randint(-3, 4, (len(images), 2), generator=gen).tolist()
    out = torch.stack(
        [torch.roll(img, (dy, dx), dims=(1, 2)) for img, (dy, dx) in zip(images, shifts, strict=True)]
    )
    gain = 0.8 + 0.4 * torch.rand(len(images), 1, 1, 1, generator=gen)
    return (out * gain + 0.05 * torch.randn(out.shape, generator=gen)).clamp(0, 1)


def _info_nce(a: Tensor, b: Tensor, temperature: float = 0.2) -> Tensor:
    """Symmetric InfoNCE between two views (row i of ``a`` matches row i of ``b``)."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    sim = a @ b.T / temperature
    target = torch.arange(len(a))
    return 0.5 * (F.cross_entropy(sim, target) + F.cross_entropy(sim.T, target))


@torch.inference_mode()
def embed(config: ViTConfig, state: dict[str, Tensor], images: Tensor) -> Tensor:
    """Unit-norm embeddings (n, embed_dim) of the images under the encoder ``state``."""
    weights = {k: v.float() for k, v in state.items()}
    out = [
        F.normalize(encode(config, weights, images[i : i + EVAL_BATCH]), dim=-1)
        for i in range(0, len(images), EVAL_BATCH)
    ]
    return torch.cat(out) if out else torch.empty(0, config.embed_dim)


def prototype_head(
    config: ViTConfig, state: dict[str, Tensor], split: Split, n_classes: int, shots: int
) -> Tensor:
    """A frozen zero-shot-style head: unit-norm class means of ``shots`` labelled images per class.

    CLIP's zero-shot heads are fixed per class before any fine-tuning; these play that role.
    """
    picks = [torch.nonzero(split.labels == c).flatten()[:shots] for c in range(n_classes)]
    features = embed(config, state, split.images[torch.cat(picks)])
    rows, start = [], 0
    for index in picks:
        rows.append(features[start : start + len(index)].mean(0))
        start += len(index)
    return F.normalize(torch.stack(rows), dim=-1)  # (C, embed_dim)


def logits(features: Tensor, head: Tensor, scale: float) -> Tensor:
    return scale * F.normalize(features, dim=-1) @ head.T


def fine_tune(
    config: ViTConfig,
    start: dict[str, Tensor],
    split: Split,
    head: Tensor,
    *,
    classes: Sequence[int] | None = None,
    head_classes: Sequence[int] | None = None,
    steps: int,
    lr: float,
    batch: int,
    weight_decay: float,
    scale: float,
    seed: int,
    optimizer: str = "adamw",
) -> dict[str, Tensor]:
    """Fine-tune the whole encoder from ``start`` with the head frozen (warm-up + cosine decay).

    ``optimizer="sgd"`` (momentum 0.9) moves each weight in proportion to its gradient, so weights a
    task does not use stay put; AdamW moves every weight by about ``lr`` per step.

    ``classes`` restricts the data to those classes (class-incremental tasks), and the head's rows
    to ``head_classes`` (default: the same classes; it must hold them all, e.g. every class seen so far).
    """
    model = _encoder(config, start).train()
    labels = split.labels
    if classes is not None:
        rows = list(head_classes if head_classes is not None else classes)
        if not set(classes) <= set(rows):
            raise ValueError("head_classes must include every class of the data")
        keep = torch.isin(labels, torch.tensor(list(classes)))
        split = split.subset(torch.nonzero(keep).flatten())
        remap = torch.full((head.shape[0],), -1, dtype=torch.long)
        remap[torch.tensor(rows)] = torch.arange(len(rows))
        labels, head = remap[split.labels], head[rows]
    optimiser: torch.optim.Optimizer
    if optimizer == "sgd":
        optimiser = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    else:  # fused: one kernel for every parameter (optimiser step and clipping 2.6 ms instead of 8-10)
        optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    warmup = max(1, steps // 10)
    for step in range(steps):
        index = torch.randint(0, len(labels), (batch,), generator=gen)
        for group in optimiser.param_groups:
            group["lr"] = lr * _cosine_lr(step, steps, warmup)
        features = functional_forward(config, params, split.images[index])
        loss = F.cross_entropy(logits(features, head, scale), labels[index])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
    return state_dict_of(model)


@torch.inference_mode()
def group_accuracies(
    config: ViTConfig, state: dict[str, Tensor], split: Split, head: Tensor, groups: Sequence[Sequence[int]]
) -> list[float]:
    """Top-1 accuracy (percent) on the test images of each class group, with the whole head
    (class-incremental: a group's images may be predicted as any class); one forward pass over the
    images of the groups asked for (only those)."""
    wanted = torch.isin(split.labels, torch.tensor([c for group in groups for c in group], dtype=torch.long))
    labels = split.labels[wanted]
    right = logits(embed(config, state, split.images[wanted]), head, 1.0).argmax(-1) == labels
    out = []
    for group in groups:
        mask = torch.isin(labels, torch.tensor(list(group), dtype=torch.long))
        out.append(100.0 * float(right[mask].float().mean()) if bool(mask.any()) else float("nan"))
    return out


@torch.inference_mode()
def accuracy(config: ViTConfig, state: dict[str, Tensor], split: Split, head: Tensor) -> float:
    """Top-1 accuracy (percent) of encoder ``state`` with a frozen head on ``split``."""
    features = embed(config, state, split.images)
    return 100.0 * float((logits(features, head, 1.0).argmax(-1) == split.labels).float().mean())
