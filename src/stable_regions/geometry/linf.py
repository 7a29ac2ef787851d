"""The L-infinity radius of the local quadratic model (useful at the embedding).

Under the quadratic model ``KL(delta) ~ 1/2 delta^T G delta``, the largest box
``||delta||_inf <= r`` that stays inside ``{KL <= eps}`` has

    r_inf = sqrt(2 eps / kappa),    kappa = max over corners s in {-1, +1}^d of s^T G s

(a convex function is largest over a box at a corner). Computing ``kappa`` is NP-hard in
general (it contains max-cut), so it is bracketed:

    s^T G s at s = sign(v_top)   <=   kappa   <=   min(d * lambda_max, (sum_i sqrt(G_ii))^2)

Upper bounds: ``||s||^2 = d``; and with ``G = A^T A``, ``s^T G s = ||sum_i s_i A e_i||^2 <=
(sum_i ||A e_i||)^2``. Hence ``radius_linf_lower`` (from the upper bound on kappa) holds for
every delta in the box - for the quadratic model - and ``radius_linf_upper`` is attained: the
corner ``r * sign(v_top)`` reaches eps in the quadratic model.

Both are properties of the local quadratic model, not certificates for the network: the
model's own KL can reach eps inside the box where higher-order terms matter.
"""

from __future__ import annotations

import torch
from torch import Tensor


def linf_radius_bounds(
    eps: float, lambda_max: Tensor, diagonal: Tensor, corner_curvature: Tensor
) -> tuple[Tensor, Tensor]:
    """``(lower, upper)`` on the L-inf radius of ``1/2 delta^T G delta <= eps``.

    Args:
        lambda_max: top eigenvalue of G, shape (P,).
        diagonal: diag(G), shape (P, d).
        corner_curvature: ``s^T G s`` at one corner ``s`` (any sign vector), shape (P,).
    """
    d = diagonal.shape[-1]
    kappa_max = torch.minimum(
        d * lambda_max, diagonal.clamp_min(0.0).sqrt().sum(-1) ** 2
    ).clamp_min(1e-300)
    lower = torch.sqrt(2.0 * eps / kappa_max)
    upper = torch.sqrt(2.0 * eps / corner_curvature.clamp_min(1e-300))
    zero = lambda_max <= 0  # no curvature: the quadratic model never reaches eps
    inf = torch.full_like(lower, float("inf"))
    return torch.where(zero, inf, lower), torch.where(zero, inf, upper)
