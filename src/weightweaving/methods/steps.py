"""Named steps that several methods share, so that no method repeats another's lines."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from pydantic import Field, field_validator
from torch import Tensor

from .base import Hyperparameters, Scanner, UnitContext


def weighted_sum(task_vectors: Tensor, weights: Sequence[float] | None) -> Tensor:
    """Σ_t w_t Δ_t over the task axis (w_t = 1 when ``weights`` is None). (T, *s) -> (*s)."""
    if weights is None:
        return task_vectors.sum(0)
    w = torch.tensor(list(weights), dtype=task_vectors.dtype, device=task_vectors.device)
    return torch.tensordot(w, task_vectors, dims=1)


def mean_over_tasks(task_vectors: Tensor) -> Tensor:
    """mean_t Δ_t. (T, *s) -> (*s)."""
    return task_vectors.mean(0)


def check_weights(weights: Sequence[float] | None, num_tasks: int, method: str) -> None:
    from ..errors import OptionError

    if weights is not None and len(weights) != num_tasks:
        raise OptionError(
            f"method '{method}': 'weights' has {len(weights)} values but there are {num_tasks} fine-tuned models"
        )


# -- steps of the SVD methods (TSV, ISO-C, ISO-CTS, CART) -------------------------------------------


def is_weight_matrix(task_vectors: Tensor) -> bool:
    """True when the parameter is a non-empty 2-D matrix: task vectors (T, m, n)."""
    return task_vectors.ndim == 3 and min(task_vectors.shape[1:]) > 0


def name_matches(pattern: str | None, name: str) -> bool:
    """``re.search(pattern, name)``; an empty or absent pattern matches nothing."""
    import re

    if not pattern:
        return False
    return re.search(pattern, name) is not None


def check_regex(pattern: str | None) -> str | None:
    """A pydantic validator body: refuse a pattern that does not compile."""
    import re

    if pattern:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
    return pattern


def thin_svd(matrices: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``U S Vᵀ`` of one matrix or a stack, in the input's precision and on its device.

    (..., m, n) -> U (..., m, p), S (..., p), Vᵀ (..., p, n) with p = min(m, n), S descending.
    """
    u, s, vh = torch.linalg.svd(matrices, full_matrices=False)
    return u, s, vh


def low_rank(u: Tensor, s: Tensor, vh: Tensor, k: int) -> Tensor:
    """The rank-k truncation ``U_k diag(S_k) V_kᵀ`` of a (stack of) thin SVD(s). -> (..., m, n)."""
    return (u[..., :k] * s[..., None, :k]) @ vh[..., :k, :]


def polar_factor(matrix: Tensor) -> Tensor:
    """The orthogonal polar factor ``P Qᵀ`` of ``A = P Σ Qᵀ``: the nearest matrix with orthonormal
    columns (or rows), as TSV and ISO-CTS orthogonalise their stacked singular vectors. (m, n) -> (m, n)."""
    p, _, qh = thin_svd(matrix)
    return p @ qh


