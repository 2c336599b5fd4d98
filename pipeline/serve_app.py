"""Ray Serve application: a FastAPI ingress (`SearchIngress`: query encoder + page + API, `pipeline.serve_api`) over
index shards, each shard of each database its own deployment (`IndexShard`, `pipeline.serve_core.ShardSearcher`).

Deployment graph (``shards = S``)::

    HTTP -> Serve proxy (127.0.0.1:8000 by default) -> SearchIngress --+--> IndexShard_image_0 .. IndexShard_image_{S-1}
                                                                       +--> IndexShard_text_0  .. IndexShard_text_{S-1}

Two ways to run it:

* ``python -m stages.serve --index artifacts/index --model artifacts/model`` (local Ray, loopback; `run_serve`);
* ``serve run deploy/serve.yaml`` / ``serve deploy deploy/serve.yaml`` on a cluster: the config names the builder
  ``pipeline.serve_app:build_app`` and its ``args`` (the `ServeSettings` fields), and sets replicas / autoscaling per
  deployment (``SearchIngress``, ``IndexShard_image_0``, ...) with Ray Serve's own ``deployments:`` overrides.

Replicas reserve no CPU by default (``num_cpus: 0``): on a small machine every shard and the ingress fit beside the
Serve controller; on a cluster set ``ray_actor_options`` per deployment in the config. A shard of a compressed index
(``index.kind`` ivf_sq8 / ivf_pq) holds element codes only and reads re-ranking vectors from the embedding store, so
every node running shards must reach the store at the path recorded relative to the index (``rerank_cache_mb`` bounds
each shard's cache).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from pipeline.serve_api import SearchService, ServeSettings, create_api

logger = logging.getLogger("setemb.serve")
APP_NAME = "setemb"


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=32)
class IndexShard:
    """One row range of one database index (`pipeline.serve_core.ShardSearcher`)."""

    def __init__(self, index: str, database: str, shard: int, num_shards: int, cache_mb: float | None = None) -> None:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # faiss + torch OpenMP pools (setemb.index)
        from pipeline.serve_core import ShardSearcher

        self.searcher = ShardSearcher(index, database, shard, num_shards, cache_mb=cache_mb)
        logger.info("shard ready: %s", self.searcher.info())

    def search(self, sets: Any, k: int) -> list[list[dict[str, Any]]]:
        return self.searcher.search(sets, k)

    def info(self) -> dict[str, Any]:
        return self.searcher.info()


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=16)
@serve.ingress()
class SearchIngress:
    """Query encoder, page and HTTP API; fans each query out to the shards of its database and merges exactly."""

    def __init__(self, settings: dict[str, Any], shards: dict[str, list[DeploymentHandle]]) -> None:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        calls = {database: [_shard_call(h) for h in handles] for database, handles in shards.items()}
        self.service = SearchService(ServeSettings(**settings), calls)

    def __serve_build_asgi_app__(self) -> Any:
        return create_api(self.service)


def _shard_call(handle: DeploymentHandle) -> Any:
    async def call(sets: Any, k: int) -> list[list[dict[str, Any]]]:
        return await handle.search.remote(sets, k)

    return call


def shard_name(database: str, shard: int) -> str:
    """Deployment name of one shard (what a config file's ``deployments:`` entries name)."""
    return f"IndexShard_{database}_{shard}"


def build_app(args: dict[str, Any]) -> Any:
    """Serve application builder (``import_path: pipeline.serve_app:build_app``): ``args`` are `ServeSettings`;
    relative paths are made absolute against the directory the builder runs in (where `serve run` starts)."""
    settings = ServeSettings(**args)
    return bind_app(absolute_paths(settings))


def absolute_paths(settings: ServeSettings) -> ServeSettings:
    """``settings`` with index / model / params / features resolved against the current directory (replicas do not
    run in the directory the app was started from)."""
    paths = {key: str(Path(value).resolve()) for key in ("index", "model", "params", "features")
             if (value := getattr(settings, key)) is not None}  # fmt: skip
    return settings.model_copy(update=paths)


def bind_app(settings: ServeSettings, ingress_replicas: int | str = 1) -> Any:
    """The bound application: ``settings.shards`` shard deployments per database the index holds, one ingress
    (``ingress_replicas`` replicas, or ``"auto"`` for Serve autoscaling)."""
    from pipeline.serve_core import Catalog

    databases = Catalog(settings.index).databases
    shards = {
        database: [
            IndexShard.options(name=shard_name(database, s)).bind(
                settings.index, database, s, settings.shards, settings.rerank_cache_mb
            )
            for s in range(settings.shards)
        ]
        for database in databases
    }
    return SearchIngress.options(num_replicas=ingress_replicas).bind(settings.model_dump(), shards)


def check_servable(settings: ServeSettings) -> None:
    """Fail before starting anything when the index or model is missing, the index came from another model, or a
    compressed index's embedding store is missing or changed."""
    from pipeline.indexing import check_database_store
    from pipeline.query import model_digest
    from pipeline.serve_core import Catalog

    catalog = Catalog(settings.index)  # FileNotFoundError / ValueError with the `dvc repro index` hint
    for database in catalog.databases:
        check_database_store(Path(settings.index) / database)  # StageError with the `dvc repro index` hint
    if model_digest(settings.model) != catalog.manifest["model"]["digest"]:
        raise ValueError(f"the index at {settings.index} was built from another model than {settings.model}; "
                         f"run `dvc repro index` or pass --model {catalog.manifest['model']['path']}")  # fmt: skip
    if settings.shards > min(catalog.size(db) for db in catalog.databases):
        raise ValueError(f"--shards {settings.shards} is more than the smallest database has items")


def run_serve(settings: ServeSettings, *, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
              replicas: int | str = 1, num_cpus: int | None = None, blocking: bool = True) -> str:  # fmt: skip
    """Start (or join) Ray, start Serve's HTTP proxy on ``host:port`` and deploy the app; returns the base URL.

    Args:
        settings: the app's `ServeSettings`.
        host: interface to bind (loopback unless told otherwise). port: HTTP port.
        address: Ray cluster address (None: ``RAY_ADDRESS`` or a new local Ray).
        replicas: ingress replicas (the shards keep one each; scale them in a config file).
        num_cpus: CPUs of a new local Ray (None: all).
        blocking: wait until interrupted (the CLI) or return once deployed (tests, benchmarks).
    """
    import logging as _logging

    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if not address:
            # a loaded small machine starts the proxy slowly: Serve's 5 s / 10 s checks then kill it mid-start
            os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
            os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60")
        # a local Ray's workers import this checkout's code (not another install of the package)
        root = str(Path(__file__).resolve().parents[1])
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        runtime_env = None if address else {"env_vars": {"PYTHONPATH": path, "OMP_WAIT_POLICY": "PASSIVE"}}
        ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
                 logging_level=_logging.ERROR, log_to_driver=False, runtime_env=runtime_env)  # fmt: skip
    serve.start(http_options={"host": host, "port": port})
    settings = absolute_paths(settings)
    app = bind_app(settings, replicas)
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{host}:{port}"
    logger.info("serving %s at %s", settings.index, url)
    if blocking:
        import time

        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            logger.info("interrupted: shutting Serve down")
        finally:
            serve.shutdown()
    return url


__all__ = [
    "APP_NAME",
    "IndexShard",
    "SearchIngress",
    "absolute_paths",
    "bind_app",
    "build_app",
    "check_servable",
    "run_serve",
    "shard_name",
]
