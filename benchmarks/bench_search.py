"""Benchmark `setemb.index.SetIndex` (FAISS element candidates + exact smooth-Chamfer re-ranking) against brute force.

Synthetic but structured data (random Gaussian sets have no neighbour structure, which makes ANN meaningless):

* latent topics (N/50, skewed popularity) each own 16 concept centres (cosine ≈ 0.5 within a topic);
* each database item (an "image set", K elements) takes K distinct concepts of one topic; element =
  normalise(concept + σ·noise);
* each query (a "caption set", L = K elements) redraws the noise of a random database item's concepts, so it has a
  true neighbour (that item) and a graded neighbourhood (items of the topic sharing 3, 2, 1 concepts).

Measured in ONE process (``ru_maxrss`` is the process peak):

* build: index training and add time (``SetIndex.add`` in blocks of ``--block``);
* recall@10 of the indexed search against exact brute force ``setemb.similarity.score(..., topk=10)`` over the
  float32 database, on the first ``--gt-queries`` queries only (brute force over N × 1,000 is expensive);
  also with the re-ranking reading float32 vectors instead of the index's float16 copies (same candidates);
* per-query latency p50/p99: indexed search one query at a time over all queries, brute force one query at a time on
  ``--bf-latency-queries`` queries (its best tiling: one query × a 16 MB gallery tile);
* resident memory after each phase;
* a sweep of ``candidates_per_element`` (and ``nprobe`` / ``ef_search``): recall@10 and batched ms/query.

Compressed kinds (``--compressed ivf_sq8,ivf_pq``, `setemb.index.compressed.CompressedSetIndex`): the database is
also written as a float16 Zarr array (``--store``, ``--store-chunk`` rows per chunk, uncompressed), each kind keeps
only its element codes resident, pre-ranks candidates by a proxy score and re-ranks the top ``--rerank`` exactly
from the store through a ``--cache-mb`` LRU cache. A trade-off table (memory, recall@10, latency, build) compares
every kind built in the run; ``--skip-setindex`` leaves out the float ``SetIndex`` (7.6 GB at 1M).

Usage: ``python benchmarks/bench_search.py --n 100000`` (dev) or ``python benchmarks/bench_search.py`` (1M);
``python benchmarks/bench_search.py --compressed ivf_sq8,ivf_pq --skip-setindex`` (compressed kinds only).
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import shutil
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch and faiss ship separate OpenMP runtimes: no spinning

import numpy as np  # noqa: E402
import torch  # noqa: E402

from setemb.index import SetIndex, default_index_params  # noqa: E402
from setemb.index.compressed import CompressedSetIndex  # noqa: E402
from setemb.similarity import score  # noqa: E402


def _rss_gb() -> float:
    """Current resident set size in GB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 1e9


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KB on Linux


