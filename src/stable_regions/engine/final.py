"""The engine at the pre-logit vector: the head's curvature from ``p`` and ``W``, the exact
CGF curve, the boundary measured through the head."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from .._support.heap import return_freed_memory
from ..geometry import (
    FisherOperator,
    RayCurve,
    cgf_crossings,
    curvature_diagonal,
    effective_rank,
    series_coefficients,
)
from ..models import ModelAdapter
from ..probes import LinearRayKL, RayKL, measure_boundaries, measure_near
from .common import (
    Block,
    Stage,
    eig_tolerance,
    entropy,
    linf_radii,
    nearest,
    pade_radii,
    positions_per_block,
    quiet,
    rays,
    summing_head,
    top_vectors_linear,
)


def prelogit_blocks(
    adapter: ModelAdapter,
    ids: Tensor,
    pos: list[int],
    eps_list: list[float],
    exact: bool,
    rtol: float,
    stage: Stage | None = None,
    eig_tol: float = 1e-10,
) -> Iterator[Block]:
    """The pre-logit vector: curvature from p and W, exact CGF curve, measured through the head.

    The head is the model's own (``stored_head``: no float64 copy of W): every product with W
    runs in the weight's dtype, the probabilities, cumulants, KL values and sums in float64.
    A linear head takes the batched search from the logits (``top_curvature``: vocabulary
    chunks, pivoted at the top token; ``curvature_diagonal``, whose sum is the trace), the exact curve's
    roots by Newton's method on the CGF, and a measured boundary that confirms each root in
    one call (``measure_near``); a softcapped one takes the operator through its real
    nonlinearity (``FisherOperator``) and searches both the curve and the boundary."""
    stage = stage or quiet
    head = summing_head(adapter)
    weight = head.weight
    tol = eig_tolerance(eig_tol, weight.dtype)
    f64 = torch.float64
    h_all = adapter.prelogits(ids, dtype=None)[pos]
    cap = positions_per_block(head.vocab_size)
    # blocks of equal size: a block of one position left over would take the slower
    # one-position search (docs/performance.md)
    block = -(-len(pos) // -(-len(pos) // cap))
    for start in range(0, len(pos), block):
        h = h_all[start : start + block].to(f64)
        P = h.shape[0]
        return_freed_memory()  # the last block's transients, not their sum with fragments
        stage("curvature")
        u0 = head.raw_float64(h)  # (P, V) exact logits, no float64 copy of W
        series = None  # the KL series along +v, where the head's geometry gives it
        if head.is_linear:
            series, vecs, rank, diagonal, corner, ray_b = _linear_head(head, h, u0, tol)
            lam = series[0]
        else:
            op = FisherOperator.from_head(head, h)
            lam, vecs = op.top_eigenpairs(k=1, tol=tol)
            lam, vecs = lam[:, 0], vecs[:, 0]
            rank = effective_rank(op.trace(), lam)
            diagonal = op.diagonal()
            corner = op.quadratic_form(torch.sign(vecs)[:, None])[:, 0]
            del op
            ray_b = head.direction_float64(rays(vecs, -1.0))
        linf = linf_radii(eps_list, lam, diagonal, corner)
        p = torch.softmax(head.squash(u0), dim=-1)
        top_p, top_i = p.max(-1)
        ent = entropy(p)
        del p

        # Rays 2j and 2j+1 are +v and -v at position j: eigenvectors have no sign.
        ray_h = h.repeat_interleave(2, dim=0)
        curve = RayCurve(head, u0.repeat_interleave(2, dim=0), ray_b)
        del u0, ray_b
        if series is None:
            c2, c3, c4 = curve.coefficients()
        else:  # along -v the odd cumulant flips: c3 does, c2 and c4 do not
            c2, c3, c4 = (
                rays(c[:, None], sg)[:, 0] for c, sg in zip(series, (1.0, -1.0, 1.0), strict=True)
            )
        predicted = pade_radii(c2, c3, c4, eps_list)  # (2P, E)
        scale = ray_h.norm(dim=-1).clamp_min(1e-6).cpu().numpy()
        search = dict(t_start=1e-3 * scale, t_max=1e6 * scale, rtol=rtol)
        # The closed forms only seed the searches; they never decide the answer.
        if head.is_linear:
            # a tenth of the measurement's rtol, so that a bracket of the measurement's width
            # about each root holds the measured crossing (measure_near)
            from_curve = _curve_roots(curve, c2, predicted, eps_list, search["t_max"], 0.1 * rtol)
        else:
            from_curve = measure_boundaries(curve, eps_list, guesses=predicted, **search)
        measured = np.full_like(from_curve, np.nan)
        if exact:
            stage("measuring")
            if head.is_linear:
                # Along a ray of a linear head the logits are u0 + t b: the KL is the curve's
                # function, evaluated here by the head's own formula, and it increases for
                # t > 0 (K(t) - t K'(0), K convex), so a bracket about the curve's root that
                # straddles eps holds the only crossing: one call confirms every root.
                along = LinearRayKL(curve.u0, curve.b)
                measured = measure_near(along, eps_list, from_curve, **search)
            else:
                along = RayKL(head.logits_float64, ray_h, rays(vecs, -1.0))
                measured = measure_boundaries(along, eps_list, guesses=from_curve, **search)
            del along
        del curve
        yield Block(
            positions=pos[start : start + P],
            next_token_id=top_i,
            next_prob=top_p,
            entropy=ent,
            lambda_max=lam,
            effective_rank=rank,
            directions=vecs,
            pade=nearest(predicted),
            curve=nearest(from_curve),
            exact=nearest(measured),
            linf_lower=linf[0],
            linf_upper=linf[1],
            activation_norm=h.norm(dim=-1),
        )


def _linear_head(head, h: Tensor, u0: Tensor, tol: float):
    """A linear head's geometry at pre-logit vectors ``h`` (P, d) with float64 logits ``u0``:
    the KL series ``(c2, c3, c4)`` along the top directions (``c2 = v^T H v = lambda_max``),
    the directions (P, d), the effective rank, ``diag H``, the L-inf corner ``s^T H s``
    (``s = sign(v)``), and the rays' logit rates ``W (+-v)`` (2P, V), float64. The
    directions and their sign vectors share one float64 product with ``W``, and the series
    come from it (centred: ``series_coefficients``); the trace is the diagonal's sum (one
    pass over ``W``, no product of its own)."""
    f64 = torch.float64
    P = len(h)
    vecs = top_vectors_linear(head, h, u0, tol).to(f64)
    b = head.direction_float64(torch.cat([vecs, torch.sign(vecs)]))
    p = torch.softmax(u0, dim=-1)
    series = series_coefficients(p, [b[:P]])  # centred, float64
    corner = series_coefficients(p, [b[P:]])[0]
    del p
    diagonal = curvature_diagonal(head.weight, u0)
    rank = effective_rank(diagonal.sum(-1), series[0])
    return series, vecs, rank, diagonal, corner, rays(b[:P], -1.0)


def _curve_roots(curve: RayCurve, c2: Tensor, guesses: np.ndarray, eps_list, t_max, rtol: float):
    """The exact curve's first crossings (2P, E) along a linear head's rays: Newton's method
    from above on the CGF (``cgf_crossings``: the KL and its slope from one exp over the
    vocabulary per step), started at the Pade roots ``guesses`` (the quadratic ones, from the
    variance ``c2``, where Pade gives none), given up at ``t_max``, to ``rtol``."""
    f64 = torch.float64
    device = curve.b.device
    levels = torch.tensor(eps_list, dtype=f64, device=device).expand(len(curve.b), -1)
    start = torch.as_tensor(guesses, dtype=f64).to(device)
    quadratic = torch.sqrt(2.0 * levels / c2.to(f64).clamp_min(1e-300)[:, None])
    start = torch.where(torch.isfinite(start) & (start > 0), start, quadratic)
    cap = torch.as_tensor(np.asarray(t_max, dtype=np.float64)).to(device)[:, None]
    roots = cgf_crossings(
        curve.logp, curve.b, levels.contiguous(), start, rtol, cap=cap.expand_as(levels)
    )
    return roots.cpu().numpy()
