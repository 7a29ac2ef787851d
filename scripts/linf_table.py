"""The L-infinity sensitivity table of docs/certify.md: per model, layer, prompt (last
position) and eps, the quadratic model's L-inf bracket (``analyze``: radius_linf_lower /
radius_linf_upper), the worst case a search finds (``certify --norm linf``: radius_attack)
and the certificate (radius_certified; none at the embedding).

    python scripts/linf_table.py --out docs/certify/linf.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import stable_regions as sr
from stable_regions import certify
from stable_regions.prompts import corpus


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    texts = [p.text for p in corpus()[1::50][: args.prompts]]
    rows = []
    for name in args.models:
        adapter = sr.load(name)
        for layer in ["embed", "final"]:
            for i, text in enumerate(texts):
                quad = sr.analyze(adapter, text, positions="last", layer=layer, exact=False)
                cert = certify(adapter, text, layer=layer, norm="linf", positions="last")
                for q, c in zip(quad.rows, cert.rows, strict=True):
                    rows.append(
                        dict(
                            model=name,
                            layer=layer,
                            prompt=i,
                            eps=q["eps"],
                            quadratic_lower=q["radius_linf_lower"],
                            quadratic_upper=q["radius_linf_upper"],
                            attack=c["radius_attack"],
                            certified=c["radius_certified"],
                        )
                    )
                print(name, layer, i, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    print(
        "| model | layer | prompt | eps | quadratic model (lower - upper) | worst case found | certified |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cert = "none" if r["certified"] != r["certified"] else f"{r['certified']:.3g}"
        print(
            f"| {r['model']} | {r['layer']} | {r['prompt']} | {r['eps']:g} | "
            f"{r['quadratic_lower']:.3g} - {r['quadratic_upper']:.3g} | {r['attack']:.3g} | {cert} |"
        )


if __name__ == "__main__":
    main()
