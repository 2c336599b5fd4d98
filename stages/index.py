"""The index stage: options -> `pipeline.indexing.run_index` (set indexes of one split for `stages.search`)."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.cli import call, start_stage
from pipeline.indexing import MODALITIES, run_index

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    params_path: Path = typer.Option(Path("params.yaml"), "--params", help="params.yaml to read"),
    embeddings: Path = typer.Option(
        Path("artifacts/embeddings.zarr"), "--embeddings", help="embedding store (paths.embeddings)"
    ),
    model: Path = typer.Option(Path("artifacts/model"), "--model", help="exported model directory (paths.model)"),
    out: Path = typer.Option(Path("artifacts/index"), "--out", help="index directory to write (paths.index)"),
    dataset_json: Path | None = typer.Option(
        None, "--dataset-json", help="Karpathy JSON for image paths and captions (paths.dataset_json)"
    ),
    image_root: Path | None = typer.Option(None, "--image-root", help="image folder (paths.image_root)"),
    modality: list[str] | None = typer.Option(
        None,
        "--modality",
        help="database modality to index: image (for text queries) | text (for image queries); "
        "repeatable; default both",
    ),
    quiet: bool = typer.Option(False, "--quiet", help="warnings only"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Build the set indexes that `stages.search` queries (image database and caption database of one split)."""
    params = start_stage("index", params_path, quiet=quiet, debug=debug)
    if modality and not set(modality) <= set(MODALITIES):
        typer.echo(f"error: --modality must be image or text, got {modality}", err=True)
        raise typer.Exit(2)
    manifest = call(
        run_index,
        params,
        embeddings=embeddings,
        model=model,
        out=out,
        dataset_json=dataset_json,
        image_root=image_root,
        modalities=modality or None,
        debug=debug,
    )
    for name, info in manifest["indexes"].items():
        resident = info.get("resident_bytes")  # compressed kinds: codes + ids + quantizers, the cache bound apart
        memory = "" if resident is None else (
            f", {(resident['codes'] + resident['ids'] + resident['coarse']) / 2**20:.2f} MiB resident + re-rank cache "
            f"<= {resident['cache_bound'] / 2**20:.0f} MiB, re-ranking from {info['store']}"
        )  # fmt: skip
        typer.echo(
            f"{manifest['split']}/{name}: {info['items']} sets x {info['set_size']} of width {info['embed_dim']} "
            f"({info['kind']}{memory})"
        )
    typer.echo(f"index at {out}")


if __name__ == "__main__":
    app()
