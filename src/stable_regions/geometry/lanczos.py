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
    # The basis grows as it fills (a few columns are typical: preallocating m_cap + 1 = d + 1
    # columns would hold P d^2 values). The tridiagonal matrices and the convergence checks
    # live on the CPU in float64: tiny problems, and one small transfer per step.
    Q = torch.zeros(P, min(m_cap + 1, max(2 * k + 2, 16)), d, dtype=dtype, device=device)
    alpha = torch.zeros(P, m_cap, dtype=f64)
    beta = torch.zeros(P, m_cap, dtype=f64)
    # below this relative size a new Krylov direction is roundoff of the vectors' dtype
    breakdown = max(1e-13, float(torch.finfo(dtype).eps))

    q = v0.clone()
    norms = q.norm(dim=-1, keepdim=True)
    dead = (norms.squeeze(-1) <= 1e-300).cpu()
    if dead.any():
        q[dead] = _random_rows(int(dead.sum()), d, dtype, device, generator)
        norms = q.norm(dim=-1, keepdim=True)
    Q[:, 0] = q / norms

    values = torch.zeros(P, k, dtype=f64)
    vectors = torch.zeros(P, k, d, dtype=dtype, device=device)
    residuals = torch.zeros(P, k, dtype=f64)
    ritz_values = torch.full((P, m_cap), torch.nan, dtype=f64)
    iterations = torch.zeros(P, dtype=torch.long)
    active = torch.arange(P)  # on the CPU: it indexes both the device basis and the CPU rows
    j = 0
    while j < m_cap and len(active):
        if j + 1 >= Q.shape[1]:
            Q = _grown(Q, min(m_cap + 1, 2 * Q.shape[1]))
        basis = Q[active, : j + 1]
        qj = basis[:, -1]
        w = matvec(qj)
        a_j = (w * qj).sum(-1, dtype=f64)
        # Two passes of classical Gram-Schmidt against all previous vectors.
        for _ in range(2):
            w = w - torch.einsum("pm,pmd->pd", torch.einsum("pmd,pd->pm", basis, w), basis)
        b_dev = w.norm(dim=-1)
        a_j, b = torch.stack([a_j, b_dev.to(f64)]).cpu()
        alpha[active, j] = a_j
        scale = alpha[active, : j + 1].abs().amax(-1).clamp_min(1e-300)
        broke = b <= breakdown * scale
        if broke.any():
            # Invariant subspace found: continue from a fresh direction orthogonal to it,
            # with a zero off-diagonal, so eigenvalues outside it are not missed.
            fresh = _random_rows(int(broke.sum()), d, dtype, device, generator)
            Qb = basis[broke]
            for _ in range(2):
                fresh = fresh - torch.einsum(
                    "pm,pmd->pd", torch.einsum("pmd,pd->pm", Qb, fresh), Qb
                )
            w[broke] = fresh
            b = torch.where(broke, torch.zeros_like(b), b)
            b_dev = torch.where(broke.to(device), w.norm(dim=-1), b_dev)
        Q[active, j + 1] = w / b_dev[:, None].clamp_min(1e-300)
        beta[active, j] = b
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
                coef = Sk[done].to(device=device, dtype=dtype)
                vecs = torch.einsum("pmk,pmd->pkd", coef, Q[rows, :j])
                vecs = vecs / vecs.norm(dim=-1, keepdim=True).clamp_min(1e-300)
                values[rows], vectors[rows] = theta[done], _fix_sign(vecs)
                residuals[rows], iterations[rows] = resid[done], j
                ritz_values[rows, :j] = ritz[done]
                Q[rows, j] = 0.0  # the next direction was never used: the basis is Q[:, :j]
                active = active[~done]
                if retire is not None and len(active):
                    retire((~done).to(device))
    m = int(iterations.max())
    return LanczosRun(
        values.to(device),
        vectors,
        residuals.to(device),
        Q[:, :m],
        alpha.sum(-1).to(device),
        ritz_values[:, :m].to(device),
        iterations.to(device),
    )


def _grown(Q: Tensor, columns: int) -> Tensor:
    grown = Q.new_zeros(Q.shape[0], columns, Q.shape[2])
    grown[:, : Q.shape[1]] = Q
    return grown


def _random_rows(n: int, d: int, dtype, device, generator) -> Tensor:
    """Random rows drawn on the CPU (a generator is the CPU's), then moved to the device."""
    return torch.randn(n, d, dtype=dtype, generator=generator).to(device)


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
