"""Curvature inside the network: the softmax Fisher pulled back through the rest of the model.

With ``f`` the map from an activation to the logits and ``J`` its Jacobian at the origin,

    KL(p || p_t) = t^2/2 * v^T G v + O(t^3),    G = J^T (diag(p) - p p^T) J

(the KL's Hessian at t = 0 is exactly this Gauss-Newton form: its gradient vanishes there,
so the network's own curvature does not enter at second order).

Matrix-free: ``G v = J^T (p * a - p (p . a))`` with ``a = J v``: one forward-mode product and
one reverse-mode product through the network. ``v^T G v = Var_p(J v)`` needs only the first.
Batched over P positions like ``FisherOperator``: row i through the operator of position i,
so the products of all positions are one pass through the network.
This module only sees the two products as callables: no model code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .lanczos import LanczosRun, lanczos

# Logit-tangent elements (P x chunk x V) per forward-mode pass of quadratic_form: ~128 MB in float64.
ELEMENTS_PER_CHUNK = 1 << 23


class PullbackOperator:
    """``G`` at P positions.

    ``jvp``: directions (P, k, d) -> logit tangents (P, k, V); ``vjp``: (P, V) -> (P, d);
    ``p``: (P, V) next-token probabilities at the origin.
    """

    def __init__(
        self, jvp: Callable[[Tensor], Tensor], vjp: Callable[[Tensor], Tensor], p: Tensor, d: int
    ) -> None:
        self.jvp = jvp
        self.vjp = vjp
        self.p = p
        self.d = d

    @classmethod
    def from_suffix(cls, suffix) -> PullbackOperator:
        """From anything with ``jvp``, ``vjp_fn()``, ``logits0`` (P, V) and ``dim``
        (``models.suffix.SuffixBatch``)."""
        return cls(suffix.jvp, suffix.vjp_fn(), torch.softmax(suffix.logits0, -1), suffix.dim)

    @property
    def batch(self) -> int:
        return self.p.shape[0]

    def _eye(self, start: int, stop: int) -> Tensor:
        """Unit vectors e_start..e_stop-1 for every position: (P, stop - start, d)."""
        eye = torch.eye(self.d, dtype=self.p.dtype, device=self.p.device)[start:stop]
        return eye.expand(self.batch, -1, -1)

    def matvec(self, v: Tensor) -> Tensor:
        """``G v`` for v of shape (P, d)."""
        a = self.jvp(v[:, None])[:, 0]
        return self.vjp(self.p * (a - (self.p * a).sum(-1, keepdim=True)))

    def quadratic_form(self, v: Tensor) -> Tensor:
        """``v^T G v`` for directions (P, k, d) -> (P, k), as ``Var_p(J v)``.

        The directions go through in chunks, so that the (P, chunk, V) logit tangents stay
        near ``ELEMENTS_PER_CHUNK`` (never P x k x V at once), and the variance is taken in
        place: ``b = a - a_top`` (the top token's tangent, so that ``sum p b^2`` does not
        cancel against the squared mean at a confident position), then
        ``sum p b^2 - (sum p b)^2``, the sums as batched products with p."""
        P, k, _ = v.shape
        chunk = max(1, ELEMENTS_PER_CHUNK // (P * self.p.shape[-1]))
        p = self.p[:, :, None]  # (P, V, 1)
        top = self.p.argmax(-1)[:, None, None]
        out = []
        for s in range(0, k, chunk):
            a = self.jvp(v[:, s : s + chunk])  # (P, c, V), float64
            a.sub_(a.gather(2, top.expand(-1, a.shape[1], 1)))
            mean = torch.bmm(a, p)[..., 0]
            out.append(torch.bmm(a.mul_(a), p)[..., 0] - mean**2)
            del a
        return torch.cat(out, dim=1)

    def diagonal(self, chunk: int = 64) -> Tensor:
        """Exact ``diag G`` (P, d): ``e_i^T G e_i`` by d forward-mode products, ``chunk`` at a time."""
        return torch.cat(
            [self.quadratic_form(self._eye(s, s + chunk)) for s in range(0, self.d, chunk)], -1
        )

    def trace(self, chunk: int = 64) -> Tensor:
        """Exact ``tr G`` (P,): the sum of ``diagonal``."""
        return self.diagonal(chunk).sum(-1)

    def trace_estimate(
        self,
        basis: Tensor,
        probes: int = 32,
        seed: int = 0,
        basis_trace: Tensor | None = None,
    ) -> Tensor:
        """Unbiased estimate of ``tr G`` (P,) for one batched forward-mode pass instead of d products.

        With an orthonormal ``basis`` U (P, k, d) (e.g. the top eigenvectors, or the Krylov
        basis of a Lanczos run) and ``P_U = I - U^T U``: ``tr G = tr(U G U^T) + tr(P_U G P_U)``,
        the first part exact (``basis_trace`` when already known, as for a Krylov basis),
        the second by Hutchinson with Rademacher probes ``z``: ``E[(P_U z)^T G (P_U z)] =
        tr(P_U G P_U)``. Deflating the top of the spectrum leaves a small remainder, so the
        estimate's variance is small where the curvature is concentrated (Hutch++, Meyer et
        al. 2021, with a Krylov basis).
        """
        g = torch.Generator(device=self.p.device).manual_seed(seed)
        z = torch.randint(0, 2, (probes, self.d), generator=g, device=self.p.device)
        z = (2 * z - 1).to(self.p.dtype).expand(self.batch, -1, -1)
        z = z - torch.einsum("pzd,pkd->pzk", z, basis) @ basis
        if basis_trace is not None:
            return basis_trace + self.quadratic_form(z).mean(-1)
        q = self.quadratic_form(torch.cat([basis, z], dim=1))
        k = basis.shape[1]
        return q[:, :k].sum(-1) + q[:, k:].mean(-1)

    def dense(self) -> Tensor:
        """Dense ``G`` (P, d, d), column by column from d products; for tests and small models."""
        return torch.stack([self.matvec(self._eye(j, j + 1)[:, 0]) for j in range(self.d)], -1)

    def start_vector(self) -> Tensor:
        """``J^T (e_top - p)`` (P, d): the direction that most raises the top token, a good
        Lanczos start."""
        e = torch.zeros_like(self.p)
        e.scatter_(1, self.p.argmax(-1, keepdim=True), 1.0)
        return self.vjp(e - self.p)

    def _lanczos(self, k: int, tol: float, max_iter: int | None, seed: int) -> LanczosRun:
        g = torch.Generator(device=self.p.device).manual_seed(seed)
        v0 = self.start_vector()
        noise = torch.randn(v0.shape, dtype=v0.dtype, device=v0.device, generator=g)
        v0 = v0 + 1e-3 * v0.norm(dim=-1, keepdim=True) * noise / self.d**0.5
        return lanczos(self.matvec, v0, k, tol=tol, max_iter=max_iter, generator=g)

    def top_eigenpairs(
        self, k: int = 1, *, tol: float = 1e-10, max_iter: int | None = None, seed: int = 0
    ) -> tuple[Tensor, Tensor]:
        """Largest ``k`` eigenpairs ``(values (P, k), vectors (P, k, d))`` by lockstep Lanczos."""
        run = self._lanczos(k, tol, max_iter, seed)
        return run.values.clamp_min(0.0), run.vectors

    def top_eigenpairs_and_trace(
        self, k: int = 1, *, tol: float = 1e-10, probes: int = 8, seed: int = 0
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Top ``k`` eigenpairs and an unbiased estimate of ``tr G`` (P,): the Krylov space
        Lanczos built on the way deflates the estimate (its trace is free), ``probes``
        Hutchinson probes measure the rest."""
        run = self._lanczos(k, tol, None, seed)
        trace = self.trace_estimate(run.basis, probes, seed, basis_trace=run.basis_trace)
        return run.values.clamp_min(0.0), run.vectors, trace
