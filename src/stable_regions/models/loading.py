"""``load(spec)`` and ``wrap(model, tokenizer)``: offline only, safetensors or GGUF only."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import (
    ModelNotFoundError,
    StableRegionsError,
    UnsupportedModelError,
    one_line,
)
from .adapter import ModelAdapter
from .architectures import ARCHITECTURES, supported_names
from .device import resolve_device, resolve_dtype
from .hub import cached_snapshot, download_model, hub_cache, is_hub_id
from .store import (
    BUNDLED,
    DEFAULT_MODEL,
    convert_user_gguf,
    installed_dir,
)
from .wrappers import unwrap


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def wrap(model, tokenizer=None, *, name: str | None = None) -> ModelAdapter:
    """Use an already loaded model with stable-regions.

    The model stays where it is, on its own device and in its own dtype: nothing is copied
    or converted.

    Parameters
    ----------
    model : transformers model, TransformerBridge or nnsight model
        A ``transformers`` causal LM, a TransformerLens ``TransformerBridge`` or an nnsight
        ``LanguageModel``.
    tokenizer : tokenizer, optional
        Defaults to the wrapper's own.
    name : str, optional
        The name results carry (default: the model's).

    Returns
    -------
    ModelAdapter

    Examples
    --------
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer  # doctest: +SKIP
    >>> hf = AutoModelForCausalLM.from_pretrained(path)  # doctest: +SKIP
    >>> sr.analyze(sr.wrap(hf, AutoTokenizer.from_pretrained(path)), "Hello")  # doctest: +SKIP
    """
    if isinstance(model, ModelAdapter):
        return model
    inner, tokenizer, _kind = unwrap(model, tokenizer)
    return ModelAdapter(inner, tokenizer, name=name)


def load(
    spec: str = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    revision: str | None = None,
    download: bool = False,
    log: Callable[[str], None] = _stderr,
) -> ModelAdapter:
    """Load a model for analysis; the network only where ``download=True``.

    Parameters
    ----------
    spec : str, default "smollm2-135m"
        A bundled model name (``smollm2-135m``, ``gemma3-270m``), a local Hugging Face
        directory with safetensors weights, a ``.gguf`` file (converted once into the
        cache), or a Hugging Face Hub id (``org/name``) in the local Hugging Face cache.
    device : str or torch.device, default "auto"
        ``auto`` (the first GPU if there is one, else the CPU), ``cpu``, ``cuda`` or
        ``cuda:N``.
    dtype : str or torch.dtype, default "auto"
        ``auto`` (float32 on the CPU, bfloat16 on a GPU that has it), ``float32``,
        ``bfloat16``, ``float16``, or ``stored`` (the checkpoint's own: nothing converted).
    revision : str, optional
        A branch, tag or commit of a Hub id (default ``main``).
    download : bool, default False
        Fetch a Hub id into the Hugging Face cache first (configuration, tokenizer and
        safetensors weights; never pickles or code).
    log : callable
        Where progress messages go (default: stderr).

    Returns
    -------
    ModelAdapter
        The model and its tokenizer, seen through TransformerLens hook names.

    Raises
    ------
    ModelNotFoundError
        Nothing at ``spec`` (a missing bundled model, path or cached Hub id).

    Examples
    --------
    >>> model = sr.load("smollm2-135m")  # doctest: +SKIP
    >>> model = sr.load("Qwen/Qwen2.5-0.5B-Instruct", device="cuda")  # from your HF cache  # doctest: +SKIP
    """
    where = resolve_device(device)
    # "stored": the checkpoint's own dtype (transformers' "auto"): nothing is converted, the
    # weights stay memory-mapped and little of them is resident until used
    dtype = "auto" if dtype == "stored" else resolve_dtype(dtype, where)
    if not isinstance(spec, str) or not spec:
        raise StableRegionsError(
            "no model given: use a bundled name, a model directory, a .gguf file or a "
            "Hugging Face Hub id"
        )
    path = Path(spec).expanduser()
    hub = spec not in BUNDLED and not path.exists() and is_hub_id(spec)
    if (revision is not None or download) and not hub:
        option = "a revision" if revision is not None else "downloading"
        raise StableRegionsError(
            f"{option} applies to a Hugging Face Hub id (org/name), not to {spec!r}"
        )
    if hub:
        snapshot = download_model(spec, revision) if download else cached_snapshot(spec, revision)
        return _load_directory(snapshot, spec, where, dtype)
    if spec in BUNDLED:
        return _load_directory(installed_dir(spec), spec, where, dtype)
    if not path.exists():
        raise ModelNotFoundError(
            f"model {spec!r} not found: give a bundled name ({', '.join(BUNDLED)}), "
            f"a local model directory, a .gguf file or a Hub id (org/name) in {hub_cache()}"
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise StableRegionsError(
                f"{path} is a file but not .gguf: give a GGUF file or a model directory"
            )
        return _load_directory(convert_user_gguf(path, log), path.name, where, dtype)
    return _load_directory(path, str(path), where, dtype)


def _load_directory(
    path: Path, name: str, device: torch.device, dtype: torch.dtype | str
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
    # On a GPU, fused attention (SDPA) for the passes that take no derivative (prefixes,
    # scans, generation: eager attention's scores grow with the square of the length; 8.6 GB
    # a layer at 8k tokens of Llama-3-8B); the passes we differentiate switch to eager
    # (``attention``). On the CPU eager throughout (scores of a 1024-token window are tens
    # of MB; the same kernels everywhere keep the numbers of every pass consistent). SDPA
    # ignores Gemma-2's attention softcap: eager there on any device.
    fused = device.type == "cuda" and not config.get("attn_logit_softcapping")
    attention = "sdpa" if fused else "eager"
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path),
            local_files_only=True,
            use_safetensors=True,
            trust_remote_code=False,
            attn_implementation=attention,
            dtype=dtype,
            # straight onto the device: no staging of the whole model in CPU memory first
            device_map={"": device},
        )
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
