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
    ``p``: (P, V) next-token probabilities at the origin. ``jvp_replayed`` (optional):
    directions (P, d) -> (P, V) or (P, k, d) -> (P, k, V) by replaying a recorded pass (see
    ``SuffixBatch.linearization``): cheaper than ``jvp``, which recomputes the pass, except
    for many directions at few positions. ``replayed_dtype``: the dtype of its (P, k, V)
    tangents (the recorded pass's own; float64 by default).
    """

    # Below this many positions many directions go through ``jvp`` (forward mode, the
    # directions as rows of one pass): replaying them costs per direction what the
    # prompt's cached keys cost, not what the rows cost (SmolLM2, one position, 64
    # directions: 0.42 s forward mode against 0.50 s replayed from the embedding, 0.30 s
    # against 0.27 s from block 15).
    replay_min_positions = 16

    def __init__(
        self,
        jvp: Callable[[Tensor], Tensor],
        vjp: Callable[[Tensor], Tensor],
        p: Tensor,
        d: int,
        jvp_replayed: Callable[[Tensor], Tensor] | None = None,
        replayed_dtype: torch.dtype = torch.float64,
    ) -> None:
        self._jvp = jvp
        self._vjp = vjp
        self._jvp_replayed = jvp_replayed
        self._replayed_dtype = replayed_dtype
        self.p = p
        self.d = d

    @classmethod
    def from_suffix(cls, suffix) -> PullbackOperator:
        """From anything with ``jvp``, ``linearization()``, ``logits0`` (P, V) and ``dim``
        (``models.suffix.SuffixBatch``)."""
        jvp_replayed, vjp = suffix.linearization()
        p = torch.softmax(suffix.logits0, -1)
        return cls(suffix.jvp, vjp, p, suffix.dim, jvp_replayed, suffix.dtype)

    def _replays(self, k: int) -> bool:
        """Whether k directions per position go through the replayed pass."""
        return self._jvp_replayed is not None and (
            k <= 2 or self.batch >= self.replay_min_positions
        )

    def jvp(self, v: Tensor) -> Tensor:
        return self._jvp_replayed(v) if self._replays(v.shape[1]) else self._jvp(v)

    def tangent_dtype(self) -> torch.dtype:
        """Many directions per position come from the replayed pass from
        ``replay_min_positions`` on, in its dtype; from forward mode in float64 below."""
        return self._replayed_dtype if self._replays(k=3) else self.p.dtype

    def vjp(self, u: Tensor) -> Tensor:
        return self._vjp(u)
