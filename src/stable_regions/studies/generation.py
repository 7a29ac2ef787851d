"""``stable_regions.generate``: generate text with a ``StabilityMonitor`` attached.

Prompts are left-padded into one batch; decoding is greedy or sampled (``seed`` makes
sampling repeatable without touching the caller's random state). Each sequence's rows stop
at its first end-of-sequence token (after it ``generate`` only pads).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field

import pandas as pd
import torch

from .._support.inputs import as_adapter, check_eps
from ..errors import InvalidParameterError
from ..models.precision import full_float32_products
from ..plotting import axes_or_new
from ..results import Result
from ..vocabulary import describe
from .monitor import StabilityMonitor
from .steering_drift import SteeringDrift, check_steering
from .token_geometry import check_mode


def check_new_tokens(n, name: str = "max_new_tokens") -> int:
    """A count of tokens to generate (``name`` says which parameter in the message)."""
    # numpy's integers count (a value from an array or a frame), bools do not
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise InvalidParameterError(f"{name} must be a whole number >= 1, got {n!r}")
    return int(n)


@dataclass
class GenerationResult(Result):
    """What ``generate`` returns: the generated ``text`` (a list for a list of prompts) and
    one row per generated token and eps (``to_frame``; ``vocabulary`` defines every column).
    ``text, frame = result`` unpacks it as the tuple earlier versions returned."""

    study = "generate"
    model: str
    prompts: list[str]
    text: str | list[str]
    mode: str
    eps: list[float]
    frame: pd.DataFrame = field(repr=False)

    def __iter__(self):  # text, frame = generate(...)
        return iter((self.text, self.frame))

    def to_frame(self) -> pd.DataFrame:
        return describe(self.frame.copy())

    def context(self) -> dict:
        single = isinstance(self.text, str)
        return {
            "model": self.model,
            "prompt": self.prompts[0] if single else self.prompts,
            "text": self.text,
            "mode": self.mode,
            "eps": self.eps,
        }

    def summary(self) -> pd.DataFrame:
        """Per sequence and eps: tokens generated, how many are fragile, and the median and
        smallest ``radius_curve`` and ``radius_flip``."""
        frame = self.frame
        out = frame.groupby(["sequence", "eps"], sort=True).agg(
            n=("step", "size"),
            fragile=("fragile", "sum"),
            median_radius_curve=("radius_curve", "median"),
            min_radius_curve=("radius_curve", "min"),
            median_radius_flip=("radius_flip", "median"),
        )
        return describe(out.reset_index())

    def draw(self, ax=None, *, eps: float | None = None):
        """``radius_curve`` along the generated tokens of each sequence at ``eps`` (default
        the first), log scale; fragile tokens marked."""
        e = self.eps[0] if eps is None else check_eps(eps)[0]
        rows = self.frame[self.frame.eps == e]
        fig, ax = axes_or_new(ax, figsize=(max(6.0, 0.15 * rows.step.nunique() + 3), 4.0))
        for sequence, g in rows.groupby("sequence"):
            g = g.sort_values("step")
            ax.plot(g.step, g.radius_curve, "o-", ms=3, lw=1, label=f"sequence {sequence}")
            fragile = g[g.fragile.astype(bool)]
            ax.plot(fragile.step, fragile.radius_curve, "x", color="tab:red", ms=7)
        ax.set_yscale("log")
        ax.set_xlabel("generated token")
        ax.set_ylabel("radius_curve (pre-logit units)")
        ax.set_title(
            f"{self.model}, eps {e:g}: radius of each generated token (x: fragile)", fontsize=9
        )
        if rows.sequence.nunique() > 1:
            ax.legend(fontsize=7)
        return fig


@full_float32_products()
def generate(
    model,
    prompts: str | Sequence[str],
    *,
    max_new_tokens: int = 32,
    eps: float | Sequence[float] = (0.1,),
    mode: str = "fast",
    greedy: bool = True,
    seed: int | None = None,
    chat: bool = False,
    steering: Mapping | None = None,
    **monitor_options,
) -> GenerationResult:
    """Generate from one prompt or several and record stability per generated token.

    Prompts are left-padded into one batch; decoding is greedy or sampled.

    Parameters
    ----------
    model : str, ModelAdapter or transformers model
        As for :func:`analyze`.
    prompts : str or list of str
        One prompt or several (``sequence`` in the frame is the prompt's index).
    max_new_tokens : int, default 32
        Tokens to generate per sequence (fewer where a sequence ends).
    eps : float or list of float, default 0.1
        KL thresholds (nats).
    mode : {"fast", "exact"}, default "fast"
        The monitor's mode (:class:`StabilityMonitor`).
    greedy : bool, default True
        Greedy decoding; ``False`` samples.
    seed : int, optional
        Makes sampling repeatable without touching the caller's random state.
    chat : bool, default False
        Put each prompt in the tokenizer's chat template as a user message, the
        assistant's turn opened: what an instruct model expects.
    steering : dict, optional
        ``{"vector": v, "layer": L, "coefficient": c, "spike_kl": 1.0}``: generate with
        ``c * v`` added at every position of ``blocks.{L}.hook_resid_post``, and record per
        token ``kl_steer`` (``KL(p_steer || p_base)``, from one more pass of the base model
        per step), ``kl_steer_cumulative`` and ``kl_spike`` (``kl_steer > spike_kl``).
    **monitor_options
        ``threshold``, ``directions``, ``certified``, ``callback``, ``eig_tol`` (see
        :class:`StabilityMonitor`).

    Returns
    -------
    GenerationResult
        ``.text`` and one row per generated token and eps (``to_frame()``).

    Examples
    --------
    >>> result = sr.generate(model, "The capital of France is", max_new_tokens=8)
    >>> result.text, result.summary()  # doctest: +SKIP
    """
    adapter = as_adapter(model)
    max_new_tokens = check_new_tokens(max_new_tokens)
    eps_list = check_eps(eps)
    check_mode(mode)
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    if not texts or not all(isinstance(t, str) and t for t in texts):
        raise InvalidParameterError("give one or more non-empty prompts")
    ids, mask = _batch(adapter, texts, chat)
    eos = adapter.model.generation_config.eos_token_id
    eos_ids = set([eos] if isinstance(eos, int) else (eos or []))
    pad = adapter.tokenizer.pad_token_id if adapter.tokenizer is not None else None
    pad = pad if pad is not None else next(iter(eos_ids), 0)
    # a seed reseeds every CUDA device too (torch.manual_seed): their states are restored
    # after, as the CPU's is, so the user's random streams continue as if we had not run
    cuda = list(range(torch.cuda.device_count())) if seed is not None else []
    spec = check_steering(adapter, steering)
    drift = SteeringDrift(adapter, spec, mask) if spec is not None else None
    with StabilityMonitor(adapter, eps=eps_list, mode=mode, **monitor_options) as monitor:
        with ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=cuda))
            stack.enter_context(torch.no_grad())
            stack.enter_context(adapter.running())
            if spec is not None:
                stack.enter_context(adapter.added(spec.hook, spec.delta))
            if seed is not None:
                torch.manual_seed(seed)
            out = adapter.model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=not greedy,
                logits_processor=[monitor] + ([drift] if drift is not None else []),
                pad_token_id=pad,
            )
        monitor.finish(out)
        frame = _trim(monitor.to_frame(), eos_ids)
        if drift is not None:
            frame = drift.columns(frame)
    new = out[:, ids.shape[1] :]
    decoded = []
    for row in range(len(texts)):
        steps = frame.loc[frame["sequence"] == row, "step"]
        n = int(steps.max()) + 1 if len(steps) else 0
        decoded.append(adapter.tokenizer.decode(new[row, :n], skip_special_tokens=True))
    frame = describe(frame.drop(columns="generation"))
    text = decoded[0] if single else decoded
    return GenerationResult(adapter.name, texts, text, mode, eps_list, frame)


def _batch(adapter, texts: list[str], chat: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask (each prompt checked as ``tokenize`` checks it)."""
    rows = [adapter.tokenize(t, chat=chat)[0] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long, device=adapter.device)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask


def _trim(frame: pd.DataFrame, eos_ids: set[int]) -> pd.DataFrame:
    """Drop each sequence's rows after its first end-of-sequence token."""
    if frame.empty or not eos_ids:
        return frame.reset_index(drop=True)
    ends = frame[frame["chosen_token_id"].isin(eos_ids)].groupby("sequence")["step"].min()
    last = frame["sequence"].map(ends).fillna(float("inf"))
    return frame[frame["step"] <= last].reset_index(drop=True)
