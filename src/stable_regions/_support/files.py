"""Files written whole or not at all: a reader (or a resumed run) never sees half a file."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputPathError, StableRegionsError


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; when the block ends without an error the
    temporary file replaces ``path`` in one rename, otherwise it is removed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def check_output_file(path: str | os.PathLike, suffix: str | None = None, flag: str = "") -> Path:
    """The path of a file a command will write, refused before any work where its directory
    does not exist or cannot be written, where it is a directory, or (with ``suffix``, e.g.
    ``".png"``) where its name does not end in ``suffix``; ``flag`` names the option in the
    message."""
    out = Path(path)
    what = f"{flag} writes" if flag else "this writes"
    if suffix is not None and out.suffix.lower() != suffix:
        raise OutputPathError(
            f"{what} a {suffix[1:].upper()} file: give a file name ending in {suffix}, "
            f"got {str(path)!r}"
        )
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputPathError(
            f"cannot write {str(out)!r}: the directory {str(parent)!r} does not exist; "
            "create it first or choose another path"
        )
    if out.is_dir():
        raise OutputPathError(
            f"{str(out)!r} is a directory: give a file name"
            + (f" ending in {suffix}" if suffix else "")
        )
    _probe(parent, out)
    return out


def check_output_dir(path: str | os.PathLike, flag: str = "") -> Path:
    """The path of a directory a command will write into, refused before any work where it
    is a file or where it (or the nearest directory above it that exists) cannot be
    written. Nothing is created."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        name = f"{flag} {out}" if flag else f"`out` {out}"
        raise OutputPathError(f"{name} is a file: give a directory")
    existing = out
    while not existing.exists():
        existing = existing.parent if str(existing.parent) else Path(".")
    if not existing.is_dir():
        raise OutputPathError(f"cannot write {str(out)!r}: {str(existing)!r} is a file")
    _probe(existing, out)
    return out


def _probe(directory: Path, target: Path) -> None:
    """Create and remove a file in ``directory``: where that fails, so would the results."""
    try:
        fd, name = tempfile.mkstemp(prefix=".stable-regions-probe-", dir=directory)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OutputPathError(
            f"cannot write {str(target)!r} ({reason} in {str(directory)!r}): choose another path"
        ) from None


def write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text atomically."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, obj) -> Path:
    """Write ``obj`` as indented UTF-8 JSON with a final newline, atomically."""
    return write_text(path, json.dumps(obj, ensure_ascii=False, indent=1) + "\n")


def write_parquet(frame, path: str | Path) -> Path:
    """Write a pandas DataFrame as Parquet, atomically."""
    with replacing(path) as tmp:
        frame.to_parquet(tmp, index=False)
    return Path(path)


def start_or_resume(
    out: Path,
    manifest_path: Path,
    record: dict,
    resume: bool,
    kind: str,
    overwrite: bool = False,
) -> None:
    """Begin a run that writes into directory ``out`` as it goes, or continue one.

    ``record`` describes the run (tool, model, settings, inputs); ``manifest_path`` holds it
    with ``"complete": false`` until the run ends. An existing run is continued only with
    ``resume`` and the same record, or replaced with ``overwrite`` (only a run of the same
    tool: a directory holding anything else is refused, never emptied). A directory that
    cannot be made or written is a user error, not a crash."""
    try:
        _start_or_resume(out, manifest_path, record, resume, kind, overwrite)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise StableRegionsError(
            f"cannot write the {kind} to {out} ({reason}): choose a writable `out`"
        ) from None


def check_run_directory(
    out: str | Path, tool: str, kind: str, *, resume: bool, overwrite: bool
) -> Path:
    """What ``start_or_resume`` refuses, short of comparing settings, checked before any
    work (the commands call it before loading a model): ``out`` must be writable and hold
    nothing, a run of ``tool`` to continue (``resume``) or replace (``overwrite``)."""
    out = check_output_dir(out)
    _check_previous(out, tool, kind, resume, overwrite)
    return out


