"""Tables of a result's frame, in the vocabulary's names: what the commands print.

The headers are the columns' own names (the same as in ``--json`` and ``--csv``). A default
set of columns fits an 80-column terminal; ``--columns`` picks others (``all`` for every
one) and ``--csv`` writes the whole frame. Tokens show their whitespace (a space as ``·``, a
newline as ``↵``, a tab as ``⇥``), as the HTML viewer does.
"""

from __future__ import annotations

import argparse
import math
import sys

import pandas as pd

from ..errors import InvalidParameterError
from ..vocabulary import meanings
from .console import console

TEXT = (
    "token",
    "next_token",
    "chosen_token",
    "substitute",
    "doc_id",
    "layer",
    "certified_by",
    "predictor",
    "family",
)


def add_table_options(parser: argparse.ArgumentParser, default: list[str]) -> None:
    """``--columns`` and ``--csv`` of a command that prints a result's frame."""
    parser.add_argument(
        "--columns",
        metavar="NAME,...",
        default=None,
        help=f"columns of the table, comma-separated, or 'all' (default: {','.join(default)})",
    )
    parser.add_argument(
        "--csv",
        action="store_true",
        help="print every column as CSV on stdout instead of a table",
    )


def chosen_columns(frame: pd.DataFrame, text: str | None, default: list[str]) -> list[str]:
    """The columns ``--columns`` names (checked against the frame), or ``default``."""
    if text is None:
        return [c for c in default if c in frame.columns]
    if text.strip() == "all":
        return list(frame.columns)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in frame.columns]
    if unknown or not names:
        raise InvalidParameterError(
            f"--columns: {', '.join(unknown) or 'none given'} not among this table's columns "
            f"({', '.join(frame.columns)})"
        )
    return names


def check_columns(text: str | None, names: list[str]) -> None:
    """``--columns`` checked against a study's columns before any work."""
    chosen_columns(pd.DataFrame(columns=names), text, [])


def visible(text) -> str:
    """A token for a table cell: whitespace shown, other control characters escaped."""
    shown = str(text).replace(" ", "·").replace("\n", "↵").replace("\t", "⇥")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in shown)


def number(x) -> str:
    if isinstance(x, (bool,)):
        return "yes" if x else "no"
    if isinstance(x, float):
        if math.isnan(x):
            return "-"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return f"{x:.4g}"
    return str(x)


def print_frame(
    frame: pd.DataFrame,
    columns: list[str],
    *,
    title: str,
    group: str | None = "position",
    note: str = "",
    stderr: bool = False,
) -> None:
    """``columns`` of ``frame`` as a table; consecutive rows of one ``group`` value are one
    section, the group's own columns printed once. ``note`` follows in dim text, with the
    meaning of every column shown."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    out = console(stderr=stderr)
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for name in columns:
        if name in TEXT:
            table.add_column(name, overflow="fold")
        else:
            table.add_column(name, justify="right", no_wrap=True)
    per_group = {c for c in columns if group and _constant_within(frame, group, c)}
    last = None
    for row in frame[columns + ([group] if group and group not in columns else [])].to_dict(
        "records"
    ):
        first = group is None or table.row_count == 0 or row[group] != last
        if group and first and table.row_count:
            table.add_section()
        if group:
            last = row[group]
        cells = []
        for name in columns:
            value = row[name]
            if not first and name in per_group:
                cells.append("")
            elif name in TEXT:
                cells.append(escape(visible(value)))
            else:
                cells.append(number(value))
        table.add_row(*cells)
    out.print(table)
    described = "; ".join(f"{k}: {v}" for k, v in meanings(columns).items())
    out.print(f"[dim]{escape(note + (' ' if note else '') + described)}[/dim]")


def _constant_within(frame: pd.DataFrame, group: str, column: str) -> bool:
    if column == group:
        return True
    if group not in frame.columns or column not in frame.columns:
        return False
    try:
        return bool((frame.groupby(group, sort=False)[column].nunique(dropna=False) <= 1).all())
    except TypeError:  # lists are unhashable: not a per-group value
        return False


def calibrated_note(frame: pd.DataFrame) -> str:
    """Which form the calibrated column holds at each eps, where a calibration was used."""
    if "calibrated_form" not in frame or not frame["calibrated_form"].astype(bool).any():
        return ""
    forms = frame.groupby("eps", sort=True)["calibrated_form"].agg(
        lambda s: " or ".join(sorted(set(s)))
    )
    said = "; ".join(f"{text} at eps {e:g}" for e, text in forms.items())
    return (
        f"Calibrated: {said} ('as is': the calibrator's map was worse than that closed form "
        "on held-out prompts, so it is not applied)."
    )


def write_csv(frame: pd.DataFrame) -> None:
    frame.to_csv(sys.stdout, index=False)


def write_results(results: list, args, print_table) -> None:
    """One result per prompt to stdout: ``--json`` one document per line, ``--csv`` one
    table (with ``prompt_id`` first where there are several), else ``print_table`` each."""
    import json

    if args.json:
        for result in results:
            sys.stdout.write(json.dumps(result.to_json(), ensure_ascii=False) + "\n")
    elif args.csv:
        frames = [r.to_frame() for r in results]
        if len(frames) > 1:
            frames = [
                f.assign(prompt_id=i)[["prompt_id", *f.columns]] for i, f in enumerate(frames)
            ]
        write_csv(pd.concat(frames, ignore_index=True))
    else:
        for result in results:
            print_table(result, args)
