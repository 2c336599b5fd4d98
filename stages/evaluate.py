"""The evaluate stage: options -> `pipeline.evaluation.run_evaluate`, then the metrics table (`--show`: an old one)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from pipeline.cli import call, start_stage
from pipeline.evaluation import PLOTS_FILE, metrics_table, run_evaluate

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    params_path: Path = typer.Option(Path("params.yaml"), "--params", help="params.yaml to read"),
    embeddings: Path = typer.Option(
        Path("artifacts/embeddings.zarr"), "--embeddings", help="embedding store (paths.embeddings)"
    ),
    model: Path | None = typer.Option(
        None, "--model", help="exported model directory whose config.json gives the trained similarity (paths.model)"
    ),
    relevance: str = typer.Option(
        "", "--relevance", help='exhaustive relevance file (paths.relevance); "" skips R-Precision / mAP@R'
    ),
    metrics: Path = typer.Option(Path("metrics.json"), "--metrics", help="metrics file to write (paths.metrics)"),
    plots: Path = typer.Option(Path("plots"), "--plots", help="folder of recall_at_k.json (paths.plots)"),
    show: bool = typer.Option(False, "--show", help="only print the table of an existing --metrics file"),
    quiet: bool = typer.Option(False, "--quiet", help="warnings only"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Score the embeddings and write retrieval metrics (recall@K, R-Precision, mAP@R, circular variance)."""
    from rich.console import Console

    if show:
        if not metrics.is_file():
            typer.echo(f"error: no metrics at {metrics}; run `dvc repro evaluate`", err=True)
            raise typer.Exit(1)
        Console(file=sys.stdout, width=100).print(metrics_table(json.loads(metrics.read_text())))
        return
    params = start_stage("evaluate", params_path, quiet=quiet, debug=debug)
    results = call(
        run_evaluate,
        params,
        embeddings=embeddings,
        model=model,
        relevance=relevance or None,
        metrics=metrics,
        plots=plots,
        debug=debug,
    )
    Console(file=sys.stdout, width=100).print(metrics_table(results))
    typer.echo(f"metrics at {metrics}, recall curve at {plots / PLOTS_FILE}")


if __name__ == "__main__":
    app()
