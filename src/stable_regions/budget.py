"""One memory budget for every array of shape (rows x V): logits, logit tangents, probabilities.

A vocabulary is large (49k-262k tokens), so an array with one row per position, ray or
direction and one column per token is what grows with the work. Every study cuts such arrays
into blocks of rows that stay under ``ARRAY_BYTES``; the block sizes below all derive from it.
Passes recorded through the network (for the products inside it) stay under ``GRAPH_BYTES``.

``memory_budget(megabytes)`` is the one setting a user has: inside it both budgets scale to
that many megabytes for recorded passes (arrays get a sixth of it, the default ratio), in the
calling thread only. Larger budgets mean fewer, larger blocks (faster where memory allows);
smaller ones mean a lower peak.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

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


# A vocabulary chunk of the head upcast to float64 (``LogitHead.raw_float64``, the
# certificate's exact pass): on a CPU ~8 MB so that each chunk is reused from cache; on an
# accelerator few large chunks, as each one is a kernel launch (8 rows of an 8B model's head
# with the L1 norms per chunk were 16k-28k launches per block).
CPU_CHUNK_BYTES = 8 << 20
DEVICE_CHUNK_BYTES = 256 << 20


_SCALE: contextvars.ContextVar[float] = contextvars.ContextVar("stable_regions_budget", default=1.0)


@contextmanager
def memory_budget(megabytes: float) -> Iterator[None]:
    """Within the block, recorded passes may hold ``megabytes`` (default 384) and each
    (rows x V) array a sixth of that (default 64), on the CPU; on a GPU the graph budget is
    still at least a quarter of its free memory. Only the calling thread (or task) sees it.

    Examples
    --------
    >>> with sr.memory_budget(1024):  # doctest: +SKIP
    ...     sr.stability_map(model, prompt)
    """
    from .errors import InvalidParameterError

    if not (isinstance(megabytes, (int, float)) and 16 <= megabytes <= 1 << 20):
        raise InvalidParameterError(
            f"memory_budget takes megabytes between 16 and 1048576, got {megabytes!r}"
        )
    token = _SCALE.set(float(megabytes) * (1 << 20) / GRAPH_BYTES)
    try:
        yield
    finally:
        _SCALE.reset(token)


def array_bytes() -> int:
    """The (rows x V) array budget in force (``ARRAY_BYTES`` scaled by ``memory_budget``)."""
    return int(ARRAY_BYTES * _SCALE.get())


def chunk_bytes(device=None, cpu: int = CPU_CHUNK_BYTES) -> int:
    """Bytes per upcast vocabulary chunk on ``device``: ``cpu`` on a CPU (or unknown)."""
    on_cpu = device is None or getattr(device, "type", str(device)) == "cpu"
    return cpu if on_cpu else DEVICE_CHUNK_BYTES


def rows_in_cache(width: int, itemsize: int = 8, device=None) -> int:
    """Rows of ``width`` elements that stay within ``CACHE_BYTES`` on a CPU (at least 1);
    on any other device, all rows (a very large number)."""
    if device is not None and getattr(device, "type", str(device)) != "cpu":
        return 1 << 30
    return max(1, CACHE_BYTES // max(1, width * itemsize))


def equal_parts(n: int, cap: int) -> int:
    """The size of the fewest parts of at most ``cap`` that cover ``n``, all of one size but
    the last (64 at a cap of 40: two parts of 32, not 40 + 24)."""
    count = -(-n // max(1, cap))  # parts needed
    return max(1, -(-n // max(1, count)))


def rows_within(width: int, itemsize: int = 8, *, cap: int | None = None) -> int:
    """Rows of ``width`` elements of ``itemsize`` bytes that fit in ``ARRAY_BYTES`` (at least 1,
    at most ``cap``)."""
    rows = max(1, array_bytes() // max(1, width * itemsize))
    return rows if cap is None else max(1, min(cap, rows))


# A recorded row also keeps, per block, its attention over the prompt's cached keys: eager
# attention saves the scores and the softmax of each head (an estimate of two such rows, plus
# one transient: 3). At block 16 of Llama-3-8B and 2048 tokens that is ~25 MB a row, against
# ~3 MB of activations: without it a long prompt's block of rows would outgrow the budget.
ATTENTION_SAVED = 3


def graph_bytes(device=None) -> int:
    """What recorded passes may hold on ``device``: ``GRAPH_BYTES`` (scaled by
    ``memory_budget``) on a CPU; on a GPU a quarter of its free memory at the time of asking
    (``torch.cuda.mem_get_info``), at least that."""
    budget = int(GRAPH_BYTES * _SCALE.get())
    if device is None or getattr(device, "type", str(device)) != "cuda":
        return budget
    import torch

    free, _total = torch.cuda.mem_get_info(device)
    return max(budget, free // 4)


def rows_recordable(
    blocks: int,
    width: int,
    itemsize: int,
    *,
    cap: int,
    nested: bool = False,
    heads: int = 0,
    keys: int = 0,
    budget: int = GRAPH_BYTES,
) -> int:
    """Rows whose recorded pass through ``blocks`` blocks (activations of ``width`` elements
    of ``itemsize`` bytes: the residual plus the MLP's hidden width; and the attention of
    ``heads`` heads over ``keys`` cached keys) fits in ``budget``; at least 1, at most
    ``cap``. ``nested``: the series is recorded too (no Taylor mode)."""
    saved = SAVED_PER_WIDTH_NESTED if nested else SAVED_PER_WIDTH
    per_row = (saved * width + ATTENTION_SAVED * heads * keys) * max(1, blocks) * itemsize
    return max(1, min(cap, budget // per_row))
