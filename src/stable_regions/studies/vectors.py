"""Steering vectors from files and from the steering libraries people use.

- ``.npy`` (no pickles) or ``.safetensors`` holding one tensor: the vector itself.
- ``.safetensors`` holding one tensor per layer, ``{layer: vector}``: keys ``"12"``,
  ``"layer.12"``, ``"layers.12"``, ``"direction.12"``, ``"blocks.12.hook_resid_post"`` or
  steering-lite's ``"layer12.v"`` (its ``Vector.save`` layout, whose ``cfg`` metadata names
  the method: only ``mean_diff``, an added vector, is read); the layer asked for picks one.
- ``.gguf`` written by repeng's ``ControlVector.export_gguf`` (architecture
  ``controlvector``, tensors ``direction.{layer}``), read with ``gguf`` (no repeng needed).
- In Python: an array or tensor, a mapping ``{layer: vector}``, or any object with a
  ``directions`` mapping (repeng's ``ControlVector``).

Layer ``i`` is the output of block ``i`` (``blocks.{i}.hook_resid_post``), where repeng's
``ControlModel`` adds ``coeff * directions[i]``, steering-lite's ``mean_diff`` adds
``cfg.coeff * v`` and vllm-lens' ``SteeringVector`` adds ``scale * activations[k]`` (its
``layer_indices[k] == i``): a coefficient here is each one's ``coeff`` or ``scale``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import InvalidParameterError, StableRegionsError, one_line

_LAYER_KEY = re.compile(
    r"^(?:(?:layers?|direction|blocks)\.)?(-?\d+)(?:\.hook_resid_post)?$|^layer(-?\d+)\.v$"
)
STEERING_LITE_METHOD = "mean_diff"  # its additive method: the block's output + coeff * v


def layer_of_key(key: str) -> int | None:
    """The block index a tensor's name stands for, or None."""
    found = _LAYER_KEY.match(str(key))
    return int(found.group(1) or found.group(2)) if found else None


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
            from safetensors import safe_open

            # torch reads bfloat16 (steering-lite's default dtype), which numpy cannot hold
            with safe_open(str(path), framework="pt") as handle:
                _steering_lite_coefficient(handle.metadata() or {}, path)  # refuses its others
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}
            tensors = {
                k: (t if t.dtype in (torch.float32, torch.float64) else t.float()).numpy()
                for k, t in tensors.items()
            }
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


BUDGET_PREFIX = "stable_regions."  # metadata keys of a budget that travels with a vector


def write_vector_file(
    path: str | Path,
    vectors: Mapping | Tensor | np.ndarray,
    *,
    budget: Mapping[str, object] | None = None,
    model_hint: str = "",
) -> Path:
    """Write steering vectors, with the budget found for them where given, where the user's
    library reads them.

    - ``.safetensors``: steering-lite's ``Vector.save`` layout, tensors ``layer{i}.v`` and a
      ``cfg`` of its ``mean_diff`` method with ``coeff`` the coefficient (1 without one), so
      that its ``Vector.load`` reads it; the budget in the file's metadata under
      ``stable_regions.<key>`` (``coefficient``, ``kl_target``, ...). One vector without a
      layer is the tensor ``vector`` alone;
    - ``.gguf``: repeng's ``export_gguf`` layout (architecture ``controlvector``, tensors
      ``direction.{layer}``, ``controlvector.model_hint``), the budget as extra keys that
      repeng's ``import_gguf`` passes over;
    - ``.npy``: one vector, no budget (the format has no metadata: asking for one is an error).

    ``vectors``: ``{layer: vector}``, or one vector (then ``.gguf`` needs a layer in
    ``budget["layer"]``). Files written without a budget read as before."""
    path = Path(path)
    budget = {str(k): v for k, v in (budget or {}).items()}
    if isinstance(vectors, Mapping):
        named = {
            str(k): np.asarray(torch.as_tensor(v).detach().cpu(), np.float32)
            for k, v in vectors.items()
        }
    else:
        one = np.asarray(torch.as_tensor(vectors).detach().cpu(), np.float32).reshape(-1)
        named = {str(budget["layer"]) if "layer" in budget else "vector": one}
    if path.suffix == ".npy":
        if budget or len(named) != 1:
            raise InvalidParameterError(
                f"{path}: a .npy file holds one vector and no metadata; save as .safetensors or "
                ".gguf to keep the coefficient (or several layers)"
            )
        np.save(path, next(iter(named.values())))
        return path
    meta = {BUDGET_PREFIX + k: str(v) for k, v in budget.items()}
    if path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        layers = {layer_of_key(k): v for k, v in named.items()}
        if None not in layers:
            named = {f"layer{i}.v": v for i, v in layers.items()}
            coefficient = float(budget.get("coefficient", 1.0))
            meta["cfg"] = json.dumps(_steering_lite_cfg(sorted(layers), coefficient))
        save_file(named, str(path), metadata=meta or None)
        return path
    if path.suffix == ".gguf":
        _write_repeng_gguf(path, named, meta, model_hint)
        return path
    raise InvalidParameterError(f"{path}: write a .safetensors, .gguf or .npy file")


