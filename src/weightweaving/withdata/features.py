"""Exemplar statistics gathered with forward hooks (uses data).

For each task ``t`` the exemplars run through the model loaded with ``θ_pre + scale·Δ_t``, one pass per
task (in batches), and forward pre-hooks record what enters every hookable layer:

* ``nn.Linear``: the Gram matrix ``XᵀX`` (d_in × d_in) of its inputs, rows = every token of every
  exemplar; raw features are never kept.
* ``nn.MultiheadAttention`` used as self-attention (query, key and value the same tensor): the Gram of
  that input, for ``in_proj_weight``. Its ``out_proj`` is *skipped*: PyTorch applies it inside
  ``F.multi_head_attention_forward`` without calling the module, so no hook sees its input.
* ``nn.LayerNorm`` with a per-channel affine: the per-channel sum of squares of the *normalised* input
  ``x̂`` (what the scale multiplies), for CAT Merging's norm rule.

Statistics accumulate on the compute device during one task's pass (one Gram per hooked layer) and
move to the CPU when the pass ends. Parameters are named ``prefix + module_name + ".weight"``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
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

    grams: dict[str, Tensor] = field(default_factory=dict)  # weight name -> (T, d_in, d_in)
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


class _Recorder:
    """Forward pre-hooks accumulating one task's statistics."""

    def __init__(self, model: nn.Module, prefix: str) -> None:
        self.grams: dict[str, Tensor] = {}
        self.squares: dict[str, Tensor] = {}
        self.biases: set[str] = set()
        self.skipped: dict[str, str] = {}
        self.handles: list[Any] = []
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
        def pre_hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            fn(key, mod, args[0] if args else kwargs["query" if "query" in kwargs else "input"])
            if isinstance(mod, nn.MultiheadAttention):
                self._check_self_attention(key, args, kwargs)

        self.handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))

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
            "the model has no hookable layer (nn.Linear, self-attention nn.MultiheadAttention or "
            "nn.LayerNorm): methods that use data cannot gather exemplar statistics"
        )
    return ExemplarStatistics(biases=recorder.biases, skipped=recorder.skipped)


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
    for name, own in [*model.named_parameters(), *model.named_buffers()]:
        key = prefix + name
        if key not in pretrained or key not in finetuned:
            raise WeightWeavingError(f"the model's '{name}' is not in the checkpoints (looked for '{key}')")
        base = pretrained[key].to(device)
        if base.is_floating_point():
            tuned = finetuned[key].to(device, base.dtype)
            base = base + scale * (tuned - base) if scale != 1.0 else tuned
        params[name] = base.to(own.dtype) if own.is_floating_point() else base
    return params


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
    dev = torch.device(device)
    result = hookable_parameters(model, prefix)
    per_task: list[tuple[dict[str, Tensor], dict[str, Tensor]]] = []
    was_training = model.training
    model.eval()
    try:
        for t, (tuned, inputs) in enumerate(zip(finetuned, exemplars, strict=True)):
            if len(inputs) == 0:
                raise WeightWeavingError(f"task {t} has no exemplars")
            params = task_parameters(model, pretrained, tuned, scale=scale, device=dev, prefix=prefix)
            recorder = _Recorder(model, prefix)
            try:
                with torch.no_grad():
                    for start in range(0, len(inputs), batch_size):
                        forward(model, params, inputs[start : start + batch_size].to(dev))
            finally:
                recorder.close()
            per_task.append(
                (
                    {k: v.cpu() for k, v in recorder.grams.items()},
                    {k: v.cpu() for k, v in recorder.squares.items()},
                )
            )
            result.exemplars.append(len(inputs))
            del params
    finally:
        model.train(was_training)
    for key in per_task[0][0]:
        result.grams[key] = torch.stack([grams[key] for grams, _ in per_task])
    for key in per_task[0][1]:
        result.norm_squares[key] = torch.stack([squares[key] for _, squares in per_task])
    return result
