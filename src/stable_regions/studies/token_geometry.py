"""The geometry of one generated token, from its logits and the unembedding W alone.

What a generation monitor records at every step (``StabilityMonitor`` under ``generate``,
and the same code wherever else the logits of a step come from): ``lambda_max`` and its
bracket, the radius along the top direction at each eps, the flip radius, optionally the
certified radius and the radii along user directions. The two modes and their math are in
``studies.monitor``'s docstring and docs/monitor.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from .._support.matvec import matvecs
from ..errors import InvalidParameterError, StableRegionsError
from ..geometry import (
    BallBound,
    HeadSpread,
    cumulants,
    curvature_bracket,
    flip_radius,
    nearest_cgf_crossings,
    radius_pade,
    top_curvature,
)
from ..models.precision import full_float32_products
from ..vocabulary import COLUMNS

MODES = ("fast", "exact")
ALTERNATIVES = 5  # top tokens kept per step for the viewer's tooltip
CERTIFY_RTOL = 1e-6  # the certified radius to this fraction of its bracket, from below


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise InvalidParameterError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    return mode


def check_directions(directions, d: int) -> dict[str, Tensor]:
    """Named unit directions (d,) from a tensor (k, d) or (d,), or a mapping name -> vector."""
    if directions is None:
        return {}
    if isinstance(directions, Mapping):
        items = list(directions.items())
    else:
        block = torch.as_tensor(directions)
        block = block[None] if block.ndim == 1 else block
        items = [(f"direction_{i}", v) for i, v in enumerate(block)]
    out = {}
    for name, v in items:
        if f"radius_{name}" in COLUMNS:
            raise StableRegionsError(
                f"direction name {name!r} would write the column radius_{name}, which means "
                "something else: choose another name"
            )
        v = torch.as_tensor(v, dtype=torch.float64).detach().cpu()
        if v.shape != (d,):
            raise StableRegionsError(
                f"direction {name!r} has shape {tuple(v.shape)}, expected ({d},): one value "
                "per dimension of the pre-logit vector"
            )
        if not bool(torch.isfinite(v).all()):
            raise StableRegionsError(f"direction {name!r} contains NaN or inf: give finite values")
        if float(v.norm()) == 0.0:
            raise StableRegionsError(f"direction {name!r} is zero: give a nonzero vector")
        out[str(name)] = v / v.norm()
    return out


class TokenGeometry:
    """Per-token geometry of a linear head from the scores of a step.

    Parameters
    ----------
    weight : Tensor
        The unembedding (V, d) as the products see it (float32 or float64).
    eps : sequence of float
        The KL levels of the radii.
    mode : {"fast", "exact"}
        ``fast`` reads ``support`` rows of W; ``exact`` runs the Lanczos search to ``eig_tol``
        (on ``search``, a lower-precision copy of W where given) and one product ``W v``.
    tokens, support, eig_tol, certified
        As for ``StabilityMonitor``.
    directions : dict of str to Tensor, optional
        Named unit directions (d,) (``check_directions``); ``W u`` is computed once.
    """

    def __init__(
        self,
        weight: Tensor,
        *,
        eps: Sequence[float],
        mode: str = "fast",
        tokens: int = 32,
        support: int = 512,
        eig_tol: float = 1e-3,
        certified: bool = False,
        directions: dict[str, Tensor] | None = None,
        search: Tensor | None = None,
    ) -> None:
        self.weight = weight
        self.search = weight if search is None else search
        self.eps = list(eps)
        self.mode = check_mode(mode)
        self.tokens, self.support, self.eig_tol = tokens, support, eig_tol
        self.certified = certified
        self.spread = HeadSpread.of(weight)
        self.directions = dict(directions or {})
        self._direction_logits = None  # (k, V) = U W^T, once
        if self.directions:
            U = torch.stack(list(self.directions.values())).to(weight)
            self._direction_logits = (U.to(weight.device) @ weight.T).to(torch.float64)

    @torch.no_grad()
    @full_float32_products()
    def __call__(self, scores: Tensor):
        """``(values, radii, top_ids, top_probs, logp)`` for the scores (B, V) of one step:
        per row (B,) arrays and per (row, eps) (B, E) arrays (NaN for a row without a
        distribution), the ``ALTERNATIVES`` likeliest tokens and their probabilities, and the
        log-probabilities (B, V) that resolve the chosen token's probability later."""
        f64 = torch.float64
        z = scores.detach().to(self.weight.device, torch.float32)
        # a row of NaN (eager attention over left padding, in some versions) or with every
        # token masked has no distribution: computed as uniform, reported as NaN
        broken = (torch.isnan(z).any(-1) | ~(z > -torch.inf).any(-1)).cpu().numpy()
        if broken.any():
            z = torch.where(torch.as_tensor(broken, device=z.device)[:, None], 0.0, z)
        # exact mode: float64 from the softmax on; fast mode: float32 for the O(V) work, the
        # bracket's margins widened to cover it (geometry.curvature_bracket)
        work = f64 if self.mode == "exact" else torch.float32
        logp = torch.log_softmax(z.to(work), dim=-1)
        p = logp.exp()
        ent = -(p * logp).nansum(-1)  # 0 log 0 = 0: masked tokens add nothing
        wide = self.support if self.mode == "fast" else max(self.tokens, ALTERNATIVES)
        pk, idx = p.topk(min(wide, p.shape[-1]), dim=-1)
        top = idx[:, 0]
        k = min(max(self.tokens, ALTERNATIVES), p.shape[-1])
        # the rows of W the bracket, the flip radius and (fast) the direction's products read
        # (B, wide, d) by one gather: a gather per row and a stack copied them twice
        rows = self.weight.index_select(0, idx.reshape(-1)).view(*idx.shape, -1)
        bracket = curvature_bracket(
            self.weight, p, self.spread, likeliest=(pk[:, :k], idx[:, :k]), rows=rows[:, :k]
        )
        B = z.shape[0]
        if self.mode == "exact":
            found = top_curvature(
                self.weight, z, tol=self.eig_tol, search_weight=self.search, refine=False
            )
            # the exact roots want W v as exact as the head's own products
            along = (found.vector.to(self.weight.dtype) @ self.weight.T).to(f64)
            _, c2, c3, c4 = cumulants(p, along)
            lower, ray_logp = bracket.lower, logp
        else:  # no pass over W: the direction's products with the likeliest tokens' rows
            vector = bracket.vector.to(self.weight.dtype)
            along = matvecs(rows, vector).to(work)
            mean, c2, c3, c4 = (c.to(f64) for c in cumulants(pk, along, lumped=True))
            lower = torch.maximum(bracket.lower, c2 * (1 - 1e-5))  # a restricted variance too
            # the ray's distribution: the likeliest tokens, and the rest lumped at their mean
            rest = (1.0 - pk.to(f64).sum(-1, keepdim=True)).clamp_min(0.0)
            ray_logp = torch.cat([pk.to(f64), rest], -1).log()
            along = torch.cat([along.to(f64), mean[:, None]], -1)
        values = {
            "next_token_id": top.cpu().numpy(),
            "next_prob": pk[:, 0].cpu().numpy(),
            "entropy": ent.cpu().numpy(),
            "lambda_max": c2.cpu().numpy(),
            "lambda_lower": lower.cpu().numpy(),
            "lambda_upper": bracket.upper.cpu().numpy(),
            "radius_flip": flip_radius(z, idx, self.weight, self.spread, rows[:, :k]).cpu().numpy(),
        }
        radii = {
            "radius_quadratic": torch.stack(
                [torch.sqrt(2.0 * e / c2.clamp_min(1e-300)) for e in self.eps], -1
            ),
            "radius_curve": self._radius_along(ray_logp, along, c2, c3, c4),
        }
        if self.certified:  # |w_i - mu| <= |w_i - m0| + sum_j p_j |w_j - m0|
            n = self.spread.radii
            dual = n[None, :] + (p @ n)[:, None]
            bound = BallBound(bracket.upper, p, dual, order=self.spread.order)
            radii["radius_certified"] = bound.radius(self.eps, rtol=CERTIFY_RTOL)
        if self._direction_logits is not None:
            k = self._direction_logits.shape[0]
            rep = lambda x: x.repeat_interleave(k, dim=0)  # noqa: E731  (row-major: b, k)
            b = self._direction_logits.repeat(B, 1)
            _, d2, d3, d4 = cumulants(rep(p), b)
            per = self._radius_along(rep(logp), b, d2, d3, d4).reshape(B, k, -1)
            for j, name in enumerate(self.directions):
                radii[f"radius_{name}"] = per[:, j]
        radii = {name: r.cpu().numpy() for name, r in radii.items()}
        if broken.any():  # new arrays: some share memory with the returned top tokens
            for arrays in (values, radii):
                for name, array in arrays.items():
                    mask = broken.reshape((-1,) + (1,) * (array.ndim - 1))
                    arrays[name] = np.where(mask, np.nan if array.dtype.kind == "f" else -1, array)
        k = min(ALTERNATIVES, pk.shape[-1])
        return values, radii, idx[:, :k].cpu().numpy(), pk[:, :k].cpu().numpy(), logp

    def _radius_along(self, logp: Tensor, b: Tensor, c2, c3, c4) -> Tensor:
        """(R, E): the exact KL root along the nearer of ``+-b`` (R, V) under ``exp(logp)``
        (R, V), Newton started at each sign's Pade radius (usually within a few percent)."""
        R = b.shape[0]
        # both signs in one call: -b flips the odd cumulant
        both = [torch.cat([c2, c2]), torch.cat([c3, -c3]), torch.cat([c4, c4])]
        pade = torch.stack([radius_pade(both[0], both[1], e, both[2]) for e in self.eps], -1)
        levels = torch.tensor(self.eps, dtype=torch.float64, device=b.device).expand(R, -1)
        return nearest_cgf_crossings(logp, b, levels, (pade[:R], pade[R:]))
