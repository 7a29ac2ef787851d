"""How far a steered generation's distributions are from the base model's, token by token.

``generate(..., steering={"vector": v, "layer": L, "coefficient": c})`` generates with
``c * v`` added at every position of ``blocks.{L}.hook_resid_post`` (the steering libraries'
convention) and, at every step, runs the base model once more on the same tokens with the
vector taken out, for ``KL(p_steer || p_base)`` of that step (``kl_steer``), its running sum
over the continuation (``kl_steer_cumulative``) and a flag where one token's KL spikes above
``spike_kl`` (``kl_spike``). The base model keeps its own keys and values: the first step
passes the prompt, every later step the one token generated since, so the base model costs
what the steered generation costs (``P + T - 1`` tokens in all).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ..errors import InvalidParameterError
from ..models import ModelAdapter
from .rollouts import token_kl
from .steering import check_vector

KEYS = ("vector", "layer", "coefficient", "spike_kl")
DEFAULT_SPIKE_KL = 1.0  # nats: one token's distribution clearly moved


@dataclass
class SteeringSpec:
    """What ``generate``'s ``steering`` asks for, checked."""

    hook: str
    delta: Tensor  # coefficient * vector, in the model's dtype, on its device
    spike_kl: float


def check_steering(adapter: ModelAdapter, steering: Mapping | None) -> SteeringSpec | None:
    if steering is None:
        return None
    if not isinstance(steering, Mapping) or not {"vector", "layer"} <= set(steering):
        raise InvalidParameterError(
            "steering must be a mapping with 'vector' and 'layer' (and optionally "
            "'coefficient', 'spike_kl')"
        )
    unknown = sorted(set(steering) - set(KEYS))
    if unknown:
        raise InvalidParameterError(
            f"unknown steering key(s) {', '.join(unknown)}: use {', '.join(KEYS)}"
        )
    hook = adapter.hook_for_layer(steering["layer"])
    vector = check_vector(torch.as_tensor(steering["vector"]), adapter.hook_dim(hook))
    coefficient = float(steering.get("coefficient", 1.0))
    spike = float(steering.get("spike_kl", DEFAULT_SPIKE_KL))
    if not np.isfinite(coefficient) or not (np.isfinite(spike) and spike > 0):
        raise InvalidParameterError(
            f"steering coefficient must be finite and spike_kl positive, got {coefficient!r} "
            f"and {spike!r}"
        )
    delta = (coefficient * vector).to(adapter.device)
    return SteeringSpec(hook, delta, spike)


class SteeringDrift:
    """A logits processor placed beside the monitor: at each step, the base model's logits
    for the same tokens (``spec.delta`` zeroed for that pass: the steering hook adds the
    same tensor) and the KL of the steered step's distribution from them.

    The base model runs on its own key/value cache, fed the tokens it has not seen. Where
    a step's sequence is not the last one plus new tokens (a decoding strategy that
    rewrites it), the cache is dropped and the whole sequence passes again.
    ``forward_tokens`` counts the tokens (per row) the base passes took.

    ``prompt_mask`` (B, P): the batch's left padding; positions follow it as ``generate``'s
    do."""

    def __init__(self, adapter: ModelAdapter, spec: SteeringSpec, prompt_mask: Tensor) -> None:
        self.adapter, self.spec, self.mask = adapter, spec, prompt_mask
        self.steps: list[np.ndarray] = []  # (B,) per step
        self.forward_tokens = 0
        self._seen: Tensor | None = None  # the tokens the cache holds
        self._cache = None

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        extra = input_ids.shape[1] - self.mask.shape[1]
        mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], extra)], 1)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        seen = self._seen
        if seen is None or seen.shape[1] >= input_ids.shape[1]:
            seen = None
        elif not torch.equal(input_ids[:, : seen.shape[1]], seen):
            seen = None
        if seen is None:
            from transformers import DynamicCache

            self._cache = DynamicCache(config=self.adapter.config)
        start = 0 if seen is None else seen.shape[1]
        saved = self.spec.delta.clone()
        try:
            self.spec.delta.zero_()  # the steering hook adds this tensor: the base model
            with torch.no_grad():
                base = self.adapter.forward(
                    input_ids[:, start:],
                    attention_mask=mask,
                    position_ids=positions[:, start:],
                    use_cache=True,
                    **self.adapter.cache_kwarg(self._cache),
                ).logits[:, -1]
        finally:
            self.spec.delta.copy_(saved)
        self._seen = input_ids.clone()
        self.forward_tokens += input_ids.shape[1] - start
        self.steps.append(token_kl(scores.detach(), base))
        return scores  # never changed

    def columns(self, frame: pd.DataFrame) -> pd.DataFrame:
        """``frame`` (one row per sequence, step and eps) with ``kl_steer``,
        ``kl_steer_cumulative`` and ``kl_spike``."""
        if frame.empty:
            return frame.assign(kl_steer=[], kl_steer_cumulative=[], kl_spike=[])
        table = np.stack(self.steps, 1) if self.steps else np.zeros((0, 0))  # (B, steps)
        per = pd.DataFrame(
            [
                {"sequence": b, "step": t, "kl_steer": float(table[b, t])}
                for b in range(table.shape[0])
                for t in range(table.shape[1])
            ]
        )
        per["kl_steer_cumulative"] = per.groupby("sequence")["kl_steer"].cumsum()
        per["kl_spike"] = per["kl_steer"] > self.spec.spike_kl
        return frame.merge(per, on=["sequence", "step"], how="left")
