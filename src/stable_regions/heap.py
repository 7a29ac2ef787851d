"""Handing freed memory back to the system: long runs should not keep what they freed."""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def return_freed_memory() -> bool:
    """Give the heap pages glibc holds free back to the system (``malloc_trim(0)``); a no-op
    (False) without glibc.

    Long runs of large tensors of varying sizes (a stability map's forward-mode passes, block
    after block) leave freed memory resident in glibc's heap: the resident set then creeps
    from block to block (a full SmolLM2 map reached 1799 MB; trimmed after each block, a map of
    the embedding, block 29 and the final layer stayed at 1520 MB against 1664 without). A
    trim costs a few milliseconds."""
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    libc.malloc_trim(0)
    return True


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def map_large_allocations(threshold: int = 1 << 20) -> bool:
    """From now on, glibc serves allocations of at least ``threshold`` bytes by ``mmap``, so
    freeing one returns it to the system at once (False without glibc).

    glibc raises this threshold on its own after large frees (up to 32 MB), after which
    tensors of a few MB come from the heap and stay resident as fragments when freed: a
    map's resident set crept from 1438 to 1564-1664 MB over three layers of SmolLM2 even with
    ``return_freed_memory`` after each block; with a fixed 1 MiB threshold it stayed at
    1454 MB (and took 3% longer: fresh pages). A setting of the whole process: the command
    line makes it; a library user may call it."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
