"""What every merge method is: typed hyperparameters, declared metadata and one pure function.

A method sees the task vectors of one unit of work (one parameter tensor) and returns the merged
task vector for it as a :class:`LamForm` ``offset + λ·slope``. Every method of the library is
linear (``offset is None``), affine (CART) or constant in λ (weight averaging: ``slope is None``),
which is what lets Weight Weaving pool any number of λ values at the cost of one merge.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

R = TypeVar("R")


class Hyperparameters(BaseModel):
    """Base of every method's hyperparameters: a typo or a bad value is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Scope(str, enum.Enum):
    """Over what a method computes its statistics (docs/algorithms.md, conventions)."""

    ELEMENTWISE = "per-parameter"  # no statistic shared between entries; any chunking is exact
    TENSOR = "tensor"  # a statistic per parameter tensor (top-k threshold, SVD)
    ROW = "row"  # per slice along the last dimension
    GLOBAL = "global"  # one statistic over all merged parameters, flattened in sorted-name order


class LamKind(str, enum.Enum):
    """How λ enters the merged task vector."""

    LINEAR = "linear"  # M(λ) = λ·g(Δ)
    AFFINE = "affine"  # M(λ) = a(Δ) + λ·b(Δ)
    NONE = "none"  # no λ: M = a(Δ)
    NONLINEAR = "nonlinear"  # M(λ) = f(Δ, λ) with no closed form: evaluated afresh at every λ


@dataclass(frozen=True)
class LamForm:
    """A merged task vector as a function of λ: ``offset + lam * slope`` (either part may be absent)."""

    offset: Tensor | None
    slope: Tensor | None

    def at(self, lam: float) -> Tensor:
        """The merged task vector at one λ (a new tensor)."""
        if self.slope is None:
            assert self.offset is not None
            return self.offset.clone()
        if self.offset is None:
            return self.slope * lam
        return self.offset + lam * self.slope


# scan(fn) runs fn(task_vectors, ctx) over every unit of the merge, in sorted parameter-name order,
# and returns the list of results. Global-scope methods use it for their first passes.
Scanner = Callable[[Callable[[Tensor, "UnitContext"], R]], list[R]]


@dataclass(frozen=True)
class Stage:
    """One streamed pass of a method over every merged unit: a map per unit, a fold on the driver.

    A global-scope method declares its passes as a list of stages (:meth:`Method.stages`); the
    runner reads the checkpoints once per stage, so the plan shows how many times each byte is read.

    - ``map(task_vectors, ctx, given) -> partial`` runs on one unit: ``task_vectors`` (T, *shape)
      in the compute dtype (for a ``sample`` stage, a subset of its rows: (T, r, *rest)), ``ctx`` its
      :class:`UnitContext`, ``given`` what the previous stage's fold returned (``None`` for the first).
      It keeps no state between units and does no I/O, and returns something small (counts, a
      histogram, a few values), never a view of ``task_vectors`` (the runner reuses that buffer). ``map`` is a module-level function (or a ``functools.partial`` of
      one) and ``given`` holds only tensors and numbers, so both pickle for a process or Ray worker.
    - ``fold(given, partials) -> result`` runs on the driver. ``partials`` is an iterator over the
      map's results in sorted-unit order; fold consumes it as it comes (a running sum) and returns
      the next stage's ``given``. The last stage's result is the method's statistics (``ctx.stats``).
    - ``when(given)``: run the stage only if this is true (a fallback pass); otherwise its ``given``
      passes through unchanged.
    - ``sample``: read only about this many values per task vector, spread evenly over the rows of
      every unit (an estimate that a later exact stage checks); a runner may also hand whole units.
    - ``fused``: the stage runs in the merge pass itself, on the tensors the merge reads. Its result
      is known only when that pass ends: a unit whose merge needs it raises :class:`Deferred`, and
      the runner merges that unit again once the fold is known (only the last stage may be fused).
      ``pending(given)`` gives the statistics the merge sees meanwhile (default: ``given``).
    - ``combine(a, b)``: two partials as one, when the fold only sums them (counts, histograms):
      a distributed executor then combines a task's partials on its worker and sends one.
    """

    name: str
    map: Callable[[Tensor, UnitContext, Any], Any]
    fold: Callable[[Any, Iterator[Any]], Any]
    when: Callable[[Any], bool] | None = None
    sample: int | None = None
    fused: bool = False
    pending: Callable[[Any], Any] | None = None
    combine: Callable[[Any, Any], Any] | None = None


