"""stable-regions: how far can a language model's internal state be pushed before its output changes?"""

from .analysis import AnalysisResult, analyze
from .calibration import Calibration, load_calibration
from .certify import CertifyResult, certify
from .errors import StableRegionsError
from .generation import generate
from .jacobian import JacobianProfile, jacobian_profile
from .maps import StabilityMap, stability_map
from .models import DEFAULT_MODEL, ModelAdapter, load, wrap
from .monitor import StabilityMonitor
from .steering import SteeringResult, mean_difference, steering_budget
from .validation import ValidationRun, validate

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "AnalysisResult",
    "Calibration",
    "CertifyResult",
    "JacobianProfile",
    "ModelAdapter",
    "StabilityMonitor",
    "StableRegionsError",
    "StabilityMap",
    "SteeringResult",
    "ValidationRun",
    "analyze",
    "certify",
    "generate",
    "jacobian_profile",
    "load",
    "load_calibration",
    "mean_difference",
    "stability_map",
    "steering_budget",
    "validate",
    "wrap",
]
