"""``stable_regions.generate``: generate text with a ``StabilityMonitor`` attached.

Prompts are left-padded into one batch; decoding is greedy or sampled (``seed`` makes
sampling repeatable without touching the caller's random state). Each sequence's rows stop
at its first end-of-sequence token (after it ``generate`` only pads).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from .errors import StableRegionsError
from .inputs import as_adapter, check_eps
from .models.precision import full_float32_products
from .monitor import StabilityMonitor, check_mode


def check_new_tokens(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise StableRegionsError(f"max_new_tokens must be a whole number >= 1, got {n!r}")
    return n


@full_float32_products()
def generate(
    model,
    prompts: str | Sequence[str],
    max_new_tokens: int = 32,
    eps: float | Sequence[float] = (0.1,),
    mode: str = "fast",
    greedy: bool = True,
    seed: int | None = None,
    **monitor_options,
) -> tuple[str | list[str], pd.DataFrame]:
    """Generate from one prompt or several and record stability per generated token.

    Returns the generated text (a list for a list of prompts) and a DataFrame with one row
    per generated token and eps (``StabilityMonitor.to_frame``'s columns; ``sequence`` is
    the prompt's index). ``monitor_options``: ``threshold``, ``directions``, ``certified``,
    ``callback`` (see ``StabilityMonitor``).
    """
    adapter = as_adapter(model)
    max_new_tokens = check_new_tokens(max_new_tokens)
    check_eps(eps)
    check_mode(mode)
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    if not texts or not all(isinstance(t, str) and t for t in texts):
        raise StableRegionsError("give one or more non-empty prompts")
    monitor = StabilityMonitor(adapter, eps, mode=mode, **monitor_options)
    ids, mask = _batch(adapter, texts)
    eos = adapter.model.generation_config.eos_token_id
    eos_ids = set([eos] if isinstance(eos, int) else (eos or []))
    pad = adapter.tokenizer.pad_token_id if adapter.tokenizer is not None else None
    pad = pad if pad is not None else next(iter(eos_ids), 0)
    # a seed reseeds every CUDA device too (torch.manual_seed): their states are restored
    # after, as the CPU's is, so the user's random streams continue as if we had not run
    cuda = list(range(torch.cuda.device_count())) if seed is not None else []
    with torch.random.fork_rng(devices=cuda), torch.no_grad(), adapter.running():
        if seed is not None:
            torch.manual_seed(seed)
        out = adapter.model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=not greedy,
            logits_processor=[monitor],
            pad_token_id=pad,
        )
    monitor.finish(out)
    frame = _trim(monitor.to_frame(), eos_ids)
    new = out[:, ids.shape[1] :]
    decoded = []
    for row in range(len(texts)):
        steps = frame.loc[frame["sequence"] == row, "step"]
        n = int(steps.max()) + 1 if len(steps) else 0
        decoded.append(adapter.tokenizer.decode(new[row, :n], skip_special_tokens=True))
    frame = frame.drop(columns="generation")
    return (decoded[0] if single else decoded), frame


def _batch(adapter, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask (each prompt checked as ``tokenize`` checks it)."""
    rows = [adapter.tokenize(t)[0] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long, device=adapter.device)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask


def _trim(frame: pd.DataFrame, eos_ids: set[int]) -> pd.DataFrame:
    """Drop each sequence's rows after its first end-of-sequence token."""
    if frame.empty or not eos_ids:
        return frame.reset_index(drop=True)
    ends = frame[frame["token_id"].isin(eos_ids)].groupby("sequence")["step"].min()
    last = frame["sequence"].map(ends).fillna(float("inf"))
    return frame[frame["step"] <= last].reset_index(drop=True)
