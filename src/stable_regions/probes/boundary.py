"""The measured ("empirical") boundary along directions.

The smallest ``t > 0`` with ``KL(p || p_t) >= eps``, where ``p_t`` is what the model outputs
with ``t v`` added at the hook point: geometric bracketing from a small ``t``, then
regula falsi / bisection, closed by pairs of points around the secant or the prediction
(``geometry.first_crossings``), to a relative tolerance (default 1e-6; 1e-4 is required), all
rays and thresholds in lockstep so each step is one batched evaluation. KL in float64, as
``sum p log p - p . z + logsumexp z``. The nearest exit along a line is the minimum over
``+v, -v``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from ..budget import rows_in_cache, rows_within
from ..geometry import first_crossings


class RayKL:
    """``(ray, t) -> KL(p_r || softmax(logits_fn(h_r + t v_r)))`` for rays with origins ``h`` and directions ``v``.

    ``logits_fn`` is the model's own path from the hook point to the logits (for the
    pre-logit vector: the unembedding, bias and softcap), applied in float64. With ``rows``
    (one index per ray) it is called as ``logits_fn(x, rows_of_these_rays)``: rays at
    different positions of a ``SuffixBatch``. ``logits0`` (R, V): the logits at the origins,
    where the caller has them.
    """

    def __init__(
        self,
        logits_fn: Callable[..., Tensor],
        h: Tensor,
        v: Tensor,
        rows: Tensor | None = None,
        logits0: Tensor | None = None,
    ) -> None:
        self.logits_fn = logits_fn
        self.h = h.to(torch.float64)
        self.v = v.to(torch.float64)
        # the rows index the model's tensors: on its device (a CPU index there would fail)
        self.row_of_ray = None if rows is None else torch.as_tensor(rows, device=self.h.device)
        if logits0 is None:  # one evaluation at the origins
            logits0 = self._logits(self.h, slice(None))
        self._origins(logits0)

    def _origins(self, logits0: Tensor) -> None:
        self.p = torch.softmax(logits0.to(torch.float64), -1)
        # sum p log p, with 0 log 0 = 0 (a token masked at the origin)
        self.p_log_p = torch.special.xlogy(self.p, self.p).sum(-1)
        self.calls = 0
        self.rows = 0

    def _logits(self, x: Tensor, r) -> Tensor:
        if self.row_of_ray is None:
            return self.logits_fn(x)
        return self.logits_fn(x, self.row_of_ray[r])

    def logits_at(self, r: Tensor, t: Tensor) -> Tensor:
        """The logits (n, V) of rays ``r`` (n,) at steps ``t`` (n,)."""
        return self._logits(self.h[r] + t[:, None] * self.v[r], r)

    def _origin_of(self, r: Tensor) -> Tensor:
        """The rows of ``p`` at the origins of rays ``r``: ray r starts at origin r."""
        return r

    def _rows_per_chunk(self, vocab: int) -> int:
        """Rays evaluated together: as many float64 logit rows as the array budget holds,
        so that each product with the head serves many."""
        return rows_within(vocab)

    def __call__(self, rays: np.ndarray, ts: np.ndarray) -> np.ndarray:
        rays_t = torch.as_tensor(rays, dtype=torch.long, device=self.p.device)
        ts_t = torch.as_tensor(np.asarray(ts, dtype=np.float64), device=self.p.device)
        chunk = self._rows_per_chunk(self.p.shape[-1])
        out = []
        for s in range(0, len(rays_t), chunk):
            r, t = rays_t[s : s + chunk], ts_t[s : s + chunk]
            z = self.logits_at(r, t).to(torch.float64)
            o = self._origin_of(r)
            p = self.p[o]
            # KL = sum p log p - p . z + logsumexp z (as sum p = 1): no (rows, V) log q. The
            # terms are O(|z|), so the KL keeps ~1e-13 absolute in float64.
            p_log_p = self.p_log_p[o]
            kl = p_log_p - torch.einsum("rv,rv->r", p, z) + torch.logsumexp(z, -1)
            bad = torch.isnan(kl)  # 0 * inf: a logit of -inf where p is 0
            if bool(bad.any()):
                p_q = torch.where(p[bad] > 0, p[bad] * torch.log_softmax(z[bad], -1), 0.0)
                kl[bad] = p_log_p[bad] - p_q.sum(-1)
            out.append(kl)
        self.calls += 1
        self.rows += len(rays_t)
        return torch.cat(out).cpu().numpy() if out else np.zeros(0)


class LinearRayKL(RayKL):
    """``RayKL`` for a linear head: along ray ``r`` the logits are ``u0[o] + t b[r]`` exactly
    (``u0`` (P, V) the origins' logits, ``b = scale W v`` (R, V), both float64 from one product
    with ``W``; ``origin`` (R,) each ray's origin ``o``, default ray r at origin r: the two
    signs of a direction share one), so each step costs O(V) instead of a float64 product
    with the whole head (0.4 TFLOP a call at Llama-3-8B's vocabulary; 1/64-rate float64 on
    most GPUs)."""

    def __init__(self, u0: Tensor, b: Tensor, origin: Tensor | None = None) -> None:
        self.u0, self.b = u0.to(torch.float64), b.to(torch.float64)
        self.origin = None if origin is None else origin.to(self.b.device)
        self._origins(self.u0)

    def _origin_of(self, r: Tensor) -> Tensor:
        return r if self.origin is None else self.origin[r]

    def logits_at(self, r: Tensor, t: Tensor) -> Tensor:
        return torch.addcmul(self.u0[self._origin_of(r)], t[:, None], self.b[r])

    def _rows_per_chunk(self, vocab: int) -> int:
        # no product to share: the passes over a row's logits (the dot product, the max, the
        # exp) run from cache when few rows come at once (docs/performance.md)
        return min(rows_in_cache(vocab, device=self.u0.device), rows_within(vocab))


def measure_boundaries(
    kl: Callable[[np.ndarray, np.ndarray], np.ndarray],
    eps: list[float],
    *,
    t_start: np.ndarray,
    t_max: np.ndarray,
    rtol: float = 1e-6,
    guesses: np.ndarray | None = None,
    rows_per_call: int = 0,
) -> np.ndarray:
    """First crossing (R, E) of each ``eps`` along each ray of ``kl`` (see ``first_crossings``)."""
    levels = np.broadcast_to(np.asarray(eps, dtype=np.float64), (len(t_start), len(eps)))
    return first_crossings(
        kl,
        levels,
        t_start=t_start,
        t_max=t_max,
        rtol=rtol,
        guesses=guesses,
        rows_per_call=rows_per_call,
    )


def measure_near(
    kl: Callable[[np.ndarray, np.ndarray], np.ndarray],
    eps: list[float],
    roots: np.ndarray,
    *,
    t_start: np.ndarray,
    t_max: np.ndarray,
    rtol: float = 1e-6,
) -> np.ndarray:
    """First crossings (R, E) of ``eps`` along rays whose KL increases for ``t > 0`` (a
    linear head's: ``K(t) - t K'(0)`` with ``K`` convex), where ``roots`` (R, E) are expected
    to be the answer (the exact curve's): each is confirmed by one call at
    ``root (1 -+ rtol / 2)`` (below ``eps``, then at or above it: a bracket of relative width
    ``rtol`` that holds the only crossing; the answer is the linear interpolation inside it),
    an ``inf`` by the KL at ``t_max`` staying below ``eps``. Rays with any root unconfirmed
    are measured from scratch (``measure_boundaries``, the roots as guesses)."""
    R, E = roots.shape
    levels = np.broadcast_to(np.asarray(eps, dtype=np.float64), (R, E))
    t_max = np.broadcast_to(np.asarray(t_max, dtype=np.float64), (R,))
    finite = np.isfinite(roots) & (roots > 0)
    rays = np.repeat(np.arange(R), E)
    ts = np.where(finite, roots, t_max[:, None]).ravel()
    lo_t = np.where(finite.ravel(), ts * (1.0 - 0.5 * rtol), ts)
    hi_t = np.where(finite.ravel(), ts * (1.0 + 0.5 * rtol), ts)
    values = kl(np.concatenate([rays, rays]), np.concatenate([lo_t, hi_t]))
    lo_f, hi_f = (values[: R * E].reshape(R, E), values[R * E :].reshape(R, E))
    lo_t, hi_t = lo_t.reshape(R, E), hi_t.reshape(R, E)
    below = lo_f < levels
    confirmed = np.where(finite, below & (hi_f >= levels), below)
    with np.errstate(divide="ignore", invalid="ignore"):
        inside = lo_t + (levels - lo_f) / (hi_f - lo_f) * (hi_t - lo_t)
    out = np.where(finite, np.clip(inside, lo_t, hi_t), np.inf)
    redo = np.nonzero(~confirmed.all(1))[0]
    if redo.size:
        again = measure_boundaries(
            lambda r, t: kl(redo[r], t),
            eps,
            t_start=np.asarray(t_start, dtype=np.float64)[redo],
            t_max=t_max[redo],
            rtol=rtol,
            guesses=np.where(finite[redo], roots[redo], np.nan),
        )
        out[redo] = again
    return out


# A pass through the suffix costs about as much as 40 of its rows (SmolLM2, block 15 of 30),
# so a call of few rows is filled up to this many points.
SUFFIX_ROWS_PER_CALL = 64


def measure_from_suffix(
    suffix,
    directions: Tensor,
    eps: list[float],
    *,
    rows: Tensor | None = None,
    guesses: np.ndarray | None = None,
    rtol: float = 1e-6,
    start: np.ndarray | None = None,
) -> np.ndarray:
    """Measured first crossings (k, E) along each of ``directions`` (k, d) inside the network.

    ``suffix`` is a ``models.suffix.SuffixBatch`` (ray ``r`` at its position ``rows[r]``) or
    a ``PositionSuffix`` (every ray at its one position); its origin activations ``x0`` and
    ``logits(deltas, rows)`` are used. The search starts at ``1e-3 |x0|`` (or at ``start``
    (k,), where a caller knows the crossings lie well beyond it; it still walks down while
    the KL there is already above the smallest eps) and gives up at ``1e6 |x0|``. All rays
    advance in lockstep: each step is one batched forward pass.
    """
    batch = getattr(suffix, "batch", suffix)
    k = directions.shape[0]
    if rows is None:
        if batch.n_positions != 1:
            raise ValueError("rays at a suffix of several positions need rows")
        rows = torch.zeros(k, dtype=torch.long)
    rows = rows.to(batch.x0.device)
    x0 = batch.x0[rows]
    scale = x0.norm(dim=-1).clamp_min(1e-6).cpu().numpy()
    kl = RayKL(
        lambda x, r: batch.logits(x - batch.x0[r], r),
        x0,
        directions,
        rows=rows,
        logits0=batch.logits0[rows],  # the origins' pass, made with x0
    )
    t_start = 1e-3 * scale if start is None else np.maximum(1e-3 * scale, start)
    with torch.no_grad():
        return measure_boundaries(
            kl,
            eps,
            guesses=guesses,
            t_start=t_start,
            t_max=1e6 * scale,
            rtol=rtol,
            rows_per_call=SUFFIX_ROWS_PER_CALL,
        )
