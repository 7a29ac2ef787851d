"""Which logits path the iso-KL prediction should follow: the coefficient at which the
statistic of the per-token KL along ``z0 + c a1`` (tangent), ``+ c^2 a2 / 2`` (quadratic)
and ``+ c^3 a3 / 6`` (cubic), the softmax exact each time, and the quadratic form
``sqrt(2 target / stat(Var_p(a1)))`` meet each row's target, over the rollout coefficient
of a file written by ``scripts/iso_kl_check.py`` (same prompts, tokens and vectors).

    python scripts/iso_kl_path_orders.py --model smollm2-135m \
        docs/steering/iso-kl-smollm2-135m.json docs/steering/iso-kl-smollm2-135m-half-nat.json

One pass of order-3 jets per layer, vector and prompt; no rollouts (docs/iso-kl.md). It
also asks whether the second order's weight where the tangent path meets the target (the
statistic along the quadratic path there, over the target: the "bend") picks out the rows
where the tangent path misses: the rows sorted by it, and its rank correlation with the
tangent path's error.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from iso_kl_check import vectors

import stable_regions as sr
from stable_regions.geometry.log_log import solve_log_log
from stable_regions.prompts import corpus
from stable_regions.studies.iso_kl import statistic
from stable_regions.studies.rollouts import TangentPaths, greedy, logit_derivatives, token_kl
from stable_regions.studies.validation import held_out_corpus

ORDERS = {"tangent": 1, "quadratic": 2, "cubic": 3}


def along(series: list[list[torch.Tensor]], order: int, stat: str):
    """The statistic of the KL along the path of ``order``, as a function for the solver."""

    def evaluate(c: float) -> tuple[float, np.ndarray]:
        kl = []
        for z0, *a in series:
            zc = z0 + sum(c**k / math.factorial(k) * a[k - 1] for k in range(1, order + 1))
            kl.append(token_kl(zc, z0))
        kl = np.concatenate(kl)
        return statistic(kl, stat), kl

    return evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()
    adapter = sr.load(args.model)
    docs = [json.loads(Path(f).read_text()) for f in args.files]
    rows = [r for d in docs for r in d["rows"] if r["reached"]]
    n, tokens = docs[0]["prompts"], docs[0]["tokens"]
    held = set(held_out_corpus())
    kinds = ("prose", "dialogue", "factual")
    texts = [p.text for p in corpus() if p.text in held and p.kind in kinds]
    ids_list = [adapter.tokenize(t) for t in texts[args.first : args.first + n]]
    ratios: dict[str, list[float]] = {k: [] for k in (*ORDERS, "quadratic form")}
    bends: list[float] = []
    for layer in sorted({int(r["layer"]) for r in rows}):
        hook = adapter.hook_for_layer(layer)
        bases = [greedy(adapter, ids, tokens, hook) for ids in ids_list]
        for name, v in vectors(adapter, layer).items():
            series, fisher = [], []
            for b in bases:
                z0, a, norm = logit_derivatives(adapter, b, hook, v, 3)
                series.append([t.to(torch.float64) for t in (z0, *a)])
                fisher.append(TangentPaths(z0, a[0], norm).fisher())
            fisher = np.concatenate(fisher)
            for r in rows:
                if int(r["layer"]) != layer or r["vector"] != name:
                    continue
                stat, target = r["kl_stat"], r["kl_target"]
                coefs = {}
                for label, order in ORDERS.items():
                    evaluate = along(series, order, stat)
                    found = solve_log_log(evaluate, target, 1.0, rtol=0.005)
                    coefs[label] = found.coef
                    ratios[label].append(found.coef / r["coef_rollout"])
                # the second order's weight where the tangent path meets the target: the
                # statistic along the quadratic path there, over the target
                bend = along(series, 2, stat)(coefs["tangent"])[0] / target
                bends.append(bend)
                form = math.sqrt(2 * target / statistic(fisher, stat))
                ratios["quadratic form"].append(form / r["coef_rollout"])
                shown = {k: round(v[-1], 3) for k, v in ratios.items()}
                print(layer, name, stat, target, shown, "bend", round(bend, 3))
    print("| path | median relative error | 90th percentile | median ratio |")
    print("|---|---|---|---|")
    for label, values in ratios.items():
        err = np.abs(np.array(values) - 1)
        print(
            f"| {label} | {np.median(err):.1%} | {np.percentile(err, 90):.1%} | {np.median(values):.2f} |"
        )
    # does the bend pick out the tangent path's misses?
    err = np.abs(np.array(ratios["tangent"]) - 1)
    far = np.abs(np.log(np.array(bends)))
    order = np.argsort(-far)
    print("rows by |log bend|, largest first: |log bend|, tangent error")
    for i in order:
        print(f"  {far[i]:.3f}  {err[i]:.1%}")
    print(f"rank correlation: {_spearman(far, err):.2f}")


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


if __name__ == "__main__":
    main()
