"""``StabilityProcessor``: the monitor as a logits processor of vLLM's V1 engine.

vLLM hands it the batch's changes (``update_state``) and the logits of every step
(``apply``), before penalties, temperature and sampling; it returns the logits untouched.
It says it is not argmax-invariant on purpose: vLLM skips argmax-invariant processors
entirely when every request in the batch is greedy, and would then never show it a greedy
request's logits.
"""

from __future__ import annotations

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from .core import MonitorCore, request_options
from .head import unembedding


class StabilityProcessor(LogitsProcessor):
    """Per-token stability of the requests that ask for it (``extra_args``, see
    ``stable_regions.vllm``), in fast mode, written under a directory as JSON lines.

    Examples
    --------
    >>> llm = LLM(model, logits_processors=[StabilityProcessor])  # doctest: +SKIP
    >>> params = SamplingParams(extra_args={"stable_regions": {"eps": [0.1], "id": "a"}})
    >>> llm.generate(["The capital of France is"], params)  # doctest: +SKIP
    >>> sr.vllm.read("stable-regions-vllm")  # doctest: +SKIP
    """

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        model = vllm_config.model_config
        weight = unembedding(model.model, revision=model.revision, device=device)
        self.core = MonitorCore(weight)

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        request_options(sampling_params.extra_args)  # raises ValueError for bad options

    def is_argmax_invariant(self) -> bool:
        return False  # greedy requests are shown only to processors that are not

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        # vLLM's order: removed, then added, then moved
        for slot in batch_update.removed:
            self.core.remove(slot)
        for slot, params, _prompt_ids, output_ids in batch_update.added:
            self.core.add(slot, params.extra_args if params is not None else None, output_ids)
        for source, target, direction in batch_update.moved:
            self.core.move(source, target, swap=direction == MoveDirectionality.SWAP)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        self.core.observe(logits)
        return logits

    def __del__(self) -> None:  # the engine has no close hook for processors
        core = getattr(self, "core", None)
        if core is not None:
            core.close()
