"""Bench rows for the commands people wait on, each against one forward pass of the same
tokens with all their logits: the yardstick of the cost targets in docs/performance.md.

``ratio = forward_s / ours_s`` as in every row, so 0.33 is three forward passes. The
contenders alternate (``compare``), so a busy machine slows both sides alike.
"""

from __future__ import annotations

import torch

from ..models import ModelAdapter
from ..studies.analysis import analyze
from ..studies.jacobian import jacobian_profile
from .prompts import prompt_within
from .timing import compare, peak_rss_of, result_row

FINAL_TOKENS = 64  # the final-layer target's prompt: every position of 64 tokens


def _forward(adapter: ModelAdapter, ids: torch.Tensor):
    """One forward pass of ``ids`` with every position's logits, as the model runs it."""

    def run() -> None:
        with torch.no_grad():
            adapter.forward(ids, use_cache=False)

    return run


def rows_forward_multiples(adapter: ModelAdapter, s) -> list[dict]:
    """Final-layer ``analyze`` of every position of a 64-token prompt (with and without the
    measured boundary) and ``jacobian`` (one singular value per map) on a one-word prompt
    and on the 64-token one, each against a forward pass of the same tokens."""
    text = prompt_within(adapter, FINAL_TOKENS)
    ids = adapter.tokenize(text)
    forward = _forward(adapter, ids)
    rows = []
    for name, exact in (("final_analysis", True), ("final_analysis_no_exact", False)):

        def ours(exact=exact):
            return analyze(adapter, text, eps=[0.1, 1.0], positions="all", exact=exact)

        times = compare({"ours": ours, "forward": forward}, s.repeats)
        what = "measured boundary included" if exact else "no measured boundary"
        rows.append(
            result_row(
                name,
                f"one forward pass of the same {ids.shape[1]} tokens, all logits (analyze at "
                f"final, every position, eps 0.1 and 1, {what})",
                ours_s=times["ours"][0],
                baseline_s=times["forward"][0],
                peak_rss_mb=peak_rss_of(ours),
            )
        )
    layers = adapter.n_layers + 1  # the rows jacobian shows: the embedding and every block
    for words in ("hello", text):  # a one-word prompt and the long one
        ids = adapter.tokenize(words)

        def ours(words=words):
            return jacobian_profile(adapter, words, k=1)

        times = compare({"ours": ours, "forward": _forward(adapter, ids)}, 1)
        shown = f'"{words}"' if words == "hello" else f"a {ids.shape[1]}-token prompt"
        rows.append(
            result_row(
                "jacobian_per_layer",
                f"one forward pass of the same tokens per layer shown ({layers} layers; "
                f"jacobian -k 1 on {shown})",
                ours_s=times["ours"][0],
                baseline_s=times["forward"][0] * layers,
            )
        )
    return rows
