"""The suite's data, all offline: Fashion-MNIST (Debian), scikit-learn's digits, procedural tasks.

Every image is 3 x 28 x 28, float32 in [0, 1]. Each of the eight domains is drawn in its own colours
(like the paper's eight datasets, which differ visibly from each other). Everything is deterministic
from the seed: the same seed gives the same tensors.
"""

from __future__ import annotations

import gzip
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import WeightWeavingError

SIZE = 28
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = [
    "tshirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "boot",
]

# Foreground and background colour of each domain (RGB in [0, 1]).
PALETTES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "fashion": ((1.0, 1.0, 1.0), (0.0, 0.0, 0.0)),
    "digits": ((0.2, 1.0, 0.3), (0.05, 0.0, 0.15)),
    "shapes": ((1.0, 0.85, 0.1), (0.1, 0.1, 0.45)),
    "stripe_angle": ((1.0, 0.3, 0.2), (0.0, 0.25, 0.25)),
    "stripe_freq": ((0.3, 0.6, 1.0), (0.3, 0.15, 0.0)),
    "dot_count": ((0.05, 0.05, 0.05), (0.95, 0.9, 0.75)),
    "blob_position": ((1.0, 0.2, 0.9), (0.1, 0.3, 0.05)),
    "noise_spectrum": ((0.6, 1.0, 1.0), (0.35, 0.0, 0.1)),
}
TASK_NAMES = list(PALETTES)


@dataclass(frozen=True)
class Split:
    """Images (n, 3, 28, 28) and integer labels (n,)."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: Tensor) -> Split:
        return Split(self.images[index], self.labels[index])


@dataclass(frozen=True)
class Task:
    """A classification task: train and test splits and its class names."""

    name: str
    classes: list[str]
    train: Split
    test: Split

    @property
    def n_classes(self) -> int:
        return len(self.classes)


# -- loading real data --------------------------------------------------------------------------


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion(root: Path = FASHION_DIR) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fashion-MNIST as (train images, train labels, test images, test labels), images in [0, 1]."""
    names = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    names += ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    missing = [n for n in names if not (root / n).exists()]
    if missing:
        raise WeightWeavingError(
            f"Fashion-MNIST not found in {root} (missing {missing[0]}); "
            "install it with: apt-get install -y dataset-fashion-mnist"
        )
    xtr, ytr, xte, yte = (_read_idx(root / n) for n in names)
    return (
        xtr.astype(np.float32) / 255,
        ytr.astype(np.int64),
        xte.astype(np.float32) / 255,
        yte.astype(np.int64),
    )


def load_digits_28() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits, upsampled to 24x24 and centred on 28x28, in [0, 1]."""
    table = _digits_table()
    images, target = table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)
    small = torch.from_numpy(images.astype(np.float32) / 16.0)[:, None]
    big = torch.nn.functional.interpolate(small, size=(24, 24), mode="bilinear", align_corners=False)
    out = torch.zeros(len(small), SIZE, SIZE)
    out[:, 2:26, 2:26] = big[:, 0].clamp(0, 1)
    return out.numpy(), target.astype(np.int64)


def _digits_table() -> np.ndarray:
    """The table ``sklearn.datasets.load_digits`` reads (8x8 pixels, then the label, per row), read
    from the file scikit-learn ships without importing scikit-learn (4 s of a run's serial start)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    found = [Path(f) / "datasets" / "data" / "digits.csv.gz" for f in folders]
    found = [f for f in found if f.is_file()]
    if not found:
        raise WeightWeavingError(
            "scikit-learn's digits data not found; install the suite's dependencies: pip install -e '.[suite]'"
        )
    return np.loadtxt(found[0], delimiter=",")


# -- procedural generators: each draws n grey images (n, 28, 28) in [0, 1] and labels ------------

_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)


def _shape_mask(kind: int, cx: float, cy: float, r: float, turn: float) -> np.ndarray:
    dx, dy = _XX - cx, _YY - cy
    c, s = math.cos(turn), math.sin(turn)
    u, v = c * dx + s * dy, -s * dx + c * dy
    dist = np.hypot(dx, dy)
    if kind == 0:  # disc
        return dist <= r
    if kind == 1:  # square
        return (np.abs(u) <= r * 0.8) & (np.abs(v) <= r * 0.8)
    if kind == 2:  # triangle
        return (v <= r * 0.6) & (v >= -r + 1.8 * np.abs(u))
    if kind == 3:  # cross
        return ((np.abs(u) <= r * 0.3) & (np.abs(v) <= r)) | ((np.abs(v) <= r * 0.3) & (np.abs(u) <= r))
    if kind == 4:  # ring
        return (dist <= r) & (dist >= r * 0.55)
    return np.abs(u) + np.abs(v) <= r  # diamond


