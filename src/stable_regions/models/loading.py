"""``load(spec)`` and ``wrap(model, tokenizer)``: offline only, safetensors or GGUF only."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import ModelNotInstalledError, StableRegionsError, UnsupportedModelError, one_line
from .adapter import ModelAdapter
from .architectures import ARCHITECTURES, supported_names
from .device import resolve_device, resolve_dtype
from .store import (
    BUNDLED,
    DEFAULT_MODEL,
    conversion_state,
    convert_user_gguf,
    install_command,
    model_dir,
)
from .wrappers import unwrap


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def wrap(model, tokenizer=None, name: str | None = None) -> ModelAdapter:
    """Use an already loaded model with stable-regions: a ``transformers`` causal LM, a
    TransformerLens ``TransformerBridge`` or an nnsight ``LanguageModel`` (the tokenizer
    defaults to the wrapper's). The model stays where it is, on its own device and in its own
    dtype: nothing is copied or converted."""
    if isinstance(model, ModelAdapter):
        return model
    inner, tokenizer, _kind = unwrap(model, tokenizer)
    return ModelAdapter(inner, tokenizer, name=name)


def load(
    spec: str = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    log: Callable[[str], None] = _stderr,
) -> ModelAdapter:
    """Load a model for analysis, never touching the network.

    ``spec`` is a bundled model name (``smollm2-135m``, ``gemma3-270m``), a local Hugging
    Face directory with safetensors weights, or a ``.gguf`` file (converted once into the
    cache, then loaded from there). ``device``: ``auto`` (the first GPU if there is one,
    else the CPU), ``cpu``, ``cuda`` or ``cuda:N``. ``dtype``: ``auto`` (float32 on the CPU,
    bfloat16 on a GPU that has it), ``float32``, ``bfloat16`` or ``float16``.
    """
    where = resolve_device(device)
    dtype = resolve_dtype(dtype, where)
    if not isinstance(spec, str) or not spec:
        raise StableRegionsError(
            "no model given: use a bundled name, a model directory or a .gguf file"
        )
    if spec in BUNDLED:
        path = model_dir(spec)
        state = conversion_state(path)
        if state == "damaged":
            raise ModelNotInstalledError(
                f"the converted weights of {spec!r} in {path} are damaged (cut short): run "
                f"`{install_command(spec)} --force`"
            )
        if state != "converted":
            raise ModelNotInstalledError(
                f"bundled model {spec!r} is not installed: run `{install_command(spec)}`"
            )
        return _load_directory(path, spec, where, dtype)
    path = Path(spec).expanduser()
    if not path.exists():
        raise StableRegionsError(
            f"model {spec!r} not found: give a bundled name ({', '.join(BUNDLED)}), "
            "a local model directory or a .gguf file"
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise StableRegionsError(
                f"{path} is a file but not .gguf: give a GGUF file or a model directory"
            )
        return _load_directory(convert_user_gguf(path, log), path.name, where, dtype)
    return _load_directory(path, str(path), where, dtype)


def _load_directory(
    path: Path, name: str, device: torch.device, dtype: torch.dtype
) -> ModelAdapter:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config_file = path / "config.json"
    if not config_file.is_file():
        raise StableRegionsError(
            f"{path} has no config.json: it is not a Hugging Face model directory"
        )
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise StableRegionsError(
            f"{config_file} is not valid JSON ({exc}): the model directory is corrupt"
        ) from None
    model_type = config.get("model_type")
    if model_type == "gemma3" and "text_config" in config:
        raise UnsupportedModelError(f"{path} is a multimodal Gemma-3; use its text-only causal LM")
    if model_type not in ARCHITECTURES:
        archs = ", ".join(config.get("architectures") or []) or "unknown"
        raise UnsupportedModelError(
            f"{path} holds a {model_type!r} model ({archs}), not a supported causal decoder; "
            f"supported: {supported_names()}"
        )
    if not any(path.glob("*.safetensors")):
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise StableRegionsError(
                f"{path} has only pickle weights (.bin/.pt), which are not loaded for safety: "
                "convert them to safetensors first"
            )
        raise StableRegionsError(f"{path} has no .safetensors weights")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path),
            local_files_only=True,
            use_safetensors=True,
            trust_remote_code=False,
            attn_implementation="eager",  # forward-mode AD has no CPU SDPA kernel
            dtype=dtype,
        )
        model.to(device)
    except Exception as exc:  # safetensors/transformers raise many types for a bad file
        raise StableRegionsError(f"could not load the model in {path}: {one_line(exc)}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=False
        )
    except Exception as exc:
        raise StableRegionsError(
            f"could not load a tokenizer from {path}: {one_line(exc)}"
        ) from None
    return ModelAdapter(model, tokenizer, name=name)


__all__ = ["DEFAULT_MODEL", "load", "wrap"]
