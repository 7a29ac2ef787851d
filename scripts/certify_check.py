"""An independent check of ``certify``'s radii on held-out prompts (docs/certify.md).

    python scripts/certify_check.py --model gemma3-270m --prompts 12 --out docs/certify/gemma3-270m

For every position of corpus prompts 1, 1 + step, ... (the held-out half), at the pre-logit
vector: the KL at the certified radius along ``--random`` random directions, the top
``--top`` eigenvectors of the Fisher ``H = W^T (diag p - p p^T) W`` and the directions toward
the two next likeliest tokens, each with both signs. None of the library's geometry is used
for the check: the activations are the model's own last hidden state (the script checks that
its ``lm_head`` gives the model's logits from it), the logits come from a float64 copy of the
head made here (for the check only), the eigenvectors from a subspace iteration written here,
and the KL from ``log_softmax`` in float64. The certificate holds if no KL exceeds eps.

L-inf (``--norm linf``): the perturbations are corners of the box (random signs, and the
signs of the eigenvectors and token directions) and the eigenvectors scaled to
``|v|_inf = 1``. Writes ``check-NORM.json``. ``--inflate 1.2`` checks 1.2x the certified
radii instead: a check that can fail should then find violations.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

import stable_regions as sr
from stable_regions import certify
from stable_regions.prompts import corpus as load_corpus

f64 = torch.float64


def top_eigenvectors(w: torch.Tensor, p: torch.Tensor, k: int, iters: int = 40) -> torch.Tensor:
    """(P, k, d): the top ``k`` eigenvectors of ``H_i = W^T (diag p_i - p_i p_i^T) W`` for
    each row ``p_i`` of ``p`` (P, V), by block subspace iteration with Rayleigh-Ritz, stopped
    when the top Ritz value moves less than 1e-6 relative. ``w`` (V, d) float32 (the
    directions need not be float64; their KLs are)."""
    if p.shape[0] > 16:  # (P, V, 2k) float32 products: 16 positions at a time
        return torch.cat(
            [top_eigenvectors(w, p[s : s + 16], k, iters) for s in range(0, p.shape[0], 16)]
        )
    P, d = p.shape[0], w.shape[1]
    p32 = p.float()
    gen = torch.Generator().manual_seed(1)
    x = torch.linalg.qr(torch.randn(P, d, 2 * k, generator=gen))[0]  # (P, d, 2k)
    last = torch.zeros(P)

    def apply(x: torch.Tensor) -> torch.Tensor:
        u = torch.einsum("vd,pdk->pvk", w, x)  # (P, V, 2k)
        u = u - (p32[:, :, None] * u).sum(1, keepdim=True)
        return torch.einsum("vd,pvk->pdk", w, p32[:, :, None] * u)

    for _ in range(iters):
        hx = apply(x)
        small = x.transpose(1, 2) @ hx  # Rayleigh-Ritz from the same products
        vals, vecs = torch.linalg.eigh(0.5 * (small + small.transpose(1, 2)))
        converged = bool(((vals[:, -1] - last).abs() <= 1e-6 * vals[:, -1].abs()).all())
        last = vals[:, -1]
        if converged:
            break
        x = torch.linalg.qr(hx)[0]
    top = (x @ vecs.flip(-1))[:, :, :k]  # descending
    return top.transpose(1, 2)


def directions(
    w: torch.Tensor, h: torch.Tensor, p: torch.Tensor, norm: str, random: int, top: int
) -> torch.Tensor:
    """(P, n, d) unit directions in ``norm`` for every position, both signs."""
    P, d = h.shape
    gen = torch.Generator().manual_seed(0)
    eig = top_eigenvectors(w, p, top).double()
    best = p.topk(3, dim=-1).indices
    toward = w.double()[best[:, 1:]] - w.double()[best[:, :1]]  # (P, 2, d)
    if norm == "l2":
        rand = torch.randn(P, random, d, generator=gen, dtype=f64)
        dirs = torch.cat([rand, eig, toward], dim=1)
        dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    else:
        rand = torch.randint(0, 2, (P, random, d), generator=gen).to(f64) * 2 - 1
        scaled = eig / eig.abs().amax(-1, keepdim=True)
        dirs = torch.cat([rand, torch.sign(eig), scaled, torch.sign(toward)], dim=1)
    return torch.cat([dirs, -dirs], dim=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--norm", default="l2", choices=("l2", "linf"))
    ap.add_argument("--random", type=int, default=256)
    ap.add_argument("--top", type=int, default=4)
    ap.add_argument(
        "--inflate",
        type=float,
        default=1.0,
        help="check radii this many times the certified ones (> 1: the check should fail)",
    )
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    adapter = sr.load(args.model)
    model = adapter.model
    head = model.get_output_embeddings()
    w = head.weight.detach().float()
    w64 = w.double()  # the check's own float64 head (not the library's)
    bias = None if head.bias is None else head.bias.detach().double()
    softcap = getattr(model.config, "final_logit_softcapping", None)

    def squash(z: torch.Tensor) -> torch.Tensor:  # the model's final logit softcap, if any
        return softcap * torch.tanh(z / softcap) if softcap else z

    corpus = load_corpus()
    step = max(1, len(corpus) // args.prompts)
    per_eps: dict[float, list[float]] = {}
    positions = directions_used = 0
    for i in range(1, len(corpus), step)[: args.prompts]:
        text = corpus[i].text
        result = certify(adapter, text, norm=args.norm).to_frame()
        ids = adapter.tokenize(text)
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
        h = out.hidden_states[-1][0].double()  # (T, d): after the final norm
        reference = squash(head(out.hidden_states[-1])[0].double())
        logits_model = out.logits[0].double()
        if not torch.allclose(reference, logits_model, rtol=1e-4, atol=1e-3):
            raise SystemExit("the last hidden state is not the head's input for this model")
        raw = h @ w64.T if bias is None else h @ w64.T + bias
        logp = torch.log_softmax(squash(raw), -1)
        dirs = directions(w, h, logp.exp(), args.norm, args.random, args.top)
        for t in range(h.shape[0]):
            rows = result[(result.position == t) & result.radius_certified.map(math.isfinite)]
            kl = torch.full((len(rows), dirs.shape[1]), -math.inf, dtype=f64)
            for s in range(0, dirs.shape[1], 64):
                b = dirs[t, s : s + 64] @ w64.T  # the raw logits' change per unit radius
                for j, r in enumerate(rows.radius_certified):
                    logq = torch.log_softmax(squash(raw[t] + args.inflate * r * b), -1)
                    kl[j, s : s + 64] = (logp[t].exp() * (logp[t] - logq)).sum(-1)
            for j, e in enumerate(rows.eps):
                per_eps.setdefault(e, []).append(float(kl[j].max()) / e)
        positions += h.shape[0]
        directions_used = dirs.shape[1]
        print(f"prompt {i}: {h.shape[0]} positions", flush=True)
    summary = {
        "model": args.model,
        "norm": args.norm,
        "inflate": args.inflate,
        "positions": positions,
        "directions_per_position": directions_used,
        "by_eps": {
            str(e): {
                "n": len(v),
                "violations": sum(x > 1.0 for x in v),
                "max_kl_over_eps": max(v),
                "median_kl_over_eps": sorted(v)[len(v) // 2],
            }
            for e, v in sorted(per_eps.items())
        },
    }
    tag = args.norm if args.inflate == 1.0 else f"{args.norm}-inflated-{args.inflate:g}"
    (args.out / f"check-{tag}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
