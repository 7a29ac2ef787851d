"""The KL along a ray, exactly and as closed forms of any order.

Along ``h + t v`` let ``delta(t) = z(t) - z(0)`` be the change of the logits. Then

    KL(p || p_t) = log E_p[exp delta(t)] - E_p[delta(t)]

With a linear head ``delta = t a``, ``a = J v``, and this is ``K(t) - t K'(0)`` with ``K`` the
cumulant generating function of ``a`` under ``p``: exact, convex, O(V) per ``t``.

Expanding ``delta = t a1 + t^2/2 a2 + t^3/6 a3`` (``a_k``: k-th derivative of the logits
along the ray; ``a2 = a3 = 0`` for a linear head) gives

    KL = c2 t^2/2 + c3 t^3/6 + c4 t^4/24 + O(t^5)
    c2 = Var(a1)                                   (= v^T H v)
    c3 = k3(a1) + 3 Cov(a1, a2)
    c4 = k4(a1) + 6 E[(a1 - Ea1)^2 (a2 - Ea2)] + 3 Var(a2) + 4 Cov(a1, a3)

where ``k3, k4`` are the third and fourth cumulants under ``p``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..budget import rows_in_cache, rows_within
from .head import LogitHead


def _centered(p: Tensor, a: Tensor) -> Tensor:
    return a - (p * a).sum(-1, keepdim=True)


def cumulants(p: Tensor, a: Tensor, lumped: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Mean and 2nd-4th cumulants of ``a`` under ``p`` along the last axis.

    ``lumped``: ``p`` covers only some tokens (the likeliest), the rest of the mass sits at
    their mean (so it adds nothing to the central moments); the 2nd cumulant is then a lower
    bound on the whole distribution's variance."""
    mean = (p * a).sum(-1)
    if lumped:
        mean = mean / p.sum(-1).clamp_min(1e-300)
    c = a - mean[..., None]
    weighted = p * c * c  # products, not powers: a third of the passes over (..., V)
    m2 = weighted.sum(-1)
    weighted *= c
    m3 = weighted.sum(-1)
    m4 = (weighted * c).sum(-1)
    return mean, m2, m3, m4 - 3.0 * m2**2


