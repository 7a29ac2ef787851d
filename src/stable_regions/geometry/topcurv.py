"""The top eigenpair of the pre-logit curvature at many positions, from the logits alone.

    H = W^T (diag(p) - p p^T) W

A document scan wants ``lambda_max``, its direction and the corrected radius at every
position for about the price of the forward pass that produced the logits. Three things
make that possible (and a fourth, the search's precision, below):

1. **Start from the likely tokens.** Restricted to the ``tokens`` most likely tokens S
   (the rest of the mass placed at their mean), ``H`` is the covariance of a small
   distribution, ``H_S = A^T A`` with rows ``A_i = sqrt(p_i) (w_i - w_bar)``. Its top
   eigenvector is ``A^T y`` for the top eigenvector ``y`` of the |S| x |S| Gram matrix
   ``A A^T``: no product with the whole of W. It is usually a few degrees from the answer.
2. **Lanczos in lockstep.** Every position runs Lanczos from that start; one step is two
   matrix-matrix products with W (``W Q`` and ``W^T Y``) shared by the positions still
   running. A position stops when its Ritz residual ``|beta_j s_j|`` is below
   ``tol * theta`` (free: read off the tridiagonal matrix).
3. **Pivot at the top token.** In float32 ``sum p`` misses 1 by ~1e-7, and the textbook
   product ``W^T (p * (a - p . a))`` then carries an error ~1e-7 ``||W^T p||^2``, as large
   as ``lambda`` itself at confident positions (where ``lambda ~ 1 - p_top``). Centering at
   the top token c removes ``p_c`` from every sum:

       H v = W^T (p' * (a' - m)) - m p_c w_c,   a' = a - a_c,  p' = p with p_c = 0,  m = p' . a'

   which is exact algebra when ``sum p = 1`` and accurate in float32 when it is not.

The search may run on a bfloat16 copy of W (3-4x the float32 GEMM rate where the CPU has
AMX); the answer is then one float32 product ``W v``, whose variance under p is ``lambda``
(a Rayleigh quotient: error second order in the vector's) and whose third and fourth
cumulants give the corrected radius along ``+-v`` at no further cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TopCurvature:
    """Top eigenpair of ``H`` at P positions.

    ``lambda_max`` (P,) float64 (= ``c2``, the variance of ``W v`` under p); ``vector`` (P, d)
    unit; ``c3``, ``c4`` (P,): third and fourth cumulants of ``W v`` under p, the KL series
    along ``+v`` (flip the sign of ``c3`` for ``-v``); ``residual`` (P,) Ritz residual
    ``||H v - lambda v|| / lambda`` of the search (Lanczos estimate); ``iterations`` (P,)
    products used per position.
    """

    lambda_max: Tensor
    vector: Tensor
    c3: Tensor
    c4: Tensor
    residual: Tensor
    iterations: Tensor


@dataclass
class PivotedProbabilities:
    """``p`` split at its top token ``c``: ``p_c`` and ``p'`` (``p`` with ``p_c`` set to 0)."""

    rest: Tensor  # p' (P, V)
    top: Tensor  # p_c (P,)
    index: Tensor  # c (P,)

    @classmethod
    def pivot(cls, p: Tensor, index: Tensor) -> PivotedProbabilities:
        """Split ``p`` (P, V) at ``index`` (P,), in place: ``p`` becomes ``p'``."""
        top = p.gather(1, index[:, None])[:, 0]
        p.scatter_(1, index[:, None], 0.0)
        return cls(p, top, index)

    def moments(self, weight: Tensor, v: Tensor, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
        """Central moments 2, 3, 4 of ``a = W v`` (P, V) under p, as float64 (P,) each.

        Centered at the top token (so ``p_c`` enters only as ``p_c (-m)^k``), then at the
        mean. ``a`` is made in vocabulary chunks: the first pass finds the mean, the second
        sums the powers while each chunk is still in cache.
        """
        V = weight.shape[0]
        a_top = (v * weight[self.index]).sum(-1, keepdim=True)
        chunks, m = [], torch.zeros(len(v), 1, dtype=torch.float64)
        for s in range(0, V, chunk):
            c = v @ weight[s : s + chunk].T - a_top
            m += (self.rest[:, s : s + chunk] * c).sum(-1, keepdim=True, dtype=torch.float64)
            chunks.append(c)
        mu = torch.zeros(3, len(v), dtype=torch.float64)
        mf = m.to(v.dtype)
        for i, s in enumerate(range(0, V, chunk)):
            c = chunks[i].sub_(mf)
            rc = self.rest[:, s : s + chunk] * c
            rc2 = rc * c
            mu[0] += (rc * c).sum(-1, dtype=torch.float64)
            mu[1] += (rc2 * c).sum(-1, dtype=torch.float64)
            mu[2] += (rc2 * c.mul_(c)).sum(-1, dtype=torch.float64)
        top, m = self.top.to(torch.float64), m[:, 0]
        return mu[0] + top * m**2, mu[1] - top * m**3, mu[2] + top * m**4


def _chunk(P: int, V: int) -> int:
    """Vocabulary columns per chunk: a (P, chunk) float32 block of ~1 MB stays in cache."""
    return int(min(V, max(1024, (1 << 18) // max(P, 1))))


def likely_token_start(weight: Tensor, pk: Tensor, idx: Tensor) -> Tensor:
    """Top eigenvector of ``H`` restricted to the likeliest tokens ``idx`` (P, k), probabilities ``pk``."""
    rows = weight[idx]  # (P, k, d): k rows of W per position, never (P, V, d)
    mean = torch.einsum("pk,pkd->pd", pk, rows) / pk.sum(-1, keepdim=True).clamp_min(1e-30)
    A = pk.sqrt()[..., None] * (rows - mean[:, None])
    _, Y = torch.linalg.eigh((A @ A.transpose(1, 2)).to(torch.float64))
    u = torch.einsum("pk,pkd->pd", Y[:, :, -1].to(weight.dtype), A)
    return u / u.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def search_dtype() -> torch.dtype:
    """bfloat16 where the CPU multiplies it natively (AMX or AVX512-BF16: 3-4x the float32
    GEMM rate), else float32 (emulated bfloat16 would be slower than float32)."""
    try:
        native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    except AttributeError:  # private helpers moved: take the safe choice
        native = False
    return torch.bfloat16 if native else torch.float32


def top_curvature(
    weight: Tensor,
    logits: Tensor,
    *,
    tol: float = 1e-2,
    tokens: int = 32,
    max_iter: int = 12,
    search_weight: Tensor | None = None,
    refine: bool = True,
) -> TopCurvature:
    """Top eigenpair of ``H`` at the P positions whose logits (P, V) are given.

    ``weight``: the unembedding (V, d) as the logits see it (a linear head, ``z = W h + b``).
    ``search_weight``: a lower-precision copy of it (e.g. bfloat16, see ``search_dtype``) for
    the Lanczos search; the answer is then refined in ``weight``'s dtype. ``refine=False``
    skips that product (for callers that refine in float64 themselves): ``lambda_max`` is then
    the search's Ritz value and ``c3``, ``c4`` are NaN.

    Positions leave the Lanczos loop once their Ritz residual is below ``tol * lambda``. The
    returned ``lambda_max`` is the Rayleigh quotient ``Var_p(W v)`` of the final vector,
    computed in ``weight``'s dtype: its error is second order in the vector's error, about
    ``(tol^2 + u^2) lambda / gap`` with ``u`` the unit roundoff of the search dtype.
    """
    dtype = weight.dtype
    search = weight if search_weight is None else search_weight
    P, V = logits.shape
    d = weight.shape[1]
    p = torch.softmax(logits.to(dtype), dim=-1)
    pk, idx = p.topk(min(tokens, V), dim=-1)
    start = likely_token_start(weight, pk, idx)
    prob = PivotedProbabilities.pivot(p, idx[:, 0])

    m_cap = max(1, min(max_iter, d))
    Q = torch.zeros(P, m_cap + 1, d, dtype=dtype)
    alpha = torch.zeros(P, m_cap, dtype=torch.float64)
    beta = torch.zeros(P, m_cap, dtype=torch.float64)
    Q[:, 0] = start
    vector = torch.empty(P, d, dtype=dtype)
    resid = torch.zeros(P, dtype=torch.float64)
    ritz = torch.zeros(P, dtype=torch.float64)
    iters = torch.zeros(P, dtype=torch.long)
    active = torch.arange(P)
    op = _PivotedProduct(search, prob, dtype)
    for j in range(m_cap):
        q = Q[active, j]
        w = op.matvec(q)
        alpha[active, j] = (w * q).sum(-1, dtype=torch.float64)
        basis = Q[active, : j + 1]
        for _ in range(2):  # full reorthogonalization, twice
            w = w - torch.einsum("pm,pmd->pd", torch.einsum("pmd,pd->pm", basis, w), basis)
        b = w.norm(dim=-1)
        beta[active, j] = b.to(torch.float64)
        Q[active, j + 1] = w / b[:, None].clamp_min(1e-30)
        T = torch.diag_embed(alpha[active, : j + 1])
        if j > 0:
            off = beta[active, :j]
            T = T + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
        evals, evecs = torch.linalg.eigh(T)
        theta, s = evals[:, -1], evecs[:, :, -1]
        r = (beta[active, j] * s[:, -1]).abs()
        done = (r <= tol * theta.abs()) | (b.to(torch.float64) <= 1e-7 * theta.abs()) | (theta <= 0)
        if j == m_cap - 1:
            done[:] = True
        if done.any():
            rows = active[done]
            resid[rows] = r[done] / theta[done].abs().clamp_min(1e-300)
            iters[rows] = j + 1
            vector[rows] = torch.einsum("pm,pmd->pd", s[done].to(dtype), Q[rows, : j + 1])
            ritz[rows] = theta[done].clamp_min(0.0)
        keep = ~done
        if not keep.any():
            break
        active = active[keep]
        op.keep(keep)
    vector = vector / vector.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    if not refine:
        nan = torch.full_like(ritz, torch.nan)
        return TopCurvature(ritz, vector, nan, nan, resid, iters)
    # the refinement: one product W v in the answer's dtype
    c2, c3, c4 = prob.moments(weight, vector, _chunk(P, V))
    return TopCurvature(c2, vector, c3, c4 - 3.0 * c2**2, resid, iters)


class _PivotedProduct:
    """``H q`` for the running positions, W read in vocabulary chunks that stay in cache.

        H q = W^T (p' * a') - m (g' + p_c w_c),   a' = W q - a_c,  m = p' . a',  g' = W^T p'

    so no (P, V) intermediate is written back to memory; only ``p'`` is read per product.
    """

    def __init__(self, search: Tensor, prob: PivotedProbabilities, dtype: torch.dtype) -> None:
        self.search = search
        self.dtype = dtype
        self.rest = prob.rest
        self.top = prob.top
        self.w_top = search[prob.index].to(dtype)  # (P, d)
        P, V = prob.rest.shape
        self.chunk = _chunk(P, V)
        self.g_rest = self._accumulate(lambda s, e: self.rest[:, s:e])  # W^T p'

    def _accumulate(self, block) -> Tensor:
        out = None
        V = self.search.shape[0]
        for s in range(0, V, self.chunk):
            e = min(s + self.chunk, V)
            # chunk products in the search dtype, their sum in the answer's (a (P, d) add)
            part = (block(s, e).to(self.search.dtype) @ self.search[s:e]).to(self.dtype)
            out = part if out is None else out.add_(part)
        return out

    def keep(self, rows: Tensor) -> None:
        self.rest, self.top, self.w_top, self.g_rest = (
            x[rows] for x in (self.rest, self.top, self.w_top, self.g_rest)
        )

    def matvec(self, q: Tensor) -> Tensor:
        a_top = (q * self.w_top).sum(-1, keepdim=True)
        qs = q.to(self.search.dtype)
        m = torch.zeros(len(q), 1, dtype=self.dtype)

        def weighted(s: int, e: int) -> Tensor:
            y = self.rest[:, s:e] * ((qs @ self.search[s:e].T).to(self.dtype) - a_top)
            m.add_(y.sum(-1, keepdim=True))
            return y

        acc = self._accumulate(weighted)
        return acc - m * (self.g_rest + self.top[:, None] * self.w_top)


def top_eigenpair_float64(
    weight64: Tensor,
    h: Tensor,
    *,
    weight: Tensor,
    tol: float = 3e-4,
    search_weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``lambda_max`` to float64 accuracy at pre-logit vectors ``h`` (P, d) of a linear head.

    The direction comes from ``top_curvature`` in ``weight``'s (lower) precision; the
    eigenvalue is then its Rayleigh quotient ``Var_p(W v)`` with ``p`` and ``W v`` from one
    float64 product ``[h; v] W^T``. Its error is second order in the direction's:
    ``~tol^2 lambda / gap``. Returns ``(lambda (P,) float64, vector (P, d) float64)``.
    """
    logits = h.to(weight.dtype) @ weight.T
    if bias is not None:
        logits = logits + bias.to(weight.dtype)
    found = top_curvature(weight, logits, tol=tol, search_weight=search_weight, refine=False)
    v = found.vector.to(torch.float64)
    v = v / v.norm(dim=-1, keepdim=True)
    both = torch.cat([h.to(torch.float64), v]) @ weight64.T
    z, a = both[: len(h)], both[len(h) :]
    if bias is not None:
        z = z + bias.to(torch.float64)
    p = torch.softmax(z, dim=-1)
    mean = (p * a).sum(-1, keepdim=True)
    return (p * (a - mean) ** 2).sum(-1), v