def gen_shapes(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, 6, n)
    out = np.zeros((n, SIZE, SIZE), np.float32)
    for i, kind in enumerate(labels):
        r = rng.uniform(5, 9)
        cx, cy = rng.uniform(r + 1, SIZE - r - 1, 2)
        out[i] = _shape_mask(int(kind), cx, cy, r, rng.uniform(0, math.pi / 8))
    return out, labels


def _grating(rng: np.random.Generator, angle: float, freq: float) -> np.ndarray:
    phase = rng.uniform(0, 2 * math.pi)
    wave = np.sin(2 * math.pi * freq * (math.cos(angle) * _XX + math.sin(angle) * _YY) / SIZE + phase)
    return 0.5 + 0.5 * wave * rng.uniform(0.6, 1.0)


def gen_stripe_angle(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, 8, n)
    out = np.stack(
        [_grating(rng, k * math.pi / 8 + rng.normal(0, 0.04), rng.uniform(2.5, 5)) for k in labels]
    )
    return out.astype(np.float32), labels


def gen_stripe_freq(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    freqs = [1.5, 2.5, 3.5, 5.0, 6.5, 8.5]
    labels = rng.integers(0, len(freqs), n)
    out = np.stack(
        [_grating(rng, rng.uniform(0, math.pi), freqs[k] * rng.uniform(0.95, 1.05)) for k in labels]
    )
    return out.astype(np.float32), labels


def gen_dot_count(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, 8, n)
    out = np.zeros((n, SIZE, SIZE), np.float32)
    for i, k in enumerate(labels):
        centres: list[tuple[float, float]] = []
        while len(centres) < k + 1:
            c = rng.uniform(3, SIZE - 3, 2)
            if all(math.hypot(c[0] - a, c[1] - b) > 5 for a, b in centres):
                centres.append((float(c[0]), float(c[1])))
        for cx, cy in centres:
            out[i] = np.maximum(out[i], np.hypot(_XX - cx, _YY - cy) <= 1.8)
    return out, labels


def gen_blob_position(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, 9, n)
    out = np.zeros((n, SIZE, SIZE), np.float32)
    for i, k in enumerate(labels):
        cx = 5 + 9 * (k % 3) + rng.uniform(-2, 2)
        cy = 5 + 9 * (k // 3) + rng.uniform(-2, 2)
        blob = np.exp(-((_XX - cx) ** 2 + (_YY - cy) ** 2) / (2 * rng.uniform(2, 3.5) ** 2))
        out[i] = np.clip(blob + rng.normal(0, 0.12, (SIZE, SIZE)), 0, 1)
    return out, labels


def gen_noise_spectrum(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    slopes = [0.0, 1.0, 2.0, 3.0, 4.0]
    labels = rng.integers(0, len(slopes), n)
    fy, fx = np.meshgrid(np.fft.fftfreq(SIZE), np.fft.fftfreq(SIZE), indexing="ij")
    radius = np.maximum(np.hypot(fx, fy), 1.0 / SIZE)
    out = np.zeros((n, SIZE, SIZE), np.float32)
    for i, k in enumerate(labels):
        spectrum = np.fft.fft2(rng.normal(size=(SIZE, SIZE))) / radius ** (slopes[k] / 2)
        img = np.real(np.fft.ifft2(spectrum))
        img = (img - img.mean()) / (img.std() + 1e-8)
        out[i] = np.clip(0.5 + 0.2 * img, 0, 1)
    return out, labels


GENERATORS: dict[
    str, tuple[Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]], list[str]]
] = {
    "shapes": (gen_shapes, ["disc", "square", "triangle", "cross", "ring", "diamond"]),
    "stripe_angle": (gen_stripe_angle, [f"{round(22.5 * k, 1)}deg" for k in range(8)]),
    "stripe_freq": (gen_stripe_freq, ["f1.5", "f2.5", "f3.5", "f5", "f6.5", "f8.5"]),
    "dot_count": (gen_dot_count, [str(k) for k in range(1, 9)]),
    "blob_position": (gen_blob_position, [f"cell{k}" for k in range(9)]),
    "noise_spectrum": (gen_noise_spectrum, ["white", "pink", "brown", "slope3", "slope4"]),
}


def colourise(grey: np.ndarray, domain: str) -> Tensor:
    """Grey images (n, 28, 28) -> colour images (n, 3, 28, 28) in the domain's palette."""
    fg, bg = (torch.tensor(c, dtype=torch.float32).view(1, 3, 1, 1) for c in PALETTES[domain])
    g = torch.from_numpy(np.ascontiguousarray(grey, dtype=np.float32))[:, None]
    return g * fg + (1 - g) * bg


def _rng(seed: int, *salt: str) -> np.random.Generator:
    return np.random.default_rng(
        [seed, *(sum(ord(ch) * 31**i for i, ch in enumerate(s)) % 2**31 for s in salt)]
    )


# -- the pools the suite draws from --------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """How many images each part of the suite uses."""

    train: int = 2000  # per task, for fine-tuning
    test: int = 400  # per task, for evaluation
    pretrain: int = 4000  # per domain, unlabelled, for pre-training


def _domain_pool(
    domain: str, seed: int, sizes: Sizes
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Grey (train, train labels, test, test labels) for one domain (train includes the pre-train pool)."""
    n_train = sizes.train + sizes.pretrain
    if domain == "fashion":
        xtr, ytr, xte, yte = load_fashion()
        rng = _rng(seed, "fashion-split")
        tr, te = rng.permutation(len(ytr))[:n_train], rng.permutation(len(yte))[: sizes.test]
        return xtr[tr], ytr[tr], xte[te], yte[te]
    if domain == "digits":
        x, y = load_digits_28()
        # One fixed test split for every seed (seed 0's): the shipped encoder saw the other
        # images unlabelled, and must never have seen a test image whatever the seed.
        order = _rng(0, "digits-split").permutation(len(y))
        test, train = order[: sizes.test], order[sizes.test :]
        if seed:  # other seeds shuffle the training images (seed 0's order made the encoder)
            train = train[_rng(seed, "digits-order").permutation(len(train))]
        return x[train], y[train], x[test], y[test]
    gen = GENERATORS[domain][0]
    xtr, ytr = gen(_rng(seed, domain, "train"), n_train)
    xte, yte = gen(_rng(seed, domain, "test"), sizes.test)
    return xtr, ytr, xte, yte


def build_tasks(
    seed: int, sizes: Sizes, names: list[str] | None = None, pools: bool = True, workers: int = 1
) -> tuple[list[Task], dict[str, Tensor]]:
    """The eight tasks, plus each domain's unlabelled pre-training images (disjoint from the tasks').

    ``pools=False`` leaves the pre-training images out (``{}``); the tasks are the same.

    Digits has only 1,797 images, so its pre-training images are its own training images without
    labels (as CLIP saw much of the web without the downstream labels); its test images are the
    same for every seed and never among them. ``workers``: processes drawing the domains' images
    (each domain has its own random stream, so the images do not depend on it).
    """
    from .parallel import fork_map

    tasks, pretrain = [], {}
    wanted = list(names or TASK_NAMES)
    drawn = fork_map(lambda i: _domain_pool(wanted[i], seed, sizes), len(wanted), workers)
    for name, (xtr, ytr, xte, yte) in zip(wanted, drawn, strict=True):
        if name == "digits":
            n_ft = min(sizes.train, len(ytr))
            ft, pre = slice(0, n_ft), slice(0, len(ytr))
        else:
            ft, pre = slice(0, sizes.train), slice(sizes.train, sizes.train + sizes.pretrain)
        classes = FASHION_CLASSES if name == "fashion" else [str(d) for d in range(10)]
        if name in GENERATORS:
            classes = GENERATORS[name][1]
        train = Split(colourise(xtr[ft], name), torch.from_numpy(ytr[ft]))
        test = Split(colourise(xte, name), torch.from_numpy(yte))
        tasks.append(Task(name, list(classes), train, test))
        if pools:
            pretrain[name] = colourise(xtr[pre][: sizes.pretrain], name)
    return tasks, pretrain


@dataclass(frozen=True)
class Benchmark:
    """A class-incremental benchmark: the union of some domains' classes, optionally over clutter."""

    domains: tuple[str, ...]
    clutter: float = 0.0  # contrast of the background clutter (0: none; see ``cluttered``)


# The suite's class-incremental benchmarks by name (``Recipe.cl_benchmarks``).
CL_BENCHMARKS: dict[str, Benchmark] = {
    "fashion+digits": Benchmark(("fashion", "digits")),
    "fashion+digits/clutter": Benchmark(("fashion", "digits"), clutter=0.5),
}


def cluttered(task: Task, seed: int, contrast: float = 1.0) -> Task:
    """The task's objects drawn over clutter: each image's background (where the domain's grey image
    is 0) becomes a random two-colour grating (angle, frequency, phase and colours drawn per image,
    seeded). The encoder was pre-trained on the plain domains only: a weaker zero-shot start, with a
    skill every class shares (seeing past the clutter) for fine-tuning to learn, as CLIP fine-tuned
    on a dataset learns its imaging conditions. ``contrast`` blends the clutter over the domain's
    background colour (1: clutter only)."""
    fg, bg = (torch.tensor(c, dtype=torch.float32).view(1, 3, 1, 1) for c in PALETTES[task.name])
    channel = int(torch.argmax((fg - bg).abs().flatten()))
    yy, xx = torch.meshgrid(
        torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32), indexing="ij"
    )

    def draw(split: Split, part: str) -> Split:
        x = split.images
        grey = (
            (x[:, channel : channel + 1] - bg[:, channel : channel + 1]) / (fg - bg)[:, channel : channel + 1]
        ).clamp(0, 1)
        gen = torch.Generator().manual_seed(int(_rng(seed, task.name, "clutter", part).integers(2**62)))
        n = len(x)
        angle = torch.rand(n, 1, 1, generator=gen) * math.pi
        freq = 2 + 4 * torch.rand(n, 1, 1, generator=gen)
        phase = torch.rand(n, 1, 1, generator=gen) * 2 * math.pi
        wave = 0.5 + 0.5 * torch.sin(
            2 * math.pi * freq * (torch.cos(angle) * xx + torch.sin(angle) * yy) / SIZE + phase
        )
        one, two = torch.rand(n, 3, 1, 1, generator=gen), torch.rand(n, 3, 1, 1, generator=gen)
        texture = one * wave[:, None] + two * (1 - wave[:, None])
        background = (1 - contrast) * bg + contrast * texture
        return Split(grey * fg + (1 - grey) * background, split.labels)

    return Task(task.name, task.classes, draw(task.train, "train"), draw(task.test, "test"))


