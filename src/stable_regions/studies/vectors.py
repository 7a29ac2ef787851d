"""Steering vectors from files and from the steering libraries people use.

- ``.npy`` (no pickles) or ``.safetensors`` holding one tensor: the vector itself.
- ``.safetensors`` holding one tensor per layer, ``{layer: vector}``: keys ``"12"``,
  ``"layer.12"``, ``"layers.12"``, ``"direction.12"`` or ``"blocks.12.hook_resid_post"``;
  the layer asked for picks one.
- ``.gguf`` written by repeng's ``ControlVector.export_gguf`` (architecture
  ``controlvector``, tensors ``direction.{layer}``), read with ``gguf`` (no repeng needed).
- In Python: an array or tensor, a mapping ``{layer: vector}``, or any object with a
  ``directions`` mapping (repeng's ``ControlVector``).

Layer ``i`` is the output of block ``i`` (``blocks.{i}.hook_resid_post``), where repeng's
``ControlModel`` adds ``coeff * directions[i]``: a coefficient here is repeng's ``coeff``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import InvalidParameterError, StableRegionsError, one_line

_LAYER_KEY = re.compile(r"^(?:(?:layers?|direction|blocks)\.)?(-?\d+)(?:\.hook_resid_post)?$")


def layer_of_key(key: str) -> int | None:
    """The block index a tensor's name stands for, or None."""
    found = _LAYER_KEY.match(str(key))
    return int(found.group(1)) if found else None


def vector_at_layer(source, layer, name: str = "control vector") -> np.ndarray:
    """The vector for ``layer`` from ``{layer: vector}`` or an object with ``directions``."""
    directions = getattr(source, "directions", source)
    if not isinstance(directions, Mapping):
        raise StableRegionsError(
            f"{name} is not a vector, a {{layer: vector}} mapping or a control vector"
        )
    by_layer = {}
    for key, value in directions.items():
        index = key if isinstance(key, int) else layer_of_key(key)
        if index is not None:
            by_layer[int(index)] = value
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise InvalidParameterError(
            f"{name} holds one vector per block: give a block index as the layer, got {layer!r}"
        )
    if layer not in by_layer:
        have = ", ".join(str(k) for k in sorted(by_layer)) or "none"
        raise StableRegionsError(
            f"{name} has no vector at layer {layer} (it has layers {have}): choose one of them"
        )
    value = by_layer[layer]
    return value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)


def as_vector(vector, layer) -> Tensor:
    """A steering vector (float64) from an array, a tensor, ``{layer: vector}`` or a control
    vector (``directions``)."""
    if isinstance(vector, Mapping) or hasattr(vector, "directions"):
        vector = vector_at_layer(vector, layer)
    if isinstance(vector, Tensor):  # where it is (numpy would refuse a GPU tensor)
        return vector.detach().to(torch.float64)
    return torch.as_tensor(np.asarray(vector, dtype=np.float64))


def read_vector_file(path: str | Path, layer=None) -> np.ndarray:
    """The vector in a ``.npy``, ``.safetensors`` or repeng ``.gguf`` file (module doc);
    ``layer`` picks one where the file holds one per layer."""
    path = Path(path)
    if path.is_dir():
        raise InvalidParameterError(f"steering vector file {path} is a directory: give a file")
    if not path.is_file():
        raise InvalidParameterError(f"steering vector file {path} not found")
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if path.suffix == ".safetensors":
            from safetensors.numpy import load_file

            tensors = load_file(str(path))
            if len(tensors) == 1 and layer_of_key(next(iter(tensors))) is None:
                return next(iter(tensors.values()))
            if not any(layer_of_key(k) is not None for k in tensors):
                raise StableRegionsError(
                    f"{path} holds {len(tensors)} tensors ({', '.join(tensors)}): save exactly "
                    "one, or one per layer named by its index (e.g. '12' or 'layer.12')"
                )
            return vector_at_layer(tensors, layer, str(path))
        if path.suffix == ".gguf":
            return vector_at_layer(_repeng_gguf(path), layer, str(path))
        raise InvalidParameterError(
            f"{path}: a steering vector must be a .npy, .safetensors or (repeng) .gguf file"
        )
    except StableRegionsError:
        raise
    except Exception as exc:
        raise StableRegionsError(
            f"could not read steering vector {path}: {one_line(exc)}"
        ) from None


def _repeng_gguf(path: Path) -> dict[int, np.ndarray]:
    """``{layer: direction}`` of a control vector file (repeng's ``export_gguf`` layout)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    field = reader.get_field("general.architecture")
    arch = bytes(field.parts[-1]).decode("utf-8", "replace") if field and field.parts else ""
    if arch != "controlvector":
        raise StableRegionsError(
            f"{path} is a GGUF file of architecture {arch or 'unknown'!r}, not a control "
            "vector (repeng's ControlVector.export_gguf writes 'controlvector')"
        )
    out = {}
    for tensor in reader.tensors:
        index = layer_of_key(tensor.name)
        if tensor.name.startswith("direction.") and index is not None:
            out[index] = np.array(tensor.data, dtype=np.float64).reshape(-1)
    return out
