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
  log-log slope from it. Below the coefficient where the steered greedy tokens change, the
  two definitions are the same sequence and agree exactly: where the teacher-forced pass at
  the answer shows every steered top token to be the base one, no rollout is run;
- ``coef_predicted``: from one pass of Taylor-mode jets over the base continuation with the
  tangent ``v`` at every position, every token's logits along ``c`` to third order
  (``rollouts.cubic_paths``); the statistic of the KL along those paths is solved in closed
  form per evaluation (no pass through the network). ``reliable`` says where it is inside the
  range the cubic path was validated in (the engine's ``reliability``, against the quadratic
  form ``sqrt(2 target / stat(Var_p(a1)))``).
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
from .rollouts import Continuation, cubic_paths, greedy, teacher_forced, token_kl
from .steering import check_vector

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
    """One row per vector (``to_frame``; ``vocabulary`` defines every column) and, per
    vector, the per-token KL of the rollout definition at ``coef_rollout`` (``per_token``)."""

    study = "iso_kl"
    model: str
    layer: str
    kl_target: float
    kl_stat: str
    new_tokens: int
    rows: list[dict]
    per_token: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def to_frame(self) -> pd.DataFrame:
        return describe(pd.DataFrame(self.rows, columns=ISO_KL_COLUMNS))

    def summary(self) -> pd.DataFrame:
        """Per vector: the three coefficients, each against the rollout definition's, and the
        cost of each in forward-pass tokens against the rollout solver's."""
        f = self.to_frame()
        out = pd.DataFrame({"vector": f.vector, "coef_rollout": f.coef_rollout})
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
        """Per vector, the per-token KL at ``coef_rollout`` (the dots; the target as a line),
        labelled with the three coefficients."""
        fig, ax = axes_or_new(ax, figsize=(max(5.0, 1.6 * len(self.rows) + 2), 4.0))
        for i, row in enumerate(self.rows):
            kl = self.per_token.get(row["vector"], np.array([]))
            jitter = np.linspace(-0.2, 0.2, len(kl)) if len(kl) else kl
            ax.plot(i + jitter, np.maximum(kl, 1e-6), ".", ms=3, alpha=0.6)
        ax.axhline(self.kl_target, color="k", lw=0.8, ls="--", label=f"target {self.kl_target:g}")
        ax.set_yscale("log")
        labels = [
            f"{r['vector']}\nrollout {r['coef_rollout']:.3g}\nmeasured {r['coef_measured']:.3g}"
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


def _rollout_statistic(adapter, ids_list, hook, v, stat, tokens, clock, form, bases=None):
    """The rollout definition's statistic at ``c``, as a function for the solver. With
    ``bases`` (the base continuations), a steered continuation that is the base one token for
    token is scored with the base logits already known, without a second pass."""

    def evaluate(c: float) -> tuple[float, np.ndarray]:
        start, spent, kls = time.perf_counter(), 0, []
        for i, ids in enumerate(ids_list):
            steered = greedy(adapter, ids, tokens, hook, c * v)
            spent += steered.cost
            if bases is not None and torch.equal(steered.new, bases[i].new):
                base = bases[i].logits
            else:
                base = teacher_forced(adapter, steered, hook)
                spent += steered.cost
            kls.append(token_kl(steered.logits, base))
        clock.add(form, spent, time.perf_counter() - start)
        kl = np.concatenate(kls)
        return statistic(kl, stat), kl

    return evaluate


TIE_MARGIN = 1e-3  # logits: a steered top token kept by less is not trusted to stay in a rollout


def _forced_statistic(adapter, bases: list[Continuation], hook, v, stat, clock, kept: dict):
    """The statistic along the base continuations, teacher forced at ``c``. ``kept[c]``: at
    every position the steered top token is the base continuation's, by more than
    ``TIE_MARGIN``. Then, by induction over the positions, the steered greedy rollout is
    the base continuation, and its statistic is this one."""

    def evaluate(c: float) -> tuple[float, np.ndarray]:
        start, kls, same = time.perf_counter(), [], True
        for b in bases:
            steered = teacher_forced(adapter, b, hook, c * v)
            top = steered.topk(min(2, steered.shape[-1]), dim=-1)
            gap = top.values[:, 0] - top.values[:, -1]
            held = (top.indices[:, 0].cpu() == b.new.cpu()) & (gap.cpu() > TIE_MARGIN)
            same = same and bool(held.all())
            kls.append(token_kl(steered, b.logits))
        kl = np.concatenate(kls)
        kept[c] = same
        clock.add("measured", sum(b.cost for b in bases), time.perf_counter() - start)
        return statistic(kl, stat), kl

    return evaluate


def iso_kl(
    model,
    prompts: str | Sequence[str],
    *,
    vector: Tensor | Mapping[str, Tensor],
    layer: str | int,
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
    vector : Tensor (d,) or dict of str to Tensor
        The steering vector, or several by name (their base continuations are shared).
    layer : int or str
        The block whose output is steered (a block index or a hook name).
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
        One row per vector; ``summary()`` sets each coefficient and cost against the rollout
        definition's.

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
    hook = adapter.hook_for_layer(layer)
    d = adapter.hook_dim(hook)
    named = dict(vector) if isinstance(vector, Mapping) else {"vector": vector}
    vectors = {k: check_vector(torch.as_tensor(v), d, f"vector {k!r}") for k, v in named.items()}
    ids_list = [_room_for(adapter, t, tokens, i, chat) for i, t in enumerate(texts)]
    say = progress or (lambda _line: None)
    shared = _Clock()
    bases: list[Continuation] = []
    if {"measured", "predicted"} & set(forms):
        say(f"base continuations: {len(texts)} prompts x {tokens} tokens")
        begin = time.perf_counter()
        bases = [greedy(adapter, ids, tokens, hook) for ids in ids_list]
        shared.add("base", sum(b.cost for b in bases), time.perf_counter() - begin)
    rows, per_token = [], {}
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
        row.update(layer=adapter.layer_name(layer), n=len(texts))
        per_token[name] = row.pop("per_token")
        rows.append(row)
    return IsoKLResult(
        adapter.name, adapter.layer_name(layer), target, stat, tokens, rows, per_token
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
        kept: dict[float, bool] = {}
        forced = solve_log_log(
            _forced_statistic(adapter, bases, hook, v, stat, clock, kept),
            target,
            o["start"],
            **solve,
        )
        row["evaluations_measured"] = forced.evaluations
        if forced.reached and kept.get(forced.coef):
            # the steered rollouts are the base continuations: nothing to confirm
            row["kl_confirmed"], row["coef_measured"] = forced.value, forced.coef
        elif forced.reached:
            say(f"{name}: one rollout to confirm c = {forced.coef:.4g}")
            check = _rollout_statistic(
                adapter, ids_list, hook, v, stat, tokens, clock, "measured", bases
            )
            confirmed, _ = check(forced.coef)
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
            _rollout_statistic(adapter, ids_list, hook, v, stat, tokens, clock, "rollout"),
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
    paths = [cubic_paths(adapter, b, hook, v) for b in bases]
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
        "unreliable_reason": str(why[0]) if found.reached else "the cubic path never reaches it",
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
