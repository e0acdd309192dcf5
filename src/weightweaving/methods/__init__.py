"""The merge methods. Each module is imported from this one explicit list, which fills the registry."""

from . import (  # noqa: F401  (imported for registration)
    breadcrumbs,
    cart,
    dare,
    exemplar_projection,
    gta,
    iso_c,
    iso_cts,
    magmax,
    model_stock,
    pcb,
    slerp,
    svc,
    task_arithmetic,
    ties,
    tsv,
    weight_averaging,
    wudi,
)
from .base import Hyperparameters, LamForm, LamKind, Method, Scope, UnitContext
from .registry import get_method, list_methods, register

__all__ = [
    "Hyperparameters",
    "LamForm",
    "LamKind",
    "Method",
    "Scope",
    "UnitContext",
    "get_method",
    "list_methods",
    "register",
]
