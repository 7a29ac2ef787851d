"""The iso-KL steering coefficient: the ``c`` at which adding ``c * v`` at every position of a
layer moves the model's token distributions over a continuation by a chosen budget.

Practitioners steer every position (repeng, steering-vectors, EasySteer, steering-lite) and
choose ``c`` by rollouts: generate ``T`` tokens greedily with the vector attached, score that
sequence with the base and the steered model, take a statistic (mean, p50, p90, p95 or max)
of the per-token ``KL(p_steer || p_base)`` pooled over prompts, and solve for the ``c`` where
it meets the target. Three ways to that number, each with its cost:

- ``coef_rollout``, the rollout definition itself, solved by false position with the Illinois
  modification in ``(log c, log statistic)`` (``solve_log_log``): the reference;
- ``coef_measured``: the same statistic along the base model's own continuation, teacher
  forced (one pass per coefficient tried, no generation), then one rollout at the answer to
  confirm it (``kl_confirmed``) and, where it misses the target, one step of the solver's
  log-log slope from it. Up to the first position where the teacher-forced pass shows a
  steered top token other than the base one, the two definitions are the same sequence, so
  the confirming rollout starts there, on the kept keys and values (``_confirmed``); where
  no token changes, no rollout is run;
- ``coef_predicted``: from one pass of first-order jets over the base continuation with the
  tangent ``v`` at every position, every token's logits along ``c`` to first order
  (``rollouts.tangent_paths``), the softmax kept exact; the statistic of the KL along those
  paths is solved per evaluation without a pass through the network. ``reliable`` says
  where it is inside the range closed forms were validated in (the engine's
  ``reliability``, against the quadratic form ``sqrt(2 target / stat(Var_p(a1)))``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .._support.inputs import as_adapter
from ..engine import reliability
from ..errors import InvalidParameterError
from ..geometry.log_log import solve_log_log
from ..plotting import axes_or_new
from ..results import Result
from ..vocabulary import describe
from .generation import check_new_tokens
from .rollouts import (
    Continuation,
    forced_pass,
    greedy,
    resumable,
    tangent_paths,
    teacher_forced,
    token_kl,
)
from .steering import check_vector
from .vectors import layer_of_key, vector_at_layer

STATS = ("mean", "p50", "p90", "p95", "max")
FORMS = ("rollout", "measured", "predicted")

ISO_KL_COLUMNS = [
    "vector",
    "layer",
    "vector_norm",
    "kl_target",
    "kl_stat",
    "new_tokens",
    "n",
    "coef_rollout",
    "coef_measured",
    "coef_predicted",
    "kl_confirmed",
    "reached",
    "evaluations_rollout",
    "evaluations_measured",
    "forward_tokens_rollout",
    "forward_tokens_measured",
    "forward_tokens_predicted",
    "seconds_rollout",
    "seconds_measured",
    "seconds_predicted",
    "reliable",
    "unreliable_reason",
]


def check_stat(stat: str) -> str:
    if stat not in STATS:
        raise InvalidParameterError(f"unknown statistic {stat!r}: use one of {', '.join(STATS)}")
    return stat


def statistic(kl: np.ndarray, stat: str) -> float:
    """The statistic of per-token KL values (pooled over prompts)."""
    if stat == "mean":
        return float(np.mean(kl))
    if stat == "max":
        return float(np.max(kl))
    return float(np.percentile(kl, int(stat[1:])))


@dataclass
class IsoKLResult(Result):
    """One row per layer and vector (``to_frame``; ``vocabulary`` defines every column) and,
    per ``(vector, layer)``, the per-token KL of the rollout definition at ``coef_rollout``
    (``per_token``). ``layer``: the layer's name, or the names joined by ``", "``."""

    study = "iso_kl"
    model: str
    layer: str
    kl_target: float
    kl_stat: str
    new_tokens: int
    rows: list[dict]
    per_token: dict[tuple[str, str], np.ndarray] = field(default_factory=dict, repr=False)

    def to_frame(self) -> pd.DataFrame:
        return describe(pd.DataFrame(self.rows, columns=ISO_KL_COLUMNS))

    def summary(self) -> pd.DataFrame:
        """Per layer and vector: the three coefficients, each against the rollout definition's,
        and the cost of each in forward-pass tokens against the rollout solver's."""
        f = self.to_frame()
        out = pd.DataFrame({"layer": f.layer, "vector": f.vector, "coef_rollout": f.coef_rollout})
        for form in ("measured", "predicted"):
            out[f"coef_{form}"] = f[f"coef_{form}"]
            out[f"{form}_over_rollout"] = f[f"coef_{form}"] / f.coef_rollout
            out[f"tokens_saved_{form}"] = f.forward_tokens_rollout / f[f"forward_tokens_{form}"]
        return out

    def context(self) -> dict:
        return {
            "model": self.model,
            "layer": self.layer,
            "kl_target": self.kl_target,
            "kl_stat": self.kl_stat,
            "new_tokens": self.new_tokens,
        }

    def draw(self, ax=None):
        """Per layer and vector, the per-token KL at ``coef_rollout`` (the dots; the target as
        a line), labelled with the three coefficients."""
        fig, ax = axes_or_new(ax, figsize=(max(5.0, 1.6 * len(self.rows) + 2), 4.0))
        several = len({r["layer"] for r in self.rows}) > 1
        for i, row in enumerate(self.rows):
            kl = self.per_token.get((row["vector"], row["layer"]), np.array([]))
            jitter = np.linspace(-0.2, 0.2, len(kl)) if len(kl) else kl
            ax.plot(i + jitter, np.maximum(kl, 1e-6), ".", ms=3, alpha=0.6)
        ax.axhline(self.kl_target, color="k", lw=0.8, ls="--", label=f"target {self.kl_target:g}")
        ax.set_yscale("log")
        labels = [
            (f"layer {r['layer']}\n" if several else "")
            + f"{r['vector']}\nrollout {r['coef_rollout']:.3g}\nmeasured {r['coef_measured']:.3g}"
            f"\npredicted {r['coef_predicted']:.3g}"
            for r in self.rows
        ]
        ax.set_xticks(range(len(self.rows)), labels, fontsize=7)
        ax.set_ylabel("per-token KL(p_steer || p_base) at coef_rollout (nats)")
        ax.set_title(
            f"{self.model}, layer {self.layer}: {self.kl_stat} of per-token KL = "
            f"{self.kl_target:g}, {self.new_tokens} tokens",
            fontsize=9,
        )
        ax.legend(fontsize=7)
        return fig


