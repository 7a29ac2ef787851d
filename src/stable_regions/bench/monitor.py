"""Benchmark rows of the generation monitor: ``generate`` with and without a
``StabilityMonitor``, the same tokens, at batch 1 and batch 8, the two alternating
(``ratio = plain_s / monitored_s``: 1 means free). ``max_rel_err`` is the fraction of output
tokens that differ between the two runs (0: the monitor never changes the scores).

What the monitor costs per step (V x d the head, B the batch): fast mode one product of
2B vectors with W (bfloat16 where native) and O(V) sums per row; exact mode a Lanczos search
(a few such products, in lockstep for the batch), one float32 product, and the exact roots
(O(V) per Newton step). The forward pass reads every weight once per step for the whole
batch, so at batch 1 one extra pass over W costs about the head's share of the weights.
"""

from __future__ import annotations

import torch

from ..prompts import corpus
from ..studies.monitor import StabilityMonitor
from .timing import compare, peak_rss_of, result_row

BATCHES = (1, 8)
PROMPT_TOKENS = 24  # each prompt cut to this many tokens: equal lengths, no padding effects


def _prompts(adapter, batch: int, new_tokens: int = 0) -> torch.Tensor:
    """``batch`` corpus prompts cut to the same length (``PROMPT_TOKENS``, or less where the
    model's context would not hold them and ``new_tokens`` more)."""
    length = PROMPT_TOKENS
    if adapter.context_length is not None:
        length = max(1, min(length, adapter.context_length - new_tokens))
    rows = []
    for p in corpus():
        ids = adapter.tokenize(p.text, any_length=True)[0]
        if len(ids) >= length:
            rows.append(ids[:length])
        if len(rows) == batch:
            break
    while len(rows) < batch:  # a tiny corpus: repeat
        rows.append(rows[len(rows) % max(1, len(rows))])
    return torch.stack(rows).to(adapter.device)


def rows_monitor(adapter, s) -> list[dict]:
    tokens = s.monitor_tokens
    out = []
    for mode in ("fast", "exact"):
        for batch in BATCHES:
            ids = _prompts(adapter, batch, tokens)
            monitor = StabilityMonitor(adapter, eps=[0.1], mode=mode)
            pad = adapter.model.generation_config.eos_token_id
            pad = pad[0] if isinstance(pad, list) else pad
            options = dict(
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=pad,
                attention_mask=torch.ones_like(ids),
            )

            def plain(ids=ids, options=options):
                with torch.no_grad():
                    return adapter.model.generate(ids, **options)

            def monitored(ids=ids, options=options, monitor=monitor):
                monitor.reset()
                with torch.no_grad():
                    result = adapter.model.generate(ids, logits_processor=[monitor], **options)
                monitor.finish(result)
                return result

            got = compare({"monitored": monitored, "plain": plain}, s.repeats)
            (ours_s, a), (base_s, b) = got["monitored"], got["plain"]
            differ = float((a != b).float().mean()) if a.shape == b.shape else 1.0
            out.append(
                result_row(
                    f"monitor_generate_{mode}",
                    f"plain generate, batch {batch}, {tokens} new tokens, greedy "
                    f"(ratio = plain / monitored)",
                    ours_s=ours_s,
                    baseline_s=base_s,
                    max_rel_err=differ,
                    peak_rss_mb=peak_rss_of(monitored),
                )
            )
    return out
