"""Prompt files and the shipped validation corpus.

A prompt file is either plain text, one prompt per line with a literal ``\\n`` standing for a
newline inside a prompt, or ``.jsonl`` with one JSON object per line carrying a ``text`` field.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import InvalidParameterError, StableRegionsError


@dataclass(frozen=True)
class Prompt:
    """One prompt: a stable id, its text, and where it came from."""

    id: str
    text: str
    kind: str = ""
    source: str = ""

    @property
    def digest(self) -> str:
        """First 16 hex digits of the SHA-256 of the text: identifies a prompt across files."""
        return text_digest(self.text)


def as_prompts(items, what: str = "prompt") -> list[Prompt]:
    """``Prompt`` objects as given, plain strings as ``Prompt("{what}-{i}", text)``; any other
    item is a TypeError that names what is accepted."""
    if isinstance(items, (str, Prompt)):
        items = [items]
    out = []
    for i, item in enumerate(items):
        if isinstance(item, Prompt):
            out.append(item)
        elif isinstance(item, str):
            out.append(Prompt(f"{what}-{i}", item))
        else:
            raise TypeError(
                f"{what} {i} is a {type(item).__name__}: give strings or "
                "stable_regions.prompts.Prompt objects"
            )
    return out


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def corpus_digest(prompts: Sequence[Prompt]) -> str:
    """SHA-256 over the prompts' digests in order: identifies a corpus (a resumed run's)."""
    return hashlib.sha256("\n".join(p.digest for p in prompts).encode()).hexdigest()


def read_prompt_file(path: str | Path) -> list[Prompt]:
    """Prompts of a ``.txt`` or ``.jsonl`` file; ids are ``line-N`` unless the JSON gives ``id``."""
    path = Path(path)
    if path.is_dir():
        raise InvalidParameterError(
            f"prompt file {path} is a directory: give a .txt or .jsonl file"
        )
    if not path.is_file():
        raise InvalidParameterError(f"prompt file {path} not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise StableRegionsError(f"prompt file {path} is not UTF-8 text") from None
    while lines and not lines[-1].strip():
        lines.pop()  # trailing empty lines at the end of a file are harmless
    if not any(line.strip() for line in lines):
        raise StableRegionsError(f"prompt file {path} has no prompts (one per line)")
    jsonl = path.suffix.lower() == ".jsonl"
    prompts: list[Prompt] = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            raise StableRegionsError(
                f"{path}:{n} is a blank line: remove it (write \\n for a newline inside a prompt)"
            )
        if not jsonl:
            prompts.append(Prompt(f"line-{n}", line.replace("\\n", "\n")))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise StableRegionsError(f"{path}:{n} is not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not obj["text"]:
            raise StableRegionsError(f'{path}:{n} needs a non-empty "text" string field')
        prompts.append(
            Prompt(
                str(obj.get("id", f"line-{n}")),
                obj["text"],
                str(obj.get("kind", "")),
                str(obj.get("source", "")),
            )
        )
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise StableRegionsError(f"prompt file {path}: id {dup!r} appears more than once")
    return prompts


def read_documents(paths: Sequence[str | Path]) -> list[Prompt]:
    """Documents to scan: a ``.jsonl`` file gives one per line (``read_prompt_file``; ids
    ``FILENAME:ID``), any other file is one document, its whole text, with the path as its id."""
    if not paths:
        raise StableRegionsError("no documents given: pass text files or .jsonl files")
    docs: list[Prompt] = []
    for path in map(Path, paths):
        if path.suffix.lower() == ".jsonl":
            docs += [
                Prompt(f"{path.name}:{p.id}", p.text, p.kind, str(path))
                for p in read_prompt_file(path)
            ]
            continue
        if path.is_dir():
            raise StableRegionsError(
                f"{path} is a folder: give the documents in it, e.g. {path / '*.txt'}"
            )
        if path.is_dir():
            raise InvalidParameterError(
                f"document {path} is a directory: give text or .jsonl files (e.g. DIR/*.txt)"
            )
        if not path.is_file():
            raise InvalidParameterError(f"document {path} not found")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise StableRegionsError(f"document {path} is not UTF-8 text") from None
        if not text.strip():
            raise StableRegionsError(f"document {path} is empty")
        docs.append(Prompt(str(path), text, "", str(path)))
    ids = [d.id for d in docs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise StableRegionsError(f"document {dup} is given twice")
    return docs


def package_path(*parts: str) -> Path:
    """A file or folder shipped inside the ``stable_regions`` package."""
    return Path(str(resources.files("stable_regions").joinpath(*parts)))


def data_path(name: str) -> Path:
    """A file shipped in ``stable_regions/data``."""
    return package_path("data", name)


def corpus() -> list[Prompt]:
    """The shipped validation corpus (see ``scripts/build_corpus.py`` for where each text came from)."""
    return read_prompt_file(data_path("corpus.jsonl"))


def sentiment_prompts() -> tuple[list[str], list[str]]:
    """The shipped positive and negative sentiment sets behind the ``steering`` direction family."""
    return tuple(  # type: ignore[return-value]
        [p.text for p in read_prompt_file(data_path(f"sentiment_{side}.txt"))]
        for side in ("positive", "negative")
    )
