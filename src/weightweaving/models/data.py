"""Labelled images for CLIP evaluation and fine-tuning, read from the layouts people keep them in.

* an image folder: one sub-folder per class (torchvision's ``ImageFolder``, which is how
  task_vectors and FusionBench store SUN397, Cars, RESISC45, EuroSAT, GTSRB and DTD once
  extracted); labels follow the sorted folder names, or the given class list when the folder
  names are its class names;
* a CSV file of ``path,label`` (paths relative to the CSV; the label a class name or an index);
* torchvision's MNIST raw files (``MNIST/raw/t10k-images-idx3-ubyte[.gz]`` and the labels file);
* torchvision's SVHN file ``test_32x32.mat`` (read with scipy, when it is installed);
* Hugging Face ``datasets`` (the ``hf`` extra): ``hf:FOLDER[:SPLIT[:IMAGE_COLUMN:LABEL_COLUMN]]``, a
  folder written by ``save_to_disk`` (read with ``load_from_disk``; nothing is downloaded), and
  ``hf-hub:NAME[:SPLIT[:IMAGE_COLUMN:LABEL_COLUMN]]``, a hub dataset loaded with ``load_dataset`` (which
  may download: only when asked for this way). Columns default to the first ``Image`` feature and
  the first ``ClassLabel`` feature (else a column named ``label`` or ``labels``).

Images are opened one batch at a time; nothing holds a whole dataset in memory (MNIST's raw file
is the exception: 8 MB for the test split).
"""

from __future__ import annotations

import csv
import gzip
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import WeightWeavingError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass
class ImageSet:
    """A list of labelled images: ``items[i] = (where, label)``; ``where`` a path, or an index into ``arrays``."""

    classes: list[str]
    items: list[tuple[Any, int]]
    source: str
    arrays: Tensor | None = None  # (N, H, W) or (N, H, W, 3) uint8 for raw formats
    rows: Any = None  # a Hugging Face dataset holding only the image column (``where`` is the row)

    def __len__(self) -> int:
        return len(self.items)

    def image(self, i: int) -> Any:
        """The i-th image as an RGB PIL image."""
        from PIL import Image, UnidentifiedImageError

        where, _ = self.items[i]
        if self.rows is not None:
            value = self.rows[int(where)][self.rows.column_names[0]]
            if not hasattr(value, "convert"):
                raise WeightWeavingError(f"row {where} does not hold an image", path=self.source)
            return value.convert("RGB")
        if self.arrays is not None:
            return Image.fromarray(self.arrays[where].numpy()).convert("RGB")
        try:
            with Image.open(where) as img:
                return img.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise WeightWeavingError(f"unreadable image: {exc.__class__.__name__}", path=where) from None

    def labels(self) -> Tensor:
        return torch.tensor([label for _, label in self.items], dtype=torch.long)

    def subset(self, indices: Sequence[int]) -> ImageSet:
        return ImageSet(self.classes, [self.items[i] for i in indices], self.source, self.arrays, self.rows)


def open_images(data: str | Path, classes: Sequence[str] | None = None) -> ImageSet:
    """Open ``data`` (an image folder, a CSV of ``path,label``, MNIST/SVHN files, or ``hf:``/``hf-hub:``).

    Args:
        data: where the images are.
        classes: the class names in label order (a built-in dataset's, or ``--classes``); default:
            the folder names (sorted) or the CSV's labels (sorted).

    Returns:
        An :class:`ImageSet`; images are read later, a batch at a time.
    """
    if isinstance(data, str) and data.startswith(("hf:", "hf-hub:")):
        return _from_hf(data, classes)
    path = Path(data)
    if not path.exists():
        raise WeightWeavingError("no such file or folder", path=path)
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise WeightWeavingError("is not an image folder or a .csv of path,label", path=path)
        return _from_csv(path, classes)
    mnist = _mnist_files(path)
    if mnist is not None:
        return _from_mnist(path, *mnist, classes)
    for svhn in (path / "test_32x32.mat", path / "svhn" / "test_32x32.mat"):
        if svhn.is_file():
            return _from_svhn(svhn, classes)
    return _from_folder(path, classes)


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _from_folder(root: Path, classes: Sequence[str] | None) -> ImageSet:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise WeightWeavingError("holds no class sub-folders (one sub-folder of images per class)", path=root)
    names = [f.name for f in folders]
    if classes is None:
        order, classes = list(range(len(folders))), names
    elif set(names) == set(classes):
        order = [list(classes).index(n) for n in names]
    elif len(names) == len(classes):
        order = list(range(len(folders)))  # ImageFolder: the sorted folder index is the label
    else:
        raise WeightWeavingError(
            f"has {len(names)} class folders but {len(classes)} class names are given", path=root
        )
    items: list[tuple[Any, int]] = []
    for folder, label in zip(folders, order, strict=True):
        images = sorted(p for p in folder.rglob("*") if _is_image(p))
        if not images:
            raise WeightWeavingError("is a class folder with no images", path=folder)
        items.extend((p, label) for p in images)
    return ImageSet(list(classes), items, str(root))


