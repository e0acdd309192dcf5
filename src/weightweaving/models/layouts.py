"""The on-disk layouts of the eight paper datasets: torchvision's and the paper-line codebases'.

A layout knows where its files lie under a data root and lists one split's images with the
dataset's own class names, in the dataset's own label order (:class:`Listing`);
:func:`labelled` then gives each image the index of its class in the head's class list. The
layouts were read from torchvision's dataset classes and from task_vectors' ``src/datasets``;
nothing here imports either.

=========  ===========================================================  ==========================
dataset    files under ROOT (or ROOT/<sub-folder> in brackets)          splits (default first)
=========  ===========================================================  ==========================
Cars       [stanford_cars/] devkit/cars_meta.mat, devkit/               test, train
           cars_train_annos.mat, cars_train/, cars_test/,
           cars_test_annos_withlabels.mat (scipy reads the .mat files)
GTSRB      [gtsrb/] GTSRB/Training/<class>/*.ppm;                       test, train
           GTSRB/Final_Test/Images/*.ppm with GT-final_test.csv
DTD        [dtd/dtd/] images/<class>/*.jpg, labels/{train,val,test}N.txt  test, train, val, all
SUN397     [SUN397/] ClassName.txt, <l>/<class>/sun_*.jpg; Training_NN /  test, train, all (no
           Testing_NN.txt beside it or under Partitions/                  partition files: all)
EuroSAT    [eurosat/] 2750/<class>/*.jpg                                all
RESISC45   [resisc45/] NWPU-RESISC45/<class>/*.jpg,                     test, train, val, all (no
           resisc45-{train,val,test}.txt (task_vectors, from torchgeo)    split files: all)
MNIST      [MNIST/raw/ or raw/] {t10k,train}-{images-idx3,labels-idx1}  test, train
           -ubyte[.gz]
SVHN       [svhn/] {test,train,extra}_32x32.mat                         test, train, extra
any        {train,val,test}/<class>/* (task_vectors' sun397/, dtd/,     test (val/ when there is
           EuroSAT_splits/ folders)                                      no test/), train, val
=========  ===========================================================  ==========================

A split is asked for as ``DATA:SPLIT``; DTD's and SUN397's other partitions as ``test3``,
``train10``. A task named after a paper dataset looks for that dataset's sub-folder, so one data
root holding all eight serves every task.
"""

from __future__ import annotations

import csv
import gzip
import logging
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import WeightWeavingError
from .templates import folder_aliases

log = logging.getLogger("weightweaving")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

#: ``train``, ``val``, ``test``, ``all``, ``extra``, optionally with a partition number (``test3``)
SPLIT = re.compile(r"^(train|val|test|all|extra)(\d{0,2})$")


@dataclass
class Listing:
    """One split's images: ``items[i] = (path or row of arrays, index into names)``."""

    names: list[str]  # the dataset's own class names, in its own label order
    items: list[tuple[Any, int]]
    source: str
    arrays: Tensor | None = None  # (N, H, W) or (N, H, W, 3) uint8 for formats that hold pixels
    kind: str = "classes"  # what ``names`` are, in messages


@dataclass(frozen=True)
class Layout:
    """Where a dataset's files lie and how one split of them is listed."""

    name: str
    dataset: str | None  # the paper dataset it holds; None: any
    folders: tuple[str, ...]  # sub-folders of a data root where the layout may start
    marker: Callable[[Path], bool]  # does ``base`` hold this layout?
    read: Callable[[Path, str, bool], Listing]  # (base, split, was the split asked for)
    at_root: bool = True  # the data root itself may be the layout's base


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def class_folders(root: Path, what: str = "holds no class sub-folders") -> Listing:
    """torchvision's ``ImageFolder``: one sub-folder per class (sorted), images found recursively."""
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise WeightWeavingError(f"{what} (one sub-folder of images per class)", path=root)
    items: list[tuple[Any, int]] = []
    for label, folder in enumerate(folders):
        images = sorted(p for p in folder.rglob("*") if is_image(p))
        if not images:
            raise WeightWeavingError("is a class folder with no images", path=folder)
        items.extend((p, label) for p in images)
    return Listing([f.name for f in folders], items, str(root), kind="class folders")


# -- from the dataset's class names to the head's ------------------------------------------------


def _key(name: str) -> str:
    """A class name compared loosely: lower case, ``_`` and ``/`` as spaces."""
    return " ".join(re.split(r"[\s_/]+", name.strip().lower())).strip()


