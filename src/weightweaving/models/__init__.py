"""Model-aware code: CLIP loading, zero-shot heads, image data, evaluation and fine-tuning.

Nothing here imports ``transformers`` at import time; the functions that need it import it.
"""
