"""The benchmark (``stable-regions bench``): our answers against the tools people would use
instead, timed side by side. Outside the core import path: ``import stable_regions`` does not
load it."""

from .rows import ROWS, BenchSettings, run_bench, write_bench
from .timing import compare

__all__ = ["ROWS", "BenchSettings", "compare", "run_bench", "write_bench"]
