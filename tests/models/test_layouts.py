"""The paper datasets' on-disk layouts (torchvision's, task_vectors'): counts, labels, class order, splits, errors."""

from __future__ import annotations

import gzip
import struct

import pytest
import torch

from weightweaving.errors import WeightWeavingError
from weightweaving.models.data import open_images, split_of
from weightweaving.models.templates import paper_classes

Image = __import__("PIL.Image", fromlist=["Image"])
scipy_io = __import__("scipy.io", fromlist=["savemat"])  # scipy comes with the suite extra
numpy = __import__("numpy")


def _img(path, value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (3, 3), (value, 0, 255 - value)).save(path)
    return path


def _lines(path, *lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def _named(data):
    """(file name, label) of every item."""
    return [(p.name, label) for p, label in data.items]


def _error(call, *args, **kwargs) -> str:
    with pytest.raises(WeightWeavingError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- Stanford Cars -------------------------------------------------------------------------------


def _cars(root, names, train, test):
    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    scipy_io.savemat(
        str(base / "devkit" / "cars_meta.mat"), {"class_names": numpy.array(names, dtype=object)}
    )
    for rows, mat, folder in (
        (train, base / "devkit" / "cars_train_annos.mat", base / "cars_train"),
        (test, base / "cars_test_annos_withlabels.mat", base / "cars_test"),
    ):
        table = numpy.array(rows, dtype=[("fname", object), ("class", numpy.uint8)])
        scipy_io.savemat(str(mat), {"annotations": table})
        for fname, _ in rows:
            _img(folder / fname)
    return base


def test_cars_labels_are_the_devkit_classes_in_the_heads_order(tmp_path):
    paper = paper_classes("Cars")
    # the devkit's order is the label order (class k is cars_meta's k-th name): with all 196 the label is k-1
    _cars(tmp_path / "full", paper, [("00001.jpg", 196)], [("00001.jpg", 1), ("00002.jpg", 131)])
    test = open_images(tmp_path / "full", paper, dataset="Cars")
    assert _named(test) == [("00001.jpg", 0), ("00002.jpg", 130)] and test.classes == paper
    assert test.image(1).size == (3, 3)
    assert _named(open_images(f"{tmp_path / 'full'}:train", paper)) == [("00001.jpg", 195)]
    # a devkit of a few classes in another order: labels go by name
    base = _cars(tmp_path / "few", [paper[7], paper[0]], [("a.jpg", 2)], [("b.jpg", 1), ("c.jpg", 2)])
    assert _named(open_images(base, paper)) == [("b.jpg", 7), ("c.jpg", 0)]
    assert open_images(base).classes == [paper[7], paper[0]]  # no class list: the devkit's names
    (base / "cars_test" / "c.jpg").unlink()
    assert _error(open_images, base) == (
        f"{base / 'cars_test_annos_withlabels.mat'}: lists {base / 'cars_test' / 'c.jpg'}, which is missing"
    )
    (base / "devkit" / "cars_train_annos.mat").unlink()
    assert _error(open_images, f"{base}:train").startswith(
        f"{base / 'devkit' / 'cars_train_annos.mat'}: no such file"
    )
    assert "has no 'val' split (splits: test, train)" in _error(open_images, f"{base}:val")


# -- GTSRB ---------------------------------------------------------------------------------------


def test_gtsrb_training_folders_and_test_csv(tmp_path):
    base = tmp_path / "gtsrb"
    for folder, count in (("00000", 2), ("00014", 1)):
        for i in range(count):
            _img(base / "GTSRB" / "Training" / folder / f"00000_0000{i}.ppm")
        _lines(base / "GTSRB" / "Training" / folder / f"GT-{folder}.csv", "Filename;ClassId")
    for name in ("00000.ppm", "00001.ppm", "00002.ppm"):
        _img(base / "GTSRB" / "Final_Test" / "Images" / name)
    _lines(
        base / "GT-final_test.csv",
        "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId",
        "00000.ppm;3;3;0;0;2;2;14",
        "00001.ppm;3;3;0;0;2;2;42",
        "00002.ppm;3;3;0;0;2;2;0",
    )
    paper = paper_classes("GTSRB")
    test = open_images(tmp_path, paper, dataset="GTSRB")  # the data root: gtsrb/ is found under it
    assert [label for _, label in test.items] == [14, 42, 0] and paper[14] == "stop" and len(test) == 3
    train = open_images(f"{tmp_path}:train", paper, dataset="GTSRB")
    assert _named(train) == [("00000_00000.ppm", 0), ("00000_00001.ppm", 0), ("00000_00000.ppm", 14)]
    assert split_of(f"{tmp_path}:train") == (str(tmp_path), "train")
    (base / "GTSRB" / "Training" / "00003").mkdir()
    empty = base / "GTSRB" / "Training" / "00003"
    assert _error(open_images, f"{base}:train", paper) == f"{empty}: is a class folder with no images"
    (base / "GT-final_test.csv").unlink()
    assert _error(open_images, base).startswith(f"{base / 'GT-final_test.csv'}: no such file")


# -- DTD -----------------------------------------------------------------------------------------


def _dtd(root):
    base = root / "dtd" / "dtd"
    for cls in ("banded", "zigzagged", "dotted"):
        for i in (1, 2):
            _img(base / "images" / cls / f"{cls}_000{i}.jpg")
    _lines(base / "labels" / "train1.txt", "banded/banded_0001.jpg", "zigzagged/zigzagged_0001.jpg")
    _lines(base / "labels" / "test1.txt", "zigzagged/zigzagged_0002.jpg", "dotted/dotted_0002.jpg")
    _lines(base / "labels" / "test2.txt", "banded/banded_0002.jpg")
    return base


def test_dtd_split_files_and_partitions(tmp_path):
    base, paper = _dtd(tmp_path), paper_classes("DTD")
    assert paper.index("zigzagged") == 46 and paper.index("dotted") == 10
    assert _named(open_images(tmp_path, paper)) == [("zigzagged_0002.jpg", 46), ("dotted_0002.jpg", 10)]
    assert _named(open_images(f"{tmp_path}:train", paper)) == [
        ("banded_0001.jpg", 0),
        ("zigzagged_0001.jpg", 46),
    ]
    assert _named(open_images(f"{base}:test2", paper)) == [("banded_0002.jpg", 0)]
    assert len(open_images(f"{base}:all", paper)) == 6
    own = open_images(base)  # no class list: the sorted image folders, as torchvision's classes
    assert own.classes == ["banded", "dotted", "zigzagged"] and [y for _, y in own.items] == [2, 1]
    assert _error(open_images, f"{base}:val").startswith(
        f"{base / 'labels' / 'val1.txt'}: no such split file"
    )
    _lines(base / "labels" / "val1.txt", "striped/striped_0001.jpg")
    assert "'striped/striped_0001.jpg' is not CLASS/FILE" in _error(open_images, f"{base}:val")
    (base / "images" / "dotted" / "dotted_0002.jpg").write_bytes(b"not an image")
    data = open_images(base, paper)
    bad = base / "images" / "dotted" / "dotted_0002.jpg"
    assert _error(data.image, 1) == f"{bad}: unreadable image: UnidentifiedImageError"


# -- SUN397 --------------------------------------------------------------------------------------


def test_sun397_class_list_partitions_and_whole_set(tmp_path):
    base = tmp_path / "SUN397"
    _lines(base / "ClassName.txt", "/a/abbey", "/a/apartment_building/outdoor", "/f/forest_path")
    files = ["a/abbey/sun_a.jpg", "a/apartment_building/outdoor/sun_b.jpg", "f/forest_path/sun_c.jpg"]
    for f in files:
        _img(base / f)
    paper = paper_classes("SUN397")
    wanted = [paper.index(n) for n in ("abbey", "apartment building outdoor", "forest path")]
    data = open_images(tmp_path, paper)  # no partition files: every image
    assert sorted(y for _, y in data.items) == sorted(wanted) and len(data) == 3
    assert open_images(base).classes == ["abbey", "apartment_building/outdoor", "forest_path"]
    assert _error(open_images, f"{base}:test").startswith(f"{base / 'Testing_01.txt'}: no such split file")
    _lines(tmp_path / "Testing_01.txt", "/f/forest_path/sun_c.jpg", "/a/abbey/sun_a.jpg")
    _lines(tmp_path / "Training_01.txt", "/a/apartment_building/outdoor/sun_b.jpg")
    assert _named(open_images(base, paper)) == [("sun_c.jpg", wanted[2]), ("sun_a.jpg", wanted[0])]
    assert _named(open_images(f"{base}:train", paper)) == [("sun_b.jpg", wanted[1])]
    _lines(tmp_path / "Testing_01.txt", "/b/bakery/sun_d.jpg")
    assert "/b/bakery/sun_d.jpg is in no class of ClassName.txt" in _error(open_images, base)


def test_task_vectors_split_folders(tmp_path):
    # task_vectors keeps SUN397 as sun397/{train,val}/<a_abbey>; its test set is val/
    for split, cls in (("train", "a_abbey"), ("val", "a_abbey"), ("val", "f_forest_path")):
        _img(tmp_path / "sun397" / split / cls / f"{split}.jpg")
    paper = paper_classes("SUN397")
    test = open_images(tmp_path, paper, dataset="SUN397")
    assert _named(test) == [("val.jpg", paper.index("abbey")), ("val.jpg", paper.index("forest path"))]
    assert test.source == str(tmp_path / "sun397" / "val")
    assert len(open_images(tmp_path / "sun397", paper, default_split="train")) == 1
    assert _error(open_images, f"{tmp_path / 'sun397'}:all").endswith(
        "has no 'all' split (splits: train, val, test)"
    )


# -- EuroSAT, RESISC45 ---------------------------------------------------------------------------


def test_eurosat_folders_map_to_the_heads_class_names(tmp_path):
    for folder in ("SeaLake", "AnnualCrop", "HerbaceousVegetation"):
        _img(tmp_path / "eurosat" / "2750" / folder / f"{folder}_1.jpg")
    paper = paper_classes("EuroSAT")
    data = open_images(tmp_path, paper)  # torchvision's EuroSAT: no splits, every image
    assert _named(data) == [("AnnualCrop_1.jpg", 0), ("HerbaceousVegetation_1.jpg", 2), ("SeaLake_1.jpg", 9)]
    assert [paper[y] for _, y in data.items] == ["annual crop land", "brushland or shrubland", "lake or sea"]
    assert "has no 'test' split" in _error(open_images, f"{tmp_path}:test")
    # all ten folders, sorted, are the heads' order (ImageFolder's index is task_vectors' label)
    full = tmp_path / "full"
    folders = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial"]
    folders += ["Pasture", "PermanentCrop", "Residential", "River", "SeaLake"]
    for name in folders:
        _img(full / "EuroSAT_splits" / "test" / name / "x.jpg")
        _img(full / "EuroSAT_splits" / "train" / name / "y.jpg")
    data = open_images(full, paper, dataset="EuroSAT")
    assert [y for _, y in data.items] == list(range(10)) and sorted(folders) == folders


def test_resisc45_split_files(tmp_path):
    base = tmp_path / "resisc45"
    for cls in ("airplane", "baseball_diamond"):
        for i in (1, 2):
            _img(base / "NWPU-RESISC45" / cls / f"{cls}_00{i}.jpg")
    paper = paper_classes("RESISC45")
    assert len(open_images(tmp_path, paper)) == 4  # no split files: every image
    _lines(base / "resisc45-test.txt", "baseball_diamond_002.jpg", "airplane_001.jpg")
    data = open_images(tmp_path, paper)
    assert _named(data) == [
        ("airplane_001.jpg", 0),
        ("baseball_diamond_002.jpg", paper.index("baseball diamond")),
    ]
    assert _error(open_images, f"{base}:train").startswith(
        f"{base / 'resisc45-train.txt'}: no such split file"
    )
    _lines(base / "resisc45-val.txt", "beach_001.jpg")
    assert (
        _error(open_images, f"{base}:val")
        == f"{base / 'resisc45-val.txt'}: lists beach_001.jpg, which is in no class folder"
    )


# -- MNIST and SVHN splits -----------------------------------------------------------------------


def test_mnist_and_svhn_training_splits(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, labels in (("train", [5, 1]), ("t10k", [7])):
        with gzip.open(raw / f"{prefix}-images-idx3-ubyte.gz", "wb") as fh:
            fh.write(struct.pack(">4I", 0x803, len(labels), 2, 2) + bytes(4 * len(labels)))
        with gzip.open(raw / f"{prefix}-labels-idx1-ubyte.gz", "wb") as fh:
            fh.write(struct.pack(">2I", 0x801, len(labels)) + bytes(labels))
    assert open_images(tmp_path).labels().tolist() == [7]
    assert open_images(tmp_path, default_split="train").labels().tolist() == [5, 1]
    pixels = torch.zeros((32, 32, 3, 2), dtype=torch.uint8).numpy()
    (tmp_path / "svhn").mkdir()
    scipy_io.savemat(str(tmp_path / "svhn" / "train_32x32.mat"), {"X": pixels, "y": [[10], [3]]})
    assert open_images(tmp_path / "svhn", default_split="train").labels().tolist() == [0, 3]
    assert _error(open_images, tmp_path / "svhn").startswith(
        f"{tmp_path / 'svhn' / 'test_32x32.mat'}: no such file"
    )


# -- one data root holding several datasets; what is not a layout --------------------------------


def test_a_root_with_several_datasets_needs_the_task_name(tmp_path):
    _dtd(tmp_path)
    for folder in ("SeaLake", "Forest"):
        _img(tmp_path / "eurosat" / "2750" / folder / "x.jpg")
    assert _error(open_images, tmp_path) == (
        f"{tmp_path}: holds several datasets (DTD, EuroSAT): name the task after one of them or give its folder"
    )
    assert len(open_images(tmp_path, dataset="EuroSAT")) == 2
    assert len(open_images(tmp_path, dataset="DTD")) == 2
    plain = tmp_path / "plain"
    _img(plain / "cat" / "1.png")
    assert "is an image folder without splits (':test' applies" in _error(open_images, f"{plain}:test")
    assert (
        _error(open_images, f"{tmp_path / 'nowhere'}:test")
        == f"{tmp_path / 'nowhere'}: no such file or folder"
    )


# -- evaluate on a torchvision layout, against transformers alone --------------------------------


def _predictions(folder, files, classes, templates) -> list[int]:
    """transformers only: the argmax class of each image under the zero-shot head of ``classes``."""
    from tests.models.tiny_clip import transformers

    model = transformers.CLIPModel.from_pretrained(str(folder)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    processor = transformers.CLIPImageProcessor.from_pretrained(str(folder))

    def unit(out):
        out = out if isinstance(out, torch.Tensor) else out.pooler_output
        return out / out.norm(dim=-1, keepdim=True)

    with torch.no_grad():
        rows = []
        for name in classes:
            tokens = tokenizer([t.replace("{}", name) for t in templates], padding=True, return_tensors="pt")
            text = unit(model.get_text_features(**tokens)).mean(0)
            rows.append(text / text.norm())
        images = [Image.open(f).convert("RGB") for f in files]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        return (unit(model.get_image_features(pixel_values=pixels)) @ torch.stack(rows).T).argmax(1).tolist()


def test_evaluate_reads_a_torchvision_root_by_task_name(clip_dir, tmp_path, capsys):
    import json

    from weightweaving.cli import main
    from weightweaving.models.templates import paper_templates

    gen = torch.Generator().manual_seed(3)
    folders = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial"]
    folders += ["Pasture", "PermanentCrop", "Residential", "River", "SeaLake"]
    files, labels = [], []
    for label, name in enumerate(folders):
        for i in range(1 + label % 3):  # classes of different sizes: a wrong class order changes the accuracy
            colour = tuple(int(v) for v in torch.randint(0, 256, (3,), generator=gen))
            path = tmp_path / "data" / "eurosat" / "2750" / name / f"{name}_{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 40), colour).save(path)
            files.append(path)
            labels.append(label)
    _img(tmp_path / "data" / "gtsrb" / "GTSRB" / "Training" / "00000" / "x.ppm")  # a second dataset there
    out = tmp_path / "acc.json"
    code = main(
        ["evaluate", "--model", str(clip_dir), "--task", f"EuroSAT={tmp_path / 'data'}", "--json", str(out)]
    )
    assert code == 0, capsys.readouterr().err
    got = json.loads(out.read_text())
    predicted = _predictions(clip_dir, files, paper_classes("EuroSAT"), paper_templates("EuroSAT"))
    want = 100.0 * sum(p == y for p, y in zip(predicted, labels, strict=True)) / len(labels)
    shifted = 100.0 * sum(p == (y + 1) % 10 for p, y in zip(predicted, labels, strict=True)) / len(labels)
    assert got["per_task"]["EuroSAT"] == want and got["images"]["EuroSAT"] == 19
    assert want != shifted  # the labels matter for this model: a wrong class order would show


def test_finetune_reads_the_training_split_by_default(clip_dir, tmp_path, capsys):
    import json

    from weightweaving.cli import main

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    with gzip.open(raw / "train-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(struct.pack(">4I", 0x803, 3, 28, 28) + bytes(range(256)) * 9 + bytes(3 * 784 - 2304))
    with gzip.open(raw / "train-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(struct.pack(">2I", 0x801, 3) + bytes([4, 0, 9]))
    args = ["--steps", "1", "--warmup", "1", "--batch-size", "3", "--out", str(tmp_path / "ft")]
    assert main(["finetune", "--model", str(clip_dir), "--task", f"MNIST={tmp_path}", *args]) == 0
    record = json.loads((tmp_path / "ft" / "weightweaving_finetune.json").read_text())
    assert record["data"] == f"{raw}:train"
    capsys.readouterr()
    assert main(["evaluate", "--model", str(clip_dir), "--task", f"MNIST={tmp_path}"]) == 2  # no test files
    assert (
        capsys.readouterr().err.strip()
        == f"error: {raw / 't10k-images-idx3-ubyte'}: no such file (torchvision's MNIST raw files)"
    )


def test_reproduce_config_takes_a_data_root_with_a_split(tmp_path):
    from weightweaving.models.evaluate import resolve_task
    from weightweaving.models.reproduce import load_options

    _dtd(tmp_path / "data")
    config = tmp_path / "reproduce.yaml"
    config.write_text(
        "base: base/\ntasks:\n  DTD: {data: 'data:train', checkpoint: ft/dtd}\n  other: {data: data, checkpoint: ft/o}\n"
    )
    options = load_options(config)
    assert options.tasks["DTD"].data == f"{tmp_path / 'data'}:train"  # relative to the config's folder
    task = resolve_task("DTD", options.tasks["DTD"].data)
    assert (
        _named(task.data) == [("banded_0001.jpg", 0), ("zigzagged_0001.jpg", 46)] and len(task.templates) == 8
    )
