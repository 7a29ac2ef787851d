"""What every command shares: model options, consoles, tables, progress, loading."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from contextlib import contextmanager, nullcontext

from ..errors import InvalidParameterError

# Off a terminal (a pipe, a file, CI) nothing is ever cut: rich lays tables out at their
# natural width when the console is this wide.
UNLIMITED = 100_000
HEARTBEAT_S = 10.0  # off a terminal, a progress line at least this often


def add_model(parser: argparse.ArgumentParser) -> None:
    """``--model`` (with ``--revision`` and ``--download`` for a Hub id), ``--device`` and
    ``--dtype``: every command that loads a model has them."""
    parser.add_argument(
        "--model",
        default=None,
        help="bundled name (default smollm2-135m), model directory, .gguf file, or Hugging "
        "Face Hub id (org/name) in the local Hugging Face cache",
    )
    parser.add_argument(
        "--revision",
        default=None,
        metavar="REV",
        help="branch, tag or commit of a Hub id (default main)",
    )
    parser.add_argument(
        "--download",
        action="store_true",
        help="fetch a Hub id into the Hugging Face cache first (safetensors weights only)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        metavar="DEVICE",
        help="cpu, cuda, cuda:N, or auto (default: the first GPU if there is one, else cpu)",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        metavar="DTYPE",
        help="auto, float32, bfloat16, float16 or stored (the checkpoint's own): the weights' dtype (default auto: float32 on cpu, bfloat16 on a GPU that has it)",
    )


def add_prompt(parser: argparse.ArgumentParser, what: str) -> None:
    """The prompt as an argument, or several from ``--prompts FILE``."""
    parser.add_argument("prompt", nargs="?", default=None, help=f"{what} (or --prompts FILE)")
    parser.add_argument(
        "--prompts",
        dest="prompts_file",
        metavar="FILE",
        help="a prompt file, each prompt in turn: one per line (a literal \\n is a newline) or "
        ".jsonl with a text field; --json then prints one document per line, --csv adds "
        "prompt_id",
    )


def add_chat(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--chat",
        action="store_true",
        help="put each prompt in the model's chat template as a user message, the assistant's "
        "turn opened (instruct models: without it their continuations are often noise)",
    )


def prompts_of(args) -> list[str]:
    """The prompts a command runs: the argument, then those of ``--prompts FILE``."""
    from ..prompts import read_prompt_file

    texts = [args.prompt] if args.prompt is not None else []
    if args.prompts_file:
        texts += [p.text for p in read_prompt_file(args.prompts_file)]
    if not texts:
        raise InvalidParameterError(
            "no prompt: give one as an argument, or a file of them with --prompts FILE"
        )
    return texts


def add_eps(parser: argparse.ArgumentParser, default: list[float]) -> None:
    parser.add_argument(
        "--eps",
        type=float,
        nargs="+",
        default=default,
        metavar="E",
        help=f"KL thresholds in nats (default: {' '.join(f'{e:g}' for e in default)})",
    )


def add_run_directory(parser: argparse.ArgumentParser, kind: str) -> None:
    """``--out``, ``--resume`` and ``--overwrite`` of a command that writes a run directory."""
    parser.add_argument("--out", metavar="DIR", help=f"output directory (default ./{kind}-MODEL)")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the unfinished run in DIR")
    again.add_argument(
        "--overwrite", action="store_true", help="replace the run already in DIR (same tool only)"
    )


def add_ray(parser: argparse.ArgumentParser, doing: str) -> None:
    """``--ray [ADDRESS]``, ``--workers N``, ``--gpus-per-worker G`` (``distributed``)."""
    parser.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help=f"{doing} on a Ray cluster (pip install -e '.[ray]'): a running cluster's head "
        "address host:port, or no address to start a local one",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        metavar="N",
        help="Ray workers (default 2), one model each",
    )
    parser.add_argument(
        "--gpus-per-worker",
        type=float,
        default=0.0,
        metavar="G",
        help="GPUs per Ray worker (default 0)",
    )


def ray_options(args) -> dict:
    """The cluster and worker keywords of ``distributed.*_ray`` from ``--ray``, ``--workers``,
    ``--gpus-per-worker``, ``--device`` and ``--dtype``; the cluster is checked here, before
    any model is loaded or file written."""
    from ..studies.distributed import check_cluster

    address = None if args.ray == "local" else args.ray
    check_cluster(address, args.workers, args.gpus_per_worker)
    return dict(
        address=address,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        device=args.device,
        dtype=args.dtype,
        revision=args.revision,
        download=args.download,
    )


def add_positions(parser: argparse.ArgumentParser, default: str = "all") -> None:
    """``--positions``: 'all', 'last' or comma-separated token indices."""
    other = "last" if default == "all" else "all"
    parser.add_argument(
        "--positions",
        default=default,
        help=f"'{default}' (default), '{other}', or comma-separated token indices",
    )


def parse_positions(text: str):
    if text in ("all", "last"):
        return text
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InvalidParameterError(
            f"--positions must be 'all', 'last' or comma-separated integers, got {text!r}"
        ) from None


def parse_layer(text: str):
    """``'12'`` -> 12; ``'embed'``, ``'final'`` and hook names stay text."""
    return int(text) if text.lstrip("-").isdigit() else text


def fmt(x: float, digits: int = 4) -> str:
    if isinstance(x, float) and math.isnan(x):
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.{digits}g}"


def console(stderr: bool = False):
    """A rich console on stdout (or stderr): the terminal's width on a terminal, and no width
    limit elsewhere, so that piped or logged tables are never cut."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(stderr=stderr)
    return Console(stderr=stderr, width=UNLIMITED, soft_wrap=True)


