"""The report stage: options -> `pipeline.reporting.run_report` (attention figures and the HTML retrieval gallery)."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.cli import call, start_stage
from pipeline.reporting import run_report

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    params_path: Path = typer.Option(Path("params.yaml"), "--params", help="params.yaml to read"),
    embeddings: Path = typer.Option(
        Path("artifacts/embeddings.zarr"), "--embeddings", help="embedding store (paths.embeddings)"
    ),
    features: Path | None = typer.Option(
        None, "--features", help="feature store (paths.features): conv grid of the attention maps; omit: no figures"
    ),
    dataset_json: Path = typer.Option(
        Path("data/shapes/dataset.json"), "--dataset-json", help="Karpathy JSON (paths.dataset_json)"
    ),
    image_root: Path = typer.Option(Path("data/shapes/images"), "--image-root", help="image folder (paths.image_root)"),
    relevance: str = typer.Option(
        "", "--relevance", help='exhaustive relevance file (paths.relevance); "" marks only the original pairs'
    ),
    out: Path = typer.Option(Path("reports"), "--out", help="report folder (gallery.html, images/, attention/)"),
    plots_repo: Path | None = typer.Option(
        None, "--plots-repo", help="DVC repo whose `dvc plots show` charts are also written as <out>/plots/*.png"
    ),
    quiet: bool = typer.Option(False, "--quiet", help="warnings only"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Draw attention-map figures and a static HTML retrieval gallery from the embeddings."""
    params = start_stage("report", params_path, quiet=quiet, debug=debug)
    result = call(
        run_report,
        params,
        embeddings=embeddings,
        dataset_json=dataset_json,
        image_root=image_root,
        out=out,
        features=features,
        relevance=relevance or None,
        debug=debug,
    )
    typer.echo(f"gallery at {result['gallery']} ({result['tiles']} results), {len(result['figures'])} figures")
    if plots_repo is not None:
        from pipeline.plots import PLOTS_DIR, write_plot_pngs

        charts = call(write_plot_pngs, out / PLOTS_DIR, repo=plots_repo, debug=debug)
        typer.echo(f"{len(charts)} charts of `dvc plots show` in {out / PLOTS_DIR}")


if __name__ == "__main__":
    app()
