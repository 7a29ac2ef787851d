"""The vLLM processor's state, free of vLLM: which batch slots hold monitored requests, the
geometry of their tokens, and the records once each token's sampled id is known.

A request asks to be monitored through its sampling parameters::

    SamplingParams(extra_args={"stable_regions": {"eps": [0.1, 1.0], "id": "q17"}})

(``True`` for the defaults: eps 0.1, a random id, the engine's directory). Its slot's row of
logits is copied, and goes through ``TokenGeometry`` in fast mode (the same code as
``StabilityMonitor``'s) on a background thread, overlapped with the engine's next step, as
the Hugging Face monitor does it. The thread lags at most ``MAX_QUEUED`` steps behind; a
request that leaves the batch waits for its own steps first. The token sampled from a row is
read from the request's own output ids after the row's geometry, when the request leaves the
batch, or by the thread between steps (``FLUSH_S``: the engine shows a processor nothing after
a batch's last step, and a request's last token would otherwise wait for the next request),
and the record is written then.

vLLM's CPU backend binds its worker's threads to some CPUs and keeps the others for its
scheduler; there the thread runs on those others, beside the forward pass instead of taking
turns with it (``SpareCpus``; ``docs/vllm.md``, the cost).
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .._support.inputs import check_eps
from ..errors import InvalidParameterError, StableRegionsError, StableRegionsWarning
from ..studies.token_geometry import TokenGeometry, check_directions
from .directions import check_direction_names, engine_directions
from .records import Sink, default_dir

OPTION = "stable_regions"  # the key of SamplingParams.extra_args
KEYS = ("eps", "id", "dir", "directions")
DEFAULT_EPS = (0.1,)
FLUSH_S = 0.1  # how often sampled tokens are looked for between steps (a lock, a len)
MAX_QUEUED = 2  # steps the geometry may lag behind the engine before ``observe`` waits


@dataclass(frozen=True)
class RequestOptions:
    """What a request asked for: its eps, the id its records carry, their directory, and the
    engine's directions it wants radii along."""

    eps: tuple[float, ...]
    record_id: str
    directory: Path
    directions: tuple[str, ...] = ()


def request_options(
    extra_args: Mapping | None, known_directions: Collection[str] | None = None
) -> RequestOptions | None:
    """The monitoring a request asks for in ``extra_args``; None where it does not.

    Two spellings: ``{"stable_regions": {"eps": [0.1], "id": "q17"}}`` (``True`` for the
    defaults), or flat keys, as vLLM's server takes them (its ``vllm_xargs`` holds no nested
    mappings): ``{"stable_regions": 1, "stable_regions_eps": [0.1], "stable_regions_id":
    "q17"}``. Direction names are checked against ``known_directions`` (default: the engine's
    file, ``$STABLE_REGIONS_VLLM_DIRECTIONS``). Raises ``InvalidParameterError`` (a
    ``ValueError``: vLLM then fails the request) for options it cannot use."""
    if not extra_args or OPTION not in extra_args:
        return None
    raw = extra_args[OPTION]
    if raw in (False, 0, "0", "false", "False"):
        return None
    if raw in (True, None, 1, "1", "true", "True"):
        raw = {}
    if not isinstance(raw, Mapping):
        raise InvalidParameterError(
            f'extra_args["{OPTION}"] must be true or a mapping with keys {", ".join(KEYS)}, '
            f"got {raw!r}"
        )
    flat = {
        k.removeprefix(OPTION + "_"): v for k, v in extra_args.items() if k.startswith(OPTION + "_")
    }
    raw = {**flat, **raw}
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise InvalidParameterError(
            f"unknown {OPTION} option(s) {', '.join(unknown)}: use {', '.join(KEYS)}"
        )
    eps = tuple(check_eps(raw.get("eps", DEFAULT_EPS)))
    record_id = str(raw["id"]) if raw.get("id") is not None else uuid.uuid4().hex
    directory = Path(raw["dir"]).expanduser() if raw.get("dir") else default_dir()
    directions = check_direction_names(raw.get("directions"), known_directions)
    return RequestOptions(eps, record_id, directory, directions)


@dataclass(eq=False)
class _Token:
    """A token whose geometry is known and whose sampled id is not yet."""

    step: int
    values: dict
    radii: dict  # name -> (E,) array
    top_ids: np.ndarray
    top_probs: np.ndarray
    logp: Tensor  # (V,) the row's log-probabilities, for the sampled token's probability


