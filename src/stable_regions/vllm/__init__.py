"""Stability of every generated token where models are served: a vLLM logits processor.

``StabilityProcessor`` (vLLM's V1 engine and Model Runner V2; importing it needs vLLM)
watches the requests that ask for it and writes one record per token and eps under a
directory; ``read`` (no vLLM needed) returns them as a frame. docs/vllm.md has the set-up,
the cost and what this mode cannot give (exact mode and inner layers need hidden states, which vLLM does not show a
logits processor). ``generate`` is ``stable_regions.generate`` served by vLLM::

    from vllm import LLM, SamplingParams
    llm = LLM(model, logits_processors=["stable_regions.vllm:StabilityProcessor"])
    params = SamplingParams(max_tokens=32, extra_args={"stable_regions": {"eps": [0.1]}})
    llm.generate(prompts, params)
    frame = stable_regions.vllm.read("stable-regions-vllm")
"""

from __future__ import annotations

from .core import OPTION, RequestOptions, request_options
from .live import live
from .records import read

__all__ = [
    "OPTION",
    "RequestOptions",
    "StabilityProcessor",
    "generate",
    "live",
    "read",
    "request_options",
]


def __getattr__(name: str):
    if name == "StabilityProcessor":  # imports vLLM: only when asked for
        from .processor import StabilityProcessor

        return StabilityProcessor
    if name == "generate":  # vLLM's engine in a one-call generate
        from .generation import generate

        return generate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
