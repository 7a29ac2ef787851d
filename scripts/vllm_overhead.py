"""Throughput of vLLM with the stability processor against plain vLLM, one process, the
same prompts, greedy: the processor not registered, registered with no request asking for
it, and every request monitored (fast mode, eps 0.1). Run in the serving environment
(.ci/serving-env); prints one JSON line.

    /tmp/stable-regions-serving/bin/python scripts/vllm_overhead.py MODEL_DIR [BATCH] [TOKENS]
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time


def main(model_dir: str, batch: int, tokens: int, repeats: int = 3) -> None:
    from vllm import LLM, SamplingParams

    from stable_regions.prompts import corpus

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
    opted_out, monitored = [], []
    for _ in range(repeats):  # alternating
        opted_out.append(timed(llm, False))
        monitored.append(timed(llm, True))
    out["registered_not_asked_s"] = statistics.median(opted_out)
    out["monitored_s"] = statistics.median(monitored)
    out["ratio_not_asked"] = round(out["plain_s"] / out["registered_not_asked_s"], 3)
    out["ratio_monitored"] = round(out["plain_s"] / out["monitored_s"], 3)
    print("VLLM-OVERHEAD " + json.dumps(out), flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0], int(args[1]) if len(args) > 1 else 8, int(args[2]) if len(args) > 2 else 32)