def top_task_blocks(matrices: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """Each matrix's top-r singular triplets side by side, task t in slots ``t·r … (t+1)·r − 1``.

    One matrix's SVD at a time: the factors of one matrix in memory, not of all T (the same values
    as one batched SVD of the stack). (T, m, n) -> U (m, T·r), S (T·r), Vᵀ (T·r, n).
    """
    num_tasks, m, n = matrices.shape
    stacked_u = matrices.new_empty(m, num_tasks * r)
    stacked_s = matrices.new_empty(num_tasks * r)
    stacked_vh = matrices.new_empty(num_tasks * r, n)
    for t, matrix in enumerate(matrices):
        u, s, vh = thin_svd(matrix)
        stacked_u[:, t * r : (t + 1) * r] = u[:, :r]
        stacked_s[t * r : (t + 1) * r] = s[:r]
        stacked_vh[t * r : (t + 1) * r] = vh[:r]
    return stacked_u, stacked_s, stacked_vh


def orthogonal_reassembly(stacked_u: Tensor, stacked_s: Tensor, stacked_vh: Tensor) -> Tensor:
    """``polar(Û) · diag(ŝ) · polar(V̂ᵀ)``: reassemble stacked singular triplets after making the
    stacked vectors orthonormal (TSV-Merge, Gargiulo et al., CVPR 2025; ISO-CTS). -> (m, n)."""
    return (polar_factor(stacked_u) * stacked_s) @ polar_factor(stacked_vh)


# -- exact order statistics, in memory or streamed over a whole model (TIES, PCB) -------------------

OrderRanks = Sequence[Sequence[int]] | Callable[[list[int]], Sequence[Sequence[int]]]

_DIGIT = 16  # bits of the key resolved per radix-select scan
_BINS = 1 << _DIGIT
_CHUNK = 1 << 22  # values turned into keys at a time (bounds the int64 temporaries of a large unit)


def order_statistics(values: Tensor, ranks: Sequence[Sequence[int]]) -> list[Tensor]:
    """The values at 0-based ``ranks`` of each row sorted ascending (``kthvalue(k)`` is rank k − 1).

    values (R, n) -> one 1-D tensor per row, on the values' device.
    """
    ordered = values.sort(dim=1).values  # (R, n)
    return [ordered[row, list(row_ranks)] for row, row_ranks in enumerate(ranks)]


def ordered_keys(values: Tensor) -> tuple[Tensor, int]:
    """Signed integers that sort exactly as the floats do, and the floats' width in bits.

    A non-negative float's IEEE bit pattern already sorts as an integer; flipping every bit but the
    sign of a negative one reverses its order. (*s) float32/float64 -> (*s) int64.
    """
    values = values.contiguous() + 0.0  # -0.0 -> +0.0
    if values.dtype == torch.float64:
        bits, width = values.view(torch.int64), 64
    elif values.dtype == torch.float32:
        bits, width = values.view(torch.int32), 32
    else:
        raise TypeError(f"order statistics need float32 or float64 values, not {values.dtype}")
    keys = bits ^ ((bits >> (width - 1)) & ((1 << (width - 1)) - 1))
    return keys.to(torch.int64), width


def _key_to_value(key: int, width: int) -> Tensor:
    """The float whose ordered key is ``key`` (the inverse of :func:`ordered_keys`)."""
    bits = key ^ ((1 << (width - 1)) - 1) if key < 0 else key
    if width == 64:
        return torch.tensor([bits], dtype=torch.int64).view(torch.float64)[0]
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32)[0]


