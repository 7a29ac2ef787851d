"""The curvature of the next-token KL, as one Gauss-Newton operator over any Jacobian.

With ``z`` the logits as a function of a perturbation ``x`` of some activation and ``J`` its
Jacobian at ``x = 0``,

    KL(p || softmax(z(x))) = 1/2 x^T G x + O(|x|^3),     G = J^T F J,   F = diag(p) - p p^T

(the KL's gradient vanishes at ``x = 0``, so the second derivative of ``z`` does not enter).
At the pre-logit vector ``J`` is the head (``FisherOperator``, ``H = W^T F W``); inside the
network it is the rest of the model (``PullbackOperator``). Both are this class with their own
``jvp`` and ``vjp``; everything else is shared:

    G v = J^T (p * (a - p . a)),     v^T G v = Var_p(a),     a = J v

Batched over P positions: row i of every argument goes through the operator of position i,
so the products of all positions are one pass (through the head, or through the network).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._support.matvec import matvecs
from ..budget import equal_parts, rows_within
from .lanczos import LanczosRun, lanczos


class CurvatureOperator:
    """``G = J^T F J`` at P positions. Subclasses give ``jvp`` (directions (P, k, d) -> logit
    tangents (P, k, V)) and ``vjp`` ((P, V) -> (P, d)); ``p`` (P, V) are the probabilities at
    the origin and ``d`` the width of the perturbed activation."""

    p: Tensor
    d: int
    default_tol = 1e-10  # Lanczos residual, relative to the top eigenvalue

    def jvp(self, v: Tensor) -> Tensor:
        raise NotImplementedError

    def vjp(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    @property
    def batch(self) -> int:
        return self.p.shape[0]

    def _eye(self, start: int, stop: int) -> Tensor:
        """Unit vectors e_start..e_stop-1 for every position: (P, stop - start, d)."""
        eye = torch.eye(self.d, dtype=self.p.dtype, device=self.p.device)[start:stop]
        return eye.expand(self.batch, -1, -1)

    def matvec(self, v: Tensor) -> Tensor:
        """``G v`` for v of shape (P, d) (or (d,) when P = 1)."""
        squeeze = v.ndim == 1
        v = v.reshape(self.batch, self.d)
        a = self.jvp(v[:, None])[:, 0].to(self.p.dtype)
        out = self.vjp(self.p * (a - (self.p * a).sum(-1, keepdim=True)))
        return out[0] if squeeze else out

    def tangent_dtype(self) -> torch.dtype:
        """The dtype of ``jvp``'s (P, k, V) tangents for several directions per position."""
        return self.p.dtype

    def quadratic_form(self, v: Tensor) -> Tensor:
        """``v^T G v`` for directions (P, k, d) -> (P, k) float64, as ``Var_p(J v)``, centred.

        The directions go through in equal chunks, so that the (P, chunk, V) logit tangents
        stay within the shared array budget (never P x k x V at once), and the variance is
        taken in place about the mean, ``sum p (a - mean)^2``: the uncentred
        ``E[a^2] - E[a]^2`` cancels at confident positions. It is taken in the tangents' own
        dtype (``tangent_dtype``: float32 where a float32 pass was replayed, whose tangents
        carry float32 roundoff anyway): half the bytes, so twice the directions per replay
        (SmolLM2, 16 probes at 64 positions from the embedding: 2.0 s in chunks of 4 against
        2.6 s in float64 chunks of 2; the forms agree to 1.5e-6)."""
        P, k, _ = v.shape
        itemsize = torch.finfo(self.tangent_dtype()).bits // 8
        chunk = rows_within(P * self.p.shape[-1], itemsize)
        chunk = equal_parts(k, chunk)  # equal chunks: 16 at a cap of 5 are 4 x 4
        out = []
        p = self.p  # (P, V), cast once to the tangents' dtype
        for s in range(0, k, chunk):
            a = self.jvp(v[:, s : s + chunk])  # (P, c, V)
            if p.dtype != a.dtype:
                p = p.to(a.dtype)
            a.sub_(matvecs(a, p)[..., None])  # centred at each direction's mean
            out.append(matvecs(a.mul_(a), p).to(torch.float64))
            del a
        return torch.cat(out, dim=1)

    def diagonal(self, chunk: int = 64) -> Tensor:
        """Exact ``diag G`` (P, d): ``e_i^T G e_i`` by d products, ``chunk`` directions at a time."""
        return torch.cat(
            [self.quadratic_form(self._eye(s, s + chunk)) for s in range(0, self.d, chunk)], -1
        )

    def trace(self) -> Tensor:
        """Exact ``tr G`` (P,): the sum of ``diagonal``."""
        return self.diagonal().sum(-1)

    def trace_estimate(
        self,
        basis: Tensor,
        probes: int = 32,
        seed: int = 0,
        basis_trace: Tensor | None = None,
    ) -> Tensor:
        """Unbiased estimate of ``tr G`` (P,) for one batched pass instead of d products.

        With an orthonormal ``basis`` U (P, k, d) (e.g. the top eigenvectors, or the Krylov
        basis of a Lanczos run) and ``P_U = I - U^T U``: ``tr G = tr(U G U^T) + tr(P_U G P_U)``,
        the first part exact (``basis_trace`` when already known, as for a Krylov basis),
        the second by Hutchinson with Rademacher probes ``z``: ``E[(P_U z)^T G (P_U z)] =
        tr(P_U G P_U)``. Deflating the top of the spectrum leaves a small remainder, so the
        estimate's variance is small where the curvature is concentrated (Hutch++, Meyer et
        al. 2021, with a Krylov basis).
        """
        g = torch.Generator().manual_seed(seed)  # on the CPU: the same probes on every device
        z = torch.randint(0, 2, (probes, self.d), generator=g)
        z = (2 * z - 1).to(device=self.p.device, dtype=self.p.dtype).expand(self.batch, -1, -1)
        z = z - torch.einsum("pzd,pkd->pzk", z, basis) @ basis
        if basis_trace is not None:
            return basis_trace + self.quadratic_form(z).mean(-1)
        q = self.quadratic_form(torch.cat([basis, z], dim=1))
        k = basis.shape[1]
        return q[:, :k].sum(-1) + q[:, k:].mean(-1)

    def dense(self) -> Tensor:
        """Dense ``G`` (P, d, d), column by column from d products; for tests and small d."""
        return torch.stack([self.matvec(self._eye(j, j + 1)[:, 0]) for j in range(self.d)], -1)

    def start_vector(self) -> Tensor:
        """``J^T (e_top - p)`` (P, d): the direction that most raises the top token, a good
        Lanczos start."""
        e = torch.zeros_like(self.p)
        e.scatter_(1, self.p.argmax(-1, keepdim=True), 1.0)
        return self.vjp(e - self.p)

    def subset(self, keep: Tensor) -> CurvatureOperator:
        """The operators of the positions where ``keep`` (P,) is True, in order. Subclasses
        whose products cost per position give one; it lets each position's Lanczos stop as
        soon as it has converged (``lanczos(independent=True)``)."""
        raise NotImplementedError

    def lanczos(
        self,
        k: int = 1,
        *,
        tol: float | None = None,
        max_iter: int | None = None,
        seed: int = 0,
        independent: bool = False,
    ) -> LanczosRun:
        """Lanczos on the P operators from ``start_vector`` (slightly perturbed, so that a
        start orthogonal to the top eigenvector still finds it). In lockstep (every position
        runs until all have converged) unless ``independent``: then each stops as soon as it
        has, and the products see only the positions still running (``subset``)."""
        g = torch.Generator().manual_seed(seed)  # on the CPU: the same start on every device
        v0 = self.start_vector().to(self.p.dtype)
        noise = torch.randn(v0.shape, dtype=v0.dtype, generator=g).to(v0.device)
        v0 = v0 + 1e-3 * v0.norm(dim=-1, keepdim=True) * noise / self.d**0.5
        tol = self.default_tol if tol is None else tol
        # a convergence check (a small tridiagonal eigh) after every product: the products
        # cost far more, and each one saved inside the network is a pass through it
        if not independent:
            return lanczos(
                self.matvec, v0, k, tol=tol, max_iter=max_iter, check_every=1, generator=g
            )
        running = [self]

        def retire(keep: Tensor) -> None:
            running[0] = running[0].subset(keep)

        return lanczos(
            lambda v: running[0].matvec(v),
            v0,
            k,
            tol=tol,
            max_iter=max_iter,
            check_every=1,
            generator=g,
            retire=retire,
        )

    def top_eigenpairs(
        self, k: int = 1, *, tol: float | None = None, max_iter: int | None = None, seed: int = 0
    ) -> tuple[Tensor, Tensor]:
        """Largest ``k`` eigenpairs ``(values (P, k), vectors (P, k, d))``."""
        run = self.lanczos(k, tol=tol, max_iter=max_iter, seed=seed)
        return run.values.clamp_min(0.0), run.vectors

    def top_eigenpairs_and_trace(
        self, k: int = 1, *, tol: float | None = None, probes: int = 8, seed: int = 0
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Top ``k`` eigenpairs and an unbiased estimate of ``tr G`` (P,): the Krylov space
        Lanczos built on the way deflates the estimate (its trace is free), ``probes``
        Hutchinson probes measure the rest."""
        run = self.lanczos(k, tol=tol, seed=seed)
        trace = self.trace_estimate(run.basis, probes, seed, basis_trace=run.basis_trace)
        return run.values.clamp_min(0.0), run.vectors, trace


def effective_rank(trace: Tensor, lambda_max: Tensor) -> Tensor:
    """``tr G / lambda_max``: how many directions carry the curvature (1 = one direction).

    This is the intrinsic dimension of a PSD matrix; it lies in [1, rank G], and is 0 where G = 0.
    """
    return torch.where(
        lambda_max > 0, trace / lambda_max.clamp_min(1e-300), torch.zeros_like(trace)
    )
