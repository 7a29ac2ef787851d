"""What every study checks first: the model, the KL thresholds, the positions; and JSON values."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..errors import InvalidParameterError, StableRegionsError
from ..models import ModelAdapter, load, wrap


def as_adapter(model) -> ModelAdapter:
    """A ``ModelAdapter`` from a bundled name / path, an adapter, or a model ``wrap`` takes."""
    if isinstance(model, ModelAdapter):
        return model
    if isinstance(model, str):
        return load(model)
    return wrap(model)  # says what it accepts when it is none of them


# Below this eps the measured boundary is no longer exact: the KL of two float64 softmaxes
# carries roundoff of ~1e-16 times the logits' size, which approaches eps itself (issue 15
# reported -0.35% at 1e-12 and -45% at 1e-14 against the exact small-eps limit). At 1e-10
# the measured radius is within 4.5e-5 of the series form (exact there) on SmolLM2.
EPS_FLOOR = 1e-10


def check_eps(eps: float | Sequence[float]) -> list[float]:
    """KL thresholds (nats): finite, above ``EPS_FLOOR``."""
    values = [eps] if isinstance(eps, (int, float)) else list(eps)
    if not values:
        raise InvalidParameterError(
            "no eps given: pass one or more KL thresholds > 0, e.g. 0.01 0.1 1.0"
        )
    out = []
    for e in values:
        try:
            x = float(e)
        except (TypeError, ValueError):
            raise InvalidParameterError(
                f"eps {e!r} is not a number: give a KL threshold > 0 in nats"
            ) from None
        if not math.isfinite(x) or x <= 0:
            raise InvalidParameterError(f"eps must be a finite number > 0 (KL in nats), got {e}")
        if x < EPS_FLOOR:
            raise StableRegionsError(
                f"eps {e:g} is below {EPS_FLOOR:g}, where float64 roundoff in the KL itself "
                f"decides the measured radius: use eps >= {EPS_FLOOR:g} (the radius scales as "
                "sqrt(eps) there)"
            )
        out.append(x)
    return out


def check_positions(positions, n: int) -> list[int]:
    """``"all"``, ``"last"``, an index or indices (negative from the end) -> sorted distinct
    indices into a prompt of ``n`` tokens."""
    if positions == "all":
        return list(range(n))
    if positions == "last":
        return [n - 1]
    if isinstance(positions, (int, np.integer)):
        positions = [positions]
    if isinstance(positions, str):
        raise InvalidParameterError(
            f"positions must be 'all', 'last' or a list of token indices, got {positions!r}"
        )
    out = []
    for p in positions:
        if not isinstance(p, (int, np.integer)) or not -n <= int(p) < n:
            raise InvalidParameterError(
                f"position {p} is out of range: the prompt has {n} token{'s' if n != 1 else ''} (0..{n - 1})"
            )
        out.append(int(p) % n)
    if not out:
        raise InvalidParameterError("no positions given")
    return sorted(set(out))  # a position named twice (1,1 or 3,-1) is analysed once


def json_value(x):
    """A value for strict JSON: NaN -> None, +-inf -> "inf"/"-inf", numpy scalars -> Python."""
    if hasattr(x, "item") and not isinstance(x, (list, tuple)):
        x = x.item()
    if isinstance(x, float):
        if math.isnan(x):
            return None
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
    return x
