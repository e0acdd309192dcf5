"""Analysis helpers the paper uses: task-vector cosine similarity and lazy λ sweeps."""

from .similarity import Similarity, task_vector_similarity
from .sweep import lam_sweep

__all__ = ["Similarity", "lam_sweep", "task_vector_similarity"]
