"""The worst case found by search: an upper bound on the radius of the largest safe ball.

If any point at distance ``t`` (in the chosen norm) moves the next-token distribution by
``KL >= eps``, no ball of radius ``t`` is safe. The search finds such points: from each start
direction it measures the first crossing ``r`` along the ray, then maximises the KL over the
sphere (L2) or the box (L-inf) of radius ``r`` by projected gradient ascent; the KL there is
then above eps, so the new direction crosses eps before ``r``, and its measured crossing is the
next radius. The smallest crossing over all starts and rounds is ``radius_attack``: every
value it reports is a measured exit of the model, so the true ball radius lies below it.

Rows are (start, eps) pairs of many positions, advanced in lockstep: one batched evaluation
per gradient step, whatever the model function is (the head at the pre-logit vector, the rest
of the network through ``SuffixBatch`` inside it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..budget import rows_within
from ..geometry import first_crossings

LogitsFn = Callable[[Tensor, Tensor], Tensor]  # (x (R, d), rows (R,)) -> logits (R, V)


@dataclass
class AttackResult:
    """``radius`` (P, E): the smallest measured exit found per position and eps (inf where
    no start crossed); ``direction`` (P, E, d): the direction of that exit (unit in the
    norm); ``start_radii`` (P, 2S, E): the exits along the start directions alone (rows
    ``i`` and ``S + i``: start ``i`` and its negative)."""

    radius: np.ndarray
    direction: Tensor
    start_radii: np.ndarray


def unit(v: Tensor, norm: str) -> Tensor:
    """Rows of ``v`` scaled to norm 1 in ``norm`` ('l2' or 'linf')."""
    if norm == "l2":
        size = v.norm(dim=-1, keepdim=True)
    else:
        size = v.abs().amax(dim=-1, keepdim=True)
    return v / size.clamp_min(1e-300)


class KLTarget:
    """``KL(p_row || softmax(logits_fn(x0_row + delta)))`` and its gradient, batched.

    ``logits_fn(x, rows)`` maps activations (R, d) at positions ``rows`` to logits (R, V),
    differentiably; ``x0`` (P, d) are the unperturbed activations, ``logits0`` (P, V) their
    logits (float64)."""

    def __init__(self, logits_fn: LogitsFn, x0: Tensor, logits0: Tensor) -> None:
        self.logits_fn = logits_fn
        self.x0 = x0.to(torch.float64)
        self.logp0 = torch.log_softmax(logits0.to(torch.float64), -1)
        self.chunk = rows_within(self.logp0.shape[-1], 8 * 3)  # logits, grads, softmax

    def _kl(self, delta: Tensor, rows: Tensor) -> Tensor:
        logits = self.logits_fn(self.x0[rows] + delta, rows).to(torch.float64)
        logq = torch.log_softmax(logits, -1)
        logp = self.logp0[rows]
        return (logp.exp() * (logp - logq)).sum(-1)

    def value(self, delta: Tensor, rows: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.cat(
                [
                    self._kl(delta[s : s + self.chunk], rows[s : s + self.chunk])
                    for s in range(0, len(rows), self.chunk)
                ]
            )

    def value_and_grad(self, delta: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        values, grads = [], []
        for s in range(0, len(rows), self.chunk):
            d = delta[s : s + self.chunk].detach().clone().requires_grad_(True)
            with torch.enable_grad():
                kl = self._kl(d, rows[s : s + self.chunk])
                (g,) = torch.autograd.grad(kl.sum(), d)
            values.append(kl.detach())
            grads.append(g.to(torch.float64))
        return torch.cat(values), torch.cat(grads)

    def crossings(
        self,
        directions: Tensor,
        rows: Tensor,
        levels: np.ndarray,
        t_max: np.ndarray,
        rtol: float,
        start: np.ndarray | None = None,
    ) -> np.ndarray:
        """First crossing (R, E) of ``levels`` (R, E) along ``directions`` (R, d) at ``rows``."""
        directions = directions.to(torch.float64)

        def kl(rays: np.ndarray, ts: np.ndarray) -> np.ndarray:
            r = torch.as_tensor(rays, dtype=torch.long, device=directions.device)
            t = torch.as_tensor(ts, dtype=torch.float64, device=directions.device)
            return self.value(t[:, None] * directions[r], rows[r]).cpu().numpy()

        t_start = 1e-3 * t_max if start is None else start
        return first_crossings(kl, levels, t_start=t_start, t_max=t_max, rtol=rtol)


def ascend(
    target: KLTarget,
    delta: Tensor,
    rows: Tensor,
    radius: Tensor,
    norm: str,
    steps: int,
) -> Tensor:
    """``steps`` of projected gradient ascent of the KL on the sphere (L2) or box (L-inf) of
    ``radius`` (R,), each row with its own step size (grown after a gain, cut after a loss:
    the KL of every row never decreases)."""
    value, grad = target.value_and_grad(delta, rows)
    alpha = torch.full_like(radius, 0.5)
    for _ in range(steps):
        if norm == "l2":
            u = delta / radius[:, None]
            g = grad - (grad * u).sum(-1, keepdim=True) * u  # tangent to the sphere
            trial = delta + alpha[:, None] * radius[:, None] * unit(g, "l2")
            trial = radius[:, None] * unit(trial, "l2")
        else:
            trial = delta + alpha[:, None] * radius[:, None] * torch.sign(grad)
            trial = torch.maximum(torch.minimum(trial, radius[:, None]), -radius[:, None])
        new_value, new_grad = target.value_and_grad(trial, rows)
        better = new_value > value
        delta = torch.where(better[:, None], trial, delta)
        grad = torch.where(better[:, None], new_grad, grad)
        value = torch.where(better, new_value, value)
        alpha = torch.where(better, (alpha * 1.5).clamp(max=1.0), alpha * 0.3)
    return delta


def worst_case_search(
    target: KLTarget,
    starts: Tensor,
    eps_list: Sequence[float],
    norm: str,
    *,
    rounds: int = 2,
    steps: int = 6,
    rtol: float = 1e-6,
) -> AttackResult:
    """The smallest exits found from ``starts`` (P, S, d) at each of P positions and eps.

    Each start is tried with both signs. Rounds of ``ascend`` at the current radius, each
    followed by the measured crossing along the ascended direction, shrink every row's
    radius; a row keeps its old radius where the crossing is not below it."""
    if norm not in ("l2", "linf"):
        raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")
    P, S, d = starts.shape
    E = len(eps_list)
    device = target.x0.device
    dirs = torch.cat([starts, -starts], dim=1).to(torch.float64)  # (P, 2S, d)
    dirs = unit(dirs.reshape(-1, d), norm)
    ray_rows = torch.arange(P, device=device).repeat_interleave(2 * S)
    scale = target.x0.norm(dim=-1)[ray_rows].clamp_min(1e-6).cpu().numpy()
    if norm == "linf":
        scale = scale / np.sqrt(d)  # the L-inf size of a vector with that L2 norm
    levels = np.broadcast_to(np.asarray(eps_list, dtype=np.float64), (len(dirs), E))
    first = target.crossings(dirs, ray_rows, levels, 1e6 * scale, rtol, start=1e-3 * scale)
    # one row per (ray, eps)
    radius = first.reshape(-1).copy()  # (2PS * E,)
    direction = dirs.repeat_interleave(E, dim=0)
    rows = ray_rows.repeat_interleave(E)
    level = np.tile(np.asarray(eps_list, dtype=np.float64), len(dirs))
    for _ in range(rounds):
        live = np.flatnonzero(np.isfinite(radius))
        if live.size == 0:
            break
        idx = torch.as_tensor(live, device=device)
        r = torch.as_tensor(radius[live], dtype=torch.float64, device=device)
        delta = ascend(target, r[:, None] * direction[idx], rows[idx], r, norm, steps)
        new_dir = unit(delta, norm)
        found = target.crossings(
            new_dir,
            rows[idx],
            level[live, None],
            radius[live] * (1 + 1e-3),
            rtol,
            start=0.25 * radius[live],
        )[:, 0]
        better = found < radius[live]
        radius[live[better]] = found[better]
        direction[idx[torch.as_tensor(better, device=device)]] = new_dir[
            torch.as_tensor(better, device=device)
        ]
    per = radius.reshape(P, 2 * S, E)
    best = per.argmin(axis=1)  # (P, E)
    best_radius = np.take_along_axis(per, best[:, None, :], axis=1)[:, 0]
    dir_per = direction.reshape(P, 2 * S, E, d)
    pick = torch.as_tensor(best, device=device)
    best_dir = dir_per[torch.arange(P, device=device)[:, None], pick, torch.arange(E)[None, :]]
    return AttackResult(best_radius, best_dir, first.reshape(P, 2 * S, E))
