"""Serve the set indexes over HTTP: a Ray Serve app with a FastAPI ingress, a search page and index shards.

    python -m stages.serve                                     # artifacts/index + artifacts/model on 127.0.0.1:8000
    python -m stages.serve --shards 4 --replicas 2             # 4 shard deployments per database, 2 ingress replicas
    SETEMB_SERVE_TOKEN=... python -m stages.serve --host 0.0.0.0   # exposed: every endpoint needs the bearer token

Open http://127.0.0.1:8000/ for the page; the endpoints are listed in `pipeline.serve_api`. On a cluster use the
Serve config file instead: ``serve deploy deploy/serve.yaml`` (same app, replicas / autoscaling set there).
Exit codes: 0 after Ctrl-C, 2 bad options / params, 1 missing index or model, index built from another model.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # faiss + torch OpenMP pools on few cores (setemb.index)

import typer  # noqa: E402

from pipeline.cli import call, start_stage  # noqa: E402

logger = logging.getLogger("setemb.stage.serve")
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    index: Path | None = typer.Option(None, "--index", help="index directory (default paths.index)"),
    model: Path | None = typer.Option(None, "--model", help="exported model directory (default paths.model)"),
    features: Path | None = typer.Option(
        None, "--features", help="feature store: conv grid of the attention maps (default paths.features)"
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="interface to bind; loopback unless you mean to expose it"),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="HTTP port"),
    token: str | None = typer.Option(
        None, "--token", envvar="SETEMB_SERVE_TOKEN", help="bearer token every request must carry (env too)"
    ),
    shards: int = typer.Option(1, "--shards", min=1, max=64, help="index shards per database (one deployment each)"),
    replicas: int = typer.Option(1, "--replicas", min=1, help="ingress replicas (query encoders)"),
    rerank_cache_mb: float | None = typer.Option(
        None, "--rerank-cache-mb", min=0, help="compressed indexes: re-ranking cache per shard, MiB (default: as built)"
    ),
    max_upload_bytes: int = typer.Option(8 * 1024 * 1024, "--max-upload-bytes", min=1, help="largest request body"),
    address: str | None = typer.Option(None, "--address", help="Ray cluster address (default: a local Ray)"),
    params_path: Path = typer.Option(Path("params.yaml"), "--params", help="params.yaml to read"),
    quiet: bool = typer.Option(False, "--quiet", help="warnings only"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Serve text -> image and image -> caption search over HTTP (Ray Serve + FastAPI), with a search page."""
    params = start_stage("serve", params_path, quiet=quiet, debug=debug)
    from pipeline.serve_api import ServeSettings
    from pipeline.serve_app import check_servable, run_serve

    settings = ServeSettings(
        index=str(index or params.paths.index), model=str(model or params.paths.model), params=str(params_path),
        features=str(features or params.paths.features), shards=shards, token=token,
        max_upload_bytes=max_upload_bytes, rerank_cache_mb=rerank_cache_mb,
    )  # fmt: skip
    call(check_servable, settings, debug=debug)
    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        logger.warning("binding %s without --token: anyone who can reach this port can query the index", host)
    call(run_serve, settings, host=host, port=port, address=address, replicas=replicas, debug=debug)


if __name__ == "__main__":
    app()
