"""Weight Weaving: search spaces, pooling functions and the weave entry point."""

from . import datafree_pools  # noqa: F401  (imported for registration)
from .pools import Pool, make_pool
from .search import default_lambdas, grid, parse_lambdas
from .weave import Weaver, weave

__all__ = ["Pool", "Weaver", "default_lambdas", "grid", "make_pool", "parse_lambdas", "weave"]