class _Clock:
    """Forward-pass tokens and seconds spent, per form."""

    def __init__(self) -> None:
        self.tokens: dict[str, int] = {}
        self.seconds: dict[str, float] = {}

    def add(self, form: str, tokens: int, seconds: float) -> None:
        self.tokens[form] = self.tokens.get(form, 0) + tokens
        self.seconds[form] = self.seconds.get(form, 0.0) + seconds


def _rollout_statistic(adapter, ids_list, hook, v, stat, tokens, clock):
    """The rollout definition's statistic at ``c``, as a function for the solver: per prompt
    a steered greedy rollout and a base pass over it."""

    def evaluate(c: float) -> tuple[float, np.ndarray]:
        start, spent, kls = time.perf_counter(), 0, []
        for ids in ids_list:
            steered = greedy(adapter, ids, tokens, hook, c * v)
            base = teacher_forced(adapter, steered, hook)
            spent += 2 * steered.cost
            kls.append(token_kl(steered.logits, base))
        clock.add("rollout", spent, time.perf_counter() - start)
        kl = np.concatenate(kls)
        return statistic(kl, stat), kl

    return evaluate


TIE_MARGIN = 1e-3  # logits: a steered top token kept by less is not trusted to stay in a rollout
KEPT_PASSES = 2  # teacher-forced passes whose logits, keys and values the confirmation may use


