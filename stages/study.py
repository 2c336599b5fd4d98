"""Reproduce the paper's comparisons and ablations on the embedded benchmark; write docs/results.md.

``python -m stages.study --grid main|similarity_x_head|k|t|alpha|elements|all [--quick] [--seeds N] [--workers N]``

Every grid starts from params.yaml (the embedded default) with the study settings applied (local-mode training,
``epochs``, test-split embedding without attention maps) and reuses ONE feature store (``paths.features``, extracted
first when absent). Each cell trains with ``run_training`` in local mode (one thread), then embeds the test split and
evaluates every variant; cells run in parallel as Ray tasks (one CPU each, ``--workers`` at a time, default one per
core). Results are cached per cell in ``artifacts/study/<fingerprint>/metrics.json`` (``pipeline.study``), so a rerun
skips finished cells and a killed study resumes. This module is the command only: the grids and the cell runner are
``pipeline.study_grid``, the report ``pipeline.study_report``, the driver ``pipeline.study_run.run_study``.

Grids:
    main               dive, pvse, pcme, maxmatch, vsepp (profiles/*.yaml) over ``--seeds`` seeds; PCME also evaluated
                       by the mean cosine over its samples and with mu only
    similarity_x_head  Table 3: {smooth_chamfer, chamfer, max_similarity, match_probability} x {slot, pienet,
                       transformer}, the DivE loss and K = 4 otherwise
    k, t, alpha        Table 4: K in 1..6, T in 1..6, alpha in {1, 2, 4, 8, 16, 32, 64}
    elements           Table 5: the main DivE model (seed 0) evaluated with one element at a time and all-but-one,
                       image side and text side
    smoke              two cells (dive, vsepp), for tests and smoke runs

Budget (the default sizes, ``DEFAULT``): 37 distinct cells (``main`` with 2 seeds) of 5 epochs x 16 batches (the
demo's 2,000 train images). Measured in the quick run on the 2-core box, one thread per cell: 1.5 s per batch on
average over the default cells' kinds (DivE's SPM 1.6-2.8 s, MaxMatch ~3 s, PIE-Net ~1 s, VSE++ 0.3 s) and ~6 s
per-cell overhead, so ~38 min with 2 workers on an idle box, within the 60-minute budget; another job on the 2 cores
stretches it 1.5-2.5x. docs/results.md re-estimates it from the batch times measured in the run and records the load
at its start. ``--seeds 3`` adds 5 cells (~6 min).
``--quick`` (``QUICK``): 2 epochs of at most 4 batches, 2 seeds, the 6 Table-3 cells the paper reports, K in {1,2,4},
T in {1,4}, alpha in {1,16,64}: 20 distinct cells, a few minutes; it checks the machinery, not the paper.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import typer

from pipeline.cli import call, set_offline_env, setup_logging
from pipeline.params import load_params
from pipeline.profiles import PROFILES_DIR
from pipeline.study_grid import DEFAULT, GRIDS, QUICK
from pipeline.study_run import run_study

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    grid: str = typer.Option(
        "all", "--grid", help="main | similarity_x_head | k | t | alpha | elements | all | smoke | plateau"
    ),
    quick: bool = typer.Option(False, "--quick", help="2 epochs of 4 batches, reduced grids: a few minutes in all"),
    seeds: int | None = typer.Option(
        None, "--seeds", min=1, help=f"seeds per cell, every grid (default {DEFAULT.seeds})"
    ),
    epochs: int | None = typer.Option(
        None, "--epochs", min=1, help="override the epochs per cell (--grid plateau: the curve's length)"
    ),
    workers: int | None = typer.Option(
        None, "--workers", min=0, help="cells in parallel as Ray tasks (default: one per core; 0 = in-process)"
    ),
    out: Path | None = typer.Option(
        None, "--out", help="report to write, plots in <out stem>/ (default docs/results.md; plateau: docs/plateau.md)"
    ),
    cache: Path = typer.Option(Path("artifacts/study"), "--cache", help="per-cell cache: <cache>/<fingerprint>/"),
    params_path: Path = typer.Option(Path("params.yaml"), "--params", help="params.yaml: the study's base"),
    features: Path | None = typer.Option(None, "--features", help="feature store (default paths.features)"),
    profiles_dir: Path = typer.Option(PROFILES_DIR, "--profiles-dir", help="folder of the system profiles"),
    quiet: bool = typer.Option(False, "--quiet", help="warnings only"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Run the paper's comparisons and ablations on the embedded benchmark and write docs/results.md."""
    set_offline_env()
    setup_logging(quiet)
    params = call(load_params, params_path, debug=debug)
    settings = QUICK if quick else DEFAULT
    if seeds is not None:
        settings = replace(settings, seeds=seeds)
    if epochs is not None and grid == "plateau":
        settings = replace(settings, plateau_epochs=epochs)
    elif epochs is not None:
        settings = replace(settings, epochs=epochs, epochs_source="set with --epochs")
    out = out or Path("docs/plateau.md" if grid == "plateau" else "docs/results.md")
    grids = list(GRIDS) if grid == "all" else [grid]
    workers = os.cpu_count() or 1 if workers is None else workers
    command = "python -m stages.study --grid " + grid + (" --quick" if quick else "")
    command += "".join(f" --{k} {v}" for k, v in (("seeds", seeds), ("epochs", epochs)) if v is not None)
    summary = call(
        run_study,
        params,
        grids=grids,
        settings=settings,
        quick=quick,
        workers=workers,
        cache=cache,
        out=out,
        features=features,
        profiles_dir=profiles_dir,
        command=command,
        quiet=quiet,
        debug=debug,
    )
    typer.echo(
        f"{summary['cells']} cells: {summary['ran']} ran, {summary['cached']} cached, {len(summary['failed'])} failed; "
        f"report at {summary['out']}"
    )
    if summary["failed"]:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
