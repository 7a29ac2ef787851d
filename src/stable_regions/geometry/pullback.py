"""Curvature inside the network: the softmax Fisher pulled back through the rest of the model.

With ``f`` the map from an activation to the logits and ``J`` its Jacobian at the origin,

    KL(p || p_t) = t^2/2 * v^T G v + O(t^3),    G = J^T (diag(p) - p p^T) J

(the KL's Hessian at t = 0 is exactly this Gauss-Newton form: its gradient vanishes there,
so the network's own curvature does not enter at second order).

Matrix-free: ``G v = J^T (p * a - p (p . a))`` with ``a = J v``: one forward-mode product and
one reverse-mode product through the network. ``v^T G v = Var_p(J v)`` needs only the first.
This module only sees the two products as callables: no model code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .lanczos import lanczos_topk


class PullbackOperator:
    """``G`` at one position, from ``jvp: (k, d) -> (k, V)``, ``vjp: (V,) -> (d,)`` and ``p`` (V,)."""

    def __init__(
        self, jvp: Callable[[Tensor], Tensor], vjp: Callable[[Tensor], Tensor], p: Tensor, d: int
    ) -> None:
        self.jvp = jvp
        self.vjp = vjp
        self.p = p
        self.d = d

    def matvec(self, v: Tensor) -> Tensor:
        """``G v`` for v of shape (d,)."""
        a = self.jvp(v[None])[0]
        return self.vjp(self.p * (a - (self.p * a).sum()))

    def quadratic_form(self, v: Tensor) -> Tensor:
        """``v^T G v`` for directions (k, d) -> (k,), as ``Var_p(J v)``."""
        a = self.jvp(v)
        mean = (self.p * a).sum(-1, keepdim=True)
        return (self.p * (a - mean) ** 2).sum(-1)

    def diagonal(self, chunk: int = 64) -> Tensor:
        """Exact ``diag G`` (d,): ``e_i^T G e_i`` by d forward-mode products, ``chunk`` at a time."""
        eye = torch.eye(self.d, dtype=self.p.dtype, device=self.p.device)
        return torch.cat([self.quadratic_form(eye[s : s + chunk]) for s in range(0, self.d, chunk)])

    def trace(self, chunk: int = 64) -> Tensor:
        """Exact ``tr G``: the sum of ``diagonal``."""
        return self.diagonal(chunk).sum()

    def trace_estimate(self, basis: Tensor, probes: int = 32, seed: int = 0) -> Tensor:
        """Unbiased estimate of ``tr G`` for one batched forward-mode pass instead of d products.

        With an orthonormal ``basis`` U (k, d) (e.g. the top eigenvectors) and ``P = I - U^T U``:
        ``tr G = sum_i u_i^T G u_i + tr(P G P)``, the first part exact, the second by Hutchinson
        with Rademacher probes ``z``: ``E[(P z)^T G (P z)] = tr(P G P)``. Deflating the top of
        the spectrum leaves a small remainder, so the estimate's variance is small where the
        curvature is concentrated (Hutch++, Meyer et al. 2021, with a Krylov basis).
        """
        g = torch.Generator(device=self.p.device).manual_seed(seed)
        z = torch.randint(0, 2, (probes, self.d), generator=g, device=self.p.device)
        z = (2 * z - 1).to(self.p.dtype)
        z = z - (z @ basis.T) @ basis
        q = self.quadratic_form(torch.cat([basis, z]))
        k = basis.shape[0]
        return q[:k].sum() + q[k:].mean()

    def dense(self, chunk: int = 64) -> Tensor:
        """Dense ``G`` (d, d) from the Jacobian columns; O(V d^2), for tests and small models."""
        eye = torch.eye(self.d, dtype=self.p.dtype, device=self.p.device)
        J = torch.cat([self.jvp(eye[s : s + chunk]) for s in range(0, self.d, chunk)]).T  # (V, d)
        sq = self.p.sqrt()
        M = sq[:, None] * J - sq[:, None] * (self.p @ J)[None, :]
        return M.T @ M

    def start_vector(self) -> Tensor:
        """``J^T (e_top - p)``: the direction that most raises the top token, a good Lanczos start."""
        e = torch.zeros_like(self.p)
        e[self.p.argmax()] = 1.0
        return self.vjp(e - self.p)

    def top_eigenpairs(
        self, k: int = 1, *, tol: float = 1e-10, max_iter: int | None = None, seed: int = 0
    ):
        """Largest ``k`` eigenpairs ``(values (k,), vectors (k, d))`` by Lanczos on ``G v``."""
        g = torch.Generator(device=self.p.device).manual_seed(seed)
        v0 = self.start_vector()
        noise = torch.randn(v0.shape, dtype=v0.dtype, device=v0.device, generator=g)
        v0 = v0 + 1e-3 * v0.norm() * noise / self.d**0.5
        evals, evecs, _ = lanczos_topk(
            lambda x: self.matvec(x[0])[None], v0[None], k, tol=tol, max_iter=max_iter, generator=g
        )
        return evals[0].clamp_min(0.0), evecs[0]
