"""Exemplar statistics gathered with forward hooks (uses data).

For each task ``t`` the exemplars run through the model loaded with ``θ_pre + scale·Δ_t``, one pass per
task (in batches), and forward pre-hooks record what enters every hookable layer:

* ``nn.Linear``: the Gram matrix ``XᵀX`` (d_in × d_in) of its inputs, rows = every token of every
  exemplar; raw features are never kept.
* ``nn.Conv2d`` (groups 1, zero padding): a convolution is a linear map of its unfolded input patches
  (im2col), so it is recorded as a linear layer: the Gram of the patches (d_in = C·kh·kw, rows = every
  output position of every exemplar), in ``F.unfold``'s order, which is the order of
  ``weight.flatten(1)``. A grouped convolution, or one with another padding mode, is skipped.
* ``nn.MultiheadAttention`` used as self-attention (query, key and value the same tensor): the Gram of
  that input, for ``in_proj_weight``. Its ``out_proj`` is *skipped*: PyTorch applies it inside
  ``F.multi_head_attention_forward`` without calling the module, so no hook sees its input.
* ``nn.LayerNorm`` with a per-channel affine: the per-channel sum of squares of the *normalised* input
  ``x̂`` (what the scale multiplies), for CAT Merging's norm rule.

Memory is bounded by one layer's statistics at a time. A first pass per task records the norm
statistics (d per layer) and how often each linear layer is called; a linear layer's Grams
(T × d_in × d_in) are gathered only when the merge asks for that layer (:class:`LayerGrams`), by one
pass per task that stops right after that layer's last call, and are dropped when the next layer is
asked for. The Grams are bit for bit those of one pass recording every layer (same batches, same
order of accumulation). Parameters are named ``prefix + module_name + ".weight"``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from ..errors import WeightWeavingError

log = logging.getLogger("weightweaving")

Forward = Callable[[nn.Module, dict[str, Tensor], Tensor], Any]


@dataclass
class ExemplarStatistics:
    """Per-parameter statistics of every task's exemplars, what CAT Merging reads per unit."""

    grams: Mapping[str, Tensor] = field(default_factory=dict)  # weight name -> (T, d_in, d_in), maybe lazy
    norm_squares: dict[str, Tensor] = field(default_factory=dict)  # norm scale name -> (T, d)
    biases: set[str] = field(default_factory=set)  # biases of hooked layers (their rule needs no data)
    exemplars: list[int] = field(default_factory=list)  # exemplars per task
    skipped: dict[str, str] = field(default_factory=dict)  # module name -> why it is not hooked

    def kind(self, name: str) -> str | None:
        """``'linear'``, ``'norm'``, ``'bias'`` or None (no statistic: the parameter is summed as is)."""
        if name in self.grams:
            return "linear"
        if name in self.norm_squares:
            return "norm"
        if name in self.biases:
            return "bias"
        return None


def default_forward(model: nn.Module, params: dict[str, Tensor], inputs: Tensor) -> Any:
    """``model(inputs)`` with ``params`` in place of its own weights (no copy of the model)."""
    return functional_call(model, params, (inputs,))


class _Enough(Exception):
    """Raised by a hook once the layer being gathered has seen all its inputs: the rest of the pass is skipped."""


