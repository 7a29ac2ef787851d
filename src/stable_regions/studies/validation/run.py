"""The validation study: closed-form radii against measured boundaries over a prompt corpus.

For each prompt, a few positions (evenly spread, the last included), each layer asked for and
each direction family (``study.FAMILIES``), both signs ``+v`` and ``-v`` of every direction are
rays; along each ray and for each eps we record the published closed form
(``radius_quadratic``), the [2/2] Pade form of the KL series (``radius_pade``), the exact KL
root along the logits' Taylor path (``radius_curve``), the boundary measured on the model
(``radius_exact``) and, once the run is calibrated, the isotonic calibration of the chosen
closed form (``radius_calibrated``), one per layer (``vocabulary`` defines every column). ``final.FinalLayerStudy`` measures at the pre-logit vector through the head,
``inner.InnerLayerStudy`` at ``embed`` or a block through the rest of the network.

The run is written as it goes: ``DIR/parts/NNNNN.parquet`` per prompt, every layer (atomic), so
``resume=True`` continues after an interruption without losing or duplicating rows; the
finished files (``results.parquet``, ``summary.json``, ``report.html``,
``calibration-LAYER.json``) appear only at the end, and ``manifest.json`` says
``"complete": true`` last of all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..._support.files import MemoryRun, RunDirectory, write_json, write_parquet
from ..._support.inputs import as_adapter, check_eps
from ..._support.metrics import relative_error
from ...calibration import Calibration, model_fingerprint, resolve_calibration
from ...errors import InvalidParameterError, StableRegionsError
from ...models.layers import check_layers
from ...models.precision import full_float32_products
from ...plotting import axes_or_new
from ...prompts import Prompt, as_prompts, corpus, corpus_digest
from ...report import write_report
from ...results import Result
from ...vocabulary import describe
from .final import FinalLayerStudy
from .fitting import apply_calibration, fit_calibration, split_prompts, summarize
from .inner import InnerLayerStudy
from .study import PREDICTORS, StudySettings, check_families


def calibration_file(layer: str) -> str:
    """The name of a run's calibration of ``layer``: ``calibration-final.json``, ..."""
    return f"calibration-{layer}.json"


def resolve_calibrations(spec, adapter, layers: list[str], eps: list[float]):
    """One checked calibration per layer from ``spec``: ``"bundled"`` (the shipped one of
    each layer), a ``Calibration`` or a calibration file (its one layer must be the run's only
    layer), or a finished run's folder (its ``calibration-LAYER.json`` of every layer)."""
    if isinstance(spec, (str, Path)) and Path(spec).is_dir():
        out = {}
        for layer in layers:
            path = Path(spec) / calibration_file(layer)
            if not path.is_file():
                raise StableRegionsError(
                    f"{spec} holds no calibration of layer {layer} ({path.name}): fit one with "
                    "validate(..., `calibration='fit'`) at that layer"
                )
            out[layer] = resolve_calibration(path, adapter, layer)
    elif str(spec) == "bundled":
        out = {layer: resolve_calibration("bundled", adapter, layer) for layer in layers}
    else:
        given = resolve_calibration(spec, adapter, layers[0]) if len(layers) == 1 else None
        if given is None:
            raise StableRegionsError(
                f"one calibration file covers one layer, and this run measures {len(layers)} "
                f"({', '.join(layers)}): give the folder of a run fitted at all of them, "
                "'bundled' or 'fit'"
            )
        out = {layers[0]: given}
    for cal in out.values():
        for e in eps:
            cal.band_for(e)  # fail before measuring, not after
    return out


