"""Corpus scans and validation studies on a Ray cluster (``pip install -e ".[ray]"``): the
same results and output layout as ``scan.scan_corpus`` and ``validation.validate``, the
documents (prompts) spread over worker actors.

- Each worker is a Ray actor that loads the model once (from a bundled name or a path every
  node can read: models on shared storage) and measures the documents it is given with the
  local run's own code (``scan.scan_document``, ``validation.measure_prompt``).
- Documents are sharded deterministically: the i-th unfinished document goes to worker
  ``i mod workers``. Each worker returns one document's rows (per-token scalars, never
  activations) to the driver, which writes it as that document's part of the run directory
  as soon as it arrives. ``resume`` therefore skips every finished document, of a local
  run as well (the run records are the same). Nothing in a validation row depends on which
  worker measured it: random directions are seeded by the prompt and position.
- A worker that dies is restarted (the model loaded again) and its unfinished calls are
  retried (``max_restarts``, ``max_task_retries``); the driver writes each part once, when
  its call completes, so nothing is lost or written twice.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from .._support.files import RunDirectory
from ..errors import InvalidParameterError, StableRegionsError, one_line
from ..models import load
from ..prompts import Prompt
from .scan import CorpusScan, Scanner, ScanPlan, ScanSettings, finish_scan, scan_document
from .validation import (
    ValidationPlan,
    ValidationRun,
    finish_validation,
    measure_prompt,
    study_prompts,
    study_settings,
)

RESTARTS = 3  # times a worker that died is started again (and its calls retried)


def check_cluster(address: str | None, workers: int, gpus_per_worker: float) -> None:
    """Connect to (or start) the cluster and check it can hold the workers; one-line errors."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InvalidParameterError(f"`workers` must be a whole number >= 1, got {workers!r}")
    if gpus_per_worker < 0:
        raise InvalidParameterError(f"`gpus_per_worker` must be >= 0, got {gpus_per_worker}")
    try:
        import ray
    except ImportError:
        raise StableRegionsError(
            'Ray is not installed: pip install -e ".[ray]" (or pip install "ray>=2.60")'
        ) from None
    if address not in (None, "", "local", "auto") and not _reachable(address):
        # ray.init retries an unreachable address for many minutes: refuse it at once
        raise StableRegionsError(
            f"cannot reach a Ray cluster at {address!r}: nothing answers there (start one with "
            "`ray start --head`, or give no address for a local one)"
        )
    if not ray.is_initialized():
        try:
            if address in (None, "", "local"):
                ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
            else:
                ray.init(
                    address=address,
                    include_dashboard=False,
                    log_to_driver=False,
                    logging_level="ERROR",
                )
        except Exception as exc:
            raise StableRegionsError(
                f"cannot reach a Ray cluster at {address!r}: {one_line(exc)} (start one with "
                "`ray start --head`, or give no address for a local one)"
            ) from None
    gpus = float(ray.cluster_resources().get("GPU", 0.0))
    if gpus_per_worker > gpus:
        raise StableRegionsError(
            f"`gpus_per_worker={gpus_per_worker:g}` but the cluster has {gpus:g} GPUs: "
            "ask for at most that many"
        )


