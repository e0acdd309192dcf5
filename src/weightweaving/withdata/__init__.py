"""Methods that **use data** (exemplars or unlabeled test inputs), kept apart from the data-free core.

``features`` gathers exemplar statistics with forward hooks (CAT Merging); ``adamerging`` learns
layer-wise coefficients (AdaMerging, CART++); ``api.merge_with_data`` runs any of them end to end.
"""

from __future__ import annotations

from .api import METHODS_WITH_DATA, merge_with_data

__all__ = ["METHODS_WITH_DATA", "merge_with_data"]
