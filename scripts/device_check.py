"""The engine on a GPU at the scale users study: random-weight models with the shapes of
Llama-3-8B and Gemma-2-9B (its final logit softcap included) in bfloat16.

For each model: final-layer analysis of 256 positions, one inner position at the middle
block (with its measured boundary), `certify` of the last 64 positions at the final layer
(never violated along 514 directions at 3 of them) and a 2048-token scan (refused for the
softcapped head, which the fast scan does not take: reported as such). Each is timed once, with the peak GPU
memory it allocated, and checked on a small slice against a float64 reference (a float64
copy made here, for the check only: the library never makes one). Writes one JSON file.

    PYTHONPATH=src python scripts/device_check.py --out docs/bench/device-h200.json
    PYTHONPATH=src python scripts/device_check.py --small --device cpu   # the logic, tiny

Needs only torch, transformers, numpy, pandas, pyarrow, scipy, rich and matplotlib.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch

SHAPES = {
    "llama3-8b-shape": dict(
        kind="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        rope_theta=500000.0,
    ),
    "gemma2-9b-shape": dict(
        kind="gemma2",
        vocab_size=256000,
        hidden_size=3584,
        intermediate_size=14336,
        num_hidden_layers=42,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
        sliding_window=4096,
    ),
}
SMALL = dict(
    vocab_size=3000,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def build(name: str, small: bool, device: torch.device, dtype: torch.dtype):
    import transformers as T

    spec = dict(SHAPES[name])
    kind = spec.pop("kind")
    if small:
        spec.update(SMALL)
        if kind == "gemma2":
            spec.update(head_dim=16, sliding_window=16)
    config_cls = T.LlamaConfig if kind == "llama" else T.Gemma2Config
    config = config_cls(max_position_embeddings=8192, **spec)
    torch.manual_seed(0)
    with device:  # random init on the device itself: minutes faster than on the CPU for 8B
        model = T.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=dtype)
    with torch.no_grad():  # logits of a trained model's spread, not a random init's tiny ones
        model.get_output_embeddings().weight.normal_(0.0, 2.0 / spec["hidden_size"] ** 0.5)
    return model.eval().requires_grad_(False)


class Ids:
    """A tokenizer stand-in for random models: text is ignored, ids are fixed random tokens."""

    def __init__(self, vocab: int, n: int) -> None:
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(3, min(vocab, 32000), (1, n), generator=g)

    def __call__(self, text, return_tensors=None):
        n = int(text.split(":", 1)[0])
        return {"input_ids": self.ids[:, :n]}

    def decode(self, ids):
        return f"<{ids[0] if len(ids) else ''}>"


def timed_gpu(fn, device: torch.device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = None
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return out, round(seconds, 2), None if peak is None else round(peak, 1)


def rel(a, b) -> float:
    return float(abs(a / b - 1.0))


def check_model(name: str, args, device: torch.device) -> dict:
    import stable_regions as sr
    from stable_regions.geometry import FisherOperator
    from stable_regions.scan import Scanner

    n_final, n_scan = (16, 64) if args.small else (256, 2048)
    model = build(name, args.small, device, torch.bfloat16)
    tok = Ids(model.config.vocab_size, max(n_final, n_scan))
    adapter = sr.wrap(model, tok, name=name)
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    out = dict(model=name, weights_gib=round(weights_gib, 2), device=str(device), tasks={})
    prompt = f"{n_final}:"
    mid = adapter.n_layers // 2

    res, s, peak = timed_gpu(lambda: sr.analyze(adapter, prompt, eps=[0.1, 1.0]), device)
    df = res.to_frame()
    # float64 reference for 3 positions: the float64 head and Lanczos to 1e-12
    head64 = adapter.stored_head.to(torch.float64)
    check = [0, n_final // 2, n_final - 1]
    h = adapter.prelogits(adapter.tokenize(prompt))[check]
    ref = FisherOperator.from_head(head64, h).top_eigenpairs(k=1, tol=1e-12)[0][:, 0].cpu()
    got = df[df.eps == 0.1].set_index("position").loc[check, "lambda_max"].to_numpy()
    out["tasks"]["final_analysis"] = dict(
        positions=n_final,
        seconds=s,
        peak_gpu_mib=peak,
        lambda_max_rel_err_vs_float64=max(rel(a, float(b)) for a, b in zip(got, ref, strict=True)),
        checked_positions=check,
    )
    del head64, res
    gc.collect()

    res, s, peak = timed_gpu(
        lambda: sr.analyze(adapter, prompt, eps=[0.1, 1.0], positions="last", layer=mid), device
    )
    row = res.to_frame().iloc[0]
    # reference: the same analysis on a float64 copy of the model (made here only)
    twin = sr.wrap(copy.deepcopy(model).to(torch.float64), tok, name=name)
    ref_row = sr.analyze(twin, prompt, eps=[0.1], positions="last", layer=mid).to_frame().iloc[0]
    del twin
    gc.collect()
    out["tasks"]["inner_position"] = dict(
        layer=mid,
        seconds=s,
        peak_gpu_mib=peak,
        lambda_max_rel_err_vs_float64=rel(row.lambda_max, ref_row.lambda_max),
        radius_exact_rel_err_vs_float64=rel(row.radius_exact, ref_row.radius_exact),
    )

    out["tasks"]["certify"] = certify_task(adapter, prompt, n_final, device)

    if adapter.logit_softcap is not None:
        out["tasks"]["scan"] = dict(refused="the fast scan needs a linear head (softcap)")
    else:
        ids = adapter.tokenize(f"{n_scan}:")
        found, s, peak = timed_gpu(lambda: Scanner(adapter).scan(adapter, ids, [0.1]), device)
        head64 = adapter.stored_head.to(torch.float64)
        check = [0, n_scan // 2, n_scan - 1]
        h = adapter.prelogits(ids)[check]
        ref = FisherOperator.from_head(head64, h).top_eigenpairs(k=1, tol=1e-12)[0][:, 0].cpu()
        got = found["lambda_max"][check].cpu()
        out["tasks"]["scan"] = dict(
            tokens=n_scan,
            seconds=s,
            peak_gpu_mib=peak,
            lambda_max_rel_err_vs_float64=float((got / ref - 1).abs().max()),
        )
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def certify_task(adapter, prompt: str, n_final: int, device: torch.device) -> dict:
    """``certify`` at the final layer for the last 64 positions, timed; checked at 3 of them:
    no KL at the certified radius along 512 random directions and the top Ritz vector (both
    signs), computed with a float64 head, exceeds eps, and the search's exit lies above."""
    import stable_regions as sr
    from stable_regions.geometry import FisherOperator

    eps = [0.01, 1.0]
    positions = list(range(max(0, n_final - 64), n_final))
    res, s, peak = timed_gpu(
        lambda: sr.certify(adapter, prompt, eps=eps, positions=positions), device
    )
    df = res.to_frame()
    head64 = adapter.stored_head.to(torch.float64)
    check = [positions[0], positions[len(positions) // 2], positions[-1]]
    h = adapter.prelogits(adapter.tokenize(prompt))[check].to(torch.float64)
    top = FisherOperator.from_head(head64, h).top_eigenpairs(k=1, tol=1e-10)[1][:, 0]
    g = torch.Generator(device=h.device).manual_seed(0)
    worst, violations = 0.0, 0
    for i, pos in enumerate(check):
        dirs = torch.randn(512, h.shape[-1], generator=g, device=h.device, dtype=torch.float64)
        dirs = torch.cat([dirs, top[i : i + 1], -top[i : i + 1]])
        dirs = dirs / dirs.norm(dim=-1, keepdim=True)
        logp = torch.log_softmax(head64.logits_float64(h[i : i + 1]), -1)
        for e in eps:
            row = df[(df.position == pos) & (df.eps == e)].iloc[0]
            r = float(row.radius_certified)
            logq = torch.log_softmax(head64.logits_float64(h[i : i + 1] + r * dirs), -1)
            kl = (logp.exp() * (logp - logq)).sum(-1)
            worst = max(worst, float(kl.max()) / e)
            violations += int((kl > e).sum()) + int(r > float(row.radius_attack))
    del head64
    return dict(
        positions=len(positions),
        seconds=s,
        peak_gpu_mib=peak,
        median_tightness={str(e): float(df[df.eps == e].tightness.median()) for e in eps},
        checked_positions=check,
        worst_kl_over_eps_at_certified_radius=worst,
        violations=violations,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny shapes: checks the logic")
    parser.add_argument("--models", nargs="+", default=list(SHAPES))
    parser.add_argument("--out", default="device-check.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here: use --device cpu (with --small)", file=sys.stderr)
        return 2
    doc = dict(
        machine=dict(
            platform=platform.platform(),
            torch=torch.__version__,
            gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        ),
        small=args.small,
        models=[],
    )
    started = time.perf_counter()
    for name in args.models:
        doc["models"].append(check_model(name, args, device))
        print(json.dumps(doc["models"][-1]), flush=True)
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")  # written as it goes
    doc["seconds"] = round(time.perf_counter() - started, 1)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