@dataclass
class ValidationRun(Result):
    """A finished run: one row per (prompt, layer, ray, eps) (``to_frame``; ``vocabulary``
    defines every column), the held-out summary (``summary``), the calibration of each
    layer (empty without one), and the directory holding the files (None in memory)."""

    study = "validate"
    model: str
    out: Path | None
    frame: pd.DataFrame = field(repr=False)
    summary_rows: list[dict]
    calibrations: dict[str, Calibration]

    def to_frame(self) -> pd.DataFrame:
        return self.frame

    def summary(self) -> pd.DataFrame:
        """Per layer, family, eps and radius form (``predictor``) over the held-out prompts:
        the median and 90th-percentile relative error and the share within 1%, 8%, 50%."""
        return describe(pd.DataFrame(self.summary_rows))

    def context(self) -> dict:
        return {"model": self.model, "layers": sorted(self.frame.layer.unique().tolist())}

    def draw(self, ax=None, *, eps: float | None = None, layer: str | None = None):
        """Error CDFs of each radius form over the held-out rays at ``eps`` and ``layer``
        (default the first of each)."""
        test = self.frame[self.frame.split == "test"]
        e = float(sorted(test.eps.unique())[0]) if eps is None else check_eps(eps)[0]
        where = str(test.layer.iloc[0]) if layer is None else str(layer)
        rows = test[(test.eps == e) & (test.layer == where)]
        if rows.empty:
            raise InvalidParameterError(f"no held-out rows at eps {e:g}, layer {where!r}")
        fig, ax = axes_or_new(ax, figsize=(6.0, 4.0))
        for predictor in PREDICTORS:
            column = f"radius_{predictor}"
            err = np.sort(relative_error(rows[column], rows["radius_exact"]))
            if np.isfinite(err).any():
                y = np.arange(1, len(err) + 1) / len(err)
                ax.step(np.clip(err, 1e-7, 1e2), y, where="post", label=predictor)
        for t in (0.01, 0.08, 0.5):
            ax.axvline(t, color="0.8", lw=0.7)
        ax.set_xscale("log")
        ax.set_xlabel("|predicted / measured - 1|")
        ax.set_ylabel("fraction of held-out rays")
        ax.set_title(f"{self.model}, layer '{where}', eps {e:g}", fontsize=9)
        ax.legend(fontsize=7)
        return fig


def study_settings(
    eps: Sequence[float],
    layers: Sequence[str | int] | None,
    families: Sequence[str] | None,
    positions_per_prompt: int,
    seed: int,
) -> StudySettings:
    """The study's settings, checked (one-line errors) before any model is loaded."""
    settings = StudySettings(
        eps=check_eps(eps),
        layers=check_layers(layers),
        families=check_families(families),
        positions_per_prompt=int(positions_per_prompt),
        seed=int(seed),
    )
    if settings.positions_per_prompt < 1:
        raise InvalidParameterError("positions_per_prompt must be at least 1")
    return settings


def study_prompts(prompts) -> list[Prompt]:
    """The prompts a run measures (the shipped corpus for None), checked before any model is
    loaded."""
    prompts = corpus() if prompts is None else as_prompts(prompts)
    if not prompts:
        raise StableRegionsError("no prompts given")
    return prompts


@dataclass
class ValidationPlan:
    """What a run measures and how it is calibrated, and its run record: the same for a
    local run and a Ray run (``distributed.validate_ray``), so either resumes the other."""

    settings: StudySettings
    prompts: list[Prompt]
    fitting: bool
    fixed: dict[str, Calibration]
    record: dict

    @classmethod
    def make(
        cls, adapter, settings: StudySettings, prompts: list[Prompt], calibration
    ) -> ValidationPlan:
        """``prompts`` from ``study_prompts``."""
        check_layers(settings.layers, adapter.n_layers)
        fitting = isinstance(calibration, str) and calibration == "fit"
        fixed: dict[str, Calibration] = {}
        if not fitting and calibration is not None and str(calibration) != "none":
            fixed = resolve_calibrations(calibration, adapter, settings.layers, settings.eps)
        record = {
            "tool": "stable-regions validate",
            "model": adapter.name,
            "fingerprint": model_fingerprint(adapter),
            "settings": asdict(settings),
            "prompts": corpus_digest(prompts),
            "n_prompts": len(prompts),
            "calibration": "fit"
            if fitting
            else {k: str(c.path or "given") for k, c in fixed.items()} or None,
        }
        return cls(settings, prompts, fitting, fixed, record)

    def studies(self, adapter) -> list:
        """One study per layer; refuses a steering family that is undefined at a layer."""
        studies = [
            FinalLayerStudy(adapter, self.settings)
            if layer == "final"
            else InnerLayerStudy(adapter, self.settings, layer)
            for layer in self.settings.layers
        ]
        for study in studies:
            if (
                "steering" in self.settings.families
                and not float(study.steering_vector().norm()) > 0
            ):
                raise StableRegionsError(
                    f"the steering family is undefined at layer {study.layer}: the shipped "
                    "sentiment prompts' last-token activations there are identical (their mean "
                    "difference is zero); leave it out of `families`"
                )
        return studies

    def partner(self, i: int) -> Prompt | None:
        """The prompt whose activation the interpolation family moves toward: the next one."""
        total = len(self.prompts)
        return self.prompts[(i + 1) % total] if total > 1 else None


