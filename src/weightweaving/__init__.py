"""weightweaving: data-free model merging with Weight Weaving, streaming over real checkpoints."""

from __future__ import annotations

__version__ = "0.1.0"

from . import signals as _signals  # noqa: F401  first: a CLI run's Ctrl-C while torch imports is one line
from .api import merge
from .checkpoints import open_checkpoint
from .errors import WeightWeavingError
from .methods import get_method, list_methods
from .sweep import merge_sweep
from .weaving import weave
from .withdata import merge_with_data

__all__ = [
    "WeightWeavingError",
    "__version__",
    "get_method",
    "list_methods",
    "merge",
    "merge_sweep",
    "merge_with_data",
    "open_checkpoint",
    "weave",
]
