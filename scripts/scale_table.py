"""Time and peak memory of the engine's three main paths across model sizes.

For each model (the two bundled ones, and random-weight models with the shapes of Qwen2-0.5B
and Llama-3-1B built from their configs) and each task (final-layer analysis of every
position of a 64-token prompt, one inner position at the middle block with its measured
boundary, a 512-token document scan), one fresh process loads or builds the model, resets
its peak-RSS mark and runs the task once: the peak is the model plus what the task
allocated. Writes docs/bench/scale.json and prints a markdown table.

    python scripts/scale_table.py                   # every model and task (~10 min here)
    python scripts/scale_table.py --one MODEL TASK  # one cell, JSON on stdout
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["smollm2-135m", "gemma3-270m", "qwen2-0.5b-shape", "llama3-1b-shape"]
TASKS = ["final_64", "inner_mid", "scan_512"]
TEXT = "The capital of France is Paris, and the capital of Germany is Berlin. " * 80


def build(name: str):
    import torch
    import transformers as T

    import stable_regions as sr

    if name in ("smollm2-135m", "gemma3-270m"):
        return sr.load(name, device="cpu", dtype="float32")
    from stable_regions.bench.scale import ScaleShape, build_model

    tokenizer = sr.load("smollm2-135m").tokenizer  # its ids fit both vocabularies
    if name == "llama3-1b-shape":  # the bench's own 1B model
        return build_model(ScaleShape(name=name), tokenizer)
    config = T.Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32
    )
    return sr.wrap(model.eval().requires_grad_(False), tokenizer, name=name)


def one(name: str, task: str) -> dict:
    import stable_regions as sr
    from stable_regions.bench.timing import peak_rss_mb, reset_peak_rss
    from stable_regions.studies.scan import Scanner

    adapter = build(name)
    weights_mb = sum(p.numel() * p.element_size() for p in adapter.model.parameters()) / 2**20
    ids = adapter.tokenize(TEXT, any_length=True)
    prompt = adapter.tokenizer.decode(ids[0, :64])
    document = ids[:, :512]
    runs = {
        "final_64": lambda: sr.analyze(adapter, prompt, eps=[0.1, 1.0], positions="all"),
        "inner_mid": lambda: sr.analyze(
            adapter, prompt, eps=[0.1, 1.0], positions="last", layer=adapter.n_layers // 2
        ),
        "scan_512": lambda: Scanner(adapter).scan(adapter, document, [0.1]),
    }
    reset_peak_rss()
    start = time.perf_counter()
    runs[task]()
    seconds = time.perf_counter() - start
    return dict(
        model=name,
        task=task,
        seconds=round(seconds, 2),
        peak_mb=round(peak_rss_mb(), 1),
        weights_mb=round(weights_mb, 1),
        vocab=adapter.vocab_size,
        d_model=adapter.d_model,
        blocks=adapter.n_layers,
        parameters_m=round(sum(p.numel() for p in adapter.model.parameters()) / 1e6, 1),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "TASK"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench" / "scale.json"))
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one)))
        return
    rows = []
    for name in MODELS:
        for task in TASKS:
            proc = subprocess.run(
                [sys.executable, __file__, "--one", name, task],
                capture_output=True,
                text=True,
                check=True,
            )
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(rows[-1], file=sys.stderr, flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    print("| model | params (M) | V | d | blocks | task | time | peak RSS | weights |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['parameters_m']:.0f} | {r['vocab']} | {r['d_model']} | "
            f"{r['blocks']} | {r['task']} | {r['seconds']:.1f} s | {r['peak_mb']:.0f} MB | "
            f"{r['weights_mb']:.0f} MB |"
        )


if __name__ == "__main__":
    main()
