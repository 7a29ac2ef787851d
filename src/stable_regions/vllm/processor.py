"""``StabilityProcessor``: the monitor as a logits processor of vLLM's engine, under both of
its model runners.

- **V1 interface** (``vllm.v1.sample.logits_processor``; the CPU runner's default): vLLM hands
  it the batch's changes (``update_state``) and each step's logits (``apply(logits)``), before
  penalties, temperature and sampling, with each request's live list of output ids.
- **Model Runner V2** (``vllm.v1.worker.gpu.sample.logits_processor``; recent vLLM's default
  on GPUs): ``add_request(slot, params)`` when a request takes a slot, and
  ``apply(logits, ctx)`` with the row-to-slot mapping; the sampled tokens are on the device,
  in the runner's ``all_token_ids`` and ``total_len``, and are mirrored into host lists with
  two reads per step (``runner.RunnerSlots``). V2 shows processors the logits after logit bias,
  penalties and bad words.

One class serves both: vLLM checks a processor's class against the interface its runner uses,
and this one derives from both, and tells them apart by the constructor's arguments. The
logits are returned untouched.

It says it is not argmax-invariant on purpose: vLLM's V1 sampler skips argmax-invariant
processors entirely when every request in the batch is greedy, and would then never show it
a greedy request's logits. Under V2, ``add_request`` answers True only for the requests that
ask to be monitored, and vLLM calls ``apply`` only for batches that hold one.
"""

from __future__ import annotations

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
from vllm.v1.sample.logits_processor import LogitsProcessor as V1Processor
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as V2Processor

from .core import MonitorCore, request_options
from .head import unembedding
from .runner import RunnerSlots, slot_of_row


class StabilityProcessor(V1Processor, V2Processor):
    """Per-token stability of the requests that ask for it (``extra_args``, see
    ``stable_regions.vllm``), in fast mode, written under a directory as JSON lines.

    Examples
    --------
    >>> llm = LLM(model, logits_processors=[StabilityProcessor])  # doctest: +SKIP
    >>> params = SamplingParams(extra_args={"stable_regions": {"eps": [0.1], "id": "a"}})
    >>> llm.generate(["The capital of France is"], params)  # doctest: +SKIP
    >>> sr.vllm.read("stable-regions-vllm")  # doctest: +SKIP
    """

    def __init__(self, vllm_config, device_or_states, is_pin_memory: bool | None = None) -> None:
        # V1 builds it with (config, device, is_pin_memory), V2 with (config, request states)
        v1 = isinstance(device_or_states, torch.device | str)
        device = torch.device(device_or_states) if v1 else device_or_states.device
        model = vllm_config.model_config
        weight = unembedding(model.model, revision=model.revision, device=device)
        self.core = MonitorCore(weight)
        self.runner = None if v1 else RunnerSlots(self.core, device_or_states)

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        request_options(sampling_params.extra_args)  # raises ValueError for bad options

    def is_argmax_invariant(self) -> bool:
        return False  # greedy requests are shown only to processors that are not

    # ------------------------------------------------------------ V1
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

    # ------------------------------------------------------------ V2
    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        return self.runner.add(req_idx, sampling_params.extra_args)

    # ------------------------------------------------------------ both
    def apply(self, logits: torch.Tensor, ctx=None) -> torch.Tensor:
        if ctx is None:  # V1: row i is slot i
            self.core.observe(logits)
        else:
            rows = slot_of_row(
                logits.shape[0],
                ctx.idx_mapping_np,
                ctx.expanded_idx_mapping,
                ctx.expanded_local_pos,
            )
            self.runner.observe(logits, rows)
        return logits

    def __del__(self) -> None:  # the engine has no close hook for processors
        core = getattr(self, "core", None)
        if core is not None:
            core.close()
