"""The rest of the network from a hook point, at many positions of a prompt at once.

Perturbing position ``i`` after block ``l`` changes nothing at earlier positions (causal
attention), and the logits at ``i`` do not depend on later tokens. So the map from the
activation at ``i`` to the logits at ``i`` is computed by running token ``i`` alone against
the keys and values of tokens ``0..i-1``, cached once: one token of work instead of the
whole prompt. (Blocks before the hook also see only token ``i``: one row, and exact.)

``SuffixBatch`` does this for many positions in one batched forward pass: one batch row per
(position, perturbation), every row against the same cache of the clean prompt, with its
own attention mask (keys before its position, inside the sliding window where the layer has
one, and itself) and its own position id. Rows are independent inputs, so the Jacobian of
the batch is block-diagonal: one ``jvp`` or ``vjp`` serves all positions at once.

``logits`` is an ordinary differentiable function of the perturbation, so forward-mode
(``torch.autograd.forward_ad``) and ``torch.func.vjp`` give ``J v`` and ``J^T u`` through it,
and nested ``jvp`` the higher directional derivatives. Models must be loaded with
``attn_implementation="eager"`` for forward-mode AD.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.func import jvp, vjp

from ..budget import rows_within
from .adapter import ModelAdapter


def rows_per_pass(vocab_size: int) -> int:
    """Batch rows per forward pass of ``jvp``: the (rows x V) float64 logit tangents within the
    shared budget, and at most 256 (the keys/values each layer concatenates grow with rows)."""
    return rows_within(vocab_size, 8, cap=256)


class _Reached(Exception):
    def __init__(self, activation: Tensor) -> None:
        self.activation = activation


def _stop_with(activation: Tensor):
    raise _Reached(activation)


class SuffixBatch:
    """``deltas -> logits`` at ``positions`` with ``deltas`` added to the activation at ``hook``.

    Shapes: ``B = len(positions)``; ``x0`` (B, d) the unperturbed activations, ``logits0``
    (B, V) the unperturbed logits (float64). Row ``r`` of ``logits(deltas, rows)`` is at
    position ``positions[rows[r]]``.
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        ids: Tensor,
        hook: str,
        positions: Sequence[int],
        *,
        shared_cache: SuffixBatch | None = None,
    ) -> None:
        from transformers import DynamicCache

        self._cache_cls = DynamicCache
        self.adapter = adapter
        self.hook = hook
        self.positions = [int(p) for p in positions]
        if not self.positions:
            raise ValueError("no positions")
        self.dim = adapter.hook_dim(hook)
        self.dtype = adapter.compute_dtype  # the rows widen to it at the hook
        device = ids.device
        self._pos = torch.tensor(self.positions, dtype=torch.long, device=device)
        self._tokens = ids[0, self._pos]
        self.cache_len = max(self.positions)
        self.cache_data: list[tuple[Tensor, Tensor]] | None = None
        if shared_cache is not None:  # same model and prompt, a prefix at least as long
            assert shared_cache.cache_len >= self.cache_len
            self.cache_data = [
                (k[:, :, : self.cache_len], v[:, :, : self.cache_len])
                for k, v in shared_cache.cache_data or []
            ] or None
        elif self.cache_len > 0:
            # A cache without the config keeps every key, sliding-window layers included:
            # each row's own mask applies its window. The forward fills it in place.
            cache = DynamicCache()
            with torch.no_grad():
                adapter.forward(
                    ids[:, : self.cache_len], use_cache=True, **adapter.cache_kwarg(cache)
                )
            self.cache_data = [(layer.keys, layer.values) for layer in cache.layers]
        self._cache_masks = self._cache_allowed()
        # One unperturbed pass gives both the activations at the hook and the logits.
        captured: list[Tensor] = []
        zero = torch.zeros(len(self.positions), self.dim, dtype=self.dtype, device=device)
        with torch.no_grad(), adapter.capture(hook, captured):
            self.logits0 = self.logits(zero).to(torch.float64)
        self.x0 = captured[0][0].to(torch.float64)  # (B, d)

    @property
    def n_positions(self) -> int:
        return len(self.positions)

    # ------------------------------------------------------------------ the forward pass
    def _cache_allowed(self) -> dict[str, Tensor]:
        """Which cached keys each position sees (B, L), per attention kind: ``k < position``,
        and ``position - k < window`` for sliding layers."""
        L = self.cache_len
        keys = torch.arange(L, device=self._pos.device)
        before = keys[None, :] < self._pos[:, None]
        allowed = {"full_attention": before}
        window = getattr(self.adapter.config, "sliding_window", None)
        if window:
            allowed["sliding_attention"] = before & (self._pos[:, None] - keys[None, :] < window)
        return allowed

    def _attention_mask(self, rows: Tensor):
        """The additive mask (1, 1, R, L + R) of R rows laid out as one sequence after the
        cache: row r sees its position's cached keys and its own key, no other row.
        A dict per layer kind for models with ``layer_types`` (Gemma, Qwen), else one mask
        (sliding where the model is configured with a window, as Mistral)."""
        eye = torch.eye(rows.shape[0], dtype=torch.bool, device=rows.device)
        low = torch.finfo(self.dtype).min
        per_kind = {}
        for kind, allowed in self._cache_masks.items():
            ok = torch.cat([allowed[rows], eye], dim=1)
            mask = torch.zeros(ok.shape, dtype=self.dtype, device=ok.device).masked_fill(~ok, low)
            per_kind[kind] = mask[None, None]
        if getattr(self.adapter.config, "layer_types", None) is not None:
            return per_kind
        return per_kind.get("sliding_attention", per_kind["full_attention"])

    def _run(self, rows: Tensor):
        # The rows form one sequence (batch 1): they share the cache without copying it per
        # row, and the mask keeps them apart.
        kwargs: dict = dict(
            position_ids=self._pos[rows][None],
            attention_mask=self._attention_mask(rows),
        )
        if self.cache_data is not None:
            cache = self._cache_cls(ddp_cache_data=self.cache_data)
            kwargs.update(use_cache=True, **self.adapter.cache_kwarg(cache))
        else:
            kwargs.update(use_cache=False)
        # adapter.forward: float64 stays float64, and layer_norm gets correct higher
        # forward-mode derivatives (the derivative methods below freeze the weights)
        return self.adapter.forward(self._tokens[rows][None], **kwargs)

    def _rows(self, deltas: Tensor, rows: Tensor | None) -> Tensor:
        if rows is None:
            if deltas.shape[0] != self.n_positions:
                raise ValueError(
                    f"{deltas.shape[0]} deltas for {self.n_positions} positions: pass rows"
                )
            return torch.arange(self.n_positions, device=self._pos.device)
        return torch.as_tensor(rows, dtype=torch.long, device=self._pos.device)

    def logits(self, deltas: Tensor, rows: Tensor | None = None) -> Tensor:
        """Logits (R, V) for perturbations ``deltas`` (R, d); differentiable."""
        return self.outputs(deltas, rows)

    def outputs(
        self, deltas: Tensor, rows: Tensor | None = None, target: str | None = None
    ) -> Tensor:
        """The activation at hook ``target`` (R, d_target), or the logits (R, V) when
        ``target`` is None, for perturbations ``deltas`` (R, d) at the positions of ``rows``
        (default: row r at position r); differentiable.

        With a target the model stops there: an exception carries the activation out of the
        hook and is caught here, inside any torch.func transform, so its tangents survive.
        """
        rows = self._rows(deltas, rows)
        deltas = deltas.to(self.dtype)
        # Out of place, so that autograd and torch.func transforms (jvp, vjp) see through it.
        with self.adapter._on_activation(self.hook, lambda x: x + deltas[None]):
            if target is None:
                return self._run(rows).logits[0]
            try:
                with self.adapter._on_activation(target, _stop_with):
                    self._run(rows)
            except _Reached as reached:
                return reached.activation[0]
        raise RuntimeError(f"the forward pass never reached {target}")

    def check_target(self, target: str) -> None:
        """``target`` must come after the hook, or the map would not see the perturbation."""
        order = self.adapter.hook_points()
        if order.index(target) <= order.index(self.hook):
            raise ValueError(f"{target} does not come after {self.hook}")

    # ---------------------------------------------------------------- derivatives at delta = 0
    def jvp(self, v: Tensor, target: str | None = None) -> Tensor:
        """``J v`` for directions (B, k, d) -> (B, k, V) (or (B, k, d_target)); (B, d) -> (B, V)."""
        squeeze = v.ndim == 2
        v = v[:, None] if squeeze else v
        B, k, d = v.shape
        flat = v.reshape(B * k, d).to(self.dtype)
        rows = torch.arange(B, device=self._pos.device).repeat_interleave(k)
        out = None  # filled pass by pass: no list of float64 parts and no copy to join them
        step = rows_per_pass(self.logits0.shape[-1])
        # Dual tensors (torch.autograd.forward_ad), not torch.func.jvp: same numbers, and about
        # half the Python overhead per layer.
        with fwAD.dual_level(), torch.no_grad(), self.adapter.frozen():
            for s in range(0, B * k, step):
                x = fwAD.make_dual(torch.zeros_like(flat[s : s + step]), flat[s : s + step])
                y = fwAD.unpack_dual(self.outputs(x, rows[s : s + step], target)).tangent
                if out is None:
                    out = torch.empty(B * k, y.shape[-1], dtype=torch.float64, device=y.device)
                out[s : s + step] = y
                del x, y
        out = out.reshape(B, k, -1)
        return out[:, 0] if squeeze else out

    def vjp_fn(self, target: str | None = None):
        """A reusable ``u -> J^T u`` ((B, V) or (B, d_target) -> (B, d)) from one recorded pass."""
        zero = torch.zeros(self.n_positions, self.dim, dtype=self.dtype, device=self._pos.device)
        with self.adapter.frozen():  # the recorded pass then holds no weight-side graph
            _, fn = vjp(lambda x: self.outputs(x, None, target), zero)

        def apply(u: Tensor) -> Tensor:
            return fn(u.to(self.dtype))[0].detach().to(torch.float64)

        return apply

    def directional_derivatives(self, v: Tensor, order: int = 3) -> list[Tensor]:
        """``[d^k z / dt^k at t = 0 for k = 1..order]``, each (B, V), along ``delta = t v``
        (v: (B, d), one direction per position).

        One nest of ``order`` forward-mode passes. With ``f_(j+1) = jvp(f_j)`` returning
        (value, derivative), ``f_3(0) = (((z, z1), (z1, z2)), ((z1, z2), (z2, z3)))`` with
        ``z_k`` the k-th derivative: it is reached by ``order - k`` value steps, then ``k``
        derivative steps.
        """
        v = v.to(self.dtype)
        fn = self.logits
        for _ in range(order):
            fn = (lambda g: lambda x: jvp(g, (x,), (v,)))(fn)
        with self.adapter.frozen():
            out = fn(torch.zeros_like(v))
        derivs = []
        for k in range(1, order + 1):
            node = out
            for step in range(order):
                node = node[0] if step < order - k else node[1]
            derivs.append(node.detach().to(torch.float64))
        return derivs


