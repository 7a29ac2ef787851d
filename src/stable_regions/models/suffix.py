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
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.func import jvp, vjp

from .adapter import ModelAdapter
from .precision import exact_numerics


class _Reached(Exception):
    def __init__(self, activation: Tensor) -> None:
        self.activation = activation


def _stop_with(activation: Tensor):
    raise _Reached(activation)


class PositionSuffix:
    """``delta -> logits[i]`` with ``delta`` added to the activation at ``hook``, position ``i``."""

    def __init__(
        self,
        adapter: ModelAdapter,
        ids: Tensor,
        hook: str,
        position: int,
        *,
        shared_cache: PositionSuffix | None = None,
    ) -> None:
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
        if shared_cache is not None:  # same model, prompt and position: the prefix is the same
            self.cache_data = shared_cache.cache_data
        elif position > 0:
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
        return self.outputs(deltas)

    def outputs(self, deltas: Tensor, target: str | None = None) -> Tensor:
        """The activation at hook ``target`` (n, d_target) at the position, or the logits
        (n, V) when ``target`` is None, for perturbations ``deltas`` (n, d); differentiable.

        With a target the model stops there: an exception carries the activation out of the
        hook and is caught here, inside any torch.func transform, so its tangents survive.
        """
        deltas = deltas.to(self.dtype)
        with self.adapter.perturbation(self.hook, 0, deltas, seq_len=1):
            if target is None:
                return self._run(deltas.shape[0]).logits[:, -1, :]
            try:
                with self.adapter._on_activation(target, _stop_with):
                    self._run(deltas.shape[0])
            except _Reached as reached:
                return reached.activation[:, -1, :]
        raise RuntimeError(f"the forward pass never reached {target}")

    def check_target(self, target: str) -> None:
        """``target`` must come after the hook, or the map would not see the perturbation."""
        order = self.adapter.hook_points()
        if order.index(target) <= order.index(self.hook):
            raise ValueError(f"{target} does not come after {self.hook}")

    # ---------------------------------------------------------------- derivatives at delta = 0
    def _single(self, delta: Tensor, target: str | None = None) -> Tensor:
        return self.outputs(delta[None], target)[0]

    def jvp(self, v: Tensor, target: str | None = None) -> Tensor:
        """``J v`` for directions (k, d) -> (k, V) (or (k, d_target)), all k in one batched pass."""
        # Dual tensors (torch.autograd.forward_ad), not torch.func.jvp: same numbers, and about
        # half the Python overhead per layer (0.13 s against 0.23 s through 15 SmolLM2 blocks).
        v = v.to(self.dtype)
        with fwAD.dual_level(), torch.no_grad():
            out = self.outputs(fwAD.make_dual(torch.zeros_like(v), v), target)
            return fwAD.unpack_dual(out).tangent.to(torch.float64)

    def vjp_fn(self, target: str | None = None):
        """A reusable ``u -> J^T u`` ((V,) or (d_target,) -> (d,)) from one recorded pass."""
        _, fn = vjp(lambda x: self._single(x, target), torch.zeros(self.dim, dtype=self.dtype))

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
