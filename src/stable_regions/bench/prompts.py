"""The bench's prompts: the shipped corpus, cut to a number of tokens."""

from __future__ import annotations

import torch

from ..errors import StableRegionsError
from ..models import ModelAdapter
from ..prompts import corpus


def prompt_text(adapter: ModelAdapter, n_tokens: int) -> str:
    """The shipped corpus concatenated until at least ``n_tokens`` tokens (or the context)."""
    text = ""
    for p in corpus():
        longer = f"{text}\n\n{p.text}" if text else p.text
        try:
            ids = adapter.tokenize(longer)
        except StableRegionsError:  # past the model's context: keep what fitted
            return text or _longest_fitting(adapter, p.text)
        text = longer
        if ids.shape[1] >= n_tokens:
            break
    return text


def _longest_fitting(adapter: ModelAdapter, text: str) -> str:
    """The longest run of ``text``'s first words within the model's context."""
    words = text.split()
    while len(words) > 1:
        words = words[: len(words) * 3 // 4]
        try:
            adapter.tokenize(" ".join(words))
            break
        except StableRegionsError:
            continue
    return " ".join(words)


def prompt_ids(adapter: ModelAdapter, n_tokens: int) -> torch.Tensor:
    """The shipped corpus concatenated until ``n_tokens`` tokens, then cut there."""
    return adapter.tokenize(prompt_text(adapter, n_tokens))[:, :n_tokens]


def prompt_within(adapter: ModelAdapter, n_tokens: int) -> str:
    """The longest run of the corpus's first words that tokenizes to at most ``n_tokens``
    tokens (a text to pass to the commands, which take text, not ids)."""
    return words_within(adapter, prompt_text(adapter, n_tokens), n_tokens)


def words_within(adapter: ModelAdapter, text: str, n_tokens: int) -> str:
    """The longest run of ``text``'s first words that tokenizes to at most ``n_tokens``."""
    words = text.split()
    lo, hi = 1, len(words)  # the most words that fit, by bisection
    while lo < hi:
        mid = (lo + hi + 1) // 2
        try:
            fits = adapter.tokenize(" ".join(words[:mid])).shape[1] <= n_tokens
        except StableRegionsError:  # past the model's context
            fits = False
        lo, hi = (mid, hi) if fits else (lo, mid - 1)
    return " ".join(words[:lo])
