"""A root of a statistic that grows with a positive parameter, by false position in
``(log c, log value)`` with the Illinois modification: what the iso-KL coefficient is solved
with (``studies.iso_kl``), by rollouts, by teacher forcing and along closed-form paths alike.

A KL budget grows about as ``c^2`` for small ``c`` and about linearly further out, so in log-log
coordinates it is close to a straight line, and false position there converges in a few
steps. The Illinois modification halves the retained end's value when the same end is kept
twice, which keeps the convergence superlinear where plain false position would stall.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

COEF_MAX = 1e4  # beyond this the target counts as unreachable
BRACKET_MARGIN = 1.15  # how far past the c^2 estimate of the root a bracketing step goes


@dataclass
class Solution:
    """Where ``solve_log_log`` stopped: the coefficient, the statistic there, how many
    evaluations it took, whether the target was reached below ``COEF_MAX``, and the per-token
    values at the coefficient (where the last evaluation was at it)."""

    coef: float
    value: float
    evaluations: int
    reached: bool
    per_token: np.ndarray = field(default_factory=lambda: np.array([]))
    slope: float = 2.0  # d log(statistic) / d log(c) across the final bracket


def solve_log_log(
    evaluate: Callable[[float], tuple[float, np.ndarray]],
    target: float,
    start: float,
    *,
    rtol: float = 0.02,
    max_evaluations: int = 16,
) -> Solution:
    """The ``c > 0`` where ``evaluate(c)[0]`` (a statistic that grows with ``c``) meets
    ``target``, within ``rtol``: bracket from ``start`` by steps that assume the statistic
    grows as ``c^2`` (the KL's leading order; each step at most a factor of 16), then false
    position on ``(log c, log value - log target)`` with the Illinois halving (a retained
    end's value halved when the same end is kept twice), which converges superlinearly where
    plain false position stalls. A statistic that jumps across the target (a greedy token
    changing) is located to the jump."""
    tol = math.log1p(rtol)
    seen: list[tuple[float, float, float, np.ndarray]] = []  # (c, g, value, per-token)

    def g(c: float):
        value, per_token = evaluate(c)
        gc = math.log(max(value, 1e-300)) - math.log(target)
        seen.append((c, gc, value, per_token))
        return gc

    def done(c, _g, value, per_token, slope=2.0):
        return Solution(c, value, len(seen), True, per_token, slope)

    c = float(start)
    gc = g(c)
    if abs(gc) <= tol:
        return done(*seen[-1])
    lo = hi = None
    if gc < 0:
        lo = seen[-1]
    else:
        hi = seen[-1]
    while lo is None or hi is None:
        if len(seen) >= max_evaluations:
            break
        # g = log(value / target): c^2 growth puts the root at c e^(-g/2); a step a little
        # past it brackets the root where that holds, and steps that keep failing double
        # (a statistic that saturates short of the target is given up on in a few)
        estimate = abs(seen[-1][1]) / 2.0 + math.log(BRACKET_MARGIN)
        step = math.exp(min(max(estimate, (len(seen) - 1) * math.log(2.0)), math.log(16.0)))
        c = lo[0] * step if hi is None else hi[0] / step
        if c > COEF_MAX:
            top = max(seen, key=lambda s: s[2])
            return Solution(math.nan, top[2], len(seen), False, top[3])
        gc = g(c)
        if abs(gc) <= tol:
            return done(*seen[-1])
        if gc < 0:
            lo = seen[-1]
        else:
            hi = seen[-1]
    if lo is None or hi is None:
        return Solution(math.nan, seen[-1][2], len(seen), False, seen[-1][3])
    ga, gb, side = lo[1], hi[1], 0
    while len(seen) < max_evaluations:
        xa, xb = math.log(lo[0]), math.log(hi[0])
        x = xb - gb * (xb - xa) / (gb - ga)
        if not xa < x < xb:
            x = 0.5 * (xa + xb)
        gc = g(math.exp(x))
        slope = (hi[1] - lo[1]) / max(xb - xa, 1e-12)
        if abs(gc) <= tol:
            return done(*seen[-1], slope=slope)
        if gc < 0:
            lo, ga = seen[-1], gc
            gb = gb / 2 if side == -1 else gb
            side = -1
        else:
            hi, gb = seen[-1], gc
            ga = ga / 2 if side == 1 else ga
            side = 1
        if math.log(hi[0]) - math.log(lo[0]) < 1e-6:
            break
    # out of evaluations: the smallest coefficient known to reach the target
    xa, xb = math.log(lo[0]), math.log(hi[0])
    return Solution(hi[0], hi[2], len(seen), True, hi[3], (hi[1] - lo[1]) / max(xb - xa, 1e-12))
