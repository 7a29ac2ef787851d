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
    cumulants_along,
    curvature_diagonal,
    curvature_trace,
    effective_rank,
)
from ..models import ModelAdapter
from ..probes import LinearRayKL, RayKL, measure_boundaries
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
    chunks, pivoted at the top token; ``curvature_trace``, ``curvature_diagonal``); a
    softcapped one the operator through its real nonlinearity (``FisherOperator``)."""
    stage = stage or quiet
    head = summing_head(adapter)
    weight = head.weight
    tol = eig_tolerance(eig_tol, weight.dtype)
    f64 = torch.float64
    h_all = adapter.prelogits(ids, dtype=None)[pos]
    block = positions_per_block(head.vocab_size)
    for start in range(0, len(pos), block):
        h = h_all[start : start + block].to(f64)
        P = h.shape[0]
        return_freed_memory()  # the last block's transients, not their sum with fragments
        stage("curvature")
        u0 = head.raw_float64(h)  # (P, V) exact logits, no float64 copy of W
        if head.is_linear:
            vecs = top_vectors_linear(head, h, u0, tol)
            c2, c3, c4 = cumulants_along(weight, u0, vecs)  # float64 p: c2 = lambda_max
            lam, vecs = c2, vecs.to(f64)
            rank = effective_rank(curvature_trace(weight, u0), lam)
            return_freed_memory()
            diagonal = curvature_diagonal(weight, u0)
            corner = cumulants_along(weight, u0, torch.sign(vecs))[0]
            # the series along +v and -v: c3 flips with the sign, c2 and c4 do not
            c2, c3, c4 = (
                rays(c[:, None], sg)[:, 0] for c, sg in ((c2, 1.0), (c3, -1.0), (c4, 1.0))
            )
        else:
            op = FisherOperator.from_head(head, h)
            lam, vecs = op.top_eigenpairs(k=1, tol=tol)
            lam, vecs = lam[:, 0], vecs[:, 0]
            rank = effective_rank(op.trace(), lam)
            diagonal = op.diagonal()
            corner = op.quadratic_form(torch.sign(vecs)[:, None])[:, 0]
            c2 = None
            del op
        linf = linf_radii(eps_list, lam, diagonal, corner)
        p = torch.softmax(head.squash(u0), dim=-1)
        top_p, top_i = p.max(-1)
        ent = entropy(p)
        del p

        # Rays 2j and 2j+1 are +v and -v at position j: eigenvectors have no sign.
        ray_h = h.repeat_interleave(2, dim=0)
        ray_v = rays(vecs, -1.0)
        curve = RayCurve(head, u0.repeat_interleave(2, dim=0), head.direction_float64(ray_v))
        del u0
        if c2 is None:
            c2, c3, c4 = curve.coefficients()
        predicted = pade_radii(c2, c3, c4, eps_list)  # (2P, E)
        scale = ray_h.norm(dim=-1).clamp_min(1e-6).cpu().numpy()
        search = dict(t_start=1e-3 * scale, t_max=1e6 * scale, rtol=rtol)
        # The closed forms only seed the search brackets; they never decide the answer.
        from_curve = measure_boundaries(curve, eps_list, guesses=predicted, **search)
        if exact:
            stage("measuring")
            if head.is_linear:
                # The KL along a ray of a linear head, K(t) - t K'(0), increases for t > 0 (K
                # is convex): its only crossing is the first, so the scan may start at half the
                # curve's root instead of far below it (it walks down if it starts above).
                first = np.where(np.isfinite(from_curve), from_curve, np.inf).min(1)
                search["t_start"] = np.where(np.isfinite(first), 0.5 * first, search["t_start"])
            along = (
                LinearRayKL(curve.u0, curve.b)
                if head.is_linear
                else RayKL(head.logits_float64, ray_h, ray_v)
            )
            measured = measure_boundaries(along, eps_list, guesses=from_curve, **search)
            del along
        else:
            measured = np.full_like(from_curve, np.nan)
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