def measure_prompt(studies: list, prompt: Prompt, partner: Prompt | None) -> pd.DataFrame:
    """Every layer's rows of one prompt: the unit a run writes (a part) and a Ray worker
    returns."""
    return pd.concat([study.measure(prompt, partner) for study in studies], ignore_index=True)


def finish_validation(adapter, run: RunDirectory, plan: ValidationPlan) -> ValidationRun:
    """Join the parts, fit (or apply) the calibrations, write the finished files, mark the
    run complete."""
    settings, out = plan.settings, run.out
    frame = run.frame(len(plan.prompts), "validate")
    used = plan.fixed
    if plan.fitting:
        train = split_prompts(frame["prompt_digest"], settings.train_fraction, settings.seed)
        used = {layer: fit_calibration(frame, adapter, layer, train) for layer in settings.layers}
        if out is not None:
            for layer, cal in used.items():
                cal.save(out / calibration_file(layer))
    frame["split"] = "test"
    for cal in used.values():
        frame = apply_calibration(frame, cal)
    frame = describe(frame)
    summary = summarize(frame, adapter.name)
    if out is not None:
        write_parquet(frame, out / "results.parquet")
        write_json(out / "summary.json", summary)
        write_report(out / "report.html", frame, summary, plan.record, used)
    run.finish()
    return ValidationRun(adapter.name, out, frame, summary, used)


@full_float32_products()
def validate(
    model,
    prompts: Sequence[Prompt] | None = None,
    *,
    out: str | Path | None = None,
    eps: float | Sequence[float] = (0.01, 0.1, 1.0),
    layers: Sequence[str | int] | None = None,
    families: Sequence[str] | None = None,
    calibration: str | Path | Calibration | None = "fit",
    resume: bool = False,
    overwrite: bool = False,
    positions_per_prompt: int = 3,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> ValidationRun:
    """Run the validation study: closed-form radii against measured boundaries over a
    corpus, with a calibration per layer.

    For a few positions of every prompt, at each layer and for six families of directions
    (``FAMILIES``), both signs of every direction are rays; along each, every radius form and
    the boundary measured on the model.

    Parameters
    ----------
    model : str, ModelAdapter or transformers model
        As for :func:`analyze`.
    prompts : list of str or Prompt, optional
        The corpus (default: the shipped one, ``prompts.corpus()``).
    out : path, optional
        A run directory, written as it goes (``results.parquet``, ``summary.json``,
        ``report.html``, ``calibration-LAYER.json``); without, the run stays in memory.
    eps : float or list of float, default (0.01, 0.1, 1.0)
        KL thresholds (nats).
    layers : list, optional
        Any of ``"embed"``, block indices, hook names and ``"final"`` (default ``["final"]``).
    families : list of str, optional
        A subset of ``FAMILIES`` (default all).
    calibration : "fit", "bundled", path, Calibration or None, default "fit"
        ``"fit"``: per layer, fitted on a seeded half of the prompts and judged on the
        other half; ``"bundled"``; a calibration file (one layer); a finished run's folder.
    resume, overwrite : bool
        Continue the unfinished run in ``out`` (same settings), or replace it.
    positions_per_prompt : int, default 3
        Positions per prompt, evenly spread, the last included.
    seed : int, default 0
        Seeds the directions and the split.
    progress : callable, optional
        Called as ``progress(done, total)`` after each prompt.

    Returns
    -------
    ValidationRun
        ``summary()``: per layer, family, eps and form, the held-out errors.

    Examples
    --------
    >>> run = sr.validate(model, corpus()[:8], positions_per_prompt=1)  # doctest: +SKIP
    >>> run.summary()  # doctest: +SKIP
    """
    settings = study_settings(eps, layers, families, positions_per_prompt, seed)
    prompts = study_prompts(prompts)
    adapter = as_adapter(model)
    plan = ValidationPlan.make(adapter, settings, prompts, calibration)
    studies = plan.studies(adapter)
    if out is None:
        if resume or overwrite:
            raise InvalidParameterError(
                "resume=True and overwrite=True continue or replace a run in a directory: "
                "give `out`"
            )
        run = MemoryRun()
    else:
        run = RunDirectory(out, plan.record, "validation run", resume=resume, overwrite=overwrite)
    total = len(plan.prompts)
    done = sum(run.done(i) for i in range(total))
    if progress is not None:
        progress(done, total)
    for i, prompt in enumerate(plan.prompts):
        if run.done(i):
            continue
        run.write_part(i, measure_prompt(studies, prompt, plan.partner(i)))
        done += 1
        if progress is not None:
            progress(done, total)
    return finish_validation(adapter, run, plan)
