"""Where a model runs and in what dtype: ``--device`` and ``--dtype`` resolved and checked."""

from __future__ import annotations

import torch

from ..errors import InvalidParameterError, StableRegionsError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """``auto`` (the first GPU if there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = "auto" if spec is None else str(spec).strip().lower()
    if text == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise InvalidParameterError(
            f"unknown device {spec!r}: use cpu, cuda, cuda:N or auto"
        ) from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise StableRegionsError(f"device {spec!r} is not supported: use cpu, cuda, cuda:N or auto")
    if not torch.cuda.is_available():
        raise StableRegionsError(
            f"`device={spec}`: this machine has no CUDA GPU that torch can use: use `device=cpu`"
        )
    index = 0 if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise StableRegionsError(
            f"`device={spec}`: this machine has {torch.cuda.device_count()} GPU(s), "
            f"cuda:0..cuda:{torch.cuda.device_count() - 1}"
        )
    return torch.device("cuda", index)


def resolve_dtype(spec: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto`` (float32 on the CPU, bfloat16 on a GPU that computes in it, else float32) or a
    name from ``DTYPES``; refused where the device cannot multiply in it."""
    if isinstance(spec, torch.dtype):
        dtype = spec
    else:
        text = "auto" if spec is None else str(spec).strip().lower()
        if text == "auto":
            bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
            return torch.bfloat16 if bf16 else torch.float32
        if text not in DTYPES:
            raise InvalidParameterError(f"unknown dtype {spec!r}: use auto, {', '.join(DTYPES)}")
        dtype = DTYPES[text]
    check_dtype(dtype, device)
    return dtype


def check_dtype(dtype: torch.dtype, device: torch.device) -> None:
    """One small matrix product in ``dtype`` on ``device``: a dtype the device cannot compute
    in fails here, in one line, instead of deep inside a forward pass."""
    if dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise StableRegionsError(
            f"dtype {dtype} is not a floating-point dtype a model can run in: use "
            f"{', '.join(DTYPES)}"
        )
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise StableRegionsError(
            f"{device} cannot compute in bfloat16 (it needs an Ampere or newer GPU): "
            "use `dtype=float16` or `dtype=float32`"
        )
    try:
        a = torch.ones(4, 4, dtype=dtype, device=device)
        (a @ a).sum().item()
    except RuntimeError as exc:
        raise StableRegionsError(
            f"{device} cannot compute in {str(dtype).removeprefix('torch.')} "
            f"({str(exc).splitlines()[0]}): use `dtype=float32`"
        ) from None
