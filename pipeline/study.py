"""The study engine: cells, fingerprints, the resumable cell cache, and parallel execution as Ray tasks.

A **cell** is one training configuration (a full, validated params dict) plus the evaluation **variants** run on
the model it trains (the default evaluation, an element subset for Table 5, a similarity override, a patched model
config such as PCME's mu-only head). Cells are identified by ``cell_fingerprint``: a hash of everything that
determines the trained model (``seed``, ``train`` without the Ray settings that do not change it,
``extract.captions_per_image`` and the feature store's content digest). Cells of different grids with the same
fingerprint (DivE at K = 4 in the K sweep, the main grid and the element ablation) train once; their variants are
merged into one job.

Cache layout (``<cache>/<fingerprint[:16]>/``)::

    metrics.json     {"fingerprint", "labels", "params", "train": {...} | absent, "variants": {key: {...}}}
    model/           the exported best model (kept: new variants evaluate without retraining)
    training/        Ray storage while training (deleted once the model is exported)
    embeddings*.zarr, eval/   embedding stores and per-variant metrics files

``metrics.json`` is rewritten atomically after training and after every variant, so a killed study resumes: a
finished cell is skipped, a cell with a model only evaluates its missing variants, and an interrupted training
resumes from its last finished epoch. Jobs run in-process (``workers=0``) or as Ray tasks with one CPU each.

This module knows nothing of the grids or the stages: the function that runs one job (train -> embed -> evaluate)
is injected (``pipeline.study_grid.run_cell``), and must be importable by Ray workers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RECORD_FILE = "metrics.json"
FINGERPRINT_CHARS = 16
# Ray settings that never change what is learnt (as stages.train): excluded from the fingerprint.
_NEUTRAL_RAY_KEYS = ("address", "max_failures", "cpus_per_worker")


# ------------------------------------------------------------------------------------------------------- cells
def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class Variant:
    """One evaluation of a trained cell.

    Attributes:
        name: label in the report (``default``, ``image_only_0``, ``mu_only``, ...).
        evaluate: overrides of ``params.evaluate`` (e.g. ``{"image_elements": [0]}``).
        model: deep-merged into the exported model's ``config.json["model"]`` before embedding (e.g.
            ``{"head_kwargs": {"sample_in_eval": False}}``); empty = the model as trained.
    """

    name: str = "default"
    evaluate: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Stable id of what this variant computes (its name is only a label)."""
        return _digest({"evaluate": self.evaluate, "model": self.model})[:12]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "evaluate": self.evaluate, "model": self.model}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Variant:
        return cls(data["name"], dict(data.get("evaluate", {})), dict(data.get("model", {})))


@dataclass(frozen=True)
class Cell:
    """One row of a study table: a training configuration and its evaluation variants.

    Attributes:
        grid: the grid it belongs to (``main``, ``k``, ...).
        label: the row label (``pvse``, ``K=3``, ``chamfer x slot``).
        params: full params dict (``Params.model_dump(mode="json")``), validated by the caller.
        seed: ``params["seed"]`` (rows with the same grid and label are aggregated over seeds).
        variants: evaluations of the trained model.
        x: the swept value of a one-dimensional grid (K, T, alpha), else None.
        tags: extra row fields for the report (``{"similarity": ..., "head": ...}``).
        fingerprint: set by ``plan``.
    """

    grid: str
    label: str
    params: dict[str, Any]
    seed: int = 0
    variants: tuple[Variant, ...] = (Variant(),)
    x: Any = None
    tags: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""


def cell_fingerprint(params: dict[str, Any], features_digest: str) -> str:
    """Hash of what determines a cell's trained model (see the module docstring)."""
    train = json.loads(json.dumps(params["train"]))
    for key in _NEUTRAL_RAY_KEYS:
        train.get("ray", {}).pop(key, None)
    return _digest(
        {
            "seed": params.get("seed", 0),
            "train": train,
            "captions_per_image": params.get("extract", {}).get("captions_per_image"),
            "features": features_digest,
        }
    )


@dataclass
class CellJob:
    """What one worker runs: train (unless cached), then every missing variant. Plain data (pickled to Ray)."""

    fingerprint: str
    directory: str
    params: dict[str, Any]
    features: str
    relevance: str | None
    variants: list[Variant]
    labels: list[str]