def _reachable(address: str, timeout: float = 5.0) -> bool:
    """Whether something accepts a TCP connection at ``[ray://]host:port``."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise StableRegionsError(
            f"the Ray address {address!r} is not host:port (e.g. 10.0.0.5:6379): give the "
            "head node's address, or none for a local cluster"
        )
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def scan_corpus_ray(
    model: str,
    documents: Sequence[Prompt | str],
    *,
    out,
    eps: Sequence[float] = (0.1,),
    window: int | None = None,
    overlap: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    address: str | None = None,
    workers: int = 2,
    gpus_per_worker: float = 0.0,
    device: str = "auto",
    dtype: str = "auto",
    revision: str | None = None,
    download: bool = False,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> CorpusScan:
    """``scan.scan_corpus`` on a Ray cluster (module doc). ``model``: a bundled name, a
    model path every node can read or a Hub id in every node's Hugging Face cache; ``address``: a running cluster's (None or ``"local"``:
    start one here). The driver loads the model too (for the tokenizer and the run record)."""
    _check_spec(model, "scan")
    check_cluster(address, workers, gpus_per_worker)
    # the tokenizer, a few head rows for the run record: the checkpoint as stored, memory-
    # mapped, not the whole model converted to float32 (32 GB at 8B)
    adapter = load(
        model, device="cpu", dtype="stored", revision=revision, download=download, log=log
    )
    plan = ScanPlan.make(adapter, documents, eps, window, overlap)
    Scanner(adapter)  # a model the fast scan cannot take fails here, before any file
    run = RunDirectory(out, plan.record, "scan", resume=resume, overwrite=overwrite)
    _run_shards(
        _ScanWorker,
        (model, plan.settings),
        {i: (doc.id, doc.text) for i, doc in enumerate(plan.documents)},
        run,
        units=[len(ids) for ids in plan.token_ids],  # progress in tokens
        progress=progress,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        options=_worker_options(device, dtype, gpus_per_worker, revision),
    )
    return finish_scan(adapter, run, plan)


def validate_ray(
    model: str,
    prompts: Sequence[Prompt | str] | None = None,
    *,
    out,
    eps: Sequence[float] = (0.01, 0.1, 1.0),
    layers: Sequence[str | int] | None = None,
    families: Sequence[str] | None = None,
    calibration="fit",
    resume: bool = False,
    overwrite: bool = False,
    positions_per_prompt: int = 3,
    seed: int = 0,
    address: str | None = None,
    workers: int = 2,
    gpus_per_worker: float = 0.0,
    device: str = "auto",
    dtype: str = "auto",
    revision: str | None = None,
    download: bool = False,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> ValidationRun:
    """``validation.validate`` on a Ray cluster (module doc): each worker measures whole
    prompts, every layer; the driver writes their parts and fits the calibrations at the end,
    on the same rows a local run would have (the model is loaded there too, on the CPU)."""
    _check_spec(model, "validation")
    settings = study_settings(eps, layers, families, positions_per_prompt, seed)
    prompts = study_prompts(prompts)
    check_cluster(address, workers, gpus_per_worker)
    # the tokenizer, a few head rows for the run record: the checkpoint as stored, memory-
    # mapped, not the whole model converted to float32 (32 GB at 8B)
    adapter = load(
        model, device="cpu", dtype="stored", revision=revision, download=download, log=log
    )
    plan = ValidationPlan.make(adapter, settings, prompts, calibration)
    plan.studies(adapter)  # an undefined steering family fails here, before any file
    run = RunDirectory(out, plan.record, "validation run", resume=resume, overwrite=overwrite)
    _run_shards(
        _ValidateWorker,
        (model, plan),
        {i: (prompt, plan.partner(i)) for i, prompt in enumerate(plan.prompts)},
        run,
        units=[1] * len(plan.prompts),  # progress in prompts
        progress=progress,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        options=_worker_options(device, dtype, gpus_per_worker, revision),
    )
    return finish_validation(adapter, run, plan)


def _check_spec(model, what: str) -> None:
    if not isinstance(model, str):
        raise StableRegionsError(
            f"a Ray {what} needs the model as a bundled name or a path the workers can load, "
            f"not a {type(model).__name__}"
        )


def _worker_options(device: str, dtype: str, gpus_per_worker: float, revision) -> dict:
    """How each worker loads the model: on ``cuda`` when it holds a GPU; a Hub id at the
    driver's revision, from the worker's own Hugging Face cache (the driver downloads)."""
    return dict(device=device if gpus_per_worker == 0 else "cuda", dtype=dtype, revision=revision)


def _run_shards(
    worker: type,
    setup: tuple,
    calls: dict[int, tuple],
    run: RunDirectory,
    *,
    units: list[int],
    progress: Callable[[int, int], None] | None,
    workers: int,
    gpus_per_worker: float,
    options: dict,
) -> None:
    """Part ``i`` of ``run`` = ``worker(*setup, options).measure(*calls[i])`` for every part
    not yet done, on a pool of actors: the k-th pending part to actor ``k mod n``, each part
    written as soon as it returns, the actors killed at the end. ``progress(done, total)``
    counts ``units[i]`` per part."""
    import ray

    pending = [i for i in sorted(calls) if not run.done(i)]
    total = sum(units)
    done = total - sum(units[i] for i in pending)
    if progress is not None:
        progress(done, total)
    if not pending:
        return
    actor = ray.remote(
        num_cpus=1, num_gpus=gpus_per_worker, max_restarts=RESTARTS, max_task_retries=RESTARTS
    )(worker)
    pool = [actor.remote(*setup, options) for _ in range(min(workers, len(pending)))]
    refs = {pool[k % len(pool)].measure.remote(*calls[i]): i for k, i in enumerate(pending)}
    try:
        waiting = list(refs)
        while waiting:
            finished, waiting = ray.wait(waiting, num_returns=1)
            i = refs[finished[0]]
            run.write_part(i, ray.get(finished[0]))
            done += units[i]
            if progress is not None:
                progress(done, total)
    finally:
        for member in pool:
            ray.kill(member)


def _load_quietly(model: str, options: dict):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return load(model, log=lambda _: None, **options)


class _ScanWorker:
    """A Ray actor: the model loaded once, then one document per call."""

    def __init__(self, model: str, settings: ScanSettings, options: dict) -> None:
        self.adapter = _load_quietly(model, options)
        self.scanner = Scanner(self.adapter)
        self.settings = settings

    def measure(self, doc_id: str, text: str):
        ids = self.adapter.tokenize(text, any_length=True)[0]
        return scan_document(self.adapter, self.scanner, doc_id, ids, self.settings)


class _ValidateWorker:
    """A Ray actor: the model and the studies of every layer built once, then one prompt per
    call."""

    def __init__(self, model: str, plan: ValidationPlan, options: dict) -> None:
        self.studies = plan.studies(_load_quietly(model, options))

    def measure(self, prompt: Prompt, partner: Prompt | None):
        return measure_prompt(self.studies, prompt, partner)
