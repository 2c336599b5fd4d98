"""The study driver: build the grids, extract the features once, run the missing cells, write docs/results.md.

``run_study`` is the one call of ``stages/study.py``; the grids and the cell runner are ``pipeline.study_grid``, the
engine (plan, cache, execution on Ray tasks) ``pipeline.study`` and the report ``pipeline.study_report``.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.cli import git_sha
from pipeline.params import Params
from pipeline.profiles import PROFILES_DIR
from pipeline.study import JobOutcome, RunLog, execute, plan, runs_that_trained
from pipeline.study_grid import (
    GRIDS,
    StudySettings,
    build_grid,
    ensure_features,
    estimate_default_study,
    run_cell,
    study_base,
)
from pipeline.study_plateau import PLATEAU_SUMMARY, check_cells, main_dive_best_val, read_summary
from pipeline.study_readme import summary_block, update_readme
from pipeline.study_report import render_report

logger = logging.getLogger("setemb.stage.study")


def run_study(
    params: Params,
    *,
    grids: list[str],
    settings: StudySettings,
    quick: bool = False,
    workers: int = 0,
    cache: Path = Path("artifacts/study"),
    out: Path = Path("docs/results.md"),
    features: Path | None = None,
    profiles_dir: Path = PROFILES_DIR,
    command: str = "python -m stages.study",
    quiet: bool = True,
    readme: Path | None = None,
) -> dict[str, Any]:
    """Build the grids, run the missing cells, write the report ``out`` (with its plots beside it).

    Every invocation, and each cell it finishes, is logged in ``<cache>/runs.jsonl`` (``pipeline.study.RunLog``), so a
    report regenerated from the cache, or a study resumed after a kill, still states how long its cells took.
    ``readme``: a full study (every grid of ``GRIDS``, not ``quick``) rewrites that file's summary block
    (``pipeline.study_readme``); other runs leave it alone.

    Returns:
        ``{"cells": distinct cells, "ran": run now, "cached": read from the cache, "failed": [labels], "out": out}``.

    Raises:
        ParamsError: unknown grid or an invalid cell.
    """
    from pipeline.training import features_fingerprint

    start, load = time.perf_counter(), os.getloadavg()[0]
    started = datetime.now(UTC).isoformat(timespec="seconds")
    sha = git_sha()  # the code that trains, read before the run: a commit made while it runs is not it
    base = study_base(params, settings)
    cells = [c for g in grids for c in build_grid(g, base, settings, profiles_dir)]  # validate before any work
    features = ensure_features(params, Path(features or params.paths.features))
    digest = features_fingerprint(features)
    relevance = params.paths.relevance or None
    cells, jobs = plan(cells, cache, features=features, features_digest=digest, relevance=relevance)

    log = RunLog(cache, start=start, started=started, command=command, sha=sha, load=round(load, 2), workers=workers,
                 grids=grids)  # fmt: skip

    def progress(outcome: JobOutcome, finished: int, total: int) -> None:
        state = "FAILED " + outcome.error if outcome.error else f"{outcome.seconds:.0f} s"
        logger.warning("[%d/%d] %s: %s", finished, total, ", ".join(outcome.job.labels), state)
        if outcome.error is None:
            log.trained(outcome.job.fingerprint)

    outcomes = execute(jobs, run_cell, workers=workers, quiet=quiet, on_done=progress)
    runs = runs_that_trained(cache, [job.fingerprint for job in jobs])
    estimate = estimate_default_study(outcomes, params, features, digest, max(workers, 1), profiles_dir)
    records = {o.job.fingerprint: o.record for o in outcomes}
    curve_summary = read_summary(out.parent / PLATEAU_SUMMARY)  # the curve the cells are checked against
    plateau = check_cells(curve_summary, main_dive_best_val(cells, records))
    text = render_report(
        cells,
        outcomes,
        out=out,
        grids=grids,
        settings=settings,
        quick=quick,
        workers=workers,
        wall_seconds=time.perf_counter() - start,
        base=base,
        estimate=estimate,
        command=command,
        load=load,
        runs=runs,
        curve_summary=curve_summary,
        plateau=plateau,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    if readme is not None and set(GRIDS) <= set(grids) and not quick:
        block = summary_block(
            cells, records, runs, epochs=settings.epochs, seeds=settings.seeds, report=str(out), plateau=plateau
        )
        try:
            update_readme(readme, block)
            logger.info("README summary rewritten in %s", readme)
        except (OSError, ValueError) as e:  # the report is written; a README elsewhere must not fail the study
            logger.warning("README summary not written: %s", e)
    failed = [o.job.labels[0] for o in outcomes if o.error]
    return {
        "cells": len(jobs),
        "ran": sum(not o.cached for o in outcomes) - len(failed),
        "cached": sum(o.cached for o in outcomes),
        "failed": failed,
        "out": str(out),
    }
