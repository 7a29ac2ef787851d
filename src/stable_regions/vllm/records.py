"""Where the vLLM processor's records go: JSON lines under a directory, and back.

The processor runs in vLLM's engine process, so its records leave it through files: one
``records-<pid>.jsonl`` per engine process under the run's directory, one line per generated
token and eps, written and flushed as each token's sampled id becomes known (JSON with
``NaN`` and ``Infinity`` for radii that are not finite, as Python's ``json`` writes them). ``read`` gathers
every file of a directory into one frame. Nothing here imports vLLM.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import pandas as pd

from ..errors import StableRegionsError, StableRegionsWarning
from ..vocabulary import describe
from .live import LiveCounts

DEFAULT_DIR = "stable-regions-vllm"  # under the engine's working directory
DIR_VARIABLE = "STABLE_REGIONS_VLLM_DIR"  # the engine's default directory, if set


def default_dir() -> Path:
    """``$STABLE_REGIONS_VLLM_DIR``, else ``./stable-regions-vllm``."""
    return Path(os.environ.get(DIR_VARIABLE) or DEFAULT_DIR)


class Sink:
    """Appends records to ``<dir>/records-<pid>.jsonl``, one file per directory, opened on the
    first record. A directory that cannot be written is reported once (a warning) and its
    records are dropped: the engine keeps serving."""

    def __init__(self) -> None:
        self._files: dict[Path, object] = {}
        self._failed: set[Path] = set()
        self._live: dict[Path, LiveCounts] = {}

    def write(self, directory: Path, records: list[dict]) -> None:
        if not records or directory in self._failed:
            return
        try:
            handle = self._files.get(directory)
            if handle is None:
                directory.mkdir(parents=True, exist_ok=True)
                handle = open(directory / f"records-{os.getpid()}.jsonl", "a", encoding="utf-8")  # noqa: SIM115
                self._files[directory] = handle
            handle.write("".join(json.dumps(r, allow_nan=True) + "\n" for r in records))
            handle.flush()
            live = self._live.setdefault(directory, LiveCounts(directory))
            live.add(records)
            live.write()
        except OSError as exc:
            self._failed.add(directory)
            warnings.warn(
                f"stable-regions: cannot write records under {directory} ({exc.strerror or exc}); "
                "generation goes on without them: give a writable directory",
                StableRegionsWarning,
                stacklevel=2,
            )

    def tick(self, force: bool = False) -> None:
        """The live files whose counts changed since they were last written (``live``)."""
        for directory, live in self._live.items():
            if directory not in self._failed:
                try:
                    live.write(force)
                except OSError:
                    self._failed.add(directory)

    def close(self) -> None:
        self.tick(force=True)
        for handle in self._files.values():
            handle.close()
        self._files.clear()


def read(directory: str | Path, *, tokenizer=None, settle_s: float = 0.3) -> pd.DataFrame:
    """Every record under ``directory`` (written by ``StabilityProcessor``) as one frame: one
    row per generated token and eps, ordered by request, step and eps.

    Parameters
    ----------
    directory : path
        The records' directory.
    tokenizer : tokenizer, optional
        The served model's tokenizer (anything with ``decode``): adds ``chosen_token``,
        ``next_token`` and ``top_tokens``, each id decoded alone as the Hugging Face monitor
        does.
    settle_s : float, default 0.3
        Wait until no file has changed for this long (at most ten times as long) before
        reading: a request's last token is written by the engine's background flush a moment
        after ``generate`` returns. 0 reads at once.

    Examples
    --------
    >>> frame = sr.vllm.read("stable-regions-vllm", tokenizer=llm.get_tokenizer())  # doctest: +SKIP
    >>> frame.groupby("request")["radius_curve"].min()  # doctest: +SKIP
    """
    path = Path(directory)
    if not path.is_dir():
        raise StableRegionsError(
            f"{path} is not a directory of records: give the directory the engine wrote "
            f"(default ./{DEFAULT_DIR}, or ${DIR_VARIABLE})"
        )
    _settle(path, settle_s)
    rows = []
    for file in sorted(path.glob("records-*.jsonl")):
        with open(file, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:  # a line cut short by a killed engine
                        continue
    frame = pd.DataFrame(rows)
    if frame.empty:
        return describe(frame)
    frame = frame.sort_values(["request", "step", "eps"], kind="stable").reset_index(drop=True)
    if tokenizer is not None:
        strings: dict[int, str] = {}

        def text(i: int) -> str:
            if i < 0:  # no token was sampled
                return ""
            if i not in strings:
                strings[i] = tokenizer.decode([i])
            return strings[i]

        for ids, name in (("chosen_token_id", "chosen_token"), ("next_token_id", "next_token")):
            frame.insert(frame.columns.get_loc(ids), name, [text(int(i)) for i in frame[ids]])
        frame.insert(
            frame.columns.get_loc("top_token_ids"),
            "top_tokens",
            [[text(int(i)) for i in ids] for ids in frame.top_token_ids],
        )
    return describe(frame)


def _settle(path: Path, settle_s: float) -> None:
    """Until the newest records file is ``settle_s`` old, or ``10 * settle_s`` have passed."""
    if settle_s <= 0:
        return
    deadline = time.monotonic() + 10 * settle_s
    while time.monotonic() < deadline:
        stamps = [f.stat().st_mtime for f in path.glob("records-*.jsonl")]
        quiet = time.time() - max(stamps, default=0.0)
        if quiet >= settle_s:
            return
        time.sleep(max(0.0, min(settle_s - quiet, deadline - time.monotonic())) + 1e-3)
