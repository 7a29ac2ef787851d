"""User directions an engine monitors by name: a safetensors file of named vectors at the
pre-logit vector, given to the engine by ``$STABLE_REGIONS_VLLM_DIRECTIONS`` before it starts.
A request names the ones it wants (``"directions": ["sentiment"]``) and its records get
``radius_<name>``, the radius along that direction at each eps (``StabilityMonitor``'s
``directions``, the same code).

The request's options are checked in vLLM's front-end process, where only the names are read
(the file's header); the engine loads the vectors once.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Collection
from pathlib import Path

import torch
from torch import Tensor

from ..errors import InvalidParameterError, StableRegionsError

DIRECTIONS_VARIABLE = "STABLE_REGIONS_VLLM_DIRECTIONS"


def directions_file() -> Path | None:
    value = os.environ.get(DIRECTIONS_VARIABLE)
    return Path(value).expanduser() if value else None


@functools.lru_cache(maxsize=4)
def _names(path: Path) -> tuple[str, ...]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return tuple(handle.keys())
    except Exception as exc:  # safetensors' own error type is not an OSError
        raise StableRegionsError(f"cannot read {DIRECTIONS_VARIABLE}={path}: {exc}") from None


def check_direction_names(raw, known: Collection[str] | None = None) -> tuple[str, ...]:
    """The names a request asks for (a name or a list of names), each one of ``known``
    (default: the names in the engine's file)."""
    if raw is None:
        return ()
    names = (raw,) if isinstance(raw, str) else tuple(str(n) for n in raw)
    if not names:
        return ()
    path = directions_file()
    if known is None and path is not None:
        known = _names(path)
    if not known:
        raise InvalidParameterError(
            f"directions {', '.join(names)} asked for, but the engine has none: start it with "
            f"{DIRECTIONS_VARIABLE} set to a .safetensors file of named vectors"
        )
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InvalidParameterError(
            f"unknown direction(s) {', '.join(unknown)}: the engine has {', '.join(known)}"
        )
    return names


def engine_directions() -> dict[str, Tensor]:
    """Every vector of the engine's directions file ({} where none is set), as float64."""
    path = directions_file()
    if path is None:
        return {}
    from safetensors.torch import load_file

    try:
        loaded = load_file(str(path))
    except Exception as exc:  # safetensors' own error type is not an OSError
        raise StableRegionsError(f"cannot read {DIRECTIONS_VARIABLE}={path}: {exc}") from None
    return {name: v.reshape(-1).to(torch.float64) for name, v in loaded.items()}
