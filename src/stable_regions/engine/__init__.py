"""The per-block engine every study calls: the geometry of a block of positions at one layer.

``prelogit_blocks`` (the pre-logit vector: the head's curvature from ``p`` and ``W``, the exact
CGF curve, the boundary measured through the head) and ``inner_blocks`` (a hook inside the
network: the pullback curvature through the suffix of the model, the Pade form from nested
forward-mode derivatives, the boundary measured through the suffix) yield ``Block``s: one row
per position, radii per eps as the nearest exit over ``+v`` and ``-v``. ``analyze``, maps,
steering and the bench read these; nothing here knows about tables or files.

Inside the network everything runs in the model's own precision (no float64 copy of the
model): the forward and tangent passes in the weights' dtype, the probabilities, KL values,
cumulants, Lanczos tridiagonal and vocabulary sums in float64.
"""

from .cells import map_cells
from .common import (
    RELIABLE_AGREEMENT,
    RELIABLE_RELATIVE,
    Block,
    Stage,
    closed_forms_along,
    eig_tolerance,
    entropy,
    linf_radii,
    logit_derivatives,
    nearest,
    pade_radii,
    positions_per_block,
    positions_per_recorded_block,
    quiet,
    rays,
    reliability,
    scan_start,
    series_along,
    summing_head,
    taylor_radii,
    top_vectors_linear,
)
from .final import prelogit_blocks
from .inner import inner_blocks
from .layer import blocks_at

__all__ = [
    "RELIABLE_AGREEMENT",
    "RELIABLE_RELATIVE",
    "Block",
    "blocks_at",
    "Stage",
    "closed_forms_along",
    "eig_tolerance",
    "entropy",
    "inner_blocks",
    "linf_radii",
    "logit_derivatives",
    "map_cells",
    "nearest",
    "pade_radii",
    "positions_per_block",
    "positions_per_recorded_block",
    "prelogit_blocks",
    "quiet",
    "rays",
    "reliability",
    "scan_start",
    "series_along",
    "summing_head",
    "taylor_radii",
    "top_vectors_linear",
]