class PositionSuffix:
    """``delta -> logits[i]`` at one position ``i``: a ``SuffixBatch`` of one position, with
    unbatched shapes (``x0`` (d,), ``logits0`` (V,), ``jvp`` (k, d) -> (k, V))."""

    def __init__(
        self,
        adapter: ModelAdapter,
        ids: Tensor,
        hook: str,
        position: int,
        *,
        shared_cache: PositionSuffix | None = None,
    ) -> None:
        shared = None if shared_cache is None else shared_cache.batch
        self.batch = SuffixBatch(adapter, ids, hook, [position], shared_cache=shared)
        self.adapter = adapter
        self.hook = hook
        self.position = position
        self.dim = self.batch.dim
        self.x0 = self.batch.x0[0]
        self.logits0 = self.batch.logits0[0]
        self.check_target = self.batch.check_target

    def logits(self, deltas: Tensor) -> Tensor:
        """Logits (n, V) at the position for perturbations ``deltas`` (n, d); differentiable."""
        return self.outputs(deltas)

    def outputs(self, deltas: Tensor, target: str | None = None) -> Tensor:
        rows = torch.zeros(deltas.shape[0], dtype=torch.long)
        return self.batch.outputs(deltas, rows, target)

    def jvp(self, v: Tensor, target: str | None = None) -> Tensor:
        """``J v`` for directions (k, d) -> (k, V) (or (k, d_target)), all k in one batched pass."""
        return self.batch.jvp(v[None], target)[0]

    def vjp_fn(self, target: str | None = None):
        """A reusable ``u -> J^T u`` ((V,) or (d_target,) -> (d,)) from one recorded pass."""
        fn = self.batch.vjp_fn(target)
        return lambda u: fn(u[None])[0]

    def directional_derivatives(self, v: Tensor, order: int = 3) -> list[Tensor]:
        """``[d^k z / dt^k at t = 0 for k = 1..order]``, each (V,), along ``delta = t v``."""
        return [d[0] for d in self.batch.directional_derivatives(v[None], order)]
