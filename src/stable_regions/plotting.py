"""Figures without pyplot: nothing global changes (no backend switch, no current figure).

A figure made here is a plain ``matplotlib.figure.Figure``: a notebook displays it, and
``fig.savefig(path)`` writes it on any machine, headless included.
"""

from __future__ import annotations

from pathlib import Path


def new_figure(nrows: int = 1, ncols: int = 1, *, figsize=(7.0, 4.0), **subplots):
    """``(figure, axes)`` with ``axes`` a 2-D array of ``nrows x ncols`` axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False, **subplots)


def axes_or_new(ax=None, *, figsize=(7.0, 4.0)):
    """``(figure, ax)``: the given axes and their figure, or one new axes."""
    if ax is not None:
        return ax.figure, ax
    fig, axes = new_figure(figsize=figsize)
    return fig, axes[0, 0]


def save(fig, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` to ``path``; returns the path written."""
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    return path
