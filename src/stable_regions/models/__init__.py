"""Model adapters: loading, the head as tensors, hook points, perturbations."""

from .adapter import PRELOGIT, ModelAdapter
from .architectures import ARCHITECTURES
from .layers import is_final
from .loading import load, wrap
from .store import BUNDLED, DEFAULT_MODEL

__all__ = [
    "ARCHITECTURES",
    "BUNDLED",
    "DEFAULT_MODEL",
    "PRELOGIT",
    "ModelAdapter",
    "is_final",
    "load",
    "wrap",
]
