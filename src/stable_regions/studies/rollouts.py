"""Continuations with a steering vector at every position, and the per-token KL between the
steered and the base model along them: the pieces of the iso-KL coefficient (``iso_kl``).

The convention is the steering libraries' (repeng, steering-vectors, EasySteer,
steering-lite): ``c * v`` is added to the residual stream at one hook at every position, the
prompt's and the generated ones. The per-token KL is ``KL(p_steer || p_base)`` at each
position that produced a generated token.

Costs are counted in forward-pass tokens: a greedy continuation of ``T`` tokens after a
prompt of ``P`` costs ``P + T - 1`` (the prompt's pass, then one token per step, the keys
and values cached); a teacher-forced pass over the same sequence costs the same.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..geometry import cumulants
from ..models import ModelAdapter
from ..models.taylor import primal, taylor_derivatives

KeyValues = list[tuple[Tensor, Tensor]]  # per layer: keys, values (1, heads, positions, dim)


@dataclass
class Continuation:
    """A prompt ``ids`` (1, P), the tokens generated after it (T,), and the logits (T, V)
    that produced them (float32: the model's raw logits, before any sampling processor).
    ``key_values``, where kept: the keys and values of the pass that made them, at least the
    ``P + T - 1`` positions of ``sequence()``."""

    ids: Tensor
    new: Tensor
    logits: Tensor
    key_values: KeyValues | None = field(default=None, repr=False, compare=False)

    @property
    def cost(self) -> int:
        """Forward-pass tokens of the continuation (or of one teacher-forced pass over it)."""
        return self.ids.shape[1] + len(self.new) - 1

    def sequence(self) -> Tensor:
        """(1, P + T - 1): the prompt and every generated token but the last, whose logits
        nothing needs."""
        return torch.cat([self.ids, self.new[None, :-1].to(self.ids.device)], 1)


def _steering(stack: ExitStack, adapter: ModelAdapter, hook: str, delta: Tensor | None) -> None:
    if delta is not None:
        stack.enter_context(adapter.added(hook, delta))


def _key_values(out) -> KeyValues | None:
    """The keys and values a pass or ``generate`` returned, per layer; None where the model
    returns no cache of that layout (then nothing is resumed from it)."""
    try:
        cache = out.get("cache")
        if cache is None:
            cache = out.get("past_key_values")  # transformers before 5.24
        kv = [(layer.keys, layer.values) for layer in cache.layers]
    except (AttributeError, TypeError):
        return None
    return kv if kv and all(isinstance(k, Tensor) for k, _ in kv) else None


def _cache(adapter: ModelAdapter, key_values: KeyValues, positions: int) -> dict:
    """The keyword argument that hands the first ``positions`` keys and values to the model
    (a fresh cache: the one they came from is not changed)."""
    from transformers import DynamicCache

    if any(k.shape[2] < positions for k, _ in key_values):  # a window dropped some: a bug here
        raise ValueError(f"kept keys and values cover fewer than {positions} positions")
    data = [(k[:, :, :positions], v[:, :, :positions]) for k, v in key_values]
    return adapter.cache_kwarg(DynamicCache(ddp_cache_data=data))


def resumable(adapter: ModelAdapter, length: int) -> bool:
    """Whether a sequence of ``length`` tokens can be resumed from kept keys and values: a
    cache built from them keeps every key, so a model with a sliding window must not have
    seen more than its window (past it, its own cache would have dropped keys)."""
    window = getattr(adapter.config, "sliding_window", None)
    return not isinstance(window, int) or length <= window


def greedy(
    adapter: ModelAdapter,
    ids: Tensor,
    tokens: int,
    hook: str,
    delta: Tensor | None = None,
    *,
    key_values: KeyValues | None = None,
    keep: bool = False,
) -> Continuation:
    """Greedy continuation of ``tokens`` tokens (fewer where an end-of-sequence token comes
    first: it is kept, nothing after it) with ``delta`` added at every position.

    ``key_values``: those of ``ids`` but its last token, from a pass under the same steering;
    then only the last token and the new ones pass through the model. ``keep``: keep the
    continuation's own keys and values (``Continuation.key_values``)."""
    eos = adapter.model.generation_config.eos_token_id
    eos_ids = set([eos] if isinstance(eos, int) else (eos or []))
    pad = next(iter(eos_ids), 0)
    cached = {} if key_values is None else _cache(adapter, key_values, ids.shape[1] - 1)
    with ExitStack() as stack:
        _steering(stack, adapter, hook, delta)
        stack.enter_context(torch.no_grad())
        stack.enter_context(adapter.running())
        out = adapter.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=pad,
            **cached,
        )
    new = out.sequences[0, ids.shape[1] :]
    logits = torch.stack(out.logits, 1)[0].to(torch.float32)
    ends = [i for i, t in enumerate(new.tolist()) if t in eos_ids]
    n = ends[0] + 1 if ends else len(new)
    return Continuation(ids, new[:n], logits[:n], _key_values(out) if keep else None)