@dataclass
class JobOutcome:
    job: CellJob
    record: dict[str, Any] | None
    cached: bool
    seconds: float
    error: str | None = None


# ------------------------------------------------------------------------------------------------------- cache
def read_record(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The cell's ``metrics.json``, or None when absent or unreadable (a torn write is treated as absent)."""
    path = Path(directory) / RECORD_FILE
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_record(directory: str | os.PathLike, record: dict[str, Any]) -> None:
    """Write ``metrics.json`` atomically (temp file + rename)."""
    path = Path(directory) / RECORD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True, default=float))
    os.replace(tmp, path)


def missing_variants(record: dict[str, Any] | None, variants: Iterable[Variant]) -> list[Variant]:
    """The variants ``record`` has no metrics for (all of them without a trained model)."""
    if record is None or "train" not in record:
        return list(variants)
    done = record.get("variants", {})
    return [v for v in variants if v.key not in done]


def plan(
    cells: Sequence[Cell],
    cache: str | os.PathLike,
    *,
    features: str | os.PathLike,
    features_digest: str,
    relevance: str | os.PathLike | None,
) -> tuple[list[Cell], list[CellJob]]:
    """Fingerprint the cells and merge those that train the same model into one job each.

    Returns:
        (cells with ``fingerprint`` set, one job per distinct fingerprint, in first-seen order).
    """
    cache = Path(cache).resolve()
    stamped: list[Cell] = []
    jobs: dict[str, CellJob] = {}
    for cell in cells:
        fp = cell_fingerprint(cell.params, features_digest)
        stamped.append(replace(cell, fingerprint=fp))
        job = jobs.get(fp)
        if job is None:
            job = jobs[fp] = CellJob(
                fingerprint=fp,
                directory=str(cache / fp[:FINGERPRINT_CHARS]),
                params=cell.params,
                features=str(Path(features).resolve()),
                relevance=None if not relevance else str(Path(relevance).resolve()),
                variants=[],
                labels=[],
            )
        job.labels.append(f"{cell.grid}:{cell.label}:seed{cell.seed}")
        for variant in cell.variants:
            if variant.key not in {v.key for v in job.variants}:
                job.variants.append(variant)
    return stamped, list(jobs.values())


# --------------------------------------------------------------------------------------------------- execution
def _run_job(runner: Callable[[CellJob], dict[str, Any]], job: CellJob) -> tuple[dict[str, Any], float]:
    start = time.perf_counter()
    record = runner(job)
    return record, time.perf_counter() - start


def execute(
    jobs: Sequence[CellJob],
    runner: Callable[[CellJob], dict[str, Any]],
    *,
    workers: int = 0,
    quiet: bool = True,
    on_done: Callable[[JobOutcome, int, int], None] | None = None,
) -> list[JobOutcome]:
    """Run the jobs that are not cached; in-process (``workers=0``) or as Ray tasks, ``workers`` at a time.

    A failing job is recorded (``JobOutcome.error``) and the others go on. Ray is started with ``workers`` CPUs
    when it is not running yet (and stopped again at the end); each task takes one CPU, so Ray runs ``workers``
    cells at once, each single-threaded.

    Args:
        jobs: from ``plan``.
        runner: runs one job and returns its record (``pipeline.study_grid.run_cell``); importable by Ray workers.
        workers: 0 = sequential in this process; N >= 1 = Ray tasks on N CPUs.
        quiet: hide the workers' logs.
        on_done: called as ``on_done(outcome, finished, total)`` after each job.

    Returns:
        One outcome per job, in the order of ``jobs``.
    """
    outcomes: dict[str, JobOutcome] = {}
    todo = []
    for job in jobs:
        record = read_record(job.directory)
        if record is not None and not missing_variants(record, job.variants):
            outcomes[job.fingerprint] = JobOutcome(job, record, cached=True, seconds=0.0)
        else:
            todo.append(job)
    total, finished = len(todo), 0

    def done(outcome: JobOutcome) -> None:
        nonlocal finished
        finished += 1
        outcomes[outcome.job.fingerprint] = outcome
        if outcome.error:
            logger.error("cell %s failed: %s", outcome.job.labels[0], outcome.error)
        if on_done is not None:
            on_done(outcome, finished, total)

    logger.info(
        "%d cells: %d cached, %d to run on %s",
        len(jobs),
        len(jobs) - total,
        total,
        f"{workers} Ray workers" if workers else "this process",
    )
    if workers == 0 or not todo:
        for job in todo:
            start = time.perf_counter()
            try:
                record, seconds = _run_job(runner, job)
                done(JobOutcome(job, record, cached=False, seconds=seconds))
            except Exception as e:  # noqa: BLE001 - one failed cell must not lose the others
                done(JobOutcome(job, read_record(job.directory), False, time.perf_counter() - start, _one_line(e)))
    else:
        _execute_on_ray(todo, runner, workers, quiet, done)
    return [outcomes[job.fingerprint] for job in jobs]


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"


