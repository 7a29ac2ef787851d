"""The rest of the network from a hook point at one position: activation -> next-token logits.

Perturbing position ``i`` after block ``l`` changes nothing at earlier positions (causal
attention), and the logits at ``i`` do not depend on later tokens. So the map is computed by
running only token ``i`` through the model against the keys and values of tokens ``0..i-1``
cached once, with the perturbation added at the hook: one token of work instead of the
whole prompt. (Blocks before the hook also see only token ``i``: one row, and exact.)

``logits`` is an ordinary differentiable function of the perturbation, so ``torch.func.jvp``
and ``vjp`` give ``J v`` and ``J^T u`` through it, and nested ``jvp`` the higher directional
derivatives. Models must be loaded with ``attn_implementation="eager"`` for forward-mode AD.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import jvp, vjp

from .adapter import ModelAdapter
from .precision import exact_numerics


class PositionSuffix:
    """``delta -> logits[i]`` with ``delta`` added to the activation at ``hook``, position ``i``."""

    def __init__(self, adapter: ModelAdapter, ids: Tensor, hook: str, position: int) -> None:
        from transformers import DynamicCache

        self._cache_cls = DynamicCache
        self.adapter = adapter
        self.hook = hook
        self.position = position
        self.dim = adapter.hook_dim(hook)
        self.dtype = adapter.unembed.weight.dtype
        self.exact = adapter.is_float64
        self.token = ids[:, position : position + 1]
        self.cache_data: list[tuple[Tensor, Tensor]] | None = None
        if position > 0:
            with torch.no_grad():
                out = adapter.forward(ids[:, :position], use_cache=True)
            self.cache_data = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        with torch.no_grad():
            self.x0 = self._capture_origin()
            self.logits0 = self.logits(torch.zeros(1, self.dim, dtype=self.dtype))[0].to(
                torch.float64
            )

    def _cache(self, n: int):
        if self.cache_data is None:
            return None
        data = [(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in self.cache_data]
        return self._cache_cls(ddp_cache_data=data, config=self.adapter.config)

    def _run(self, n: int):
        # exact_numerics: float64 stays float64, and layer_norm gets correct higher forward-mode derivatives
        with exact_numerics(self.exact):
            return self.adapter.model(
                input_ids=self.token.expand(n, 1),
                past_key_values=self._cache(n),
                use_cache=self.cache_data is not None,
            )

    def _capture_origin(self) -> Tensor:
        """The unperturbed activation at the hook (d,), in float64."""
        captured: list[Tensor] = []
        with self.adapter.capture(self.hook, captured):
            self._run(1)
        return captured[0][0, -1].to(torch.float64)

    def logits(self, deltas: Tensor) -> Tensor:
        """Logits (n, V) at the position for perturbations ``deltas`` (n, d); differentiable."""
        deltas = deltas.to(self.dtype)
        with self.adapter.perturbation(self.hook, 0, deltas, seq_len=1):
            out = self._run(deltas.shape[0])
        return out.logits[:, -1, :]

    # ---------------------------------------------------------------- derivatives at delta = 0
    def _single(self, delta: Tensor) -> Tensor:
        return self.logits(delta[None])[0]

    def jvp(self, v: Tensor) -> Tensor:
        """``J v`` for directions (k, d) -> (k, V), all k in one batched pass."""
        v = v.to(self.dtype)
        zero = torch.zeros_like(v)
        return jvp(self.logits, (zero,), (v,))[1].detach().to(torch.float64)

    def vjp_fn(self):
        """A reusable ``u -> J^T u`` ((V,) -> (d,)) from one recorded pass."""
        _, fn = vjp(self._single, torch.zeros(self.dim, dtype=self.dtype))

        def apply(u: Tensor) -> Tensor:
            return fn(u.to(self.dtype))[0].detach().to(torch.float64)

        return apply

    def directional_derivatives(self, v: Tensor, order: int = 3) -> list[Tensor]:
        """``[d^k z / dt^k at t = 0 for k = 1..order]`` along ``delta = t v``.

        One nest of ``order`` forward-mode passes. With ``f_(j+1) = jvp(f_j)`` returning
        (value, derivative), ``f_3(0) = (((z, z1), (z1, z2)), ((z1, z2), (z2, z3)))`` with
        ``z_k`` the k-th derivative: it is reached by ``order - k`` value steps, then ``k``
        derivative steps.
        """
        v = v.to(self.dtype)
        fn = self._single
        for _ in range(order):
            fn = (lambda g: lambda x: jvp(g, (x,), (v,)))(fn)
        out = fn(torch.zeros_like(v))
        derivs = []
        for k in range(1, order + 1):
            node = out
            for step in range(order):
                node = node[0] if step < order - k else node[1]
            derivs.append(node.detach().to(torch.float64))
        return derivs
