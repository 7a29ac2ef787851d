"""``generate`` served by vLLM: the same call and result as ``stable_regions.generate`` in
fast mode, with vLLM's engine generating and ``StabilityProcessor`` recording. Imports vLLM.

For a one-command try (``stable-regions generate PROMPT --engine vllm``) and for comparing the
two engines on the same prompts; a server keeps its own engine (docs/vllm.md).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from .._support.inputs import check_eps
from ..errors import InvalidParameterError
from ..models.device import resolve_device, resolve_dtype
from ..models.store import BUNDLED, DEFAULT_MODEL, installed_dir
from ..studies.generation import GenerationResult, check_new_tokens
from ..studies.monitor import monitor_columns
from ..vocabulary import describe
from .head import checkpoint_dir
from .records import read

PROCESSOR = "stable_regions.vllm:StabilityProcessor"
CPU_MEMORY_SHARE = 0.15  # vLLM's CPU backend reserves this share of host memory


def served_checkpoint(model: str | None, revision: str | None = None) -> Path:
    """The directory vLLM serves: a bundled model's converted folder (installed), a model
    directory, or a Hub id's snapshot in the local cache. A GGUF file is refused."""
    name = model or DEFAULT_MODEL
    if name in BUNDLED:
        return installed_dir(name)
    if name.endswith(".gguf"):
        raise InvalidParameterError(
            f"{name}: --engine vllm serves safetensors checkpoints; convert it first "
            "(`stable-regions models install` converts the bundled GGUFs)"
        )
    return checkpoint_dir(name, revision)


def engine_dtype(dtype: str) -> str:
    """Our ``--dtype`` words in vLLM's, resolved as for the Hugging Face engine
    (``models.device.resolve_dtype``: ``auto`` is float32 on the CPU, bfloat16 on a GPU that
    has it); ``stored`` is vLLM's ``auto``."""
    if dtype == "stored":
        return "auto"
    return str(resolve_dtype(dtype, resolve_device("auto"))).removeprefix("torch.")


def generate(
    model: str | None,
    prompts: str | Sequence[str],
    *,
    max_new_tokens: int = 32,
    eps: float | Sequence[float] = (0.1,),
    greedy: bool = True,
    seed: int | None = None,
    chat: bool = False,
    threshold: float | None = None,
    dtype: str = "auto",
    revision: str | None = None,
    progress: bool = True,
    engine_options: dict | None = None,
) -> GenerationResult:
    """Generate with vLLM and record every new token's stability in fast mode.

    Parameters are those of :func:`stable_regions.generate`, less what vLLM cannot give a
    logits processor (``mode="exact"``, ``directions`` at the pre-logit vector), plus
    ``engine_options`` for ``vllm.LLM`` and ``progress`` (vLLM's progress bar on stderr).
    ``model`` is a bundled name, a model directory or a Hub id in the local cache. The frame
    has the Hugging Face engine's columns. The engine is started for the call and shut down
    after it (on a GPU it takes vLLM's default share of the device's memory while it runs).
    It runs eager (``enforce_eager``: no compilation, no CUDA graphs), which starts sooner
    than the compiled model would pay back in one call; ``engine_options={"enforce_eager":
    False}`` compiles.

    Examples
    --------
    >>> result = sr.vllm.generate("smollm2-135m", "The capital of France is")  # doctest: +SKIP
    >>> result.summary()  # doctest: +SKIP
    """
    from transformers import AutoTokenizer
    from vllm import LLM

    max_new_tokens = check_new_tokens(max_new_tokens)
    eps_list = check_eps(eps)
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    if not texts or not all(isinstance(t, str) and t for t in texts):
        raise InvalidParameterError("give one or more non-empty prompts")
    path = served_checkpoint(model, revision)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    ids = [_prompt_ids(tokenizer, t, chat) for t in texts]
    # the KV cache vLLM reserves: for these prompts, not the model's whole context; eager:
    # compiling the model (a minute for SmolLM2 on a CPU) does not pay back in one call
    options = {"dtype": engine_dtype(dtype), "seed": 0 if seed is None else seed}
    options["enforce_eager"] = True
    options["max_model_len"] = max(len(r) for r in ids) + max_new_tokens
    if not torch.cuda.is_available():
        options["gpu_memory_utilization"] = CPU_MEMORY_SHARE
    llm = LLM(str(path), logits_processors=[PROCESSOR], **{**options, **(engine_options or {})})
    try:
        outputs, records = _run(
            llm,
            ids,
            max_new_tokens=max_new_tokens,
            eps=eps_list,
            greedy=greedy,
            seed=seed,
            tokenizer=tokenizer,
            progress=progress,
        )
    finally:  # the engine core is a child process: not left running after the call
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
    frame = _as_generation_frame(records, threshold)
    text = [o.outputs[0].text for o in outputs]
    name = model or DEFAULT_MODEL
    return GenerationResult(name, texts, text[0] if single else text, "fast", eps_list, frame)


def _run(llm, ids, *, max_new_tokens, eps, greedy, seed, tokenizer, progress):
    """vLLM's outputs and the records of every request (each monitored, under a temporary
    directory)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    with tempfile.TemporaryDirectory(prefix="stable-regions-vllm-") as folder:
        params = [
            SamplingParams(
                max_tokens=max_new_tokens,
                temperature=0.0 if greedy else 1.0,
                seed=None if greedy or seed is None else seed + i,
                extra_args={"stable_regions": {"eps": eps, "id": str(i), "dir": folder}},
            )
            for i in range(len(ids))
        ]
        prompts_in = [TokensPrompt(prompt_token_ids=r) for r in ids]
        outputs = llm.generate(prompts_in, params, use_tqdm=progress)
        delivered = sum(len(o.outputs[0].token_ids) for o in outputs) * len(eps)
        records = read(folder, tokenizer=tokenizer, settle_s=0.3)
        if len(records) < delivered:  # the flush may lag a loaded machine: once more
            records = read(folder, tokenizer=tokenizer, settle_s=2.0)
    return outputs, records


def _prompt_ids(tokenizer, text: str, chat: bool) -> list[int]:
    if not chat:
        return list(tokenizer(text)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidParameterError("this model's tokenizer has no chat template: leave out --chat")
    messages = [{"role": "user", "content": text}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


def _as_generation_frame(records: pd.DataFrame, threshold: float | None) -> pd.DataFrame:
    """The records in the Hugging Face engine's layout and column order: ``sequence`` (the
    prompt's index) for ``request``, and ``fragile`` against ``threshold`` where one is
    given."""
    frame = records.rename(columns={"request": "sequence"})
    frame["sequence"] = frame["sequence"].astype(int)
    frame = frame[frame.chosen_token_id >= 0]  # a step whose token was never sampled
    if threshold is not None:
        frame["fragile"] = frame["radius_curve"] < float(threshold)
    frame = frame.sort_values(["sequence", "step", "eps"], kind="stable")
    columns = [c for c in monitor_columns() if c != "generation"]
    return describe(frame[columns].reset_index(drop=True))
