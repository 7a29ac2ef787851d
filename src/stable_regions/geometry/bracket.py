"""A bracket on ``lambda_max`` and the distance to the next argmax flip, from the logits and
a few rows of W: cheap enough to run on every generated token.

    H = W^T (diag p - p p^T) W = Cov_p(w)        (w a row of W drawn with probability p)

**Lower bound.** For any unit ``v`` and any centre ``c``, ``v^T H v = Var_p(w . v) >=
sum_{i in S} p_i ((w_i - c_S) . v)^2`` over any token set S, with ``c_S`` the p-weighted
mean of S (the minimiser over c of the restricted sum). The right side is ``v^T A^T A v``
with rows ``A_i = sqrt(p_i) (w_i - c_S)``, so ``lambda_max(H) >= lambda_max(A A^T)``: the
top eigenvalue of a k x k Gram matrix of the k likeliest tokens (``k^2 d`` work, no pass
over W). Its eigenvector ``A^T y`` is the search's usual start (``topcurv``).

**Upper bound.** ``H = E_p[(w - m)(w - m)^T] <= E_p[(w - c)(w - c)^T]`` for any ``c`` (in
the semidefinite order), and with ``c = c_S`` the right side splits into the S part,
``A^T A``, and the tail part ``G_T = sum_{i not in S} p_i (w_i - c_S)(w_i - c_S)^T``. So

    lambda_max(H) <= lambda_max(A^T A) + tr G_T,   tr G_T <= sum_T p_i (n_i + |c_S - m0|)^2

with ``n_i = |w_i - m0|`` precomputed once about a fixed centre ``m0`` (the mean row: rows of
W share a large common part that cancels), the triangle inequality giving the last step. It
costs O(V) per position. Both bounds carry a relative margin for float64 roundoff.

**Argmax flip.** With a linear head, moving ``h`` by ``delta`` changes ``z_top - z_j`` by
``(w_top - w_j) . delta``, so the least L2 move that makes token j overtake the top token is
``(z_top - z_j) / |w_top - w_j|``; the minimum over j is the exact flip radius. It needs
``W w_top`` (one product per position, shared with the direction's) and the row norms.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from ..budget import chunk_bytes

MARGIN = 1e-9  # relative, covers float64 roundoff in the sums below
FLOAT32_MARGIN = 1e-5  # the same where p and the O(V) sums are float32


@dataclass
class HeadSpread:
    """``center`` (d,) the mean row of W and ``radii`` (V,) ``|w_i - center|`` rounded up
    (float64), ``norms2`` (V,) ``|w_i|^2``, ``order`` (V,) the tokens by descending radius:
    one pass over W, made once per head."""

    center: Tensor
    radii: Tensor
    norms2: Tensor
    order: Tensor

    @cached_property
    def powers(self) -> Tensor:
        """``radii`` and their squares (2, V), float64, for the sums over p."""
        return torch.stack([self.radii, self.radii * self.radii])

    @cached_property
    def radii32(self) -> Tensor:
        """``powers`` in float32, for float32 sums over p."""
        return self.powers.to(torch.float32)

    @classmethod
    def of(cls, weight: Tensor, chunk: int | None = None) -> HeadSpread:
        f64 = torch.float64
        V, d = weight.shape
        step = max(1, (chunk or chunk_bytes(weight.device, cpu=16 << 20)) // (8 * d))
        center = torch.zeros(d, dtype=f64, device=weight.device)
        for s in range(0, V, step):
            center += weight[s : s + step].to(f64).sum(0)
        center /= V
        radii = torch.empty(V, dtype=f64, device=weight.device)
        norms2 = torch.empty(V, dtype=f64, device=weight.device)
        for s in range(0, V, step):
            w = weight[s : s + step].to(f64)
            radii[s : s + step] = torch.linalg.vector_norm(w - center, dim=-1)
            norms2[s : s + step] = (w * w).sum(-1)
        radii *= 1 + MARGIN
        return cls(center, radii, norms2, radii.argsort(descending=True))


@dataclass
class CurvatureBracket:
    """Per position (P,): ``lower <= lambda_max(H) <= upper``; ``vector`` (P, d) the unit top
    eigenvector of the likeliest tokens' restriction (whose Rayleigh quotient is at least
    ``lower``), in float64."""

    lower: Tensor
    upper: Tensor
    vector: Tensor


def curvature_bracket(
    weight: Tensor,
    p: Tensor,
    spread: HeadSpread,
    tokens: int = 32,
    likeliest: tuple[Tensor, Tensor] | None = None,
    rows: Tensor | None = None,
) -> CurvatureBracket:
    """The module doc's bracket at P positions with probabilities ``p`` (P, V).
    ``likeliest``: ``p.topk(tokens)`` if the caller has it already, and ``rows`` (P, k, d)
    their rows of W.

    The Gram matrix is float64 whatever ``p``'s dtype; the O(V) sums run in ``p``'s dtype
    (float32 p: a relative margin of 1e-5 instead of 1e-9 covers their rounding and that of
    p itself)."""
    f64 = torch.float64
    margin = MARGIN if p.dtype == f64 else FLOAT32_MARGIN
    pk, idx = likeliest if likeliest is not None else p.topk(min(tokens, p.shape[-1]), dim=-1)
    pk = pk.to(f64)
    rows = (weight[idx] if rows is None else rows).to(f64)  # (P, k, d): k rows per position
    mass = pk.sum(-1, keepdim=True).clamp_min(1e-300)
    c_s = torch.einsum("pk,pkd->pd", pk, rows) / mass
    A = pk.sqrt()[..., None] * (rows - c_s[:, None])
    values, Y = torch.linalg.eigh(A @ A.transpose(1, 2))
    lam_s = values[:, -1].clamp_min(0.0)
    u = torch.einsum("pk,pkd->pd", Y[:, :, -1], A)
    vector = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    # sum_T p_i (n_i + e)^2 = (all tokens) - (the k likeliest), each a product with p: no
    # (P, V) temporary; the difference is rounded up by a margin of the whole
    e = torch.linalg.vector_norm(c_s - spread.center, dim=-1)
    if p.dtype == torch.float32:
        sums = (p @ spread.radii32.T).to(f64)  # (P, 2): sum p n, sum p n^2
    else:
        sums = p @ spread.powers.T
    whole = sums[:, 1] + 2.0 * e * sums[:, 0] + e * e * p.sum(-1).to(f64)
    likely = (pk * (spread.radii[idx] + e[:, None]) ** 2).sum(-1)
    tail = (whole - likely).clamp_min(0.0) + margin * whole
    return CurvatureBracket(lam_s * (1 - margin), (lam_s + tail) * (1 + margin), vector)


def flip_radius(
    logits: Tensor,
    likeliest: Tensor,
    weight: Tensor,
    spread: HeadSpread,
    rows: Tensor | None = None,
) -> Tensor:
    """The least L2 move of the pre-logit vector that lets another token overtake the top
    one (P,): ``min_j (z_top - z_j) / |w_top - w_j|`` (module doc), exact in float64.

    ``likeliest`` (P, K): tokens in descending probability (the top token first), of which
    the first ``k = rows.shape[1]`` (all K without ``rows``) are done exactly from their rows
    of ``weight`` (``rows``: those rows, if the caller has them). Any other token j has
    ``|w_top - w_j| <= n_top + n_j`` (``spread.radii`` about one centre), so its ratio is at
    least ``(z_top - z_j) / (n_top + n_j)``: a screen, over the rest of ``likeliest`` and,
    unless even the K-th token's gap over ``n_top + max n`` rules them out, over the whole
    vocabulary; the few tokens it cannot rule out are done exactly. Tokens with logit -inf
    (masked by a processor) cannot overtake; ``inf`` where none can."""
    f64 = torch.float64
    z = logits.to(f64)
    top = likeliest[:, 0]
    k = likeliest.shape[1] if rows is None else rows.shape[1]
    rows = weight[likeliest[:, :k]] if rows is None else rows
    z_top = z.gather(1, top[:, None])
    w_top = rows[:, 0].to(f64)
    best = _exact_ratio(z_top, z.gather(1, likeliest[:, 1:k]), rows[:, 1:], w_top)
    # the screens in float32, rounded down by far more than their rounding (1e-5 relative)
    n = spread.radii32[0]
    z32 = logits.to(torch.float32)
    zt32 = z32.gather(1, top[:, None])
    near = likeliest[:, k:]
    screen = (zt32 - z32.gather(1, near)) / (n[top][:, None] + n[near]) * (1 - 1e-5)
    below = [near[r, screen[r] < best[r]] for r in range(len(top))]
    far = (zt32[:, 0] - z32.gather(1, likeliest[:, -1:])[:, 0]) / (n[top] + n.max())
    for r in torch.nonzero(far * (1 - 1e-5) < best).flatten().tolist():  # all of V
        every = (zt32[r] - z32[r]) / (n[top[r]] + n) * (1 - 1e-5)
        every[likeliest[r]] = torch.inf  # done already
        below[r] = torch.cat([below[r], torch.nonzero(every < best[r]).flatten()])
    for r, others in enumerate(below):
        for s in range(0, len(others), 4096):  # bounded (m, d) float64 blocks
            chunk = others[s : s + 4096]
            ratio = _exact_ratio(
                z_top[r : r + 1], z[r, chunk][None], weight[chunk][None], w_top[r : r + 1]
            )
            best[r] = torch.minimum(best[r], ratio[0])
    return best


def _exact_ratio(z_top: Tensor, z_rival: Tensor, rows: Tensor, w_top: Tensor) -> Tensor:
    """``min_j (z_top - z_j) / |w_top - w_j|`` per row over rivals (P, m) with their rows
    (P, m, d); a -inf logit (gap inf) or a 0 / 0 never wins."""
    dist = torch.linalg.vector_norm(rows.to(torch.float64) - w_top[:, None, :], dim=-1)
    ratio = (z_top - z_rival) / dist
    return torch.where(torch.isnan(ratio), torch.full_like(ratio, torch.inf), ratio).amin(-1)
