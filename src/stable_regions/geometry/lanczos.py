"""Top eigenpairs of a batch of symmetric operators by Lanczos with full reorthogonalization.

Each of the ``P`` operators acts on its own row of a (P, d) tensor, so the products of
all positions are one matrix-matrix product. Full reorthogonalization costs O(m d) per
step, negligible next to an O(V d) operator product for the sizes we meet (m << d << V).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

MatVec = Callable[[Tensor], Tensor]


def lanczos_topk(
    matvec: MatVec,
    v0: Tensor,
    k: int = 1,
    *,
    tol: float = 1e-12,
    max_iter: int | None = None,
    check_every: int = 4,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Largest ``k`` eigenpairs of ``P`` symmetric operators (see ``lanczos``)."""
    run = lanczos(
        matvec, v0, k, tol=tol, max_iter=max_iter, check_every=check_every, generator=generator
    )
    return run.values, run.vectors, run.residuals


@dataclass
class LanczosRun:
    """What a Lanczos run found. ``basis`` (P, m, d) is the orthonormal Krylov basis Q and
    ``basis_trace`` (P,) is ``tr(Q^T A Q) = sum(alpha)``, exact with full reorthogonalization:
    the part of ``tr A`` inside the Krylov space, for free. ``ritz_values`` (P, m): all Ritz
    values of each operator's last check, descending (e.g. a gap estimate beyond the ``k``
    wanted). ``iterations`` (P,): products each operator took (its Krylov dimension). Where
    operators retire early (``retire``), their basis and Ritz rows are padded (zeros, NaN)."""

    values: Tensor
    vectors: Tensor
    residuals: Tensor
    basis: Tensor
    basis_trace: Tensor
    ritz_values: Tensor
    iterations: Tensor


