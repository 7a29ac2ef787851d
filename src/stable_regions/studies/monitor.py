"""Watch stability while the model generates: a ``transformers`` logits processor.

``StabilityMonitor`` is handed the scores of every sequence at every step and returns them
untouched; from them and the unembedding W it records, per generated token:

- the chosen token and its probability, the most likely token and its probability, the
  entropy, the top alternatives (``vocabulary`` defines every column);
- ``lambda_max`` of the pre-logit curvature ``H = W^T (diag p - p p^T) W`` and the radius
  along its top direction at each eps: ``radius_quadratic = sqrt(2 eps / lambda_max)`` and
  ``radius_curve``, the root of the KL along the ray (below);
- ``radius_flip``: the exact least L2 move of the pre-logit vector that lets another token
  overtake the top one (``geometry.flip_radius``);
- ``radius_certified`` (optional): a ball on which the KL provably stays below eps, from the
  bracket's upper end (``geometry.BallBound``);
- ``fragile``: ``radius_curve < threshold`` where the user gives a threshold, else
  ``radius_flip < radius_curve`` (the greedy token changes before the KL reaches eps);
- for each user direction ``u`` at the pre-logit vector, the radius along ``+-u``
  (``W u`` computed once).

Two modes (docs/monitor.md has the math and the measurements):

- ``fast`` reads ``support`` rows of W (512), never the whole of it: the bracket
  ``lambda_lower <= lambda_max <= lambda_upper`` of ``geometry.curvature_bracket`` (a 32 x 32
  Gram matrix of the likeliest tokens and O(V) sums: no eigen-solve), its top direction
  ``v``, and ``lambda_max`` as the variance of ``w . v`` over the ``support`` likeliest
  tokens (the rest of the mass lumped at their mean: a lower bound); ``radius_curve`` is
  the exact KL root along ``+-v`` for that restricted distribution.
- ``exact``: the Lanczos search of ``geometry.top_curvature`` to a Ritz residual of ``tol``,
  one product ``W v`` in the head's dtype; ``radius_curve`` is then the exact KL root
  along ``+-v`` (``geometry.nearest_cgf_crossings``: with a linear head the KL along a ray
  is the CGF of ``W v``, so this is the true radius of that direction, not a series).

Both run on a background thread by default, overlapped with the model's next forward pass.

The scores a processor sees are the model's logits after the processors ``generate`` builds
from the generation config (repetition penalty, bad words: -inf entries are tokens that
cannot be chosen) and before the sampling warpers (temperature, top-k, top-p); under beam
search they are log-probabilities (the same ``p``). The token chosen at a step is known only
at the next call (or at ``finish``): a record is completed then, so the callback and the
stream run one token behind the model.
"""

from __future__ import annotations

import math
import queue
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from transformers import LogitsProcessor

from .._support.inputs import as_adapter, check_eps, json_value
from ..engine import summing_head
from ..errors import InvalidParameterError, StableRegionsError
from ..geometry import (
    search_dtype,
)
from ..models.precision import full_float32_products
from ..vocabulary import describe
from .token_geometry import TokenGeometry, check_directions, check_mode

_END = object()  # the stream's end marker
MAX_PENDING = 16  # steps the background worker may fall behind before generate waits


@dataclass
class _Step:
    """One call: per row (B,) arrays, per (row, eps) (B, E) arrays; tokens filled later."""

    generation: int
    step: int
    values: dict[str, np.ndarray]
    radii: dict[str, np.ndarray]
    top_ids: np.ndarray  # (B, token_geometry.ALTERNATIVES)
    top_probs: np.ndarray
    token_id: np.ndarray  # (B,) -1 until known
    prob: np.ndarray