class _Recorder:
    """Forward pre-hooks accumulating one task's statistics.

    ``grams_of``: the linear keys whose Grams are recorded (None: all); ``norms``: record the norm
    statistics. ``stop_after``: raise :class:`_Enough` once every key in it has been called that
    many times in the current batch (``new_batch`` resets the counts).
    """

    def __init__(
        self,
        model: nn.Module,
        prefix: str,
        *,
        grams_of: set[str] | None = None,
        norms: bool = True,
        stop_after: Mapping[str, int] | None = None,
    ) -> None:
        self.grams: dict[str, Tensor] = {}
        self.squares: dict[str, Tensor] = {}
        self.biases: set[str] = set()
        self.skipped: dict[str, str] = {}
        self.handles: list[Any] = []
        self.linear_keys: list[str] = []
        self.calls: dict[str, int] = {}  # key -> calls in the current batch
        self.grams_of, self.norms, self.stop_after = grams_of, norms, dict(stop_after or {})
        inside_attention = {
            f"{name}.out_proj" for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
        }
        for name, module in model.named_modules():
            full = prefix + name
            if isinstance(module, nn.MultiheadAttention):
                if module.in_proj_weight is None:  # separate q/k/v weights: inputs may differ
                    self.skipped[name] = "attention with separate q/k/v projections"
                    continue
                self._hook(module, full + ".in_proj_weight", self._attention)
                if module.in_proj_bias is not None:
                    self.biases.add(full + ".in_proj_bias")
            elif isinstance(module, nn.Linear):
                if name in inside_attention:
                    self.skipped[name] = (
                        "nn.MultiheadAttention applies out_proj without calling it; no hook sees its input"
                    )
                    continue
                self._hook(module, full + ".weight", self._linear)
                if module.bias is not None:
                    self.biases.add(full + ".bias")
            elif isinstance(module, nn.Conv2d):
                if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
                    self.skipped[name] = "convolution with groups, a padding mode or string padding"
                    continue
                self._hook(module, full + ".weight", self._conv)
                if module.bias is not None:
                    self.biases.add(full + ".bias")
            elif isinstance(module, nn.LayerNorm) and module.weight is not None:
                if len(module.normalized_shape) != 1:
                    self.skipped[name] = "LayerNorm over more than one dimension"
                    continue
                self._hook(module, full + ".weight", self._norm)
                if module.bias is not None:
                    self.biases.add(full + ".bias")
        for name, reason in self.skipped.items():
            log.info(
                "exemplar statistics: %s is not hooked (%s); it is merged by Task Arithmetic", name, reason
            )

    def _hook(self, module: nn.Module, key: str, fn: Callable[[str, nn.Module, Tensor], None]) -> None:
        norm = fn == self._norm
        if not norm:
            self.linear_keys.append(key)
        record = self.norms if norm else (self.grams_of is None or key in self.grams_of)

        def pre_hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if isinstance(mod, nn.MultiheadAttention):
                self._check_self_attention(key, args, kwargs)
            if record:
                fn(key, mod, args[0] if args else kwargs["query" if "query" in kwargs else "input"])
            self.calls[key] = self.calls.get(key, 0) + 1
            if self.stop_after and all(self.calls.get(k, 0) >= n for k, n in self.stop_after.items()):
                raise _Enough

        self.handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))

    def new_batch(self) -> None:
        self.calls = {}

    def _check_self_attention(self, key: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        names = ("query", "key", "value")
        given = [args[i] if i < len(args) else kwargs.get(n) for i, n in enumerate(names)]
        if not (given[0] is given[1] is given[2]):
            raise WeightWeavingError(
                f"'{key}' is cross-attention (query, key and value differ): its statistics would mix "
                "inputs; only self-attention is supported"
            )

    def _add(self, store: dict[str, Tensor], key: str, value: Tensor) -> None:
        if key in store:
            store[key] += value
        else:
            store[key] = value

    def _linear(self, key: str, module: nn.Module, x: Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        self._add(self.grams, key, rows.T @ rows)

    _attention = _linear  # in_proj_weight sees the query input, as a linear layer does

    def _conv(self, key: str, module: nn.Module, x: Tensor) -> None:
        assert isinstance(module, nn.Conv2d)
        batch = x.detach().float()
        batch = batch if batch.dim() == 4 else batch.unsqueeze(0)  # an unbatched (C, H, W) input
        patches = F.unfold(
            batch,
            module.kernel_size,
            dilation=module.dilation,
            padding=module.padding,  # type: ignore[arg-type]  # an int pair: string padding is skipped
            stride=module.stride,
        )  # (B, C·kh·kw, positions)
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        self._add(self.grams, key, rows.T @ rows)

    def _norm(self, key: str, module: nn.Module, x: Tensor) -> None:
        assert isinstance(module, nn.LayerNorm)
        normed = F.layer_norm(x.detach().float(), module.normalized_shape, eps=module.eps)
        self._add(self.squares, key, normed.reshape(-1, normed.shape[-1]).square().sum(0))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def hookable_parameters(model: nn.Module, prefix: str = "") -> ExemplarStatistics:
    """What would be hooked (names only, no statistics); an error when nothing can be."""
    recorder = _Recorder(model, prefix)
    recorder.close()
    if not recorder.handles:
        raise WeightWeavingError(
            "the model has no hookable layer (nn.Linear, nn.Conv2d, self-attention nn.MultiheadAttention "
            "or nn.LayerNorm): methods that use data cannot gather exemplar statistics"
        )
    return ExemplarStatistics(biases=recorder.biases, skipped=recorder.skipped)


def persistent_names(model: nn.Module) -> list[str]:
    """The names of the model's state dict (parameters and persistent buffers): what checkpoints hold.

    A non-persistent buffer (CLIP's ``position_ids``) is not in a checkpoint; the model's own is used."""
    return list(model.state_dict(keep_vars=True))


def task_parameters(
    model: nn.Module,
    pretrained: Mapping[str, Tensor],
    finetuned: Mapping[str, Tensor],
    *,
    scale: float,
    device: torch.device,
    prefix: str,
) -> dict[str, Tensor]:
    """The model's parameters and buffers at ``θ_pre + scale·(θ_t − θ_pre)`` on the device."""
    params = {}
    own_tensors = dict([*model.named_parameters(), *model.named_buffers()])
    for name in persistent_names(model):
        own = own_tensors[name]
        key = prefix + name
        if key not in pretrained or key not in finetuned:
            raise WeightWeavingError(f"the model's '{name}' is not in the checkpoints (looked for '{key}')")
        base = pretrained[key].to(device)
        if base.is_floating_point():
            tuned = finetuned[key].to(device, base.dtype)
            base = base + scale * (tuned - base) if scale != 1.0 else tuned
        params[name] = base.to(own.dtype) if own.is_floating_point() else base
    return params


class LayerGrams(Mapping[str, Tensor]):
    """Every task's Grams of one linear layer, (T, d_in, d_in), gathered when that layer is asked for.

    Only the layer asked for last is kept: asking for another drops it first, so at most one layer's
    Grams are held at a time. ``passes`` counts the forward passes made (one per task and layer asked).
    """

    def __init__(self, keys: Sequence[str], gather: Callable[[str], Tensor]) -> None:
        self._keys = list(keys)
        self._known = set(self._keys)
        self._gather = gather
        self._held: tuple[str, Tensor] | None = None
        self._lock = threading.Lock()
        self.gathered: list[str] = []  # the layers gathered, in order (a layer asked again is not)

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._known:
            raise KeyError(key)
        with self._lock:
            if self._held is None or self._held[0] != key:
                self._held = None  # the previous layer's Grams go before the next ones are made
                self._held = (key, self._gather(key))
                self.gathered.append(key)
            return self._held[1]

    def __contains__(self, key: object) -> bool:
        return key in self._known

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def held(self) -> list[str]:
        """The layers whose Grams are in memory now (at most one)."""
        return [] if self._held is None else [self._held[0]]


def _run(
    model: nn.Module,
    params: dict[str, Tensor],
    inputs: Tensor,
    recorder: _Recorder,
    *,
    batch_size: int,
    device: torch.device,
    forward: Forward,
) -> list[dict[str, int]]:
    """One pass over ``inputs`` in batches; how often each hooked key was called, per batch."""
    calls = []
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            recorder.new_batch()
            try:
                forward(model, params, inputs[start : start + batch_size].to(device))
            except _Enough:
                pass
            calls.append(dict(recorder.calls))
    return calls


def gather_statistics(
    model: nn.Module,
    pretrained: Mapping[str, Tensor],
    finetuned: Sequence[Mapping[str, Tensor]],
    exemplars: Sequence[Tensor],
    *,
    scale: float = 1.0,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    prefix: str = "",
    forward: Forward = default_forward,
) -> ExemplarStatistics:
    """Run task t's exemplars through ``θ_pre + scale·Δ_t`` and record every hookable layer's inputs.

    One pass per task records the norm statistics and which linear layers are called; each linear
    layer's Grams are gathered later, when asked for (:class:`LayerGrams`, one layer at a time).
    ``pretrained``, ``finetuned``, ``exemplars`` and ``model`` are kept (not copied) until then.

    Args:
        model: any module whose state dict keys are the checkpoints' keys (after ``prefix``); its own
            weights are never used nor changed.
        pretrained, finetuned: state dicts (the fine-tuned ones in task order).
        exemplars: one tensor of inputs per task, (n_t, ...).
        scale: the task vector's scale for the pass (1: the fine-tuned model itself).
        forward: how to call the model (default ``functional_call(model, params, (x,))``).
    """
    if len(exemplars) != len(finetuned):
        raise WeightWeavingError(f"{len(exemplars)} exemplar sets for {len(finetuned)} fine-tuned models")
    for t, inputs in enumerate(exemplars):
        if len(inputs) == 0:
            raise WeightWeavingError(f"task {t} has no exemplars")
    dev = torch.device(device)
    result = hookable_parameters(model, prefix)
    run = partial(_run, batch_size=batch_size, device=dev, forward=forward)

    def params_of(t: int) -> dict[str, Tensor]:
        return task_parameters(model, pretrained, finetuned[t], scale=scale, device=dev, prefix=prefix)

    squares: list[dict[str, Tensor]] = []
    counts: dict[str, set[int]] = {}  # key -> how often one batch calls it (several values: varies)
    called_by_all: set[str] | None = None
    was_training = model.training
    model.eval()
    try:
        for t, inputs in enumerate(exemplars):
            recorder = _Recorder(model, prefix, grams_of=set())
            try:
                calls = run(model, params_of(t), inputs, recorder)
            finally:
                recorder.close()
            squares.append({k: v.cpu() for k, v in recorder.squares.items()})
            for batch in calls:
                for key in recorder.linear_keys:
                    counts.setdefault(key, set()).add(batch.get(key, 0))
            called = {k for batch in calls for k, n in batch.items() if n > 0}
            called_by_all = called if called_by_all is None else called_by_all & called
            result.exemplars.append(len(inputs))
    finally:
        model.train(was_training)
    linear = [k for k in recorder.linear_keys if called_by_all and k in called_by_all]

    def gather(key: str) -> Tensor:
        # stop each batch's pass after the layer's last call when every batch calls it equally often
        stop = {key: next(iter(counts[key]))} if len(counts[key]) == 1 else None
        grams = []
        was = model.training
        model.eval()
        try:
            for t, inputs in enumerate(exemplars):
                recorder = _Recorder(model, prefix, grams_of={key}, norms=False, stop_after=stop)
                try:
                    run(model, params_of(t), inputs, recorder)
                finally:
                    recorder.close()
                grams.append(recorder.grams[key].cpu())
        finally:
            model.train(was)
        return torch.stack(grams)

    result.grams = LayerGrams(linear, gather)
    for key in squares[0]:
        result.norm_squares[key] = torch.stack([sq[key] for sq in squares])
    return result