def lanczos(
    matvec: MatVec,
    v0: Tensor,
    k: int = 1,
    *,
    tol: float = 1e-12,
    max_iter: int | None = None,
    check_every: int = 4,
    generator: torch.Generator | None = None,
    retire: Callable[[Tensor], None] | None = None,
) -> LanczosRun:
    """Largest ``k`` eigenpairs of ``P`` symmetric operators, and the Krylov basis.

    Args:
        matvec: maps (P, d) to (P, d), row ``i`` through operator ``i``; with ``retire``,
            (R, d) to (R, d) for the R operators still running, in their order.
        v0: (P, d) start vectors (need not be normalized; zero rows get a random start).
        k: eigenpairs wanted per operator.
        tol: an operator is done when every wanted Ritz pair has residual
            ``||A y - theta y||`` below ``tol * theta_max`` (absolute floor 1e-300).
        max_iter: Krylov dimension cap (default ``d``, where Lanczos is exact).
        retire: without it every operator runs until all are done (``matvec`` always sees all
            P rows); with it each stops as soon as it is done, and ``retire(keep)`` is called
            with a boolean mask over the running operators (False: done) before ``matvec``
            sees only the rest: an operator whose products cost per row (a document scan's
            positions) then stops paying for the finished ones.

    Returns:
        eigenvalues (P, k) descending, eigenvectors (P, k, d), residuals (P, k), the
        Krylov basis and its trace (``LanczosRun``). Eigenvector signs are fixed so that
        the largest-magnitude entry is positive. The vectors are in ``v0``'s dtype, the
        tridiagonal matrix (and the eigenvalues) in float64.
    """
    P, d = v0.shape
    k = min(k, d)
    dtype, device = v0.dtype, v0.device
    f64 = torch.float64
    m_cap = d if max_iter is None else min(max(max_iter, k), d)
    Q = torch.zeros(P, m_cap + 1, d, dtype=dtype, device=device)
    alpha = torch.zeros(P, m_cap, dtype=f64, device=device)
    beta = torch.zeros(P, m_cap, dtype=f64, device=device)
    # below this relative size a new Krylov direction is roundoff of the vectors' dtype
    breakdown = max(1e-13, float(torch.finfo(dtype).eps))

    q = v0.clone()
    norms = q.norm(dim=-1, keepdim=True)
    dead = norms.squeeze(-1) <= 1e-300
    if dead.any():
        q[dead] = torch.randn(int(dead.sum()), d, dtype=dtype, device=device, generator=generator)
        norms = q.norm(dim=-1, keepdim=True)
    Q[:, 0] = q / norms

    values = torch.zeros(P, k, dtype=f64, device=device)
    vectors = torch.zeros(P, k, d, dtype=dtype, device=device)
    residuals = torch.zeros(P, k, dtype=f64, device=device)
    ritz_values = torch.full((P, m_cap), torch.nan, dtype=f64, device=device)
    iterations = torch.zeros(P, dtype=torch.long, device=device)
    active = torch.arange(P, device=device)
    j = 0
    while j < m_cap and len(active):
        basis = Q[active, : j + 1]
        qj = basis[:, -1]
        w = matvec(qj)
        alpha[active, j] = (w * qj).sum(-1, dtype=f64)
        # Two passes of classical Gram-Schmidt against all previous vectors.
        for _ in range(2):
            w = w - torch.einsum("pm,pmd->pd", torch.einsum("pmd,pd->pm", basis, w), basis)
        b = w.norm(dim=-1)
        scale = alpha[active, : j + 1].abs().amax(-1).clamp_min(1e-300)
        broke = b.to(f64) <= breakdown * scale
        if broke.any():
            # Invariant subspace found: continue from a fresh direction orthogonal to it,
            # with a zero off-diagonal, so eigenvalues outside it are not missed.
            fresh = torch.randn(
                int(broke.sum()), d, dtype=dtype, device=device, generator=generator
            )
            Qb = basis[broke]
            for _ in range(2):
                fresh = fresh - torch.einsum(
                    "pm,pmd->pd", torch.einsum("pmd,pd->pm", Qb, fresh), Qb
                )
            w[broke] = fresh
            b = torch.where(broke, torch.zeros_like(b), b)
            wn = w.norm(dim=-1, keepdim=True).clamp_min(1e-300)
            Q[active, j + 1] = torch.where(broke[:, None], w / wn, w / b.clamp_min(1e-300)[:, None])
        else:
            Q[active, j + 1] = w / b[:, None].clamp_min(1e-300)
        beta[active, j] = b.to(f64)
        j += 1
        if j >= k and (j % check_every == 0 or j == m_cap):
            ritz, S = _tridiagonal_eigh(alpha[active, :j], beta[active, : j - 1])
            theta, Sk = ritz[:, :k], S[:, :, :k]
            resid = (beta[active, j - 1, None] * Sk[:, -1, :]).abs()
            floor = (tol * theta[:, :1].abs()).clamp_min(1e-300)
            done = (resid <= floor).all(-1)
            if j == m_cap:
                done[:] = True
            elif retire is None:
                done[:] = bool(done.all())  # every operator goes on until all are done
            if done.any():
                rows = active[done]
                vecs = torch.einsum("pmk,pmd->pkd", Sk[done].to(dtype), Q[rows, :j])
                vecs = vecs / vecs.norm(dim=-1, keepdim=True).clamp_min(1e-300)
                values[rows], vectors[rows] = theta[done], _fix_sign(vecs)
                residuals[rows], iterations[rows] = resid[done], j
                ritz_values[rows, :j] = ritz[done]
                Q[rows, j] = 0.0  # the next direction was never used: the basis is Q[:, :j]
                active = active[~done]
                if retire is not None and len(active):
                    retire(~done)
    m = int(iterations.max())
    return LanczosRun(
        values, vectors, residuals, Q[:, :m], alpha.sum(-1), ritz_values[:, :m], iterations
    )


def _tridiagonal_eigh(alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenpairs of the (P, m, m) tridiagonal matrices, eigenvalues descending."""
    T = torch.diag_embed(alpha)
    if beta.shape[-1] > 0:
        T = T + torch.diag_embed(beta, 1) + torch.diag_embed(beta, -1)
    evals, evecs = torch.linalg.eigh(T)
    return evals.flip(-1), evecs.flip(-1)


def _fix_sign(vecs: Tensor) -> Tensor:
    idx = vecs.abs().argmax(dim=-1, keepdim=True)
    sign = torch.sign(torch.gather(vecs, -1, idx))
    sign[sign == 0] = 1.0
    return vecs * sign