class StabilityMonitor(LogitsProcessor):
    """A logits processor that records stability per generated token; it never changes
    the scores.

    Parameters
    ----------
    model : str, ModelAdapter or transformers model
        As for :func:`analyze`.
    eps : float or list of float, default 0.1
        KL thresholds (nats).
    mode : {"fast", "exact"}, default "fast"
        ``"fast"``: a bracket on ``lambda_max`` from 512 rows of W per step; ``"exact"``:
        Lanczos, and the exact root along the top direction.
    threshold : float, optional
        Flag tokens whose ``radius_curve`` (at each eps) is below it; otherwise ``fragile``
        means the top token flips before the KL reaches eps.
    directions : array or mapping, optional
        User directions at the pre-logit vector, ``(k, d)`` or ``{name: (d,)}``: each adds
        ``radius_<name>``.
    callback : callable, optional
        Called with one dict per token once its choice is known.
    certified : bool, optional
        Add ``radius_certified`` (default: in exact mode only).
    tokens : int, default 32
        Likeliest tokens in the bracket's Gram matrix.
    support : int, default 512
        Fast mode: the likeliest tokens the direction's cumulants are taken over.
    eig_tol : float, default 1e-3
        The Lanczos tolerance of exact mode.
    background : bool, default True
        Compute on a worker thread, overlapped with the model's next forward pass.
        ``finish``, ``to_frame`` and ``wait`` wait for it; ``close`` (or a ``with`` block)
        stops it.

    Examples
    --------
    >>> with sr.StabilityMonitor(model, eps=0.1) as monitor:  # doctest: +SKIP
    ...     out = model.model.generate(ids, max_new_tokens=8, logits_processor=[monitor])
    ...     monitor.finish(out)
    >>> monitor.to_frame()  # doctest: +SKIP
    """

    def __init__(
        self,
        model,
        *,
        eps: float | Sequence[float] = (0.1,),
        mode: str = "fast",
        threshold: float | None = None,
        directions=None,
        callback: Callable[[dict], None] | None = None,
        certified: bool | None = None,
        tokens: int = 32,
        support: int = 512,
        eig_tol: float = 1e-3,
        background: bool = True,
    ) -> None:
        self.adapter = as_adapter(model)
        if self.adapter.logit_softcap is not None:
            raise StableRegionsError(
                "the monitor needs a linear head (this model softcaps its logits): use "
                "`analyze` or `certify` on the generated text instead"
            )
        self.eps = check_eps(eps)
        self.mode = check_mode(mode)
        if threshold is not None and not (math.isfinite(threshold) and threshold > 0):
            raise InvalidParameterError(f"threshold must be a finite radius > 0, got {threshold}")
        self.threshold = threshold
        self.callback = callback
        self.certified = (mode == "exact") if certified is None else bool(certified)
        self.weight = summing_head(self.adapter).weight  # float32 (or float64) products
        search = None  # exact mode's Lanczos: bfloat16 where it is native
        dtype = search_dtype(self.weight.device)
        if mode == "exact" and dtype != self.weight.dtype:
            search = self.adapter.head_in(dtype)  # the stored bfloat16 head, no copy
        self.directions = check_directions(directions, self.weight.shape[1])
        self.geometry = TokenGeometry(
            self.weight,
            eps=self.eps,
            mode=mode,
            tokens=tokens,
            support=support,
            eig_tol=eig_tol,
            certified=self.certified,
            directions=self.directions,
            search=search,
        )
        self._pending: list[Future] = []
        self._worker = (
            ThreadPoolExecutor(1, thread_name_prefix="stable-regions-monitor")
            if background
            else None
        )
        # the worker computes on its own CUDA stream: its copies to the host then wait for its
        # own kernels, not for the generation's queue on the default stream
        on_cuda = self.weight.device.type == "cuda" and self._worker is not None
        self._cuda_stream = torch.cuda.Stream(self.weight.device) if on_cuda else None
        self.reset()

    # ----------------------------------------------------------------- state
    def reset(self) -> None:
        """Forget every record (the next call starts generation 0)."""
        self.wait()
        self._steps: list[_Step] = []
        self._generation = -1
        self._prompt_len = 0
        self._prev_ids: Tensor | None = None
        self._prev_logp: Tensor | None = None
        self._queue: queue.Queue = queue.Queue()
        self._streaming = False

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self._worker is None:
            self._observe(input_ids, scores)
            return scores  # never changed
        # copies: generate may change its tensors in place once we return
        ids, copied = input_ids.detach().clone(), scores.detach().clone()
        ready = None
        if self._cuda_stream is not None:  # the copies are queued on generate's stream
            ready = torch.cuda.Event()
            ready.record()
            for t in (ids, copied):  # not reused by generate's allocations meanwhile
                t.record_stream(self._cuda_stream)
        while self._pending and self._pending[0].done():
            self._pending.pop(0).result()  # a failure surfaces here, at the next token
        if len(self._pending) >= MAX_PENDING:  # the model outruns the monitor: wait a step
            self._pending.pop(0).result()
        self._pending.append(self._worker.submit(self._observe_on_stream, ids, copied, ready))
        return scores

    def _observe_on_stream(self, input_ids: Tensor, scores: Tensor, ready) -> None:
        """``_observe`` in the worker: on its own stream, after ``ready`` (the copies)."""
        if self._cuda_stream is None:
            return self._observe(input_ids, scores)
        with torch.cuda.stream(self._cuda_stream):
            self._cuda_stream.wait_event(ready)
            self._observe(input_ids, scores)

    def wait(self) -> None:
        """Until every step handed to the background worker is recorded (re-raises its
        error, if any)."""
        while self._pending:
            self._pending.pop(0).result()

    def close(self) -> None:
        """Wait for the last steps and stop the worker thread; the records stay readable.
        A closed monitor still works, on the caller's thread."""
        if self._worker is not None:
            try:
                self.wait()
            finally:
                self._worker.shutdown(wait=True)
                self._worker, self._cuda_stream = None, None

    def __enter__(self) -> StabilityMonitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @torch.no_grad()
    @full_float32_products()
    def _observe(self, input_ids: Tensor, scores: Tensor) -> None:
        L = input_ids.shape[1]
        prev = self._prev_ids
        if prev is None or L != prev.shape[1] + 1 or not self._resolve(input_ids):
            # a new call to generate: no row extends one of the last step's
            self._generation += 1
            self._prompt_len = L
        values, radii, top_ids, top_probs, logp = self.geometry(scores)
        B = scores.shape[0]
        self._steps.append(
            _Step(
                self._generation,
                L - self._prompt_len,
                values,
                radii,
                top_ids,
                top_probs,
                np.full(B, -1, dtype=np.int64),
                np.full(B, np.nan),
            )
        )
        self._prev_ids = input_ids.detach().clone()
        self._prev_logp = logp

    def _resolve(self, ids: Tensor) -> bool:
        """Fill the previous step's tokens from their children's last column; False where no
        row of ``ids`` extends a row of the previous step."""
        prev, step = self._prev_ids, self._steps[-1]
        ids = ids.to(prev.device)
        if ids.shape[0] == prev.shape[0] and torch.equal(ids[:, :-1], prev):
            parents = torch.arange(ids.shape[0])
        else:  # beams reordered: the row whose prefix each child extends (-1: none)
            match = (ids[:, None, :-1] == prev[None]).all(-1)
            parents = torch.where(match.any(-1), match.int().argmax(-1), -1).cpu()
            if not bool((parents >= 0).any()):
                return False
        chosen = ids[:, -1].cpu()
        for child, parent in enumerate(parents.tolist()):
            if parent < 0 or step.token_id[parent] >= 0:
                continue
            token = int(chosen[child])
            step.token_id[parent] = token
            step.prob[parent] = float(self._prev_logp[parent, token].exp())
            self._emit(step, parent)
        return True

    def finish(self, sequences: Tensor | None = None) -> None:
        """Complete the last step from ``generate``'s output (its last column), and end the
        stream. Safe to call twice."""
        self.wait()
        if sequences is not None and self._prev_ids is not None:
            seqs = getattr(sequences, "sequences", sequences)
            if seqs.shape[1] == self._prev_ids.shape[1] + 1:
                self._resolve(seqs)
        self._queue.put(_END)

    # ------------------------------------------------------------- live use
    def _emit(self, step: _Step, row: int) -> None:
        if self.callback is None and not self._streaming:
            return
        record = self._record(step, row)
        if self.callback is not None:
            self.callback(record)
        if self._streaming:
            self._queue.put(record)

    def stream(self, timeout: float | None = None) -> Iterator[dict]:
        """Token records as they complete, for ``generate`` running in another thread; ends
        at ``finish``. Call before generating."""
        self._streaming = True
        while True:
            item = self._queue.get(timeout=timeout)
            if item is _END:
                return
            yield item

    def _fields(self, step: _Step, row: int) -> dict:
        """One row's token and per-token values (before eps): a record's and a frame row's."""
        token = int(step.token_id[row])
        return {
            "generation": step.generation,
            "sequence": row,
            "step": step.step,
            "chosen_token_id": token,
            "chosen_token": self.adapter.token_strings([token])[0] if token >= 0 else "",
            "chosen_prob": float(step.prob[row]),
            **{k: v[row].item() for k, v in step.values.items()},
        }

    def _record(self, step: _Step, row: int) -> dict:
        out = {k: json_value(v) for k, v in self._fields(step, row).items()}
        for name, r in step.radii.items():
            out[name] = {e: json_value(r[row, j]) for j, e in enumerate(self.eps)}
        return out

    # ---------------------------------------------------------------- output
    def to_frame(self) -> pd.DataFrame:
        """One row per recorded token and eps (columns in the module doc). A step whose
        token is not yet known (before ``finish``) has ``chosen_token_id`` -1."""
        self.wait()
        rows = []
        for step in self._steps:
            for r in range(len(step.token_id)):
                base = {
                    **self._fields(step, r),
                    "top_tokens": self.adapter.token_strings(step.top_ids[r].tolist()),
                    "top_probs": step.top_probs[r].tolist(),
                }
                for j, e in enumerate(self.eps):
                    row = dict(base, eps=e)
                    for name, r_all in step.radii.items():
                        row[name] = float(r_all[r, j])
                    rows.append(row)
        frame = pd.DataFrame(rows, columns=self.columns() if not rows else None)
        if rows:
            if self.threshold is not None:
                frame["fragile"] = frame["radius_curve"] < self.threshold
            else:
                frame["fragile"] = frame["radius_flip"] < frame["radius_curve"]
        return describe(frame)

    def columns(self) -> list[str]:
        return monitor_columns(certified=self.certified, directions=list(self.directions))


def monitor_columns(*, certified: bool = False, directions: Sequence[str] = ()) -> list[str]:
    """The monitor frame's columns, in order (the vLLM processor's records are put in it)."""
    names = ["generation", "sequence", "step", "chosen_token_id", "chosen_token"]
    names += ["chosen_prob", "next_token_id", "next_prob", "entropy", "lambda_max"]
    names += ["lambda_lower", "lambda_upper", "radius_flip", "top_tokens", "top_probs"]
    names += ["eps", "radius_quadratic", "radius_curve"]
    names += ["radius_certified"] if certified else []
    names += [f"radius_{n}" for n in directions] + ["fragile"]
    return names
