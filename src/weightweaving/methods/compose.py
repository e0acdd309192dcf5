"""Methods that run another registered method inside them (DARE before it, SVC after it).

Such a method's hyperparameters hold ``base`` (a method name) and ``base_hyperparameters``; the base
decides the scope, so a global base (TIES) gets its first passes through the wrapper.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationInfo

from ..errors import OptionError
from .base import Hyperparameters, Method, Scope
from .registry import get_method


def checked_base_hyperparameters(values: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
    """The body of a ``base_hyperparameters`` validator: valid for the ``base`` given beside them."""
    if "base" in info.data:
        try:
            get_method(info.data["base"]).parse_params(values)
        except OptionError as exc:
            raise ValueError(str(exc)) from None
    return values


class ComposesBase(Method):
    """Shared plumbing of a method with a ``base`` method (not registered itself)."""

    def _base(self, p: Hyperparameters) -> tuple[Method, Hyperparameters]:
        """The base method and its validated hyperparameters."""
        method = get_method(p.base)  # type: ignore[attr-defined]  # declared by every user
        return method, method.parse_params(p.base_hyperparameters)  # type: ignore[attr-defined]

    def scope_of(self, p: Hyperparameters) -> Scope:
        """The base method's scope: a global base needs its first passes."""
        method, base_p = self._base(p)
        return method.scope_of(base_p)
