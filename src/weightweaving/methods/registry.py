"""One registry of merge methods: a name registered twice raises, an unknown name lists the valid ones."""

from __future__ import annotations

from collections.abc import Callable

from ..errors import OptionError, did_you_mean
from .base import Method

_REGISTRY: dict[str, type[Method]] = {}


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make a :class:`Method` available under ``name``."""

    def wrap(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY:
            raise ValueError(f"merge method '{name}' is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def get_method(name: str) -> Method:
    """An instance of the method registered as ``name``."""
    try:
        return _REGISTRY[name]()
    except KeyError:
        valid = ", ".join(sorted(_REGISTRY))
        raise OptionError(
            f"unknown method '{name}'; valid methods: {valid}{did_you_mean(name, _REGISTRY)}"
        ) from None


def list_methods() -> list[str]:
    """Names of every registered method, sorted."""
    return sorted(_REGISTRY)
