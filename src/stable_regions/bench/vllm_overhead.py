"""Benchmark rows of the vLLM processor: throughput of vLLM with ``StabilityProcessor``
against plain vLLM, the same prompts, greedy, ``min_tokens`` so every run makes the same
number of tokens (``ratio = plain_s / ours_s``: 1 means free).

- ``monitor_vllm_fast``: every request monitored (fast mode, eps 0.1), against a plain engine
  started in the same run without the processor;
- ``monitor_vllm_fast_same_engine``: the same, against unmonitored requests of the engine that
  has the processor, the two alternating (two engines differ by more than the processor's
  cost on a loaded CPU);
- ``monitor_vllm_not_asked``: the processor registered and no request asking, against the
  plain engine.

vLLM pins its own ``transformers``, so it usually lives in an environment of its own: the rows
run this module there as a child process (``$STABLE_REGIONS_VLLM_PYTHON``, else this Python if
it has vLLM), which prints one JSON line::

    python -m stable_regions.bench.vllm_overhead MODEL_DIR [BATCH] [TOKENS] [REPEATS]
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from .timing import result_row

PYTHON_VARIABLE = "STABLE_REGIONS_VLLM_PYTHON"
MARK = "VLLM-OVERHEAD "


def vllm_python() -> str | None:
    """A Python that has vLLM: ``$STABLE_REGIONS_VLLM_PYTHON``, else this one if it has it."""
    chosen = os.environ.get(PYTHON_VARIABLE)
    if chosen:
        return chosen
    return sys.executable if importlib.util.find_spec("vllm") is not None else None


def rows_monitor_vllm(adapter, s) -> list[dict]:
    python = vllm_python()
    model_dir = getattr(adapter.model.config, "_name_or_path", "") or adapter.name
    if python is None:
        return [
            result_row(
                "monitor_vllm_fast",
                f"not run: no Python with vLLM here (set ${PYTHON_VARIABLE}; docs/vllm.md)",
            )
        ]
    command = [python, "-m", __name__, str(model_dir), "8", str(s.monitor_tokens)]
    done = subprocess.run(command + [str(s.repeats)], capture_output=True, text=True, timeout=1800)
    lines = [x for x in done.stdout.splitlines() if x.startswith(MARK)]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return [result_row("monitor_vllm_fast", f"failed: {tail[0]}")]
    got = json.loads(lines[-1].removeprefix(MARK))
    what = f"vLLM, batch {got['batch']}, {got['tokens']} new tokens, greedy"
    return [
        result_row(
            "monitor_vllm_fast",
            f"plain {what}, a second engine (ratio = plain / monitored)",
            ours_s=got["monitored_s"],
            baseline_s=got["plain_s"],
        ),
        result_row(
            "monitor_vllm_fast_same_engine",
            f"{what}, the same engine's unmonitored requests (ratio = unmonitored / monitored)",
            ours_s=got["monitored_s"],
            baseline_s=got["registered_not_asked_s"],
        ),
        result_row(
            "monitor_vllm_not_asked",
            f"plain {what}; the processor registered, no request asking",
            ours_s=got["registered_not_asked_s"],
            baseline_s=got["plain_s"],
        ),
    ]


def measure(model_dir: str, batch: int, tokens: int, repeats: int) -> dict:
    """The three timings (medians of ``repeats``), in this process, which must have vLLM."""
    from vllm import LLM, SamplingParams

    from ..prompts import corpus

    prompts = [p.text for p in list(corpus())[:batch]]
    records = tempfile.mkdtemp(prefix="vllm-overhead-")

    def params(monitored: bool) -> SamplingParams:
        extra = {"stable_regions": {"eps": [0.1], "dir": records}} if monitored else None
        return SamplingParams(
            max_tokens=tokens, min_tokens=tokens, temperature=0.0, extra_args=extra
        )

    def timed(llm, monitored: bool) -> float:
        start = time.perf_counter()
        llm.generate(prompts, params(monitored), use_tqdm=False)
        return time.perf_counter() - start

    common = dict(
        gpu_memory_utilization=0.15, max_model_len=1024, dtype="float32", enforce_eager=True
    )
    out = {"batch": batch, "tokens": tokens, "repeats": repeats}
    plain = LLM(model=model_dir, **common)
    timed(plain, False)  # warm-up
    out["plain_s"] = statistics.median(timed(plain, False) for _ in range(repeats))
    del plain
    llm = LLM(
        model=model_dir, logits_processors=["stable_regions.vllm:StabilityProcessor"], **common
    )
    timed(llm, False)
    timed(llm, True)
    not_asked, monitored = [], []
    for _ in range(repeats):  # alternating
        not_asked.append(timed(llm, False))
        monitored.append(timed(llm, True))
    out["registered_not_asked_s"] = statistics.median(not_asked)
    out["monitored_s"] = statistics.median(monitored)
    return out


if __name__ == "__main__":  # vLLM's engine core is a child process: the guard is needed
    args = sys.argv[1:]
    numbers = [int(a) for a in args[1:]] + [8, 32, 3][len(args) - 1 :]
    print(MARK + json.dumps(measure(args[0], *numbers[:3])), flush=True)
