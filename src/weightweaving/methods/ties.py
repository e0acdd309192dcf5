"""TIES-Merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint mean (docs/algorithms.md, `ties`).

Reference: prateeky2806/ties-merging ``ties_minimal.ipynb`` (global flattening of every parameter).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from .base import (
    Deferred,
    Hyperparameters,
    LamForm,
    LamKind,
    Method,
    Scope,
    Stage,
    UnitContext,
    paper_ranges,
)
from .registry import register


class TiesParams(Hyperparameters):
    k: float = Field(
        0.2,
        gt=0,
        le=100,
        description="share of each task vector kept by magnitude; values > 1 are percent (20 = 0.2)",
    )
    scope: Literal["global", "tensor"] = Field(
        "global", description="one threshold per task over the whole model (reference) or per tensor"
    )

    @property
    def keep_fraction(self) -> float:
        return self.k / 100 if self.k > 1 else self.k


@dataclass(frozen=True)
class TiesStats:
    """What the global passes find: each task's trim threshold and the majority sign."""

    thresholds: Tensor  # (T,) keep |x| >= τ_t (or a single 0 when nothing is trimmed)
    majority_sign: float | None  # sign(Σ over every entry of the elected sign), where s = 0; None: not yet


# -- the exact global thresholds in one pass (plus a sample), as plan stages -----------------------
# Stage "sample" reads about _SAMPLE magnitudes per task spread over every unit and places a window
# [low, high] of magnitudes around each task's threshold quantile. Stage "window" counts, per task,
# the magnitudes below the window and keeps those inside it: when the threshold's rank falls inside
# (the usual case) its exact value is the (rank − below)-th of the kept values. Otherwise two more
# passes find it exactly: "buckets" counts every magnitude's top 16 bits, "boundary" counts the low 16
# bits of the magnitudes in the threshold's bucket (float64: keeps them). Stage "sign" (Σ of the elected signs) runs fused with the merge: it
# matters only where the trimmed values of an entry sum to exactly 0, and reuses the merge's sums.

_SAMPLE = 1 << 20  # magnitudes per task read to place the window
_SAMPLE_PER_UNIT = 1 << 16  # at most this many of them from one unit (weighted by the unit's size)
_WINDOW_CAP = 1 << 25  # magnitudes kept from the windows of all tasks (128 MiB in float32)
# entries per task that the window and merge kernels handle at a time: T blocks of this many
# float32 values and their temporaries stay in the CPU's cache between kernels (8 × ViT-B/32, one
# thread: 2x faster than whole-unit kernels, which stream every temporary through memory); counts
# of 0/1 values summed in float32 over a block are exact (far below 2^24)
_BLOCK = 1 << 16
_TOP = 16  # bits of the magnitude's key that make a bucket
_WINDOW_BITS = 20  # bits of the magnitude's key that make a bin of the sample's histogram
_BUCKETS = 1 << _TOP


def _magnitude_bits(flat: Tensor) -> tuple[Tensor, int]:
    """The IEEE bits of |x| as integers (they sort as the magnitudes do) and their width."""
    mags = flat.abs()
    if mags.dtype == torch.float64:
        return mags.view(torch.int64), 64
    if mags.dtype == torch.float32:
        return mags.view(torch.int32), 32
    raise TypeError(f"TIES thresholds need float32 or float64 task vectors, not {mags.dtype}")


@dataclass(frozen=True)
class TiesWindow:
    """Stage ``sample`` -> ``window``: per task the magnitudes [low, high] whose values are kept."""

    keep_fraction: float
    low: Tensor  # (T,)
    high: Tensor  # (T,)
    # False when the windows would hold far more than _WINDOW_CAP values (a very large model): the
    # window pass then only counts, and the exact bucket passes find the thresholds, so those
    # values never travel to the driver (over a network, on a cluster) only to be dropped there
    keep_values: bool = True


@dataclass(frozen=True)
class TiesSearch:
    """Later stages: thresholds found (NaN where not yet), each missed task's rank and bucket."""

    keep_fraction: float
    thresholds: Tensor  # (T,), NaN where not found yet
    rank: Tensor  # (T,) int64: the threshold's rank (among all, or within ``bucket`` once known)
    bucket: Tensor | None = None  # (T,) int64: the top-16-bit bucket holding the threshold


