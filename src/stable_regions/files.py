"""Files written whole or not at all: a reader (or a resumed run) never sees half a file."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import StableRegionsError


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
    does not exist, where it is a directory, or (with ``suffix``, e.g. ``".png"``) where its
    name does not end in ``suffix``; ``flag`` names the option in the message."""
    out = Path(path)
    what = f"{flag} writes" if flag else "this writes"
    if suffix is not None and out.suffix.lower() != suffix:
        raise StableRegionsError(
            f"{what} a {suffix[1:].upper()} file: give a file name ending in {suffix}, "
            f"got {str(path)!r}"
        )
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise StableRegionsError(
            f"cannot write {str(out)!r}: the directory {str(parent)!r} does not exist; "
            "create it first or choose another path"
        )
    if out.is_dir():
        raise StableRegionsError(
            f"{str(out)!r} is a directory: give a file name"
            + (f" ending in {suffix}" if suffix else "")
        )
    return out


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
            f"cannot write the {kind} to {out} ({reason}): choose a writable --out"
        ) from None


def _start_or_resume(
    out: Path, manifest_path: Path, record: dict, resume: bool, kind: str, overwrite: bool
) -> None:
    if out.exists() and not out.is_dir():
        raise StableRegionsError(f"--out {out} is a file: give a directory")
    if out.is_dir() and any(out.iterdir()):
        if not manifest_path.is_file():
            raise StableRegionsError(
                f"{out} is not empty and holds no {kind}: choose another --out"
            )
        try:
            previous = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise StableRegionsError(
                f"{manifest_path} is corrupt: remove {out} or choose another --out"
            ) from None
        if previous.get("tool") != record.get("tool"):
            raise StableRegionsError(
                f"{out} holds a {previous.get('tool', 'different')} run, not a {kind}: "
                "choose another --out"
            )
        state = "finished" if previous.get("complete") else "unfinished"
        if overwrite:
            shutil.rmtree(out)
        elif not resume:
            raise StableRegionsError(
                f"{out} already holds a {state} run: pass --resume to continue it, "
                "--overwrite to replace it, or choose another --out"
            )
        previous.pop("complete", None)
        changed = sorted(k for k in record if previous.get(k) != record[k])
        if changed and not overwrite:
            raise StableRegionsError(
                f"--resume: the run in {out} used different {', '.join(changed)}: "
                "rerun with the same options, or choose another --out"
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

    def frame(self, n: int):
        """Parts ``0..n-1`` as one DataFrame, in order."""
        import pandas as pd

        return pd.concat([pd.read_parquet(self.part(i)) for i in range(n)], ignore_index=True)

    def finish(self) -> None:
        """The run is complete: said last, after every other file is written."""
        write_json(self.manifest, {**self.record, "complete": True})
