"""First crossing of a threshold along a ray: geometric bracketing, then Brent.

``f`` maps an array of steps ``t`` (n,) to values (n,); it is evaluated on a whole
geometric grid at once (one batched model call), then Brent refines inside the first
bracket. The answer is the smallest grid-bracketed ``t > 0`` with ``f(t) >= level``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy.optimize import brentq

BatchFn = Callable[[np.ndarray], np.ndarray]


def first_crossing(
    f: BatchFn,
    level: float,
    *,
    t_start: float,
    t_max: float,
    growth: float = 2.0,
    rtol: float = 1e-6,
    chunk: int = 16,
    guess: float | None = None,
) -> float:
    """Smallest ``t`` in ``(0, t_max]`` where ``f(t) >= level`` (``f(0) < level`` assumed).

    Returns ``inf`` when ``f`` stays below ``level`` up to ``t_max``. If ``f(t_start)`` is
    already above, the grid walks down by ``growth`` until a point below is found.
    ``rtol`` is the relative tolerance on ``t`` (Brent's ``xtol = rtol * t``).
    ``guess`` (a predicted root) adds grid points close around it to the first batch, so
    Brent starts from a tight bracket; the geometric scan from ``t_start`` is unchanged,
    so a crossing before the guess is still found first.
    """
    if not (level > 0 and math.isfinite(level)):
        raise ValueError(f"level must be positive and finite, got {level}")
    lo = 0.0
    t = t_start
    # Walk down while the first grid point is already past the level.
    while f(np.array([t]))[0] >= level:
        if t < 1e-300:
            return 0.0
        t /= growth
    lo = t
    hi = None
    extra = np.array([])
    if guess is not None and math.isfinite(guess) and guess > lo:
        extra = guess * np.array([0.9, 0.98, 0.995, 0.999, 1.0, 1.001, 1.005, 1.02, 1.1])
    while hi is None:
        if lo >= t_max:
            return math.inf
        grid = lo * growth ** np.arange(1, chunk + 1)
        grid = np.unique(np.concatenate([grid, extra[(extra > lo) & (extra < grid[-1])]]))
        extra = np.array([])
        grid = grid[grid <= t_max * growth]
        vals = f(grid)
        above = np.nonzero(vals >= level)[0]
        if above.size:
            i = int(above[0])
            hi = float(grid[i])
            lo = float(grid[i - 1]) if i > 0 else lo
            if hi > t_max:
                return math.inf
        else:
            lo = float(grid[-1])

    def g(x: float) -> float:
        return float(f(np.array([x]))[0]) - level

    return brentq(g, lo, hi, xtol=rtol * lo, rtol=4 * np.finfo(float).eps, maxiter=200)
