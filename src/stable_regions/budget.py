"""One memory budget for every array of shape (rows x V): logits, logit tangents, probabilities.

A vocabulary is large (49k-262k tokens), so an array with one row per position, ray or
direction and one column per token is what grows with the work. Every study cuts such arrays
into blocks of rows that stay under ``ARRAY_BYTES``; the block sizes below all derive from it.
"""

from __future__ import annotations

ARRAY_BYTES = 64 << 20  # one (rows x V) array: 64 MiB (341 float32 rows of SmolLM2's 49152)


def rows_within(width: int, itemsize: int = 8, *, cap: int | None = None) -> int:
    """Rows of ``width`` elements of ``itemsize`` bytes that fit in ``ARRAY_BYTES`` (at least 1,
    at most ``cap``)."""
    rows = max(1, ARRAY_BYTES // max(1, width * itemsize))
    return rows if cap is None else max(1, min(cap, rows))