@dataclass
class _ForcedPass:
    """The teacher-forced pass at one coefficient, per prompt: the steered logits, the first
    position whose steered top token is not trusted to be the base one (``len(new)`` where
    none is), and the pass's keys and values. Once ``KEPT_PASSES`` newer passes ran, the
    logits, keys and values are dropped (memory: T x V per prompt), and a confirmation at
    this coefficient runs whole rollouts."""

    logits: list[Tensor]
    first_changed: list[int]
    key_values: list

    def drop(self) -> None:
        self.logits = []
        self.key_values = []

    def per_prompt(self, n: int) -> list[tuple[int, Tensor | None, object]]:
        """``(first changed position, logits, keys and values)`` per prompt; from the prompt
        itself, with nothing kept, once dropped."""
        if not self.logits:
            return [(0, None, None)] * n
        return list(zip(self.first_changed, self.logits, self.key_values, strict=True))


def _forced_statistic(adapter, bases: list[Continuation], hook, v, stat, clock, passes: dict):
    """The statistic along the base continuations, teacher forced at ``c``; ``passes[c]``
    records the pass (``_ForcedPass``). Before its first changed position, by induction over
    the positions, the steered greedy rollout is the base continuation."""

    def evaluate(c: float) -> tuple[float, np.ndarray]:
        start, kls, record = time.perf_counter(), [], _ForcedPass([], [], [])
        for b in bases:
            steered, kv = forced_pass(adapter, b, hook, c * v, keep=True)
            top = steered.topk(min(2, steered.shape[-1]), dim=-1)
            gap = top.values[:, 0] - top.values[:, -1]
            held = (top.indices[:, 0].cpu() == b.new.cpu()) & (gap.cpu() > TIE_MARGIN)
            changed = (~held).nonzero()
            record.first_changed.append(int(changed[0]) if len(changed) else len(b.new))
            record.logits.append(steered)
            record.key_values.append(kv)
            kls.append(token_kl(steered, b.logits))
        for old in list(passes.values())[: max(len(passes) + 1 - KEPT_PASSES, 0)]:
            old.drop()
        passes[c] = record
        kl = np.concatenate(kls)
        clock.add("measured", sum(b.cost for b in bases), time.perf_counter() - start)
        return statistic(kl, stat), kl

    return evaluate


def _confirmed(adapter, bases, forced: _ForcedPass, hook, delta, stat, tokens, clock):
    """The rollout definition's statistic at the coefficient of ``forced``. Each prompt's
    steered rollout is its base continuation up to the first changed position; from there it
    is generated on the forced pass's keys and values, and re-scored by the base model on
    the base continuation's, so only the tokens after that position pass through the model
    (all of them where no keys and values were kept)."""
    start, spent, kls = time.perf_counter(), 0, []
    for b, (first, logits, kv) in zip(bases, forced.per_prompt(len(bases)), strict=True):
        if first >= len(b.new):  # the rollout is the base continuation
            kls.append(token_kl(logits, b.logits))
            continue
        prefix = torch.cat([b.ids, b.new[None, :first].to(b.ids.device)], 1)
        resume = b.ids.shape[1] + first > 1 and kv is not None and b.key_values is not None
        resume = resume and resumable(adapter, b.ids.shape[1] + tokens)
        tail = greedy(
            adapter, prefix, tokens - first, hook, delta, key_values=kv if resume else None
        )
        spent += len(tail.new) if resume else tail.cost
        if first > 0:
            tail.logits = torch.cat([logits[:first], tail.logits])
        steered = Continuation(b.ids, torch.cat([b.new[:first], tail.new]), tail.logits)
        if torch.equal(steered.new.cpu(), b.new.cpu()):
            base = b.logits
        else:  # up to the changed position the base model saw the base continuation's context
            base = b.logits[: first + 1]
            if first + 1 < len(steered.new):
                rest, _ = forced_pass(
                    adapter, steered, hook, start=first + 1,
                    key_values=b.key_values if resume else None,
                )  # fmt: skip
                spent += len(rest) if resume else steered.cost
                base = torch.cat([base, rest])
        kls.append(token_kl(steered.logits, base))
    clock.add("measured", spent, time.perf_counter() - start)
    kl = np.concatenate(kls)
    return statistic(kl, stat), kl


