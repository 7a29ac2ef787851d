"""``stable-regions bench``: our answers and the tools people would use instead, side by side.

Every row times each contender after a warm-up, alternating them, and reports
the median of the repeats, ``ratio = baseline_s / ours_s``, ``max_rel_err`` of our answer
against the baseline's, and the peak RSS while our side ran (the process's peak-RSS mark is
reset just before: the loaded model and everything resident, plus what ours allocated).
Rows whose baseline library is not installed say so instead of timing it.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .._support.files import write_json
from .._support.inputs import as_adapter
from ..engine import eig_tolerance
from ..geometry import (
    FisherOperator,
    PullbackOperator,
    RayCurve,
    direction_cumulants,
    radius_pade,
    top_eigenpair_float64,
)
from ..models import ModelAdapter
from ..probes import RayKL, measure_boundaries
from .iso_kl import rows_iso_kl
from .monitor import rows_monitor
from .prompts import prompt_ids, prompt_text
from .scale import rows_scale
from .targets import rows_forward_multiples
from .timing import compare, peak_rss_mb, peak_rss_of, reset_peak_rss, result_row, timed
from .vllm_overhead import rows_monitor_vllm


@dataclass
class BenchSettings:
    quick: bool = True
    repeats: int = 3
    directions: int = 1000
    document_tokens: int = 512
    hvp_tokens: int = 256
    map_positions: int = 64
    map_layers: str = "all"  # or "sample": embed, the middle block, final
    monitor_tokens: int = 128  # new tokens per generate call of the monitor rows

    @classmethod
    def make(cls, quick: bool) -> BenchSettings:
        if quick:
            return cls(
                quick=True,
                repeats=2,
                directions=50,
                document_tokens=128,
                hvp_tokens=64,
                map_positions=16,
                map_layers="sample",
                monitor_tokens=16,  # 32 took ~100 s of a 176 s run: the per-step cost shows in 16
            )
        return cls(quick=False)


def _example_prelogit(adapter: ModelAdapter) -> torch.Tensor:
    """The pre-logit vector at the last token of a short fixed prompt (one-position rows)."""
    return adapter.prelogits(adapter.tokenize("The capital of France is"))[-1]


def _kl_fn(head, h: torch.Tensor):
    logp = torch.log_softmax(head.logits(h), -1)

    def kl(x: torch.Tensor) -> torch.Tensor:
        logq = torch.log_softmax(head.logits(h + x), -1)
        return (logp.exp() * (logp - logq)).sum()

    return kl


class _HeadAt(torch.nn.Module):
    """The head as a module of one parameter, the pre-logit vector (input ignored)."""

    def __init__(self, head, h: torch.Tensor) -> None:
        super().__init__()
        self.head = head
        self.h = torch.nn.Parameter(h.clone())

    def forward(self, _x: torch.Tensor) -> torch.Tensor:
        return self.head.logits(self.h)[None]


class _SoftCrossEntropy(torch.nn.Module):
    """``-sum p log softmax(z)``: its Hessian in ``z`` is ``diag(p) - p p^T``, as the KL's."""

    reduction = "sum"

    def forward(self, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return -(target * torch.log_softmax(z, -1)).sum()


def row_top_eig_final(adapter: ModelAdapter, s: BenchSettings) -> list[dict]:
    h = _example_prelogit(adapter)
    d = h.shape[0]
    stored = adapter.stored_head
    weight32 = stored.weight.float()

    def ours():  # what analyze runs for one position (engine.prelogit_blocks)
        if not stored.is_linear:  # Lanczos on the head's operator through the softcap
            op = FisherOperator.from_head(stored, h[None])
            tol = eig_tolerance(1e-10, stored.weight.dtype)
            return float(op.top_eigenpairs(k=1, tol=tol)[0][0, 0])
        # engine.top_vectors_linear's one-position routine, at the accuracy this row asks for
        # (analyze asks 1e-8); the estimate behind rtol is second order (see there)
        lam, _ = top_eigenpair_float64(weight32, h[None], bias=stored.bias, rtol=1e-6)
        return float(lam[0])

    # our peak before the baselines allocate theirs (the float64 head, 226 MB for SmolLM2)
    peak = peak_rss_of(ours)
    head = adapter.head

    def func_hessian():
        H = torch.func.hessian(_kl_fn(head, h))(torch.zeros_like(h))
        return float(torch.linalg.eigvalsh(H)[-1])

    def dense():
        H = FisherOperator.from_head(head, h[None]).dense()[0]
        return float(torch.linalg.eigvalsh(H)[-1])

    contenders: dict[str, Callable[[], object]] = {
        "ours": ours,
        "torch.func.hessian+eigh": func_hessian,
        "dense H+eigh": dense,
    }
    missing = []
    try:
        import hessian_eigenthings as he

        op = FisherOperator.from_head(head, h[None])
        lam_op = he.LambdaOperator(lambda v: op.matvec(v[None])[0], size=d, dtype=torch.float64)

        def eigenthings():
            # its default iteration cap stops ~3% short of the top eigenvalue here;
            # 200 iterations reach the same answer as ours
            res = he.lanczos(lam_op, k=1, tol=1e-10, max_iter=min(200, d), seed=0)
            return float(torch.as_tensor(res.eigenvalues).reshape(-1)[0])

        contenders["hessian-eigenthings lanczos"] = eigenthings
    except ImportError:
        missing.append("hessian-eigenthings")
    try:
        import curvlinops  # noqa: F401
        from scipy.sparse.linalg import LinearOperator, eigsh

        at_h = _HeadAt(head, h)

        def curv():
            from curvlinops import HessianLinearOperator

            p = torch.softmax(head.logits(h), -1)

            H = HessianLinearOperator(
                at_h,
                _SoftCrossEntropy(),
                [at_h.h],
                [(torch.zeros(1, 1), p[None])],
            )
            lin = LinearOperator(
                (d, d),
                matvec=lambda v: (H @ torch.as_tensor(v, dtype=torch.float64)).numpy(),
                dtype=np.float64,
            )
            return float(eigsh(lin, k=1, which="LA", tol=1e-10, return_eigenvectors=False)[0])

        contenders["curvlinops + scipy eigsh"] = curv
    except ImportError:
        missing.append("curvlinops-for-pytorch")
    got = compare(contenders, s.repeats)
    ours_s, lam = got.pop("ours")
    rows = [
        result_row(
            "top_eig_final",
            name,
            ours_s=ours_s,
            baseline_s=t,
            max_rel_err=abs(lam / ans - 1.0),
            peak_rss_mb=peak,
        )
        for name, (t, ans) in got.items()
    ]
    rows += [
        result_row("top_eig_final", f"{m} (not installed)", ours_s=ours_s, peak_rss_mb=peak)
        for m in missing
    ]
    return rows


def row_predict_vs_measure(adapter: ModelAdapter, s: BenchSettings) -> list[dict]:
    h = _example_prelogit(adapter)
    g = torch.Generator().manual_seed(0)
    v = torch.nn.functional.normalize(
        torch.randn(s.directions, h.shape[0], generator=g, dtype=h.dtype), dim=-1
    )
    eps = 0.1
    scale = np.full(s.directions, float(h.norm()))
    stored = adapter.stored_head
    weight32 = stored.weight.float()

    def ours():  # what validate predicts along its rays (validation.FinalLayerStudy.measure)
        if not stored.is_linear:  # the curve through the softcap
            u0 = stored.raw_float64(h[None])
            c2, c3, c4 = RayCurve(stored, u0, stored.direction_float64(v)).coefficients()
        else:  # the logits from h, then the cumulants from float32 products, chunked
            logits = h.float() @ weight32.T
            if stored.bias is not None:
                logits = logits + stored.bias.float()
            c2, c3, c4 = direction_cumulants(weight32, logits, v)
        return radius_pade(c2, c3, eps, c4).numpy()

    peak = peak_rss_of(ours)  # before the baseline's float64 head exists
    head = adapter.head

    def measured():
        kl = RayKL(head.logits, h.expand(s.directions, -1), v)
        return measure_boundaries(kl, [eps], t_start=1e-3 * scale, t_max=1e6 * scale, rtol=1e-6)[
            :, 0
        ]

    got = compare({"ours": ours, "bisection on the model": measured}, max(1, s.repeats - 1))
    (ours_s, pred), (base_s, meas) = got["ours"], got["bisection on the model"]
    return [
        result_row(
            "predict_vs_measure",
            f"bisection on the model ({s.directions} directions, eps {eps})",
            ours_s=ours_s,
            baseline_s=base_s,
            max_rel_err=float(np.max(np.abs(pred / meas - 1.0))),
            peak_rss_mb=peak,
        )
    ]


def row_pullback_hvp_mid(adapter: ModelAdapter, s: BenchSettings) -> list[dict]:
    from ..models.suffix import SuffixBatch

    model = adapter  # the model's own precision, as the maps run (no float64 twin: ~1 GB)
    ids = prompt_ids(model, s.hvp_tokens)
    n = ids.shape[1]
    hook = model.hook_for_layer(model.n_layers // 2)
    position = n - 1
    build_s, suffix = timed(lambda: SuffixBatch(model, ids, hook, [position]))
    record_s, op = timed(lambda: PullbackOperator.from_suffix(suffix))
    p = op.p[0]
    g = torch.Generator().manual_seed(0)
    v = torch.nn.functional.normalize(
        torch.randn(suffix.dim, generator=g, dtype=torch.float64), dim=0
    ).to(suffix.dtype)

    def full_logits(delta: torch.Tensor) -> torch.Tensor:
        with model.perturbation(hook, position, delta[None], seq_len=n):
            out = model.forward(ids, use_cache=False, logits_to_keep=1)
        return out.logits[0, -1]

    def full():  # the same arithmetic as ours: products in the model's dtype, F in float64
        with model.frozen():  # as ours: no weight-side graph
            _, jv = torch.func.jvp(full_logits, (torch.zeros_like(v),), (v,))
            jv = jv.to(p.dtype)
            u = p * jv - p * (p @ jv)
            _, pull = torch.func.vjp(full_logits, torch.zeros_like(v))
            # a copy: the vjp's output keeps the whole recorded pass (~1.6 GB here) alive
            return pull(u.to(suffix.dtype))[0].detach().to(p.dtype, copy=True)

    def ours():
        return op.matvec(v[None])[0]

    got = compare({"ours": ours, "full re-run": full}, s.repeats)
    (ours_s, a), (base_s, b) = got["ours"], got["full re-run"]
    return [
        result_row(
            "pullback_hvp_mid",
            f"full re-run ({n} tokens, block {model.n_layers // 2}; suffix cache built once "
            f"in {build_s:.2f} s, the pass our products replay recorded once in {record_s:.2f} s)",
            ours_s=ours_s,
            baseline_s=base_s,
            max_rel_err=float(((a - b).norm() / b.norm()).detach()),
            peak_rss_mb=peak_rss_of(ours),
        )
    ]


def row_scan_document_final(adapter: ModelAdapter, s: BenchSettings) -> list[dict]:
    from ..studies.scan import Scanner

    ids = prompt_ids(adapter, s.document_tokens)
    eps = [0.1]
    scanner = Scanner(adapter)

    def forward():
        with torch.no_grad():
            adapter.forward(ids, use_cache=False)

    def scan():
        return scanner.scan(adapter, ids, eps)

    got = compare({"scan": scan, "forward": forward}, s.repeats)
    (scan_s, found), (fwd_s, _) = got["scan"], got["forward"]
    peak = peak_rss_of(scan)
    # the check: float64 Lanczos to 1e-12 at every 8th position
    h_all = adapter.prelogits(ids)
    check = list(range(0, len(h_all), 8))
    ref = FisherOperator.from_head(adapter.head, h_all[check]).top_eigenpairs(k=1, tol=1e-12)[0][
        :, 0
    ]
    err = float((found["lambda_max"][check] / ref - 1.0).abs().max())
    return [
        result_row(
            "scan_document_final",
            f"one forward pass ({ids.shape[1]} tokens); lambda_max checked against float64 "
            f"Lanczos at {len(check)} positions",
            ours_s=scan_s,
            baseline_s=fwd_s,
            max_rel_err=err,
            peak_rss_mb=peak,
        )
    ]


def row_map_prompt(adapter: ModelAdapter, s: BenchSettings) -> list[dict]:
    """The stability map of one prompt, timed once (minutes in full), against one cell at a
    time (a block of one position: what the map did before positions were batched), timed
    on a sample of inner cells and scaled to the map's inner cells."""
    from ..models.layers import check_layers
    from ..studies.maps import stability_map

    text = prompt_text(adapter, s.map_positions)
    n = min(s.map_positions, adapter.tokenize(text).shape[1])
    positions = list(range(n))
    mid = adapter.n_layers // 2
    layers = check_layers(
        "all" if s.map_layers == "all" else ["embed", mid, "final"], adapter.n_layers
    )
    reset_peak_rss()
    ours_s, found = timed(lambda: stability_map(adapter, text, layers=layers, positions=positions))
    peak = round(peak_rss_mb(), 1)
    sample = [(row, col) for row in (0, layers.index(str(mid))) for col in (0, n - 1)]
    per_cell, errs = [], []
    for row, col in sample:
        t, cell = timed(
            lambda row=row, col=col: stability_map(
                adapter, text, layers=[layers[row]], positions=[positions[col]]
            )
        )
        per_cell.append(t)
        errs.append(abs(found.lambda_max[row, col] / cell.lambda_max[0, 0] - 1.0))
    inner = sum(1 for layer in layers if layer != "final") * n
    return [
        result_row(
            "map_prompt",
            f"one cell at a time, {statistics.mean(per_cell):.2f} s per inner cell over "
            f"{len(sample)} cells, scaled to the map's {inner} inner cells "
            f"({len(layers)} layers x {n} positions; lambda_max compared at the sampled cells)",
            ours_s=ours_s,
            baseline_s=statistics.mean(per_cell) * inner,
            max_rel_err=float(max(errs)),
            peak_rss_mb=peak,
        )
    ]


ROWS = {
    "top_eig_final": row_top_eig_final,
    "scan_document_final": row_scan_document_final,
    "predict_vs_measure": row_predict_vs_measure,
    "map_prompt": row_map_prompt,
    "forward_multiples": rows_forward_multiples,
    "pullback_hvp_mid": row_pullback_hvp_mid,
    "scale_llama3_1b": rows_scale,
    "monitor_generate": rows_monitor,
    "monitor_vllm": rows_monitor_vllm,
    "iso_kl": rows_iso_kl,
}


def run_bench(
    model,
    quick: bool = True,
    rows: list[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    settings: BenchSettings | None = None,
) -> dict:
    """All rows (or ``rows``) one after another; returns the JSON document."""
    adapter = as_adapter(model)
    settings = settings or BenchSettings.make(quick)
    names = rows or list(ROWS)
    out_rows: list[dict] = []
    for i, name in enumerate(names):
        # Rows run one after another in this process (a forked child deadlocks in OpenMP once
        # torch has used its thread pool); each row measures its own peak (peak_rss_of).
        try:
            out_rows += ROWS[name](adapter, settings)
        except Exception as exc:  # a failed row is reported, the others still run
            out_rows.append(result_row(name, f"failed: {type(exc).__name__}: {exc}"))
        # a row's float64 copies are not the next row's memory
        adapter.release_copies()
        gc.collect()
        if progress is not None:
            progress(i + 1, len(names))
    return {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "model": adapter.name,
        "quick": quick,
        "settings": settings.__dict__,
        "rows": [
            {
                k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in r.items()
            }
            for r in out_rows
        ],
    }


def write_bench(doc: dict, path: str | Path) -> Path:
    return write_json(path, doc)
