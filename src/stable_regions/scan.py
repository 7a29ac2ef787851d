"""Scan every position of a document for the price of running the model.

The forward pass already computed the logits of every position. From them alone (and the
unembedding W) ``geometry.top_curvature`` finds ``lambda_max``, its direction and the
corrected (Pade) radius along it at every position: a Lanczos search started from the
likeliest tokens' Gram matrix, all positions' products batched into matrix-matrix products
(bfloat16 where the CPU multiplies it natively), then one float32 product ``W v`` per
position for ``lambda_max`` and the cumulants. No (positions x V x d) array, ever.

Accuracy: ``lambda_max`` within ~1e-3 relative of a float64 Lanczos (tolerance ``tol`` on the
search's Ritz residual; the eigenvalue error is second order in it), limited in the median by
the model's own float32 logits (~1e-5).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import StableRegionsError
from .geometry import radius_pade, search_dtype, top_curvature
from .models import ModelAdapter


def position_block(vocab_size: int) -> int:
    """Positions per block: each (positions x V) float32 array stays ~128 MB."""
    return int(max(1, (1 << 25) // vocab_size))


class Scanner:
    """The float32 unembedding of a model (the model's own tensor when it is float32) and,
    where the search runs in bfloat16, a bfloat16 copy."""

    def __init__(
        self,
        adapter: ModelAdapter,
        *,
        tol: float = 1e-2,
        tokens: int = 32,
        search: torch.dtype | None = None,
    ) -> None:
        head = adapter.head
        if not head.is_linear or head.scale != 1.0:
            raise StableRegionsError(
                "the fast scan needs a linear head (this model caps or scales its logits): "
                "use `analyze` for it"
            )
        self.weight = adapter.unembed.weight.detach().to(torch.float32)
        dtype = search or search_dtype()  # default: bfloat16 where the CPU has it natively
        self.search = None if dtype == torch.float32 else self.weight.to(dtype)
        self.tol = tol
        self.tokens = tokens

    def scan_logits(self, logits: Tensor, eps: list[float]) -> dict[str, Tensor]:
        """``lambda_max`` (n,), the nearest corrected radius (n, len(eps)) over +-v, the
        search's residual and iterations, for logits (n, V)."""
        out: dict[str, list[Tensor]] = {
            "lambda_max": [],
            "radius": [],
            "residual": [],
            "iterations": [],
        }
        block = position_block(logits.shape[-1])
        for s in range(0, len(logits), block):
            found = top_curvature(
                self.weight,
                logits[s : s + block],
                tol=self.tol,
                tokens=self.tokens,
                search_weight=self.search,
            )
            c2, c3, c4 = found.lambda_max, found.c3, found.c4
            radii = [
                torch.minimum(radius_pade(c2, c3, e, c4), radius_pade(c2, -c3, e, c4)) for e in eps
            ]
            out["lambda_max"].append(c2)
            out["radius"].append(torch.stack(radii, -1))
            out["residual"].append(found.residual)
            out["iterations"].append(found.iterations)
        return {k: torch.cat(v) for k, v in out.items()}

    @torch.no_grad()
    def scan(self, adapter: ModelAdapter, ids: Tensor, eps: list[float]) -> dict[str, Tensor]:
        """One forward pass over ``ids`` (1, n), then ``scan_logits`` on its logits."""
        logits = adapter.forward(ids, use_cache=False).logits[0]
        return self.scan_logits(logits, eps)
