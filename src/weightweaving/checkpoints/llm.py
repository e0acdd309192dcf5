"""Language-model folders: fit a fine-tune to its base's tied embeddings and vocabulary size.

Two things make a fine-tuned language model's tensors differ from its base's while the architecture is
the same. Tied embeddings: a base with ``tie_word_embeddings`` stores one tensor (no ``lm_head.weight``),
while a fine-tune may store both (and may have untied them in training), or the other way round.
Added tokens: a fine-tune whose tokenizer gained tokens has more rows in ``embed_tokens``/``lm_head``.
:func:`fit_to_base` returns a lazy view of the fine-tune with the base's names and shapes, and says
what it did; it never reads more than the tensors it compares.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from ..errors import CheckpointError, OptionError
from .base import Checkpoint, TensorInfo

Vocab = Literal["error", "base"]
OUTPUT_EMBEDDINGS = re.compile(r"(^|\.)(lm_head|embed_out)\.weight$")
INPUT_EMBEDDINGS = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|embed_in)\.weight$")
VOCAB_TENSORS = re.compile(
    r"(^|\.)(embed_tokens|wte|word_embeddings|embed_in|embed_out|lm_head|shared)\.(weight|bias)$"
)


def read_config(ckpt: Checkpoint) -> dict[str, Any] | None:
    """The ``config.json`` next to a checkpoint's weights, if it has one."""
    for path in ckpt.extra_files:
        if path.name == "config.json":
            try:
                data = json.loads(Path(path).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                return None
            return data if isinstance(data, dict) else None
    return None


class FittedCheckpoint(Checkpoint):
    """A view of ``inner`` with names dropped, names aliased to others and leading rows cut."""

    def __init__(
        self, inner: Checkpoint, *, drop: set[str], alias: dict[str, str], rows: dict[str, int]
    ) -> None:
        self.inner = inner
        self.path = inner.path
        self.extra_files = inner.extra_files
        self.alias = alias
        self.rows = rows
        infos = {k: v for k, v in inner.infos().items() if k not in drop}
        for name, source in alias.items():
            infos[name] = inner.infos()[source]
        for name, n in rows.items():
            info = infos[name]
            infos[name] = TensorInfo((n, *info.shape[1:]), info.dtype)
        self._infos = infos

    def infos(self) -> Mapping[str, TensorInfo]:
        return self._infos

    def get(self, name: str) -> Tensor:
        source = self.alias.get(name, name)
        if name in self.rows:  # added tokens: read the shared rows only
            return self.inner.get_rows(source, self.rows[name])
        return self.inner.get(source)

    def changed(self) -> set[str] | None:
        inner = self.inner.changed()
        if inner is None:
            return None
        return {n for n in self._infos if self.alias.get(n, n) in inner}

    def label(self) -> str:
        return self.inner.label()

    def close(self) -> None:
        self.inner.close()


def _pair(names: Mapping[str, TensorInfo], pattern: re.Pattern[str]) -> str | None:
    found = [n for n in names if pattern.search(n)]
    return found[0] if len(found) == 1 else None


def fit_to_base(base: Checkpoint, model: Checkpoint, *, vocab: str = "error") -> tuple[Checkpoint, list[str]]:
    """Match ``model``'s tied embeddings and vocabulary rows to the base's.

    Returns:
        The view to merge (``model`` itself when nothing needed fitting) and notes on what was done.
    """
    if vocab not in ("error", "base"):
        raise OptionError(f"--vocab '{vocab}' is not one of: error, base")
    base_infos, infos = base.infos(), model.infos()
    drop: set[str] = set()
    alias: dict[str, str] = {}
    rows: dict[str, int] = {}
    notes: list[str] = []
    label = model.label()
    head, embed = _pair(infos, OUTPUT_EMBEDDINGS), _pair(infos, INPUT_EMBEDDINGS)
    base_head = _pair(base_infos, OUTPUT_EMBEDDINGS)
    if head and embed and head not in base_infos and embed in base_infos and base_head is None:
        # the base ties its output embedding to the input one (stores one tensor); so does the output
        drop.add(head)
        same = infos[head].shape == infos[embed].shape and torch.equal(model.get(head), model.get(embed))
        notes.append(
            f"{label}: ignored '{head}', a copy of '{embed}' (the base ties them and stores one tensor)"
            if same
            else f"{label}: ignored '{head}', which differs from '{embed}' (untied in fine-tuning): the base "
            f"ties them, so the output stays tied and merges only the changes to '{embed}'"
        )
    elif base_head and embed and base_head in base_infos and base_head not in infos and embed in base_infos:
        # the fine-tune ties them and the base does not: its output embedding is its input embedding
        alias[base_head] = embed
        notes.append(f"{label}: stores '{embed}' tied to '{base_head}'; read it for both")
    vocab_size = (read_config(base) or {}).get("vocab_size")
    for name, info in base_infos.items():
        mine = infos.get(alias.get(name, name))
        if mine is None or name in drop or mine.shape == info.shape:
            continue
        is_vocab = VOCAB_TENSORS.search(name) is not None or (
            isinstance(vocab_size, int) and info.shape[:1] == (vocab_size,)
        )
        if not (is_vocab and len(mine.shape) == len(info.shape) and mine.shape[1:] == info.shape[1:]):
            continue  # not a vocabulary difference: the plan reports the shape mismatch
        n_mine, n_base = mine.shape[0], info.shape[0]
        if n_mine < n_base:
            raise CheckpointError(
                f"has a vocabulary of {n_mine} tokens, fewer than the base's {n_base}",
                path=label,
                parameter=name,
            )
        if vocab != "base":
            raise CheckpointError(
                f"has a vocabulary of {n_mine} tokens, the base {n_base} (added tokens); pass --vocab base "
                f"to merge the {n_base} rows all models share and keep the base's size",
                path=label,
                parameter=name,
            )
        rows[name] = n_base
    if rows:
        notes.append(
            f"{label}: --vocab base: merged the first {next(iter(rows.values()))} rows of "
            + ", ".join(f"'{n}'" for n in rows)
            + " and left out the added tokens' rows"
        )
    if not (drop or alias or rows):
        return model, notes
    return FittedCheckpoint(model, drop=drop, alias=alias, rows=rows), notes
