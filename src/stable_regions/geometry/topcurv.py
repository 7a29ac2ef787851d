"""The top eigenpair of the pre-logit curvature at many positions, from the logits alone.

    H = W^T (diag(p) - p p^T) W

A document scan wants ``lambda_max``, its direction and the Pade radius at every
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
cumulants give the Pade radius along ``+-v`` at no further cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .lanczos import lanczos

EXACT_TOKENS = 256  # likeliest tokens whose logits top_eigenpair_float64 redoes in float64


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
        The products run in ``v``'s dtype (the weight's); the sums in p's (float64 p: float64
        sums, ``v``'s dtype: chunk sums in it, merged in float64).

        One pass over W in vocabulary chunks: each chunk's products, centered at the top
        token (``a' = a - a_c``, so ``p_c`` enters only as one more point), give the chunk's
        own weighted mean and central sums while it is in cache; the chunks (and the top
        token) are merged with the pairwise update of Pebay (2008), which stays exact where
        raw moments would cancel. Divided by the total mass ``sum p``.
        """
        V = weight.shape[0]
        chunk = _capped(chunk, weight)
        f64 = torch.float64
        a_top = (v * weight[self.index]).sum(-1, keepdim=True)
        # the top token alone: mass p_c at a' = 0
        dev = v.device
        total = _Moments(
            self.top.to(f64).expand(len(v)).clone(), torch.zeros(len(v), dtype=f64, device=dev)
        )
        buffer = torch.empty(len(v) * chunk, dtype=v.dtype, device=dev)
        wide = self.rest.dtype != v.dtype  # float64 p: the chunk's sums in float64 too
        a_top = a_top.to(self.rest.dtype)
        for s in range(0, V, chunk):
            e = min(s + chunk, V)
            c = torch.mm(v, weight[s:e].T, out=_buffer_view(buffer, len(v), e - s))
            c = c.to(self.rest.dtype) if wide else c
            c.sub_(a_top)
            w = self.rest[:, s:e]
            # chunk sums in v's dtype (torch sums pairwise), merged in float64: a float64 sum
            # first copies the chunk (100 us against ~50 us for a float32 multiply-and-sum of
            # 341 x 1024)
            n = w.sum(-1)
            center = torch.linalg.vecdot(w, c) / n.clamp_min(1e-30)
            c.sub_(center[:, None])  # at the chunk's own mean, as rounded
            wc = w * c
            wc2 = wc * c
            m2, m3 = torch.linalg.vecdot(wc, c), torch.linalg.vecdot(wc2, c)
            total = total.merge(
                _Moments.about(
                    center.to(f64),  # a rounded mean: the first sum is ~0, not 0
                    n.to(f64),
                    wc.sum(-1).to(f64),
                    m2.to(f64),
                    m3.to(f64),
                    torch.linalg.vecdot(wc2, c.mul_(c)).to(f64),
                )
            )
        return total.m2 / total.n, total.m3 / total.n, total.m4 / total.n


@dataclass
class _Moments:
    """Weighted sums of a sample: mass ``n``, mean, central sums ``m2, m3, m4``."""

    n: Tensor
    mean: Tensor
    m2: Tensor | float = 0.0
    m3: Tensor | float = 0.0
    m4: Tensor | float = 0.0

    @classmethod
    def about(
        cls, center: Tensor, n: Tensor, s1: Tensor, s2: Tensor, s3: Tensor, s4: Tensor
    ) -> _Moments:
        """From the sums ``s_k = sum w (x - center)^k`` about a center near the mean: moved
        to the exact mean ``center + s1 / n``."""
        shift = s1 / n.clamp_min(1e-300)
        return cls(
            n,
            center + shift,
            s2 - n * shift**2,
            s3 - 3 * shift * s2 + 2 * n * shift**3,
            s4 - 4 * shift * s3 + 6 * shift**2 * s2 - 3 * n * shift**4,
        )

    def merge(self, other: _Moments) -> _Moments:
        """The sums of both samples together (Pebay's pairwise formulas, weighted)."""
        na, nb = self.n, other.n
        n = na + nb
        d = other.mean - self.mean
        safe = n.clamp_min(1e-300)
        m2 = self.m2 + other.m2 + d**2 * na * nb / safe
        m3 = (
            self.m3
            + other.m3
            + d**3 * na * nb * (na - nb) / safe**2
            + 3 * d * (na * other.m2 - nb * self.m2) / safe
        )
        m4 = (
            self.m4
            + other.m4
            + d**4 * na * nb * (na**2 - na * nb + nb**2) / safe**3
            + 6 * d**2 * (na**2 * other.m2 + nb**2 * self.m2) / safe**2
            + 4 * d * (na * other.m3 - nb * self.m3) / safe
        )
        return _Moments(n, self.mean + d * nb / safe, m2, m3, m4)


