"""The embed stage: options -> `pipeline.embedding.run_embed` (a resumable, fingerprinted embedding store)."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.cli import call, start_stage
from pipeline.embedding import run_embed

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    params_path: Path = typer.Option(Path("params.yaml"), "--params", help="params.yaml to read"),
    features: str = typer.Option(
        "artifacts/features.zarr", "--features", help="feature store (paths.features): a path or an fsspec URL"
    ),
    model: Path = typer.Option(Path("artifacts/model"), "--model", help="exported model directory (paths.model)"),
    out: Path = typer.Option(
        Path("artifacts/embeddings.zarr"), "--out", help="embedding store to write (paths.embeddings)"
    ),
    limit: int | None = typer.Option(
        None, "--limit", min=1, help="embed only the first N images of each split and their captions (smoke runs)"
    ),
    quiet: bool = typer.Option(False, "--quiet", help="warnings only, no progress bar"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Embed the requested splits of the feature store with the trained model into an embedding store."""
    params = start_stage("embed", params_path, quiet=quiet, debug=debug)
    summary = call(run_embed, params, features=features, model=model, out=out, limit=limit, quiet=quiet, debug=debug)
    for split, sets in summary.items():
        img, txt = sets["image"], sets["text"]
        typer.echo(
            f"{split}: {img['items']} images x {img['set_size']} and {txt['items']} captions x {txt['set_size']} "
            f"embeddings of width {img['embed_dim']}"
        )
    typer.echo(f"embeddings at {out}")


if __name__ == "__main__":
    app()
