"""Compressed set index: IVF-SQ8 / IVF-PQ element candidates (FAISS), exact set re-ranking from a Zarr store.

Part of the ``setemb.index`` package: it reuses the element normalisation of ``candidates`` and the exact
``paired_scores`` of ``rerank``. `setemb.index.SetIndex` keeps float32 element copies inside FAISS plus float16
re-ranking vectors in RAM (1M sets x K=4 x D=256: 7.6 GB). `CompressedSetIndex` keeps only compressed element
codes resident:

* ``ivf_sq8``: ``IndexIVFScalarQuantizer`` (8-bit per dimension, D bytes per element; 4M x 256 -> 1.0 GB);
* ``ivf_pq``: ``IndexIVFPQ`` (``pq_m`` sub-quantizers of ``pq_bits`` bits; 32 bytes per element at m=32).

Both hold 8-byte ids per element in their inverted lists. Search, for each query set ``[L, D]``:

1. **Element candidates**: each of the L query elements takes its top-``C`` element hits with their approximate
   cosines ``s_lc`` (decoded from the codes) -- as ``SetIndex``'s step 1.
2. **Proxy pre-rank** of the candidate items: ``p(g) = sum_l max(t_l, max_{c: item(c)=g} s_lc)``, where ``t_l`` is the
   C-th (lowest) hit cosine of element l: an item without a hit for element l gets that element's upper bound, so
   ``p`` is the sum over query elements of (an approximation of) the best element cosine with g, the first half of
   Chamfer, which smooth-Chamfer is dominated by. The top ``rerank`` items by ``p`` go on (ties: lower row).
3. **Exact re-ranking** of those items with the configured set similarity (``rerank.paired_scores``), reading
   their stored sets from a Zarr array (float16 or float32 ``[G, K, D]``; the embedding-store layout) through
   `RowCache`, an LRU cache bounded in bytes. Nothing else of the database is resident.

Exactness: the returned scores are exact set similarities; the ranking is exact over the re-ranked items, and the
recall loss comes only from steps 1-2 (measured in ``benchmarks/bench_search.py``). With every cell probed
(``nprobe = nlist``), ``candidates_per_element`` >= the elements indexed and ``rerank`` >= the sets indexed, every set
is re-ranked and the result is the exact top-k. Tie rule: equal scores rank the lower row first; fewer than k results
are padded with ``-inf`` / ``-1``. At least k items are re-ranked whatever ``rerank`` says.

The store is referenced, never copied: ``save`` records its path (a relative path is resolved against the index
directory, so an index and its store move together) and a signature (shape, dtype and a digest of a few evenly spaced
rows); ``load`` refuses a store that is missing or no longer matches with `RerankStoreError`, one line.

Shards: ``shard(lo, hi)`` is an index over database rows ``[lo, hi)`` holding the very codes the full index holds for
them (same trained quantizers), re-ranking from the same store and answering global rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
import zarr
from torch import Tensor

from setemb.index.candidates import normalised
from setemb.index.rerank import paired_scores
from setemb.similarity import create_similarity

logger = logging.getLogger(__name__)

COMPRESSED_KINDS = ("ivf_sq8", "ivf_pq")
COMPRESSED_FORMAT = "setemb.compressed_index/1"
_FORMAT = COMPRESSED_FORMAT
_SIGNATURE_ROWS = 16  # rows hashed into the store signature


class RerankStoreError(ValueError):
    """The re-ranking store of a saved compressed index is missing, or is not the array the index was built on."""


def store_signature(array: Any) -> dict[str, Any]:
    """Shape, dtype and sha256 of up to 16 evenly spaced rows of ``array [G, K, D]`` (cheap: one sorted read)."""
    G = int(array.shape[0])
    rows = np.unique(np.linspace(0, G - 1, min(G, _SIGNATURE_ROWS)).round().astype(np.int64)) if G else np.empty(0, int)
    sample = np.ascontiguousarray(_read(array, rows)) if G else np.empty(0)
    return {"shape": [int(n) for n in array.shape], "dtype": str(np.dtype(array.dtype)),
            "rows_sha256": hashlib.sha256(sample.tobytes()).hexdigest()}  # fmt: skip


def _read(array: Any, rows: np.ndarray) -> np.ndarray:
    return np.asarray(array.oindex[rows] if isinstance(array, zarr.Array) else array[rows])


def _normalised(x: np.ndarray) -> np.ndarray:
    return normalised(np.asarray(x, dtype=np.float32))


class RowCache:
    """Rows ``[K, D]`` of an array ``[G, K, D]`` (zarr, memmap or numpy), read on demand, kept in an LRU bounded by
    ``max_bytes`` (0 disables caching). Misses of one call are read together (one zarr ``oindex``)."""

    def __init__(self, array: Any, max_bytes: int = 64 << 20) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.array, self.max_bytes = array, int(max_bytes)
        self.row_bytes = int(np.prod(array.shape[1:])) * np.dtype(array.dtype).itemsize
        self._rows: OrderedDict[int, np.ndarray] = OrderedDict()
        self.hits = self.misses = 0

    def clear(self) -> None:
        """Drop every cached row and reset the hit / miss counters."""
        self._rows.clear()
        self.hits = self.misses = 0

    @property
    def nbytes(self) -> int:
        return len(self._rows) * self.row_bytes

    def get(self, rows: np.ndarray) -> np.ndarray:
        """``rows [P]`` sorted unique int64 -> ``[P, K, D]`` float32."""
        out = np.empty((len(rows), *self.array.shape[1:]), np.float32)
        missing = []
        for i, row in enumerate(rows.tolist()):
            cached = self._rows.get(row)
            if cached is None:
                missing.append(i)
            else:
                self._rows.move_to_end(row)
                out[i] = cached
        self.hits += len(rows) - len(missing)
        self.misses += len(missing)
        if missing:
            wanted = rows[missing]
            block = _read(self.array, wanted)
            out[missing] = block
            capacity = self.max_bytes // max(1, self.row_bytes)
            if capacity:
                for row, value in zip(wanted.tolist()[-capacity:], block[-capacity:], strict=True):
                    self._rows[row] = value.copy()  # own the row: the block may be large
                while len(self._rows) > capacity:
                    self._rows.popitem(last=False)
        return out


class CompressedSetIndex:
    """Compressed element codes + proxy pre-rank + exact re-ranking from a store (module docstring).

    Args:
        dim: element width D. num_elements: K, elements per database set.
        kind: ``"ivf_sq8"`` or ``"ivf_pq"``.
        nlist: IVF cells. nprobe: cells visited per query element.
        pq_m: PQ sub-quantizers (divides D). pq_bits: bits per PQ code (2^bits centroids per sub-quantizer).
        candidates_per_element: C, element hits per query element.
        rerank: items re-ranked exactly per query (the top by the proxy score; at least k).
        similarity, similarity_kwargs: the registered set similarity of the exact re-ranking.
        cache_bytes: bound of the re-ranking row cache.
        train_size: elements sampled for training when ``add_from_store`` trains implicitly. seed: that sample.
    """

    def __init__(self, dim: int, num_elements: int, *, kind: str = "ivf_sq8", nlist: int = 1024, nprobe: int = 32,
                 pq_m: int = 32, pq_bits: int = 8, candidates_per_element: int = 64, rerank: int = 32,
                 similarity: str = "smooth_chamfer", similarity_kwargs: dict[str, Any] | None = None,
                 cache_bytes: int = 64 << 20, train_size: int = 100_000, seed: int = 0) -> None:  # fmt: skip
        if kind not in COMPRESSED_KINDS:
            raise ValueError(f"kind must be one of {COMPRESSED_KINDS}, got {kind!r}")
        for key, value in dict(dim=dim, num_elements=num_elements, nlist=nlist, nprobe=nprobe, pq_m=pq_m,
                               pq_bits=pq_bits, candidates_per_element=candidates_per_element, rerank=rerank,
                               train_size=train_size).items():  # fmt: skip
            if int(value) < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
        if kind == "ivf_pq" and dim % pq_m:
            raise ValueError(f"pq_m must divide dim={dim}, got {pq_m}")
        if kind == "ivf_pq" and pq_bits > 16:
            raise ValueError(f"pq_bits must be <= 16, got {pq_bits}")
        if cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {cache_bytes}")
        self.config: dict[str, Any] = dict(
            dim=dim, num_elements=num_elements, kind=kind, nlist=nlist, pq_m=pq_m, pq_bits=pq_bits,
            similarity=similarity, similarity_kwargs=dict(similarity_kwargs or {}), train_size=train_size, seed=seed,
        )  # fmt: skip
        self._similarity = create_similarity(similarity, **self.config["similarity_kwargs"])
        self.nprobe, self.candidates_per_element, self.rerank = nprobe, candidates_per_element, rerank
        self.cache_bytes = int(cache_bytes)
        self._quantizer = faiss.IndexFlatIP(dim)
        if kind == "ivf_sq8":
            self.faiss_index = faiss.IndexIVFScalarQuantizer(
                self._quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
            )
        else:
            self.faiss_index = faiss.IndexIVFPQ(self._quantizer, dim, nlist, pq_m, pq_bits, faiss.METRIC_INNER_PRODUCT)
        self.cache: RowCache | None = None
        self.size = 0  # sets held: database rows [first_row, first_row + size)
        self.first_row = 0
        self.store_rows: int | None = None  # rows of the store a shard re-ranks from (None: size)

    def __len__(self) -> int:
        return self.size

    # ------------------------------------------------------------------------------------------------ build
    def train(self, sample: Any) -> None:
        """Train the IVF cells and the quantizer on ``sample`` ([n, K, D] sets or [n, D] elements)."""
        x = np.asarray(sample.detach().cpu() if isinstance(sample, Tensor) else sample, dtype=np.float32)
        x = x.reshape(-1, x.shape[-1])
        if x.shape[1] != self.config["dim"] or len(x) < self.config["nlist"]:
            raise ValueError(f"sample: expected >= nlist={self.config['nlist']} elements of width "
                             f"{self.config['dim']}, got shape {tuple(x.shape)}")  # fmt: skip
        if self.config["kind"] == "ivf_pq" and len(x) < 2 ** self.config["pq_bits"]:
            raise ValueError(f"ivf_pq with pq_bits={self.config['pq_bits']} trains {2 ** self.config['pq_bits']} "
                             f"centroids per sub-quantizer and needs at least that many elements, got {len(x)}; "
                             "lower pq_bits or index more sets")  # fmt: skip
        self.faiss_index.train(_normalised(x))

    def add(self, sets: Any) -> None:
        """Append the elements of ``sets [n, K, D]`` as codes (element ``g·K + k`` is set g's k-th); the sets
        themselves are not kept: `attach` the store they live in."""
        K, D = self.config["num_elements"], self.config["dim"]
        block = np.asarray(sets.detach().cpu() if isinstance(sets, Tensor) else sets, dtype=np.float32)
        if block.ndim != 3 or block.shape[1:] != (K, D):
            raise ValueError(f"sets: expected [n, {K}, {D}], got shape {tuple(block.shape)}")
        if not self.faiss_index.is_trained:
            raise ValueError("train the index first (train(sample)) or use add_from_store")
        if self.first_row or self.store_rows is not None:
            raise ValueError("a shard holds a fixed row range: add to the full index and shard it again")
        self.faiss_index.add(_normalised(block.reshape(-1, D)))
        self.size += len(block)

    def attach(self, array: Any) -> None:
        """Re-rank from ``array [G, K, D]`` (zarr / memmap; float16 is enough) through a bounded cache; G is
        ``len(self)`` (a shard: the rows of the store it was cut from)."""
        K, D = self.config["num_elements"], self.config["dim"]
        rows = self.size if self.store_rows is None else self.store_rows
        if tuple(array.shape) != (rows, K, D):
            raise ValueError(f"store: expected [{rows}, {K}, {D}] (one set per indexed set), "
                             f"got shape {tuple(array.shape)}")  # fmt: skip
        self.cache = RowCache(array, self.cache_bytes)

    def add_from_store(self, source: Any, block_size: int = 65536) -> None:
        """Train on a sample (when untrained), add every set of ``source`` in blocks, and attach it for re-ranking.

        Args:
            source: zarr array ``[G, K, D]`` or its path (a group path uses its ``embeddings`` array).
        """
        array = _open_array(source)
        G = array.shape[0]
        if not self.faiss_index.is_trained:
            n = min(G, max(1, math.ceil(self.config["train_size"] / self.config["num_elements"])))
            rows = np.sort(np.random.default_rng(self.config["seed"]).choice(G, n, replace=False))
            self.train(_read(array, rows))
        for start in range(0, G, block_size):
            self.add(np.asarray(array[start : min(start + block_size, G)]))
        self.attach(array)

    def shard(self, lo: int, hi: int) -> CompressedSetIndex:
        """An index over database rows ``[lo, hi)`` only: the same trained quantizers and the same codes for those
        rows (copied, not re-encoded), re-ranking from the same store, returning global rows. Building it briefly
        holds a second copy of this index's codes (faiss ``clone_index`` then ``reset``)."""
        if self.cache is None:
            raise ValueError("no re-ranking store attached: call attach(array) or add_from_store")
        if not self.first_row <= lo < hi <= self.first_row + self.size:
            raise ValueError(f"shard rows [{lo}, {hi}) are not inside [{self.first_row}, {self.first_row + self.size})")
        K = self.config["num_elements"]
        part = CompressedSetIndex(**self.config, nprobe=self.nprobe, candidates_per_element=self.candidates_per_element,
                                  rerank=self.rerank, cache_bytes=self.cache_bytes)  # fmt: skip
        part.faiss_index = faiss.clone_index(self.faiss_index)
        part.faiss_index.reset()
        self.faiss_index.copy_subset_to(part.faiss_index, 0, lo * K, hi * K)  # 0: the element ids in [a1, a2)
        part.first_row, part.size = lo, hi - lo
        part.store_rows = self.size if self.store_rows is None else self.store_rows
        part.attach(self.cache.array)
        return part

    # ------------------------------------------------------------------------------------------------ search
    def search(self, queries: Any, k: int = 10) -> tuple[Tensor, Tensor]:
        """Top-k database sets per query set ``queries [Q, L, D]``: ``(scores [Q, k] float32, rows [Q, k] int64)``,
        best first, exact set similarities, padded with ``-inf`` / ``-1``."""
        q = np.asarray(queries.detach().cpu() if isinstance(queries, Tensor) else queries, dtype=np.float32)
        if q.ndim != 3 or q.shape[2] != self.config["dim"]:
            raise ValueError(f"queries: expected [Q, L, {self.config['dim']}], got shape {tuple(q.shape)}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if self.size and self.cache is None:
            raise ValueError("no re-ranking store attached: call attach(array) or add_from_store")
        Q, L, D = q.shape
        scores = torch.full((Q, k), float("-inf"))
        rows = torch.full((Q, k), -1, dtype=torch.long)
        if Q == 0 or L == 0 or self.size == 0:
            return scores, rows
        self.faiss_index.nprobe = int(self.nprobe)
        C = min(self.candidates_per_element, self.faiss_index.ntotal)
        cos, hits = self.faiss_index.search(_normalised(q.reshape(Q * L, D)), C)  # [Q*L, C]
        cos, hits = cos.reshape(Q, L, C), hits.reshape(Q, L, C)
        for i in range(Q):
            items = self._prerank(cos[i], hits[i], max(self.rerank, k))  # [R] ascending rows
            if len(items) == 0:
                continue
            candidates = torch.from_numpy(self.cache.get(items))  # [R, K, D]
            sims = paired_scores(torch.from_numpy(q[i : i + 1]), candidates[None], self.config["similarity"],
                                 self.config["similarity_kwargs"], self._similarity)[0].float()  # [R]  # fmt: skip
            kk = min(k, len(items))
            top, order = torch.sort(sims, descending=True, stable=True)  # ties: lower row first (items ascending)
            scores[i, :kk], rows[i, :kk] = top[:kk], torch.from_numpy(items)[order[:kk]]
        return scores, rows

    def _prerank(self, cos: np.ndarray, hits: np.ndarray, rerank: int) -> np.ndarray:
        """``cos, hits [L, C]`` of one query -> the top-``rerank`` candidate rows by the proxy score, ascending."""
        L, C = hits.shape
        valid = hits >= 0
        items = np.where(valid, hits // self.config["num_elements"], -1)  # [L, C]
        unique, inverse = np.unique(items[valid], return_inverse=True)  # [U]
        if len(unique) == 0:
            return unique
        floor = np.where(valid, cos, np.inf).min(1)  # [L] t_l, the lowest hit cosine per query element
        best = np.repeat(floor[:, None], len(unique), 1)  # [L, U]
        element = np.repeat(np.arange(L), C).reshape(L, C)[valid]
        np.maximum.at(best, (element, inverse), cos[valid])
        proxy = best.sum(0)  # [U]
        if len(unique) > rerank:
            keep = np.lexsort((unique, -proxy))[:rerank]  # by proxy, ties to the lower row
            unique = np.sort(unique[keep])
        return unique.astype(np.int64)

    def sets(self, rows: Any) -> np.ndarray:
        """Stored sets ``[P, K, D]`` float32 of database ``rows [P]`` (any order), read through the cache."""
        if self.cache is None:
            raise ValueError("no re-ranking store attached: call attach(array) or add_from_store")
        rows = np.asarray(rows, dtype=np.int64)
        unique, inverse = np.unique(rows, return_inverse=True)
        out = self.cache.get(unique) if len(unique) else np.empty((0, *self.cache.array.shape[1:]), np.float32)
        return out[inverse]

    # ------------------------------------------------------------------------------------------------ memory / io
    def memory_bytes(self) -> dict[str, int]:
        """Resident bytes by part: element codes and ids in the inverted lists, the coarse quantizer (+ PQ
        codebooks), and the re-ranking cache's bound."""
        invlists = self.faiss_index.invlists
        n = sum(invlists.list_size(i) for i in range(invlists.nlist))
        codes = n * self.faiss_index.code_size
        coarse = self.config["nlist"] * self.config["dim"] * 4
        if self.config["kind"] == "ivf_pq":
            coarse += self.config["dim"] * (1 << self.config["pq_bits"]) * 4  # M codebooks of 2^bits x D/M floats
        return {"codes": codes, "ids": n * 8, "coarse": coarse, "cache_bound": self.cache_bytes}

    def save(self, directory: str | Path, store: str | Path) -> None:
        """Write ``index.faiss`` and ``config.json`` to ``directory``: the re-ranking ``store`` path (a relative path
        is resolved against ``directory`` on load) and the signature of the attached store."""
        if self.cache is None:
            raise ValueError("no re-ranking store attached: call attach(array) or add_from_store")
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.faiss_index, str(out / "index.faiss"))
        search = dict(nprobe=self.nprobe, candidates_per_element=self.candidates_per_element, rerank=self.rerank,
                      cache_bytes=self.cache_bytes)  # fmt: skip
        meta = {"format": _FORMAT, "size": self.size, "first_row": self.first_row, "store_rows": self.store_rows,
                "store": str(store), "store_signature": store_signature(self.cache.array),
                "config": {**self.config, **search}}  # fmt: skip
        (out / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True))

    @staticmethod
    def open_store(directory: str | Path, store: str | Path | None = None) -> zarr.Array:
        """The re-ranking array of the index saved in ``directory`` (or ``store`` in place of the recorded path),
        checked against the recorded signature; `RerankStoreError` (one line) when missing or different."""
        src = Path(directory)
        meta = json.loads((src / "config.json").read_text())
        path = Path(meta["store"] if store is None else store)
        path = path if path.is_absolute() else src / path
        try:
            array = _open_array(path)
        except (FileNotFoundError, KeyError) as e:
            raise RerankStoreError(f"the compressed index at {src} re-ranks from {os.path.normpath(path)}, which is "
                                   f"missing ({type(e).__name__}: {e})") from None  # fmt: skip
        expected = meta.get("store_signature")
        if expected is not None and (found := store_signature(array)) != expected:
            if (found["shape"], found["dtype"]) != (expected["shape"], expected["dtype"]):
                change = f"is {found['shape']} {found['dtype']} but was {expected['shape']} {expected['dtype']}"
            else:
                change = "holds other vectors (sampled rows differ)"
            raise RerankStoreError(f"the compressed index at {src} re-ranks from {os.path.normpath(path)}, which "
                                   f"{change} when the index was built")  # fmt: skip
        return array

    @classmethod
    def load(cls, directory: str | Path, *, store: str | Path | None = None,
             cache_bytes: int | None = None) -> CompressedSetIndex:  # fmt: skip
        """Rebuild an index written by ``save`` and attach its store (opened read-only, checked by `open_store`).

        Args:
            store: re-rank from this array path instead of the recorded one. cache_bytes: override the cache bound.
        """
        src = Path(directory)
        meta = json.loads((src / "config.json").read_text())
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{src}: expected format {_FORMAT!r}, got {meta.get('format')!r}")
        array = cls.open_store(src, store)
        config = dict(meta["config"])
        if cache_bytes is not None:
            config["cache_bytes"] = int(cache_bytes)
        index = cls(**config)
        index.faiss_index = faiss.read_index(str(src / "index.faiss"))
        index.size, index.first_row, index.store_rows = meta["size"], meta.get("first_row", 0), meta.get("store_rows")
        if index.faiss_index.ntotal != index.size * index.config["num_elements"]:
            raise ValueError(f"{src}: inconsistent index ({meta['size']} sets expected)")
        index.attach(array)
        return index


def _open_array(source: Any) -> Any:
    """A zarr array (or array-like) from ``source``: an array, or the path of an array or of a group holding an
    ``embeddings`` array (the `setemb.embedding_store` layout); FileNotFoundError / KeyError when absent."""
    if not isinstance(source, (str, Path)):
        return source
    array = zarr.open(str(source), mode="r")
    return array["embeddings"] if isinstance(array, zarr.Group) else array


__all__ = ["COMPRESSED_FORMAT", "COMPRESSED_KINDS", "CompressedSetIndex", "RerankStoreError", "RowCache",
           "store_signature"]  # fmt: skip