def _by_name(names: Sequence[str], classes: Sequence[str]) -> list[int] | None:
    """Each name's class index when every name is one of ``classes`` (loosely, or by torchvision's folder name)."""
    keys: dict[str, int] = {}
    for i, c in enumerate(classes):
        if keys.setdefault(_key(c), i) != i:
            return None  # two classes alike: names cannot tell them apart
    aliases = folder_aliases()
    out = []
    for name in names:
        candidates = (name, aliases.get(name, ""), name[2:] if re.match(r"^[a-z]_", name) else "")
        hit = next((keys[_key(c)] for c in candidates if c and _key(c) in keys), None)
        if hit is None:
            return None
        out.append(hit)
    return out if len(set(out)) == len(out) else None


def labelled(listing: Listing, classes: Sequence[str] | None) -> tuple[list[str], list[tuple[Any, int]]]:
    """The class list and every item's label in it.

    Labels follow the class names where the dataset's names are the given ones (loosely compared;
    task_vectors' ``a_abbey`` SUN397 folders and torchvision's EuroSAT folders included), else its
    numeric class names (GTSRB's ``00014``, MNIST's digits), else the dataset's own label order when
    there are as many classes as names (``ImageFolder``: the sorted folder index is the label).
    """
    names = listing.names
    if classes is None:
        return list(names), listing.items
    classes = list(classes)
    mapping = _by_name(names, classes)
    if mapping is None and names and all(n.isdigit() for n in names):
        numbers = [int(n) for n in names]
        if max(numbers) < len(classes) and len(set(numbers)) == len(numbers):
            mapping = numbers
    if mapping is None and len(names) == len(classes):
        if any(_key(n) in {_key(c) for c in classes} for n in names):
            log.warning(
                "%s: class names match the given ones only in part; labels follow its order", listing.source
            )
        mapping = list(range(len(names)))
    if mapping is None:
        raise WeightWeavingError(
            f"has {len(names)} {listing.kind} but {len(classes)} class names are given", path=listing.source
        )
    return classes, [(where, mapping[n]) for where, n in listing.items]


# -- finding a layout under a data root ----------------------------------------------------------


def locate(root: Path, dataset: str | None = None) -> tuple[Layout, Path] | None:
    """The layout under ``root`` and its base folder; ``dataset`` (a paper dataset) picks among several."""
    found: list[tuple[Layout, Path]] = []
    for layout in LAYOUTS:
        places = ([root] if layout.at_root else []) + [root / sub for sub in layout.folders]
        base = next((p for p in places if p.is_dir() and layout.marker(p)), None)
        if base is not None:
            found.append((layout, base))
    if dataset is not None:
        found = [f for f in found if f[0].dataset == dataset] or found
    kinds = sorted({f[0].dataset or f[0].name for f in found})
    if len(kinds) > 1:
        raise WeightWeavingError(
            f"holds several datasets ({', '.join(kinds)}): name the task after one of them or give its folder",
            path=root,
        )
    return found[0] if found else None


def _split(split: str, offered: Sequence[str], base: Path, layout: str) -> tuple[str, int | None]:
    match = SPLIT.match(split)
    if match is None or match[1] not in offered:
        raise WeightWeavingError(f"{layout} has no '{split}' split (splits: {', '.join(offered)})", path=base)
    return match[1], int(match[2]) if match[2] else None


def _no_partition(part: int | None, split: str, base: Path, layout: str) -> None:
    if part is not None:
        raise WeightWeavingError(f"{layout} has no numbered partitions ('{split}')", path=base)


def _existing(path: Path, listed_in: Path) -> Path:
    if not path.is_file():
        raise WeightWeavingError(f"lists {path}, which is missing", path=listed_in)
    return path