def iso_kl(
    model,
    prompts: str | Sequence[str],
    *,
    vector,
    layer: str | int | Sequence[str | int],
    target: float = 1.0,
    stat: str = "p95",
    tokens: int = 50,
    forms: Sequence[str] = FORMS,
    rtol: float = 0.02,
    max_evaluations: int = 16,
    start: float = 1.0,
    chat: bool = False,
    progress: Callable[[str], None] | None = None,
) -> IsoKLResult:
    """The coefficient at which ``stat`` of the per-token ``KL(p_steer || p_base)`` over
    ``tokens`` greedy tokens per prompt, pooled over the prompts, reaches ``target``, with
    ``c * vector`` added at every position of ``blocks.{layer}.hook_resid_post``.

    Parameters
    ----------
    model : str, ModelAdapter or transformers model
        As for :func:`analyze`.
    prompts : str or list of str
        The prompts the continuations start from.
    vector : Tensor (d,), a per-layer source, or dict of str to either
        The steering vector, or several by name. A per-layer source (a ``{layer: vector}``
        mapping, a repeng ``ControlVector``) gives each layer its own vector; a plain vector
        is steered at every layer asked for.
    layer : int or str, or a list of them
        The block whose output is steered (a block index or a hook name), or several: one
        row per layer and vector. All share the base continuations.
    target : float, default 1.0
        The budget, in nats.
    stat : {"mean", "p50", "p90", "p95", "max"}, default "p95"
        The statistic of the per-token KL that meets the target.
    tokens : int, default 50
        Greedy tokens per continuation.
    forms : subset of ("rollout", "measured", "predicted")
        Which coefficients to find (module docstring); the others are NaN.
    rtol : float, default 0.02
        The solvers stop within this fraction of the target.
    max_evaluations : int, default 16
        Evaluations of a statistic per solve, at most.
    start : float, default 1.0
        The coefficient the measured solvers start from (the prediction starts from its own
        quadratic form).
    chat : bool, default False
        Each prompt as a user message in the tokenizer's chat template.
    progress : callable, optional
        Called with a line of text as each stage starts.

    Returns
    -------
    IsoKLResult
        One row per layer and vector; ``summary()`` sets each coefficient and cost against
        the rollout definition's.

    Examples
    --------
    >>> v = sr.mean_difference(model, positive, negative, layer=15)
    >>> sr.iso_kl(model, prompts, vector=v, layer=15, target=0.5, stat="mean").to_frame()  # doctest: +SKIP
    """
    adapter = as_adapter(model)
    target = _check_target(target)
    stat = check_stat(stat)
    tokens = check_new_tokens(tokens, "tokens")
    unknown = sorted(set(forms) - set(FORMS))
    if unknown:
        raise InvalidParameterError(f"unknown form(s) {', '.join(unknown)}: use {', '.join(FORMS)}")
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not texts:
        raise InvalidParameterError("give one or more prompts")
    layers = list(layer) if isinstance(layer, (list, tuple)) else [layer]
    if not layers:
        raise InvalidParameterError("give one or more layers")
    steered = {lay: _vectors_at(adapter, vector, lay) for lay in layers}
    ids_list = [_room_for(adapter, t, tokens, i, chat) for i, t in enumerate(texts)]
    say = progress or (lambda _line: None)
    shared = _Clock()
    bases: list[Continuation] = []
    if {"measured", "predicted"} & set(forms):
        say(f"base continuations: {len(texts)} prompts x {tokens} tokens")
        begin = time.perf_counter()
        keep = "measured" in forms
        # no vector added: the hook is not used, and the continuations serve every layer
        hook = adapter.hook_for_layer(layers[0])
        bases = [greedy(adapter, ids, tokens, hook, keep=keep) for ids in ids_list]
        shared.add("base", sum(b.cost for b in bases), time.perf_counter() - begin)
    rows, per_token = [], {}
    for lay, vectors in steered.items():
        hook, name_of_layer = adapter.hook_for_layer(lay), adapter.layer_name(lay)
        if len(layers) > 1:
            say(f"layer {name_of_layer}")
        for name, v in vectors.items():
            clock = _Clock()
            row = _one_vector(
                adapter, name, v, hook, ids_list, bases, forms, clock, say,
                target=target, stat=stat, tokens=tokens, rtol=rtol,
                max_evaluations=max_evaluations, start=start,
            )  # fmt: skip
            for form in ("measured", "predicted"):
                if form in forms:
                    clock.add(form, shared.tokens["base"], shared.seconds["base"])
            for form in FORMS:
                row[f"forward_tokens_{form}"] = clock.tokens.get(form, 0) if form in forms else 0
                row[f"seconds_{form}"] = clock.seconds.get(form, math.nan)
            row.update(layer=name_of_layer, n=len(texts))
            per_token[(name, name_of_layer)] = row.pop("per_token")
            rows.append(row)
    names = ", ".join(dict.fromkeys(adapter.layer_name(lay) for lay in layers))
    return IsoKLResult(adapter.name, names, target, stat, tokens, rows, per_token)