class Deferred(Exception):
    """Raised by a method's merge of one unit that needs the result of a fused stage not yet known."""


def paper_ranges(
    multitask: tuple[float, float] = (0.1, 1.0),
    continual: tuple[float, float] = (0.1, 1.0),
    domain: tuple[float, float] = (0.1, 1.0),
) -> dict[str, tuple[float, float]]:
    """The paper's λ search range per setup (Weight Weaving, Section 4): 0.1–1.0 unless stated."""
    return {"multitask": multitask, "continual": continual, "domain": domain}


def seed_for(seed: int, *salt: object) -> int:
    """A 63-bit seed derived from the user's seed and any salt (parameter name, task index)."""
    text = ":".join([str(seed), *map(str, salt)]).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & ((1 << 63) - 1)


# Where the random streams of chunked parameters stand: (stream seed, entries drawn) -> generator
# state (5 KB each), so the next chunk of rows continues a stream instead of drawing it from the start.
_STREAMS: OrderedDict[tuple[int, int], Tensor] = OrderedDict()
_STREAMS_LOCK = threading.Lock()
_STREAMS_KEPT = 256
_SKIP_BLOCK = 1 << 22  # draws discarded at a time while moving a stream forward


def _stream_at(stream: int, position: int) -> torch.Generator:
    """A generator seeded with ``stream`` that has made ``position`` 32-bit draws: from the nearest
    remembered state at or before ``position`` (a chunk before it), else from the seed."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(stream)
    with _STREAMS_LOCK:
        known = max((at for seed, at in _STREAMS if seed == stream and at <= position), default=0)
        state = _STREAMS.get((stream, known))
    if state is not None:
        gen.set_state(state)
    left = position - (known if state is not None else 0)
    discard = torch.empty(min(left, _SKIP_BLOCK)) if left > 0 else None  # one buffer per skip
    while left > 0:
        assert discard is not None
        step = min(left, _SKIP_BLOCK)
        torch.rand(step, generator=gen, out=discard[:step])  # one 32-bit draw per value
        left -= step
    return gen


def _remember_stream(stream: int, position: int, gen: torch.Generator) -> None:
    with _STREAMS_LOCK:
        _STREAMS[(stream, position)] = gen.get_state()
        _STREAMS.move_to_end((stream, position))
        while len(_STREAMS) > _STREAMS_KEPT:
            _STREAMS.popitem(last=False)


@dataclass(frozen=True)
class UnitContext:
    """Everything a method may know about the unit besides its tensors."""

    name: str
    seed: int = 0
    stats: Any = None  # what the method's global_stats returned, for global scope
    extras: dict[str, Any] = field(default_factory=dict)  # e.g. exemplar features (later methods)
    shape: tuple[int, ...] = ()  # the whole parameter's shape (a stage may see only some of its rows)
    # what the merge of this unit found and a fused stage may reuse (one dict per unit, per pass)
    scratch: dict[Any, Any] = field(default_factory=dict)
    base: Tensor | None = None  # the base tensor in the compute dtype (read-only), for needs_base methods
    stored_dtype: torch.dtype | None = None  # the base checkpoint's dtype of this parameter
    rows: tuple[int, int] | None = None  # rows start:stop of the parameter in this call (None: all)
    finite: bool = False  # the caller checked that the task vectors hold no NaN or ±Inf

    def generator(self, *salt: object) -> torch.Generator:
        """A CPU generator seeded from (seed, parameter name, salt): the same on every executor."""
        gen = torch.Generator(device="cpu")
        gen.manual_seed(seed_for(self.seed, self.name, *salt))
        return gen

    def piece_draws(
        self,
        sample: Callable[[tuple[int, ...], torch.Generator], Tensor],
        shape: tuple[int, ...],
        *salt: object,
    ) -> Tensor:
        """``sample(shape, generator)`` for the entries this call sees, equal to those entries of one
        draw over the whole parameter from :meth:`generator` ``(*salt)``.

        ``sample`` must take one 32-bit draw per entry, in order (``torch.rand`` in float32,
        ``torch.randint`` with a range below 2**32): a chunk of rows then starts its stream at its
        first entry's position, so merging in chunks gives the same bytes as merging whole.
        """
        if self.rows is None:
            return sample(shape, self.generator(*salt))
        stream = seed_for(self.seed, self.name, *salt)
        start = self.rows[0] * (math.prod(self.shape[1:]) if self.shape else 1)
        gen = _stream_at(stream, start)
        values = sample(shape, gen)
        _remember_stream(stream, start + math.prod(shape), gen)
        return values


class Method:
    """A merge method: a small pure function plus what it declares about itself.

    Subclasses set the class attributes and implement :meth:`compute`. ``compute`` must not modify
    its inputs, cast dtypes, or do any I/O.
    """

    name: ClassVar[str] = ""
    params: ClassVar[type[Hyperparameters]] = Hyperparameters
    lam_kind: ClassVar[LamKind] = LamKind.LINEAR
    scope: ClassVar[Scope] = Scope.ELEMENTWISE
    default_lam: ClassVar[float | None] = 1.0
    lam_min: ClassVar[float | None] = None  # smallest allowed λ (None: any real number)
    # The paper's λ search range per setup (multitask, continual, domain), step 0.1, ends included.
    paper_lam_ranges: ClassVar[dict[str, tuple[float, float]]] = {}
    # True when the method gives back the single model for T = 1 at its default λ.
    single_model_identity: ClassVar[bool] = True
    # True when permuting the fine-tuned models leaves the result unchanged (up to float rounding).
    order_invariant: ClassVar[bool] = True
    # True when the method draws random numbers (DARE): results depend on the seed.
    stochastic: ClassVar[bool] = False
    # How many fine-tuned models the method merges: (fewest, most or None for any number).
    num_models: ClassVar[tuple[int, int | None]] = (1, None)
    # True when the method needs the base weights themselves (``ctx.base``), not only task vectors.
    needs_base: ClassVar[bool] = False
    # True when the method needs data beyond the weights (exemplars, test inputs): it is run through
    # ``weightweaving.withdata`` and reported apart from the data-free methods.
    uses_data: ClassVar[bool] = False
    summary: ClassVar[str] = ""
    # Declared by every method (tests/methods/test_properties.py checks): whether it needs data
    # beyond the checkpoints, the CLIP figures its authors or the Weight Weaving paper report, and
    # the reference repository its spec was checked against (docs/algorithms.md).
    data_free: ClassVar[bool] = True
    reported: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    # Why the method has no deterministic oracle cases (tests/data/oracles/<name>/), starting with
    # the kind of reason: "statistical: ...", "uses data: ...", "peer: ..." (checked against a
    # peer tool's stored outputs instead). None: it must have oracle cases.
    oracle_exempt: ClassVar[str | None] = None

    def scope_of(self, p: Hyperparameters) -> Scope:
        """The scope for these hyperparameters (methods with a ``scope`` option override this)."""
        chosen = getattr(p, "scope", None)
        return Scope(chosen) if chosen is not None else self.scope

    def row_chunks(self, p: Hyperparameters) -> bool:
        """True when each row (first dimension) of the merged tensor depends only on that row of
        the task vectors (given the global statistics): large units are then merged in chunks of
        rows, so memory is bounded by a chunk, not by the largest tensor. The global first passes
        (:meth:`stages`, the ``scan`` of :meth:`global_stats`) then see chunks of rows too
        (``ctx.rows``), and a method drawing random numbers uses :meth:`UnitContext.piece_draws`.
        False by default."""
        return False

    def propagates_nonfinite(self, p: Hyperparameters) -> bool:
        """True when the merged task vector holds a NaN or Inf wherever a task vector does (a sum
        with nonzero weights, not a selection): the merge pass then checks the merged task vector
        for them, T times fewer values than the task vectors, and looks for the culprit only when
        it finds one. False by default (the task vectors are checked as they are read)."""
        return False

    def one_thread(self, p: Hyperparameters) -> bool:
        """True when the merge is bound by memory, not arithmetic, so on a busy CPU it runs with one
        PyTorch intra-op thread (:func:`~weightweaving.engine.execute.entrywise_threads`).
        By default: methods merged in chunks of rows and elementwise-scope methods."""
        return self.row_chunks(p) or self.scope_of(p) is Scope.ELEMENTWISE

    def stages(self, p: Hyperparameters) -> list[Stage]:
        """The streamed passes of a global-scope method (see :class:`Stage`); none by default."""
        return []

    def global_stats(self, scan: Scanner[Any], p: Hyperparameters, seed: int) -> Any:
        """First passes over the whole model for global scope; the result reaches ``ctx.stats``.

        By default the method's :meth:`stages`, each as one ``scan`` over whole units (no fusion).
        """
        given: Any = None
        for stage in self.stages(p):
            if stage.when is None or stage.when(given):
                given = stage.fold(given, iter(scan(functools.partial(_call_map, stage.map, given=given))))
        return given

    def compute(self, task_vectors: Tensor, p: Hyperparameters, ctx: UnitContext) -> LamForm:
        """The merged task vector of one unit. ``task_vectors``: (T, *shape), float, read-only."""
        raise NotImplementedError  # pragma: no cover - every registered method overrides it

    def compute_at(self, task_vectors: Tensor, p: Hyperparameters, lam: float, ctx: UnitContext) -> Tensor:
        """The merged task vector of one unit at one λ: what a ``NONLINEAR`` method implements
        instead of :meth:`compute` (it has no ``offset + λ·slope`` form)."""
        raise NotImplementedError  # pragma: no cover - every non-linear method overrides it

    # -- helpers for the rest of the library ------------------------------------------------------
    def parse_params(self, values: dict[str, Any] | None = None) -> Hyperparameters:
        """Validate hyperparameters, raising :class:`OptionError` that names the option."""
        from ..errors import OptionError

        try:
            return self.params(**(values or {}))
        except Exception as exc:  # pydantic.ValidationError
            raise OptionError(_describe_validation(self.name, exc, list(self.params.model_fields))) from None

    def check_lam(self, lam: float | None) -> None:
        from ..errors import OptionError

        if self.lam_kind is LamKind.NONE:
            return
        if lam is None:
            raise OptionError(f"method '{self.name}' needs a λ (--lambda)")
        if self.lam_min is not None and lam < self.lam_min:
            raise OptionError(f"--lambda {lam} is out of range for '{self.name}': must be >= {self.lam_min}")

    def check_num_models(self, count: int) -> None:
        """Refuse a number of fine-tuned models the method cannot merge."""
        from ..errors import OptionError

        low, high = self.num_models
        if count < low or (high is not None and count > high):
            wanted = (
                f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low} to {high}"
            )
            raise OptionError(
                f"method '{self.name}' merges {wanted} fine-tuned model{'s' if high != 1 else ''}, got {count}"
            )

    def merge_unit(
        self, task_vectors: Tensor, p: Hyperparameters, lam: float | None, ctx: UnitContext
    ) -> Tensor:
        """``compute`` evaluated at one λ (``compute_at`` for a method not linear or affine in λ)."""
        if self.lam_kind is LamKind.NONLINEAR:
            return self.compute_at(task_vectors, p, 1.0 if lam is None else lam, ctx)
        form = self.compute(task_vectors, p, ctx)
        return form.at(1.0 if lam is None else lam)

    def merge_unit_sweep(
        self, task_vectors: Tensor, p: Hyperparameters, lams: Sequence[float], ctx: UnitContext
    ) -> Iterator[Tensor]:
        """:meth:`merge_unit` at every λ of ``lams``, in order, one tensor at a time.

        Equal to calling ``merge_unit`` per λ (up to float rounding), with the λ-independent work
        done once: a method linear, affine or constant in λ computes its form once; a ``NONLINEAR``
        one calls ``compute_at`` per λ unless it knows better (SVC over a base linear in λ: one base
        merge and one SVD for every λ). A caller that folds each tensor before asking for the next
        holds one at a time.
        """
        if self.lam_kind is LamKind.NONLINEAR:
            for lam in lams:
                yield self.compute_at(task_vectors, p, lam, ctx)
            return
        form = self.compute(task_vectors, p, ctx)
        for lam in lams:
            yield form.at(lam)


def _call_map(
    map_fn: Callable[[Tensor, UnitContext, Any], Any], task_vectors: Tensor, ctx: UnitContext, *, given: Any
) -> Any:
    return map_fn(task_vectors, ctx, given)


def _describe_validation(method: str, exc: Exception, valid: list[str]) -> str:
    errors: Sequence[dict[str, Any]] = getattr(exc, "errors", lambda: [])()
    if not errors:
        return f"method '{method}': {exc}"
    first = errors[0]
    loc = ".".join(str(x) for x in first.get("loc", ())) or "?"
    if first.get("type") == "extra_forbidden":
        from ..errors import did_you_mean

        listed = ", ".join(valid) or "none"
        return f"method '{method}' has no hyperparameter '{loc}' (valid: {listed}){did_you_mean(loc, valid)}"
    value = first.get("input")
    return f"method '{method}': hyperparameter '{loc}'={value!r}: {first.get('msg', 'invalid')}"
