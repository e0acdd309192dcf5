"""Labelled images for CLIP evaluation and fine-tuning, read from the layouts people keep them in.

* an image folder: one sub-folder per class (torchvision's ``ImageFolder``); labels follow the
  given class names where the folders are named after them, else the sorted folder index;
* a CSV file of ``path,label`` (paths relative to the CSV; the label a class name or an index);
* the on-disk layouts of the eight paper datasets, torchvision's (Stanford Cars, GTSRB, DTD,
  SUN397, EuroSAT, MNIST, SVHN), task_vectors' RESISC45 and its ``{train,val,test}/`` split folders
  (:mod:`.layouts`), a split chosen as ``DATA:SPLIT`` (default: ``test`` to evaluate, ``train`` to
  fine-tune);
* Hugging Face ``datasets`` (the ``hf`` extra): ``hf:FOLDER[:SPLIT[:IMAGE_COLUMN:LABEL_COLUMN]]``, a
  folder written by ``save_to_disk`` (read with ``load_from_disk``; nothing is downloaded), and
  ``hf-hub:NAME[:SPLIT[:IMAGE_COLUMN:LABEL_COLUMN]]``, a hub dataset loaded with ``load_dataset`` (which
  may download: only when asked for this way). Columns default to the first ``Image`` feature and
  the first ``ClassLabel`` feature (else a column named ``label`` or ``labels``).

Images are opened one batch at a time; nothing holds a whole dataset in memory (MNIST's and SVHN's
files hold pixels and are read whole: 8 MB and 60 MB for the test splits).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import WeightWeavingError
from .layouts import LAYOUTS, SPLIT, Listing, class_folders, labelled, locate


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


def split_of(data: str | Path) -> tuple[str, str | None]:
    """``DATA:SPLIT`` -> (DATA, SPLIT) where DATA exists and SPLIT is one (``test``, ``train3``); else (data, None)."""
    text = str(data)
    head, sep, tail = text.rpartition(":")
    if sep and head and SPLIT.match(tail) and not Path(text).exists():
        return head, tail
    return text, None


def open_images(
    data: str | Path,
    classes: Sequence[str] | None = None,
    *,
    dataset: str | None = None,
    default_split: str = "test",
) -> ImageSet:
    """Open ``data``: an image folder, a CSV of ``path,label``, a paper dataset's layout, or ``hf:``/``hf-hub:``.

    Args:
        data: where the images are; ``DATA:SPLIT`` picks a split of a layout that has splits.
        classes: the class names in label order (a built-in dataset's, or ``--classes``); default:
            the folder names (sorted), the CSV's labels (sorted) or the dataset's own class names.
        dataset: the paper dataset the task is (its sub-folder is looked for under a data root
            holding several).
        default_split: the split when none is asked for (``test``; ``train`` to fine-tune).

    Returns:
        An :class:`ImageSet`; images are read later, a batch at a time.
    """
    if isinstance(data, str) and data.startswith(("hf:", "hf-hub:")):
        return _from_hf(data, classes, default_split)
    where, split = split_of(data)
    path = Path(where)
    if not path.exists():
        raise WeightWeavingError("no such file or folder", path=path)
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise WeightWeavingError("is not an image folder or a .csv of path,label", path=path)
        if split is not None:
            raise WeightWeavingError(f"a CSV has no splits (':{split}' was asked for)", path=path)
        return _from_csv(path, classes)
    found = locate(path, dataset)
    if found is None:
        if split is not None:
            layouts = ", ".join(sorted({lay.dataset for lay in LAYOUTS if lay.dataset}))
            raise WeightWeavingError(
                f"is an image folder without splits (':{split}' applies to the layouts of {layouts})",
                path=path,
            )
        listing: Listing = class_folders(path)
    else:
        layout, base = found
        listing = layout.read(base, split or default_split, split is not None)
    names, items = labelled(listing, classes)
    return ImageSet(names, items, listing.source, listing.arrays)


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


def _from_hf(spec: str, classes: Sequence[str] | None, default_split: str = "test") -> ImageSet:
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
        chosen = split or (
            default_split if default_split in splits else (splits[0] if len(splits) == 1 else None)
        )
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
