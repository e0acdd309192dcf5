"""Checkpoint reading (safetensors, sharded, .pt/.bin with weights_only, HF folders) and writing."""

from .base import Checkpoint, StateDictCheckpoint, TensorInfo
from .open import open_checkpoint
from .writer import OutputEntry, SafetensorsWriter

__all__ = [
    "Checkpoint",
    "OutputEntry",
    "SafetensorsWriter",
    "StateDictCheckpoint",
    "TensorInfo",
    "open_checkpoint",
]