def _from_csv(path: Path, classes: Sequence[str] | None) -> ImageSet:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = [row for row in csv.reader(fh) if row and any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise WeightWeavingError(f"unreadable CSV: {exc}", path=path) from None
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
        rows = rows[1:]
    if not rows:
        raise WeightWeavingError("lists no images (expected rows of path,label)", path=path)
    bad = next((i for i, r in enumerate(rows) if len(r) < 2), None)
    if bad is not None:
        raise WeightWeavingError(f"row {bad + 1} is not path,label", path=path)
    labels = [r[1].strip() for r in rows]
    if classes is None:
        classes = sorted(set(labels))
    index = {name: i for i, name in enumerate(classes)}
    items: list[tuple[Any, int]] = []
    for row_number, (row, label) in enumerate(zip(rows, labels, strict=True), start=1):
        if label in index:
            value = index[label]
        elif label.isdigit() and int(label) < len(classes):
            value = int(label)
        else:
            raise WeightWeavingError(
                f"row {row_number}: label '{label}' is not one of the classes", path=path
            )
        image = Path(row[0].strip())
        items.append((image if image.is_absolute() else path.parent / image, value))
    return ImageSet(list(classes), items, str(path))


def _mnist_files(root: Path) -> tuple[Path, Path] | None:
    """torchvision's MNIST raw test files under ``root`` (``MNIST/raw/`` or ``raw/`` or the folder itself)."""
    for folder in (root / "MNIST" / "raw", root / "raw", root):
        for suffix in ("", ".gz"):
            images = folder / f"t10k-images-idx3-ubyte{suffix}"
            labels = folder / f"t10k-labels-idx1-ubyte{suffix}"
            if images.is_file() and labels.is_file():
                return images, labels
    return None


def _read_idx(path: Path, dims: int) -> Tensor:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
        magic, *shape = struct.unpack(f">{1 + dims}I", raw[: 4 * (1 + dims)])
        if magic != 0x800 + dims:
            raise ValueError(f"magic number {magic:#x}")
        body = raw[4 * (1 + dims) :]
        count = 1
        for d in shape:
            count *= d
        if len(body) != count:
            raise ValueError("truncated")
        return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(shape)
    except (OSError, ValueError, struct.error, EOFError) as exc:
        raise WeightWeavingError(f"is not an IDX file: {exc}", path=path) from None


def _from_mnist(root: Path, images: Path, labels: Path, classes: Sequence[str] | None) -> ImageSet:
    pixels, targets = _read_idx(images, 3), _read_idx(labels, 1)
    if len(pixels) != len(targets):
        raise WeightWeavingError("holds a different number of labels than images", path=labels)
    classes = list(classes) if classes is not None else [str(d) for d in range(10)]
    return ImageSet(classes, [(i, int(t)) for i, t in enumerate(targets)], str(root), pixels)


def _from_hf(spec: str, classes: Sequence[str] | None) -> ImageSet:
    """A Hugging Face dataset: ``hf:FOLDER`` (``save_to_disk``) or ``hf-hub:NAME``, then ``[:SPLIT[:IMAGE:LABEL]]``."""
    kind, _, rest = spec.partition(":")
    where, *more = rest.split(":")
    if len(more) not in (0, 1, 3) or not where:
        raise WeightWeavingError(f"'{spec}' is not {kind}:WHERE[:SPLIT[:IMAGE_COLUMN:LABEL_COLUMN]]")
    split = more[0] if more and more[0] else None
    columns = (more[1], more[2]) if len(more) == 3 else None
    try:
        import datasets
    except ImportError:
        raise WeightWeavingError(
            "reading Hugging Face datasets needs the hf extra (pip install 'weightweaving[hf]')", path=where
        ) from None
    if kind == "hf":
        if not Path(where).is_dir():
            raise WeightWeavingError("no such folder (hf: reads a save_to_disk folder)", path=where)
        try:
            loaded: Any = datasets.load_from_disk(where)
        except (FileNotFoundError, ValueError, OSError) as exc:
            raise WeightWeavingError(f"is not a datasets save_to_disk folder: {exc}", path=where) from None
    else:
        loaded = datasets.load_dataset(where, split=split)  # asked for explicitly: may download
        split = None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        chosen = split or ("test" if "test" in splits else (splits[0] if len(splits) == 1 else None))
        if chosen not in splits:
            raise WeightWeavingError(
                f"choose a split: {kind}:{where}:SPLIT, one of {', '.join(splits)}", path=where
            )
        loaded = loaded[chosen]
    elif split is not None and kind == "hf":
        raise WeightWeavingError(f"holds one dataset, not splits ('{split}' was asked for)", path=where)
    features = loaded.features
    if columns is None:
        image = next((n for n, f in features.items() if isinstance(f, datasets.Image)), None)
        label = next((n for n, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
        label = label or next((n for n in ("label", "labels") if n in features), None)
        if image is None or label is None:
            raise WeightWeavingError(
                f"no {'image' if image is None else 'label'} column found among {', '.join(features)}; "
                f"give them: {kind}:{where}:SPLIT:IMAGE_COLUMN:LABEL_COLUMN",
                path=where,
            )
        columns = (image, label)
    missing = [c for c in columns if c not in features]
    if missing:
        raise WeightWeavingError(f"has no column '{missing[0]}' (columns: {', '.join(features)})", path=where)
    image, label = columns
    values = loaded[label]
    feature = features[label]
    if classes is None:
        if isinstance(feature, datasets.ClassLabel):
            classes = list(feature.names)
        elif all(isinstance(v, str) for v in values):
            classes = sorted(set(values))
        else:
            classes = [str(i) for i in range(max(int(v) for v in values) + 1)]
    index = {name: i for i, name in enumerate(classes)}
    items: list[tuple[Any, int]] = []
    for row, value in enumerate(values):
        target = index.get(value) if isinstance(value, str) else int(value)
        if target is None or not 0 <= target < len(classes):
            raise WeightWeavingError(f"row {row}: label '{value}' is not one of the classes", path=where)
        items.append((row, target))
    return ImageSet(list(classes), items, spec, rows=loaded.select_columns([image]))


@dataclass
class _Failure:
    """A user's error met in a loader process, carried back as a value so it stays one line."""

    message: str


class _Batches(torch.utils.data.Dataset[Any]):
    """Batch ``b`` of ``order``: its images read and preprocessed (a unit a loader worker can do)."""

    def __init__(self, data: ImageSet, processor: Any, chunks: list[list[int]]) -> None:
        self.data, self.processor, self.chunks = data, processor, chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, b: int) -> tuple[Tensor, Tensor] | _Failure:
        chunk = self.chunks[b]
        try:
            images = [self.data.image(i) for i in chunk]
        except WeightWeavingError as exc:
            return _Failure(str(exc))
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return pixels, torch.tensor([self.data.items[i][1] for i in chunk], dtype=torch.long)


def _from_svhn(path: Path, classes: Sequence[str] | None) -> ImageSet:
    """torchvision's SVHN: ``X`` (32, 32, 3, N) uint8 and ``y`` (N, 1) with 10 standing for the digit 0."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise WeightWeavingError(
            "reading SVHN's .mat files needs scipy (pip install scipy)", path=path
        ) from None
    try:
        mat = loadmat(str(path), variable_names=["X", "y"])
        pixels = torch.from_numpy(mat["X"]).permute(3, 0, 1, 2).contiguous()  # (N, 32, 32, 3)
        targets = torch.from_numpy(mat["y"].astype("int64")).flatten().remainder(10)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise WeightWeavingError(f"is not torchvision's SVHN file: {exc}", path=path) from None
    if pixels.dtype != torch.uint8 or pixels.dim() != 4 or len(pixels) != len(targets):
        raise WeightWeavingError("is not torchvision's SVHN file (X, y of other shapes)", path=path)
    classes = list(classes) if classes is not None else [str(d) for d in range(10)]
    return ImageSet(classes, [(i, int(t)) for i, t in enumerate(targets)], str(path), pixels)


def batches(
    data: ImageSet,
    processor: Any,
    batch_size: int,
    indices: Sequence[int] | None = None,
    *,
    workers: int = 0,
) -> Iterator[tuple[Tensor, Tensor]]:
    """(pixel_values, labels) for consecutive batches, preprocessed by the model's own image processor.

    ``workers`` > 0 reads and preprocesses in that many loader processes (a few batches ahead).
    """
    order = list(range(len(data))) if indices is None else list(indices)
    chunks = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    dataset = _Batches(data, processor, chunks)
    loader: Any = (
        (dataset[b] for b in range(len(dataset)))
        if workers <= 0
        else torch.utils.data.DataLoader(
            dataset, batch_size=None, shuffle=False, num_workers=workers, prefetch_factor=2
        )
    )
    for batch in loader:
        if isinstance(batch, _Failure):
            raise WeightWeavingError(batch.message)
        yield batch
