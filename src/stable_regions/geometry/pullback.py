"""Curvature inside the network: the softmax Fisher pulled back through the rest of the model.

With ``f`` the map from an activation to the logits and ``J`` its Jacobian at the origin,

    KL(p || p_t) = t^2/2 * v^T G v + O(t^3),    G = J^T (diag(p) - p p^T) J

(the KL's Hessian at t = 0 is exactly this Gauss-Newton form: its gradient vanishes there,
so the network's own curvature does not enter at second order).

``J v`` is one forward-mode product and ``J^T u`` one reverse-mode product through the
network; ``CurvatureOperator`` builds everything else from them. Batched over P positions:
row i through the operator of position i, so the products of all positions are one pass
through the network. This module only sees the two products as callables: no model code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .curvature import CurvatureOperator


class PullbackOperator(CurvatureOperator):
    """``G`` at P positions.

    ``jvp``: directions (P, k, d) -> logit tangents (P, k, V); ``vjp``: (P, V) -> (P, d);
    ``p``: (P, V) next-token probabilities at the origin. ``jvp_single`` (optional): one
    direction per position, (P, d) -> (P, V), replaying a recorded pass (see
    ``SuffixBatch.linearization``): cheaper per direction than ``jvp`` except for many
    directions at few positions, where ``jvp`` batches them into one pass.
    """

    # Below this many positions a pass of one direction per position is mostly fixed cost:
    # many directions then go together through ``jvp`` (SmolLM2, block 15: one position, 64
    # directions: 0.24 s batched against 64 x 0.022 s replayed).
    replay_min_positions = 16

    def __init__(
        self,
        jvp: Callable[[Tensor], Tensor],
        vjp: Callable[[Tensor], Tensor],
        p: Tensor,
        d: int,
        jvp_single: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self._jvp = jvp
        self._vjp = vjp
        self._jvp_single = jvp_single
        self.p = p
        self.d = d

    @classmethod
    def from_suffix(cls, suffix) -> PullbackOperator:
        """From anything with ``jvp``, ``linearization()``, ``logits0`` (P, V) and ``dim``
        (``models.suffix.SuffixBatch``)."""
        jvp_single, vjp = suffix.linearization()
        p = torch.softmax(suffix.logits0, -1)
        return cls(suffix.jvp, vjp, p, suffix.dim, jvp_single)

    def jvp(self, v: Tensor) -> Tensor:
        P, k, _ = v.shape
        if self._jvp_single is None or (k > 2 and P < self.replay_min_positions):
            return self._jvp(v)
        return torch.stack([self._jvp_single(v[:, j]) for j in range(k)], dim=1)

    def vjp(self, u: Tensor) -> Tensor:
        return self._vjp(u)
