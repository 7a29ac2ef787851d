"""Files written whole or not at all: a reader (or a resumed run) never sees half a file."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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


def write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text atomically."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, obj) -> Path:
    """Write ``obj`` as indented UTF-8 JSON with a final newline, atomically."""
    return write_text(path, json.dumps(obj, ensure_ascii=False, indent=1) + "\n")
