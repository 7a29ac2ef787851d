"""The served model's unembedding, read once from its checkpoint (safetensors only).

A logits processor sees the logits, not the model: the geometry needs ``W`` too, so the
processor reads it from the checkpoint vLLM serves (a directory, or a Hub id in the local
Hugging Face cache). It costs ``V x d`` float32 values in the engine's process (SmolLM2:
49152 x 576, 113 MB; Llama-3-8B: 128256 x 4096, 2.1 GB).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from ..errors import StableRegionsError
from ..models.hub import cached_snapshot, is_hub_id

HEAD_KEYS = ("lm_head.weight",)
TIED_KEYS = ("model.embed_tokens.weight", "transformer.wte.weight", "gpt_neox.embed_in.weight")


def checkpoint_dir(model: str, revision: str | None = None) -> Path:
    """The local directory of ``model``: a directory as given, or a Hub id's snapshot in the
    local Hugging Face cache (nothing is downloaded)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if is_hub_id(model):
        return cached_snapshot(model, revision)
    raise StableRegionsError(
        f"{model!r} is neither a model directory nor a Hub id: serve a local checkpoint"
    )


def unembedding(model: str, *, revision: str | None = None, device=None) -> Tensor:
    """``W`` (V, d) float32 of a linear head as the logits see it (``z = W h``: a config's
    ``logit_scale`` folded in), on ``device``. A softcapped head (``final_logit_softcapping``)
    or a head with a bias is refused: the geometry here is that of ``z = W h``."""
    path = checkpoint_dir(model, revision)
    config = (
        json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
    )
    config = config.get("text_config", config)
    if config.get("final_logit_softcapping"):
        raise StableRegionsError(
            f"{model} softcaps its logits: the monitor needs a linear head; use `analyze` or "
            "`certify` on the generated text instead"
        )
    files = _weight_files(path)
    weight = _find(files, HEAD_KEYS)
    if weight is None:  # a tied head: the embedding
        weight = _find(files, TIED_KEYS)
    if weight is None:
        raise StableRegionsError(
            f"no unembedding ({', '.join(HEAD_KEYS + TIED_KEYS)}) in the safetensors of {path}"
        )
    if _find(files, ("lm_head.bias",)) is not None:
        raise StableRegionsError(f"{model}'s head has a bias: the monitor covers z = W h only")
    weight = weight.to(torch.float32)
    scale = config.get("logit_scale")
    if scale not in (None, 1, 1.0):
        weight = weight * float(scale)
    return weight.to(device) if device is not None else weight


def _weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise StableRegionsError(
            f"no safetensors weights in {path}: the monitor reads the head from safetensors only"
        )
    return files


def _find(files: list[Path], keys: tuple[str, ...]) -> Tensor | None:
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            names = set(handle.keys())
            for key in keys:
                if key in names:
                    return handle.get_tensor(key)
    return None