def teacher_forced(
    adapter: ModelAdapter, run: Continuation, hook: str, delta: Tensor | None = None
) -> Tensor:
    """The logits (T, V) float32 at the positions that produced ``run``'s tokens, with
    ``delta`` added at every position: one pass over ``run.sequence()``."""
    return forced_pass(adapter, run, hook, delta)[0]


def forced_pass(
    adapter: ModelAdapter,
    run: Continuation,
    hook: str,
    delta: Tensor | None = None,
    *,
    start: int = 0,
    key_values: KeyValues | None = None,
    keep: bool = False,
) -> tuple[Tensor, KeyValues | None]:
    """The logits (T - start, V) float32 at the positions that produced ``run.new[start:]``,
    with ``delta`` added at every position, and the pass's keys and values where ``keep``.
    ``key_values``: those of the first ``P + start - 1`` positions under the same steering;
    then only the positions after them pass through the model."""
    skip = run.ids.shape[1] - 1 + start
    seq = run.sequence()
    kwargs: dict = {"use_cache": keep or key_values is not None}
    if key_values is not None:
        kwargs.update(_cache(adapter, key_values, skip))
        seq = seq[:, skip:]
    with ExitStack() as stack:
        _steering(stack, adapter, hook, delta)
        stack.enter_context(torch.no_grad())
        out = adapter.forward(seq, **kwargs)
    logits = out.logits[0, 0 if key_values is not None else skip :].to(torch.float32)
    return logits, _key_values(out) if keep else None


def token_kl(q_logits: Tensor, p_logits: Tensor) -> np.ndarray:
    """``KL(q || p)`` per row (T,), float64, from two sets of logits (T, V)."""
    logq = torch.log_softmax(q_logits.to(torch.float64), -1)
    logp = torch.log_softmax(p_logits.to(torch.float64).to(logq.device), -1)
    # a token both distributions mask (-inf logits) adds 0 log 0 = 0, not NaN
    return (logq.exp() * (logq - logp)).nansum(-1).clamp_min(0.0).cpu().numpy()


@dataclass
class TangentPaths:
    """Every token's logits along the coefficient to first order, from one pass of first-order
    jets over a continuation with the tangent ``v`` at every position: ``z(c) = z0 + c a1``
    (T, V each, float32), and the activation norms at the hook (T,). The softmax along the
    path is exact: ``p_c`` is ``p_0`` tilted by ``exp(c a1)``, and each token's KL grows
    monotonically in ``|c|`` (``d KL / dc = c Var_{p_c}(a1)``). Far from the base the higher
    orders of the series overshoot the KL (docs/iso-kl.md); the tangent path does not."""

    z0: Tensor
    a1: Tensor
    activation_norm: np.ndarray

    def kl(self, c: float, chunk: int = 16) -> np.ndarray:
        """``KL(p_c || p_0)`` per token along the tangent path (float64, a few rows at a time)."""
        out = []
        for s in range(0, self.z0.shape[0], chunk):
            z0 = self.z0[s : s + chunk].to(torch.float64)
            zc = z0 + c * self.a1[s : s + chunk].to(torch.float64)
            out.append(token_kl(zc, z0))
        return np.concatenate(out)

    def fisher(self) -> np.ndarray:
        """``Var_p0(a1)`` per token: ``KL(p_c || p_0) = c^2 / 2 * fisher + O(c^3)``."""
        p = torch.softmax(self.z0.to(torch.float64), -1)
        return cumulants(p, self.a1.to(torch.float64))[1].cpu().numpy()


def tangent_paths(adapter: ModelAdapter, run: Continuation, hook: str, v: Tensor) -> TangentPaths:
    """One pass of first-order jets over ``run.sequence()``, the tangent ``v`` (d,) added at
    every position of ``hook`` (``models.taylor``)."""
    z0, (a1,), norm = logit_derivatives(adapter, run, hook, v, 1)
    return TangentPaths(z0, a1, norm)


def logit_derivatives(
    adapter: ModelAdapter, run: Continuation, hook: str, v: Tensor, order: int
) -> tuple[Tensor, list[Tensor], np.ndarray]:
    """``(z0, [a1, ..., a_order], activation_norm)``: the logits (T, V) at the positions
    that produced ``run``'s tokens, their derivatives along ``c`` with ``c v`` added at every
    position of ``hook`` (float32 each), and the activation norms there (T,), from one pass
    of jets of ``order`` over ``run.sequence()``."""
    norms: list[Tensor] = []
    start = run.ids.shape[1] - 1

    def logits(delta: Tensor) -> Tensor:
        with ExitStack() as stack:
            stack.enter_context(adapter.capture(hook, norms))
            stack.enter_context(adapter.added(hook, delta))
            stack.enter_context(torch.no_grad())
            return adapter.forward(run.sequence(), use_cache=False).logits[0, start:]

    with adapter.frozen():
        z0 = None

        def traced(delta):
            nonlocal z0
            out = logits(delta)
            z0 = primal(out).detach().to(torch.float32)
            return out

        a = taylor_derivatives(traced, v.to(adapter.device, torch.float32), order)
    h = primal(norms[0])[0, start:] if norms else None
    norm = h.to(torch.float64).norm(dim=-1).cpu().numpy() if h is not None else np.array([])
    return z0, [ak.to(torch.float32) for ak in a], norm
