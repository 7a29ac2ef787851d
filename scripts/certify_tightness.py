"""Tightness and cost of ``certify`` at the pre-logit vector (docs/certify.md).

    python scripts/certify_tightness.py --model smollm2-135m --prompts 12 --out DIR

Every position of the corpus prompts 1, 1 + step, ... (the odd lines: the validation study's
held-out half starts there): median and p10 of radius_certified / radius_attack per eps,
and, on one 64-token prompt, the time of ``certify`` against ``analyze --no-exact`` (same
process, warmed up, then alternated three times, best of three). ``--timing-file FILE``
also records that timing under the model's name in FILE (docs/certify/timing.json), keeping
the other models' entries.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

import stable_regions as sr
from stable_regions import certify
from stable_regions.prompts import corpus as load_corpus


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--norm", default="l2")
    ap.add_argument(
        "--layer",
        default="final",
        help="final, or a block index (the last block: through the final norm)",
    )
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--timing-file", type=Path, help="a JSON file of timings by model to update")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    adapter = sr.load(args.model)
    corpus = load_corpus()
    step = max(1, len(corpus) // args.prompts)
    frames = []
    for i in range(1, len(corpus), step)[: args.prompts]:
        layer = int(args.layer) if args.layer.isdigit() else args.layer
        frame = certify(adapter, corpus[i].text, layer=layer, norm=args.norm).to_frame()
        frame["prompt"] = i
        frames.append(frame)
        print(f"prompt {i}: {len(frame)} rows", flush=True)
    table = pd.concat(frames, ignore_index=True)
    tag = args.norm if args.layer == "final" else f"{args.norm}-{args.layer}"
    table.to_parquet(args.out / f"tightness-{tag}.parquet")
    summary = {
        str(e): {
            "n": int(len(g)),
            "median": float(g.tightness.median()),
            "p10": float(g.tightness.quantile(0.1)),
            "certified_over_attack_max": float(g.tightness.max()),
        }
        for e, g in table.groupby("eps")
    }
    result = {"model": args.model, "norm": args.norm, "layer": args.layer, "tightness": summary}
    if not args.no_timing:
        result["seconds"] = timing_of(adapter, corpus, args.norm)
        if args.timing_file is not None:
            path = args.timing_file
            timings = json.loads(path.read_text()) if path.exists() else {}
            timings[args.model] = result["seconds"]
            path.write_text(json.dumps(timings, indent=2) + "\n")
    (args.out / f"summary-{tag}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def timing_of(adapter, corpus, norm: str) -> dict:
    ids = adapter.tokenize(corpus[0].text + " " + corpus[2].text + " " + corpus[4].text)
    prompt = adapter.tokenizer.decode(ids[0, :64])
    timing = {"analyze_no_exact": float("inf"), "certify": float("inf")}
    calls = {
        "analyze_no_exact": lambda: sr.analyze(adapter, prompt, exact=False),
        "certify": lambda: certify(adapter, prompt, norm=norm),
    }
    for fn in calls.values():  # warm up
        fn()
    for _ in range(3):  # alternated, best of three: a busy machine's drift hits both
        for name, fn in calls.items():
            t = time.perf_counter()
            fn()
            timing[name] = min(timing[name], time.perf_counter() - t)
    timing["ratio"] = timing["certify"] / timing["analyze_no_exact"]
    timing["positions"] = int(adapter.tokenize(prompt).shape[1])
    return timing


if __name__ == "__main__":
    main()
