"""The engine on a GPU at the scale users study, checked: random-weight models with the shapes
of Llama-3-8B and Gemma-2-9B (its final logit softcap included) in bfloat16, loaded as users
load them (the transformers default attention, SDPA, where the model allows it).

Each task runs once on a short prompt (warm-up), then timed, then checked against an
independent reference with a stated tolerance; a task passes when every check does. The
references fit beside the model: float64 copies of the head only, and for the inner layer a
float64 copy of the blocks after the hook alone (the bfloat16 model moved to the CPU while it
runs). The script ends with one summary line and exits 1 if any check failed.

Tasks and checks (tolerances in ``TOLERANCE``):

- ``final_analysis``: ``analyze`` of 256 positions at the final layer, measured boundary.
  ``lambda_max`` at 3 positions against float64 Lanczos on the float64 head; the measured
  radius against the float64 KL of the head run directly (below eps at 0.999 r, at or above
  at 1.001 r). Under ``torch.set_float32_matmul_precision("high")``: TF32 must not leak in.
- ``inner_position``: ``analyze`` after the middle block, last position, measured. The
  reference is the float64 copy of the blocks after the hook fed the model's own activations
  there: ``v^T G v`` along our eigenvector by central differences, the radius along ``+-v``
  by bisection. Our suffix attends to keys and values the bfloat16 prefix pass made, the
  reference to float64 ones: ~1% apart.
- ``certify``: the last 64 positions at the final layer; at 3 of them no KL at the certified
  radius along 512 random directions and the top eigenvector (both signs), from the float64
  head, exceeds eps, and no certified radius exceeds the search's exit.
- ``scan``: 2048 tokens; ``lambda_max`` at 3 positions against float64 Lanczos (the
  softcapped head is refused by the fast scan: checked to be refused).
- ``generate``: 32 tokens with the fast monitor and a seed; at 3 steps the float64
  ``lambda_max`` from a teacher-forced pass lies in the monitor's bracket; the user's CUDA
  random state is the same after as before.

    python scripts/device_check.py --out docs/bench/device-h100.json   # ~5-8 min on an H100
    PYTHONPATH=src python scripts/device_check.py --small --device cpu  # the logic, tiny

Needs only what stable-regions needs.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
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
        tie_word_embeddings=False,
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
TOLERANCE = {
    "final_lambda_max": 1e-4,  # float32 products from the float32 head, against float64
    "final_radius_bracket": 1e-3,  # KL < eps at (1 - this) r, >= eps at (1 + this) r
    "inner_lambda_max": 3e-2,  # our bfloat16 prefix's keys and values against float64 ones
    "inner_radius": 3e-2,
    "certified_kl_over_eps": 1.0,  # no direction exceeds eps at the certified radius
    "scan_lambda_max": 1e-3,  # the scan's bfloat16 search, refined in float32
    "generate_bracket": 1e-6,  # lambda_lower <= float64 value <= lambda_upper, relative slack
}
EPS = [0.1, 1.0]


def build(name: str, small: bool, device: torch.device):
    import transformers as T

    spec = dict(SHAPES[name])
    kind = spec.pop("kind")
    if small:
        spec.update(SMALL)
        if kind == "gemma2":
            spec.update(head_dim=16, sliding_window=16)
    config_cls = T.LlamaConfig if kind == "llama" else T.Gemma2Config
    config = config_cls(max_position_embeddings=8192, **spec)
    # what from_pretrained gives a user: SDPA where the model allows it (Gemma-2's attention
    # softcap needs eager)
    attention = "eager" if kind == "gemma2" else "sdpa"
    torch.manual_seed(0)
    with device:  # random init on the device itself: minutes faster than on the CPU for 8B
        model = T.AutoModelForCausalLM.from_config(
            config, attn_implementation=attention, dtype=torch.bfloat16
        )
    with torch.no_grad():  # logits of a trained model's spread, not a random init's tiny ones
        model.get_output_embeddings().weight.normal_(0.0, 2.0 / spec["hidden_size"] ** 0.5)
    return model.eval().requires_grad_(False)


class Ids:
    """A tokenizer stand-in for random models: the text is ``"N:"``, the ids N fixed random
    tokens."""

    def __init__(self, vocab: int, n: int) -> None:
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(3, min(vocab, 32000), (1, n), generator=g)
        self.eos_token_id = None
        self.pad_token_id = 0

    def __call__(self, text, return_tensors=None, **_):
        n = int(str(text).split(":", 1)[0])
        return {"input_ids": self.ids[:, :n], "attention_mask": torch.ones(1, n, dtype=torch.long)}

    def decode(self, ids, **_):
        return " ".join(f"<{int(i)}>" for i in ids)

    def convert_ids_to_tokens(self, ids):
        return [f"<{int(i)}>" for i in ids]


def timed(fn, device: torch.device):
    """``fn()`` after a garbage collection, with its seconds and the device memory it
    allocated at its peak (MiB; None on the CPU)."""
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
    seconds = round(time.perf_counter() - start, 2)
    peak = None
    if device.type == "cuda":
        peak = round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1)
    return out, seconds, peak


def check(value: float, tolerance: float, *, below: bool = True) -> dict:
    ok = value <= tolerance if below else value >= tolerance
    return dict(value=value, tolerance=tolerance, passed=bool(ok and math.isfinite(value)))


def rel(a: float, b: float) -> float:
    return abs(float(a) / float(b) - 1.0)


def head_top_lambda(adapter, h: torch.Tensor) -> torch.Tensor:
    """float64 Lanczos on a float64 copy of the head (made here, for the check only)."""
    from stable_regions.geometry import FisherOperator

    head64 = adapter.stored_head.to(torch.float64)
    lam = FisherOperator.from_head(head64, h.to(torch.float64)).top_eigenpairs(k=1, tol=1e-12)
    return lam[0][:, 0].cpu()


def head_kl(adapter, h: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """KL(p(h) || p(h + delta)) (n,) from the float64 head run directly: logits, softcap and
    softmax written here."""
    head = adapter.stored_head
    w = head.weight.to(torch.float64)
    b = None if head.bias is None else head.bias.to(torch.float64)

    def logits(x):
        z = x.to(torch.float64) @ w.T
        z = z if b is None else z + b
        return z if head.softcap is None else head.softcap * torch.tanh(z / head.softcap)

    logp = torch.log_softmax(logits(h[None]), -1)
    out = []
    for chunk in deltas.split(64):
        logq = torch.log_softmax(logits(h[None] + chunk), -1)
        out.append((logp.exp() * (logp - logq)).sum(-1))
    return torch.cat(out)


def final_analysis(adapter, n: int, device) -> dict:
    import stable_regions as sr

    prompt = f"{n}:"
    sr.analyze(adapter, "8:", eps=EPS)  # warm-up
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # a user's TF32 setting: must not leak in
    try:
        res, seconds, peak = timed(lambda: sr.analyze(adapter, prompt, eps=EPS), device)
    finally:
        torch.set_float32_matmul_precision(before)
    frame = res.to_frame()
    at = [0, n // 2, n - 1]
    h = adapter.prelogits(adapter.tokenize(prompt))[at]
    ref = head_top_lambda(adapter, h)
    rows = frame[frame.eps == EPS[0]].set_index("position").loc[at]
    lam_err = max(rel(a, b) for a, b in zip(rows.lambda_max, ref, strict=True))
    # the measured radius is the nearest exit over +-v: inside it the KL stays below eps on
    # both signs, just beyond it one sign reaches eps
    slack = TOLERANCE["final_radius_bracket"]
    inside, missed = 0.0, 0
    directions = res.directions[at].to(device=h.device, dtype=torch.float64)
    for i in range(len(at)):
        r, v = float(rows.radius_exact.iloc[i]), directions[i]
        ray = torch.stack([v, -v])
        inside = max(inside, float(head_kl(adapter, h[i], (1 - slack) * r * ray).max()) / EPS[0])
        missed += int(float(head_kl(adapter, h[i], (1 + slack) * r * ray).max()) < EPS[0])
    return dict(
        positions=n,
        seconds=seconds,
        peak_gpu_mib=peak,
        checks=dict(
            lambda_max_vs_float64=check(lam_err, TOLERANCE["final_lambda_max"]),
            kl_inside_the_measured_radius_over_eps=check(inside, 1.0 - 1e-12),
            eps_not_reached_beyond_it=check(float(missed), 0.0),
        ),
    )


def suffix_reference(model, mid: int, device):
    """A float64 copy of the blocks after block ``mid``, the final norm and the head, and a
    function ``(X, v, t) -> logits at the last position`` with the hook's activations ``X``
    (1, n, d) fed to its first block (a pre-hook replaces that block's input)."""
    import copy

    import transformers as T

    config = copy.deepcopy(model.config)
    keep = config.num_hidden_layers - (mid + 1)
    config.num_hidden_layers = keep
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = list(config.layer_types)[mid + 1 :]
    with device:
        twin = T.AutoModelForCausalLM.from_config(
            config, attn_implementation="eager", dtype=torch.float64
        )
    source = model.state_dict()
    own = twin.state_dict()
    with torch.no_grad():
        for key, value in own.items():
            parts = key.split(".")
            if "layers" in parts:  # layer j of the twin is layer mid + 1 + j of the model
                i = parts.index("layers")
                parts[i + 1] = str(int(parts[i + 1]) + mid + 1)
            value.copy_(source[".".join(parts)].to(device=value.device, dtype=torch.float64))
    twin = twin.eval().requires_grad_(False)
    state = {}

    def replace(_module, args, kwargs):
        if args:
            return (state["x"], *args[1:]), kwargs
        return args, dict(kwargs, hidden_states=state["x"])

    twin.model.layers[0].register_forward_pre_hook(replace, with_kwargs=True)

    def logits(X: torch.Tensor, v: torch.Tensor, t: float) -> torch.Tensor:
        x = X.clone()
        x[0, -1] += t * v
        state["x"] = x
        with torch.no_grad():
            ids = torch.zeros(1, X.shape[1], dtype=torch.long, device=X.device)
            return twin(input_ids=ids, use_cache=False).logits[0, -1].to(torch.float64)

    return twin, logits


def kl_of(logp: torch.Tensor, z: torch.Tensor) -> float:
    logq = torch.log_softmax(z, -1)
    return float((logp.exp() * (logp - logq)).sum())


def bisect(f, eps: float, t0: float) -> float:
    """The first t > 0 with f(t) >= eps: doubling from t0, then 50 bisections."""
    lo, hi = 0.0, t0
    while f(hi) < eps:
        lo, hi = hi, 2 * hi
        if hi > 1e6 * t0:
            return math.inf
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if f(mid) < eps else (lo, mid)
    return hi


def inner_position(adapter, model, n: int, device) -> dict:
    import stable_regions as sr

    mid = adapter.n_layers // 2
    prompt = f"{n}:"
    sr.analyze(adapter, "8:", eps=EPS, positions="last", layer=mid)  # warm-up
    res, seconds, peak = timed(
        lambda: sr.analyze(adapter, prompt, eps=EPS, positions="last", layer=mid), device
    )
    row = res.to_frame().set_index("eps").loc[EPS[0]]
    v = res.directions[0].to(torch.float64)
    ids = adapter.tokenize(prompt)
    with torch.no_grad():
        X = model(ids, output_hidden_states=True).hidden_states[mid + 1].to(torch.float64)
    # the reference needs room: the bfloat16 model waits on the CPU meanwhile
    model.to("cpu")
    try:
        twin, logits = suffix_reference(model, mid, device)
        X, v = X.to(device), v.to(device)
        logp = torch.log_softmax(logits(X, v, 0.0), -1)
        step = 1e-4 * float(X[0, -1].norm())
        a = (logits(X, v, step) - logits(X, v, -step)) / (2 * step)
        p = logp.exp()
        lam_ref = float((p * (a - (p * a).sum()) ** 2).sum())
        t0 = 1e-3 * float(X[0, -1].norm())
        radius_ref = min(
            bisect(lambda t, s=s: kl_of(logp, logits(X, v, s * t)), EPS[0], t0) for s in (1, -1)
        )
        del twin
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        model.to(device)
    return dict(
        layer=mid,
        tokens=n,
        seconds=seconds,
        peak_gpu_mib=peak,
        checks=dict(
            lambda_max_vs_float64_suffix=check(
                rel(row.lambda_max, lam_ref), TOLERANCE["inner_lambda_max"]
            ),
            radius_exact_vs_float64_suffix=check(
                rel(row.radius_exact, radius_ref), TOLERANCE["inner_radius"]
            ),
        ),
    )


def certify_task(adapter, n: int, device) -> dict:
    import stable_regions as sr

    prompt = f"{n}:"
    positions = list(range(max(0, n - 64), n))
    sr.certify(adapter, "8:", eps=EPS, positions="last")  # warm-up
    res, seconds, peak = timed(
        lambda: sr.certify(adapter, prompt, eps=EPS, positions=positions), device
    )
    frame = res.to_frame()
    at = [positions[0], positions[len(positions) // 2], positions[-1]]
    h = adapter.prelogits(adapter.tokenize(prompt))[at].to(torch.float64)
    from stable_regions.geometry import FisherOperator

    head64 = adapter.stored_head.to(torch.float64)
    top = FisherOperator.from_head(head64, h).top_eigenpairs(k=1, tol=1e-10)[1][:, 0]
    del head64
    g = torch.Generator().manual_seed(0)
    worst, above_attack = 0.0, 0
    for i, pos in enumerate(at):
        dirs = torch.randn(512, h.shape[-1], generator=g, dtype=torch.float64).to(h.device)
        dirs = torch.cat([dirs, top[i : i + 1], -top[i : i + 1]])
        dirs = dirs / dirs.norm(dim=-1, keepdim=True)
        for e in EPS:
            found = frame[(frame.position == pos) & (frame.eps == e)].iloc[0]
            r = float(found.radius_certified)
            worst = max(worst, float(head_kl(adapter, h[i], r * dirs).max()) / e)
            above_attack += int(r > float(found.radius_attack))
    return dict(
        positions=len(positions),
        seconds=seconds,
        peak_gpu_mib=peak,
        median_tightness={str(e): float(frame[frame.eps == e].tightness.median()) for e in EPS},
        checks=dict(
            kl_at_certified_radius_over_eps=check(worst, TOLERANCE["certified_kl_over_eps"]),
            certified_above_the_search_exit=check(float(above_attack), 0.0),
        ),
    )


def scan_task(adapter, n: int, device) -> dict:
    from stable_regions.errors import StableRegionsError
    from stable_regions.studies.scan import Scanner

    if adapter.logit_softcap is not None:
        try:
            Scanner(adapter)
            refused = False
        except StableRegionsError:
            refused = True
        return dict(
            checks=dict(refused_for_a_softcapped_head=check(float(refused), 1.0, below=False))
        )
    ids = adapter.tokenize(f"{n}:")
    Scanner(adapter).scan(adapter, ids[:, :8], [0.1])  # warm-up
    found, seconds, peak = timed(lambda: Scanner(adapter).scan(adapter, ids, [0.1]), device)
    at = [0, n // 2, n - 1]
    ref = head_top_lambda(adapter, adapter.prelogits(ids)[at])
    got = found["lambda_max"][at].cpu()
    err = float((got / ref - 1).abs().max())
    return dict(
        tokens=n,
        seconds=seconds,
        peak_gpu_mib=peak,
        checks=dict(lambda_max_vs_float64=check(err, TOLERANCE["scan_lambda_max"])),
    )


def generate_task(adapter, model, device) -> dict:
    import stable_regions as sr

    if adapter.logit_softcap is not None:
        return dict(checks={}, note="the monitor needs a linear head: not run")
    sr.generate(adapter, "8:", max_new_tokens=2, mode="fast")  # warm-up
    state = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()
    (text, frame), seconds, peak = timed(
        lambda: sr.generate(adapter, "16:", max_new_tokens=32, mode="fast", greedy=False, seed=3),
        device,
    )
    after = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()
    steps = frame.drop_duplicates("step").sort_values("step")
    new = torch.tensor([steps.chosen_token_id.tolist()], device=adapter.device)
    h_all = adapter.prelogits(torch.cat([adapter.tokenize("16:"), new], 1))
    at = [0, len(steps) // 2, len(steps) - 1]
    ref = head_top_lambda(adapter, h_all[[15 + i for i in at]])
    slack = TOLERANCE["generate_bracket"]
    outside = 0
    for i, step in enumerate(at):
        found = steps.iloc[step]
        lo, hi = found.lambda_lower * (1 - slack), found.lambda_upper * (1 + slack)
        outside += int(not lo <= float(ref[i]) <= hi)
    return dict(
        tokens=len(steps),
        seconds=seconds,
        peak_gpu_mib=peak,
        checks=dict(
            float64_lambda_outside_the_bracket=check(float(outside), 0.0),
            user_random_state_unchanged=check(float(torch.equal(state, after)), 1.0, below=False),
        ),
    )


def check_model(name: str, args, device: torch.device) -> dict:
    import stable_regions as sr

    n_final, n_scan = (16, 64) if args.small else (256, 2048)
    model = build(name, args.small, device)
    tokenizer = Ids(model.config.vocab_size, max(n_final, n_scan) + 64)
    adapter = sr.wrap(model, tokenizer, name=name)
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    out = dict(model=name, weights_gib=round(weights, 2), device=str(device), tasks={})
    tasks = {
        "final_analysis": (final_analysis, (adapter, n_final, device)),
        "inner_position": (inner_position, (adapter, model, n_final, device)),
        "certify": (certify_task, (adapter, n_final, device)),
        "scan": (scan_task, (adapter, n_scan, device)),
        "generate": (generate_task, (adapter, model, device)),
    }
    for task, (run, run_args) in tasks.items():
        try:
            result = run(*run_args)
        except Exception as exc:  # a crash is a failed task, reported, and the rest still run
            result = dict(checks=dict(ran=dict(passed=False, error=f"{type(exc).__name__}: {exc}")))
        result["passed"] = all(c["passed"] for c in result["checks"].values())
        out["tasks"][task] = result
        print(
            f"{name} {task}: {'pass' if result['passed'] else 'FAIL'}", file=sys.stderr, flush=True
        )
    del adapter, model, tasks
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny shapes: checks the logic")
    parser.add_argument("--models", nargs="+", default=list(SHAPES))
    parser.add_argument("--out", default="device-check.json")
    parser.add_argument(
        "--tolerance",
        nargs="+",
        default=[],
        metavar="NAME=VALUE",
        help=f"override tolerances ({', '.join(TOLERANCE)})",
    )
    args = parser.parse_args()
    for item in args.tolerance:
        name, _, value = item.partition("=")
        if name not in TOLERANCE:
            print(f"error: unknown tolerance {name!r}: {', '.join(TOLERANCE)}", file=sys.stderr)
            return 2
        TOLERANCE[name] = float(value)
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
        tolerance=TOLERANCE,
        models=[],
    )
    started = time.perf_counter()
    for name in args.models:
        doc["models"].append(check_model(name, args, device))
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")  # written as it goes
    doc["seconds"] = round(time.perf_counter() - started, 1)
    results = [t for m in doc["models"] for t in m["tasks"].values()]
    passed = sum(t["passed"] for t in results)
    doc["passed"] = passed == len(results)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    failed = [
        f"{m['model']}/{k}" for m in doc["models"] for k, t in m["tasks"].items() if not t["passed"]
    ]
    print(
        f"device check: {passed}/{len(results)} tasks passed in {doc['seconds']:.0f} s"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 0 if doc["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
