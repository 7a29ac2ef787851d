"""Scan every position of a document for the price of running the model.

The forward pass already computed the logits of every position. From them alone (and the
unembedding W) ``geometry.top_curvature`` finds ``lambda_max``, its direction and the
Pade radius (``radius_pade``) along it at every position: a Lanczos search started from the
likeliest tokens' Gram matrix, all positions' products batched into matrix-matrix products
(bfloat16 where the CPU multiplies it natively), then one float32 product ``W v`` per
position for ``lambda_max`` and the cumulants. No (positions x V x d) array, ever.

``scan_corpus`` (``stable-regions scan``) runs it over documents and corpora, in windows,
writing results as it goes.

Accuracy: ``lambda_max`` within ~1e-3 relative of a float64 Lanczos (tolerance ``tol`` on the
search's Ritz residual; the eigenvalue error is second order in it), limited in the median by
the model's own float32 logits (~1e-5).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .._support.files import MemoryRun, RunDirectory, write_json, write_parquet
from .._support.heap import return_freed_memory
from .._support.inputs import as_adapter, check_eps
from ..budget import rows_within
from ..calibration import model_fingerprint
from ..errors import InvalidParameterError, StableRegionsError
from ..geometry import radius_pade, radius_quadratic, search_dtype, top_curvature
from ..models import ModelAdapter
from ..models.precision import full_float32_products
from ..plotting import axes_or_new, save
from ..prompts import Prompt, as_prompts, corpus_digest
from ..results import Result
from ..vocabulary import describe

DEFAULT_WINDOW = 1024  # tokens per forward pass of a corpus scan
ALTERNATIVES = 5  # likeliest next tokens kept per position (the viewer's tooltip)


def position_block(vocab_size: int) -> int:
    """Positions per block: each (positions x V) float32 array within the shared budget (341
    positions of SmolLM2). With blocks twice that size the 512-token bench scan peaked at
    1527-1551 MB against 1391-1423 MB, at the same speed (measured side by side)."""
    return rows_within(vocab_size, 4)


class Scanner:
    """The float32 unembedding of a model (the model's own tensor when it is float32) and,
    where the search runs in bfloat16, a bfloat16 copy."""

    def __init__(
        self,
        adapter: ModelAdapter,
        *,
        tol: float = 1e-2,
        tokens: int = 32,
        search: torch.dtype | None = None,
    ) -> None:
        if adapter.logit_softcap is not None:
            raise StableRegionsError(
                "the fast scan needs a linear head (this model caps or scales its logits): "
                "use `analyze` for it"
            )
        head = adapter.float32_head  # the adapter's one float32 head (no copy per scanner)
        self.weight, self.bias = head.weight, head.bias
        dtype = search or search_dtype(self.weight.device)  # bfloat16 where it is native
        self.search = None if dtype == torch.float32 else adapter.head_in(dtype)
        self.tol = tol
        self.tokens = tokens

    def scan_logits(self, logits: Tensor, eps: list[float]) -> dict[str, Tensor]:
        """``lambda_max`` (n,), the nearest Pade radius ``radius_pade`` (n, len(eps)) over +-v, the
        search's residual and iterations, for logits (n, V)."""
        out: dict[str, list[Tensor]] = {
            "lambda_max": [],
            "radius_pade": [],
            "residual": [],
            "iterations": [],
        }
        block = position_block(logits.shape[-1])
        for s in range(0, len(logits), block):
            found = top_curvature(
                self.weight,
                logits[s : s + block],
                tol=self.tol,
                tokens=self.tokens,
                search_weight=self.search,
            )
            c2, c3, c4 = found.lambda_max, found.c3, found.c4
            radii = [
                torch.minimum(radius_pade(c2, c3, e, c4), radius_pade(c2, -c3, e, c4)) for e in eps
            ]
            out["lambda_max"].append(c2)
            out["radius_pade"].append(torch.stack(radii, -1))
            out["residual"].append(found.residual)
            out["iterations"].append(found.iterations)
        return {k: torch.cat(v) for k, v in out.items()}

    @torch.no_grad()
    def scan(self, adapter: ModelAdapter, ids: Tensor, eps: list[float]) -> dict[str, Tensor]:
        """One forward pass over ``ids`` (1, n) to the pre-logit vectors, then ``scan_logits``
        on their float32 logits a block at a time. Not the model's own logits: in a 16-bit
        model those carry its roundoff (bfloat16: ``lambda_max`` 0.4% off in the median)."""
        h = adapter.prelogits(ids, dtype=None)
        block = position_block(self.weight.shape[0])
        parts = [
            self.scan_logits(self.logits(h[s : s + block]), eps) for s in range(0, len(h), block)
        ]
        return {k: torch.cat([part[k] for part in parts]) for k in parts[0]}

    def logits(self, h: Tensor) -> Tensor:
        """Float32 logits (n, V) of pre-logit vectors h (n, d)."""
        z = h.to(torch.float32) @ self.weight.T
        return z if self.bias is None else z.add_(self.bias)

    @torch.no_grad()
    def scan_prelogits(self, h: Tensor, eps: list[float]) -> dict[str, Tensor]:
        """``scan_logits`` from pre-logit vectors h (n, d), the logits made a block at a time
        (never all n x V at once), with the next token's id and probability, the
        ``ALTERNATIVES`` likeliest tokens (``top_ids``, ``top_probs``) and the entropy (nats)
        of each position's distribution."""
        out: dict[str, list[Tensor]] = {}
        block = position_block(self.weight.shape[0])
        for s in range(0, len(h), block):
            logits = self.logits(h[s : s + block])
            logp = torch.log_softmax(logits.to(torch.float64), dim=-1)
            top_logp, top = logp.max(-1)
            alt_logp, alt = logp.topk(ALTERNATIVES, dim=-1)
            found = {
                "next_token": top,
                "next_prob": top_logp.exp(),
                "top_ids": alt,
                "top_probs": alt_logp.exp(),
                "entropy": -(logp.exp() * logp).sum(-1) + 0.0,  # + 0.0: no -0.0
                **self.scan_logits(logits, eps),
            }
            del logp
            for k, v in found.items():
                out.setdefault(k, []).append(v)
        return {k: torch.cat(v) for k, v in out.items()}


@dataclass(frozen=True)
class ScanSettings:
    """What a corpus scan computes; a resumed scan must have the same settings."""

    eps: list[float]
    window: int
    overlap: int


def document_windows(n: int, window: int, overlap: int) -> list[tuple[int, int, int]]:
    """``(start, stop, first)`` of the windows that cover ``n`` tokens: ``window`` tokens each,
    each after the first starting ``overlap`` tokens before the previous one stopped and
    reporting positions ``first..stop-1`` only, so every reported position sees at least
    ``overlap`` tokens before it (or the whole document before it)."""
    if window < 2 or not 0 <= overlap < window:
        raise StableRegionsError(
            f"window {window} and overlap {overlap}: need window >= 2 and 0 <= overlap < window"
        )
    out, start = [], 0
    while True:
        stop = min(n, start + window)
        out.append((start, stop, start if start == 0 else start + overlap))
        if stop == n:
            return out
        start = stop - overlap


@dataclass
class CorpusScan(Result):
    """A finished corpus scan: one row per (document, position, eps) (``to_frame``;
    ``vocabulary`` defines every column), one summary per document (``documents``), and the
    directory holding them (``out``; None for a scan kept in memory)."""

    study = "scan"
    model: str
    out: Path | None
    frame: pd.DataFrame = field(repr=False)
    documents: list[dict]

    def to_frame(self) -> pd.DataFrame:
        return self.frame

    def summary(self) -> pd.DataFrame:
        """Per document: positions, the median and smallest Pade radius at the first eps,
        where the smallest is, and the median ``lambda_max``."""
        return describe(pd.DataFrame(self.documents))

    def context(self) -> dict:
        return {"model": self.model, "eps": sorted(self.frame.eps.unique().tolist())}

    def fragile(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` positions of smallest Pade radius at the first eps."""
        first = self.frame[self.frame.eps == self.frame.eps.iloc[0]]
        return first.nsmallest(k, "radius_pade")

    def draw(self, ax=None, *, labelled: int = 8):
        """The Pade radius at the first eps along each document's positions (log scale): the
        ``labelled`` documents with the smallest radius in colour, on top of the others."""
        return radius_along_documents(self.frame, ax, labelled)


@full_float32_products()
def scan_corpus(
    model,
    documents: Sequence[Prompt | str],
    *,
    out: str | Path | None = None,
    eps: float | Sequence[float] = (0.1,),
    window: int | None = None,
    overlap: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> CorpusScan:
    """Scan every position of every document at the pre-logit vector, for about twice the
    price of running the model.

    Per position: the next token and its probability, the entropy, ``lambda_max`` (to a
    relative residual of ~1e-3), and ``radius_quadratic`` and ``radius_pade`` along the top
    curvature direction (nearest exit over both signs) at each eps. Nothing is measured on
    the model: check a position with :func:`analyze`.

    Parameters
    ----------
    model : str, ModelAdapter or transformers model
        As for :func:`analyze` (a linear head: softcapped logits are refused).
    documents : list of str or Prompt
        The documents (``Prompt`` ids name them).
    out : path, optional
        A run directory, written as it goes (``results.parquet``, ``summary.json``,
        ``radius.png``, one part per document); without, the scan stays in memory.
    eps : float or list of float, default 0.1
        KL thresholds (nats).
    window, overlap : int, optional
        Long documents run in windows of ``window`` tokens (default 1024, or the model's
        context) that repeat ``overlap`` tokens of context (default ``window // 8``).
    resume, overwrite : bool
        Continue the interrupted scan in ``out``, or replace it.
    progress : callable, optional
        Called as ``progress(done, total)`` in tokens.

    Returns
    -------
    CorpusScan
        ``summary()`` per document; ``fragile(k)`` the smallest radii.

    Examples
    --------
    >>> scan = sr.scan_corpus(model, ["The cat sat on the mat.", "Hello world."])
    >>> scan.fragile(3)  # doctest: +SKIP
    """
    adapter = as_adapter(model)
    if out is None and (resume or overwrite):
        raise InvalidParameterError(
            "resume=True and overwrite=True continue or replace a scan in a directory: give `out`"
        )
    plan = ScanPlan.make(adapter, documents, eps, window, overlap)
    scanner = Scanner(adapter)  # a model the fast scan cannot take fails here
    if out is None:
        run = MemoryRun()
    else:
        run = RunDirectory(out, plan.record, "scan", resume=resume, overwrite=overwrite)
    done = plan.tokens_done(run)
    if progress is not None:
        progress(done, plan.total)
    for i, doc in enumerate(plan.documents):
        if run.done(i):
            continue

        def tick(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, plan.total)

        run.write_part(
            i, scan_document(adapter, scanner, doc.id, plan.token_ids[i], plan.settings, tick)
        )
        return_freed_memory()
    return finish_scan(adapter, run, plan)


@dataclass
class ScanPlan:
    """A corpus scan's checked inputs: its documents and their tokens, its settings, and the
    run record a resumed scan must match (the same for a local and a Ray scan)."""

    documents: list[Prompt]
    token_ids: list[Tensor]
    settings: ScanSettings
    record: dict

    @property
    def total(self) -> int:
        return sum(len(t) for t in self.token_ids)

    def tokens_done(self, run: RunDirectory) -> int:
        return sum(len(t) for i, t in enumerate(self.token_ids) if run.done(i))

    @classmethod
    def make(cls, adapter: ModelAdapter, documents, eps, window, overlap) -> ScanPlan:
        eps = check_eps(eps)
        documents = as_prompts(documents, "document")
        if not documents:
            raise StableRegionsError("no documents given")
        ids = [d.id for d in documents]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise InvalidParameterError(f"document id {dup!r} appears twice: ids must be unique")
        limit = adapter.context_length
        if window is None:
            window = DEFAULT_WINDOW if limit is None else min(DEFAULT_WINDOW, limit)
        elif limit is not None and window > limit:
            raise StableRegionsError(
                f"window {window} is longer than the model's context of {limit} tokens: "
                f"use a window of at most {limit}"
            )
        overlap = int(window) // 8 if overlap is None else overlap
        settings = ScanSettings(eps, int(window), int(overlap))
        document_windows(1, settings.window, settings.overlap)  # bad sizes fail before any work
        record = {
            "tool": "stable-regions scan",
            "model": adapter.name,
            "fingerprint": model_fingerprint(adapter),
            "settings": asdict(settings),
            "documents": corpus_digest(documents),
            "n_documents": len(documents),
        }
        token_ids = [adapter.tokenize(d.text, any_length=True)[0] for d in documents]
        return cls(documents, token_ids, settings, record)


def scan_document(
    adapter: ModelAdapter,
    scanner: Scanner,
    doc_id: str,
    ids: Tensor,
    settings: ScanSettings,
    tick: Callable[[int], None] | None = None,
) -> pd.DataFrame:
    """One document's rows (position x eps), window by window; ``tick(n)`` after each window
    with the positions it reported."""
    frames = []
    for start, stop, first in document_windows(len(ids), settings.window, settings.overlap):
        h = adapter.prelogits(ids[None, start:stop], dtype=None)[first - start :]
        found = scanner.scan_prelogits(h, settings.eps)
        frames.append(_positions_frame(adapter, doc_id, ids, first, found, settings.eps))
        if tick is not None:
            tick(stop - first)
    return pd.concat(frames, ignore_index=True)


def finish_scan(adapter: ModelAdapter, run, plan: ScanPlan) -> CorpusScan:
    """Every part written: the results, the summary, the plot, and the run marked complete."""
    frame = describe(run.frame(len(plan.documents), "scan"))
    summary = [
        _document_summary(doc.id, f)
        for doc, (_, f) in zip(plan.documents, frame.groupby("doc_id", sort=False), strict=True)
    ]
    result = CorpusScan(adapter.name, run.out, frame, summary)
    if run.out is not None:
        write_parquet(frame, run.out / "results.parquet")
        write_json(
            run.out / "summary.json",
            {"model": adapter.name, "settings": asdict(plan.settings), "documents": summary},
        )
        save(result.plot(), run.out / "radius.png", dpi=120)
        run.finish()
    return result


def _positions_frame(
    adapter: ModelAdapter, doc_id: str, ids: Tensor, first: int, found: dict, eps: list[float]
) -> pd.DataFrame:
    n = len(found["lambda_max"])
    positions = np.arange(first, first + n)
    tokens = adapter.token_strings(ids[first : first + n])
    next_tokens = adapter.token_strings(found["next_token"])
    per_position = {
        "doc_id": doc_id,
        "position": positions,
        "token": tokens,
        "next_token": next_tokens,
        "next_prob": found["next_prob"].cpu().numpy(),
        "top_tokens": [adapter.token_strings(row) for row in found["top_ids"]],
        "top_probs": found["top_probs"].cpu().numpy().tolist(),
        "entropy": found["entropy"].cpu().numpy(),
        "lambda_max": found["lambda_max"].cpu().numpy(),
        "residual": found["residual"].cpu().numpy(),
    }
    return pd.concat(
        [
            pd.DataFrame(
                {
                    **per_position,
                    "eps": e,
                    "radius_quadratic": radius_quadratic(found["lambda_max"], e).cpu().numpy(),
                    "radius_pade": found["radius_pade"][:, j].cpu().numpy(),
                }
            )
            for j, e in enumerate(eps)
        ],
        ignore_index=True,
    ).sort_values(["position", "eps"], ignore_index=True)


def _document_summary(doc_id: str, frame: pd.DataFrame) -> dict:
    first = frame[frame.eps == frame.eps.iloc[0]]
    low = first.loc[first.radius_pade.idxmin()]
    return {
        "doc_id": doc_id,
        "positions": int(len(first)),
        "eps": float(first.eps.iloc[0]),
        "median_radius_pade": float(first.radius_pade.median()),
        "min_radius_pade": float(low.radius_pade),
        "min_position": int(low.position),
        "min_token": str(low.token),
        "median_lambda_max": float(first.lambda_max.median()),
    }


def radius_along_documents(frame: pd.DataFrame, ax=None, labelled: int = 8):
    """The figure of ``CorpusScan.plot``, from a scan's frame."""
    first = frame[frame.eps == frame.eps.iloc[0]]
    docs = dict(tuple(first.groupby("doc_id", sort=False)))
    fragile = sorted(docs, key=lambda d: docs[d].radius_pade.min())[:labelled]
    fig, ax = axes_or_new(ax, figsize=(9, 4))
    for doc_id, f in docs.items():
        if doc_id not in fragile:
            ax.plot(f.position, f.radius_pade, lw=0.5, color="0.75", alpha=0.5, zorder=1)
    for doc_id in fragile:
        f = docs[doc_id]
        ax.plot(f.position, f.radius_pade, lw=1.0, label=str(doc_id)[-40:], zorder=2)
    ax.set_yscale("log")
    ax.set_xlabel("position (token index in the document)")
    ax.set_ylabel(f"radius at eps {first.eps.iloc[0]:g} (radius_pade)")
    ax.set_title(
        "How far each position's pre-logit vector can move along its top curvature direction"
    )
    title = "documents" if len(docs) <= labelled else f"{labelled} most fragile of {len(docs)}"
    ax.legend(fontsize=7, loc="best", title=title, title_fontsize=7)
    return fig