@dataclass(eq=False)
class _Request:
    options: RequestOptions
    output_ids: Sequence[int]  # the engine's live list: it grows as tokens are sampled
    waiting: list[_Token] = field(default_factory=list)
    # the steps of its rows the background thread has not done yet: a token of such a step
    # waits (a later chunk of a prefill replaces it)
    queued: list[int] = field(default_factory=list)


@dataclass(eq=False)
class _Rows:
    """One step's rows of the requests that share eps and directions: a copy of their logits,
    each row's request and step, and (on a GPU) the event that marks the copy done."""

    key: tuple
    scores: Tensor
    members: list[tuple[_Request, int]]
    ready: object = None


class SpareCpus:
    """The background thread's place where the engine binds its worker to some CPUs (vLLM's
    CPU backend, which keeps the others for its scheduler): the others. When the engine has
    to wait for the thread (``widen``), the thread may also run on the worker's CPUs, idle
    while it waits, until ``narrow``. Unbound (GPU hosts), nothing changes. Linux only:
    elsewhere every method does nothing.

    It keeps the engine's priority: at the lowest, beside a busy process on the spare CPU,
    the starved thread held the engine up (docs/vllm.md, the cost)."""

    def __init__(self) -> None:
        self.thread_id: int | None = None
        self.spare: set[int] = set()
        self.every: set[int] = set()

    def enter(self) -> None:
        """In the background thread, once."""
        try:
            own = os.sched_getaffinity(0)  # Linux: 0 is the calling thread
            self.spare = set(range(os.cpu_count() or 0)) - own
            if not self.spare:
                return
            os.sched_setaffinity(0, self.spare)
            self.every, self.thread_id = own | self.spare, threading.get_native_id()
        except (AttributeError, OSError):  # not Linux, or CPUs a cgroup withholds
            self.spare = set()

    def widen(self) -> None:
        self._bind(self.every)

    def narrow(self) -> None:
        self._bind(self.spare)

    def _bind(self, cpus: set[int]) -> None:
        if self.thread_id is not None:
            with contextlib.suppress(OSError):  # the thread has ended
                os.sched_setaffinity(self.thread_id, cpus)


