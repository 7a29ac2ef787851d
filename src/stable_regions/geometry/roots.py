"""First crossings of thresholds along many rays at once.

A *ray* is a function ``t -> f_r(t)`` with ``f_r(0) = 0`` (a KL along a direction); for each
ray and each level we want the smallest ``t > 0`` with ``f_r(t) >= level``. ``f`` is called
with arrays of (ray index, t) pairs so that one call is one batched model/head evaluation:

1. walk down from ``t_start`` (halving) while the first point is already above the smallest level;
2. one geometric scan per ray (factor ``growth``), shared by all its levels, until the largest
   level is passed or ``t_max`` is reached (then the crossing is ``inf``);
3. each level's first grid bracket is refined by Illinois regula falsi (with bisection when it
   stalls), all (ray, level) problems in lockstep, until ``hi - lo <= rtol * lo``.

``guesses`` (predicted roots) add two points at ``guess * (1 +- 1e-3)`` to the first
refinement step, which usually shrinks the bracket to 2e-3 at once; the scan is unchanged,
so a crossing before the guess is still found first.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from ..budget import rows_in_cache

RowFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def first_crossings(
    f: RowFn,
    levels: np.ndarray,
    *,
    t_start: np.ndarray | float,
    t_max: np.ndarray | float,
    growth: float = 2.0,
    rtol: float = 1e-6,
    guesses: np.ndarray | None = None,
    scan_chunk: int = 6,
    max_iter: int = 200,
) -> np.ndarray:
    """Smallest ``t`` with ``f(r, t) >= levels[r, e]`` for every ray ``r`` and level ``e``.

    Args:
        f: ``f(rays, ts)`` evaluates ray ``rays[i]`` at ``ts[i]``, returning an array.
        levels: (R, E) positive finite thresholds.
        t_start, t_max: per ray (or scalars): where the scan starts and where it gives up.
        guesses: optional (R, E) predicted roots, used only to speed up the refinement.

    Returns:
        (R, E) roots to relative accuracy ``rtol``; ``inf`` where the level is not reached
        by ``t_max``.
    """
    levels = np.atleast_2d(np.asarray(levels, dtype=np.float64))
    R, E = levels.shape
    if not np.all(np.isfinite(levels) & (levels > 0)):
        raise ValueError("levels must be positive and finite")
    t0 = np.broadcast_to(np.asarray(t_start, dtype=np.float64), (R,)).copy()
    tmax = np.broadcast_to(np.asarray(t_max, dtype=np.float64), (R,))
    all_rays = np.arange(R)

    # 1. walk down until the first point is below every level of its ray
    f0 = f(all_rays, t0)
    low = levels.min(1)
    while True:
        high = (f0 >= low) & (t0 > 1e-300)
        if not high.any():
            break
        t0[high] /= growth
        f0[high] = f(all_rays[high], t0[high])

    # 2. geometric scan, shared by the levels of a ray
    ts: list[list[float]] = [[t] for t in t0]
    fs: list[list[float]] = [[v] for v in f0]
    top = levels.max(1)
    active = (f0 < top) & (t0 < tmax)
    step = 0
    while active.any():
        rays = all_rays[active]
        k = np.arange(1, scan_chunk + 1)
        grid = t0[rays, None] * growth ** (step + k)[None, :]
        vals = f(np.repeat(rays, scan_chunk), grid.ravel()).reshape(len(rays), scan_chunk)
        for i, r in enumerate(rays):
            ts[r].extend(grid[i])
            fs[r].extend(vals[i])
        step += scan_chunk
        active[rays] = (vals.max(1) < top[rays]) & (grid[:, -1] < tmax[rays])

    out = np.full((R, E), np.inf)
    lo = np.zeros((R, E))
    hi = np.zeros((R, E))
    flo = np.zeros((R, E))
    fhi = np.zeros((R, E))
    todo = np.zeros((R, E), dtype=bool)
    for r in range(R):
        tr, fr = np.asarray(ts[r]), np.asarray(fs[r])
        for e in range(E):
            above = np.nonzero(fr >= levels[r, e])[0]
            if above.size == 0 or tr[above[0]] > tmax[r]:
                continue  # not reached: inf
            j = above[0]
            if j == 0:  # only when t_start underflowed to zero
                out[r, e] = tr[0]
                continue
            lo[r, e], hi[r, e], flo[r, e], fhi[r, e] = tr[j - 1], tr[j], fr[j - 1], fr[j]
            todo[r, e] = True

    def evaluate(rr: np.ndarray, ee: np.ndarray, points: np.ndarray) -> np.ndarray:
        """Evaluate problems (rr, ee) at ``points``, shrink their brackets; the values."""
        vals = f(rr, points)
        below = vals < levels[rr, ee]
        lo[rr[below], ee[below]], flo[rr[below], ee[below]] = points[below], vals[below]
        hi[rr[~below], ee[~below]], fhi[rr[~below], ee[~below]] = points[~below], vals[~below]
        return vals

    # 3a. guesses: two points close around the predicted root (one call), where they fall inside
    # the bracket. Where both land on one side (the guess is off by more than 1e-3), the secant
    # through them is the next guess, up to three rounds: a guess 2% off is then bracketed to
    # 2e-3 in two rounds, where regula falsi from the scan's factor-2 bracket took ten steps.
    if guesses is not None:
        g = np.where(todo, np.asarray(guesses, dtype=np.float64), np.nan)
        for _ in range(3):
            a, b = g * (1 - 1e-3), g * (1 + 1e-3)
            inside = todo & np.isfinite(g) & (a > lo) & (b < hi)
            if not inside.any():
                break
            rr, ee = np.nonzero(inside)
            pa, pb = a[rr, ee], b[rr, ee]
            vals = evaluate(
                np.concatenate([rr, rr]), np.concatenate([ee, ee]), np.concatenate([pa, pb])
            )
            fa, fb = vals[: len(rr)] - levels[rr, ee], vals[len(rr) :] - levels[rr, ee]
            same_side = (fa < 0) == (fb < 0)
            with np.errstate(divide="ignore", invalid="ignore"):
                x = pb - fb * (pb - pa) / (fb - fa)
            g = np.full_like(g, np.nan)
            g[rr, ee] = np.where(same_side & np.isfinite(x) & (x > 0), x, np.nan)

    # 3b. Illinois regula falsi in lockstep, bisection where the bracket does not halve
    side = np.zeros((R, E), dtype=np.int8)  # which end was kept last time (+1 hi, -1 lo)
    width_before = hi - lo
    for it in range(max_iter):
        todo &= (hi - lo) > rtol * lo
        if not todo.any():
            break
        rr, ee = np.nonzero(todo)
        L, H = lo[rr, ee], hi[rr, ee]
        gl = flo[rr, ee] - levels[rr, ee]
        gh = fhi[rr, ee] - levels[rr, ee]
        # Illinois: halve the weight of the end that stayed twice in a row
        gl = np.where(side[rr, ee] == -1, gl / 2, gl)
        gh = np.where(side[rr, ee] == 1, gh / 2, gh)
        x = H - gh * (H - L) / (gh - gl)
        if it % 3 == 2:  # every third step, bisect where the last three did not halve the bracket
            stalled = (H - L) > 0.5 * width_before[rr, ee]
            x = np.where(stalled, 0.5 * (L + H), x)
            width_before[rr, ee] = H - L
        span = H - L
        x = np.clip(x, L + 1e-3 * span, H - 1e-3 * span)
        below = evaluate(rr, ee, x) < levels[rr, ee]
        side[rr, ee] = np.where(below, 1, -1)  # kept hi when we moved lo, and vice versa

    done = np.isinf(out) & (hi > 0)
    # final linear interpolation inside the tiny bracket
    span = np.where(fhi > flo, fhi - flo, 1.0)
    interp = lo + (levels - flo) / span * (hi - lo)
    out[done] = np.clip(interp, lo, hi)[done]
    return out


KLSlope = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def newton_from_above(
    kl_slope: KLSlope, level: Tensor, t: Tensor, cap: Tensor, rtol: float = 1e-6
) -> Tensor:
    """First crossings of ``level`` by convex, increasing KL curves, by Newton's method from
    above the root: every returned ``t`` has KL >= level, so each is an honest exit.

    ``kl_slope(problems, t)`` gives KL and dKL/dt (m,) of problems ``problems`` (m,) at ``t``;
    ``level``, ``t`` (the start) and ``cap`` (n,) are per problem. First ``t`` grows until KL
    >= level (Newton from below overshoots a convex function's root; doubling covers a flat
    start), then Newton steps down; only unfinished problems are evaluated, and the last step
    (below ``0.3 sqrt(rtol)`` of t: Newton's error after it is ~ its square) is taken on
    convexity alone (its KL is at least the tangent line's, ``level``). ``inf`` where no
    crossing lies below ``cap``."""
    problems = torch.arange(t.shape[0], device=t.device)
    final_step = 0.3 * math.sqrt(rtol)
    t = t.clone()
    kl, slope = kl_slope(problems, t)
    for _ in range(200):
        low = torch.nonzero((kl < level) & (t < cap)).flatten()
        if low.numel() == 0:
            break
        tl = t[low]
        step = torch.where(
            slope[low] > 0, (level[low] - kl[low]) / slope[low].clamp_min(1e-300), tl
        )
        tl = torch.minimum(tl + torch.maximum(step, 1e-3 * tl), 2 * tl)
        t[low] = torch.minimum(tl, cap[low] * 1.0000001)
        kl[low], slope[low] = kl_slope(low, t[low])
    result = torch.where(kl >= level, t, torch.full_like(t, math.inf))
    running = torch.isfinite(result)
    for _ in range(100):
        step = (kl - level) / slope.clamp_min(1e-300)
        trial = (result - step).clamp_min(0.0)
        running &= step > rtol * trial
        # A step this small lands within ~rtol of the root (Newton's error is quadratic in
        # it), and by convexity its KL is at least KL(t) + KL'(t) (trial - t) = level: it is
        # taken without the evaluation that would only confirm it
        last = running & (step <= final_step * trial)
        result = torch.where(last, trial, result)
        running &= ~last
        live = torch.nonzero(running).flatten()
        if live.numel() == 0:
            break
        new_kl, new_slope = kl_slope(live, trial[live])
        ok = new_kl >= level[live]
        running[live[~ok]] = False  # roundoff at the root: keep the last point above it
        if not bool(ok.any()):
            break
        take = live[ok]
        result[take], kl[take], slope[take] = trial[take], new_kl[ok], new_slope[ok]
    return torch.where(result <= cap, result, torch.full_like(result, math.inf))


def cgf_crossings(
    logp: Tensor,
    b: Tensor,
    levels: Tensor,
    start: Tensor | None = None,
    rtol: float = 1e-6,
    *,
    origin: Tensor | None = None,
    cap: Tensor | None = None,
) -> Tensor:
    """Exact radii along linear rays: the first ``t`` with ``K(t) - t K'(0) >= level``, ``K``
    the cumulant generating function of ray ``r``'s ``b[r]`` (R, V) under
    ``p = exp(logp[origin[r]])``; the KL from ``p`` to ``softmax(logp + t b)``.

    ``logp`` (P, V) the origins' log-probabilities and ``origin`` (R,) each ray's (default:
    ray r at origin r, P = R); ``levels`` (R, E); ``start`` (R, E) guesses (the quadratic
    radius by default); ``cap`` (R, E) where to give up (default never: wherever ``b``
    varies under p the KL grows without bound). (R, E) float64; ``inf`` where ``b`` is
    constant under p (the KL never moves) or no crossing lies below ``cap``."""
    f64 = torch.float64
    logp, b = logp.to(f64), b.to(f64)
    R, E = levels.shape
    if origin is None:
        origin = torch.arange(R, device=b.device)
    else:  # only the origins the rays use (a chunk of rays of a long prompt uses a few)
        used, origin = torch.unique(origin, return_inverse=True)
        logp = logp[used]
    step = rows_in_cache(b.shape[-1], 8, b.device)
    mean = torch.empty(R, dtype=f64, device=b.device)
    var = torch.empty(R, dtype=f64, device=b.device)
    for s in range(0, R, step):
        p = logp[origin[s : s + step]].exp()
        mean[s : s + step] = torch.linalg.vecdot(p, b[s : s + step])
        centred = b[s : s + step] - mean[s : s + step, None]
        var[s : s + step] = torch.linalg.vecdot(p, centred.mul_(centred))
    lse0 = torch.logsumexp(logp, -1)
    row = torch.arange(R, device=b.device).repeat_interleave(E)
    if start is None:
        start = torch.sqrt(2.0 * levels / var.clamp_min(1e-300)[:, None])
    if cap is None:
        cap = torch.full_like(levels, math.inf, dtype=f64)

    def kl_slope(problems: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        if len(problems) <= step:
            return kl_slope_block(problems, t)
        parts = [
            kl_slope_block(problems[s : s + step], t[s : s + step])
            for s in range(0, len(problems), step)
        ]
        return torch.cat([kl for kl, _ in parts]), torch.cat([sl for _, sl in parts])

    def kl_slope_block(problems: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        # one gather of the rays' b and one exp over (problems x V), which the two passes
        # share: half the time of logsumexp, then exp again, then a gathered product
        r = row[problems]
        o = origin[r]
        br = b[r]
        u = torch.addcmul(logp[o], t[:, None], br)
        peak = u.amax(-1, keepdim=True)
        weights = u.sub_(peak).exp_()  # unnormalised tilted probabilities
        total = weights.sum(-1)
        lse = peak[:, 0] + torch.log(total)
        return lse - lse0[o] - t * mean[r], torch.linalg.vecdot(weights, br) / total - mean[r]

    out = newton_from_above(
        kl_slope,
        levels.reshape(-1).to(f64),
        start.to(f64).reshape(-1).clamp_min(1e-300),
        cap.to(f64).reshape(-1),
        rtol,
    ).reshape(R, E)
    return torch.where((var <= 0)[:, None], torch.full_like(out, math.inf), out)


def cgf_kl(logp: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """The KL from ``p = exp(logp)`` to ``softmax(logp + t b)`` per row (R,), at ``t`` (R,)."""
    f64 = torch.float64
    logp, b = logp.to(f64), b.to(f64)
    mean = (logp.exp() * b).sum(-1)
    shifted = torch.logsumexp(torch.addcmul(logp, t[:, None].to(f64), b), -1)
    return shifted - torch.logsumexp(logp, -1) - t * mean


def nearest_cgf_crossings(
    logp: Tensor, b: Tensor, levels: Tensor, guesses: tuple[Tensor, Tensor], rtol: float = 1e-6
) -> Tensor:
    """``min`` of ``cgf_crossings`` along ``+b`` and ``-b`` (R, E), for about the price of one
    sign: Newton runs along the sign whose guess (``guesses``: (R, E) each, for +b and -b) is
    nearer; the other sign's KL at that root decides whether it crosses first (the KL along
    a ray is convex and increasing from 0, so if it is still below the level there, its own
    root lies beyond), and only then is its root found too."""
    R, E = levels.shape
    plus, minus = guesses
    sign = torch.where(plus <= minus, 1.0, -1.0).reshape(-1).to(b.dtype)
    rows = torch.arange(R, device=b.device).repeat_interleave(E)
    bb = b[rows] * sign[:, None]
    level = levels.reshape(-1, 1)
    near = torch.where(sign > 0, plus.reshape(-1), minus.reshape(-1))[:, None]
    far = torch.where(sign > 0, minus.reshape(-1), plus.reshape(-1))[:, None]
    root = cgf_crossings(logp, bb, level, near, rtol, origin=rows)[:, 0]
    check = torch.isfinite(root)
    other = torch.zeros_like(root)
    if bool(check.any()):
        other[check] = cgf_kl(logp[rows[check]], -bb[check], root[check])
    redo = torch.nonzero(~check | (other >= level[:, 0])).flatten()
    if redo.numel():
        found = cgf_crossings(logp, -bb[redo], level[redo], far[redo], rtol, origin=rows[redo])
        root[redo] = torch.minimum(root[redo], found[:, 0])
    return root.reshape(R, E)
