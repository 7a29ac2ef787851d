"""The vLLM processor's state, free of vLLM: which batch slots hold monitored requests, the
geometry of their tokens, and the records once each token's sampled id is known.

A request asks to be monitored through its sampling parameters::

    SamplingParams(extra_args={"stable_regions": {"eps": [0.1, 1.0], "id": "q17"}})

(``True`` for the defaults: eps 0.1, a random id, the engine's directory). Its slot's row of
logits goes through ``TokenGeometry`` in fast mode, the same code as ``StabilityMonitor``'s;
the token sampled from that row is read from the request's own output ids on a later step,
when the request leaves the batch, or by a background flush (``FLUSH_S``: the engine shows a
processor nothing after a batch's last step, and a request's last token would otherwise wait
for the next request), and the record is written then.
"""

from __future__ import annotations

import threading
import uuid
import warnings
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


@dataclass
class _Request:
    options: RequestOptions
    output_ids: Sequence[int]  # the engine's live list: it grows as tokens are sampled
    waiting: list[_Token] = field(default_factory=list)


class MonitorCore:
    """Monitored requests by batch slot, their geometry and their records.

    ``weight``: the unembedding (V, d), float32, on the device the logits come on.
    ``directions``: named vectors (d,) that requests may ask radii along (default: the file
    ``$STABLE_REGIONS_VLLM_DIRECTIONS`` names, if set).
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
        # the engine's thread and the flush share the slots
        self.lock = threading.RLock()
        self.before_flush = before_flush
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        self._flush_s = flush_s

    def _start_flusher(self) -> None:
        if self._flush_s is None or self._flusher is not None:
            return
        self._flusher = threading.Thread(
            target=self._flush_loop, name="stable-regions-vllm-flush", daemon=True
        )
        self._flusher.start()

    def _flush_loop(self) -> None:
        while not self._stop.wait(self._flush_s):
            self.flush()

    def flush(self) -> None:
        """Write the tokens sampled since the last step (the engine's output ids grow after
        ``apply`` returns)."""
        with self.lock:
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
        with self.lock:
            self.remove(slot)
            if options is not None:
                self.slots[slot] = _Request(options, output_ids)
                self._start_flusher()

    def remove(self, slot: int) -> None:
        """The request in ``slot`` leaves the batch: its last tokens are written."""
        with self.lock:
            request = self.slots.pop(slot, None)
            if request is not None:
                self._write(request, final=True)

    def move(self, source: int, target: int, swap: bool) -> None:
        """The request in ``source`` goes to ``target`` (with ``swap``, the two exchange)."""
        with self.lock:
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
        """Write every request's known tokens, stop the flush and close the files."""
        self._stop.set()
        if self._flusher is not None and self._flusher is not threading.current_thread():
            self._flusher.join(timeout=5.0)  # before the lock: a flush may hold it
        with self.lock:
            self.flush()  # the tokens sampled so far, then each request's last ones
            for slot in list(self.slots):
                self.remove(slot)
            self.sink.close()

    # ------------------------------------------------------------ one step
    def observe(self, logits: Tensor, slot_of_row: Sequence[int] | None = None) -> None:
        """The logits (rows, V) of one step; row ``i`` belongs to slot ``slot_of_row[i]``
        (default: slot ``i``). Never changes them."""
        if not self.slots:  # no request asked: nothing is done (no lock either)
            return
        with self.lock:
            self._observe(logits, slot_of_row)

    def _observe(self, logits: Tensor, slot_of_row: Sequence[int] | None) -> None:
        for request in self.slots.values():  # tokens sampled since the last step
            self._write(request, final=False)
        rows = range(logits.shape[0]) if slot_of_row is None else slot_of_row
        groups: dict[tuple, list[tuple[int, _Request]]] = {}
        for row, slot in enumerate(rows):
            request = self.slots.get(int(slot))
            if request is not None:
                key = (request.options.eps, request.options.directions)
                groups.setdefault(key, []).append((row, request))
        for key, members in groups.items():
            index = torch.tensor([row for row, _ in members], device=logits.device)
            values, radii, top_ids, top_probs, logp = self._geometry_for(*key)(
                logits.index_select(0, index)
            )
            for i, (_, request) in enumerate(members):
                step = len(request.output_ids)
                if request.waiting and request.waiting[-1].step == step:
                    # a chunk of a prefill: its row's sample is discarded, and the next
                    # row of this request is the one its first token comes from
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
        ready = [t for t in request.waiting if t.step < known or final]
        if not ready:
            return
        request.waiting = [t for t in request.waiting if not (t.step < known or final)]
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