class MonitorCore:
    """Monitored requests by batch slot, their geometry and their records.

    ``weight``: the unembedding (V, d), float32, on the device the logits come on.
    ``directions``: named vectors (d,) that requests may ask radii along (default: the file
    ``$STABLE_REGIONS_VLLM_DIRECTIONS`` names, if set).
    ``flush_s``: how often the background thread looks for sampled tokens while no step is
    queued (None: only at ``flush``, ``remove`` and ``close``).
    ``before_flush``: called (under ``lock``) before the flush and ``close`` look for sampled
    tokens, where the output lists need refreshing first (Model Runner V2).
    """

    def __init__(
        self,
        weight: Tensor,
        sink: Sink | None = None,
        *,
        support: int = 512,
        flush_s: float | None = FLUSH_S,
        before_flush: Callable[[], None] | None = None,
        directions: dict[str, Tensor] | None = None,
    ) -> None:
        self.weight = weight
        # the engine's named directions ($STABLE_REGIONS_VLLM_DIRECTIONS unless given)
        self.directions = check_directions(
            engine_directions() if directions is None else directions, weight.shape[1]
        )
        self.sink = sink or Sink()
        self.support = support
        self.slots: dict[int, _Request] = {}
        self._geometry: dict[tuple, TokenGeometry] = {}
        # the engine's thread and the background thread share the slots and the queue
        self.lock = threading.RLock()
        self._changed = threading.Condition(self.lock)
        self.before_flush = before_flush
        self._queue: deque[_Rows] = deque()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._failed = False
        self._flush_s = flush_s
        # on a GPU the thread computes on its own stream, after the engine's copies
        on_cuda = weight.device.type == "cuda"
        self._stream = torch.cuda.Stream(weight.device) if on_cuda else None
        self._cpus = SpareCpus()

    def _start_thread(self) -> None:
        if self._thread is not None or self._closing:
            return
        self._thread = threading.Thread(target=self._work, name="stable-regions-vllm", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        """The background thread: each queued step's geometry, then the records whose
        sampled token is known; between steps, every ``flush_s``, the flush."""
        self._cpus.enter()
        while True:
            with self._changed:
                if not self._queue and not self._closing:
                    self._changed.wait(self._flush_s)
                if not self._queue:
                    if self._closing:
                        return
                    self._flush_now()
                    continue
                rows = self._queue[0]
            result = self._compute(rows)
            with self._changed:
                self._queue.popleft()
                self._record(rows, result)
                self._changed.notify_all()

    def flush(self) -> None:
        """Write the tokens sampled since the last step (the engine's output ids grow after
        ``apply`` returns), once the queued steps are done."""
        with self._changed:
            if threading.current_thread() is not self._thread:
                self._wait_for(lambda: not self._queue)
            self._flush_now()

    def _flush_now(self) -> None:
        if self.before_flush is not None and self.slots:
            self.before_flush()
        for request in self.slots.values():
            self._write(request, final=False)
        self.sink.tick()

    # ------------------------------------------------------------ the batch
    def add(self, slot: int, extra_args: Mapping | None, output_ids: Sequence[int]) -> None:
        """A request enters ``slot`` (an occupant still there has left the batch). Options the
        front end accepted but this process cannot use (a directions file that differs) leave
        the request unmonitored, with a warning: raising here would stop the engine."""
        try:
            options = request_options(extra_args, self.directions)
        except StableRegionsError as exc:
            warnings.warn(
                f"stable-regions: a request is not monitored: {exc}",
                StableRegionsWarning,
                stacklevel=2,
            )
            options = None
        with self._changed:
            self.remove(slot)
            if options is not None:
                self.slots[slot] = _Request(options, output_ids)
                self._start_thread()

    def remove(self, slot: int) -> None:
        """The request in ``slot`` leaves the batch: once its queued steps are done, its last
        tokens are written."""
        with self._changed:
            request = self.slots.pop(slot, None)
            if request is not None:
                self._wait_for(lambda: not request.queued)
                self._write(request, final=True)

    def _alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _wait_for(self, done: Callable[[], bool]) -> None:
        """Wait (the lock released) until ``done()`` or the thread has ended; meanwhile the
        thread may run on this one's CPUs too (``SpareCpus``), idle while it waits."""
        if done() or not self._alive():
            return
        self._cpus.widen()
        try:
            self._changed.wait_for(lambda: done() or not self._alive())
        finally:
            self._cpus.narrow()

    def move(self, source: int, target: int, swap: bool) -> None:
        """The request in ``source`` goes to ``target`` (with ``swap``, the two exchange)."""
        with self._changed:
            if swap:
                a, b = self.slots.pop(source, None), self.slots.pop(target, None)
                if a is not None:
                    self.slots[target] = a
                if b is not None:
                    self.slots[source] = b
                return
            self.remove(target)
            moved = self.slots.pop(source, None)
            if moved is not None:
                self.slots[target] = moved

    def close(self) -> None:
        """Finish the queued steps, stop the thread, write every request's known tokens and
        close the files. Steps observed after it are done on the caller's thread."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            self._cpus.widen()
            thread.join(timeout=60.0)  # it ends once the queue is empty
        with self._changed:
            while self._queue:  # the thread did not finish them (it is gone or stuck)
                rows = self._queue.popleft()
                self._record(rows, self._compute(rows))
            self._flush_now()  # the tokens sampled so far, then each request's last ones
            for slot in list(self.slots):
                self.remove(slot)
            self.sink.close()

    # ------------------------------------------------------------ one step
    def observe(self, logits: Tensor, slot_of_row: Sequence[int] | None = None) -> None:
        """The logits (rows, V) of one step; row ``i`` belongs to slot ``slot_of_row[i]``
        (default: slot ``i``). Never changes them: the monitored rows are copied and queued
        for the background thread (after ``close``, done here)."""
        if not self.slots:  # no request asked: nothing is done (no lock either)
            return
        with self._changed:
            queued = self._copy_rows(logits, slot_of_row)
            # the engine outruns the geometry: it waits
            self._wait_for(lambda: len(self._queue) < MAX_QUEUED)
            if self._closing or not self._alive():
                for rows in queued:
                    self._record(rows, self._compute(rows))
                return
            self._queue.extend(queued)
            self._changed.notify_all()

    def _copy_rows(self, logits: Tensor, slot_of_row: Sequence[int] | None) -> list[_Rows]:
        rows = range(logits.shape[0]) if slot_of_row is None else slot_of_row
        groups: dict[tuple, list[tuple[int, _Request]]] = {}
        for row, slot in enumerate(rows):
            request = self.slots.get(int(slot))
            if request is not None:
                key = (request.options.eps, request.options.directions)
                groups.setdefault(key, []).append((row, request))
        queued = []
        for key, members in groups.items():
            index = torch.tensor([row for row, _ in members], device=logits.device)
            # a copy: the engine reuses its logits, and later processors change them in place
            scores, ready = logits.index_select(0, index), None
            if self._stream is not None:  # queued on the engine's stream: the thread waits
                ready = torch.cuda.Event()
                ready.record()
                scores.record_stream(self._stream)
            for _, request in members:
                request.queued.append(len(request.output_ids))
            queued.append(_Rows(key, scores, [(r, len(r.output_ids)) for _, r in members], ready))
        return queued

    def _compute(self, rows: _Rows):
        """The geometry of queued rows; None where it failed (once warned: the engine keeps
        serving, and those tokens get no records)."""
        try:
            geometry = self._geometry_for(*rows.key)
            if self._stream is None:
                return geometry(rows.scores)
            with torch.cuda.stream(self._stream):
                self._stream.wait_event(rows.ready)
                return geometry(rows.scores)
        except Exception as exc:  # noqa: BLE001  (raising would stop the engine)
            if not self._failed:
                self._failed = True
                warnings.warn(
                    f"stable-regions: the geometry of a step failed, its tokens have no "
                    f"records: {type(exc).__name__}: {exc}",
                    StableRegionsWarning,
                    stacklevel=2,
                )
            return None

    def _record(self, rows: _Rows, result) -> None:
        """The tokens of computed rows join their requests', whose records are written as
        far as their sampled tokens are known."""
        requests = []
        for i, (request, step) in enumerate(rows.members):
            request.queued.remove(step)
            requests.append(request)
            if result is None:
                continue
            values, radii, top_ids, top_probs, logp = result
            if request.waiting and request.waiting[-1].step == step:
                # a chunk of a prefill: its row's sample is discarded, and the next row of
                # this request is the one its first token comes from
                request.waiting.pop()
            request.waiting.append(
                _Token(
                    step=step,
                    values={k: v[i].item() for k, v in values.items()},
                    radii={k: r[i] for k, r in radii.items()},
                    top_ids=top_ids[i],
                    top_probs=top_probs[i],
                    logp=logp[i],
                )
            )
        for request in dict.fromkeys(requests):
            self._write(request, final=False)

    def _geometry_for(self, eps: tuple[float, ...], names: tuple[str, ...]) -> TokenGeometry:
        if (eps, names) not in self._geometry:
            self._geometry[eps, names] = TokenGeometry(
                self.weight,
                eps=eps,
                mode="fast",
                support=self.support,
                directions={n: self.directions[n] for n in names},
            )
        return self._geometry[eps, names]

    def _write(self, request: _Request, final: bool) -> None:
        """Records of the waiting tokens whose sampled id is known (``final``: all of them,
        -1 where none was sampled: the request ended or was aborted first)."""
        known = len(request.output_ids)
        done = [t.step < known and t.step not in request.queued or final for t in request.waiting]
        if not any(done):
            return
        ready = [t for t, d in zip(request.waiting, done, strict=True) if d]
        request.waiting = [t for t, d in zip(request.waiting, done, strict=True) if not d]
        records = []
        for token in ready:
            chosen = int(request.output_ids[token.step]) if token.step < known else -1
            prob = float(token.logp[chosen].exp()) if chosen >= 0 else float("nan")
            base = {
                "request": request.options.record_id,
                "step": token.step,
                "chosen_token_id": chosen,
                "chosen_prob": prob,
                **token.values,
                "top_token_ids": token.top_ids.tolist(),
                "top_probs": [float(p) for p in token.top_probs],
            }
            for j, e in enumerate(request.options.eps):
                row = dict(base, eps=e)
                for name, r in token.radii.items():
                    row[name] = float(r[j])
                row["fragile"] = bool(row["radius_flip"] < row["radius_curve"])
                records.append(row)
        self.sink.write(request.options.directory, records)
