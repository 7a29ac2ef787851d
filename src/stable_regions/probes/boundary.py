"""The measured ("empirical") boundary along a direction.

The smallest ``t > 0`` with ``KL(p || p_t) >= eps``, where ``p_t`` is what the model
outputs with ``t v`` added at the hook point: geometric bracketing from a small ``t``,
then Brent to a relative tolerance (default 1e-6, required 1e-4). KL in float64 from
log-softmax differences. The nearest exit along a line is the minimum over ``+v, -v``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ..geometry import first_crossing

KLFunction = Callable[[np.ndarray], np.ndarray]


def prelogit_kl(logits_fn: Callable[[Tensor], Tensor], h: Tensor, v: Tensor) -> KLFunction:
    """``t -> KL(p || softmax(logits_fn(h + t v)))`` evaluated for a batch of ``t`` at once.

    ``logits_fn`` is the model's own path from the hook point to the logits (for the
    pre-logit vector: the unembedding, bias and softcap), applied in float64.
    """
    h = h.to(torch.float64)
    v = v.to(torch.float64)
    logp = torch.log_softmax(logits_fn(h[None]), -1)[0]
    p = logp.exp()

    def kl(ts: np.ndarray) -> np.ndarray:
        t = torch.as_tensor(np.asarray(ts, dtype=np.float64))
        logpt = torch.log_softmax(logits_fn(h[None] + t[:, None] * v[None]), -1)
        return (p * (logp - logpt)).sum(-1).numpy()

    return kl


def measure_boundaries(
    kl: KLFunction,
    eps: Sequence[float],
    *,
    t_start: float,
    t_max: float,
    rtol: float = 1e-6,
    guesses: Sequence[float] | None = None,
) -> list[float]:
    """First crossing of each ``eps`` (any order) by the KL function of one signed direction.

    ``guesses`` (predicted radii, one per eps) only speed up the search (see ``first_crossing``).

    The crossings are found in increasing ``eps``, each search starting at the previous root:
    the first time the KL reaches a larger level cannot come before it reaches a smaller one.
    """
    order = np.argsort(eps)
    out = [np.inf] * len(eps)
    start = t_start
    for i in order:
        guess = None if guesses is None else float(guesses[i])
        root = first_crossing(kl, float(eps[i]), t_start=start, t_max=t_max, rtol=rtol, guess=guess)
        out[i] = root
        if not np.isfinite(root):
            break  # a larger eps cannot be reached either
        start = root
    return out
