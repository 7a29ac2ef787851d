"""The map from the pre-logit vector to the logits, as plain tensors.

    u(h) = scale * (W h + b)              raw logits, linear in h
    z(h) = c * tanh(u(h) / c)             final logit softcap (Gemma-2 style), if any

Along a ray ``h + t v`` the raw logits move linearly, ``u(t) = u0 + t * scale * W v``,
so every quantity along a ray costs one O(V d) product and then O(V) per step.
With a softcap the logits are no longer linear in ``t``: the derivatives below carry
the real nonlinearity instead of assuming the CGF form.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from ..budget import chunk_bytes


@dataclass(frozen=True)
class LogitHead:
    """Unembedding ``W`` (V x d), optional bias (V), logit scale, optional softcap."""

    weight: Tensor
    bias: Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    @property
    def d_model(self) -> int:
        return self.weight.shape[1]

    @cached_property
    def row_norms2(self) -> Tensor:
        """``scale^2 ||W_i||^2`` per vocabulary row (cached: an O(V d) pass)."""
        # vector_norm avoids a V x d temporary (1.3 GB in float64 for a 262k vocabulary)
        return torch.linalg.vector_norm(self.weight, dim=-1) ** 2 * self.scale**2

    @property
    def is_linear(self) -> bool:
        return self.softcap is None

    def to(self, dtype: torch.dtype) -> LogitHead:
        bias = None if self.bias is None else self.bias.to(dtype)
        return LogitHead(self.weight.to(dtype), bias, self.scale, self.softcap)

    def raw(self, h: Tensor) -> Tensor:
        """``scale * (W h + b)`` for ``h`` of shape (..., d): the product in the weight's dtype
        (the model's own arithmetic), returned in ``h``'s dtype."""
        u = h.to(self.weight.dtype) @ self.weight.T
        if self.bias is not None:
            u = u + self.bias
        u = u.to(h.dtype)
        return u * self.scale if self.scale != 1.0 else u

    def raw_float64(self, h: Tensor, chunk: int | None = None, *, bias: bool = True) -> Tensor:
        """``raw(h)`` computed in float64 (R, V), the weight upcast a vocabulary chunk of
        ``chunk`` bytes at a time (``budget.chunk_bytes``: ~8 MB on a CPU, so it stays in
        cache): exact products without a float64 copy of W. For measurements that must not
        carry the weight dtype's roundoff."""
        f64 = torch.float64
        h = h.to(f64)
        if self.weight.dtype == f64:
            u = h @ self.weight.T
        else:
            V, d = self.weight.shape
            step = max(1, (chunk or chunk_bytes(self.weight.device)) // (8 * d))
            u = torch.empty(*h.shape[:-1], V, dtype=f64, device=h.device)
            for s in range(0, V, step):
                u[..., s : s + step] = h @ self.weight[s : s + step].to(f64).T
        if bias and self.bias is not None:
            u = u + self.bias.to(f64)
        return u * self.scale if self.scale != 1.0 else u

    def transpose_wide(self, r: Tensor, chunk: int | None = None) -> Tensor:
        """``scale * W^T r`` for ``r`` (R, V) -> (R, d), in the weight's dtype or float32,
        whichever is wider: a 16-bit W is upcast a vocabulary chunk at a time (~8 MB each),
        never as a whole copy."""
        wide = torch.promote_types(self.weight.dtype, torch.float32)
        V, d = self.weight.shape
        if self.weight.dtype == wide:
            out = r.to(wide) @ self.weight
        else:
            budget = chunk or chunk_bytes(self.weight.device)
            step = max(1, budget // (torch.finfo(wide).bits // 8 * d))
            out = torch.zeros(r.shape[0], d, dtype=wide, device=r.device)
            for s in range(0, V, step):
                out += r[:, s : s + step].to(wide) @ self.weight[s : s + step].to(wide)
        return out * self.scale if self.scale != 1.0 else out

    def direction_float64(self, v: Tensor) -> Tensor:
        """``direction(v)`` in float64 throughout (see ``raw_float64``)."""
        return self.raw_float64(v, bias=False)

    def logits_float64(self, h: Tensor) -> Tensor:
        """``logits(h)`` in float64 throughout (see ``raw_float64``)."""
        return self.squash(self.raw_float64(h))

    def squash(self, u: Tensor) -> Tensor:
        """Apply the softcap (identity for a linear head)."""
        if self.softcap is None:
            return u
        return self.softcap * torch.tanh(u / self.softcap)

    def logits(self, h: Tensor) -> Tensor:
        return self.squash(self.raw(h))

    def direction(self, v: Tensor) -> Tensor:
        """``d u / d t`` along ``h + t v``: ``scale * W v`` for ``v`` of shape (..., d), the
        product in the weight's dtype, returned in ``v``'s."""
        b = (v.to(self.weight.dtype) @ self.weight.T).to(v.dtype)
        return b * self.scale if self.scale != 1.0 else b

    def squash_derivatives(self, u: Tensor, order: int) -> list[Tensor]:
        """Derivatives ``g^(k)(u)``, k = 1..order, of the softcap ``g(u) = c tanh(u/c)``."""
        if self.softcap is None:
            ones = torch.ones_like(u)
            return [ones] + [torch.zeros_like(u)] * (order - 1)
        c = self.softcap
        th = torch.tanh(u / c)
        sech2 = 1.0 - th * th
        out = [sech2, -(2.0 / c) * sech2 * th, -(2.0 / c**2) * sech2 * (1.0 - 3.0 * th * th)]
        return out[:order]

    def logit_derivatives(self, u0: Tensor, b: Tensor, order: int = 3) -> list[Tensor]:
        """``d^k z / d t^k`` at ``t = 0`` along the ray whose raw logits are ``u0 + t b``.

        ``u0`` has shape (..., V) and ``b`` shape (..., V) (or broadcastable).
        Returns ``[a1, a2, ..., a_order]`` with ``a_k = g^(k)(u0) * b**k``.
        """
        g = self.squash_derivatives(u0, order)
        return [g[k] * b ** (k + 1) for k in range(order)]

    def jacobian_row_scale(self, u0: Tensor) -> Tensor | None:
        """Per-logit factor ``D`` with ``dz/dh = D * scale * W``; None when ``D = 1``."""
        if self.softcap is None:
            return None
        return self.squash_derivatives(u0, 1)[0]
