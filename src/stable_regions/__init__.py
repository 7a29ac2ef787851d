"""stable-regions: how far can a language model's internal state be pushed before its output changes?"""

from .analysis import AnalysisResult, analyze
from .errors import StableRegionsError
from .models import DEFAULT_MODEL, ModelAdapter, load, wrap
from .steering import SteeringResult, mean_difference, steering_budget

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "AnalysisResult",
    "ModelAdapter",
    "StableRegionsError",
    "SteeringResult",
    "analyze",
    "load",
    "mean_difference",
    "steering_budget",
    "wrap",
]
