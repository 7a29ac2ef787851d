"""Threads for a busy machine: as many compute threads as there are idle cores.

torch's CPU operators run on one OpenMP thread per core, and a thread that finds its core
taken by another process waits on it at every operator. Small operators (a one-token
suffix, a Lanczos step of one position) then take several times longer (measured in
docs/performance.md, "On a busy machine"). The command line counts the
idle cores it may run on (``/proc/stat`` over a tenth of a second) and, where fewer are idle
than torch would use, uses that many for the command and gives the setting back after (a
command that ran 10 s or more says so in one ``note:`` line at its end).
``OMP_NUM_THREADS`` or ``STABLE_REGIONS_THREADS`` (a number, or ``auto``) decide instead.
The library itself never changes the thread count: it is process-wide.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

SAMPLE_S = 0.1
NOTE_AFTER_S = 10.0  # a command this long says, at its end, that it ran on fewer threads

CpuTimes = dict[int, tuple[int, int]]  # cpu -> (idle ticks, all ticks)


def read_cpu_times(path: str = "/proc/stat") -> CpuTimes:
    """Per-CPU (idle + iowait, total) ticks from ``/proc/stat``; empty where unreadable."""
    out: CpuTimes = {}
    try:
        with open(path) as f:
            lines = f.readlines()
    except OSError:
        return out
    for line in lines:
        name, *fields = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit()) or len(fields) < 4:
            continue
        ticks = [int(x) for x in fields[:8]]  # user .. steal; guest time is inside user
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
        out[int(name[3:])] = (idle, sum(ticks))
    return out


def idle_cores(
    cpus: set[int], read: Callable[[], CpuTimes] = read_cpu_times, sample_s: float = SAMPLE_S
) -> float | None:
    """How many of ``cpus`` were idle over ``sample_s`` (a fraction per CPU, summed); ``None``
    where the counters cannot be read."""
    before = read()
    time.sleep(sample_s)
    after = read()
    seen = [c for c in cpus if c in before and c in after]
    if not seen:
        return None
    idle = 0.0
    for c in seen:
        ticks = after[c][1] - before[c][1]
        idle += 1.0 if ticks <= 0 else (after[c][0] - before[c][0]) / ticks
    return idle


def threads_for(requested: str | None, current: int, idle: float | None) -> int:
    """The thread count to use: ``requested`` (a number), else, under ``auto``, the idle
    cores rounded, at least 1, never more than ``current``."""
    if requested and requested != "auto":
        return max(1, int(requested))
    if idle is None:
        return current
    return max(1, min(current, int(idle + 0.5)))


@contextmanager
def fitted_threads(note: Callable[[str], None]) -> Iterator[None]:
    """Run the command with ``threads_for`` threads, and give torch its setting back after."""
    if "OMP_NUM_THREADS" in os.environ:
        yield
        return
    import torch

    current = torch.get_num_threads()
    requested = os.environ.get("STABLE_REGIONS_THREADS", "auto").strip()
    if not (requested == "auto" or requested.isdigit()):
        note(f"STABLE_REGIONS_THREADS={requested!r} is neither a number nor 'auto': ignored")
        requested = "auto"
    idle = None
    if requested == "auto" and current > 1:
        idle = idle_cores(set(os.sched_getaffinity(0)))
    chosen = threads_for(requested, current, idle)
    torch.set_num_threads(chosen)
    started = time.monotonic()
    try:
        yield
    finally:
        torch.set_num_threads(current)
        # said at the end, and only after long work: a one-line error stays one line
        if chosen != current and requested == "auto":
            if time.monotonic() - started >= NOTE_AFTER_S:
                note(
                    f"the machine was busy ({idle:.1f} of {current} cores idle): computed on "
                    f"{chosen} thread(s) (STABLE_REGIONS_THREADS=N to choose)"
                )
