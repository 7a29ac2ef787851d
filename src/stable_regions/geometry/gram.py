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
    """``J^T J`` of P maps at once (row i of every argument through map i).

    ``jvp``: directions (P, k, d_in) -> (P, k, d_out); ``vjp``: (P, d_out) -> (P, d_in);
    ``jvp_single`` (optional): (P, d_in) -> (P, d_out), one direction per map, where that is
    the cheaper product (``SuffixBatch.linearization``)."""

    def __init__(
        self,
        jvp: Callable[[Tensor], Tensor],
        vjp: Callable[[Tensor], Tensor],
        d: int,
        device: torch.device | str = "cpu",
        jvp_single: Callable[[Tensor], Tensor] | None = None,
        batch: int = 1,
    ) -> None:
        self.jvp = jvp
        self.vjp = vjp
        self.jvp_single = jvp_single or (lambda v: jvp(v[:, None])[:, 0])
        self.d = d
        self.batch = batch
        self.device = torch.device(device)

    def matvec(self, v: Tensor) -> Tensor:
        """``J^T J v`` for v of shape (P, d)."""
        return self.vjp(self.jvp_single(v))

    def dense(self, chunk: int = 64) -> Tensor:
        """Dense ``J^T J`` (P, d, d) from the Jacobians' columns; for tests and small maps."""
        eye = torch.eye(self.d, dtype=torch.float64, device=self.device)
        eye = eye.expand(self.batch, -1, -1)
        J = torch.cat([self.jvp(eye[:, s : s + chunk]) for s in range(0, self.d, chunk)], 1)
        J = J.transpose(1, 2)  # (P, d_out, d)
        return J.transpose(1, 2) @ J

    def top_singular_values(
        self, k: int = 3, *, tol: float = 1e-6, max_iter: int | None = None, seed: int = 0
    ) -> tuple[Tensor, Tensor]:
        """Top ``k`` singular values (P, k) of each ``J`` and their right singular vectors
        (P, k, d); every map starts from the same random vector."""
        g = torch.Generator().manual_seed(seed)  # the same start on every device
        v0 = torch.randn(self.d, dtype=torch.float64, generator=g).to(self.device)
        evals, evecs, _ = lanczos_topk(
            self.matvec,
            v0.expand(self.batch, -1).clone(),
            k,
            tol=tol,
            max_iter=max_iter,
            generator=g,
        )
        return evals.clamp_min(0.0).sqrt(), evecs