def _check_previous(out: Path, tool: str, kind: str, resume: bool, overwrite: bool) -> dict | None:
    """The record of the run in ``out`` (None where there is none), refused where
    ``check_run_directory`` says so."""
    previous = _previous_run(out, out / "manifest.json", kind)
    if previous is not None:
        if previous.get("tool") != tool:
            raise StableRegionsError(
                f"{out} holds a {previous.get('tool', 'different')} run, not a {kind}: "
                "choose another `out`"
            )
        if not (resume or overwrite):
            state = "finished" if previous.get("complete") else "unfinished"
            raise StableRegionsError(
                f"{out} already holds a {state} run: pass `resume=True` to continue it, "
                "`overwrite=True` to replace it, or choose another `out`"
            )
    elif resume:
        raise StableRegionsError(
            f"`resume=True`: {out} holds no run to continue; drop `resume=True` to start one "
            "there, or give the directory of the run to continue"
        )
    return previous


def _previous_run(out: Path, manifest_path: Path, kind: str) -> dict | None:
    """The record of the run in ``out`` (None where ``out`` is missing or empty)."""
    if not (out.is_dir() and any(out.iterdir())):
        return None
    if not manifest_path.is_file():
        raise StableRegionsError(f"{out} is not empty and holds no {kind}: choose another `out`")
    try:
        return json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise StableRegionsError(
            f"{manifest_path} is corrupt: remove {out} or choose another `out`"
        ) from None


def _start_or_resume(
    out: Path, manifest_path: Path, record: dict, resume: bool, kind: str, overwrite: bool
) -> None:
    check_output_dir(out)
    previous = _check_previous(out, record.get("tool"), kind, resume, overwrite)
    if previous is not None:
        if overwrite:
            shutil.rmtree(out)
        previous.pop("complete", None)
        changed = sorted(k for k in record if previous.get(k) != record[k])
        if changed and not overwrite:
            raise StableRegionsError(
                f"`resume=True`: the run in {out} used different {', '.join(changed)}: "
                "rerun with the same settings, or choose another `out`"
            )
    out.mkdir(parents=True, exist_ok=True)
    # From here on the run is unfinished until it ends (also a resumed finished one).
    write_json(manifest_path, {**record, "complete": False})


class RunDirectory:
    """A run that writes as it goes (``validate``, ``scan``): ``DIR/manifest.json`` holds the
    run's record with ``"complete": false`` until ``finish``, and each of its ``n`` items is
    one Parquet part ``DIR/parts/NNNNN.parquet``, written whole or not at all, so that a
    resumed run skips the parts already there and loses or repeats nothing."""

    def __init__(
        self, out: str | Path, record: dict, kind: str, *, resume: bool, overwrite: bool
    ) -> None:
        self.out = Path(out)
        self.manifest = self.out / "manifest.json"
        self.record = record
        start_or_resume(self.out, self.manifest, record, resume, kind, overwrite)
        (self.out / "parts").mkdir(exist_ok=True)

    def part(self, i: int) -> Path:
        return self.out / "parts" / f"{i:05d}.parquet"

    def done(self, i: int) -> bool:
        return self.part(i).exists()

    def write_part(self, i: int, frame) -> Path:
        return write_parquet(frame, self.part(i))

    def frame(self, n: int, study: str):
        """Parts ``0..n-1`` as one DataFrame, in order, in today's column names (parts an
        earlier version of ``study`` wrote are renamed, with a warning)."""
        import pandas as pd

        from ..vocabulary import upgrade

        parts = [upgrade(pd.read_parquet(self.part(i)), study, str(self.out)) for i in range(n)]
        return pd.concat(parts, ignore_index=True)

    def finish(self) -> None:
        """The run is complete: said last, after every other file is written."""
        write_json(self.manifest, {**self.record, "complete": True})


class MemoryRun:
    """A run's parts kept in memory (``scan_corpus`` and ``validate`` without ``out``): the
    same calls as ``RunDirectory``, nothing written."""

    out = None

    def __init__(self) -> None:
        self.parts: dict = {}

    def done(self, i: int) -> bool:
        return i in self.parts

    def write_part(self, i: int, frame) -> None:
        self.parts[i] = frame

    def frame(self, n: int, study: str):
        import pandas as pd

        return pd.concat([self.parts[i] for i in range(n)], ignore_index=True)

    def finish(self) -> None:
        return None
