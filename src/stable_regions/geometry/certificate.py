"""Certified radii at the pre-logit vector: a ball on which the KL provably stays below eps.

For a linear head ``z = scale (W h + b)`` and a perturbation ``delta`` of ``h``, write
``u = scale W delta`` and ``c_i = u_i - E_p u = scale (w_i - mu) . delta`` with
``mu = W^T p``. Then (docs/certify.md gives the reason for every step)

    KL(p || p_delta) = K(1) - K'(0) = int_0^1 (1 - s) K''(s) ds,   K(s) = log E_p e^{s u}
    K''(s) = Var_{p_s}(u) <= E_p[e^{s c} c^2] / E_p[e^{s c}] <= E_p[e^{s c} c^2]

(``p_s`` the tilted distribution; Jensen gives ``E_p e^{s c} >= 1``). With ``|delta| <= r``:
``c_i <= r R_i`` (``R_i = scale |w_i - mu|_*``, the dual norm: L2 for an L2 ball, L1 for an
L-inf box) and ``E_p c^2 = delta^T H delta <= r^2 lam`` (``lam >= max v^T H v`` over the unit
ball of the norm). Splitting the tokens at a threshold ``rho``:

    E_p[e^{s c} c^2] <= r^2 [lam e^{s r rho} + sum_{R_i > rho} p_i R_i^2 (e^{s r R_i} - e^{s r rho})]

and integrating, with ``phi(x) = (e^x - 1 - x) / x^2`` (``int_0^1 (1 - s) e^{s x} ds``):

    KL <= r^2 [lam phi(r rho) + sum_{R_i > rho} p_i R_i^2 (phi(r R_i) - phi(r rho))]     (tilted)
    KL <= r^2 D^2 / 8,   D = 2 max_i R_i >= the range of u / r                          (Hoeffding)

Both grow with ``r``; the certified radius is the largest ``r`` where their minimum stays
below eps. As ``eps -> 0`` it tends to ``sqrt(2 eps / lam)``, the quadratic radius of the top
direction when ``lam = lambda_max``. ``lam`` must be an upper bound on ``lambda_max``:
``subspace_upper_bound`` gives one from a few Ritz vectors and the exact trace.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..budget import chunk_bytes, rows_in_cache, rows_within
from .fisher import FisherOperator
from .head import LogitHead

# Float64 roundoff in the sums behind lam, R_i and the bound (relative ~1e-13 for vocabulary
# sums of 2^18 terms) is covered by this relative margin, applied to every bound.
ROUNDOFF_MARGIN = 1e-9
BISECTION_STEPS = 50  # a bisection to 2^-50 of its bracket: below the roundoff margin


def phi(x: Tensor) -> Tensor:
    """``(e^x - 1 - x) / x^2`` for ``x >= 0`` (1/2 at 0), never below the true value: a
    series with a rounded-up remainder below 1e-3, ``expm1`` above (cancellation there is
    ~1e-13 relative, inside ``ROUNDOFF_MARGIN``)."""
    small = x < 1e-3
    xs = torch.where(small, torch.ones_like(x), x)
    big = (torch.expm1(xs) - xs) / (xs * xs)
    series = 0.5 + x / 6.0 + x * x / 24.0 * (1.0 + x)  # remainder sum_{k>=3} x^k/(k+2)! <= x^3/24
    return torch.where(small, series, big)


def subspace_upper_bound(gram: Tensor, residual: Tensor, trace: Tensor) -> Tensor:
    """Upper bound (P,) on ``lambda_max`` of PSD ``G`` from an orthonormal ``Y`` (k columns).

    In the basis ``[Y, Y_perp]`` G has blocks ``A = Y^T G Y`` (``gram``, (P, k, k)),
    ``B = Y_perp^T G Y`` with ``|B| = |(I - Y Y^T) G Y|`` (``residual``, (P,)) and
    ``C = Y_perp^T G Y_perp``, PSD with ``lambda_max(C) <= tr C = tr G - tr A`` (``trace`` the
    exact ``tr G``). For a unit ``x = (x1, x2)``: ``x^T G x <= a |x1|^2 + 2 b |x1||x2| + c |x2|^2``
    with ``a = lambda_max(A)``, so ``lambda_max(G) <= lambda_max([[a, b], [b, c]])``. Tight when
    Y holds the top eigenvectors (``b`` small) and the rest of the spectrum is below ``a``."""
    a = torch.linalg.eigvalsh(gram)[..., -1]
    c = (trace - torch.diagonal(gram, dim1=-2, dim2=-1).sum(-1)).clamp_min(0.0)
    half = 0.5 * (a - c)
    bound = 0.5 * (a + c) + torch.sqrt(half * half + residual * residual)
    return bound + ROUNDOFF_MARGIN * trace.abs()


def ritz_upper_bound(
    gy: Tensor, y: Tensor, trace: Tensor, complement: Callable[[Tensor], Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """The best ``subspace_upper_bound`` over the leading Ritz vectors of ``span(y)``.

    ``y`` (P, k, d) orthonormal rows, ``gy`` (P, k, d) = ``G y`` computed exactly. Rayleigh-Ritz
    in float64 orders the subspace; each prefix of 1..k Ritz vectors gives a bound (more
    vectors lower ``c`` but may raise ``b``) and the smallest is returned, with the top Ritz
    value (a lower bound on ``lambda_max``). ``complement(ritz_vectors, positions)``
    (optional) gives another upper bound on ``lambda_max`` of G outside the span of the
    converged Ritz vectors (residual below 1e-3 of the top value) at those positions; it is
    asked only where the trace leaves the bound above the Ritz value.
    Returns ``(upper, ritz)``, both (P,)."""
    gram = torch.einsum("pkd,pjd->pkj", y, gy)
    gram = 0.5 * (gram + gram.transpose(1, 2))
    theta, s = torch.linalg.eigh(gram)  # ascending
    theta, s = theta.flip(-1), s.flip(-1)
    ry = torch.einsum("pkj,pkd->pjd", s, y)  # Ritz vectors, descending
    rgy = torch.einsum("pkj,pkd->pjd", s, gy)
    resid = rgy - theta[:, :, None] * ry
    best = torch.full_like(trace, math.inf)
    for k in range(1, y.shape[1] + 1):
        b = torch.linalg.matrix_norm(resid[:, :k].transpose(1, 2), ord=2)
        bound = subspace_upper_bound(torch.diag_embed(theta[:, :k]), b, trace)
        best = torch.minimum(best, bound)
    if complement is not None:
        # only where the trace leaves the bound loose (a flat spectrum beyond the Ritz
        # vectors): elsewhere the complement's cost buys nothing
        loose = torch.nonzero(best > (1 + 1e-6) * theta[:, 0]).flatten()
        if loose.numel():
            resid_l, theta_l, ry_l = resid[loose], theta[loose], ry[loose]
            converged = resid_l.norm(dim=-1) <= 1e-3 * theta_l[:, :1].abs()
            k = max(1, int(converged.cumprod(-1).sum(-1).min()))  # a prefix all of them have
            b = torch.linalg.matrix_norm(resid_l[:, :k].transpose(1, 2), ord=2)
            a = theta_l[:, 0]
            c = torch.minimum(
                (trace[loose] - theta_l[:, :k].sum(-1)).clamp_min(0.0),
                complement(ry_l[:, :k], loose),
            )
            half = 0.5 * (a - c)
            bound = 0.5 * (a + c) + torch.sqrt(half * half + b * b) + ROUNDOFF_MARGIN * trace[loose]
            best[loose] = torch.minimum(best[loose], bound)
    return best, theta[:, 0]


def head_tail_complement(
    weight: Tensor, scale: float, p: Tensor, mu: Tensor, dual: Tensor, tokens: int = 1024
) -> Callable[[Tensor], Tensor]:
    """``complement`` for ``ritz_upper_bound`` at the pre-logit vector: with ``A`` the
    ``tokens`` likeliest tokens and ``T`` the rest, ``G = G_A + G_T`` (each a sum of
    ``p_i c_i c_i^T``, PSD), so on the complement ``Y_perp`` of the Ritz vectors
    ``lambda_max <= |P G_A P|_F + tr G_T`` (``P = I - Y^T Y``; Frobenius >= spectral norm,
    trace >= the top eigenvalue of a PSD matrix). ``dual`` are the L2 ``R_i`` (rounded up)."""

    def bound(ry: Tensor, positions: Tensor) -> Tensor:
        pp, mu_p, dual_p = p[positions], mu[positions], dual[positions]
        k = min(tokens, p.shape[-1])
        d = weight.shape[-1]
        pa, idx = pp.topk(k, dim=-1)  # (n, k)
        # a few positions at a time: their (k, d) float64 rows stay in cache (SmolLM2, ~45
        # positions: half the time of one (n, k, d) pass, the same arithmetic)
        step = min(rows_in_cache(k * d, 8, p.device), rows_within(k * d, 8))
        frob = torch.empty(len(positions), dtype=torch.float64, device=p.device)
        for s in range(0, len(positions), step):
            rows = weight[idx[s : s + step]].to(torch.float64) * scale  # (n, k, d)
            z = pa[s : s + step].sqrt()[:, :, None] * (rows - mu_p[s : s + step, None, :])
            y = ry[s : s + step]
            z = z - (z @ y.transpose(1, 2)) @ y  # project out the Ritz vectors
            gram = z.transpose(1, 2) @ z if k >= d else z @ z.transpose(1, 2)
            frob[s : s + step] = torch.linalg.matrix_norm(gram, ord="fro")
        total = (pp * dual_p * dual_p).sum(-1)
        head_mass = (pa * dual_p.gather(-1, idx) ** 2).sum(-1)
        tail = (total - head_mass).clamp_min(0.0)
        return (frob + tail) * (1 + ROUNDOFF_MARGIN) + 1e-12 * total

    return bound


class BallBound:
    """``KL <= bound(r)`` on the ball ``|delta| <= r`` at P positions (see the module doc).

    Args:
        lam: (P,) an upper bound on ``max delta^T H delta`` over the unit ball of the norm.
        p: (P, V) the next-token probabilities (float64).
        dual: (P, V) ``R_i``, an upper bound on ``max c_i`` over the unit ball.
        order: (V,) token indices that sort every row of ``dual`` in descending order, where
            one order serves all positions (the rows differ by a constant): saves a sort.
    """

    def __init__(self, lam: Tensor, p: Tensor, dual: Tensor, order: Tensor | None = None) -> None:
        f64 = torch.float64
        self.lam = lam.to(f64) * (1 + ROUNDOFF_MARGIN)
        dual = dual.to(f64) * (1 + ROUNDOFF_MARGIN)
        p = p.to(f64)
        self.diameter = 2.0 * dual.max(-1).values
        # the threshold rho: the tokens of largest R_i whose p_i R_i^2 add up to lam (the
        # split that minimises the bound for every s); at most TAIL of them are kept apart
        if order is None:  # the TAIL + 1 largest are all the split reads: no full sort
            order = dual.topk(min(self.TAIL + 1, dual.shape[-1]), dim=-1).indices
        else:  # one order shared by every position (V,): the caller knows it sorts dual
            order = order[: self.TAIL + 1].expand(dual.shape[0], -1)
        r_sorted = dual.gather(-1, order)
        mass = p.gather(-1, order) * r_sorted**2
        count = (mass.cumsum(-1) < self.lam[:, None]).sum(-1).clamp(max=self.TAIL)
        width = max(1, int(count.max()))
        idx = torch.arange(width, device=p.device)
        keep = idx[None, :] < count[:, None]
        self.rho = r_sorted.gather(-1, count[:, None].clamp(max=r_sorted.shape[-1] - 1))[:, 0]
        self.tail_r = torch.where(keep, r_sorted[:, :width], self.rho[:, None])
        self.tail_mass = torch.where(keep, mass[:, :width], torch.zeros_like(mass[:, :width]))

    TAIL = 4096

    def __call__(self, r: Tensor) -> Tensor:
        """The bound on KL at radii ``r`` (P, n) -> (P, n)."""
        P, n = r.shape
        rows = torch.arange(P, device=r.device).repeat_interleave(n)
        return self.at(rows, r.reshape(-1)).reshape(P, n)

    def at(self, rows: Tensor, r: Tensor) -> Tensor:
        """The bound at radius ``r[j]`` about position ``rows[j]`` ((n,) each) -> (n,)."""
        r = r.to(torch.float64)
        base = phi(r * self.rho[rows])
        extra = phi(r[:, None] * self.tail_r[rows]) - base[:, None]
        tilted = self.lam[rows] * base + (self.tail_mass[rows] * extra).sum(-1)
        hoeffding = self.diameter[rows] ** 2 / 8.0
        return r * r * torch.minimum(tilted, hoeffding) * (1 + ROUNDOFF_MARGIN)

    def radius(self, eps_list: Sequence[float], rtol: float = 1e-12, steps: int = 100) -> Tensor:
        """(P, E): the largest ``r`` with bound <= eps, from below, to ``rtol`` of its bracket.

        ``bound(r) / r^2`` never decreases (``phi`` is increasing and convex, so every term of
        the tilted bound grows with r; Hoeffding's is constant): from the quadratic radius
        ``hi`` (where bound >= r^2 lam / 2 reaches eps or more), ``lo = hi sqrt(eps /
        bound(hi))`` has ``bound(lo) <= lo^2 bound(hi) / hi^2 = eps``, a certified start a few
        percent below the answer. Regula falsi (Illinois) on ``log bound`` against ``log r``,
        nearly linear, closes the bracket in a few steps; it stops where the bracket is within
        ``rtol`` or ``bound(lo)`` is within ``2 rtol`` of eps in log (then the answer lies
        within ``rtol`` of ``lo``). SmolLM2, 60 positions x 3 eps: 12 evaluations, 0.08 s
        (48 and 0.39 s in linear scale from ``lo = 0`` to 2^-50, the same radii to 2e-7).
        ``lo`` is returned, and every ``lo`` is checked, so the answer is always certified."""
        f64 = torch.float64
        eps = torch.tensor(list(eps_list), dtype=f64, device=self.lam.device)
        P, E = self.lam.shape[0], eps.shape[0]
        log_eps = eps.log()[None, :].expand(P, E)

        def excess(r: Tensor, where: Tensor | None = None) -> tuple[Tensor, Tensor]:
            """``log bound - log eps`` (an overflow counts as above) and whether ``bound <=
            eps``, decided on the bound itself (its log may round onto log eps); only
            ``where`` (P, E) is evaluated (the rest reads as above eps)."""
            if where is None:
                value = self(r)
            else:
                value = torch.full_like(r, math.inf)
                value[where] = self.at(torch.nonzero(where)[:, 0], r[where])
            below = value <= eps[None, :]
            return (value.log() - log_eps).nan_to_num(nan=math.inf), below

        # bound(r) >= r^2 lam / 2 (phi >= 1/2, and D^2/4 >= lam): the radius lies below this
        hi = torch.sqrt(2.0 * eps[None, :] / self.lam.clamp_min(1e-300)[:, None])
        f_hi, hi_below = excess(hi)
        lo = hi * torch.exp(-0.5 * f_hi.clamp_min(0.0)).nan_to_num(nan=0.0)
        f_lo, lo_below = excess(lo)
        unsure = ~lo_below  # roundoff (or an infinite bound): start from 0 instead
        lo = torch.where(unsure, torch.zeros_like(lo), lo)
        f_lo = torch.where(unsure, torch.full_like(f_lo, -math.inf), f_lo.clamp_max(0.0))
        done = hi_below  # (only if roundoff) the upper end itself is certified
        lo = torch.where(done, hi, lo)
        x_lo, x_hi = lo.log(), hi.log()
        last = torch.zeros(P, E, dtype=torch.int8, device=eps.device)  # side kept last time
        for _ in range(steps):
            # log bound rises at least twice as fast as log r (bound / r^2 never decreases):
            # the answer lies within -f_lo / 2 of lo in log r
            live = ~done & (hi - lo > rtol * hi) & (f_lo < -2.0 * rtol)
            if not bool(live.any()):
                break
            finite = torch.isfinite(f_lo) & torch.isfinite(f_hi) & (f_hi > f_lo)
            x = (x_lo * f_hi - x_hi * f_lo) / torch.where(finite, f_hi - f_lo, 1.0)
            mid = torch.where(lo > 0, 0.5 * (x_lo + x_hi), x_hi - math.log(2.0))
            x = torch.where(finite & (x > x_lo) & (x < x_hi), x, mid)
            r = x.exp()
            fr, below = excess(r, live)  # the finished ones are not evaluated again
            ok = below & live
            bad = ~below & live
            fr = torch.where(below, fr.clamp_max(0.0), fr.clamp_min(0.0))  # signs as decided
            # Illinois: a side kept twice in a row has its far end's value halved
            f_hi = torch.where(ok & (last == 1), 0.5 * f_hi, f_hi)
            f_lo = torch.where(bad & (last == -1), 0.5 * f_lo, f_lo)
            lo, x_lo, f_lo = (torch.where(ok, a, b) for a, b in ((r, lo), (x, x_lo), (fr, f_lo)))
            hi, x_hi, f_hi = (torch.where(bad, a, b) for a, b in ((r, hi), (x, x_hi), (fr, f_hi)))
            last = torch.where(ok, 1, torch.where(bad, -1, last)).to(torch.int8)
        return lo


def box_curvature_bound(lam_upper: Tensor, diagonal: Tensor) -> Tensor:
    """Upper bound (P,) on ``max s^T H s`` over the box ``|s|_inf <= 1``:
    ``min(d lambda_max, (sum_j sqrt(H_jj))^2)`` (``|s|_2^2 <= d``; and with ``H = A^T A``,
    ``|A s| <= sum_j |s_j| |A e_j|``)."""
    d = diagonal.shape[-1]
    column = diagonal.clamp_min(0.0).sqrt().sum(-1) ** 2
    return torch.minimum(d * lam_upper, column) * (1 + ROUNDOFF_MARGIN)


def norm_lipschitz(radius: Tensor, center_norm: Tensor, gain: float, eps: float, d: int) -> Tensor:
    """Lipschitz bound of an RMSNorm / LayerNorm on the ball of ``radius`` about ``x``.

    ``f(x) = g * y / sqrt(|y|^2 / d + eps)`` with ``y = x`` (RMSNorm) or ``y = x - mean(x)``
    (LayerNorm; the centring has norm 1); ``center_norm = |y(x)|``, ``gain = max |g|``. Its
    Jacobian is ``diag(g) (I - y y^T / (d n^2)) / n`` (times the centring), of norm at most
    ``gain / n`` with ``n = sqrt(|y|^2 / d + eps)``, and ``|y| >= center_norm - radius`` on the
    ball, so the mean-value inequality gives ``gain / sqrt((center_norm - r)_+^2 / d + eps)``."""
    low = (center_norm - radius).clamp_min(0.0)
    return gain / torch.sqrt(low * low / d + eps)


def radius_through_norm(
    radius_after: Tensor, center_norm: Tensor, gain: float, eps: float, d: int
) -> Tensor:
    """The largest ``r`` (from below) with ``r * norm_lipschitz(r) <= radius_after``: a ball of
    radius r before the norm maps into the certified ball after it. Shapes broadcast."""
    radius_after = radius_after.to(torch.float64)
    center = center_norm.to(torch.float64)
    if center.ndim < radius_after.ndim:
        center = center.reshape(center.shape + (1,) * (radius_after.ndim - center.ndim))
    lo = torch.zeros_like(radius_after)
    # r * L(r) >= r * L(0), so the answer lies below radius_after / L(0)
    hi = (radius_after / norm_lipschitz(torch.zeros_like(center), center, gain, eps, d)).expand_as(
        radius_after
    ) * (1 + 1e-12)
    for _ in range(BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        ok = mid * norm_lipschitz(mid, center, gain, eps, d) <= radius_after
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid)
    return lo


@dataclass
class ExactHeadPass:
    """What one float64 pass over W gives at P positions (products exact to float64 roundoff;
    W upcast a vocabulary chunk at a time, never as a whole copy).

    ``mu`` (P, d) = ``scale W^T p``; ``gy`` (P, k, d) = ``H y`` for the rows of ``y``;
    ``trace`` (P,) = ``tr H`` (rounded up); ``dual`` (P, V) = ``scale |w_i - mu|_2``, rounded
    up, and ``row_dual`` (V,) = ``scale |w_i|_2``; with ``l1=True`` also ``dual_l1`` and
    ``row_dual_l1``, the same in the L1 norm, and ``diagonal`` (P, d) = ``diag H`` (else
    None); ``tangents`` (P, k, V) = ``scale W y`` (the raw logits' change along each row of
    ``y``)."""

    mu: Tensor
    gy: Tensor
    trace: Tensor
    dual: Tensor
    row_dual: Tensor
    tangents: Tensor
    dual_l1: Tensor | None = None
    row_dual_l1: Tensor | None = None
    diagonal: Tensor | None = None


def exact_head_pass(
    weight: Tensor, scale: float, p: Tensor, y: Tensor, l1: bool = False, chunk: int | None = None
) -> ExactHeadPass:
    """``H = scale^2 W^T (diag p - p p^T) W`` applied exactly (see ``ExactHeadPass``)."""
    f64 = torch.float64
    V, d = weight.shape
    P = p.shape[0]
    budget = chunk or chunk_bytes(weight.device)
    step = max(1, budget // (8 * d))
    if l1:  # the (P, n, d) differences of the L1 norms stay within the same budget
        step = max(1, min(step, budget // (8 * d * P)))
    mu = torch.zeros(P, d, dtype=f64, device=p.device)
    for s in range(0, V, step):
        mu += p[:, s : s + step] @ (weight[s : s + step].to(f64) * scale)
    mu_y = torch.einsum("pd,pkd->pk", mu, y)
    mu2 = (mu * mu).sum(-1)
    gy = torch.zeros_like(y)
    dual = torch.empty(P, V, dtype=f64, device=p.device)
    row_dual = torch.empty(V, dtype=f64, device=p.device)
    dual_l1 = torch.empty(P, V, dtype=f64, device=p.device) if l1 else None
    row_dual_l1 = torch.empty(V, dtype=f64, device=p.device) if l1 else None
    diagonal = torch.zeros(P, d, dtype=f64, device=p.device) if l1 else None
    tangents = torch.empty(P, y.shape[1], V, dtype=f64, device=p.device)
    for s in range(0, V, step):
        w = weight[s : s + step].to(f64) * scale  # (n, d)
        pc = p[:, s : s + step]
        tangents[:, :, s : s + step] = torch.einsum("pkd,nd->pkn", y, w)
        g = tangents[:, :, s : s + step] - mu_y[:, :, None]  # centred logit tangents,
        g.mul_(pc[:, None, :])  # weighted by p: one array, not two
        gy += torch.einsum("pkn,nd->pkd", g, w) - g.sum(-1)[:, :, None] * mu[:, None, :]
        w2 = (w * w).sum(-1)
        row_dual[s : s + step] = w2.sqrt()
        if l1:
            diff = w[None, :, :] - mu[:, None, :]  # (P, n, d)
            squares = diff * diff
            dual[:, s : s + step] = squares.sum(-1).sqrt()
            dual_l1[:, s : s + step] = diff.abs().sum(-1)
            diagonal += torch.einsum("pn,pnd->pd", pc, squares)
            row_dual_l1[s : s + step] = w.abs().sum(-1)
        else:
            r2 = w2[None, :] - 2.0 * (mu @ w.T) + mu2[:, None]
            # |w|^2 - 2 w.mu + |mu|^2 loses ~1e-16 (|w|^2 + |mu|^2) absolutely: rounded up
            r2 = r2.clamp_min(0.0) + 1e-14 * (w2[None, :] + mu2[:, None])
            dual[:, s : s + step] = r2.sqrt()
    trace = diagonal.sum(-1) if l1 else (p * dual * dual).sum(-1)
    return ExactHeadPass(
        mu,
        gy,
        trace * (1 + ROUNDOFF_MARGIN),
        dual,
        row_dual,
        tangents,
        dual_l1,
        row_dual_l1,
        diagonal,
    )


@dataclass
class PrelogitCertificate:
    """Per position (P): ``ritz`` the top Ritz value (a lower bound on ``lambda_max``),
    ``upper`` a rigorous upper bound on it, ``radius`` (P, E) the certified radius in the
    norm, ``p`` (P, V) float64. The subspace it worked in: ``basis`` (P, m, d) orthonormal,
    ``coefficients`` (P, m, m) the Ritz vectors in it (columns, descending; ``vectors``
    (P, m, d) the same in the activation space), ``tangents`` (P, m, V) the raw logits' change
    along each basis row, and ``logits`` (P, V) the raw logits, float64."""

    ritz: Tensor
    upper: Tensor
    radius: Tensor
    p: Tensor
    basis: Tensor
    coefficients: Tensor
    tangents: Tensor
    logits: Tensor

    @property
    def vectors(self) -> Tensor:
        return torch.einsum("pkj,pkd->pjd", self.coefficients, self.basis)


def ritz_subspace(head: LogitHead, h: Tensor, ritz: int = 6) -> Tensor:
    """The top ``ritz`` Ritz vectors (P, k, d) of ``H`` at pre-logit vectors ``h`` (P, d): the
    subspace ``prelogit_certificate`` bounds ``H`` in.

    The Lanczos run only chooses the subspace (the certificate's exact pass bounds what it
    misses), so it runs in the weight's precision, probabilities included (float32 unless
    the weight is float64), and each position stops when its own Ritz pairs have converged
    (SmolLM2, 60 positions: 0.66 s against 1.09 s in float64 lockstep, the same certified
    radii to 2e-7). Every product reads W once for all P positions: callers give as many as
    their float32 probabilities allow (a pass over Gemma-3's 262k x 640 head costs about
    what 32 positions' arithmetic does)."""
    f64 = torch.float64
    search_dtype = f64 if head.weight.dtype == f64 else torch.float32
    P, V = h.shape[0], head.vocab_size
    p = torch.empty(P, V, dtype=search_dtype, device=h.device)
    step = rows_within(V, 8)  # the float64 logits a few rows at a time
    for s in range(0, P, step):
        u0 = head.raw_float64(h[s : s + step].to(f64))
        p[s : s + step] = torch.softmax(head.squash(u0), dim=-1)
    op = FisherOperator(head.weight, p, scale=head.scale)  # raw-logit curvature under p
    k = max(1, min(ritz, head.d_model))
    run = op.lanczos(k, tol=1e-4, max_iter=min(head.d_model, 3 * k + 8), independent=True)
    return run.vectors


def prelogit_certificate(
    head: LogitHead,
    h: Tensor,
    eps_list: Sequence[float],
    norm: str = "l2",
    ritz: int = 6,
    tokens: int = 2,
    subspace: Tensor | None = None,
) -> PrelogitCertificate:
    """Certified radii of the L2 ball or L-inf box about pre-logit vectors ``h`` (P, d).

    ``ritz`` Lanczos vectors of ``H`` (``ritz_subspace``, or ``subspace`` (P, k, d) when the
    caller ran it for more positions at once) and the directions ``w_j - w_top`` toward the ``tokens`` next likeliest tokens
    (where a large move goes), orthonormalized, then one exact float64 pass
    (``exact_head_pass``) for ``H Y``, ``tr H``, the ``R_i`` and the logit tangents;
    ``ritz_upper_bound`` turns them into a rigorous ``lambda_max`` bound.

    A linear head uses the module doc's bound. Under a softcap ``z = c tanh(u / c)`` the
    logit change ``dz`` is not linear in ``delta``, but ``|dz_i| <= |du_i|`` (the cap is
    1-Lipschitz): then ``Var_p(dz) <= E_p[du^2] = delta^T (H_u + mu mu^T) delta`` (``H_u``
    the curvature of the raw logits under the model's p) and ``dz_i - E_p dz <= 2 r max_j R_j``
    with ``R_j = scale |w_j|_*``: the same bound with ``lam + |mu|^2`` and ``R_i = 2 max_j R_j``.
    """
    f64 = torch.float64
    h = h.to(f64)
    u0 = head.raw_float64(h)
    p = torch.softmax(head.squash(u0), dim=-1)
    if subspace is None:
        subspace = ritz_subspace(head, h, ritz)
    top = p.topk(min(tokens + 1, p.shape[-1]), dim=-1).indices
    rows = head.weight[top].to(f64)  # (P, tokens + 1, d)
    toward = rows[:, 1:] - rows[:, :1]
    span = torch.cat([subspace.to(f64), toward], dim=1)[:, : head.d_model]
    y = torch.linalg.qr(span.transpose(1, 2))[0].transpose(1, 2)
    box = norm == "linf"
    exact = exact_head_pass(head.weight, head.scale, p, y, l1=box)
    complement = head_tail_complement(head.weight, head.scale, p, exact.mu, exact.dual)
    upper, ritz_value = ritz_upper_bound(exact.gy, y, exact.trace, complement)
    dual = exact.dual_l1 if box else exact.dual  # the dual norm of the ball's
    lam = upper
    if not head.is_linear:
        mu2 = (exact.mu * exact.mu).sum(-1)
        lam = upper + mu2
        rows = exact.row_dual_l1 if box else exact.row_dual
        dual = 2.0 * rows.max().expand_as(dual)
    if norm == "linf":
        diagonal = exact.diagonal
        if not head.is_linear:
            diagonal = diagonal + exact.mu * exact.mu
        lam = box_curvature_bound(lam, diagonal)
    radius = BallBound(lam, p, dual).radius(eps_list)
    # the Ritz vectors in descending order, for the search's starts
    gram = torch.einsum("pkd,pjd->pkj", y, exact.gy)
    coefficients = torch.linalg.eigh(0.5 * (gram + gram.transpose(1, 2)))[1].flip(-1)
    return PrelogitCertificate(ritz_value, upper, radius, p, y, coefficients, exact.tangents, u0)
