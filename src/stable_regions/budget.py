"""One memory budget for every array of shape (rows x V): logits, logit tangents, probabilities.

A vocabulary is large (49k-262k tokens), so an array with one row per position, ray or
direction and one column per token is what grows with the work. Every study cuts such arrays
into blocks of rows that stay under ``ARRAY_BYTES``; the block sizes below all derive from it.
"""

from __future__ import annotations

ARRAY_BYTES = 64 << 20  # one (rows x V) array: 64 MiB (341 float32 rows of SmolLM2's 49152)

# What a pass recorded through the network keeps (its saved activations, for the replayed
# products and the reverse pass of the series) may hold at once. Measured on SmolLM2 (peak
# RSS by stage, 64 positions from block 8, 21 blocks): the recorded products raised the peak
# by ~560 MB, the series' two forward levels and their reverse pass by ~800 MB: ~70 saved
# activations per row and block (an activation: the residual plus the MLP's hidden width).
# At 384 MiB SmolLM2's full 32-layer map peaked at 1647 MB and its default map at 1521 MB
# (1763 MB at 512 MiB; 2134 MB for the default map with blocks of 64 everywhere).
GRAPH_BYTES = 384 << 20
SAVED_PER_WIDTH = 70


# Elementwise work that passes over a (rows x V) array several times (an exp, its sums, a
# dot product) runs from cache when the rows come a few at a time: on this machine's CPU a
# Newton step of the CGF crossings over 54 rows of SmolLM2's vocabulary took 5.5 ms in blocks
# of 4 rows against 14.3 ms at once. On a GPU the launches cost more than the memory: no blocks.
CACHE_BYTES = 2 << 20


def rows_in_cache(width: int, itemsize: int = 8, device=None) -> int:
    """Rows of ``width`` elements that stay within ``CACHE_BYTES`` on a CPU (at least 1);
    on any other device, all rows (a very large number)."""
    if device is not None and getattr(device, "type", str(device)) != "cpu":
        return 1 << 30
    return max(1, CACHE_BYTES // max(1, width * itemsize))


def rows_within(width: int, itemsize: int = 8, *, cap: int | None = None) -> int:
    """Rows of ``width`` elements of ``itemsize`` bytes that fit in ``ARRAY_BYTES`` (at least 1,
    at most ``cap``)."""
    rows = max(1, ARRAY_BYTES // max(1, width * itemsize))
    return rows if cap is None else max(1, min(cap, rows))


def rows_recordable(blocks: int, width: int, itemsize: int, *, cap: int) -> int:
    """Rows whose recorded pass through ``blocks`` blocks (activations of ``width`` elements
    of ``itemsize`` bytes: the residual plus the MLP's hidden width) fits in ``GRAPH_BYTES``;
    at least 1, at most ``cap``."""
    per_row = SAVED_PER_WIDTH * max(1, blocks) * width * itemsize
    return max(1, min(cap, GRAPH_BYTES // per_row))