def _normalise(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    return x


def _noisy(rng: np.random.Generator, centres: np.ndarray, sigma: float) -> np.ndarray:
    """normalise(centre + σ·g/√D), g ~ N(0, I): ‖noise‖ ≈ σ, cosine to the centre ≈ 1/√(1+σ²)."""
    D = centres.shape[-1]
    noise = rng.standard_normal(centres.shape, dtype=np.float32)
    noise *= sigma / np.sqrt(D)
    noise += centres
    return _normalise(noise)


def make_data(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Database [N, K, D] float32, queries [Q, L, D] float32 and the source item of each query [Q].

    Topics (``N / --items-per-topic``, popularity ``floor(T·u^skew)``) each own ``--concepts-per-topic`` concept
    centres (noisy copies of the topic centre, cosine ≈ 0.5 between concepts of a topic); an item takes K distinct
    concepts of one topic, each element is a noisy concept; a query redraws the noise of a random item's concepts.
    """
    N, K, D, P = args.n, args.k, args.dim, args.concepts_per_topic
    T = max(1, N // args.items_per_topic)
    rng = np.random.default_rng(args.seed)
    topics = _normalise(rng.standard_normal((T, D), dtype=np.float32))  # [T, D]
    concepts = _noisy(rng, np.repeat(topics, P, 0), 1.0)  # [T*P, D], concept p of topic t at row t*P + p
    topic = np.minimum((T * rng.random(N) ** args.skew).astype(np.int64), T - 1)  # [N]
    choice = np.argsort(rng.random((N, P)), axis=1)[:, :K]  # [N, K] distinct concepts within the topic
    concept = topic[:, None] * P + choice  # [N, K]
    database = np.empty((N, K, D), np.float32)
    for start in range(0, N, args.block):  # blocks: one [block, K, D] noise buffer at a time
        stop = min(start + args.block, N)
        database[start:stop] = _noisy(
            np.random.default_rng([args.seed, start]), concepts[concept[start:stop]], args.sigma
        )
    source = rng.integers(0, N, args.queries)  # [Q]
    queries = _noisy(rng, concepts[concept[source]], args.sigma)  # [Q, L, D], L = K
    return database, queries, source


def _percentiles(times: list[float]) -> tuple[float, float]:
    ms = np.asarray(times) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def _recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean |found ∩ exact| / k over queries (rows are top-k id lists)."""
    hits = [len(set(f.tolist()) & set(e.tolist())) for f, e in zip(found, exact, strict=True)]
    return float(np.mean(hits)) / exact.shape[1]


def _brute_force(queries: torch.Tensor, database: torch.Tensor, k: int, alpha: float) -> tuple[torch.Tensor, ...]:
    B, L, _ = queries.shape
    G, K, _ = database.shape
    gallery_block = max(1, (1 << 22) // (B * K * L))  # one ~16 MB cosine tile per step
    return score(queries, database, "smooth_chamfer", block_size=(B, gallery_block), topk=k, alpha=alpha)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1_000_000, help="database sets N")
    p.add_argument("--k", type=int, default=4, help="elements per set (K = L)")
    p.add_argument("--dim", type=int, default=256, help="element width D")
    p.add_argument("--queries", type=int, default=1000, help="query sets Q")
    p.add_argument("--gt-queries", type=int, default=100, help="queries with exact brute-force ground truth")
    p.add_argument("--bf-latency-queries", type=int, default=10, help="single-query brute-force timings")
    p.add_argument("--items-per-topic", type=int, default=50, help="mean items per latent topic")
    p.add_argument("--concepts-per-topic", type=int, default=16, help="concept centres per topic")
    p.add_argument("--skew", type=float, default=1.5, help="topic popularity exponent (1 = uniform)")
    p.add_argument("--sigma", type=float, default=0.6, help="element noise norm around its concept")
    p.add_argument("--kind", default="auto", choices=["auto", "flat", "ivf", "hnsw"], help="index kind")
    p.add_argument("--nlist", type=int, default=0, help="IVF cells (0: default_index_params)")
    p.add_argument("--nprobe", type=int, default=0, help="IVF cells visited (0: default_index_params)")
    p.add_argument("--candidates", type=int, default=64, help="candidates_per_element C")
    p.add_argument("--ef-search", type=int, default=128, help="HNSW ef_search")
    p.add_argument("--storage-dtype", default="float16", choices=["float16", "float32"], help="re-rank vectors")
    p.add_argument("--alpha", type=float, default=16.0, help="smooth-Chamfer temperature")
    p.add_argument("--block", type=int, default=65536, help="sets per generation / add block")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compressed", default="", help="compressed kinds to add, e.g. ivf_sq8,ivf_pq")
    p.add_argument("--skip-setindex", action="store_true", help="do not build the float SetIndex (memory)")
    p.add_argument("--rerank", type=int, default=32, help="compressed: items re-ranked exactly per query")
    p.add_argument("--pq-m", type=int, default=32, help="compressed ivf_pq: sub-quantizers (bytes per element)")
    p.add_argument("--cache-mb", type=int, default=64, help="compressed: re-ranking row cache bound")
    p.add_argument("--store", default="", help="compressed: float16 Zarr store path (default: a temp dir)")
    p.add_argument("--store-chunk", type=int, default=16, help="compressed: sets per Zarr chunk")
    args = p.parse_args(argv)
    K, D, k = args.k, args.dim, 10
    rss0 = _rss_gb()

    t0 = time.perf_counter()
    database, queries, _ = make_data(args)
    t_data = time.perf_counter() - t0
    rss_data = _rss_gb()
    params = default_index_params(args.n, K) if args.kind == "auto" else {"kind": args.kind}
    params.update({key: v for key, v in (("nlist", args.nlist), ("nprobe", args.nprobe)) if v})
    sample = database[np.random.default_rng(1).choice(args.n, min(args.n, 100_000 // K), replace=False)]

    # Exact brute force on the first gt-queries (float32 database, no index).
    db_t, q_t = torch.from_numpy(database), torch.from_numpy(queries)
    G = args.gt_queries
    t0 = time.perf_counter()
    _, exact = _brute_force(q_t[:G], db_t, k, args.alpha)
    t_bf_batch = time.perf_counter() - t0
    bf_times = []
    for i in range(args.bf_latency_queries):
        t0 = time.perf_counter()
        _brute_force(q_t[i : i + 1], db_t, k, args.alpha)
        bf_times.append(time.perf_counter() - t0)
    bf_p50, bf_p99 = _percentiles(bf_times)
    title = f"N={args.n:,} sets, K=L={K}, D={D}, Q={len(queries):,}, smooth-Chamfer alpha={args.alpha}"
    tradeoff: list[tuple] = []  # (kind, settings, resident GB, RSS growth GB, recall, p50, p99, build s)
    if not args.skip_setindex:
        tradeoff.append(_bench_setindex(args, params, database, queries, sample, exact, title, t_data, rss0, rss_data,
                                        (t_bf_batch, bf_p50, bf_p99)))  # fmt: skip
        gc.collect()
    kinds = [kind for kind in args.compressed.split(",") if kind]
    if kinds:
        store = args.store or tempfile.mkdtemp(prefix="bench_search_store.")
        try:
            array, t_store = _write_store(database, store, args.store_chunk, args.block)
            for kind in kinds:
                tradeoff.append(_bench_compressed(args, kind, params, database, queries, sample, array, exact))
                gc.collect()
        finally:
            if not args.store:
                shutil.rmtree(store, ignore_errors=True)
        print(f"\nfloat16 Zarr store for re-ranking: {args.n:,} sets in {args.store_chunk}-set chunks, "
              f"written in {t_store:.1f} s ({database.nbytes / 2 / 1e9:.2f} GB on disk)")  # fmt: skip
    print(f"\n### index kinds: {title}; recall@10 on {G} queries, latency 1 query per call over {len(queries)}\n")
    print("| kind | settings | resident index memory | RSS growth in build | recall@10 | p50 / p99 ms | build s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for kind, settings, resident, growth, recall, p50, p99, build in tradeoff:
        print(f"| {kind} | {settings} | {resident} | {growth:.2f} GB | {recall:.4f} | {p50:.1f} / {p99:.1f} | "
              f"{build:.1f} |")  # fmt: skip
    print(f"\npeak RSS (ru_maxrss, whole process, including the float32 database and brute-force tiles): "
          f"{_peak_gb():.2f} GB")  # fmt: skip


def _latency(index, queries: np.ndarray, k: int) -> tuple[float, float, float]:
    """``(p50 ms, p99 ms, batched ms/query)``: one query per call over all queries, then one call for all."""
    times = []
    for i in range(len(queries)):
        t0 = time.perf_counter()
        index.search(queries[i : i + 1], k)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    index.search(queries, k)
    p50, p99 = _percentiles(times)
    return p50, p99, (time.perf_counter() - t0) / len(queries) * 1e3


def _write_store(database: np.ndarray, path: str, chunk: int, block: int):
    """The database as a float16 Zarr array ``[N, K, D]`` (uncompressed: float features barely compress)."""
    import zarr

    t0 = time.perf_counter()
    array = zarr.create_array(path, shape=database.shape, chunks=(chunk, *database.shape[1:]), dtype="float16",
                              compressors=None, overwrite=True)  # fmt: skip
    step = max(chunk, block // chunk * chunk)
    for start in range(0, len(database), step):
        array[start : start + step] = database[start : start + step].astype(np.float16)
    return zarr.open_array(path, mode="r"), time.perf_counter() - t0


def _bench_compressed(args, kind: str, params: dict, database, queries, sample, array, exact) -> tuple:
    K, D, k, G = args.k, args.dim, 10, args.gt_queries
    nlist = params.get("nlist") or 1024
    nprobe = params.get("nprobe") or max(16, nlist // 32)
    index = CompressedSetIndex(D, K, kind=kind, nlist=nlist, nprobe=nprobe, pq_m=args.pq_m,
                               candidates_per_element=args.candidates, rerank=args.rerank,
                               similarity_kwargs={"alpha": args.alpha}, cache_bytes=args.cache_mb << 20)  # fmt: skip
    rss_before = _rss_gb()
    t0 = time.perf_counter()
    index.train(sample)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    for start in range(0, args.n, args.block):
        index.add(database[start : start + args.block])
    index.attach(array)
    t_add = time.perf_counter() - t0
    gc.collect()
    growth = _rss_gb() - rss_before
    _, found = index.search(queries[:G], k)
    recall = _recall(found, exact)
    index.cache.clear()  # latency from a cold cache: the recall pass must not pre-load the same queries' rows
    p50, p99, batched = _latency(index, queries, k)
    memory = index.memory_bytes()
    resident = (memory["codes"] + memory["ids"] + memory["coarse"] + index.cache.nbytes) / 1e9
    detail = (f"codes {memory['codes'] / 1e9:.2f} + ids {memory['ids'] / 1e9:.2f} + coarse "
              f"{memory['coarse'] / 1e6:.0f} MB + cache {index.cache.nbytes / 1e6:.0f} MB "
              f"(bound {args.cache_mb} MiB)")  # fmt: skip
    print(f"\n{kind}: nlist {nlist}, nprobe {nprobe}, C {args.candidates}, rerank {args.rerank}"
          f"{f', pq_m {args.pq_m}' if kind == 'ivf_pq' else ''}: build {t_train:.1f} s + {t_add:.1f} s; {detail}; "
          f"recall@10 {recall:.4f}; p50 / p99 {p50:.2f} / {p99:.2f} ms; batched {batched:.2f} ms/query; "
          f"cache hits {index.cache.hits} / misses {index.cache.misses}")  # fmt: skip
    sweep = []
    index.cache.clear()
    for c, r in ((args.candidates, args.rerank // 2), (args.candidates, args.rerank * 2), (args.candidates // 2,
                 args.rerank), (args.candidates, args.rerank * 4)):  # fmt: skip
        index.candidates_per_element, index.rerank = c, max(1, r)
        _, f = index.search(queries[:G], k)
        index.cache.clear()
        t0 = time.perf_counter()
        for i in range(G, min(G + 100, len(queries))):  # other queries than the recall pass: cold rows
            index.search(queries[i : i + 1], k)
        ms = (time.perf_counter() - t0) / max(1, min(100, len(queries) - G)) * 1e3
        sweep.append(f"C={c} rerank={max(1, r)}: recall {_recall(f, exact):.4f}, {ms:.1f} ms/query")
    print(f"  {kind} sweep: " + "; ".join(sweep))
    settings = f"nlist {nlist}, nprobe {nprobe}, C {args.candidates}, rerank {args.rerank}"
    if kind == "ivf_pq":
        settings += f", m {args.pq_m}"
    return (kind, settings, f"{resident:.2f} GB", growth, recall, p50, p99, t_train + t_add)


def _bench_setindex(args, params, database, queries, sample, exact, title, t_data, rss0, rss_data, bf) -> tuple:
    """The float ``SetIndex`` (FAISS float32 elements + float16 re-rank vectors in RAM): the original table."""
    K, D, k, G = args.k, args.dim, 10, args.gt_queries
    t_bf_batch, bf_p50, bf_p99 = bf
    index = SetIndex(D, K, similarity_kwargs={"alpha": args.alpha}, candidates_per_element=args.candidates,
                     ef_search=args.ef_search, storage_dtype=args.storage_dtype, **params)  # fmt: skip
    t0 = time.perf_counter()
    index.train(sample)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    for start in range(0, args.n, args.block):
        index.add(database[start : start + args.block])
    t_add = time.perf_counter() - t0
    rss_index = _rss_gb()

    # Indexed search: batched throughput, then one query at a time (latency).
    t0 = time.perf_counter()
    _, found = index.search(queries, k)
    t_batch = time.perf_counter() - t0
    times = []
    for i in range(len(queries)):
        t0 = time.perf_counter()
        index.search(queries[i : i + 1], k)
        times.append(time.perf_counter() - t0)
    idx_p50, idx_p99 = _percentiles(times)
    recall = _recall(found[:G], exact)
    self_hit = float(np.mean([int(exact[i, 0]) in set(found[i].tolist()) for i in range(G)]))

    # Same candidates, re-ranked from the float32 source instead of the stored copies (storage dtype impact).
    stored = index.vectors
    index.set_vectors(database)
    _, found32 = index.search(queries[:G], k)
    index.vectors = stored
    recall32 = _recall(found32, exact)

    # Sweep C (and the ANN knob) on the ground-truth queries: recall and batched time per query.
    knob = {"ivf": "nprobe", "hnsw": "ef_search"}.get(params["kind"])
    base = getattr(index, knob) if knob else None
    settings = [(c, base) for c in sorted({16, 32, 64, 128, args.candidates})]
    if knob:
        settings += [(args.candidates, v) for v in (base // 2, base * 2, base * 4)]
    sweep = []
    for c, v in settings:
        index.candidates_per_element = c
        if knob:
            setattr(index, knob, v)
        t0 = time.perf_counter()
        _, f = index.search(queries[:G], k)
        sweep.append((c, v, _recall(f, exact), (time.perf_counter() - t0) / G * 1e3))

    kind = params["kind"] + "".join(f" {key}={v}" for key, v in params.items() if key != "kind")
    rows = [
        ("index", f"{kind}, C={args.candidates}, re-rank vectors {args.storage_dtype}"),
        ("data generation", f"{t_data:.1f} s"),
        ("index build (train + add)", f"{t_train:.1f} s + {t_add:.1f} s = {t_train + t_add:.1f} s"),
        (f"recall@10 vs exact brute force ({G} queries)", f"{recall:.4f}"),
        (f"recall@10, same candidates re-ranked from float32 ({G} queries)", f"{recall32:.4f}"),
        ("exact top-1 in indexed top-10", f"{self_hit:.3f}"),
        ("indexed latency p50 / p99 (1 query per call)", f"{idx_p50:.2f} ms / {idx_p99:.2f} ms"),
        ("indexed batched (all queries in one call)", f"{t_batch / len(queries) * 1e3:.2f} ms/query"),
        (
            f"brute-force latency p50 / p99 ({args.bf_latency_queries} single queries)",
            f"{bf_p50:.1f} / {bf_p99:.1f} ms",
        ),
        (f"brute-force batched ({G} queries in one call)", f"{t_bf_batch / G * 1e3:.1f} ms/query"),
        ("p50 speed-up vs single-query brute force", f"{bf_p50 / idx_p50:.0f}x"),
        ("p50 speed-up vs batched brute force (amortised per query)", f"{t_bf_batch / G * 1e3 / idx_p50:.0f}x"),
        ("RSS: start / after data / after index build", f"{rss0:.2f} / {rss_data:.2f} / {rss_index:.2f} GB"),
        ("index memory (RSS growth during build)", f"{rss_index - rss_data:.2f} GB"),
        ("peak RSS (ru_maxrss, whole process)", f"{_peak_gb():.2f} GB"),
    ]
    print(f"\n### bench_search: {title}\n\n| measure | value |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print(f"\n| C | {knob or '-'} | recall@10 ({G} queries) | batched ms/query |\n| --- | --- | --- | --- |")
    for c, v, r, ms in sweep:
        print(f"| {c} | {v if knob else '-'} | {r:.4f} | {ms:.2f} |")
    growth = rss_index - rss_data
    knobs = "".join(f"{key} {v}, " for key, v in params.items() if key != "kind")
    return (params["kind"], f"{knobs}C {args.candidates}, float32 elements + {args.storage_dtype} vectors in RAM",
            f"{growth:.2f} GB (RSS)", growth, recall, idx_p50, idx_p99, t_train + t_add)  # fmt: skip


if __name__ == "__main__":
    main()
