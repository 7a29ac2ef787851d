"""The pre-logit curvature ``H``: softmax Fisher information pulled back through the head.

    H = J^T (diag(p) - p p^T) J,    J = dz/dh = diag(r) * scale * W

``r = 1`` for a linear head and ``r = sech^2(u / c)`` under a softcap. ``H`` is the Hessian
of ``KL(p || softmax(z(h + x)))`` at ``x = 0`` (the KL's gradient vanishes there, so the
head's own curvature does not enter) and of the next-token cross-entropy for any target.

The products are the head's own, two O(V d) matrix products for P positions at once
(``CurvatureOperator`` does the rest). ``H = M^T M`` with
``M = (diag(sqrt p) - sqrt(p) p^T) J`` gives the dense form without a V x V matrix, and
``tr H = sum_i p_i ||J_i||^2 - ||J^T p||^2`` and the diagonal cost O(V d), not d products.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .curvature import CurvatureOperator, effective_rank
from .head import LogitHead

__all__ = ["FisherOperator", "effective_rank"]


class FisherOperator(CurvatureOperator):
    """``H`` at P positions. ``p``: (P, V) probabilities; ``weight``: (V, d), as the model
    stores it (products in its dtype, everything else in ``p``'s: no float64 copy of W)."""

    default_tol = 1e-12

    def __init__(
        self,
        weight: Tensor,
        p: Tensor,
        *,
        scale: float = 1.0,
        row_scale: Tensor | None = None,
        row_norms2: Tensor | None = None,
    ) -> None:
        if p.ndim == 1:
            p = p[None]
            row_scale = None if row_scale is None else row_scale.reshape(1, -1)
        self.weight = weight
        self.p = p
        self.d = weight.shape[1]
        self.scale = scale
        self.row_scale = row_scale  # (P, V) or None
        self._row_norms2 = row_norms2  # scale^2 ||W_i||^2, (V,), computed on demand

    @classmethod
    def from_head(cls, head: LogitHead, h: Tensor) -> FisherOperator:
        """Curvature of ``KL(p || softmax(head(h + x)))`` at ``x = 0`` for h of shape (P, d)."""
        h = h.reshape(-1, head.d_model)
        u0 = head.raw(h)
        p = torch.softmax(head.squash(u0), dim=-1)
        return cls(
            head.weight,
            p,
            scale=head.scale,
            row_scale=head.jacobian_row_scale(u0),
            row_norms2=head.row_norms2,
        )

    def subset(self, keep: Tensor) -> FisherOperator:
        """The operator at the positions where ``keep`` (P,) is True."""
        return FisherOperator(
            self.weight,
            self.p[keep],
            scale=self.scale,
            row_scale=None if self.row_scale is None else self.row_scale[keep],
            row_norms2=self._row_norms2,
        )

    def jvp(self, v: Tensor) -> Tensor:
        """``J v``: (P, d) or (P, k, d) -> (P, V) or (P, k, V)."""
        # one (rows x d) @ (d x V) product: a strided batch of vectors (a Lanczos basis row)
        # would otherwise go through a batched matmul that expands W (7x slower, measured)
        rows = v.reshape(-1, self.d).to(self.weight.dtype)
        a = (rows @ self.weight.T).to(self.p.dtype).reshape(*v.shape[:-1], -1)
        if self.scale != 1.0:
            a = a * self.scale
        if self.row_scale is not None:
            a = a * (self.row_scale if v.ndim == 2 else self.row_scale[:, None])
        return a

    def vjp(self, g: Tensor) -> Tensor:
        """``J^T g``: (P, V) -> (P, d)."""
        if self.row_scale is not None:
            g = g * self.row_scale
        out = (g.to(self.weight.dtype) @ self.weight).to(self.p.dtype)
        return out * self.scale if self.scale != 1.0 else out

    def dense(self) -> Tensor:
        """Dense ``H`` (P, d, d) via ``M^T M``; O(V d^2) per position, for tests and small d."""
        out = []
        for i in range(self.batch):
            J = self.weight.to(self.p.dtype) * self.scale
            if self.row_scale is not None:
                J = J * self.row_scale[i, :, None]
            p = self.p[i]
            sq = p.sqrt()
            M = sq[:, None] * J - sq[:, None] * (p @ J)[None, :]
            out.append(M.T @ M)
        return torch.stack(out)

    def trace(self) -> Tensor:
        """``tr H`` per position, O(V d)."""
        if self._row_norms2 is None:
            self._row_norms2 = torch.linalg.vector_norm(self.weight, dim=-1) ** 2 * self.scale**2
        pr = self.p if self.row_scale is None else self.p * self.row_scale**2
        first = pr @ self._row_norms2.to(pr.dtype)
        mean_row = self.vjp(self.p)  # J^T p
        return first - (mean_row**2).sum(-1)

    def diagonal(self, chunk: int = 8192) -> Tensor:
        """``diag H`` (P, d): ``sum_v p_v J_vj^2 - (sum_v p_v J_vj)^2``, O(V d), W^2 by row chunks."""
        pr = self.p if self.row_scale is None else self.p * self.row_scale**2
        w = self.weight
        first = sum(
            (pr[:, s : s + chunk].to(w.dtype) @ w[s : s + chunk] ** 2).to(pr.dtype)
            for s in range(0, w.shape[0], chunk)
        )
        return first * self.scale**2 - self.vjp(self.p) ** 2