def _text_lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise WeightWeavingError(f"no such {what}", path=path)
    try:
        return [line.strip() for line in path.read_text("utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise WeightWeavingError(f"unreadable {what}: {exc}", path=path) from None


# -- Stanford Cars (torchvision StanfordCars) ----------------------------------------------------


def _loadmat(path: Path, keys: Sequence[str], what: str, *, squeeze: bool = True) -> dict[str, Any]:
    """``keys`` of a MATLAB file (at least 1-d each), read with scipy."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise WeightWeavingError(
            f"reading {what}'s .mat files needs scipy (pip install scipy)", path=path
        ) from None
    if not path.is_file():
        raise WeightWeavingError(f"no such file ({what})", path=path)
    try:
        values = loadmat(str(path), squeeze_me=squeeze, variable_names=list(keys))
    except (OSError, ValueError, TypeError, NotImplementedError) as exc:
        raise WeightWeavingError(f"is not a .mat file: {exc}", path=path) from None
    missing = [k for k in keys if k not in values]
    if missing:
        raise WeightWeavingError(f"holds no '{missing[0]}' ({what})", path=path)
    import numpy

    return {k: numpy.atleast_1d(values[k]) for k in keys}


def _read_cars(base: Path, split: str, explicit: bool) -> Listing:
    kind, part = _split(split, ("test", "train"), base, "Stanford Cars")
    _no_partition(part, split, base, "Stanford Cars")
    devkit = base / "devkit"
    meta = _loadmat(devkit / "cars_meta.mat", ["class_names"], "Stanford Cars")
    names = [str(n) for n in meta["class_names"].tolist()]
    if kind == "train":
        annotations, images = devkit / "cars_train_annos.mat", base / "cars_train"
    else:
        spare = devkit / "cars_test_annos_withlabels.mat"
        annotations = base / "cars_test_annos_withlabels.mat"
        annotations = spare if not annotations.is_file() and spare.is_file() else annotations
        images = base / "cars_test"
    rows = _loadmat(annotations, ["annotations"], "Stanford Cars")["annotations"]
    if rows.dtype.names is None or not {"fname", "class"} <= set(rows.dtype.names):
        raise WeightWeavingError("'annotations' has no fname and class fields", path=annotations)
    items: list[tuple[Any, int]] = []
    for row in rows:
        label = int(row["class"]) - 1  # 1-based in the devkit
        if not 0 <= label < len(names):
            raise WeightWeavingError(
                f"class {label + 1} of {row['fname']} is not in cars_meta.mat's {len(names)}",
                path=annotations,
            )
        items.append((_existing(images / str(row["fname"]), annotations), label))
    return Listing(names, items, f"{base}:{kind}")


# -- GTSRB (torchvision GTSRB) -------------------------------------------------------------------


def _read_gtsrb(base: Path, split: str, explicit: bool) -> Listing:
    kind, part = _split(split, ("test", "train"), base, "GTSRB")
    _no_partition(part, split, base, "GTSRB")
    if kind == "train":
        folder = base / "GTSRB" / "Training"
        if not folder.is_dir():
            raise WeightWeavingError("no such folder (GTSRB's training images)", path=folder)
        listing = class_folders(folder)
        listing.source = f"{base}:{kind}"
        return listing
    images, table = base / "GTSRB" / "Final_Test" / "Images", base / "GT-final_test.csv"
    if not table.is_file():
        raise WeightWeavingError(
            "no such file (GTSRB's test labels, from GTSRB_Final_Test_GT.zip)", path=table
        )
    try:
        with table.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh, delimiter=";", skipinitialspace=True))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise WeightWeavingError(f"unreadable CSV: {exc}", path=table) from None
    if not rows or not {"Filename", "ClassId"} <= set(rows[0]):
        raise WeightWeavingError("is not a ';'-separated table with Filename and ClassId", path=table)
    items: list[tuple[Any, int]] = []
    for number, row in enumerate(rows, start=2):
        value, file = (row.get("ClassId") or "").strip(), (row.get("Filename") or "").strip()
        if not value.isdigit() or not file:
            raise WeightWeavingError(f"row {number}: no Filename and class number ClassId", path=table)
        items.append((_existing(images / file, table), int(value)))
    count = max(label for _, label in items) + 1
    return Listing([f"{i:05d}" for i in range(count)], items, f"{base}:{kind}")


# -- DTD (torchvision DTD) -----------------------------------------------------------------------


def _read_dtd(base: Path, split: str, explicit: bool) -> Listing:
    kind, part = _split(split, ("test", "train", "val", "all"), base, "DTD")
    if kind == "all":
        _no_partition(part, split, base, "DTD")
        listing = class_folders(base / "images")
        listing.source = f"{base}:all"
        return listing
    names = sorted(p.name for p in (base / "images").iterdir() if p.is_dir() and not p.name.startswith("."))
    index = {n: i for i, n in enumerate(names)}
    listed = base / "labels" / f"{kind}{part or 1}.txt"
    items: list[tuple[Any, int]] = []
    for line in _text_lines(listed, "split file (DTD's labels/{train,val,test}N.txt)"):
        name, _, file = line.partition("/")
        if name not in index or not file:
            raise WeightWeavingError(f"'{line}' is not CLASS/FILE of a folder under images/", path=listed)
        items.append((_existing(base / "images" / name / file, listed), index[name]))
    return Listing(names, items, f"{base}:{kind}{part or 1}")


# -- SUN397 (torchvision SUN397, with the official partition files) ------------------------------


def _sun_class(relative: str) -> str:
    """``/a/abbey`` or ``a/apartment_building/outdoor/sun_x.jpg`` -> ``abbey``, ``apartment_building/outdoor``."""
    parts = [p for p in relative.split("/") if p]
    return "/".join(parts[1:-1] if parts[-1].lower().endswith(".jpg") else parts[1:])


def _read_sun397(base: Path, split: str, explicit: bool) -> Listing:
    kind, part = _split(split, ("test", "train", "all"), base, "SUN397")
    names = [_sun_class(line) for line in _text_lines(base / "ClassName.txt", "class list")]
    index = {n: i for i, n in enumerate(names)}
    listed = None
    if kind != "all":
        file = f"{'Testing' if kind == 'test' else 'Training'}_{part or 1:02d}.txt"
        places = (base, base.parent, base / "Partitions", base.parent / "Partitions")
        listed = next((p / file for p in places if (p / file).is_file()), None)
        if listed is None and explicit:
            raise WeightWeavingError(
                "no such split file (SUN397's partitions, Partitions.zip)", path=base / file
            )
        if listed is None:
            log.info("%s: no SUN397 partition files; all images are used", base)
    if listed is None:
        files = sorted(base.rglob("sun_*.jpg"))
        if not files:
            raise WeightWeavingError("holds no sun_*.jpg images", path=base)
        relative = [f.relative_to(base).as_posix() for f in files]
        where: Path = base / "ClassName.txt"
    else:
        relative, where = _text_lines(listed, "split file"), listed
        files = [base / r.lstrip("/") for r in relative]
    items: list[tuple[Any, int]] = []
    for rel, image in zip(relative, files, strict=True):
        name = _sun_class(rel)
        if name not in index:
            raise WeightWeavingError(f"{rel} is in no class of ClassName.txt", path=where)
        items.append((_existing(image, where) if listed else image, index[name]))
    return Listing(names, items, f"{base}:{'all' if listed is None else kind + str(part or 1)}")


# -- EuroSAT (torchvision EuroSAT: no splits) ----------------------------------------------------


def _read_eurosat(base: Path, split: str, explicit: bool) -> Listing:
    if explicit and split != "all":
        raise WeightWeavingError(
            f"torchvision's EuroSAT has no '{split}' split (DATA:all, or task_vectors' EuroSAT_splits/ folders)",
            path=base,
        )
    log.info("%s: torchvision's EuroSAT has no splits; all images are used", base)
    listing = class_folders(base / "2750")
    listing.source = f"{base}:all"
    return listing


# -- RESISC45 (task_vectors / torchgeo) ----------------------------------------------------------


def _read_resisc45(base: Path, split: str, explicit: bool) -> Listing:
    kind, part = _split(split, ("test", "train", "val", "all"), base, "RESISC45")
    _no_partition(part, split, base, "RESISC45")
    listing = class_folders(base / "NWPU-RESISC45")
    listed = base / f"resisc45-{kind}.txt"
    if kind == "all" or not (listed.is_file() or explicit):
        if kind != "all":
            log.info("%s: no RESISC45 split files; all images are used", base)
        listing.source = f"{base}:all"
        return listing
    wanted = set(_text_lines(listed, "split file (resisc45-{train,val,test}.txt)"))
    listing.items = [(p, label) for p, label in listing.items if p.name in wanted]
    if len(listing.items) != len(wanted):
        found = {p.name for p, _ in listing.items}
        missing = sorted(wanted - found)[0]
        raise WeightWeavingError(f"lists {missing}, which is in no class folder", path=listed)
    listing.source = f"{base}:{kind}"
    return listing


# -- MNIST raw files and SVHN .mat files (torchvision MNIST, SVHN) -------------------------------


def _mnist_file(base: Path, stem: str) -> Path:
    for suffix in ("", ".gz"):
        if (base / f"{stem}{suffix}").is_file():
            return base / f"{stem}{suffix}"
    raise WeightWeavingError("no such file (torchvision's MNIST raw files)", path=base / stem)


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


def _read_mnist(base: Path, split: str, explicit: bool) -> Listing:
    kind, part = _split(split, ("test", "train"), base, "MNIST")
    _no_partition(part, split, base, "MNIST")
    prefix = "t10k" if kind == "test" else "train"
    images = _mnist_file(base, f"{prefix}-images-idx3-ubyte")
    labels = _mnist_file(base, f"{prefix}-labels-idx1-ubyte")
    pixels, targets = _read_idx(images, 3), _read_idx(labels, 1)
    if len(pixels) != len(targets) or (len(targets) and int(targets.max()) > 9):
        raise WeightWeavingError("does not label the images file's images with digits", path=labels)
    items: list[tuple[Any, int]] = [(i, int(t)) for i, t in enumerate(targets)]
    return Listing([str(d) for d in range(10)], items, f"{base}:{kind}", pixels)


def _read_svhn(base: Path, split: str, explicit: bool) -> Listing:
    """torchvision's SVHN: ``X`` (32, 32, 3, N) uint8 and ``y`` (N, 1) with 10 standing for the digit 0."""
    kind, part = _split(split, ("test", "train", "extra"), base, "SVHN")
    _no_partition(part, split, base, "SVHN")
    path = base / f"{kind}_32x32.mat"
    mat = _loadmat(path, ["X", "y"], "SVHN", squeeze=False)
    x, y = mat["X"], mat["y"]
    try:
        pixels = torch.from_numpy(x).permute(3, 0, 1, 2).contiguous()  # (N, 32, 32, 3)
        targets = torch.from_numpy(y.astype("int64")).flatten().remainder(10)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise WeightWeavingError(f"is not torchvision's SVHN file: {exc}", path=path) from None
    if pixels.dtype != torch.uint8 or len(pixels) != len(targets):
        raise WeightWeavingError("is not torchvision's SVHN file (X, y of other shapes)", path=path)
    items: list[tuple[Any, int]] = [(i, int(t)) for i, t in enumerate(targets)]
    return Listing([str(d) for d in range(10)], items, f"{path}", pixels)


# -- task_vectors' split folders: {train,val,test}/<class>/ --------------------------------------

SPLIT_FOLDERS = ("train", "val", "test")


def _has_split_folders(base: Path) -> bool:
    subs = {p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")}
    return bool(subs) and subs <= set(SPLIT_FOLDERS)


def _read_split_folders(base: Path, split: str, explicit: bool) -> Listing:
    kind, part = _split(split, SPLIT_FOLDERS, base, "a folder of split folders")
    _no_partition(part, split, base, "a folder of split folders")
    folder = base / kind
    if kind == "test" and not folder.is_dir() and (base / "val").is_dir():
        log.info("%s: no test/ folder; val/ is the test set (as task_vectors uses SUN397's and DTD's)", base)
        folder = base / "val"
    if not folder.is_dir():
        raise WeightWeavingError(f"has no {kind}/ folder", path=base)
    listing = class_folders(folder)
    listing.source = str(folder)
    return listing


def _has(*parts: str) -> Callable[[Path], bool]:
    return lambda base: base.joinpath(*parts).exists()


def _any_file(*names: str) -> Callable[[Path], bool]:
    return lambda base: any((base / n).is_file() for n in names)


_MNIST_FILES = tuple(f"{p}-images-idx3-ubyte{s}" for p in ("t10k", "train") for s in ("", ".gz"))

LAYOUTS: tuple[Layout, ...] = (
    Layout("Stanford Cars", "Cars", ("stanford_cars",), _has("devkit", "cars_meta.mat"), _read_cars),
    Layout("GTSRB", "GTSRB", ("gtsrb",), _has("GTSRB"), _read_gtsrb),
    Layout(
        "DTD",
        "DTD",
        ("dtd/dtd", "dtd"),
        lambda b: (b / "images").is_dir() and (b / "labels").is_dir(),
        _read_dtd,
    ),
    Layout("SUN397", "SUN397", ("SUN397",), _has("ClassName.txt"), _read_sun397),
    Layout("EuroSAT", "EuroSAT", ("eurosat",), _has("2750"), _read_eurosat),
    Layout("RESISC45", "RESISC45", ("resisc45",), _has("NWPU-RESISC45"), _read_resisc45),
    Layout("MNIST", "MNIST", ("MNIST/raw", "raw"), _any_file(*_MNIST_FILES), _read_mnist),
    Layout(
        "SVHN",
        "SVHN",
        ("svhn",),
        _any_file("test_32x32.mat", "train_32x32.mat", "extra_32x32.mat"),
        _read_svhn,
    ),
    Layout("split folders", None, (), _has_split_folders, _read_split_folders),
    Layout("SUN397 split folders", "SUN397", ("sun397",), _has_split_folders, _read_split_folders, False),
    Layout("DTD split folders", "DTD", ("dtd",), _has_split_folders, _read_split_folders, False),
    Layout(
        "EuroSAT split folders",
        "EuroSAT",
        ("EuroSAT_splits",),
        _has_split_folders,
        _read_split_folders,
        False,
    ),
)
