"""The protocol every study's result follows.

``to_frame()`` (one row per measured thing, columns from ``vocabulary``), ``summary()`` (a
smaller DataFrame), ``to_json()`` (the context and the rows, strict JSON), ``plot(ax=None)``
(draws into the given matplotlib axes, or a new figure, and returns the figure) and
``save(directory)`` (``<study>.json``, ``<study>.parquet`` and ``<study>.png``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from ._support.files import write_json, write_parquet
from ._support.inputs import json_value
from .errors import StableRegionsError


class Result:
    """Base of the studies' results. Subclasses set ``study`` and define ``to_frame``,
    ``summary``, ``context`` (what ``to_json`` puts before the rows) and ``draw(ax, **kw)``."""

    study: str = "result"

    def to_frame(self) -> pd.DataFrame:
        raise NotImplementedError

    def summary(self) -> pd.DataFrame:
        raise NotImplementedError

    def context(self) -> dict:
        """What the rows were computed from: model, prompt, layer, eps, ..."""
        return {}

    def to_json(self) -> dict:
        """``{**context, "rows": [...]}``: NaN as null, infinities as "inf" / "-inf"."""
        return {**self.context(), "rows": frame_records(self.to_frame())}

    def plot(self, ax=None, **options):
        """Draw into ``ax`` (a matplotlib ``Axes``), or into a new figure where ``ax`` is
        None; returns the figure. Nothing global changes: no backend switch, no pyplot state.
        Write a file with ``result.plot().savefig("plot.png")`` or ``result.save(directory)``."""
        if isinstance(ax, (str, os.PathLike)):
            raise StableRegionsError(
                f"plot() draws into matplotlib axes; to write {str(ax)!r} use "
                "result.plot().savefig(path), or result.save(directory)"
            )
        return self.draw(ax, **options)

    def draw(self, ax, **options):
        raise NotImplementedError

    def save(self, directory: str | os.PathLike, **plot_options) -> Path:
        """Write ``<study>.json``, ``<study>.parquet`` and ``<study>.png`` (``plot`` with
        ``plot_options``) into ``directory`` (created if needed); returns the directory."""
        out = Path(directory)
        if out.exists() and not out.is_dir():
            raise StableRegionsError(f"{str(out)!r} is a file: give a directory to save into")
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / f"{self.study}.json", self.to_json())
        write_parquet(self.to_frame(), out / f"{self.study}.parquet")
        figure = self.plot(**plot_options)
        figure.savefig(out / f"{self.study}.png", dpi=110)
        return out


def frame_records(frame: pd.DataFrame) -> list[dict]:
    """Rows for strict JSON (``inputs.json_value`` for every cell; lists kept as lists)."""
    columns = list(frame.columns)
    return [
        {c: _json_cell(v) for c, v in zip(columns, row, strict=True)}
        for row in frame.itertuples(index=False, name=None)
    ]


def _json_cell(value):
    if isinstance(value, (list, tuple)):
        return [_json_cell(v) for v in value]
    if hasattr(value, "tolist") and getattr(value, "ndim", 0) > 0:
        return [_json_cell(v) for v in value.tolist()]
    return json_value(value)
