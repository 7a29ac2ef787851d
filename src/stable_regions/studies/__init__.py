"""The studies: each takes a model and prompts and returns a result (``results.Result``).

``analyze`` (radii at one layer), ``scan_corpus`` (a corpus at the pre-logit vector),
``generate`` and ``StabilityMonitor`` (radii while text is generated), ``certify`` (radii no
perturbation of a norm can beat), ``steering_budget`` (how far a steering vector may go),
``stability_map`` (layers x positions), ``jacobian_profile`` (the amplification of each
block) and ``validate`` (predictions against measured boundaries, and calibration). They read
the per-block engine and write nothing but their results.
"""

from .analysis import AnalysisResult, analyze
from .certify import CertifyResult, certify
from .generation import GenerationResult, generate
from .iso_kl import IsoKLResult, iso_kl
from .jacobian import JacobianProfile, jacobian_profile
from .maps import StabilityMap, stability_map
from .monitor import StabilityMonitor
from .scan import CorpusScan, scan_corpus
from .steering import SteeringResult, mean_difference, steering_budget
from .validation import ValidationRun, validate

__all__ = [
    "IsoKLResult",
    "iso_kl",
    "AnalysisResult",
    "CertifyResult",
    "CorpusScan",
    "GenerationResult",
    "JacobianProfile",
    "StabilityMap",
    "StabilityMonitor",
    "SteeringResult",
    "ValidationRun",
    "analyze",
    "certify",
    "generate",
    "jacobian_profile",
    "mean_difference",
    "scan_corpus",
    "stability_map",
    "steering_budget",
    "validate",
]
