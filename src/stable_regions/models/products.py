"""Products of wider activations with a 16-bit weight, upcast a block at a time.

Our passes compute in float32 on a 16-bit model's own weights (``precision``, ``taylor``).
Upcasting a whole weight for each product makes its float32 copy the pass's largest
transient: 2 GiB for the head of Llama-3-8B (128k x 4096), more than a run's headroom beside
the model. The blocks of output features are upcast one at a time instead (64 MiB of float32
on a CPU, ``budget.chunk_bytes`` on a GPU); each output element is the same dot product as
with a whole copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..budget import chunk_bytes

_linear = F.linear
_matmul = torch.matmul


def _block(features: int, width: int, device) -> int:
    return max(1, chunk_bytes(device, cpu=64 << 20) // (4 * max(1, width)))


def wide_linear(x: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``x W^T + b`` with ``W`` (out, in) read in ``dtype``, a block of its rows at a time."""
    bias = None if bias is None else bias.to(dtype)
    rows = _block(weight.shape[0], weight.shape[1], weight.device)
    if weight.dtype == dtype or rows >= weight.shape[0]:
        return _linear(x, weight.to(dtype), bias)
    parts = [
        _linear(x, weight[s : s + rows].to(dtype), None if bias is None else bias[s : s + rows])
        for s in range(0, weight.shape[0], rows)
    ]
    return torch.cat(parts, -1)


def wide_matmul(x: Tensor, weight: Tensor, dtype: torch.dtype) -> Tensor:
    """``x W`` with ``W`` (in, out) read in ``dtype``, a block of its columns at a time."""
    cols = _block(weight.shape[1], weight.shape[0], weight.device)
    if weight.dtype == dtype or cols >= weight.shape[1]:
        return _matmul(x, weight.to(dtype))
    parts = [_matmul(x, weight[:, s : s + cols].to(dtype)) for s in range(0, weight.shape[1], cols)]
    return torch.cat(parts, -1)
