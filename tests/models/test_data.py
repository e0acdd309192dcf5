"""Image sources: folders, CSV files and torchvision's MNIST raw files; labels and errors."""

from __future__ import annotations

import gzip
import struct

import pytest
import torch

from weightweaving.errors import WeightWeavingError
from weightweaving.models.data import open_images
from weightweaving.models.templates import paper_classes, paper_templates, read_lines

Image = __import__("PIL.Image", fromlist=["Image"])


def _png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (value, value, value)).save(path)


def test_folder_labels_follow_the_given_class_names(tmp_path):
    for name in ("b", "a"):
        _png(tmp_path / name / "x.png", 10)
    data = open_images(tmp_path, ["b", "a"])  # folder names are the class names: label by name
    assert sorted((p.parent.name, label) for p, label in data.items) == [("a", 1), ("b", 0)]
    data = open_images(tmp_path, ["second", "first"])  # other names, same count: sorted folder index
    assert sorted((p.parent.name, label) for p, label in data.items) == [("a", 0), ("b", 1)]
    with pytest.raises(WeightWeavingError, match="has 2 class folders but 3 class names are given"):
        open_images(tmp_path, ["x", "y", "z"])


def test_csv_of_paths_and_labels(tmp_path):
    _png(tmp_path / "img" / "0.png", 0)
    _png(tmp_path / "img" / "1.png", 255)
    table = tmp_path / "list.csv"
    table.write_text("path,label\nimg/0.png,cat\nimg/1.png,1\n")
    data = open_images(table, ["cat", "dog"])
    assert data.labels().tolist() == [0, 1]
    assert data.image(1).getpixel((0, 0)) == (255, 255, 255)
    assert open_images(table).classes == ["1", "cat"]  # no class list: the labels, sorted


def test_mnist_raw_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    pixels = torch.arange(3 * 28 * 28, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(3, 28, 28)
    with gzip.open(raw / "t10k-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(struct.pack(">4I", 0x803, 3, 28, 28) + pixels.numpy().tobytes())
    with gzip.open(raw / "t10k-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(struct.pack(">2I", 0x801, 3) + bytes([7, 0, 3]))
    data = open_images(tmp_path, paper_classes("MNIST"))
    assert data.labels().tolist() == [7, 0, 3] and len(data) == 3
    image = data.image(2)
    assert image.mode == "RGB" and image.getpixel((5, 1)) == (int(pixels[2, 1, 5]),) * 3
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(struct.pack(">2I", 0x999, 3)))
    with pytest.raises(WeightWeavingError, match="is not an IDX file: magic number 0x999"):
        open_images(tmp_path)


def test_built_in_lists_and_user_files(tmp_path):
    assert len(paper_classes("SUN397")) == 397 and len(paper_classes("cars")) == 196
    assert len(paper_classes("DTD")) == 47 and len(paper_templates("RESISC45")) == 18
    bad = tmp_path / "templates.txt"
    bad.write_text("a photo of a {}.\nno placeholder\n")
    with pytest.raises(WeightWeavingError) as info:
        read_lines(bad, "templates")
    assert str(info.value) == f"{bad}: template 'no placeholder' has no '{{}}' for the class name"


def test_svhn_mat_file(tmp_path):
    scipy_io = __import__("scipy.io", fromlist=["savemat"])  # scipy comes with the suite extra
    pixels = torch.randint(
        0, 256, (32, 32, 3, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    scipy_io.savemat(str(tmp_path / "test_32x32.mat"), {"X": pixels.numpy(), "y": [[10], [1], [9], [10]]})
    data = open_images(tmp_path)
    assert data.labels().tolist() == [0, 1, 9, 0]
    assert data.image(2).getpixel((4, 3)) == tuple(int(v) for v in pixels[3, 4, :, 2])


def test_images_are_read_one_batch_at_a_time(tmp_path):
    from weightweaving.models.data import ImageSet, batches

    for i in range(10):
        _png(tmp_path / "c" / f"{i}.png", i)
    opened: list[int] = []

    class Counting(ImageSet):
        def image(self, i):
            opened.append(i)
            return super().image(i)

    base = open_images(tmp_path)
    data = Counting(base.classes, base.items, base.source)
    stream = batches(data, lambda images, return_tensors: {"pixel_values": torch.zeros(len(images), 3)}, 4)
    pixels, labels = next(stream)
    assert len(opened) == 4 and pixels.shape == (4, 3) and labels.tolist() == [0, 0, 0, 0]
    assert [len(p) for p, _ in stream] == [4, 2] and len(opened) == 10
