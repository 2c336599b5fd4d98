"""Random-row reads from the embedding store: what a compressed index's re-ranking cache miss costs.

Writes N random K x D float32 sets twice: with ``setemb.embedding_store.EmbeddingStoreWriter`` (one shard per
1,024-set unit, zstd chunks of ``ROWS_PER_CHUNK`` sets) and as the store was before (zstd chunks of a whole unit),
then reads ``--rows`` random rows ``--reads`` times from each and prints the median read time and the ratio.

Usage: ``python benchmarks/bench_embedding_rows.py [--sets 100000] [--rows 64] [--reads 50]``
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from setemb.embedding_store import EmbeddingStoreWriter


def median_read_ms(array: zarr.Array, data: np.ndarray, rows: int, reads: int, rng: np.random.Generator) -> float:
    times = []
    for _ in range(reads):
        picked = np.sort(rng.choice(len(data), rows, replace=False))
        start = time.perf_counter()
        got = array.get_orthogonal_selection((picked,))
        times.append(time.perf_counter() - start)
        assert np.array_equal(got, data[picked])
    return float(np.median(times)) * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", type=int, default=100_000)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--reads", type=int, default=50)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    data = rng.normal(size=(args.sets, args.k, args.dim)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        writer = EmbeddingStoreWriter(Path(tmp) / "store.zarr")
        writer.require_set("s", ids=range(args.sets), num_embeddings=args.k, embed_dim=args.dim).write_all(data)
        writer.finalize()
        sharded = zarr.open_group(str(Path(tmp) / "store.zarr"), mode="r")["s/embeddings"]
        whole = zarr.open_group(str(Path(tmp) / "old.zarr"), mode="w").create_array(
            "e", shape=data.shape, chunks=(1024, args.k, args.dim), dtype="float32", compressors=ZstdCodec(level=3)
        )
        for lo in range(0, args.sets, 1024):
            whole[lo : lo + 1024] = data[lo : lo + 1024]
        new = median_read_ms(sharded, data, args.rows, args.reads, rng)
        old = median_read_ms(whole, data, args.rows, args.reads, rng)
    print(f"{args.rows} random rows of {args.sets:,} sets (K={args.k}, D={args.dim}, float32), median of {args.reads}:")
    print(f"  store layout (shards of 1,024, chunks of {sharded.chunks[0]}): {new:.0f} ms")
    print(f"  whole-unit chunks of 1,024:                     {old:.0f} ms   (ratio {old / new:.1f}x)")


if __name__ == "__main__":
    main()
