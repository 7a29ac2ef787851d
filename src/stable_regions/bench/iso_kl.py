"""Benchmark rows of the iso-KL coefficient (``studies.iso_kl``): the teacher-forced
measurement and the prediction from jets against the rollout definition, side by side in one
call (``ratio = rollout seconds / form seconds``; ``max_rel_err``: ``|coef / coef_rollout -
1|``; the baseline text gives the forward-pass tokens of each).

The vector: the mean difference of the shipped sentiment sets at the middle block; the
prompts: the first held-out corpus prompts of prose and dialogue kinds, each cut to its first
``PROMPT_TOKENS`` tokens' worth of words.
"""

from __future__ import annotations

import math

from ..prompts import corpus, sentiment_prompts
from ..studies.iso_kl import iso_kl
from ..studies.steering import mean_difference
from ..studies.validation import held_out_corpus
from .prompts import words_within
from .timing import result_row

TARGET, STAT = 0.5, "p95"
PROMPT_TOKENS = 24  # each prompt's first words up to this many tokens


def rows_iso_kl(adapter, s) -> list[dict]:
    layer = adapter.n_layers // 2
    positive, negative = sentiment_prompts()
    vector = mean_difference(adapter, positive, negative, layer=layer).float()
    held = set(held_out_corpus())
    count, tokens = (2, 8) if s.quick else (4, 16)
    room = PROMPT_TOKENS
    if adapter.context_length is not None:
        room = min(room, adapter.context_length - tokens - 1)
    texts = [p.text for p in corpus() if p.text in held and p.kind in ("prose", "dialogue")]
    prompts = [words_within(adapter, t, room) for t in texts[:count]]
    result = iso_kl(
        adapter, prompts, vector=vector, layer=layer, target=TARGET, stat=STAT,
        tokens=tokens,
    )  # fmt: skip
    row = result.rows[0]
    what = (
        f"{STAT} of per-token KL = {TARGET} nats over {tokens} tokens, {count} prompts, block "
        f"{layer}: the rollout definition solved ({row['evaluations_rollout']} evaluations, "
        f"{row['forward_tokens_rollout']} forward-pass tokens)"
    )
    out = []
    for form in ("measured", "predicted"):
        coef = row[f"coef_{form}"]
        err = abs(coef / row["coef_rollout"] - 1) if row["reached"] else math.nan
        out.append(
            result_row(
                f"iso_kl_{form}",
                f"{what}; this form {row[f'forward_tokens_{form}']} tokens",
                ours_s=row[f"seconds_{form}"],
                baseline_s=row["seconds_rollout"],
                max_rel_err=err,
            )
        )
    return out