def series_coefficients(
    p: Tensor, derivs: list[Tensor], cov13: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(c2, c3, c4)`` of the KL series from the logit derivatives ``[a1, a2, a3]``.

    ``p`` broadcasts against each ``a_k`` (shape (..., V)); missing ``a2``/``a3`` mean zero.
    ``a3`` enters only as ``Cov_p(a1, a3) = (F a1) . a3``: ``cov13`` gives that number when
    ``a3`` itself was never formed (``SuffixBatch.series_derivatives``).

    (P, V) rows go a few at a time, so that the dozen passes over each stay in cache
    (``budget.rows_in_cache``; 64 rows of SmolLM2's vocabulary: 0.14 s at once).
    """
    if p.ndim == 2 and all(a.shape == p.shape for a in derivs):
        step = rows_in_cache(p.shape[-1], p.element_size(), p.device)
        if step < p.shape[0]:
            parts = [
                series_coefficients(
                    p[s : s + step],
                    [a[s : s + step] for a in derivs],
                    None if cov13 is None else cov13[s : s + step],
                )
                for s in range(0, p.shape[0], step)
            ]
            return tuple(torch.cat(c) for c in zip(*parts, strict=True))
    a1 = derivs[0]
    c1 = _centered(p, a1)
    var1 = (p * c1**2).sum(-1)
    k3 = (p * c1**3).sum(-1)
    k4 = (p * c1**4).sum(-1) - 3.0 * var1**2
    c2, c3, c4 = var1, k3, k4
    if len(derivs) > 1:
        c2a = _centered(p, derivs[1])
        c3 = c3 + 3.0 * (p * c1 * c2a).sum(-1)
        c4 = c4 + 6.0 * (p * c1**2 * c2a).sum(-1) + 3.0 * (p * c2a**2).sum(-1)
    if len(derivs) > 2:
        c4 = c4 + 4.0 * (p * c1 * _centered(p, derivs[2])).sum(-1)
    elif cov13 is not None:
        c4 = c4 + 4.0 * cov13
    return c2, c3, c4


def radius_quadratic(c2: Tensor, eps: float) -> Tensor:
    """The published closed form ``sqrt(2 eps / c2)``; infinite where ``c2 = 0``."""
    c2 = torch.as_tensor(c2, dtype=torch.float64)
    return torch.where(c2 > 0, torch.sqrt(2.0 * eps / c2.clamp_min(1e-300)), torch.inf)


def pade_branch(c2: Tensor, c3: Tensor, c4: Tensor) -> tuple[Tensor, Tensor]:
    """``(t_end, eps_end)``: where the [2/2] approximant ``R(t) = (c2 t^2/2) / (1 + beta t +
    gamma t^2)`` stops being a usable KL curve, and its value there.

    ``R'(t)`` has the sign of ``t (2 + beta t)`` wherever the denominator is positive, so R
    rises from 0 until its pole (then ``eps_end = inf``: every eps is crossed on the way) or
    until ``t = -2 / beta`` where it peaks (``beta < 0``). With ``beta >= 0`` and ``gamma > 0``
    it rises for ever towards ``c2 / (2 gamma)``, while a real KL grows at least linearly:
    there the branch is trusted up to half that level."""
    c2 = torch.as_tensor(c2, dtype=torch.float64)
    safe = c2.clamp_min(1e-300)
    beta = -torch.as_tensor(c3, dtype=torch.float64) / (3.0 * safe)
    gamma = beta**2 - torch.as_tensor(c4, dtype=torch.float64) / (12.0 * safe)
    inf = torch.full_like(safe, torch.inf)
    # the first positive root of the denominator 1 + beta t + gamma t^2 (the pole)
    disc = beta**2 - 4.0 * gamma
    root = torch.sqrt(disc.clamp_min(0.0))
    small = torch.where(gamma != 0, (-beta - root) / (2.0 * gamma), -1.0 / beta)
    large = torch.where(gamma != 0, (-beta + root) / (2.0 * gamma), -1.0 / beta)
    real = (disc >= 0) | (gamma == 0)
    pole = torch.where(real & (small > 0), small, torch.where(real & (large > 0), large, inf))
    peak = torch.where(beta < 0, -2.0 / beta, inf)

    def value(t: Tensor) -> Tensor:
        return safe * t**2 / 2.0 / (1.0 + beta * t + gamma * t**2)

    t_end = torch.where(pole <= peak, pole, peak)
    eps_end = torch.where(pole <= peak, inf, value(torch.where(torch.isfinite(peak), peak, 1.0)))
    saturating = torch.isinf(t_end) & (gamma > 0)
    half = safe / (4.0 * gamma.clamp_min(1e-300))  # half the level it tends to
    # R(t) = half: c2 t^2/2 = half (1 + beta t + gamma t^2), the positive root
    qa, qb = safe / 2.0 - half * gamma, half * beta
    t_half = (qb + torch.sqrt((qb**2 + 4.0 * qa * half).clamp_min(0.0))) / (2.0 * qa)
    t_end = torch.where(saturating, t_half, t_end)
    eps_end = torch.where(saturating, half, eps_end)
    return t_end, eps_end


def radius_pade(c2: Tensor, c3: Tensor, eps: float, c4: Tensor | None = None) -> Tensor:
    """Root of a Pade approximant of the KL series, in closed form; never smaller at a larger
    eps.

    ``KL ~ (c2 t^2 / 2) / (1 + beta t + gamma t^2)`` with ``beta = -c3 / (3 c2)`` and
    ``gamma = beta^2 - c4 / (12 c2)`` matches the series to fourth order ([2/2]); without
    ``c4``, ``gamma = 0`` gives the third-order [2/1] form, which grows linearly for large t
    like the exact curve and always has exactly one positive root. ``KL = eps`` is then
    ``A t^2 - eps beta t - eps = 0`` with ``A = c2/2 - eps gamma``, whose first positive root is

        t = 2 eps / (sqrt(D) - eps beta),   D = eps^2 beta^2 + 4 A eps

    (a form without cancellation). The [2/2] root is taken on the approximant's rising branch
    only (``pade_branch``: below ``eps_end``, where it is the first crossing of a rising
    curve); above it the [2/1] root, but never short of the branch's end ``t_end``. So the
    radius rises with eps by construction. Infinite where ``c2 = 0``.
    """
    c2 = torch.as_tensor(c2, dtype=torch.float64)
    c3 = torch.as_tensor(c3, dtype=torch.float64)
    safe = c2.clamp_min(1e-300)
    beta = -c3 / (3.0 * safe)
    t21 = 2.0 * eps / (torch.sqrt((eps * beta) ** 2 + 2.0 * safe * eps) - eps * beta)
    t = t21
    if c4 is not None:
        c4 = torch.as_tensor(c4, dtype=torch.float64)
        gamma = beta**2 - c4 / (12.0 * safe)
        D = (eps * beta) ** 2 + 4.0 * (safe / 2.0 - eps * gamma) * eps
        den = torch.sqrt(D.clamp_min(0.0)) - eps * beta
        ok = (D >= 0) & (den > 0)
        t22 = 2.0 * eps / torch.where(ok, den, torch.ones_like(den))
        t_end, eps_end = pade_branch(c2, c3, c4)
        on_branch = ok & (eps < eps_end) & (t22 <= t_end * (1 + 1e-12))
        t = torch.where(
            on_branch, t22, torch.maximum(t21, torch.where(torch.isfinite(t_end), t_end, t21))
        )
    return torch.where(c2 > 0, t, torch.inf)


def radius_series(coeffs: list[float], eps: float) -> float:
    """Smallest positive root of ``sum_k coeffs[k] t^(k+2) / (k+2)! = eps``; inf if none."""
    poly = [c / math.factorial(k + 2) for k, c in enumerate(coeffs)]
    # numpy wants highest degree first; constant term -eps, no linear term.
    roots = np.roots(list(reversed(poly)) + [0.0, -eps])
    real = roots[(np.abs(roots.imag) <= 1e-9 * np.abs(roots)) & (roots.real > 0)].real
    return float(real.min()) if real.size else math.inf


def by_ray(kl_rows, rays: Tensor, t: Tensor, width: int) -> Tensor:
    """``kl_rows(r, t)`` for the steps ``t`` (M,) of ``rays`` (M,). On a CPU one ray at a time:
    broadcasting its (V,) rows beats gathering (M, V) copies. On an accelerator the rows are
    gathered, a (rows x V) budget at a time: a loop over rays would wait for the device (its
    ``unique``, ``nonzero``) and launch tiny kernels per ray."""
    out = torch.empty_like(t)
    if rays.device.type == "cpu":
        for r in torch.unique(rays).tolist():
            idx = (rays == r).nonzero()[:, 0]
            out[idx] = kl_rows(r, t[idx])
        return out
    step = rows_within(width)
    for s in range(0, len(rays), step):
        out[s : s + step] = kl_rows(rays[s : s + step], t[s : s + step])
    return out


def _on_numpy(kl_at, rays: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """A ``kl_at(rays, t)`` of tensors as the numpy row function ``first_crossings`` expects."""
    t = torch.as_tensor(np.asarray(ts, dtype=np.float64))
    return kl_at(torch.as_tensor(rays), t).cpu().numpy()


@dataclass
class RayCurve:
    """Exact ``KL(p || p_t)`` along ``R`` rays ``h_r + t v_r``.

    Built from the raw logits ``u0`` (R, V) at each ray's origin and their rate
    ``b = scale * W v`` (R, V). A linear head uses the CGF; a softcapped head evaluates the
    real ``c tanh(u / c)`` at each ``t``. Rays may share an origin (``+v`` and ``-v``).
    """

    head: LogitHead
    u0: Tensor
    b: Tensor

    def __post_init__(self) -> None:
        self.u0 = torch.atleast_2d(self.u0)
        self.b = torch.atleast_2d(self.b)
        # one softmax per origin: rays sharing a single origin broadcast it (views, no copies)
        logp = torch.log_softmax(self.head.squash(self.u0), dim=-1)
        self.logp, self.p = logp.expand_as(self.b), logp.exp().expand_as(self.b)
        self.u0 = self.u0.expand_as(self.b)
        self._mean_b = (self.p * self.b).sum(-1)

    @classmethod
    def from_head(cls, head: LogitHead, h: Tensor, v: Tensor) -> RayCurve:
        """Rays from origins ``h`` (R, d) or (d,) along directions ``v`` (R, d)."""
        return cls(head, head.raw(h), head.direction(v))

    def kl_at(self, rays: Tensor, t: Tensor) -> Tensor:
        """KL of ray ``rays[i]`` at step ``t[i]``: shape (M,)."""
        rays = torch.as_tensor(rays, dtype=torch.long, device=self.b.device)
        t = torch.as_tensor(t, dtype=self.b.dtype, device=self.b.device)
        return by_ray(self._kl_rows, rays, t, self.b.shape[-1])

    def _kl_rows(self, r, t: Tensor) -> Tensor:
        """KL at steps ``t`` (n,) of ray(s) ``r``: one ray (an int) or one per step."""
        tr = t[:, None]
        if self.head.is_linear:
            return torch.logsumexp(self.logp[r] + tr * self.b[r], -1) - t * self._mean_b[r]
        logpt = torch.log_softmax(self.head.squash(self.u0[r] + tr * self.b[r]), -1)
        return (self.p[r] * (self.logp[r] - logpt)).sum(-1)

    def __call__(self, rays: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """``kl_at`` on numpy arrays: the row function ``first_crossings`` expects."""
        return _on_numpy(self.kl_at, rays, ts)

    def kl(self, t: Tensor | float) -> Tensor:
        """KL of every ray at common steps ``t`` (n,): shape (n, R)."""
        t = torch.as_tensor(t, dtype=self.b.dtype).reshape(-1)
        R = self.b.shape[0]
        rays = torch.arange(R, device=self.b.device).repeat(t.numel())
        return self.kl_at(rays, t.repeat_interleave(R)).reshape(t.numel(), R)

    def coefficients(self) -> tuple[Tensor, Tensor, Tensor]:
        """Series coefficients ``(c2, c3, c4)`` per ray, shape (R,) each."""
        if self.head.is_linear:  # a2 = a3 = 0: skip two (R, V) arrays of zeros
            return series_coefficients(self.p, [self.b])
        derivs = self.head.logit_derivatives(self.u0, self.b, order=3)
        return series_coefficients(self.p, derivs)


class TaylorPathKL:
    """``KL(p || softmax(z(t)))`` along the Taylor path of the logits, the softmax exact:

        z(t) = z0 + t a1 + t^2/2 a2 + t^3/6 a3,    KL = log E_p[exp d(t)] - E_p[d(t)]

    with ``d(t) = z(t) - z0`` (each direction's ``a_k``: the k-th derivative of the logits
    along it, (N, V); fewer than three truncate the path earlier). The series of this KL
    agrees with the exact one to fourth order (it shares ``a1..a3``), and the softmax
    saturates as the real one does, where a series in ``t`` diverges: at confident positions
    and large eps. With a linear head at the pre-logit vector the path is exact (``a2 = a3 =
    0``).

    ``logp`` (P, V): the log-probabilities at the origins; ``origin`` (N,): the origin of each
    direction (default: direction i at origin i). With ``both_signs`` the rays are ``+v`` and
    ``-v`` of each direction (rays 2i, 2i + 1: the odd derivatives flip), else ray i is
    direction i. A callable ``(rays, ts) -> KL`` as ``first_crossings`` wants: the radius is
    the first crossing, so it never shrinks as eps grows.
    """

    def __init__(
        self,
        logp: Tensor,
        derivs: list[Tensor],
        origin: Tensor | None = None,
        both_signs: bool = False,
    ) -> None:
        if not 1 <= len(derivs) <= 3:
            raise ValueError(f"1 to 3 logit derivatives, got {len(derivs)}")
        derivs = [torch.atleast_2d(a).to(torch.float64) for a in derivs]
        self.logp = torch.atleast_2d(logp).to(torch.float64)
        N = derivs[0].shape[0]
        self.origin = torch.arange(N) if origin is None else torch.as_tensor(origin).long()
        self.origin = self.origin.to(self.logp.device)
        self.both_signs = both_signs
        p = self.logp.exp()[self.origin]
        # centred: d(t) - E_p d(t) has no large common offset to cancel
        self.centred = [a - (p * a).sum(-1, keepdim=True) for a in derivs]

    def kl_at(self, rays: Tensor, t: Tensor) -> Tensor:
        rays = torch.as_tensor(rays, dtype=torch.long, device=self.logp.device)
        t = torch.as_tensor(t, dtype=torch.float64, device=self.logp.device)
        return by_ray(self._kl_rows, rays, t, self.logp.shape[-1]).clamp_min(0.0)

    def _kl_rows(self, r, t: Tensor) -> Tensor:
        """KL at steps ``t`` (n,) of ray(s) ``r``: one ray (an int) or one per step."""
        if self.both_signs:  # -v at t is +v at -t
            i, t = r // 2, t * (1.0 - 2.0 * (r % 2))
        else:
            i = r
        tr = t[:, None]
        d = sum((tr**k / math.factorial(k)) * a[i] for k, a in enumerate(self.centred, start=1))
        return torch.logsumexp(self.logp[self.origin[i]] + d, -1)

    def __call__(self, rays: np.ndarray, ts: np.ndarray) -> np.ndarray:
        return _on_numpy(self.kl_at, rays, ts)
