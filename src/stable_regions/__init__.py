"""stable-regions: how far can a language model's internal state be pushed before its output changes?"""

from importlib import metadata as _metadata

from .budget import memory_budget
from .calibration import Calibration, load_calibration
from .errors import (
    InvalidParameterError,
    ModelNotFoundError,
    OutputPathError,
    StableRegionsError,
    StableRegionsWarning,
)
from .models import DEFAULT_MODEL, ModelAdapter, load, wrap
from .studies import (
    AnalysisResult,
    CertifyResult,
    CorpusScan,
    GenerationResult,
    IsoKLResult,
    JacobianProfile,
    StabilityMap,
    StabilityMonitor,
    SteeringResult,
    ValidationRun,
    analyze,
    certify,
    generate,
    iso_kl,
    jacobian_profile,
    mean_difference,
    scan_corpus,
    stability_map,
    steering_budget,
    validate,
)

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
    "IsoKLResult",
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
    "iso_kl",
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