def sample_magnitudes(task_vectors: Tensor, ctx: UnitContext, given: Any) -> tuple[Tensor, float]:
    """Map of stage ``sample``: up to _SAMPLE_PER_UNIT magnitudes per task, each standing for
    ``weight`` magnitudes of the whole unit. -> ((T, m), weight)."""
    flat = task_vectors.reshape(task_vectors.shape[0], -1).abs()
    step = max(1, -(-flat.shape[1] // _SAMPLE_PER_UNIT))
    picked = flat[:, ::step].clone()
    # what these values stand for: the whole unit (a sample of its rows), or this chunk of rows
    whole = math.prod(ctx.shape) if ctx.shape and ctx.rows is None else flat.shape[1]
    return picked, whole / max(1, picked.shape[1])


def place_window(keep_fraction: float, partials: Iterator[tuple[Tensor, float]]) -> TiesWindow:
    """Fold of stage ``sample``: each task's window of magnitudes around its threshold's quantile."""
    values, weights = [], []
    for picked, weight in partials:
        values.append(picked)
        weights.append(torch.full((picked.shape[1],), weight, dtype=torch.float64))
    flat, w = torch.cat(values, dim=1), torch.cat(weights)
    effective = float(w.sum()) ** 2 / max(float((w * w).sum()), 1e-300)
    margin = max(0.003, 5.0 / math.sqrt(max(effective, 1.0)))
    target = 1.0 - keep_fraction
    bounds = torch.tensor([max(0.0, target - margin), min(1.0, target + margin)], dtype=torch.float64)
    # weighted quantiles of a histogram over the magnitudes' top bits (bins 2^-11 of a value wide
    # for float32): no sort of the sample; each edge is widened to its bin's edge
    bits, width = _magnitude_bits(flat)
    shift = width - _WINDOW_BITS
    bins = (bits >> shift).to(torch.int64)  # (T, m)
    infinity = float("inf")
    lows, highs = [], []
    for row in bins:
        cum = torch.bincount(row, weights=w).cumsum(0)  # over bins 0 … the largest hit
        at = torch.searchsorted(cum / cum[-1], bounds).clamp(max=len(cum) - 1).tolist()
        lows.append(_bits_value(at[0] << shift, flat.dtype) if bounds[0] > 0 else 0.0)
        highs.append(_bits_value(((at[1] + 1) << shift) - 1, flat.dtype) if bounds[1] < 1 else infinity)
    low = torch.tensor(lows, dtype=flat.dtype)
    high = torch.tensor(highs, dtype=flat.dtype)
    expected = 2 * margin * float(w.sum()) * flat.shape[0]  # values inside the windows, about
    return TiesWindow(keep_fraction, low, high, expected <= 2 * _WINDOW_CAP)


def _bits_value(bits: int, dtype: torch.dtype) -> float:
    """The non-negative float whose IEEE bits are ``bits`` (+inf past the largest finite one)."""
    ints = torch.int64 if dtype == torch.float64 else torch.int32
    value = float(torch.tensor([bits], dtype=ints).view(dtype)[0])
    return value if not math.isnan(value) else float("inf")


def window_values(
    task_vectors: Tensor, ctx: UnitContext, given: TiesWindow
) -> tuple[int, Tensor, list[Tensor]]:
    """Map of stage ``window``: the unit's entries per task, how many magnitudes lie below ``low``,
    and those inside [low, high]. -> (n, (T,) int64, T tensors)."""
    flat = task_vectors.reshape(task_vectors.shape[0], -1)
    num_tasks, n = flat.shape
    low = given.low.to(flat.dtype).reshape(-1, 1)  # (T, 1)
    high = given.high.to(flat.dtype).reshape(-1, 1)
    width = min(n, _BLOCK)
    mags, flags, under_high = (flat.new_empty(num_tasks * width) for _ in range(3))
    kept = torch.zeros(num_tasks, dtype=torch.float64)
    values: list[list[Tensor]] = [[] for _ in range(num_tasks)]
    for start in range(0, n, _BLOCK):  # a block of columns at a time: its buffers stay in cache
        w = min(n, start + _BLOCK) - start
        block_mags, block_flags = (x[: num_tasks * w].view(num_tasks, w) for x in (mags, flags))
        torch.abs(flat[:, start : start + w], out=block_mags)
        torch.ge(block_mags, low, out=block_flags)  # 1.0 where |x| ≥ low (never for NaN)
        kept += block_flags.sum(1)  # exact: whole numbers far below 2^24 per block
        if not given.keep_values:
            continue
        block_under_high = under_high[: num_tasks * w].view(num_tasks, w)
        block_flags.mul_(torch.le(block_mags, high, out=block_under_high))  # 1.0 inside the window
        where = _nonzero_sparse(block_flags.view(-1), block_under_high.view(-1))
        if where.numel():
            inside = block_mags.view(-1)[where]
            task = torch.div(where, w, rounding_mode="floor")  # ascending: task 0's values first
            counts = torch.bincount(task, minlength=num_tasks).tolist()
            for t, part in enumerate(inside.split(counts)):
                if part.numel():
                    values[t].append(part)
    below = n - kept.to(torch.int64)
    empty = flat.new_empty(0)
    return n, below, [torch.cat(v) if v else empty for v in values]


_GROUP = 16  # entries screened together by _nonzero_sparse


def _nonzero_sparse(flags: Tensor, scratch: Tensor) -> Tensor:
    """Ascending indices of the non-zeros of 0/1 ``flags`` (m,), when few are non-zero: a sum over
    groups of _GROUP entries (strided, so that clustered hits spread over groups) screens out
    the groups without any, and ``nonzero`` scans only the rest (``nonzero`` over every entry costs
    about 3x the three float kernels of the window test). ``scratch``: (m,) float, overwritten."""
    m = flags.numel()
    if m % _GROUP:
        return flags.nonzero().squeeze(1)
    groups = m // _GROUP
    strided = flags.view(_GROUP, groups)  # entry g·groups + j is member g of group j
    hit = torch.sum(strided, 0, out=scratch[:groups])
    columns = hit.nonzero().squeeze(1)  # groups with some non-zero
    members = strided.index_select(1, columns)  # (_GROUP, k)
    g, j = members.nonzero(as_tuple=True)
    return (g * groups + columns[j]).sort().values


def exact_from_window(given: TiesWindow, partials: Iterator[tuple[int, Tensor, list[Tensor]]]) -> TiesSearch:
    """Fold of stage ``window``: the thresholds whose rank falls inside their window, exactly."""
    n = 0
    below: Tensor | None = None
    kept: list[list[Tensor]] | None = []
    held = 0
    if not given.keep_values:
        kept = None
    for entries, counts, inside in partials:
        n += entries
        below = counts if below is None else below + counts
        if kept is not None:
            held += sum(v.numel() for v in inside)
            if held > _WINDOW_CAP:  # the windows are too wide for memory: exact passes instead
                kept = None
            else:
                kept.append(inside)
    if below is None:
        raise ValueError("TIES thresholds need at least one unit")
    rank = trim_rank(n, given.keep_fraction)
    assert rank is not None  # these stages run only when something is trimmed
    num_tasks = below.shape[0]
    thresholds = torch.full((num_tasks,), float("nan"), dtype=given.low.dtype)
    for t in range(num_tasks):
        if kept is None:
            break
        values = torch.cat([unit[t] for unit in kept])
        within = rank - int(below[t])
        if 0 <= within < values.numel():
            thresholds[t] = values.kthvalue(within + 1).values
    return TiesSearch(given.keep_fraction, thresholds, torch.full((num_tasks,), rank, dtype=torch.int64))


def bucket_counts(task_vectors: Tensor, ctx: UnitContext, given: TiesSearch) -> Tensor:
    """Map of stage ``buckets``: per task the counts of the magnitudes' top-16-bit buckets. (T, 65536)."""
    bits, width = _magnitude_bits(task_vectors.reshape(task_vectors.shape[0], -1))
    return torch.stack(
        [torch.bincount((row >> (width - _TOP)).to(torch.int64), minlength=_BUCKETS) for row in bits]
    )


def find_buckets(given: TiesSearch, partials: Iterator[Tensor]) -> TiesSearch:
    """Fold of stage ``buckets``: each missed threshold's bucket and its rank within the bucket."""
    total: Tensor | None = None
    for counts in partials:
        total = counts if total is None else total + counts
    assert total is not None
    buckets, ranks = torch.zeros_like(given.rank), given.rank.clone()
    for t in range(total.shape[0]):
        cum = total[t].cumsum(0)
        rank = int(given.rank[t])
        bucket = int(torch.searchsorted(cum, torch.tensor([rank]), right=True)[0])
        buckets[t] = bucket
        ranks[t] = rank - (int(cum[bucket - 1]) if bucket else 0)
    return TiesSearch(given.keep_fraction, given.thresholds, ranks, buckets)


def boundary_values(task_vectors: Tensor, ctx: UnitContext, given: TiesSearch) -> list[Tensor]:
    """Map of stage ``boundary``: per task whose threshold is not found, what lies in its bucket:
    in float32 the counts of the magnitudes' low 16 bits (65536,) int64, so that a bucket holding
    a large share of the values (quantised weights: bfloat16 task vectors take few distinct values)
    never travels; in float64, the magnitudes themselves."""
    flat = task_vectors.reshape(task_vectors.shape[0], -1)
    bits, width = _magnitude_bits(flat)
    out = []
    for t in range(flat.shape[0]):
        if not bool(torch.isnan(given.thresholds[t])):
            out.append(flat.new_empty(0))
            continue
        assert given.bucket is not None
        inside = (bits[t] >> (width - _TOP)) == int(given.bucket[t])
        if width == 32:
            low = (bits[t][inside] & (_BUCKETS - 1)).to(torch.int64)
            out.append(torch.bincount(low, minlength=_BUCKETS))
        else:
            out.append(flat[t].abs()[inside])
    return out


def exact_from_boundary(given: TiesSearch, partials: Iterator[list[Tensor]]) -> TiesStats:
    """Fold of stage ``boundary``: the missed thresholds, each the rank-th value of its bucket (in
    float32: the bucket's top 16 bits and the low 16 bits at that rank of its counts)."""
    per_task: list[list[Tensor]] = [[] for _ in range(given.thresholds.shape[0])]
    counts: list[Tensor | None] = [None] * given.thresholds.shape[0]
    for values in partials:
        for t, v in enumerate(values):
            if v.dtype == torch.int64:
                held = counts[t]
                counts[t] = v if held is None else held + v
            elif v.numel():
                per_task[t].append(v)
    thresholds = given.thresholds.clone()
    for t, chunks in enumerate(per_task):
        total = counts[t]
        if total is not None and int(total.sum()):
            assert given.bucket is not None
            rank = torch.tensor([int(given.rank[t])])
            digit = int(torch.searchsorted(total.cumsum(0), rank, right=True)[0])
            key = (int(given.bucket[t]) << (32 - _TOP)) | digit  # the magnitude's float32 bits
            thresholds = thresholds.to(torch.float32)
            thresholds[t] = torch.tensor([key], dtype=torch.int32).view(torch.float32)[0]
        elif chunks:
            bucket = torch.cat(chunks)
            thresholds = thresholds.to(bucket.dtype)
            thresholds[t] = bucket.kthvalue(int(given.rank[t]) + 1).values
    return TiesStats(thresholds=thresholds, majority_sign=None)


def sign_total(task_vectors: Tensor, ctx: UnitContext, given: TiesStats | TiesSearch | None) -> int:
    """Map of stage ``sign``: Σ over the unit's entries of the elected sign s = sign(Σ_t trimmed_t)."""
    thresholds = given.thresholds if given is not None else torch.zeros(())
    found = ctx.scratch.get(("ties-sign-total", id(thresholds)))  # the merge of this unit found it
    if found is not None:
        return int(found)
    summed = trim(task_vectors.reshape(task_vectors.shape[0], -1), thresholds).sum(0)
    return int(torch.sign(summed).sum())


def majority(given: TiesStats | None, partials: Iterator[int]) -> TiesStats:
    """Fold of stage ``sign``: the sign of the total."""
    thresholds = given.thresholds if given is not None else torch.zeros(())
    return TiesStats(thresholds=thresholds, majority_sign=float(_sign(sum(partials))))


def _missed(given: Any) -> bool:
    return isinstance(given, TiesSearch) and bool(torch.isnan(given.thresholds).any())


def _as_stats(given: Any) -> Any:
    """A search whose thresholds are all found becomes statistics (majority still unknown)."""
    if isinstance(given, TiesSearch):
        return TiesStats(thresholds=given.thresholds, majority_sign=None)
    if given is None:  # nothing is trimmed
        return TiesStats(thresholds=torch.zeros(()), majority_sign=None)
    return given


def trim_rank(n: int, keep_fraction: float) -> int | None:
    """0-based rank of the threshold τ among n magnitudes: the (n − m)-th smallest, m = int(n·k).

    ``None`` when every entry is kept (m = n).
    """
    kept = int(n * keep_fraction)
    return None if kept >= n else n - kept - 1


def trim(flat: Tensor, thresholds: Tensor) -> Tensor:
    """Step 1: zero every entry below its task's threshold; ties at τ are kept. (T, n) -> (T, n)."""
    return flat * (flat.abs() >= thresholds.to(flat).reshape(-1, 1))


def elect_sign(trimmed: Tensor, majority_sign: float | None = None) -> Tensor:
    """Step 2: s = sign(Σ_t trimmed_t); where s = 0, the sign of Σ s over the scope. (T, n) -> (n)."""
    return elect_from_sum(trimmed.sum(0), majority_sign)


def elect_from_sum(summed: Tensor, majority_sign: float | None = None) -> Tensor:
    """Step 2 from Σ_t trimmed_t (n): its sign, the majority sign where it is 0."""
    signs = torch.sign(summed)  # (n)
    if majority_sign is None:
        majority_sign = float(torch.sign(signs.sum()))
    return torch.where(signs == 0, torch.full_like(signs, majority_sign), signs)


def disjoint_mean(trimmed: Tensor, signs: Tensor) -> Tensor:
    """Step 3: mean of the trimmed values agreeing with the elected sign (x > 0 where s > 0, x < 0
    where s ≤ 0), divided by max(1, count of such non-zeros). (T, n), (n) -> (n)."""
    unit_sign = torch.where(signs > 0, 1.0, -1.0).to(trimmed)  # s ≤ 0 counts as negative
    agree = (trimmed * unit_sign) > 0  # (T, n): x > 0 where s > 0, x < 0 elsewhere (never 0 or NaN)
    selected = trimmed * agree
    return selected.sum(0) / agree.sum(0).clamp(min=1).to(trimmed.dtype)


def global_merge(flat: Tensor, thresholds: Tensor, majority_sign: float | None, ctx: UnitContext) -> Tensor:
    """Steps 1–3 given the global thresholds: the same values, bit for bit, as ``trim``,
    ``elect_from_sum`` and ``disjoint_mean``, computed on blocks of columns that stay in cache,
    with float-only kernels and the sums over tasks added in task order. (T, n) -> (n).

    With ``majority_sign`` None (the fused sign stage still running) the unit's Σ sign(Σ_t
    trimmed_t) is left in ``ctx.scratch`` for it, and a unit where some entry's trimmed values
    cancel to exactly 0 is :class:`Deferred`."""
    num_tasks, n = flat.shape
    tau = thresholds.to(flat.dtype).reshape(-1, 1).expand(num_tasks, 1)  # (T, 1), as ``trim`` compares
    merged = torch.empty(n, dtype=flat.dtype, device=flat.device)
    width = min(n, _BLOCK)
    trimmed, flags = (flat.new_empty(num_tasks, width) for _ in range(2))
    summed, unit, count = (flat.new_empty(width) for _ in range(3))
    sign_total, deferred = 0, False
    # every τ_t > 0 (or NaN): a kept value is non-zero, and the kept flags count the non-zero
    # trimmed values (a NaN trimmed value makes its sum NaN, never 0)
    positive = not bool((tau <= 0).any())
    for start in range(0, n, _BLOCK):
        stop = min(n, start + _BLOCK)
        w = stop - start
        block, block_trimmed, block_flags = flat[:, start:stop], trimmed[:, :w], flags[:, :w]
        block_summed, block_unit, block_count = summed[:w], unit[:w], count[:w]
        # step 1: x where |x| ≥ τ_t, else ±0 (NaN stays NaN), as ``trim``
        torch.ge(torch.abs(block, out=block_trimmed), tau, out=block_flags)
        torch.mul(block, block_flags, out=block_trimmed)
        block_summed.zero_()
        for t in range(num_tasks):
            block_summed.add_(block_trimmed[t])  # the same order of additions as trimmed.sum(0)
        # step 2: the unit sign of the elected sign: +1 where s > 0 (s = 0 takes the majority),
        # −1 elsewhere
        if majority_sign is None:  # the fused sign stage's share of this block
            # does some entry's Σ_t trimmed_t cancel to 0 with a trimmed value ≠ 0? (a dot
            # product of 0/1 flags and small whole numbers: exact)
            if not positive:  # a kept value may be 0 (τ_t ≤ 0): count the non-zero ones
                torch.ne(block_trimmed, 0, out=block_flags)
            torch.sum(block_flags, 0, out=block_count)  # non-zero trimmed values per entry
            torch.eq(block_summed, 0, out=block_unit)
            deferred = deferred or bool(torch.dot(block_unit, block_count) > 0)
            torch.sign(block_summed, out=block_unit)
            sign_total += int(block_unit.sum())
            if deferred:
                continue  # only the sign stage's sums from here on
        else:
            torch.sign(block_summed, out=block_unit)
        block_unit.add_(0.5 if (majority_sign is None or majority_sign > 0) else -0.5).sign_()
        block_unit.nan_to_num_(nan=-1.0)  # a NaN sum (--allow-nonfinite) counts as s ≤ 0
        # step 3: the mean of the trimmed values agreeing with the elected sign
        torch.mul(block_trimmed, block_unit, out=block_flags)
        torch.gt(block_flags, 0, out=block_flags)  # 1.0 where the trimmed value agrees
        torch.sum(block_flags, 0, out=block_count)  # exact: whole numbers ≤ T
        selected = merged[start:stop].zero_()
        for t in range(num_tasks):
            selected.addcmul_(block_trimmed[t], block_flags[t])  # + trimmed·1 or ±0, in task order
        selected.div_(block_count.clamp_(min=1))
    if majority_sign is None:
        ctx.scratch[("ties-sign-total", id(thresholds))] = sign_total
    if deferred:
        raise Deferred  # an entry whose trimmed values cancel takes the majority sign
    return merged


@register("ties")
class Ties(Method):
    """TIES-Merging: M = λ · disjoint_mean(elect(trim_k(Δ))) (Yadav et al., NeurIPS 2023, Alg. 1)."""

    params = TiesParams
    lam_kind = LamKind.LINEAR
    scope = Scope.GLOBAL
    default_lam = 1.0
    lam_min = 0.0
    paper_lam_ranges = paper_ranges(multitask=(0.1, 1.5))
    single_model_identity = False
    order_invariant = True
    summary = (
        "trim each task vector to its top-k magnitudes, elect a sign per entry, average the agreeing values"
    )
    data_free = True
    reported = "Weight Weaving Table 2, mean of 9 cells: λ = 1 68.39, woven 71.21; 8 tasks: ViT-B/32 72.4, ViT-L/14 86.0 (WUDI README)"
    reference = "prateeky2806/ties-merging"

    def stages(self, p: Hyperparameters) -> list[Stage]:
        """Global scope: a sample, one pass for the exact thresholds (two more only if the sample
        misplaced a window), and the majority sign fused with the merge."""
        assert isinstance(p, TiesParams)
        if p.scope != "global":
            return []
        sign = Stage(
            "sign",
            sign_total,
            lambda given, parts: majority(_as_stats(given), parts),
            fused=True,
            pending=_as_stats,
        )
        if p.keep_fraction >= 1:  # nothing is trimmed
            return [sign]
        keep = p.keep_fraction
        return [
            Stage("sample", sample_magnitudes, lambda _, parts: place_window(keep, parts), sample=_SAMPLE),
            Stage("window", window_values, exact_from_window),
            Stage("buckets", bucket_counts, find_buckets, when=_missed, combine=torch.add),
            Stage("boundary", boundary_values, exact_from_boundary, when=_missed),
            sign,
        ]

    def row_chunks(self, p: Hyperparameters) -> bool:
        assert isinstance(p, TiesParams)
        return p.scope == "global"  # given the global thresholds and sign, entry by entry

    def compute(self, task_vectors: Tensor, p: Hyperparameters, ctx: UnitContext) -> LamForm:
        assert isinstance(p, TiesParams)
        flat = task_vectors.reshape(task_vectors.shape[0], -1)  # (T, n)
        if p.scope == "global" and isinstance(ctx.stats, TiesStats):
            thresholds, majority_sign = ctx.stats.thresholds, ctx.stats.majority_sign
            merged = global_merge(flat, thresholds, majority_sign, ctx)
            return LamForm(offset=None, slope=merged.reshape(task_vectors.shape[1:]))
        # scope="tensor": the same steps over this tensor alone
        thresholds = self._tensor_thresholds(flat, p.keep_fraction)
        trimmed = trim(flat, thresholds)  # (T, n)
        merged = disjoint_mean(trimmed, elect_from_sum(trimmed.sum(0), None))  # (n)
        return LamForm(offset=None, slope=merged.reshape(task_vectors.shape[1:]))

    @staticmethod
    def _tensor_thresholds(flat: Tensor, keep_fraction: float) -> Tensor:
        rank = trim_rank(flat.shape[1], keep_fraction)
        if rank is None:
            return torch.zeros(flat.shape[0], dtype=flat.dtype, device=flat.device)
        return flat.abs().kthvalue(rank + 1, dim=1).values  # (T,)


def _sign(total: int) -> int:
    return (total > 0) - (total < 0)