def _digit_slots(
    keys: Tensor, width: int, level: int, prefixes: list[list[int]] | None, first_row: int, num_rows: int
) -> tuple[Tensor, int]:
    """Histogram slots of the keys' digit ``level`` (counted from the top), and the number of blocks.

    A block of 65536 slots per (stream, wanted prefix): at level 0 one block per stream over every
    key; later only the keys whose higher digits equal a wanted prefix of their stream count.
    keys (r, n) of streams first_row … first_row + r − 1 of num_rows -> slots (m,) int64.
    """
    rows = torch.arange(first_row, first_row + keys.shape[0], device=keys.device)[:, None]  # (r, 1)
    shift = width - _DIGIT * (level + 1)
    if prefixes is None:  # the top digit, made non-negative
        return (rows * _BINS + (keys >> shift) + _BINS // 2).reshape(-1), num_rows
    bits = _DIGIT * level  # the prefix, keys >> (shift + 16), is a signed integer of this width
    offset = 1 << (bits - 1)
    tags = [
        (row << bits) + prefix + offset
        for row, row_prefixes in enumerate(prefixes)
        for prefix in row_prefixes
    ]
    wanted = torch.tensor(tags, dtype=torch.int64, device=keys.device)  # sorted: by stream, then prefix
    if not tags:
        return keys.new_empty(0), 0
    tagged = ((rows << bits) + (keys >> (shift + _DIGIT)) + offset).reshape(-1)  # (R·n)
    block = torch.searchsorted(wanted, tagged).clamp_(max=len(tags) - 1)
    hit = wanted[block] == tagged
    digit = (keys >> shift).reshape(-1)[hit] & (_BINS - 1)
    return block[hit] * _BINS + digit, len(tags)


def _unit_histogram(
    values: Callable[[Tensor, UnitContext], Tensor],
    level: int,
    prefixes: list[list[int]] | None,
    task_vectors: Tensor,
    ctx: UnitContext,
) -> tuple[int, int, list[Tensor], list[Tensor]]:
    """One unit's partial counts of digit ``level``: (key width, blocks, bins hit, their counts)."""
    unit = values(task_vectors, ctx)  # (R, n_unit)
    step = max(1, _CHUNK // max(1, unit.shape[1]))
    width, blocks = 0, 0
    slot_parts: list[Tensor] = []
    hit_parts: list[Tensor] = []
    for first in range(0, unit.shape[0], step):
        keys, width = ordered_keys(unit[first : first + step])  # (r, n_unit)
        slots, blocks = _digit_slots(keys, width, level, prefixes, first, unit.shape[0])
        if slots.numel() * 8 < blocks * _BINS:  # few values: count only the slots they hit
            hit_slots, hits = (x.cpu() for x in torch.unique(slots, return_counts=True))
            slot_parts.append(hit_slots)
            hit_parts.append(hits)
        else:  # kept as the bins that were hit: the scan holds every unit's partial until summed
            dense = torch.bincount(slots, minlength=blocks * _BINS).cpu()
            hit_slots = dense.nonzero().squeeze(1)
            slot_parts.append(hit_slots)
            hit_parts.append(dense[hit_slots])
    return width, blocks, slot_parts, hit_parts


def streamed_order_statistics(
    scan: Scanner[Any],
    values: Callable[[Tensor, UnitContext], Tensor],
    ranks: OrderRanks,
) -> list[Tensor]:
    """Exact order statistics of R streams of floats spread over every unit of a model.

    ``values(task_vectors, ctx)`` gives the (R, n_unit) floats of one unit (no NaN); row r of every
    unit belongs to stream r, as if the units were concatenated. ``ranks`` holds 0-based positions
    in each stream sorted ascending (``torch.kthvalue(k)`` is rank k − 1), or is a function of the
    stream lengths returning them. Radix select on the floats' ordered bit patterns, 16 bits per
    scan (2 scans for float32, 4 for float64): a scan keeps one 65536-bin histogram per stream and
    wanted key prefix, never the values, and the result equals sorting the concatenation.
    Returns one 1-D tensor per stream (CPU, the values' dtype), in the order of its ranks.
    """
    widths: set[int] = set()

    def histogram(level: int, prefixes: list[list[int]] | None) -> list[Tensor]:
        """One scan: per stream, the counts of digit ``level`` (one 65536-block per wanted prefix).

        Each unit returns its own partial counts, summed here as they come back: the per-unit
        function keeps no shared state, so it runs the same in a thread or on a Ray worker."""
        total: list[Tensor] = []
        for width, blocks, hit_slots, hits in scan(
            functools.partial(_unit_histogram, values, level, prefixes)
        ):
            widths.add(width)
            if not total:
                total.append(torch.zeros(blocks * _BINS, dtype=torch.int64))
            for slot_part, hit_part in zip(hit_slots, hits, strict=True):
                total[0].index_add_(0, slot_part, hit_part)
        if len(widths) != 1 or not total:
            raise ValueError("order statistics need at least one unit, all of one float dtype")
        sizes = [1] * (total[0].numel() // _BINS) if prefixes is None else [len(p) for p in prefixes]
        return list(total[0].split([size * _BINS for size in sizes]))

    counts = histogram(0, None)
    lengths = [int(c.sum()) for c in counts]
    wanted_ranks = [list(r) for r in (ranks(lengths) if callable(ranks) else ranks)]
    if len(wanted_ranks) != len(lengths):
        raise ValueError(f"order statistics: {len(wanted_ranks)} rank lists for {len(lengths)} streams")
    for row, (row_ranks, n) in enumerate(zip(wanted_ranks, lengths, strict=True)):
        if any(not 0 <= r < n for r in row_ranks):
            raise ValueError(f"order statistics: a rank of stream {row} is outside 0..{n - 1}")
    width = next(iter(widths))
    # per wanted rank: (the key's digits found so far, the rank among the keys sharing them)
    found = [[(0, r) for r in row_ranks] for row_ranks in wanted_ranks]
    for level in range(width // _DIGIT):
        if level:
            counts = histogram(level, [sorted({prefix for prefix, _ in row}) for row in found])
        for row, row_found in enumerate(found):
            prefixes = sorted({prefix for prefix, _ in row_found})
            for j, (prefix, rank) in enumerate(row_found):
                block = prefixes.index(prefix) if level else 0
                cum = counts[row][block * _BINS : (block + 1) * _BINS].cumsum(0)  # (65536,)
                digit = int(torch.searchsorted(cum, torch.tensor([rank]), right=True)[0])
                below = int(cum[digit - 1]) if digit else 0
                key = digit - _BINS // 2 if level == 0 else prefix * _BINS + digit
                row_found[j] = (key, rank - below)
    empty = torch.empty(0, dtype=torch.float64 if width == 64 else torch.float32)
    return [
        torch.stack([_key_to_value(key, width) for key, _ in row_found]) if row_found else empty
        for row_found in found
    ]


class SvdExcludeParams(Hyperparameters):
    """Hyperparameters shared by the SVD methods (TSV, ISO-C, ISO-CTS): which matrices skip the SVD."""

    svd_exclude: str | None = Field(
        "text_projection",
        description="regex (re.search) on parameter names: matching 2-D parameters are averaged, "
        "not SVD-merged; the reference skips names containing 'text_projection'; '' or None skips none",
    )

    _check_svd_exclude = field_validator("svd_exclude")(check_regex)
