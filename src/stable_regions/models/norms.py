"""The final norm as plain numbers: kind, gain and epsilon (for Lipschitz bounds through it).

``f(x) = g * y / sqrt(|y|^2 / d + eps) (+ bias)`` with ``y = x`` (RMSNorm: Llama, Qwen,
Mistral, Gemma with ``g = 1 + weight``) or ``y = x - mean(x)`` (LayerNorm: GPT-2, NeoX, OPT).
A module is only described when that formula reproduces its output on the activations at
hand; anything else is unknown (no guarantee is claimed through it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class NormSpec:
    kind: str  # "rms" or "layer"
    gain: Tensor  # (d,) float64, the effective g
    bias: Tensor | None
    eps: float

    def __call__(self, x: Tensor) -> Tensor:
        x = x.to(torch.float64)
        y = x - x.mean(-1, keepdim=True) if self.kind == "layer" else x
        out = self.gain * y / torch.sqrt((y * y).mean(-1, keepdim=True) + self.eps)
        return out if self.bias is None else out + self.bias

    def unit_output(self, x: Tensor) -> Tensor:
        """``y / sqrt(|y|^2 / d + eps)`` (..., d): the output before the gain and bias."""
        x = x.to(torch.float64)
        y = x - x.mean(-1, keepdim=True) if self.kind == "layer" else x
        return y / torch.sqrt((y * y).mean(-1, keepdim=True) + self.eps)

    def centred_norm(self, x: Tensor) -> Tensor:
        """``|y(x)|`` (..., ): the norm of what the formula divides."""
        x = x.to(torch.float64)
        y = x - x.mean(-1, keepdim=True) if self.kind == "layer" else x
        return y.norm(dim=-1)

    @property
    def max_gain(self) -> float:
        return float(self.gain.abs().max())


def describe_norm(module: nn.Module | None, x: Tensor) -> tuple[NormSpec | None, str]:
    """``(spec, "")`` when ``module`` is a recognised RMSNorm / LayerNorm whose output on ``x``
    (R, d) the formula reproduces (to 1e-4 relative, the module's own float32 roundoff), else
    ``(None, reason)``."""
    if module is None:
        return None, "the model has no final norm"
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor):
        return None, f"final norm {type(module).__name__} has no weight to bound"
    name = type(module).__name__
    eps = next(
        (getattr(module, a) for a in ("variance_epsilon", "eps") if hasattr(module, a)), None
    )
    if not isinstance(eps, float):
        return None, f"final norm {name} has no epsilon attribute"
    w = weight.detach().to(torch.float64)
    bias = getattr(module, "bias", None)
    bias = bias.detach().to(torch.float64) if isinstance(bias, Tensor) else None
    kinds = ["layer"] if "LayerNorm" in name else ["rms"]
    gains = [w + 1.0, w] if "Gemma" in name else [w, w + 1.0]
    with torch.no_grad():
        target = module(x.to(weight.dtype)).to(torch.float64)
    scale = target.abs().max().clamp_min(1e-30)
    for kind in kinds:
        for gain in gains:
            spec = NormSpec(kind, gain, bias, float(eps))
            if float((spec(x) - target).abs().max() / scale) < 1e-4:
                return spec, ""
    return None, f"final norm {name} does not match an RMSNorm or LayerNorm formula"
