"""Timing and memory of a contender: warm-up, alternating rounds, medians, peak RSS.

Every benchmark row (``bench``, ``bench_scale``) uses these: ``compare`` for contenders timed
side by side, ``peak_rss_of`` for the peak resident set while one of them runs.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from .._support.heap import return_freed_memory

MIN_ROUND_S = 0.2  # a call shorter than this is repeated back to back within its round


def clock() -> float:
    """Seconds on the clock every timing here reads (the tests put a fake one in its place)."""
    return time.perf_counter()


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = clock()
    out = fn()
    return clock() - start, out


def _timed_round(fn: Callable[[], object], min_s: float = MIN_ROUND_S) -> tuple[float, object]:
    """Seconds per call of ``fn`` in one round. A call shorter than ``min_s`` is followed by
    back-to-back calls until ``min_s`` has passed, and their mean is the round's time (as
    ``timeit``'s autorange does): this machine runs a 2.4 ms pass over W at 4.3-5 ms for
    ~20 ms after idling 20 ms, single-threaded work or a large write, so a lone 15 ms call
    right after another contender would be timed mostly inside that ramp, while a
    contender of seconds pays it once."""
    t, out = timed(fn)
    if t >= min_s:
        return t, out
    n, start = 0, clock()
    while (elapsed := clock() - start) < min_s:
        out = fn()
        n += 1
    return elapsed / n, out


def compare(
    contenders: dict[str, Callable[[], object]], repeats: int, min_s: float = MIN_ROUND_S
) -> dict[str, tuple[float, object]]:
    """Median seconds per call and last answer of each contender: one warm-up each, then
    ``repeats`` rounds in which the contenders alternate (see ``_timed_round`` for calls
    shorter than ``min_s``)."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    answers: dict[str, object] = {}
    for name, fn in contenders.items():
        answers[name] = fn()  # warm-up
    for _ in range(repeats):
        for name, fn in contenders.items():
            t, answers[name] = _timed_round(fn, min_s)
            times[name].append(t)
    return {name: (statistics.median(times[name]), answers[name]) for name in contenders}


def result_row(
    name: str,
    baseline: str,
    ours_s: float | None = None,
    baseline_s: float | None = None,
    max_rel_err: float | None = None,
    peak_rss_mb: float | None = None,
) -> dict:
    """One row of the JSON: ``ratio = baseline_s / ours_s`` where both were timed;
    ``peak_rss_mb``: the process's peak while our side ran once (see ``peak_rss_of``)."""
    ratio = baseline_s / ours_s if ours_s and baseline_s is not None else None
    return dict(
        name=name,
        ours_s=ours_s,
        baseline=baseline,
        baseline_s=baseline_s,
        ratio=ratio,
        max_rel_err=max_rel_err,
        peak_rss_mb=peak_rss_mb,
    )


def peak_rss_of(fn: Callable[[], object]) -> float:
    """Peak RSS (MB) of this process while ``fn`` runs once: the loaded model and whatever
    else is resident, plus what ``fn`` allocates (the mark is reset just before)."""
    reset_peak_rss()
    fn()
    return round(peak_rss_mb(), 1)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux: write 5 to clear_refs), after
    handing the heap memory freed by earlier rows back to the system (glibc keeps it
    resident otherwise: ~1 GB after a map row's forward-mode pass, measured)."""
    return_freed_memory()  # without glibc the mark includes what the allocator kept
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """VmHWM (peak resident set since the last reset) in MB; ru_maxrss where /proc is absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