def _steering_lite_cfg(layers: list, coefficient: float) -> dict:
    """steering-lite's ``MeanDiffC`` as its ``to_dict`` writes it: every field, no other
    (its ``from_dict`` passes them all to the dataclass). ``normalize`` only matters when it
    extracts a vector; float32 keeps ours as written."""
    return {
        "method": STEERING_LITE_METHOD,
        "layers": layers,
        "target": "residual",
        "target_submodule": None,
        "coeff": coefficient,
        "dtype": "float32",
        "seed": 0,
        "normalize": False,
        "subtract_corpus_mean": False,
    }


def _steering_lite_coefficient(meta: Mapping[str, str], path) -> float | None:
    """``cfg.coeff`` of a steering-lite file; None where the file has no ``cfg`` naming a
    method (another program's metadata)."""
    try:
        cfg = json.loads(meta["cfg"])
        method, coefficient = cfg["method"], float(cfg.get("coeff", 1.0))
    except (KeyError, ValueError, TypeError):
        return None
    if method != STEERING_LITE_METHOD:
        raise StableRegionsError(
            f"{path} holds steering-lite method {method!r}, which does not add its vector; only "
            f"{STEERING_LITE_METHOD!r} vectors can be read here"
        )
    return coefficient


def _write_repeng_gguf(path: Path, named: dict, meta: dict, model_hint: str) -> None:
    import gguf

    layers = {layer_of_key(k): v for k, v in named.items()}
    if None in layers:
        raise InvalidParameterError(
            f"{path}: a control vector file names each vector by its layer; give {{layer: vector}}"
        )
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", model_hint)
    writer.add_uint32("controlvector.layer_count", len(layers))
    for key, value in meta.items():
        writer.add_string(key, value)
    for layer, v in sorted(layers.items()):
        writer.add_tensor(f"direction.{layer}", v)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_budget(path: str | Path) -> dict[str, str]:
    """The budget written with a vector (``write_vector_file``): ``{key: text}`` without the
    ``stable_regions.`` prefix; for a steering-lite file without one, its calibrated
    ``cfg.coeff`` as ``coefficient`` (where it is not its default, 1); ``{}`` for a file
    that has none (any ``.npy``, any other file from elsewhere)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as handle:
            meta = handle.metadata() or {}
        if not any(k.startswith(BUDGET_PREFIX) for k in meta):
            coefficient = _steering_lite_coefficient(meta, path)
            return {} if coefficient in (None, 1.0) else {"coefficient": repr(coefficient)}
    elif path.suffix == ".gguf":
        import gguf

        reader = gguf.GGUFReader(str(path))
        meta = {
            name: bytes(field.parts[-1]).decode("utf-8", "replace")
            for name, field in reader.fields.items()
            if name.startswith(BUDGET_PREFIX) and field.parts
        }
    else:
        return {}
    return {
        k.removeprefix(BUDGET_PREFIX): v for k, v in meta.items() if k.startswith(BUDGET_PREFIX)
    }
