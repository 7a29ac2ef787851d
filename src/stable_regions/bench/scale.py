"""Benchmark rows at the scale users study: a random-weight model with the shape of a 1B
Llama-3, built in the bench itself (no weights needed).

Random weights say nothing about accuracy; they say everything about memory and time. Each
row runs one of the commands' own code paths on that model, timed once, with the process's
peak RSS while it ran, and one forward pass over the same tokens as the yardstick
(``ratio = forward_s / ours_s``). ``--quick`` keeps the width and the 128k vocabulary (what
the vocabulary-side costs depend on) but builds 2 blocks instead of 16 and runs fewer
positions.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import torch

from ..models import ModelAdapter, wrap
from ..studies.analysis import analyze
from ..studies.scan import Scanner
from .timing import compare, peak_rss_mb, reset_peak_rss, result_row, timed


@dataclass(frozen=True)
class ScaleShape:
    name: str = "llama3-1b-shape"
    hidden_size: int = 2048
    intermediate_size: int = 8192
    layers: int = 16
    heads: int = 32
    kv_heads: int = 8
    vocab_size: int = 128256
    final_positions: int = 64
    scan_tokens: int = 512

    @classmethod
    def make(cls, quick: bool) -> ScaleShape:
        if quick:
            return cls(
                name="llama3-1b-shape, 2 blocks", layers=2, final_positions=64, scan_tokens=128
            )
        return cls()


def build_model(shape: ScaleShape, tokenizer, seed: int = 0) -> ModelAdapter:
    """A Llama-3-shaped causal LM with random weights (float32, eager attention) around a
    tokenizer whose ids fit its vocabulary."""
    import transformers as T

    config = T.LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32
    )
    return wrap(model.eval().requires_grad_(False), tokenizer, name=shape.name)


def _tokens(adapter: ModelAdapter, n: int) -> str:
    """A text of at least ``n`` tokens, cut to ``n``."""
    text = "The capital of France is Paris, and the capital of Germany is Berlin. " * (n // 8 + 1)
    ids = adapter.tokenize(text, any_length=True)[0, :n]
    return adapter.tokenizer.decode(ids)


def rows_scale(adapter: ModelAdapter, s) -> list[dict]:
    """Final-layer analysis of many positions, one inner position at the middle block, and a
    document scan, on the random 1B-shaped model (``s.quick``: the reduced variant)."""
    shape = ScaleShape.make(s.quick)
    build_s, big = timed(lambda: build_model(shape, adapter.tokenizer))
    weights_mb = sum(p.numel() * p.element_size() for p in big.model.parameters()) / 2**20
    label = f"{shape.name}, weights {weights_mb:.0f} MB, built in {build_s:.0f} s"
    rows = []
    prompt = _tokens(big, shape.final_positions)
    document = big.tokenize(_tokens(big, shape.scan_tokens))
    mid = shape.layers // 2
    jobs = {
        "scale_final_analysis": (
            lambda: analyze(big, prompt, eps=[0.1, 1.0], positions="all"),
            big.tokenize(prompt),
            f"{shape.final_positions} positions, measured boundary included",
        ),
        "scale_final_analysis_no_exact": (
            lambda: analyze(big, prompt, eps=[0.1, 1.0], positions="all", exact=False),
            big.tokenize(prompt),
            f"{shape.final_positions} positions, no measured boundary",
        ),
        "scale_inner_position": (
            lambda: analyze(big, prompt, eps=[0.1, 1.0], positions="last", layer=mid),
            big.tokenize(prompt),
            f"block {mid}, last of {shape.final_positions} tokens",
        ),
        "scale_scan": (
            lambda: Scanner(big).scan(big, document, [0.1]),
            document,
            f"{shape.scan_tokens} tokens",
        ),
    }
    for name, (fn, ids, what) in jobs.items():
        gc.collect()
        reset_peak_rss()
        ours_s, _ = timed(fn)
        peak = round(peak_rss_mb(), 1)

        def forward(ids=ids):  # every position's logits: the head is the cost at 128k
            with torch.no_grad():
                big.forward(ids, use_cache=False)

        (forward_s, _) = compare({"forward": forward}, 1)["forward"]
        rows.append(
            result_row(
                name,
                f"one forward pass of the same tokens, all logits ({what}; {label})",
                ours_s=ours_s,
                baseline_s=forward_s,
                peak_rss_mb=peak,
            )
        )
    return rows
