"""Where the final-layer ``analyze`` of 64 positions and the ``scan`` of 128 tokens spend their
time, stage by stage, against a forward pass of the same tokens (all logits), and what the
top-eigenvector search needs: its Lanczos products per position and the spread of ``p`` that
sets them. Two JSON lines per model, then one for the bfloat16 products of this machine. Run
from the repository root:

    python scripts/final_floor.py llama3-1b-quick smollm2-135m gemma3-270m

The stages call what ``engine.final`` calls, in its order: the float64 logits ``u0``, the
Lanczos search (``top_curvature``), the diagonal of H, the float64 products ``W v`` and
``W sign(v)``; ``analyze_s`` is the whole command's library call (the measured boundary
included). The scan's stages are its own (``Scanner``): the pass to the pre-logit vectors,
the float32 logits, the search (bfloat16 where native, residual 1e-2) and its float32
refinement ``W v``. The bfloat16 line times one product of 64 rows with a random W of the 1B
shape in float32 and in bfloat16, and the error of a two-piece bfloat16 split (``W = W_hi + W_lo``,
``q = q_hi + q_lo``) against float64: what a search in bfloat16 at float32's accuracy would
cost here (docs/performance.md, "Issue 35's targets").
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

import stable_regions as sr
from stable_regions.bench.scale import ScaleShape, _tokens, build_model
from stable_regions.engine import eig_tolerance
from stable_regions.geometry import curvature_diagonal, top_curvature


def seconds(fn, repeat: int = 2) -> float:
    """The median of ``repeat`` timed calls, after one untimed call."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_seconds(model, ids) -> float:
    """A forward pass of ``ids`` with every position's logits: the median of 5."""

    def forward():
        with torch.no_grad():
            model.forward(ids, use_cache=False)

    return seconds(forward, 5)


def in_forwards(out: dict, keys: tuple[str, ...]) -> dict:
    """``out`` with each ``*_s`` of ``keys`` also as ``*_forwards`` (over ``forward_s``), the
    floats rounded."""
    for key in keys:
        out[key.replace("_s", "_forwards")] = round(out[key] / out["forward_s"], 2)
    return {k: round(x, 4) if isinstance(x, float) else x for k, x in out.items()}


def load(name: str):
    if name.startswith("llama3-1b"):
        return build_model(ScaleShape.make(True), sr.load("smollm2-135m").tokenizer)
    return sr.load(name)


def stages(name: str, n: int = 64) -> dict:
    model = load(name)
    prompt = _tokens(model, n)
    ids = model.tokenize(prompt)
    head = model.summing_head
    out: dict = {"model": name, "tokens": int(ids.shape[1])}
    out["forward_s"] = forward_seconds(model, ids)
    h = model.prelogits(ids, dtype=None)[:n].to(torch.float64)
    out["u0_s"] = seconds(lambda: head.raw_float64(h), 1)
    u0 = head.raw_float64(h)
    tol = eig_tolerance(1e-10, head.weight.dtype)
    logits = u0.to(head.weight.dtype)
    start = time.perf_counter()
    found = top_curvature(head.weight, logits, tol=tol, max_iter=64, refine=False)
    out["search_s"] = time.perf_counter() - start
    it = found.iterations.double()
    out.update(
        iterations_mean=float(it.mean()),
        iterations_median=float(it.median()),
        iterations_max=int(it.max()),
    )
    out["diagonal_s"] = seconds(lambda: curvature_diagonal(head.weight, u0), 1)
    v = found.vector.to(torch.float64)
    both = torch.cat([v, torch.sign(v)])
    out["directions_s"] = seconds(lambda: head.direction_float64(both), 1)
    p = torch.softmax(u0, -1)
    out["top_p_median"] = float(p.max(-1).values.median())
    perplexity = torch.exp(-torch.special.xlogy(p, p).sum(-1))
    out["perplexity_median"] = float(perplexity.median())
    start = time.perf_counter()
    sr.analyze(model, prompt, eps=[0.1, 1.0], positions="all", exact=True)
    out["analyze_s"] = time.perf_counter() - start
    return in_forwards(out, ("u0_s", "search_s", "diagonal_s", "directions_s", "analyze_s"))


def scan_stages(name: str, n: int = 128) -> dict:
    from stable_regions.studies.scan import Scanner

    model = load(name)
    ids = model.tokenize(_tokens(model, n))
    scanner = Scanner(model)
    out: dict = {"model": name, "scan_tokens": int(ids.shape[1])}
    out["forward_s"] = forward_seconds(model, ids)
    with torch.no_grad():
        out["prelogits_s"] = seconds(lambda: model.prelogits(ids, dtype=None), 1)
        h = model.prelogits(ids, dtype=None)
        out["logits_s"] = seconds(lambda: scanner.logits(h), 1)
        z = scanner.logits(h)
        search = dict(tol=scanner.tol, tokens=scanner.tokens, search_weight=scanner.search)
        out["search_s"] = seconds(
            lambda: top_curvature(scanner.weight, z, refine=False, **search), 1
        )
        whole = seconds(lambda: top_curvature(scanner.weight, z, **search), 1)
        out["refinement_s"] = whole - out["search_s"]
        found = top_curvature(scanner.weight, z, **search)
        out["scan_s"] = seconds(lambda: scanner.scan(model, ids, [0.1]), 1)
    it = found.iterations.double()
    out.update(iterations_mean=float(it.mean()), iterations_max=int(it.max()))
    return in_forwards(out, ("prelogits_s", "logits_s", "search_s", "refinement_s", "scan_s"))


def bfloat16_products(V: int = 128256, d: int = 2048, P: int = 64) -> dict:
    """One product of P rows with a random (V, d) W: float32, bfloat16, and the split's error."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(V, d, generator=g) * 0.02
    q = torch.randn(P, d, generator=g)
    bf = torch.bfloat16
    W_hi = W.to(bf)
    W_lo = (W - W_hi.float()).to(bf)
    q_hi = q.to(bf)
    q_lo = (q - q_hi.float()).to(bf)

    def split():  # W q = W_hi q_hi + W_hi q_lo + W_lo q_hi, up to W_lo q_lo
        a = torch.cat([q_hi, q_lo]) @ W_hi.T
        return a[:P].float() + a[P:].float() + (q_hi @ W_lo.T).float()

    exact = q.double() @ W.double().T
    error = lambda a: float((a.double() - exact).norm() / exact.norm())  # noqa: E731
    return {
        "bfloat16": f"({P} x {d}) x ({d} x {V})",
        "float32_s": round(seconds(lambda: q @ W.T), 4),
        "bfloat16_s": round(seconds(lambda: q_hi @ W_hi.T), 4),
        "bfloat16_output_dtype": str((q_hi @ W_hi.T).dtype),
        "float32_error": error(q @ W.T),
        "split_error": error(split()),
        "split_s": round(seconds(split), 4),
    }


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(json.dumps(stages(name)), flush=True)
        print(json.dumps(scan_stages(name)), flush=True)
    print(json.dumps(bfloat16_products()), flush=True)