def _vectors_at(adapter, vector, layer) -> dict[str, Tensor]:
    """``{name: vector}`` for ``layer``, each checked against the hook's width. A per-layer
    source (``{layer: vector}``, an object with ``directions``) gives that layer's vector."""
    d = adapter.hook_dim(adapter.hook_for_layer(layer))
    named = dict(vector) if _is_named(vector) else {"vector": vector}
    out = {}
    for name, source in named.items():
        if isinstance(source, Mapping) or hasattr(source, "directions"):
            source = vector_at_layer(source, layer, f"vector {name!r}")
        out[name] = check_vector(torch.as_tensor(source), d, f"vector {name!r}")
    return out


def _is_named(vector) -> bool:
    """A mapping of names to vectors (not ``{layer: vector}``: its keys are block indices)."""
    return isinstance(vector, Mapping) and not all(
        isinstance(k, int) or layer_of_key(k) is not None for k in vector
    )


def _one_vector(adapter, name, v, hook, ids_list, bases, forms, clock, say, **o) -> dict:
    target, stat, tokens = o["target"], o["stat"], o["tokens"]
    solve = dict(rtol=o["rtol"], max_evaluations=o["max_evaluations"])
    row = {
        "vector": name,
        "vector_norm": float(v.norm()),
        "kl_target": target,
        "kl_stat": stat,
        "new_tokens": tokens,
        "coef_rollout": math.nan,
        "coef_measured": math.nan,
        "coef_predicted": math.nan,
        "kl_confirmed": math.nan,
        "reached": None,
        "evaluations_rollout": 0,
        "evaluations_measured": 0,
        "reliable": None,
        "unreliable_reason": "",
        "per_token": np.array([]),
    }
    if "predicted" in forms:
        say(f"{name}: prediction from one pass of jets per prompt")
        row.update(_predicted(adapter, v, hook, bases, clock, target, stat, solve))
    if "measured" in forms:
        say(f"{name}: teacher-forced along the base continuations")
        passes: dict[float, _ForcedPass] = {}
        forced = solve_log_log(
            _forced_statistic(adapter, bases, hook, v, stat, clock, passes),
            target,
            o["start"],
            **solve,
        )
        row["evaluations_measured"] = forced.evaluations
        record = passes.get(forced.coef)
        unchanged = record is not None and all(
            f >= len(b.new) for f, b in zip(record.first_changed, bases, strict=True)
        )
        if forced.reached and unchanged:
            # the steered rollouts are the base continuations: nothing to confirm
            row["kl_confirmed"], row["coef_measured"] = forced.value, forced.coef
        elif forced.reached and record is not None:
            say(
                f"{name}: one rollout to confirm c = {forced.coef:.4g}, from each first changed token"
            )
            confirmed, _ = _confirmed(
                adapter, bases, record, hook, forced.coef * v, stat, tokens, clock
            )
            row["kl_confirmed"] = confirmed
            row["evaluations_measured"] += 1
            coef = forced.coef
            if abs(math.log(max(confirmed, 1e-300) / target)) > math.log1p(o["rtol"]):
                slope = min(max(forced.slope, 0.5), 4.0)
                coef *= (target / max(confirmed, 1e-300)) ** (1.0 / slope)
            row["coef_measured"] = coef
    if "rollout" in forms:
        say(f"{name}: rollouts, solved for the target")
        rolled = solve_log_log(
            _rollout_statistic(adapter, ids_list, hook, v, stat, tokens, clock),
            target,
            o["start"],
            **solve,
        )
        row.update(
            coef_rollout=rolled.coef,
            evaluations_rollout=rolled.evaluations,
            reached=rolled.reached,
            per_token=rolled.per_token,
        )
    return row


