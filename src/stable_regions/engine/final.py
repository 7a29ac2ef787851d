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
    equal_parts,
    linf_radii,
    nearest,
    pade_radii,
    positions_per_block,
    positions_per_search,
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
    chunks, pivoted at the top token) and ``curvature_diagonal`` (whose sum is the trace) for
    a whole search batch of positions (``positions_per_search``), then, a block at a time, the
    exact curve's roots by Newton's method on the CGF, and a measured boundary that confirms
    each root in one call (``measure_near``); a softcapped one takes the operator through its
    real nonlinearity (``FisherOperator``) and searches both the curve and the boundary."""
    stage = stage or quiet
    head = summing_head(adapter)
    tol = eig_tolerance(eig_tol, head.weight.dtype)
    h_all = adapter.prelogits(ids, dtype=None)[pos]
    cap = positions_per_block(head.vocab_size)
    # batches of equal size: a batch of one position left over would take the slower
    # one-position search (docs/performance.md)
    batch = equal_parts(len(pos), positions_per_search(head.vocab_size) if head.is_linear else cap)
    for first in range(0, len(pos), batch):
        h = h_all[first : first + batch].to(torch.float64)
        return_freed_memory()  # the last batch's transients, not their sum with fragments
        stage("curvature")
        u0 = head.raw_float64(h)  # (P, V) exact logits, no float64 copy of W
        searched = _linear_search(head, h, u0, tol) if head.is_linear else None
        block = equal_parts(len(h), cap)  # the float64 arrays of rays, a block at a time
        for s in range(0, len(h), block):
            part = slice(s, min(s + block, len(h)))  # a batch's last block may be shorter
            found = None if searched is None else tuple(x[part] for x in searched)
            yield _block(
                head,
                h[part],
                u0[part],
                found,
                pos[first + part.start : first + part.stop],
                eps_list,
                exact,
                rtol,
                stage,
                tol,
            )
        del u0, searched


def _block(head, h, u0, searched, positions, eps_list, exact, rtol, stage, tol) -> Block:
    """One block of positions (P, d) with float64 logits ``u0`` (P, V); ``searched``: a
    linear head's top directions and ``diag H`` (``_linear_search``), None for a softcap."""
    logp = torch.log_softmax(head.squash(u0), dim=-1)
    p = logp.exp()
    top_p, top_i = p.max(-1)
    ent = entropy(p)
    # Rays 2j and 2j+1 are +v and -v at position j: eigenvectors have no sign.
    curve = None
    if searched is not None:
        vecs, diagonal = searched
        series, rank, corner, ray_b = _linear_head(head, p, vecs, diagonal)
        lam = series[0]
        # along -v the odd cumulant flips: c3 does, c2 and c4 do not
        c2, c3, c4 = (
            rays(c[:, None], sg)[:, 0] for c, sg in zip(series, (1.0, -1.0, 1.0), strict=True)
        )
    else:
        op = FisherOperator.from_head(head, h)
        lam, vecs = op.top_eigenpairs(k=1, tol=tol)
        lam, vecs = lam[:, 0], vecs[:, 0]
        rank = effective_rank(op.trace(), lam)
        diagonal = op.diagonal()
        corner = op.quadratic_form(torch.sign(vecs)[:, None])[:, 0]
        del op
        curve = RayCurve(
            head, u0.repeat_interleave(2, dim=0), head.direction_float64(rays(vecs, -1.0))
        )
        c2, c3, c4 = curve.coefficients()
    del p
    linf = linf_radii(eps_list, lam, diagonal, corner)
    predicted = pade_radii(c2, c3, c4, eps_list)  # (2P, E)
    scale = h.norm(dim=-1).clamp_min(1e-6).repeat_interleave(2).cpu().numpy()
    search = dict(t_start=1e-3 * scale, t_max=1e6 * scale, rtol=rtol)
    # The closed forms only seed the searches; they never decide the answer.
    if curve is None:
        from_curve, measured = _linear_radii(
            u0, logp, ray_b, c2, predicted, eps_list, exact, search, stage
        )
    else:
        from_curve = measure_boundaries(curve, eps_list, guesses=predicted, **search)
        measured = np.full_like(from_curve, np.nan)
        if exact:
            stage("measuring")
            along = RayKL(head.logits_float64, h.repeat_interleave(2, dim=0), rays(vecs, -1.0))
            measured = measure_boundaries(along, eps_list, guesses=from_curve, **search)
    return Block(
        positions=positions,
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


def _linear_radii(u0, logp, ray_b, c2, predicted, eps_list, exact, search, stage):
    """A linear head's exact curve roots and measured boundaries (2P, E) along the rays
    ``u0[j] + t b[r]`` (``ray_b`` (2P, V), rays 2j and 2j + 1 at origin j)."""
    origin = torch.arange(len(u0), device=u0.device).repeat_interleave(2)
    # a tenth of the measurement's rtol, so that a bracket of the measurement's width about
    # each root holds the measured crossing (measure_near)
    rtol = search["rtol"]
    from_curve = _curve_roots(
        logp, ray_b, origin, c2, predicted, eps_list, search["t_max"], 0.1 * rtol
    )
    if not exact:
        return from_curve, np.full_like(from_curve, np.nan)
    stage("measuring")
    # Along a ray of a linear head the logits are u0 + t b: the KL is the curve's function,
    # evaluated here by the head's own formula, and it increases for t > 0 (K(t) - t K'(0),
    # K convex), so a bracket about the curve's root that straddles eps holds the only
    # crossing: one call confirms every root.
    along = LinearRayKL(u0, ray_b, origin)
    return from_curve, measure_near(along, eps_list, from_curve, **search)


def _linear_search(head, h: Tensor, u0: Tensor, tol: float) -> tuple[Tensor, Tensor]:
    """A linear head's top directions (P, d) float64 and ``diag H`` (P, d) at pre-logit
    vectors ``h`` (P, d) with float64 logits ``u0``: one Lanczos run and one pass of the
    diagonal for the whole batch, whose products with W are then wide enough to run at the
    GEMM's rate (docs/performance.md)."""
    vecs = top_vectors_linear(head, h, u0, tol).to(torch.float64)
    return vecs, curvature_diagonal(head.weight, u0)


def _linear_head(head, p: Tensor, vecs: Tensor, diagonal: Tensor):
    """A linear head's geometry along its top directions ``vecs`` (P, d) from float64
    probabilities ``p`` (P, V) and ``diag H`` (P, d): the KL series ``(c2, c3, c4)`` along ``+v``
    (``c2 = v^T H v = lambda_max``), the effective rank, the L-inf corner ``s^T H s``
    (``s = sign(v)``), and the rays' logit rates ``W (+-v)`` (2P, V), float64. The
    directions and their sign vectors share one float64 product with ``W``, and the series
    come from it (centred: ``series_coefficients``); the trace is the diagonal's sum."""
    P = len(vecs)
    b = head.direction_float64(torch.cat([vecs, torch.sign(vecs)]))
    series = series_coefficients(p, [b[:P]])  # centred, float64
    corner = series_coefficients(p, [b[P:]])[0]
    rank = effective_rank(diagonal.sum(-1), series[0])
    return series, rank, corner, rays(b[:P], -1.0)


def _curve_roots(
    logp: Tensor, b: Tensor, origin: Tensor, c2: Tensor, guesses: np.ndarray, eps_list, t_max, rtol
):
    """The exact curve's first crossings (R, E) along a linear head's rays ``logp[origin[r]]
    + t b[r]``: Newton's method from above on the CGF (``cgf_crossings``: the KL and its slope
    from one exp over the vocabulary per step), started at the Pade roots ``guesses`` (the
    quadratic ones, from the variance ``c2``, where Pade gives none), given up at ``t_max``,
    to ``rtol``."""
    f64 = torch.float64
    device = b.device
    levels = torch.tensor(eps_list, dtype=f64, device=device).expand(len(b), -1)
    start = torch.as_tensor(guesses, dtype=f64).to(device)
    quadratic = torch.sqrt(2.0 * levels / c2.to(f64).clamp_min(1e-300)[:, None])
    start = torch.where(torch.isfinite(start) & (start > 0), start, quadratic)
    cap = torch.as_tensor(np.asarray(t_max, dtype=np.float64)).to(device)[:, None]
    roots = cgf_crossings(
        logp, b, levels.contiguous(), start, rtol, origin=origin, cap=cap.expand_as(levels)
    )
    return roots.cpu().numpy()