def _execute_on_ray(
    todo: Sequence[CellJob],
    runner: Callable[[CellJob], dict[str, Any]],
    workers: int,
    quiet: bool,
    done: Callable[[JobOutcome], None],
) -> None:
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=not quiet, logging_level=logging.ERROR)
        started = True
    try:
        remote = ray.remote(num_cpus=1, max_retries=0)(_run_job)
        pending = {remote.remote(runner, job): (job, time.perf_counter()) for job in todo}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            job, start = pending.pop(ready[0])
            try:
                record, seconds = ray.get(ready[0])
                done(JobOutcome(job, record, cached=False, seconds=seconds))
            except Exception as e:  # noqa: BLE001 - RayTaskError wraps the worker's exception
                done(JobOutcome(job, read_record(job.directory), False, time.perf_counter() - start, _one_line(e)))
    finally:
        if started:
            ray.shutdown()


# ------------------------------------------------------------------------------------------------------ run log
RUNS_LOG = "runs.jsonl"  # in the cache: one line per invocation, then one per cell it finished, so a rerun still knows


class RunLog:
    """Appends an invocation of the study and each cell it finishes to ``<cache>/runs.jsonl``.

    Written as the run goes (not at its end), so a killed run still counts up to the last cell it finished; a line cut
    by the kill is skipped when read (``runs_that_trained``).
    """

    def __init__(self, cache: str | os.PathLike, *, start: float | None = None, **header: Any) -> None:
        """``start``: the invocation's ``time.perf_counter()`` at its beginning (default now); ``header``: what the
        log says of the invocation (command, commit, load, ...)."""
        self.path = Path(cache) / RUNS_LOG
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.id = f"{time.time_ns():x}-{os.getpid()}"
        self._start = time.perf_counter() if start is None else start
        self._append({"run": self.id, **header})

    def trained(self, fingerprint: str) -> None:
        """Record that ``fingerprint`` finished, with the seconds since the invocation started."""
        self._append({"run": self.id, "trained": fingerprint, "seconds": round(time.perf_counter() - self._start, 1)})

    def _append(self, entry: dict[str, Any]) -> None:
        with self.path.open("a+b") as f:
            f.seek(0, os.SEEK_END)
            cut = f.tell() > 0 and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n"  # a kill cut the last line
            f.write((b"\n" if cut else b"") + json.dumps(entry, sort_keys=True).encode() + b"\n")


def runs_that_trained(cache: str | os.PathLike, fingerprints: Iterable[str]) -> list[dict[str, Any]]:
    """The logged invocations that trained any of ``fingerprints``, oldest first: each its header plus ``trained``
    (fingerprints) and ``wall_seconds`` (to the last cell it finished). Unreadable lines are skipped."""
    path, wanted = Path(cache) / RUNS_LOG, set(fingerprints)
    if not path.is_file():
        return []
    runs: dict[str, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill mid-write
        if not isinstance(entry, dict) or "run" not in entry:
            continue
        if "trained" not in entry:
            runs[entry["run"]] = {**entry, "trained": [], "wall_seconds": 0.0}
        elif entry["run"] in runs:
            run = runs[entry["run"]]
            run["trained"].append(entry["trained"])
            run["wall_seconds"] = max(run["wall_seconds"], float(entry.get("seconds", 0.0)))
    return [run for run in runs.values() if wanted & set(run["trained"])]