def _predicted(adapter, v, hook, bases, clock, target, stat, solve) -> dict:
    begin = time.perf_counter()
    paths = [tangent_paths(adapter, b, hook, v) for b in bases]
    clock.add("predicted", sum(b.cost for b in bases), time.perf_counter() - begin)
    begin = time.perf_counter()
    fisher = statistic(np.concatenate([p.fisher() for p in paths]), stat)
    quadratic = math.sqrt(2.0 * target / fisher) if fisher > 0 else math.inf

    def evaluate(c: float) -> tuple[float, np.ndarray]:
        kl = np.concatenate([p.kl(c) for p in paths])
        return statistic(kl, stat), kl

    found = solve_log_log(evaluate, target, quadratic if math.isfinite(quadratic) else 1.0, **solve)
    clock.add("predicted", 0, time.perf_counter() - begin)
    norm = float(np.median(np.concatenate([p.activation_norm for p in paths])))
    size = float(v.norm())
    ok, why = reliability(
        np.array([found.coef * size]), np.array([norm]), True, np.array([quadratic * size])
    )
    return {
        "coef_predicted": found.coef,
        "reliable": bool(ok[0]) and found.reached,
        "unreliable_reason": str(why[0]) if found.reached else "the tangent path never reaches it",
    }


def check_iso_kl_options(target, stat: str, tokens) -> tuple[float, str, int]:
    """The command line's ``--iso-kl``, ``--stat`` and ``--tokens`` (text), checked."""
    text = str(tokens)
    count = int(text) if text.lstrip("-").isdigit() else text
    return _check_target(target), check_stat(stat), check_new_tokens(count, "tokens")


def _check_target(target) -> float:
    try:
        value = float(target)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise InvalidParameterError(
            f"the KL target must be a positive number of nats, got {target!r}"
        )
    return value


def _room_for(adapter, text: str, tokens: int, index: int, chat: bool) -> Tensor:
    ids = adapter.tokenize(text, chat=chat)
    limit = adapter.context_length
    if limit is not None and ids.shape[1] + tokens > limit:
        raise InvalidParameterError(
            f"prompt {index} has {ids.shape[1]} tokens: with {tokens} more it would pass the "
            f"model's context of {limit}; shorten it or ask for fewer tokens"
        )
    return ids.to(adapter.device)
