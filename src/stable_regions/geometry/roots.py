"""First crossings of thresholds along many rays at once.

A *ray* is a function ``t -> f_r(t)`` with ``f_r(0) = 0`` (a KL along a direction); for each
ray and each level we want the smallest ``t > 0`` with ``f_r(t) >= level``. ``f`` is called
with arrays of (ray index, t) pairs so that one call is one batched model/head evaluation:

1. walk down from ``t_start`` (halving) while the first point is already above the smallest level;
2. one geometric scan per ray (factor ``growth``), shared by all its levels, until the largest
   level is passed or ``t_max`` is reached (then the crossing is ``inf``);
3. each level's first grid bracket is refined, all (ray, level) problems in lockstep, until
   ``hi - lo <= rtol * lo``: a bracket with a guess inside it is evaluated at a pair of points
   close around the guess (one call either straddles the crossing or gives a Newton step);
   one without takes Illinois regula falsi steps (bisection where they stall) until it is
   within 3%, when its secant becomes the guess.

``guesses`` (predicted roots) are the first guesses, with the pair at ``guess * (1 +- 1e-3)``;
the scan is unchanged, so a crossing before the guess is still found first. Where a call
costs mostly a fixed price (a pass through a network), ``rows_per_call`` fills the calls of
the last few problems with evenly spaced points.
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
    rows_per_call: int = 0,
) -> np.ndarray:
    """Smallest ``t`` with ``f(r, t) >= levels[r, e]`` for every ray ``r`` and level ``e``.

    Args:
        f: ``f(rays, ts)`` evaluates ray ``rays[i]`` at ``ts[i]``, returning an array.
        levels: (R, E) positive finite thresholds.
        t_start, t_max: per ray (or scalars): where the scan starts and where it gives up.
        guesses: optional (R, E) predicted roots, used only to speed up the refinement.
        rows_per_call: where an evaluation costs mostly a fixed price per call (a pass through
            a network), the refinement fills each call up to this many points: when few
            brackets are left, each gets several, evenly spaced inside it.

    Returns:
        (R, E) roots to relative accuracy ``rtol``; ``inf`` where the level is not reached
        by ``t_max``.
    """
    levels = np.atleast_2d(np.asarray(levels, dtype=np.float64))
    R, _ = levels.shape
    if not np.all(np.isfinite(levels) & (levels > 0)):
        raise ValueError("levels must be positive and finite")
    t0 = np.broadcast_to(np.asarray(t_start, dtype=np.float64), (R,)).copy()
    tmax = np.broadcast_to(np.asarray(t_max, dtype=np.float64), (R,))
    ts, fs = _scan(f, levels, t0, tmax, growth, scan_chunk, guesses)
    brackets = _Brackets(f, levels, ts, fs, tmax)
    brackets.refine(guesses, rtol, max_iter, rows_per_call)
    return brackets.roots()


def _scan(
    f: RowFn,
    levels: np.ndarray,
    t0: np.ndarray,
    tmax: np.ndarray,
    growth: float,
    chunk: int,
    guesses: np.ndarray | None = None,
) -> tuple[list[list[float]], list[list[float]]]:
    """Steps 1 and 2: each ray's points ``(ts[r], fs[r])``, from below its smallest level
    up past its largest one (or ``tmax``).

    The first call evaluates each ray's start with its first grid points: as many as reach
    past its largest guess (``first_points``), else ``chunk``. Where the start is already
    above the smallest level, those points are dropped and the ray walks down first."""
    all_rays = np.arange(len(t0))
    low, top = levels.min(1), levels.max(1)
    count = first_points(t0, guesses, growth, chunk)
    exponent = [np.arange(1, n + 1) for n in count]
    rays = np.concatenate([all_rays, np.repeat(all_rays, count)])
    grid = [t0[r] * growth ** exponent[r] for r in all_rays]
    values = f(rays, np.concatenate([t0, *grid]))
    f0 = values[: len(t0)].copy()
    ts: list[list[float]] = [[t] for t in t0]
    fs: list[list[float]] = [[v] for v in f0]
    ends = np.cumsum(count) + len(t0)
    done = np.zeros(len(t0), dtype=np.int64)  # grid points taken per ray
    for r in all_rays:
        if f0[r] < low[r] or t0[r] <= 1e-300:
            ts[r].extend(grid[r])
            fs[r].extend(values[ends[r] - count[r] : ends[r]])
            done[r] = count[r]
    # 1. walk down until the first point is below every level of its ray
    high = (f0 >= low) & (t0 > 1e-300)
    while high.any():
        t0[high] /= growth
        f0[high] = f(all_rays[high], t0[high])
        for r in all_rays[high]:
            ts[r], fs[r] = [t0[r]], [f0[r]]
        high = (f0 >= low) & (t0 > 1e-300)

    # 2. geometric scan, shared by the levels of a ray
    peak = np.array([max(fr) for fr in fs])
    reach = t0 * growth**done
    active = (peak < top) & (reach < tmax)
    while active.any():
        rays = all_rays[active]
        k = np.arange(1, chunk + 1)
        grid = t0[rays, None] * growth ** (done[rays, None] + k[None, :])
        vals = f(np.repeat(rays, chunk), grid.ravel()).reshape(len(rays), chunk)
        for i, r in enumerate(rays):
            ts[r].extend(grid[i])
            fs[r].extend(vals[i])
        done[rays] += chunk
        active[rays] = (vals.max(1) < top[rays]) & (grid[:, -1] < tmax[rays])
    return ts, fs


def first_points(
    t0: np.ndarray, guesses: np.ndarray | None, growth: float, chunk: int
) -> np.ndarray:
    """Grid points per ray in the scan's first call: enough to pass the ray's largest guess
    (R, E) by one step (a guess is a prediction: the crossing may lie a little beyond it),
    between 1 and ``3 * chunk``; ``chunk`` where the ray has no finite guess above its
    start. Each call through a network has a price of its own, so one call that reaches the
    crossings saves the calls a fixed chunk would need; rays whose crossings lie close
    above the start spend fewer points."""
    count = np.full(len(t0), chunk, dtype=np.int64)
    if guesses is None:
        return count
    g = np.where(np.isfinite(guesses) & (guesses > 0), guesses, 0.0).max(1)
    ok = (g > t0) & (t0 > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        steps = np.ceil(np.log(np.where(ok, g / np.where(ok, t0, 1.0), 1.0)) / np.log(growth))
    count[ok] = np.clip(steps[ok].astype(np.int64) + 1, 1, 3 * chunk)
    return count


class _Brackets:
    """Step 3: every (ray, level) problem's bracket ``[lo, hi]`` around its first crossing
    (with ``f`` at both ends), from the scan's first grid step over the level, narrowed in
    lockstep."""

    def __init__(self, f: RowFn, levels: np.ndarray, ts, fs, tmax: np.ndarray):
        R, E = levels.shape
        self.f, self.levels = f, levels
        self.out = np.full((R, E), np.inf)
        self.lo, self.hi = np.zeros((R, E)), np.zeros((R, E))
        self.flo, self.fhi = np.zeros((R, E)), np.zeros((R, E))
        self.todo = np.zeros((R, E), dtype=bool)
        for r in range(R):
            tr, fr = np.asarray(ts[r]), np.asarray(fs[r])
            for e in range(E):
                above = np.nonzero(fr >= levels[r, e])[0]
                if above.size == 0 or tr[above[0]] > tmax[r]:
                    continue  # not reached: inf
                j = above[0]
                if j == 0:  # only when t_start underflowed to zero
                    self.out[r, e] = tr[0]
                    continue
                self.lo[r, e], self.hi[r, e] = tr[j - 1], tr[j]
                self.flo[r, e], self.fhi[r, e] = fr[j - 1], fr[j]
                self.todo[r, e] = True

    def evaluate(self, rr: np.ndarray, ee: np.ndarray, grid: np.ndarray) -> np.ndarray:
        """Evaluate problem ``(rr[i], ee[i])`` at the points ``grid[i]`` (n, k: increasing,
        nan for none), all in one call, and shrink each bracket to the first crossing its
        points show; the values (n, k), nan where no point was."""
        finite = np.isfinite(grid)
        n, k = grid.shape
        vals = np.full((n, k), np.nan)
        row = np.broadcast_to(np.arange(n)[:, None], (n, k))
        vals[finite] = self.f(rr[row[finite]], grid[finite])
        above = finite & (vals >= self.levels[rr, ee][:, None])
        col = np.arange(k)[None, :]
        first = np.where(above.any(1), above.argmax(1), k)  # the first point at or above
        under = finite & ~above & (col < first[:, None])
        last = np.where(under, col, -1).max(1)  # the last point below before it
        h = first < k
        r, e, c = rr[h], ee[h], first[h]
        self.hi[r, e], self.fhi[r, e] = grid[h, c], vals[h, c]
        u = last >= 0
        r, e, c = rr[u], ee[u], last[u]
        self.lo[r, e], self.flo[r, e] = grid[u, c], vals[u, c]
        return vals

    # A problem with a guess inside its bracket is evaluated at a pair ``g (1 +- delta)``.
    # Where the pair straddles the crossing, the bracket is 2 delta wide; where it lands on one
    # side, the secant through the pair (a Newton step) is the next guess. Either way the next
    # guess's error is of order the square of that width or step, and delta follows it. The
    # predictions are the first guesses (delta 1e-3). A bracket without a guess takes its
    # secant as one once it is within 3% (the secant's error is then of order its width
    # squared); wider ones take Illinois regula falsi steps, and bisection where three steps
    # did not halve them. Regula falsi alone moves one end at a time and took many calls to
    # close even a narrow bracket. When few problems are left, ``rows_per_call`` adds evenly
    # spaced points inside the wide brackets.
    def refine(self, guesses, rtol: float, max_iter: int, rows_per_call: int) -> None:
        """Narrow every bracket to ``hi - lo <= rtol * lo``, all problems in lockstep."""
        lo, hi, flo, fhi, levels, todo = (
            self.lo,
            self.hi,
            self.flo,
            self.fhi,
            self.levels,
            self.todo,
        )

        def pair_width(error: np.ndarray) -> np.ndarray:
            """delta for a guess whose relative error is about ``error``: 4 error^2, down to
            rtol / 4, where a straddling pair closes the bracket, and up to 1e-3."""
            wide = np.clip(4 * error**2, rtol / 4, 1e-3)
            return np.where(4 * error**2 < rtol, rtol / 4, wide)

        g = np.full(levels.shape, np.nan)
        delta = np.full(levels.shape, 1e-3)
        if guesses is not None:
            g = np.where(todo, np.asarray(guesses, dtype=np.float64), np.nan)
        side = np.zeros(levels.shape, dtype=np.int8)  # which end was kept last (+1 hi, -1 lo)
        width_before = hi - lo
        for it in range(max_iter):
            todo &= (hi - lo) > rtol * lo
            if not todo.any():
                break
            rr, ee = np.nonzero(todo)
            L, H = lo[rr, ee], hi[rr, ee]
            span = H - L
            gl = flo[rr, ee] - levels[rr, ee]
            gh = fhi[rr, ee] - levels[rr, ee]
            stalled = np.zeros(len(rr), dtype=bool)
            if it % 3 == 2:  # every third step, bisect where the last three did not halve it
                stalled = span > 0.5 * width_before[rr, ee]
                width_before[rr, ee] = span
            guess, d = g[rr, ee], delta[rr, ee]
            guess = np.where((guess > L) & (guess < H), guess, np.nan)
            closing = np.isnan(guess) & (span <= 0.03 * L)
            with np.errstate(divide="ignore", invalid="ignore"):
                guess = np.where(closing, H - gh * span / (gh - gl), guess)
            d = np.where(closing, pair_width(span / L), d)
            guess = np.where(stalled, np.nan, guess)
            paired = np.isfinite(guess)
            # Illinois: halve the weight of the end that stayed twice in a row
            gl = np.where(side[rr, ee] == -1, gl / 2, gl)
            gh = np.where(side[rr, ee] == 1, gh / 2, gh)
            with np.errstate(divide="ignore", invalid="ignore"):
                x = H - gh * span / (gh - gl)
            x = np.where(stalled | ~np.isfinite(x), 0.5 * (L + H), x)
            x = np.clip(x, L + 1e-3 * span, H - 1e-3 * span)
            points = np.stack([np.where(paired, guess * (1 - d), x), guess * (1 + d)], 1)
            spaced = max(0, rows_per_call // len(rr) - 1)
            if spaced:
                even = L[:, None] + span[:, None] * np.arange(1, spaced + 1) / (spaced + 1)
                even[paired] = np.nan
                points = np.sort(np.concatenate([points, even], 1), 1)  # nan sorts last
            inner = (L + 1e-3 * span)[:, None], (H - 1e-3 * span)[:, None]
            points = np.clip(points, *inner)
            vals = self.evaluate(rr, ee, points)
            # the next guesses: the secant through each pair
            fa, fb = vals[:, 0] - levels[rr, ee], vals[:, 1] - levels[rr, ee]
            pa, pb = points[:, 0], points[:, 1]
            with np.errstate(divide="ignore", invalid="ignore"):
                step = pb - fb * (pb - pa) / (fb - fa)
                error = np.where((fa < 0) == (fb < 0), np.abs(step / guess - 1), d)
            ok = paired & np.isfinite(step) & (step > 0)
            g[rr, ee] = np.where(ok, step, np.nan)
            delta[rr, ee] = np.where(ok, pair_width(error), 1e-3)
            moved_lo = lo[rr, ee] >= x
            side[rr, ee] = np.where(paired | (spaced > 0), 0, np.where(moved_lo, 1, -1))

    def roots(self) -> np.ndarray:
        """The crossings: linear interpolation inside each (now tiny) bracket; ``inf`` where
        the level was not reached."""
        out, lo, hi, flo, fhi = self.out, self.lo, self.hi, self.flo, self.fhi
        done = np.isinf(out) & (hi > 0)
        span = np.where(fhi > flo, fhi - flo, 1.0)
        interp = lo + (self.levels - flo) / span * (hi - lo)
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
