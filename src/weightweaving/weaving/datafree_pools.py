"""Data-free pools beyond the paper's: robust statistics, agreement weights, a per-tensor λ and
calibration after pooling. Each sees only the members of one tensor (the task vectors and the merged
vectors), never data.

They need more than a running sum, so they keep the member *groups* of the unit (a ``LamForm`` and
its λ values) and expand them entry chunk by entry chunk when the unit is done: a method linear or
affine in λ contributes one or two tensors whatever the number of λ points, so memory stays
independent of the search space (a ``NONLINEAR`` method such as SVC contributes one per point).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from pydantic import BaseModel, Field, field_validator
from torch import Tensor

from ..errors import OptionError
from ..methods.base import Hyperparameters, LamForm, UnitContext
from ..methods.steps import check_regex, name_matches
from ..methods.svc import calibrate
from .pools import Pool, make_pool, register_pool

_CHUNK = 1 << 22  # member values expanded at a time (bounds the (N, chunk) temporaries)


def _values(form: LamForm, lam: float | None) -> Tensor:
    if form.slope is None:
        assert form.offset is not None
        return form.offset
    return form.at(1.0 if lam is None else lam)


class HeldPool(Pool):
    """Keeps the unit's member groups; task vectors are the groups whose λ is None."""

    def begin(self, num_members: int, like: Tensor, ctx: UnitContext) -> None:
        self.groups: list[tuple[LamForm, tuple[float | None, ...]]] = []
        self.like = like
        self.ctx = ctx
        self.num_members = num_members

    def add(self, form: LamForm, lams: Sequence[float | None], first_index: int) -> None:
        self.groups.append((form, tuple(lams)))

    def task_vectors(self) -> list[Tensor]:
        return [_values(form, None) for form, lams in self.groups if lams == (None,)]

    def merged_members(self) -> Iterator[tuple[float | None, Tensor]]:
        """The merged members (not the task vectors), one tensor at a time."""
        for form, lams in self.groups:
            if lams != (None,):
                for lam in lams:
                    yield lam, _values(form, lam)

    def chunks(self) -> Iterator[tuple[slice, Tensor]]:
        """``(entry slice, members (N, chunk))`` over the flattened unit."""
        numel = self.like.numel()
        step = max(1, _CHUNK // max(1, self.num_members))
        for start in range(0, numel, step):
            part = slice(start, min(numel, start + step))
            rows = []
            for form, lams in self.groups:
                offset = None if form.offset is None else form.offset.reshape(-1)[part]
                slope = None if form.slope is None else form.slope.reshape(-1)[part]
                for lam in lams:
                    rows.append(_values(LamForm(offset, slope), lam))
            yield part, torch.stack(rows)


class TrimmedMeanParams(Hyperparameters):
    trim: float = Field(0.2, ge=0, lt=0.5, description="share of members dropped at each end, per entry")


@register_pool("trimmed_mean")
class TrimmedMeanPool(HeldPool):
    """Per entry, the mean of the members left after dropping the ``int(trim·N)`` smallest and
    largest values (a robust mean over A*)."""

    settings = TrimmedMeanParams
    trim = 0.2
    row_chunks = True

    def configure(self, p: BaseModel) -> None:
        assert isinstance(p, TrimmedMeanParams)
        self.trim = p.trim

    def result(self) -> Tensor:
        return _trimmed_mean(self, lambda n: int(self.trim * n))


@register_pool("median")
class MedianPool(HeldPool):
    """Per entry, the median of the members (the mean of the two middle ones when N is even)."""

    row_chunks = True

    def result(self) -> Tensor:
        return _trimmed_mean(self, lambda n: (n - 1) // 2)


def _trimmed_mean(pool: HeldPool, dropped: Callable[[int], int]) -> Tensor:
    """Per entry, the mean of the members once ``dropped(N)`` are removed at each end."""
    out = torch.empty(pool.like.numel(), dtype=pool.like.dtype, device=pool.like.device)
    for part, members in pool.chunks():  # (N, c)
        drop = dropped(members.shape[0])
        out[part] = members.sort(0).values[drop : members.shape[0] - drop].mean(0)
    return out.reshape(pool.like.shape)


@register_pool("agreement")
class AgreementPool(HeldPool):
    """Members weighted by how much they agree with the consensus of the tensor: ``w_j =
    max(0, cos(a_j, ā))`` with ``ā`` the mean of the members; ``Σ_j w_j a_j / Σ_j w_j`` (the mean
    when no member agrees). A member pointing away from the others counts less, or not at all."""

    def result(self) -> Tensor:
        consensus = torch.zeros_like(self.like)
        for form, lams in self.groups:
            for lam in lams:
                consensus.add_(_values(form, lam))
        consensus.div_(self.num_members)
        total = torch.zeros_like(self.like)
        weight_sum = 0.0
        for form, lams in self.groups:
            for lam in lams:
                member = _values(form, lam)
                weight = max(
                    0.0,
                    float(
                        torch.nn.functional.cosine_similarity(
                            member.reshape(1, -1), consensus.reshape(1, -1), eps=1e-30
                        )
                    ),
                )
                if weight > 0:
                    total.add_(member, alpha=weight)
                    weight_sum += weight
        return total.div_(weight_sum) if weight_sum > 0 else consensus


def _needs_task_vectors(pool: str, task_vectors: list[Tensor]) -> None:
    if not task_vectors:
        raise OptionError(f"pool '{pool}' needs the task vectors among the members (pool_over='all')")


@register_pool("fitted_lambda")
class FittedLambdaPool(HeldPool):
    """A per-tensor λ chosen from the weights alone: the merged member whose least-squares
    coefficient on the task vectors is closest to one on average,
    ``argmin_j |mean_t ⟨a_j, Δ_t⟩/‖Δ_t‖² − 1|`` (zero task vectors left out; the smaller λ wins ties).

    Each task's own direction then gets back about its full strength: orthogonal task vectors keep
    Task Arithmetic's λ = 1, T identical ones get λ = 1/T (no direction counted T times), and layers
    where tasks overlap more get a smaller λ than layers where they do not — the same coefficient SVC
    computes per singular direction, here per tensor and over the search space."""

    def result(self) -> Tensor:
        task_vectors = self.task_vectors()
        _needs_task_vectors(self.name, task_vectors)
        kept = [(tv, float(tv.square().sum())) for tv in task_vectors if bool((tv != 0).any())]
        best: tuple[float, float, Tensor] | None = None
        for lam, member in self.merged_members():
            if not kept:
                score = 0.0
            else:
                coefficient = sum(float((member * tv).sum()) / norm for tv, norm in kept) / len(kept)
                score = abs(coefficient - 1.0)
            order = float("inf") if lam is None else abs(lam)
            if best is None or (score, order) < (best[0], best[1]):
                best = (score, order, member)
        if best is None:
            raise OptionError(f"pool '{self.name}' needs merged members (a search space)")
        return best[2].clone()


class CalibratedParams(Hyperparameters):
    pool: str = Field("mean", description="the pool whose result is calibrated")
    alpha: float | None = Field(None, gt=0, description="SVC's floor on s_rt (default 1/T)")
    calibrate_exclude: str | None = Field(
        "embedding|text_projection", description="regex: 2-D parameters left uncalibrated, as in svc"
    )
    pool_hyperparameters: dict[str, Any] = Field(default_factory=dict, description="of the inner pool")

    _check = field_validator("calibrate_exclude")(check_regex)


@register_pool("calibrated")
class CalibratedPool(HeldPool):
    """Singular value calibration (SVC, Li et al. 2026) of another pool's result: per weight matrix,
    each singular direction of the pooled vector is divided by how many times over the task vectors
    count it (``methods/svc.py:calibrate``). Other parameters: the inner pool's result."""

    settings = CalibratedParams

    def configure(self, p: BaseModel) -> None:
        assert isinstance(p, CalibratedParams)
        if p.pool == "calibrated":
            raise OptionError("pool 'calibrated' cannot calibrate itself")
        self.p = p
        self.template = make_pool(p.pool, p.pool_hyperparameters)

    def begin(self, num_members: int, like: Tensor, ctx: UnitContext) -> None:
        super().begin(num_members, like, ctx)
        self.inner = copy.copy(self.template)  # per-unit state, as the weaver copies this pool
        self.inner.begin(num_members, like, ctx)

    def add(self, form: LamForm, lams: Sequence[float | None], first_index: int) -> None:
        if lams == (None,):
            super().add(form, lams, first_index)  # keep the task vectors only
        self.inner.add(form, lams, first_index)

    def result(self) -> Tensor:
        pooled = self.inner.result()
        task_vectors = self.task_vectors()
        _needs_task_vectors(self.name, task_vectors)
        if (
            pooled.ndim != 2
            or min(pooled.shape) == 0
            or name_matches(self.p.calibrate_exclude, self.ctx.name)
        ):
            return pooled
        alpha = self.p.alpha if self.p.alpha is not None else 1 / len(task_vectors)
        return calibrate(pooled, torch.stack(task_vectors), alpha)


@register_pool("nearest_mean")
class NearestMeanPool(Pool):
    """Per tensor, the merged member nearest (L2) to the mean task vector ``Δ̄ = mean_t Δ_t``:
    ``argmin_j ‖a_j − Δ̄‖`` over the search space (the smaller λ wins ties).

    A per-tensor choice of λ from the weights alone: of the method's merges, the one that moves this
    tensor as weight averaging would, in both size and direction, while keeping the method's own way of
    resolving interference. For a method linear in λ, ``a(λ) = λ·g``, this is the grid λ nearest the
    least-squares coefficient ``⟨g, Δ̄⟩ / ‖g‖²``: 1/T for Task Arithmetic (whatever the overlap), larger
    for methods whose merge at λ = 1 is already of one task's size (TIES, MagMax).

    Streams: keeps the task vectors' running sum and the best member so far; a group linear or affine
    in λ is scored for all its λ values in closed form, ``‖r + λ·s‖² = ‖r‖² + 2λ⟨r, s⟩ + λ²‖s‖²``, so
    memory does not grow with the search space. Needs the task vectors first (``pool_over='all'``, the
    weaver's member order)."""

    def begin(self, num_members: int, like: Tensor, ctx: UnitContext) -> None:
        self.total = torch.zeros_like(like, dtype=torch.float64)
        self.count = 0
        self.best: tuple[float, float, LamForm, float | None] | None = None

    def add(self, form: LamForm, lams: Sequence[float | None], first_index: int) -> None:
        if lams == (None,):
            if self.best is not None:
                raise OptionError(f"pool '{self.name}' needs the task vectors before the merged members")
            self.total.add_(_values(form, None))
            self.count += 1
            return
        if self.count == 0:
            _needs_task_vectors(self.name, [])
        target = self.total / self.count
        offset = None if form.offset is None else form.offset.double()
        residual = -target if offset is None else offset - target
        rr = float(residual.square().sum())
        if form.slope is None:
            scores = [(rr, lam) for lam in lams]
        else:
            slope = form.slope.double()
            rs, ss = float((residual * slope).sum()), float(slope.square().sum())
            scores = []
            for lam in lams:
                at = 1.0 if lam is None else lam
                scores.append((rr + 2 * at * rs + at * at * ss, lam))
        for score, lam in scores:
            order = float("inf") if lam is None else lam
            if self.best is None or (score, order) < (self.best[0], self.best[1]):
                self.best = (score, order, form, lam)

    def result(self) -> Tensor:
        if self.best is None:
            raise OptionError(f"pool '{self.name}' needs merged members (a search space)")
        return _values(self.best[2], self.best[3]).clone()


@register_pool("norm_filtered")
class NormFilteredPool(Pool):
    """The mean of the task vectors and of the merged members no larger than the mean task vector:
    ``mean({Δ_t} ∪ {a_j : ‖a_j‖ ≤ ‖Δ̄‖})`` per tensor, ``Δ̄ = mean_t Δ_t`` (the task vectors alone
    when no merged member is that small).

    A data-free filter of the search space (the paper's conclusion): a merge that moves this tensor
    further than weight averaging would is left out of the pool. Streams: the task vectors' sum and the
    pooled sum; a group linear or affine in λ is filtered for all its λ values in closed form
    (``‖r + λ·s‖² = ‖r‖² + 2λ⟨r, s⟩ + λ²‖s‖²``) and folded in one step, so memory does not grow with the
    search space. Needs the task vectors first (``pool_over='all'``, the weaver's member order)."""

    def begin(self, num_members: int, like: Tensor, ctx: UnitContext) -> None:
        self.tv_total = torch.zeros_like(like, dtype=torch.float64)
        self.total = torch.zeros_like(like, dtype=torch.float64)
        self.tvs = 0
        self.kept = 0
        self.merged_seen = False
        self.like = like
        self._last: tuple[Tensor, float] | None = None
        self._affine_sizes: list[float] = []

    def add(self, form: LamForm, lams: Sequence[float | None], first_index: int) -> None:
        if lams == (None,):
            if self.merged_seen:
                raise OptionError(f"pool '{self.name}' needs the task vectors before the merged members")
            self.tv_total.add_(_values(form, None))
            self.tvs += 1
            return
        self.merged_seen = True
        if self.tvs == 0:
            _needs_task_vectors(self.name, [])
        limit = float((self.tv_total / self.tvs).square().sum())
        offset = None if form.offset is None else form.offset.double()
        oo = 0.0 if offset is None else float(offset.square().sum())
        kept = [1.0 if lam is None else lam for lam in lams]
        if form.slope is None:
            kept = kept if oo <= limit * (1 + 1e-9) else []
            if kept:
                assert offset is not None
                self.total.add_(offset, alpha=float(len(kept)))
        else:
            slope = form.slope.double()
            os_ = 0.0 if offset is None else float((offset * slope).sum())
            ss = float(slope.square().sum())
            kept = [lam for lam in kept if oo + 2 * lam * os_ + lam * lam * ss <= limit * (1 + 1e-9)]
            if kept:
                if offset is not None:
                    self.total.add_(offset, alpha=float(len(kept)))
                self.total.add_(slope, alpha=float(sum(kept)))
        self.kept += len(kept)

    def result(self) -> Tensor:
        if self.tvs == 0:
            _needs_task_vectors(self.name, [])
        return ((self.tv_total + self.total) / (self.tvs + self.kept)).to(self.like.dtype)


def spectral_norm(tensor: Tensor) -> float:
    """The largest singular value of a tensor read as a matrix ``(shape[0], -1)``; a vector's length
    (float64, so the filter below does not depend on the dtype the tensors arrive in)."""
    x = tensor.detach().double()
    if x.ndim <= 1:
        return float(x.norm())
    if x.numel() == 0:
        return 0.0
    matrix = x.reshape(x.shape[0], -1)
    # σ₁² is the largest eigenvalue of the smaller Gram matrix: the same value as the SVD's to float64
    # rounding (the top eigenvalue is perfectly conditioned), at 2-4x less cost for these shapes
    gram = matrix @ matrix.T if matrix.shape[0] <= matrix.shape[1] else matrix.T @ matrix
    return math.sqrt(max(float(torch.linalg.eigvalsh(gram)[-1]), 0.0))


@register_pool("spectral_filtered")
class SpectralFilteredPool(Pool):
    """The mean of the task vectors and of the merged members whose spectral norm is no larger than the
    largest task vector's: ``mean({Δ_t} ∪ {a_j : σ₁(a_j) ≤ max_t σ₁(Δ_t)})`` per tensor (σ₁: the largest
    singular value of the tensor as a ``(rows, -1)`` matrix, a vector's length).

    A data-free filter of the search space (the paper's conclusion): a merge that stretches this tensor's
    strongest direction further than any single fine-tune did is left out of the pool; where no merge
    does (TSV, ISO-C and TIES at the paper's ranges, mostly) the pool *is* the paper's mean pool. Methods
    that add task vectors (Breadcrumbs, Task Arithmetic) on aligned tasks, as a continual sequence's,
    overshoot at large λ and keep only their small-λ merges.

    Streams: the task vectors' sum and largest σ₁, and the kept members' sum. A group linear in λ is
    filtered in closed form (``σ₁(λ·g) = |λ|·σ₁(g)``); an affine one and a constant are measured per λ,
    one member at a time. Cost: one singular value decomposition per task vector and per group (per
    member for affine and non-linear methods), the order of TSV's own. Needs the task vectors first
    (``pool_over='all'``, the weaver's member order)."""

    _TOLERANCE = 1e-9  # relative: a member equal to the largest task vector is kept

    def begin(self, num_members: int, like: Tensor, ctx: UnitContext) -> None:
        self.total = torch.zeros_like(like, dtype=torch.float64)
        self.count = 0
        self.tvs = 0
        self.limit = 0.0
        self.merged_seen = False
        self.like = like
        self._last: tuple[Tensor, float] | None = None
        self._affine_sizes: list[float] = []

    def _keeps(self, size: float) -> bool:
        return size <= self.limit * (1 + self._TOLERANCE)

    def _sigma(self, tensor: Tensor) -> float:
        """``spectral_norm``, remembered for the last tensor measured (a subclass asks again)."""
        if self._last is None or self._last[0] is not tensor:
            self._last = (tensor, spectral_norm(tensor))
        return self._last[1]

    def add(self, form: LamForm, lams: Sequence[float | None], first_index: int) -> None:
        if lams == (None,):
            if self.merged_seen:
                raise OptionError(f"pool '{self.name}' needs the task vectors before the merged members")
            vector = _values(form, None)
            self.total.add_(vector)
            self.limit = max(self.limit, spectral_norm(vector))
            self.tvs += 1
            self.count += 1
            return
        self.merged_seen = True
        if self.tvs == 0:
            _needs_task_vectors(self.name, [])
        values = [1.0 if lam is None else lam for lam in lams]
        if form.slope is not None and form.offset is None:  # λ·g: one decomposition for every λ
            size = self._sigma(form.slope)
            kept = [lam for lam in values if self._keeps(abs(lam) * size)]
            self.total.add_(form.slope, alpha=float(sum(kept)))
            self.count += len(kept)
            return
        if form.slope is None:  # the same member at every λ
            assert form.offset is not None
            if self._keeps(self._sigma(form.offset)):
                self.total.add_(form.offset, alpha=float(len(values)))
                self.count += len(values)
            return
        self._affine_sizes = []
        for lam in values:  # an affine group: each member measured on its own
            member = form.at(lam)
            self._affine_sizes.append(spectral_norm(member))
            if self._keeps(self._affine_sizes[-1]):
                self.total.add_(member)
                self.count += 1

    def result(self) -> Tensor:
        if self.tvs == 0:
            _needs_task_vectors(self.name, [])
        return (self.total / self.count).to(self.like.dtype)


class SpectralBlendedParams(Hyperparameters):
    blend: float = Field(
        0.25, ge=0, le=1, description="share of the σ₁-matched merge where members were dropped"
    )


@register_pool("spectral_blended")
class SpectralBlendedPool(SpectralFilteredPool):
    """``spectral_filtered``, moved toward the merge of weight averaging's strength where the filter
    dropped members: per tensor, if some merged member has ``σ₁(a_j) > max_t σ₁(Δ_t)``, the result is
    ``(1 − blend)·spectral_filtered + blend·a*`` with ``a*`` the merge whose σ₁ is nearest the mean
    task vector's, ``|σ₁(a*) − σ₁(Δ̄)|`` smallest (the smaller λ wins ties); otherwise it is
    ``spectral_filtered`` (so the paper's mean pool wherever no merge overshoots). For a group linear
    in λ (``λ·g``, λ ≥ 0) ``a*`` may lie between its λ points: ``λ·g`` with ``λ = σ₁(Δ̄)/σ₁(g)``
    clipped to the group's λ range; members given one by one (``closed_form=False``, non-linear
    methods) are chosen among.

    Where a method overshoots (sums of aligned task vectors), the kept small-λ merges and the task
    vectors still hold some of the overshoot's direction at one task's strength; ``a*`` is the merge
    scaled to the tasks' average instead. Streams as ``spectral_filtered`` does, keeping the best
    ``a*`` so far (one tensor; a group linear in λ is scored for all its λ in closed form,
    ``σ₁(λ·g) = |λ|·σ₁(g)``)."""

    settings = SpectralBlendedParams
    blend = 0.25

    def configure(self, p: BaseModel) -> None:
        assert isinstance(p, SpectralBlendedParams)
        self.blend = p.blend

    def begin(self, num_members: int, like: Tensor, ctx: UnitContext) -> None:
        super().begin(num_members, like, ctx)
        self.tv_sum = torch.zeros_like(like, dtype=torch.float64)
        self.dropped = 0
        self.anchor: tuple[float, float, LamForm, float] | None = None

    def _keeps(self, size: float) -> bool:
        kept = super()._keeps(size)
        self.dropped += not kept
        return kept

    def _consider(self, size: float, lam: float, form: LamForm, at: float) -> None:
        score = (abs(size - self.target), abs(lam))
        if self.anchor is None or score < (self.anchor[0], self.anchor[1]):
            self.anchor = (score[0], score[1], form, at)

    def add(self, form: LamForm, lams: Sequence[float | None], first_index: int) -> None:
        if lams == (None,):
            self.tv_sum.add_(_values(form, None))
        elif not self.merged_seen:
            self.target = spectral_norm(self.tv_sum / max(1, self.tvs))
        super().add(form, lams, first_index)
        if lams == (None,):
            return
        values = [1.0 if lam is None else lam for lam in lams]
        if form.slope is not None and form.offset is None:
            size = self._sigma(form.slope)
            for lam in values:
                self._consider(abs(lam) * size, lam, form, lam)
            low, high = min(values), max(values)
            if size > 0 and low >= 0:  # λ·g between the group's λ points, σ₁ = σ₁(Δ̄) if in range
                lam = min(max(self.target / size, low), high)
                self._consider(lam * size, lam, form, lam)
        elif form.slope is None:
            assert form.offset is not None
            size = self._sigma(form.offset)
            for lam in values:
                self._consider(size, lam, form, lam)
        else:
            for lam, size in zip(values, self._affine_sizes, strict=True):  # measured by add above
                self._consider(size, lam, form, lam)

    def result(self) -> Tensor:
        filtered = super().result()
        if self.dropped == 0 or self.anchor is None or self.blend == 0:
            return filtered
        _, _, form, lam = self.anchor
        anchor = form.at(lam) if form.slope is not None else _values(form, None)
        return (filtered.double() * (1 - self.blend) + anchor.double() * self.blend).to(self.like.dtype)
