"""The train stage: options -> `pipeline.training.run_train` (Ray Train run, resume rule, model export, dvclive)."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.cli import call, start_stage
from pipeline.training import apply_overrides, run_train

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    params_path: Path = typer.Option(Path("params.yaml"), "--params", help="params.yaml to read"),
    features: str = typer.Option(
        "artifacts/features.zarr", "--features", help="feature store (paths.features): a path or an fsspec URL"
    ),
    storage: str = typer.Option(
        "artifacts/training", "--storage", help="Ray training storage, kept across runs (paths.training): path or URL"
    ),
    out: Path = typer.Option(Path("artifacts/model"), "--out", help="exported best model directory (paths.model)"),
    live: Path = typer.Option(Path("dvclive"), "--live", help="dvclive directory (paths.dvclive)"),
    resume: bool | None = typer.Option(
        None,
        "--resume/--no-resume",
        help="continue / restart the run of this config; default: resume when it has a finished epoch",
        show_default=False,
    ),
    address: str | None = typer.Option(
        None, "--address", help="Ray cluster address (default: train.ray.address, then RAY_ADDRESS, else local Ray)"
    ),
    workers: int | None = typer.Option(
        None, "--workers", min=0, help="override train.ray.num_workers (0 = in-process)"
    ),
    epochs: int | None = typer.Option(None, "--epochs", min=1, help="override train.optim.epochs"),
    limit: int | None = typer.Option(
        None, "--limit", min=1, help="stop each epoch after N batches (train.limit_batches), for smoke runs"
    ),
    quiet: bool = typer.Option(False, "--quiet", help="warnings only, no progress bar"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks and Ray's worker logs"),
) -> None:
    """Train the set-embedding model on the feature store with Ray Train and export the best model."""
    params = start_stage("train", params_path, quiet=quiet, debug=debug)
    params = call(apply_overrides, params, workers=workers, epochs=epochs, limit=limit, debug=debug)
    summary = call(
        run_train,
        params,
        features=features,
        storage=storage,
        out=out,
        live=live,
        resume=resume,
        address=address,
        quiet=quiet,
        verbose=debug,
        debug=debug,
    )
    rsum = summary["best_val_rsum"]
    typer.echo(
        f"trained {summary['epochs']} epochs ({summary['run_name']}{', resumed' if summary['resumed'] else ''}); "
        f"best epoch {summary['best_epoch']}, best val RSUM "
        f"{'n/a (no val split)' if rsum is None else f'{rsum:.2f}'}; model at {summary['model']}"
    )


if __name__ == "__main__":
    app()
