"""Reproduce the paper's comparisons and ablations on the embedded benchmark; write docs/results.md.

``python -m stages.study --grid main|similarity_x_head|k|t|alpha|elements|all|plateau [--quick] [--seeds N]``

Every grid starts from params.yaml (the embedded default) with the study settings applied (local-mode training,
``epochs``, test-split embedding without attention maps) and reuses ONE feature store (``paths.features``, extracted
first when absent). Each cell trains with ``run_training`` in local mode (one thread), then embeds the test split and
evaluates every variant; cells run in parallel as Ray tasks (one CPU each, ``--workers`` at a time, default one per
core). Results are cached per cell in ``artifacts/study/<fingerprint>/metrics.json`` (``pipeline.study``), so a rerun
skips finished cells and a killed study resumes. This module is the command only: the grids and the cell runner are
``pipeline.study_grid``, the report ``pipeline.study_report``, the driver ``pipeline.study_run.run_study``.

Grids (every one over ``--seeds`` seeds, 0..N-1; a cell's seed fixes its initialisation and batch order, so the
verdict pairs cells by seed and reads each claim from the 95% t interval of the per-seed differences):
    main               dive, pvse, pcme, maxmatch, vsepp, pcmepp (profiles/*.yaml); PCME also evaluated by the mean
                       cosine over its samples and with mu only
    similarity_x_head  Table 3: the six (similarity, head) cells the paper reports (``StudySettings.pairs``; None =
                       the full {smooth_chamfer, chamfer, max_similarity, match_probability} x {slot, pienet,
                       transformer}), the DivE loss and K = 4 otherwise
    k, t, alpha        Table 4: K in 1..6, T in 1..6, alpha in {1, 2, 4, 8, 16, 32, 64}
    elements           Table 5: the main DivE model of each seed evaluated with one element at a time and all-but-one,
                       image side and text side
    smoke              two cells (dive, vsepp), one seed, for tests and smoke runs
    plateau            not part of ``all``: DivE and VSE++ for ``plateau_epochs`` (12; ``--epochs`` sets it) over the
                       seeds, recording the validation RSUM after every epoch; writes docs/plateau.md (curve PNG +
                       table, plateau epoch by ``pipeline.study_plateau.plateau_epoch``) and docs/plateau.json, which
                       the full study's report quotes next to the epochs it trained with

Budget (``DEFAULT``): 81 distinct cells (27 per seed x 3 seeds; DivE of each seed is shared by main, Table 3, K=4,
T=4, alpha=16 and Table 5), each trained for ``StudySettings.epochs`` epochs of ``images_per_batch`` images (the demo's
2,000 train images), within the 90-minute budget on the 2-core box with 2 workers. ``benchmarks/bench_study_step.py``
estimates the wall time from one-thread CPU seconds per training step of each cost class; docs/results.md reports the
measured one and computes whether the cells reach the plateau of ``--grid plateau``'s longer curve (docs/plateau.md);
docs/DESIGN.md "Study verdicts" has the numbers behind the batch size and the epochs.
``--quick`` (``QUICK``): 2 epochs of at most 4 batches, 2 seeds, K in {1,2,4}, T in {1,4}, alpha in {1,16,64}: 32
distinct cells, a few minutes; it checks the machinery, not the paper.
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
    readme: Path | None = typer.Option(
        Path("README.md"), "--readme", help="file whose study-summary block a full study (--grid all) rewrites"
    ),
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
        readme=readme,
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
