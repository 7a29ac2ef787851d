"""The iso-KL coefficient's three forms against each other, with their costs, on held-out
prompts (docs/iso-kl.md).

    python scripts/iso_kl_check.py --model smollm2-135m --layers 15 5 --prompts 4 \
        --tokens 12 --targets 0.1 1.0 --stats p95 --out docs/steering/iso-kl-smollm2-135m.json

Vectors at each layer: the mean difference of the shipped sentiment sets, a seeded random
direction of the same norm, and the mean difference between the corpus's code and prose
prompts (the ones outside the held-out split), scaled to the sentiment vector's norm.
Writes the rows as it goes (a rerun skips the ones already there). ``--first K`` takes the
held-out prompts from the K-th on (another set of prompts); ``--refresh measured predicted``
recomputes only those forms' columns of the rows already there, the others kept (when only
their code changed); ``--table`` prints the file's rows and summary as the markdown tables
of docs/iso-kl.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import stable_regions as sr
from stable_regions._support.files import write_json
from stable_regions.prompts import corpus, sentiment_prompts
from stable_regions.studies.validation import held_out_corpus


def vectors(adapter, layer: int) -> dict[str, torch.Tensor]:
    positive, negative = sentiment_prompts()
    sentiment = sr.mean_difference(adapter, positive, negative, layer=layer).float()
    g = torch.Generator().manual_seed(1000 + layer)
    random = torch.randn(sentiment.shape, generator=g)
    held = set(held_out_corpus())
    code = [p.text for p in corpus() if p.kind == "code" and p.text not in held][:16]
    prose = [p.text for p in corpus() if p.kind == "prose" and p.text not in held][:16]
    topic = sr.mean_difference(adapter, code, prose, layer=layer).float()
    size = sentiment.norm()
    return {
        "sentiment": sentiment,
        "random": random / random.norm() * size,
        "code_minus_prose": topic / topic.norm() * size,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", type=int, nargs="+", default=[15, 5])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.1, 1.0])
    ap.add_argument("--stats", nargs="+", default=["p95"])
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--refresh", nargs="+", choices=["measured", "predicted"], default=[])
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(Path(args.out).read_text())))
        return
    adapter = sr.load(args.model)
    held = set(held_out_corpus())
    kinds = ("prose", "dialogue", "factual")
    prompts = [p.text for p in corpus() if p.text in held and p.kind in kinds]
    prompts = prompts[args.first : args.first + args.prompts]
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.exists() else {"rows": []}
    doc.update(model=adapter.name, prompts=len(prompts), tokens=args.tokens)
    if args.refresh:  # only the rows already there
        refresh(adapter, doc, prompts, args.tokens, out, args.refresh)
    done = {(r["layer"], r["kl_target"], r["kl_stat"], r["vector"]) for r in doc["rows"]}
    for layer in [] if args.refresh else args.layers:
        named = vectors(adapter, layer)
        for stat in args.stats:
            for target in args.targets:
                todo = {k: v for k, v in named.items() if (str(layer), target, stat, k) not in done}
                if not todo:
                    continue
                result = sr.iso_kl(
                    adapter, prompts, vector=todo, layer=layer, target=target, stat=stat,
                    tokens=args.tokens, progress=print,
                )  # fmt: skip
                for row in result.to_json()["rows"]:
                    doc["rows"].append(row)
                    print(json.dumps({k: row[k] for k in ("layer", "vector", "kl_stat",
                          "kl_target", "coef_rollout", "coef_measured", "coef_predicted")}))  # fmt: skip
                write_json(out, doc)
    for form in ("measured", "predicted"):
        err, saved = against_rollout(doc, form)
        doc[f"{form}_vs_rollout"] = {
            "median_rel_err": float(np.median(err)),
            "p90_rel_err": float(np.percentile(err, 90)),
            "median_tokens_saved": float(np.median(saved)),
            "rows": len(err),
        }
    write_json(out, doc)
    print(json.dumps({k: v for k, v in doc.items() if k.endswith("_vs_rollout")}, indent=1))


def table(doc: dict) -> str:
    """The rows and the summary against the rollout coefficient, as markdown."""
    lines = [
        "| layer, stat, target | vector | `coef_rollout` | `coef_measured` | `coef_predicted` "
        "| `kl_confirmed` | tokens: rollout / measured / predicted |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        tokens = " / ".join(
            str(r[f"forward_tokens_{f}"]) for f in ("rollout", "measured", "predicted")
        )
        lines.append(
            f"| {r['layer']}, {r['kl_stat']}, {r['kl_target']:g} | {r['vector']} "
            f"| {r['coef_rollout']:.3f} | {r['coef_measured']:.3f} | {r['coef_predicted']:.3f} "
            f"| {r['kl_confirmed']:.3f} | {tokens} |"
        )
    lines += [
        "",
        "| | median relative error | 90th percentile | largest | forward-pass tokens saved (median) |",
        "|---|---|---|---|---|",
    ]
    for form in ("measured", "predicted"):
        err, saved = against_rollout(doc, form)
        lines.append(
            f"| `coef_{form}` | {np.median(err):.1%} | {np.percentile(err, 90):.1%} "
            f"| {err.max():.1%} | {np.median(saved):.2f}x |"
        )
    return "\n".join(lines)


def against_rollout(doc: dict, form: str) -> tuple[np.ndarray, np.ndarray]:
    """Over the rows that reached their target: ``|coef_form / coef_rollout - 1|`` and the
    forward-pass tokens the form saved against the rollout solver (a ratio)."""
    rows = [r for r in doc["rows"] if r["reached"]]
    err = np.array([abs(r[f"coef_{form}"] / r["coef_rollout"] - 1) for r in rows])
    saved = np.array([r["forward_tokens_rollout"] / r[f"forward_tokens_{form}"] for r in rows])
    return err, saved


COLUMNS = {
    "predicted": ("coef_predicted", "forward_tokens_predicted", "seconds_predicted", "reliable",
                  "unreliable_reason"),
    "measured": ("coef_measured", "kl_confirmed", "evaluations_measured",
                 "forward_tokens_measured", "seconds_measured"),
}  # fmt: skip


def refresh(adapter, doc: dict, prompts: list[str], tokens: int, out: Path, forms) -> None:
    """The columns of ``forms`` in every row again, from today's code, the rest kept."""
    columns = [c for f in forms for c in COLUMNS[f]]
    for layer in sorted({int(r["layer"]) for r in doc["rows"]}, reverse=True):
        named = vectors(adapter, layer)
        keys = sorted(
            {(r["kl_stat"], r["kl_target"]) for r in doc["rows"] if r["layer"] == str(layer)}
        )
        for stat, target in keys:
            rows = {r["vector"]: r for r in doc["rows"]
                    if (r["layer"], r["kl_stat"], r["kl_target"]) == (str(layer), stat, target)}  # fmt: skip
            result = sr.iso_kl(
                adapter, prompts, vector={k: named[k] for k in rows}, layer=layer, target=target,
                stat=stat, tokens=tokens, forms=tuple(forms),
            )  # fmt: skip
            for new in result.to_json()["rows"]:
                rows[new["vector"]].update({k: new[k] for k in columns})
                print(layer, stat, target, new["vector"], {k: new[k] for k in columns[:3]})
            write_json(out, doc)


if __name__ == "__main__":
    main()
