"""Load test of the Ray Serve app (pipeline/serve_app.py) on loopback: throughput and latency per concurrency level.

    python benchmarks/bench_serve.py                                   # artifacts/ of `dvc repro` (the shapes model)
    python benchmarks/bench_serve.py --levels 1,4,16 --seconds 20 --endpoint text --shards 2

Starts the app in-process on 127.0.0.1 (a local Ray), warms it up, then for each level N runs N concurrent clients
(asyncio + httpx, one keep-alive connection each) for ``--seconds``: each client sends the next query as soon as the
previous answer arrived. Queries: the test split's captions (``--endpoint text``, POST /search/text, k=10), its image
files (``image``, POST /search/image), or stored caption sets (``sets``, POST /search/sets). Prints requests/s, p50
and p99 latency and the error count (anything but HTTP 200) per level; exits 1 if any request failed.
The clients share the machine with the server: on a 2-core box they take CPU from it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
for _key, _value in {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
                     "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0",
                     "RAY_AUTH_MODE": "disabled"}.items():  # fmt: skip
    os.environ.setdefault(_key, _value)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _requests(endpoint: str, index: Path, limit: int) -> list[dict]:
    """httpx request kwargs, cycled by the clients."""
    items = json.loads((index / "items.json").read_text())
    if endpoint == "text":
        return [{"url": "/search/text", "json": {"text": c["text"], "k": 10}} for c in items["captions"][:limit]]
    if endpoint == "image":
        files = [Path(i["path"]).read_bytes() for i in items["images"][:limit] if i.get("path")]
        return [{"url": "/search/image", "files": {"image": ("q.jpg", f, "image/jpeg")}, "data": {"k": "10"}}
                for f in files]  # fmt: skip
    vectors = np.load(index / "text" / "vectors.npy", mmap_mode="r")
    return [{"url": "/search/sets", "json": {"database": "image", "embeddings": np.asarray(v, np.float32).tolist(),
                                              "k": 10}} for v in vectors[:limit]]  # fmt: skip


async def _level(url: str, requests: list[dict], clients: int, seconds: float) -> dict:
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.perf_counter() + seconds

    async def client(c: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            i = c
            while time.perf_counter() < deadline:
                kwargs = requests[i % len(requests)]
                i += clients
                t0 = time.perf_counter()
                try:
                    response = await http.post(**kwargs)
                    ok = response.status_code == 200
                    if not ok:
                        errors.append(f"{response.status_code} {response.text[:120]}")
                except httpx.HTTPError as e:
                    ok = False
                    errors.append(f"{type(e).__name__}: {e}")
                if ok:
                    latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    wall = time.perf_counter() - start
    lat = np.asarray(latencies) * 1000
    return {"clients": clients, "requests": len(latencies), "wall_s": wall, "rps": len(latencies) / wall,
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
            "errors": len(errors), "first_error": errors[0] if errors else ""}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params.yaml (paths.index / model / features)")
    parser.add_argument("--index", help="index directory (default paths.index)")
    parser.add_argument("--model", help="exported model (default paths.model)")
    parser.add_argument("--levels", default="1,4,16", help="concurrent clients per level, comma separated")
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of each level")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of 1-client warm-up (not reported)")
    parser.add_argument("--endpoint", choices=["text", "image", "sets"], default="text")
    parser.add_argument("--shards", type=int, default=1, help="index shards per database")
    parser.add_argument("--replicas", type=int, default=1, help="ingress replicas")
    parser.add_argument("--queries", type=int, default=250, help="distinct queries cycled")
    args = parser.parse_args(argv)

    from pipeline.params import load_params
    from pipeline.serve_api import ServeSettings
    from pipeline.serve_app import check_servable, run_serve

    params = load_params(args.params)
    index = Path(args.index or params.paths.index)
    settings = ServeSettings(index=str(index), model=str(args.model or params.paths.model), params=args.params,
                             features=params.paths.features, shards=args.shards)  # fmt: skip
    try:
        check_servable(settings)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    requests = _requests(args.endpoint, index, args.queries)
    levels = [int(x) for x in args.levels.split(",")]
    t0 = time.perf_counter()
    url = run_serve(settings, port=_free_port(), replicas=args.replicas, blocking=False)
    print(
        f"app up in {time.perf_counter() - t0:.1f} s at {url} ({os.cpu_count()} CPUs; index {index}; "
        f"endpoint {args.endpoint}; shards {args.shards}; ingress replicas {args.replicas})"
    )
    try:
        if args.warmup > 0:
            asyncio.run(_level(url, requests, 1, args.warmup))
        rows = [asyncio.run(_level(url, requests, n, args.seconds)) for n in levels]
    finally:
        from ray import serve

        serve.shutdown()
    print("\n| clients | requests | throughput (req/s) | p50 (ms) | p99 (ms) | errors |\n|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['clients']} | {r['requests']} | {r['rps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{r['errors']} |"
        )
    failed = [r for r in rows if r["errors"]]
    for r in failed:
        print(f"level {r['clients']}: first error: {r['first_error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
