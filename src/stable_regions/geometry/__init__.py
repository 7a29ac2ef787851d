"""Pure tensor math of stable regions. Nothing here imports the model layer."""

from .bracket import CurvatureBracket, HeadSpread, curvature_bracket, flip_radius
from .certificate import (
    BallBound,
    PrelogitCertificate,
    prelogit_certificate,
    radius_through_norm,
    ritz_subspace,
)
from .curvature import CurvatureOperator, effective_rank
from .curve import (
    RayCurve,
    TaylorPathKL,
    cumulants,
    radius_pade,
    radius_quadratic,
    radius_series,
    series_coefficients,
)
from .fisher import FisherOperator
from .gram import JacobianGram
from .head import LogitHead
from .lanczos import LanczosRun, lanczos, lanczos_topk
from .linf import linf_radius_bounds
from .pullback import PullbackOperator
from .roots import (
    cgf_crossings,
    cgf_kl,
    first_crossings,
    nearest_cgf_crossings,
    newton_from_above,
)
from .topcurv import (
    TopCurvature,
    cumulants_along,
    curvature_diagonal,
    curvature_trace,
    direction_cumulants,
    search_dtype,
    top_curvature,
    top_eigenpair_float64,
)
from .wide import WideRows

__all__ = [
    "CurvatureBracket",
    "HeadSpread",
    "curvature_bracket",
    "flip_radius",
    "BallBound",
    "PrelogitCertificate",
    "prelogit_certificate",
    "ritz_subspace",
    "radius_through_norm",
    "CurvatureOperator",
    "FisherOperator",
    "JacobianGram",
    "LanczosRun",
    "LogitHead",
    "PullbackOperator",
    "RayCurve",
    "TaylorPathKL",
    "TopCurvature",
    "cumulants",
    "cumulants_along",
    "curvature_diagonal",
    "curvature_trace",
    "direction_cumulants",
    "effective_rank",
    "first_crossings",
    "cgf_crossings",
    "cgf_kl",
    "nearest_cgf_crossings",
    "newton_from_above",
    "lanczos",
    "lanczos_topk",
    "linf_radius_bounds",
    "radius_pade",
    "radius_quadratic",
    "radius_series",
    "search_dtype",
    "series_coefficients",
    "top_curvature",
    "top_eigenpair_float64",
    "WideRows",
]
