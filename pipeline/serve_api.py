"""The HTTP face of the search service: `SearchService` (query encoder + shard fan-out + merge) and `create_api`, the
FastAPI app that a Ray Serve ingress wraps (`pipeline.serve_app`).

Endpoints (JSON unless noted; every error is a 4xx/5xx JSON ``{"error": "<one line>", "status": n}``)::

    GET  /                          the search page (pipeline/serve_page/, no external resources)
    GET  /health                    {"status": "ok", "databases": {...}, "model": digest, "shards": {...}}
    GET  /metrics                   Prometheus text format: requests, latency histogram, database sizes
    POST /search/text               {"text": "a red circle", "k": 10}                     -> images
    POST /search/image              multipart: image=<file>, k=10, attention=false       -> captions
    POST /search/sets               {"database": "image"|"text", "embeddings": [[...D]...L], "k": 10} -> neighbours
    GET  /items/{database}/{row}    metadata of one row (ids, image path, caption)
    GET  /items/image/{row}/file    the image file itself
    GET  /items/image/{row}/attention/{element}.png   stored attention map of one set element (as stages.report)

A result is ``{"rank", "row", "id", "score", "matches": [{"query_element", "result_element", "cosine"}], "best",
...metadata}``. Safety: with a token set, every request (page and static files included) needs ``Authorization:
Bearer <token>`` or the ``setemb_token`` cookie, which ``GET /?token=<token>`` sets; bodies above
``max_upload_bytes`` are refused with 413 before they are read in full.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from pipeline.serve_core import (
    MAX_IMAGE_PIXELS,
    MAX_K,
    MAX_TEXT_CHARS,
    MAX_UPLOAD_BYTES,
    Catalog,
    ServeError,
    attention_png,
    check_k,
    check_sets,
    check_text,
    decode_upload,
    merge_topk,
)

logger = logging.getLogger("setemb.serve")
PAGE_DIR = Path(__file__).with_name("serve_page")
TOKEN_COOKIE = "setemb_token"
TOKEN_ENV = "SETEMB_SERVE_TOKEN"
ShardCall = Callable[[np.ndarray, int], Awaitable[list[list[dict[str, Any]]]]]


class ServeSettings(BaseModel):
    """Everything an ingress replica needs (JSON-able: it travels in a Serve config file's ``args``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    index: str = Field("artifacts/index", description="stages.index output (paths.index)")
    model: str = Field("artifacts/model", description="exported model (paths.model)")
    params: str = Field("params.yaml", description="params.yaml: backbones (extract) the model was trained on")
    features: str | None = Field(None, description="feature store: conv grid of the attention maps (paths.features)")
    shards: int = Field(1, ge=1, le=64, description="index shards per database, each its own deployment")
    rerank_cache_mb: float | None = Field(
        None, ge=0, description="compressed indexes: re-ranking cache per shard (MiB); None = index.rerank_cache_mb"
    )
    token: str | None = Field(None, description=f"bearer token; None = the {TOKEN_ENV} env var, unset = open")
    max_upload_bytes: int = Field(MAX_UPLOAD_BYTES, gt=0)
    max_text_chars: int = Field(MAX_TEXT_CHARS, gt=0)
    max_image_pixels: int = Field(MAX_IMAGE_PIXELS, gt=0)
    max_k: int = Field(MAX_K, gt=0)
    device: str = "cpu"


class TextQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: StrictStr
    k: StrictInt = 10


class SetQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    database: Literal["image", "text"]
    embeddings: list[list[float]]
    k: StrictInt = 10


# ---------------------------------------------------------------------------------------------- service
class SearchService:
    """Query encoder (backbones + trained towers, loaded once) over the shards of each database.

    Args:
        settings: validated `ServeSettings`.
        shards: per database (``"image"``, ``"text"``), one async call per shard ``(sets [Q, L, D], k) -> hits``.
        encoder: a ready ``QueryEncoder`` (tests); built from ``settings`` when None.
    """

    def __init__(self, settings: ServeSettings, shards: dict[str, list[ShardCall]], encoder: Any = None) -> None:
        from pipeline.params import load_params
        from pipeline.query import QueryEncoder, model_digest

        self.settings = settings
        params = load_params(settings.params)
        self.catalog = Catalog(settings.index, settings.features or params.paths.features)
        self.digest = model_digest(settings.model)
        if self.digest != self.catalog.manifest["model"]["digest"]:
            raise ValueError(f"the index at {settings.index} was built from another model than {settings.model}; "
                             "run `dvc repro index` or pass the model it was built from")  # fmt: skip
        self.encoder = encoder or QueryEncoder(settings.model, params, device=settings.device)
        self.shards = shards
        self.dim = int(self.catalog.manifest["indexes"][self.catalog.databases[0]]["embed_dim"])
        self._lock = threading.Lock()  # one forward pass at a time per replica; scale with replicas
        if "image" in shards:
            self.encoder.text_backbone  # noqa: B018 (load now, not on the first request)
        if "text" in shards and self.encoder.extract.image_backbone != "precomputed":
            self.encoder.visual_backbone  # noqa: B018

    def _database(self, database: str) -> list[ShardCall]:
        if database not in self.shards:
            raise ServeError(404, f"no {database!r} database on this server; it serves {sorted(self.shards)}")
        return self.shards[database]

    async def _ranked(self, database: str, sets: np.ndarray, k: int) -> list[dict[str, Any]]:
        calls = self._database(database)
        per_shard = await asyncio.gather(*(call(sets, k) for call in calls))  # each: [Q=1][hits]
        hits = merge_topk([hits[0] for hits in per_shard], k)
        out = []
        for rank, hit in enumerate(hits, 1):
            entry = {"rank": rank, **self.catalog.item(database, hit["row"]), "score": hit["score"],
                     "matches": hit["matches"], "best": hit["best"]}  # fmt: skip
            if database == "image" and self.catalog.has_attention:
                entry["attention_map"] = entry["attention"][hit["best"]["result_element"]]
            out.append(entry)
        return out

    def _encode(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return fn(*args, **kwargs)

    async def search_text(self, text: Any, k: Any) -> dict[str, Any]:
        text, k = check_text(text, self.settings.max_text_chars), check_k(k, self.settings.max_k)
        self._database("image")
        sets = await asyncio.to_thread(self._encode, self.encoder.encode_text, [text])  # [1, L, D]
        results = await self._ranked("image", sets.numpy(), k)
        return {"query": {"text": text, "elements": int(sets.shape[1])}, "database": "image",
                "split": self.catalog.split, "results": results}  # fmt: skip

    async def search_image(self, data: bytes, k: Any, attention: bool = False) -> dict[str, Any]:
        k = check_k(k, self.settings.max_k)
        self._database("text")
        if self.encoder.extract.image_backbone == "precomputed":
            raise ServeError(422, "this model was trained on precomputed region features: image queries are off")
        image = await asyncio.to_thread(decode_upload, data, self.settings.max_image_pixels)
        sets, att = await asyncio.to_thread(self._encode, self.encoder.encode_images, [image], return_attention=True)
        query: dict[str, Any] = {"width": image.width, "height": image.height, "elements": int(sets.shape[1])}
        if attention and att is not None:
            query["attention"] = await asyncio.to_thread(self._query_maps, image, att[0].numpy())
        results = await self._ranked("text", sets.numpy(), k)
        return {"query": query, "database": "text", "split": self.catalog.split, "results": results}

    def _query_maps(self, image: Any, att: np.ndarray) -> list[str]:
        """``att [K, N]`` of the uploaded image -> K PNG data URLs (grid: the store's, else square)."""
        import math

        n = att.shape[1]
        grid = self.catalog.grid
        if grid is None or grid[0] * grid[1] != n:
            if math.isqrt(n) ** 2 != n:
                return []
            grid = (math.isqrt(n), math.isqrt(n))
        maps = [attention_png(image, row, grid, self.catalog.input_size, transform=self.catalog.image_transform)
                for row in att]  # fmt: skip
        return ["data:image/png;base64," + base64.b64encode(png).decode() for png in maps]

    async def search_sets(self, database: str, embeddings: Any, k: Any) -> dict[str, Any]:
        k = check_k(k, self.settings.max_k)
        sets = check_sets(embeddings, self.dim)
        results = await self._ranked(database, sets, k)
        return {"query": {"elements": int(sets.shape[1])}, "database": database, "split": self.catalog.split,
                "results": results}  # fmt: skip

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "split": self.catalog.split, "model": self.digest,
                "similarity": self.catalog.manifest["similarity"],
                "databases": {db: self.catalog.size(db) for db in self.shards},
                "shards": {db: len(calls) for db, calls in self.shards.items()}}  # fmt: skip


# ---------------------------------------------------------------------------------------------- metrics / guard
class Metrics:
    """Prometheus counters of one replica (own registry: several apps in one process never collide)."""

    def __init__(self, sizes: dict[str, int]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("setemb_requests", "HTTP requests", ["endpoint", "method", "status"],
                                registry=self.registry)  # fmt: skip
        self.latency = Histogram("setemb_request_seconds", "request latency", ["endpoint"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))  # fmt: skip
        items = Gauge("setemb_database_items", "sets in each database", ["database"], registry=self.registry)
        for database, n in sizes.items():
            items.labels(database).set(n)

    def observe(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, method, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def _json_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


class Guard:
    """ASGI middleware: bearer-token check, body-size limit (header and streamed bytes), request metrics."""

    def __init__(self, app: Any, *, token: str | None, max_body: int, metrics: Metrics) -> None:
        self.app, self.token, self.max_body, self.metrics = app, token, max_body, metrics

    def _token_ok(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented.encode(), self.token.encode())

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        request = Request(scope)
        try:
            if self.token is not None:
                bearer = request.headers.get("authorization", "")
                presented = bearer[7:].strip() if bearer.lower().startswith("bearer ") else None
                query_token = request.query_params.get("token")
                if scope["path"] == "/" and query_token is not None and self._token_ok(query_token):
                    response = RedirectResponse("/", status_code=303)
                    response.set_cookie(TOKEN_COOKIE, self.token, httponly=True, samesite="strict")
                    return await response(scope, receive, send_status)
                if not (self._token_ok(presented) or self._token_ok(request.cookies.get(TOKEN_COOKIE))):
                    message = (
                        "wrong bearer token"
                        if presented or request.cookies.get(TOKEN_COOKIE) or query_token
                        else "missing bearer token: send 'Authorization: Bearer <token>' (or open /?token=...)"
                    )
                    response = _json_error(401, message, {"WWW-Authenticate": "Bearer"})
                    return await response(scope, receive, send_status)
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body:
                response = _json_error(413, f"request body is {int(length)} bytes; at most {self.max_body} accepted")
                return await response(scope, receive, send_status)
            received = [0]

            async def limited() -> dict:
                message = await receive()
                if message["type"] == "http.request":
                    received[0] += len(message.get("body", b""))
                    if received[0] > self.max_body:
                        raise HTTPException(413, f"request body exceeds {self.max_body} bytes")
                return message

            await self.app(scope, limited, send_status)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.observe(endpoint, scope.get("method", ""), status[0], time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------- the app
def _validation_message(exc: Any) -> str:
    parts = []
    for err in exc.errors()[:4]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "form"))
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "invalid request: " + "; ".join(parts)


def create_api(service: SearchService) -> Any:
    """The FastAPI app over ``service`` (module docstring: endpoints, errors, auth, limits)."""
    import os

    settings = service.settings
    api = FastAPI(title="setemb set retrieval", docs_url=None, redoc_url=None)  # docs pages load a CDN: off
    metrics = Metrics({db: service.catalog.size(db) for db in service.shards})
    token = settings.token or os.environ.get(TOKEN_ENV) or None
    api.add_middleware(Guard, token=token, max_body=settings.max_upload_bytes, metrics=metrics)

    @api.exception_handler(ServeError)
    async def _serve_error(_, exc: ServeError) -> Any:
        return _json_error(exc.status, str(exc))

    @api.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException) -> Any:
        if exc.status_code == 404 and exc.detail == "Not Found":
            return _json_error(404, f"no endpoint {request.method} {request.url.path}; see GET /openapi.json")
        if exc.status_code == 405:
            return _json_error(405, f"{request.method} is not allowed on {request.url.path}")
        return _json_error(exc.status_code, str(exc.detail))

    api.add_exception_handler(StarletteHTTPException, _http_error)

    @api.exception_handler(RequestValidationError)
    async def _invalid(_, exc: RequestValidationError) -> Any:
        return _json_error(422, _validation_message(exc))

    @api.exception_handler(Exception)
    async def _internal(_, exc: Exception) -> Any:
        logger.exception("internal error")
        return _json_error(500, f"internal error ({type(exc).__name__}); see the server log")

    @api.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse((PAGE_DIR / "index.html").read_text(encoding="utf-8"))

    api.mount("/static", StaticFiles(directory=PAGE_DIR), name="static")

    @api.get("/health")
    async def health() -> dict[str, Any]:
        return service.health()

    @api.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @api.post("/search/text")
    async def search_text(query: TextQuery) -> dict[str, Any]:
        return await service.search_text(query.text, query.k)

    @api.post("/search/image")
    async def search_image(image: UploadFile = File(...), k: int = Form(10), attention: bool = Form(False)) -> Any:
        data = await image.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            raise ServeError(413, f"image upload exceeds {settings.max_upload_bytes} bytes")
        return await service.search_image(data, k, attention)

    @api.post("/search/sets")
    async def search_sets(query: SetQuery) -> dict[str, Any]:
        return await service.search_sets(query.database, query.embeddings, query.k)

    @api.get("/items/{database}/{row}")
    async def item(database: str, row: int) -> dict[str, Any]:
        return service.catalog.item(database, row)

    @api.get("/items/image/{row}/file")
    async def image_file(row: int) -> FileResponse:
        return FileResponse(service.catalog.image_file(row))

    @api.get("/items/image/{row}/attention/{element}.png")
    async def attention(row: int, element: int) -> Response:
        png = await asyncio.to_thread(service.catalog.attention_png, row, element)
        return Response(png, media_type="image/png")

    return api


__all__ = ["SearchService", "ServeSettings", "TOKEN_ENV", "create_api"]
