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
    values of the last check, descending (e.g. a gap estimate beyond the ``k`` wanted)."""

    values: Tensor
    vectors: Tensor
    residuals: Tensor
    basis: Tensor
    basis_trace: Tensor
    ritz_values: Tensor


def lanczos(
    matvec: MatVec,
    v0: Tensor,
    k: int = 1,
    *,
    tol: float = 1e-12,
    max_iter: int | None = None,
    check_every: int = 4,
    generator: torch.Generator | None = None,
) -> LanczosRun:
    """Largest ``k`` eigenpairs of ``P`` symmetric operators, and the Krylov basis.

    Args:
        matvec: maps (P, d) to (P, d), row ``i`` through operator ``i``.
        v0: (P, d) start vectors (need not be normalized; zero rows get a random start).
        k: eigenpairs wanted per operator.
        tol: stop when every wanted Ritz pair has residual ``||A y - theta y||``
            below ``tol * theta_max`` (absolute floor 1e-300).
        max_iter: Krylov dimension cap (default ``d``, where Lanczos is exact).

    Returns:
        eigenvalues (P, k) descending, eigenvectors (P, k, d), residuals (P, k), the
        Krylov basis and its trace (``LanczosRun``). Eigenvector signs are fixed so that
        the largest-magnitude entry is positive.
    """
    P, d = v0.shape
    k = min(k, d)
    dtype, device = v0.dtype, v0.device
    m_cap = d if max_iter is None else min(max(max_iter, k), d)
    Q = torch.zeros(P, m_cap + 1, d, dtype=dtype, device=device)
    alpha = torch.zeros(P, m_cap, dtype=dtype, device=device)
    beta = torch.zeros(P, m_cap, dtype=dtype, device=device)

    q = v0.clone()
    norms = q.norm(dim=-1, keepdim=True)
    dead = norms.squeeze(-1) <= 1e-300
    if dead.any():
        q[dead] = torch.randn(int(dead.sum()), d, dtype=dtype, device=device, generator=generator)
        norms = q.norm(dim=-1, keepdim=True)
    Q[:, 0] = q / norms

    j = 0
    while j < m_cap:
        qj = Q[:, j]
        w = matvec(qj)
        a = (w * qj).sum(-1)
        alpha[:, j] = a
        # Two passes of classical Gram-Schmidt against all previous vectors.
        for _ in range(2):
            coeff = torch.einsum("pmd,pd->pm", Q[:, : j + 1], w)
            w = w - torch.einsum("pm,pmd->pd", coeff, Q[:, : j + 1])
        b = w.norm(dim=-1)
        scale = alpha[:, : j + 1].abs().amax(-1).clamp_min(1e-300)
        broke = b <= 1e-13 * scale
        if broke.any():
            # Invariant subspace found: continue from a fresh direction orthogonal to it,
            # with a zero off-diagonal, so eigenvalues outside it are not missed.
            fresh = torch.randn(
                int(broke.sum()), d, dtype=dtype, device=device, generator=generator
            )
            Qb = Q[broke, : j + 1]
            for _ in range(2):
                fresh = fresh - torch.einsum(
                    "pm,pmd->pd", torch.einsum("pmd,pd->pm", Qb, fresh), Qb
                )
            w[broke] = fresh
            b = torch.where(broke, torch.zeros_like(b), b)
            wn = w.norm(dim=-1, keepdim=True).clamp_min(1e-300)
            Q[:, j + 1] = torch.where(broke[:, None], w / wn, w / b.clamp_min(1e-300)[:, None])
        else:
            Q[:, j + 1] = w / b[:, None]
        beta[:, j] = b
        j += 1
        if j >= k and (j % check_every == 0 or j == m_cap):
            ritz, S = _tridiagonal_eigh(alpha[:, :j], beta[:, : j - 1])
            theta, S = ritz[:, :k], S[:, :, :k]
            resid = (beta[:, j - 1, None] * S[:, -1, :]).abs()
            floor = (tol * theta[:, :1].abs()).clamp_min(1e-300)
            done = bool((resid <= floor).all())
            if done:
                break
    vecs = torch.einsum("pmk,pmd->pkd", S, Q[:, :j])
    vecs = vecs / vecs.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    vecs = _fix_sign(vecs)
    return LanczosRun(theta, vecs, resid, Q[:, :j], alpha[:, :j].sum(-1), ritz)


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