def cell(max_width: int) -> dict:
    """Column options for text that may be long: cut with an ellipsis on a terminal only."""
    if sys.stdout.isatty():
        return dict(max_width=max_width, overflow="ellipsis", no_wrap=True)
    return dict(no_wrap=True)


def default_out(kind: str, model) -> str:
    """``KIND-MODEL`` in the working directory: one run directory per model (a loaded
    adapter, or the name or path a Ray run gives its workers)."""
    name = model if isinstance(model, str) else model.name
    return f"{kind}-{os.path.basename(name.rstrip('/'))}"


def run_directory(args, kind: str, tool: str, what: str) -> str:
    """``--out`` (default ``KIND-MODEL``), checked before the model loads: writable, and
    holding nothing, or a run of ``tool`` that ``--resume`` continues or ``--overwrite``
    replaces."""
    from .. import models
    from .._support.files import check_run_directory

    out = args.out or default_out(kind, args.model or models.DEFAULT_MODEL)
    check_run_directory(out, tool, what, resume=args.resume, overwrite=args.overwrite)
    return out


def load_with_status(args):
    """Load ``args.model`` on ``args.device`` in ``args.dtype``, logging to stderr; a spinner
    only on a terminal (logs stay clean). Returns (stderr console, adapter)."""
    from .. import models

    err = console(stderr=True)
    spec = args.model or models.DEFAULT_MODEL
    with err.status(f"loading {spec}", spinner="dots") if err.is_terminal else nullcontext():
        adapter = models.load(
            spec,
            device=args.device,
            dtype=args.dtype,
            revision=args.revision,
            download=args.download,
            log=lambda msg: err.print(msg),
        )
    return err, adapter


@contextmanager
def progress(err, label: str):
    """Yields ``(tick, stage)``: ``tick(done, total)`` moves a progress bar on a terminal (with
    the time elapsed and an estimate of the time left); elsewhere (logs, CI) it prints
    ``label: done/total (N s, ~M s left)`` at most every ``HEARTBEAT_S`` and at the end.
    ``stage(name)`` names what the work is doing now (in the bar, or as a line off a
    terminal). Off a terminal a line also comes every ``HEARTBEAT_S`` while nothing else
    did, so a long stage of one block still shows life."""
    import threading

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    started = time.monotonic()
    state = {"said": started, "stage": "", "done": 0, "total": 0}
    lock = threading.Lock()

    def say(text: str) -> None:
        with lock:
            state["said"] = time.monotonic()
            err.print(text)

    def status(now: float) -> str:
        done, total = state["done"], state["total"]
        elapsed = now - started
        counted = f"{done}/{total}, " if total else ""
        left = ""
        if 0 < done < total:
            left = f", ~{elapsed / done * (total - done):.0f} s left"
        where = f" ({state['stage']})" if state["stage"] else ""
        return f"{label}{where}: {counted}{elapsed:.0f} s{left}"

    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(min(1.0, HEARTBEAT_S / 2)):
            now = time.monotonic()
            if now - state["said"] >= HEARTBEAT_S:
                say(status(now))

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    ) as bar:
        task = bar.add_task(label, total=None)

        def tick(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)
            state["done"], state["total"] = done, total
            now = time.monotonic()
            if not err.is_terminal and (now - state["said"] >= HEARTBEAT_S or done == total):
                say(status(now))

        def stage(name: str) -> None:
            bar.update(task, description=f"{label} ({name})")
            state["stage"] = name
            if not err.is_terminal:
                say(status(time.monotonic()))

        beat = None
        if not err.is_terminal:
            beat = threading.Thread(target=heartbeat, name="stable-regions-progress", daemon=True)
            beat.start()
        try:
            yield tick, stage
        finally:
            stop.set()
            if beat is not None:
                beat.join()


def each_prompt(err, prompts: list[str], label: str, study) -> list:
    """``study(prompt, tick, stage)`` for each prompt in turn, each with its progress."""
    results = []
    for i, prompt in enumerate(prompts):
        name = label + (f" (prompt {i + 1}/{len(prompts)})" if len(prompts) > 1 else "")
        with progress(err, name) as (tick, stage):
            results.append(study(prompt, tick, stage))
    return results


RIGHT = dict(justify="right", no_wrap=True)


def titled_table(title: str, columns: list[tuple[str, dict]]):
    """A rich table in the commands' style: title on the left, a simple head, and
    ``columns`` as (header, keyword arguments of ``add_column``)."""
    from rich import box
    from rich.table import Table

    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for header, kw in columns:
        table.add_column(header, **kw)
    return table
