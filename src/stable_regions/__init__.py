"""stable-regions: how far can a language model's internal state be pushed before its output changes?"""

from importlib import metadata as _metadata

from .analysis import AnalysisResult, analyze
from .budget import memory_budget
from .calibration import Calibration, load_calibration
from .certify import CertifyResult, certify
from .errors import (
    InvalidParameterError,
    ModelNotFoundError,
    OutputPathError,
    StableRegionsError,
    StableRegionsWarning,
)
from .generation import GenerationResult, generate
from .jacobian import JacobianProfile, jacobian_profile
from .maps import StabilityMap, stability_map
from .models import DEFAULT_MODEL, ModelAdapter, load, wrap
from .monitor import StabilityMonitor
from .scan import CorpusScan, scan_corpus
from .steering import SteeringResult, mean_difference, steering_budget
from .validation import ValidationRun, validate

try:  # the one source of the version is pyproject.toml, read from the installed metadata
    __version__ = _metadata.version("stable-regions")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "DEFAULT_MODEL",
    "AnalysisResult",
    "Calibration",
    "CertifyResult",
    "CorpusScan",
    "GenerationResult",
    "InvalidParameterError",
    "JacobianProfile",
    "ModelAdapter",
    "ModelNotFoundError",
    "OutputPathError",
    "StabilityMonitor",
    "StableRegionsError",
    "StableRegionsWarning",
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
    "memory_budget",
    "scan_corpus",
    "stability_map",
    "steering_budget",
    "validate",
    "wrap",
]
