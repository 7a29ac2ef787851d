"""Pure tensor math of stable regions. Nothing here imports the model layer."""

from .curve import (
    RayCurve,
    cumulants,
    radius_pade,
    radius_quadratic,
    radius_series,
    series_coefficients,
)
from .fisher import FisherOperator, effective_rank
from .gram import JacobianGram
from .head import LogitHead
from .lanczos import lanczos_topk
from .linf import linf_radius_bounds
from .pullback import PullbackOperator
from .roots import first_crossings

__all__ = [
    "FisherOperator",
    "JacobianGram",
    "LogitHead",
    "PullbackOperator",
    "RayCurve",
    "cumulants",
    "effective_rank",
    "first_crossings",
    "lanczos_topk",
    "linf_radius_bounds",
    "radius_pade",
    "radius_quadratic",
    "radius_series",
    "series_coefficients",
]
