"""Generate the embedded `shapes` dataset (Karpathy JSON + images + exhaustive relevance) from params."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.cli import call, start_stage
from pipeline.shapes import run_prepare

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    params_path: Path = typer.Option(Path("params.yaml"), "--params", help="params.yaml to read"),
    out: Path = typer.Option(Path("data/shapes"), "--out", help="output folder (paths.shapes)"),
    quiet: bool = typer.Option(False, "--quiet", help="warnings only"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Generate the embedded `shapes` dataset in the Karpathy JSON + image-folder format."""
    params = start_stage("prepare", params_path, quiet=quiet, debug=debug)
    path = call(run_prepare, params, out, debug=debug)
    typer.echo(f"shapes dataset at {path}")


if __name__ == "__main__":
    app()