def direction_cumulants(
    weight: Tensor, logits: Tensor, directions: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The KL series ``(c2, c3, c4)`` along many directions from one origin of a linear head.

    ``weight`` (V, d) the unembedding, ``logits`` (V,) at the origin, ``directions`` (R, d)
    unit vectors. ``c2, c3, c4`` are the variance and the third and fourth cumulants of
    ``a = W v`` under p (float64, (R,) each), for ``radius_pade``. The products run in
    ``weight``'s dtype, pivoted at the top token, in vocabulary chunks whose central sums
    are merged in float64 (see ``PivotedProbabilities.moments``). No (R, V) float64 array is
    made: the float64 ``RayCurve`` path holds several (393 MB each for 1000 directions and a
    49152 vocabulary) and runs ~3x slower; the two agree to ~1e-6 (SmolLM2, 1000 random
    directions: 1.1e-6 in ``c2``, 5e-7 in the radius at eps 0.1; 9e-6 and 7e-6 when the
    chunks' raw sums were accumulated instead).
    """
    dtype = weight.dtype
    p = torch.softmax(logits.to(dtype).reshape(1, -1), dim=-1)
    prob = PivotedProbabilities.pivot(p, p.argmax(-1))
    v = directions.to(dtype)
    mu2, mu3, mu4 = prob.moments(weight, v, _chunk(len(v), weight.shape[0]))
    return mu2, mu3, mu4 - 3.0 * mu2**2


def curvature_trace(weight: Tensor, logits: Tensor) -> Tensor:
    """``tr H`` (P,) float64 at logits (P, V) of a linear head with unembedding ``weight`` (V, d).

        tr H = sum_i p_i ||w_i - w_c||^2 - ||sum_i p_i (w_i - w_c)||^2

    (the total variance of ``w`` under p, shift-invariant), centered at the top token c: at a
    confident position both terms are O(1 - p_c) and nothing cancels, where the textbook
    ``sum p ||w||^2 - ||W^T p||^2`` loses ``1e-7 / (1 - p_c)`` in float32. The c term is left
    out (exactly zero). Products in ``weight``'s dtype over vocabulary chunks, sums float64.
    """
    f64 = torch.float64
    p = torch.softmax(logits.to(f64), dim=-1)
    c = p.argmax(-1)
    rest = p.scatter(1, c[:, None], 0.0)  # p' (P, V)
    w_c = weight[c]  # (P, d)
    n_c = w_c.to(f64).pow(2).sum(-1, keepdim=True)
    spread = torch.zeros(len(p), dtype=f64, device=p.device)
    pull = torch.zeros(w_c.shape, dtype=f64, device=p.device)  # W^T p'
    V = weight.shape[0]
    step = _capped(_row_chunk(len(p), *weight.shape), weight)
    for s in range(0, V, step):
        rows = weight[s : s + step]
        n_i = rows.to(f64).pow(2).sum(-1)
        d2 = n_i[None] + n_c - 2.0 * (w_c @ rows.T).to(f64)  # ||w_i - w_c||^2
        r = rest[:, s : s + len(rows)]
        spread += (r * d2).sum(-1)
        pull += (r.to(weight.dtype) @ rows).to(f64)
    mean = pull - rest.sum(-1, keepdim=True) * w_c.to(f64)  # sum_i p'_i (w_i - w_c)
    return spread - mean.pow(2).sum(-1)


def cumulants_along(
    weight: Tensor, logits: Tensor, directions: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The KL series ``(c2, c3, c4)`` (P,) float64 along one direction (P, d) per position, at
    logits (P, V) of a linear head with unembedding ``weight``: the variance and the third and
    fourth cumulants of ``W v`` under p. ``p`` is a float64 softmax of the logits; the
    products ``W v`` run in ``weight``'s dtype over vocabulary chunks, pivoted at the top
    token, their sums in float64 (``PivotedProbabilities.moments``). ``c2 = v^T H v``."""
    p = torch.softmax(logits.to(torch.float64), dim=-1)
    prob = PivotedProbabilities.pivot(p, p.argmax(-1))
    mu2, mu3, mu4 = prob.moments(weight, directions.to(weight.dtype), _chunk(*logits.shape))
    return mu2, mu3, mu4 - 3.0 * mu2**2


def curvature_diagonal(weight: Tensor, logits: Tensor) -> Tensor:
    """``diag H`` (P, d) float64 at logits (P, V) of a linear head: per coordinate j the
    variance of ``W_ij`` under p, centred at the top token c (``sum p'_i (W_ij - W_cj)^2 -
    (sum p'_i (W_ij - W_cj))^2``), so that a confident position loses nothing. Products in
    ``weight``'s dtype over vocabulary chunks, sums in float64."""
    f64 = torch.float64
    p = torch.softmax(logits.to(f64), dim=-1)
    c = p.argmax(-1)
    rest = p.scatter(1, c[:, None], 0.0)  # p' (P, V)
    w_c = weight[c].to(f64)  # (P, d)
    second = torch.zeros(w_c.shape, dtype=f64, device=p.device)  # sum p' W^2
    first = torch.zeros(w_c.shape, dtype=f64, device=p.device)  # sum p' W
    V = weight.shape[0]
    step = _capped(_row_chunk(len(p), *weight.shape), weight)
    for s in range(0, V, step):
        rows = weight[s : s + step]
        r = rest[:, s : s + len(rows)].to(weight.dtype)
        second += (r @ (rows * rows)).to(f64)
        first += (r @ rows).to(f64)
    mass = rest.sum(-1, keepdim=True)
    # sum p' (W - w_c)^2 = sum p' W^2 - 2 w_c sum p' W + mass w_c^2, then minus the squared mean
    spread = second - 2.0 * w_c * first + mass * w_c**2
    mean = first - mass * w_c
    return (spread - mean**2).clamp_min(0.0)


def _buffer_view(buffer: Tensor, rows: int, cols: int) -> Tensor:
    """The first ``rows * cols`` entries of a flat reusable buffer as a (rows, cols) matrix."""
    return buffer[: rows * cols].view(rows, cols)


def _row_chunk(P: int, V: int, d: int) -> int:
    """Vocabulary rows per chunk where a chunk's rows of W are themselves transformed (squared,
    upcast): ``_chunk``, and at most ~8 MB of float64 rows (one position would otherwise take
    the whole vocabulary at once: 1.3 GB for Gemma-3's 262k x 640)."""
    return min(_chunk(P, V), max(256, (1 << 20) // d))


def _capped(chunk: int, weight) -> int:
    """``chunk`` rows of ``weight``, and for a ``WideRows`` head at most its own chunk: its
    rows are upcast copies, and a chunk of the whole vocabulary would copy the whole head."""
    cap = getattr(weight, "rows_per_chunk", None)
    return chunk if cap is None else max(1, min(chunk, cap))


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


def search_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """bfloat16 where the device multiplies it natively (a CUDA GPU that has it; a CPU with AMX
    or AVX512-BF16: 3-4x the float32 GEMM rate), else float32 (emulated bfloat16 would be
    slower than float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
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
    p = torch.softmax(logits.to(dtype), dim=-1)
    pk, idx = p.topk(min(tokens, V), dim=-1)
    start = likely_token_start(weight, pk, idx)
    prob = PivotedProbabilities.pivot(p, idx[:, 0])

    op = _PivotedProduct(search, prob, dtype)
    run = lanczos(
        op.matvec, start, k=1, tol=tol, max_iter=max(1, max_iter), check_every=1, retire=op.keep
    )
    vector = run.vectors[:, 0]
    ritz = run.values[:, 0].clamp_min(0.0)
    resid = run.residuals[:, 0] / run.values[:, 0].abs().clamp_min(1e-300)
    iters = run.iterations
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
    A chunk's intermediates live in buffers made once: fresh ~1 MB tensors per chunk came
    from fresh pages (glibc serves them by mmap) and their conversions ran several times
    slower than into reused memory. Finished positions are dropped by an index into ``p'``,
    not by copying the rest of the (P, V) array.
    """

    def __init__(self, search: Tensor, prob: PivotedProbabilities, dtype: torch.dtype) -> None:
        self.search = search
        self.dtype = dtype
        self.p_rest = prob.rest
        self.rows: Tensor | None = None  # the running positions' rows of p' (None: all)
        self.top = prob.top
        self.w_top = search[prob.index].to(dtype)  # (P, d)
        P, V = prob.rest.shape
        self.chunk = _capped(_chunk(P, V), search)
        size = P * self.chunk
        low = search.dtype
        dev = search.device
        self._p = torch.empty(size, dtype=dtype, device=dev)  # p' of the running rows
        self._a = torch.empty(size, dtype=low, device=dev)  # W_c q
        self._y = torch.empty(size, dtype=dtype, device=dev)  # p' * a'
        self._y_low = self._y if low == dtype else torch.empty(size, dtype=low, device=dev)
        self._part = torch.empty(P * search.shape[1], dtype=low, device=dev)  # W_c^T y
        self.g_rest = self._accumulate(lambda s, e, y: y.copy_(self._rest(s, e)))  # W^T p'

    def _rest(self, s: int, e: int) -> Tensor:
        """p' of the running positions, vocabulary columns s:e."""
        if self.rows is None:
            return self.p_rest[:, s:e]
        out = _buffer_view(self._p, len(self.rows), e - s)
        return torch.index_select(self.p_rest[:, s:e], 0, self.rows, out=out)

    def _accumulate(self, fill) -> Tensor:
        """``sum_c W_c^T y_c`` (P, d) in the answer's dtype, ``fill(s, e, y)`` writing y_c."""
        P = len(self.top)
        V, d = self.search.shape
        out = torch.zeros(P, d, dtype=self.dtype, device=self.search.device)
        for s in range(0, V, self.chunk):
            e = min(s + self.chunk, V)
            y = fill(s, e, _buffer_view(self._y, P, e - s))
            y_low = y if self._y_low is self._y else _buffer_view(self._y_low, P, e - s).copy_(y)
            # chunk products in the search dtype, their sum in the answer's (a (P, d) add)
            out.add_(torch.mm(y_low, self.search[s:e], out=_buffer_view(self._part, P, d)))
        return out

    def keep(self, keep: Tensor) -> None:
        """Drop the positions where ``keep`` (over the running ones) is False."""
        rows = (
            torch.arange(len(self.top), device=self.top.device) if self.rows is None else self.rows
        )
        self.rows = rows[keep]
        self.top, self.w_top, self.g_rest = (x[keep] for x in (self.top, self.w_top, self.g_rest))

    def matvec(self, q: Tensor) -> Tensor:
        a_top = (q * self.w_top).sum(-1, keepdim=True)
        qs = q.to(self.search.dtype)
        m = torch.zeros(len(q), 1, dtype=self.dtype, device=q.device)

        def weighted(s: int, e: int, y: Tensor) -> Tensor:
            a = torch.mm(qs, self.search[s:e].T, out=_buffer_view(self._a, len(q), e - s))
            y.copy_(a).sub_(a_top).mul_(self._rest(s, e))
            m.add_(y.sum(-1, keepdim=True))
            return y

        acc = self._accumulate(weighted)
        return acc - m * (self.g_rest + self.top[:, None] * self.w_top)


def top_eigenpair_float64(
    weight: Tensor,
    h: Tensor,
    *,
    bias: Tensor | None = None,
    rtol: float = 1e-8,
    tokens: int = 2048,
    max_dim: int = 12,
) -> tuple[Tensor, Tensor]:
    """``lambda_max`` to a requested relative accuracy ``rtol`` at pre-logit vectors ``h``
    (P, d) of a linear head, for a few float32 passes over ``weight`` (V, d) each.

    ``weight`` is the unembedding as the model stores it; its values are exact, and the
    arithmetic that decides the answer is float64 (the likely tokens' logits and products,
    ``p``, every sum). One position at a time (many positions: ``top_curvature``):

    1. ``z = W h`` in ``weight``'s precision; the ``EXACT_TOKENS`` largest logits are
       recomputed in float64 and ``p`` is a float64 softmax. The rest keep float32 roundoff,
       weighted by their small mass (~1e-2 beyond 256 of 49152 tokens in SmolLM2).
    2. The start is the top eigenvector of ``H`` restricted to those tokens (Lanczos on the
       (tokens x d) factor, no product with the whole of W): ~4e-4 rad from the answer at a
       confident position, ~1e-2 elsewhere.
    3. Rayleigh-Ritz on a growing subspace S (a Krylov space: each step adds the residual).
       ``x^T H y = Cov_p(W x, W y)``, so projecting H on S needs only ``W S``: one pass
       (the likely tokens' entries again in float64); the residual ``H u - theta u`` of the
       Ritz vector needs one transposed pass ``W^T (p * (W u - mean))``.
    4. Stop when ``rho^2 / gap <= rtol``, ``rho = ||H u - theta u|| / theta``,
       ``gap = (1 - theta_2 / theta) / 2``: the Kato-Temple estimate of ``theta``'s relative
       error (second order in the residual), with ``theta_2`` the larger of the second Ritz
       value and the restricted problem's second eigenvalue (both from below), gap halved
       for safety; or when S has ``max_dim`` vectors.

    A confident position (the bench's) stops after 3 passes over W at ``rtol=1e-6`` and 5
    at ``1e-8``. Returns ``(lambda (P,) float64, vector (P, d) float64)``.
    """
    lams, vecs = [], []
    for i in range(h.shape[0]):
        lam, v = _top_eigenpair_one(weight, h[i], bias, rtol, tokens, max_dim)
        lams.append(lam)
        vecs.append(v)
    return torch.stack(lams), torch.stack(vecs)


def _top_eigenpair_one(
    weight: Tensor, h: Tensor, bias: Tensor | None, rtol: float, tokens: int, max_dim: int
) -> tuple[Tensor, Tensor]:
    f64, low = torch.float64, weight.dtype
    z = h.to(low) @ weight.T  # pass 1
    if bias is not None:
        z = z + bias.to(low)
    idx = z.topk(min(tokens, z.shape[0]), sorted=False).indices
    rows_low = weight.index_select(0, idx)  # (K, d): the likely tokens
    # float64 logits and products for the likeliest few; the others' roundoff is weighted by
    # a mass of ~1e-2 and moves lambda by ~1e-9 relative
    exact = z[idx].topk(min(EXACT_TOKENS, len(idx))).indices
    idx_exact, rows = idx[exact], rows_low[exact].to(f64)
    z = z.to(f64)
    z[idx_exact] = rows @ h.to(f64) + (0.0 if bias is None else bias.to(f64)[idx_exact])
    p = torch.softmax(z, dim=-1)

    # the start: H restricted to the likely tokens (the rest of the mass at their mean)
    pk = p[idx].to(low)
    mean = (pk @ rows_low) / pk.sum()
    first = likely_token_start(weight, pk[exact[:32]][None], idx_exact[None, :32])

    def restricted(x: Tensor) -> Tensor:  # sum_i pk_i (w_i - mean)(w_i - mean)^T x, unformed
        c = x @ rows_low.T - (x @ mean)[:, None]
        return (pk * c) @ rows_low - (pk * c).sum(-1, keepdim=True) * mean

    start = lanczos(restricted, first, k=1, tol=1e-4, max_iter=6, check_every=1)
    v0 = start.vectors[0, 0]
    theta2_restricted = float(start.ritz_values[0, 1]) if start.ritz_values.shape[1] > 1 else 0.0

    def forward(x: Tensor) -> Tensor:
        """``W x`` (m, V) float64 for rows ``x`` (m, d) in ``weight``'s dtype."""
        a = (x @ weight.T).to(f64)
        a[:, idx_exact] = x.to(f64) @ rows.T
        return a

    X = v0[None]  # rows of S, rounded once: their W X is then exact
    AX = forward(X)  # pass 2
    while True:
        Xd = X.to(f64)
        B = Xd @ Xd.T  # X is not quite orthonormal once rounded
        C = AX - (AX @ p)[:, None]
        G = (C * p) @ C.T  # X^T H X
        L_inv = torch.linalg.inv(torch.linalg.cholesky(B))
        theta_all, S = torch.linalg.eigh(L_inv @ G @ L_inv.T)
        s = L_inv.T @ S[:, -1]
        theta = theta_all[-1]
        u = s @ Xd
        if float(theta) <= 0.0:  # no curvature at all (p one-hot to float64): any direction
            return theta.clamp_min(0.0), u / u.norm()
        Hu = ((p * (s @ C)).to(low) @ weight).to(f64)  # a transposed pass
        r = Hu - theta * u
        rho = float(r.norm() / theta.clamp_min(1e-300))
        theta2 = max(theta2_restricted, float(theta_all[-2]) if len(theta_all) > 1 else 0.0)
        gap = max(1.0 - theta2 / float(theta), 0.0) / 2.0
        if rho**2 <= rtol * gap or X.shape[0] >= max_dim:
            return theta, u / u.norm()
        r = r - Xd.T @ torch.linalg.solve(B, Xd @ r)  # the new Krylov direction
        x = (r / r.norm()).to(low)[None]
        X = torch.cat([X, x])
        AX = torch.cat([AX, forward(x)])  # a pass
