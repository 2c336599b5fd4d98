"""Search the set indexes built by `stages.index`: a caption finds images, an image file finds captions.

    python -m stages.search "a red circle to the left of a blue square"      # text -> images (image/ index)
    python -m stages.search --image photo.jpg --k 5                            # image -> captions (text/ index)
    python -m stages.search "two squares" --json                               # machine-readable

Options -> `pipeline.search.run_search` (query encoding, the model-digest check, ranking).

Output: a table (rank, id, image path or caption, score), best first; with ``--json`` one JSON object
``{"query", "direction", "split", "similarity", "results": [{"rank", "id", "path" | "caption", "image"?, "score"}]}``.
Exit codes: 0 ok, 2 empty or ambiguous query / bad params, 1 missing index or model, unreadable image.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # faiss + torch OpenMP pools on few cores (setemb.index)

import typer  # noqa: E402

from pipeline.cli import call, start_stage  # noqa: E402
from pipeline.search import check_query, print_table, run_search  # noqa: E402

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    query: str | None = typer.Argument(None, help='caption to search images with, e.g. "a red circle"'),
    image: Path | None = typer.Option(None, "--image", help="image file to search captions with"),
    k: int | None = typer.Option(None, "--k", help="number of results (default index.top_k)"),
    index: Path | None = typer.Option(None, "--index", help="index directory (default paths.index)"),
    model: Path | None = typer.Option(None, "--model", help="exported model directory (default paths.model)"),
    params_path: Path = typer.Option(Path("params.yaml"), "--params", help="params.yaml to read"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of a table"),
    quiet: bool = typer.Option(False, "--quiet", help="warnings only"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Search the set index: a caption ranks images, --image ranks captions."""
    try:
        check_query(query, image)
        if k is not None and k < 1:
            raise ValueError(f"--k must be >= 1, got {k}")
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    params = start_stage("search", params_path, quiet=quiet, debug=debug)
    result = call(run_search, params, query=query, image=image, k=k, index=index, model=model, debug=debug)
    if as_json:
        typer.echo(json.dumps(result.to_json(), ensure_ascii=False))
    else:
        print_table(result)


if __name__ == "__main__":
    app()