def continual_dataset(
    tasks: list[Task], names: Sequence[str] = ("fashion", "digits"), clutter: float = 0.0, seed: int = 0
) -> Task:
    """The named domains' classes as one class-incremental dataset (classes numbered domain by domain;
    the default, fashion+digits, has 20: 0-9 fashion, 10-19 digits); ``clutter`` > 0: over clutter of
    that contrast (:func:`cluttered`, seeded), named ``<names>/clutter``."""
    by_name = {t.name: t for t in tasks}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise WeightWeavingError(f"continual benchmark needs tasks not in the profile: {', '.join(missing)}")
    parts = [cluttered(by_name[n], seed, clutter) if clutter else by_name[n] for n in names]
    offsets = [sum(p.n_classes for p in parts[:i]) for i in range(len(parts))]

    def join(splits: list[Split]) -> Split:
        return Split(
            torch.cat([s.images for s in splits]),
            torch.cat([s.labels + o for s, o in zip(splits, offsets, strict=True)]),
        )

    prefix = {"digits": "digit"}
    classes = [f"{prefix.get(p.name, p.name)}:{c}" for p in parts for c in p.classes]
    name = "+".join(names) + ("/clutter" if clutter else "")
    return Task(name, classes, join([p.train for p in parts]), join([p.test for p in parts]))


def class_incremental_splits(n_classes: int, n_tasks: int, seed: int) -> list[list[int]]:
    """A seeded class order cut into ``n_tasks`` class-disjoint groups of equal size (sizes differ by
    at most one class where ``n_tasks`` does not divide ``n_classes``, as for the paper's Cars)."""
    if not 1 <= n_tasks <= n_classes:
        raise WeightWeavingError(f"{n_classes} classes cannot be split into {n_tasks} tasks")
    order = _rng(seed, f"classes{n_tasks}").permutation(n_classes).tolist()
    bounds = [round(i * n_classes / n_tasks) for i in range(n_tasks + 1)]
    return [sorted(order[bounds[i] : bounds[i + 1]]) for i in range(n_tasks)]
