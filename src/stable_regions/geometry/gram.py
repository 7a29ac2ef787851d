"""Singular values of a Jacobian from its products: how much a map amplifies perturbations.

With ``J`` the Jacobian of a map between activations (one block, or everything from a layer
to the pre-logit vector), its top singular values are the square roots of the top
eigenvalues of the Gram operator

    J^T J v = vjp(jvp(v))          one forward-mode and one reverse-mode product

so Lanczos on ``J^T J`` gives ``sigma_1 >= sigma_2 >= ...`` without forming ``J``.
``sigma_1`` is the largest factor by which the map stretches a small perturbation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .lanczos import lanczos_topk


class JacobianGram:
    """``J^T J`` from ``jvp: (k, d_in) -> (k, d_out)`` and ``vjp: (d_out,) -> (d_in,)``."""

    def __init__(
        self,
        jvp: Callable[[Tensor], Tensor],
        vjp: Callable[[Tensor], Tensor],
        d: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.jvp = jvp
        self.vjp = vjp
        self.d = d
        self.device = torch.device(device)

    def matvec(self, v: Tensor) -> Tensor:
        """``J^T J v`` for v of shape (d,)."""
        return self.vjp(self.jvp(v[None])[0])

    def dense(self, chunk: int = 64) -> Tensor:
        """Dense ``J^T J`` (d, d) from the Jacobian's columns; for tests and small maps."""
        eye = torch.eye(self.d, dtype=torch.float64, device=self.device)
        J = torch.cat([self.jvp(eye[s : s + chunk]) for s in range(0, self.d, chunk)]).T
        return J.T @ J

    def top_singular_values(
        self, k: int = 3, *, tol: float = 1e-6, max_iter: int | None = None, seed: int = 0
    ) -> tuple[Tensor, Tensor]:
        """Top ``k`` singular values (k,) of ``J`` and their right singular vectors (k, d)."""
        g = torch.Generator().manual_seed(seed)  # the same start on every device
        v0 = torch.randn(self.d, dtype=torch.float64, generator=g).to(self.device)
        evals, evecs, _ = lanczos_topk(
            lambda x: self.matvec(x[0])[None], v0[None], k, tol=tol, max_iter=max_iter, generator=g
        )
        return evals[0].clamp_min(0.0).sqrt(), evecs[0]
