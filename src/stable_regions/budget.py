"""One memory budget for every array of shape (rows x V): logits, logit tangents, probabilities.

A vocabulary is large (49k-262k tokens), so an array with one row per position, ray or
direction and one column per token is what grows with the work. Every study cuts such arrays
into blocks of rows that stay under ``ARRAY_BYTES``; the block sizes below all derive from it.
"""

from __future__ import annotations

ARRAY_BYTES = 64 << 20  # one (rows x V) array: 64 MiB (341 float32 rows of SmolLM2's 49152)

# What a pass recorded through the network keeps (its saved activations, for the replayed
# products) may hold at once, per row and block in units of an activation (the residual plus
# the MLP's hidden width). Measured on SmolLM2 (resident memory, 64 positions from the
# embedding and from block 8, 22 from the embedding): the recorded pass holds ~10, and its
# replayed products (two directions at a time at 64 positions) raise the peak to 24-28.
# The series of the closed forms records nothing in Taylor mode (``models.taylor``); where a
# model falls back to nested forward mode its reverse pass is recorded too, and took ~70
# (the series' levels and reverse pass raised the peak by ~800 MB at 64 positions from
# block 8). With 384 MiB and Taylor mode SmolLM2's default map peaks at ~1.86 GB; the trace
# probes' replays of 4-8 directions at once (bounded by ``ARRAY_BYTES`` on their float32
# tangents: ``CurvatureOperator.quadratic_form``) added ~170 MB of that.
GRAPH_BYTES = 384 << 20
SAVED_PER_WIDTH = 28
SAVED_PER_WIDTH_NESTED = 70


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


def rows_recordable(
    blocks: int, width: int, itemsize: int, *, cap: int, nested: bool = False
) -> int:
    """Rows whose recorded pass through ``blocks`` blocks (activations of ``width`` elements
    of ``itemsize`` bytes: the residual plus the MLP's hidden width) fits in ``GRAPH_BYTES``;
    at least 1, at most ``cap``. ``nested``: the series is recorded too (no Taylor mode)."""
    saved = SAVED_PER_WIDTH_NESTED if nested else SAVED_PER_WIDTH
    per_row = saved * max(1, blocks) * width * itemsize
    return max(1, min(cap, GRAPH_BYTES // per_row))
