"""A 16-bit unembedding read in float32 a vocabulary chunk at a time, never copied whole.

Sums over the vocabulary lose too much in a 16-bit product, so the head's products run in
float32. A float32 copy of the head costs twice a bfloat16 head's bytes (2 GiB for
Llama-3-8B's 128k x 4096, 3.4 GiB for Gemma-2-9B's 256k x 3584): more than a run's whole
headroom beside an 8B model. ``WideRows`` holds the stored weight and upcasts only the rows
an operation reads: ``w[s:e]`` and ``w[idx]`` are float32 copies of those rows; ``x @ w.T``
and ``y @ w`` run chunk by chunk (``budget.chunk_bytes``: 8 MB on a CPU, 256 MB on a GPU);
``torch.linalg.vector_norm(w, dim=-1)`` likewise. Any other torch operation on it raises,
so that no code path makes the whole copy by accident.

The values are the stored ones exactly (bfloat16 and float16 embed in float32): ``x @ w.T``
equals the product with a float32 copy bit for bit, ``y @ w`` up to the order of the sums.
The model's own forward passes do the same for a 16-bit weight they multiply in float32
(``models.precision``: a block of output rows upcast at a time).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..budget import chunk_bytes


class WideRows:
    """``stored`` (V, d) seen as ``dtype`` (float32), a vocabulary chunk at a time; with
    ``column_scale`` (d,) as ``stored @ diag(column_scale)`` (a norm's gain folded into the
    head, ``certify``), still without a copy."""

    def __init__(
        self,
        stored: Tensor,
        dtype: torch.dtype = torch.float32,
        column_scale: Tensor | None = None,
    ) -> None:
        self.stored = stored.detach()
        self.dtype = dtype
        self.column_scale = None if column_scale is None else column_scale.to(dtype)
        self.shape = stored.shape
        self.device = stored.device
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        scaled = "" if self.column_scale is None else ", column-scaled"
        return f"WideRows({tuple(self.shape)}, {self.stored.dtype} as {self.dtype}{scaled})"

    def _wide(self, rows: Tensor) -> Tensor:
        rows = rows.to(self.dtype)
        return rows if self.column_scale is None else rows * self.column_scale

    def __getitem__(self, index) -> Tensor:
        return self._wide(self.stored[index])

    def index_select(self, dim: int, index: Tensor) -> Tensor:
        if dim != 0:
            raise ValueError("WideRows selects rows (dim 0) only")
        return self._wide(self.stored.index_select(0, index))

    def detach(self) -> WideRows:
        return self

    @property
    def T(self) -> _Transposed:  # noqa: N802 (as a tensor's)
        return _Transposed(self)

    def to(self, dtype: torch.dtype) -> WideRows | Tensor:
        """Itself for its own dtype, the stored tensor for the stored dtype, else a whole
        copy (references and tests only: ``LogitHead.to(torch.float64)``)."""
        if dtype == self.dtype:
            return self
        if self.column_scale is None:
            return self.stored.to(dtype)
        return self.stored.to(dtype) * self.column_scale.to(dtype)

    @property
    def rows_per_chunk(self) -> int:
        """Rows upcast at a time (``budget.chunk_bytes`` of them in ``dtype``)."""
        width = self.shape[1] * torch.finfo(self.dtype).bits // 8
        return max(1, chunk_bytes(self.device) // width)

    def times_transposed(self, x: Tensor) -> Tensor:
        """``x @ W^T``: (..., d) -> (..., V), the rows upcast a chunk at a time."""
        x = x.to(self.dtype)
        V = self.shape[0]
        out = torch.empty(*x.shape[:-1], V, dtype=self.dtype, device=x.device)
        step = self.rows_per_chunk
        for s in range(0, V, step):
            out[..., s : s + step] = x @ self[s : s + step].T
        return out

    def times(self, y: Tensor) -> Tensor:
        """``y @ W``: (..., V) -> (..., d), accumulated over the vocabulary's chunks."""
        y = y.to(self.dtype)
        out = torch.zeros(*y.shape[:-1], self.shape[1], dtype=self.dtype, device=y.device)
        step = self.rows_per_chunk
        for s in range(0, self.shape[0], step):
            out += y[..., s : s + step] @ self[s : s + step]
        return out

    def row_norms(self) -> Tensor:
        step = self.rows_per_chunk
        return torch.cat(
            [
                torch.linalg.vector_norm(self[s : s + step], dim=-1)
                for s in range(0, len(self), step)
            ]
        )

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _MATMUL and len(args) == 2 and isinstance(args[0], Tensor):
            a, b = args
            if isinstance(b, _Transposed):
                return b.rows.times_transposed(a)
            if isinstance(b, WideRows):
                return b.times(a)
        if func is torch.linalg.vector_norm and isinstance(args[0], WideRows):
            dim = kwargs.get("dim", args[2] if len(args) > 2 else None)
            if dim in (-1, 1) and len(args) <= 3 and set(kwargs) <= {"dim"}:
                return args[0].row_norms()
        name = getattr(func, "__name__", str(func))
        raise TypeError(
            f"{name} on a WideRows head is not supported: it would copy the whole head; "
            "index a chunk of rows (w[s:e]) first"
        )


class _Transposed:
    """``W^T`` of a ``WideRows``: only ``x @ W^T``."""

    def __init__(self, rows: WideRows) -> None:
        self.rows = rows
        self.shape = (rows.shape[1], rows.shape[0])
        self.dtype = rows.dtype
        self.device = rows.device

    __torch_function__ = WideRows.__torch_function__


_MATMUL = {torch.Tensor.__matmul__, torch.Tensor.matmul, torch.Tensor.mm, torch.matmul, torch.mm}
