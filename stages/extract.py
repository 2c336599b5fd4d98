"""The extract stage: options -> `pipeline.feature_cache.run_extract` (a resumable, fingerprinted feature store)."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.cli import call, progress_enabled, start_stage
from pipeline.feature_cache import resolve_extract_params, run_extract
from pipeline.files import REJECTED_JSON

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    params_path: Path = typer.Option(Path("params.yaml"), "--params", help="params.yaml to read"),
    backbone: str | None = typer.Option(
        None, "--backbone", help="image backbone: efficientnet_lite0 | resnet152 | resnext101 | precomputed"
    ),
    text_backbone: str | None = typer.Option(None, "--text-backbone", help="text backbone: minilm | bert | glove"),
    source: str | None = typer.Option(None, "--source", help="karpathy | precomp (default: extract.source)"),
    split: list[str] | None = typer.Option(
        None, "--split", help="split to extract (repeatable); default extract.splits"
    ),
    workers: int | None = typer.Option(None, "--workers", help="one-thread workers (Ray actors if > 1); 0 = per core"),
    device: str | None = typer.Option(None, "--device", help="auto | cpu | cuda (default extract.device)"),
    limit: int | None = typer.Option(
        None, "--limit", min=1, help="only the first N images of each split (smoke tests)"
    ),
    image_transform: str | None = typer.Option(
        None, "--image-transform", help="resize | center_crop (default extract.image_transform)"
    ),
    weights: str | None = typer.Option(None, "--weights", help="image backbone weights file, or 'random'"),
    text_weights: str | None = typer.Option(None, "--text-weights", help="text backbone HF folder (minilm, bert)"),
    dataset_json: Path | None = typer.Option(None, "--dataset-json", help="Karpathy JSON (default paths.dataset_json)"),
    image_root: Path | None = typer.Option(None, "--image-root", help="image folder (default paths.image_root)"),
    precomp_root: Path | None = typer.Option(
        None, "--precomp-root", help="precomp folder or HDF5 regions file (default paths.precomp_root)"
    ),
    out: Path | None = typer.Option(None, "--out", help="feature store to write (default paths.features)"),
    quiet: bool = typer.Option(False, "--quiet", help="warnings only, no progress bar"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Extract frozen image and caption features into the Zarr feature store (resumable)."""
    params = start_stage("extract", params_path, quiet=quiet, debug=debug)
    overrides = {
        "image_backbone": backbone,
        "text_backbone": text_backbone,
        "source": source,
        "splits": split or None,
        "workers": workers,
        "device": device,
        "image_weights": weights,
        "image_transform": image_transform,
        "text_weights": text_weights,
    }
    extract = call(resolve_extract_params, params.extract, debug=debug, **overrides)
    paths = params.paths
    precomp = precomp_root or (Path(paths.precomp_root) if paths.precomp_root else None)
    summary = call(
        run_extract,
        extract,
        out or Path(paths.features),
        dataset_json=dataset_json or Path(paths.dataset_json),
        image_root=image_root or Path(paths.image_root),
        precomp_root=precomp,
        limit=limit,
        progress=progress_enabled(quiet),
        debug=debug,
    )
    if summary.rejected:
        typer.echo(f"{summary.rejected} images rejected; see {summary.out / REJECTED_JSON}")
    typer.echo(f"features at {summary.out} ({summary.status})")


if __name__ == "__main__":
    app()
