"""Class names and prompt templates: the eight paper datasets built in, or a user's own files.

A template holds ``{}`` where the class name goes (``"a photo of a {}."``). The built-in lists are
data: class names as FusionBench and task_vectors name them, templates as in task_vectors.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from ..errors import WeightWeavingError

DEFAULT_TEMPLATES = ("a photo of a {}.",)


@cache
def _table() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((Path(__file__).with_name("paper_datasets.json")).read_text("utf-8"))
    return {k: v for k, v in data.items() if not k.startswith("_")}


def paper_datasets() -> list[str]:
    """The built-in dataset names: SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST, DTD.

    Example:
        >>> paper_datasets()
        ['SUN397', 'Cars', 'RESISC45', 'EuroSAT', 'SVHN', 'GTSRB', 'MNIST', 'DTD']
    """
    return list(_table())


def find_paper_dataset(name: str) -> str | None:
    """The built-in dataset ``name`` refers to (case-insensitive), or None."""
    wanted = name.lower().replace("-", "").replace("_", "")
    aliases = {"stanfordcars": "cars"}
    wanted = aliases.get(wanted, wanted)
    return next((k for k in _table() if k.lower() == wanted), None)


def paper_classes(name: str) -> list[str]:
    """Class names of a built-in dataset, in label order.

    Example:
        >>> paper_classes("eurosat")[:2]
        ['annual crop land', 'forest']
    """
    return list(_table()[_known(name)]["classes"])


def paper_templates(name: str) -> list[str]:
    """Prompt templates of a built-in dataset.

    Example:
        >>> paper_templates("MNIST")
        ['a photo of the number: "{}".']
    """
    return list(_table()[_known(name)]["templates"])


def folder_aliases() -> dict[str, str]:
    """torchvision's folder name of a class where it is not the class name (EuroSAT's), to the class name.

    Example:
        >>> folder_aliases()["HerbaceousVegetation"]
        'brushland or shrubland'
    """
    out: dict[str, str] = {}
    for entry in _table().values():
        if "folders" in entry:
            out.update(zip(entry["folders"], entry["classes"], strict=True))
    return out


def _known(name: str) -> str:
    found = find_paper_dataset(name)
    if found is None:
        raise WeightWeavingError(f"'{name}' is not a built-in dataset; valid: {', '.join(paper_datasets())}")
    return found


def read_lines(path: str | Path, what: str) -> list[str]:
    """One entry per non-empty line (``what`` names it in errors: 'class names', 'templates')."""
    file = Path(path)
    try:
        lines = [line.strip() for line in file.read_text("utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise WeightWeavingError(f"cannot read {what}: {exc}", path=file) from None
    entries = [line for line in lines if line]
    if not entries:
        raise WeightWeavingError(f"holds no {what}", path=file)
    if what == "templates":
        missing = next((t for t in entries if "{}" not in t), None)
        if missing is not None:
            raise WeightWeavingError(f"template '{missing}' has no '{{}}' for the class name", path=file)
    if len(set(entries)) != len(entries):
        raise WeightWeavingError(f"lists the same {what[:-1]} twice", path=file)
    return entries


def fill(template: str, classname: str) -> str:
    return template.replace("{}", classname)
